"""The fair quality benchmark: every method at equal SR, epochs, fine-tuning recipe, BatchNorm re-estimation and
distillation setting, on converged bases; several seeds where it decides.

    python benchmarks/quality.py                 # the protocol below (hours on 2 CPU cores; resumable)
    python benchmarks/quality.py --list          # the rows, and which are done
    python benchmarks/quality.py --only 'cifar10/resnet34_cifar/.*/sr10'   # a regex over row ids
    python benchmarks/quality.py --smoke --out /tmp/q   # every code path in a minute (digits, small_cnn)
    python benchmarks/quality.py --budget-scale 2 --only ...  # 30 epochs a method -> quality_budget30.{json,md}
    python benchmarks/quality.py --redo '/ltc/'  # rerun finished rows (after a default changed), records replaced

Protocol (the default profile): CIFAR-10 (``../shared/data``, 45,000 train / 5,000 validation images, split seed 0)
with ``resnet34_cifar`` and ``vgg16_cifar`` at width 0.25, PneumoniaMNIST (its train / val) with ``resnet34_cifar``
width 0.25; bases converged (40 epochs, cosine, augmentation: ``../shared/bases`` or trained once with ``ltc train``
into ``runs/bases``); methods ``ltc``, ``lrc``, ``oneshot``, ``vbmf`` (weakened to the target), ``uniform``,
``prune``, each with a budget of 15 epochs (LC steps + fine-tuning for ``ltc`` / ``lrc``, fine-tuning for the
others) and the library's defaults otherwise (the same for every method: BatchNorm re-estimated after deployment,
the same distillation setting); targets SR 5 and 10; 3 seeds at SR 10 on ``resnet34_cifar`` / CIFAR-10 (the
headline), 1 elsewhere, 3 for a pair that one seed left close (``CLOSE``). The ablation of the LC recipe (issue 13)
runs on the headline with 3 seeds; a change to the defaults measured elsewhere (``VARIANTS``) too. Every finished
run is a run folder under ``runs/quality/`` (``ltc eval`` takes it on any split) and is appended to
``benchmarks/results/quality_summary.{json,md}`` at once; a rerun skips finished runs and resumes an interrupted one
from its checkpoint. Create ``runs/quality/PAUSE`` to pause between runs.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

EPOCHS = 15
TARGETS = (5.0, 10.0)
HEADLINE = ("cifar10", "resnet34_cifar", 10.0)
SEEDS_HEADLINE = 3
WIDTH = 0.25
METHODS = ("ltc", "lrc", "oneshot", "vbmf", "uniform", "prune")
MODELS = {"cifar10": ("resnet34_cifar", "vgg16_cifar"), "pneumoniamnist": ("resnet34_cifar",)}
DISPLAY = {"ltc": "LTC", "lrc": "LRC", "oneshot": "Tucker one-shot", "vbmf": "Tucker-VBMF (to the target)",
           "uniform": "Tucker uniform", "prune": "Channel pruning (Torch-Pruning)"}
# The LC recipe's ablation (issue 13), on the headline: the first version's LTC, then one change at a time.
V1 = {"metric": "weight", "mu_cap": "global", "pull": 5.0, "lc_weight_decay": 5e-4, "lr_schedule": "restart",
      "min_rank": 1, "kd_weight": 0.0, "steps": 10, "penalty_step": "gradient"}
SCHEDULE = {"mu_cap": "layer", "pull": None, "lc_weight_decay": 0.0}  # every layer ends at the stability cap
# With 10 LC steps the converging path pins W to Θ from step 5 on and leaves 5 fine-tuning epochs; measured on seed 0
# (72.90 % against v1's 74.44 %), so the rows after it split the budget 5 LC steps + 10 fine-tuning epochs.
SHORT = {"steps": 5}
CURRENT = {**V1, **SCHEDULE, **SHORT, "metric": "data", "centered": True, "min_rank": 2, "kd_weight": 0.5}
"""The library's defaults until 2026-12-07, spelled out (the ablation row ``ltc+schedule/5+data+floor+kd``)."""
MANY = {"steps": 25, "epochs_per_step": 0.2}
"""The same 5 LC epochs cut into 25 L steps (3 seeds: 79.36 / 79.06 / 78.28 % against 76.52 / 77.36 / 77.34 % with 5
L steps; with the constant L-step rate of ``CURRENT``, the ablation row ``ltc+schedule/25x0.2+data+floor+kd``, the
library's default from a334f59 to 01ef327)."""
COSINE = {**CURRENT, **MANY, "lr_schedule": "cosine", "lr_anneal": 1.0}
"""The ablation row ``ltc+schedule/25x0.2+data+floor+kd+cosine``: 25 L steps whose learning rate anneals (cosine
over all the LC epochs) with the penalty scaled to it (the library's default from 01ef327 to the held cosine)."""
HELD = {**COSINE, "lr_anneal": 0.2}
"""The library's defaults from 2026-12-06 to 2026-12-07 (the ablation row
``ltc+schedule/25x0.2+data+floor+kd+held-cosine``): the same, the rate held at ``lr`` for the first 20 L steps and
annealed (cosine) over the last 5: 1, 0.90, 0.65, 0.35 and 0.10 of ``lr``. The ``ltc+defaults+...`` probe rows each
change one thing of it."""
DEFAULTS = {**HELD, "penalty_step": "proximal"}
"""The library's defaults, spelled out (the ablation row ``ltc+defaults+proximal``): the same with the penalty
applied by its exact step after each SGD step."""
ABLATION: list[tuple[str, str, dict[str, Any]]] = [
    ("ltc-v1", "ltc", V1),
    ("ltc+schedule", "ltc", {**V1, **SCHEDULE}),
    ("ltc+schedule/5", "ltc", {**V1, **SCHEDULE, **SHORT}),
    ("ltc+schedule/5+data(uncentered)", "ltc", {**V1, **SCHEDULE, **SHORT, "metric": "data", "centered": False}),
    ("ltc+schedule/5+data", "ltc", {**V1, **SCHEDULE, **SHORT, "metric": "data", "centered": True}),
    ("ltc+schedule/5+data+floor", "ltc", {**V1, **SCHEDULE, **SHORT, "metric": "data", "centered": True,
                                           "min_rank": 2}),
    ("ltc+schedule/5+data+floor+kd", "ltc", CURRENT),
    # the budget reached a step at a time (SR ** ((j + 1) / steps) at C step j) instead of at every C step, and L
    # steps of a fifth of an epoch each (1 epoch of LC, 14 of fine-tuning), apart and together
    ("ltc+schedule/5+data+floor+kd+gradual", "ltc", {**CURRENT, "target_schedule": "gradual"}),
    ("ltc+schedule/5+data+floor+kd+short", "ltc", {**CURRENT, "epochs_per_step": 0.2}),
    ("ltc+schedule/5+data+floor+kd+gradual+short", "ltc", {**CURRENT, "target_schedule": "gradual",
                                                           "epochs_per_step": 0.2}),
    ("ltc+schedule/5+data+floor4+kd", "ltc", {**CURRENT, "min_rank": 4}),
    # the same 5 LC epochs cut into 25 L steps of a fifth of an epoch: Θ (re-chosen at each C step) follows W 5x as
    # often, so that the last, pinned L steps can still learn (the default from a334f59 to 01ef327)
    ("ltc+schedule/25x0.2+data+floor+kd", "ltc", {**CURRENT, **MANY}),
    # twice as many C steps again, the LC epochs unchanged: W ends closer to Θ (0.020 in the metric on seeds 0-1
    # against 0.028-0.031), accuracy the same on those seeds
    ("ltc+schedule/50x0.1+data+floor+kd", "ltc", {**CURRENT, "steps": 50, "epochs_per_step": 0.1}),
    # the L steps' learning rate annealed (cosine over the LC epochs) with the penalty scaled to it, so each
    # iteration still pulls as the μ path says while the gradient noise around Θ falls with the learning rate (the
    # default since 01ef327)
    ("ltc+schedule/25x0.2+data+floor+kd+cosine", "ltc", COSINE),
    # the rate held at lr for the first 80 % of the LC epochs, annealed over the last 20 % (a warmup-stable-decay
    # shape): the L steps where μ rises and the network must learn under the penalty keep the full rate (VGG-16 SR 10
    # lost 2 points with the rate annealed over all of them), and the last ones still end W close to Θ (the
    # default since this row)
    ("ltc+schedule/25x0.2+data+floor+kd+held-cosine", "ltc", HELD),
    # probes of what is left of issue 13, one change to the defaults each: a metric that weighs weight space 10x
    # more (does W end within 0.02 of Θ in weight space, and at what cost; 3 seeds), a longer anneal (the 0.43
    # points the held rate gave up on the headline), a fine-tuning rate 5x larger (is the gap to the base the
    # recipe's? It lost 0.66 points on seed 0, so one-shot was not run with it)
    ("ltc+defaults+damping0.1", "ltc", {**HELD, "damping": 0.1}),
    ("ltc+defaults+anneal0.4", "ltc", {**HELD, "lr_anneal": 0.4}),
    ("ltc+defaults+ft-lr0.05", "ltc", {**HELD, "finetune_lr": 0.05}),
    # distillation from the base weighted 0.9 instead of 0.5 (the usual CIFAR weight at temperature 4), LTC and
    # one-shot alike: does a stronger teacher signal close part of the gap to the base? (LTC gained 0.10 on seed 0,
    # so the one-shot row was not run)
    ("ltc+defaults+kd0.9", "ltc", {**HELD, "kd_weight": 0.9}),
    # BatchNorm re-estimated after deployment on the augmented training batches (one pass) instead of the 2048
    # calibration images without augmentation: on the trained bases the calibration images cost 0.6-1.4 points
    # against the stored statistics and the augmented batches none; is part of the 3-point drop at deployment that?
    ("ltc+defaults+bn-train", "ltc", {**HELD, "bn_data": "train"}),
    # each layer's relative error in the C step (and penalty) weighed by its loss sensitivity, the Fisher information
    # of its output (ltc.metrics.collect_output_sensitivity, once on the base), instead of all layers alike: does
    # the allocation improve? LTC and one-shot alike (seed 0: both level, −0.30 / −0.34, both higher before fine-tuning,
    # +1.66 / +2.94, so seeds 1-2 were not run)
    ("ltc+defaults+fisher", "ltc", {**HELD, "weighting": "fisher"}),
    # the penalty applied by its exact (proximal) step after each SGD step instead of as a gradient in the loss
    # (penalty_step='proximal'): no stability cap from the metric's largest eigenvalue, so every direction of W − Θ
    # (down to the smallest, damped eigenvalue) is pinned by the last L step and the deployed Θ is what training reached
    # (the default since this row)
    ("ltc+defaults+proximal", "ltc", DEFAULTS),
    # the proximal step on the gradient step's μ path (``mu_path='stable'``; see ``VARIANTS``, where VGG-16 SR 10
    # measures the same change): is the headline level with it?
    ("ltc+defaults+stable-path", "ltc", {**DEFAULTS, "mu_path": "stable"}),
    # the gradient step while the rate is held, the proximal step where it anneals (``VARIANTS`` has it on VGG-16)
    ("ltc+defaults+late-proximal", "ltc", {**DEFAULTS, "penalty_step": "late-proximal"}),
    # steps / lc_weight_decay do nothing for one-shot; pinned to the values this row ran with (adding the field
    # lr_anneal moved every folder hash: finished rows are found by id, a --redo starts a new folder)
    ("oneshot-weight", "oneshot", {"metric": "weight", "min_rank": 1, "kd_weight": 0.0, "steps": 10,
                                   "lc_weight_decay": 5e-4}),
    ("oneshot-data", "oneshot", {"metric": "data", "centered": True, "min_rank": 1, "kd_weight": 0.0}),
    ("oneshot-data+floor+kd", "oneshot", {"metric": "data", "centered": True, "min_rank": 2, "kd_weight": 0.5}),
    ("oneshot-data+floor4+kd", "oneshot", {"metric": "data", "centered": True, "min_rank": 4, "kd_weight": 0.5}),
    ("oneshot-data+floor+kd+fisher", "oneshot", {"metric": "data", "centered": True, "min_rank": 2, "kd_weight": 0.5,
                                                 "weighting": "fisher"}),
]
# rows that only explain a choice: seed 0 only (the uncentred data metric lost to the centred one; see ltc.engine), in
# the ablation and among the variants
SEED0_ONLY = {"ltc+schedule/5+data(uncentered)", "ltc+schedule", "ltc+schedule/5+data+floor4+kd",
              "oneshot-data+floor4+kd", "ltc+defaults+anneal0.4", "ltc+defaults+ft-lr0.05", "ltc+defaults+kd0.9",
              "ltc+defaults+fisher", "oneshot-data+floor+kd+fisher", "ltc+defaults+stable-path", "ltc+stable-path"}
# Where seed 0 left LTC and another method a few tenths of a point apart, their seeds 1-2 decide (the brief: several
# seeds where differences are small). VGG-16 SR 10: LTC 62.90, uniform 62.98 on seed 0 (issue 13).
CLOSE = {("cifar10", "vgg16_cifar", 10.0): ("ltc", "uniform")}
# One change to the defaults measured off the headline, on 3 seeds, in a table of its own beside the setting's
# methods, paired with its default LTC rows: (dataset, model, target SR, name, method, overrides). VGG-16 SR 10 is
# where the proximal penalty step (the default since ``ltc+defaults+proximal``) looked worse than the gradient step it
# replaced (62.90 % against 64.50 % on seed 0), and where LTC trails uniform ranks on the mean; does it?
VARIANTS: list[tuple[str, str, float, str, str, dict[str, Any]]] = [
    ("cifar10", "vgg16_cifar", 10.0, "ltc+gradient", "ltc", {"penalty_step": "gradient"}),
    # the proximal step on the gradient step's μ path (``mu_path='stable'``: μ_final 34.3 on this row) instead of
    # the one that pins every direction (μ_final 1055.6): that path is 5x stronger than the gradient one at every C
    # step, and its L steps' loss rose to the end (4.1 against 2.9 on seed 1)
    ("cifar10", "vgg16_cifar", 10.0, "ltc+stable-path", "ltc", {"mu_path": "stable"}),
    # the gradient step while the L-step rate is held (the first 20 L steps), the proximal step where it anneals (the
    # last 5), on the gradient's μ path: the gradient step's learning, then every direction pinned?
    ("cifar10", "vgg16_cifar", 10.0, "ltc+late-proximal", "ltc", {"penalty_step": "late-proximal"}),
]
# Quality at a measured speed-up (issue 14): LTC with the measured-latency cost (target_speedup, eager PyTorch,
# batch 1, 2 threads, NCHW: channels_last makes this small network slower, latency_channels_last.md) against the
# headline's MAC-cost LTC (SR 10), same base and budget, both timed in the run on the same machine. MAC-cost Tucker-2
# does not make this network faster on this CPU (about 1.0x at SR 5 and 10), so the two cannot meet at one speed-up
# above 1x: the pair shows what each buys.
SPEED_TARGET = 1.1
SPEED_MAC_SR = 10.0
SPEED: list[tuple[str, dict[str, Any]]] = [
    ("ltc-latency", {"cost": "latency", "target_speedup": SPEED_TARGET, "latency_threads": 2}),
    ("ltc-macs", {"target_sr": SPEED_MAC_SR}),
]
OUT_RUNS = C.REPO / "runs" / "quality"


@dataclass
class Row:
    dataset: str
    model: str
    method: str
    target: float
    seed: int
    group: str = "main"  # "main" or "ablation"
    variant: str = ""  # the ablation row's name
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        """The measured speed-up the row asks for (``target_speedup``), or ``None`` for a MAC target (``target``)."""
        return self.overrides.get("target_speedup")

    @property
    def id(self) -> str:
        name = self.variant or self.method
        goal = f"x{self.speedup:g}" if self.speedup is not None else f"sr{self.target:g}"
        return f"{self.dataset}/{self.model}/{name}/{goal}/seed{self.seed}"

    def folder(self, root: Path, cfg: dict[str, Any]) -> Path:
        """The run folder: named after the method, target and seed, plus a hash of the resolved compress settings,
        so that a main row whose defaults equal an ablation row's shares its run instead of repeating it."""
        import hashlib
        import json

        # settings left at None are left out, so that a new optional setting does not rename every folder
        settings = {k: v for k, v in cfg["compress"].items() if v is not None}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return root / f"{self.dataset}_{self.model}" / f"{self.method}_sr{self.target:g}_s{self.seed}_{digest}"


def protocol_rows(ablation: bool = True) -> list[Row]:
    """In the order they run: the ablation's seed 0 (it decides the defaults), the headline (every method, 3 seeds),
    PneumoniaMNIST, the other CIFAR-10 targets and models, the speed pair, the close pairs' seeds 1-2 (``CLOSE``),
    the variants (``VARIANTS``), then the ablation's other seeds."""
    d0, m0, t0 = HEADLINE
    abl = [Row(d0, m0, method, t0, s, "ablation", name, over)
           for s in range(SEEDS_HEADLINE) for name, method, over in ABLATION
           if s == 0 or name not in SEED0_ONLY] if ablation else []
    main = []
    for dataset, models in MODELS.items():
        for model in models:
            for target in TARGETS:
                seeds = SEEDS_HEADLINE if (dataset, model, target) == HEADLINE else 1
                main += [Row(dataset, model, method, target, s) for s in range(seeds) for method in METHODS]
                if seeds == 1:
                    main += [Row(dataset, model, method, target, s) for s in range(1, SEEDS_HEADLINE)
                             for method in CLOSE.get((dataset, model, target), ())]

    def rank(r: Row) -> tuple[int, ...]:
        if r.group == "speed":  # after the main rows, before the ablation's other seeds
            return (4, 1)
        if r.group == "variant":  # after the close pairs' seeds, one variant after another
            return (4, 3, [v[3] for v in VARIANTS].index(r.variant), r.seed)
        if r.group == "ablation":
            return (0 if r.seed == 0 else 5, r.seed)
        if (r.dataset, r.model, r.target) == HEADLINE:
            return (1, r.seed)
        if r.seed > 0:  # a close pair's other seeds: after the speed pair
            return (4, 2, r.seed)
        return (2 if r.dataset == "pneumoniamnist" else 3 if r.model == m0 else 4, 0)

    speed = [Row(d0, m0, "ltc", float(o.get("target_sr", 0.0)), 0, "speed", name, o) for name, o in SPEED]
    variants = [Row(d, m, method, t, s, "variant", name, over) for d, m, t, name, method, over in VARIANTS
                for s in range(SEEDS_HEADLINE) if s == 0 or name not in SEED0_ONLY]
    rows = abl + main + speed + variants
    return sorted(rows, key=lambda r: rank(r))  # stable: the order within each group is kept


def smoke_rows() -> list[Row]:
    rows = [Row("digits", "small_cnn", m, 2.0, 0) for m in METHODS]
    rows.append(Row("digits", "small_cnn", "ltc", 2.0, 0, "ablation", "ltc-v1", V1))
    return rows


def row_config(row: Row, epochs: int, base: Any, scale: int = 1) -> dict[str, Any]:
    """The run config of a row: the library's defaults, the protocol's budget, the row's overrides. ``scale``: a
    budget of ``scale x EPOCHS`` (``--budget-scale``): the LC methods' L steps get ``scale`` epochs each, so LC and
    fine-tuning keep their shares of the budget."""
    from ltc import config as cfgmod

    goal = {} if row.speedup is not None else {"target_sr": row.target}
    compress = {"method": row.method, **goal, "epochs": epochs, **row.overrides}
    if row.method in ("ltc", "lrc"):
        from ltc.api import CompressConfig

        per_step = compress.get("epochs_per_step", CompressConfig.default("epochs_per_step"))
        # the default steps, as many as leave at least one epoch to fine-tune (a short smoke budget)
        fit = max(1, math.floor(round((epochs - 1) / per_step, 9)))
        compress.setdefault("steps", min(CompressConfig.default("steps"), fit))
        if scale != 1:
            compress["epochs_per_step"] = round(per_step * scale, 9)  # 0.6, not 0.6000000000000001
    return cfgmod.load_config(overrides={
        "data": {"source": base.data.get("source"), "batch_size": 128},
        "compress": compress,
        "run": {"seed": row.seed, "progress": False, "plots": False, "label": row.variant or row.method,
                "latency_threads": 2, "latency_repeats": 20},
    })


# ------------------------------------------------------------------------------------------------ summary
def _mean_sd(vals: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _pct(v: float | None, sd: float | None = None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def _epochs(rs: list[dict[str, Any]]) -> str:
    """The epochs the runs spent (an LTC run that converges early skips its last L steps: a fraction of an epoch
    that is not handed to fine-tuning), one value per seed where they differ."""
    spent = [round(float(r["epochs"]), 2) for r in sorted(rs, key=lambda r: r["seed"]) if r.get("epochs") is not None]
    return "—" if not spent else " / ".join(format(e, "g") for e in (spent if len(set(spent)) > 1 else spent[:1]))


def metric_distance(r: Any) -> float | None:
    """``‖W − Θ‖/‖W‖`` at the last C step measured in the C step's metric (the data metric's whitened space; equal to
    ``w_theta_final`` with ``metric='weight'``); ``None`` for one-shot methods."""
    hist = r.history or []
    if not hist or r.w_theta_final is None:
        return None
    last = hist[-1]
    return last["distance_metric"] if last.get("distance_metric") is not None else last.get("distance")


def _commands(protocol: dict[str, Any]) -> list[dict[str, Any]]:
    """Every invocation that added runs to the summary (the protocol runs in pieces: ``--only``, resumed runs)."""
    if "commands" in protocol:
        return list(protocol["commands"])
    return ([{"command": protocol["command"], "date": protocol.get("date"), "commit": protocol.get("commit")}]
            if protocol.get("command") else [])


def model_path(rec: dict[str, Any]) -> Path:
    """A summary record's model file (``model_path`` is kept relative to the repository when it lies inside it)."""
    path = Path(rec["model_path"])
    return path if path.is_absolute() else C.REPO / path


def refresh(doc: dict[str, Any]) -> None:
    """Re-derive the fields a later version of this script adds from each finished run's own result.json."""
    from ltc.results import RunResult

    for rec in doc["runs"]:
        folder = model_path(rec).parent
        if (folder / "result.json").is_file():
            r = RunResult.read(folder / "result.json")
            rec["w_theta_final_metric"] = metric_distance(r)
            rec.update(rank_fields(r))


def remeasure(doc: dict[str, Any], repeats: int, threads: int, say: Any, only: str | None = None) -> None:
    """Time every finished run's saved model (those whose id matches ``only``) against its base again, on a quiet
    machine: CPU, batch 1, BatchNorm folded, interleaved (``latency_speedup_quiet``, with the date and CPU in
    ``latency_quiet_at``); the in-run figure was taken while the benchmark trained."""
    import torch

    import ltc
    from ltc import runs
    from ltc.latency import compare_latency

    bases = {(b["dataset"], b["model"]): runs.load_model(b["path"]) for b in doc["bases"]}
    for rec in doc["runs"]:
        path = model_path(rec)
        base = bases.get((rec["dataset"], rec["model"]))
        if base is None or not path.is_file() or (only and not re.search(only, rec["id"])):
            continue
        x = torch.randn(1, *(base.input_shape or (3, 32, 32)), generator=torch.Generator().manual_seed(0))
        lat = compare_latency(base.model.cpu().eval(), ltc.load(path), x, threads=threads, repeats=repeats,
                              fold_bn=True)
        rec["latency_speedup_quiet"] = lat["speedup"]
        rec["latency_quiet_at"] = {"date": C.now(), "cpu": C.machine()["cpu"], "repeats": repeats}
        say(f"{rec['id']} ({rec['variant'] or rec['method']}): {lat['speedup']:.2f}x "
            f"(in the run: {rec['latency_speedup']:.2f}x)")
    entry = {"command": C.command_line(), "date": C.now(), "machine": C.machine(), "repeats": repeats,
             "threads": threads, "commit": C.git_commit()}
    if only and doc["protocol"].get("remeasured"):  # a partial re-timing: the first full one stays the header's
        doc["protocol"].setdefault("remeasured_more", []).append(entry)
    else:
        doc["protocol"]["remeasured"] = entry


def run_record(row: Row, folder: Path) -> dict[str, Any]:
    """The summary's row for a finished run folder."""
    from ltc.results import RunResult

    r = RunResult.read(folder / "result.json")
    lat = (r.latency or {}).get("batch1") or {}
    return {
        "id": row.id, "group": row.group, "variant": row.variant or None, "dataset": row.dataset, "model": row.model,
        "width": WIDTH, "method": row.method,
        "target_sr": None if row.speedup is not None else row.target, "target_speedup": row.speedup,
        "seed": row.seed, "sr": r.sr, "cr": r.cr,
        "acc": (r.compressed or {}).get("acc"), "acc_before_finetune": (r.compressed or {}).get("acc_before_finetune"),
        "base_acc": (r.base or {}).get("acc"), "epochs": (r.plan or {}).get("total"), "plan": r.plan,
        "w_theta_final": r.w_theta_final, "w_theta_final_metric": metric_distance(r),
        "latency_speedup": lat.get("speedup"), "seconds": r.seconds, **rank_fields(r),
        "settings": {k: r.compress_config.get(k) for k in ("metric", "min_rank", "kd_weight", "mu_cap",
                                                           "lc_weight_decay", "lr_schedule", "lr_anneal", "steps",
                                                           "bn_data")},
        "model_path": str((folder / "model.pt").relative_to(C.REPO)) if folder.is_relative_to(C.REPO)
        else str(folder / "model.pt"),
    }


def rank_fields(r: Any) -> dict[str, Any]:
    """What the rank figure needs from a run (λ, per-layer ranks and full ranks), kept in the summary so the figure
    can be redrawn without the run folders."""
    return {"lam": r.lam, "ranks": r.ranks, "full_ranks": r.full_ranks}


def markdown(doc: dict[str, Any]) -> str:
    p = doc["protocol"]
    lines = ["# Quality benchmark: every method at equal SR and epochs", "",
             f"Last command: `{p['command']}`. Date: {p['date']}. Machine: {p['machine']['cpu']}, "
             f"{p['machine']['cpu_count']} cores, torch {p['machine']['torch']}. Commit {p.get('commit')}. "
             "The runs were added by: " + "; ".join(f"`{c['command']}` ({c.get('date')}, {c.get('commit')})"
                                                    for c in _commands(p)) + ".",
             f"Epoch budget {p['epoch_budget']} per method; measured wall time so far "
             f"{p['wall_seconds'] / 3600:.2f} h ({len(doc['runs'])} runs finished).", "",
             "Accuracies are validation top-1 (%), mean ± sd over seeds where there are several; 'before FT': right "
             "after deployment with BatchNorm re-estimated. SR / CR theoretical (MACs / params); 'speed-up': "
             "measured CPU batch-1 latency ratio, BatchNorm folded, 2 threads, interleaved with the base ("
             + (f"re-timed on a quiet machine by `{p['remeasured']['command']}`, {p['remeasured']['date']}, "
                f"{p['remeasured']['repeats']} runs each" if p.get("remeasured") else
                "taken while the benchmark trains: noisy")
             + "".join(f"; runs matching its --only re-timed by `{m['command']}`, {m['date']}, {m['machine']['cpu']}"
                       for m in p.get("remeasured_more", []))
             + "). ‖W−Θ‖/‖W‖: at the last C step (learning methods), in weight space and "
             "in the C step's metric (with metric='data' the whitened space the penalty pulls in; the same number with "
             "metric='weight').", "",
             "## Bases", "", "| dataset | model | width | train / val images | epochs | val acc | last 10 epochs | "
             "trained |", "|---|---|---:|---|---:|---:|---|---|"]
    for b in doc["bases"]:
        last = ", ".join(f"{100 * a:.1f}" for a in b["val_acc_last10"])
        if b["path"].startswith("../shared"):
            made_s = "`../shared/bases` (its README)"
        elif made := b.get("trained"):
            made_s = f"here, {made['date']}, " + (f"commit {made['commit']}" if made.get("commit") else
                                                   f"ltc {made.get('ltc')} (no checkout)")
        else:
            made_s = "here (no record)"
        lines.append(f"| {b['dataset']} | {b['model']} | {b['width']:g} | {b['train_images']} / {b['val_images']} | "
                     f"{b['epochs']} | {_pct(b['val_acc'])} | {last} | {made_s} |")
    groups: dict[tuple[str, str, float, str], list[dict[str, Any]]] = {}
    for r in doc["runs"]:
        key = (r["dataset"], r["model"], r["target_sr"] if r["group"] != "speed" else 0.0, r["group"])
        groups.setdefault(key, []).append(r)
    for (dataset, model, target, group), runs in sorted(groups.items(), key=lambda kv: (kv[0][3], kv[0][:3])):
        title = {"ablation": "Ablation of the LC recipe", "speed": "Quality at a measured speed-up",
                 "variant": "One change to LTC's defaults"}.get(group, "Methods")
        goal = f"target SR {target:g}" if group != "speed" else (
            f"latency cost at target_speedup {SPEED_TARGET:g} against MAC cost at SR {SPEED_MAC_SR:g}")
        lines += ["", f"## {title}: {dataset} / {model} / {goal}", "",
                  "| method | seeds | acc | per seed | before FT | SR | CR | speed-up | ‖W−Θ‖/‖W‖ | in the metric "
                  "| epochs | minutes |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        by: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            by.setdefault(r["variant"] or r["method"], []).append(r)
        if group == "ablation":  # one change at a time, in the order they were made
            names = [name for name, _m, _o in ABLATION]
            order = sorted(by, key=lambda k: names.index(k) if k in names else len(names))
        else:
            order = sorted(by, key=lambda k: -(_mean_sd([r["acc"] for r in by[k]])[0] or 0))
        for k in order:
            rs = by[k]
            acc, sd = _mean_sd([r["acc"] for r in rs])
            before, bsd = _mean_sd([r["acc_before_finetune"] for r in rs])
            per_seed = " / ".join(f"s{r['seed']} {_pct(r['acc'])}" for r in sorted(rs, key=lambda r: r["seed"]))
            lines.append(
                f"| {DISPLAY.get(k, k)} | {len(rs)} | {_pct(acc, sd)} | {per_seed} | {_pct(before, bsd)} | "
                f"{_num(_mean_sd([r['sr'] for r in rs])[0])} | {_num(_mean_sd([r['cr'] for r in rs])[0])} | "
                f"{_num(_mean_sd([r.get('latency_speedup_quiet', r['latency_speedup']) for r in rs])[0])} | "
                f"{_num(_mean_sd([r['w_theta_final'] for r in rs])[0], '.3f')} | "
                f"{_num(_mean_sd([r.get('w_theta_final_metric') for r in rs])[0], '.3f')} | "
                f"{_epochs(rs)} | {_num(_mean_sd([r['seconds'] / 60 for r in rs])[0], '.1f')} |")
        if group == "main" and "ltc" in by:
            lines += ["", paired_line(by, "ltc")]
        defaults = groups.get((dataset, model, target, "main"), [])
        if group == "variant" and any(r["method"] == "ltc" for r in defaults):
            lines += ["", paired_line({**by, "ltc": [r for r in defaults if r["method"] == "ltc"]}, "ltc", "variant")
                      + " Its own rows: the setting's Methods table."]
    refused = doc.get("refused") or []
    if refused:
        lines += ["", "## Rows the method cannot run (refused before training)", "",
                  "| row | why | date | commit |", "|---|---|---|---|"]
        lines += [f"| {r['id']} | {r['message']} | {r['date']} | {r['commit']} |" for r in refused]
    figs = doc.get("figures") or []
    if figs:
        lines += ["", "## Rank distributions of the headline models (seed 0)", ""]
        missing = doc.get("figure_missing") or []
        if missing:
            lines += ["Left out (their records predate the ranks in the summary and their run folders are not on the "
                      "machine that drew the figure): " + ", ".join(DISPLAY.get(m, m) for m in missing) + ".", ""]
        lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figs]
    return "\n".join(lines) + "\n"


def paired_line(by: dict[str, list[dict[str, Any]]], ref: str, what: str = "method") -> str:
    """``ref``'s accuracy minus every other ``what``'s (a method, or a variant of ``ref``), paired by seed (points,
    mean ± sd over the shared seeds)."""
    mine = {r["seed"]: r["acc"] for r in by[ref]}
    parts = []
    for k, rs in by.items():
        if k == ref:
            continue
        diffs = [mine[r["seed"]] - r["acc"] for r in rs if r["seed"] in mine]
        mean, sd = _mean_sd(diffs)
        if mean is not None:
            parts.append(f"{DISPLAY.get(k, k)} {100 * mean:+.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")
                         + f" ({len(diffs)} seed{'s' * (len(diffs) != 1)})")
    return (f"{DISPLAY.get(ref, ref)} minus each {what}, paired by seed (points): " + "; ".join(parts) + "."
            if parts else "")


def headline_figure(doc: dict[str, Any], out_stem: Path) -> tuple[list[str], list[str]]:
    """The rank distribution of each method's headline model (seed 0), one figure: (its png paths, the methods left
    out because neither their record nor a run folder has their ranks)."""
    from ltc import plots
    from ltc.results import RunResult

    d, m, t = HEADLINE
    runs, missing = [], []
    for r in doc["runs"]:
        if (r["dataset"], r["model"], r["target_sr"], r["group"], r["seed"]) != (d, m, t, "main", 0):
            continue
        folder = model_path(r).parent
        if r.get("ranks") is not None:
            runs.append({"kind": "compress", **{k: r.get(k) for k in ("method", "lam", "sr", "cr", "ranks",
                                                                       "full_ranks", "model", "dataset")}})
        elif (folder / "result.json").is_file():
            runs.append(RunResult.read(folder / "result.json").to_dict())
        else:
            missing.append(r["method"])
    if not runs:
        return [], missing
    pngs = []
    for p in plots.plot_rank_distribution(runs, out_stem):
        if p.suffix == ".png":
            pngs.append(str(p.relative_to(C.REPO) if p.is_relative_to(C.REPO) else p))
        else:  # the summary links the png; a pdf beside it would only go stale
            p.unlink(missing_ok=True)
    return pngs, missing


def draw_figure(doc: dict[str, Any], stem: Path, say: Any) -> None:
    """Redraw the headline rank figure next to ``stem`` (the results' path without suffix) and note it in ``doc``."""
    try:
        doc["figures"], doc["figure_missing"] = headline_figure(doc, stem.parent / f"{stem.name}_ranks")
    except Exception as exc:  # a figure must not cost the results
        say(f"(no rank figure: {exc})")


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", metavar="REGEX", help="run only rows whose id matches (re.search)")
    ap.add_argument("--list", action="store_true", help="list the rows and whether they are done")
    ap.add_argument("--redo", metavar="REGEX",
                    help="run again the finished rows whose id matches (their records are replaced): after a default "
                         "changed, for the rows that ran with the old one (a run folder with the same settings is "
                         "reused, not retrained)")
    ap.add_argument("--smoke", action="store_true", help="digits / small_cnn / 2 epochs: every code path, fast")
    ap.add_argument("--no-ablation", action="store_true", help="leave the ablation rows out")
    ap.add_argument("--out", type=Path, help="results stem folder (default benchmarks/results)")
    ap.add_argument("--runs", type=Path, help="where the run folders go (default runs/quality)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--budget-scale", type=int, default=1, metavar="K",
                    help=f"a budget of K x {EPOCHS} epochs per method (L steps K epochs each); results go to "
                         "quality_budget<epochs>.{json,md} instead of the protocol's summary")
    ap.add_argument("--remeasure", action="store_true",
                    help="time every finished run's model against its base again (run it on a quiet machine), exit")
    ap.add_argument("--refresh", action="store_true",
                    help="re-derive every finished row's added fields from its run folder, rewrite the summary, exit")
    args = ap.parse_args(argv)

    import torch

    from ltc import pipelines, runs
    from ltc.engine import UnreachableTarget

    torch.set_num_threads(args.threads)
    out_dir = args.out or (C.RESULTS if not args.smoke else Path("/tmp/ltc_quality_smoke"))
    run_root = args.runs or (OUT_RUNS if not args.smoke else out_dir / "runs")
    if args.budget_scale < 1 or (args.smoke and args.budget_scale != 1):
        ap.error("--budget-scale must be a whole number >= 1 (and 1 with --smoke)")
    epochs = 2 if args.smoke else EPOCHS * args.budget_scale
    stem = out_dir / ("quality_smoke" if args.smoke else "quality_summary" if args.budget_scale == 1
                      else f"quality_budget{epochs}")
    rows = smoke_rows() if args.smoke else protocol_rows(not args.no_ablation)
    if args.only:
        rows = [r for r in rows if re.search(args.only, r.id)]
    done_ids: set[str] = set()
    doc: dict[str, Any]
    if stem.with_suffix(".json").is_file():
        import json

        doc = json.loads(stem.with_suffix(".json").read_text())
        done_ids = {r["id"] for r in doc["runs"]}
    else:
        doc = {"protocol": {}, "bases": [], "runs": []}
    refused_ids = {r["id"] for r in doc.get("refused", [])}
    if args.list:
        for r in rows:
            print(("done  " if r.id in done_ids else "refused  " if r.id in refused_ids else "todo  ") + r.id)
        return 0
    if args.remeasure:
        remeasure(doc, repeats=100, threads=args.threads, say=print, only=args.only)
        C.write_results(stem, doc, markdown(doc))
        return 0
    if args.refresh:
        refresh(doc)
        draw_figure(doc, stem, print)
        C.write_results(stem, doc, markdown(doc))
        return 0
    doc["protocol"] = {
        **doc.get("protocol", {}),
        "command": C.command_line(), "date": C.now(), "machine": C.machine(), "commit": C.git_commit(),
        "commands": [*_commands(doc.get("protocol", {})),
                     {"command": C.command_line(), "date": C.now(), "commit": C.git_commit()}],
        "epoch_budget": epochs, "targets": list(TARGETS), "methods": list(METHODS), "width": WIDTH,
        "headline": {"dataset": HEADLINE[0], "model": HEADLINE[1], "target_sr": HEADLINE[2],
                     "seeds": SEEDS_HEADLINE},
        "ablation": {name: {"method": m, **o} for name, m, o in ABLATION},
        "wall_seconds": doc.get("protocol", {}).get("wall_seconds", 0.0),
    }
    t_start = time.perf_counter()
    bases: dict[tuple[str, str], Path] = {}
    data_cache: dict[tuple[str, str], Any] = {}

    def say(msg: str) -> None:
        print(msg, flush=True)

    def save() -> None:
        doc["protocol"]["wall_seconds"] = wall0 + time.perf_counter() - t_start
        C.write_results(stem, doc, markdown(doc))

    wall0 = doc["protocol"]["wall_seconds"]
    for row in rows:
        if (row.id in done_ids or row.id in refused_ids) and not (args.redo and re.search(args.redo, row.id)):
            continue
        while (run_root / "PAUSE").exists():
            time.sleep(10)
        key = (row.dataset, row.model)
        if key not in bases:
            if args.smoke:
                bases[key] = _smoke_base(run_root, say)
            else:
                bases[key] = C.base_run(row.dataset, row.model, WIDTH, say=say)
            rec = C.base_record(bases[key], row.dataset, WIDTH if not args.smoke else 0.5)
            doc["bases"] = [b for b in doc["bases"] if (b["dataset"], b["model"]) != key] + [rec]
        base = runs.load_model(bases[key])
        cfg = row_config(row, epochs, base, args.budget_scale)
        if key not in data_cache:
            data_cache[key] = pipelines.build_data(cfg, base)
        folder = row.folder(run_root, cfg)
        say(f"\n=== {row.id} -> {folder}")
        t0 = time.perf_counter()
        try:
            pipelines.compress_run(copy.deepcopy(cfg), bases[key], folder, resume=True, base=base,
                                   data=data_cache[key], plots=False, say=say)
        except UnreachableTarget as exc:  # the method cannot reach the target on this model: a result, not a crash
            doc["refused"] = [r for r in doc.get("refused", []) if r["id"] != row.id] + [
                {"id": row.id, "message": str(exc), "date": C.now(), "commit": C.git_commit()}]
            refused_ids.add(row.id)
            say(f"=== {row.id}: refused before training ({exc})")
            save()
            continue
        rec = run_record(row, folder)
        doc["runs"] = [r for r in doc["runs"] if r["id"] != row.id] + [rec]
        doc["refused"] = [r for r in doc.get("refused", []) if r["id"] != row.id]
        done_ids.add(row.id)
        say(f"=== {row.id}: acc {_pct(rec['acc'])} % (before FT {_pct(rec['acc_before_finetune'])}), SR "
            f"{rec['sr']:.2f}, {time.perf_counter() - t0:.0f} s")
        save()
    draw_figure(doc, stem, say)
    save()
    return 0


def _smoke_base(root: Path, say: Any) -> Path:
    from ltc import config as cfgmod
    from ltc import pipelines

    out = root / "base"
    if not (out / "result.json").is_file():
        cfg = cfgmod.load_config(overrides={"model": {"name": "small_cnn", "width": 0.5},
                                            "data": {"source": "digits", "batch_size": 64},
                                            "train": {"epochs": 3, "lr": 0.05}, "run": {"progress": False}})
        pipelines.train_run(cfg, out, resume=True, say=say)
    return out


if __name__ == "__main__":
    sys.exit(main())
