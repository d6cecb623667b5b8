"""Tests for ltc.train (the one loop ``fit``, its hooks, distillation and its one checkpoint format) and ltc.utils."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ltc import train as T
from ltc.api import anneal_passes
from ltc.train import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    EpochSeededSampler,
    NonFiniteLossError,
    RunLog,
    TrainConfig,
    accuracy,
    count_correct,
    distillation_loss,
    evaluate,
    fit,
    make_optimizer,
    make_scheduler,
    read_checkpoint,
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

    bad = TensorDataset(torch.full((8, 8), float("inf")), torch.zeros(8, dtype=torch.long))
    with pytest.raises(NonFiniteLossError, match="batch 1/1"):
        fit(model, DataLoader(bad, batch_size=8), epochs=1, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"^L step 1 of 1: .*batch 1/1.*No checkpoint was written"):
        fit(model, DataLoader(bad, batch_size=8), epochs=1, progress=False, describe=lambda e: f"L step {e + 1} of 1")


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
    saved = read_checkpoint(ckpt, writer="ltc.fit")
    assert (saved["format"], saved["version"]) == (CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    assert (saved["writer"], saved["stage"], saved["epoch"], saved["epochs"], saved["stopped"]) == (
        "ltc.fit", "train", 2, 5, False)
    assert [h["note"] for h in saved["history"]] == [1, 2] and saved["log_rows"] == 2
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
    assert read_checkpoint(ckpt)["epoch"] == 5

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


def lrs(name: str, n: int | None = None, **kw) -> list[float]:
    """The LR multiplier of ``make_scheduler(name, **kw)`` in each of the first ``n`` (default ``epochs``) epochs."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sch = make_scheduler(opt, name, **kw)
    out = []
    for _ in range(n or kw["epochs"]):
        out.append(opt.param_groups[0]["lr"])
        if sch is not None:
            opt.step()
            sch.step()
    return out


def test_make_scheduler_shapes() -> None:
    cos = lrs("cosine", epochs=4)
    assert cos[0] == 1.0 and cos == sorted(cos, reverse=True) and cos[2] == pytest.approx(0.5)
    assert lrs("step", epochs=5, step_size=2, gamma=0.1) == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lrs("exp", epochs=3, gamma=0.5) == pytest.approx([1, 0.5, 0.25])
    assert lrs("none", epochs=3) == [1.0, 1.0, 1.0]
    assert lrs("cosine", epochs=6, warmup_epochs=2)[:3] == pytest.approx([0.5, 1.0, 1.0])
    # cycle: the schedule restarts every `cycle` epochs (the LC methods' L steps), `epochs` is one cycle
    assert lrs("exp", n=6, epochs=2, gamma=0.5, cycle=2) == pytest.approx([1, 0.5, 1, 0.5, 1, 0.5])
    assert lrs("cosine", n=6, epochs=3, cycle=3) == pytest.approx(lrs("cosine", epochs=3) * 2)
    with pytest.raises(ValueError, match="poly"):
        lrs("poly", epochs=3)
    with pytest.raises(ValueError, match="cycle"):
        lrs("exp", epochs=3, cycle=0)
    with pytest.raises(ValueError, match="hold_epochs .* only goes with schedule='cosine'"):
        lrs("exp", epochs=3, hold_epochs=1)
    with pytest.raises(ValueError, match="warmup_epochs \\+ hold_epochs = 3 leaves none of the 3 epochs to anneal"):
        lrs("cosine", epochs=3, hold_epochs=2, warmup_epochs=1)
    assert lrs("cosine", n=6, epochs=3, hold_epochs=1, cycle=3) == pytest.approx([1, 1, 0.5] * 2)  # per cycle


@given(epochs=st.integers(2, 40), hold=st.integers(0, 39), warmup=st.integers(0, 3))
def test_a_held_cosine_is_the_plain_cosine_shifted_by_the_hold(epochs: int, hold: int, warmup: int) -> None:
    """Warmup, ``hold_epochs`` at the full rate, then exactly the cosine a schedule of the remaining epochs runs."""
    assume(warmup < epochs)
    hold = min(hold, epochs - warmup - 1)
    held = lrs("cosine", epochs=epochs, hold_epochs=hold, warmup_epochs=warmup)
    plain = lrs("cosine", epochs=epochs - hold, warmup_epochs=warmup)
    assert held[warmup:warmup + hold] == [1.0] * hold
    assert held[:warmup] == pytest.approx(plain[:warmup])
    assert held[warmup + hold:] == pytest.approx(plain[warmup:])


@given(passes=st.integers(1, 200), share=st.floats(0.001, 1.0))
def test_the_annealed_passes_are_the_share_asked_for_and_always_anneal(passes: int, share: float):
    """The cosine spans ``share`` of the LC passes (to the nearest pass), all of them with ``share=1``, and at least
    2 so that the last pass runs below ``lr`` whenever there are 2 passes; the passes before it run at ``lr``."""
    k = anneal_passes(passes, share)
    assert 1 <= k <= passes and (k == passes) >= (share == 1.0)
    assert abs(k - share * passes) <= 0.5 or k == min(2, passes)
    factors = lrs("cosine", epochs=passes, hold_epochs=passes - k)
    assert factors[: passes - k + 1] == [1.0] * (passes - k + 1) and (passes == 1 or factors[-1] < 1.0)


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


# --------------------------------------------------------------------------- progress output


def test_progress_writes_one_summary_line_per_epoch_and_nothing_without_it(capsys) -> None:
    ds = _separable(n=48)
    val = DataLoader(ds, batch_size=24)
    hist = fit(_model(), _loader(ds, bs=16), val, epochs=2, opt_cfg={"lr": 0.05}, progress=True, seed=0)
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 2  # tqdm.write: one line per epoch, on stdout
    for line, row in zip(lines, hist, strict=True):
        assert line.startswith(f"epoch {row['epoch']}/2: ")
        assert f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}" in line
        assert f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" in line
    assert "epoch 1/2" in err and "epoch 2/2" in err  # the batch bars (stderr) carry the epoch's name

    # describe names the epochs; without validation there is no val part
    fit(_model(), _loader(ds, bs=16), epochs=1, progress=True, describe=lambda e: f"L step {e + 1}/7")
    out, _ = capsys.readouterr()
    (line,) = [line for line in out.splitlines() if line.strip()]
    assert line.startswith("L step 1/7: ") and "val" not in line

    fit(_model(), _loader(ds, bs=16), val, epochs=2, progress=False)
    assert capsys.readouterr() == ("", "")


# --------------------------------------------------------------------------- distillation


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _logits(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, c, generator=g), 3 * torch.randn(n, c, generator=g), torch.randint(0, c, (n,),
                                                                                                  generator=g)


@given(n=st.integers(1, 6), c=st.integers(2, 7), seed=st.integers(0, 2**16),
       weight=st.floats(0.0, 1.0), temperature=st.floats(0.25, 8.0))
def test_distillation_loss_is_the_formula(n: int, c: int, seed: int, weight: float, temperature: float) -> None:
    s, t, y = _logits(n, c, seed)
    s64, t64, y64 = s.double().numpy(), t.double().numpy(), y.numpy()
    ce = -_log_softmax(s64)[np.arange(n), y64].mean()
    log_pt, log_ps = _log_softmax(t64 / temperature), _log_softmax(s64 / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum() / n  # KL(p_t || p_s), batchmean
    expected = (1 - weight) * ce + weight * temperature**2 * kl
    got = distillation_loss(s, t, y, weight=weight, temperature=temperature)
    assert got.ndim == 0
    assert float(got) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_distillation_weight_zero_is_plain_cross_entropy_and_label_smoothing_reaches_it() -> None:
    s, t, y = _logits(5, 4, 0)
    nan_teacher = torch.full_like(t, float("nan"))  # weight 0: the teacher does not enter at all
    assert torch.equal(distillation_loss(s, nan_teacher, y, weight=0.0, temperature=3.0), F.cross_entropy(s, y))
    ls = 0.1
    log_p = _log_softmax(s.double().numpy())
    ce_ls = -((1 - ls) * log_p[np.arange(5), y.numpy()] + ls * log_p.mean(axis=1)).mean()
    got = distillation_loss(s, t, y, weight=0.0, temperature=3.0, label_smoothing=ls)
    assert float(got) == pytest.approx(ce_ls, rel=1e-6)
    # weight 1: only the teacher counts, the labels do not
    a = distillation_loss(s, t, y, weight=1.0, temperature=2.0)
    b = distillation_loss(s, t, (y + 1) % 4, weight=1.0, temperature=2.0)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_fit_distils_from_an_eval_mode_teacher_and_kd_weight_zero_is_no_teacher() -> None:
    ds = _separable(n=64)
    teacher = _model(seed=1)
    teacher.train()
    plain, zero, kd = _model(), _model(), _model()
    kw = dict(epochs=2, opt_cfg={"lr": 0.05}, progress=False, seed=0)
    h_plain = fit(plain, _loader(ds, bs=16), **kw)
    h_zero = fit(zero, _loader(ds, bs=16), teacher=teacher, kd_weight=0.0, **kw)
    fit(kd, _loader(ds, bs=16), teacher=teacher, kd_weight=0.5, kd_temperature=2.0, **kw)
    for (k, a), b in zip(plain.state_dict().items(), zero.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert [h["train_loss"] for h in h_plain] == [h["train_loss"] for h in h_zero]
    assert any(not torch.equal(a, c) for a, c in zip(plain.parameters(), kd.parameters(), strict=True))

    # the reported loss of a distilled epoch is distillation_loss against the teacher's eval-mode logits
    x, y = ds.tensors
    student = _model(seed=2)
    with torch.no_grad():
        expected = distillation_loss(student.train()(x), teacher.eval()(x), y, weight=0.3, temperature=2.5)
    teacher.train()
    stats = train_one_epoch(student, DataLoader(ds, batch_size=len(ds)), make_optimizer(student, lr=0.0),
                            teacher=teacher, kd_weight=0.3, kd_temperature=2.5, progress=False)
    assert stats.loss == pytest.approx(float(expected), rel=1e-6)
    assert all(not p.requires_grad or p.grad is None for p in teacher.parameters())  # no gradients into it


# --------------------------------------------------------------------------- hooks and the checkpoint


def test_on_epoch_end_merges_fields_and_stop_ends_the_run_also_on_resume(tmp_path: Path, monkeypatch) -> None:
    ds = _separable(n=48)
    ckpt = tmp_path / "ckpt.pt"
    seen: list[int] = []

    def stop_at_2(epoch: int, row: dict) -> dict:
        seen.append(epoch)
        assert row["epoch"] == epoch and math.isfinite(row["train_loss"])
        return {"note": 10 * epoch, "stop": epoch == 2}

    model = _model()
    hist = fit(model, _loader(ds), epochs=5, checkpoint_path=ckpt, on_epoch_end=stop_at_2, progress=False, seed=0)
    assert seen == [1, 2] and [h["epoch"] for h in hist] == [1, 2] and [h["note"] for h in hist] == [10, 20]
    assert all("stop" not in h for h in hist)
    saved = read_checkpoint(ckpt)
    assert saved["stopped"] is True and (saved["epoch"], saved["epochs"]) == (2, 5)

    # a resumed run stops where the first one did: no epoch is trained, the weights are the stopped run's
    def no_training(*args, **kwargs):
        raise AssertionError("a stopped run trained again on resume")

    monkeypatch.setattr(T, "train_one_epoch", no_training)
    again = _model(seed=4)
    resumed = fit(again, _loader(ds), epochs=5, checkpoint_path=ckpt, resume=True, progress=False, seed=0,
                  on_epoch_end=lambda e, r: {"stop": False})
    assert resumed == hist
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    monkeypatch.undo()

    # {"stop": False} (or no dict at all) keeps going
    assert len(fit(_model(), _loader(ds), epochs=3, progress=False, on_epoch_end=lambda e, r: {"stop": False})) == 3
    assert len(fit(_model(), _loader(ds), epochs=3, progress=False, on_epoch_end=lambda e, r: None)) == 3


def test_extra_state_round_trips_through_the_checkpoint(tmp_path: Path) -> None:
    ds = _separable(n=48)
    ckpt = tmp_path / "ckpt.pt"
    state = {"count": 0}

    class Interrupt(Exception):
        pass

    def get() -> dict:
        c = state["count"]
        return {"count": c, "t": torch.arange(3) * c, "nested": {"names": ["a", "b"][: c % 3], "x": c / 4}}

    restored: list[dict] = []

    def put(extra: dict) -> None:
        restored.append(extra)
        state["count"] = extra["count"]

    crash = [True]

    def count(epoch: int, row: dict) -> None:
        if epoch == 3 and crash[0]:
            raise Interrupt  # before epoch 3 is checkpointed
        state["count"] += 1

    with pytest.raises(Interrupt):
        fit(_model(), _loader(ds), epochs=4, checkpoint_path=ckpt, extra_state=(get, put), on_epoch_end=count,
            progress=False, seed=0)
    stored = read_checkpoint(ckpt)["extra"]
    assert stored["count"] == 2 and torch.equal(stored["t"], torch.tensor([0, 2, 4]))
    assert stored["nested"] == {"names": ["a", "b"], "x": 0.5}

    state["count"], crash[0] = 0, False  # a fresh process: only the checkpoint knows the count
    fit(_model(), _loader(ds), epochs=4, checkpoint_path=ckpt, resume=True, extra_state=(get, put),
        on_epoch_end=count, progress=False, seed=0)
    (got,) = restored  # set() runs once, on resume, with what get() stored
    assert got["count"] == 2 and torch.equal(got["t"], stored["t"]) and got["nested"] == stored["nested"]
    assert read_checkpoint(ckpt)["extra"]["count"] == 4  # epochs 3 and 4 counted on from the restored state


def test_read_checkpoint_refuses_other_writers_formats_and_versions(tmp_path: Path) -> None:
    ds = _separable(n=32)
    path = tmp_path / "ckpt.pt"
    fit(_model(), _loader(ds), epochs=1, checkpoint_path=path, writer="ltc.fit", progress=False)
    assert read_checkpoint(path)["writer"] == "ltc.fit"
    assert read_checkpoint(path, writer="ltc.fit")["epoch"] == 1
    with pytest.raises(ValueError) as info:
        read_checkpoint(path, writer="ltc.compress")
    msg = str(info.value)
    assert str(path) in msg
    assert re.search(r"written by ltc train / ltc\.train\.fit, not by ltc compress / ltc\.compress", msg), msg
    # fit itself refuses another writer's checkpoint on resume, before touching the model
    model = _model(seed=3)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="written by ltc train / ltc.train.fit, not by ltc finetune"):
        fit(model, _loader(ds), epochs=1, checkpoint_path=path, resume=True, writer="ltc.finetune", progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    plain = tmp_path / "plain.pt"
    torch.save({"model": {}}, plain)
    with pytest.raises(ValueError, match=r"not an ltc checkpoint \(it holds a plain dict\)"):
        read_checkpoint(plain)
    other = tmp_path / "v99.pt"
    torch.save({**torch.load(path, weights_only=True), "version": 99}, other)
    with pytest.raises(ValueError, match=r"checkpoint version 99.*reads version 1"):
        read_checkpoint(other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot be read"):
        read_checkpoint(junk)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pt")


def test_resume_refuses_another_stage_or_epoch_count(tmp_path: Path) -> None:
    ds = _separable(n=32)
    path = tmp_path / "ckpt.pt"
    fit(_model(), _loader(ds), epochs=2, checkpoint_path=path, stage="lc", progress=False)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path} holds stage 'lc' of its run, not 'finetune'")):
        fit(_model(), _loader(ds), epochs=2, checkpoint_path=path, resume=True, stage="finetune", progress=False)
    with pytest.raises(ValueError, match="belongs to a run of 2 epochs, not 3"):
        fit(_model(), _loader(ds), epochs=3, checkpoint_path=path, resume=True, stage="lc", progress=False)
    assert len(fit(_model(), _loader(ds), epochs=2, checkpoint_path=path, resume=True, stage="lc",
                   progress=False)) == 2


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"lr": 0}, "lr must be a finite number > 0, got 0"),
        ({"epochs": -1}, "epochs must be an int >= 0, got -1"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of 'sgd', 'adam', 'adamw', got 'lbfgs'"),
        ({"momentum": 1.0}, "momentum must lie in [0, 1), got 1.0"),
        ({"grad_clip": 0.0}, "grad_clip must be a finite number > 0, got 0.0"),
    ],
)
def test_train_config_rejects_bad_values(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**kw)


def test_train_config_drives_fit_like_the_same_explicit_arguments() -> None:
    ds = _separable(n=48)
    cfg = TrainConfig(epochs=2, lr=0.05, weight_decay=1e-3, warmup_epochs=1, schedule="cosine")
    a, b = _model(), _model()
    fit(a, _loader(ds), epochs=cfg.epochs, opt_cfg=cfg.optimizer_kwargs(), sched_cfg=cfg.scheduler_kwargs(),
        progress=False, seed=0)
    fit(b, _loader(ds), epochs=2, opt_cfg={"name": "sgd", "lr": 0.05, "weight_decay": 1e-3},
        sched_cfg={"name": "cosine", "warmup_epochs": 1}, progress=False, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert TrainConfig(schedule="none").scheduler_kwargs() is None


# --------------------------------------------------------------------------- DDP inside fit

WORLD = 2


def _ddp_worker(rank: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        ds = _separable(n=64)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))  # no BatchNorm: batch-size exact
        shard = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, WORLD, rank, shuffle=False))
        hist = fit(model, shard, epochs=2, opt_cfg={"lr": 0.1}, progress=False,
                   checkpoint_path=Path(out_dir, f"ckpt{rank}.pt"))
        # BatchNorm on rank-dependent data: after fit every process holds rank 0's running statistics
        bn_model = _model(seed=1)
        bn_data = _separable(n=32, seed=10 + rank)
        fit(bn_model, DataLoader(bn_data, batch_size=8), epochs=1, opt_cfg={"lr": 0.1}, progress=False)
        torch.save({"state": model.state_dict(), "hist": hist, "bn": bn_model[1].state_dict()},
                   Path(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither process tears the group down while the other may still be in a collective
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_fit_trains_under_ddp_by_itself(tmp_path: Path, monkeypatch) -> None:
    """Two processes, each fitting a plain model on its half of every batch, train the model one process trains
    on whole batches (DDP averages the gradients); only rank 0 writes a checkpoint, without DDP's prefix."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=WORLD, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    ref_hist = fit(ref, DataLoader(_separable(n=64), batch_size=16), epochs=2, opt_cfg={"lr": 0.1}, progress=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(runs[0]["state"][k], runs[1]["state"][k]), k  # the processes agree exactly
        torch.testing.assert_close(runs[0]["state"][k], v, rtol=1e-5, atol=1e-6)
    for h, r in zip(runs[0]["hist"], ref_hist, strict=True):  # losses are summed over the processes
        assert h["train_loss"] == pytest.approx(r["train_loss"], rel=1e-5)
        assert h["train_acc"] == pytest.approx(r["train_acc"])
    for k in runs[0]["bn"]:
        assert torch.equal(runs[0]["bn"][k], runs[1]["bn"][k]), k

    assert not (tmp_path / "ckpt1.pt").exists()  # only the main process writes
    saved = read_checkpoint(tmp_path / "ckpt0.pt")
    assert list(saved["model"]) == list(ref.state_dict())  # no "module." prefix
    assert all(torch.equal(saved["model"][k], runs[0]["state"][k]) for k in saved["model"])
