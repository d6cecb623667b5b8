"""Time the LC engine's C step on full-size ImageNet models, against a training epoch.

Requirement: one C step of ResNet-50 (all 53 convs, 224x224, random weights, budget mode) under 2 s on the
project's 2-core CPU.

    python benchmarks/cstep.py [--models resnet50,resnet34,vgg16] [--repeats 3] [--quick] [--out DIR]

For each model (torchvision layout, ``ltc.models.create``, 1000 classes) and target SR (5 and 10):
``ltc.LTC(model, x, target_sr=...)`` (its first C step is timed separately as "construction"), one warm-up
``step()``, then ``--repeats`` timed ``step()`` calls (C step with the exact λ search and the greedy fill,
multiplier update); between steps the weights are nudged by a little noise, as an L step would (untimed).
Reported: median wall seconds per step, and the process CPU seconds it took (all threads), which tells an
oversubscribed machine apart from a slow step.

Training reference: seconds per training iteration (forward + backward + SGD step, batch 32 at 224x224,
cross-entropy, random data, train mode) on the same CPU, median of a few iterations after one warm-up,
**extrapolated** to an epoch of 50,000 images (``ceil(50000 / 32)`` iterations); the table gives the C step as
a percentage of that epoch. ``--quick``: one repeat, target SR 5 only, one timed training iteration.

Prints a markdown table and writes ``cstep.json`` and ``cstep.md`` under ``--out`` (default
``benchmarks/results``), atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _machine import load_average, machine
from torch import nn

import ltc
from ltc import models

LIMIT_S = 2.0  # ResNet-50 C step
EPOCH_IMAGES = 50_000
BATCH = 32
SIZE = 224
DEFAULT_MODELS = ("resnet50", "resnet34", "vgg16")


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.create(name, num_classes=1000)


@torch.no_grad()
def _nudge(model: nn.Module, gen: torch.Generator, scale: float = 0.01) -> None:
    """What an L step does to the weights, roughly: a small move (untimed)."""
    for p in model.parameters():
        if p.dim() > 1:
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))


def time_cstep(name: str, target: float, repeats: int) -> dict[str, Any]:
    model = _build(name)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    t0 = time.perf_counter()
    comp = ltc.LTC(model, x, target_sr=target)
    construct = time.perf_counter() - t0
    n_convs = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))
    _nudge(model, gen)
    comp.step()  # warm-up
    walls, cpus, inner = [], [], []
    for _ in range(repeats):
        _nudge(model, gen)
        w0, c0 = time.perf_counter(), time.process_time()
        comp.step()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        inner.append(comp.history[-1]["seconds"])
    return {
        "model": name,
        "target_sr": target,
        "layers": len(comp.layers),
        "convs": n_convs,
        "sr": comp.sr,
        "lam": comp.lam,
        "construct_s": construct,
        "step_s": walls,
        "step_cpu_s": cpus,
        "cstep_history_s": inner,
        "median_step_s": statistics.median(walls),
        "median_step_cpu_s": statistics.median(cpus),
        "load_average_1m": load_average(),
    }


def time_training(name: str, iters: int, batch: int = BATCH) -> dict[str, Any]:
    model = _build(name).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    crit = nn.CrossEntropyLoss()

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        crit(model(x), y).backward()
        opt.step()

    one()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    per_iter = statistics.median(times)
    n_iter = math.ceil(EPOCH_IMAGES / batch)
    return {
        "model": name,
        "batch": batch,
        "iter_s": times,
        "median_iter_s": per_iter,
        "iters_per_epoch": n_iter,
        "epoch_s_extrapolated": per_iter * n_iter,
    }


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# C-step timings",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}",
        f"- machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"{m['torch_threads']} torch threads; 1-min load average {m['load_average_1m_at_start']} at start, "
        f"{report['load_average_1m_at_end']} at end",
        f"- method: budget mode (`ltc.LTC(model, x, target_sr=...)`, random weights, {SIZE}x{SIZE}, 1000 classes); "
        f"one warm-up `step()`, then the median of {report['repeats']} timed `step()` calls (wall clock; process "
        "CPU seconds beside it). Epoch: median seconds per training iteration (forward + backward + SGD, "
        f"batch {BATCH}, {SIZE}x{SIZE}) **extrapolated** to {EPOCH_IMAGES:,} images.",
        "",
        "| model | convs | target SR | reached SR | C step (s) | CPU (s) | construction (s) | train iter (s) "
        "| epoch, extrapolated (s) | C step / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    train = {t["model"]: t for t in report["training"]}
    for r in report["cstep"]:
        t = train.get(r["model"])
        epoch = f"{t['epoch_s_extrapolated']:.0f}" if t else "-"
        it = f"{t['median_iter_s']:.2f}" if t else "-"
        pct = f"{100 * r['median_step_s'] / t['epoch_s_extrapolated']:.4f} %" if t else "-"
        lines.append(
            f"| {r['model']} | {r['convs']} | {r['target_sr']:g} | {r['sr']:.3f} | {r['median_step_s']:.3f} "
            f"| {r['median_step_cpu_s']:.2f} | {r['construct_s']:.2f} | {it} | {epoch} | {pct} |"
        )
    verdict = report.get("requirement")
    if verdict:
        lines += ["", f"Requirement: ResNet-50 C step under {LIMIT_S:g} s: **{verdict}**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    ap.add_argument("--repeats", type=int, default=3, help="timed C steps per case (median)")
    ap.add_argument("--train-iters", type=int, default=3, help="timed training iterations per model (median)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, target SR 5 only, 1 training iteration")
    ap.add_argument("--no-train", action="store_true", help="skip the training-iteration reference")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    targets = (5.0,) if args.quick else (5.0, 10.0)
    repeats = 1 if args.quick else max(1, args.repeats)
    train_iters = 1 if args.quick else max(1, args.train_iters)

    report: dict[str, Any] = {
        "command": "python " + shlex.join(sys.argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "repeats": repeats,
        "cstep": [],
        "training": [],
    }
    for name in names:
        for target in targets:
            r = time_cstep(name, target, repeats)
            report["cstep"].append(r)
            print(
                f"{name} SR {target:g}: C step {r['median_step_s']:.3f} s (CPU {r['median_step_cpu_s']:.2f} s), "
                f"reached SR {r['sr']:.3f}, construction {r['construct_s']:.2f} s, load {r['load_average_1m']}",
                flush=True,
            )
        if not args.no_train:
            t = time_training(name, train_iters)
            report["training"].append(t)
            print(
                f"{name} training: {t['median_iter_s']:.2f} s/iter (batch {BATCH}) -> epoch of {EPOCH_IMAGES:,} "
                f"images ~ {t['epoch_s_extrapolated']:.0f} s (extrapolated)",
                flush=True,
            )
    r50 = [r for r in report["cstep"] if r["model"] == "resnet50"]
    if r50:
        worst = max(r["median_step_s"] for r in r50)
        report["requirement"] = "PASS" if worst < LIMIT_S else f"FAIL ({worst:.2f} s)"
    report["load_average_1m_at_end"] = load_average()
    md = markdown(report)
    out = Path(args.out)
    _atomic_write(out / "cstep.json", json.dumps(report, indent=2) + "\n")
    _atomic_write(out / "cstep.md", md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
