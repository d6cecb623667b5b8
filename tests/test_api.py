"""Tests for ``ltc.compress`` (``ltc.api``): end to end for every low-rank method on a tiny synthetic dataset, the
explicit epoch budget (``CompressConfig.plan()`` and what a run spends), BatchNorm re-estimation after deployment,
bit-identical resume after an interruption inside a phase, and early errors.

(Resuming across the LC -> fine-tuning boundary is covered in tests/test_reliability.py.)"""

from __future__ import annotations

import copy
import json
import logging
import math
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ltc
import ltc.api
import ltc.cli
import ltc.train
from ltc import models
from ltc.api import CHECKPOINT_NAME, CompressConfig, EpochPlan, Result, compress
from ltc.batchnorm import recalibrate_batchnorm
from ltc.engine import LCEngine
from ltc.layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d
from ltc.methods import get_method
from ltc.train import evaluate, fit, read_checkpoint


# --------------------------------------------------------------------------------------------- data, model
def make_data(n: int = 64, seed: int = 0) -> TensorDataset:
    """Four classes of 1x16x16 images: a class prototype (the same for every split) plus noise."""
    proto = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    return TensorDataset(proto[y] + 0.5 * torch.randn(n, 1, 16, 16, generator=g), y)


TRAIN = make_data(64, 0)
VAL = make_data(32, 1)
X1 = TRAIN.tensors[0][:1]


def loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(TRAIN, batch_size=16, shuffle=True), DataLoader(VAL, batch_size=32)


def base_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.create("small_cnn", num_classes=4, in_channels=1, width=0.25)


@pytest.fixture(scope="module")
def trained_base() -> nn.Module:
    """A base network trained a little, so that its BatchNorm statistics mean something."""
    model = base_model()
    fit(model, DataLoader(TRAIN, batch_size=16, shuffle=True, generator=torch.Generator()), epochs=3,
        opt_cfg={"lr": 0.05}, progress=False, seed=0)
    return model.eval()


class Interrupt(Exception):
    """Stands in for a crash / Ctrl-C in the middle of a run."""


def counting(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Wrap the epoch of the one training loop (``ltc.train.train_one_epoch``, which ``fit`` calls): count the
    calls; raise :class:`Interrupt` on call ``fail_after + 1``."""
    real = ltc.train.train_one_epoch
    calls = [0]

    def wrapped(*args, **kwargs):
        if fail_after is not None and calls[0] >= fail_after:
            raise Interrupt
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ltc.train, "train_one_epoch", wrapped)
    return calls


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
            for k, v in m.state_dict().items() if k in ("running_mean", "running_var")}


def jr(r):
    return list(r) if isinstance(r, tuple) else r


# --------------------------------------------------------------------------------------------- end to end
STEPS, EPS, FT = 2, 1, 1


@pytest.mark.parametrize(
    "method, kw",
    [
        ("ltc", {"target_sr": 2.0}),
        ("ltc", {"lam": 0.3, "cost": "params", "compress_linear": True, "mu_growth": 1.25}),  # λ mode: fixed μ path
        ("lrc", {"target_sr": 2.0}),
        ("oneshot", {"target_sr": 3.0}),
        ("vbmf", {"method_options": {"weaken": 0.5}}),
        ("uniform", {"method_options": {"fraction": 0.4}}),
    ],
)
def test_compress_end_to_end(method, kw, monkeypatch):
    model = base_model()
    before = copy.deepcopy(model)
    train, val = loaders()
    calls = counting(monkeypatch)
    res = compress(model, train, val_loader=val, method=method, steps=STEPS, epochs_per_step=EPS,
                   finetune_epochs=FT, skip_converged=False, progress=False, seed=3, **kw)
    assert isinstance(res, Result) and res.method == method

    # the input model is untouched
    assert_same_state(model, before)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]

    # profiles: base is the input model, compressed is the returned model
    base, comp = ltc.profile(model, X1), ltc.profile(res.model, X1)
    assert (res.base.macs, res.base.params) == (base.macs, base.params)
    assert (res.compressed.macs, res.compressed.params) == (comp.macs, comp.params)
    if "target_sr" in kw:
        assert res.sr >= kw["target_sr"]
    assert res.compressed.macs < res.base.macs

    # ranks are the modules of the returned model
    mods = dict(res.model.named_modules())
    convs = {"features.0", "features.3", "features.7", "features.10"}
    assert set(res.ranks) == (convs | {"classifier"} if kw.get("compress_linear") else convs)
    assert set(res.full_ranks) == set(res.ranks)
    for name, r in res.ranks.items():
        m, orig = mods[name], dict(model.named_modules())[name]
        if isinstance(orig, nn.Linear):
            assert res.full_ranks[name] == 4
            assert (type(m) is nn.Linear) if r is None else (isinstance(m, LowRankLinear) and m.rank == r)
            continue
        s, t, kh, kw_ = orig.weight.shape[1], orig.weight.shape[0], *orig.kernel_size
        if r is None:
            assert type(m) is nn.Conv2d
        elif isinstance(r, tuple):
            assert method != "lrc"
            assert isinstance(m, Tucker2Conv2d) and m.ranks == r
            assert res.full_ranks[name] == (s, t)
            assert 1 <= r[0] <= s and 1 <= r[1] <= t
        else:
            assert isinstance(m, MatrixLowRankConv2d) and m.rank == r
            assert res.full_ranks[name] == min(t, s * kh * kw_)
        if method == "uniform":
            assert r == (math.ceil(0.4 * s), math.ceil(0.4 * t))
    if method == "lrc":
        assert all(r is None or isinstance(r, int) for r in res.ranks.values())
    if not kw.get("compress_linear"):
        assert type(mods["classifier"]) is nn.Linear

    # the epoch budget: LC steps for the learning methods, then fine-tuning; nothing silently added
    learns = method in ("ltc", "lrc")
    lc = STEPS * EPS if learns else 0
    assert res.plan == {"lc_steps": STEPS if learns else 0, "epochs_per_step": EPS, "lc_epochs": lc,
                        "finetune": FT, "total": lc + FT}
    assert len(res.log) == calls[0] == res.plan["total"]
    assert [row.get("phase") for row in res.log[:lc]] == ["lc"] * lc
    assert all(row.get("phase") != "lc" for row in res.log[lc:])
    if learns:
        assert len(res.history) == STEPS + 1  # the first C step at start(), then one per LC step
        assert [row["step"] for row in res.log[:lc]] == [h["step"] for h in res.history[1:]]
        assert res.history[-1]["ranks"] == {n: jr(r) for n, r in res.ranks.items()}
        assert res.history[-1]["macs"] == res.compressed.macs

    # accuracies are fractions; the record is JSON; the summary is the slides' table
    for acc in (res.base_acc, res.acc_before_finetune, res.acc):
        assert acc is not None and 0.0 <= acc <= 1.0
    assert res.acc == pytest.approx(evaluate(res.model, val).acc)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["method"] == method and d["sr"] == res.sr and d["compressed"]["macs"] == res.compressed.macs
    assert d["ranks"] == {n: jr(r) for n, r in res.ranks.items()}
    assert d["plan"] == res.plan
    assert d["config"]["method"] == method and d["config"]["steps"] == STEPS
    summary = res.summary()
    assert "| model | MACs | SR | params | CR | acc (%) |" in summary
    assert f"| {method} |" in summary and f"{res.sr:.2f}" in summary


def test_compress_config_object_and_overrides(monkeypatch):
    train, _ = loaders()
    calls = counting(monkeypatch)
    cfg = CompressConfig(method="uniform", epochs=3)
    res = compress(base_model(), train, config=cfg, epochs=1, progress=False, example_input=X1)
    assert res.config["epochs"] == 1 and cfg.epochs == 3  # kwargs override, the config object is not changed
    assert calls[0] == len(res.log) == 1
    assert res.base_acc is None and res.acc is None and res.acc_before_finetune is None  # no val_loader


# --------------------------------------------------------------------------------------------- epoch budget
DEFAULT_EPS = CompressConfig.default("epochs_per_step")  # the default L step, in epochs


@pytest.mark.parametrize(
    "kw, plan",
    [
        ({"method": "oneshot", "target_sr": 2, "epochs": 10}, EpochPlan(0, DEFAULT_EPS, 10)),
        ({"method": "uniform", "steps": 4, "epochs": 7}, EpochPlan(0, DEFAULT_EPS, 7)),  # steps mean nothing to it
        ({"method": "ltc", "target_sr": 2, "steps": 4, "epochs_per_step": 1, "epochs": 10}, EpochPlan(4, 1, 6)),
        ({"method": "lrc", "target_sr": 2, "steps": 3, "epochs_per_step": 2, "epochs": 6}, EpochPlan(3, 2, 0)),
        ({"method": "ltc", "target_sr": 2, "steps": 4, "epochs_per_step": 1, "epochs": 10, "finetune_epochs": 6},
         EpochPlan(4, 1, 6)),
        ({"method": "ltc", "target_sr": 2, "steps": 4, "epochs_per_step": 1, "finetune_epochs": 2},
         EpochPlan(4, 1, 2)),
        ({"method": "ltc", "target_sr": 2, "epochs": 15}, EpochPlan(25, 0.2, 10)),  # the defaults: 25 x 0.2 + 10
        ({"method": "ltc", "target_sr": 2, "steps": 4, "epochs": 10}, EpochPlan(4, 0.2, 9)),  # 0.8 epoch counts 1
        ({"method": "vbmf"}, EpochPlan(0, DEFAULT_EPS, 5)),  # neither given: 5 fine-tuning epochs
    ],
)
def test_the_epoch_budget_is_explicit(kw, plan):
    got = CompressConfig(**kw).plan()
    assert got == plan
    if "epochs" in kw:  # the budget counts a fraction of an epoch of L steps as a whole one
        assert ltc.api.whole(got.lc_epochs) + got.finetune == kw["epochs"]


def test_inconsistent_epoch_budgets_are_refused():
    with pytest.raises(ValueError) as info:
        CompressConfig(method="ltc", target_sr=2, steps=4, epochs=10, finetune_epochs=5)
    assert "finetune_epochs=5" in str(info.value) and "epochs=10" in str(info.value)
    with pytest.raises(ValueError) as info:
        CompressConfig(method="oneshot", target_sr=2, epochs=10, finetune_epochs=3)
    assert "finetune_epochs=3" in str(info.value) and "epochs=10" in str(info.value)
    with pytest.raises(ValueError, match=re.escape("epochs=6 is less than the LC steps' 8 (steps=4 x "
                                                   "epochs_per_step=2)")):
        CompressConfig(method="ltc", target_sr=2, steps=4, epochs_per_step=2, epochs=6)


@pytest.mark.parametrize("method", ["vbmf", "uniform"])
def test_lam_for_an_assignment_method_is_refused_with_the_clis_message(method, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError) as info:
        CompressConfig(method=method, lam=0.1)
    msg = str(info.value)
    assert msg.startswith(f"method {method!r} picks its ranks without λ; drop lam")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert ltc.cli.main(["compress", "--method", method, "--lam", "0.1"]) == 2
    assert capsys.readouterr().err.strip() == f"ltc: error: compress: {msg}"


@pytest.mark.parametrize(
    "method, kw",
    [
        ("uniform", {"epochs": 3}),
        ("oneshot", {"target_sr": 2.0, "epochs": 2}),
        ("ltc", {"target_sr": 2.0, "steps": 2, "epochs_per_step": 1, "epochs": 3, "skip_converged": False}),
    ],
)
def test_compress_spends_exactly_the_planned_epochs(method, kw, monkeypatch):
    train, val = loaders()
    calls = counting(monkeypatch)
    res = compress(base_model(), train, val_loader=val, method=method, progress=False, **kw)
    plan = CompressConfig(method=method, **kw).plan()
    assert res.plan == {"lc_steps": plan.lc_steps, "epochs_per_step": plan.epochs_per_step,
                        "lc_epochs": plan.lc_epochs, "finetune": plan.finetune, "total": plan.total}
    assert len(res.log) == calls[0] == res.plan["total"] == kw["epochs"]
    assert sum(row.get("phase") == "lc" for row in res.log) == plan.lc_epochs


def test_converged_lc_steps_hand_their_epochs_to_fine_tuning(monkeypatch):
    train, _ = loaders()
    calls = counting(monkeypatch)
    # tol huge: converged as soon as a C step changes no rank
    res = compress(base_model(), train, method="ltc", target_sr=2.0, steps=4, epochs_per_step=1, epochs=5, tol=1e9,
                   progress=False)
    assert res.plan["lc_epochs"] < 4  # stopped early
    assert res.plan["finetune"] == 5 - res.plan["lc_epochs"] and res.plan["total"] == 5
    assert len(res.log) == calls[0] == 5
    assert sum(row.get("phase") == "lc" for row in res.log) == res.plan["lc_epochs"]


@pytest.mark.parametrize("target, steps", [(4.0, 3), (2.5, 2)])
def test_a_gradual_target_compresses_a_step_at_a_time_and_ends_at_the_target(target, steps):
    train, _ = loaders()
    res = compress(base_model(), train, method="ltc", target_sr=target, steps=steps, epochs=steps + 1,
                   target_schedule="gradual", skip_converged=False, progress=False)
    # history: start() checks the final target is reachable, then C steps 0..steps aim at the schedule's stages
    first, *stages = res.history
    assert first["target"] == target and first["sr"] >= target
    aims = [h["target"] for h in stages]
    assert len(aims) == steps + 1 and aims[-2:] == [target, target]
    assert all(a < b for a, b in zip(aims[:-2], aims[1:-1], strict=True))  # strictly rising to the target
    assert aims[0] == pytest.approx(target ** (1 / steps))
    for h in stages:
        assert h["target"] <= h["sr"] <= 1.1 * h["target"]  # every stage's C step meets its own budget
    assert [row["target"] for row in res.log if row["phase"] == "lc"] == aims[1:]
    assert res.sr == stages[-1]["sr"] >= target
    fixed = compress(base_model(), train, method="ltc", target_sr=target, steps=steps, epochs=steps + 1,
                     skip_converged=False, progress=False)
    assert {h["target"] for h in fixed.history} == {target}  # the SPEC's schedule aims at the target throughout


@pytest.mark.parametrize("fraction, steps, epochs", [(0.5, 3, 4), (0.25, 4, 3), (0.3, 2, 2)])
def test_an_l_step_of_a_fraction_of_an_epoch_trains_on_the_first_batches_of_a_fresh_order(fraction, steps, epochs,
                                                                                          monkeypatch):
    loader = DataLoader(TRAIN, batch_size=8, sampler=ltc.train.EpochSeededSampler(TRAIN, seed=3))  # 8 batches
    seen: list[list[int]] = []
    real = ltc.train.train_one_epoch

    def spy(model, loader, *args, **kwargs):  # the labels of each batch, per pass
        seen.append([int(y.sum()) for _x, y in loader])
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(ltc.train, "train_one_epoch", spy)
    res = compress(base_model(), loader, method="ltc", target_sr=2.0, steps=steps, epochs=epochs,
                   epochs_per_step=fraction, skip_converged=False, progress=False)
    k = math.ceil(fraction * 8)
    lc_passes = math.ceil(steps * fraction)  # whole epochs the budget counts for the L steps
    assert res.plan == {"lc_steps": steps, "epochs_per_step": fraction, "lc_epochs": steps * fraction,
                        "finetune": epochs - lc_passes, "total": steps * fraction + epochs - lc_passes}
    assert [len(b) for b in seen] == [k] * steps + [8] * (epochs - lc_passes)
    assert [row["phase"] for row in res.log] == ["lc"] * steps + ["finetune"] * (epochs - lc_passes)
    assert [h["step"] for h in res.history] == list(range(steps + 1))  # a C step after every L step
    for e in range(steps):  # L step e: the first k batches of data epoch e's order, as fit seeds it
        ltc.train.prepare_loader_epoch(loader, e, None)
        assert seen[e] == [int(y.sum()) for _x, y in loader][:k]


def test_first_batches_forwards_the_loaders_attributes_and_copies():
    loader = DataLoader(TRAIN, batch_size=8, sampler=ltc.train.EpochSeededSampler(TRAIN, seed=3))
    part = ltc.api.FirstBatches(loader, 0.3)
    assert len(part) == 3 and part.sampler is loader.sampler and part.batch_size == 8
    twin = copy.deepcopy(part)  # an uninitialised copy must not look its attributes up in a loader it lacks yet
    assert len(twin) == 3 and [y.tolist() for _x, y in twin] == [y.tolist() for _x, y in part]
    with pytest.raises(AttributeError):
        part.no_such_attribute  # noqa: B018
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\], got 1.5"):
        ltc.api.FirstBatches(loader, 1.5)


# --------------------------------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("batches", [None, 1])
def test_batchnorm_is_reestimated_after_deployment(trained_base, batches):
    train, val = loaders()
    calib = DataLoader(TRAIN, batch_size=16)
    kw = dict(method="uniform", method_options={"fraction": 0.3}, finetune_epochs=0, bn_batches=batches,
              calibration_loader=calib, val_loader=val, progress=False)
    on = compress(trained_base, train, recalibrate_bn=True, **kw)
    off = compress(trained_base, train, recalibrate_bn=False, **kw)

    # the same deployment, built here independently, then re-estimated by hand
    cfg = CompressConfig(method="uniform", method_options={"fraction": 0.3})
    engine = get_method("uniform").build(copy.deepcopy(trained_base), X1, calibration=calib, **cfg.engine_kwargs())
    engine.start()
    plain = engine.compressed_model()
    fresh = recalibrate_batchnorm(copy.deepcopy(plain), calib, batches)

    want_on, want_off, got_on, got_off = bn_buffers(fresh), bn_buffers(plain), bn_buffers(on.model), \
        bn_buffers(off.model)
    assert want_on and list(got_on) == list(want_on) and list(got_off) == list(want_off)
    for k in want_on:
        torch.testing.assert_close(got_on[k], want_on[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(got_off[k], want_off[k]), k  # recalibrate_bn=False keeps the dense statistics
    assert any(not torch.equal(want_on[k], want_off[k]) for k in want_on)
    assert on.acc_before_finetune == evaluate(fresh, val).acc
    assert off.acc_before_finetune == evaluate(plain, val).acc
    assert on.acc_before_finetune != off.acc_before_finetune
    assert (on.acc, off.acc) == (on.acc_before_finetune, off.acc_before_finetune)  # no fine-tuning epoch


def test_batchnorm_can_be_reestimated_on_the_training_batches(trained_base):
    """``bn_data='train'`` takes the statistics from the training loader (as augmented for training), ``'calibration'``
    from the calibration images; either equals re-estimating the same deployment by hand on that loader."""
    _, val = loaders()
    train = DataLoader(TRAIN, batch_size=16)  # unshuffled, so that the reference sees the same batches
    calib = DataLoader(TensorDataset(2 * TRAIN.tensors[0] + 1, TRAIN.tensors[1]), batch_size=16)  # other statistics
    kw = dict(method="uniform", method_options={"fraction": 0.3}, finetune_epochs=0, calibration_loader=calib,
              val_loader=val, progress=False)
    got = {d: bn_buffers(compress(trained_base, train, bn_data=d, **kw).model) for d in ("train", "calibration")}
    cfg = CompressConfig(method="uniform", method_options={"fraction": 0.3})
    engine = get_method("uniform").build(copy.deepcopy(trained_base), X1, calibration=calib, **cfg.engine_kwargs())
    engine.start()
    plain = engine.compressed_model()
    for d, loader in (("train", train), ("calibration", calib)):
        want = bn_buffers(recalibrate_batchnorm(copy.deepcopy(plain), loader))
        assert want and list(got[d]) == list(want)
        for k in want:
            torch.testing.assert_close(got[d][k], want[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(got["train"][k], got["calibration"][k]) for k in got["train"])
    with pytest.raises(ValueError, match=r"bn_data.*'calibration'.*'train'"):
        CompressConfig(target_sr=2.0, bn_data="val")


# --------------------------------------------------------------------------------------------- resume
RESUME_KW = dict(steps=2, epochs_per_step=1, finetune_epochs=2, skip_converged=False, seed=7, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Uninterrupted reference runs (with a checkpoint dir too, as a resumed run has one)."""
    out = {}
    for method, kw in (("ltc", {"target_sr": 2.0}), ("uniform", {}), ("ltc", GRADUAL), ("ltc", FRACTION),
                       ("ltc", COSINE), ("ltc", PROXIMAL), ("ltc", LATE)):
        train, val = loaders()
        out[run_key(method, kw)] = compress(base_model(), train, val_loader=val, method=method,
                                            checkpoint_dir=tmp_path_factory.mktemp("ref"), **{**RESUME_KW, **kw})
    return out


GRADUAL = {"target_sr": 2.0, "target_schedule": "gradual"}
FRACTION = {"target_sr": 2.0, "epochs_per_step": 0.5, "finetune_epochs": 1}
COSINE = {"target_sr": 2.0, "steps": 3, "finetune_epochs": 1, "lr_schedule": "cosine",
          "lr_anneal": 1.0}  # the penalty follows the lr
PROXIMAL = {**COSINE, "penalty_step": "proximal"}
LATE = {**COSINE, "steps": 4, "lr_anneal": 0.5, "penalty_step": "late-proximal"}  # gradient, gradient, proximal x2


def run_key(method: str, kw: dict) -> str:
    return method + "".join(f"-{k}={v}" for k, v in sorted(kw.items()))


@pytest.mark.parametrize(
    "method, kw, fail_after, stage, epoch",
    [
        ("ltc", {"target_sr": 2.0}, 1, "lc", 1),  # dies in the 2nd L step
        ("ltc", {"target_sr": 2.0}, 3, "finetune", 1),  # dies in the 2nd fine-tuning epoch
        ("uniform", {}, 1, "finetune", 1),  # a one-shot method, in its 2nd fine-tuning epoch
        ("ltc", GRADUAL, 1, "lc", 1),  # between two stages of the budget
        ("ltc", FRACTION, 1, "lc", 1),  # between two L steps of half an epoch
        ("ltc", COSINE, 1, "lc", 1),  # the penalty's lr scale travels in the checkpoint
        ("ltc", PROXIMAL, 2, "lc", 2),  # the proximal penalty step
        ("ltc", LATE, 3, "lc", 3),  # late-proximal, interrupted after it switched to the proximal step
        ("ltc", LATE, 1, "lc", 1),  # and before
    ],
)
def test_resume_inside_a_phase_is_bit_identical(uninterrupted, tmp_path, monkeypatch, method, kw, fail_after,
                                                stage, epoch):
    ref = uninterrupted[run_key(method, kw)]
    train, val = loaders()
    counting(monkeypatch, fail_after=fail_after)
    with pytest.raises(Interrupt):
        compress(base_model(), train, val_loader=val, method=method, checkpoint_dir=tmp_path, **{**RESUME_KW, **kw})
    ckpt = read_checkpoint(tmp_path / CHECKPOINT_NAME, writer="ltc.compress")
    assert (ckpt["stage"], ckpt["epoch"]) == (stage, epoch)
    monkeypatch.undo()

    calls = counting(monkeypatch)
    train, val = loaders()  # a fresh process would build fresh loaders
    res = compress(base_model(), train, val_loader=val, method=method, checkpoint_dir=tmp_path, resume=True,
                   **{**RESUME_KW, **kw})
    assert calls[0] == len(ref.log) - fail_after  # nothing done twice (a log row per pass)
    assert res.ranks == ref.ranks and res.plan == ref.plan
    assert_same_state(res.model, ref.model)
    assert [type(m) for m in res.model.modules()] == [type(m) for m in ref.model.modules()]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in res.log]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in ref.log]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in res.history] == [
        {k: v for k, v in h.items() if k != "seconds"} for h in ref.history]
    assert (res.acc, res.acc_before_finetune, res.base_acc) == (ref.acc, ref.acc_before_finetune, ref.base_acc)
    assert (res.compressed.macs, res.compressed.params) == (ref.compressed.macs, ref.compressed.params)


def test_a_cosine_lr_schedule_scales_each_l_steps_penalty(uninterrupted):
    """With ``lr_schedule='cosine'`` over 3 L steps the passes run at 1, 0.75 and 0.25 of ``lr``; each C step
    records the scale its L step's penalty ran at (``ρ_k / lr_scale``), the first C step (before training) 1."""
    ref = uninterrupted[run_key("ltc", COSINE)]
    assert [h["lr_scale"] for h in ref.history] == pytest.approx([1.0, 1.0, 0.75, 0.25])
    assert [row["lr"] for row in ref.log if row["phase"] == "lc"] == pytest.approx([0.01, 0.0075, 0.0025])


def test_the_proximal_penalty_step_runs_after_every_optimizer_step_at_the_effective_rate(monkeypatch):
    """``penalty_step='proximal'``: the L steps add no penalty to the loss and call ``proximal_step`` once per batch
    with ``lr / (1 − momentum)`` at the pass's rate (a cosine over 3 passes: 1, 0.75, 0.25 of ``lr``)."""
    calls: list[float] = []
    monkeypatch.setattr(LCEngine, "proximal_step", lambda self, eta: calls.append(eta))
    monkeypatch.setattr(LCEngine, "penalty", lambda self: pytest.fail("the proximal L step added the penalty"))
    train, _ = loaders()
    res = compress(base_model(), train, method="ltc", **{**RESUME_KW, **PROXIMAL})
    per_pass = len(train)
    assert calls == pytest.approx([0.1] * per_pass + [0.075] * per_pass + [0.025] * per_pass)
    assert [row["train_extra_loss"] for row in res.log if row["phase"] == "lc"] == [0.0, 0.0, 0.0]


def test_late_proximal_adds_the_penalty_while_the_rate_is_held_and_steps_proximally_where_it_anneals(monkeypatch):
    """``penalty_step='late-proximal'`` over 4 L steps with ``lr_anneal=0.5``: the 2 held passes add ``penalty()`` to
    every batch's loss and take no proximal step; the 2 annealed passes (at 1 and 0.5 of ``lr``) take a proximal step
    after every batch and add nothing."""
    events: list[tuple[str, float]] = []
    real_penalty = LCEngine.penalty
    monkeypatch.setattr(LCEngine, "proximal_step", lambda self, eta: events.append(("proximal", eta)))
    monkeypatch.setattr(LCEngine, "penalty", lambda self: (events.append(("gradient", 0.0)), real_penalty(self))[1])
    train, _ = loaders()
    res = compress(base_model(), train, method="ltc", metric="data", **{**RESUME_KW, **LATE})
    per_pass = len(train)
    assert [e[0] for e in events] == ["gradient"] * 2 * per_pass + ["proximal"] * 2 * per_pass
    assert [e[1] for e in events[2 * per_pass:]] == pytest.approx([0.1] * per_pass + [0.05] * per_pass)
    extra = [row["train_extra_loss"] for row in res.log if row["phase"] == "lc"]
    assert extra[0] > 0 and extra[1] > 0 and extra[2:] == [0.0, 0.0]
    assert res.config["penalty_step"] == "late-proximal" and res.config["mu_path"] is None


def test_proximal_l_steps_end_closer_to_theta_than_gradient_ones():
    """The proximal μ path ends with every direction of ``W − Θ`` at the cap (``mu_cap / λ_min``), the gradient one
    with the largest direction there: on the same run the proximal L steps end nearer Θ in weight space."""
    train, _ = loaders()
    dist = {}
    for step in ("gradient", "proximal"):
        res = compress(base_model(), train, method="ltc", metric="data", penalty_step=step,
                       **{**RESUME_KW, **COSINE})
        dist[step] = res.history[-1]["distance"]
    assert dist["proximal"] < 0.5 * dist["gradient"]


def test_the_stable_mu_path_is_the_gradient_step_s_and_the_pinning_one_ends_higher():
    """``mu_path='stable'`` gives the proximal step the gradient step's μ at every C step (the same path, so the
    difference between the two is the step alone); the default for the proximal step (``'pin'``) ends higher, where
    the least-pulled direction reaches the cap, and nearer Θ."""
    train, _ = loaders()
    runs = {}
    for name, kw in (("gradient", {"penalty_step": "gradient"}), ("stable", {"mu_path": "stable"}),
                     ("pin", {})):
        res = compress(base_model(), train, method="ltc", metric="data", **{**RESUME_KW, **COSINE, **kw})
        runs[name] = ([row["mu"] for row in res.history], res.history[-1]["distance"])
    assert runs["stable"][0] == pytest.approx(runs["gradient"][0], rel=1e-12)
    assert runs["pin"][0][0] == runs["stable"][0][0] and runs["pin"][0][-1] > 2 * runs["stable"][0][-1]
    assert runs["pin"][1] < runs["stable"][1]


def test_lr_anneal_holds_the_rate_then_anneals_over_the_last_share_of_the_l_steps():
    """``lr_anneal=0.5`` over 4 L steps: 2 passes held at ``lr``, then the cosine over the last 2 (1, then 0.5);
    the penalty's scale follows, and fine-tuning starts afresh at ``finetune_lr``."""
    train, val = loaders()
    res = compress(base_model(), train, val_loader=val, method="ltc", **{**RESUME_KW, **COSINE, "steps": 4,
                                                                         "lr_anneal": 0.5, "finetune_lr": 0.02})
    assert [row["lr"] for row in res.log if row["phase"] == "lc"] == pytest.approx([0.01, 0.01, 0.01, 0.005])
    assert [h["lr_scale"] for h in res.history] == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5])
    assert [row["lr"] for row in res.log if row["phase"] != "lc"][0] == pytest.approx(0.02)
    with pytest.raises(ValueError, match=re.escape("lr_anneal must lie in (0, 1]")):
        CompressConfig(target_sr=2.0, lr_anneal=0.0)


def test_the_default_anneals_even_a_short_lc_phase():
    """5 whole-epoch L steps (the SPEC's shape) with the default ``lr_anneal=0.2``: one fifth of 5 passes would be a
    cosine of one pass, at the full rate; the last 2 passes anneal instead (1, then 0.5)."""
    train, val = loaders()
    res = compress(base_model(), train, val_loader=val, method="ltc", **{**RESUME_KW, "target_sr": 2.0, "steps": 5,
                                                                         "finetune_epochs": 0})
    assert CompressConfig.default("lr_anneal") == 0.2
    assert [row["lr"] for row in res.log if row["phase"] == "lc"] == pytest.approx([0.01] * 4 + [0.005])


def test_resume_without_a_checkpoint_starts_afresh_and_without_a_dir_is_refused(tmp_path, monkeypatch, caplog):
    train, _ = loaders()
    calls = counting(monkeypatch)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        compress(base_model(), train, method="uniform", resume=True, progress=False)
    assert calls[0] == 0
    # like fit: a run killed before its first checkpoint is resumed by starting it
    where = tmp_path / "nothing-here"
    kw = dict(method="uniform", epochs=2, seed=1, progress=False)
    with caplog.at_level(logging.INFO, logger="ltc"):
        res = compress(base_model(), train, checkpoint_dir=where, resume=True, **kw)
    assert f"no checkpoint at {where / CHECKPOINT_NAME} yet; starting the run from the beginning" in caplog.text
    assert calls[0] == 2 and read_checkpoint(where / CHECKPOINT_NAME)["epoch"] == 2
    assert_same_state(res.model, compress(base_model(), loaders()[0], **kw).model)


def test_resume_from_another_methods_checkpoint_is_refused(tmp_path, monkeypatch):
    train, _ = loaders()
    compress(base_model(), train, method="ltc", target_sr=2.0, steps=1, finetune_epochs=0, checkpoint_dir=tmp_path,
             progress=False)
    assert read_checkpoint(tmp_path / CHECKPOINT_NAME)["writer"] == "ltc.compress"
    calls = counting(monkeypatch)
    with pytest.raises(ValueError, match=re.escape("method: 'ltc' -> 'lrc'")):
        compress(base_model(), train, method="lrc", target_sr=2.0, steps=1, finetune_epochs=0,
                 checkpoint_dir=tmp_path, resume=True, progress=False)
    assert calls[0] == 0


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"steps": -1}, "steps must be an int >= 1, got -1"),
        ({"epochs_per_step": -2}, "epochs_per_step must be a finite number > 0, got -2"),
        ({"epochs_per_step": 1.5}, "epochs_per_step must be a whole number of epochs (>= 1) or a fraction of one in "
                                   "(0, 1), got 1.5"),
        ({"finetune_epochs": 1.5}, "finetune_epochs must be an int >= 0, got 1.5"),
        ({"epochs": -3}, "epochs must be an int >= 0, got -3"),
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"lr": -0.1}, "lr must be a finite number > 0, got -0.1"),
        ({"finetune_lr": 0}, "finetune_lr must be a finite number > 0, got 0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        ({"lr_decay": 0.0}, "lr_decay must lie in (0, 1], got 0.0"),
        ({"target_sr": 0.5}, "target_sr must be a finite number >= 1 (a speed-up), got 0.5"),
        ({"mu_growth": 0.5}, "mu_growth must be a finite number >= 1 (μ increases), got 0.5"),
        ({"min_rank": 0}, "min_rank must be an int >= 1, got 0"),
        ({"cost": "x"}, "cost must be one of 'macs', 'params', 'latency', got 'x'"),
        ({"kd_weight": 1.5}, "kd_weight must lie in [0, 1], got 1.5"),
        ({"kd_temperature": 0}, "kd_temperature must be a finite number > 0, got 0"),
        ({"method": "ltcc"}, "Did you mean 'ltc'"),
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"target_schedule": "slow"}, "target_schedule must be one of 'fixed', 'gradual', got 'slow'"),
        ({"penalty_step": "prox"}, "penalty_step must be one of 'gradient', 'proximal', 'late-proximal', got 'prox'"),
        ({"penalty_step": "late-proximal", "lr_schedule": "restart"},
         "penalty_step='late-proximal' switches to the proximal step where the L-step rate anneals"),
        ({"mu_path": "steep"}, "mu_path must be one of 'pin', 'stable', got 'steep'"),
        ({"mu_path": "stable", "mu_final": 3.0}, "mu_path='stable' shapes the automatic μ path and mu_final sets"),
        ({"mu_path": "pin", "mu_growth": 1.5}, "mu_path='pin' shapes the automatic μ path and mu_growth sets"),
        ({"mu_path": "pin", "penalty_step": "gradient"},
         "mu_path='pin' needs penalty_step='proximal': the gradient step caps each layer's pull"),
        ({"target_schedule": "gradual", "target_sr": None, "lam": 1e-3}, "it needs target_sr (not lam"),
        ({"target_schedule": "gradual", "method": "oneshot"}, "method 'oneshot' picks its ranks once"),
    ],
)
def test_config_errors_come_before_any_training(kw, match, monkeypatch):
    with pytest.raises(ValueError, match=re.escape(match)):
        CompressConfig(**{"target_sr": 2.0, **kw})

    def boom(*args, **kwargs):
        raise AssertionError("trained or evaluated before validating the config")

    monkeypatch.setattr(ltc.train, "train_one_epoch", boom)
    monkeypatch.setattr(ltc.api, "evaluate", boom)
    train, val = loaders()
    args = {"method": "ltc", "target_sr": 2.0, **kw}
    with pytest.raises(ValueError, match=re.escape(match)):
        compress(base_model(), train, val_loader=val, progress=False, **args)
    with pytest.raises(ValueError, match=re.escape(match)):
        compress(base_model(), train, val_loader=val, config=CompressConfig(target_sr=2.0), progress=False, **kw)


def test_engine_argument_errors_come_before_any_training(monkeypatch):
    calls = counting(monkeypatch)
    train, _ = loaders()
    with pytest.raises(ValueError, match="exactly one of lam"):
        compress(base_model(), train, method="ltc", lam=1e-3, target_sr=2.0, progress=False)
    with pytest.raises(ValueError, match="exactly one of lam"):
        compress(base_model(), train, method="oneshot", progress=False)
    with pytest.raises(ValueError, match="fraction"):
        compress(base_model(), train, method="uniform", method_options={"fraction": 0.0}, progress=False)
    with pytest.raises(ValueError, match=re.escape("method 'vbmf' takes only the options 'weaken', not ['x']")):
        compress(base_model(), train, method="vbmf", method_options={"x": 1}, progress=False)
    with pytest.raises(TypeError):
        compress(base_model(), train, method="uniform", not_a_field=1, progress=False)
    assert calls[0] == 0


# --------------------------------------------------------------------------------------------- distillation, decay
def test_default_kd_weight_distils_from_the_frozen_base_in_eval_mode(trained_base, monkeypatch):
    """The default kd_weight (0.5) makes the base network the teacher of every training batch, L steps and
    fine-tuning alike: the teacher's logits are the base's eval-mode logits (dropout off, BatchNorm on its running
    statistics), computed without gradients, and the base itself is neither trained nor switched to eval mode."""
    base = copy.deepcopy(trained_base)
    base.classifier = nn.Sequential(nn.Dropout(0.5), base.classifier)  # train mode would show in the logits
    base.train()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    flags = [m.training for m in base.modules()]
    train = DataLoader(TRAIN, batch_size=16)  # a fixed batch order: the teacher's inputs are known
    cfg = CompressConfig(target_sr=2.0)  # kd_weight and kd_temperature left at their defaults
    assert cfg.kd_weight == 0.5 and cfg.kd_temperature == 4.0

    teachers: list[nn.Module] = []
    teacher_calls: list[tuple[bool, bool]] = []
    real_teacher = ltc.api._teacher

    def spy_teacher(model, device):
        t = real_teacher(model, device)
        t.register_forward_hook(lambda m, i, o: teacher_calls.append((m.training, torch.is_grad_enabled())))
        teachers.append(t)
        return t

    kd_calls: list[tuple[torch.Tensor, float, float]] = []
    real_kd = ltc.train.distillation_loss

    def spy_kd(student, teacher, target, *, weight, temperature, **kw):
        kd_calls.append((teacher.detach().clone(), weight, temperature))
        return real_kd(student, teacher, target, weight=weight, temperature=temperature, **kw)

    monkeypatch.setattr(ltc.api, "_teacher", spy_teacher)
    monkeypatch.setattr(ltc.train, "distillation_loss", spy_kd)
    res = compress(base, train, config=cfg, steps=1, epochs_per_step=1, epochs=2, metric="weight", progress=False)
    assert res.plan["total"] == 2 and res.config["kd_weight"] == 0.5

    assert len(teachers) == 1 and teachers[0] is not base
    assert all(not p.requires_grad for p in teachers[0].parameters())
    assert teacher_calls == [(False, False)] * (2 * len(train))  # every batch of both epochs, eval mode, no grad
    ref = copy.deepcopy(trained_base).eval()
    ref.classifier = nn.Sequential(nn.Dropout(0.5), ref.classifier).eval()
    with torch.no_grad():
        expected = [ref(x) for x, _ in train] * 2
    assert len(kd_calls) == len(expected)
    for (logits, weight, temperature), want in zip(kd_calls, expected, strict=True):
        assert (weight, temperature) == (0.5, 4.0)
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    after = base.state_dict()  # the base is untouched: the teacher is a frozen copy
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [m.training for m in base.modules()] == flags and all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("lc_weight_decay", [0.0, 2e-3])
def test_l_step_optimizer_gives_lc_weight_decay_to_the_compressed_weights_only(lc_weight_decay, monkeypatch):
    """The L steps' optimizer: the compressed layers' weights get lc_weight_decay, every other weight matrix
    weight_decay, biases and BatchNorm parameters no decay; each trainable parameter in exactly one group."""
    seen: list[tuple[str, nn.Module, torch.optim.Optimizer]] = []
    real_fit = ltc.api.fit

    def spy_fit(model, *args, **kwargs):
        seen.append((kwargs["stage"], model, kwargs["optimizer"]))
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(ltc.api, "fit", spy_fit)
    train, _ = loaders()
    res = compress(base_model(), train, method="ltc", target_sr=2.0, steps=1, epochs=1, weight_decay=5e-4,
                   lc_weight_decay=lc_weight_decay, metric="weight", kd_weight=0.0, progress=False)
    (stage, work, opt), = [s for s in seen if s[0] == "lc"]
    assert stage == "lc"
    compressed = {f"{n}.weight" for n in res.ranks}  # every layer the engine handles, dense-kept ones too
    assert compressed == {"features.0.weight", "features.3.weight", "features.7.weight", "features.10.weight"}
    decay_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in decay_of, "a parameter in two groups"
            decay_of[id(p)] = g["weight_decay"]
    names = dict(work.named_parameters())
    assert set(decay_of) == {id(p) for p in names.values() if p.requires_grad}
    for name, p in names.items():
        want = lc_weight_decay if name in compressed else (5e-4 if p.ndim > 1 else 0.0)
        assert decay_of[id(p)] == want, name
    assert decay_of[id(names["classifier.weight"])] == 5e-4  # the dense head keeps the ordinary decay
