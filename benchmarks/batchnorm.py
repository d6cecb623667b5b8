"""BatchNorm re-estimation after deployment: on which images?

``ltc.compress`` re-estimates every BatchNorm's running statistics after deployment (``recalibrate_bn``), on
``bn_data='calibration'`` (the 2048 calibration images, no augmentation; the default) or ``bn_data='train'`` (the
training batches as augmented for training). For each CIFAR-10 base this measures validation accuracy

* with the stored running statistics (for a deployment: the dense network's, which no longer fit),
* re-estimated on the calibration images (``bn_data='calibration'``),
* re-estimated on the first 16 augmented training batches (2048 images, as many as the calibration set), and on
  one pass over all of them (``bn_data='train'``, ``bn_batches=None``),

for the base itself, for one-shot Tucker-2 deployments at SR 3 and SR 10 before any fine-tuning, and for the
compressed models of the run folders given with ``--runs`` (after their fine-tuning).

    python benchmarks/batchnorm.py [--runs RUN ...] [--models resnet34_cifar vgg16_cifar] [--out benchmarks/results]

Writes ``batchnorm.json`` / ``batchnorm.md`` (atomically). Needs ``../shared/data/`` (else it says so and stops).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

WIDTH = 0.25
TARGETS = (3.0, 10.0)
WAYS = ("stored", "calibration", "train16", "train")
HEADER = {"stored": "stored statistics", "calibration": "calibration images (no aug.)",
          "train16": "16 augmented training batches", "train": "one augmented pass"}


def loaders(ref: Path) -> tuple[Any, Any, Any, Any]:
    """The model of ``ref``, its seeded train / val loaders and its calibration loader, as ``ltc compress`` has them."""
    from ltc import config as cfgmod
    from ltc import pipelines, runs

    loaded = runs.load_model(ref)
    cfg = cfgmod.load_config(overrides={"data": {"batch_size": 128}})
    bundle, info = pipelines.build_data(cfg, loaded)
    train, val = pipelines.make_loaders(bundle, cfg, info["seed"])
    calib = pipelines.calibration_images(bundle, info["seed"])
    return loaded, train, val, calib


def accuracies(model: torch.nn.Module, train: Any, val: Any, calib: Any) -> dict[str, float]:
    """Validation accuracy (fraction) of ``model`` with each way of getting its BatchNorm statistics."""
    from ltc.batchnorm import recalibrate_batchnorm
    from ltc.train import evaluate

    sources = {"calibration": (calib, None), "train16": (train, 16), "train": (train, None)}
    out = {"stored": evaluate(model.eval(), val).acc}
    for way, (loader, batches) in sources.items():
        m = recalibrate_batchnorm(copy.deepcopy(model), loader, batches)
        out[way] = evaluate(m.eval(), val).acc
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# BatchNorm re-estimation after deployment: on which images", "",
             f"Command: `{doc['command']}`. Date: {doc['date']}. Machine: {doc['machine']['cpu']}, "
             f"{doc['machine']['cpu_count']} cores, torch {doc['machine']['torch']}. Commit {doc.get('commit')}.", "",
             "Validation top-1 (%) on CIFAR-10's 5000 held-out training images. 'calibration images': the 2048 "
             "fixed training images without augmentation that `ltc compress` re-estimates on by default "
             "(`bn_data='calibration'`); 'augmented': training batches of 128 as augmented for training "
             "(random crop and flip; `bn_data='train'`). One-shot rows: Tucker-2 deployed from the base, no "
             "fine-tuning, so 'stored' is the dense network's statistics.", "",
             "| model | network | " + " | ".join(HEADER[w] for w in WAYS) + " | augmented pass − calibration |",
             "|---|---|" + "---:|" * (len(WAYS) + 1)]
    for r in doc["rows"]:
        a = r["acc"]
        lines.append(f"| {r['model']} | {r['network']} | " + " | ".join(f"{100 * a[w]:.2f}" for w in WAYS)
                     + f" | {100 * (a['train'] - a['calibration']):+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet34_cifar", "vgg16_cifar"], help="CIFAR-10 bases")
    ap.add_argument("--runs", nargs="*", type=Path, default=[], help="compressed run folders (CIFAR-10) to add")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", type=Path, default=C.RESULTS, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ltc.api import CompressConfig, compress

    try:
        C.data_source("cifar10")
    except FileNotFoundError as exc:
        print(f"batchnorm.py: {exc}; nothing to measure")
        return 1
    rows: list[dict[str, Any]] = []
    for model in args.models:
        ref = C.base_run("cifar10", model, WIDTH)
        base, train, val, calib = loaders(ref)
        nets = [("base", base.model)]
        for sr in TARGETS:
            cfg = CompressConfig(method="oneshot", target_sr=sr, epochs=0, recalibrate_bn=False)
            res = compress(base.model, train, calibration_loader=calib, config=cfg, progress=False)
            nets.append((f"one-shot SR {sr:g}, no fine-tuning", res.model))
        for name, net in nets:
            rows.append({"model": model, "network": name, "acc": accuracies(net, train, val, calib)})
            print(rows[-1])
    for run in args.runs:
        loaded, train, val, calib = loaders(run)
        rows.append({"model": loaded.name, "network": f"{run.name} (after its fine-tuning)",
                     "acc": accuracies(loaded.model, train, val, calib)})
        print(rows[-1])
    doc = {"command": C.command_line(), "date": C.now(), "machine": C.machine(), "commit": C.git_commit(),
           "rows": rows}
    C.write_results(args.out / "batchnorm", doc, markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
