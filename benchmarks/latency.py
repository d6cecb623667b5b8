"""Real speed: LTC with the measured-latency cost against MAC-cost LTC, on the clock.

    python benchmarks/latency.py                      # full-size models + the CIFAR network (about an hour, quiet CPU)
    python benchmarks/latency.py --models resnet34_cifar --runtimes eager --batches 1 32
    python benchmarks/latency.py --smoke              # small_cnn, one target: every code path in a minute

What it measures, per model (full-size ResNet-34, ResNet-50, VGG-16 at 224x224 with random weights given a
decaying channel spectrum, since no ImageNet weights can be downloaded here; ``resnet34_cifar`` width 0.25 at 32x32
with the converged CIFAR-10 base), runtime (PyTorch eager with BatchNorm folded, in NCHW and in channels_last
(``eager-nhwc``); ONNX Runtime) and batch:

1. the latency table of the base (:class:`ltc.latency_table.LatencyTable`), built cold in a fresh cache folder: how
   long it takes and how many ops it times;
2. for each target speed-up (2x, 3x, 5x): one LTC C step in budget mode on the table (``cost='latency'``, ranks
   multiples of 8, dense fallback), then :func:`ltc.api.meet_speedup` as ``ltc.compress`` runs it: the deployed
   network timed against the base (interleaved, BatchNorm folded), the table calibrated on that timing and the C
   step re-targeted while it misses by more than 10 %; a target beyond the table deploys its fastest configuration
   and is refused only when that measures short. Reported: predicted (uncalibrated table) and measured speed-up,
   the corrections, the MAC SR it needed; a refusal with the best measured;
3. beside it, MAC-cost LTC (``cost='macs'``, ranks multiples of 8) at the same measured speed-up: the target SR is
   bisected until the measured speed-up matches. The SR each cost needs for the same speed on the clock is what
   the latency cost buys (less compression, so less accuracy lost, for the same speed);
4. MAC-cost LTC at SR 5 (ranks multiples of 8): measured speed-up / SR.

Every timing interleaves the base and the compressed network in one run (the ratio is what counts). Output:
``benchmarks/results/latency.{json,md}`` (command, machine, date), rewritten after every model.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGETS = (2.0, 3.0, 5.0)
FULL = ("resnet34", "resnet50", "vgg16")
CIFAR = "resnet34_cifar"


def decaying_spectrum(model: Any, alpha: float = 1.0, seed: int = 0) -> None:
    """Give every conv weight a decaying spectrum along both channel modes (singular values ``k^-alpha``), so that
    random weights have the low-rank structure trained ones have and the C step's allocation is not arbitrary."""
    import torch
    from torch import nn

    from ltc.tensor import mode_product

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight.shape[2] * m.weight.shape[3] > 0:
                w = m.weight
                t, s = w.shape[:2]
                scale_t = torch.arange(1, t + 1, dtype=w.dtype) ** -alpha
                scale_s = torch.arange(1, s + 1, dtype=w.dtype) ** -alpha
                q_t = torch.linalg.qr(torch.randn(t, t, generator=g))[0]
                q_s = torch.linalg.qr(torch.randn(s, s, generator=g))[0]
                core = torch.randn(w.shape, generator=g)
                core = core * scale_t[:, None, None, None] * scale_s[None, :, None, None]
                new = mode_product(mode_product(core, q_t, 0), q_s, 1)
                w.copy_(new * (w.norm() / new.norm()))


def build_model(name: str, say: Any) -> tuple[Any, Any, str]:
    """``(model, example input, description)``."""
    import torch

    from ltc import models, runs

    if name == CIFAR:
        base = runs.load_model(C.base_run("cifar10", CIFAR, 0.25, say=say))
        return base.model.eval(), torch.randn(1, 3, 32, 32), "resnet34_cifar width 0.25, converged CIFAR-10 base"
    if name == "small_cnn":
        torch.manual_seed(0)
        return models.create("small_cnn", num_classes=10, in_channels=1).eval(), torch.randn(1, 1, 16, 16), \
            "small_cnn (smoke)"
    torch.manual_seed(0)
    m = models.create(name, num_classes=1000).eval()
    decaying_spectrum(m)
    return m, torch.randn(1, 3, 224, 224), f"{name}, 224x224, random weights with decaying channel spectra"


def engine(model: Any, x: Any, *, target: float, cost: str, table: Any = None) -> Any:
    from ltc import LTC

    e = LTC(model, x, target_sr=target, cost=cost, latency_table=table, rank_multiple=8)
    e.start()
    return e


RUNTIMES = {"eager": ("eager", "contiguous"), "eager-nhwc": ("eager", "channels_last"),
            "onnxruntime": ("onnxruntime", "contiguous")}
"""Benchmark runtime labels: (runtime, memory_format) of the library. ``eager-nhwc``: PyTorch eager with the
networks in ``torch.channels_last`` (the input stays NCHW)."""


def measured(model: Any, comp: Any, x: Any, runtime: str, threads: int, batch: int, repeats: int) -> float:
    from ltc.latency import compare_latency

    rt, layout = RUNTIMES[runtime]
    xb = x[:1].expand(batch, *x.shape[1:]).contiguous()
    return compare_latency(model, comp.compressed_model().eval(), xb, threads=threads, repeats=repeats,
                           fold_bn=True, runtime=rt, memory_format=layout)["speedup"]


def mac_sr_for(model: Any, x: Any, speedup: float, runtime: str, threads: int, batch: int, repeats: int,
               iters: int = 6) -> dict[str, Any]:
    """Bisect the MAC target SR (log scale) until MAC-cost LTC's measured speed-up matches ``speedup`` (5 %)."""
    lo, hi = 1.0, max(2.0, 4.0 * speedup)
    tried = []
    best = None
    for _ in range(iters):
        sr = math.sqrt(lo * hi)
        try:
            e = engine(model, x, target=sr, cost="macs")
        except ValueError:  # unreachable
            hi = sr
            continue
        got = measured(model, e, x, runtime, threads, batch, repeats)
        tried.append({"target_sr": sr, "sr": e.sr, "measured": got})
        if best is None or abs(got / speedup - 1) < abs(best["measured"] / speedup - 1):
            best = tried[-1]
        if abs(got / speedup - 1) <= 0.05:
            break
        lo, hi = (sr, hi) if got < speedup else (lo, sr)
    return {"best": best, "tried": tried}


def run_case(name: str, runtime: str, batch: int, threads: int, targets: tuple[float, ...], repeats: int,
             say: Any, retime_repeats: int = 50) -> dict[str, Any]:
    from ltc import LTC
    from ltc.api import meet_speedup
    from ltc.engine import select_layers
    from ltc.latency_table import LatencyTable

    model, x, what = build_model(name, say)
    rt, layout = RUNTIMES[runtime]
    say(f"[{name} / {runtime} / batch {batch}] building the latency table (cold cache)")
    with tempfile.TemporaryDirectory() as cache:
        table = LatencyTable.build(model, x, runtime=rt, threads=threads, batch=batch, rank_multiple=8,
                                   layers=select_layers(model)[0], cache_dir=cache, progress=False,
                                   memory_format=layout)
    case: dict[str, Any] = {"model": name, "what": what, "runtime": runtime, "memory_format": layout,
                            "batch": batch, "threads": threads, "repeats": repeats,
                            "table": {"build_seconds": table.info.get("build_seconds"),
                                      "measured_ops": table.info.get("measured"), "model_ms": table.model_ms},
                            "rows": []}
    say(f"  table: {table.info.get('measured')} ops in {table.info.get('build_seconds', float('nan')):.0f} s, "
        f"base {table.model_ms:.2f} ms")
    for t in targets:
        row: dict[str, Any] = {"target": t}
        e = LTC(model, x, target_sr=t, cost="latency", latency_table=table, rank_multiple=8)
        try:  # as ltc.compress does before training: calibrated on the clock, refused on a measurement
            sp = meet_speedup(e, model, x, t, runtime=rt, threads=threads, batch=batch, repeats=repeats,
                              memory_format=layout, refuse=True)
        except ValueError as exc:
            row["refused"] = str(exc)
            case["rows"].append(row)
            say(f"  target {t:g}x: refused ({exc})")
            continue
        # the loop stops at the first timing within 10 %: an independent re-timing of the network it kept says
        # whether that landed there by noise
        kept = measured(model, e, x, runtime, threads, batch, retime_repeats)
        row.update(latency_cost={"predicted": sp["predicted"], "measured": sp["measured"], "retimed": kept,
                                 "retime_repeats": retime_repeats,
                                 "corrections": sp["corrections"], "sr": e.sr, "cr": e.cr,
                                 "dense_layers": sum(r is None for r in e.ranks.values()), "layers": len(e.ranks),
                                 "attempts": sp["attempts"], "stopped": sp.get("stopped"),
                                 "table_refused": sp.get("table_refused"), "table_best": sp.get("table_best")})
        mac = mac_sr_for(model, x, sp["measured"], runtime, threads, batch, repeats)
        row["mac_cost_same_speedup"] = mac
        case["rows"].append(row)
        b = mac["best"] or {}
        say(f"  target {t:g}x: predicted {sp['predicted']:.2f}, measured {sp['measured']:.2f}, re-timed {kept:.2f} "
            f"({sp['corrections']} corrections) at SR {e.sr:.2f}; MAC cost needs SR {b.get('sr', float('nan')):.2f} "
            f"for {b.get('measured', float('nan')):.2f}x")
    try:
        e5 = engine(model, x, target=5.0, cost="macs")
        case["mac_sr5"] = {"sr": e5.sr, "measured": measured(model, e5, x, runtime, threads, batch, repeats)}
        case["mac_sr5"]["ratio"] = case["mac_sr5"]["measured"] / e5.sr
        say(f"  MAC cost SR 5 (ranks x8): measured {case['mac_sr5']['measured']:.2f}x = "
            f"{case['mac_sr5']['ratio']:.2f} x SR")
    except ValueError as exc:
        case["mac_sr5"] = {"refused": str(exc)}
    return case


def _f(v: Any, fmt: str = ".2f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _repeats_note(doc: dict[str, Any]) -> str:
    """Which runs per timing the loop and the MAC-cost rows took, by runtime (cases from before it was recorded
    used the benchmark's ``--repeats`` of their command)."""
    seen = sorted({(c["runtime"], c["repeats"]) for c in doc["cases"] if "repeats" in c})
    return (" Runs per timing in the loop and the MAC-cost rows: " + ", ".join(f"{r} {n}" for r, n in seen) + "."
            if seen else "")


def markdown(doc: dict[str, Any]) -> str:
    p = doc["protocol"]
    lines = ["# Real speed: the measured-latency cost against MAC cost", "",
             f"Command: `{p['command']}`. Date: {p['date']}. Machine: {p['machine']['cpu']}, "
             f"{p['machine']['cpu_count']} cores, torch {p['machine']['torch']}, onnxruntime {p.get('onnxruntime')}; "
             f"{p['threads']} threads. Commit {p.get('commit')}. Wall time {p['wall_seconds'] / 60:.1f} min."
             + "".join(f" Cases kept from `{e['command']}` ({e['date']}, commit {e['commit']}, "
                       f"{(e['wall_seconds'] or 0) / 60:.1f} min)." for e in p.get("earlier", [])), "",
             "Each speed-up is measured with the base and the compressed network interleaved in one run (BatchNorm "
             "folded); 'latency cost': one LTC C step on the measured table (ranks multiples of 8, dense fallback), "
             "calibrated on the timing and re-targeted while the measured speed-up missed by more than 10 % "
             "('measured': the loop's timing of the network kept, the geometric mean of two independent timings "
             "when the first was within 10 % and the loop confirms (library versions after 2026-12-06); "
             "'re-timed': that network timed again, "
             f"independently, {p.get('retime_repeats', 50)} runs); 'MAC cost': LTC with MAC cost (ranks "
             "multiples of 8), its target SR bisected to the same measured speed-up." + _repeats_note(doc), "",
             "| model | runtime | batch | table: ops / s | target | predicted | measured | re-timed | corr. "
             "| SR (latency cost) | dense layers | SR MAC cost needs (measured) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in doc["cases"]:
        if "error" in c:
            lines.append(f"| {c['model']} | {c['runtime']} | {c['batch']} | failed: {c['error']} ||||||||||")
            continue
        tb = c["table"]
        for r in c["rows"]:
            head = (f"| {c['model']} | {c['runtime']} | {c['batch']} | {tb['measured_ops']} / "
                    f"{_f(tb['build_seconds'], '.1f')} | {r['target']:g}x |")
            if "refused" in r:
                lines.append(head + f" refused: {r['refused']} |||||||")
                continue
            lc, mb = r["latency_cost"], (r["mac_cost_same_speedup"]["best"] or {})
            corr = (f"{lc['corrections']}" + (" (then beyond the calibrated table)" if lc.get("stopped") else "")
                    + (f"; the table alone refused it (best {lc['table_best']:.2f}x)" if lc.get("table_refused")
                       else ""))
            lines.append(head + f" {_f(lc['predicted'])} | {_f(lc['measured'])} | {_f(lc.get('retimed'))} | {corr} | "
                                f"{_f(lc['sr'])} | {lc['dense_layers']}/{lc['layers']} | {_f(mb.get('sr'))} "
                                f"({_f(mb.get('measured'))}x) |")
    lines += ["", "MAC-cost LTC at SR 5 (ranks multiples of 8): measured speed-up / SR", "",
              "| model | runtime | batch | SR | measured | measured / SR |", "|---|---|---:|---:|---:|---:|"]
    for c in doc["cases"]:
        m = c.get("mac_sr5") or {}
        if "sr" in m:
            lines.append(f"| {c['model']} | {c['runtime']} | {c['batch']} | {_f(m['sr'])} | {_f(m['measured'])} | "
                         f"{_f(m['ratio'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[*FULL, CIFAR])
    ap.add_argument("--runtimes", nargs="+", default=["eager", "eager-nhwc", "onnxruntime"], choices=list(RUNTIMES),
                    help="eager-nhwc: PyTorch eager with channels_last networks")
    ap.add_argument("--batches", nargs="+", type=int, default=[1],
                    help="batch sizes (default 1; 32 is measured for resnet34_cifar with --cifar-batch)")
    ap.add_argument("--cifar-batch", type=int, default=32, help="also time resnet34_cifar at this batch (0: no)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved runs per timing in the loop and the MAC-cost rows (default: the library's per "
                         "runtime, ltc.latency.default_repeats: 20 eager, 100 ONNX Runtime)")
    ap.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    ap.add_argument("--retime-repeats", type=int, default=50,
                    help="runs of the independent re-timing of each kept latency-cost network (default 50)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--name", default="latency", help="results file stem under --out (default latency)")
    ap.add_argument("--append", action="store_true",
                    help="keep the cases already in the results file and run only the missing (model, runtime, batch)")
    args = ap.parse_args(argv)

    import torch

    from ltc.latency import default_repeats

    torch.set_num_threads(args.threads)
    if args.smoke:
        args.models, args.runtimes, args.targets, args.cifar_batch, args.repeats = ["small_cnn"], ["eager"], [1.5], 0, 5
        args.retime_repeats = 5
    stem = (args.out or (C.RESULTS if not args.smoke else Path("/tmp/ltc_latency_smoke"))) / (
        args.name if not args.smoke else "latency_smoke")
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    doc: dict[str, Any] = {"protocol": {"command": C.command_line(), "date": C.now(), "machine": C.machine(),
                                        "commit": C.git_commit(), "threads": args.threads, "onnxruntime": ort_version,
                                        "targets": args.targets, "retime_repeats": args.retime_repeats,
                                        "wall_seconds": 0.0}, "cases": []}
    jobs = [(m, r, b) for m in args.models for r in args.runtimes for b in args.batches]
    if CIFAR in args.models and args.cifar_batch:
        jobs += [(CIFAR, r, args.cifar_batch) for r in args.runtimes if args.cifar_batch not in args.batches]
    if args.append and stem.with_suffix(".json").is_file():
        import json

        old = json.loads(stem.with_suffix(".json").read_text())
        doc["cases"] = [c for c in old["cases"] if "error" not in c]
        done = {(c["model"], c["runtime"], c["batch"]) for c in doc["cases"]}
        jobs = [j for j in jobs if j not in done]
        prev = old["protocol"]
        doc["protocol"]["earlier"] = [*prev.get("earlier", []),
                                      {k: prev.get(k) for k in ("command", "date", "commit", "wall_seconds")}]
    t0 = time.perf_counter()
    for name, runtime, batch in jobs:
        try:
            repeats = default_repeats(RUNTIMES[runtime][0]) if args.repeats is None else args.repeats
            case = run_case(name, runtime, batch, args.threads, tuple(args.targets), repeats, print,
                            retime_repeats=args.retime_repeats)
        except Exception as exc:  # one failing case must not cost the others
            traceback.print_exc()
            case = {"model": name, "runtime": runtime, "batch": batch, "error": f"{type(exc).__name__}: {exc}"}
        doc["cases"].append(case)
        doc["protocol"]["wall_seconds"] = time.perf_counter() - t0
        C.write_results(stem, doc, markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
