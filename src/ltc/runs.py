"""Run folders: what ``ltc train`` / ``ltc compress`` write, and how the other commands read them back.

A run folder holds::

    result.json   the outcome: an ltc.results.RunResult (kind "train" or "compress"; schema there), with
                  written_by: the ltc version and commit, torch, CPU and date that wrote it
    model.pt      the model (ltc.save: safe to load, rebuilds zoo models, factorised and resized layers)
    run.json      written when a training run starts: model config and data description (lets an unfinished
                  run's checkpoint.pt be evaluated)
    config.yaml   the resolved config the run used
    log.csv       one row per epoch
    checkpoint.pt the resumable checkpoint of ltc.train.fit (--resume), whatever wrote it

Only the main process (rank 0 under torchrun) writes.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .utils import atomic_write_text, is_main_process, json_safe, read_json

__all__ = [
    "CONFIG_NAME",
    "canonical_source",
    "MODEL_NAME",
    "RESULT_NAME",
    "RUN_NAME",
    "TRAIN_CHECKPOINT",
    "LoadedModel",
    "dataset_key",
    "data_info",
    "expand_runs",
    "load_model",
    "prepare_out",
    "read_json",
    "save_model",
    "write_json",
    "write_rows_csv",
]

RESULT_NAME = "result.json"
MODEL_NAME = "model.pt"
RUN_NAME = "run.json"
CONFIG_NAME = "config.yaml"
TRAIN_CHECKPOINT = "checkpoint.pt"
_RUN_FILES = (RESULT_NAME, MODEL_NAME, RUN_NAME, CONFIG_NAME, TRAIN_CHECKPOINT, "compress.pt", "finetune.pt",
              "log.csv", "log.jsonl")


def dataset_key(source: str) -> str:
    """A short dataset name for tables from a data source (``'../data/cifar10-jpeg-train.zip' -> 'cifar10'``)."""
    raw = str(source).rstrip("/\\").replace("\\", "/")
    stem = raw.split("/")[-1] or raw
    stem = re.sub(r"(\.tar\.gz|\.tgz|\.tar|\.zip|\.npz)$", "", stem, flags=re.I).lower()
    for pat, key in ((r"cifar-?100", "cifar100"), (r"cifar", "cifar10"), (r"pneumonia", "pneumoniamnist"),
                     (r"chest[-_]?x[-_]?ray", "chest_xray")):
        if re.search(pat, stem):
            return key
    return stem or "data"


def canonical_source(source: str | Path) -> str:
    """An existing path as an absolute path (so later commands find it from any folder); anything else as is."""
    if not str(source) or str(source) == "digits":
        return str(source)
    p = Path(str(source)).expanduser()
    return str(p.resolve()) if p.exists() else str(source)


def data_info(bundle: Any, *, val_fraction: float, seed: int, name: str | None = None) -> dict[str, Any]:
    """The JSON description of a :class:`ltc.data.DataBundle` that later commands need to feed the model
    the same way (size, channels, normalisation, class order, the val split)."""
    return {
        "source": canonical_source(bundle.source),
        "name": name or dataset_key(bundle.source),
        "format": bundle.format,
        "image_size": bundle.image_size,
        "channels": bundle.in_channels,
        "num_classes": bundle.num_classes,
        "classes": list(bundle.classes),
        "mean": list(bundle.mean),
        "std": list(bundle.std),
        "val_fraction": val_fraction,
        "seed": seed,
        "val_from": bundle.val_from,
        "sizes": {k: (len(v) if v is not None else 0) for k, v in
                  (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))},
    }


# ------------------------------------------------------------------------------------------- writing


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (main process only; NaN written as null-safe strings)."""
    if not is_main_process():
        return
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, default=str) + "\n")


def write_rows_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Atomically write ``rows`` as CSV with the union of their keys as header (main process only)."""
    if not is_main_process():
        return
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="", extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items() if not isinstance(v, dict | list)})
    atomic_write_text(path, buf.getvalue())


def save_model(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Save with :func:`ltc.save` (main process only)."""
    if not is_main_process():
        return
    from .serialization import save

    save(model, path, meta=json_safe(meta or {}))


def prepare_out(out: str | Path, *, resume: bool, overwrite: bool, what: str = "run") -> Path:
    """Create ``out``; refuse to clobber a finished or started run unless ``resume`` or ``overwrite``.

    With ``overwrite`` the run files of a previous run (result, model, checkpoints, logs) are deleted first.
    """
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"output path {p} exists and is not a folder")
    present = [f for f in _RUN_FILES if (p / f).exists()]
    if present and not resume and not overwrite:
        raise ValueError(
            f"{p} already holds a {what} ({', '.join(present[:3])}); pass --resume to continue it, "
            "--overwrite to start afresh, or --out another folder"
        )
    if is_main_process():
        if overwrite and not resume:
            for f in present:
                (p / f).unlink()
        p.mkdir(parents=True, exist_ok=True)
    return p


def remove_tree(path: str | Path) -> None:
    """Delete a folder (main process only)."""
    if is_main_process():
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- reading


class LoadedModel:
    """A model read back from a run folder or file, with what is known about how it was trained.

    ``model`` (eval mode, CPU), ``name`` (zoo name or the architecture's class name), ``data`` (the
    :func:`data_info` dict, possibly empty), ``result`` (the run's result.json, possibly empty), ``run_dir``
    (the folder, or None for a lone file), ``path`` (the model file read).
    """

    def __init__(self, model: nn.Module, *, path: Path, run_dir: Path | None, data: dict[str, Any],
                 result: dict[str, Any], meta: dict[str, Any]) -> None:
        self.model, self.path, self.run_dir = model, path, run_dir
        self.data, self.result, self.meta = data, result, meta
        cfg = getattr(model, "ltc_config", None) or {}
        self.name: str = str(meta.get("model") or result.get("model") or cfg.get("name") or type(model).__name__)

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` the model was trained on, if known."""
        if self.data.get("image_size") and self.data.get("channels"):
            s = int(self.data["image_size"])
            return int(self.data["channels"]), s, s
        return None

    @property
    def dataset(self) -> str:
        return str(self.meta.get("dataset") or self.result.get("dataset") or self.data.get("name") or "")


def load_model(ref: str | Path) -> LoadedModel:
    """Load a model from a run folder (its ``model.pt``), an ltc model file, or a training checkpoint
    (``checkpoint.pt`` of an unfinished ``ltc train`` run, rebuilt from the folder's ``run.json``)."""
    from .serialization import load, read_info

    p = Path(ref).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no run folder or model file at {p}")
    run_dir: Path | None = None
    if p.is_dir():
        run_dir = p
        p = p / MODEL_NAME
        if not p.is_file():
            if (run_dir / TRAIN_CHECKPOINT).is_file() and (run_dir / RUN_NAME).is_file():
                p = run_dir / TRAIN_CHECKPOINT
            else:
                subs = sorted(q.parent.name for q in run_dir.glob(f"*/{MODEL_NAME}"))
                hint = f"; its sub-folders {', '.join(subs[:5])} have one" if subs else ""
                raise FileNotFoundError(f"run folder {run_dir} has no {MODEL_NAME}{hint}")
    elif (p.parent / RESULT_NAME).is_file() or (p.parent / RUN_NAME).is_file():
        run_dir = p.parent
    result = read_json(run_dir / RESULT_NAME) if run_dir and (run_dir / RESULT_NAME).is_file() else {}
    run_json = read_json(run_dir / RUN_NAME) if run_dir and (run_dir / RUN_NAME).is_file() else {}
    if _is_fit_checkpoint(p):
        if not run_json.get("model_config"):
            raise ValueError(f"{p} is a training checkpoint; its folder has no {RUN_NAME} to rebuild the model from")
        from .models import create

        model = create(**run_json["model_config"])
        from .train import read_checkpoint

        model.load_state_dict(read_checkpoint(p)["model"])
        model.eval()
        meta: dict[str, Any] = {"model": run_json.get("model"), "dataset": run_json.get("dataset")}
    else:
        model = load(p)
        meta = read_info(p)["meta"]
    data = dict(meta.get("data") or result.get("data") or run_json.get("data") or {})
    return LoadedModel(model, path=p, run_dir=run_dir, data=data, result=result, meta=meta)


def _is_fit_checkpoint(p: Path) -> bool:
    if p.name != TRAIN_CHECKPOINT:
        return False
    from .train import read_checkpoint

    try:
        return read_checkpoint(p).get("writer") == "ltc.fit"
    except ValueError:
        return False


def expand_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders from the given paths: a folder with ``result.json`` is a run; a folder without one stands
    for every run folder below it (sorted); a ``result.json`` file stands for its folder. Folders holding no run
    at all (e.g. a report folder caught by ``runs/*``) are skipped as long as some run is found; a path that
    does not exist is an error."""
    out: list[Path] = []
    empty: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_file() and p.name == RESULT_NAME:
            p = p.parent
        if p.is_dir() and not (p / RESULT_NAME).is_file():
            found = sorted(q.parent for q in p.rglob(RESULT_NAME))
            if not found:
                empty.append(p)
            out += found
        elif p.is_dir():
            out.append(p)
        else:
            raise FileNotFoundError(f"no run folder at {p}")
    if not out:
        where = ", ".join(str(p) for p in empty) or "the given paths"
        raise FileNotFoundError(f"no run folder (with a {RESULT_NAME}) in or below {where}")
    return list(dict.fromkeys(out))
