"""Export of (compressed) models to ONNX and TorchScript, checked against PyTorch.

:func:`export_onnx` / :func:`export_torchscript` export an eval-mode copy (BatchNorm folded first with
``fold_bn``), run the exported model on seeded random inputs, compare with PyTorch and return the max absolute
difference. Files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .batchnorm import fold_batchnorm
from .surgery import unwrap
from .utils import atomic_write_bytes

__all__ = ["export_onnx", "export_torchscript", "onnx_conv_weights_are_constant"]

PathLike = str | os.PathLike[str]


def _as_inputs(example_input: Tensor | tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError(
            "example_input must be a tensor or a tuple of tensors (the model's positional inputs)"
        )
    return inputs


def _flat_outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, list | tuple):
        return [t for o in out for t in _flat_outputs(o)]
    if isinstance(out, Mapping):
        return [t for o in out.values() for t in _flat_outputs(o)]
    raise TypeError(f"cannot compare a model output of type {type(out).__name__}; return tensors")


def _random_like(inputs: tuple[Tensor, ...], batch: int | None = None) -> tuple[Tensor, ...]:
    """Seeded random inputs shaped like ``inputs`` (batch dimension set to ``batch``); non-float kept."""
    g = torch.Generator().manual_seed(0)
    out = []
    for t in inputs:
        shape = list(t.shape)
        if batch is not None and shape:
            shape[0] = batch
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=g, dtype=t.dtype).to(t.device))
        elif batch is not None and shape and shape[0] != t.shape[0]:
            reps = [math.ceil(batch / max(t.shape[0], 1))] + [1] * (t.dim() - 1)
            out.append(t.repeat(*reps)[:batch])
        else:
            out.append(t)
    return tuple(out)


def _compare(ref: list[Tensor], got: list[Tensor], rtol: float, what: str) -> float:
    """Max abs difference of the two output lists; raise if it exceeds ``rtol`` times the output scale."""
    if len(ref) != len(got):
        raise RuntimeError(f"{what} returns {len(got)} outputs, PyTorch {len(ref)}; the file was not written")
    diff, scale = 0.0, 0.0
    for r, o in zip(ref, got, strict=True):
        r = r.detach().float().cpu()
        o = torch.as_tensor(o).detach().float().cpu()
        if tuple(r.shape) != tuple(o.shape):
            raise RuntimeError(
                f"{what} output shape {tuple(o.shape)} differs from PyTorch's {tuple(r.shape)}; "
                "the file was not written"
            )
        if r.numel():
            diff = max(diff, float((r - o).abs().max()))
            scale = max(scale, float(r.abs().max()))
    if not math.isfinite(diff) or diff > rtol * max(scale, 1e-6):
        raise RuntimeError(
            f"{what} does not match PyTorch: max abs difference {diff:.3g} at output scale {scale:.3g} "
            f"(relative {diff / max(scale, 1e-6):.3g} > {rtol:g}); the file was not written. Check that the "
            "model is deterministic in eval mode, or export with fold_bn=False / check=False to inspect it"
        )
    return diff


class _EvalCopy:
    """A deep copy of the model in eval mode (optionally BN-folded); the caller's model is never touched."""

    def __init__(self, model: nn.Module, fold_bn: bool) -> None:
        self.original = copy.deepcopy(unwrap(model)).eval()
        self.export = fold_batchnorm(self.original) if fold_bn else self.original


def _reference(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    with torch.no_grad():
        return _flat_outputs(model(*inputs))


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"ONNX export needs onnx, onnxruntime and onnxscript ({exc}); "
            "install them: pip install 'ltc[export]'"
        ) from None
    return onnx, onnxruntime


def onnx_conv_weights_are_constant(path_or_model: PathLike | Any) -> bool:
    """True if every ``Conv`` of the ONNX model's top-level graph (local functions inlined) takes its weight
    from an initializer, a ``Constant`` node or a chain of nodes computed from those only — never from a
    graph input (an initializer that is also listed as a graph input can be overridden, so it does not count).
    """
    onnx, _ = _require_onnx()
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    else:
        model = onnx.load(os.fspath(path_or_model))
    if model.functions:
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    graph = model.graph
    inputs = {i.name for i in graph.input}
    const = {init.name for init in graph.initializer if init.name not in inputs}
    const |= {init.values.name for init in graph.sparse_initializer if init.values.name not in inputs}
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type == "Constant":
            const.update(node.output)
        elif (
            node.input
            and not node.op_type.startswith("Random")
            and all((not name) or name in const for name in node.input)
        ):
            const.update(node.output)
    for node in graph.node:
        if node.op_type == "Conv" and (len(node.input) < 2 or node.input[1] not in const):
            return False
    return True


def _io_names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def _onnx_bytes_dynamo(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    opset: int,
    in_names: list[str],
    out_names: list[str],
    dynamic: bool,
) -> tuple[bytes, bool]:
    """Export with the torch.export-based exporter; ``(model bytes, batch is dynamic)``."""
    kwargs: dict[str, Any] = {
        "dynamo": True,
        "opset_version": opset,
        "input_names": in_names,
        "output_names": out_names,
        "verbose": False,
        "optimize": True,
    }
    if dynamic:
        dim = getattr(torch.export.Dim, "DYNAMIC", None) or torch.export.Dim("batch")
        try:
            shapes = tuple({0: dim} for _ in inputs)
            program = torch.onnx.export(model, inputs, dynamic_shapes=shapes, **kwargs)
            return program.model_proto.SerializeToString(), True
        except Exception as exc:
            warnings.warn(
                f"ONNX export with a dynamic batch dimension failed ({type(exc).__name__}: "
                f"{str(exc)[:200]}); exporting with a fixed batch size instead",
                stacklevel=3,
            )
    program = torch.onnx.export(model, inputs, **kwargs)
    return program.model_proto.SerializeToString(), False


def _onnx_bytes_torchscript(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    opset: int,
    in_names: list[str],
    out_names: list[str],
    dynamic: bool,
) -> tuple[bytes, bool]:
    """Export with the TorchScript-based exporter (the only one that emits opset < 18 reliably here)."""
    buf = io.BytesIO()
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deliberate choice, see export_onnx
        torch.onnx.export(
            model,
            inputs,
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return buf.getvalue(), dynamic


def export_onnx(
    model: nn.Module,
    path: PathLike,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    fold_bn: bool = False,
    opset: int = 17,
    check: bool = True,
    dynamic_batch: bool = True,
    dynamo: bool | None = None,
    rtol: float = 1e-4,
) -> float:
    """Export ``model`` (an eval-mode copy; BN folded first with ``fold_bn``) to ONNX at ``path``, atomically.

    Exporter: ``dynamo=None`` picks the torch.export-based exporter for ``opset >= 18`` and the
    TorchScript-based one below (the new exporter only emits opset 18+; its down-conversion to 17 fails on
    ReduceMean). The batch dimension is dynamic when ``dynamic_batch`` (falls back to fixed with a warning if
    the model cannot be exported so). Inputs are named ``input`` (``input_0``, ... for several), outputs
    ``output``.

    With ``check``, ONNX Runtime runs the exported model on seeded random input (the example's shape and, with
    a dynamic batch, one more sample) before anything is written; returns the max abs difference from PyTorch
    (NaN when ``check=False``).

    Raises:
        RuntimeError: the difference exceeds ``rtol`` times the output scale, or a Conv weight is not constant
            (the file is then not written).
        ImportError: onnx / onnxruntime / onnxscript missing.
    """
    onnx, ort = _require_onnx()
    inputs = _as_inputs(example_input)
    models = _EvalCopy(model, fold_bn)
    ref = _reference(models.original, inputs)
    in_names, out_names = _io_names("input", len(inputs)), _io_names("output", len(ref))
    use_dynamo = opset >= 18 if dynamo is None else bool(dynamo)
    exporter = _onnx_bytes_dynamo if use_dynamo else _onnx_bytes_torchscript
    data, dynamic = exporter(models.export, inputs, opset, in_names, out_names, dynamic_batch)
    proto = onnx.load_from_string(data)
    if not onnx_conv_weights_are_constant(proto):
        raise RuntimeError(
            "the exported ONNX graph has a Conv whose weight is a graph input, not a constant; the file was "
            "not written (export with the parameters as initializers)"
        )
    diff = float("nan")
    if check:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        batches: list[int | None] = [None]
        if dynamic and inputs[0].dim() > 0:
            batches.append(int(inputs[0].shape[0]) + 1)
        diff = 0.0
        for batch in batches:
            x = _random_like(inputs, batch)
            want = _reference(models.original, x)
            feed = {n: t.detach().cpu().numpy() for n, t in zip(names, x, strict=True)}
            try:
                got = session.run(None, feed)
            except Exception as exc:
                hint = " (export with dynamic_batch=False)" if batch is not None else ""
                raise RuntimeError(
                    f"ONNX Runtime failed to run the exported model{hint}: {exc}; the file was not written"
                ) from None
            what = "the ONNX export" + (f" at batch size {batch}" if batch is not None else "")
            diff = max(diff, _compare(want, [torch.from_numpy(g) for g in got], rtol, what))
    atomic_write_bytes(path, data)
    return diff


def export_torchscript(
    model: nn.Module,
    path: PathLike,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    fold_bn: bool = False,
    check: bool = True,
    rtol: float = 1e-4,
) -> float:
    """Trace ``model`` (an eval-mode copy; BN folded first with ``fold_bn``) with ``torch.jit.trace`` and save
    it at ``path``, atomically. With ``check``, ``torch.jit.load`` of the saved bytes runs on seeded random
    input of the example's shape before anything is written; returns the max abs difference from PyTorch (NaN
    when ``check=False``). TorchScript is deprecated upstream; its DeprecationWarnings are silenced here.

    Raises:
        RuntimeError: the difference exceeds ``rtol`` times the output scale (the file is then not written).
    """
    inputs = _as_inputs(example_input)
    models = _EvalCopy(model, fold_bn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            traced = torch.jit.trace(models.export, inputs, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        data = buf.getvalue()
        diff = float("nan")
        if check:
            loaded = torch.jit.load(io.BytesIO(data), map_location=inputs[0].device)
            x = _random_like(inputs)
            want = _reference(models.original, x)
            with torch.no_grad():
                got = _flat_outputs(loaded(*x))
            diff = _compare(want, got, rtol, "the TorchScript export")
    atomic_write_bytes(path, data)
    return diff
