"""YAML run configs for the ``ltc`` command, with every value overridable.

A config has up to seven top-level sections; every key is optional and falls back to the default below::

    model:    {name, num_classes, width, in_channels, checkpoint}
    data:     {source, name, image_size, channels, val_fraction, batch_size, eval_batch_size, workers, seed,
               in_memory, augment}
    train:    {epochs, optimizer, lr, momentum, nesterov, weight_decay, schedule, warmup_epochs,
               label_smoothing, amp, channels_last, grad_clip}
    compress: the fields of :class:`ltc.api.CompressConfig` (method, lam, target_sr, include, exclude, steps, ...)
    run:      {out, name, base, label, device, seed, progress, plots, threads, latency_threads, latency_repeats}
    sweep:    {lams, target_srs}
    variants: a list of {name, label, <section>: {key: value}} overriding the config for one sub-run each
              (Table 4 methods, the layer-analysis rows)

Paths (``data.source``, ``model.checkpoint``, ``run.out``, ``run.base``) are relative to the directory
``ltc`` runs from. Unknown keys raise ``ValueError`` naming the valid ones, so typos never pass silently.
Precedence: defaults < config file < command-line flags < ``--set section.key=value`` (value parsed as YAML).
Setting one of ``compress.lam`` / ``target_sr`` / ``target_speedup`` at a later level clears the others.
Keys left ``null`` are filled at run time: ``compress.device`` / ``compress.seed`` from ``run:``; the data keys
``source``, ``image_size``, ``channels``, ``val_fraction`` and ``seed`` from the base run for compress / finetune / eval
(so the model sees its data sized, normalised and split as in training), from the data itself for train.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "SECTIONS",
    "apply_sets",
    "compress_config",
    "default_config",
    "dump_config",
    "load_config",
    "merge",
    "parse_set",
    "validate",
    "variants",
]

# kind names: str, int, float, bool, strlist, floatlist, dict, any; a trailing "?" allows None
_Spec = tuple[str, Any]

_MODEL: dict[str, _Spec] = {
    "name": ("str?", None),
    "num_classes": ("int?", None),  # None: from the data
    "width": ("float", 1.0),
    "in_channels": ("int?", None),  # None: from the data
    "checkpoint": ("str?", None),  # initial weights (a model file or run folder) before training
}
_DATA: dict[str, _Spec] = {
    "source": ("str?", None),  # None: 'digits' for train, the base run's data for compress/finetune/eval
    "name": ("str?", None),  # dataset name in tables; default derived from the source
    "image_size": ("int?", None),  # None: native size (train) / the base model's (compress, eval)
    "channels": ("int?", None),
    "val_fraction": ("float?", None),  # None: 0.1 (train) / the base run's split
    "batch_size": ("int", 128),
    "eval_batch_size": ("int?", None),
    "workers": ("int", 0),
    "seed": ("int?", None),  # seed of the val split; None: run.seed (train) / the base run's
    "in_memory": ("bool?", None),
    "augment": ("bool", True),
}
_RUN: dict[str, _Spec] = {
    "out": ("str?", None),  # experiment folder; default runs/<name>
    "name": ("str?", None),  # default: the config file's stem, else <model>_<dataset>
    "base": ("str?", None),  # base run for compress/sweep; default <out>/base
    "label": ("str?", None),  # label of a compress run in tables; default the method (and λ / SR)
    "device": ("str", "auto"),
    "seed": ("int", 0),
    "progress": ("bool", True),
    "plots": ("bool", True),  # draw the rank-distribution / trajectory figures of each compression run
    "threads": ("int?", None),  # torch CPU threads; None: torch's default
    "latency_threads": ("int", 2),
    "latency_repeats": ("int", 30),
}
_SWEEP: dict[str, _Spec] = {
    "lams": ("floatlist", []),
    "target_srs": ("floatlist", []),
}


def _kind_of(annotation: Any) -> str:
    a = str(annotation).replace(" ", "")
    table = {
        "str": "str", "int": "int", "float": "float", "bool": "bool",
        "float|None": "float?", "int|None": "int?", "str|None": "str?", "bool|None": "bool?",
        "list[str]|None": "strlist?", "list[str]": "strlist", "dict[str,Any]": "dict",
    }
    return table.get(a, "any")


def _dataclass_schema(cls: Any, run_defaults: tuple[str, ...] = ()) -> dict[str, _Spec]:
    """A section's keys, kinds and defaults from the settings dataclass that validates it (one definition)."""
    out: dict[str, _Spec] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        kind = _kind_of(f.type)
        if f.name in run_defaults:  # None: taken from run.device / run.seed
            kind, default = kind.rstrip("?") + "?", None
        out[f.name] = (kind, default)
    return out


def _schema() -> dict[str, dict[str, _Spec]]:
    from .api import CompressConfig
    from .train import TrainConfig

    return {"model": _MODEL, "data": _DATA, "train": _dataclass_schema(TrainConfig),
            "compress": _dataclass_schema(CompressConfig, ("device", "seed")), "run": _RUN, "sweep": _SWEEP}


SECTIONS = ("model", "data", "train", "compress", "run", "sweep", "variants")
"""The valid top-level keys of a config file."""

_VARIANT_KEYS = ("name", "label")


def default_config() -> dict[str, Any]:
    """Every section filled with its defaults (``variants`` empty)."""
    cfg: dict[str, Any] = {sec: {k: copy.deepcopy(d) for k, (_, d) in spec.items()} for sec, spec in _schema().items()}
    cfg["variants"] = []
    return cfg


def _unknown(what: str, key: str, valid: Iterable[str], where: str) -> ValueError:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{where}unknown {what} {key!r}.{hint} Valid {what}s: {', '.join(valid)}")


def _coerce(kind: str, value: Any, name: str) -> Any:
    """Check ``value`` against ``kind`` (converting YAML strings like '1e-4' to numbers); clear errors."""
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if value is None:
        if optional or base == "any":
            return None
        raise ValueError(f"{name} must not be empty (null)")
    if base == "any":
        return value
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if base == "int":
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if base == "float":
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if isinstance(value, int | float):
            out = float(value)
        else:
            try:
                out = float(str(value))
            except ValueError:
                raise ValueError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return out
    if base == "str":
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{name} must be a string, got {value!r}")
    if base == "strlist":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    if base == "floatlist":
        items = value if isinstance(value, list | tuple) else [value]
        return [_coerce("float", v, f"{name}[{i}]") for i, v in enumerate(items)]
    if base == "dict":
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError(f"{name} must be a mapping, got {value!r}")
    raise AssertionError(f"unknown kind {kind}")


def merge(cfg: dict[str, Any], overrides: Mapping[str, Any], *, where: str = "") -> dict[str, Any]:
    """A new config: ``cfg`` with the nested ``overrides`` applied; keys and types are checked.

    ``overrides`` looks like a config file (``{"train": {"epochs": 3}}``); ``variants`` is replaced whole.
    """
    schema = _schema()
    out = copy.deepcopy(cfg)
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{where}a config must be a mapping of sections ({', '.join(SECTIONS)}), got {overrides!r}")
    for sec, body in overrides.items():
        if sec not in SECTIONS:
            raise _unknown("section", str(sec), SECTIONS, where)
        if sec == "variants":
            out["variants"] = _check_variants(body, where)
            continue
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ValueError(f"{where}section {sec!r} must be a mapping of keys, got {body!r}")
        spec = schema[sec]
        for key, value in body.items():
            if key not in spec:
                raise _unknown(f"{sec} key", str(key), spec, where)
            out[sec][key] = _coerce(spec[key][0], value, f"{where}{sec}.{key}")
        if sec == "compress":  # λ and the targets exclude each other: setting one clears the others
            goals = ("lam", "target_sr", "target_speedup")
            for key in goals:
                if body.get(key) is not None:
                    for other in goals:
                        if other != key and other not in body:
                            out[sec][other] = None
    return out


def _check_variants(body: Any, where: str) -> list[dict[str, Any]]:
    if body is None:
        return []
    if not isinstance(body, list):
        raise ValueError(f"{where}variants must be a list of {{name: ..., <section>: {{...}}}} entries")
    out = []
    names: set[str] = set()
    for i, v in enumerate(body):
        here = f"{where}variants[{i}]: "
        if not isinstance(v, Mapping) or not isinstance(v.get("name"), str) or not v["name"]:
            raise ValueError(f"{here}each variant needs a 'name' (its sub-folder), got {v!r}")
        if v["name"] in names:
            raise ValueError(f"{here}duplicate variant name {v['name']!r}")
        if "/" in v["name"] or v["name"] in (".", ".."):
            raise ValueError(f"{here}variant name {v['name']!r} must be a plain folder name")
        names.add(v["name"])
        for key in v:
            if key not in _VARIANT_KEYS and key not in SECTIONS[:-1]:
                raise _unknown("variant key", str(key), (*_VARIANT_KEYS, *SECTIONS[:-1]), here)
        # type-check the overrides now, against an empty config
        merge(default_config(), {k: val for k, val in v.items() if k not in _VARIANT_KEYS}, where=here)
        out.append(copy.deepcopy(dict(v)))
    return out


def parse_set(item: str) -> dict[str, Any]:
    """``"train.epochs=3"`` -> ``{"train": {"epochs": 3}}`` (the value is parsed as YAML)."""
    if "=" not in item:
        raise ValueError(f"--set expects section.key=value, got {item!r}")
    path, _, raw = item.partition("=")
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--set expects section.key=value (e.g. train.epochs=3), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ValueError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return {parts[0]: {parts[1]: value}}


def apply_sets(cfg: dict[str, Any], items: Iterable[str] | None) -> dict[str, Any]:
    """Apply ``--set section.key=value`` overrides in order."""
    for item in items or []:
        cfg = merge(cfg, parse_set(item), where="--set: ")
    return cfg


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check value ranges and cross-field rules that single keys cannot; returns ``cfg``.

    Checks that need the data or the model (class counts, layer globs) happen when those are loaded.
    """
    from .models import list_models

    m, d, t, r = cfg["model"], cfg["data"], cfg["train"], cfg["run"]
    if m["name"] is not None and ":" not in m["name"] and m["name"] not in list_models():
        raise ValueError(f"model.name: unknown model {m['name']!r}; available: {', '.join(list_models())}")
    for sec, key, lo in (("model", "num_classes", 1), ("model", "in_channels", 1), ("data", "image_size", 1),
                         ("data", "batch_size", 1), ("data", "eval_batch_size", 1), ("data", "workers", 0),
                         ("run", "latency_threads", 1),
                         ("run", "threads", 1),
                         ("run", "latency_repeats", 1)):
        v = cfg[sec][key]
        if v is not None and v < lo:
            raise ValueError(f"{sec}.{key} must be >= {lo}, got {v}")
    if m["width"] <= 0:
        raise ValueError(f"model.width must be > 0, got {m['width']}")
    if d["channels"] not in (None, 1, 3):
        raise ValueError(f"data.channels must be 1 or 3, got {d['channels']}")
    if d["val_fraction"] is not None and not 0 <= d["val_fraction"] < 1:
        raise ValueError(f"data.val_fraction must lie in [0, 1), got {d['val_fraction']}")
    dev = r["device"].strip().lower()
    if not (dev in ("auto", "cpu", "cuda", "mps") or dev.startswith("cuda:")):
        raise ValueError(f"run.device must be auto, cpu, cuda or cuda:N, got {r['device']!r}")
    for lam in cfg["sweep"]["lams"]:
        if lam < 0:
            raise ValueError(f"sweep.lams must be >= 0, got {lam}")
    for sr in cfg["sweep"]["target_srs"]:
        if sr < 1:
            raise ValueError(f"sweep.target_srs must be >= 1, got {sr}")
    from .train import TrainConfig

    checks = (("train", lambda: TrainConfig(**t)), ("compress", lambda: compress_config(cfg, need_ranks=False)))
    for section, build in checks:
        try:
            build()  # the settings objects' own checks: one message per bad value, whatever the entry point
        except (ValueError, ImportError) as exc:
            raise type(exc)(f"{section}: {exc}") from None
    return cfg


def compress_config(cfg: dict[str, Any], *, need_ranks: bool = True) -> Any:
    """The :class:`ltc.api.CompressConfig` of ``cfg`` (``device`` / ``seed`` default to ``run:``'s).

    ``need_ranks=False`` accepts a section with neither ``lam`` nor ``target_sr`` (a placeholder meets the
    method's rule on them): what loading a config checks (``ltc train`` / ``eval`` never need them, a sweep or the
    variants supply them) and what ``ltc finetune`` reads (the training settings only). Compressing needs them."""
    from .api import CompressConfig
    from .methods import get_method

    c = dict(cfg["compress"])
    if not need_ranks and all(c.get(k) is None for k in ("lam", "target_sr", "target_speedup")):
        c.update({"required": {"lam": 0.0}, "target": {"target_sr": 1.0}}.get(get_method(c["method"]).lam, {}))
    if c.get("device") is None:
        c["device"] = cfg["run"]["device"]
    if c.get("seed") is None:
        c["seed"] = cfg["run"]["seed"]
    return CompressConfig(**c)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                sets: Iterable[str] | None = None) -> dict[str, Any]:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (nested), then ``--set`` items.

    Returns a complete, validated config dict. ``run.name`` defaults to the file's stem.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for bad YAML, unknown keys or values.
    """
    cfg = default_config()
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        try:
            body = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{p}: not valid YAML ({exc})") from None
        cfg = merge(cfg, body or {}, where=f"{p}: ")
        if cfg["run"]["name"] is None:
            cfg["run"]["name"] = p.stem
    if overrides:
        cfg = merge(cfg, overrides)
    cfg = apply_sets(cfg, sets)
    return validate(cfg)


def variants(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, config)]``: one complete config per ``variants`` entry (label defaults to the name)."""
    out = []
    for v in cfg.get("variants") or []:
        body = {k: val for k, val in v.items() if k not in _VARIANT_KEYS}
        sub = merge(cfg, body, where=f"variant {v['name']!r}: ")
        sub["variants"] = []
        sub["run"]["label"] = v.get("label") or v["name"]
        out.append((v["name"], validate(sub)))
    return out


def dump_config(cfg: Mapping[str, Any]) -> str:
    """YAML text of a config (for ``config.yaml`` in run folders)."""
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
