"""The jobs the command line, the examples and the benchmarks share: train, compress, fine-tune, evaluate.

Each takes a validated config dict (:func:`ltc.config.load_config`) and a run folder, does the work through the
library (data → model → :func:`ltc.train.fit` / :func:`ltc.compress`), writes the run folder (``result.json``
through :class:`ltc.results.RunResult`, ``model.pt`` through :func:`ltc.save`, ``config.yaml``, logs, the
checkpoint) and returns the :class:`~ltc.results.RunResult`. Progress lines go to ``say`` (the CLI prints them;
the default drops them). Under torchrun (``WORLD_SIZE > 1``) :func:`init_distributed` starts the process group,
every epoch is sharded over the processes, and only rank 0 writes.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import config as cfgmod
from . import runs
from .api import CompressConfig, compress
from .cost import format_count, profile
from .latency import compare_latency
from .results import RunResult
from .utils import atomic_write_text, is_main_process, resolve_device, seed_everything, world_size

__all__ = [
    "DIGITS",
    "build_data",
    "calibration_images",
    "call_user",
    "check_layers",
    "compress_run",
    "evaluate_run",
    "finetune_run",
    "init_distributed",
    "load_callable",
    "make_loaders",
    "run_plots",
    "train_run",
]

DIGITS = "digits"
Say = Callable[[str], None]
CALIBRATION_IMAGES = 2048
"""Training images (no augmentation, a fixed seeded sample) for BatchNorm re-estimation and the data metric."""


def _quiet(_: str) -> None:
    return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _pct(a: float | None) -> str:
    return "—" if a is None or a != a else f"{100 * float(a):.2f}"


def _example(shape: tuple[int, ...], device: torch.device | str = "cpu", batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, *shape, device=device)


# =========================================================================================== distributed


def init_distributed(device: str) -> str:
    """Under torchrun (``WORLD_SIZE > 1``): initialise the process group (nccl on CUDA, gloo on CPU) and return the
    device this process uses; otherwise ``device`` unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return device
    dev = resolve_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return str(dev)


# ================================================================================================ data


def build_data(cfg: dict[str, Any], base: runs.LoadedModel | None = None, *, progress: bool = False,
               augment: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """The data bundle for ``cfg`` and its description; with a ``base`` model, sized / normalised / split as it
    was trained (and checked against its classes)."""
    from . import data as ltc_data

    d = cfg["data"]
    bd = base.data if base is not None else {}
    source = d["source"] or bd.get("source")
    if source is None:
        if base is not None:
            raise ValueError(f"the base model {base.path} records no data source; pass --data SOURCE")
        source = DIGITS
    same = base is not None and runs.canonical_source(source) == runs.canonical_source(bd.get("source", ""))
    image_size = d["image_size"] or bd.get("image_size")
    channels = d["channels"] or bd.get("channels") or cfg["model"]["in_channels"]
    val_fraction = d["val_fraction"] if d["val_fraction"] is not None else (
        bd.get("val_fraction") if same and bd.get("val_fraction") is not None else 0.1)
    seed = d["seed"] if d["seed"] is not None else (
        bd.get("seed") if same and bd.get("seed") is not None else cfg["run"]["seed"])
    mean = std = None
    if bd.get("mean") and bd.get("std") and (channels is None or len(bd["mean"]) == channels):
        mean, std = bd["mean"], bd["std"]
    bundle = ltc_data.build(source, image_size=image_size, channels=channels, val_fraction=val_fraction, seed=seed,
                            augment=d["augment"] if augment is None else augment, in_memory=d["in_memory"],
                            mean=mean, std=std, progress=progress)
    name = d["name"] or (bd.get("name") if same else None)
    info = runs.data_info(bundle, val_fraction=val_fraction, seed=seed, name=name)
    if base is not None:
        check_classes(base, bundle.source, bundle.num_classes, bundle.classes)
    return bundle, info


def num_outputs(model: nn.Module) -> int | None:
    """The class count a zoo model was built for (``None`` for other models)."""
    cfg = getattr(model, "ltc_config", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("num_classes"), int):
        return int(cfg["num_classes"])
    return None


def check_classes(base: runs.LoadedModel, source: Any, n_classes: int, classes: list[str]) -> None:
    """Refuse data whose classes are not those the model was trained on (count and order)."""
    n_out = num_outputs(base.model)
    if n_out is not None and n_out != n_classes:
        raise ValueError(f"the model has {n_out} outputs but {source} has {n_classes} classes "
                         f"({', '.join(classes[:10])}); use data with the classes the model was trained on")
    trained = base.data.get("classes")
    if trained and list(trained) != list(classes):
        raise ValueError(f"{source} has classes {classes[:10]}, but the model was trained on "
                         f"{list(trained)[:10]} (order matters); use data with the same classes")


def make_loaders(bundle: Any, cfg: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """Seeded train / val loaders; under torchrun each process gets its share of every epoch."""
    from . import data as ltc_data

    d = cfg["data"]
    return ltc_data.loaders(bundle, batch_size=d["batch_size"], workers=d["workers"], seed=seed,
                            eval_batch_size=d["eval_batch_size"], distributed=True)


def calibration_images(bundle: Any, seed: int) -> Any:
    """The calibration loader of a run (:data:`CALIBRATION_IMAGES` fixed training images, no augmentation)."""
    from . import data as ltc_data

    return ltc_data.calibration_loader(bundle, CALIBRATION_IMAGES, seed=seed)


def load_weights(model: nn.Module, ref: str) -> None:
    """Copy the weights of a run folder / model file into ``model`` (same architecture)."""
    loaded = runs.load_model(ref)
    try:
        model.load_state_dict(loaded.model.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"model.checkpoint {ref}: the weights do not fit {type(model).__name__} ({str(exc)[:300]})") \
            from None


# ============================================================================================== train


def train_run(cfg: dict[str, Any], out: Path, *, resume: bool = False, overwrite: bool = False,
              data: tuple[Any, dict[str, Any]] | None = None, say: Say = _quiet) -> RunResult:
    """Train ``cfg``'s zoo model into the run folder ``out``."""
    from . import models
    from .train import RunLog, TrainConfig, evaluate, fit

    m, r = cfg["model"], cfg["run"]
    t = TrainConfig(**cfg["train"])
    if not m["name"]:
        raise ValueError("no model to train: pass --model NAME (ltc profile --list) or set model.name in --config")
    if ":" in m["name"]:
        raise ValueError("ltc train builds zoo models only (model.name); profile accepts module:callable paths")
    device = resolve_device(init_distributed(r["device"]))
    progress = bool(r["progress"]) and is_main_process()
    out = runs.prepare_out(out, resume=resume, overwrite=overwrite, what="training run")
    seed_everything(r["seed"])
    if data is None:
        say(f"[data] {cfg['data']['source'] or DIGITS}")
    bundle, info = data if data is not None else build_data(cfg, None, progress=progress)
    say(f"       {len(bundle.train)} train / {len(bundle.val) if bundle.val is not None else 0} val images, "
        f"{bundle.num_classes} classes, input {'x'.join(map(str, bundle.input_shape))}")
    if m["num_classes"] is not None and m["num_classes"] != bundle.num_classes:
        raise ValueError(f"model.num_classes is {m['num_classes']} but {bundle.source} has {bundle.num_classes} "
                         "classes; drop --num-classes to use the data's")
    model = models.create(m["name"], num_classes=bundle.num_classes, width=m["width"], in_channels=bundle.in_channels)
    if m["checkpoint"]:
        load_weights(model, m["checkpoint"])
    prof = profile(model, _example(bundle.input_shape))
    dataset = info["name"]
    runs.write_json(out / runs.RUN_NAME, {"kind": "train", "model": m["name"], "model_config": model.ltc_config,
                                          "dataset": dataset, "data": info})
    if is_main_process():
        atomic_write_text(out / runs.CONFIG_NAME, cfgmod.dump_config(cfg))
    say(f"[train] {m['name']} (width {m['width']:g}): {format_count(prof.macs)} MACs per sample, "
        f"{format_count(prof.params)} params; {t.epochs} epochs on {device}"
        f"{f' x {world_size()} processes' if world_size() > 1 else ''} -> {out}")
    train_loader, val_loader = make_loaders(bundle, cfg, info["seed"])
    t0 = time.perf_counter()
    history = fit(model, train_loader, val_loader, epochs=t.epochs, opt_cfg=t.optimizer_kwargs(),
                  sched_cfg=t.scheduler_kwargs(), device=device, checkpoint_path=out / runs.TRAIN_CHECKPOINT,
                  resume=resume, log=RunLog(out), progress=progress, amp=t.amp, channels_last=t.channels_last,
                  grad_clip=t.grad_clip, label_smoothing=t.label_smoothing, seed=r["seed"])
    seconds = time.perf_counter() - t0
    acc = history[-1].get("val_acc") if history else None
    if acc is None and val_loader is not None:
        acc = evaluate(model, val_loader, device=device).acc
    model = model.cpu().eval()
    result = RunResult(kind="train", model=m["name"], dataset=dataset, acc=acc, macs=prof.macs, params=prof.params,
                       epochs=t.epochs, seconds=seconds, model_config=model.ltc_config, data=info, history=history,
                       config=cfg)
    runs.save_model(model, out / runs.MODEL_NAME, meta={"kind": "train", "model": m["name"], "dataset": dataset,
                                                        "data": info, "acc": acc})
    result.write(out / runs.RESULT_NAME)
    say(f"[train] done in {seconds:.0f} s: val acc {_pct(acc)} %, {format_count(prof.macs)} MACs per sample, "
        f"{format_count(prof.params)} params -> {out / runs.MODEL_NAME}")
    return result


# =========================================================================================== compress


def check_layers(cfg: dict[str, Any], model: nn.Module) -> None:
    """Check the layer globs against the model before any data is read (the other settings are checked when
    the config is loaded)."""
    from .engine import select_layers

    c = cfg["compress"]
    select_layers(model, c["include"], c["exclude"], c["compress_linear"])


def auto_label(cfg: dict[str, Any]) -> str:
    """A run's default name: the method and its λ or target."""
    c = cfg["compress"]
    if c["target_sr"] is not None:
        return f"{c['method']}_sr{c['target_sr']:g}"
    if c["lam"] is not None:
        return f"{c['method']}_lam{c['lam']:g}"
    return str(c["method"])


def compress_run(cfg: dict[str, Any], base_ref: str | Path, out: Path, *, resume: bool = False,
                 overwrite: bool = False, base: runs.LoadedModel | None = None,
                 data: tuple[Any, dict[str, Any]] | None = None, plots: bool = True, say: Say = _quiet) -> RunResult:
    """Compress the base model ``base_ref`` into the run folder ``out``, fine-tune, measure CPU latency."""
    r = cfg["run"]
    device = init_distributed(r["device"])
    resolve_device(device)
    base = base if base is not None else runs.load_model(base_ref)
    check_layers(cfg, base.model)
    ccfg = cfgmod.compress_config(cfg)
    ccfg.device = device
    label = r["label"] or auto_label(cfg)
    if resume and (out / runs.RESULT_NAME).is_file() and (out / runs.MODEL_NAME).is_file():
        say(f"[compress] {out} is already complete; skipping (use --overwrite to redo it)")
        return RunResult.read(out / runs.RESULT_NAME)
    out = runs.prepare_out(out, resume=resume, overwrite=overwrite, what="compression run")
    progress = bool(r["progress"]) and is_main_process()
    seed_everything(ccfg.seed)
    bundle, info = data if data is not None else build_data(cfg, base, progress=progress)
    if base.input_shape is not None and tuple(bundle.input_shape) != base.input_shape:
        raise ValueError(f"the base model was trained on {'x'.join(map(str, base.input_shape))} inputs, the data "
                         f"gives {'x'.join(map(str, bundle.input_shape))}")
    train_loader, val_loader = make_loaders(bundle, cfg, info["seed"])
    if is_main_process():
        atomic_write_text(out / runs.CONFIG_NAME, cfgmod.dump_config(cfg))
    c = cfg["compress"]
    goal = f"target SR {c['target_sr']:g}" if c["target_sr"] is not None else (
        f"λ = {c['lam']:g}" if c["lam"] is not None else "its own rank rule")
    layers = f", layers {' '.join(c['include'])}" if c["include"] else ""
    kd = f", distilled from the base (weight {ccfg.kd_weight:g})" if ccfg.kd_weight else ""
    say(f"[compress] {c['method']} with {goal}{layers}{kd} on {base.name}: {ccfg.plan().describe()} -> {out}")
    x = _example(bundle.input_shape)
    result = compress(base.model, train_loader, example_input=x, val_loader=val_loader,
                      calibration_loader=calibration_images(bundle, info["seed"]), config=ccfg, checkpoint_dir=out,
                      resume=resume, progress=False)
    small = result.model.cpu().eval()
    layout = ccfg.latency_memory_format
    say(f"[latency] CPU, batch 1, {_plural(r['latency_threads'], 'thread')}, BatchNorm folded, "
        f"{'' if layout == 'contiguous' else layout + ', '}{r['latency_repeats']} interleaved runs of each model")
    lat = compare_latency(base.model.cpu().eval(), small, _example(bundle.input_shape), threads=r["latency_threads"],
                          repeats=r["latency_repeats"], device="cpu", fold_bn=True, memory_format=layout)
    run = RunResult.from_compression(result, model=base.name, dataset=info["name"], label=label,
                                     latency={"batch1": lat}, data=info, base_run=str(base_ref),
                                     model_config=getattr(small, "ltc_config", None), config=cfg)
    runs.save_model(small, out / runs.MODEL_NAME, meta={
        "kind": "compress", "model": base.name, "dataset": info["name"], "data": info, "label": label,
        "method": result.method, "sr": result.sr, "cr": result.cr, "acc": result.acc,
    })
    run.write(out / runs.RESULT_NAME)
    runs.write_rows_csv(out / "log.csv", result.log)
    if plots and r["plots"]:
        run_plots(run.to_dict(), out)
    say(result.summary())
    say(f"measured CPU latency (batch 1): base {lat['base_ms']:.3f} ms, compressed {lat['compressed_ms']:.3f} ms, "
        f"measured speed-up {lat['speedup']:.2f}x (SR {result.sr:.2f} is the theoretical MAC speed-up)")
    return run


def run_plots(run: dict[str, Any], out: Path, prefix: str = "") -> list[Path]:
    """Rank distribution (+ trajectories for learning methods) of one run; a failing plot only warns."""
    if not is_main_process():
        return []
    from . import plots

    written: list[Path] = []
    jobs: list[tuple[str, Callable[..., list[Path]]]] = [("ranks", plots.plot_rank_distribution)]
    if run.get("history") and any("distance" in h for h in run["history"]):
        jobs.append(("trajectories", plots.plot_trajectories))
    for name, fn in jobs:
        try:
            written += fn(run, out / f"{prefix}{name}")
        except Exception as exc:  # a figure must never cost a finished run
            warnings.warn(f"could not draw {name} for {out}: {exc}", stacklevel=2)
    return written


# =========================================================================================== finetune


def finetune_run(cfg: dict[str, Any], src_ref: str | Path, out: Path | None, *, epochs: int, lr: float | None = None,
                 resume: bool = False, overwrite: bool = False, say: Say = _quiet) -> RunResult:
    """More fine-tuning of a run's model (ranks fixed) into a new run folder (default ``<RUN>_ft``)."""
    from .train import RunLog, fit

    src = runs.load_model(src_ref)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    run_dir = src.run_dir or src.path.parent
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}_ft"
    out = runs.prepare_out(out, resume=resume, overwrite=overwrite, what="fine-tuning run")
    device = resolve_device(init_distributed(cfg["run"]["device"]))
    progress = bool(cfg["run"]["progress"]) and is_main_process()
    seed_everything(cfg["run"]["seed"])
    bundle, info = build_data(cfg, src, progress=progress)
    train_loader, val_loader = make_loaders(bundle, cfg, info["seed"])
    c = CompressConfig(**{**cfgmod.compress_config(cfg, need_ranks=False).to_dict(),
                         **({"finetune_lr": lr} if lr else {})})
    prev = src.result.get("compressed", {}).get("acc") if src.result.get("kind") != "train" else src.result.get("acc")
    teacher_ref = _finetune_teacher_ref(src, c.kd_weight, say)
    teacher = runs.load_model(teacher_ref).model.to(device).eval().requires_grad_(False) if teacher_ref else None
    kd_weight = c.kd_weight if teacher is not None else 0.0
    kd = f", distilled from {teacher_ref} (weight {kd_weight:g})" if teacher is not None else ""
    say(f"[finetune] {src.name} from {src.path}: {epochs} epochs at lr {c.finetune_lr:g}{kd} on {device} -> {out}")
    model = src.model.to(device)
    history = fit(model, train_loader, val_loader, epochs=epochs,
                  opt_cfg={"name": c.optimizer, "lr": c.finetune_lr, "momentum": c.momentum, "nesterov": c.nesterov,
                           "weight_decay": c.weight_decay},
                  sched_cfg={"name": "cosine"}, device=device, checkpoint_path=out / runs.TRAIN_CHECKPOINT,
                  resume=resume, writer="ltc.finetune", log=RunLog(out), progress=progress,
                  label_smoothing=c.label_smoothing, seed=cfg["run"]["seed"], teacher=teacher,
                  kd_weight=kd_weight, kd_temperature=c.kd_temperature)
    acc = history[-1].get("val_acc") if history else None
    model = model.cpu().eval()
    prof = profile(model, _example(bundle.input_shape))
    if src.result:
        result = RunResult.from_dict(copy.deepcopy(src.result), where=str(src.path))
    else:
        result = RunResult(kind="train", model=src.name, dataset=info["name"], acc=acc, macs=prof.macs,
                           params=prof.params)
    if result.kind == "train":
        result.acc, result.macs, result.params = acc, prof.macs, prof.params
    else:
        result.compressed = {**(result.compressed or {}), "acc": acc, "macs": prof.macs, "params": prof.params}
        result.label = f"{result.label or result.method or 'model'} +ft{epochs}"
    result.finetune = {"from": str(src.path), "epochs": epochs, "lr": c.finetune_lr, "acc_before": prev,
                       "teacher": str(teacher_ref) if teacher_ref else None,
                       "kd_weight": kd_weight, "history": history}
    result.data = info
    meta = dict(src.meta)
    meta.update({"acc": acc, "data": info})
    runs.save_model(model, out / runs.MODEL_NAME, meta=meta)
    result.write(out / runs.RESULT_NAME)
    say(f"[finetune] val acc {_pct(prev)} % -> {_pct(acc)} %; saved {out / runs.MODEL_NAME}")
    return result


def _finetune_teacher_ref(src: runs.LoadedModel, kd_weight: float, say: Say) -> Path | None:
    """The base run a compressed run was made from, to distil from as ``ltc compress`` fine-tunes (``None``: no
    distillation, because ``kd_weight`` is 0, the model is not a compressed run, or its base is not found)."""
    if kd_weight <= 0 or src.result.get("kind") != "compress":
        return None
    ref = src.result.get("base_run")
    if not ref:
        say("[finetune] no distillation: the run does not name its base (result.json has no base_run)")
        return None
    path = Path(ref).expanduser()
    if not path.exists():
        say(f"[finetune] no distillation: the run's base {ref} is not found (moved?); fine-tuning with "
            "cross-entropy only (pass --set compress.kd_weight=0 to ask for that and silence this line)")
        return None
    return path


# =============================================================================================== eval


def evaluate_run(cfg: dict[str, Any], target: str | Path, split: str | None = None) -> dict[str, Any]:
    """Accuracy, loss, MACs and params of a run folder / model file / training checkpoint on a split of any data
    (images resized, normalised and labelled as the model was trained). ``split``: default test, else val."""
    from . import data as ltc_data
    from .train import evaluate

    src = runs.load_model(target)
    d, bd = cfg["data"], src.data
    source = d["source"] or bd.get("source")
    if source is None:
        raise ValueError(f"{src.path} records no data source; pass --data SOURCE")
    same = runs.canonical_source(source) == runs.canonical_source(bd.get("source", ""))
    kw: dict[str, Any] = {
        "image_size": d["image_size"] or bd.get("image_size"),
        "channels": d["channels"] or bd.get("channels"),
        "mean": bd.get("mean"), "std": bd.get("std"), "classes": bd.get("classes"),
        "val_fraction": d["val_fraction"] if d["val_fraction"] is not None else (
            bd.get("val_fraction", 0.1) if same else 0.1),
        "seed": d["seed"] if d["seed"] is not None else (bd.get("seed", 0) if same else cfg["run"]["seed"]),
        "in_memory": d["in_memory"], "progress": bool(cfg["run"]["progress"]) and is_main_process(),
    }
    if kw["mean"] is not None and kw["channels"] is not None and len(kw["mean"]) != kw["channels"]:
        kw["mean"] = kw["std"] = None
    if split is None:
        try:
            ds = ltc_data.load_split(source, "test", **kw)
            split = "test"
        except ltc_data.DataError:
            ds = ltc_data.load_split(source, "val", **kw)
            split = "val"
    else:
        ds = ltc_data.load_split(source, split, **kw)
    n_out = num_outputs(src.model)
    if n_out is not None and n_out != ds.num_classes:
        raise ValueError(f"the model has {n_out} outputs but {source} ({split}) has {ds.num_classes} classes")
    device = resolve_device(cfg["run"]["device"])
    loader = ltc_data.eval_loader(ds, batch_size=d["eval_batch_size"] or d["batch_size"], workers=d["workers"])
    st = evaluate(src.model, loader, device=device, progress=bool(cfg["run"]["progress"]))
    c, h, w = ds[0][0].shape
    prof = profile(src.model.cpu(), _example((c, h, w)))
    return {"model": src.name, "path": str(src.path), "data": str(source), "split": split, "samples": st.samples,
            "acc": st.acc, "loss": st.loss, "macs": prof.macs, "params": prof.params, "input": [c, h, w]}


# ====================================================================================== user callables


def load_callable(spec: str) -> Callable[..., Any]:
    """``module:callable`` or ``path/to/file.py:callable``."""
    mod_part, _, attr = spec.rpartition(":")
    if not mod_part or not attr:
        raise ValueError(f"expected module:callable or file.py:callable, got {spec!r}")
    if mod_part.endswith(".py") or os.sep in mod_part or "/" in mod_part:
        path = Path(mod_part).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no Python file at {path}")
        name = f"_ltc_user_{abs(hash(str(path.resolve())))}"
        spec_obj = importlib.util.spec_from_file_location(name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise ValueError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[name] = module
        spec_obj.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_part)
        except ModuleNotFoundError as exc:
            raise ValueError(f"cannot import module {mod_part!r} ({exc}); is it on PYTHONPATH?") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{mod_part} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj


def call_user(fn: Callable[..., Any], **wanted: Any) -> nn.Module:
    """Call a user's model constructor with the keyword arguments it accepts (``None`` values dropped)."""
    try:
        params = inspect.signature(fn).parameters
        takes_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        kw = {k: v for k, v in wanted.items() if v is not None and (takes_kw or k in params)}
    except (TypeError, ValueError):
        kw = {}
    model = fn(**kw)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{getattr(fn, '__name__', fn)} returned a {type(model).__name__}, not an nn.Module")
    return model
