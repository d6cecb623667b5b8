"""Time the LC engine's C step on full-size ImageNet models, in weight space and with the data metric, against a
training epoch.

Requirement: one C step of ResNet-50 (all 53 convs, 224x224, random weights, budget mode, ``metric='weight'``) under
2 s on the project's 2-core CPU.

    python benchmarks/cstep.py [--models resnet50,resnet34,vgg16] [--repeats 3] [--quick] [--out DIR]

For each model (torchvision layout, ``ltc.models.create``, 1000 classes) and target SR (5 and 10), two engines on
the same weights, ``metric='weight'`` and ``metric='data'`` (``--calibration-images`` random 224x224 images): the
first C step (``start()``), one warm-up ``step()``, then ``--repeats`` timed ``step()`` calls of each, interleaved
(C step with the exact λ search and the greedy fill, multiplier update; the data metric's ``step()`` includes the
covariance pass that refreshes its statistics, timed alone beside it); between steps the weights are nudged by a
little noise, as an L step would (untimed). Reported: median wall seconds per step, and the process CPU seconds it
took (all threads), which tells an oversubscribed machine apart from a slow step.

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
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import load_average, machine, write_results
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


def time_cstep(name: str, target: float, repeats: int, calibration_images: int) -> list[dict[str, Any]]:
    """Both metrics on one model and target, their steps interleaved; one record per metric."""
    model = _build(name)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    calib = torch.randn(calibration_images, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(2)
    n_convs = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))
    engines, first = {}, {}
    for metric in ("weight", "data"):
        comp = ltc.LTC(model, x, target_sr=target, metric=metric, calibration=calib,
                       calibration_images=calibration_images)
        t0 = time.perf_counter()
        comp.start()
        first[metric] = time.perf_counter() - t0
        engines[metric] = comp
    _nudge(model, gen)
    for comp in engines.values():
        comp.step()  # warm-up
    walls: dict[str, list[float]] = {m: [] for m in engines}
    cpus: dict[str, list[float]] = {m: [] for m in engines}
    inner: dict[str, list[float]] = {m: [] for m in engines}
    refresh: list[float] = []
    for _ in range(repeats):
        _nudge(model, gen)
        for metric, comp in engines.items():
            w0, c0 = time.perf_counter(), time.process_time()
            comp.step()
            walls[metric].append(time.perf_counter() - w0)
            cpus[metric].append(time.process_time() - c0)
            inner[metric].append(comp.history[-1]["seconds"])
        t0 = time.perf_counter()
        engines["data"]._refresh_metric()
        refresh.append(time.perf_counter() - t0)
    out = []
    for metric, comp in engines.items():
        out.append({
            "model": name, "target_sr": target, "metric": metric, "layers": len(comp.layers), "convs": n_convs,
            "sr": comp.sr, "lam": comp.lam, "first_cstep_s": first[metric], "step_s": walls[metric],
            "step_cpu_s": cpus[metric], "cstep_history_s": inner[metric],
            "median_step_s": statistics.median(walls[metric]), "median_step_cpu_s": statistics.median(cpus[metric]),
            "covariance_pass_s": statistics.median(refresh) if metric == "data" else None,
            "calibration_images": calibration_images if metric == "data" else None,
            "load_average_1m": load_average(),
        })
    return out


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
        "| model | convs | target SR | metric | reached SR | step (s) | of which covariance pass (s) | CPU (s) "
        "| first C step (s) | train iter (s) | epoch, extrapolated (s) | step / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    train = {t["model"]: t for t in report["training"]}
    for r in report["cstep"]:
        t = train.get(r["model"])
        epoch = f"{t['epoch_s_extrapolated']:.0f}" if t else "-"
        it = f"{t['median_iter_s']:.2f}" if t else "-"
        pct = f"{100 * r['median_step_s'] / t['epoch_s_extrapolated']:.4f} %" if t else "-"
        cov = f"{r['covariance_pass_s']:.2f} ({r['calibration_images']} images)" if r["covariance_pass_s"] else "-"
        lines.append(
            f"| {r['model']} | {r['convs']} | {r['target_sr']:g} | {r['metric']} | {r['sr']:.3f} | "
            f"{r['median_step_s']:.3f} | {cov} | {r['median_step_cpu_s']:.2f} | {r['first_cstep_s']:.2f} | {it} | "
            f"{epoch} | {pct} |"
        )
    verdict = report.get("requirement")
    if verdict:
        lines += ["", f"Requirement: ResNet-50 C step with metric='weight' (the engine classes' default) under "
                  f"{LIMIT_S:g} s: **{verdict}**. The data metric (the default of `ltc.compress`) is timed beside it, "
                  "with no limit set."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    ap.add_argument("--repeats", type=int, default=3, help="timed C steps per case (median)")
    ap.add_argument("--train-iters", type=int, default=3, help="timed training iterations per model (median)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, target SR 5 only, 1 training iteration")
    ap.add_argument("--no-train", action="store_true", help="skip the training-iteration reference")
    ap.add_argument("--calibration-images", type=int, default=32,
                    help="images of the data metric's covariance pass (default 32; the library's default is 512)")
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
            for r in time_cstep(name, target, repeats, args.calibration_images):
                report["cstep"].append(r)
                print(
                    f"{name} SR {target:g} {r['metric']}: step {r['median_step_s']:.3f} s (CPU "
                    f"{r['median_step_cpu_s']:.2f} s), reached SR {r['sr']:.3f}, covariance pass "
                    f"{r['covariance_pass_s']}, load {r['load_average_1m']}", flush=True)
        if not args.no_train:
            t = time_training(name, train_iters)
            report["training"].append(t)
            print(
                f"{name} training: {t['median_iter_s']:.2f} s/iter (batch {BATCH}) -> epoch of {EPOCH_IMAGES:,} "
                f"images ~ {t['epoch_s_extrapolated']:.0f} s (extrapolated)",
                flush=True,
            )
    r50 = [r for r in report["cstep"] if r["model"] == "resnet50" and r["metric"] == "weight"]
    if r50:
        worst = max(r["median_step_s"] for r in r50)
        report["requirement"] = "PASS" if worst < LIMIT_S else f"FAIL ({worst:.2f} s)"
    report["load_average_1m_at_end"] = load_average()
    md = markdown(report)
    write_results(Path(args.out) / "cstep", report, md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
