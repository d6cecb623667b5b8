"""Measured wall-clock latency of a forward pass (never called SR: SR is the theoretical MAC speed-up).

>>> stats = measure_latency(model, torch.randn(1, 3, 32, 32), threads=2)
>>> stats.median_ms
>>> compare_latency(base, small, torch.randn(1, 3, 32, 32), threads=2)["speedup"]
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .settings import MEMORY_FORMATS
from .utils import resolve_device

__all__ = ["LatencyStats", "measure_latency", "compare_latency", "interleaved_latency", "onnx_session",
           "MEMORY_FORMATS", "to_memory_format", "memory_format_of", "default_repeats"]

REPEATS = {"eager": 20, "onnxruntime": 100}
"""Interleaved runs per speed-up timing, by runtime: ONNX Runtime's timings on a shared 2-core machine move more
between runs (30-run speed-ups of one network 3.03-3.78x, 100-run ones 3.50-3.56x; ``benchmarks/latency.py``)."""


def default_repeats(runtime: str) -> int:
    """The number of interleaved runs a speed-up timing under ``runtime`` takes by default (:data:`REPEATS`)."""
    if runtime not in REPEATS:
        raise ValueError(f"runtime must be one of {', '.join(map(repr, REPEATS))}, got {runtime!r}")
    return REPEATS[runtime]


@dataclass(frozen=True)
class LatencyStats:
    """Forward-pass latency in milliseconds over ``repeats`` timed runs (after warm-up)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}, n={self.repeats})"


def check_memory_format(memory_format: str, runtime: str = "eager", *,
                        names: tuple[str, str] = ("memory_format", "runtime")) -> str:
    """``memory_format`` if it is one of :data:`MEMORY_FORMATS` and fits ``runtime``; a ValueError otherwise, naming
    the two settings as ``names`` (the caller's own names for them)."""
    fmt_name, rt_name = names
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"{fmt_name} must be one of {', '.join(map(repr, MEMORY_FORMATS))}, got {memory_format!r}")
    if memory_format != "contiguous" and runtime != "eager":
        raise ValueError(f"{fmt_name}={memory_format!r} is a PyTorch (eager) layout; ONNX Runtime chooses its own "
                         f"layout: use {fmt_name}='contiguous' with {rt_name}='onnxruntime'")
    return memory_format


def to_memory_format(model: nn.Module, memory_format: str) -> nn.Module:
    """``model`` with its 4-D weights in ``memory_format`` (in place; returned for chaining).

    ``'channels_last'`` stores conv weights as NHWC; the input may stay NCHW (the first conv's output follows the
    weights' layout, so the whole network then runs in NHWC). ``'contiguous'`` restores NCHW. Linear layers and
    1-D tensors are unaffected."""
    check_memory_format(memory_format)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    return model.to(memory_format=fmt)


def memory_format_of(model: nn.Module) -> str:
    """``'channels_last'`` when every 4-D parameter of ``model`` whose two layouts differ is stored NHWC, else
    ``'contiguous'``. Weights such as ``(out, in, 1, 1)`` are both at once and do not count; a model with no other
    4-D weight is ``'contiguous'``."""
    ws = [p for p in model.parameters() if p.dim() == 4 and not p.is_contiguous()]
    if ws and all(p.is_contiguous(memory_format=torch.channels_last) for p in ws):
        return "channels_last"
    return "contiguous"


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """Temporarily ``torch.set_num_threads(threads)``; restores the previous value (also on error)."""
    if threads is None:
        yield
        return
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _percentile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of an ascending list."""
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    pos = (len(sorted_ms) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def _stats(times_ms: list[float]) -> LatencyStats:
    s = sorted(times_ms)
    return LatencyStats(statistics.median(s), _percentile(s, 10), _percentile(s, 90), len(s))


class _Timer:
    """Times one forward pass of a prepared model (eval mode, on ``device``)."""

    def __init__(self, model: nn.Module, x: Tensor, device: torch.device) -> None:
        self.model, self.x, self.cuda = model, x, device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.model(self.x)
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3


class _OrtTimer:
    """Times one run of a model exported to ONNX in an ONNX Runtime session (CPU)."""

    def __init__(self, model: nn.Module, x: Tensor, threads: int) -> None:
        self.sess = onnx_session(model, (x.cpu(),), threads)
        self.feed = {"x0": x.cpu().numpy()}

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.sess.run(None, self.feed)
        return (time.perf_counter() - t0) * 1e3


def onnx_session(module: nn.Module, inputs: tuple[Tensor, ...], threads: int, *, spinning: bool = False) -> Any:
    """An ONNX Runtime ``InferenceSession`` (CPU, ``intra_op_num_threads=threads``) of ``module`` exported in
    memory (opset 17, constants folded; inputs named ``x0, x1, ...``). Needs ``onnxruntime``
    (``pip install -e ".[export]"``).

    ``spinning``: ONNX Runtime's default lets idle pool threads busy-wait after each run. Off here (the default):
    when two sessions are timed interleaved, one session's spinning threads take the cores the other one runs on.
    Measured on 2 cores (ResNet-34, 224x224, batch 1, interleaved with one SR-5 network, three processes): with
    spinning the base timed 59-73 ms in 6 of 6 timings, without it 37-41 ms in 10 of 10. Timed alone, a session
    measured 36-66 ms either way (this VM's noise); spinning is not what makes a lone session fast."""
    import io
    import warnings

    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError('ONNX Runtime timing needs onnxruntime: pip install -e ".[export]"') from None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), inputs, buf, dynamo=False, opset_version=17, do_constant_folding=True,
                          input_names=[f"x{i}" for i in range(len(inputs))])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _prepared(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` on ``device`` in eval mode; the train/eval flags are restored afterwards (the device is not)."""
    modes = [(m, m.training) for m in model.modules()]
    model.to(device).eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.train(mode)


def _check(warmup: int, repeats: int) -> None:
    if int(warmup) < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")


def measure_latency(
    model: nn.Module,
    example_input: Tensor,
    *,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
    device: str | torch.device = "cpu",
    memory_format: str = "contiguous",
) -> LatencyStats:
    """Median / 10th / 90th percentile of the wall-clock time (ms) of ``model(example_input)``.

    Runs under ``torch.inference_mode`` with the model in eval mode (its flags are restored afterwards).
    ``threads`` sets ``torch.set_num_threads`` for the measurement only. On CUDA every run is bracketed by
    ``torch.cuda.synchronize``. The batch size is the one of ``example_input`` (use batch 1 for latency).
    ``memory_format``: time a copy of the model in this layout (see :func:`to_memory_format`; the input is passed
    as given).
    """
    _check(warmup, repeats)
    check_memory_format(memory_format)
    dev = resolve_device(device)
    x = example_input.to(dev)
    if memory_format != "contiguous":
        model = to_memory_format(copy.deepcopy(model), memory_format)
    with _num_threads(threads), torch.inference_mode(), _prepared(model, dev) as m:
        timer = _Timer(m, x, dev)
        for _ in range(int(warmup)):
            timer()
        times = [timer() for _ in range(int(repeats))]
    return _stats(times)


def interleaved_latency(
    models: dict[str, nn.Module],
    example_input: Tensor,
    *,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
    device: str | torch.device = "cpu",
    fold_bn: bool = False,
    runtime: str = "eager",
    memory_format: str = "contiguous",
) -> dict[str, LatencyStats]:
    """Time several models side by side, interleaved run by run (so machine noise hits all of them alike); the
    order rotates every run, so none systematically profits from a warm cache. ``fold_bn``: time eval-mode copies
    with BatchNorm folded into the preceding convs (:func:`ltc.fold_batchnorm`), as deployed. ``runtime``:
    ``'eager'`` (PyTorch) or ``'onnxruntime'`` (each model exported to ONNX and run by ONNX Runtime on the CPU with
    ``threads`` intra-op threads). ``memory_format``: eager only; time copies in this layout (see
    :func:`to_memory_format`; the input is passed as given, NCHW)."""
    _check(warmup, repeats)
    if not models:
        raise ValueError("interleaved_latency needs at least one model")
    if runtime not in ("eager", "onnxruntime"):
        raise ValueError(f"runtime must be 'eager' or 'onnxruntime', got {runtime!r}")
    check_memory_format(memory_format, runtime)
    dev = resolve_device(device)
    x = example_input.to(dev)
    if fold_bn:
        from .batchnorm import fold_batchnorm

        models = {k: fold_batchnorm(m) for k, m in models.items()}
    if memory_format != "contiguous":  # copies: the caller's models keep their layout
        models = {k: to_memory_format(m if fold_bn else copy.deepcopy(m), memory_format) for k, m in models.items()}
    names = list(models)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_num_threads(threads))
        stack.enter_context(torch.inference_mode())
        if runtime == "onnxruntime":
            n_threads = threads or torch.get_num_threads()
            timers: dict[str, Any] = {n: _OrtTimer(stack.enter_context(_prepared(models[n], torch.device("cpu"))),
                                                   x, n_threads) for n in names}
        else:
            timers = {n: _Timer(stack.enter_context(_prepared(models[n], dev)), x, dev) for n in names}
        for _ in range(int(warmup)):
            for n in names:
                timers[n]()
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(int(repeats)):
            k = i % len(names)
            for n in names[k:] + names[:k]:
                times[n].append(timers[n]())
    return {n: _stats(times[n]) for n in names}


def compare_latency(
    base: nn.Module,
    compressed: nn.Module,
    example_input: Tensor,
    *,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
    device: str | torch.device = "cpu",
    fold_bn: bool = False,
    runtime: str = "eager",
    memory_format: str = "contiguous",
) -> dict[str, Any]:
    """Measure ``base`` and ``compressed`` side by side with :func:`interleaved_latency`.

    Returns ``{"base_ms", "compressed_ms"`` (medians), ``"speedup"`` (measured: base_ms / compressed_ms, not
    SR), ``"base"``, ``"compressed"`` (full :class:`LatencyStats` dicts), ``"batch"``, ``"threads"``,
    ``"device"``, ``"repeats"``, ``"warmup"``, ``"fold_bn"``, ``"runtime"``, ``"memory_format"}``.
    """
    with _num_threads(threads):
        used_threads = torch.get_num_threads()
        st = interleaved_latency({"base": base, "compressed": compressed}, example_input, warmup=warmup,
                                 repeats=repeats, device=device, fold_bn=fold_bn, runtime=runtime,
                                 memory_format=memory_format)
    sb, sc = st["base"], st["compressed"]
    return {
        "base_ms": sb.median_ms,
        "compressed_ms": sc.median_ms,
        "speedup": sb.median_ms / max(sc.median_ms, 1e-12),
        "base": sb.to_dict(),
        "compressed": sc.to_dict(),
        "batch": int(example_input.shape[0]),
        "threads": used_threads,
        "device": str(resolve_device(device)),
        "repeats": int(repeats),
        "warmup": int(warmup),
        "fold_bn": bool(fold_bn),
        "runtime": runtime,
        "memory_format": memory_format,
    }
