"""Saving, loading, BatchNorm folding and export of compressed models.

* :func:`save` / :func:`load`: one safe file (``torch.load(path, weights_only=True)`` reads it, no pickled
  code) holding the factorised structure as JSON and the weights. Zoo models load from the file alone; a
  user's own architecture loads onto an uncompressed instance (``load(path, model=MyNet())``).
* :func:`fold_batchnorm`: fold every BatchNorm2d that directly follows a conv into that conv (eval semantics).
* :func:`export_onnx` / :func:`export_torchscript`: export, check against PyTorch, return the max abs
  difference.

All files are written atomically (temp file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d
from .surgery import replace_modules, unwrap
from .tensor import LowRankFactors, Tucker2Factors
from .utils import atomic_torch_save, atomic_write_bytes

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "save",
    "load",
    "read_info",
    "fold_batchnorm",
    "export_onnx",
    "export_torchscript",
    "onnx_conv_weights_are_constant",
]

log = logging.getLogger(__name__)

FORMAT = "ltc-model"
FORMAT_VERSION = 1

_TYPES: dict[type[nn.Module], str] = {
    Tucker2Conv2d: "tucker2",
    MatrixLowRankConv2d: "matrix",
    LowRankLinear: "lowrank_linear",
}
_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)

PathLike = str | os.PathLike[str]


# ============================================================================ structure records


def _conv_geometry(conv: nn.Conv2d, in_ch: int, out_ch: int, bias: bool) -> dict[str, Any]:
    """The geometry of the dense conv a factorised layer replaces (JSON-ready)."""
    padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
    return {
        "in_channels": int(in_ch),
        "out_channels": int(out_ch),
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": padding,
        "dilation": list(conv.dilation),
        "padding_mode": conv.padding_mode,
        "bias": bool(bias),
    }


def _record(module: nn.Module) -> dict[str, Any]:
    """The JSON record of one factorised module: its type, ranks and the dense layer's geometry."""
    if isinstance(module, Tucker2Conv2d):
        return {
            "type": "tucker2",
            "ranks": list(module.ranks),
            **_conv_geometry(
                module.core, module.in_channels, module.out_channels, module.last.bias is not None
            ),
        }
    if isinstance(module, MatrixLowRankConv2d):
        return {
            "type": "matrix",
            "rank": module.rank,
            **_conv_geometry(
                module.first, module.first.in_channels, module.last.out_channels, module.last.bias is not None
            ),
        }
    if isinstance(module, LowRankLinear):
        return {
            "type": "lowrank_linear",
            "rank": module.rank,
            "in_features": module.first.in_features,
            "out_features": module.last.out_features,
            "bias": module.last.bias is not None,
        }
    raise TypeError(f"not a factorised module: {type(module).__name__}")


def _structure(model: nn.Module) -> dict[str, Any]:
    layers = {name: _record(m) for name, m in model.named_modules() if type(m) in _TYPES}
    cfg = getattr(model, "ltc_config", None)
    dtypes = [t.dtype for t in model.state_dict().values() if isinstance(t, Tensor) and t.is_floating_point()]
    return {
        "root": type(model).__name__,
        "ltc_config": dict(cfg) if isinstance(cfg, Mapping) else None,
        "layers": layers,
        "dtype": str(dtypes[0]).removeprefix("torch.") if dtypes else None,
        "torch_version": torch.__version__,
    }


# ============================================================================ save / load


def save(model: nn.Module, path: PathLike, *, meta: dict[str, Any] | None = None) -> None:
    """Save a (compressed) model's structure and weights to one safe file at ``path``, atomically.

    The file is a dict ``{"format": "ltc-model", "version": 1, "ltc_version", "structure": JSON,
    "state_dict": tensors, "meta": JSON}`` readable by ``torch.load(path, weights_only=True)``. ``meta`` is
    any JSON-serialisable dict (accuracy, ranks, the command line, ...). Parallel wrappers are unwrapped.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``meta`` or ``model.ltc_config`` is not
            JSON-serialisable, or the state_dict holds non-tensor entries.
        OSError: the file cannot be written (the previous file, if any, is unchanged).
    """
    from . import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"save() expects an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    structure = _structure(model)
    try:
        structure_json = json.dumps(structure)  # layers keep the model's module order
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"model.ltc_config is not JSON-serialisable ({exc}); keep it a plain dict of str/numbers/lists"
        ) from None
    try:
        meta_json = json.dumps({} if meta is None else dict(meta), sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"meta must be a JSON-serialisable dict (str, numbers, lists, dicts): {exc}"
        ) from None
    state: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"state_dict entry '{key}' is a {type(value).__name__}, not a tensor (module extra state); "
                "ltc.save only stores tensors"
            )
        state[key] = value.detach().cpu()
    obj = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "ltc_version": str(__version__),
        "structure": structure_json,
        "state_dict": state,
        "meta": meta_json,
    }
    atomic_torch_save(obj, path)


def _read(path: PathLike, map_location: Any = "cpu") -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Load and validate an ltc file: ``(raw dict, structure, meta)``; clear errors otherwise."""
    from . import __version__

    fix = "re-save the model with ltc.save(model, path)"
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # truncated zip, random bytes, pickled code rejected by weights_only, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{os.fspath(path)} is not a readable ltc model file: it is corrupted, truncated or not written "
            f"by ltc.save ({type(exc).__name__}: {reason[:200]}); {fix}"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        what = "a plain state_dict or checkpoint" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(
            f"{os.fspath(path)} is not an ltc model file (it holds {what}, not format '{FORMAT}'); {fix}"
        )
    version = obj.get("version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = "upgrade ltc (pip install -U ltc)" if newer else f"load it with ltc {obj.get('ltc_version')}"
        raise ValueError(
            f"{os.fspath(path)} is ltc model format version {version!r} (written by ltc "
            f"{obj.get('ltc_version')}), but this ltc {__version__} reads version {FORMAT_VERSION}; {hint}"
        )
    try:
        structure = json.loads(obj["structure"])
        meta = json.loads(obj.get("meta") or "{}")
        if not isinstance(structure, dict) or not isinstance(structure.get("layers"), dict):
            raise ValueError("structure record is not a dict with 'layers'")
        if not isinstance(obj.get("state_dict"), dict):
            raise ValueError("state_dict is missing")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{os.fspath(path)} is a corrupted ltc model file ({exc}); {fix}") from None
    return obj, structure, meta


def read_info(path: PathLike) -> dict[str, Any]:
    """The records of an ltc file without building the model: ``{"ltc_version", "structure", "meta"}``."""
    obj, structure, meta = _read(path)
    return {"ltc_version": obj.get("ltc_version"), "structure": structure, "meta": meta}


def _describe_conv(conv: nn.Conv2d) -> str:
    return f"Conv2d({conv.in_channels}->{conv.out_channels}, kernel {tuple(conv.kernel_size)})"


def _geometry_mismatch(rec: dict[str, Any], module: nn.Module) -> str | None:
    """Why ``module`` (a plain layer of the given model) cannot take the recorded structure, or None."""
    kind = rec["type"]
    if kind == "lowrank_linear":
        if not isinstance(module, nn.Linear):
            return f"is a {type(module).__name__}, the file holds a factorised nn.Linear there"
        want = (rec["in_features"], rec["out_features"])
        if (module.in_features, module.out_features) != want:
            return (
                f"is Linear({module.in_features}->{module.out_features}), the file's is "
                f"Linear({want[0]}->{want[1]})"
            )
        return None
    if not isinstance(module, nn.Conv2d):
        return f"is a {type(module).__name__}, the file holds a factorised nn.Conv2d there"
    want_desc = f"Conv2d({rec['in_channels']}->{rec['out_channels']}, kernel {tuple(rec['kernel_size'])})"
    if (module.in_channels, module.out_channels, list(module.kernel_size)) != (
        rec["in_channels"],
        rec["out_channels"],
        rec["kernel_size"],
    ):
        return f"is {_describe_conv(module)}, the file's is {want_desc}"
    if module.groups != 1:
        return f"is a grouped conv (groups={module.groups}), which ltc never factorises"
    return None


def _template(rec: dict[str, Any], like: Tensor) -> nn.Module:
    """A dense layer with the recorded geometry (used when the given model's layer is already factorised)."""
    kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
    if rec["type"] == "lowrank_linear":
        return nn.Linear(rec["in_features"], rec["out_features"], bias=rec["bias"], **kw)
    padding = rec["padding"] if isinstance(rec["padding"], str) else tuple(rec["padding"])
    return nn.Conv2d(
        rec["in_channels"],
        rec["out_channels"],
        tuple(rec["kernel_size"]),
        stride=tuple(rec["stride"]),
        padding=padding,
        dilation=tuple(rec["dilation"]),
        bias=rec["bias"],
        padding_mode=rec["padding_mode"],
        **kw,
    )


def _build(rec: dict[str, Any], layer: nn.Module) -> nn.Module:
    """A factorised module of the recorded type and ranks from zero factors, with ``layer``'s geometry."""
    kind = rec["type"]
    w = layer.weight
    z = {"device": w.device, "dtype": w.dtype}
    if kind == "tucker2":
        r_in, r_out = (int(r) for r in rec["ranks"])
        t, s, kh, kw = w.shape
        zeros = Tucker2Factors(
            torch.zeros(r_out, r_in, kh, kw, **z), torch.zeros(t, r_out, **z), torch.zeros(s, r_in, **z)
        )
        return Tucker2Conv2d.from_factors(layer, zeros)
    r = int(rec["rank"])
    if kind == "matrix":
        t = w.shape[0]
        return MatrixLowRankConv2d.from_factors(
            layer, LowRankFactors(torch.zeros(t, r, **z), torch.zeros(r, w[0].numel(), **z))
        )
    out_f, in_f = w.shape
    zeros = LowRankFactors(torch.zeros(out_f, r, **z), torch.zeros(r, in_f, **z))
    return LowRankLinear.from_factors(layer, zeros)


def _apply_structure(model: nn.Module, layers: dict[str, dict[str, Any]], root: str, path: str) -> None:
    """Replace every recorded layer of ``model`` (in place) by its factorised form; all checks first."""
    modules = dict(model.named_modules())
    hint = f"pass an instance of the architecture the file was saved from ({root})"
    missing = [name for name in layers if name not in modules or not name]
    if missing:
        shown = ", ".join(f"'{n}'" for n in missing[:5])
        if len(missing) > 5:
            shown += f" and {len(missing) - 5} more"
        raise ValueError(
            f"{path} records factorised layers {shown} that the given {type(model).__name__} does not have; "
            f"{hint}"
        )
    new: dict[str, nn.Module] = {}
    for name, rec in layers.items():
        kind = rec.get("type")
        if kind not in _TYPES.values():
            raise ValueError(f"{path} records an unknown layer type {kind!r} for '{name}'; upgrade ltc")
        module = modules[name]
        if type(module) in _TYPES:  # the given model is already factorised there: rebuild from the record
            module = _template(rec, next(module.parameters()))
        problem = _geometry_mismatch(rec, module)
        if problem:
            raise ValueError(f"layer '{name}' of the given {type(model).__name__} {problem}; {hint}")
        new[name] = _build(rec, module)
    replace_modules(model, new)


def _check_state_dict(model: nn.Module, state: dict[str, Tensor], root: str, path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(own[k], Tensor) and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    problems = (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", shapes))
    for label, items in problems:
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    raise ValueError(
        f"the weights in {path} do not fit the model (they belong to another model): {'; '.join(parts)}. "
        f"Pass the same architecture the file was saved from ({root}), with the same num_classes/width"
    )


def load(path: PathLike, model: nn.Module | None = None, *, map_location: Any = "cpu") -> nn.Module:
    """Load a model written by :func:`save`, in eval mode.

    Zoo models (the file records ``ltc_config``) are rebuilt from the file alone. For any other architecture
    pass an uncompressed instance, ``load(path, model=MyNet())``: a copy of it (``model`` is left untouched)
    gets each recorded conv/linear replaced by its factorised form, then the weights are loaded strictly.
    ``map_location`` is passed to ``torch.load``; when it names a device the model is moved there.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not an ltc file or corrupted; another format version; no ``ltc_config`` and no ``model``;
            the recorded layer names or weights do not fit the given model.
    """
    spath = os.fspath(path)
    obj, structure, _ = _read(path, map_location)
    root = str(structure.get("root", "?"))
    cfg = structure.get("ltc_config")
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be an nn.Module (the uncompressed architecture), got {type(model).__name__}"
            )
        net = copy.deepcopy(unwrap(model))
    elif isinstance(cfg, dict) and cfg.get("name"):
        from .models import create

        try:
            net = create(**cfg)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{spath} was saved from zoo model {cfg.get('name')!r} that this ltc cannot rebuild ({exc}); "
                f"upgrade ltc or pass the uncompressed model: ltc.load(path, model=...)"
            ) from None
    else:
        raise ValueError(
            f"{spath} was saved from a user-defined {root} (no ltc_config to rebuild it from); pass the "
            f"uncompressed model: ltc.load(path, model={root}())"
        )
    _apply_structure(net, structure["layers"], root, spath)
    dtype_name = structure.get("dtype")
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    params = [p for p in net.parameters() if p.is_floating_point()]
    if isinstance(dtype, torch.dtype) and params and params[0].dtype != dtype:
        net = net.to(dtype)
    state = obj["state_dict"]
    _check_state_dict(net, state, root, spath)
    net.load_state_dict(state, strict=True)
    if isinstance(map_location, str | torch.device):
        net = net.to(map_location)
    return net.eval()


# ============================================================================ BatchNorm folding


def _conv_of(module: nn.Module) -> nn.Conv2d | None:
    """The conv whose output a following BN normalises: the conv itself, or a factorised layer's ``last``."""
    if isinstance(module, Tucker2Conv2d | MatrixLowRankConv2d):
        return module.last if type(module.last) is nn.Conv2d else None
    return module if type(module) is nn.Conv2d else None


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    """``(conv name, bn name)`` pairs where the BN's only input is the conv's output and both are called
    once, from a torch.fx symbolic trace; ``None`` when the model cannot be traced."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # dynamic control flow, unsupported Python, ...
        log.debug("fold_batchnorm: torch.fx trace failed (%s); using nn.Sequential adjacency", exc)
        return None
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN_TYPES):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if type(modules.get(src.target)) is not nn.Conv2d:
            continue
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` pairs of adjacent children of plain ``nn.Sequential`` containers."""
    pairs = []
    for seq_name, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        prefix = f"{seq_name}." if seq_name else ""
        items = list(seq.named_children())
        for (name_a, a), (name_b, b) in zip(items, items[1:], strict=False):
            if isinstance(b, _BN_TYPES) and _conv_of(a) is not None:
                conv_name = prefix + name_a + (".last" if _conv_of(a) is not a else "")
                pairs.append((conv_name, prefix + name_b))
    return pairs


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """``conv`` ← ``bn(conv(x))`` with the BN's running statistics (eval semantics)."""
    w = conv.weight
    wide = torch.float64 if w.device.type not in ("mps",) else w.dtype
    var = bn.running_var.to(wide)
    mean = bn.running_mean.to(wide)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(wide)
    bias = conv.bias.to(wide) if conv.bias is not None else torch.zeros_like(mean)
    new_bias = (bias - mean) * scale
    if bn.bias is not None:
        new_bias = new_bias + bn.bias.to(wide)
    conv.weight.copy_((w.to(wide) * scale.reshape(-1, 1, 1, 1)).to(w.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(w.dtype))
    else:
        conv.bias.copy_(new_bias.to(w.dtype))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm2d that directly follows a conv folded into it.

    Pairs come from a torch.fx symbolic trace (so ResNet's ``conv1``/``bn1`` siblings are found); if the model
    cannot be traced, from adjacent children of ``nn.Sequential`` containers. A Tucker2Conv2d or
    MatrixLowRankConv2d followed by BN has the BN folded into its ``last`` 1x1 conv. Each folded BN becomes
    ``nn.Identity``; BNs without running statistics, or whose conv output is used elsewhere, are kept. In eval
    mode the outputs equal the original's to float rounding. ``model`` itself is left untouched.
    """
    net = copy.deepcopy(unwrap(model)).eval()
    pairs = _pairs_fx(net)
    if pairs is None:
        pairs = _pairs_sequential(net)
    modules = dict(net.named_modules())
    replaced: dict[str, nn.Module] = {}
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, _BN_TYPES)
        if bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
            continue
        if bn_name in replaced:
            continue
        _fold_into(conv, bn)
        replaced[bn_name] = nn.Identity()
    replace_modules(net, replaced)
    log.debug("fold_batchnorm: folded %d BatchNorm layers", len(replaced))
    return net


# ============================================================================ export helpers


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
