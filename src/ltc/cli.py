"""The ``ltc`` command line (also ``python -m ltc``).

Units everywhere: MACs are multiply-accumulates of conv + linear layers per sample (one image; the paper's
"FLOPs" count MACs, FLOPs = 2·MACs); SR = base MACs / compressed MACs (a theoretical speed-up); CR = base
params / compressed params; measured wall-clock speed-up is reported separately and never called SR.
Accuracies are stored as fractions in result.json and printed as percentages.

Every subcommand takes ``--config FILE.yaml`` (see :mod:`ltc.config`), flags that override it, and
``--set section.key=value`` that overrides anything. Library errors print ``ltc: error: ...`` and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import inspect
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import config as cfgmod
from . import runs
from .cost import format_count, profile
from .utils import atomic_write_text, is_main_process, resolve_device, seed_everything

__all__ = ["main", "build_parser", "SLIDES_FLOPS"]

log = logging.getLogger("ltc")

SLIDES_FLOPS: dict[tuple[str, int], tuple[float, str, str]] = {
    ("resnet34", 224): (3.68e9, "3.68 G", "Table 1, ResNet-34 on Chest X-Ray"),
    ("resnet34_cifar", 32): (0.29e9, "0.29 G", "Table 1, ResNet-34 on CIFAR-10"),
    ("vgg16_cifar", 32): (352.41e6, "352.41 M = 0.35 G", "Tables 1 and 3, VGG-16 on CIFAR-10"),
    ("vgg16", 224): (15.65e9, "15.65 G", "Table 1, VGG-16 on Chest X-Ray"),
}
"""The slides' "FLOPs" figures for the four base models of SPEC section 5, keyed by (zoo name, input size).
Their counter ran 0.5–6 % above a plain conv + linear MAC count; ltc prints its own MACs and this beside."""

UNITS_EPILOG = (
    "Units: MACs = multiply-accumulates of conv + linear layers per sample (the paper's \"FLOPs\"; "
    "FLOPs = 2·MACs). SR = base MACs / compressed MACs (theoretical speed-up), CR = base params / compressed "
    "params. Measured CPU speed-up is reported separately and never called SR."
)

_DIGITS = "digits"


def _say(*msg: Any) -> None:
    if is_main_process():
        print(*msg, flush=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _pct(a: float | None) -> str:
    return "—" if a is None or (isinstance(a, float) and math.isnan(a)) else f"{100 * float(a):.2f}"


# ================================================================================================ parser


class _Flags:
    """Adds flags whose values override ``section.key`` of the config (dest ``section__key``, default None)."""

    def __init__(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        self.p = parser

    def __call__(self, *names: str, key: str, **kw: Any) -> None:
        if kw.get("action") == "store_true":
            kw["action"] = "store_const"
            kw["const"] = True
        if "metavar" not in kw and kw.get("action") != "store_const" and "choices" not in kw:
            kw["metavar"] = key.split(".")[-1].upper()
        self.p.add_argument(*names, dest=key.replace(".", "__"), default=None, **kw)


def _common(p: argparse.ArgumentParser, *, config: bool = True) -> None:
    g = p.add_argument_group("general")
    if config:
        g.add_argument("--config", metavar="FILE.yaml", help="YAML config (sections model, data, train, compress, "
                       "run, sweep, variants); flags override it")
        g.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override any config value (VALUE parsed as YAML), e.g. --set train.epochs=3; repeatable")
        f = _Flags(g)
        f("--device", key="run.device", help="auto (default: cuda if available), cpu, cuda, cuda:N")
        f("--seed", key="run.seed", type=int, help="random seed (default 0)")
        f("--threads", key="run.threads", type=int, help="torch CPU threads (default: torch's choice)")
        f("--no-progress", key="run.progress", action="store_const", const=False, help="no progress bars")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log what the library does (layer choices, C steps)")


def _out_opts(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help=f"{what} folder")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint in --out")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


def _data_opts(p: argparse.ArgumentParser, *, default_note: str) -> None:
    g = p.add_argument_group("data")
    f = _Flags(g)
    f("--data", key="data.source", metavar="SOURCE",
      help=f"'digits' (bundled), a CIFAR-10 batches folder or .tar.gz, an image folder (dir or .zip, "
           f"<class>/ or train|val|test/<class>/), or a MedMNIST .npz; {default_note}")
    f("--data-name", key="data.name", metavar="NAME", help="dataset name in tables (default: from the source)")
    f("--image-size", key="data.image_size", type=int, metavar="PX", help="resize images to PX x PX")
    f("--channels", key="data.channels", type=int, choices=(1, 3), help="convert images to 1 or 3 channels")
    f("--val-fraction", key="data.val_fraction", type=float, help="fraction of train held out for validation "
      "when the source has no val split (default 0.1)")
    f("--batch-size", key="data.batch_size", type=int, help="batch size (default 128)")
    f("--workers", key="data.workers", type=int, help="DataLoader worker processes (default 0)")


def _model_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    f = _Flags(g)
    f("--model", key="model.name", metavar="NAME", help="zoo model (ltc profile --list shows them)")
    f("--num-classes", key="model.num_classes", type=int, help="default: the data's class count")
    f("--width", key="model.width", type=float, help="channel width multiplier (default 1.0)")
    f("--init", key="model.checkpoint", metavar="MODEL", help="start from these weights (a run folder or model file)")


def _train_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    f = _Flags(g)
    f("--epochs", key="train.epochs", type=int, help="epochs (default 10)")
    f("--lr", key="train.lr", type=float, help="learning rate (default 0.1)")
    f("--optimizer", key="train.optimizer", choices=("sgd", "adam", "adamw"), help="default sgd (Nesterov)")
    f("--momentum", key="train.momentum", type=float, help="SGD momentum (default 0.9)")
    f("--weight-decay", key="train.weight_decay", type=float, help="default 5e-4")
    f("--schedule", key="train.schedule", choices=("cosine", "step", "exp", "none"), help="LR schedule per epoch")
    f("--warmup-epochs", key="train.warmup_epochs", type=int, help="linear LR warm-up epochs")
    f("--label-smoothing", key="train.label_smoothing", type=float, help="default 0")
    f("--amp", key="train.amp", action="store_true", help="mixed precision (CUDA only)")
    f("--channels-last", key="train.channels_last", action="store_true", help="channels_last memory format (CUDA)")


def _compress_opts(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    g = p.add_argument_group("compression")
    f = _Flags(g)
    f("--method", key="compress.method", choices=("ltc", "lrc", "oneshot", "vbmf", "uniform"),
      help="ltc (the paper: learned Tucker-2 ranks), lrc (learned matrix ranks), oneshot (one LTC C step, no "
           "learning), vbmf (Tucker-2 with EVBMF ranks), uniform (one rank fraction); default ltc")
    if not sweep:
        mx = g.add_mutually_exclusive_group()
        _Flags(mx)("--lam", key="compress.lam", type=float, metavar="λ",
                   help="λ, the weight of the cost term (dimensionless; larger = smaller model)")
        _Flags(mx)("--target-sr", key="compress.target_sr", type=float, metavar="SR",
                   help="budget mode: reach this SR = base MACs / compressed MACs (with --cost params: this CR)")
    f("--layers", key="compress.include", action="extend", nargs="+", metavar="GLOB",
      help="compress only layers whose module name matches (fnmatch), e.g. 'layer1.*' conv1 features.0 — the "
           "slides' layer analysis; a glob matching nothing is an error")
    f("--exclude", key="compress.exclude", action="extend", nargs="+", metavar="GLOB", help="leave these dense")
    f("--steps", key="compress.steps", type=int, help="LC steps (C steps) (default 10)")
    f("--epochs-per-step", key="compress.epochs_per_step", type=int, help="epochs of each L step (default 1)")
    f("--finetune-epochs", key="compress.finetune_epochs", type=int, help="fine-tuning epochs, ranks fixed (default 5)")
    f("--lr", key="compress.lr", type=float, help="L-step learning rate, restarted each step (default 0.01)")
    f("--finetune-lr", key="compress.finetune_lr", type=float, help="fine-tuning learning rate (default 0.01)")
    f("--mu0", key="compress.mu0", type=float, help="first penalty weight μ0 (default 1e-3)")
    f("--mu-growth", key="compress.mu_growth", type=float,
      help="μ grows by this factor per step (default: automatic, so that the last L step closes W − Θ)")
    f("--weighting", key="compress.weighting", choices=("relative", "absolute"),
      help="compare layers' errors relative to their weight norms (default) or in absolute terms (SPEC §3)")
    f("--cost", key="compress.cost", choices=("macs", "params"), help="what λ / the budget counts (default macs)")
    f("--compress-linear", key="compress.compress_linear", action="store_true",
      help="also compress nn.Linear layers by SVD (the slides keep them dense)")
    f("--min-rank", key="compress.min_rank", type=int, help="smallest rank per axis (default 1)")
    f("--label", key="run.label", metavar="TEXT", help="the run's name in tables (default: method and λ / SR)")
    f("--no-plots", key="run.plots", action="store_const", const=False,
      help="skip the per-run rank-distribution and trajectory figures (ltc plot draws them later)")


def build_parser() -> argparse.ArgumentParser:
    """The ``ltc`` argument parser with all subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="ltc",
        description="Learning Tucker Compression (Hao, Li, Wu, DCC 2022): train a CNN and learn the Tucker-2 "
                    "ranks of its convolutions, then deploy each chosen conv as three real convs.",
        epilog=UNITS_EPILOG + "\n\nStart with: ltc demo", formatter_class=fmt)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    parser.add_argument("--version", action="version", version=f"ltc {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, desc: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=desc + "\n\n" + UNITS_EPILOG, formatter_class=fmt)

    # profile
    p = add("profile", "count MACs per sample and params, layer by layer",
            "Print the per-layer table and totals: MACs per sample (conv + linear multiply-accumulates, the "
            "paper's \"FLOPs\") and params. For the four base models of the slides the slides' figure is "
            "printed beside.")
    p.add_argument("target", metavar="MODEL_OR_PATH",
                   help="zoo model name, 'module:callable' or 'path/to/file.py:callable' returning an nn.Module, "
                        "or a run folder / model file")
    p.add_argument("--input-size", type=int, metavar="PX", help="square input size (default: the model's own)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default 1000 for zoo models)")
    p.add_argument("--width", type=float, help="channel width multiplier (zoo models, default 1.0)")
    p.add_argument("--in-channels", type=int, help="input channels (default 3)")
    p.add_argument("--batch", type=int, default=1, help="batch of the example input (counts stay per sample)")
    p.add_argument("--list", action="store_true", help="also list the zoo models")
    _common(p, config=False)
    p.set_defaults(func=cmd_profile)

    # train
    p = add("train", "train a base model",
            "Train a zoo model on a dataset. Writes <out>/model.pt, result.json (kind 'train': val accuracy, "
            "MACs per sample, params), log.csv and a checkpoint every epoch (--resume continues).\n"
            "Default --out: <run.out>/base, with run.out = runs/<config name or model_dataset>.")
    _common(p)
    _model_opts(p)
    _data_opts(p, default_note="default 'digits'")
    _train_opts(p)
    _out_opts(p, "run")
    p.set_defaults(func=cmd_train)

    # compress
    p = add("compress", "compress a trained model (LTC or a baseline) and fine-tune it",
            "Compress the base model of a run, then fine-tune with ranks fixed. Writes <out>/result.json, "
            "model.pt, log.csv, compress.pt (checkpoint after every LC step and fine-tuning epoch; --resume) and "
            "the rank-distribution and trajectory plots. With a config holding 'variants' (Table 4 methods, "
            "layer-analysis rows) every variant runs into <out>/<variant name>.")
    p.add_argument("--base", metavar="RUN_OR_MODEL",
                   help="base run folder (from ltc train) or model file; default run.base or <run.out>/base")
    p.add_argument("--variant", action="append", metavar="NAME", help="run only these config variants")
    _common(p)
    _data_opts(p, default_note="default: the base run's data")
    _compress_opts(p)
    _out_opts(p, "run")
    p.set_defaults(func=cmd_compress)

    # finetune
    p = add("finetune", "fine-tune a (compressed) model for more epochs",
            "More fine-tuning of a run's model (ranks fixed). Writes a new run folder (default <RUN>_ft) with the "
            "updated result.json, so both stay comparable in reports.")
    p.add_argument("--run", required=True, metavar="RUN", help="run folder or model file")
    p.add_argument("--epochs", type=int, required=True, help="epochs")
    p.add_argument("--lr", type=float, help="learning rate (default compress.finetune_lr, 0.01)")
    _common(p)
    _data_opts(p, default_note="default: the run's data")
    _out_opts(p, "run")
    p.set_defaults(func=cmd_finetune)

    # eval
    p = add("eval", "accuracy, MACs and params of any model on any data",
            "Evaluate a run folder, model file or training checkpoint on a dataset split (e.g. a held-out test "
            "folder). Images are resized / normalised / labelled as the model was trained.")
    p.add_argument("target", metavar="CHECKPOINT_OR_RUN")
    p.add_argument("--split", choices=("test", "val", "train"),
                   help="default: test if the source has one, else the run's val split")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _common(p)
    _data_opts(p, default_note="default: the run's data")
    p.set_defaults(func=cmd_eval)

    # sweep
    p = add("sweep", "a λ sweep: one compression run per λ, then the sweep table and figures",
            "Run one compression per λ (or per target SR) into <out>/lam_<λ>, then write the sweep table "
            "(sweep.md, sweep.csv), the λ figure (accuracy, params, MACs against λ) and the rank distributions.")
    p.add_argument("--base", metavar="RUN_OR_MODEL", help="base run folder or model file")
    _Flags(p)("--lams", key="sweep.lams", type=float, nargs="+", metavar="λ", help="λ values, e.g. 1e-4 3e-4 1e-3")
    _Flags(p)("--target-srs", key="sweep.target_srs", type=float, nargs="+", metavar="SR",
              help="budget-mode sweep: target SRs instead of λ values")
    _common(p)
    _data_opts(p, default_note="default: the base run's data")
    _compress_opts(p, sweep=True)
    _out_opts(p, "sweep")
    p.set_defaults(func=cmd_sweep)

    # report
    p = add("report", "slides-style tables (markdown + CSV) from run folders",
            "Table 1 (base and compressed: MACs, SR, params, CR, accuracy, measured speed-up) from run folders "
            "(a folder without result.json stands for all runs below it), plus with --layers: Tables 2/3 "
            "(structural analysis); --compare: Table 4 + accuracy-vs-SR figure; --sweep: the λ sweep table. Each "
            "table is printed and written to --out as <name>.md and <name>.csv.")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--compare", action="store_true", help="Table 4 layout + accuracy-vs-SR plot")
    p.add_argument("--layers", action="store_true", help="layer analysis layout (Tables 2/3)")
    p.add_argument("--sweep", action="store_true", help="λ sweep table")
    p.add_argument("--out", default="runs/report", metavar="DIR",
                   help="where to write <table>.md/.csv (default runs/report)")
    _common(p, config=False)
    p.set_defaults(func=cmd_report)

    # plot
    p = add("plot", "regenerate figures from run folders",
            "Per compression run: rank distribution and LC trajectories (into the run folder, or --out). For "
            "several runs also the combined rank distribution, λ figure and accuracy-vs-SR figure.")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", metavar="DIR", help="write every figure here (default: next to the runs)")
    _common(p, config=False)
    p.set_defaults(func=cmd_plot)

    # export
    p = add("export", "export to ONNX or TorchScript",
            "Export a run's model (factorised layers as real convs) and check it against PyTorch; prints the max "
            "absolute difference of the outputs.")
    p.add_argument("target", metavar="RUN_OR_MODEL")
    p.add_argument("--onnx", metavar="PATH", help="write ONNX here")
    p.add_argument("--torchscript", metavar="PATH", help="write TorchScript here")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the preceding convs first")
    p.add_argument("--input-size", type=int, metavar="PX", help="default: the size the model was trained on")
    p.add_argument("--in-channels", type=int, help="default: the channels the model was trained on")
    p.add_argument("--batch", type=int, default=1, help="batch of the example input (ONNX batch stays dynamic)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    _common(p, config=False)
    p.set_defaults(func=cmd_export)

    # demo
    p = add("demo", "train, compress and compare a small CNN end to end (about 2 minutes on 2 CPU cores)",
            "On the bundled digits (or --data): train small_cnn from scratch, compress it with LTC to a target SR "
            "(budget mode), fine-tune, and print a slides-style table with measured CPU latency (batch 1) and "
            "measured speed-up. Writes the compressed run (result.json, model.pt, figures) into --out and the base "
            "run into --out/base.")
    p.add_argument("--data", default=_DIGITS, metavar="SOURCE", help="any supported data source (default digits)")
    p.add_argument("--out", default="ltc-demo", metavar="DIR", help="output folder (default ltc-demo)")
    p.add_argument("--target-sr", type=float, default=4.0, metavar="SR", help="target SR (default 4)")
    p.add_argument("--quick", action="store_true", help="a few epochs only (a smoke test, lower accuracy)")
    p.add_argument("--image-size", type=int, metavar="PX", help="resize images (default: native size)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (default: the idle cores, from the load average)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common(p, config=False)
    p.set_defaults(func=cmd_demo)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


# ========================================================================================== config glue


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if "__" not in dest or value is None:
            continue
        sec, key = dest.split("__", 1)
        out.setdefault(sec, {})[key] = value
    return out


def _resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < --config < flags < --set; validated. Applies run.threads (main() restores the old value)."""
    cfg = cfgmod.load_config(getattr(args, "config", None), _overrides(args), getattr(args, "sets", None))
    if cfg["run"]["threads"]:
        torch.set_num_threads(cfg["run"]["threads"])
    return cfg


def _root(cfg: dict[str, Any], fallback_name: str) -> Path:
    """The experiment folder: run.out, else runs/<run.name or fallback_name>."""
    if cfg["run"]["out"]:
        return Path(cfg["run"]["out"])
    return Path("runs") / (cfg["run"]["name"] or fallback_name)


def _progress(cfg: dict[str, Any]) -> bool:
    return bool(cfg["run"]["progress"]) and is_main_process()


# ================================================================================================ data


def _build_data(cfg: dict[str, Any], base: runs.LoadedModel | None, *, progress: bool,
                augment: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """The data bundle for ``cfg``; with a ``base`` model, sized / normalised / split as it was trained."""
    from . import data as ltc_data

    d = cfg["data"]
    bd = base.data if base is not None else {}
    source = d["source"] or bd.get("source")
    if source is None:
        if base is not None:
            raise ValueError(f"the base model {base.path} records no data source; pass --data SOURCE")
        source = _DIGITS
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
        _check_classes(base, bundle)
    return bundle, info


def _check_classes(base: runs.LoadedModel, bundle: Any) -> None:
    n_out = _num_outputs(base.model)
    if n_out is not None and n_out != bundle.num_classes:
        raise ValueError(f"the model has {n_out} outputs but {bundle.source} has {bundle.num_classes} classes "
                         f"({', '.join(bundle.classes[:10])}); use data with the classes the model was trained on")
    classes = base.data.get("classes")
    if classes and list(classes) != list(bundle.classes):
        raise ValueError(f"{bundle.source} has classes {bundle.classes[:10]}, but the model was trained on "
                         f"{list(classes)[:10]} (order matters); use data with the same classes")


def _num_outputs(model: nn.Module) -> int | None:
    cfg = getattr(model, "ltc_config", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("num_classes"), int):
        return int(cfg["num_classes"])
    return None


def _loaders(bundle: Any, cfg: dict[str, Any], seed: int, *, shard: bool = False) -> tuple[Any, Any]:
    """Seeded train / val loaders; ``shard``: under torchrun each process gets its own part of the train set
    (only for DDP-wrapped training, where gradients are averaged)."""
    from . import data as ltc_data

    d = cfg["data"]
    train, val = ltc_data.loaders(bundle, batch_size=d["batch_size"], workers=d["workers"], seed=seed,
                                  eval_batch_size=d["eval_batch_size"])
    if shard and _world() > 1:
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = DistributedSampler(bundle.train, shuffle=True, seed=seed, drop_last=True)
        train = DataLoader(bundle.train, batch_size=d["batch_size"], sampler=sampler, num_workers=d["workers"],
                           worker_init_fn=ltc_data.seed_worker if d["workers"] > 0 else None)
    return train, val


# =========================================================================================== distributed


def _world() -> int:
    from .utils import world_size

    return world_size()


def _maybe_init_distributed(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): initialise the process group; returns the device this process uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return device
    dev = resolve_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return str(dev)


# ============================================================================================== train


def _example(shape: Sequence[int], device: torch.device | str = "cpu", batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, *shape, device=device)


def _load_weights(model: nn.Module, ref: str) -> None:
    loaded = runs.load_model(ref)
    try:
        model.load_state_dict(loaded.model.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"model.checkpoint {ref}: the weights do not fit {type(model).__name__} ({str(exc)[:300]})") \
            from None


def run_train(cfg: dict[str, Any], out: Path, *, resume: bool = False, overwrite: bool = False,
              bundle_info: tuple[Any, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train ``cfg``'s model into the run folder ``out``; returns the result dict (also in result.json)."""
    from . import models
    from .train import RunLog, evaluate, fit

    m, t, r = cfg["model"], cfg["train"], cfg["run"]
    if not m["name"]:
        raise ValueError("no model to train: pass --model NAME (ltc profile --list) or set model.name in --config")
    if ":" in m["name"]:
        raise ValueError("ltc train builds zoo models only (model.name); profile accepts module:callable paths")
    device = resolve_device(_maybe_init_distributed(r["device"]))
    progress = _progress(cfg)
    out = runs.prepare_out(out, resume=resume, overwrite=overwrite, what="training run")
    seed_everything(r["seed"])
    if bundle_info is None:
        _say(f"[data] {cfg['data']['source'] or _DIGITS}")
    bundle, info = bundle_info if bundle_info is not None else _build_data(cfg, None, progress=progress)
    _say(f"       {len(bundle.train)} train / {len(bundle.val) if bundle.val is not None else 0} val images, "
         f"{bundle.num_classes} classes, input {'x'.join(map(str, bundle.input_shape))}")
    if m["num_classes"] is not None and m["num_classes"] != bundle.num_classes:
        raise ValueError(f"model.num_classes is {m['num_classes']} but {bundle.source} has {bundle.num_classes} "
                         "classes; drop --num-classes to use the data's")
    model = models.create(m["name"], num_classes=bundle.num_classes, width=m["width"], in_channels=bundle.in_channels)
    if m["checkpoint"]:
        _load_weights(model, m["checkpoint"])
    x = _example(bundle.input_shape)
    prof = profile(model, x)
    dataset = info["name"]
    runs.write_json(out / runs.RUN_NAME, {"kind": "train", "model": m["name"], "model_config": model.ltc_config,
                                          "dataset": dataset, "data": info})
    if is_main_process():
        atomic_write_text(out / runs.CONFIG_NAME, cfgmod.dump_config(cfg))
    _say(f"[train] {m['name']} (width {m['width']:g}): {format_count(prof.macs)} MACs per sample, "
         f"{format_count(prof.params)} params; {t['epochs']} epochs on {device} -> {out}")
    train_loader, val_loader = _loaders(bundle, cfg, info["seed"], shard=True)
    net: nn.Module = model.to(device)
    if _world() > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    sched = None if t["schedule"] == "none" and t["warmup_epochs"] == 0 else {
        "name": t["schedule"], "warmup_epochs": t["warmup_epochs"]}
    t0 = time.perf_counter()
    history = fit(net, train_loader, val_loader, epochs=t["epochs"],
                  opt_cfg={"name": t["optimizer"], "lr": t["lr"], "momentum": t["momentum"],
                           "nesterov": t["nesterov"], "weight_decay": t["weight_decay"]},
                  sched_cfg=sched, device=device, checkpoint_path=out / runs.TRAIN_CHECKPOINT, resume=resume,
                  log=RunLog(out), progress=progress, amp=t["amp"], channels_last=t["channels_last"],
                  grad_clip=t["grad_clip"], label_smoothing=t["label_smoothing"], seed=r["seed"])
    seconds = time.perf_counter() - t0
    acc = history[-1].get("val_acc") if history else None
    if acc is None and val_loader is not None:
        acc = evaluate(model, val_loader, device=device).acc
    model = model.cpu().eval()
    result = {
        "kind": "train", "model": m["name"], "dataset": dataset, "acc": acc, "macs": prof.macs,
        "params": prof.params, "epochs": t["epochs"], "seconds": seconds, "model_config": model.ltc_config,
        "data": info, "history": history, "config": cfg,
    }
    runs.save_model(model, out / runs.MODEL_NAME, meta={"kind": "train", "model": m["name"], "dataset": dataset,
                                                        "data": info, "acc": acc})
    runs.write_json(out / runs.RESULT_NAME, result)
    _say(f"[train] done in {seconds:.0f} s: val acc {_pct(acc)} %, {format_count(prof.macs)} MACs per sample, "
         f"{format_count(prof.params)} params -> {out / runs.MODEL_NAME}")
    return result


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _resolve_config(args)
    src = cfg["data"]["source"] or _DIGITS
    name = cfg["model"]["name"] or "model"
    out = Path(args.out) if args.out else _root(cfg, f"{name}_{runs.dataset_key(src)}") / "base"
    run_train(cfg, out, resume=args.resume, overwrite=args.overwrite)
    return 0


# =========================================================================================== compress


def _check_compress(cfg: dict[str, Any], model: nn.Module) -> None:
    """Up-front checks before any data is read: λ / target rules and the layer globs."""
    from .engine import select_layers
    from .methods import get_method

    c = cfg["compress"]
    method = get_method(c["method"])
    if (method.learns or c["method"] == "oneshot") and (c["lam"] is None) == (c["target_sr"] is None):
        raise ValueError(f"method {c['method']!r} needs exactly one of --lam λ (cost weight) or --target-sr SR "
                         "(budget mode); set compress.lam or compress.target_sr in the config")
    if not method.learns and c["method"] != "oneshot" and c["lam"] is not None:
        raise ValueError(f"method {c['method']!r} picks its ranks without λ; drop --lam (use --target-sr or "
                         "compress.method_options)")
    select_layers(model, c["include"], c["exclude"], c["compress_linear"])


def _auto_label(cfg: dict[str, Any]) -> str:
    c = cfg["compress"]
    if c["target_sr"] is not None:
        return f"{c['method']}_sr{c['target_sr']:g}"
    if c["lam"] is not None:
        return f"{c['method']}_lam{c['lam']:g}"
    return str(c["method"])


def _default_base(cfg: dict[str, Any], args: argparse.Namespace) -> Path:
    ref = getattr(args, "base", None) or cfg["run"]["base"]
    if ref:
        return Path(ref)
    if getattr(args, "config", None) or cfg["run"]["out"]:
        cand = _root(cfg, "run") / "base"
        if cand.exists():
            return cand
        raise FileNotFoundError(f"no base run at {cand}; train it first (ltc train --config ...) or pass --base")
    raise ValueError("which model to compress? pass --base RUN_FOLDER (from ltc train) or a model file")


def _compress_root(cfg: dict[str, Any], base: Path) -> Path:
    if cfg["run"]["out"] or cfg["run"]["name"]:
        return _root(cfg, "run")
    base_dir = base if base.is_dir() else base.parent
    return base_dir.parent if base_dir.name == "base" else base_dir.parent / base_dir.name


def run_compress(cfg: dict[str, Any], base_ref: str | Path, out: Path, *, resume: bool = False,
                 overwrite: bool = False, base: runs.LoadedModel | None = None,
                 bundle_info: tuple[Any, dict[str, Any]] | None = None, plots: bool = True,
                 summary: bool = True) -> dict[str, Any]:
    """Compress the base model into the run folder ``out``; returns the result dict (also in result.json)."""
    from .api import compress
    from .latency import compare_latency
    from .methods import get_method

    r = cfg["run"]
    device = _maybe_init_distributed(r["device"])
    resolve_device(device)
    base = base if base is not None else runs.load_model(base_ref)
    _check_compress(cfg, base.model)
    ccfg = cfgmod.compress_config(cfg)
    ccfg.device = device
    label = r["label"] or _auto_label(cfg)
    if resume and (out / runs.RESULT_NAME).is_file() and (out / runs.MODEL_NAME).is_file():
        _say(f"[compress] {out} is already complete; skipping (use --overwrite to redo it)")
        return runs.read_json(out / runs.RESULT_NAME)
    out = runs.prepare_out(out, resume=resume, overwrite=overwrite, what="compression run")
    if resume and not (out / "compress.pt").is_file():
        resume = False  # nothing to resume yet: start afresh
    progress = _progress(cfg)
    seed_everything(ccfg.seed)
    bundle, info = bundle_info if bundle_info is not None else _build_data(cfg, base, progress=progress)
    if base.input_shape is not None and tuple(bundle.input_shape) != base.input_shape:
        raise ValueError(f"the base model was trained on {'x'.join(map(str, base.input_shape))} inputs, the data "
                         f"gives {'x'.join(map(str, bundle.input_shape))}")
    # under torchrun ltc.api.compress trains DDP-wrapped: each process takes its share of the data
    train_loader, val_loader = _loaders(bundle, cfg, info["seed"], shard=True)
    if is_main_process():
        atomic_write_text(out / runs.CONFIG_NAME, cfgmod.dump_config(cfg))
    c = cfg["compress"]
    goal = f"target SR {c['target_sr']:g}" if c["target_sr"] is not None else (
        f"λ = {c['lam']:g}" if c["lam"] is not None else "its own rank rule")
    layers = f", layers {' '.join(c['include'])}" if c["include"] else ""
    if get_method(c["method"]).learns:
        plan = f"{c['steps']} LC steps x {_plural(c['epochs_per_step'], 'epoch')}, then " \
               f"{_plural(c['finetune_epochs'], 'fine-tuning epoch')}"
    else:
        extra = c["steps"] * c["epochs_per_step"] if c["equal_budget"] else 0
        plan = _plural(c["finetune_epochs"] + extra, "fine-tuning epoch") + (
            f" (incl. the {extra} of the LC steps it skips: the same epoch budget)" if extra else "")
    _say(f"[compress] {c['method']} with {goal}{layers} on {base.name}: {plan} -> {out}")
    x = _example(bundle.input_shape)
    result = compress(base.model, train_loader, example_input=x, val_loader=val_loader, config=ccfg,
                      checkpoint_dir=out, resume=resume, progress=progress)
    small = result.model.cpu().eval()
    base_cpu = base.model.cpu().eval()
    _say(f"[latency] CPU, batch 1, {_plural(r['latency_threads'], 'thread')}, {r['latency_repeats']} interleaved "
         "runs of each model")
    lat = compare_latency(base_cpu, small, _example(bundle.input_shape), threads=r["latency_threads"],
                          repeats=r["latency_repeats"], device="cpu")
    d = result.to_dict()
    d.update({
        "kind": "compress", "model": base.name, "dataset": info["name"], "label": label,
        "latency": {"batch1": lat}, "data": info, "base_run": str(base_ref),
        "model_config": getattr(small, "ltc_config", None), "run_config": cfg,
    })
    runs.save_model(small, out / runs.MODEL_NAME, meta={
        "kind": "compress", "model": base.name, "dataset": info["name"], "data": info, "label": label,
        "method": result.method, "sr": result.sr, "cr": result.cr, "acc": result.acc,
    })
    runs.write_json(out / runs.RESULT_NAME, d)
    runs.write_rows_csv(out / "log.csv", result.log)
    if plots and r["plots"]:
        _run_plots(d, out)
    if not summary:
        return d
    _say(result.summary())
    _say(f"measured CPU latency (batch 1): base {lat['base_ms']:.3f} ms, compressed {lat['compressed_ms']:.3f} ms, "
         f"measured speed-up {lat['speedup']:.2f}x (SR {result.sr:.2f} is the theoretical MAC speed-up)")
    return d


def _run_plots(run: dict[str, Any], out: Path, prefix: str = "") -> list[Path]:
    """Rank distribution (+ trajectories for learning methods) of one run; a failing plot only warns."""
    if not is_main_process():
        return []
    from . import plots

    written: list[Path] = []
    jobs: list[tuple[str, Callable[..., list[Path]]]] = [("ranks", plots.plot_rank_distribution)]
    if run.get("history"):
        jobs.append(("trajectories", plots.plot_trajectories))
    for name, fn in jobs:
        try:
            written += fn(run, out / f"{prefix}{name}")
        except Exception as exc:  # a figure must never cost a finished run
            warnings.warn(f"could not draw {name} for {out}: {exc}", stacklevel=2)
    return written


def cmd_compress(args: argparse.Namespace) -> int:
    cfg = _resolve_config(args)
    base_ref = _default_base(cfg, args)
    base = runs.load_model(base_ref)
    root = _compress_root(cfg, base_ref)
    items = cfgmod.variants(cfg)
    if args.variant:
        known = [n for n, _ in items]
        missing = [v for v in args.variant if v not in known]
        if missing:
            raise ValueError(f"unknown variant(s) {', '.join(missing)}; the config has: {', '.join(known) or 'none'}")
        items = [(n, c) for n, c in items if n in args.variant]
    if not items:
        out = Path(args.out) if args.out else root / (cfg["run"]["label"] or _auto_label(cfg))
        run_compress(cfg, base_ref, out, resume=args.resume, overwrite=args.overwrite, base=base)
        return 0
    for _, c in items:  # check every variant before the first one runs for hours
        _check_compress(c, base.model)
    top = Path(args.out) if args.out else root
    for name, c in items:
        _say(f"\n=== variant {name} ===")
        run_compress(c, base_ref, top / name, resume=args.resume, overwrite=args.overwrite,
                     base=runs.load_model(base_ref))
    _say(f"\n{len(items)} runs in {top}; tables: ltc report {top} (--layers / --compare)")
    return 0


# =========================================================================================== finetune


def cmd_finetune(args: argparse.Namespace) -> int:
    from .train import RunLog, fit

    cfg = _resolve_config(args)
    src = runs.load_model(args.run)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    run_dir = src.run_dir or src.path.parent
    out = Path(args.out) if args.out else run_dir.parent / f"{run_dir.name}_ft"
    out = runs.prepare_out(out, resume=args.resume, overwrite=args.overwrite, what="fine-tuning run")
    device = resolve_device(_maybe_init_distributed(cfg["run"]["device"]))
    progress = _progress(cfg)
    seed_everything(cfg["run"]["seed"])
    bundle, info = _build_data(cfg, src, progress=progress)
    train_loader, val_loader = _loaders(bundle, cfg, info["seed"])
    lr = args.lr if args.lr is not None else cfg["compress"]["finetune_lr"]
    c = cfg["compress"]
    prev = src.result.get("compressed", {}).get("acc") if src.result.get("kind") != "train" else src.result.get("acc")
    _say(f"[finetune] {src.name} from {src.path}: {args.epochs} epochs at lr {lr:g} on {device} -> {out}")
    model = src.model.to(device)
    history = fit(model, train_loader, val_loader, epochs=args.epochs,
                  opt_cfg={"name": c["optimizer"], "lr": lr, "momentum": c["momentum"], "nesterov": c["nesterov"],
                           "weight_decay": c["weight_decay"]},
                  sched_cfg={"name": "cosine"}, device=device, checkpoint_path=out / "finetune.pt",
                  resume=args.resume, log=RunLog(out), progress=progress, label_smoothing=c["label_smoothing"],
                  seed=cfg["run"]["seed"])
    acc = history[-1].get("val_acc") if history else None
    model = model.cpu().eval()
    result = copy.deepcopy(src.result) if src.result else {"kind": "train", "model": src.name,
                                                            "dataset": info["name"]}
    prof = profile(model, _example(bundle.input_shape))
    if result.get("kind") == "train":
        result.update({"acc": acc, "macs": prof.macs, "params": prof.params})
    else:
        result.setdefault("compressed", {}).update({"acc": acc, "macs": prof.macs, "params": prof.params})
        result["label"] = f"{result.get('label') or result.get('method', 'model')} +ft{args.epochs}"
    result["finetune"] = {"from": str(src.path), "epochs": args.epochs, "lr": lr, "acc_before": prev,
                          "history": history}
    result["data"] = info
    meta = dict(src.meta)
    meta.update({"acc": acc, "data": info})
    runs.save_model(model, out / runs.MODEL_NAME, meta=meta)
    runs.write_json(out / runs.RESULT_NAME, result)
    _say(f"[finetune] val acc {_pct(prev)} % -> {_pct(acc)} %; saved {out / runs.MODEL_NAME}")
    return 0


# =============================================================================================== eval


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from . import data as ltc_data
    from .train import evaluate

    cfg = _resolve_config(args)
    src = runs.load_model(args.target)
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
        "in_memory": d["in_memory"], "progress": _progress(cfg),
    }
    if kw["mean"] is not None and kw["channels"] is not None and len(kw["mean"]) != kw["channels"]:
        kw["mean"] = kw["std"] = None
    split = args.split
    if split is None:
        try:
            ds = ltc_data.load_split(source, "test", **kw)
            split = "test"
        except ltc_data.DataError:
            ds = ltc_data.load_split(source, "val", **kw)
            split = "val"
    else:
        ds = ltc_data.load_split(source, split, **kw)
    n_out = _num_outputs(src.model)
    if n_out is not None and n_out != ds.num_classes:
        raise ValueError(f"the model has {n_out} outputs but {source} ({split}) has {ds.num_classes} classes")
    device = resolve_device(cfg["run"]["device"])
    loader = ltc_data.eval_loader(ds, batch_size=d["eval_batch_size"] or d["batch_size"], workers=d["workers"])
    st = evaluate(src.model, loader, device=device, progress=_progress(cfg))
    c, h, w = ds[0][0].shape
    prof = profile(src.model.cpu(), _example((c, h, w)))
    out = {"model": src.name, "path": str(src.path), "data": str(source), "split": split, "samples": st.samples,
           "acc": st.acc, "loss": st.loss, "macs": prof.macs, "params": prof.params, "input": [c, h, w]}
    if args.json:
        _say(json.dumps(out, indent=2))
    else:
        _say(f"{src.name} ({src.path}) on {source} [{split}, {st.samples} images, {c}x{h}x{w}]:\n"
             f"  accuracy {_pct(st.acc)} %  (loss {st.loss:.4f})\n"
             f"  {format_count(prof.macs)} MACs per sample, {format_count(prof.params)} params")
    return 0


# ============================================================================================== sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import plots, report

    cfg = _resolve_config(args)
    lams, srs = cfg["sweep"]["lams"], cfg["sweep"]["target_srs"]
    if bool(lams) == bool(srs):
        raise ValueError("give the sweep values: --lams λ1 λ2 ... or --target-srs SR1 SR2 ... (or sweep.lams in "
                         "the config), not both")
    base_ref = _default_base(cfg, args)
    base = runs.load_model(base_ref)
    if args.out:
        top = Path(args.out)
    elif getattr(args, "config", None) or cfg["run"]["out"]:
        top = _root(cfg, "sweep")
    else:
        top = _compress_root(cfg, base_ref) / "sweep"
    jobs = []
    for v in lams or srs:
        sub = copy.deepcopy(cfg)
        key = "lam" if lams else "target_sr"
        sub = cfgmod.merge(sub, {"compress": {key: v}})
        sub["run"]["label"] = f"λ={v:g}" if lams else f"SR {v:g}"
        jobs.append((f"lam_{v:g}" if lams else f"sr_{v:g}", sub))
    for _, c in jobs:
        _check_compress(c, base.model)
    progress = _progress(cfg)
    bundle_info = _build_data(cfg, base, progress=progress)
    dirs = []
    for i, (name, c) in enumerate(jobs):
        _say(f"\n=== sweep {i + 1}/{len(jobs)}: {c['run']['label']} ===")
        run_compress(c, base_ref, top / name, resume=args.resume, overwrite=args.overwrite,
                     base=runs.load_model(base_ref), bundle_info=bundle_info)
        dirs.append(top / name)
    if not is_main_process():
        return 0
    loaded = report.load_runs(dirs)
    table = report.sweep_table(loaded)
    report.write_tables({"sweep": table}, top)
    _say("\n" + table.to_markdown())
    written = []
    if lams:
        written += plots.plot_lambda_sweep(loaded, top / "lambda_sweep")
    written += plots.plot_rank_distribution(loaded, top / "ranks")
    _say(f"wrote {top / 'sweep.md'}, {top / 'sweep.csv'} and {', '.join(str(p) for p in written)}")
    return 0


# ============================================================================================= report


def cmd_report(args: argparse.Namespace) -> int:
    from . import plots, report

    loaded = report.load_runs(runs.expand_runs(args.runs))
    tables: dict[str, Any] = {"table1": report.table1(loaded)}
    if args.layers:
        tables["layers"] = report.table_layers(loaded)
    if args.compare:
        tables["table4"] = report.table4(loaded)
    if args.sweep:
        tables["sweep"] = report.sweep_table(loaded)
    out = Path(args.out)
    written = report.write_tables(tables, out) if is_main_process() else []
    for t in tables.values():
        _say(t.to_markdown())
    if args.compare and is_main_process():
        if any(not report.is_train_run(r) for r in loaded):
            written += plots.plot_accuracy_vs_sr(loaded, out / "accuracy_vs_sr")
        else:
            _say("(no compression runs: no accuracy-vs-SR figure)")
    _say(f"{len(loaded)} runs; wrote {', '.join(str(p) for p in written)}")
    return 0


# =============================================================================================== plot


def cmd_plot(args: argparse.Namespace) -> int:
    from . import plots, report

    dirs = runs.expand_runs(args.runs)
    loaded = report.load_runs(dirs)
    comp = [r for r in loaded if not report.is_train_run(r)]
    if not comp:
        raise ValueError("no compression runs among the given folders (base-model runs have no ranks to plot)")
    out = Path(args.out) if args.out else None
    written: list[Path] = []
    for r in comp:
        d = Path(r["_path"])
        written += _run_plots(r, out or d, prefix=f"{d.name}-" if out else "")
    if len(comp) > 1 and is_main_process():
        common = out or Path(os.path.commonpath([str(Path(r["_path"]).resolve()) for r in comp]))
        written += plots.plot_rank_distribution(comp, common / "ranks_all")
        if len({r.get("lam") for r in comp}) > 1:
            written += plots.plot_lambda_sweep(comp, common / "lambda_sweep")
        written += plots.plot_accuracy_vs_sr(loaded, common / "accuracy_vs_sr")
    _say("wrote:\n  " + "\n  ".join(str(p) for p in written))
    return 0


# ============================================================================================= export


def cmd_export(args: argparse.Namespace) -> int:
    from . import io as ltc_io

    if not args.onnx and not args.torchscript:
        raise ValueError("give --onnx PATH and/or --torchscript PATH")
    src = runs.load_model(args.target)
    shape = src.input_shape
    c = args.in_channels or (shape[0] if shape else 3)
    s = args.input_size or (shape[1] if shape else _zoo_input_size(src.name))
    x = torch.randn(args.batch, c, s, s, generator=torch.Generator().manual_seed(0))
    fold = " (BatchNorm folded)" if args.fold_bn else ""
    if args.onnx:
        diff = ltc_io.export_onnx(src.model, args.onnx, x, fold_bn=args.fold_bn, opset=args.opset)
        _say(f"ONNX{fold} -> {args.onnx}: input {args.batch}x{c}x{s}x{s}, max |ONNX Runtime - PyTorch| = {diff:.3g}")
    if args.torchscript:
        diff = ltc_io.export_torchscript(src.model, args.torchscript, x, fold_bn=args.fold_bn)
        _say(f"TorchScript{fold} -> {args.torchscript}: input {args.batch}x{c}x{s}x{s}, "
             f"max |TorchScript - PyTorch| = {diff:.3g}")
    return 0


def _zoo_input_size(name: str) -> int:
    from . import models

    try:
        return models.default_input_size(name)
    except ValueError:
        return 224


# ============================================================================================ profile


def _load_callable(spec: str) -> Callable[..., Any]:
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


def _call_user(fn: Callable[..., Any], **wanted: Any) -> nn.Module:
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


def cmd_profile(args: argparse.Namespace) -> int:
    from . import models

    target: str = args.target
    zoo = target in models.list_models()
    ref_key: tuple[str, int] | None = None
    if zoo:
        size = args.input_size or models.default_input_size(target)
        in_ch = args.in_channels or 3
        ncls = args.num_classes or 1000
        model = models.create(target, num_classes=ncls, width=args.width or 1.0, in_channels=in_ch)
        label = f"{target} ({ncls} classes, width {args.width or 1.0:g})"
        if (args.width or 1.0) == 1.0 and in_ch == 3:
            ref_key = (target, size)
    elif Path(target).exists():
        src = runs.load_model(target)
        model = src.model
        shape = src.input_shape
        in_ch = args.in_channels or (shape[0] if shape else 3)
        size = args.input_size or (shape[1] if shape else _zoo_input_size(src.name))
        label = f"{src.name} from {src.path}"
    elif ":" in target:
        model = _call_user(_load_callable(target), num_classes=args.num_classes, width=args.width,
                           in_channels=args.in_channels)
        size = args.input_size or 224
        in_ch = args.in_channels or 3
        label = f"{target} ({type(model).__name__})"
    else:
        close = __import__("difflib").get_close_matches(target, models.list_models(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{target!r} is not a zoo model, a module:callable / file.py:callable or an existing "
                         f"path.{hint} Zoo models: {', '.join(models.list_models())}")
    if args.batch < 1 or size < 1:
        raise ValueError("--batch and --input-size must be >= 1")
    model.eval()
    x = torch.zeros(args.batch, in_ch, size, size)
    with torch.no_grad():
        prof = profile(model, x)
    if args.list:
        _say("zoo models: " + ", ".join(f"{n} ({models.default_input_size(n)} px)" for n in models.list_models()))
    _say(prof.table())
    giga = f" = {prof.macs / 1e9:.2f} G" if 1e7 <= prof.macs < 1e9 else ""
    _say(f"\n{label} @ {in_ch}x{size}x{size}: {format_count(prof.macs)} MACs per sample{giga} "
         f"({format_count(prof.flops)} FLOPs = 2·MACs), {format_count(prof.params)} params")
    if ref_key in SLIDES_FLOPS:
        ref, shown, where = SLIDES_FLOPS[ref_key]
        diff = 100 * (ref / prof.macs - 1)
        _say(f"slides' \"FLOPs\": {shown} ({where}): {abs(diff):.1f} % {'above' if diff >= 0 else 'below'} this "
             "conv + linear MAC count (the slides' counter added other ops and rounds; ltc counts conv + linear only)")
    return 0


# =============================================================================================== demo


def _demo_plan(quick: bool, n_train: int) -> dict[str, int]:
    """Epoch budget of the demo: digits in about 2 minutes on 2 cores; fewer epochs for big data."""
    if quick:
        return {"epochs": 2, "steps": 2, "epochs_per_step": 1, "finetune": 1}
    if n_train > 20_000:
        return {"epochs": 4, "steps": 4, "epochs_per_step": 1, "finetune": 2}
    return {"epochs": 15, "steps": 12, "epochs_per_step": 1, "finetune": 6}


def idle_threads() -> int:
    """CPU threads worth using now: the cores not busy with other processes (1-minute load average), >= 1.

    OpenMP threads on oversubscribed cores spin against each other (a 2-thread small conv can run 10x slower
    than a 1-thread one on a busy 2-core machine), so the demo uses only the idle cores."""
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    return max(1, min(torch.get_num_threads(), round(n - load)))


def cmd_demo(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    out = Path(args.out)
    progress = not args.no_progress
    threads = args.threads or idle_threads()
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _demo(args, out, progress, threads, t_start)
    finally:
        torch.set_num_threads(old_threads)


def _demo(args: argparse.Namespace, out: Path, progress: bool, threads: int, t_start: float) -> int:
    _say(f"ltc demo: train a small CNN, learn its Tucker-2 ranks for a target SR of {args.target_sr:g} "
         f"(SR = base MACs / compressed MACs), fine-tune, and measure it. Output: {out}/ "
         f"({_plural(threads, 'CPU thread')}"
         f"{'' if args.threads else ': the cores not busy with other work; --threads N to choose'})\n")
    cfg = cfgmod.load_config(overrides={
        "model": {"name": "small_cnn", "width": 0.5},
        "data": {"source": args.data, "image_size": args.image_size, "batch_size": 64},
        "train": {"lr": 0.05},
        "run": {"device": args.device, "seed": args.seed, "progress": progress, "label": "LTC",
                "latency_threads": threads},
        # a short, steep μ schedule: a dozen LC steps must bring W close to its Tucker-2 projection Θ
        "compress": {"method": "ltc", "target_sr": args.target_sr, "lr": 0.01, "finetune_lr": 0.01, "mu0": 5e-3,
                     "mu_growth": 1.6},
    })
    _say(f"[1/4] data: {args.data}")
    bundle_info = _build_data(cfg, None, progress=progress)
    bundle, info = bundle_info
    plan = _demo_plan(args.quick, len(bundle.train))
    cfg = cfgmod.merge(cfg, {"train": {"epochs": plan["epochs"]},
                             "compress": {"steps": plan["steps"], "epochs_per_step": plan["epochs_per_step"],
                                          "finetune_epochs": plan["finetune"]}})
    _say(f"\n[2/4] train small_cnn (width 0.5) from scratch: {plan['epochs']} epochs of SGD, cosine LR")
    base_res = run_train(cfg, out / "base", overwrite=True, bundle_info=bundle_info)
    _say(f"\n[3/4] compress with LTC to SR {args.target_sr:g} (budget mode: λ found by bisection each C step): "
         f"{plan['steps']} LC steps (L step = {plan['epochs_per_step']} epoch of SGD on loss + "
         "μ/2 Σ w_k‖W_k − Θ_k − φ_k/(μw_k)‖², "
         f"C step = joint rank search per layer),\n      then {_plural(plan['finetune'], 'fine-tuning epoch')} with "
         "ranks fixed")
    res = run_compress(cfg, out / "base", out, overwrite=True, bundle_info=bundle_info, summary=False)
    _say(f"\n[4/4] results (MACs per sample; SR = base MACs / compressed MACs; CR = base params / compressed params; "
         f"latency measured on CPU at batch 1, {_plural(threads, 'thread')})\n")
    _say(demo_table(base_res, res))
    ranks = ", ".join(f"{n}: {tuple(r) if r is not None else 'dense'}/{tuple(res['full_ranks'][n])}"
                      for n, r in res["ranks"].items())
    _say(f"\nlayer ranks (r_in, r_out) / full (S, T): {ranks}")
    _say(f"\nwrote {out}/result.json, {out}/model.pt, {out}/ranks.png|pdf, {out}/trajectories.png|pdf, "
         f"{out}/base/ (base run). Total {time.perf_counter() - t_start:.0f} s.")
    _say(f"next: ltc report {out} {out}/base   |   ltc export {out} --onnx {out}/model.onnx")
    return 0


def demo_table(base: dict[str, Any], res: dict[str, Any]) -> str:
    """The demo's slides-style table: base and compressed MACs, SR, params, CR, accuracy, CPU latency, speed-up."""
    lat = res["latency"]["batch1"]
    c = res["compressed"]
    rows = [
        (f"base {base['model']}", base["macs"], 1.0, base["params"], 1.0, base["acc"], lat["base_ms"], 1.0),
        ("LTC", c["macs"], res["sr"], c["params"], res["cr"], c["acc"], lat["compressed_ms"], lat["speedup"]),
    ]
    head = ("| model | MACs | SR | params | CR | acc (%) | CPU latency, batch 1 (ms) | measured speed-up |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for name, macs, sr, params, cr, acc, ms, sp in rows:
        lines.append(f"| {name} | {format_count(macs)} | {sr:.2f} | {format_count(params)} | {cr:.2f} | "
                     f"{_pct(acc)} | {ms:.3f} | {sp:.2f}x |")
    if c.get("acc_before_finetune") is not None:
        lines.append(f"\naccuracy right after compression, before fine-tuning: {_pct(c['acc_before_finetune'])} %")
    return "\n".join(lines)


# =============================================================================================== main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ltc`` command; returns the exit status (0 ok, 2 usage or data error, 1 other failure)."""
    from .data import DataError
    from .train import NonFiniteLossError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse usage errors / --help / --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(format="%(message)s")
    logging.getLogger("ltc").setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        return int(args.func(args) or 0)
    except (DataError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ImportError) as exc:
        if debug:
            raise
        print(f"ltc: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        if debug:
            raise
        print(f"ltc: error: {exc}; lower the learning rate (--lr) or use --set train.grad_clip=1", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as exc:
        if debug:
            raise
        print(f"ltc: error: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ltc: interrupted; --resume continues from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
