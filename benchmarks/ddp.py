"""Data-parallel training on one machine: 2 processes x 1 thread (``torchrun``, gloo) against 1 process x 2 threads.

    python benchmarks/ddp.py                       # resnet34_cifar width 0.25, CIFAR-10, 1 epoch each way
    python benchmarks/ddp.py --data digits --model small_cnn --epochs 2     # seconds, for a quick look

Both runs are the same ``ltc train`` command (same data, model, batch 128, seed); under torchrun each process trains
on its half of every epoch (a ``DistributedSampler``) and gradients are averaged. Reported: the epoch time of each
(from the run's ``log.csv``, training and validation of the epoch) and their ratio; the two runs are made back to
back in one invocation. Output: ``benchmarks/results/ddp.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def epoch_seconds(run: Path) -> list[float]:
    with (run / "log.csv").open() as f:
        return [float(r["seconds"]) for r in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="data source (default: CIFAR-10 from ../shared/data)")
    ap.add_argument("--model", default="resnet34_cifar")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=C.RESULTS)
    args = ap.parse_args(argv)
    data = args.data or C.data_source("cifar10")
    common = ["train", "--model", args.model, "--width", str(args.width), "--data", data, "--epochs", str(args.epochs),
              "--batch-size", "128", "--seed", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "1 process x 2 threads": [sys.executable, "-m", "ltc", *common, "--threads", "2", "--out", f"{tmp}/one"],
            "2 processes x 1 thread": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node", "2", "-m", "ltc", *common, "--threads", "1",
                                       "--device", "cpu", "--out", f"{tmp}/two"],
        }
        for label, cmd in runs.items():
            print(f"[{label}] {' '.join(cmd[:6])} ...", flush=True)
            subprocess.run(cmd, check=True, env=env if "processes" in label else dict(os.environ), cwd=C.REPO)
            folder = Path(cmd[-1])
            results[label] = epoch_seconds(folder)
            print(f"  epoch seconds: {results[label]}", flush=True)
    one, two = results["1 process x 2 threads"], results["2 processes x 1 thread"]
    ratio = sum(one) / sum(two)
    doc = {"command": C.command_line(), "date": C.now(), "machine": C.machine(), "commit": C.git_commit(),
           "model": args.model, "width": args.width, "data": str(data), "epochs": args.epochs, "epoch_seconds": results,
           "speedup_of_2_processes": ratio}
    md = "\n".join([
        "# Data-parallel training: 2 processes x 1 thread against 1 process x 2 threads", "",
        f"Command: `{doc['command']}`. Date: {doc['date']}. Machine: {doc['machine']['cpu']}, "
        f"{doc['machine']['cpu_count']} cores, torch {doc['machine']['torch']}. Commit {doc['commit']}.", "",
        f"`ltc train --model {args.model} --width {args.width:g}` on `{Path(str(data)).name}`, batch 128, "
        f"{args.epochs} epoch(s) each way, back to back.", "",
        "| run | seconds per epoch |", "|---|---|",
        *[f"| {k} | {', '.join(f'{s:.1f}' for s in v)} |" for k, v in results.items()], "",
        f"2 processes take {1 / ratio:.2f} x the time of 1 process with 2 threads (ratio of the summed epoch times: "
        f"{ratio:.2f}x).", ""])
    C.write_results(args.out / "ddp", doc, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
