"""What the benchmark scripts share (they import it by path: ``benchmarks/`` is not a package).

The machine description every result records, atomic JSON + markdown output, and the base models: the converged
CIFAR-10 bases in ``../shared/bases/`` when present, else run folders trained once with the library's own
``ltc train`` pipeline (same settings as the shared ones) and reused from ``runs/bases/``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
SHARED_BASES = SHARED / "bases"
LOCAL_BASES = REPO / "runs" / "bases"
RESULTS = REPO / "benchmarks" / "results"

DATA_FILES = {"cifar10": "cifar10-jpeg-train.zip", "pneumoniamnist": "pneumoniamnist-trainval.npz",
              "digits": "digits"}
# how the shared bases were trained (../shared/bases/README.md): every locally trained base uses the same recipe
BASE_TRAINING = {"epochs": 40, "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "seed": 0}


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine(**extra: Any) -> dict[str, Any]:
    """Platform, CPU, Python and torch versions, torch thread counts and the load average now, plus ``extra``."""
    import torch

    from ltc.utils import cpu_name

    return {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **extra,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_1m_at_start": load_average(),
    }


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    """This process's command, with the script path relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    shown = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else sys.argv[0]
    return "python " + " ".join(shlex.quote(a) for a in [shown, *sys.argv[1:]])


def write_results(stem: Path, doc: dict[str, Any], markdown: str) -> None:
    """``stem.json`` and ``stem.md``, each written atomically (a killed run keeps the previous complete files)."""
    from ltc.utils import atomic_write_text

    atomic_write_text(stem.with_suffix(".json"), json.dumps(doc, indent=1, default=str) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown)


def data_source(dataset: str) -> str:
    """The path (or name) of a dataset; a ``FileNotFoundError`` naming the expected file when it is absent."""
    name = DATA_FILES[dataset]
    if name == "digits":
        return name
    p = DATA / name
    if not p.exists():
        raise FileNotFoundError(f"{p} not found (the benchmark reads {dataset} from ../shared/data/)")
    return str(p)


def base_run(dataset: str, model: str, width: float, *, say: Any = print) -> Path:
    """The run folder of the converged base ``model`` (width ``width``) on ``dataset``: the shared one when it exists
    and loads, else ``runs/bases/<model>_w<width>_<dataset>``, trained there with :data:`BASE_TRAINING` if absent."""
    from ltc import config as cfgmod
    from ltc import pipelines, runs

    name = f"{model}_w{width:g}_{dataset}"
    for root in (SHARED_BASES, LOCAL_BASES):
        folder = root / name
        if (folder / runs.RESULT_NAME).is_file() and (folder / runs.MODEL_NAME).is_file():
            try:
                runs.load_model(folder)
                return folder
            except (ValueError, RuntimeError) as exc:  # e.g. the zoo's parameter names changed
                say(f"[base] {folder} does not load ({exc}); retraining it")
    out = LOCAL_BASES / name
    say(f"[base] training {name} with ltc train ({BASE_TRAINING['epochs']} epochs) -> {out}")
    cfg = cfgmod.load_config(overrides={
        "model": {"name": model, "width": width},
        "data": {"source": data_source(dataset)},
        "train": {k: v for k, v in BASE_TRAINING.items() if k != "seed"},
        "run": {"seed": BASE_TRAINING["seed"], "progress": False},
    })
    pipelines.train_run(cfg, out, resume=True, say=say)
    return out


PROVENANCE = "provenance.json"
"""Written by hand (or by this script before 2026-12-08) into a base folder whose result.json predates
``written_by``: ``{commit, date, ...}``."""


def base_record(folder: Path, dataset: str, width: float) -> dict[str, Any]:
    """``{dataset, model, width, train_images, val_images, epochs, val_acc, val_acc_last10, path}`` of a base run,
    plus ``trained`` (commit and date) where the record says what wrote it (``written_by`` in its result.json, or a
    :data:`PROVENANCE` file beside it): a base retrained on another machine or commit need not repeat the earlier
    one's curve bit for bit, so the summary names which one it used."""
    from ltc.results import RunResult

    r = RunResult.read(folder / "result.json")
    accs = [h.get("val_acc") for h in r.history if h.get("val_acc") is not None]
    sizes = r.data.get("sizes", {})
    rec = {"dataset": dataset, "model": r.model, "width": width, "train_images": sizes.get("train"),
           "val_images": sizes.get("val"), "epochs": r.epochs, "val_acc": r.acc, "val_acc_last10": accs[-10:],
           "path": os.path.relpath(folder, REPO)}
    prov = folder / PROVENANCE
    made = r.written_by or (json.loads(prov.read_text()) if prov.is_file() else {})
    if made:
        rec["trained"] = {"commit": made.get("commit"), "date": made.get("date"), "ltc": made.get("ltc")}
    return rec
