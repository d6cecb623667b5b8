"""Reliability: runs killed with SIGKILL at random moments resume to the bit-identical result; atomic writes
never leave a half-written file (and clean up the temp files of killed writers); divergence (NaN/inf), bad
settings, foreign checkpoints, a full disk and permission errors stop with a clear message and leave the last
good checkpoint loadable.

``python tests/test_reliability.py`` rewrites docs/bad_inputs.md from the real messages; the last test checks
that the table still matches what ltc prints.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ltc
import ltc.api
import ltc.engine
import ltc.train
import ltc.utils
from ltc import models
from ltc.api import CHECKPOINT_NAME, compress
from ltc.train import CHECKPOINT_VERSION, NonFiniteLossError, fit

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_resume_worker.py")
DOC = REPO / "docs" / "bad_inputs.md"
TOTAL_EPOCHS = 3 * 1 + 2  # the worker's compress run: 3 LC steps x 1 epoch + 2 fine-tuning epochs


# ============================================================================================ helpers
def temp_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


class Launch:
    """A child process whose stdout/stderr go to files (no pipe to fill), with a wait for a marker line."""

    def __init__(self, argv: list[str], logdir: Path, tag: str) -> None:
        self.out, self.err = logdir / f"{tag}.out", logdir / f"{tag}.err"
        with self.out.open("wb") as o, self.err.open("wb") as e:
            self.proc = subprocess.Popen(argv, stdout=o, stderr=e, cwd=REPO, env=env())
        self.t_marker: float | None = None

    def text(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def wait_marker(self, pattern: str, timeout: float = 120.0) -> bool:
        """Wait until a stdout line matches ``pattern``; False if the process ended first."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if rx.search(self.out.read_text(errors="replace")):
                self.t_marker = time.monotonic()
                return True
            if self.proc.poll() is not None:
                return bool(rx.search(self.out.read_text(errors="replace")))
            time.sleep(0.01)
        self.proc.kill()
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.text()[-3000:]}")

    def finish(self, timeout: float = 300.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return rc

    def kill_after(self, delay: float) -> bool:
        """SIGKILL ``delay`` s after the marker; True if the process was still running (a real kill)."""
        assert self.t_marker is not None
        while time.monotonic() < self.t_marker + delay:
            if self.proc.poll() is not None:
                return False
            time.sleep(0.005)
        if self.proc.poll() is not None:
            return False
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        return self.proc.returncode == -signal.SIGKILL


def check_after_kill(directory: Path, killed_pids: list[int], checkpoint: Path, fmt_key: str) -> dict | None:
    """After a SIGKILL: the checkpoint (if any) loads completely; the only possible leftovers are temp files of
    killed processes (a write cut short; at most one each), named after the pid so that the next write of the
    same file removes them."""
    leftovers = temp_files(directory)
    owners = [next((pid for pid in killed_pids if f"-{pid}." in p.name), None) for p in leftovers]
    assert None not in owners and len(set(owners)) == len(owners), leftovers
    if not checkpoint.exists():
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert fmt_key in state
    return state


def epochs_done(state: dict) -> int:
    """Epochs a compress checkpoint has done in all: its LC epochs, plus its fine-tuning epochs."""
    if state["stage"] == "finetune":
        return int(state["extra"]["lc_epochs_done"]) + int(state["epoch"])
    return int(state["epoch"])


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class Timeline:
    """When an uninterrupted reference run wrote its checkpoints (seconds after its marker line) and ended."""

    def __init__(self, launch: Launch, checkpoint: Path) -> None:
        self.writes: list[float] = []
        seen = None
        while True:
            running = launch.proc.poll() is None
            try:
                stamp = checkpoint.stat().st_mtime_ns
            except FileNotFoundError:
                stamp = None
            if stamp is not None and stamp != seen:
                seen = stamp
                self.writes.append(time.monotonic() - launch.t_marker)
            if not running:
                break
            time.sleep(0.005)
        self.end = time.monotonic() - launch.t_marker
        assert launch.proc.returncode == 0, launch.text()
        assert len(self.writes) >= 2, self.writes

    def kill_delay(self, rng: random.Random, done_fraction: float) -> float:
        """A random moment of a (resumed) run: after its start-up (imports, model set-up: what the reference spent
        before its first epoch), uniform over what is left of the training, up to half an epoch past its last
        checkpoint (into the final evaluation and saving).

        The draw covers the first 70 % of that window: the machine's load can change between the reference run
        and the killed ones, and a kill that lands after a faster run has finished proves nothing."""
        epoch = self.writes[1] - self.writes[0]
        setup = max(self.writes[0] - epoch, 0.0)
        left = (self.writes[-1] - setup) * max(1.0 - done_fraction, 0.1) + 0.5 * epoch
        return setup + rng.uniform(0.0, 0.7) * left


# ================================================================================ 1. kill and resume
def test_compress_killed_three_times_resumes_bit_identically(tmp_path: Path) -> None:
    """``ltc.api.compress`` in a child process, SIGKILLed at 3 random moments (seeded), each time relaunched
    with resume once a checkpoint exists, then run to the end: ranks, every weight, log and history equal the
    uninterrupted run's."""
    py = [sys.executable, str(WORKER), "compress"]
    ref = Launch([*py, str(tmp_path / "ref"), str(tmp_path / "ref.pt")], tmp_path, "ref")
    ref.wait_marker(r"^ready")
    timeline = Timeline(ref, tmp_path / "ref" / CHECKPOINT_NAME)
    print(f"reference: checkpoints at {[round(t, 2) for t in timeline.writes]} s, end {timeline.end:.2f} s")

    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / CHECKPOINT_NAME
    rng = random.Random(20240229)
    kills, resumed, pids = 0, 0, []
    for i in range(3):
        state = torch.load(ckpt, weights_only=True) if ckpt.exists() else None
        done = epochs_done(state) / TOTAL_EPOCHS if state else 0.0
        resumed += state is not None
        argv = [*py, str(run_dir), str(tmp_path / "final.pt")] + (["--resume"] if state else [])
        child = Launch(argv, tmp_path, f"kill{i}")
        if not child.wait_marker(r"^ready"):
            raise AssertionError(child.text())
        delay = timeline.kill_delay(rng, done)
        killed = child.kill_after(delay)
        kills += killed
        if not killed:  # finished before the kill: fine, nothing left to resume
            assert child.proc.returncode == 0, child.text()
            break
        pids.append(child.proc.pid)
        after = check_after_kill(run_dir, pids, ckpt, "extra")
        print(f"kill {i + 1}: {delay:.2f} s into the run (resumed at epoch {round(done * TOTAL_EPOCHS)}); checkpoint "
              f"then: {(after['stage'], epochs_done(after)) if after else None}")
    assert kills >= 2, f"only {kills} of the 3 kills hit a running process"
    last = Launch([*py, str(run_dir), str(tmp_path / "final.pt"), "--resume"], tmp_path, "last")
    assert last.finish() == 0, last.text()
    assert resumed >= 1 or kills == 3

    a = torch.load(tmp_path / "ref.pt", weights_only=True)
    b = torch.load(tmp_path / "final.pt", weights_only=True)
    assert b["ranks"] == a["ranks"]
    assert_same_weights(b["state"], a["state"])
    assert b["log"] == a["log"] and b["history"] == a["history"]
    assert (b["acc"], b["acc_before"], b["base_acc"]) == (a["acc"], a["acc_before"], a["base_acc"])
    assert temp_files(run_dir) == []  # the killed writers' temp files were removed by the later writes
    assert sorted(p.name for p in run_dir.iterdir()) == [CHECKPOINT_NAME]


def test_ltc_train_killed_three_times_resumes_bit_identically(tmp_path: Path) -> None:
    """``ltc train`` (the CLI, through ltc.train.fit) killed at 3 random moments and resumed with --resume: the
    model, history and per-epoch log equal an uninterrupted run's."""
    argv = [sys.executable, "-m", "ltc", "train", "--model", "small_cnn", "--width", "0.25", "--data", "digits",
            "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--threads", "1", "--no-progress"]
    marker = r"^\[train\] .*epochs? on"
    ref = Launch([*argv, "--out", str(tmp_path / "ref")], tmp_path, "ref")
    ref.wait_marker(marker)
    timeline = Timeline(ref, tmp_path / "ref" / "checkpoint.pt")
    print(f"reference: checkpoints at {[round(t, 2) for t in timeline.writes]} s, end {timeline.end:.2f} s")

    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"
    rng = random.Random(7)
    kills, pids = 0, []
    for i in range(3):
        state = torch.load(ckpt, weights_only=True) if ckpt.exists() else None
        done = state["epoch"] / 3 if state else 0.0
        child = Launch([*argv, "--out", str(out)] + (["--resume"] if i else []), tmp_path, f"kill{i}")
        if not child.wait_marker(marker):
            raise AssertionError(child.text())
        delay = timeline.kill_delay(rng, done)
        killed = child.kill_after(delay)
        kills += killed
        if not killed:
            assert child.proc.returncode == 0, child.text()
            break
        pids.append(child.proc.pid)
        after = check_after_kill(out, pids, ckpt, "model")
        print(f"kill {i + 1}: {delay:.2f} s into training (resumed at epoch {round(done * 3)}); checkpoint then: "
              f"epoch {after['epoch'] if after else None}")
        if (out / "result.json").exists():  # written last: a run killed after it has nothing left to do
            break
    assert kills >= 2, f"only {kills} of the 3 kills hit a running process"
    last = Launch([*argv, "--out", str(out), "--resume"], tmp_path, "last")
    assert last.finish() == 0, last.text()

    a, b = ltc.load(tmp_path / "ref" / "model.pt"), ltc.load(out / "model.pt")
    assert_same_weights(b.state_dict(), a.state_dict())
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (tmp_path / "ref", out))

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(rb["history"]) == strip(ra["history"]) and rb["acc"] == ra["acc"]
    la, lb = ([json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
              for d in (tmp_path / "ref", out))
    assert strip(lb) == strip(la)
    assert temp_files(out) == []


def test_resume_between_the_last_c_step_and_fine_tuning_is_bit_identical(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped after its last C step but before its first fine-tuning checkpoint resumes from the last LC
    checkpoint: the deployed network is rebuilt from Θ alone, BatchNorm re-estimated with the restored RNG, and
    fine-tuning starts as in the uninterrupted run (an earlier version deployed the C step's own factors, equal
    to those rebuilt from Θ only up to rounding)."""
    kw = {**QUICK, "steps": 2, "finetune_epochs": 2}
    ref = compress(small(), loader(), checkpoint_dir=tmp_path / "ref", **kw)
    real, calls = ltc.train.train_one_epoch, [0]

    def stop_at_fine_tuning(*args, **kwargs):
        if calls[0] == 2:  # 2 L steps done: this is the first fine-tuning epoch
            raise KeyboardInterrupt
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ltc.train, "train_one_epoch", stop_at_fine_tuning)
    with pytest.raises(KeyboardInterrupt):
        compress(small(), loader(), checkpoint_dir=tmp_path / "run", **kw)
    monkeypatch.undo()
    state = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)
    assert state["stage"] == "lc" and state["epoch"] == 2
    res = compress(small(), loader(), checkpoint_dir=tmp_path / "run", resume=True, **kw)
    assert res.ranks == ref.ranks
    assert_same_weights(res.model.state_dict(), ref.model.state_dict())


def test_sigkill_mid_write_keeps_the_old_file_and_the_next_write_cleans_up(tmp_path: Path) -> None:
    """What the atomic writer leaves behind when killed in the middle of a write: the target keeps its previous
    complete content, plus one temp file named after the dead writer's pid, which the next write removes (a
    live writer's temp file is left alone)."""
    target = tmp_path / "compress.pt"
    child = Launch([sys.executable, str(WORKER), "hang-write", str(target)], tmp_path, "hang")
    assert child.wait_marker(r"^writing"), child.text()
    child.kill_after(0.0)
    assert child.proc.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(target, weights_only=True)["good"], torch.arange(10))  # old content, complete
    stray = temp_files(tmp_path)
    host = ltc.utils._host_tag()
    assert len(stray) == 1 and stray[0].name.startswith(f".compress.pt.{host}-{child.proc.pid}.")
    keep = [
        tmp_path / f".compress.pt.{host}-{os.getpid()}.inflight.tmp",  # a live writer (another thread of ours)
        tmp_path / f".compress.pt.0badf00d-{child.proc.pid}.x.tmp",  # another machine's writer: pids not ours
        tmp_path / f".other.pt.{host}-{child.proc.pid}.x.tmp",  # another file's leftover: not this write's
    ]
    for p in keep:
        p.write_bytes(b"x")

    ltc.utils.atomic_torch_save({"good": torch.arange(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["good"], torch.arange(3))
    assert not stray[0].exists() and all(p.exists() for p in keep)


# ========================================================================================= 3. guards
def make_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    proto = torch.randn(4, 1, 16, 16, generator=g)
    return TensorDataset(proto[y] + 0.5 * torch.randn(n, 1, 16, 16, generator=g), y)


TRAIN, VAL = make_data(64, 0), make_data(32, 1)
QUICK = dict(target_sr=2.0, steps=3, epochs_per_step=1, finetune_epochs=1, seed=1, progress=False)


def small(width: float = 0.25, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.create("small_cnn", num_classes=4, in_channels=1, width=width)


def loader(batch_size: int = 16) -> DataLoader:
    return DataLoader(TRAIN, batch_size=batch_size, shuffle=True, generator=torch.Generator())


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


class NaNAfter(nn.Module):
    """small_cnn whose output turns NaN after ``n`` training forwards (a bug in user code, a bad batch...)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.net, self.n, self.calls = small(), n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls > self.n:
                out = out * float("nan")
        return out


def test_nan_loss_in_compress_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = NaNAfter(n=4 + 2)  # 4 batches per epoch: NaN in the 2nd batch of the 2nd L step
    with pytest.raises(NonFiniteLossError) as info:
        compress(model, loader(), checkpoint_dir=tmp_path, **QUICK)
    msg = str(info.value)
    assert msg.startswith("L step 2/3, epoch 1/1: non-finite loss at batch 3/4: task loss = nan")
    assert f"The last good checkpoint {tmp_path / CHECKPOINT_NAME} is unchanged" in msg
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["stage"] == "lc" and state["epoch"] == 1 and all_finite(state["model"])
    assert temp_files(tmp_path) == []
    # the checkpoint is good: a healthy model of the same architecture resumes it to the end
    model.n = 10**9
    res = compress(model, loader(), checkpoint_dir=tmp_path, resume=True, **QUICK)
    assert all_finite(res.model.state_dict())


def test_weights_turning_nan_after_a_finite_last_loss_are_never_checkpointed(tmp_path: Path) -> None:
    """One batch per epoch and a huge lr: the loss of every batch is finite, but its step blows the weights up.
    compress used to checkpoint those NaN weights (and the C step ran on them); now it stops first."""
    with pytest.raises(NonFiniteLossError, match=r"^L step [23]/3, epoch 1/1: the weights became NaN/inf") as info:
        compress(small(), DataLoader(TRAIN, batch_size=64), checkpoint_dir=tmp_path,
                 **{**QUICK, "lr": 1e6, "metric": "weight"})
    assert "although every batch loss was finite" in str(info.value) and "a lower learning rate" in str(info.value)
    failed_step = int(str(info.value)[len("L step ")])
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == failed_step - 1 and all_finite(state["model"])
    layers = state["extra"]["compression"]["layers"].values()
    assert all(all_finite({"t": s["theta"], "p": s["phi"]}) for s in layers)

    # with the data metric the C step runs the network: huge but finite weights overflow its activations first
    data_dir = tmp_path / "data"
    with pytest.raises(FloatingPointError, match=r"^C step [1-3]: layer '.+' sees NaN/inf inputs on the calibration"):
        compress(small(), DataLoader(TRAIN, batch_size=64), checkpoint_dir=data_dir,
                 **{**QUICK, "lr": 1e6, "metric": "data"})
    state = torch.load(data_dir / CHECKPOINT_NAME, weights_only=True)
    assert all_finite(state["model"]) and temp_files(data_dir) == []

    # the same in fine-tuning
    ft_dir = tmp_path / "ft"
    with pytest.raises(NonFiniteLossError, match=r"^fine-tuning epoch 2/3: the weights became NaN/inf"):
        compress(small(), DataLoader(TRAIN, batch_size=64), checkpoint_dir=ft_dir,
                 **{**QUICK, "steps": 1, "finetune_epochs": 3, "finetune_lr": 1e6})
    state = torch.load(ft_dir / CHECKPOINT_NAME, weights_only=True)
    assert state["stage"] == "finetune" and state["epoch"] == 1 and all_finite(state["model"])


def test_fit_never_checkpoints_nan_weights(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint.pt"
    model = small()
    with pytest.raises(NonFiniteLossError, match=r"^epoch [2-5]/5: the weights became NaN/inf") as info:
        fit(model, DataLoader(TRAIN, batch_size=64), epochs=5, opt_cfg={"lr": 1e6}, checkpoint_path=ckpt,
            progress=False, seed=0)
    assert f"The last good checkpoint {ckpt} is unchanged" in str(info.value)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == int(str(info.value).split()[1].split("/")[0]) - 1 and all_finite(state["model"])
    with pytest.raises(NonFiniteLossError, match=r"^epoch 1/1: non-finite loss at batch 1/4"):
        fit(NaNAfter(0), loader(), epochs=1, checkpoint_path=tmp_path / "other.pt", progress=False)
    assert not (tmp_path / "other.pt").exists() and temp_files(tmp_path) == []


BAD_SETTINGS = [
    ({"lam": -1.0, "target_sr": None}, "lam must be a finite number >= 0, got -1.0"),
    ({"lam": float("nan"), "target_sr": None}, "lam must be a finite number >= 0, got nan"),
    ({"target_sr": 0.5}, "target_sr must be a finite number >= 1 (a speed-up), got 0.5"),
    ({"target_sr": 1e4}, "target SR 10000 is out of reach: with every compressed layer at min_rank=2"),
    ({"min_rank": 0}, "min_rank must be an int >= 1, got 0"),
    ({"min_rank": 64}, "target SR 2 is out of reach: with every compressed layer at min_rank=64 the model "
                       "reaches 1.00; lower the target"),
    ({"mu0": 0.0}, "mu0 must be a finite number > 0, got 0.0"),
    ({"mu_growth": 0.9}, "mu_growth must be a finite number >= 1 (μ increases), got 0.9"),
    ({"mu_final": -1.0}, "mu_final must be a finite number > 0, got -1.0"),
    ({"cost": "flops"}, "cost must be one of 'macs', 'params', 'latency', got 'flops'"),
    ({"include": ["layer9.*"]}, "include glob 'layer9.*' matches no conv or linear layer; layer names look like: "
                                "features.0, features.3"),
    ({"exclude": ["features.99"]}, "exclude glob 'features.99' matches no conv or linear layer"),
    ({"include": ["features.1"]}, "include glob 'features.1' matches no conv or linear layer"),  # a BatchNorm
    ({"exclude": ["features.*"]}, "no layer left to compress after include/exclude"),
    ({"method": "tucker"}, "unknown method 'tucker'"),
    ({"optimizer": "rmsprop"}, "optimizer must be one of 'sgd', 'adam', 'adamw', got 'rmsprop'"),
    ({"lr_anneal": 1.5}, "lr_anneal must lie in (0, 1] (the share of the LC epochs that anneal), got 1.5"),
    ({"lr_schedule": "restart", "lr_anneal": 0.5}, "lr_anneal=0.5 shapes lr_schedule='cosine'; with "
                                                    "lr_schedule='restart' leave it out"),
    ({"method": "vbmf", "lam": 5.0, "target_sr": None}, "method 'vbmf' picks its ranks without λ; drop lam"),
    ({"epochs": 2}, "epochs=2 is less than the LC steps' 3"),
    ({"epochs": 6, "finetune_epochs": 2}, "finetune_epochs=2 does not add up with epochs=6"),
]


@pytest.mark.parametrize("kw, message", BAD_SETTINGS, ids=[str(k) for k, _ in BAD_SETTINGS])
def test_bad_settings_fail_before_any_training_or_writing(kw: dict, message: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("trained or evaluated before the settings were checked")

    monkeypatch.setattr(ltc.train, "train_one_epoch", boom)
    monkeypatch.setattr(ltc.api, "evaluate", boom)
    with pytest.raises(ValueError) as info:
        compress(small(), loader(), val_loader=DataLoader(VAL, batch_size=32), checkpoint_dir=tmp_path / "ck",
                 **{**QUICK, **kw})
    assert message in str(info.value)
    assert not (tmp_path / "ck").exists()


@pytest.fixture(scope="module")
def finished_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ck")
    compress(small(), loader(), checkpoint_dir=d, **{**QUICK, "steps": 1, "finetune_epochs": 0})
    return d / CHECKPOINT_NAME


def _copy(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    (dst_dir / CHECKPOINT_NAME).write_bytes(src.read_bytes())
    return dst_dir / CHECKPOINT_NAME


def _resaved(src: Path, dst_dir: Path, **changes) -> Path:
    state = torch.load(src, weights_only=True)
    state.update(changes)
    dst_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, dst_dir / CHECKPOINT_NAME)
    return dst_dir / CHECKPOINT_NAME


def _with_engine_version(src: Path, version: int) -> dict:
    extra = torch.load(src, weights_only=True)["extra"]
    extra["compression"]["version"] = version
    return extra


def test_resume_refuses_foreign_checkpoints(finished_checkpoint: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("trained from a foreign checkpoint")

    kw = {**QUICK, "steps": 1, "finetune_epochs": 0}
    cases = [
        ("arch", _copy(finished_checkpoint, tmp_path / "arch"), {"model": small(width=0.5)},
         "belongs to another model (parameters features.0.weight"),
        ("version", _resaved(finished_checkpoint, tmp_path / "v", version=99), {},
         "was written by another ltc version (checkpoint version 99"),
        ("method", _copy(finished_checkpoint, tmp_path / "m"), {"method": "lrc"},
         "belongs to a run with other settings (method: 'ltc' -> 'lrc')"),
        ("settings", _copy(finished_checkpoint, tmp_path / "s"), {"target_sr": 3.0},
         "belongs to a run with other settings (target_sr: 2.0 -> 3.0)"),
        ("schedule", _copy(finished_checkpoint, tmp_path / "l"), {"lr_anneal": 0.5},
         "belongs to a run with other settings (lr_anneal: 0.2 -> 0.5)"),
        ("fit", tmp_path / "fit" / CHECKPOINT_NAME, {}, "was written by ltc train / ltc.train.fit, not by ltc "
                                                        "compress / ltc.compress"),
        ("garbage", tmp_path / "g" / CHECKPOINT_NAME, {},
         "cannot be read (not a tensor checkpoint: Unsupported operand"),
        ("truncated", tmp_path / "t" / CHECKPOINT_NAME, {}, "cannot be read ("),
        ("engine", _resaved(finished_checkpoint, tmp_path / "e", extra=_with_engine_version(finished_checkpoint, 7)),
         {},
         f"engine state version 7 is not this ltc's ({ltc.engine.ENGINE_STATE_VERSION})"),
    ]
    (tmp_path / "fit").mkdir()
    fit(small(), loader(), epochs=1, checkpoint_path=tmp_path / "fit" / CHECKPOINT_NAME, progress=False)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / CHECKPOINT_NAME).write_bytes(b"not a checkpoint at all" * 10)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / CHECKPOINT_NAME).write_bytes(finished_checkpoint.read_bytes()[:5000])
    monkeypatch.setattr(ltc.train, "train_one_epoch", boom)
    for name, path, over, message in cases:
        before = path.read_bytes()
        args = {**kw, **{k: v for k, v in over.items() if k != "model"}}
        with pytest.raises(ValueError) as info:
            compress(over.get("model", small()), loader(), checkpoint_dir=path.parent, resume=True, **args)
        assert message in str(info.value), (name, str(info.value))
        assert str(path) in str(info.value), name
        assert path.read_bytes() == before, name  # left as it was


def test_fit_resume_refuses_another_models_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint.pt"
    fit(small(), loader(), epochs=1, checkpoint_path=ckpt, progress=False)
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"belongs to another model or optimizer \(Error\(s\) in loading state_dict"):
        fit(small(width=0.5), loader(), epochs=1, checkpoint_path=ckpt, resume=True, progress=False)
    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"is not an ltc checkpoint \(it holds a plain dict\)"):
        fit(small(), loader(), epochs=2, checkpoint_path=tmp_path / "plain.pt", resume=True, progress=False)
    assert ckpt.read_bytes() == before


def test_fit_checkpoint_resumes_with_or_without_a_parallel_wrapper(tmp_path: Path) -> None:
    """fit stores the weights of the model inside a DDP/DataParallel wrapper: a run started under torchrun
    resumes on one process and vice versa."""
    ckpt = tmp_path / "checkpoint.pt"
    fit(nn.DataParallel(small()), loader(), epochs=1, checkpoint_path=ckpt, progress=False, seed=0)
    state = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])
    plain = small(seed=1)
    fit(plain, loader(), epochs=1, checkpoint_path=ckpt, resume=True, progress=False, seed=0)
    assert_same_weights(plain.state_dict(), state["model"])
    wrapped = nn.DataParallel(small(seed=2))
    fit(wrapped, loader(), epochs=1, checkpoint_path=ckpt, resume=True, progress=False, seed=0)
    assert_same_weights(wrapped.module.state_dict(), state["model"])


def _fail_on_write(monkeypatch: pytest.MonkeyPatch, n_ok: int, exc: OSError, where: str) -> list[int]:
    """Let ``n_ok`` checkpoint writes through, then fail: ``where='write'`` half-writes the temp file and raises
    ``exc`` (a full disk); ``where='replace'`` fails the final rename (e.g. a permission error)."""
    calls = [0]
    if where == "write":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] > n_ok and hasattr(f, "write"):
                f.write(b"\0" * 4096)  # part of the checkpoint made it to disk
                raise exc
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            calls[0] += 1
            if calls[0] > n_ok:
                raise exc
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize("where, exc, reason", [
    ("write", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ("replace", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
])
def test_disk_full_or_permission_error_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch, where, exc,
                                                                      reason) -> None:
    ckpt = tmp_path / CHECKPOINT_NAME
    _fail_on_write(monkeypatch, 1, exc, where)
    with pytest.raises(OSError) as info:
        compress(small(), loader(), checkpoint_dir=tmp_path, **QUICK)
    monkeypatch.undo()
    assert type(info.value) is type(exc) and info.value.errno == exc.errno
    assert str(info.value) == f"could not write checkpoint to {ckpt}: {reason}; the previous file is unchanged"
    state = torch.load(ckpt, weights_only=True)  # the checkpoint of LC step 1, complete
    assert state["epoch"] == 1 and state["stage"] == "lc"
    assert temp_files(tmp_path) == []
    # and the run resumes from it once the disk has room again
    res = compress(small(), loader(), checkpoint_dir=tmp_path, resume=True, **QUICK)
    assert res.ranks and all_finite(res.model.state_dict())

    # the same for ltc.train.fit
    fit_ckpt = tmp_path / "fit" / "checkpoint.pt"
    _fail_on_write(monkeypatch, 1, exc, where)
    with pytest.raises(type(exc), match=re.escape(f"could not write checkpoint to {fit_ckpt}: {reason}")):
        fit(small(), loader(), epochs=2, checkpoint_path=fit_ckpt, progress=False)
    monkeypatch.undo()
    assert torch.load(fit_ckpt, weights_only=True)["epoch"] == 1
    assert temp_files(tmp_path) == []


# ============================================================================= 4. the bad-inputs table
def _png(path: Path, value: int, size: int = 12) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), color=value).save(path)


def _make_bad_data(work: Path) -> None:
    import numpy as np

    (work / "empty").mkdir()
    for cls in ("cat", "dog"):
        for i in range(3):
            _png(work / "corrupt" / cls / f"{i}.png", 40 * i + (100 if cls == "dog" else 0))
            _png(work / "threeclass" / cls / f"{i}.png", 40 * i)
    (work / "corrupt" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    for i in range(3):
        _png(work / "oneclass" / "cat" / f"{i}.png", 40 * i)
        _png(work / "threeclass" / "owl" / f"{i}.png", 40 * i)
        _png(work / "nonsquare" / ("a" if i % 2 else "b") / f"{i}.png", 40 * i)
    from PIL import Image

    for p in (work / "nonsquare").rglob("*.png"):
        Image.new("L", (12, 9), color=50).save(p)
    (work / "notes.txt").write_text("not data")
    np.savez(work / "bad.npz", foo=np.zeros(3))
    (work / "broken.tar.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 40)
    import tarfile
    import zipfile

    (work / "readme.txt").write_text("no batches here")
    with tarfile.open(work / "nobatches.tar.gz", "w:gz") as tar:
        tar.add(work / "readme.txt", arcname="cifar-10-batches-py/readme.txt")
    with zipfile.ZipFile(work / "images.zip", "w") as z:
        z.writestr("cat/0.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        z.writestr("dog/0.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (work / "garbage.pt").write_bytes(b"not a model" * 30)
    (work / "unknown_key.yaml").write_text("train:\n  epoch: 3\n")
    (work / "syntax.yaml").write_text("train: {epochs: 3\n")


def bad_input_rows(work: Path) -> list[tuple[str, str, str]]:
    """Try every bad input; return ``(what, how, what the user sees)`` rows. Runs in ``work`` (paths in the
    messages are relative to it or start with ``<dir>``)."""
    import contextlib
    import io as _io
    import shutil

    from ltc.cli import main

    rows: list[tuple[str, str, str]] = []

    def norm(text: str) -> str:
        text = text.replace(str(work.resolve()), "<dir>").replace(str(work), "<dir>")
        return " ".join(text.split())

    def shown(argv: list[str]) -> str:
        """The command line with the common flags of the rows (T, C below) shown as '…'."""
        text = " ".join(argv)
        for common in (" ".join(C[1:]), " ".join(T)):
            text = text.replace(common, "…")
        return f"`ltc {text}`"

    def cli(what: str, argv: list[str]) -> None:
        err = _io.StringIO()
        threads = torch.get_num_threads()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()):
                code = main([*argv, "--no-progress"] if argv[0] in ("train", "compress", "eval") else argv)
        finally:
            torch.set_num_threads(threads)
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith("  warnings.warn")]
        text = norm(" ".join(lines))
        if text.startswith("usage:"):  # argparse: the usage block, then the error line
            text = "usage: … " + norm(lines[-1])
        rows.append((what, shown(argv), f"exit {code}: {text}"))

    def api(what: str, how: str, fn) -> None:
        try:
            fn()
            seen = "no error"
        except Exception as exc:  # noqa: BLE001 - every error is what the user sees
            seen = f"{type(exc).__name__}: {exc}"
        rows.append((what, how, norm(seen)))

    old_cwd = os.getcwd()
    os.chdir(work)
    try:
        _make_bad_data(work)
        T = ["--model", "small_cnn", "--width", "0.25", "--epochs", "1", "--batch-size", "128", "--threads", "1"]
        C = ["compress", "--base", "base", "--steps", "2", "--finetune-epochs", "1", "--batch-size", "128",
             "--threads", "1", "--no-plots", "--set", "run.latency_repeats=1"]
        # ---- data
        cli("data path that does not exist", ["train", *T, "--data", "missing/", "--out", "r1"])
        cli("empty folder", ["train", *T, "--data", "empty", "--out", "r1"])
        cli("image folder with a corrupt PNG", ["train", *T, "--data", "corrupt", "--out", "r1"])
        cli("one class only", ["train", *T, "--data", "oneclass", "--out", "r1"])
        cli("non-square images", ["train", *T, "--data", "nonsquare", "--out", "r1"])
        cli("unsupported file type", ["train", *T, "--data", "notes.txt", "--out", "r1"])
        cli("MedMNIST .npz without the expected arrays", ["train", *T, "--data", "bad.npz", "--out", "r1"])
        cli(".tar.gz that is not a readable archive", ["train", *T, "--data", "broken.tar.gz", "--out", "r1"])
        cli("CIFAR .tar.gz without the batch files", ["train", *T, "--data", "nobatches.tar.gz", "--out", "r1"])
        cli(".zip of corrupt images", ["train", *T, "--data", "images.zip", "--out", "r1"])
        # ---- configs and flags
        cli("unknown key in the config file", ["train", "--config", "unknown_key.yaml", "--out", "r1"])
        cli("YAML syntax error", ["train", "--config", "syntax.yaml", "--out", "r1"])
        cli("unknown model", ["train", "--model", "resnet", "--out", "r1"])
        cli("negative learning rate", ["train", *T, "--lr", "-1", "--out", "r1"])
        cli("--set with a value of the wrong type", ["train", *T, "--set", "train.epochs=many", "--out", "r1"])
        cli("CUDA requested on a machine without it", ["train", *T, "--device", "cuda", "--out", "r1"])
        cli("image size 0", ["train", *T, "--image-size", "0", "--out", "r1"])
        # a base run for the compress rows (1 epoch of digits)
        cli("(a good base run; not an error)", ["train", *T, "--data", "digits", "--out", "base"])
        rows.pop()
        cli("training run folder reused without --resume", ["train", *T, "--data", "digits", "--out", "base"])
        # ---- compress: settings, ranks, layers, targets (each into its own folder: a failed start may leave one)
        cli("base run that does not exist", ["compress", "--base", "nowhere", "--target-sr", "2", "--out", "c1"])
        cli("base model file that is not a model", ["compress", "--base", "garbage.pt", "--target-sr", "2",
                                                     "--out", "c2"])
        cli("neither λ nor a target", [*C, "--out", "c3"])
        cli("both λ and a target", [*C, "--lam", "1e-3", "--target-sr", "2", "--out", "c4"])
        cli("negative λ", [*C, "--lam", "-1", "--out", "c5"])
        cli("target SR below 1", [*C, "--target-sr", "0.5", "--out", "c6"])
        cli("unreachable target SR", [*C, "--target-sr", "1000", "--out", "c7"])
        cli("the same folder again after that failed start", [*C, "--target-sr", "2", "--out", "c7"])
        cli("min rank 0", [*C, "--target-sr", "2", "--min-rank", "0", "--out", "c8"])
        cli("min rank above the layers' ranks", [*C, "--target-sr", "2", "--min-rank", "64", "--out", "c9"])
        cli("μ growth below 1", [*C, "--target-sr", "2", "--mu-growth", "0.5", "--out", "c10"])
        cli("μ0 = 0", [*C, "--target-sr", "2", "--mu0", "0", "--out", "c11"])
        cli("layer glob matching nothing", [*C, "--target-sr", "2", "--layers", "layer9.*", "--out", "c12"])
        cli("layer glob matching a BatchNorm, not a conv", [*C, "--target-sr", "2", "--layers", "features.1",
                                                            "--out", "c13"])
        cli("every layer excluded", [*C, "--target-sr", "2", "--exclude", "features.*", "--out", "c14"])
        cli("data with other classes than the base model's", [*C, "--target-sr", "2", "--data", "threeclass",
                                                             "--out", "c15"])

        def grouped() -> None:
            net = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8))
            ltc.LTC(net, torch.zeros(1, 4, 8, 8), lam=1e-3)

        api("only grouped / depthwise convs", "`ltc.LTC(net_with_only_grouped_convs, x, lam=1e-3)`", grouped)
        api("a grouped conv given to a decomposition", "`ltc.layers.check_decomposable_conv(nn.Conv2d(4, 8, 3, "
            "groups=4))`", lambda: ltc.layers.check_decomposable_conv(nn.Conv2d(4, 8, 3, groups=4)))
        # ---- checkpoints
        cli("(a good run; not an error)", [*C, "--target-sr", "2", "--out", "c_ok"])
        rows.pop()
        shutil.copytree("c_ok", "c_fit")
        shutil.copy("base/checkpoint.pt", f"c_fit/{CHECKPOINT_NAME}")
        (work / "c_fit" / "result.json").unlink()
        cli("--resume on a compression folder whose checkpoint a training run wrote",
            [*C, "--target-sr", "2", "--out", "c_fit", "--resume"])
        shutil.copytree("c_ok", "c_bad")
        (work / "c_bad" / CHECKPOINT_NAME).write_bytes(b"garbage" * 50)
        (work / "c_bad" / "result.json").unlink()
        cli("--resume on a damaged checkpoint", [*C, "--target-sr", "2", "--out", "c_bad", "--resume"])
        shutil.copytree("c_ok", "c_set")
        (work / "c_set" / "result.json").unlink()
        cli("--resume with another target than the run's", [*C, "--target-sr", "3", "--out", "c_set", "--resume"])
        cli("compress run folder reused without --resume", [*C, "--target-sr", "2", "--out", "c_ok"])
        ck = work / "c_ok" / CHECKPOINT_NAME
        api("resume with another architecture", "`ltc.compress(wider_model, ..., checkpoint_dir=run, resume=True)`",
            lambda: compress(models.create("small_cnn", num_classes=10, in_channels=1, width=0.5), loader16(),
                             checkpoint_dir=ck.parent, resume=True, target_sr=2.0, steps=2, finetune_epochs=1,
                             progress=False))
        shutil.copytree("c_ok", "c_ver")
        st = torch.load(work / "c_ver" / CHECKPOINT_NAME, weights_only=True)
        st["version"] = CHECKPOINT_VERSION + 1
        torch.save(st, work / "c_ver" / CHECKPOINT_NAME)
        (work / "c_ver" / "result.json").unlink()
        cli("--resume on a checkpoint of a newer ltc", [*C, "--target-sr", "2", "--out", "c_ver", "--resume"])
        shutil.copytree("base", "base2")
        (work / "base2" / "result.json").unlink()
        (work / "base2" / "model.pt").unlink()
        cli("ltc train --resume with another width than the checkpoint's",
            ["train", *T, "--width", "0.5", "--data", "digits", "--out", "base2", "--resume"])
        # ---- divergence
        cli("training diverges (huge learning rate)", ["train", *T, "--data", "digits", "--lr", "1e30", "--out", "nan"])
        cli("compression diverges (huge L-step learning rate)", [*C, "--target-sr", "2", "--lr", "1e30",
                                                                 "--out", "c_nan"])
        api("the model outputs NaN", "`ltc.compress(model_emitting_nan, loader, checkpoint_dir=d, ...)`",
            lambda: compress(NaNAfter(6), loader(), checkpoint_dir=work / "nan_api", **QUICK))
        # ---- disk full / permissions
        real_save, real_replace = torch.save, os.replace

        def full_disk(obj, f, *a, **k):
            if hasattr(f, "write") and (work / "c_full" / CHECKPOINT_NAME).exists():
                f.write(b"\0" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *a, **k)

        def no_permission(src, dst, *a, **k):
            if str(dst).endswith(CHECKPOINT_NAME) and Path(dst).exists():
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_replace(src, dst, *a, **k)

        torch.save = full_disk
        try:
            cli("disk full while writing a checkpoint", [*C, "--target-sr", "2", "--out", "c_full"])
        finally:
            torch.save = real_save
        os.replace = no_permission
        try:
            cli("no permission to replace the checkpoint", [*C, "--target-sr", "2", "--out", "c_perm"])
        finally:
            os.replace = real_replace
        # ---- eval / export
        cli("eval on a split the data does not have", ["eval", "c_ok", "--data", "digits", "--split", "test"])
        cli("eval of a file that is not a model", ["eval", "garbage.pt"])
        cli("eval on data with other classes", ["eval", "c_ok", "--data", "threeclass"])
        cli("export without a format", ["export", "c_ok"])
        cli("export to a folder that is a file", ["export", "c_ok", "--onnx", "notes.txt/model.onnx"])
        cli("export of a file that is not a model", ["export", "garbage.pt", "--torchscript", "m.pt"])
    finally:
        os.chdir(old_cwd)
    return rows


def loader16() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 1, 16, 16, generator=g), torch.arange(32) % 10), batch_size=16)


def bad_inputs_markdown(rows: list[tuple[str, str, str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| bad input | how | what the user sees |", "|---|---|---|"]
    lines += [f"| {cell(a)} | {cell(b)} | {cell(c)} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


DOC_START, DOC_END = "<!-- table: start -->", "<!-- table: end -->"
DOC_HEAD = """# Bad inputs and what ltc says

Every bad input below was actually tried; the third column is what the user sees: for the command line the exit
status and the text on stderr (`ltc: error: ...`, exit 2 for bad input, 1 for failures during a run; `--debug`
shows the traceback instead), for the Python API the exception. `…` stands for the flags the rows share
(`ltc train … ` = `--model small_cnn --width 0.25 --epochs 1 --batch-size 128 --threads 1`; `ltc compress …` =
`--base base --steps 2 --finetune-epochs 1 --batch-size 128 --threads 1 --no-plots --set run.latency_repeats=1`),
`<dir>` for the working folder. Numbers from training (losses, the batch where a run diverged) vary by machine.

In every case nothing is half-written: checkpoints, models and results are written to a temp file and renamed,
a run that diverges (NaN/inf loss or weights) stops before its next checkpoint, so the last good one stays
loadable and `--resume` continues from it; a run killed with SIGKILL resumes to the bit-identical result (see
tests/test_reliability.py).

Regenerate this table with `python tests/test_reliability.py` (tests/test_reliability.py checks it is current).

"""


def _fuzzy(text: str) -> str:
    return re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?|\bnan\b|\binf\b", "#", text)


README = REPO / "README.md"


def test_bad_inputs_table_is_current(tmp_path: Path) -> None:
    """docs/bad_inputs.md and the README's copy show what ltc prints today (numbers aside, which training may
    change)."""
    table = bad_inputs_markdown(bad_input_rows(tmp_path))
    for path in (DOC, README):
        doc = path.read_text(encoding="utf-8")
        assert DOC_START in doc and DOC_END in doc, f"{path.name} lacks the bad-input table markers"
        documented = doc.split(DOC_START, 1)[1].split(DOC_END, 1)[0].strip()
        got, want = _fuzzy(table.strip()).splitlines(), _fuzzy(documented).splitlines()
        diff = [f"doc: {w}\nnow: {g}" for w, g in zip(want, got, strict=False) if w != g]
        hint = f"{path.name}'s bad-input table is out of date; regenerate it with `python tests/test_reliability.py`"
        assert len(got) == len(want) and not diff, hint + "\n" + "\n".join(diff[:5])


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        table = bad_inputs_markdown(bad_input_rows(Path(d)))
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(DOC_HEAD + DOC_START + "\n" + table + DOC_END + "\n", encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    head, rest = readme.split(DOC_START, 1)
    README.write_text(head + DOC_START + "\n" + table + DOC_END + rest.split(DOC_END, 1)[1], encoding="utf-8")
    print(f"wrote {DOC} and the table in {README}")
