"""Does the memory format change what Tucker-2 buys on the clock? Eager PyTorch on the CPU, batch 1.

    python benchmarks/memory_format.py [--models resnet34,vgg16] [--fractions 0.25,0.02] [--repeats 15]

For each full-size model (224x224, 1000 classes, random weights) and rank fraction (``uniform`` ranks, multiples of
8, ``min_rank=8``), four networks are timed side by side in one interleaved run (``ltc.interleaved_latency``,
BatchNorm folded first): the base and the Tucker-2 network, each in PyTorch's default (contiguous, NCHW) memory
format and in ``torch.channels_last`` (NHWC; only the weights are converted, the input stays NCHW, so the first
conv switches the activations over). Reported: median ms of each and the two speed-ups, each against the base in the
same memory format. Writes ``memory_format.{json,md}`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet34,vgg16")
    ap.add_argument("--fractions", default="0.25,0.02")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(C.RESULTS))
    args = ap.parse_args(argv)

    import torch

    from ltc.batchnorm import fold_batchnorm
    from ltc.latency import interleaved_latency
    from ltc.methods import get_method
    from ltc.models import create

    torch.set_num_threads(args.threads)
    started = C.now()
    doc = {"command": C.command_line(), "date": started, "commit": C.git_commit(),
           "machine": C.machine(), "threads": args.threads, "repeats": args.repeats, "rows": []}
    x = torch.randn(1, 3, 224, 224)
    for arch in args.models.split(","):
        torch.manual_seed(0)
        base = create(arch, num_classes=1000).eval()
        for frac in (float(f) for f in args.fractions.split(",")):
            engine = get_method("uniform").build(base, x, fraction=frac, rank_multiple=8, min_rank=8)
            nets = {"base": fold_batchnorm(base), "tucker2": fold_batchnorm(engine.compressed_model())}
            models = {}
            for name, net in nets.items():
                models[f"{name}/contiguous"] = net
                models[f"{name}/channels_last"] = copy.deepcopy(net).to(memory_format=torch.channels_last)
            st = interleaved_latency(models, x, threads=args.threads, warmup=3, repeats=args.repeats)
            ms = {k: v.median_ms for k, v in st.items()}
            row = {"model": arch, "fraction": frac, "sr": engine.sr, "ms": ms,
                   "speedup_contiguous": ms["base/contiguous"] / ms["tucker2/contiguous"],
                   "speedup_channels_last": ms["base/channels_last"] / ms["tucker2/channels_last"],
                   "base_channels_last_vs_contiguous": ms["base/contiguous"] / ms["base/channels_last"]}
            doc["rows"].append(row)
            print(f"{arch} fraction {frac:g} SR {engine.sr:.2f}: speed-up {row['speedup_contiguous']:.2f}x "
                  f"(contiguous), {row['speedup_channels_last']:.2f}x (channels_last)", flush=True)
    doc["load_average_1m_at_end"] = C.load_average()
    md = [f"# Memory format and the Tucker-2 speed-up (eager PyTorch, CPU, batch 1, {args.threads} threads)", "",
          f"Command: `{doc['command']}`. Date: {started}. Commit {doc['commit']}. Machine: {doc['machine']['cpu']}, "
          f"{doc['machine']['cpu_count']} cores, torch {doc['machine']['torch']}; 1-min load "
          f"{doc['machine']['load_average_1m_at_start']} at start, {doc['load_average_1m_at_end']} at end. "
          f"Four networks per row timed interleaved ({args.repeats} runs, medians), BatchNorm folded; each speed-up "
          "is against the base in the same memory format.", "",
          "| model | rank fraction | SR | base ms (NCHW / NHWC) | Tucker-2 ms (NCHW / NHWC) | speed-up NCHW | "
          "speed-up channels_last |", "|---|---:|---:|---|---|---:|---:|"]
    for r in doc["rows"]:
        m = r["ms"]
        md.append(f"| {r['model']} | {r['fraction']:g} | {r['sr']:.2f} | {m['base/contiguous']:.1f} / "
                  f"{m['base/channels_last']:.1f} | {m['tucker2/contiguous']:.1f} / {m['tucker2/channels_last']:.1f} | "
                  f"{r['speedup_contiguous']:.2f}x | {r['speedup_channels_last']:.2f}x |")
    C.write_results(Path(args.out) / "memory_format", doc, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
