"""Measured CPU latency of original vs LTC-compressed full-size CNNs: measured speed-up beside the theoretical SR.

SR (SPEC section 2) is base MACs / compressed MACs, a theoretical speed-up. This script measures wall-clock time
and reports the two side by side, never calling the measured one SR.

    python benchmarks/latency.py [--models resnet34,vgg16] [--srs 5,10] [--batches 1,32]
                                 [--modes eager,fold,compile,onnx] [--repeats 20] [--quick] [--no-compile]
                                 [--runs RUN_DIR ...] [--round-ranks 8] [--out benchmarks/results]

Models: full-size zoo models (``ltc.models.create(name, num_classes=1000)``, 224x224, random weights) compressed
by ``ltc.LTC(model, x, target_sr=SR).compressed_model()`` (budget mode, the first C step's ranks). The time of a
layer does not depend on its weights, but the ranks budget mode picks do: plain Gaussian weights have flat
channel spectra, and then most layers get rank 1 or stay dense, an architecture no trained model produces. So by
default every conv weight gets channel spectra decaying as ``(i + 1) ** -1`` in random orthonormal bases
(``--decay ALPHA``; ``--decay 0`` for plain Gaussian weights), which gives a spread of ranks (resnet34 at SR 5:
median rank ~76, smallest 3). Plus, with ``--runs``, the compressed model of each ``ltc compress`` run folder
(``model.pt``) and its base (the run's ``base_run``, else ``<run>/base`` or ``<run>/../base``). With
``--round-ranks 8`` every SR also gets a variant whose ranks are rounded up to multiples of 8 (re-decomposed from
the base weights), to measure what rank rounding buys.

Modes, each on CPU with ``--threads`` threads (default 2):

* ``eager``: PyTorch eager, ``torch.inference_mode``, eval mode;
* ``fold``: eager with every BatchNorm folded into the preceding conv (``ltc.io.fold_batchnorm``, base and
  compressed alike; a Tucker-2 layer's BN goes into its last 1x1 conv). VGG-16 (torchvision layout) has no BN,
  so there ``fold`` is a second eager measurement;
* ``compile``: ``torch.compile(fold_batchnorm(model), dynamic=False)`` (Inductor, with ``freezing`` on, the
  recommended CPU inference setting; ``--no-freezing`` to turn it off); each batch size compiles once before
  timing (compile seconds reported separately, never timed; 5 s to a minute per model and batch size on 2 busy
  cores); failures are caught and reported per model;
* ``onnx``: ``ltc.io.export_onnx(model, fold_bn=True, opset=17)`` to a temporary folder, run by
  ``onnxruntime.InferenceSession`` (CPU provider, ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``,
  sequential execution, all graph optimisations).

Timing: within a (model, mode, batch) case the base and every compressed variant run **interleaved**, one call
each per round, the starting model rotating from round to round, so machine noise hits all of them alike. After
warm-up rounds, the median of the timed rounds is reported per model; measured speed-up = base median /
compressed median, also divided by the compressed model's theoretical SR; beside it the paired speed-up (median of
the per-round ratios) and the best-of speed-up (fastest run / fastest run, the least disturbed on a shared
machine). Large cases get fewer rounds: the round count is ``--case-seconds`` / (seconds per round), clipped to
[``--min-repeats``, ``--repeats``]. The 1-min load average is recorded at the start, the end and with every case.

Where the time goes (per compressed model): its MACs split into the 1x1 convs of factorised layers, their kxk
cores, convs left dense and linear layers; arithmetic intensity (MACs per byte of fp32 weights + activations
moved at batch 1) per category; the time share and achieved GMAC/s per category at batch 1 in eager mode (forward
hooks around each conv/linear, so slightly inflated by hook overhead; "other" = BN, ReLU, add, pooling); conv
count; rank statistics (ranks not multiples of 8, smallest ranks).

``--quick``: resnet34 only, batches 1 and 8, at most 5 rounds (~10 s per case; ~5 min in all). Writes
``latency.json`` and ``latency.md`` under ``--out`` (default ``benchmarks/results``; ``--quick`` writes
``latency_quick.*``), atomically, after every case, so an interrupted run leaves its finished cases behind
(``"complete": false``). ``--from-json PATH`` re-renders the markdown of an existing JSON. The default
configuration takes roughly 20-40 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _machine
import torch
from _machine import load_average
from torch import Tensor, nn

import ltc
import ltc.io
from ltc import models
from ltc.layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d
from ltc.surgery import replace_modules
from ltc.utils import atomic_write_text

DEFAULT_MODELS = ("resnet34", "vgg16")
DEFAULT_SRS = (5.0, 10.0)
DEFAULT_BATCHES = (1, 32)
QUICK_BATCHES = (1, 8)
ALL_MODES = ("eager", "fold", "compile", "onnx")
MODE_TITLES = {
    "eager": "eager",
    "fold": "eager, BN folded",
    "compile": "torch.compile (BN folded)",
    "onnx": "ONNX Runtime",
}
CATEGORIES = ("1x1 factors", "kxk cores", "dense convs", "linear")
SIZE = 224


# ============================================================================ machine


def _version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return None


def machine(threads: int) -> dict[str, Any]:
    return _machine.machine(onnxruntime=_version("onnxruntime"), onnx=_version("onnx"), threads=threads)


# ============================================================================ models and their analysis


@dataclass
class Variant:
    """One compressed model measured against its group's base."""

    label: str
    model: nn.Module
    sr: float  # theoretical: base MACs / compressed MACs at the group's input size
    cr: float
    target_sr: float | None
    source: str
    analysis: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    """A base model and the compressed variants measured side by side with it."""

    name: str
    base: nn.Module
    input_shape: tuple[int, int, int]
    variants: list[Variant]
    source: str
    base_analysis: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _example(shape: tuple[int, int, int], batch: int, seed: int = 1) -> Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _categories(model: nn.Module) -> dict[str, str]:
    """Category of every conv/linear leaf (keyed by its ``named_modules`` name)."""
    cats: dict[str, str] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, Tucker2Conv2d):
            cats[prefix + "first"] = cats[prefix + "last"] = "1x1 factors"
            cats[prefix + "core"] = "kxk cores"
        elif isinstance(mod, MatrixLowRankConv2d):
            k = tuple(mod.first.kernel_size)
            cats[prefix + "first"] = "1x1 factors" if k == (1, 1) else "kxk cores"
            cats[prefix + "last"] = "1x1 factors"
        elif isinstance(mod, LowRankLinear):
            cats[prefix + "first"] = cats[prefix + "last"] = "linear"
    for name, mod in model.named_modules():
        if name not in cats:
            if isinstance(mod, nn.Conv2d):
                cats[name] = "dense convs"
            elif isinstance(mod, nn.Linear):
                cats[name] = "linear"
    return cats


def _ranks(model: nn.Module) -> tuple[list[int], int]:
    """All rank values of the factorised layers (both axes of a Tucker-2 layer), and their number of layers."""
    ranks: list[int] = []
    layers = 0
    for mod in model.modules():
        if isinstance(mod, Tucker2Conv2d):
            ranks += [int(r) for r in mod.ranks]
            layers += 1
        elif isinstance(mod, MatrixLowRankConv2d | LowRankLinear):
            ranks.append(int(mod.rank))
            layers += 1
    return ranks, layers


def _leaf_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if not list(m.children()))


def _bn_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def _conv_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))


@torch.no_grad()
def _category_times(model: nn.Module, x: Tensor, runs: int) -> tuple[dict[str, float], float]:
    """Median milliseconds per category (forward pre/post hooks around each conv/linear leaf) and the median
    total forward time with the hooks in place, eager, at the batch of ``x``."""
    cats = _categories(model)
    modules = dict(model.named_modules())
    acc: dict[str, float] = {}
    starts: dict[str, float] = {}
    handles = []
    for name, cat in cats.items():
        mod = modules[name]

        def pre(_m: nn.Module, _i: Any, name: str = name) -> None:
            starts[name] = time.perf_counter()

        def post(_m: nn.Module, _i: Any, _o: Any, name: str = name, cat: str = cat) -> None:
            acc[cat] = acc.get(cat, 0.0) + (time.perf_counter() - starts[name]) * 1e3

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    per_cat: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    totals: list[float] = []
    try:
        with torch.inference_mode():
            model(x)  # warm-up
            for _ in range(runs):
                acc.clear()
                t0 = time.perf_counter()
                model(x)
                totals.append((time.perf_counter() - t0) * 1e3)
                for c in CATEGORIES:
                    per_cat[c].append(acc.get(c, 0.0))
    finally:
        for h in handles:
            h.remove()
    return {c: statistics.median(v) for c, v in per_cat.items()}, statistics.median(totals)


def analyse(model: nn.Module, shape: tuple[int, int, int], timing_runs: int) -> dict[str, Any]:
    """MACs, arithmetic intensity and measured eager time (batch 1) per category; conv count; rank statistics."""
    model = model.eval()
    x = _example(shape, 1)
    prof = ltc.profile(model, x)
    cats = _categories(model)
    macs = dict.fromkeys(CATEGORIES, 0)
    nbytes = dict.fromkeys(CATEGORIES, 0)
    count = dict.fromkeys(CATEGORIES, 0)
    for lp in prof.layers:
        cat = cats.get(lp.name, "dense convs")
        macs[cat] += lp.macs
        nbytes[cat] += 4 * (math.prod(lp.in_shape) + math.prod(lp.out_shape) + lp.params)
        count[cat] += 1
    ms, total_ms = _category_times(model, x, timing_runs)
    categories = {}
    for c in CATEGORIES:
        categories[c] = {
            "layers": count[c],
            "macs": macs[c],
            "mac_share": macs[c] / max(prof.macs, 1),
            "macs_per_byte_b1": macs[c] / nbytes[c] if nbytes[c] else None,
            "ms_b1_eager": ms[c],
            "time_share_b1_eager": ms[c] / total_ms if total_ms > 0 else None,
            "gmacs_per_s_b1_eager": macs[c] / (ms[c] * 1e6) if ms[c] > 0 else None,
        }
    other = max(total_ms - sum(ms.values()), 0.0)
    ranks, n_fact = _ranks(model)
    not8 = [r for r in ranks if r % 8]
    return {
        "macs": prof.macs,
        "params": prof.params,
        "convs": _conv_count(model),
        "leaf_modules": _leaf_count(model),
        "batchnorms": _bn_count(model),
        "batchnorms_after_fold": _bn_count(ltc.io.fold_batchnorm(model)),
        "categories": categories,
        "other_ms_b1_eager": other,
        "other_time_share_b1_eager": other / total_ms if total_ms > 0 else None,
        "total_ms_b1_eager_hooked": total_ms,
        "factorised_layers": n_fact,
        "rank_values": len(ranks),
        "ranks_not_multiple_of_8": len(not8),
        "ranks_not_multiple_of_8_share": len(not8) / len(ranks) if ranks else None,
        "ranks_below_16": sum(1 for r in ranks if r < 16),
        "min_rank": min(ranks) if ranks else None,
        "median_rank": statistics.median(ranks) if ranks else None,
        "smallest_ranks": sorted(ranks)[:10],
    }


def round_ranks(base: nn.Module, compressed: nn.Module, multiple: int) -> nn.Module:
    """A copy of ``compressed`` whose factorised layers are re-decomposed from ``base`` at ranks rounded up to
    multiples of ``multiple`` (capped at the full rank)."""

    def up(r: int, full: int) -> int:
        return min(full, multiple * math.ceil(r / multiple))

    out = copy.deepcopy(compressed)
    base_mods = dict(base.named_modules())
    new: dict[str, nn.Module] = {}
    for name, mod in compressed.named_modules():
        orig = base_mods.get(name)
        if isinstance(mod, Tucker2Conv2d) and isinstance(orig, nn.Conv2d):
            r_in, r_out = mod.ranks
            new[name] = Tucker2Conv2d.from_conv(orig, (up(r_in, orig.in_channels), up(r_out, orig.out_channels)))
        elif isinstance(mod, MatrixLowRankConv2d) and isinstance(orig, nn.Conv2d):
            full = min(orig.out_channels, orig.weight[0].numel())
            new[name] = MatrixLowRankConv2d.from_conv(orig, up(mod.rank, full))
        elif isinstance(mod, LowRankLinear) and isinstance(orig, nn.Linear):
            new[name] = LowRankLinear.from_linear(orig, up(mod.rank, min(orig.in_features, orig.out_features)))
    return replace_modules(out, new).eval()


def _sr_cr(base: nn.Module, comp: nn.Module, shape: tuple[int, int, int]) -> tuple[float, float]:
    x = _example(shape, 1)
    pb, pc = ltc.profile(base, x), ltc.profile(comp, x)
    return pb.macs / max(pc.macs, 1), pb.params / max(pc.params, 1)


@torch.no_grad()
def decaying_spectrum(model: nn.Module, alpha: float, seed: int = 0) -> None:
    """Give every ungrouped conv weight (in place, norm kept) channel spectra decaying as ``(i + 1) ** -alpha``
    in random orthonormal bases: ``W = Z ×_out Q_out·diag(d_out) ×_in Q_in·diag(d_in)`` with Gaussian ``Z``.
    Random Gaussian weights have flat spectra, so budget-mode ranks collapse to extremes (rank 1 or dense);
    trained convs have decaying spectra. Linear layers keep their random weights."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if not (isinstance(m, nn.Conv2d) and m.groups == 1):
            continue
        w = m.weight
        t, s, kh, kw = w.shape
        d_out = (torch.arange(t, dtype=torch.float64) + 1) ** -alpha
        d_in = (torch.arange(s, dtype=torch.float64) + 1) ** -alpha
        q_out = torch.linalg.qr(torch.randn(t, t, generator=g, dtype=torch.float64))[0]
        q_in = torch.linalg.qr(torch.randn(s, s, generator=g, dtype=torch.float64))[0]
        z = torch.randn(t, s, kh, kw, generator=g, dtype=torch.float64)
        z = z * d_out[:, None, None, None] * d_in[None, :, None, None]
        new = torch.einsum("ti,ishw->tshw", q_out, torch.einsum("sj,ijhw->ishw", q_in, z))
        new = new * (w.double().norm() / new.norm().clamp_min(1e-30))
        w.copy_(new.to(w.dtype))


def zoo_group(name: str, srs: list[float], round_to: int, decay: float | None) -> Group:
    torch.manual_seed(0)
    base = models.create(name, num_classes=1000).eval()
    weights = "random weights"
    if decay:
        decaying_spectrum(base, decay)
        weights = f"random weights with channel spectra decaying as (i+1)^-{decay:g}"
    shape = (3, SIZE, SIZE)
    x = _example(shape, 1)
    variants = []
    for sr in srs:
        t0 = time.perf_counter()
        comp = ltc.LTC(base, x, target_sr=sr).compressed_model().eval()
        secs = time.perf_counter() - t0
        got_sr, got_cr = _sr_cr(base, comp, shape)
        variants.append(Variant(f"SR {sr:g}", comp, got_sr, got_cr, sr, f"ltc.LTC budget mode ({secs:.1f} s)"))
        print(f"  {name}: LTC target SR {sr:g} -> SR {got_sr:.3f}, CR {got_cr:.2f} ({secs:.1f} s)", flush=True)
        if round_to > 1:
            r8 = round_ranks(base, comp, round_to)
            r_sr, r_cr = _sr_cr(base, r8, shape)
            variants.append(
                Variant(f"SR {sr:g} r{round_to}", r8, r_sr, r_cr, sr, f"SR {sr:g} ranks rounded up to x{round_to}")
            )
            print(f"  {name}: ranks rounded up to multiples of {round_to} -> SR {r_sr:.3f}", flush=True)
    return Group(name, base, shape, variants, f"ltc.models.create({name!r}, num_classes=1000), {weights}")


def quality_groups(path: str, methods: list[str], round_to: int) -> list[Group]:
    """One group per (dataset, model) of a ``benchmarks/quality.py`` results JSON: its base architecture against
    the architectures the listed methods deployed at each target SR, rebuilt from the ranks the JSON records
    (random weights: the time of a layer does not depend on them)."""
    from ltc.engine import LCEngine

    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    groups = []
    for key, info in doc.get("bases", {}).items():
        torch.manual_seed(0)
        base = models.create(info["model"], num_classes=info["num_classes"], width=info["width"],
                             in_channels=info["in_channels"]).eval()
        shape = (int(info["in_channels"]), int(info["image_size"]), int(info["image_size"]))
        x = _example(shape, 1)
        variants = []
        for row in doc.get("rows", []):
            if (row.get("kind") != "compare" or f"{row['dataset']}/{row['model']}" != key or "error" in row
                    or row["method"] not in methods or row.get("target_sr") is None):
                continue
            scheme = "matrix" if row["method"] == "lrc" else "tucker2"
            mods = dict(base.named_modules())
            linear = any(isinstance(mods.get(n), nn.Linear) for n in row["ranks"])
            eng = LCEngine(base, x, lam=0.0, conv_scheme=scheme, compress_linear=linear)
            eng.assign({n: tuple(r) if isinstance(r, list) else r for n, r in row["ranks"].items()})
            comp = eng.compressed_model().eval()
            got_sr, got_cr = _sr_cr(base, comp, shape)
            label = f"{row['method']} SR {row['target_sr']:g}"
            variants.append(Variant(label, comp, got_sr, got_cr, row["target_sr"], f"{path}: {row['key']}"))
            print(f"  {key}: {label} -> SR {got_sr:.3f} (the quality run recorded {row['sr']:.3f})", flush=True)
            if round_to > 1:
                r8 = round_ranks(base, comp, round_to)
                r_sr, r_cr = _sr_cr(base, r8, shape)
                variants.append(Variant(f"{label} r{round_to}", r8, r_sr, r_cr, row["target_sr"],
                                        f"{label} ranks rounded up to x{round_to}"))
        if variants:
            groups.append(Group(f"{key} (width {info['width']:g}, quality run)", base, shape, variants,
                                f"{path}: architectures of the {', '.join(methods)} rows, random weights"))
    return groups


def run_groups(paths: list[str]) -> list[Group]:
    """One group per ``ltc compress`` run folder: its compressed model against its base."""
    from ltc import runs

    groups = []
    for run_dir in runs.expand_runs(paths):
        result = runs.read_json(run_dir / runs.RESULT_NAME)
        if result.get("kind") != "compress":
            print(f"  skipping {run_dir}: not a compress run (kind {result.get('kind')!r})", flush=True)
            continue
        loaded = runs.load_model(run_dir)
        cands = []
        if result.get("base_run"):
            b = Path(str(result["base_run"])).expanduser()
            cands += [b, run_dir / b] if not b.is_absolute() else [b]
        cands += [run_dir / "base", run_dir.parent / "base"]
        base_path = next((c for c in cands if c.exists()), None)
        if base_path is None:
            raise FileNotFoundError(f"no base model for run {run_dir} (tried {', '.join(map(str, cands))})")
        base = runs.load_model(base_path).model.eval()
        shape = loaded.input_shape
        if shape is None:
            cfg = getattr(loaded.model, "ltc_config", None) or {}
            size = models.default_input_size(cfg["name"]) if cfg.get("name") else SIZE
            shape = (3, size, size)
        comp = loaded.model.eval()
        got_sr, got_cr = _sr_cr(base, comp, shape)
        label = f"run {run_dir.name}"
        variant = Variant(label, comp, got_sr, got_cr, result.get("target_sr"), str(run_dir))
        source = f"run {run_dir}, base {base_path}"
        groups.append(Group(f"{loaded.name} ({run_dir.name})", base, shape, [variant], source))
        print(f"  run {run_dir}: {loaded.name}, SR {got_sr:.3f}, base {base_path}", flush=True)
    return groups


# ============================================================================ modes


class Runner:
    """A callable running one model on one prepared input in one mode."""

    def __init__(self, fn: Callable[[Any], Any], prepare: Callable[[Tensor], Any]) -> None:
        self.fn, self.prepare = fn, prepare
        self.x: Any = None

    def set_input(self, x: Tensor) -> None:
        self.x = self.prepare(x)

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.fn(self.x)
        return (time.perf_counter() - t0) * 1e3


def _torch_runner(model: nn.Module) -> Runner:
    def fn(x: Tensor) -> Any:
        with torch.inference_mode():
            return model(x)

    return Runner(fn, lambda x: x)


def _attempt(build: Callable[[], Runner]) -> Runner | Exception:
    try:
        return build()
    except Exception as exc:  # reported per model; the other models are still measured
        traceback.print_exc()
        return exc


def _ort_runner(model: nn.Module, path: Path, x: Tensor, threads: int) -> Runner:
    import onnxruntime as ort

    ltc.io.export_onnx(model, path, x, fold_bn=True, opset=17)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    path.unlink(missing_ok=True)
    name = sess.get_inputs()[0].name

    def fn(inp: Any) -> Any:
        return sess.run(None, {name: inp})

    return Runner(fn, lambda t: t.detach().cpu().numpy())


@contextlib.contextmanager
def prepared(
    mode: str, models_: list[nn.Module], shape: tuple[int, int, int], threads: int, tmp: Path, freezing: bool = True
) -> Iterator[list[Runner | Exception]]:
    """A runner per model in ``mode`` (or the exception that prevented it); resources released on exit.
    ``compile`` runners compile lazily, on their first call."""
    if mode == "eager":
        yield [_torch_runner(m.eval()) for m in models_]
    elif mode == "fold":
        yield [_attempt(lambda m=m: _torch_runner(ltc.io.fold_batchnorm(m))) for m in models_]
    elif mode == "compile":
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        old = inductor_config.freezing
        inductor_config.freezing = freezing
        try:
            yield [
                _attempt(lambda m=m: _torch_runner(torch.compile(ltc.io.fold_batchnorm(m), dynamic=False)))
                for m in models_
            ]
        finally:
            inductor_config.freezing = old
            torch._dynamo.reset()
    elif mode == "onnx":
        x = _example(shape, 1)
        yield [
            _attempt(lambda i=i, m=m: _ort_runner(m, tmp / f"model{i}.onnx", x, threads)) for i, m in enumerate(models_)
        ]
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(ALL_MODES)}")


def interleaved(
    runners: list[Runner], warmup: int, repeats: int, min_repeats: int, case_seconds: float
) -> tuple[list[list[float]], int]:
    """Time every runner once per round, the first one rotating; ``warmup`` untimed rounds first. Returns the
    per-runner times (ms) and the number of warm-up rounds done."""
    n = len(runners)
    round_s = 0.0
    done_warmup = 0
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        for r in runners:
            r()
        round_s = time.perf_counter() - t0
        done_warmup += 1
        if round_s > 5.0:  # big cases: one warm-up round is enough
            break
    rounds = int(min(repeats, max(min_repeats, case_seconds // max(round_s, 1e-6))))
    times: list[list[float]] = [[] for _ in range(n)]
    for i in range(rounds):
        for j in range(n):
            k = (i + j) % n
            times[k].append(runners[k]())
    return times, done_warmup


def _pct(v: list[float], q: float) -> float:
    s = sorted(v)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats(v: list[float]) -> dict[str, Any]:
    return {
        "median_ms": statistics.median(v),
        "min_ms": min(v),
        "p10_ms": _pct(v, 10),
        "p90_ms": _pct(v, 90),
        "n": len(v),
    }


# ============================================================================ report


def _f(v: Any, fmt: str = ".2f", none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}"


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _range(vals: list[float], fmt: str = ".2f") -> str:
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return format(lo, fmt) if abs(hi - lo) < 0.005 else f"{lo:{fmt}}–{hi:{fmt}}"


def _med(vals: list[float]) -> float:
    return statistics.median(vals) if vals else float("nan")


def _factor(vals: list[float]) -> str:
    """``'median 1.23 (range 0.9–2.1)'`` of a list of ratios."""
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"median {_med(vals):.2f} (range {_range(vals)})"


def _gmacs(a: dict[str, Any]) -> float | None:
    """Whole-forward MAC throughput (GMAC/s) at batch 1, eager, hook-timed."""
    ms = a.get("total_ms_b1_eager_hooked")
    return a["macs"] / (ms * 1e6) if ms else None


def interpretation(report: dict[str, Any]) -> list[str]:
    """A few sentences generated from the numbers."""
    rows = _ok(report["results"])
    out: list[str] = []
    if not rows:
        return ["No case finished, so there is nothing to interpret."]
    batches = sorted({r["batch"] for r in rows})
    modes = [m for m in ALL_MODES if any(r["mode"] == m for r in rows)]
    loads = [
        x
        for x in [report["machine"].get("load_average_1m_at_start"), report.get("load_average_1m_at_end")]
        + [r.get("load_average_1m") for r in rows]
        if x is not None
    ]
    cpus = report["machine"].get("cpu_count") or 1
    loaded = bool(loads) and max(loads) > 0.75 * cpus
    for key, what in (("speedup", "median"), ("min_speedup", "best-of")):
        if key == "min_speedup" and not loaded:
            break
        for b in batches:
            parts = []
            for m in modes:
                sel = [r for r in rows if r["batch"] == b and r["mode"] == m]
                if sel:
                    parts.append(
                        f"{MODE_TITLES[m]} {_range([r[key] / r['sr'] for r in sel])} of SR "
                        f"({_range([r[key] for r in sel])}x)"
                    )
            lead = "the measured speed-up is" if what == "median" else "the best-of speed-up (fastest run of each) is"
            out.append(f"At batch {b}, {lead} " + "; ".join(parts) + ".")
    if loaded:
        out.append(
            f"The 1-min load average reached {max(loads):.1f} on {cpus} CPUs during the run: other work shared the "
            "cores, so absolute times are inflated and differences of a few tens of percent between modes or "
            "variants are within noise (an oversubscribed 2-thread run also stalls at every parallel region, which "
            "penalises a model with many small ops more); the interleaved ratios are the figures to trust, and the "
            "best-of ratios show the least disturbed runs."
        )
    best = max(rows, key=lambda r: r["speedup_over_sr"])
    worst = min(rows, key=lambda r: r["speedup_over_sr"])
    out.append(
        f"Best case: {best['group']} {best['variant']} at batch {best['batch']}, {MODE_TITLES[best['mode']]}: "
        f"{best['speedup']:.2f}x for SR {best['sr']:.2f} ({best['speedup_over_sr']:.2f} of SR); worst: "
        f"{worst['group']} {worst['variant']} at batch {worst['batch']}, {MODE_TITLES[worst['mode']]}: "
        f"{worst['speedup']:.2f}x for SR {worst['sr']:.2f} ({worst['speedup_over_sr']:.2f})."
    )
    an = [(g, v) for g in report["groups"] for v in g["variants"] if v.get("analysis") and g.get("base_analysis")]
    if an:
        eff = [(_gmacs(v["analysis"]) or 0) / gb for g, v in an if (gb := _gmacs(g["base_analysis"]))]
        gcomp = [x for _, v in an if (x := _gmacs(v["analysis"]))]
        gbase = [x for g, _ in an if (x := _gmacs(g["base_analysis"]))]

        def cat(c: str, k: str, scale: float = 1.0) -> list[float]:
            return [
                scale * x
                for _, v in an
                if (x := v["analysis"]["categories"][c][k]) is not None and v["analysis"]["categories"][c]["layers"]
            ]

        gb_conv = [x for g, _ in an if (x := g["base_analysis"]["categories"]["dense convs"]["gmacs_per_s_b1_eager"])]
        ib_conv = [x for g, _ in an if (x := g["base_analysis"]["categories"]["dense convs"]["macs_per_byte_b1"])]
        s = (
            f"Why it falls short (batch 1, eager, hook-timed): the compressed models compute at "
            f"{_range(gcomp, '.1f')} GMAC/s over the whole forward pass against {_range(gbase, '.1f')} GMAC/s for "
            f"their bases: each remaining MAC costs more time, and speed-up / SR tracks that throughput ratio "
            f"({_range(eff)}). "
        )
        if cat("1x1 factors", "mac_share"):
            s += (
                f"The 1x1 convs of the factorised layers hold {_range(cat('1x1 factors', 'mac_share', 100), '.0f')} % "
                f"of the compressed MACs and take {_range(cat('1x1 factors', 'time_share_b1_eager', 100), '.0f')} % "
                f"of the time at {_range(cat('1x1 factors', 'gmacs_per_s_b1_eager'), '.1f')} GMAC/s; the kxk cores "
                f"{_range(cat('kxk cores', 'mac_share', 100), '.0f')} % of the MACs, "
                f"{_range(cat('kxk cores', 'time_share_b1_eager', 100), '.0f')} % of the time at "
                f"{_range(cat('kxk cores', 'gmacs_per_s_b1_eager'), '.1f')} GMAC/s"
            )
            if gb_conv:
                s += f", against {_range(gb_conv, '.1f')} GMAC/s for the base's dense convs"
            s += (
                f". The 1x1 factors have an arithmetic intensity of "
                f"{_range(cat('1x1 factors', 'macs_per_byte_b1'), '.1f')} MACs/byte (base convs "
                f"{_range(ib_conv, '.1f')}): they are memory-bound, reading and writing a whole activation map for "
                "a thin channel mixing. "
            )
        not8 = [100 * (v["analysis"]["ranks_not_multiple_of_8_share"] or 0.0) for _, v in an]
        mins = [v["analysis"]["min_rank"] for _, v in an if v["analysis"]["min_rank"] is not None]
        meds = [float(v["analysis"]["median_rank"]) for _, v in an if v["analysis"]["median_rank"] is not None]
        if mins:
            s += (
                f"{_range(not8, '.0f')} % of the ranks are not multiples of 8 (median rank {_range(meds, 'g')}, "
                f"smallest {min(mins)}), which leaves SIMD lanes and GEMM register tiles partly empty. "
            )
        convs_b = [float(g["base_analysis"]["convs"]) for g, _ in an]
        convs_c = [float(v["analysis"]["convs"]) for _, v in an]
        oth = [100 * (v["analysis"]["other_time_share_b1_eager"] or 0.0) for _, v in an]
        s += (
            f"The conv count grows from {_range(convs_b, '.0f')} to {_range(convs_c, '.0f')}, so per-op overhead "
            f"(dispatch, thread fork/join, memory passes) grows while the MACs shrink, and the unchanged non-conv ops "
            f"(BN, ReLU, add, pooling: {_range(oth, '.0f')} % of the compressed model's time) do not shrink at all."
        )
        out.append(s)
        med = [v["analysis"]["median_rank"] for _, v in an if v["analysis"]["median_rank"] is not None]
        if med and min(med) <= 2:
            out.append(
                "Caution: some compressed models here have a median rank of 1-2 (plain Gaussian weights have flat "
                "spectra, so budget mode picks rank 1 or dense); a trained model (--runs) or --decay 1 gives a rank "
                "pattern closer to practice."
            )
    fixes = []
    pairs: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault((r["group"], r["variant"], r["batch"]), {})[r["mode"]] = r
    no_bn = {g["name"] for g in report["groups"] if g.get("base_analysis") and not g["base_analysis"]["batchnorms"]}
    for m in ("fold", "compile", "onnx"):
        v = [
            d[m]["speedup"] / d["eager"]["speedup"]
            for k, d in pairs.items()
            if "eager" in d and m in d and not (m == "fold" and k[0] in no_bn)
        ]
        if v:
            fixes.append(f"{MODE_TITLES[m]} multiplies the eager speed-up by {_factor(v)}")
    same = [
        d["fold"]["speedup"] / d["eager"]["speedup"]
        for k, d in pairs.items()
        if k[0] in no_bn and "fold" in d and "eager" in d
    ]
    if same:
        out.append(
            f"Noise check: {', '.join(sorted(no_bn))} has no BatchNorm, so its 'BN folded' runs repeat eager; the two "
            f"speed-ups differ by a factor {_range(same)}, which is the run-to-run noise of this machine."
        )
    rr = [r for r in rows if " r" in r["variant"]]
    if rr:
        by = {(r["group"], r["variant"], r["batch"], r["mode"]): r for r in rows}
        dif = [
            r["speedup_over_sr"] / o["speedup_over_sr"]
            for r in rr
            if (o := by.get((r["group"], r["variant"].rsplit(" r", 1)[0], r["batch"], r["mode"])))
        ]
        if dif:
            fixes.append(f"rounding the ranks up to multiples of 8 multiplies speed-up / SR by {_factor(dif)}")
    text = "What would close the gap. "
    if fixes:
        text += "Measured here: " + "; ".join(fixes) + ". "
    text += (
        "Not measured here (changes to the method): rank rounding to multiples of 8 (or 16) inside the C step, so "
        "the budget is spent on hardware-friendly shapes; BN folded into the last 1x1 conv and the pointwise convs "
        "fused with their neighbours at deployment (what ONNX Runtime and torch.compile partly do); and a "
        "latency-aware cost in the C step (a per-layer latency table measured on the target CPU in place of MACs), "
        "which would stop the search from trading dense convs for chains of small memory-bound convs that save "
        "MACs but little time."
    )
    out.append(text)
    return out


def _weights(cfg: dict[str, Any]) -> str:
    d = cfg.get("decay")
    if d:
        return f"conv channel spectra decaying as (i+1)^-{d:g} in random bases, see --decay"
    return "plain Gaussian"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    cfg = report["config"]
    lines = [
        "# Measured latency: original vs LTC-compressed (CPU)",
        "",
        "SR = base MACs / compressed MACs (theoretical, SPEC section 2). The measured speed-up below is wall-clock "
        "time and is never called SR.",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}" + ("" if report.get("complete") else " (**incomplete**: run interrupted)"),
        f"- machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs, Python {m['python']}, torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, {cfg['threads']} threads (torch and ONNX Runtime intra-op; ORT inter-op 1, "
        "sequential)",
        f"- 1-min load average: {m['load_average_1m_at_start']} at start, {report.get('load_average_1m_at_end')} "
        "at end. The machine may be shared with other work, so absolute times are noisy; base and compressed "
        "models run interleaved (one call each per round, rotating order), so the ratios are more reliable "
        "than the absolute times.",
        f"- method: median of up to {cfg['repeats']} timed rounds (at least {cfg['min_repeats']}, fewer for big "
        f"cases: about {cfg['case_seconds']:g} s per case) after {cfg['warmup']} warm-up round(s); zoo models: "
        f"random weights ({_weights(cfg)}), {cfg['input_size']}x{cfg['input_size']} inputs, 1000 classes, "
        "compressed by `ltc.LTC(model, x, target_sr=SR)` (budget mode, first C step's ranks); "
        "measured speed-up = base median / compressed median; `speed-up / SR` = that divided by the compressed "
        "model's theoretical SR; paired speed-up = median over rounds of the per-round ratio (robust to load "
        "that changes during a case); best-of speed-up = base fastest run / compressed fastest run (the least "
        "disturbed runs on a shared machine).",
        "",
    ]
    rows = report["results"]
    for g in report["groups"]:
        gname = g["name"]
        grows = [r for r in rows if r["group"] == gname]
        if not grows:
            continue
        shape = "x".join(map(str, g["input_shape"]))
        lines += [f"## {gname}", "", f"Base: {g['source']}; input {shape}. " + " ".join(g.get("notes", [])), ""]
        lines += [
            "| variant | SR | CR | batch | mode | base ms | compressed ms | measured speed-up | speed-up / SR "
            "| paired speed-up | best-of speed-up | rounds | compile s (base / compr.) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in grows:
            if r["status"] != "ok":
                lines.append(
                    f"| {r['variant']} | {r['sr']:.2f} | {r['cr']:.2f} | {r['batch']} | {MODE_TITLES[r['mode']]} "
                    f"| - | - | {r['status']} | - | - | - | - | - |"
                )
                continue
            comp_s = "-"
            if r.get("compile_s_base") is not None:
                comp_s = f"{r['compile_s_base']:.0f} / {r['compile_s']:.0f}"
            lines.append(
                f"| {r['variant']} | {r['sr']:.2f} | {r['cr']:.2f} | {r['batch']} | {MODE_TITLES[r['mode']]} "
                f"| {_ms(r['base_ms'])} | {_ms(r['compressed_ms'])} | {r['speedup']:.2f}x "
                f"| {r['speedup_over_sr']:.2f} | {r['paired_speedup_median']:.2f}x | {r['min_speedup']:.2f}x "
                f"| {r['rounds']} | {comp_s} |"
            )
        lines.append("")
    ok = _ok(rows)
    if ok:
        modes = [mo for mo in ALL_MODES if any(r["mode"] == mo for r in ok)]
        lines += [
            "## Summary: measured speed-up (speed-up / SR)",
            "",
            "| model | variant | SR | batch | " + " | ".join(MODE_TITLES[mo] for mo in modes) + " |",
            "|---|---|---|---|" + "---|" * len(modes),
        ]
        keys = list(dict.fromkeys((r["group"], r["variant"], r["batch"]) for r in rows))
        for gk, vk, bk in keys:
            cells = []
            sr = next(r["sr"] for r in rows if (r["group"], r["variant"]) == (gk, vk))
            for mo in modes:
                r = next((r for r in ok if (r["group"], r["variant"], r["batch"], r["mode"]) == (gk, vk, bk, mo)), None)
                cells.append(f"{r['speedup']:.2f}x ({r['speedup_over_sr']:.2f})" if r else "-")
            lines.append(f"| {gk} | {vk} | {sr:.2f} | {bk} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Best-of speed-up (fastest run of base / fastest run of compressed; speed-up / SR in brackets), the least "
            "disturbed runs on a shared machine:",
            "",
            "| model | variant | SR | batch | " + " | ".join(MODE_TITLES[mo] for mo in modes) + " |",
            "|---|---|---|---|" + "---|" * len(modes),
        ]
        for gk, vk, bk in keys:
            cells = []
            sr = next(r["sr"] for r in rows if (r["group"], r["variant"]) == (gk, vk))
            for mo in modes:
                r = next((r for r in ok if (r["group"], r["variant"], r["batch"], r["mode"]) == (gk, vk, bk, mo)), None)
                cells.append(f"{r['min_speedup']:.2f}x ({r['min_speedup'] / r['sr']:.2f})" if r else "-")
            lines.append(f"| {gk} | {vk} | {sr:.2f} | {bk} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Where the time goes (compressed models, batch 1, eager)",
        "",
        "MAC share and measured time share per category (forward hooks around each conv/linear; 'other' = BN, "
        "ReLU, add, pooling, i.e. the rest of the forward pass), achieved GMAC/s, and arithmetic intensity "
        "(MACs per byte of fp32 weights + input + output at batch 1). The base model's dense convs are given "
        "for reference.",
        "",
        "| model | variant | category | layers | MACs | MAC share | time share | GMAC/s | MACs/byte |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in report["groups"]:
        entries = []
        if g.get("base_analysis"):
            entries.append(("base", g["base_analysis"]))
        entries += [(v["label"], v["analysis"]) for v in g["variants"] if v.get("analysis")]
        for label, a in entries:
            for c in CATEGORIES:
                d = a["categories"][c]
                if not d["layers"]:
                    continue
                lines.append(
                    f"| {g['name']} | {label} | {c} | {d['layers']} | {ltc.format_count(d['macs'])} "
                    f"| {100 * d['mac_share']:.1f} % | {_f(100 * (d['time_share_b1_eager'] or 0), '.1f')} % "
                    f"| {_f(d['gmacs_per_s_b1_eager'], '.1f')} | {_f(d['macs_per_byte_b1'], '.1f')} |"
                )
            other = _f(100 * (a["other_time_share_b1_eager"] or 0), ".1f")
            lines.append(f"| {g['name']} | {label} | other | - | - | - | {other} % | - | - |")
    lines += [
        "",
        "| model | variant | MACs | convs | BN layers (after folding) | factorised layers | ranks not x8 | ranks < 16 "
        "| min rank "
        "| median rank | smallest ranks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in report["groups"]:
        if g.get("base_analysis"):
            a = g["base_analysis"]
            lines.append(
                f"| {g['name']} | base | {ltc.format_count(a['macs'])} | {a['convs']} | {a['batchnorms']} "
                f"({a['batchnorms_after_fold']}) | 0 "
                "| - | - | - | - | - |"
            )
        for v in g["variants"]:
            a = v.get("analysis")
            if not a:
                continue
            share = a["ranks_not_multiple_of_8_share"]
            lines.append(
                f"| {g['name']} | {v['label']} | {ltc.format_count(a['macs'])} | {a['convs']} | {a['batchnorms']} "
                f"({a['batchnorms_after_fold']}) | {a['factorised_layers']} "
                f"| {a['ranks_not_multiple_of_8']}/{a['rank_values']} "
                f"({_f(100 * share if share is not None else None, '.0f')} %) | {a['ranks_below_16']} "
                f"| {a['min_rank']} | {_f(a['median_rank'], 'g')} | {', '.join(map(str, a['smallest_ranks']))} |"
            )
    failures = [r for r in rows if r["status"] != "ok"]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            lines.append(f"- {r['group']} {r['variant']} batch {r['batch']} {r['mode']}: {r.get('error', r['status'])}")
    lines += ["", "## Interpretation", ""]
    lines += [" ".join(interpretation(report))]
    return "\n".join(lines) + "\n"


# ============================================================================ main


def _group_dict(g: Group) -> dict[str, Any]:
    return {
        "name": g.name,
        "source": g.source,
        "input_shape": list(g.input_shape),
        "notes": g.notes,
        "base_analysis": g.base_analysis,
        "variants": [
            {
                "label": v.label,
                "sr": v.sr,
                "cr": v.cr,
                "target_sr": v.target_sr,
                "source": v.source,
                "analysis": v.analysis,
            }
            for v in g.variants
        ],
    }


def _write(report: dict[str, Any], out: Path, stem: str, groups: list[Group]) -> None:
    report["groups"] = [_group_dict(g) for g in groups]
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown(report))


def _csv(s: str, conv: Callable[[str], Any]) -> list[Any]:
    return [conv(t.strip()) for t in s.split(",") if t.strip() and t.strip().lower() != "none"]


def _err(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:300]}"


def measure_group(
    g: Group, args: argparse.Namespace, report: dict[str, Any], write: Callable[[], None], tmp: Path
) -> None:
    all_models = [g.base] + [v.model for v in g.variants]
    for mode in args.modes:
        t_mode = time.perf_counter()
        with prepared(
            mode, all_models, g.input_shape, args.threads, tmp, freezing=not args.no_freezing
        ) as prepared_runners:
            for b in args.batches:
                _measure_case(g, mode, b, list(prepared_runners), args, report)
                write()
            del prepared_runners
        gc.collect()
        print(f"  [{g.name} {mode}: {time.perf_counter() - t_mode:.0f} s]", flush=True)


def _measure_case(
    g: Group, mode: str, b: int, runners: list[Runner | Exception], args: argparse.Namespace, report: dict[str, Any]
) -> None:
    """One (group, mode, batch) case: base and every variant interleaved; rows appended to the report."""
    x = _example(g.input_shape, b, seed=2)
    compile_s: list[float | None] = [None] * len(runners)
    for i, r in enumerate(runners):
        if isinstance(r, Exception):
            continue
        try:
            r.set_input(x)
            if mode == "compile":  # compile this batch size before anything is timed
                compile_s[i] = r() / 1e3
        except Exception as exc:
            traceback.print_exc()
            runners[i] = exc
    live = [i for i, r in enumerate(runners) if not isinstance(r, Exception)]
    base_err = runners[0] if isinstance(runners[0], Exception) else None
    times_by: dict[int, list[float]] = {}
    warm = 0
    if base_err is None and len(live) > 1:
        try:
            times, warm = interleaved(
                [runners[i] for i in live], args.warmup, args.repeats, args.min_repeats, args.case_seconds
            )
            times_by = dict(zip(live, times, strict=True))
        except Exception as exc:
            traceback.print_exc()
            base_err = exc
    for k, v in enumerate(g.variants, start=1):
        err = base_err if base_err is not None else runners[k] if isinstance(runners[k], Exception) else None
        if err is not None or k not in times_by:
            what = "base: " if base_err is not None else ""
            msg = what + (_err(err) if err is not None else "not measured")
            report["results"].append(_row(g, v, b, mode, args.threads, status="failed", error=msg))
            print(f"  {g.name} {v.label} b{b} {mode:8s}: FAILED {msg}", flush=True)
            continue
        sb, sc = _stats(times_by[0]), _stats(times_by[k])
        paired = statistics.median(tb / max(tc, 1e-9) for tb, tc in zip(times_by[0], times_by[k], strict=True))
        speed = sb["median_ms"] / max(sc["median_ms"], 1e-9)
        row = _row(g, v, b, mode, args.threads, status="ok")
        row.update(
            {
                "base_ms": sb["median_ms"],
                "compressed_ms": sc["median_ms"],
                "speedup": speed,
                "speedup_over_sr": speed / v.sr,
                "paired_speedup_median": paired,
                "min_speedup": sb["min_ms"] / max(sc["min_ms"], 1e-9),
                "base": sb,
                "compressed": sc,
                "rounds": len(times_by[0]),
                "warmup_rounds": warm,
                "compile_s_base": compile_s[0],
                "compile_s": compile_s[k],
                "load_average_1m": load_average(),
            }
        )
        report["results"].append(row)
        print(
            f"  {g.name} {v.label} b{b} {mode:8s}: base {_ms(sb['median_ms'])} ms, compressed "
            f"{_ms(sc['median_ms'])} ms -> {speed:.2f}x (SR {v.sr:.2f}, {speed / v.sr:.2f} of SR), "
            f"{len(times_by[0])} rounds, load {load_average()}",
            flush=True,
        )


def _row(
    g: Group, v: Variant, batch: int, mode: str, threads: int, *, status: str, error: str | None = None
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "group": g.name,
        "variant": v.label,
        "sr": v.sr,
        "cr": v.cr,
        "target_sr": v.target_sr,
        "batch": batch,
        "mode": mode,
        "threads": threads,
        "status": status,
    }
    if error:
        row["error"] = error
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models",
        default=None,
        help=f"comma-separated zoo models (default {','.join(DEFAULT_MODELS)}; "
        "'none' with --runs for run folders only)",
    )
    ap.add_argument("--srs", default=None, help="comma-separated target SRs (default 5,10)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32; --quick 1,8)")
    ap.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma-separated, from {','.join(ALL_MODES)}")
    ap.add_argument("--no-compile", action="store_true", help="drop the torch.compile mode (slow to compile)")
    ap.add_argument(
        "--runs",
        nargs="+",
        default=[],
        metavar="DIR",
        help="also measure the compressed model of these ltc compress run folders against their base",
    )
    ap.add_argument(
        "--quality",
        metavar="JSON",
        default=None,
        help="also measure the compressed architectures of a benchmarks/quality.py results JSON (rebuilt from "
        "their ranks) against their bases",
    )
    ap.add_argument("--quality-methods", default="ltc", help="comma-separated methods of --quality rows (default ltc)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per case, at most (default 20; quick 5)")
    ap.add_argument("--min-repeats", type=int, default=3, help="timed rounds per case, at least (default 3)")
    ap.add_argument(
        "--case-seconds",
        type=float,
        default=None,
        help="aim for about this many seconds of timed rounds per case (default 30; quick 10)",
    )
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (1 when a round takes > 5 s)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch and ONNX Runtime intra-op)")
    ap.add_argument(
        "--round-ranks",
        type=int,
        default=0,
        metavar="N",
        help="also measure each SR with its ranks rounded up to multiples of N (e.g. 8; 0 = off)",
    )
    ap.add_argument(
        "--decay",
        type=float,
        default=1.0,
        metavar="ALPHA",
        help="zoo models: random conv weights with channel spectra decaying as (i+1)^-ALPHA (default 1), "
        "for a rank pattern closer to a trained model; 0 = plain Gaussian weights (flat spectra: budget "
        "mode then picks rank 1 or dense for most layers)",
    )
    ap.add_argument(
        "--no-freezing",
        action="store_true",
        help="torch.compile without Inductor freezing (default: freezing on, weights as constants)",
    )
    ap.add_argument("--analysis-runs", type=int, default=None, help="runs for the per-category timing (default 5)")
    ap.add_argument("--quick", action="store_true", help="resnet34 only, batches 1 and 8, at most 5 rounds")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    ap.add_argument(
        "--from-json",
        metavar="PATH",
        help="only re-render the markdown of an existing latency JSON (written next to it)",
    )
    args = ap.parse_args(argv)
    if args.from_json:
        src = Path(args.from_json)
        atomic_write_text(src.with_suffix(".md"), markdown(json.loads(src.read_text())))
        print(f"wrote {src.with_suffix('.md')}")
        return 0

    names = (
        _csv(args.models, str) if args.models is not None else (["resnet34"] if args.quick else list(DEFAULT_MODELS))
    )
    srs = _csv(args.srs, float) if args.srs is not None else list(DEFAULT_SRS)
    args.batches = (
        _csv(args.batches, int) if args.batches is not None else list(QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    )
    args.modes = _csv(args.modes, str)
    if args.no_compile:
        args.modes = [m for m in args.modes if m != "compile"]
    bad = [m for m in args.modes if m not in ALL_MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(ALL_MODES)}")
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    if args.case_seconds is None:
        args.case_seconds = 10.0 if args.quick else 30.0
    if args.analysis_runs is None:
        args.analysis_runs = 3 if args.quick else 5
    args.min_repeats = max(1, min(args.min_repeats, args.repeats))
    if not names and not args.runs and not args.quality:
        ap.error("nothing to measure: give --models, --runs and/or --quality")

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    out = Path(args.out)
    stem = "latency_quick" if args.quick and args.out == ap.get_default("out") else "latency"
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python " + shlex.join(sys.argv if argv is None else ["benchmarks/latency.py", *argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(args.threads),
        "config": {
            "models": names,
            "srs": srs,
            "batches": args.batches,
            "modes": args.modes,
            "runs": args.runs,
            "quality": args.quality,
            "quality_methods": args.quality_methods,
            "repeats": args.repeats,
            "min_repeats": args.min_repeats,
            "case_seconds": args.case_seconds,
            "warmup": args.warmup,
            "threads": args.threads,
            "round_ranks": args.round_ranks,
            "decay": args.decay,
            "input_size": SIZE,
            "compile": "torch.compile(fold_batchnorm(model), dynamic=False), Inductor, freezing "
            + ("off" if args.no_freezing else "on"),
            "onnx": "export_onnx(fold_bn=True, opset=17); ORT CPU, intra_op=threads, inter_op=1, sequential, "
            "ORT_ENABLE_ALL",
        },
        "complete": False,
        "results": [],
    }
    print(f"machine: {report['machine']}", flush=True)
    groups: list[Group] = []

    def write() -> None:
        report["load_average_1m_at_end"] = load_average()
        report["elapsed_s"] = time.perf_counter() - t_start
        _write(report, out, stem, groups)

    with tempfile.TemporaryDirectory(prefix="ltc-latency-") as tmpdir:
        todo: list[Callable[[], list[Group]]] = [
            (lambda n=n: [zoo_group(n, srs, args.round_ranks, args.decay)]) for n in names
        ]
        if args.runs:
            todo.append(lambda: run_groups(args.runs))
        if args.quality:
            todo.append(lambda: quality_groups(args.quality, _csv(args.quality_methods, str), args.round_ranks))
        for build in todo:
            for g in build():
                print(f"[{g.name}] analysing (batch 1, eager)", flush=True)
                g.base_analysis = analyse(g.base, g.input_shape, args.analysis_runs)
                if not g.base_analysis["batchnorms"]:
                    g.notes.append("No BatchNorm layers: the 'eager, BN folded' mode equals eager here.")
                for v in g.variants:
                    v.analysis = analyse(v.model, g.input_shape, args.analysis_runs)
                    a = v.analysis
                    cat = a["categories"]
                    print(
                        f"  {v.label}: MACs {ltc.format_count(a['macs'])} (1x1 factors "
                        f"{100 * cat['1x1 factors']['mac_share']:.0f} %, kxk cores "
                        f"{100 * cat['kxk cores']['mac_share']:.0f} %, dense convs "
                        f"{100 * cat['dense convs']['mac_share']:.0f} %, linear {100 * cat['linear']['mac_share']:.0f} "
                        f"%); time b1: 1x1 {100 * (cat['1x1 factors']['time_share_b1_eager'] or 0):.0f} %, cores "
                        f"{100 * (cat['kxk cores']['time_share_b1_eager'] or 0):.0f} %, other "
                        f"{100 * (a['other_time_share_b1_eager'] or 0):.0f} %; convs {a['convs']} (base "
                        f"{g.base_analysis['convs']}); ranks not x8 {a['ranks_not_multiple_of_8']}/{a['rank_values']},"
                        f" min {a['min_rank']}, smallest {a['smallest_ranks'][:6]}",
                        flush=True,
                    )
                groups.append(g)
                write()
                measure_group(g, args, report, write, Path(tmpdir))
                # free the big models of finished groups (keep the analysis)
                g.base = nn.Identity()
                for v in g.variants:
                    v.model = nn.Identity()
                gc.collect()
    report["complete"] = True
    write()
    print()
    print(markdown(report))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
