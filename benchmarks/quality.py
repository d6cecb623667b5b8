"""Quality benchmark: LTC against its baselines on real data, slides-style (SPEC sections 3–5).

One command from a fresh clone (the data sit in ``../shared/data/`` next to the repository)::

    python benchmarks/quality.py --quick      # < 30 min on a 2-core CPU: small training subsets
    python benchmarks/quality.py --full       # < 150 min: larger subsets, longer schedules
    python benchmarks/quality.py --smoke      # a minute or two: every code path, 1 epoch each
    python benchmarks/quality.py --quick --resume            # continue a killed run
    python benchmarks/quality.py --quick --estimate-only     # time one epoch per model, print the plan

What it does, per (dataset, model):

1. trains one base model once (SGD, cosine schedule to the end; val accuracy printed per epoch) and caches it
   under ``--cache`` (default ``/tmp/ltc_bench_cache``) so re-runs, and ``lc_schedule_sweep.py``, reuse it;
2. compresses it with every method at every target SR (budget mode): ``ltc``, ``oneshot``, ``lrc``, ``vbmf``
   (its own EVBMF ranks, no target, and weakened to meet each target) and ``uniform``. Every method gets the
   same total epoch budget (LC steps x epochs per step + fine-tuning epochs; one-shot methods spend all of it
   fine-tuning, ``ltc.compress(equal_budget=True)``) and the same fine-tuning recipe;
3. on one (dataset, model), the slides' λ sweep for ``ltc`` (λ mode, several λ spanning the targets).

Data: CIFAR-10 (``cifar10-jpeg-train.zip``; 5,000 images held out for validation with seed 0, JPEGs decoded
once into memory) and PneumoniaMNIST (``pneumoniamnist-trainval.npz``, its own val split). A missing file
skips that dataset with a message. VGG-16 needs at least 32x32 inputs (five 2x2 max-pools), so the 28x28
PneumoniaMNIST images are resized to 32x32 for it; ResNet-34 takes them at 28x28.

Output (atomically rewritten after every row, so a killed run keeps what it finished):
``benchmarks/results/quality_{quick,full}.json`` (rows, base models, command line, machine, date, settings,
time estimate), ``.md`` (tables and what they say) and the plots ``quality_{profile}_lambda_sweep.png`` and
``quality_{profile}_acc_vs_sr_{model}.png``. ``--smoke`` writes to ``/tmp/ltc_bench_smoke`` unless ``--out`` is given.

Units: MACs are multiply-accumulates per sample (conv + linear; FLOPs = 2·MACs); SR = base MACs / compressed
MACs (theoretical speed-up), CR = base params / compressed params; accuracies are validation top-1.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _preset_threads(argv: list[str]) -> tuple[int | None, str]:
    """Decide the thread count before numpy/torch load: NumPy's OpenBLAS (EVBMF's SVDs) reads its thread count
    from the environment at import, and torch.set_num_threads does not reach it. On a busy machine a second
    OpenBLAS thread makes a 64x576 SVD ~100x slower (spin-waiting), so the busy default is 1 thread for both."""
    n: int | None = None
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    if n:
        why = "--threads"
    else:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        cpus = os.cpu_count() or 1
        if load <= 0.5 * cpus:
            return None, f"auto: library defaults (1-min load average {load:.2f})"
        n, why = 1, f"auto: 1-min load average {load:.2f} > {cpus}/2, a busy machine"
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    return n, why


if "numpy" not in sys.modules:
    _THREADS = _preset_threads(sys.argv[1:])
else:  # imported after numpy (e.g. from a notebook): torch threads only
    _THREADS = (None, "auto: library defaults")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import ltc  # noqa: E402
from ltc import data as D  # noqa: E402
from ltc import models as M  # noqa: E402
from ltc.api import CompressConfig, build_engine, compress  # noqa: E402
from ltc.cost import profile  # noqa: E402
from ltc.methods import get_method  # noqa: E402
from ltc.train import evaluate, fit, make_optimizer, train_one_epoch  # noqa: E402
from ltc.utils import atomic_torch_save, atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_CACHE = Path("/tmp/ltc_bench_cache")
SMOKE_OUT = Path("/tmp/ltc_bench_smoke")

DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {"file": "cifar10-jpeg-train.zip", "display": "CIFAR-10", "val_fraction": 0.1},
    # its own val split (524 images); val_fraction is then ignored by ltc.data.build
    "pneumoniamnist": {"file": "pneumoniamnist-trainval.npz", "display": "PneumoniaMNIST", "val_fraction": 0.1},
}
MODELS = ("resnet34_cifar", "vgg16_cifar")
METHODS = ("ltc", "oneshot", "lrc", "vbmf", "uniform")
LEARNING = {"ltc", "lrc"}
DISPLAY_METHOD = {"ltc": "LTC", "lrc": "LRC", "vbmf": "Tucker-VBMF", "oneshot": "Tucker one-shot",
                  "uniform": "Tucker uniform"}
DISPLAY_MODEL = {"resnet34_cifar": "ResNet-34", "vgg16_cifar": "VGG-16"}

# Profiles. ``train_subset``/``val_subset``: per dataset, a stratified subset (seeded) of the train / val split
# (None = all). Widths multiply every channel count. Epoch budget per method = steps*epochs_per_step + finetune.
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "widths": {"resnet34_cifar": 0.125, "vgg16_cifar": 0.125},
        "train_subset": {"cifar10": 192, "pneumoniamnist": 192},
        "val_subset": {"cifar10": 192, "pneumoniamnist": 192},
        "batch_size": 64,
        "eval_batch_size": 256,
        "base": {"epochs": 1, "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "compress": {"steps": 2, "epochs_per_step": 1, "finetune_epochs": 1, "lr": 0.01, "finetune_lr": 0.01,
                     "mu0": 1e-3, "n_iter": 0},
        "targets": [5, 10],
        "sweep": {"dataset": "cifar10", "model": "resnet34_cifar", "points": 2, "sr_range": [3, 15]},
    },
    "quick": {
        "widths": {"resnet34_cifar": 0.125, "vgg16_cifar": 0.125},
        "train_subset": {"cifar10": 2000, "pneumoniamnist": 2000},
        "val_subset": {"cifar10": 2000, "pneumoniamnist": None},
        "batch_size": 64,
        "eval_batch_size": 256,
        "base": {"epochs": 20, "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "compress": {"steps": 4, "epochs_per_step": 1, "finetune_epochs": 2, "lr": 0.01, "finetune_lr": 0.01,
                     "mu0": 1e-3, "n_iter": 0},
        "targets": [5, 10],
        "sweep": {"dataset": "cifar10", "model": "resnet34_cifar", "points": 3, "sr_range": [2, 20]},
    },
    "full": {
        "widths": {"resnet34_cifar": 0.125, "vgg16_cifar": 0.125},
        "train_subset": {"cifar10": 8000, "pneumoniamnist": None},
        "val_subset": {"cifar10": None, "pneumoniamnist": None},
        "batch_size": 64,
        "eval_batch_size": 256,
        "base": {"epochs": 40, "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "compress": {"steps": 5, "epochs_per_step": 1, "finetune_epochs": 3, "lr": 0.01, "finetune_lr": 0.01,
                     "mu0": 1e-3, "n_iter": 0},
        "targets": [5, 10],
        "sweep": {"dataset": "cifar10", "model": "resnet34_cifar", "points": 4, "sr_range": [2, 20]},
    },
}
LIMITS_MIN = {"smoke": 3, "quick": 30, "full": 150}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def fmt_s(s: float) -> str:
    s = float(s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ machine


def choose_threads(requested: int | None) -> tuple[int, str]:
    """``--threads N`` as given; by default 1 thread when the machine is already busy (1-min load average above
    half the CPU count: several intra-op threads then fight the other jobs and run several times slower than
    one), else torch's default. The environment for NumPy's BLAS was set at import (``_preset_threads``)."""
    n, why = _THREADS
    if requested:
        return requested, "--threads"
    return (n or torch.get_num_threads()), why


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "ltc": getattr(ltc, "__version__", "?"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    try:
        info["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class Data:
    """One dataset at one image size, with the profile's subsets and loaders."""

    name: str
    bundle: D.DataBundle
    train_loader: Any
    val_loader: Any
    image_size: int
    train_size: int
    val_size: int
    train_size_full: int
    val_size_full: int


def stratified_subset(ds: Any, n: int | None, seed: int) -> Any:
    """A stratified, seeded subset of ``n`` items (``ds`` itself when ``n`` is None or not smaller)."""
    if n is None or n >= len(ds):
        return ds
    _, keep = D.split_indices(ds.targets, n / len(ds), seed)
    return D.Subset(ds, keep.tolist())


class DataCache:
    """Builds each (dataset, image size) once: CIFAR-10's 50,000 JPEGs are decoded into memory a single time."""

    def __init__(self, data_dir: Path, settings: dict[str, Any], seed: int) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.seed = seed
        self._bundles: dict[tuple[str, int | None], D.DataBundle] = {}
        self._data: dict[tuple[str, int], Data] = {}

    def path(self, name: str) -> Path:
        return self.data_dir / DATASETS[name]["file"]

    def available(self, name: str) -> bool:
        return self.path(name).is_file()

    def bundle(self, name: str, image_size: int | None = None) -> D.DataBundle:
        key = (name, image_size)
        if key not in self._bundles:
            t0 = time.perf_counter()
            self._bundles[key] = D.build(
                str(self.path(name)), seed=0, val_fraction=DATASETS[name]["val_fraction"], in_memory=True,
                image_size=image_size, progress=False,
            )
            b = self._bundles[key]
            log(f"  data {name}: {len(b.train)} train / {len(b.val)} val images, {b.input_shape}, "
                f"val from {b.val_from}, loaded in {time.perf_counter() - t0:.1f} s")
        return self._bundles[key]

    def native_size(self, name: str) -> int:
        return self.bundle(name).image_size

    def get(self, name: str, image_size: int) -> Data:
        key = (name, image_size)
        if key in self._data:
            return self._data[key]
        native = self.native_size(name)
        b = self.bundle(name, None if image_size == native else image_size)
        s = self.settings
        train = stratified_subset(b.train, s["train_subset"].get(name), self.seed)
        val = stratified_subset(b.val, s["val_subset"].get(name), self.seed)
        sub = dataclasses.replace(b, train=train, val=val)
        tl, vl = D.loaders(sub, batch_size=s["batch_size"], workers=0, seed=self.seed,
                           eval_batch_size=s["eval_batch_size"])
        d = Data(name, sub, tl, vl, image_size, len(train), len(val), len(b.train), len(b.val))
        self._data[key] = d
        return d


def image_size_for(model_name: str, native: int, in_channels: int, num_classes: int) -> int:
    """The dataset's native size if the architecture accepts it, else the model's default input size
    (VGG-16's five max-pools need at least 32x32)."""
    m = M.create(model_name, num_classes=num_classes, width=0.0625, in_channels=in_channels)
    m.eval()
    try:
        with torch.no_grad():
            m(torch.zeros(1, in_channels, native, native))
        return native
    except RuntimeError:
        return M.default_input_size(model_name)


def example_input(d: Data) -> torch.Tensor:
    return next(iter(d.val_loader))[0][:1].clone()


# ------------------------------------------------------------------------------------------------ base models


def base_key(ds: str, model_name: str, d: Data, settings: dict[str, Any], seed: int) -> str:
    spec = {
        "dataset": ds, "model": model_name, "width": settings["widths"][model_name],
        "image_size": d.image_size, "train_size": d.train_size, "val_size": d.val_size,
        "batch_size": settings["batch_size"], "base": settings["base"], "seed": seed, "version": 2,
    }
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{ds}_{model_name}_w{settings['widths'][model_name]:g}_{h}"


def new_model(model_name: str, d: Data, width: float) -> nn.Module:
    return M.create(model_name, num_classes=d.bundle.num_classes, width=width, in_channels=d.bundle.in_channels)


def train_base(ds: str, model_name: str, d: Data, settings: dict[str, Any], seed: int, cache: Path
               ) -> tuple[nn.Module, dict[str, Any]]:
    """The cached base model, or train it (resumable: ``fit`` checkpoints every epoch next to the cache)."""
    width = settings["widths"][model_name]
    key = base_key(ds, model_name, d, settings, seed)
    path = cache / f"{key}.pt"
    torch.manual_seed(seed)  # the initial weights must not depend on what ran before (e.g. the calibration)
    model = new_model(model_name, d, width)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        info = json.loads(blob["info"])
        info["cached"] = True
        info["cache_path"] = str(path)
        log(f"  base {ds}/{model_name}: cached ({path.name}), val acc {100 * info['val_acc']:.2f} %")
        return model, info
    b = settings["base"]
    epochs = int(b["epochs"])
    log(f"  base {ds}/{model_name}: training {epochs} epochs on {d.train_size} images (cosine lr {b['lr']})")
    t0 = time.perf_counter()

    def on_epoch(e: int, row: dict[str, Any]) -> None:
        log(f"    epoch {e:3d}/{epochs}: lr {row['lr']:.4f}  train loss {row['train_loss']:.3f} "
            f"acc {100 * row['train_acc']:.2f} %  |  val acc {100 * row['val_acc']:.2f} %  ({row['seconds']:.1f} s)")

    hist = fit(model, d.train_loader, d.val_loader, epochs=epochs,
               opt_cfg={"name": "sgd", "lr": b["lr"], "momentum": b["momentum"], "nesterov": b["nesterov"],
                        "weight_decay": b["weight_decay"]},
               sched_cfg={"name": "cosine"}, seed=seed, progress=False, on_epoch_end=on_epoch,
               checkpoint_path=cache / f"{key}.fit.pt", resume=True)
    seconds = time.perf_counter() - t0
    x = example_input(d)
    prof = profile(model, x)
    info = {
        "dataset": ds, "model": model_name, "width": width, "image_size": d.image_size,
        "in_channels": d.bundle.in_channels, "num_classes": d.bundle.num_classes,
        "train_size": d.train_size, "val_size": d.val_size, "epochs": epochs, "recipe": b,
        "batch_size": settings["batch_size"], "val_acc": float(hist[-1]["val_acc"]) if hist else None,
        "history": [{k: r.get(k) for k in ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                                           "seconds")} for r in hist],
        "macs": prof.macs, "params": prof.params, "seconds": seconds, "key": key,
    }
    if info["val_acc"] is None:
        info["val_acc"] = float(evaluate(model, d.val_loader).acc)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"state_dict": model.state_dict(), "info": json.dumps(info)}, path)
    (cache / f"{key}.fit.pt").unlink(missing_ok=True)
    info["cached"] = False
    info["cache_path"] = str(path)
    log(f"  base {ds}/{model_name}: val acc {100 * info['val_acc']:.2f} % after {epochs} epochs "
        f"({fmt_s(seconds)}); cached at {path}")
    return model, info


# ------------------------------------------------------------------------------------------------ rows


def plan_rows(ds: str, model_name: str, methods: list[str], targets: list[float]) -> list[dict[str, Any]]:
    """The comparison rows of one (dataset, model): every method at every target, plus vbmf's own ranks."""
    rows = []
    for m in methods:
        if m == "vbmf":
            rows.append({"kind": "compare", "dataset": ds, "model": model_name, "method": m, "target_sr": None,
                         "lam": None, "label": "own ranks"})
        for t in targets:
            rows.append({"kind": "compare", "dataset": ds, "model": model_name, "method": m, "target_sr": float(t),
                         "lam": None, "label": f"SR {t:g}"})
    return rows


def row_key(spec: dict[str, Any]) -> str:
    if spec["kind"] == "sweep":
        return f"sweep|{spec['dataset']}|{spec['model']}|{spec['method']}|{spec['sweep_index']}"
    t = "none" if spec["target_sr"] is None else f"{spec['target_sr']:g}"
    return f"compare|{spec['dataset']}|{spec['model']}|{spec['method']}|{t}"


def compress_kwargs(settings: dict[str, Any], seed: int) -> dict[str, Any]:
    c = settings["compress"]
    return {"steps": c["steps"], "epochs_per_step": c["epochs_per_step"], "finetune_epochs": c["finetune_epochs"],
            "lr": c["lr"], "finetune_lr": c["finetune_lr"], "mu0": c["mu0"], "n_iter": c["n_iter"],
            "seed": seed}


def budget_epochs(settings: dict[str, Any]) -> int:
    c = settings["compress"]
    return int(c["steps"] * c["epochs_per_step"] + c["finetune_epochs"])


def slim_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The engine's per-C-step history without the per-layer errors (ranks, μ, λ, SR, distance stay)."""
    return [{k: v for k, v in h.items() if k != "err"} for h in history]


def run_row(spec: dict[str, Any], base: nn.Module, base_info: dict[str, Any], d: Data, settings: dict[str, Any],
            seed: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One compression run; returns the JSON row (an error row if the method fails)."""
    kw = compress_kwargs(settings, seed)
    kw.update(overrides or {})
    if spec.get("target_sr") is not None:
        kw["target_sr"] = spec["target_sr"]
    if spec.get("lam") is not None:
        kw["lam"] = spec["lam"]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    row = {**spec, "key": row_key(spec), "dataset_name": DATASETS[spec["dataset"]]["display"],
           "width": base_info["width"], "image_size": d.image_size, "train_size": d.train_size,
           "val_size": d.val_size, "budget_epochs": int(kw["steps"] * kw["epochs_per_step"] + kw["finetune_epochs"]),
           "started": now_iso()}
    try:
        res = compress(base, d.train_loader, val_loader=d.val_loader, example_input=example_input(d),
                       method=spec["method"], progress=False, base_acc=base_info["val_acc"], **kw)
    except Exception as exc:  # a method that cannot meet a target must not end the benchmark
        row.update({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6),
                    "seconds": time.perf_counter() - t0})
        return row
    r = res.to_dict()
    acc, b = r["compressed"]["acc"], r["base"]["acc"]
    row.update({
        "lam": r["lam"], "sr": r["sr"], "cr": r["cr"], "base": r["base"], "compressed": r["compressed"],
        "drop_pp": None if acc is None or b is None else 100.0 * (b - acc),
        "target_met": None if spec.get("target_sr") is None else bool(r["sr"] >= spec["target_sr"] * (1 - 1e-9)),
        "seconds": res.seconds, "ranks": r["ranks"], "full_ranks": r["full_ranks"],
        "history": slim_history(r["history"]), "log": r["log"], "config": r["config"],
    })
    return row


def auto_schedule(base: nn.Module, d: Data, settings: dict[str, Any], seed: int, target: float) -> CompressConfig:
    """The profile's ``ltc`` config at ``target`` with the μ path ``ltc.compress`` picks for ``base`` (the
    automatic ``mu_final`` depends on the engine's layer weights)."""
    kw = {k: v for k, v in compress_kwargs(settings, seed).items() if k != "seed"}
    cfg = CompressConfig(method="ltc", target_sr=target, **kw)
    return build_engine(cfg, copy.deepcopy(base), example_input(d), len(d.train_loader))[1]


def lambda_grid(base: nn.Module, d: Data, settings: dict[str, Any], seed: int
                ) -> tuple[list[float], dict[str, Any], dict[str, Any]]:
    """λ values and schedule for the λ sweep.

    On a short run the μ schedule climbs by an order of magnitude per C step, and the λ that separates "dense"
    from "every layer at min_rank" spans only about a factor of ten in λ/μ, so with the comparison rows' schedule
    a fixed λ lands at one of two cliffs (a reference run: λ = 30 gave SR 1.2, λ = 300 gave SR 39). The sweep
    therefore holds μ at the schedule's final value (``mu0 = mu_final``, growth 1) and picks each λ as the one
    budget mode finds on the base weights at that μ for SRs spaced geometrically over ``sr_range``: the realized
    SRs then land near those (reference: 2.32, 5.09 and 25.5 for 2, 5 and 20), and the rows trace λ against
    accuracy, params and MACs as the slides' figure does."""
    sw = settings["sweep"]
    cfg = auto_schedule(base, d, settings, seed, float(sw["sr_range"][0]))
    mu = float(cfg.mu_final)
    x = example_input(d)
    lo, hi = (float(v) for v in sw["sr_range"])
    n = int(sw["points"])
    srs = [lo] if n == 1 else [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    lams = []
    for sr in srs:
        eng = ltc.LTC(copy.deepcopy(base), x, target_sr=sr, mu0=mu)
        lams.append(float(f"{eng.lam:.4g}"))
    info = {"mu": mu, "design_sr": srs, "lams": lams,
            "schedule": f"constant μ = {mu:.3g} (the comparison rows' final μ), {cfg.steps} LC steps"}
    return lams, info, {"mu0": mu, "mu_growth": 1.0}


# ------------------------------------------------------------------------------------------------ estimate


def calibrate(model_name: str, d: Data, settings: dict[str, Any], methods: list[str], seed: int
              ) -> dict[str, Any]:
    """Time one training epoch of a fresh model (the timed first epoch) and one evaluation; then, per method, its
    rank selection at SR 5 and a few training steps of the network it deploys relative to the base (Tucker-2
    layers are three small convs: on a CPU a compressed net often trains slower per step than the dense one) and,
    for the learning methods, the relative cost of a step with the LC penalty."""
    torch.manual_seed(seed)
    m = new_model(model_name, d, settings["widths"][model_name])
    opt = make_optimizer(m, lr=0.01)
    st = train_one_epoch(m, d.train_loader, opt, progress=False)
    t_epoch = st.seconds
    t_eval = evaluate(m, d.val_loader).seconds
    x = example_input(d)
    k = min(4, len(d.train_loader))
    it = iter(d.train_loader)
    batches = [next(it) for _ in range(k)]

    def timed(net: nn.Module, extra: Any = None) -> float:
        o = make_optimizer(net, lr=1e-4)
        net.train()
        best = math.inf
        for _ in range(2):  # the first pass warms up; keep the faster
            t0 = time.perf_counter()
            for xb, yb in batches:
                o.zero_grad()
                loss = nn.functional.cross_entropy(net(xb), yb)
                if extra is not None:
                    loss = loss + extra()
                loss.backward()
                o.step()
            best = min(best, time.perf_counter() - t0)
        return best

    t_base = timed(copy.deepcopy(m))
    t_build: dict[str, float] = {}
    ratio: dict[str, float] = {}
    lc_ratio: dict[str, float] = {}
    for meth in methods:
        cfg = CompressConfig(method=meth, target_sr=5.0, **{k: v for k, v in compress_kwargs(settings, seed).items()
                                                            if k != "seed"}).resolve_schedule(len(d.train_loader))
        work = copy.deepcopy(m)
        t0 = time.perf_counter()
        try:
            eng = get_method(meth).build(work, x, **cfg.engine_kwargs())
        except Exception as exc:  # noqa: BLE001 - a timing probe only
            log(f"  (timing probe: {meth} on an untrained {model_name} failed: {type(exc).__name__}: {exc})")
            continue
        t_build[meth] = time.perf_counter() - t0
        ratio[meth] = timed(eng.compressed_model()) / max(t_base, 1e-9)
        if meth in LEARNING:
            lc_ratio[meth] = timed(work, eng.penalty) / max(t_base, 1e-9)
    return {"epoch_s": t_epoch, "eval_s": t_eval, "build_s": t_build, "compressed_speed_ratio": ratio,
            "lc_step_ratio": lc_ratio, "train_size": d.train_size, "val_size": d.val_size}


def estimate_row(spec: dict[str, Any], cal: dict[str, Any], settings: dict[str, Any]) -> float:
    """Seconds for one compression row from the calibration (epochs x the timed epoch x the measured ratios)."""
    c = settings["compress"]
    lc_epochs = c["steps"] * c["epochs_per_step"]
    ft = c["finetune_epochs"]
    method = spec["method"]
    build = cal["build_s"].get(method, max(cal["build_s"].values(), default=1.0))
    ratio = cal["compressed_speed_ratio"].get(method, max(cal["compressed_speed_ratio"].values(), default=1.5))
    evals = 2 * cal["eval_s"]
    epoch = cal["epoch_s"]
    if method in LEARNING:
        lc = cal["lc_step_ratio"].get(method, 1.2)
        return lc_epochs * epoch * lc + ft * epoch * ratio + (c["steps"] + 1) * build + evals
    return (lc_epochs + ft) * epoch * ratio + build + evals


# ------------------------------------------------------------------------------------------------ output


def pct(a: Any) -> str:
    return "—" if a is None else f"{100 * float(a):.2f}"


def count(n: Any) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit, s in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= s:
            return f"{n / s:.2f} {unit}"
    return f"{n:.0f}"


def as_run(row: dict[str, Any]) -> dict[str, Any]:
    """A row in the run-dict shape that ``ltc.report`` and ``ltc.plots`` read."""
    return {**row, "dataset": row["dataset"], "model": row["model"], "label": row.get("label")}


def ok_rows(rows: list[dict[str, Any]], kind: str | None = None) -> list[dict[str, Any]]:
    return [r for r in rows if "error" not in r and (kind is None or r.get("kind") == kind)]


def rows_table(rows: list[dict[str, Any]]) -> str:
    head = ("| Dataset | Model | Method | Target SR | Base MACs | MACs | SR | Base params | Params | CR "
            "| Acc before FT (%) | Acc (%) | Drop (pp) | Seconds |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = DISPLAY_METHOD.get(r["method"], r["method"])
        tgt = "—" if r.get("target_sr") is None else f"{r['target_sr']:g}"
        if r.get("kind") == "sweep":
            tgt = f"λ={r.get('lam'):.3g}"
        if "error" in r:
            why = r["error"].split(";")[0][:160].replace("|", "/")
            lines.append(f"| {r['dataset_name']} | {DISPLAY_MODEL.get(r['model'], r['model'])} | {name} | {tgt} "
                         f"| failed: {why} | | | | | | | | | {r['seconds']:.0f} |")
            continue
        b, c = r["base"], r["compressed"]
        sr = f"{r['sr']:.2f}" + ("" if r.get("target_met") in (None, True) else " (short)")
        drop = "—" if r.get("drop_pp") is None else f"{r['drop_pp']:+.2f}"
        lines.append(
            f"| {r['dataset_name']} | {DISPLAY_MODEL.get(r['model'], r['model'])} | {name} | {tgt} "
            f"| {count(b['macs'])} | {count(c['macs'])} | {sr} | {count(b['params'])} | {count(c['params'])} "
            f"| {r['cr']:.2f} | {pct(c.get('acc_before_finetune'))} | {pct(c.get('acc'))} | {drop} "
            f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


def binomial_se_pp(acc: float, n: int) -> float:
    return 100.0 * math.sqrt(max(acc * (1 - acc), 1e-12) / max(n, 1))


def findings(rows: list[dict[str, Any]], bases: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence per (dataset, model, target): who is best, who is within one standard error of it, where LTC
    stands."""
    out = []
    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for r in ok_rows(rows, "compare"):
        if r.get("target_sr") is not None and r["compressed"].get("acc") is not None:
            groups.setdefault((r["dataset"], r["model"], r["target_sr"]), []).append(r)
    for (ds, model, t), rs in groups.items():
        rs = sorted(rs, key=lambda r: -r["compressed"]["acc"])
        best = rs[0]
        n = best["val_size"]
        se = binomial_se_pp(best["compressed"]["acc"], n)
        tied = [r for r in rs[1:] if 100 * (best["compressed"]["acc"] - r["compressed"]["acc"]) <= se]
        s = (f"{DATASETS[ds]['display']} {DISPLAY_MODEL.get(model, model)} at SR {t:g} (base "
             f"{pct(rs[0]['base']['acc'])} %): best {DISPLAY_METHOD[best['method']]} {pct(best['compressed']['acc'])} %"
             f" (drop {best['drop_pp']:+.2f} pp)")
        if tied:
            s += ", within one standard error: " + ", ".join(
                f"{DISPLAY_METHOD[r['method']]} {pct(r['compressed']['acc'])} %" for r in tied)
        ltc_row = next((r for r in rs if r["method"] == "ltc"), None)
        if ltc_row is not None and ltc_row is not best and ltc_row not in tied:
            gap = 100 * (best["compressed"]["acc"] - ltc_row["compressed"]["acc"])
            s += (f"; LTC {pct(ltc_row['compressed']['acc'])} %, {gap:.2f} pp behind "
                  f"(rank {rs.index(ltc_row) + 1}/{len(rs)})")
        elif ltc_row is best and len(rs) > 1 and not tied:
            gap = 100 * (best["compressed"]["acc"] - rs[1]["compressed"]["acc"])
            s += f", {gap:.2f} pp ahead of {DISPLAY_METHOD[rs[1]['method']]}"
        short = [DISPLAY_METHOD[r["method"]] for r in rs if r.get("target_met") is False]
        failed = [DISPLAY_METHOD[r["method"]] for r in rows if "error" in r and r.get("kind") == "compare"
                  and r["dataset"] == ds and r["model"] == model and r.get("target_sr") == t]
        if short:
            s += f"; {', '.join(short)} kept ranks short of the target"
        if failed:
            s += f"; {', '.join(failed)} could not reach it"
        s += f" (one standard error on {n} validation images ≈ {se:.1f} pp)."
        out.append(s)
    return out


def markdown(doc: dict[str, Any]) -> str:
    from ltc import report

    rows = doc["rows"]
    s = doc["settings"]
    m = doc["machine"]
    c = s["compress"]
    lines = [
        f"# Quality benchmark ({doc['profile']})",
        "",
        f"- status: **{doc['status']}**, {len(rows)} rows ({len(ok_rows(rows))} ok), started {doc['date_started']},"
        f" updated {doc['date_updated']}",
        f"- command: `{doc['command']}`",
        f"- machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, {m['torch_threads']} torch "
        f"threads ({doc.get('threads_reason', '')})",
        "- models: " + ", ".join(f"{DISPLAY_MODEL.get(k, k)} width {v:g}" for k, v in s["widths"].items()),
        f"- base training: {s['base']['epochs']} epochs, SGD Nesterov lr {s['base']['lr']} cosine to 0, "
        f"batch {s['batch_size']}, weight decay {s['base']['weight_decay']}",
        f"- every method: {budget_epochs(s)} epochs in all (LTC/LRC: {c['steps']} LC steps x "
        f"{c['epochs_per_step']} epoch at lr {c['lr']} + {c['finetune_epochs']} fine-tuning epochs; one-shot "
        f"methods: {budget_epochs(s)} fine-tuning epochs), fine-tuning lr {c['finetune_lr']} cosine, "
        f"μ0 {c['mu0']}, μ growth derived so μ closes W − Θ in the last L step",
        "- data: " + "; ".join(
            f"{DATASETS[k]['display']}: train subset {v or 'all'}, val subset {s['val_subset'].get(k) or 'all'}"
            for k, v in s["train_subset"].items()),
    ]
    if doc.get("estimate"):
        e = doc["estimate"]
        lines.append(f"- estimated time {fmt_s(e['total_s'])}" + (
            f", actual {fmt_s(doc['elapsed_s'])}" if doc.get("elapsed_s") else ""))
    lines += ["", report.MACS_NOTE, ""]

    if doc.get("bases"):
        lines += ["## Base models", "",
                  "| Dataset | Model | Width | Input | Train / val images | Epochs | MACs | Params | Val acc (%) "
                  "| Val acc per epoch (%) | Seconds |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for b in doc["bases"].values():
            per = ", ".join(pct(h.get("val_acc")) for h in b.get("history", [])) or "(cached)"
            lines.append(
                f"| {DATASETS[b['dataset']]['display']} | {DISPLAY_MODEL.get(b['model'], b['model'])} | "
                f"{b['width']:g} | {b['in_channels']}x{b['image_size']}x{b['image_size']} | {b['train_size']} / "
                f"{b['val_size']} | {b['epochs']} | {count(b['macs'])} | {count(b['params'])} | {pct(b['val_acc'])} "
                f"| {per} | {b['seconds']:.0f} |")
        lines.append("")

    comp = [r for r in rows if r.get("kind") == "compare"]
    if comp:
        lines += ["## All rows", "", rows_table(comp), "",
                  "Drop: base minus compressed accuracy in percentage points (positive = worse). '(short)': the "
                  "method's own ranks fall short of the target (vbmf keeps EVBMF's ranks then).", ""]
    good = ok_rows(rows, "compare")
    if good:
        t4 = report.table4([as_run(r) for r in good])
        lines += ["## Comparison (slides' Table 4 layout)", "", t4.to_markdown(), ""]
        lines += ["Rows are method (model) [target]; ΔAcc here is compressed minus base (the row table's Drop with "
                  "the opposite sign).", ""]
    sweep = [r for r in rows if r.get("kind") == "sweep"]
    if sweep:
        lines += ["## λ sweep (LTC, λ mode)", "", rows_table(sweep), ""]
        if ok_rows(sweep):
            lines += [report.sweep_table([as_run(r) for r in ok_rows(sweep)]).to_markdown(), "", ""]
        if doc.get("sweep_info"):
            si = doc["sweep_info"]
            lines.append(f"λ values: the λ budget mode finds on the base weights at μ = {si['mu']:.3g} for SR "
                         f"{', '.join(f'{x:.3g}' for x in si['design_sr'])}; schedule: {si['schedule']}, the "
                         "comparison rows' epoch budget. μ is held constant here because with the comparison rows' "
                         "steep μ ramp a fixed λ lands on one of two cliffs (everything dense, or every layer at "
                         "min_rank); see `lambda_grid` in benchmarks/quality.py.")
            lines.append("")
    plots = doc.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    f = findings(rows, doc.get("bases", {}))
    if f:
        lines += ["## What the tables say", ""]
        lines += [f"- {x}" for x in f]
        lines += ["", ("These are small, width-scaled networks trained on a CPU for a few epochs, so absolute "
                       "accuracies sit far below the slides' (full-width networks, hundreds of epochs); what the "
                       "benchmark measures is the ordering of the methods at equal SR and equal epoch budget, and "
                       "differences within about two standard errors are not evidence of a difference."), ""]
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["## Failed rows", ""] + [f"- `{r['key']}`: {r['error']}" for r in errors] + [""]
    return "\n".join(lines)


def write_outputs(doc: dict[str, Any], json_path: Path, md_path: Path) -> None:
    doc["date_updated"] = now_iso()
    atomic_write_text(json_path, json.dumps(doc, indent=1, default=str) + "\n")
    atomic_write_text(md_path, markdown(doc))


def make_plots(doc: dict[str, Any], out_dir: Path, stem: str) -> list[str]:
    from ltc import plots

    written = []
    good = ok_rows(doc["rows"], "compare")
    sweep = ok_rows(doc["rows"], "sweep")
    jobs = []
    if sweep:
        jobs.append((plots.plot_lambda_sweep, sweep, out_dir / f"{stem}_lambda_sweep"))
    for model in dict.fromkeys(r["model"] for r in good):  # one figure per model: one panel per dataset
        jobs.append((plots.plot_accuracy_vs_sr, [r for r in good if r["model"] == model],
                     out_dir / f"{stem}_acc_vs_sr_{model}"))
    for fn, rs, path in jobs:
        try:
            paths = fn([as_run(r) for r in rs], path)
        except Exception as exc:  # noqa: BLE001 - a plot must not lose the tables
            log(f"  plot {path.name} failed: {type(exc).__name__}: {exc}")
            continue
        for p in paths:
            if p.suffix == ".pdf":  # the PNGs are what the report links; keep the folder lean
                p.unlink(missing_ok=True)
            else:
                written.append(str(p))
    return written


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--quick", dest="profile", action="store_const", const="quick", help="< 30 min profile")
    g.add_argument("--full", dest="profile", action="store_const", const="full", help="< 150 min profile")
    g.add_argument("--smoke", dest="profile", action="store_const", const="smoke",
                   help="tiny subsets, 1 epoch each: every code path in a minute or two")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--targets", nargs="+", type=float, default=None, help="target SRs (default: the profile's, 5 10)")
    p.add_argument("--no-sweep", action="store_true", help="skip the λ sweep")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="base-model cache folder")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder holding the data files")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                                                          "--smoke: /tmp/ltc_bench_smoke)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in the JSON and run the rest")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--estimate-only", action="store_true", help="time one epoch per model, print the plan, exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    settings = copy.deepcopy(PROFILES[args.profile])
    if args.targets:
        settings["targets"] = [float(t) for t in args.targets]
    out = args.out or (SMOKE_OUT if args.profile == "smoke" else DEFAULT_OUT)
    stem = f"quality_{args.profile}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    log(f"ltc quality benchmark, profile {args.profile}: torch {torch.__version__}, {threads} thread(s) ({why})")

    doc: dict[str, Any] = {
        "benchmark": "quality", "profile": args.profile, "status": "running",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(), "threads_reason": why, "date_started": now_iso(), "date_updated": now_iso(),
        "settings": settings, "selection": {"datasets": args.datasets, "models": args.models,
                                            "methods": args.methods, "sweep": not args.no_sweep},
        "seed": args.seed, "bases": {}, "rows": [], "skipped": [], "plots": [],
    }
    done: dict[str, dict[str, Any]] = {}
    if args.resume and json_path.is_file():
        old = json.loads(json_path.read_text(encoding="utf-8"))
        if old.get("settings") != settings or old.get("seed") != args.seed:
            log(f"--resume: {json_path} was written with other settings or seed; start without --resume "
                "(it will be overwritten) or restore the same profile")
            return 2
        # failed rows are retried, except a target out of the method's reach (deterministic for a given base)
        done = {r["key"]: r for r in old.get("rows", []) if "error" not in r or "out of reach" in r["error"]}
        doc["date_started"] = old.get("date_started", doc["date_started"])
        doc["bases"] = old.get("bases", {})
        log(f"--resume: {len(done)} finished rows kept from {json_path}")
    elif json_path.is_file() and not args.estimate_only:
        log(f"note: {json_path} exists and will be overwritten (use --resume to continue it)")

    datacache = DataCache(args.data_dir, settings, args.seed)
    datasets = []
    for ds in args.datasets:
        if datacache.available(ds):
            datasets.append(ds)
        else:
            msg = f"{ds}: {datacache.path(ds)} not found, skipped"
            log(f"skip {msg}")
            doc["skipped"].append(msg)
    if not datasets:
        log("no dataset available; nothing to do")
        return 1

    # ---- plan + estimate from one timed epoch per (dataset, model)
    combos = []
    log("timing one training epoch per (dataset, model) for the estimate ...")
    for ds in datasets:
        b = datacache.bundle(ds)
        for mn in args.models:
            size = image_size_for(mn, b.image_size, b.in_channels, b.num_classes)
            d = datacache.get(ds, size)
            specs = plan_rows(ds, mn, args.methods, settings["targets"])
            sweep_here = (not args.no_sweep and "ltc" in args.methods and settings["sweep"]["dataset"] == ds
                          and settings["sweep"]["model"] == mn)
            key = base_key(ds, mn, d, settings, args.seed)
            cached = (args.cache / f"{key}.pt").is_file()
            todo = [s for s in specs if row_key(s) not in done]
            n_sweep = settings["sweep"]["points"] if sweep_here else 0
            sweep_keys = [row_key({"kind": "sweep", "dataset": ds, "model": mn, "method": "ltc", "sweep_index": i})
                          for i in range(n_sweep)]
            n_sweep_todo = sum(k not in done for k in sweep_keys)
            if cached and not todo and not n_sweep_todo:  # finished on a previous run: nothing to time
                combos.append({"dataset": ds, "model": mn, "image_size": size, "data": d, "specs": specs,
                               "sweep": sweep_here, "cal": {}, "est_s": 0.0, "est_base_s": 0.0, "cached": True})
                log(f"  {ds}/{mn}: all rows done on a previous run")
                continue
            cal = calibrate(mn, d, settings, args.methods, args.seed)
            base_s = 0.0 if cached else settings["base"]["epochs"] * (cal["epoch_s"] + cal["eval_s"])
            rows_s = sum(estimate_row(s, cal, settings) for s in todo)
            sweep_s = n_sweep_todo * estimate_row({"method": "ltc"}, cal, settings)
            combos.append({"dataset": ds, "model": mn, "image_size": size, "data": d, "specs": specs,
                           "sweep": sweep_here, "cal": cal, "est_s": base_s + rows_s + sweep_s,
                           "est_base_s": base_s, "cached": cached})
            log(f"  {ds}/{mn} ({d.bundle.in_channels}x{size}x{size}, {d.train_size} train imgs): first epoch "
                f"{cal['epoch_s']:.1f} s, eval {cal['eval_s']:.1f} s, step time compressed/base "
                + "/".join(f"{k} {v:.2f}" for k, v in cal["compressed_speed_ratio"].items())
                + f"; base {'cached' if cached else fmt_s(base_s)}, "
                f"{len(todo) + n_sweep_todo} rows to run ≈ {fmt_s(rows_s + sweep_s)}")
    total = sum(c["est_s"] for c in combos)
    limit = LIMITS_MIN[args.profile]
    log(f"estimated time: {fmt_s(total)} (+ {fmt_s(time.perf_counter() - t_start)} spent loading and timing); "
        f"profile limit {limit} min")
    doc["estimate"] = {"total_s": total, "setup_s": time.perf_counter() - t_start,
                       "per_combo": [{"dataset": c["dataset"], "model": c["model"], "est_s": c["est_s"],
                                      "base_s": c["est_base_s"], **c["cal"]} for c in combos]}
    if args.estimate_only:
        return 0

    # ---- run
    rows: list[dict[str, Any]] = []
    doc["rows"] = rows

    def save() -> None:
        write_outputs(doc, json_path, md_path)

    n_total = sum(len(c["specs"]) + (settings["sweep"]["points"] if c["sweep"] else 0) for c in combos)
    k = 0
    for c in combos:
        ds, mn, d = c["dataset"], c["model"], c["data"]
        log(f"\n== {DATASETS[ds]['display']} / {mn} (width {settings['widths'][mn]:g}) ==")
        base, info = train_base(ds, mn, d, settings, args.seed, args.cache)
        doc["bases"][f"{ds}/{mn}"] = info
        save()
        specs = list(c["specs"])
        if c["sweep"]:
            lams, sinfo, sweep_over = lambda_grid(base, d, settings, args.seed)
            doc["sweep_info"] = sinfo
            log(f"  λ sweep: λ = {', '.join(f'{x:.4g}' for x in lams)} (budget-mode λ for SR "
                f"{', '.join(f'{x:.3g}' for x in sinfo['design_sr'])}; {sinfo['schedule']})")
            specs += [{"kind": "sweep", "dataset": ds, "model": mn, "method": "ltc", "target_sr": None, "lam": lam,
                       "label": f"λ={lam:.4g}", "sweep_index": i, "overrides": sweep_over}
                      for i, lam in enumerate(lams)]
        for spec in specs:
            k += 1
            key = row_key(spec)
            prev = done.get(key)
            if prev is not None and (spec.get("lam") is None or prev.get("lam") == spec["lam"]):
                rows.append(prev)
                log(f"  [{k}/{n_total}] {key}: kept from the previous run")
                continue
            row = run_row(spec, base, info, d, settings, args.seed, overrides=spec.get("overrides"))
            rows.append(row)
            elapsed = time.perf_counter() - t_start
            if "error" in row:
                log(f"  [{k}/{n_total}] {key}: FAILED {row['error']}  ({row['seconds']:.0f} s)")
            else:
                log(f"  [{k}/{n_total}] {DISPLAY_METHOD[row['method']]:<15} {spec['label']:<10} SR {row['sr']:6.2f}"
                    f"  CR {row['cr']:6.2f}  acc {pct(row['compressed']['acc_before_finetune'])} -> "
                    f"{pct(row['compressed']['acc'])} %  drop {row['drop_pp']:+.2f} pp  ({row['seconds']:.0f} s; "
                    f"elapsed {fmt_s(elapsed)})")
            save()
        doc["plots"] = make_plots(doc, out, stem)
        save()
    doc["status"] = "complete"
    doc["elapsed_s"] = time.perf_counter() - t_start
    doc["plots"] = make_plots(doc, out, stem)
    save()
    log(f"\ndone in {fmt_s(doc['elapsed_s'])} (estimated {fmt_s(total)}); wrote {json_path}, {md_path}"
        + "".join(f", {p}" for p in doc["plots"]))
    for s in findings(rows, doc["bases"]):
        log(f"- {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
