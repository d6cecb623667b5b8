"""Tests for the compression methods (``ltc.methods``), SPEC sections 3 and 4.

Every rank rule is checked against code written here: numpy SVD / HOSVD loops, the cost formulas of SPEC
sections 2 and 4, and the EVBMF ranks of ``ltc.vbmf`` applied by hand.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import ltc
from ltc import models
from ltc.engine import LTC
from ltc.methods import get_method, list_methods
from ltc.vbmf import evbmf, vbmf_tucker2_ranks

SETTINGS = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------- models
class Net(nn.Module):
    """kxk conv with bias, a strided conv, a 1x1 conv (matrix scheme in LTC), a rectangular kernel, a head."""

    def __init__(self, a: int = 6, b: int = 7, c: int = 5, d: int = 4, bias: bool = True):
        super().__init__()
        self.c1 = nn.Conv2d(3, a, 3, padding=1, bias=bias)
        self.c2 = nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv2d(b, c, 1, bias=bias)
        self.c4 = nn.Conv2d(c, b, (3, 2), padding=(1, 0), bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(b * 4, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = self.c4(x)
        return self.fc(self.pool(x).flatten(1))


X = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))


def _decaying(n: int, decay: float, gen: torch.Generator) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(n, n, generator=gen))[0]
    return q * decay ** torch.arange(n, dtype=torch.float32)


def make_net(seed: int = 0, decay: float = 0.7, **kw) -> Net:
    """A :class:`Net` whose weight spectra decay like ``decay**k`` on both channel modes (so that every
    regime, from min_rank to dense, is reached by moderate λ and μ)."""
    gen = torch.Generator().manual_seed(seed)
    net = Net(**kw)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
            if p.dim() >= 2:
                w = torch.einsum("ts...,ot->os...", p, _decaying(p.shape[0], decay, gen))
                p.copy_(torch.einsum("ts...,is->ti...", w, _decaying(p.shape[1], decay, gen)))
    return net


def planted_net(seed: int = 0) -> Net:
    """A wider :class:`Net` whose layers are low Tucker rank plus noise, so EVBMF finds ranks in (1, full)."""
    gen = torch.Generator().manual_seed(seed)
    net = Net(a=16, b=24, c=20, d=6)
    with torch.no_grad():
        for m in (net.c1, net.c2, net.c3, net.c4):
            t, s = m.weight.shape[:2]
            r_out, r_in = max(1, t // 3), max(1, s // 3)
            core = torch.randn(r_out, r_in, *m.weight.shape[2:], generator=gen)
            u = torch.linalg.qr(torch.randn(t, r_out, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(s, r_in, generator=gen))[0]
            w = torch.einsum("oiab,to,si->tsab", core, u, v)
            m.weight.copy_(w + 0.02 * torch.randn(w.shape, generator=gen))
    return net


# --------------------------------------------------------------------------------------------- helpers
def shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shape of every conv / linear leaf, from our own forward hooks."""
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook(name: str):
        def record(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen.setdefault(name, (tuple(inputs[0].shape), tuple(output.shape)))

        return record

    leaves = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    hooks = [m.register_forward_hook(hook(n)) for n, m in leaves]
    training = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(training)
    for h in hooks:
        h.remove()
    return seen


def dense_cost(mod: nn.Module, shp) -> tuple[int, int]:
    """(params, MACs) of a dense conv / linear (SPEC 2)."""
    bias = 0 if mod.bias is None else mod.bias.numel()
    if isinstance(mod, nn.Linear):
        n = mod.in_features * mod.out_features
        return n + bias, n
    t, s, kh, kw = mod.weight.shape
    return t * s * kh * kw + bias, shp[1][2] * shp[1][3] * t * s * kh * kw


def matrix_cost(mod: nn.Module, shp, r: int) -> tuple[int, int]:
    """(params, MACs) of the LRC matrix scheme (SPEC 4) for convs, of an SVD for linears (SPEC 2)."""
    bias = 0 if mod.bias is None else mod.bias.numel()
    if isinstance(mod, nn.Linear):
        width = mod.in_features + mod.out_features
        return r * width + bias, r * width
    t, s, kh, kw = mod.weight.shape
    width = s * kh * kw + t
    return r * width + bias, shp[1][2] * shp[1][3] * r * width


def tucker2_cost(mod: nn.Conv2d, shp, r_in: int, r_out: int) -> tuple[int, int]:
    """(params, MACs) of a Tucker-2 conv (SPEC 2)."""
    bias = 0 if mod.bias is None else mod.bias.numel()
    t, s, kh, kw = mod.weight.shape
    params = s * r_in + r_in * r_out * kh * kw + r_out * t + bias
    macs = shp[0][2] * shp[0][3] * s * r_in + shp[1][2] * shp[1][3] * (r_in * r_out * kh * kw + r_out * t)
    return params, macs


def svd_projection(z: np.ndarray, r: int) -> np.ndarray:
    m = z.reshape(z.shape[0], -1)
    u, sv, vh = np.linalg.svd(m, full_matrices=False)
    return ((u[:, :r] * sv[:r]) @ vh[:r]).reshape(z.shape)


def hosvd_projection(z: np.ndarray, r_in: int, r_out: int) -> np.ndarray:
    t, s = z.shape[:2]
    u = np.linalg.svd(z.reshape(t, -1), full_matrices=False)[0][:, :r_out]
    v = np.linalg.svd(z.transpose(1, 0, 2, 3).reshape(s, -1), full_matrices=False)[0][:, :r_in]
    core = np.einsum("tsab,to,si->oiab", z, u, v)
    return np.einsum("oiab,to,si->tsab", core, u, v)


def sq(a: np.ndarray) -> float:
    return float((a.astype(np.float64) ** 2).sum())


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def is_tucker(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) != (1, 1)


# --------------------------------------------------------------------------------------------- registry
def test_registry_names_learning_flags_and_unknown_names():
    assert list_methods() == ["lrc", "ltc", "oneshot", "uniform", "vbmf"]
    assert {n: get_method(n).learns for n in list_methods()} == {
        "ltc": True, "lrc": True, "oneshot": False, "vbmf": False, "uniform": False,
    }
    for n in list_methods():
        assert get_method(n).name == n and get_method(n).summary
    with pytest.raises(ValueError, match=r"Did you mean 'ltc'\?"):
        get_method("ltcc")
    with pytest.raises(ValueError, match=r"Did you mean 'vbmf'\?"):
        get_method("vbfm")
    with pytest.raises(ValueError, match="lrc, ltc, oneshot, uniform, vbmf"):
        get_method("pruning")


@pytest.mark.parametrize("name", ["ltc", "lrc", "oneshot"])
def test_learning_style_methods_reject_unknown_options(name):
    with pytest.raises(TypeError, match="fraction"):
        get_method(name).build(make_net(), X, lam=1e-3, fraction=0.5)


def test_each_method_builds_the_schemes_it_promises():
    net = make_net()
    for name, kw in (("ltc", {"lam": 1e-3}), ("oneshot", {"lam": 1e-3}), ("vbmf", {}), ("uniform", {})):
        eng = get_method(name).build(net, X, **kw)
        assert {n: s.scheme.name for n, s in eng.layers.items()} == {
            "c1": "tucker2", "c2": "tucker2", "c3": "matrix", "c4": "tucker2"}, name
    eng = get_method("lrc").build(net, X, lam=1e-3, compress_linear=True)
    assert {n: s.scheme.name for n, s in eng.layers.items()} == {
        "c1": "matrix", "c2": "matrix", "c3": "matrix", "c4": "matrix", "fc": "svd"}


# --------------------------------------------------------------------------------------------- lrc
def check_lrc_c_step(eng, model: nn.Module, z: dict[str, torch.Tensor], lam: float, mu: float, kind: str,
                     min_rank: int) -> dict:
    """Assert that ``eng``'s ranks and Θ are the brute-force argmin of λ·C(r)/C_ref + μ/2·‖Z − Π_r(Z)‖² over
    r ∈ {min_rank..min(T, S·kh·kw)} ∪ {dense}; returns the chosen ranks."""
    shp = shapes(model, X)
    mods = dict(model.named_modules())
    k = 0 if kind == "params" else 1
    c_ref = sum(dense_cost(mods[n], shp[n])[k] for n in eng.layers)
    for n, chosen in eng.ranks.items():
        mod, zn = mods[n], as_np(z[n])
        full = min(zn.shape[0], zn[0].size)
        options = {None: (lam * dense_cost(mod, shp[n])[k] / c_ref, zn)}
        for r in range(min(min_rank, full), full + 1):
            theta = svd_projection(zn, r)
            options[r] = (lam * matrix_cost(mod, shp[n], r)[k] / c_ref + 0.5 * mu * sq(zn - theta), theta)
        best = min(v[0] for v in options.values())
        tol = 1e-9 * (abs(best) + mu * sq(zn)) + 1e-15
        winners = [r for r, v in options.items() if v[0] <= best + tol]
        assert chosen in winners, (n, chosen, winners, lam, mu, kind, min_rank)
        theta = as_np(eng.layers[n].theta)
        assert np.abs(theta - options[chosen][1]).max() <= 1e-5 * np.abs(zn).max(), n
    return dict(eng.ranks)


@settings(SETTINGS, max_examples=14)
@given(
    log_lam=st.floats(-6.0, 1.0),
    log_mu=st.floats(-4.0, 0.5),
    kind=st.sampled_from(["macs", "params"]),
    min_rank=st.integers(1, 3),
    linear=st.booleans(),
    seed=st.integers(0, 3),
    chans=st.tuples(st.integers(2, 8), st.integers(2, 8), st.integers(1, 6)),
)
@example(log_lam=-6.0, log_mu=0.0, kind="macs", min_rank=1, linear=False, seed=0, chans=(6, 7, 5))  # dense
@example(log_lam=1.0, log_mu=-4.0, kind="params", min_rank=2, linear=True, seed=0, chans=(6, 7, 5))  # min_rank
def test_lrc_first_c_step_is_the_brute_force_argmin(log_lam, log_mu, kind, min_rank, linear, seed, chans):
    lam, mu = 10.0**log_lam, 10.0**log_mu
    net = make_net(seed, a=chans[0], b=chans[1], c=chans[2])
    eng = get_method("lrc").build(net, X, lam=lam, mu0=mu, cost=kind, min_rank=min_rank, compress_linear=linear,
                                  weighting="absolute")
    assert set(eng.layers) == ({"c1", "c2", "c3", "c4"} | ({"fc"} if linear else set()))
    z = {n: s.weight for n, s in eng.layers.items()}
    check_lrc_c_step(eng, net, z, lam, mu, kind, min_rank)


def test_lrc_c_step_reaches_every_regime():
    """The λ sweep of the brute-force test is not vacuous: dense, min_rank and interior ranks all win."""
    seen = set()
    net = make_net(0)
    for lam in (1e-6, 1e-2, 3e-2, 0.1, 0.3, 10.0):
        eng = get_method("lrc").build(net, X, lam=lam, mu0=0.1, compress_linear=True, weighting="absolute")
        check_lrc_c_step(eng, net, {n: s.weight for n, s in eng.layers.items()}, lam, 0.1, "macs", 1)
        for n, r in eng.ranks.items():
            full = min(eng.layers[n].weight.shape[0], eng.layers[n].weight[0].numel())
            seen.add("dense" if r is None else "min" if r == 1 else "full" if r == full else "interior")
    assert {"dense", "min", "interior"} <= seen


@settings(SETTINGS, max_examples=8)
@given(
    log_lam=st.floats(-2.5, 0.5),
    log_mu=st.floats(-4.0, -1.5),
    growth=st.floats(1.0, 2.0),
    kind=st.sampled_from(["macs", "params"]),
    seed=st.integers(0, 3),
    noise=st.floats(0.05, 1.0),
)
def test_lrc_c_step_after_steps_with_nonzero_multipliers(log_lam, log_mu, growth, kind, seed, noise):
    lam, mu = 10.0**log_lam, 10.0**log_mu
    net = make_net(seed)
    eng = get_method("lrc").build(net, X, lam=lam, mu0=mu, mu_growth=growth, cost=kind, weighting="absolute")
    gen = torch.Generator().manual_seed(seed + 100)

    def l_step() -> dict[str, torch.Tensor]:  # stands in for SGD: move the weights
        with torch.no_grad():
            for s in eng.layers.values():
                s.weight.add_(noise * s.weight.abs().mean() * torch.randn(s.weight.shape, generator=gen))
        return {n: s.weight.detach().clone() for n, s in eng.layers.items()}

    w1 = l_step()
    eng.step()  # C step at mu on Z = W1 (phi = 0), then phi <- -mu (W1 - Theta1), mu <- growth * mu
    assert eng.history[-1]["mu"] == pytest.approx(mu)
    check_lrc_c_step(eng, net, w1, lam, mu, kind, 1)
    phi = {n: -mu * (w1[n] - eng.layers[n].theta) for n in w1}
    for n, s in eng.layers.items():
        assert torch.allclose(s.phi, phi[n], rtol=1e-5, atol=1e-7 * float(phi[n].abs().max()) + 1e-12), n
    assume(any(float(p.abs().max()) > 0 for p in phi.values()))  # some layer compressed: multipliers move
    assert eng.mu == pytest.approx(mu * growth)
    w2 = l_step()
    eng.step()  # C step at growth * mu on Z = W2 - phi / (growth * mu)
    mu1 = mu * growth
    assert eng.history[-1]["mu"] == pytest.approx(mu1)
    check_lrc_c_step(eng, net, {n: w2[n] - phi[n] / mu1 for n in w2}, lam, mu1, kind, 1)


# --------------------------------------------------------------------------------------------- oneshot
@pytest.mark.parametrize("kw", [{"lam": 1e-4}, {"lam": 3e-2}, {"lam": 0.3, "cost": "params"}, {"target_sr": 3.0},
                                {"target_sr": 2.0, "cost": "params", "min_rank": 2}])
def test_oneshot_ranks_are_ltc_first_c_step(kw):
    net = make_net(1)
    ref = LTC(net, X, **kw)
    eng = get_method("oneshot").build(net, X, **kw)
    assert eng.ranks == ref.ranks
    assert eng.lam == ref.lam
    for n, s in eng.layers.items():
        assert torch.equal(s.theta, ref.layers[n].theta), n
    assert eng.steps_done == 0


# --------------------------------------------------------------------------------------------- uniform
def expected_fraction_ranks(eng, f: float, min_rank: int) -> dict:
    out = {}
    for n, s in eng.layers.items():
        w = s.weight
        if is_tucker(s.module):
            out[n] = tuple(min(full, max(min_rank, math.ceil(f * full))) for full in (w.shape[1], w.shape[0]))
        else:
            full = min(w.shape[0], w[0].numel())
            out[n] = min(full, max(min_rank, math.ceil(f * full)))
    return out


@settings(SETTINGS, max_examples=10)
@given(f=st.floats(0.01, 1.0), min_rank=st.integers(1, 3), linear=st.booleans())
@example(f=1.0, min_rank=1, linear=True)
@example(f=0.5, min_rank=1, linear=False)
def test_uniform_fraction_gives_ceil_of_fraction_times_full(f, min_rank, linear):
    net = make_net(2, a=8, b=10, c=6)
    eng = get_method("uniform").build(net, X, fraction=f, min_rank=min_rank, compress_linear=linear)
    assert eng.ranks == expected_fraction_ranks(eng, f, min_rank)
    for s in eng.layers.values():  # Θ is the projection of the weights at those ranks
        w = as_np(s.weight)
        proj = hosvd_projection(w, *s.rank) if isinstance(s.rank, tuple) else svd_projection(w, s.rank)
        assert np.abs(as_np(s.theta) - proj).max() <= 1e-5 * np.abs(w).max()


def test_uniform_default_is_half():
    net = make_net(2)
    eng = get_method("uniform").build(net, X)
    assert eng.ranks == expected_fraction_ranks(eng, 0.5, 1)


def _energy_err(w: np.ndarray, rank) -> float:
    if isinstance(rank, tuple):
        return sq(w - hosvd_projection(w, *rank))
    return sq(w - svd_projection(w, rank))


@settings(SETTINGS, max_examples=10)
@given(energy=st.floats(0.05, 1.0), seed=st.integers(0, 3), min_rank=st.integers(1, 2))
@example(energy=1.0, seed=0, min_rank=1)
def test_uniform_energy_keeps_energy_and_is_cheapest(energy, seed, min_rank):
    net = make_net(seed, decay=0.8, a=7, b=8, c=6)
    eng = get_method("uniform").build(net, X, energy=energy, min_rank=min_rank)
    for n, s in eng.layers.items():
        w, r = as_np(s.weight), s.rank
        total = sq(w)
        thr = (1.0 - energy) * total
        slack = 1e-9 * total
        assert r is not None
        assert sq(w - as_np(s.theta)) <= thr + slack, (n, r)  # keeps >= energy of ||W||^2
        assert _energy_err(w, r) <= thr + slack
        # the next cheaper grid rank on each axis loses the energy
        if isinstance(r, tuple):
            lo_in, lo_out = min(min_rank, w.shape[1]), min(min_rank, w.shape[0])
            lowers = [lo for lo in ((r[0] - 1, r[1]), (r[0], r[1] - 1)) if lo[0] >= lo_in and lo[1] >= lo_out]
        else:
            lowers = [r - 1] if r - 1 >= min(min_rank, w.shape[0], w[0].size) else []
        for lo in lowers:
            e = _energy_err(w, lo)
            if abs(e - thr) > slack:
                assert e > thr, (n, r, lo)


@settings(SETTINGS, max_examples=8)
@given(e1=st.floats(0.05, 1.0), e2=st.floats(0.05, 1.0), seed=st.integers(0, 2))
def test_uniform_lower_energy_never_costs_more(e1, e2, seed):
    lo, hi = sorted((e1, e2))
    net = make_net(seed, decay=0.8, a=7, b=8, c=6)
    shp = shapes(net, X)
    mods = dict(net.named_modules())
    a = get_method("uniform").build(net, X, energy=lo)
    b = get_method("uniform").build(net, X, energy=hi)

    def macs(n, r):
        return tucker2_cost(mods[n], shp[n], *r)[1] if isinstance(r, tuple) else matrix_cost(mods[n], shp[n], r)[1]

    for n in a.layers:
        assert macs(n, a.ranks[n]) <= macs(n, b.ranks[n]), (n, a.ranks[n], b.ranks[n])
    assert a.macs <= b.macs


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    net = models.create("resnet34_cifar", num_classes=10, width=0.25)
    return net, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("target", [2.0, 5.0, 10.0])
def test_uniform_budget_meets_target_within_3_percent(resnet, target):
    net, x = resnet
    base = ltc.profile(net, x).macs
    eng = get_method("uniform").build(net, x, target_sr=target)
    sr = base / ltc.profile(eng.compressed_model(), x).macs  # measured on the deployed network
    assert sr == pytest.approx(eng.sr, rel=1e-12)
    assert target <= sr <= 1.03 * target, sr
    # a single fraction for all layers: the ranks are ceil(f * full) for one f ...
    ranks = eng.ranks
    lows, highs = [], []
    for n, r in ranks.items():
        s = eng.layers[n]
        fulls = (s.weight.shape[1], s.weight.shape[0]) if isinstance(r, tuple) else (min(s.weight.shape[0],
                                                                                       s.weight[0].numel()),)
        for ri, full in zip(r if isinstance(r, tuple) else (r,), fulls, strict=True):
            highs.append(ri / full)
            if ri > 1:
                lows.append((ri - 1) / full)
    f_hi = min(highs)
    assert max(lows, default=0.0) < f_hi
    assert expected_fraction_ranks(eng, f_hi, 1) == ranks
    # ... and the largest such f: the next rank step on any layer breaks the target
    nxt = get_method("uniform").build(net, x, fraction=min(1.0, f_hi * (1 + 1e-9)))
    assert nxt.ranks != ranks and nxt.sr < target


def test_uniform_budget_on_params(resnet):
    net, x = resnet
    eng = get_method("uniform").build(net, x, target_sr=4.0, cost="params")
    cr = ltc.profile(net, x).params / ltc.profile(eng.compressed_model(), x).params
    assert 4.0 <= cr <= 4.0 * 1.03


@pytest.mark.parametrize(
    "kw, err",
    [
        ({"fraction": 0.0}, ValueError),
        ({"fraction": 1.5}, ValueError),
        ({"fraction": -0.1}, ValueError),
        ({"energy": 0.0}, ValueError),
        ({"energy": 1.01}, ValueError),
        ({"fraction": 0.5, "energy": 0.9}, ValueError),
        ({"weaken": 0.5}, TypeError),
        ({"rank": 3}, TypeError),
        ({"target_sr": 1e6}, ValueError),
    ],
)
def test_uniform_bad_options(kw, err):
    with pytest.raises(err):
        get_method("uniform").build(make_net(), X, **kw)


# --------------------------------------------------------------------------------------------- vbmf
@pytest.fixture(scope="module")
def planted():
    net = planted_net()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    return net, x


def own_vbmf_ranks(net: nn.Module, names) -> dict:
    mods = dict(net.named_modules())
    out = {}
    for n in names:
        w = mods[n].weight.detach()
        out[n] = vbmf_tucker2_ranks(w) if is_tucker(mods[n]) else max(1, evbmf(w.reshape(w.shape[0], -1)).rank)
    return out


def full_ranks(eng) -> dict:
    return {n: (s.weight.shape[1], s.weight.shape[0]) if s.scheme.name == "tucker2"
            else min(s.weight.shape[0], s.weight[0].numel()) for n, s in eng.layers.items()}


def test_vbmf_own_ranks_are_evbmf_of_the_unfoldings(planted):
    net, x = planted
    eng = get_method("vbmf").build(net, x, compress_linear=True)
    assert set(eng.layers) == {"c1", "c2", "c3", "c4", "fc"}
    assert eng.ranks == own_vbmf_ranks(net, eng.layers)
    # the planted structure makes the check meaningful: ranks strictly between 1 and full somewhere
    full = full_ranks(eng)
    flat = [(r, f) for n in eng.ranks for r, f in zip(np.atleast_1d(eng.ranks[n]), np.atleast_1d(full[n]),
                                                       strict=True)]
    assert any(1 < r < f for r, f in flat)
    for s in eng.layers.values():  # Θ = Tucker-2 / SVD of the pretrained weights at those ranks
        w = as_np(s.weight)
        proj = hosvd_projection(w, *s.rank) if isinstance(s.rank, tuple) else svd_projection(w, s.rank)
        assert np.abs(as_np(s.theta) - proj).max() <= 1e-4 * np.abs(w).max()


def test_vbmf_ignores_lambda(planted):
    net, x = planted
    assert get_method("vbmf").build(net, x, lam=5.0).ranks == own_vbmf_ranks(net, ["c1", "c2", "c3", "c4"])


def test_vbmf_weaken_one_is_full_rank(planted):
    net, x = planted
    eng = get_method("vbmf").build(net, x, weaken=1.0, compress_linear=True)
    assert eng.ranks == full_ranks(eng)


@pytest.mark.parametrize("weaken", [0.0, 0.2, 0.25, 0.5, 0.75, 0.9])
def test_vbmf_weaken_matches_vbmf_tucker2_ranks(planted, weaken):
    net, x = planted
    eng = get_method("vbmf").build(net, x, weaken=weaken)
    own = own_vbmf_ranks(net, eng.layers)
    full = full_ranks(eng)
    for n, s in eng.layers.items():
        if s.scheme.name == "tucker2":
            assert eng.ranks[n] == vbmf_tucker2_ranks(s.weight.detach(), weaken), (n, weaken)
        else:  # r + round(weaken * (full - r)), halves up like vbmf_tucker2_ranks
            r = own[n]
            assert eng.ranks[n] == min(full[n], r + math.floor(weaken * (full[n] - r) + 0.5)), (n, weaken)


def _weaken_breakpoints(own: dict, full: dict) -> list[float]:
    """Every weakening at which some rank steps up (r + round(w (full - r)) jumps at w = (k - 1/2)/(full - r))."""
    pts = set()
    for n, r in own.items():
        for ri, fi in zip(np.atleast_1d(r), np.atleast_1d(full[n]), strict=True):
            gap = int(fi) - int(ri)
            pts.update((k - 0.5) / gap for k in range(1, gap + 1))
    return sorted(pts)


@pytest.mark.parametrize("frac", [0.15, 0.5, 0.85])
def test_vbmf_target_is_the_largest_weakening_that_meets_it(planted, frac):
    net, x = planted
    own_eng = get_method("vbmf").build(net, x)
    own_sr = own_eng.sr
    assert own_sr > 2.0
    target = 1.0 + frac * (own_sr - 1.0)
    eng = get_method("vbmf").build(net, x, target_sr=target)
    assert eng.sr >= target
    sr_measured = ltc.profile(net, x).macs / ltc.profile(eng.compressed_model(), x).macs
    assert sr_measured == pytest.approx(eng.sr, rel=1e-12)
    # the chosen ranks are those of one weakening interval [b_i, b_i+1); the next one breaks the target
    own, full = own_vbmf_ranks(net, eng.layers), full_ranks(eng)
    pts = [0.0] + [b for b in _weaken_breakpoints(own, full) if b <= 1.0]

    def weakened(w: float) -> dict:
        out = {}
        for n, r in own.items():
            new = [min(f, ri + math.floor(w * (f - ri) + 0.5)) for ri, f in
                   zip(np.atleast_1d(r).tolist(), np.atleast_1d(full[n]).tolist(), strict=True)]
            out[n] = tuple(new) if isinstance(r, tuple) else new[0]
        return out

    idx = [i for i, b in enumerate(pts) if weakened(b + 1e-9) == eng.ranks]
    assert idx, "the target's ranks are no uniform weakening of EVBMF's"
    i = idx[-1]
    at = get_method("vbmf").build(net, x, weaken=pts[i] + 1e-9)
    assert at.ranks == eng.ranks and at.sr >= target
    if i + 1 < len(pts):
        nxt = get_method("vbmf").build(net, x, weaken=min(1.0, pts[i + 1] + 1e-9))
        assert nxt.sr < target
    else:
        assert eng.ranks == full


def test_vbmf_target_beyond_own_ranks_keeps_them_and_warns(planted, caplog):
    net, x = planted
    own = get_method("vbmf").build(net, x)
    with caplog.at_level(logging.WARNING, logger="ltc"):
        eng = get_method("vbmf").build(net, x, target_sr=own.sr * 1.5)
    assert eng.ranks == own.ranks
    assert "short of the target" in caplog.text


@pytest.mark.parametrize("kw, err", [({"weaken": -0.1}, ValueError), ({"weaken": 1.5}, ValueError),
                                     ({"fraction": 0.5}, TypeError)])
def test_vbmf_bad_options(planted, kw, err):
    net, x = planted
    with pytest.raises(err):
        get_method("vbmf").build(net, x, **kw)
