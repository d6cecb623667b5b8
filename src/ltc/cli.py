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
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import config as cfgmod
from . import pipelines, runs
from .api import CompressConfig
from .cost import format_count, profile
from .methods import list_methods
from .settings import (
    COMPRESS_PENALTY_STEPS,
    COSTS,
    LC_LR_SCHEDULES,
    MEMORY_FORMATS,
    METRICS,
    MU_PATHS,
    OPTIMIZERS,
    SCHEDULES,
    TARGET_SCHEDULES,
    WEIGHTINGS,
)
from .utils import is_main_process

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

_DIGITS = pipelines.DIGITS


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
    f("--optimizer", key="train.optimizer", choices=OPTIMIZERS, help="default sgd (Nesterov)")
    f("--momentum", key="train.momentum", type=float, help="SGD momentum (default 0.9)")
    f("--weight-decay", key="train.weight_decay", type=float, help="default 5e-4")
    f("--schedule", key="train.schedule", choices=SCHEDULES, help="LR schedule per epoch")
    f("--warmup-epochs", key="train.warmup_epochs", type=int, help="linear LR warm-up epochs")
    f("--label-smoothing", key="train.label_smoothing", type=float, help="default 0")
    f("--amp", key="train.amp", action="store_true", help="mixed precision (CUDA only)")
    f("--channels-last", key="train.channels_last", action="store_true", help="channels_last memory format (CUDA)")


def _compress_opts(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    g = p.add_argument_group("compression")
    f = _Flags(g)
    f("--method", key="compress.method", choices=list_methods(),
      help="ltc (the paper: learned Tucker-2 ranks), lrc (learned matrix ranks), oneshot (one LTC C step, no "
           "learning), vbmf (Tucker-2 with EVBMF ranks), uniform (one rank fraction), prune (Torch-Pruning channel "
           "pruning; pip install -e '.[prune]'); default ltc")
    if not sweep:
        mx = g.add_mutually_exclusive_group()
        _Flags(mx)("--lam", key="compress.lam", type=float, metavar="λ",
                   help="λ, the weight of the cost term (dimensionless; larger = smaller model)")
        _Flags(mx)("--target-sr", key="compress.target_sr", type=float, metavar="SR",
                   help="budget mode: reach this SR = base MACs / compressed MACs (with --cost params: this CR)")
        _Flags(mx)("--target-speedup", key="compress.target_speedup", type=float, metavar="X",
                   help="budget mode on measured latency: reach this speed-up on the clock (a per-layer latency "
                        "table is measured first; ltc, lrc, oneshot)")
    f("--layers", key="compress.include", action="extend", nargs="+", metavar="GLOB",
      help="compress only layers whose module name matches (fnmatch), e.g. 'layer1.*' conv1 features.0 — the "
           "slides' layer analysis; a glob matching nothing is an error")
    f("--exclude", key="compress.exclude", action="extend", nargs="+", metavar="GLOB", help="leave these dense")
    f("--epochs", key="compress.epochs", type=int,
      help="the whole epoch budget: LC steps then fine-tuning for ltc/lrc, fine-tuning for the others")
    f("--steps", key="compress.steps", type=int, help=f"LC steps (C steps) (default {CompressConfig.default('steps')})")
    f("--epochs-per-step", key="compress.epochs_per_step", type=float,
      help=f"epochs of each L step (default {CompressConfig.default('epochs_per_step'):g}); a fraction below 1 "
           "trains each L step on that share of one epoch")
    f("--target-schedule", key="compress.target_schedule", choices=TARGET_SCHEDULES,
      help="with --target-sr and L steps: every C step aims at the target (fixed, default) or the target is reached "
           "a step at a time (gradual: SR ** ((j + 1) / steps) at C step j)")
    f("--finetune-epochs", key="compress.finetune_epochs", type=int,
      help="fine-tuning epochs, ranks fixed (default: what --epochs leaves, else 5)")
    f("--lr", key="compress.lr", type=float,
      help=f"first L step's learning rate (default {CompressConfig.default('lr')})")
    f("--lr-schedule", key="compress.lr_schedule", choices=LC_LR_SCHEDULES,
      help=f"how the L-step learning rate moves: held, then annealed over the last --lr-anneal of the LC epochs, "
           f"each L step's penalty scaled with it (cosine), or restarted each L step (restart, the LC paper's "
           f"scripts) (default {CompressConfig.default('lr_schedule')})")
    f("--lr-anneal", key="compress.lr_anneal", type=float,
      help=f"with --lr-schedule cosine: the share of the LC epochs over which the rate anneals, held at --lr before "
           f"(default {CompressConfig.default('lr_anneal'):g}; 1: all of them)")
    f("--finetune-lr", key="compress.finetune_lr", type=float, help="fine-tuning learning rate (default 0.01)")
    f("--mu0", key="compress.mu0", type=float, help="first penalty weight μ0 (default 1e-3)")
    f("--mu-growth", key="compress.mu_growth", type=float,
      help="μ grows by this factor per step (default: automatic, so that the last L step closes W − Θ)")
    f("--penalty-step", key="compress.penalty_step", choices=COMPRESS_PENALTY_STEPS,
      help=f"apply the LC penalty in L steps as a gradient in the loss, or as its exact step after each optimizer "
           f"step (proximal: stable at any penalty weight, so every direction of W − Θ can be pinned), or the "
           f"gradient while the L-step rate is held and the exact step where it anneals (late-proximal) "
           f"(default {CompressConfig.default('penalty_step')})")
    f("--mu-path", key="compress.mu_path", choices=MU_PATHS,
      help="where the automatic μ path ends: 'pin', where every direction of W − Θ reaches the cap (the proximal "
           "step's default), or 'stable', the gradient step's path")
    f("--weighting", key="compress.weighting", choices=WEIGHTINGS,
      help="compare layers' errors relative to their weight norms (default), in absolute terms (SPEC §3), or "
           "relative and weighted by each layer's loss sensitivity (Fisher, on the calibration images)")
    f("--metric", key="compress.metric", choices=METRICS,
      help="measure each layer's error on its inputs ('data', default) or in weight space (the slides)")
    f("--cost", key="compress.cost", choices=COSTS,
      help="what λ / the budget counts: macs (default), params, or latency (measured per-layer table)")
    f("--latency-runtime", key="compress.latency_runtime", choices=("eager", "onnxruntime"),
      help="the runtime the latency table is measured on (default eager PyTorch)")
    f("--latency-batch", key="compress.latency_batch", type=int, help="batch size of the latency table (default 1)")
    f("--latency-memory-format", key="compress.latency_memory_format", choices=MEMORY_FORMATS,
      help="the layout the compressed network is timed and returned in under eager PyTorch: contiguous (NCHW, "
           "default) or channels_last (NHWC, faster for factorised networks on the CPU)")
    f("--rank-multiple", key="compress.rank_multiple", type=int, help="ranks are multiples of this (default 1)")
    f("--kd-weight", key="compress.kd_weight", type=float,
      help="distil from the base model during L steps and fine-tuning: weight of the KD term in [0, 1] "
           "(default 0.5; 0 turns it off)")
    f("--kd-temperature", key="compress.kd_temperature", type=float, help="distillation temperature (default 4)")
    f("--compress-linear", key="compress.compress_linear", action="store_true",
      help="also compress nn.Linear layers by SVD (the slides keep them dense)")
    f("--min-rank", key="compress.min_rank", type=int, help="smallest rank per axis (default 2)")
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
            "model.pt, log.csv, checkpoint.pt (after every epoch; --resume) and "
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
            "More fine-tuning of a run's model (ranks fixed), with ltc compress's fine-tuning recipe: SGD, cosine, "
            "and a compressed run distilled from its base (compress.kd_weight, default 0.5; 0 for cross-entropy "
            "only). Writes a new run folder (default <RUN>_ft) with the updated result.json, so both stay "
            "comparable in reports.")
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
    p = add("demo", "train, compress and compare a small CNN end to end (about a minute on 2 CPU cores)",
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


# ============================================================================================== train


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _resolve_config(args)
    src = cfg["data"]["source"] or _DIGITS
    name = cfg["model"]["name"] or "model"
    out = Path(args.out) if args.out else _root(cfg, f"{name}_{runs.dataset_key(src)}") / "base"
    pipelines.train_run(cfg, out, resume=args.resume, overwrite=args.overwrite, say=_say)
    return 0


# =========================================================================================== compress


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
        out = Path(args.out) if args.out else root / (cfg["run"]["label"] or pipelines.auto_label(cfg))
        pipelines.compress_run(cfg, base_ref, out, resume=args.resume, overwrite=args.overwrite, base=base, say=_say)
        return 0
    for _, c in items:  # check every variant before the first one runs for hours
        pipelines.check_layers(c, base.model)
    top = Path(args.out) if args.out else root
    for name, c in items:
        _say(f"\n=== variant {name} ===")
        pipelines.compress_run(c, base_ref, top / name, resume=args.resume, overwrite=args.overwrite,
                               base=runs.load_model(base_ref), say=_say)
    _say(f"\n{len(items)} runs in {top}; tables: ltc report {top} (--layers / --compare)")
    return 0


# =========================================================================================== finetune


def cmd_finetune(args: argparse.Namespace) -> int:
    cfg = _resolve_config(args)
    pipelines.finetune_run(cfg, args.run, Path(args.out) if args.out else None, epochs=args.epochs, lr=args.lr,
                           resume=args.resume, overwrite=args.overwrite, say=_say)
    return 0


# =============================================================================================== eval


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    out = pipelines.evaluate_run(_resolve_config(args), args.target, args.split)
    if args.json:
        _say(json.dumps(out, indent=2))
    else:
        c, h, w = out["input"]
        _say(f"{out['model']} ({out['path']}) on {out['data']} [{out['split']}, {out['samples']} images, "
             f"{c}x{h}x{w}]:\n"
             f"  accuracy {_pct(out['acc'])} %  (loss {out['loss']:.4f})\n"
             f"  {format_count(out['macs'])} MACs per sample, {format_count(out['params'])} params")
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
        pipelines.check_layers(c, base.model)
    data = pipelines.build_data(cfg, base, progress=_progress(cfg))
    dirs = []
    for i, (name, c) in enumerate(jobs):
        _say(f"\n=== sweep {i + 1}/{len(jobs)}: {c['run']['label']} ===")
        pipelines.compress_run(c, base_ref, top / name, resume=args.resume, overwrite=args.overwrite,
                               base=runs.load_model(base_ref), data=data, say=_say)
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
        written += pipelines.run_plots(r, out or d, prefix=f"{d.name}-" if out else "")
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
    from .export import export_onnx, export_torchscript

    if not args.onnx and not args.torchscript:
        raise ValueError("give --onnx PATH and/or --torchscript PATH")
    src = runs.load_model(args.target)
    shape = src.input_shape
    c = args.in_channels or (shape[0] if shape else 3)
    s = args.input_size or (shape[1] if shape else _zoo_input_size(src.name))
    x = torch.randn(args.batch, c, s, s, generator=torch.Generator().manual_seed(0))
    fold = " (BatchNorm folded)" if args.fold_bn else ""
    if args.onnx:
        diff = export_onnx(src.model, args.onnx, x, fold_bn=args.fold_bn, opset=args.opset)
        _say(f"ONNX{fold} -> {args.onnx}: input {args.batch}x{c}x{s}x{s}, max |ONNX Runtime - PyTorch| = {diff:.3g}")
    if args.torchscript:
        diff = export_torchscript(src.model, args.torchscript, x, fold_bn=args.fold_bn)
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
        model = pipelines.call_user(pipelines.load_callable(target), num_classes=args.num_classes, width=args.width,
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
    """Epoch budget of the demo: digits in about a minute on 2 cores; fewer epochs for big data."""
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
    data = pipelines.build_data(cfg, None, progress=progress)
    bundle, info = data
    plan = _demo_plan(args.quick, len(bundle.train))
    cfg = cfgmod.merge(cfg, {"train": {"epochs": plan["epochs"]},
                             "compress": {"steps": plan["steps"], "epochs_per_step": plan["epochs_per_step"],
                                          "finetune_epochs": plan["finetune"]}})
    _say(f"\n[2/4] train small_cnn (width 0.5) from scratch: {plan['epochs']} epochs of SGD, cosine LR")
    base_res = pipelines.train_run(cfg, out / "base", overwrite=True, data=data, say=_say).to_dict()
    _say(f"\n[3/4] compress with LTC to SR {args.target_sr:g} (budget mode: λ found by bisection each C step): "
         f"{plan['steps']} LC steps (L step = {plan['epochs_per_step']} epoch of SGD on the loss, each SGD step "
         "followed by the exact step of the penalty ρ_k/2‖W_k − Θ_k − φ_k/ρ_k‖², "
         f"C step = joint rank search per layer),\n      then {_plural(plan['finetune'], 'fine-tuning epoch')} with "
         "ranks fixed")
    res = pipelines.compress_run(cfg, out / "base", out, overwrite=True, data=data).to_dict()
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
