"""Tests for ltc.train and ltc.utils."""

from __future__ import annotations

import csv
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ltc import train as T
from ltc.train import (
    EpochSeededSampler,
    NonFiniteLossError,
    RunLog,
    accuracy,
    count_correct,
    evaluate,
    fit,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)
from ltc.utils import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    get_rng_state,
    is_main_process,
    rank,
    resolve_device,
    seed_everything,
    set_rng_state,
    world_size,
)


def _separable(n: int = 256, d: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    y = (x @ w > 0).long()
    x = x + 0.5 * (2 * y[:, None] - 1) * w / w.norm()  # push the classes apart (margin)
    return TensorDataset(x, y)


def _model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))


def _loader(ds: TensorDataset, seed: int = 0, bs: int = 32) -> DataLoader:
    return DataLoader(ds, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- training


def test_fit_learns_separable_data(tmp_path: Path) -> None:
    ds = _separable()
    model = _model()
    before = evaluate(model, DataLoader(ds, batch_size=64))
    log = RunLog(tmp_path / "run")
    hist = fit(
        model,
        _loader(ds),
        DataLoader(ds, batch_size=64),
        epochs=8,
        opt_cfg={"lr": 0.1},
        sched_cfg={"name": "cosine", "warmup_epochs": 1},
        log=log,
        progress=False,
        seed=0,
    )
    assert [h["epoch"] for h in hist] == list(range(1, 9))
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    assert hist[-1]["val_acc"] >= 0.95
    assert hist[-1]["val_loss"] < before.loss
    assert hist[0]["lr"] == pytest.approx(0.1 / 1)  # warmup ramp of one epoch: full LR in epoch 1
    assert hist[1]["lr"] == pytest.approx(0.1)
    assert hist[-1]["lr"] < hist[1]["lr"]
    for h in hist:
        assert set(h) >= {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[-1]["val_acc"] == pytest.approx(hist[-1]["val_acc"])
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 8 and float(csv_rows[3]["train_loss"]) == pytest.approx(hist[3]["train_loss"])


def test_extra_loss_is_added_and_optimised() -> None:
    ds = _separable(n=64)
    model = _model()
    target = 3.0
    weight = model[4].bias

    def penalty() -> torch.Tensor:
        return 10.0 * ((weight - target) ** 2).sum()

    stats = train_one_epoch(
        model,
        DataLoader(ds, batch_size=16),
        make_optimizer(model, lr=0.01, weight_decay=0.0),
        extra_loss=penalty,
        progress=False,
    )
    assert stats.extra_loss > 0 and stats.samples == 64
    fit(model, DataLoader(ds, batch_size=16), epochs=10, opt_cfg={"lr": 0.01}, extra_loss=penalty, progress=False)
    assert torch.allclose(weight.detach(), torch.full_like(weight, target), atol=0.05)

    # the reported loss excludes the penalty, the extra_loss field holds it
    opt = make_optimizer(model, lr=0.0)
    s_plain = train_one_epoch(model, DataLoader(ds, batch_size=64), opt, progress=False)
    s_pen = train_one_epoch(
        model, DataLoader(ds, batch_size=64), opt, extra_loss=lambda: torch.tensor(7.0), progress=False
    )
    assert s_pen.loss == pytest.approx(s_plain.loss)
    assert s_pen.extra_loss == pytest.approx(7.0)


def test_nonfinite_loss_raises_before_step() -> None:
    ds = _separable(n=64)
    model = _model()
    opt = make_optimizer(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, batch 1.*lower learning rate"):
        train_one_epoch(
            model,
            DataLoader(ds, batch_size=16),
            opt,
            extra_loss=lambda: torch.tensor(float("nan")),
            progress=False,
            epoch=3,
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert issubclass(NonFiniteLossError, RuntimeError)

    bad = TensorDataset(torch.full((8, 8), float("inf")), torch.zeros(8, dtype=torch.long))
    with pytest.raises(NonFiniteLossError, match="batch 1/1"):
        fit(model, DataLoader(bad, batch_size=8), epochs=1, progress=False)


@pytest.mark.parametrize("use_seed", [True, False])
def test_resume_is_bit_identical(tmp_path: Path, use_seed: bool) -> None:
    ds = _separable(n=96)
    val = DataLoader(ds, batch_size=48)
    kw = dict(
        epochs=5,
        opt_cfg={"lr": 0.05, "momentum": 0.9},
        sched_cfg={"name": "cosine"},
        progress=False,
        seed=123 if use_seed else None,
    )

    ref_model = _model(dropout=0.3)
    ref_hist = fit(ref_model, _loader(ds), val, **kw)

    ckpt = tmp_path / "ckpt.pt"
    log = RunLog(tmp_path / "log")

    class Interrupt(Exception):
        pass

    def stop_after_3(epoch: int, row: dict) -> dict:
        if epoch == 3:
            raise Interrupt  # dies before epoch 3 is checkpointed: checkpoint holds epoch 2
        return {"note": epoch}

    model = _model(dropout=0.3)
    with pytest.raises(Interrupt):
        fit(model, _loader(ds), val, checkpoint_path=ckpt, log=log, on_epoch_end=stop_after_3, **kw)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    assert len(log) == 2

    # disturb every global RNG and use a loader in a different generator state: resume must fix both
    seed_everything(999)
    torch.rand(10)
    loader = _loader(ds, seed=77)
    resumed = _model(seed=5, dropout=0.3)
    hist = fit(resumed, loader, val, checkpoint_path=ckpt, resume=True, log=log, **kw)

    for (k, a), b in zip(ref_model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in ref_hist]
    assert len(hist) == 5 and len(log) == 5
    assert [r["epoch"] for r in log.rows()] == [1, 2, 3, 4, 5]
    assert torch.load(ckpt, weights_only=True)["epoch"] == 5

    # resuming a finished run trains nothing and keeps the weights
    again = _model(seed=9, dropout=0.3)
    assert len(fit(again, loader, val, checkpoint_path=ckpt, resume=True, **kw)) == 5
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), ref_model.parameters(), strict=True))


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    ds = _separable(n=32)
    hist = fit(_model(), _loader(ds), epochs=1, checkpoint_path=tmp_path / "c.pt", resume=True, progress=False)
    assert len(hist) == 1 and (tmp_path / "c.pt").exists()


def test_epoch_seeded_sampler_order_depends_on_seed_and_epoch() -> None:
    ds = _separable(n=50)
    s = EpochSeededSampler(ds, seed=1)
    s.set_epoch(0)
    a = list(s)
    s.set_epoch(1)
    b = list(s)
    s.set_epoch(0)
    assert list(s) == a and a != b and sorted(a) == list(range(50)) and len(s) == 50
    assert list(EpochSeededSampler(ds, shuffle=False)) == list(range(50))


def test_evaluate_restores_modes() -> None:
    ds = _separable(n=40)
    model = _model(dropout=0.5)
    model.train()
    model[1].eval()  # a frozen BN stays frozen
    stats = evaluate(model, DataLoader(ds, batch_size=16))
    assert model.training and not model[1].training and model[3].training
    assert stats.samples == 40 and 0.0 <= stats.acc <= 1.0 and math.isfinite(stats.loss)
    model.eval()
    evaluate(model, DataLoader(ds, batch_size=16))
    assert not model.training
    # deterministic in eval mode despite dropout
    assert evaluate(model, DataLoader(ds, batch_size=16)).loss == stats.loss


def test_metrics_helpers() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])
    assert int(count_correct(logits, torch.tensor([0, 1, 1]))) == 2
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy(logits, torch.eye(2)[[0, 1, 0]]) == 1.0  # one-hot targets
    assert accuracy(torch.tensor([1.0, -1.0]), torch.tensor([1, 1])) == 0.5  # binary logits


def test_make_optimizer_param_groups() -> None:
    model = _model()
    opt = make_optimizer(model, name="sgd", lr=0.1, weight_decay=1e-3)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay == {id(model[0].weight), id(model[4].weight)}
    assert id(model[1].weight) in no_decay and id(model[0].bias) in no_decay
    assert opt.param_groups[0]["nesterov"]
    assert len(make_optimizer(model, weight_decay=0.0).param_groups) == 1
    assert isinstance(make_optimizer(model.parameters(), name="adamw", lr=1e-3), torch.optim.AdamW)
    assert isinstance(make_optimizer(model, name="adam"), torch.optim.Adam)
    model[0].weight.requires_grad_(False)
    assert all(p is not model[0].weight for g in make_optimizer(model).param_groups for p in g["params"])
    with pytest.raises(ValueError):
        make_optimizer(model, name="lbfgs")


def test_make_scheduler_shapes() -> None:
    def lrs(name: str, **kw) -> list[float]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sch = make_scheduler(opt, name, **kw)
        out = []
        for _ in range(kw["epochs"]):
            out.append(opt.param_groups[0]["lr"])
            if sch is not None:
                opt.step()
                sch.step()
        return out

    cos = lrs("cosine", epochs=4)
    assert cos[0] == 1.0 and cos == sorted(cos, reverse=True) and cos[2] == pytest.approx(0.5)
    assert lrs("step", epochs=5, step_size=2, gamma=0.1) == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lrs("exp", epochs=3, gamma=0.5) == pytest.approx([1, 0.5, 0.25])
    assert lrs("none", epochs=3) == [1.0, 1.0, 1.0]
    assert lrs("cosine", epochs=6, warmup_epochs=2)[:3] == pytest.approx([0.5, 1.0, 1.0])
    with pytest.raises(ValueError):
        lrs("poly", epochs=3)


def test_runlog_truncate_and_new_columns(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    log.append({"epoch": 1, "loss": 1.0})
    log.append({"epoch": 2, "loss": float("nan"), "rank": 4})
    log.append({"epoch": 3, "loss": 0.5, "rank": 3})
    assert len(log) == 3 and log.rows()[1]["loss"] is None
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == ["", "4", "3"]
    log.truncate(1)
    assert log.rows() == [{"epoch": 1, "loss": 1.0}]
    with open(tmp_path / "log.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1


# --------------------------------------------------------------------------- utils


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_writes_roundtrip_and_keep_old_file_on_error(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "sub" / "ckpt.pt"
    atomic_torch_save({"w": torch.arange(3)}, path)  # creates the parent directory
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    old = path.read_bytes()

    # the writer raises midway (after some bytes were written to the temp file)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"w": torch.ones(1000), "bad": _Unpicklable()}, path)
    assert path.read_bytes() == old and _no_temp_files(path.parent)

    # the final rename fails
    def broken_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(PermissionError, match=r"could not write checkpoint to .*ckpt\.pt.*previous file is unchanged"):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == old and _no_temp_files(path.parent)

    atomic_write_text(tmp_path / "a.txt", "héllo")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(tmp_path / "a.txt", b"\x00\x01")
    assert (tmp_path / "a.txt").read_bytes() == b"\x00\x01"
    assert _no_temp_files(tmp_path)


def test_unwritable_destination_names_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = blocker / "ckpt.pt"  # parent is a regular file
    with pytest.raises(OSError, match=str(target).replace("\\", "\\\\")):
        atomic_torch_save({"a": 1}, target)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_readonly_directory_names_path(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "ckpt.pt").write_bytes(b"old")
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="could not write checkpoint to .*ckpt.pt"):
            atomic_torch_save({"a": 1}, ro / "ckpt.pt")
        assert (ro / "ckpt.pt").read_bytes() == b"old"
    finally:
        ro.chmod(0o700)


def test_rng_state_roundtrip_through_checkpoint(tmp_path: Path) -> None:
    seed_everything(7)
    state = get_rng_state()
    atomic_torch_save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[0] == got[0] and expected[1] == got[1] and torch.equal(expected[2], got[2])


def test_distributed_defaults_and_device() -> None:
    assert world_size() == 1 and rank() == 0 and is_main_process()
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    with pytest.raises(ValueError):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_progress_bar_does_not_break(capsys) -> None:
    ds = _separable(n=32)
    model = _model()
    stats = T.train_one_epoch(model, DataLoader(ds, batch_size=8), make_optimizer(model), progress=True)
    assert stats.samples == 32 and 0 <= stats.acc <= 1
