"""Figures from run results: the slides' rank-distribution and λ figures, LC trajectories, accuracy vs SR.

Every function takes run dicts (from :func:`ltc.report.load_runs`), :class:`ltc.api.Result` objects or run
folder paths, writes ``<out_path>.png`` and ``<out_path>.pdf`` atomically (temp file in the same folder, then
``os.replace``) and returns the paths written. matplotlib is imported inside the functions and drawn with the
Agg canvas on a bare :class:`~matplotlib.figure.Figure` (no pyplot state, no global backend switch), so
importing this module is cheap and safe in headless jobs and threads.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .report import (
    dataset_name,
    fmt_lam,
    is_train_run,
    load_runs,
    method_name,
    model_name,
    pick_unit,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_accuracy_vs_sr",
    "plot_lambda_sweep",
    "plot_rank_distribution",
    "plot_trajectories",
    "save_figure",
    "short_layer_name",
]

RunLike = Any  # a run dict, an ltc.api.Result, or a run folder / result.json path

C_IN, C_OUT, C_MAT = "tab:blue", "tab:orange", "tab:green"
FULL_FACE, FULL_EDGE = "0.93", "0.55"
DENSE_FACE, DENSE_EDGE, DENSE_HATCH = "0.80", "0.35", "///"
_METHOD_STYLE = {
    "ltc": ("tab:red", "*"),
    "lrc": ("tab:blue", "s"),
    "vbmf": ("tab:green", "^"),
    "oneshot": ("tab:purple", "D"),
    "uniform": ("tab:brown", "v"),
}
_EXTRA_STYLES = [("tab:olive", "P"), ("tab:cyan", "X"), ("tab:pink", "h"), ("tab:gray", "o")]


# ------------------------------------------------------------------------------------------------ helpers


def _as_run(x: RunLike) -> dict[str, Any]:
    if isinstance(x, dict):
        return x
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if isinstance(x, str | os.PathLike):
        return load_runs([x])[0]
    raise TypeError(f"expected a run dict, an ltc.api.Result or a run folder path, got {type(x).__name__}")


def _as_runs(xs: RunLike | Iterable[RunLike]) -> list[dict[str, Any]]:
    if isinstance(xs, dict | str | os.PathLike) or hasattr(xs, "to_dict"):
        return [_as_run(xs)]
    return [_as_run(x) for x in xs]


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_path: str | Path, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``out_path`` with each suffix in ``formats`` (a given .png/.pdf suffix is replaced),
    atomically: temp file in the same folder, then ``os.replace``. Returns the paths written."""
    out = Path(out_path).expanduser()
    if out.suffix.lower() in {".png", ".pdf", ".svg"}:
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = out.parent / f"{out.name}.{fmt}"
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp.{fmt}")
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format=fmt, dpi=dpi)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        written.append(target)
    return written


def short_layer_name(name: str, max_len: int = 16) -> str:
    """Abbreviate a module path for tick labels: ``layer3.1.conv2 -> L3.1.c2``, ``features.24 -> f.24``."""
    s = name
    for pat, rep in ((r"downsample", "ds"), (r"features", "f"), (r"classifier", "cls"), (r"layer", "L"),
                     (r"conv", "c"), (r"block", "b"), (r"stage", "s"), (r"branch", "br")):
        s = re.sub(pat, rep, s)
    return s if len(s) <= max_len else "…" + s[-(max_len - 1):]


def _tick_labels(names: Sequence[str], keep: int = 12) -> list[str]:
    """Layer names as they are when all are short, else all abbreviated (consistently)."""
    if all(len(n) <= keep for n in names):
        return list(names)
    return [short_layer_name(n) for n in names]


def _run_title(run: dict[str, Any]) -> str:
    return f"{model_name(run)} on {dataset_name(run)}" if run.get("model") or run.get("dataset") else ""


def _lam_value(run: dict[str, Any]) -> float:
    lam = run.get("lam")
    return float(lam) if isinstance(lam, int | float) else math.nan


def _set_lam_scale(ax: Axes, lams: Sequence[float]) -> None:
    pos = [v for v in lams if v > 0]
    if pos and len(pos) == len(lams):
        ax.set_xscale("log")
    elif pos:
        ax.set_xscale("symlog", linthresh=min(pos))


def _style(method: str, used: dict[str, tuple[str, str]]) -> tuple[str, str]:
    if method not in used:
        used[method] = _METHOD_STYLE.get(method.lower(), _EXTRA_STYLES[len(used) % len(_EXTRA_STYLES)])
    return used[method]


# --------------------------------------------------------------------------------------- rank distribution


def plot_rank_distribution(runs_or_results: RunLike | Iterable[RunLike], out_path: str | Path, *,
                           log_y: bool = False) -> list[Path]:
    """The slides' "Tucker rank distribution of compressed networks with different λ".

    One panel per run, sorted by λ, titled with λ, SR and CR. Per compressed layer: r_in and r_out bars in front
    of the full S and T (light outlined bars); matrix-scheme layers (a single rank r) as one green bar in front
    of their full rank; dense layers as hatched full-size bars.
    """
    from matplotlib.patches import Patch

    runs = [r for r in _as_runs(runs_or_results) if not is_train_run(r)]
    if not runs:
        raise ValueError("plot_rank_distribution: no compression runs given (base-model runs have no ranks)")
    runs.sort(key=lambda r: (math.isnan(_lam_value(r)), _lam_value(r)))
    layer_lists = [list((r.get("full_ranks") or {}).keys() or (r.get("ranks") or {}).keys()) for r in runs]
    same_layers = all(ls == layer_lists[0] for ls in layer_lists)
    n_max = max(len(ls) for ls in layer_lists)
    width = min(max(8.0, 0.3 * n_max + 2.5), 30.0)
    fig = _figure(width, 0.9 + 2.6 * len(runs) + (0.6 if n_max > 0 else 0))
    axes = fig.subplots(len(runs), 1, squeeze=False, sharex=same_layers)[:, 0]
    methods = {str(r.get("method")) for r in runs}
    used = {"tucker": False, "matrix": False, "dense": False}
    w = 0.4
    for k, (ax, run, layers) in enumerate(zip(axes, runs, layer_lists, strict=True)):
        ranks, fulls = run.get("ranks") or {}, run.get("full_ranks") or {}
        bars: dict[str, tuple[list[float], list[float], float]] = {}

        def add(kind: str, x: float, h: float, bw: float, _bars: dict = bars) -> None:
            _bars.setdefault(kind, ([], [], bw))[0].append(x)
            _bars[kind][1].append(h)

        for i, name in enumerate(layers):
            r, full = ranks.get(name), fulls.get(name)
            if full is None:  # old result without full ranks: best effort
                full = r
            if isinstance(full, list | tuple):
                s_full, t_full = float(full[0]), float(full[1])
                if r is None:
                    add("dense2", i - w / 2, s_full, w)
                    add("dense2", i + w / 2, t_full, w)
                    used["dense"] = True
                else:
                    r_in, r_out = (r[0], r[1]) if isinstance(r, list | tuple) else (r, r)
                    add("full", i - w / 2, s_full, w)
                    add("full", i + w / 2, t_full, w)
                    add("r_in", i - w / 2, float(r_in), w)
                    add("r_out", i + w / 2, float(r_out), w)
                    used["tucker"] = True
            elif full is not None:
                if r is None:
                    add("dense1", i, float(full), 2 * w)
                    used["dense"] = True
                else:
                    add("full1", i, float(full), 2 * w)
                    add("r", i, float(r[0] if isinstance(r, list | tuple) else r), 2 * w)
                    used["matrix"] = True
        for kind, (xs, hs, bw) in bars.items():
            if kind.startswith("dense"):
                ax.bar(xs, hs, bw, facecolor=DENSE_FACE, edgecolor=DENSE_EDGE, hatch=DENSE_HATCH, linewidth=0.6,
                       zorder=1)
            elif kind.startswith("full"):
                ax.bar(xs, hs, bw, facecolor=FULL_FACE, edgecolor=FULL_EDGE, linewidth=0.8, zorder=1)
        for kind, color in (("r_in", C_IN), ("r_out", C_OUT), ("r", C_MAT)):
            if kind in bars:
                xs, hs, bw = bars[kind]
                ax.bar(xs, hs, bw * 0.72, color=color, zorder=2)
        title = f"λ = {fmt_lam(run.get('lam'))},  SR = {_num(run.get('sr'))},  CR = {_num(run.get('cr'))}"
        label = str(run.get("label") or "")
        if label and not label.startswith(("λ", "lam")):  # sweep labels just repeat λ
            title = f"{label}:  {title}"
        elif len(methods) > 1:
            title = f"{method_name(run)}:  {title}"
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("rank (channels)")
        if log_y:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3, zorder=0)
        ax.set_axisbelow(True)
        ax.set_xlim(-0.7, max(len(layers), 1) - 0.3)
        if not same_layers or k == len(runs) - 1:
            ax.set_xticks(range(len(layers)))
            ax.set_xticklabels(_tick_labels(layers), rotation=60, ha="right",
                               rotation_mode="anchor", fontsize=7 if len(layers) > 20 else 8)
            ax.set_xlabel("layer (network order)")
    handles = []
    if used["tucker"]:
        handles += [Patch(color=C_IN, label="$r_{in}$ (Tucker-2)"), Patch(color=C_OUT, label="$r_{out}$ (Tucker-2)")]
    if used["matrix"]:
        handles.append(Patch(color=C_MAT, label="rank r (matrix / SVD)"))
    if used["tucker"] or used["matrix"]:
        handles.append(Patch(facecolor=FULL_FACE, edgecolor=FULL_EDGE, label="full: S in / T out channels"))
    if used["dense"]:
        handles.append(Patch(facecolor=DENSE_FACE, edgecolor=DENSE_EDGE, hatch=DENSE_HATCH,
                             label="dense (not decomposed)"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    sup = "Tucker rank distribution of compressed networks with different λ"
    if (t := _run_title(runs[0])) and len({_run_title(r) for r in runs}) == 1:
        sup += f" — {t}"
    fig.suptitle(sup, fontsize=11)
    return save_figure(fig, out_path)


def _num(x: Any, fmt: str = ".2f") -> str:
    return "—" if not isinstance(x, int | float) or not math.isfinite(x) else format(x, fmt)


# ----------------------------------------------------------------------------------------------- λ sweep


def plot_lambda_sweep(runs: Iterable[RunLike], out_path: str | Path) -> list[Path]:
    """Accuracy, params and MACs against λ (log x), three stacked panels; SR and CR annotated at each point,
    the base model as a dashed line. One series per (dataset, model, method)."""
    comp = [r for r in _as_runs(runs) if not is_train_run(r)]
    comp = [r for r in comp if not math.isnan(_lam_value(r))]
    if not comp:
        raise ValueError("plot_lambda_sweep: no compression runs with a λ given")
    series: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in comp:
        series.setdefault((str(r.get("dataset")), str(r.get("model")), str(r.get("method"))), []).append(r)
    mu, ms = pick_unit([(r.get(k) or {}).get("macs") for r in comp for k in ("base", "compressed")], floor="K",
                       min_shown=1.0)
    pu, ps = pick_unit([(r.get(k) or {}).get("params") for r in comp for k in ("base", "compressed")], floor="K",
                       min_shown=1.0)
    fig = _figure(8.0, 9.0)
    ax_acc, ax_par, ax_mac = fig.subplots(3, 1, sharex=True)
    used: dict[str, tuple[str, str]] = {}
    by_method = len({k[2] for k in series}) == len(series)  # one series per method: colour by method
    for n, ((_, _, method), rs) in enumerate(series.items()):
        rs.sort(key=_lam_value)
        color, marker = _style(method, used) if by_method else (f"C{n % 10}", "os^Dv*PXh<>"[n % 11])
        if len({k[:2] for k in series}) > 1 or len(series) > 1:
            name = f"{method_name(rs[0])} ({model_name(rs[0])}, {dataset_name(rs[0])})"
        else:
            name = method_name(rs[0])
        lams = [_lam_value(r) for r in rs]
        acc = [_pct((r.get("compressed") or {}).get("acc")) for r in rs]
        acc0 = [_pct((r.get("compressed") or {}).get("acc_before_finetune")) for r in rs]
        params = [_scaled((r.get("compressed") or {}).get("params"), ps) for r in rs]
        macs = [_scaled((r.get("compressed") or {}).get("macs"), ms) for r in rs]
        ax_acc.plot(lams, acc, marker=marker, color=color, label=f"{name}: fine-tuned")
        if any(not math.isnan(a) for a in acc0):
            ax_acc.plot(lams, acc0, marker=marker, color=color, ls=":", mfc="none", alpha=0.8,
                        label=f"{name}: before fine-tuning")
        ax_par.plot(lams, params, marker=marker, color=color, label=name)
        ax_mac.plot(lams, macs, marker=marker, color=color, label=name)
        base = rs[0].get("base") or {}
        for ax, v, what in ((ax_acc, _pct(base.get("acc")), "acc"), (ax_par, _scaled(base.get("params"), ps), "params"),
                            (ax_mac, _scaled(base.get("macs"), ms), "MACs")):
            if not math.isnan(v):
                ax.axhline(v, color=color, ls="--", lw=1, alpha=0.6,
                           label=f"base {model_name(rs[0])}" if what == "acc" else None)
        for lam, p, m, r in zip(lams, params, macs, rs, strict=True):
            ax_par.annotate(f"CR {_num(r.get('cr'), '.1f')}", (lam, p), textcoords="offset points", xytext=(4, 5),
                            fontsize=7, color=color)
            ax_mac.annotate(f"SR {_num(r.get('sr'), '.1f')}", (lam, m), textcoords="offset points", xytext=(4, 5),
                            fontsize=7, color=color)
    _set_lam_scale(ax_mac, [_lam_value(r) for r in comp])
    ax_acc.set_ylabel("accuracy (%)")
    ax_par.set_ylabel(f"params ({pu})" if pu else "params")
    ax_mac.set_ylabel(f"MACs per sample ({mu})" if mu else "MACs per sample")
    ax_mac.set_xlabel("λ (rank-cost weight, log scale)")
    for ax in (ax_acc, ax_par, ax_mac):
        ax.grid(alpha=0.3, which="both")
    ax_acc.set_title("Accuracy")
    ax_par.set_title("Parameters (CR = base / compressed params)")
    ax_mac.set_title("MACs (SR = base / compressed MACs)")
    ax_acc.legend(fontsize=7, loc="best")
    if len(series) > 1:
        ax_par.legend(fontsize=7, loc="best")
    sup = "Accuracy, parameters and MACs with different λ"
    if len({(k[0], k[1]) for k in series}) == 1 and (t := _run_title(comp[0])):
        sup += f" — {t}"
    fig.suptitle(sup, fontsize=11)
    return save_figure(fig, out_path)


def _pct(a: Any) -> float:
    return 100.0 * float(a) if isinstance(a, int | float) else math.nan


def _scaled(v: Any, scale: float) -> float:
    return float(v) / scale if isinstance(v, int | float) else math.nan


# ------------------------------------------------------------------------------------------- trajectories


def plot_trajectories(result_or_run: RunLike, out_path: str | Path) -> list[Path]:
    """Over the LC steps: SR and CR, μ (and λ), ‖W−Θ‖/‖W‖, and a heat-map of rank / full rank per layer
    (Tucker layers get an ``in`` and an ``out`` row; dense steps grey)."""
    import numpy as np
    from matplotlib import colormaps

    run = _as_run(result_or_run)
    hist = run.get("history") or []
    if not hist:
        raise ValueError(f"plot_trajectories: run {run.get('_path', '')!s} has no LC history "
                         f"(method {run.get('method')!r} is one-shot or ran 0 steps)")
    steps = [h.get("step") for h in hist]
    if all(isinstance(v, int | float) for v in steps) and all(a < b for a, b in zip(steps, steps[1:], strict=False)):
        xlabel = "LC step"
    else:  # steps missing or repeated (e.g. the initial C step recorded as step 0 too): number the entries
        steps = list(range(len(hist)))
        xlabel = "C step (history entry, 0 = first)"
    fig_rows, labels = _rank_rows(run, hist)
    n_rows = len(labels)
    heat_h = max(2.2, min(0.16 * n_rows + 1.2, 14.0))
    fig = _figure(13.0, 3.4 + heat_h)
    gs = fig.add_gridspec(2, 3, height_ratios=[3.0, heat_h])
    ax_sr, ax_mu, ax_d = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[0, 2])
    ax_h = fig.add_subplot(gs[1, :])

    ax_sr.plot(steps, [h.get("sr", math.nan) for h in hist], marker="o", ms=3, label="SR (MACs)")
    ax_sr.plot(steps, [h.get("cr", math.nan) for h in hist], marker="s", ms=3, label="CR (params)")
    if isinstance(run.get("target_sr"), int | float):
        ax_sr.axhline(run["target_sr"], color="k", ls="--", lw=1, label=f"target SR {run['target_sr']:g}")
    aims = [h.get("target") for h in hist]
    if all(isinstance(v, int | float) for v in aims) and len(set(aims)) > 1:  # a gradual or re-targeted budget
        ax_sr.plot(steps, aims, color="k", ls=":", lw=1, drawstyle="steps-mid", label="target of each C step")
    ax_sr.set(xlabel=xlabel, ylabel="ratio (base / compressed)", title="Speed-up and compression")
    ax_sr.legend(fontsize=8)

    ax_mu.plot(steps, [h.get("mu", math.nan) for h in hist], marker="o", ms=3, color="tab:purple", label="μ")
    ax_mu.set_yscale("log")
    ax_mu.set(xlabel=xlabel, ylabel="μ (penalty weight, log)", title="μ schedule")
    lams = [h.get("lam") for h in hist]
    handles, lbls = ax_mu.get_legend_handles_labels()
    if all(isinstance(v, int | float) and v > 0 for v in lams) and len({round(v, 12) for v in lams}) > 1:
        ax_l = ax_mu.twinx()
        ax_l.plot(steps, lams, marker="x", ms=4, color="tab:gray", ls="--", label="λ (budget search)")
        ax_l.set_yscale("log")
        ax_l.set_ylabel("λ (log)")
        h2, l2 = ax_l.get_legend_handles_labels()
        handles, lbls = handles + h2, lbls + l2
    ax_mu.legend(handles, lbls, fontsize=8)

    def positive(key: str) -> list[float]:
        return [v if isinstance(v, int | float) and v > 0 else math.nan for v in (h.get(key) for h in hist)]

    ax_d.plot(steps, positive("distance"), marker="o", ms=3, color="tab:red", label="weight space")
    if any(isinstance(h.get("distance_metric"), int | float) for h in hist):
        ax_d.plot(steps, positive("distance_metric"), marker="s", ms=3, color="tab:orange",
                  label="data metric (layer outputs)")
        ax_d.legend(fontsize=8)
    ax_d.set_yscale("log")
    ax_d.set(xlabel=xlabel, ylabel=r"$\|W-\Theta\|\,/\,\|W\|$ (log)", title="Distance to the Tucker model")
    for ax in (ax_sr, ax_mu, ax_d):
        ax.grid(alpha=0.3, which="both")

    data = np.ma.masked_invalid(np.array(fig_rows, dtype=float).reshape(n_rows, len(hist)))
    cmap = colormaps["viridis"]
    cmap = cmap.with_extremes(bad=DENSE_FACE)
    edges = _edges([float(v) for v in steps])
    im = ax_h.pcolormesh(edges, np.arange(n_rows + 1) - 0.5, data, cmap=cmap, vmin=0.0, vmax=1.0)
    ax_h.set_ylim(n_rows - 0.5, -0.5)
    ax_h.set_yticks(range(n_rows))
    ax_h.set_yticklabels(labels, fontsize=6 if n_rows > 40 else 7 if n_rows > 20 else 8)
    ax_h.set_xlabel(xlabel)
    ax_h.set_title("Rank / full rank per layer (Tucker-2 layers: in- and out-channel ranks; grey = dense)")
    if len(steps) <= 30:
        ax_h.set_xticks(steps)
    fig.colorbar(im, ax=ax_h, label="rank / full", fraction=0.03, pad=0.01)
    sup = f"LC trajectory: {method_name(run)}"
    if t := _run_title(run):
        sup += f" — {t}"
    if run.get("label"):
        sup += f" [{run['label']}]"
    fig.suptitle(sup, fontsize=11)
    return save_figure(fig, out_path)


def _edges(x: Sequence[float]) -> list[float]:
    """Cell edges around increasing centres ``x`` (midpoints; half a gap beyond each end)."""
    if len(x) == 1:
        return [x[0] - 0.5, x[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(x, x[1:], strict=False)]
    return [x[0] - (mids[0] - x[0])] + mids + [x[-1] + (x[-1] - mids[-1])]


def _rank_rows(run: dict[str, Any], hist: Sequence[dict[str, Any]]) -> tuple[list[float], list[str]]:
    """Flat row-major values (rank / full, NaN = dense) and row labels for the trajectory heat-map."""
    fulls = run.get("full_ranks") or {}
    names = list(fulls.keys()) or list((hist[-1].get("ranks") or {}).keys())
    shorts = _tick_labels(names, keep=16)
    values: list[float] = []
    labels: list[str] = []
    for name, short in zip(names, shorts, strict=True):
        full = fulls.get(name)
        seq = [(h.get("ranks") or {}).get(name) for h in hist]
        if full is None:  # unknown full rank: scale by the largest rank seen
            tops = [max(r) if isinstance(r, list | tuple) else r for r in seq if r is not None]
            full = max(tops) if tops else 1
        if isinstance(full, list | tuple):
            for j, tag in ((0, "in"), (1, "out")):
                labels.append(f"{short} {tag}")
                for r in seq:
                    if r is None:
                        values.append(math.nan)
                    else:
                        rv = r[j] if isinstance(r, list | tuple) else r
                        values.append(float(rv) / max(float(full[j]), 1.0))
        else:
            labels.append(short)
            for r in seq:
                if r is None:
                    values.append(math.nan)
                else:
                    rv = r[0] if isinstance(r, list | tuple) else r
                    values.append(float(rv) / max(float(full), 1.0))
    return values, labels


# --------------------------------------------------------------------------------------------- acc vs SR


def plot_accuracy_vs_sr(runs: Iterable[RunLike], out_path: str | Path) -> list[Path]:
    """Accuracy against SR (log x) for every method, one panel per dataset; one colour and marker per method,
    each base model as a dashed line, other uncompressed networks (e.g. lightweight nets trained from scratch)
    as dotted lines."""
    all_runs = _as_runs(runs)
    comp = [r for r in all_runs if not is_train_run(r) and isinstance(r.get("sr"), int | float)]
    if not comp:
        raise ValueError("plot_accuracy_vs_sr: no compression runs with an SR given")
    datasets = list(dict.fromkeys(str(r.get("dataset")) for r in all_runs))
    datasets = [d for d in datasets if any(str(r.get("dataset")) == d for r in comp)]
    fig = _figure(max(6.5, 5.5 * len(datasets)), 5.6)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    used: dict[str, tuple[str, str]] = {}
    line_styles = ["--", "-.", (0, (5, 2, 1, 2)), (0, (8, 3))]
    for ax, ds in zip(axes, datasets, strict=True):
        rs = [r for r in comp if str(r.get("dataset")) == ds]
        models = list(dict.fromkeys(str(r.get("model")) for r in rs))
        for method in dict.fromkeys(str(r.get("method")) for r in rs):
            color, marker = _style(method, used)
            pts = sorted((r for r in rs if str(r.get("method")) == method), key=lambda r: r["sr"])
            xs = [float(r["sr"]) for r in pts]
            ys = [_pct((r.get("compressed") or {}).get("acc")) for r in pts]
            ax.scatter(xs, ys, color=color, marker=marker, s=70 if marker == "*" else 40, zorder=3,
                       label=method_name(pts[0]), edgecolors="k", linewidths=0.4)
            if len(models) > 1:
                for x, y, r in zip(xs, ys, pts, strict=True):
                    ax.annotate(model_name(r), (x, y), textcoords="offset points", xytext=(5, -9), fontsize=7)
        bases: dict[str, float] = {}
        for r in rs:
            b = (r.get("base") or {}).get("acc")
            if b is not None:
                bases.setdefault(str(r.get("model")), float(b))
        for r in all_runs:
            if is_train_run(r) and str(r.get("dataset")) == ds and str(r.get("model")) in models:
                bases[str(r.get("model"))] = float(r.get("acc") or math.nan)
        for k, (m, b) in enumerate(bases.items()):
            ax.axhline(100 * b, color="0.3", ls=line_styles[k % len(line_styles)], lw=1,
                       label=f"base {model_name({'model': m})} ({100 * b:.2f} %)")
        scratch = [r for r in all_runs
                   if is_train_run(r) and str(r.get("dataset")) == ds and str(r.get("model")) not in models]
        for k, r in enumerate(scratch):
            a = _pct(r.get("acc"))
            ax.axhline(a, color=("tab:gray", "tab:olive", "tab:cyan", "tab:pink")[k % 4], ls=":", lw=1.4,
                       label=f"{model_name(r)}, uncompressed ({a:.2f} %)")
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
        lo = min(float(r["sr"]) for r in rs)
        hi = max(float(r["sr"]) for r in rs)
        ax.set_xlim(min(lo, 1.0) * 0.8, hi * (1.9 if len(models) > 1 else 1.4))
        ax.set_xlabel("SR = base MACs / compressed MACs (log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(dataset_name({"dataset": ds}))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle("Accuracy against theoretical speed-up (SR)", fontsize=11)
    return save_figure(fig, out_path)
