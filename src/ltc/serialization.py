"""The ltc model file: :func:`save` / :func:`load` of (compressed) models.

One safe file (``torch.load(path, weights_only=True)`` reads it, no pickled code) holding the model's structure as
JSON and its weights. The structure records every factorised layer (type, ranks, the dense layer's geometry) and
the shape of every plain conv, linear and BatchNorm layer, so that a network whose layers were resized (channel
pruning, also before a factorisation) loads too. Zoo models load from the file alone; a user's own architecture
loads onto an uncompressed instance (``load(path, model=MyNet())``).
Files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .latency import memory_format_of, to_memory_format
from .layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d
from .surgery import replace_modules, unwrap
from .tensor import LowRankFactors, Tucker2Factors
from .utils import atomic_torch_save

__all__ = ["FORMAT", "FORMAT_VERSION", "save", "load", "read_info"]

FORMAT = "ltc-model"
FORMAT_VERSION = 2
_READABLE = (1, 2)  # version 1: no records of plain layers

_TYPES: dict[type[nn.Module], str] = {
    Tucker2Conv2d: "tucker2",
    MatrixLowRankConv2d: "matrix",
    LowRankLinear: "lowrank_linear",
}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)

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
        "plain": _plain_layers(model),
        "dtype": str(dtypes[0]).removeprefix("torch.") if dtypes else None,
        "memory_format": memory_format_of(model),
        "torch_version": torch.__version__,
    }



def _plain_record(module: nn.Module) -> dict[str, Any] | None:
    """The shape record of a plain conv / linear / BatchNorm layer (``None`` for other modules)."""
    if type(module) is nn.Conv2d:
        return {"type": "conv2d", **_conv_geometry(module, module.in_channels, module.out_channels,
                                                   module.bias is not None), "groups": module.groups}
    if type(module) is nn.Linear:
        return {"type": "linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if type(module) in _BN_TYPES:
        return {"type": type(module).__name__.lower(), "num_features": module.num_features, "eps": module.eps,
                "momentum": module.momentum, "affine": module.affine,
                "track_running_stats": module.track_running_stats}
    return None


def _plain_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    inside = [n + "." for n, m in model.named_modules() if type(m) in _TYPES]
    out = {}
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        rec = _plain_record(m)
        if rec is not None:
            out[name] = rec
    return out


def _same_shape(rec: dict[str, Any], module: nn.Module) -> bool:
    mine = _plain_record(module)
    keys = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")
    return mine is not None and mine["type"] == rec["type"] and all(mine.get(k) == rec.get(k) for k in keys)


def _plain_module(rec: dict[str, Any], like: Tensor | None) -> nn.Module:
    kw: dict[str, Any] = {} if like is None else {"device": like.device, "dtype": like.dtype}
    if rec["type"] == "conv2d":
        padding = rec["padding"] if isinstance(rec["padding"], str) else tuple(rec["padding"])
        return nn.Conv2d(rec["in_channels"], rec["out_channels"], tuple(rec["kernel_size"]),
                         stride=tuple(rec["stride"]), padding=padding, dilation=tuple(rec["dilation"]),
                         groups=rec["groups"], bias=rec["bias"], padding_mode=rec["padding_mode"], **kw)
    if rec["type"] == "linear":
        return nn.Linear(rec["in_features"], rec["out_features"], bias=rec["bias"], **kw)
    cls = {"batchnorm1d": nn.BatchNorm1d, "batchnorm2d": nn.BatchNorm2d}[rec["type"]]
    return cls(rec["num_features"], eps=rec["eps"], momentum=rec["momentum"], affine=rec["affine"],
               track_running_stats=rec["track_running_stats"], **kw)


def _resize_plain(model: nn.Module, plain: dict[str, dict[str, Any]], root: str, path: str) -> None:
    """Rebuild every recorded plain layer whose shape differs from the given model's (resized channels)."""
    modules = dict(model.named_modules())
    new = {}
    for name, rec in plain.items():
        if not name:  # the model is itself one plain layer: it cannot be replaced; the weight check covers it
            continue
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"{path} records a layer '{name}' that the given {type(model).__name__} does not "
                             f"have; pass an instance of the architecture the file was saved from ({root})")
        if _same_shape(rec, mod):
            continue
        like = next(iter(mod.parameters()), None)
        new[name] = _plain_module(rec, like)
    replace_modules(model, new)


# ============================================================================ save / load


def save(model: nn.Module, path: PathLike, *, meta: dict[str, Any] | None = None) -> None:
    """Save a (compressed) model's structure and weights to one safe file at ``path``, atomically.

    The file is a dict ``{"format": "ltc-model", "version": 2, "ltc_version", "structure": JSON,
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
    if version not in _READABLE:
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


def _resized(rec: dict[str, Any], module: nn.Module) -> bool:
    """``module`` is the recorded layer's kind with the same kernel (or a linear) but other channel counts."""
    if rec["type"] == "lowrank_linear":
        return type(module) is nn.Linear and (module.in_features, module.out_features) != (
            rec["in_features"], rec["out_features"])
    return (type(module) is nn.Conv2d and module.groups == 1 and list(module.kernel_size) == rec["kernel_size"]
            and (module.in_channels, module.out_channels) != (rec["in_channels"], rec["out_channels"]))


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
        if type(module) in _TYPES or _resized(rec, module):
            # already factorised there, or its channels were resized (pruned, then factorised): the record's
            # dense geometry rebuilds it; the strict weight check below still catches a foreign model
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
    _resize_plain(net, structure.get("plain") or {}, root, spath)
    _apply_structure(net, structure["layers"], root, spath)
    dtype_name = structure.get("dtype")
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    params = [p for p in net.parameters() if p.is_floating_point()]
    if isinstance(dtype, torch.dtype) and params and params[0].dtype != dtype:
        net = net.to(dtype)
    state = obj["state_dict"]
    _check_state_dict(net, state, root, spath)
    net.load_state_dict(state, strict=True)
    if structure.get("memory_format") == "channels_last":  # load_state_dict copies into the new (NCHW) weights
        to_memory_format(net, "channels_last")
    if isinstance(map_location, str | torch.device):
        net = net.to(map_location)
    return net.eval()
