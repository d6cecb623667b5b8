"""Tests for ``ltc.compress`` (``ltc.api``): end to end for every method on a tiny synthetic dataset, the
equal epoch budget, the Result's consistency, bit-identical resume after an interruption, and early errors."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ltc
import ltc.api
from ltc import models
from ltc.api import CHECKPOINT_NAME, CompressConfig, Result, compress
from ltc.layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d


# --------------------------------------------------------------------------------------------- data, model
def make_data(n: int = 64, seed: int = 0) -> TensorDataset:
    """Four classes of 1x16x16 images: a class prototype plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    proto = torch.randn(4, 1, 16, 16, generator=g)
    return TensorDataset(proto[y] + 0.5 * torch.randn(n, 1, 16, 16, generator=g), y)


TRAIN = make_data(64, 0)
VAL = make_data(32, 1)
X1 = TRAIN.tensors[0][:1]


def loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(TRAIN, batch_size=16, shuffle=True), DataLoader(VAL, batch_size=32)


def base_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.create("small_cnn", num_classes=4, in_channels=1, width=0.25)


class Interrupt(Exception):
    """Stands in for a crash / Ctrl-C in the middle of a run."""


def counting(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Wrap ``ltc.api.train_one_epoch``: count the calls; raise :class:`Interrupt` on call ``fail_after + 1``."""
    real = ltc.api.train_one_epoch
    calls = [0]

    def wrapped(*args, **kwargs):
        if fail_after is not None and calls[0] >= fail_after:
            raise Interrupt
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ltc.api, "train_one_epoch", wrapped)
    return calls


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


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
                   finetune_epochs=FT, progress=False, seed=3, **kw)
    assert isinstance(res, Result) and res.method == method

    # the input model is untouched
    assert_same_state(model, before)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]

    # profiles: base is the input model, compressed is the returned model; SR/CR are their ratios
    base, comp = ltc.profile(model, X1), ltc.profile(res.model, X1)
    assert (res.base.macs, res.base.params) == (base.macs, base.params)
    assert (res.compressed.macs, res.compressed.params) == (comp.macs, comp.params)
    assert res.sr == res.base.macs / res.compressed.macs
    assert res.cr == res.base.params / res.compressed.params
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
    if method == "lrc":
        assert all(r is None or isinstance(r, int) for r in res.ranks.values())
    if not kw.get("compress_linear"):
        assert type(mods["classifier"]) is nn.Linear
    if method == "uniform":
        assert res.ranks["features.3"] == (4, 7)  # ceil(0.4 * 8), ceil(0.4 * 16)

    # the same epoch budget for every method, all of it in fine-tuning for the one-shot ones
    phases = [row["phase"] for row in res.log]
    learns = method in ("ltc", "lrc")
    assert phases.count("lc") == (STEPS * EPS if learns else 0)
    assert phases.count("finetune") == (FT if learns else FT + STEPS * EPS)
    assert len(phases) == calls[0] == STEPS * EPS + FT
    assert [row["epoch"] for row in res.log] == list(range(1, len(phases) + 1))
    if learns:
        assert len(res.history) == STEPS + 1  # the first C step at construction, then one per LC step
        assert res.history[-1]["ranks"] == {n: jr(r) for n, r in res.ranks.items()}
        assert res.history[-1]["macs"] == res.compressed.macs

    # accuracies are fractions; the record is JSON; the summary is the slides' table
    for acc in (res.base_acc, res.acc_before_finetune, res.acc):
        assert acc is not None and 0.0 <= acc <= 1.0
    d = json.loads(json.dumps(res.to_dict()))
    assert d["method"] == method and d["sr"] == res.sr and d["compressed"]["macs"] == res.compressed.macs
    assert d["ranks"] == {n: jr(r) for n, r in res.ranks.items()}
    assert d["config"]["method"] == method and d["config"]["steps"] == STEPS
    summary = res.summary()
    assert "| model | MACs | SR | params | CR | acc (%) |" in summary
    assert f"| {method} |" in summary and f"{res.sr:.2f}" in summary


def test_compress_config_object_and_overrides():
    train, _ = loaders()
    cfg = CompressConfig(method="uniform", steps=5, epochs_per_step=1, finetune_epochs=0)
    res = compress(base_model(), train, config=cfg, steps=1, progress=False, example_input=X1)
    assert res.config["steps"] == 1 and cfg.steps == 5
    assert [row["phase"] for row in res.log] == ["finetune"]
    assert res.base_acc is None and res.acc is None  # no val_loader


def test_equal_budget_off_gives_one_shot_methods_only_their_finetuning(monkeypatch):
    train, _ = loaders()
    calls = counting(monkeypatch)
    res = compress(base_model(), train, method="uniform", steps=3, epochs_per_step=2, finetune_epochs=1,
                   equal_budget=False, progress=False)
    assert calls[0] == 1 and [row["phase"] for row in res.log] == ["finetune"]


# --------------------------------------------------------------------------------------------- resume
RESUME_KW = dict(steps=2, epochs_per_step=1, finetune_epochs=2, seed=7, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Uninterrupted reference runs (with a checkpoint dir too, as a resumed run has one)."""
    out = {}
    for method, kw in (("ltc", {"target_sr": 2.0}), ("uniform", {})):
        train, val = loaders()
        out[method] = compress(base_model(), train, val_loader=val, method=method,
                               checkpoint_dir=tmp_path_factory.mktemp(f"ref_{method}"), **kw, **RESUME_KW)
    return out


@pytest.mark.parametrize(
    "method, kw, fail_after, phase",
    [
        ("ltc", {"target_sr": 2.0}, 1, "lc"),  # dies in the 2nd L step
        ("ltc", {"target_sr": 2.0}, 3, "finetune"),  # dies in the 2nd fine-tuning epoch
        ("uniform", {}, 2, "finetune"),  # a one-shot method, in its 3rd fine-tuning epoch
    ],
)
def test_resume_is_bit_identical(uninterrupted, tmp_path, monkeypatch, method, kw, fail_after, phase):
    ref = uninterrupted[method]
    train, val = loaders()
    counting(monkeypatch, fail_after=fail_after)
    with pytest.raises(Interrupt):
        compress(base_model(), train, val_loader=val, method=method, checkpoint_dir=tmp_path, **kw, **RESUME_KW)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["phase"] == phase and ckpt["epoch_counter"] == fail_after
    monkeypatch.undo()

    calls = counting(monkeypatch)
    train, val = loaders()  # a fresh process would build fresh loaders
    res = compress(base_model(), train, val_loader=val, method=method, checkpoint_dir=tmp_path, resume=True,
                   **kw, **RESUME_KW)
    total = RESUME_KW["steps"] * RESUME_KW["epochs_per_step"] + RESUME_KW["finetune_epochs"]
    assert calls[0] == total - fail_after  # nothing done twice
    assert res.ranks == ref.ranks
    assert_same_state(res.model, ref.model)
    assert [type(m) for m in res.model.modules()] == [type(m) for m in ref.model.modules()]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in res.log]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in ref.log]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in res.history] == [
        {k: v for k, v in h.items() if k != "seconds"} for h in ref.history]
    assert (res.acc, res.acc_before_finetune, res.base_acc) == (ref.acc, ref.acc_before_finetune, ref.base_acc)
    assert (res.compressed.macs, res.compressed.params) == (ref.compressed.macs, ref.compressed.params)


def test_resume_without_checkpoint_names_the_path(tmp_path, monkeypatch):
    train, _ = loaders()
    calls = counting(monkeypatch)
    where = tmp_path / "nothing-here"
    with pytest.raises(FileNotFoundError, match=re.escape(str(where / CHECKPOINT_NAME))):
        compress(base_model(), train, method="ltc", target_sr=2.0, checkpoint_dir=where, resume=True,
                 progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        compress(base_model(), train, method="ltc", target_sr=2.0, resume=True, progress=False)
    assert calls[0] == 0


def test_resume_from_another_methods_checkpoint_is_refused(tmp_path, monkeypatch):
    train, _ = loaders()
    compress(base_model(), train, method="ltc", target_sr=2.0, steps=1, finetune_epochs=0, checkpoint_dir=tmp_path,
             progress=False)
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    calls = counting(monkeypatch)
    with pytest.raises(ValueError, match="'ltc'"):
        compress(base_model(), train, method="lrc", target_sr=2.0, steps=1, finetune_epochs=0,
                 checkpoint_dir=tmp_path, resume=True, progress=False)
    assert calls[0] == 0


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"steps": -1}, "steps"),
        ({"epochs_per_step": -2}, "epochs_per_step"),
        ({"finetune_epochs": 1.5}, "finetune_epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"finetune_lr": 0}, "finetune_lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr_decay": 0.0}, "lr_decay"),
        ({"method": "ltcc"}, "Did you mean 'ltc'"),
        ({"method": "nope"}, "unknown method"),
    ],
)
def test_config_errors_come_before_any_training(kw, match, monkeypatch):
    with pytest.raises(ValueError, match=match):
        CompressConfig(**kw)

    def boom(*args, **kwargs):
        raise AssertionError("trained or evaluated before validating the config")

    monkeypatch.setattr(ltc.api, "train_one_epoch", boom)
    monkeypatch.setattr(ltc.api, "evaluate", boom)
    train, val = loaders()
    args = {"method": "ltc", "target_sr": 2.0, **kw}
    with pytest.raises(ValueError, match=match):
        compress(base_model(), train, val_loader=val, progress=False, **args)
    with pytest.raises(ValueError, match=match):
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
    with pytest.raises(TypeError):
        compress(base_model(), train, method="uniform", not_a_field=1, progress=False)
    assert calls[0] == 0
