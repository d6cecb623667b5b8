"""Tables from run folders, in the slides' layouts (Tables 1–4) plus a λ sweep.

A run folder holds ``result.json``, an :class:`ltc.results.RunResult` (kind ``"compress"`` or ``"train"``), read
back through it. Units: MACs are multiply-accumulates per sample (the slides'
"FLOPs" columns count MACs; FLOPs = 2·MACs), SR = base MACs / compressed MACs, CR = base params / compressed
params, accuracies are stored as fractions and printed as percentages.

Pure Python (json + csv); no matplotlib here (see :mod:`ltc.plots`)::

    runs = load_runs(["runs/base", "runs/ltc_sr5", "runs/vbmf"])
    write_tables({"table1": table1(runs), "table4": table4(runs)}, "runs/report")
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results import RunResult

__all__ = [
    "RESULT_NAME",
    "MACS_NOTE",
    "Table",
    "dataset_name",
    "fmt_acc",
    "fmt_count",
    "fmt_lam",
    "fmt_ratio",
    "is_train_run",
    "load_runs",
    "method_name",
    "model_name",
    "pick_unit",
    "run_label",
    "sweep_table",
    "table1",
    "table4",
    "table_layers",
    "write_tables",
]

RESULT_NAME = "result.json"
MACS_NOTE = (
    "MACs are multiply-accumulates per sample (conv + linear); the slides' \"FLOPs\" columns count MACs "
    "(FLOPs = 2·MACs). SR = base MACs / compressed MACs (theoretical), CR = base params / compressed params."
)
DASH = "—"
_TEXT_COLUMNS = {"Dataset", "Model", "Method", "Run"}  # left-aligned in markdown; the rest are numbers

_UNITS = (("G", 1e9), ("M", 1e6), ("K", 1e3), ("", 1.0))
_METHOD_NAMES = {
    "ltc": "LTC",
    "lrc": "LRC",
    "vbmf": "Tucker-VBMF",
    "oneshot": "Tucker one-shot",
    "uniform": "Tucker uniform",
}
_METHOD_ORDER = ["uniform", "oneshot", "vbmf", "lrc", "ltc"]
_MODEL_NAMES = {
    "resnet18": "ResNet-18",
    "resnet34": "ResNet-34",
    "resnet34_cifar": "ResNet-34",
    "resnet50": "ResNet-50",
    "vgg16": "VGG-16",
    "vgg16_cifar": "VGG-16",
    "mobilenet_v2": "MobileNetV2",
    "shufflenet_v2": "ShuffleNetV2",
    "small_cnn": "SmallCNN",
}
_DATASET_NAMES = {
    "cifar10": "CIFAR-10",
    "cifar": "CIFAR-10",
    "cifar-10": "CIFAR-10",
    "cifar-10-batches-py": "CIFAR-10",
    "cifar-10-python": "CIFAR-10",
    "pneumoniamnist": "PneumoniaMNIST",
    "chest_xray": "Chest X-Ray",
    "chest-xray": "Chest X-Ray",
    "chestxray": "Chest X-Ray",
    "digits": "Digits",
}


# --------------------------------------------------------------------------------------------- loading


def load_runs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read ``result.json`` of each run folder (or each ``result.json`` path given directly).

    Every returned dict is the JSON object plus ``"_path"`` (the folder, as a string).
    Raises ``FileNotFoundError`` (no such path / no result.json) or ``ValueError`` (broken JSON, not an
    object, required keys missing); the message names the path.
    """
    runs = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            file = path / RESULT_NAME
            if not file.is_file():
                subs = sorted(q.parent.name for q in path.glob(f"*/{RESULT_NAME}"))
                more = " …" if len(subs) > 5 else ""
                hint = f"; its sub-folders {', '.join(subs[:5])}{more} have one: pass those" if subs else ""
                raise FileNotFoundError(f"run folder {path} has no {RESULT_NAME}{hint}")
        elif path.is_file():
            file = path
        else:
            raise FileNotFoundError(f"no run folder or {RESULT_NAME} at {path}")
        data = RunResult.read(file).to_dict()
        data["_path"] = str(file.parent)
        runs.append(data)
    return runs


def is_train_run(run: dict[str, Any]) -> bool:
    """True for a base-model run (``ltc train``), False for a compression run."""
    return run.get("kind") == "train"


# ------------------------------------------------------------------------------------------- formatting


def pick_unit(values: Iterable[float | None], *, floor: str = "", min_shown: float = 0.01) -> tuple[str, float]:
    """The largest of G/M/K/'' in which every (non-zero) value reads at least ``min_shown``, e.g. ``('G', 1e9)``.

    ``floor`` is the smallest unit allowed (``'K'`` never goes below K). Table 1 uses ``min_shown=0.01`` (the
    slides print 0.01 G); the layer and sweep tables use 0.1 so that close values stay apart (Table 3: M).
    """
    vals = [abs(float(v)) for v in values if v is not None and float(v) != 0 and math.isfinite(float(v))]
    units = _UNITS[: [u for u, _ in _UNITS].index(floor) + 1]
    if not vals:
        return units[0]
    low = min(vals)
    for unit, scale in units:
        if low / scale >= min_shown * (1 - 1e-9):
            return unit, scale
    return units[-1]


def fmt_count(n: float | None, scale: float = 1e9) -> str:
    """A count in the unit ``scale`` with 2 decimals (``3.664e9 -> '3.66'`` for G); None → '—'."""
    return DASH if n is None else f"{float(n) / scale:.2f}"


def fmt_ratio(x: float | None) -> str:
    """SR / CR with 2 decimals; None → '—'."""
    return DASH if x is None or not math.isfinite(float(x)) else f"{float(x):.2f}"


def fmt_acc(a: float | None) -> str:
    """Accuracy fraction → percent with 2 decimals (``0.9189 -> '91.89'``); None → '—'."""
    return DASH if a is None else f"{100 * float(a):.2f}"


def fmt_lam(lam: float | None) -> str:
    """λ with 3 significant digits (``0.001``, ``1e-05``)."""
    return DASH if lam is None else f"{float(lam):.3g}"


def model_name(run: dict[str, Any]) -> str:
    """Display name of the run's model (``vgg16_cifar -> 'VGG-16'``); unknown names are kept as is."""
    raw = str(run.get("model") or (run.get("config") or {}).get("model") or "model")
    return _MODEL_NAMES.get(raw.lower(), raw)


def dataset_name(run: dict[str, Any]) -> str:
    """Display name of the run's dataset (``cifar10 -> 'CIFAR-10'``; a path → its base name)."""
    raw = str(run.get("dataset") or "")
    if not raw:
        return "dataset"
    key = raw.rstrip("/\\").replace("\\", "/").split("/")[-1]
    key = re.sub(r"(\.tar\.gz|\.tgz|\.tar|\.zip|\.npz)$", "", key, flags=re.I)
    return _DATASET_NAMES.get(key.lower(), key)


def method_name(run: dict[str, Any]) -> str:
    """Display name of the run's method (``ltc -> 'LTC'``, ``vbmf -> 'Tucker-VBMF'``)."""
    if is_train_run(run):
        return "base"
    raw = str(run.get("method", "?"))
    return _METHOD_NAMES.get(raw.lower(), raw)


def run_label(run: dict[str, Any]) -> str:
    """The run's free-text label, or its method name."""
    return str(run.get("label") or method_name(run))


def _method_key(run: dict[str, Any]) -> tuple[int, str]:
    m = str(run.get("method", "")).lower()
    return (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else len(_METHOD_ORDER), m)


def _lam(run: dict[str, Any]) -> float:
    lam = run.get("lam")
    return float(lam) if isinstance(lam, int | float) else math.nan


def _group_key(run: dict[str, Any]) -> tuple[str, str]:
    return (str(run.get("dataset") or ""), str(run.get("model") or ""))


def _ordered_groups(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(_group_key(r), []).append(r)
    return groups


def _base_of(group: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """``{macs, params, acc}`` of the group's base model: a train run if any, else the first compression run's
    ``base`` record (its accuracy filled from another run if missing)."""
    for r in group:
        if is_train_run(r):
            return {"macs": r.get("macs"), "params": r.get("params"), "acc": r.get("acc")}
    comp = [r for r in group if not is_train_run(r)]
    if not comp:
        return None
    base = dict(comp[0].get("base") or {})
    if base.get("acc") is None:
        base["acc"] = next(((r.get("base") or {}).get("acc") for r in comp if (r.get("base") or {}).get("acc")
                            is not None), None)
    return base


def _distinct_names(runs: Sequence[dict[str, Any]], *, with_model: bool = False) -> list[str]:
    """Row names for compression runs: method (+ model); where several runs of one dataset share a name, a
    suffix tells them apart (label, else target SR and λ, else λ, else the run folder)."""
    base = [method_name(r) + (f" ({model_name(r)})" if with_model else "") for r in runs]
    scope = [str(r.get("dataset") or "") for r in runs]
    out = []
    for i, r in enumerate(runs):
        name = base[i]
        peers = [j for j in range(len(runs)) if base[j] == name and scope[j] == scope[i]]
        if len(peers) > 1:
            def tag(q: dict[str, Any]) -> str:
                if q.get("label"):
                    return str(q["label"])
                if q.get("target_sr") is not None:
                    return f"target SR {float(q['target_sr']):g}, λ={fmt_lam(q.get('lam'))}"
                return f"λ={fmt_lam(q.get('lam'))}"

            extra = tag(r)
            if sum(tag(runs[j]) == extra for j in peers) > 1 and r.get("_path"):
                extra = Path(str(r["_path"])).name
            name = f"{name} [{extra}]"
        out.append(name)
    return out


# ------------------------------------------------------------------------------------------------ Table


@dataclass
class Table:
    """A formatted table: ``rows`` are dicts column → string, ``values`` the same rows with raw numbers."""

    columns: list[str]
    rows: list[dict[str, str]]
    title: str = ""
    notes: list[str] = field(default_factory=list)
    values: list[dict[str, Any]] = field(default_factory=list)

    def to_markdown(self) -> str:
        """A GitHub-flavoured markdown table with the title above and the notes below."""

        def cell(s: Any) -> str:
            return str(s).replace("|", "\\|").replace("\n", " ")

        lines = [f"**{self.title}**", ""] if self.title else []
        lines.append("| " + " | ".join(cell(c) for c in self.columns) + " |")
        lines.append("|" + "|".join("---" if c in _TEXT_COLUMNS else "---:" for c in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(cell(row.get(c, "")) for c in self.columns) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"{n}" for n in self.notes)
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """CSV with a header row (no title or notes, so ``csv.DictReader`` gives back ``rows``)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for row in self.rows:
            w.writerow({c: row.get(c, "") for c in self.columns})
        return buf.getvalue()

    def __str__(self) -> str:
        return self.to_markdown()


def write_tables(tables: dict[str, Table], out_dir: str | Path) -> list[Path]:
    """Write ``<name>.md`` and ``<name>.csv`` for each table atomically; returns the paths written."""
    from .utils import atomic_write_text

    out = Path(out_dir)
    written = []
    for name, table in tables.items():
        for ext, text in (("md", table.to_markdown()), ("csv", table.to_csv())):
            p = out / f"{name}.{ext}"
            atomic_write_text(p, text)
            written.append(p)
    return written


# ----------------------------------------------------------------------------------------------- tables


def table1(runs: Sequence[dict[str, Any]]) -> Table:
    """Slides' Table 1: per dataset and model a base row (MACs, SR 1.00, params, acc) then the method rows."""
    groups = _ordered_groups(runs)
    all_macs = [v for g in groups.values() for v in _macs_values(g)]
    all_params = [v for g in groups.values() for v in _params_values(g)]
    mu, ms = pick_unit(all_macs, floor="K")
    pu, ps = pick_unit(all_params, floor="K")
    mcol, pcol = f"MACs ({mu})", f"Params ({pu})"
    has_lat = any(isinstance(r.get("latency"), dict) for r in runs)
    columns = ["Dataset", "Model", mcol, "SR", pcol, "CR", "Acc (%)"]
    if has_lat:
        columns.append("Measured speed-up (batch 1)")
    table = Table(columns, [], title="Table 1: base and compressed networks", notes=[MACS_NOTE])
    last_ds = None
    for (_, _), group in groups.items():
        base = _base_of(group)
        comp = sorted((r for r in group if not is_train_run(r)), key=lambda r: (_method_key(r), _lam(r)))
        ds = dataset_name(group[0])
        show_ds = ds if ds != last_ds else ""
        last_ds = ds
        if base is not None:
            vals = {"Dataset": ds, "Model": model_name(group[0]), mcol: base.get("macs"), "SR": 1.0,
                    pcol: base.get("params"), "CR": 1.0, "Acc (%)": base.get("acc")}
            row = {"Dataset": show_ds, "Model": model_name(group[0]), mcol: fmt_count(base.get("macs"), ms),
                   "SR": fmt_ratio(1.0), pcol: fmt_count(base.get("params"), ps), "CR": fmt_ratio(1.0),
                   "Acc (%)": fmt_acc(base.get("acc"))}
            if has_lat:
                row[columns[-1]] = fmt_ratio(1.0)
            table.rows.append(row)
            table.values.append(vals)
            show_ds = ""
        for r, name in zip(comp, _distinct_names(comp), strict=True):
            c = r.get("compressed") or {}
            vals = {"Dataset": ds, "Model": name, mcol: c.get("macs"), "SR": r.get("sr"), pcol: c.get("params"),
                    "CR": r.get("cr"), "Acc (%)": c.get("acc")}
            row = {"Dataset": show_ds, "Model": name, mcol: fmt_count(c.get("macs"), ms), "SR": fmt_ratio(r.get("sr")),
                   pcol: fmt_count(c.get("params"), ps), "CR": fmt_ratio(r.get("cr")), "Acc (%)": fmt_acc(c.get("acc"))}
            if has_lat:
                sp = ((r.get("latency") or {}).get("batch1") or {}).get("speedup")
                row[columns[-1]] = fmt_ratio(sp)
                vals[columns[-1]] = sp
            table.rows.append(row)
            table.values.append(vals)
            show_ds = ""
    if has_lat:
        table.notes.append("Measured speed-up: wall-clock time of the base / compressed model at batch size 1.")
    return table


def _macs_values(group: Sequence[dict[str, Any]]) -> list[float | None]:
    out: list[float | None] = []
    for r in group:
        if is_train_run(r):
            out.append(r.get("macs"))
        else:
            out += [(r.get("base") or {}).get("macs"), (r.get("compressed") or {}).get("macs")]
    return out


def _params_values(group: Sequence[dict[str, Any]]) -> list[float | None]:
    out: list[float | None] = []
    for r in group:
        if is_train_run(r):
            out.append(r.get("params"))
        else:
            out += [(r.get("base") or {}).get("params"), (r.get("compressed") or {}).get("params")]
    return out


def table_layers(runs: Sequence[dict[str, Any]]) -> Table:
    """Slides' Tables 2/3 (structural analysis): per dataset and model the base row then one row per run,
    named by its ``label`` (e.g. "Layer1", "Conv2-13"), with MACs, params and accuracy, in input order."""
    groups = _ordered_groups(runs)
    mu, ms = pick_unit([v for g in groups.values() for v in _macs_values(g)], floor="K", min_shown=0.1)
    pu, ps = pick_unit([v for g in groups.values() for v in _params_values(g)], floor="K", min_shown=0.1)
    mcol, pcol = f"MACs ({mu})", f"Params ({pu})"
    columns = ["Dataset", "Model", mcol, pcol, "Acc (%)"]
    titles = ", ".join(f"{model_name(g[0])} on {dataset_name(g[0])}" for g in groups.values())
    table = Table(columns, [], title=f"Structural analysis of {titles}" if titles else "Structural analysis",
                  notes=[MACS_NOTE, "Each row compresses only the named layers; the others stay dense."])
    for group in groups.values():
        ds, model = dataset_name(group[0]), model_name(group[0])
        base = _base_of(group)
        first = True
        if base is not None:
            table.rows.append({"Dataset": ds, "Model": model, mcol: fmt_count(base.get("macs"), ms),
                               pcol: fmt_count(base.get("params"), ps), "Acc (%)": fmt_acc(base.get("acc"))})
            table.values.append({"Dataset": ds, "Model": model, mcol: base.get("macs"), pcol: base.get("params"),
                                 "Acc (%)": base.get("acc")})
            first = False
        for r in group:
            if is_train_run(r):
                continue
            c = r.get("compressed") or {}
            label = run_label(r)
            table.rows.append({"Dataset": ds if first else "", "Model": label, mcol: fmt_count(c.get("macs"), ms),
                               pcol: fmt_count(c.get("params"), ps), "Acc (%)": fmt_acc(c.get("acc"))})
            table.values.append({"Dataset": ds, "Model": label, mcol: c.get("macs"), pcol: c.get("params"),
                                 "Acc (%)": c.get("acc")})
            first = False
    return table


def table4(runs: Sequence[dict[str, Any]]) -> Table:
    """Slides' Table 4 (comparison): rows = method (model); per dataset the columns SR, CR, Acc (%),
    Δacc vs the base (percentage points) and the accuracy before fine-tuning.

    Base-model runs of a model that some compression run compressed give the Δacc reference; other base-model
    runs (e.g. MobileNetV2 trained from scratch) become rows named by the model, with SR and CR '/' as in the
    slides.
    """
    datasets: list[str] = []
    for r in runs:
        if (d := str(r.get("dataset") or "")) not in datasets:
            datasets.append(d)
    compressed_models = {_group_key(r) for r in runs if not is_train_run(r)}
    groups = _ordered_groups(runs)
    base_acc = {k: (_base_of(g) or {}).get("acc") for k, g in groups.items()}

    # row key -> display name; ordered: lightweight nets first, then by model, then by method
    light = [r for r in runs if is_train_run(r) and _group_key(r) not in compressed_models]
    comp = [r for r in runs if not is_train_run(r)]
    models = list(dict.fromkeys(str(r.get("model") or "") for r in comp))
    comp.sort(key=lambda r: (models.index(str(r.get("model") or "")), _method_key(r), _lam(r)))
    names = _distinct_names(comp, with_model=True)
    light_names = [model_name(r) for r in light]

    def cols(ds_raw: str) -> list[str]:
        ds = dataset_name({"dataset": ds_raw})
        return [f"{ds} SR", f"{ds} CR", f"{ds} Acc (%)", f"{ds} ΔAcc (pp)", f"{ds} Acc before FT (%)"]

    columns = ["Method"] + [c for d in datasets for c in cols(d)]
    table = Table(columns, [], title="Table 4: comparison of compression methods and lightweight networks",
                  notes=[MACS_NOTE, "ΔAcc: compressed minus base accuracy in percentage points; "
                                    "FT: fine-tuning. '/' = not applicable."])
    order = list(dict.fromkeys(light_names + names))
    rows: dict[str, dict[str, str]] = {n: {"Method": n} for n in order}
    vals: dict[str, dict[str, Any]] = {n: {"Method": n} for n in order}
    for r, n in zip(light, light_names, strict=True):
        c = cols(str(r.get("dataset") or ""))
        rows[n].update({c[0]: "/", c[1]: "/", c[2]: fmt_acc(r.get("acc")), c[3]: "/", c[4]: "/"})
        vals[n].update({c[2]: r.get("acc")})
    for r, n in zip(comp, names, strict=True):
        c = cols(str(r.get("dataset") or ""))
        cc = r.get("compressed") or {}
        acc, b = cc.get("acc"), base_acc.get(_group_key(r))
        drop = None if acc is None or b is None else 100 * (float(acc) - float(b))
        rows[n].update({c[0]: fmt_ratio(r.get("sr")), c[1]: fmt_ratio(r.get("cr")), c[2]: fmt_acc(acc),
                        c[3]: DASH if drop is None else f"{drop:+.2f}", c[4]: fmt_acc(cc.get("acc_before_finetune"))})
        vals[n].update({c[0]: r.get("sr"), c[1]: r.get("cr"), c[2]: acc, c[3]: drop,
                        c[4]: cc.get("acc_before_finetune")})
    for n in order:
        table.rows.append({c: rows[n].get(c, "/") for c in columns})
        table.values.append(vals[n])
    return table


def sweep_table(runs: Sequence[dict[str, Any]]) -> Table:
    """λ sweep: one row per compression run sorted by λ (then model/method): λ, SR, CR, MACs, params, acc."""
    comp = sorted((r for r in runs if not is_train_run(r)),
                  key=lambda r: (_lam(r) if not math.isnan(_lam(r)) else math.inf, _group_key(r), _method_key(r)))
    hetero = len({(_group_key(r), r.get("method")) for r in comp}) > 1
    mu, ms = pick_unit([(r.get("compressed") or {}).get("macs") for r in comp], floor="K", min_shown=0.1)
    pu, ps = pick_unit([(r.get("compressed") or {}).get("params") for r in comp], floor="K", min_shown=0.1)
    mcol, pcol = f"MACs ({mu})", f"Params ({pu})"
    columns = (["Run"] if hetero else []) + ["λ", "SR", "CR", mcol, pcol, "Acc (%)", "Acc before FT (%)"]
    title = "λ sweep" if hetero or not comp else f"λ sweep: {method_name(comp[0])} on {model_name(comp[0])}, " \
                                                 f"{dataset_name(comp[0])}"
    table = Table(columns, [], title=title, notes=[MACS_NOTE])
    for r in comp:
        c = r.get("compressed") or {}
        row = {"λ": fmt_lam(r.get("lam")), "SR": fmt_ratio(r.get("sr")), "CR": fmt_ratio(r.get("cr")),
               mcol: fmt_count(c.get("macs"), ms), pcol: fmt_count(c.get("params"), ps),
               "Acc (%)": fmt_acc(c.get("acc")), "Acc before FT (%)": fmt_acc(c.get("acc_before_finetune"))}
        val = {"λ": r.get("lam"), "SR": r.get("sr"), "CR": r.get("cr"), mcol: c.get("macs"), pcol: c.get("params"),
               "Acc (%)": c.get("acc"), "Acc before FT (%)": c.get("acc_before_finetune")}
        if hetero:
            name = f"{method_name(r)} ({model_name(r)}, {dataset_name(r)})"
            row["Run"] = val["Run"] = name
        table.rows.append(row)
        table.values.append(val)
    return table
