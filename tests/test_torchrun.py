"""Multi-process: ``torchrun --nproc_per_node 2`` (gloo, CPU) runs of ``ltc.api.compress`` on a DDP-wrapped model
with a DistributedSampler, and of the ``ltc compress`` command, give the same ranks and the same weights on both
processes, and only rank 0 writes files."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ltc.cli import main

WORKER = Path(__file__).with_name("_resume_worker.py")
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_process_runs_shard_the_data_agree_and_only_rank0_writes(tmp_path: Path) -> None:
    """Under ``torchrun --nproc_per_node 2``: ``ltc.api.compress`` on a DDP model, then ``ltc train`` and ``ltc
    compress`` as commands. Each process runs half of every epoch's batches (the commands shard the data), the
    processes end with the same ranks and weights, and only rank 0 writes."""
    threads = torch.get_num_threads()
    base = tmp_path / "base"
    try:
        assert main(["train", "--model", "small_cnn", "--width", "0.25", "--data", "digits", "--epochs", "1",
                     "--batch-size", "64", "--out", str(base), "--threads", "1", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    single = [int(r["batches"]) for r in
              __import__("ltc.results", fromlist=["RunResult"]).RunResult.read(base / "result.json").history]
    out = tmp_path / "out"
    out.mkdir()
    common = ["--batch-size", "64", "--device", "cpu", "--threads", "1", "--no-progress"]
    train = ["train", "--model", "small_cnn", "--width", "0.25", "--data", "digits", "--epochs", "1", *common,
             "--out", str(out / "train")]
    comp = ["compress", "--base", str(base), "--target-sr", "2", "--steps", "2", "--epochs-per-step", "1",
            "--finetune-epochs", "1", *common, "--no-plots", "--set", "run.latency_repeats=1", "--set",
            "run.latency_threads=1", "--out", str(out / "cli")]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(WORKER), "ddp", str(out), str(tmp_path / "result"), *train, "::", *comp]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (torch.load(tmp_path / f"result.{r}", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2

    # ltc.api.compress with DDP: each process trains on its own half of the data (different batches), yet the
    # gradients are averaged, so the weights stay identical, and the C step is rank 0's on both
    assert r0["api"]["first_batch"] != r1["api"]["first_batch"]
    assert r0["api"]["ranks"] == r1["api"]["ranks"]
    assert_same_weights(r0["api"]["state"], r1["api"]["state"])

    # the commands under torchrun: every epoch of every fit ran on half the batches of the single-process run
    # (1,618 digits: 26 batches of 64 alone, 809 per process: 13 batches each)
    half = math.ceil((sum(single) * 64 // 2) / 64)
    for r in (r0, r1):
        t, c = r["cli"]
        assert t["rc"] == c["rc"] == 0
        assert t["batches"] == [[half]], t["batches"]
        assert [b for f in c["batches"] for b in f] == [half] * 3, c["batches"]  # 2 LC epochs + 1 fine-tuning
    assert single == [26]
    assert r0["cli"][1]["ranks"] == r1["cli"][1]["ranks"]
    assert_same_weights(r0["cli"][1]["state"], r1["cli"][1]["state"])
    assert (out / "cli" / "result.json").is_file() and (out / "cli" / "model.pt").is_file()
    assert (out / "train" / "result.json").is_file()

    # only rank 0 wrote: rank 1 opened nothing for writing under out/ (the hook works: rank 0's writes are seen)
    assert r1["writes"] == []
    written = {Path(w.split(" ", 1)[1]).name for w in r0["writes"]}
    for name in ("checkpoint.pt", "model.pt", "result.json", "config.yaml", "log.csv"):
        assert any(n == name or n.startswith(f".{name}.") for n in written), (name, sorted(written))
