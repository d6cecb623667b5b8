"""Time the exact error tables: ``ltc.tucker2_error_table`` and ``ltc.matrix_error_table``.

Requirement (foundation issue): the Tucker-2 table of a 512x512x3x3 float32 conv weight in under 1 s on CPU.

    python benchmarks/error_table.py [--repeats 5] [--device cpu] [--out benchmarks/results]

Each case: one warm-up call, then the median of ``--repeats`` timed calls (torch threads as configured on the
machine; nothing is changed). Prints a markdown table and writes ``error_table.json`` / ``error_table.md``
under ``--out`` (atomically: temp file + ``os.replace``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ltc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LIMIT_S = 1.0  # the requirement for the 512x512x3x3 Tucker-2 table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (allocations, LAPACK workspace, kernel selection)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def cases(device: torch.device) -> list[tuple[str, str, Callable[[], object]]]:
    g = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    w512 = weight(512, 512, 3, 3)
    w256 = weight(256, 256, 3, 3)
    m512 = weight(512, 512)  # a 512x512 1x1 conv, flattened
    return [
        ("tucker2_error_table", "512x512x3x3 float32", lambda: ltc.tucker2_error_table(w512)),
        ("tucker2_error_table", "256x256x3x3 float32", lambda: ltc.tucker2_error_table(w256)),
        ("matrix_error_table", "512x512 (1x1 conv) float32", lambda: ltc.matrix_error_table(m512)),
    ]


def machine(device: torch.device) -> dict[str, object]:
    extra = {"device": str(device)}
    if device.type == "cuda":
        extra["gpu"] = torch.cuda.get_device_name(device)
    return C.machine(**extra)


def markdown(rows: list[dict[str, object]], meta: dict[str, object]) -> str:
    m = meta["machine"]
    assert isinstance(m, dict)
    lines = [
        "# Error-table timings",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"{m['torch_threads']} torch threads, device {m['device']}"
        + (f", 1-min load average {m['load_average_1m_at_start']}" if "load_average_1m_at_start" in m else ""),
        f"- method: one warm-up call, then the median of {meta['repeats']} timed calls",
        "",
        "| function | weight | median (s) | min (s) | max (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['function']}` | {r['weight']} | {r['median_s']:.4f} "
            f"| {r['min_s']:.4f} | {r['max_s']:.4f} |"
        )
    verdict = "PASS" if meta["requirement_met"] else "FAIL"
    lines += ["", f"Requirement: 512x512x3x3 Tucker-2 table under {LIMIT_S:g} s: **{verdict}**", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a shared machine")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    device = torch.device(args.device)

    rows = []
    for fn_name, desc, fn in cases(device):
        times = time_call(fn, device, args.repeats)
        rows.append(
            {
                "function": fn_name,
                "weight": desc,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "times_s": times,
            }
        )
    headline = rows[0]["median_s"]
    assert isinstance(headline, float)
    meta: dict[str, object] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(device),
        "repeats": args.repeats,
        "requirement": f"tucker2_error_table(512x512x3x3 float32) median < {LIMIT_S:g} s",
        "requirement_met": headline < LIMIT_S,
    }
    md = markdown(rows, meta)
    print(md)
    C.write_results(args.out / "error_table", {**meta, "results": rows}, md)
    print(f"wrote {args.out / 'error_table.json'} and {args.out / 'error_table.md'}")
    return 0 if meta["requirement_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
