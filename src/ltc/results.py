"""``result.json``: the record of one run, owned here.

:class:`RunResult` is the schema (versioned): the pipelines write it, ``ltc report`` / ``ltc plot`` / the
benchmarks read it back through :meth:`RunResult.read`. Two kinds: ``"train"`` (a base model: its accuracy,
MACs and params) and ``"compress"`` (a compressed model: method, ranks, base and compressed profile, accuracies,
latency, the LC history). Units: MACs per sample, accuracies as fractions in [0, 1], seconds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .utils import atomic_write_text, environment, is_main_process, json_safe, read_json

__all__ = ["SCHEMA_VERSION", "RunResult"]

SCHEMA_VERSION = 1
_REQUIRED = {"train": ("acc", "macs", "params"), "compress": ("method", "base", "compressed")}


@dataclass
class RunResult:
    """One run's outcome.

    Common: ``kind`` ('train' or 'compress'), ``model`` (zoo name or class name), ``dataset``, ``data`` (how the
    data was read: source, size, normalisation, classes, split), ``config`` (the resolved run config),
    ``seconds``, ``model_config`` (what rebuilds a zoo model).

    ``train``: ``acc``, ``macs``, ``params``, ``epochs``, ``history`` (per-epoch rows).

    ``compress``: ``label``, ``method``, ``lam``, ``target_sr``, ``sr``, ``cr``, ``base`` / ``compressed``
    (``{"macs", "params", "acc"}``; compressed also ``"acc_before_finetune"``), ``ranks`` / ``full_ranks``,
    ``plan`` (epochs per phase), ``w_theta_final``, ``speedup`` (with ``target_speedup``: target, predicted and
    measured speed-up and the corrections), ``latency`` (``{"batch1": compare_latency(...)}``),
    ``history`` (one row per C step), ``log`` (one row per epoch), ``compress_config``, ``base_run``.
    ``finetune``: set by ``ltc finetune`` (``{"from", "epochs", "lr", "acc_before", "history"}``).
    ``written_by``: set by :meth:`write`, the environment that wrote the record (:func:`ltc.utils.environment`:
    ltc version and source commit, torch, Python, platform, CPU, date); empty in records from before it existed.
    """

    kind: str
    model: str
    dataset: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    model_config: dict[str, Any] | None = None
    acc: float | None = None
    macs: int | None = None
    params: int | None = None
    epochs: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    label: str | None = None
    method: str | None = None
    lam: float | None = None
    target_sr: float | None = None
    sr: float | None = None
    cr: float | None = None
    base: dict[str, Any] | None = None
    compressed: dict[str, Any] | None = None
    ranks: dict[str, Any] = field(default_factory=dict)
    full_ranks: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    w_theta_final: float | None = None
    speedup: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    compress_config: dict[str, Any] = field(default_factory=dict)
    base_run: str | None = None
    finetune: dict[str, Any] | None = None
    written_by: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.kind not in _REQUIRED:
            raise ValueError(f"a run result's kind must be 'train' or 'compress', got {self.kind!r}")

    @classmethod
    def from_compression(cls, result: Any, **fields: Any) -> RunResult:
        """A ``compress`` record from an :class:`ltc.api.Result` plus the pipeline's fields (model, dataset, ...)."""
        d = result.to_dict()
        d["compress_config"] = d.pop("config")
        return cls(kind="compress", **d, **fields)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "result") -> RunResult:
        """Validate and build; ``where`` names the source in error messages."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} holds a JSON {type(data).__name__}, expected an object (a run result)")
        schema = data.get("schema", SCHEMA_VERSION)
        if schema != SCHEMA_VERSION:
            raise ValueError(f"{where} has result schema {schema!r}, this ltc reads {SCHEMA_VERSION}; re-run it")
        kind = data.get("kind", "compress")
        if kind not in _REQUIRED:
            raise ValueError(f"{where}: unknown run kind {kind!r} (expected 'train' or 'compress')")
        # a base model trained without validation data has no accuracy: "acc" must be there, but may be null
        missing = [k for k in (*_REQUIRED[kind], "model") if k not in data or (data[k] is None and k != "acc")]
        if missing:
            what = "base-model (kind 'train')" if kind == "train" else "compression"
            raise ValueError(f"{where}: {what} result lacks the key(s) {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names and k != "kind"}, kind=kind)

    def write(self, path: str | Path) -> None:
        """Atomically write the JSON record (main process only), stamped with the environment writing it
        (``written_by``)."""
        if is_main_process():
            self.written_by = environment()
            atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> RunResult:
        """Read a ``result.json``; clear errors for a missing, broken or foreign file."""
        return cls.from_dict(read_json(path, hint="re-run or delete that run folder"), where=str(path))
