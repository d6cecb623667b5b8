"""LTC end to end on real data: PneumoniaMNIST (pediatric chest X-rays, 28x28, 2 classes).

Trains a small CNN from scratch, compresses it with LTC to a target MAC speed-up (budget mode: 6 LC steps of one
epoch, then fine-tuning, 12 epochs in all), and prints base vs compressed MACs, SR, params, CR and validation
accuracy. CPU, a few minutes.

    python examples/pneumoniamnist.py [--data ../shared/data/pneumoniamnist-trainval.npz] [--target-sr 5]

Writes the result (JSON + markdown) to benchmarks/results/example_pneumoniamnist.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

import ltc
from ltc.api import compress
from ltc.data import build, calibration_loader, loaders
from ltc.models import create
from ltc.train import fit
from ltc.utils import atomic_write_text, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pneumoniamnist-trainval.npz"))
    ap.add_argument("--target-sr", type=float, default=5.0)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--base-epochs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=12, help="the compression budget: LC steps + fine-tuning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "example_pneumoniamnist"))
    args = ap.parse_args()

    torch.set_num_threads(2)
    seed_everything(args.seed)
    bundle = build(args.data, seed=args.seed)
    train_dl, val_dl = loaders(bundle, batch_size=128, seed=args.seed)
    print(f"data: {len(bundle.train)} train / {len(bundle.val)} val images, {bundle.num_classes} classes, "
          f"{bundle.in_channels}x{bundle.image_size}x{bundle.image_size}")

    model = create("small_cnn", num_classes=bundle.num_classes, in_channels=bundle.in_channels, width=args.width)
    t0 = time.perf_counter()
    fit(model, train_dl, val_dl, epochs=args.base_epochs,
        opt_cfg={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        sched_cfg={"name": "cosine"}, progress=True)
    base_seconds = time.perf_counter() - t0

    result = compress(model, train_dl, val_loader=val_dl, calibration_loader=calibration_loader(bundle),
                      method="ltc", target_sr=args.target_sr, steps=args.steps, epochs=args.epochs, seed=args.seed)
    print()
    print(result.summary())
    drop = 100 * (result.base_acc - result.acc)
    print(f"\naccuracy drop: {drop:.2f} points (goal: within 2)")
    print("ranks (r_in, r_out):", result.ranks)

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
                    "ltc": ltc.__version__},
        "base_train_seconds": base_seconds,
        "accuracy_drop_points": drop,
        **result.to_dict(),
    }
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2, default=str))
    md = (f"# PneumoniaMNIST, small_cnn width {args.width}, LTC target SR {args.target_sr}\n\n"
          f"Command: `{record['command']}`  \nMachine: {record['machine']}  \nDate: {record['date']}\n\n"
          f"{result.summary()}\n\naccuracy drop: {drop:.2f} points\n")
    atomic_write_text(out.with_suffix(".md"), md)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
