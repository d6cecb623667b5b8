"""Measured per-layer latencies: the cost model of the C step for ``cost='latency'``.

>>> table = LatencyTable.build(model, torch.randn(1, 3, 224, 224), threads=2)      # times ops, cached on disk
>>> comp = ltc.LTC(model, x, target_sr=2.0, cost="latency", latency_table=table)   # target: predicted speed-up

For every compressible layer (ungrouped ``nn.Conv2d``, ``nn.Linear``) the table holds the measured latency (ms, at
batch ``batch``) of the dense layer and of the parts of its factorised forms, each part a real module timed alone on
a random input of its shape:

- Tucker-2 ``(r_in, r_out)``: ``first`` 1x1 conv S→r_in at the layer's input resolution, ``core`` kh x kw conv
  r_in→r_out (the layer's stride, padding, dilation), ``last`` 1x1 conv r_out→T at its output resolution (the
  layer's bias);
- matrix ``r`` (1x1 convs, and kh x kw convs with ``conv_scheme='matrix'``): kh x kw conv S→r (the layer's stride),
  then 1x1 conv r→T;
- linear SVD ``r``: ``nn.Linear`` in→r, then r→out.

Ranks measured on each axis: ``small_ranks``, the multiples of ``rank_multiple`` and the full rank. The 1x1 parts
are measured at every such rank and interpolated linearly in between; the core is measured on a subset of that grid
(at most ``core_points`` values per axis, roughly geometric, ends included) and interpolated bilinearly. Below the
smallest measured rank the value is held constant. The latency of a factorised layer is the sum of its parts'.

``model_ms`` is the whole model's measured latency (eval mode, BatchNorm folded); the engine takes what is not
compressed to cost ``max(model_ms − Σ dense layer ms, 0)`` (and the base to cost that plus the layers' sum). One
whole-network timing calibrates it: :func:`savings_scale`. Layers are looked up by their geometry (sizes, kernel,
resolution; :class:`ltc.cost.LayerGeometry`), not by name, so one table serves every model with those shapes.

Every timed op is cached on disk (``cache_dir``, else ``$LTC_LATENCY_CACHE``, else ``~/.cache/ltc/latency``), keyed
by the device (CPU model / CUDA device name), runtime (and its version), threads, batch and the op's exact shape;
a second build of the same model measures nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .batchnorm import fold_batchnorm
from .cost import LayerGeometry, record_geometry
from .latency import _num_threads, check_memory_format, onnx_session, to_memory_format
from .surgery import unwrap
from .utils import atomic_write_text, cpu_name, resolve_device

__all__ = ["LatencyTable", "LayerLatency", "Curve", "Surface", "OpSpec", "measured_ranks", "core_ranks",
           "default_cache_dir", "RUNTIMES", "PARTS", "savings_scale", "calibrated_speedup", "table_target"]

log = logging.getLogger("ltc")

RUNTIMES = ("eager", "onnxruntime")
CONV_SCHEMES = ("tucker2", "matrix", "both")
PARTS = ("tucker2.first", "tucker2.core", "tucker2.last", "matrix.first", "matrix.last", "svd.first", "svd.last")
"""The timed parts of the factorised forms (``dense`` is the layer itself)."""
TABLE_FORMAT, TABLE_VERSION = "ltc-latency-table", 1
CACHE_FORMAT, CACHE_VERSION = "ltc-latency-cache", 1
_FLUSH_SECONDS = 30.0  # write the cache at least this often while measuring (an interrupted build keeps its work)

Rank = int | tuple[int, int] | None
LatencyFn = Callable[[LayerGeometry, str, Rank], float]


# --------------------------------------------------------------------------------------------- calibration
# The table predicts a network's time as  base − (what the chosen options save), summing per-layer timings taken in
# isolation. On the clock the savings come out larger or smaller by a factor (cache effects, the per-op overhead the
# isolated timings leave out): measured time ≈ base − b · saved. With saved / base = 1 − 1/p for a predicted
# speed-up p, one measured speed-up s of a deployed network fits b, and the prediction of any other configuration
# and the table target that gives a wanted measured speed-up follow.
_MIN_SCALE = 0.05  # a network measured slower than its base fits b <= 0: it is kept at this floor instead
_MAX_SCALE = 20.0


def savings_scale(predicted: float, measured: float) -> float:
    """``b`` in ``measured time = base − b · (table's saving)`` from one deployed network: ``(1 − 1/measured) /
    (1 − 1/predicted)``, kept in [0.05, 20] (a predicted saving near 0 makes the ratio noise); 1.0 when the table
    predicts no saving (``predicted <= 1``)."""
    if predicted <= 1.0 + 1e-9:
        return 1.0
    return min(max((1.0 - 1.0 / measured) / (1.0 - 1.0 / predicted), _MIN_SCALE), _MAX_SCALE)


def calibrated_speedup(predicted: float, scale: float) -> float:
    """The measured speed-up of a configuration the table predicts at ``predicted`` under savings scale ``scale``
    (``math.inf`` when the scaled saving is the whole base time)."""
    left = 1.0 - scale * (1.0 - 1.0 / predicted)
    return math.inf if left <= 0 else 1.0 / left


def table_target(target: float, scale: float) -> float:
    """The table speed-up to ask the C step for so that the measured one is ``target`` (inverse of
    :func:`calibrated_speedup`; ``math.inf`` when no table speed-up gives it)."""
    saved = (1.0 - 1.0 / target) / scale
    return math.inf if saved >= 1.0 else 1.0 / (1.0 - saved)


# --------------------------------------------------------------------------------------------- rank grids
def measured_ranks(full: int, rank_multiple: int = 8, small_ranks: Iterable[int] = (1, 2, 4)) -> tuple[int, ...]:
    """The ranks measured on an axis of size ``full``: ``small_ranks`` (those ≤ full), the multiples of
    ``rank_multiple`` up to ``full``, and ``full``; ascending."""
    full, m = int(full), int(rank_multiple)
    values = {int(r) for r in small_ranks if 1 <= int(r) <= full} | set(range(m, full + 1, m)) | {full}
    return tuple(sorted(values))


def core_ranks(values: tuple[int, ...], points: int) -> tuple[int, ...]:
    """At most ``points`` of the ascending ``values``, roughly geometric from the first to the last (both kept)."""
    if len(values) <= points:
        return tuple(values)
    v = np.asarray(values, dtype=np.float64)
    targets = np.geomspace(v[0], v[-1], points)
    picked = {int(np.argmin(np.abs(np.log(v) - math.log(t)))) for t in targets} | {0, len(values) - 1}
    return tuple(values[i] for i in sorted(picked))


# --------------------------------------------------------------------------------------------- interpolation
def _locate(xp: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell index ``i`` and weight ``t`` in [0, 1] with ``x ≈ (1 − t)·xp[i] + t·xp[i+1]`` (clamped at the ends;
    ``t = 0`` exactly at a grid point except the last, where ``i = n − 2``, ``t = 1``)."""
    n = len(xp)
    if n == 1:
        return np.zeros(x.shape, dtype=np.int64), np.zeros(x.shape, dtype=np.float64)
    i = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, n - 2)
    t = np.clip((x - xp[i]) / (xp[i + 1] - xp[i]), 0.0, 1.0)
    return i, t


def _lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(1 − w)·a + w·b``, with ``a`` / ``b`` exactly where ``w`` is 0 / 1 (grid values come back as given)."""
    return np.where(w == 0, a, np.where(w == 1, b, (1 - w) * a + w * b))


@dataclass(frozen=True)
class Curve:
    """A part's latency (ms) measured at ascending ``ranks``; linear interpolation in between."""

    ranks: tuple[int, ...]
    ms: tuple[float, ...]

    def __call__(self, r: np.ndarray) -> np.ndarray:
        xp = np.asarray(self.ranks, dtype=np.float64)
        i, t = _locate(xp, np.asarray(r, dtype=np.float64))
        fp = np.asarray(self.ms, dtype=np.float64)
        return _lerp(fp[i], fp[np.minimum(i + 1, len(fp) - 1)], t)


@dataclass(frozen=True)
class Surface:
    """The core's latency (ms) measured on the grid ``r_in x r_out`` (``ms[i][j]`` at ``(r_in[i], r_out[j])``);
    bilinear interpolation in between."""

    r_in: tuple[int, ...]
    r_out: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]

    def __call__(self, r_in: np.ndarray, r_out: np.ndarray) -> np.ndarray:
        """Broadcasts ``r_in`` against ``r_out``."""
        r_in, r_out = np.broadcast_arrays(np.asarray(r_in, dtype=np.float64), np.asarray(r_out, dtype=np.float64))
        m = np.asarray(self.ms, dtype=np.float64)
        i, s = _locate(np.asarray(self.r_in, dtype=np.float64), r_in)
        j, t = _locate(np.asarray(self.r_out, dtype=np.float64), r_out)
        i1, j1 = np.minimum(i + 1, m.shape[0] - 1), np.minimum(j + 1, m.shape[1] - 1)
        return _lerp(_lerp(m[i, j], m[i, j1], t), _lerp(m[i1, j], m[i1, j1], t), s)


# --------------------------------------------------------------------------------------------- ops
def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


@dataclass(frozen=True)
class OpSpec:
    """One timed op: an ``nn.Conv2d`` or ``nn.Linear`` and its input shape without the batch (``(C, H, W)`` for a
    conv, ``(..., in_features)`` for a linear). ``key`` is its exact shape as a string (the cache key's op part)."""

    kind: str
    in_channels: int
    out_channels: int
    bias: bool
    in_shape: tuple[int, ...]
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"

    @property
    def key(self) -> str:
        shape = "x".join(str(d) for d in self.in_shape)
        if self.kind == "linear":
            return f"linear:{self.in_channels}->{self.out_channels}:b{int(self.bias)}:in{shape}"
        pad = self.padding if isinstance(self.padding, str) else "x".join(map(str, self.padding))
        return (f"conv:{self.in_channels}->{self.out_channels}:k{'x'.join(map(str, self.kernel_size))}"
                f":s{'x'.join(map(str, self.stride))}:p{pad}:d{'x'.join(map(str, self.dilation))}"
                f":{self.padding_mode}:b{int(self.bias)}:in{shape}")

    def module(self) -> nn.Module:
        if self.kind == "linear":
            return nn.Linear(self.in_channels, self.out_channels, bias=self.bias)
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, bias=self.bias, padding_mode=self.padding_mode)

    def inputs(self, batch: int) -> tuple[Tensor, ...]:
        return (torch.randn(batch, *self.in_shape),)


@dataclass(frozen=True)
class _ConvParams:
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, conv: nn.Conv2d) -> _ConvParams:
        pad = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        return cls(_pair(conv.stride), pad, _pair(conv.dilation), str(conv.padding_mode))


def _part_spec(g: LayerGeometry, cp: _ConvParams | None, part: str, rank: Rank) -> OpSpec:
    """The op that ``part`` of layer ``g`` at ``rank`` runs (``part='dense'``: the layer itself)."""
    s, t = g.in_channels, g.out_channels
    if g.kind == "linear":
        if part == "dense":
            return OpSpec("linear", s, t, g.bias, g.in_shape)
        r = int(rank)  # type: ignore[arg-type]
        if part == "svd.first":
            return OpSpec("linear", s, r, False, g.in_shape)
        if part == "svd.last":
            return OpSpec("linear", r, t, g.bias, (*g.in_shape[:-1], r))
        raise ValueError(f"part {part!r} does not apply to a linear layer")
    cp = cp or _ConvParams()
    k = g.kernel_size
    full = dict(kernel_size=k, stride=cp.stride, padding=cp.padding, dilation=cp.dilation, padding_mode=cp.padding_mode)
    (hi, wi), (ho, wo) = g.in_hw, g.out_hw
    if part == "dense":
        return OpSpec("conv", s, t, g.bias, (s, hi, wi), **full)  # type: ignore[arg-type]
    if part == "tucker2.core":
        r_in, r_out = rank  # type: ignore[misc]
        return OpSpec("conv", int(r_in), int(r_out), False, (int(r_in), hi, wi), **full)  # type: ignore[arg-type]
    r = int(rank)  # type: ignore[arg-type]
    if part == "tucker2.first":
        return OpSpec("conv", s, r, False, (s, hi, wi))
    if part == "matrix.first":
        return OpSpec("conv", s, r, False, (s, hi, wi), **full)  # type: ignore[arg-type]
    if part in ("tucker2.last", "matrix.last"):
        return OpSpec("conv", r, t, g.bias, (r, ho, wo))
    raise ValueError(f"part {part!r} does not apply to a conv layer")


# --------------------------------------------------------------------------------------------- layer entries
def _geometry_key(g: LayerGeometry) -> tuple[Any, ...]:
    """What identifies a layer's shape (everything in the geometry but the name)."""
    return (g.kind, g.in_channels, g.out_channels, tuple(g.kernel_size), g.groups, bool(g.bias), tuple(g.in_hw),
            tuple(g.out_hw), g.positions, tuple(g.in_shape), tuple(g.out_shape))


def _describe(g: LayerGeometry) -> str:
    if g.kind == "linear":
        return f"linear {g.in_channels}->{g.out_channels} on input {'x'.join(map(str, g.in_shape))}"
    kh, kw = g.kernel_size
    return (f"conv {kh}x{kw} {g.in_channels}->{g.out_channels} at {g.in_hw[0]}x{g.in_hw[1]} -> "
            f"{g.out_hw[0]}x{g.out_hw[1]}" + (" with bias" if g.bias else ""))


def _geometry_from_dict(d: dict[str, Any]) -> LayerGeometry:
    tup = {"kernel_size", "in_hw", "out_hw", "in_shape", "out_shape"}
    return LayerGeometry(**{k: (tuple(v) if k in tup else v) for k, v in d.items()})


@dataclass
class LayerLatency:
    """The measured latencies of one layer shape: ``dense`` (ms), the 1-D parts in ``curves`` (keys in
    :data:`PARTS`), the Tucker-2 core on a 2-D grid (``core``, ``None`` where no Tucker-2 form was measured).
    ``names``: the layers of the measured model(s) with this shape (informative only)."""

    geometry: LayerGeometry
    dense: float
    curves: dict[str, Curve] = field(default_factory=dict)
    core: Surface | None = None
    names: list[str] = field(default_factory=list)

    @property
    def schemes(self) -> tuple[str, ...]:
        """The factorised forms this entry can price."""
        out = []
        if self.core is not None and {"tucker2.first", "tucker2.last"} <= set(self.curves):
            out.append("tucker2")
        for s in ("matrix", "svd"):
            if {f"{s}.first", f"{s}.last"} <= set(self.curves):
                out.append(s)
        return tuple(out)

    def ms(self, scheme: str, axes: tuple[tuple[int, ...], ...] | tuple[np.ndarray, ...]) -> np.ndarray:
        """Latency (ms, float64) of ``scheme`` at every rank of the grid ``axes``, shape ``grid_shape``."""
        if scheme not in self.schemes:
            have = ", ".join(self.schemes) or "none"
            hint = (" (build the table with conv_scheme='matrix' or 'both' for LRC)" if scheme == "matrix"
                    else " (build the table with conv_scheme='tucker2' or 'both')" if scheme == "tucker2" else "")
            raise ValueError(f"the latency table has no {scheme!r} measurements for layer '{self.geometry.name}' "
                             f"({_describe(self.geometry)}); it has: {have}{hint}")
        full = _full_ranks(self.geometry, scheme)
        arrays = [np.asarray(a, dtype=np.float64).reshape(-1) for a in axes]
        if len(arrays) != len(full):
            raise ValueError(f"scheme {scheme!r} has {len(full)} rank axes, got {len(arrays)}")
        for a, f in zip(arrays, full, strict=True):
            if a.size and (a.min() < 1 or a.max() > f):
                raise ValueError(f"ranks {a.tolist()} out of range 1..{f} for layer '{self.geometry.name}' "
                                 f"({_describe(self.geometry)}), scheme {scheme!r}")
        if scheme == "tucker2":
            ri, ro = arrays
            assert self.core is not None
            first = self.curves["tucker2.first"](ri)[:, None]
            last = self.curves["tucker2.last"](ro)[None, :]
            return first + self.core(ri[:, None], ro[None, :]) + last
        (r,) = arrays
        return self.curves[f"{scheme}.first"](r) + self.curves[f"{scheme}.last"](r)

    def to_dict(self) -> dict[str, Any]:
        return {
            "geometry": asdict(self.geometry),
            "names": list(self.names),
            "dense": self.dense,
            "curves": {k: {"ranks": list(c.ranks), "ms": list(c.ms)} for k, c in self.curves.items()},
            "core": None if self.core is None else {"r_in": list(self.core.r_in), "r_out": list(self.core.r_out),
                                                    "ms": [list(row) for row in self.core.ms]},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerLatency:
        core = d.get("core")
        return cls(
            geometry=_geometry_from_dict(d["geometry"]),
            dense=float(d["dense"]),
            curves={k: Curve(tuple(int(r) for r in c["ranks"]), tuple(float(v) for v in c["ms"]))
                    for k, c in d.get("curves", {}).items()},
            core=None if core is None else Surface(tuple(int(r) for r in core["r_in"]),
                                                   tuple(int(r) for r in core["r_out"]),
                                                   tuple(tuple(float(v) for v in row) for row in core["ms"])),
            names=list(d.get("names", [])),
        )


def _full_ranks(g: LayerGeometry, scheme: str) -> tuple[int, ...]:
    if scheme == "tucker2":
        return g.in_channels, g.out_channels
    kh, kw = g.kernel_size
    width = g.in_channels * (kh * kw if scheme == "matrix" else 1)
    return (min(g.out_channels, width),)


def _schemes_of(g: LayerGeometry, conv_scheme: str) -> tuple[str, ...]:
    """The factorised forms to measure for layer ``g`` (those the engine may choose)."""
    if g.kind == "linear":
        return ("svd",)
    if tuple(g.kernel_size) == (1, 1):
        return ("matrix",)
    return {"tucker2": ("tucker2",), "matrix": ("matrix",), "both": ("tucker2", "matrix")}[conv_scheme]


@dataclass(frozen=True)
class _Grid:
    rank_multiple: int = 8
    small_ranks: tuple[int, ...] = (1, 2, 4)
    core_points: int = 12
    conv_scheme: str = "tucker2"

    def axis(self, full: int) -> tuple[int, ...]:
        return measured_ranks(full, self.rank_multiple, self.small_ranks)


def _assemble(layers: list[tuple[LayerGeometry, _ConvParams | None]], ms: LatencyFn, grid: _Grid) -> list[LayerLatency]:
    """One entry per distinct layer shape, each value from ``ms(geometry, part, rank)``."""
    entries: dict[tuple[Any, ...], LayerLatency] = {}
    for g, _ in layers:
        key = _geometry_key(g)
        if key in entries:
            entries[key].names.append(g.name)
            continue
        e = LayerLatency(g, float(ms(g, "dense", None)), names=[g.name])
        for scheme in _schemes_of(g, grid.conv_scheme):
            full = _full_ranks(g, scheme)
            if scheme == "tucker2":
                ax_in, ax_out = grid.axis(full[0]), grid.axis(full[1])
                e.curves["tucker2.first"] = Curve(ax_in, tuple(float(ms(g, "tucker2.first", r)) for r in ax_in))
                e.curves["tucker2.last"] = Curve(ax_out, tuple(float(ms(g, "tucker2.last", r)) for r in ax_out))
                c_in, c_out = core_ranks(ax_in, grid.core_points), core_ranks(ax_out, grid.core_points)
                e.core = Surface(c_in, c_out, tuple(tuple(float(ms(g, "tucker2.core", (a, b))) for b in c_out)
                                                    for a in c_in))
            else:
                ax = grid.axis(full[0])
                for part in (f"{scheme}.first", f"{scheme}.last"):
                    e.curves[part] = Curve(ax, tuple(float(ms(g, part, r)) for r in ax))
        entries[key] = e
    return list(entries.values())


# --------------------------------------------------------------------------------------------- timing
def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return f"cpu:{cpu_name()}"


def _runtime_tag(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return f"onnxruntime-{onnxruntime.__version__}-nospin"  # ops timed with spinning off (see onnx_session)
    return f"eager-torch-{torch.__version__}"


@dataclass(frozen=True)
class _Timing:
    runtime: str
    threads: int
    device: torch.device
    repeats: int
    warmup: int
    memory_format: str = "contiguous"


def _median_ms(run: Callable[[], Any], timing: _Timing, sync: bool) -> float:
    for _ in range(timing.warmup):
        run()
    times = []
    for _ in range(timing.repeats):
        if sync:
            torch.cuda.synchronize(timing.device)
        t0 = time.perf_counter()
        run()
        if sync:
            torch.cuda.synchronize(timing.device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def _time_module(module: nn.Module, inputs: tuple[Tensor, ...], timing: _Timing) -> float:
    """Median wall-clock ms of ``module(*inputs)`` (eval mode, ``torch.inference_mode``; ONNX Runtime: the exported
    module in an InferenceSession). The one place where anything is timed (tests replace it)."""
    module = module.eval()
    if timing.runtime == "onnxruntime":
        sess = onnx_session(module, inputs, timing.threads)
        feed = {f"x{i}": t.numpy() for i, t in enumerate(inputs)}
        return _median_ms(lambda: sess.run(None, feed), timing, sync=False)
    module = module.to(timing.device)
    inputs = tuple(t.to(timing.device) for t in inputs)
    if timing.memory_format == "channels_last":  # inside an NHWC network every op sees NHWC activations
        module = to_memory_format(module, "channels_last")
        inputs = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs)
    with torch.inference_mode():
        return _median_ms(lambda: module(*inputs), timing, sync=timing.device.type == "cuda")


# --------------------------------------------------------------------------------------------- disk cache
def default_cache_dir() -> Path:
    """``$LTC_LATENCY_CACHE`` if set, else ``~/.cache/ltc/latency``."""
    env = os.environ.get("LTC_LATENCY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ltc" / "latency"


class _OpCache:
    """The ops timed in one environment (device, runtime, threads, batch): one JSON file of ``{op key: ms}``."""

    def __init__(self, directory: Path, env: dict[str, Any]) -> None:
        self.env = env
        tag = json.dumps(env, sort_keys=True)
        slug = "".join(c if c.isalnum() else "-" for c in env["device"].split(":", 1)[0])
        self.path = Path(directory) / (f"{slug}-{env['runtime'].split('-', 1)[0]}-t{env['threads']}-b{env['batch']}"
                                       f"{'-nhwc' if env.get('memory_format') == 'channels_last' else ''}"
                                       f"-{hashlib.sha256(tag.encode()).hexdigest()[:12]}.json")
        self.entries: dict[str, float] = self._read()
        self.dirty = False

    def key(self, op_key: str) -> str:
        """The full cache key of an op (environment + shape)."""
        e = self.env
        layout = e.get("memory_format", "contiguous")
        return f"{e['device']}|{e['runtime']}|threads={e['threads']}|batch={e['batch']}|{layout}|{op_key}"

    def _read(self) -> dict[str, float]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
                raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
            entries = {str(k): float(v) for k, v in data["entries"].items()}
            if not all(math.isfinite(v) and v >= 0 for v in entries.values()):
                raise ValueError("non-finite or negative latencies")
            return entries
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.warn(f"ignoring the corrupt latency cache {self.path} ({type(exc).__name__}: {exc}); "
                          "its ops are measured again and the file is rewritten", stacklevel=4)
            return {}

    def get(self, op_key: str) -> float | None:
        return self.entries.get(self.key(op_key))

    def put(self, op_key: str, ms: float) -> None:
        self.entries[self.key(op_key)] = float(ms)
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        merged = {}
        if self.path.exists():  # keep what a concurrent build added meanwhile (silently, if it is unreadable)
            with contextlib.suppress(Exception), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                merged = self._read()
        merged.update(self.entries)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "env": self.env, "entries": merged},
                          indent=0, sort_keys=True)
        atomic_write_text(self.path, text)
        self.dirty = False


def _model_key(model: nn.Module, inputs: tuple[Tensor, ...]) -> str:
    """The whole model's cache key: a hash of its module tree and parameter shapes, and the input shapes."""
    desc = repr(model) + repr([tuple(p.shape) for p in model.parameters()])
    shapes = ",".join("x".join(str(d) for d in t.shape[1:]) for t in inputs)
    return f"model:{hashlib.sha256(desc.encode()).hexdigest()[:20]}:in{shapes}"


# --------------------------------------------------------------------------------------------- the table
def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return int(value)


class LatencyTable:
    """Measured latencies of a model's layers and of their factorised parts (see the module docstring).

    Build it with :meth:`build` (times ops, cached on disk), or from given latencies with :meth:`from_entries` /
    :meth:`from_latency_function` (nothing timed). The engine queries :meth:`check_layers`, :meth:`dense_ms`,
    :meth:`layer_ms`, :meth:`grid_ms` and :attr:`model_ms`.

    Attributes:
        model_ms: the whole model's latency (ms) at ``batch``.
        batch: the batch size every latency was measured at.
        info: how it was built: device, runtime, threads, grid settings, ``build_seconds``, ``measured`` (ops timed)
            and ``cached`` (ops taken from the disk cache).
    """

    def __init__(self, entries: Iterable[LayerLatency], model_ms: float, *, batch: int = 1,
                 info: dict[str, Any] | None = None) -> None:
        self.model_ms = float(model_ms)
        if not math.isfinite(self.model_ms) or self.model_ms <= 0:
            raise ValueError(f"model_ms must be a finite number > 0, got {model_ms!r}")
        self.batch = _check_int("batch", batch, 1)
        self.info: dict[str, Any] = dict(info or {})
        self.entries: list[LayerLatency] = []
        self._by_key: dict[tuple[Any, ...], LayerLatency] = {}
        self._by_name: dict[str, LayerLatency] = {}
        for e in entries:
            key = _geometry_key(e.geometry)
            if key in self._by_key:
                raise ValueError(f"two entries for the same layer shape ({_describe(e.geometry)})")
            self.entries.append(e)
            self._by_key[key] = e
            for n in e.names or [e.geometry.name]:
                self._by_name.setdefault(n, e)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_entries(cls, entries: Iterable[LayerLatency], model_ms: float, *, batch: int = 1,
                     info: dict[str, Any] | None = None) -> LatencyTable:
        """A table from given per-layer entries (nothing is timed)."""
        return cls(entries, model_ms, batch=batch, info=info)

    @classmethod
    def from_latency_function(
        cls,
        geometries: dict[str, LayerGeometry] | Iterable[LayerGeometry],
        ms: LatencyFn,
        model_ms: float,
        *,
        batch: int = 1,
        rank_multiple: int = 8,
        small_ranks: Iterable[int] = (1, 2, 4),
        core_points: int = 12,
        conv_scheme: str = "tucker2",
    ) -> LatencyTable:
        """A table on the same rank grid as :meth:`build`, each latency given by ``ms(geometry, part, rank)``
        (``part``: ``'dense'`` (rank ``None``) or one of :data:`PARTS`; ``rank`` an int, or ``(r_in, r_out)`` for
        ``'tucker2.core'``) instead of a measurement. Deterministic: for tests and for latencies from elsewhere."""
        geoms = list(geometries.values()) if isinstance(geometries, dict) else list(geometries)
        grid = cls._grid(rank_multiple, small_ranks, core_points, conv_scheme)
        entries = _assemble([(g, None) for g in geoms], ms, grid)
        info = {"source": "given", **asdict(grid)}
        return cls(entries, model_ms, batch=batch, info=info)

    @staticmethod
    def _grid(rank_multiple: int, small_ranks: Iterable[int], core_points: int, conv_scheme: str) -> _Grid:
        small = tuple(sorted({_check_int("small_ranks entry", r, 1) for r in small_ranks}))
        if conv_scheme not in CONV_SCHEMES:
            raise ValueError(f"conv_scheme must be one of {', '.join(map(repr, CONV_SCHEMES))}, got {conv_scheme!r}")
        return _Grid(_check_int("rank_multiple", rank_multiple, 1), small, _check_int("core_points", core_points, 2),
                     conv_scheme)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_input: Tensor | tuple[Tensor, ...],
        *,
        runtime: str = "eager",
        threads: int | None = None,
        batch: int = 1,
        rank_multiple: int = 8,
        small_ranks: Iterable[int] = (1, 2, 4),
        core_points: int = 12,
        conv_scheme: str = "tucker2",
        layers: Iterable[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        repeats: int = 15,
        warmup: int = 3,
        progress: bool = True,
        device: str | torch.device | None = None,
        memory_format: str = "contiguous",
    ) -> LatencyTable:
        """Measure the table for ``model`` (layer sizes from one forward pass of ``example_input``).

        Args:
            runtime: ``'eager'`` (PyTorch, ``torch.inference_mode``) or ``'onnxruntime'`` (each op exported to ONNX
                in memory and run in an ``InferenceSession`` with ``intra_op_num_threads=threads``; CPU only).
            threads: intra-op threads during the measurement (``torch.set_num_threads``, restored afterwards);
                ``None``: the current ``torch.get_num_threads()``.
            batch: batch size of every timed input (``example_input``'s own batch size is not used).
            rank_multiple, small_ranks: the ranks measured on each axis (see :func:`measured_ranks`).
            core_points: at most this many ranks per axis of the Tucker-2 core's 2-D grid (bilinear in between).
            conv_scheme: the kh x kw convs' factorised form to measure: ``'tucker2'`` (LTC), ``'matrix'`` (LRC) or
                ``'both'``. 1x1 convs always get the matrix form, linears SVD.
            layers: names of the layers to measure (default: every ungrouped ``nn.Conv2d`` and every ``nn.Linear``
                that the forward pass reaches).
            cache_dir: the disk cache (default ``$LTC_LATENCY_CACHE`` or ``~/.cache/ltc/latency``).
            repeats, warmup: each op's latency is the median of ``repeats`` timed runs after ``warmup`` runs.
            progress: a tqdm bar while measuring.
            device: ``'cpu'`` (default) or ``'cuda[:N]'`` (runs synchronized; eager only).
            memory_format: ``'contiguous'`` (NCHW) or ``'channels_last'`` (NHWC weights and activations; eager only):
                the layout the deployed network will run in (:func:`ltc.latency.to_memory_format`). Part of the
                cache key.
        """
        t_start = time.perf_counter()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(map(repr, RUNTIMES))}, got {runtime!r}")
        grid = cls._grid(rank_multiple, small_ranks, core_points, conv_scheme)
        check_memory_format(memory_format, runtime)
        batch = _check_int("batch", batch, 1)
        repeats, warmup = _check_int("repeats", repeats, 1), _check_int("warmup", warmup, 0)
        if threads is not None:
            _check_int("threads", threads, 1)
        dev = resolve_device("cpu" if device is None else device)
        if runtime == "onnxruntime" and dev.type != "cpu":
            raise ValueError("runtime='onnxruntime' times on the CPU only; use device='cpu' or runtime='eager'")
        model = unwrap(model)
        geoms = record_geometry(model, example_input)
        chosen = cls._layers(model, geoms, layers)
        used_threads = int(threads) if threads is not None else torch.get_num_threads()
        env = {"device": _device_name(dev), "runtime": _runtime_tag(runtime), "threads": used_threads,
               "batch": batch, "dtype": "float32", "memory_format": memory_format}
        cache = _OpCache(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(), env)
        timing = _Timing(runtime, used_threads, dev, repeats, warmup, memory_format)

        # plan: every op of every part at every grid rank (collected by a dry run of the assembly)
        specs: dict[str, OpSpec] = {}

        def collect(g: LayerGeometry, part: str, rank: Rank) -> float:
            spec = _part_spec(g, chosen[g.name], part, rank)
            specs.setdefault(spec.key, spec)
            return 0.0

        layer_list = [(geoms[n], chosen[n]) for n in chosen]
        _assemble(layer_list, collect, grid)
        folded = fold_batchnorm(model)
        inputs = _batched(example_input, batch)
        model_key = _model_key(folded, inputs)
        todo = [k for k in specs if cache.get(k) is None]
        need_model = cache.get(model_key) is None
        measured = len(todo) + int(need_model)
        cached = len(specs) + 1 - measured
        if measured:
            from tqdm.auto import tqdm

            bar = tqdm(total=measured, desc="latency table", unit="op", disable=not progress, leave=False)
            last_flush = time.perf_counter()
            try:
                with _num_threads(used_threads):
                    if need_model:
                        cache.put(model_key, _time_module(folded, inputs, timing))
                        bar.update(1)
                    for k in todo:
                        spec = specs[k]
                        cache.put(k, _time_module(spec.module(), spec.inputs(batch), timing))
                        bar.update(1)
                        if time.perf_counter() - last_flush > _FLUSH_SECONDS:
                            cache.flush()
                            last_flush = time.perf_counter()
            finally:
                bar.close()
                cache.flush()

        def lookup(g: LayerGeometry, part: str, rank: Rank) -> float:
            v = cache.get(_part_spec(g, chosen[g.name], part, rank).key)
            assert v is not None
            return v

        entries = _assemble(layer_list, lookup, grid)
        model_ms = cache.get(model_key)
        assert model_ms is not None
        seconds = time.perf_counter() - t_start
        info = {"source": "measured", **env, "repeats": repeats, "warmup": warmup, **asdict(grid),
                "build_seconds": seconds, "measured": measured, "cached": cached, "ops": len(specs) + 1,
                "cache_file": str(cache.path)}
        table = cls(entries, model_ms, batch=batch, info=info)
        dense_sum = sum(e.dense * len(e.names) for e in entries)
        if dense_sum > model_ms:
            log.warning("ltc: the measured layers alone take %.3f ms, the whole model %.3f ms: the part of the model "
                        "that is not compressed is costed at 0 and the base at the layers' sum (timing noise, or a "
                        "fused runtime); ltc.api.meet_speedup calibrates on the whole network",
                        dense_sum, model_ms)
        log.info("ltc: %s", table.summary())
        return table

    @staticmethod
    def _layers(model: nn.Module, geoms: dict[str, LayerGeometry],
                layers: Iterable[str] | None) -> dict[str, _ConvParams | None]:
        modules = dict(model.named_modules())
        if layers is None:
            names = [n for n, m in modules.items() if n in geoms and (
                isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))]
            if not names:
                raise ValueError("the model has no ungrouped nn.Conv2d or nn.Linear layer that the forward pass "
                                 "of example_input reaches")
        else:
            names = [layers] if isinstance(layers, str) else list(layers)
            for n in names:
                m = modules.get(n)
                if not isinstance(m, nn.Conv2d | nn.Linear):
                    raise ValueError(f"layer '{n}' is not an nn.Conv2d or nn.Linear of the model")
                if isinstance(m, nn.Conv2d) and m.groups != 1:
                    raise ValueError(f"layer '{n}' is a grouped conv (groups={m.groups}): it is never factorised")
                if n not in geoms:
                    raise ValueError(f"layer '{n}' was not called by the forward pass of example_input")
        return {n: _ConvParams.of(modules[n]) if isinstance(modules[n], nn.Conv2d) else None for n in names}

    # ------------------------------------------------------------------ queries
    def _entry(self, g: LayerGeometry) -> LayerLatency:
        e = self._by_key.get(_geometry_key(g))
        if e is None:
            raise ValueError(self._missing_message([g]))
        return e

    def _missing_message(self, missing: list[LayerGeometry]) -> str:
        lines = []
        for g in missing[:8]:
            line = f"'{g.name}' ({_describe(g)})"
            other = self._by_name.get(g.name)
            if other is not None:
                line += f"; the table measured a layer of that name as {_describe(other.geometry)}"
            lines.append(line)
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        return (f"the latency table has no measurement for {len(missing)} layer(s): " + "; ".join(lines) + more
                + f". It was measured at batch {self.batch}; build it for this model and input size "
                "(LatencyTable.build(model, example_input))")

    def check_layers(self, geometries: dict[str, LayerGeometry], *, batch: int | None = None) -> None:
        """Raise ``ValueError`` naming every layer whose shape the table lacks (e.g. another input resolution), and
        if ``batch`` is given and differs from the table's."""
        if batch is not None and int(batch) != self.batch:
            raise ValueError(f"the latency table was measured at batch {self.batch}, not {batch}; build it with "
                             f"batch={batch}")
        missing = []
        for name, g in geometries.items():
            if _geometry_key(g) not in self._by_key:
                missing.append(g if g.name == name else _renamed(g, name))
        if missing:
            raise ValueError(self._missing_message(missing))

    def dense_ms(self, geometry: LayerGeometry) -> float:
        """The dense layer's latency (ms)."""
        return self._entry(geometry).dense

    def layer_ms(self, geometry: LayerGeometry, scheme_name: str, rank: Rank) -> float:
        """Latency (ms) of the layer at ``rank`` under ``scheme_name`` (``'tucker2'``: ``(r_in, r_out)``;
        ``'matrix'`` / ``'svd'``: an int); ``rank=None``: dense. Interpolated between the measured ranks."""
        e = self._entry(geometry)
        if rank is None:
            return e.dense
        r = (rank,) if isinstance(rank, int | np.integer) else tuple(rank)
        return float(e.ms(scheme_name, tuple((int(v),) for v in r)).reshape(-1)[0])

    def grid_ms(self, geometry: LayerGeometry, scheme_name: str, axes: tuple[tuple[int, ...], ...]) -> Tensor:
        """Latency (ms) of every rank of the candidate grid ``axes`` (as in :class:`ltc.schemes.Candidates`),
        float64, flattened row-major; equal cell by cell to :meth:`layer_ms`."""
        e = self._entry(geometry)
        return torch.from_numpy(np.ascontiguousarray(e.ms(scheme_name, tuple(axes)).reshape(-1), dtype=np.float64))

    # ------------------------------------------------------------------ reporting, (de)serialisation
    @property
    def build_seconds(self) -> float | None:
        return self.info.get("build_seconds")

    @property
    def measured(self) -> int:
        """Ops timed by the build that made this table (0: everything came from the cache)."""
        return int(self.info.get("measured", 0))

    @property
    def cached(self) -> int:
        """Ops the build took from the disk cache."""
        return int(self.info.get("cached", 0))

    def summary(self) -> str:
        n_layers = sum(len(e.names) for e in self.entries)
        where = ", ".join(str(self.info[k]) for k in ("device", "runtime") if k in self.info)
        threads = f", {self.info['threads']} threads" if "threads" in self.info else ""
        text = (f"latency table: {len(self.entries)} layer shapes ({n_layers} layers), model {self.model_ms:.3f} ms "
                f"at batch {self.batch}" + (f" ({where}{threads})" if where else ""))
        if self.build_seconds is not None:
            text += f"; {self.measured} ops measured, {self.cached} from the cache, built in {self.build_seconds:.1f} s"
        return text

    def __repr__(self) -> str:
        return f"<LatencyTable {self.summary()}>"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (:meth:`from_dict` reads it back)."""
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "model_ms": self.model_ms, "batch": self.batch,
                "info": _jsonable(self.info), "layers": [e.to_dict() for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        if d.get("format") != TABLE_FORMAT or d.get("version") != TABLE_VERSION:
            raise ValueError(f"not an ltc latency table (format {d.get('format')!r}, version {d.get('version')!r}; "
                             f"expected {TABLE_FORMAT!r} version {TABLE_VERSION})")
        return cls([LayerLatency.from_dict(e) for e in d["layers"]], d["model_ms"], batch=d["batch"],
                   info=d.get("info"))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON (atomically)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _renamed(g: LayerGeometry, name: str) -> LayerGeometry:
    return LayerGeometry(**{**asdict(g), "name": name})


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x if isinstance(x, str | int | float | bool | type(None)) else str(x)


def _batched(example_input: Tensor | tuple[Tensor, ...], batch: int) -> tuple[Tensor, ...]:
    """Random inputs shaped like ``example_input`` with batch size ``batch`` (non-float inputs repeated)."""
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    out = []
    for t in inputs:
        if t.is_floating_point():
            out.append(torch.randn(batch, *t.shape[1:], dtype=t.dtype))
        else:
            reps = [math.ceil(batch / max(t.shape[0], 1))] + [1] * (t.dim() - 1)
            out.append(t.cpu().repeat(*reps)[:batch])
    return tuple(out)
