"""Tests for the LC engine (``ltc.engine``: ``LCEngine``, ``LTC``, ``LRC``), SPEC section 3.

The C step is checked against an independent brute force: plain loops over every candidate rank, each
projected by a HOSVD / SVD written here with numpy (not ltc's tensor code), costs from the SPEC section 2
formulas written here, and the objective ``λ·C_k(r)/C_ref + μ/2·err_k(r)`` minimised over the grid plus the
dense option.
"""

from __future__ import annotations

import copy
import io
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ltc
from ltc import models
from ltc.engine import WEIGHTINGS, LCEngine

SETTINGS = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------- models
class Net(nn.Module):
    """Several convs of different kinds: kxk with bias, strided, 1x1 (LTC's matrix scheme), a rectangular
    kernel, then a linear head."""

    def __init__(self, cin: int = 3, a: int = 6, b: int = 7, c: int = 5, d: int = 4, k1: int = 3, bias: bool = True):
        super().__init__()
        self.c1 = nn.Conv2d(cin, a, k1, padding=k1 // 2, bias=bias)
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


class DWNet(nn.Module):
    """A net with a depthwise and a grouped conv between two plain ones."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.g2 = nn.Conv2d(8, 8, 1, groups=2)
        self.c2 = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(self.g2(torch.relu(self.dw(torch.relu(self.c1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


def _decaying(n: int, decay: float) -> torch.Tensor:
    """A random ``n x n`` matrix with singular values ``decay**k``."""
    q = torch.linalg.qr(torch.randn(n, n))[0]
    return q * decay ** torch.arange(n, dtype=torch.float32)


def _net(seed: int = 0, scale: float = 1.0, decay: float = 0.7, **kw: int) -> Net:
    """A :class:`Net` with random weights whose channel spectra decay like ``decay**k`` (so that every
    regime, from min_rank to dense, is reachable with moderate λ and μ)."""
    torch.manual_seed(seed)
    net = Net(**kw)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, scale)
            if p.dim() >= 2:
                w = torch.einsum("ts...,ot->os...", p, _decaying(p.shape[0], decay))
                p.copy_(torch.einsum("ts...,is->ti...", w, _decaying(p.shape[1], decay)))
    return net


X_NET = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------- brute force
def _shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shape of every conv / linear leaf, by our own forward hooks."""
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook(name: str):
        def record(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen.setdefault(name, (tuple(inputs[0].shape), tuple(output.shape)))

        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _dense(mod: nn.Module, shp: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[int, int]:
    """(params, MACs) of the dense layer, SPEC section 2 (bias adds to params)."""
    bias = 0 if mod.bias is None else mod.bias.numel()
    if isinstance(mod, nn.Linear):
        n = mod.in_features * mod.out_features
        return n + bias, n
    t, s, kh, kw = mod.weight.shape
    h_out, w_out = shp[1][2:]
    return t * s * kh * kw + bias, h_out * w_out * t * s * kh * kw


def _options(mod: nn.Module, shp, z: np.ndarray, min_rank: int, matrix_convs: bool) -> list[tuple]:
    """``[(rank, params, macs, err, theta)]`` for every rank of the grid, by plain loops and numpy SVDs."""
    bias = 0 if mod.bias is None else mod.bias.numel()
    out = []
    if isinstance(mod, nn.Linear) or matrix_convs or tuple(mod.kernel_size) == (1, 1):
        m = z.reshape(z.shape[0], -1)
        u, sv, vh = np.linalg.svd(m, full_matrices=False)
        if isinstance(mod, nn.Linear):
            width, pix = m.shape[0] + m.shape[1], 1
        else:
            width, pix = m.shape[1] + m.shape[0], shp[1][2] * shp[1][3]  # S·kh·kw + T, H_out·W_out
        for r in range(min(min_rank, len(sv)), len(sv) + 1):
            theta = (u[:, :r] * sv[:r]) @ vh[:r]
            err = float(((m - theta) ** 2).sum())
            out.append((r, r * width + bias, pix * r * width, err, theta.reshape(z.shape)))
        return out
    t, s, kh, kw = z.shape
    h_in, w_in = shp[0][2:]
    h_out, w_out = shp[1][2:]
    u_full = np.linalg.svd(z.reshape(t, -1), full_matrices=False)[0]
    v_full = np.linalg.svd(z.transpose(1, 0, 2, 3).reshape(s, -1), full_matrices=False)[0]
    for r_in in range(min(min_rank, s), s + 1):
        for r_out in range(min(min_rank, t), t + 1):
            u, v = u_full[:, :r_out], v_full[:, :r_in]
            core = np.einsum("tsab,to,si->oiab", z, u, v)
            theta = np.einsum("oiab,to,si->tsab", core, u, v)
            err = float(((z - theta) ** 2).sum())
            params = s * r_in + r_in * r_out * kh * kw + r_out * t + bias
            macs = h_in * w_in * s * r_in + h_out * w_out * (r_in * r_out * kh * kw + r_out * t)
            out.append(((r_in, r_out), params, macs, err, theta))
    return out


def _brute_force_check(
    comp: LCEngine,
    model: nn.Module,
    x: torch.Tensor,
    z: dict[str, torch.Tensor],
    lam: float,
    mu: float,
    kind: str,
    min_rank: int,
    matrix_convs: bool,
    weights: dict[str, float] | None = None,
) -> dict[str, object]:
    """Assert that ``comp``'s ranks, errors and Θ are those of the brute-force argmin on ``z`` of
    ``λ·C/C_ref + μ/2·w·err`` (``weights``: the layers' ``w``, default 1); return the brute-force ranks."""
    shp = _shapes(model, x)
    mods = dict(model.named_modules())
    k = 0 if kind == "params" else 1
    dense = {n: _dense(mods[n], shp[n]) for n in comp.ranks}
    c_ref = sum(d[k] for d in dense.values())
    best_ranks = {}
    for n in comp.ranks:
        zn = z[n].detach().to(torch.float64).numpy()
        opts = _options(mods[n], shp[n], zn, min_rank, matrix_convs)
        opts.append((None, dense[n][0], dense[n][1], 0.0, zn))
        wn = 1.0 if weights is None else weights[n]
        obj = [lam * o[1 + k] / c_ref + 0.5 * mu * wn * o[3] for o in opts]
        best = min(obj)
        energy = float((zn**2).sum())
        tol = 1e-9 * (abs(best) + mu * wn * energy + 1e-300)
        winners = [o[0] for o, v in zip(opts, obj, strict=True) if v <= best + tol]
        chosen = comp.ranks[n]
        assert chosen in winners, (n, chosen, winners, lam, mu, kind)
        best_ranks[n] = winners[0] if len(winners) == 1 else chosen
        opt = next(o for o in opts if o[0] == chosen)
        s = comp.layers[n]
        assert s.err == pytest.approx(opt[3], rel=1e-6, abs=1e-9 * energy + 1e-12)
        theta = s.theta.detach().to(torch.float64).numpy()
        assert np.abs(theta - opt[4]).max() <= 1e-5 * max(np.abs(zn).max(), 1e-30)
    return best_ranks


def _cost_of(comp: LCEngine, kind: str) -> int:
    return comp.macs if kind == "macs" else comp.params


# --------------------------------------------------------------------------------------------- 1. C step
@settings(SETTINGS, max_examples=30)
@given(
    cin=st.integers(1, 4),
    a=st.integers(1, 7),
    b=st.integers(1, 6),
    c=st.integers(1, 5),
    d=st.integers(1, 5),
    k1=st.sampled_from([1, 3, 5]),
    bias=st.booleans(),
    log_lam=st.floats(-6, 2),
    log_mu=st.floats(-4, 2),
    kind=st.sampled_from(["macs", "params"]),
    min_rank=st.integers(1, 2),
    lrc=st.booleans(),
    relative=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_c_step_is_the_brute_force_argmin(
    cin, a, b, c, d, k1, bias, log_lam, log_mu, kind, min_rank, lrc, relative, seed
):
    lam, mu = 10.0**log_lam, 10.0**log_mu
    model = _net(seed, cin=cin, a=a, b=b, c=c, d=d, k1=k1, bias=bias)
    with torch.no_grad():  # layers of very different weight scales, as BatchNorm allows
        for i, name in enumerate(("c1", "c2", "c3", "c4", "fc")):
            getattr(model, name).weight.mul_(4.0 ** (i - 2))
    x = torch.randn(1, cin, 9, 9)
    cls = ltc.LRC if lrc else ltc.LTC
    weighting = "relative" if relative else "absolute"
    comp = cls(model, x, lam=lam, mu0=mu, cost=kind, compress_linear=True, min_rank=min_rank, mu_growth=1.5,
               weighting=weighting)
    assert set(comp.ranks) == {"c1", "c2", "c3", "c4", "fc"}
    z0 = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
    # w_k = mean_j ‖W_j‖² / ‖W_k‖² on the reference weights (relative), else 1
    sq = {n: float(z0[n].double().square().sum()) for n in z0}
    w = {n: (sum(sq.values()) / len(sq)) / sq[n] if relative else 1.0 for n in z0}
    _brute_force_check(comp, model, x, z0, lam, mu, kind, min_rank, lrc, w)

    # An L step moves W; step() runs a C step at μ0 with φ = 0, then φ ← -μ0 (W - Θ), μ ← 1.5 μ0.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    comp.step()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    mu1 = comp.mu
    assert mu1 == pytest.approx(1.5 * mu)
    phi1 = {n: s.phi.clone() for n, s in comp.layers.items()}
    w2 = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
    z1 = {n: w2[n] - phi1[n] / (mu1 * w[n]) for n in comp.layers}  # the SPEC's Z = W - φ/μ, μ_k = μ w_k
    comp.step()
    _brute_force_check(comp, model, x, z1, lam, mu1, kind, min_rank, lrc, w)
    for n, s in comp.layers.items():  # multipliers: φ ← φ - μ w (W - Θ)
        torch.testing.assert_close(s.phi, phi1[n] - mu1 * w[n] * (w2[n] - s.theta), rtol=1e-5, atol=1e-5)
    assert comp.mu == pytest.approx(1.5 * mu1)


@settings(SETTINGS, max_examples=25)
@given(
    log_scales=st.lists(st.floats(-3, 3), min_size=4, max_size=4),
    target=st.sampled_from([2.0, 4.0]),
    lrc=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_relative_weighting_ignores_each_layers_weight_scale(log_scales, target, lrc, seed):
    """With BatchNorm after a conv, scaling its weights changes nothing the network computes; with
    ``weighting='relative'`` it changes nothing the budget-mode C step chooses either (same ranks, Θ scaled
    alike). (In λ mode the common factor ``mean_j ‖W_j‖²`` acts like a change of μ, as with absolute errors.)"""
    model = _net(seed, a=6, b=7, c=5)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for name, ls in zip(("c1", "c2", "c3", "c4"), log_scales, strict=True):
            getattr(scaled, name).weight.mul_(10.0**ls)
    cls = ltc.LRC if lrc else ltc.LTC
    a = cls(model, X_NET, mu0=0.1, weighting="relative", target_sr=target)
    b = cls(scaled, X_NET, mu0=0.1, weighting="relative", target_sr=target)
    assert a.ranks == b.ranks
    for (name, sa), ls in zip(a.layers.items(), log_scales, strict=True):
        sb = b.layers[name]
        torch.testing.assert_close(sb.theta, sa.theta * 10.0**ls, rtol=1e-4, atol=1e-6 * 10.0**ls)
        assert sb.err == pytest.approx(sa.err * 100.0**ls, rel=1e-6, abs=1e-12 * 100.0**ls)


def test_absolute_weighting_starves_small_scale_layers():
    """The failure ``'relative'`` mends: under ``'absolute'`` a layer whose weights are 100x smaller gets
    min_rank at a budget where ``'relative'`` gives it more."""
    model = _net(5, a=8, b=8, c=6, d=6)
    with torch.no_grad():
        model.c2.weight.mul_(0.01)
    ranks = {w: ltc.LTC(model, X_NET, target_sr=3.0, mu0=0.1, weighting=w).ranks["c2"] for w in WEIGHTINGS}
    assert ranks["absolute"] == (1, 1)
    assert ranks["relative"] != (1, 1)


def test_penalty_is_the_weighted_augmented_term():
    """``penalty() = μ/2 Σ w_k ‖W_k − Θ_k − φ_k/(μ w_k)‖²`` with ``w_k = mean_j ‖W_j‖² / ‖W_k‖²``."""
    model = _net(2, a=6, b=7, c=5)
    comp = ltc.LTC(model, X_NET, lam=0.05, mu0=0.1, weighting="relative")
    sq = {n: float(s.weight.detach().double().square().sum()) for n, s in comp.layers.items()}
    w = {n: sum(sq.values()) / len(sq) / sq[n] for n in sq}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    comp.step()
    expect = 0.5 * comp.mu * sum(
        w[n] * float((s.weight.detach().double() - s.theta.double() - s.phi.double() / (comp.mu * w[n])).square().sum())
        for n, s in comp.layers.items()
    )
    assert float(comp.penalty()) == pytest.approx(expect, rel=1e-5)
    assert {n: s.scale for n, s in comp.layers.items()} == pytest.approx(w, rel=1e-9)


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_c_step_regimes_dense_min_rank_and_mixed(kind):
    """The brute force agrees where the dense option wins everywhere, where min_rank wins everywhere, and in
    between (a mix of dense, intermediate and min ranks)."""
    model = _net(3, a=8, b=8, c=6, d=6)
    seen: set[str] = set()
    for lam, mu, min_rank, expect in [
        (1e-8, 10.0, 1, "dense"),
        (100.0, 1e-4, 1, "min"),
        (100.0, 1e-4, 2, "min"),
        (0.02, 0.01, 1, None),
        (0.05, 0.003, 1, None),
        (0.3, 0.03, 2, None),
    ]:
        comp = ltc.LTC(model, X_NET, lam=lam, mu0=mu, cost=kind, compress_linear=True, min_rank=min_rank,
                       weighting="absolute")
        z = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
        _brute_force_check(comp, model, X_NET, z, lam, mu, kind, min_rank, False)
        r = comp.ranks
        if expect == "dense":
            assert all(v is None for v in r.values())
        elif expect == "min":
            assert r == {
                "c1": (min_rank, min_rank),
                "c2": (min_rank, min_rank),
                "c3": min_rank,
                "c4": (min_rank, min_rank),
                "fc": min_rank,
            }
        for v in r.values():
            seen.add("dense" if v is None else "min" if v in ((1, 1), 1) else "mid")
    assert seen == {"dense", "min", "mid"}


# --------------------------------------------------------------------------------------------- 2. monotone
@settings(SETTINGS, max_examples=6)
@given(seed=st.integers(0, 2**20), kind=st.sampled_from(["macs", "params"]), lrc=st.booleans())
def test_ranks_move_the_expected_way(seed, kind, lrc):
    model = _net(seed, a=8, b=8, c=6, d=6)
    cls = ltc.LRC if lrc else ltc.LTC
    costs = []
    for lam in np.logspace(-4, 1.5, 12):
        comp = cls(model, X_NET, lam=float(lam), mu0=0.01, cost=kind, compress_linear=True)
        costs.append(_cost_of(comp, kind))
    assert all(c1 >= c2 for c1, c2 in zip(costs, costs[1:], strict=False)), costs
    assert costs[0] > costs[-1]
    errs, costs = [], []
    for mu in np.logspace(-4, 1, 12):
        comp = cls(model, X_NET, lam=0.05, mu0=float(mu), cost=kind, compress_linear=True)
        errs.append(sum(s.err for s in comp.layers.values()))
        costs.append(_cost_of(comp, kind))
    assert all(e1 >= e2 - 1e-9 * errs[0] for e1, e2 in zip(errs, errs[1:], strict=False)), errs
    assert all(c1 <= c2 for c1, c2 in zip(costs, costs[1:], strict=False)), costs
    assert errs[0] > errs[-1]


# --------------------------------------------------------------------------------------------- 3. budget
@settings(SETTINGS, max_examples=150)
@given(
    pts=st.lists(st.tuples(st.integers(1, 30), st.integers(0, 20)), min_size=1, max_size=60),
    dense=st.integers(1, 35),
)
def test_lower_hull_is_the_convex_pareto_front(pts, dense):
    """``_lower_hull`` (vectorised) against the definition: vertices are options, costs strictly rise,
    errors strictly fall, slopes strictly flatten, it starts at the cheapest option and ends at the
    smallest error, and no option lies below it."""
    from ltc.engine import _lower_hull
    from ltc.schemes import Candidates

    cost = torch.tensor([float(c) for c, _ in pts], dtype=torch.float64)
    err = torch.tensor([float(e) for _, e in pts], dtype=torch.float64)
    cand = Candidates((len(pts),), (1,), cost, cost, err, dense, dense, None)
    hull = _lower_hull(cand, "macs")
    options = [(float(c), float(e)) for c, e in pts] + [(float(dense), 0.0)]
    for c, e, k in hull:
        assert (c, e) == ((float(dense), 0.0) if k is None else options[k])
    xs, ys = [h[0] for h in hull], [h[1] for h in hull]
    assert all(a < b for a, b in zip(xs, xs[1:], strict=False))
    assert all(a > b for a, b in zip(ys, ys[1:], strict=False))
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    assert all(a < b for a, b in zip(slopes, slopes[1:], strict=False))
    assert xs[0] == min(c for c, _ in options)
    assert ys[0] == min(e for c, e in options if c == xs[0])
    assert ys[-1] == min(e for _, e in options)
    assert xs[-1] == min(c for c, e in options if e == ys[-1])
    for c, e in options:  # nothing below the polyline (beyond its right end the error is already minimal)
        if c <= xs[-1]:
            assert e >= float(np.interp(c, xs, ys)) - 1e-12


def _small_cnn(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return models.create("small_cnn", num_classes=10, in_channels=1), torch.randn(2, 1, 28, 28)


def _resnet(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return models.create("resnet34_cifar", num_classes=10, width=0.25), torch.randn(2, 3, 32, 32)


def _noise_step(comp: LCEngine, model: nn.Module, gen: torch.Generator, scale: float = 0.05) -> None:
    """A stand-in for an L step: move every weight a little, then the C step."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    comp.step()


@pytest.mark.parametrize("build", [_small_cnn, _resnet], ids=["small_cnn", "resnet34_cifar_w0.25"])
@pytest.mark.parametrize("target", [2.0, 5.0, 10.0])
def test_budget_mode_meets_target_sr(build, target):
    model, x = build()
    comp = ltc.LTC(model, x, target_sr=target)
    assert target <= comp.sr <= 1.03 * target
    # λ: the λ-mode C step at comp.lam gives the hull solution, within the budget; any smaller λ overshoots
    assert ltc.LTC(copy.deepcopy(model), x, lam=comp.lam).sr >= target
    assert ltc.LTC(copy.deepcopy(model), x, lam=comp.lam * (1 - 1e-3)).sr < target
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        _noise_step(comp, model, gen)
        assert target <= comp.sr <= 1.03 * target
        assert ltc.profile(comp.compressed_model(), x).macs == comp.macs
    assert len(comp.history) == 4 and all(h["lam"] > 0 for h in comp.history)
    assert comp.history[-1]["sr"] == comp.sr


@pytest.mark.parametrize("build,targets", [(_small_cnn, np.linspace(1.5, 12, 10)), (_resnet, [1.7, 3.3, 7.7])])
def test_budget_lambda_is_the_smallest_lambda_within_budget(build, targets):
    """comp.lam reproduces a within-budget solution in plain λ mode (no tie at the refused hull segment left
    to rounding), and any smaller λ overshoots the budget."""
    model, x = build(1)
    for target in targets:
        comp = ltc.LTC(model, x, target_sr=float(target))
        assert target <= comp.sr <= 1.03 * target
        assert ltc.LTC(model, x, lam=comp.lam).sr >= target
        assert ltc.LTC(model, x, lam=comp.lam * (1 - 1e-3)).sr < target


@pytest.mark.parametrize("target", [2.0, 5.0])
def test_budget_mode_meets_target_cr(target):
    model, x = _small_cnn(1)
    comp = ltc.LTC(model, x, target_sr=target, cost="params")
    assert target <= comp.cr <= 1.03 * target
    assert ltc.profile(comp.compressed_model(), x).params == comp.params
    _noise_step(comp, model, torch.Generator().manual_seed(3))
    assert target <= comp.cr <= 1.03 * target


def test_unreachable_target_says_what_is_reachable():
    model, x = _small_cnn()
    with pytest.raises(ValueError, match=r"out of reach.*reaches \d"):
        ltc.LTC(model, x, target_sr=1e4)
    with pytest.raises(ValueError, match=r"CR .*reaches \d"):
        ltc.LTC(model, x, target_sr=1e4, cost="params")


# --------------------------------------------------------------------------------------------- 4. deploy
def _theta_model(comp: LCEngine, model: nn.Module) -> nn.Module:
    """The original architecture carrying Θ as weights (dense layers keep W)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, s in comp.layers.items():
            if s.rank is not None:
                ref.get_submodule(n).weight.copy_(s.theta)
    return ref.eval()


def _check_deployed(comp: LCEngine, model: nn.Module, x: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    small = comp.compressed_model().eval()
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        ref_out = _theta_model(comp, model)(x)
        out = small(x)
    assert out.shape == ref_out.shape
    assert (out - ref_out).abs().max() <= 1e-4 * ref_out.abs().max()
    for n, s in comp.layers.items():
        sub = small.get_submodule(n)
        if s.rank is None:
            assert type(sub) is type(model.get_submodule(n))
            assert torch.equal(sub.weight, model.get_submodule(n).weight)
        elif isinstance(s.rank, tuple):
            assert isinstance(sub, ltc.Tucker2Conv2d) and sub.ranks == s.rank
        elif isinstance(model.get_submodule(n), nn.Linear):
            assert isinstance(sub, ltc.LowRankLinear) and sub.rank == s.rank
        else:
            assert isinstance(sub, ltc.MatrixLowRankConv2d) and sub.rank == s.rank
    prof = ltc.profile(small, x)
    assert prof.macs == comp.macs
    assert prof.params == comp.params


def test_compressed_model_equals_theta_weights_net():
    model = _net(4, a=8, b=8, c=6, d=6)
    comp = ltc.LTC(model, X_NET, lam=1.0, mu0=0.1, compress_linear=True, weighting="absolute")
    kinds = {type(r) for r in comp.ranks.values()}
    assert kinds == {tuple, int, type(None)}  # Tucker-2, matrix/SVD and dense layers all present
    _check_deployed(comp, model, X_NET)
    _noise_step(comp, model, torch.Generator().manual_seed(0), scale=0.2)  # φ ≠ 0: dense layers keep W ≠ Θ
    _check_deployed(comp, model, X_NET)
    # factors rebuilt from Θ alone (after a state round trip) deploy the same network
    fresh = ltc.LTC(model, X_NET, lam=1.0, mu0=0.1, compress_linear=True, weighting="absolute")
    fresh.load_state_dict(comp.state_dict())
    _check_deployed(fresh, model, X_NET)


def test_compressed_model_equals_theta_weights_resnet():
    model, x = _resnet(2)
    model.eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    comp = ltc.LTC(model, x, target_sr=5.0, compress_linear=True)
    assert isinstance(comp.ranks["fc"], int | None)
    _check_deployed(comp, model, x)
    _noise_step(comp, model, torch.Generator().manual_seed(1))
    _check_deployed(comp, model, x)


# --------------------------------------------------------------------------------------------- 5. linears
def test_linears_compressed_only_with_compress_linear():
    model = _net(1)
    off = ltc.LTC(model, X_NET, lam=10.0)
    assert "fc" not in off.ranks and "fc" not in off.layers
    assert type(off.compressed_model().fc) is nn.Linear
    on = ltc.LTC(model, X_NET, lam=10.0, compress_linear=True)
    assert on.layers["fc"].scheme.name == "svd"
    assert isinstance(on.ranks["fc"], int)
    assert isinstance(on.compressed_model().fc, ltc.LowRankLinear)
    cnn, x = _small_cnn()
    assert "classifier" in ltc.LTC(cnn, x, target_sr=3, compress_linear=True).ranks
    assert "classifier" not in ltc.LTC(cnn, x, target_sr=3).ranks


# --------------------------------------------------------------------------------------------- 6. state
def _batch(step: int, it: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + it)
    return torch.randn(8, 3, 10, 10, generator=g), torch.randint(0, 4, (8,), generator=g)


def _setup(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _net(seed, scale=0.3)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)


def _lc_steps(model: nn.Module, opt: torch.optim.Optimizer, comp: LCEngine, steps: range) -> None:
    for step in steps:
        for it in range(3):
            x, y = _batch(step, it)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y) + comp.penalty()
            loss.backward()
            opt.step()
        comp.step()


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_state_dict_round_trip_resumes_bit_identically():
    n_steps, k = 5, 2
    kw = dict(target_sr=2.0, compress_linear=True, mu0=0.05)
    model_a, opt_a = _setup(0)
    comp_a = ltc.LTC(model_a, X_NET, **kw)
    _lc_steps(model_a, opt_a, comp_a, range(n_steps))

    model_b, opt_b = _setup(0)
    comp_b = ltc.LTC(model_b, X_NET, **kw)
    _lc_steps(model_b, opt_b, comp_b, range(k))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "comp": comp_b.state_dict()}, buf)
    del model_b, opt_b, comp_b
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_c, opt_c = _setup(99)  # another init: everything must come from the checkpoint
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    comp_c = ltc.LTC(model_c, X_NET, **kw)
    comp_c.load_state_dict(saved["comp"])
    assert comp_c.steps_done == k and len(comp_c.history) == k + 1
    _lc_steps(model_c, opt_c, comp_c, range(k, n_steps))

    for (na, pa), (nc, pc) in zip(model_a.named_parameters(), model_c.named_parameters(), strict=True):
        assert na == nc and torch.equal(pa, pc), na
    for n in comp_a.layers:
        assert torch.equal(comp_a.layers[n].theta, comp_c.layers[n].theta)
        assert torch.equal(comp_a.layers[n].phi, comp_c.layers[n].phi)
    assert comp_a.ranks == comp_c.ranks
    assert (comp_a.mu, comp_a.lam, comp_a.steps_done) == (comp_c.mu, comp_c.lam, comp_c.steps_done)
    assert _strip(comp_a.history) == _strip(comp_c.history)
    assert len({str(h["ranks"]) for h in comp_a.history}) > 1  # the ranks did move along the way


def test_state_of_another_model_is_refused():
    comp = ltc.LTC(_net(0), X_NET, lam=0.05)
    other_names = ltc.LTC(*_small_cnn(), lam=0.05)
    with pytest.raises(ValueError, match="another model"):
        other_names.load_state_dict(comp.state_dict())
    other_shapes = ltc.LTC(_net(0, a=5), X_NET, lam=0.05)  # same layer names, other shapes
    with pytest.raises(ValueError, match="another model"):
        other_shapes.load_state_dict(comp.state_dict())
    with pytest.raises(ValueError, match="cost"):
        ltc.LTC(_net(0), X_NET, lam=0.05, cost="params").load_state_dict(comp.state_dict())
    bad = comp.state_dict()
    bad["version"] = 999
    with pytest.raises(ValueError, match="version"):
        comp.load_state_dict(bad)


# --------------------------------------------------------------------------------------------- 7. selection
X_DW = torch.randn(1, 3, 8, 8)


def test_grouped_convs_stay_dense_with_a_message(caplog):
    caplog.set_level(logging.INFO, logger="ltc")
    model = DWNet()
    comp = ltc.LTC(model, X_DW, lam=0.01, compress_linear=True)
    assert set(comp.ranks) == {"c1", "c2", "fc"}
    messages = [r.getMessage() for r in caplog.records]
    for name in ("dw", "g2"):
        assert any(name in m and "grouped" in m and "dense" in m for m in messages), messages
    small = comp.compressed_model()
    assert type(small.dw) is nn.Conv2d and torch.equal(small.dw.weight, model.dw.weight)
    assert type(small.g2) is nn.Conv2d and torch.equal(small.g2.weight, model.g2.weight)
    assert ltc.profile(small, X_DW).macs == comp.macs


def test_include_exclude(caplog):
    model = DWNet()
    with pytest.raises(ValueError, match="matches no"):
        ltc.LTC(model, X_DW, lam=0.01, include="nothing*")
    with pytest.raises(ValueError, match="matches no"):
        ltc.LTC(model, X_DW, lam=0.01, exclude=["c1", "nothing*"])
    caplog.set_level(logging.INFO, logger="ltc")
    comp = ltc.LTC(model, X_DW, lam=0.01, include=["dw", "c1"])
    assert set(comp.ranks) == {"c1"}
    assert any("dw" in r.getMessage() and "grouped" in r.getMessage() for r in caplog.records)
    assert type(comp.compressed_model().dw) is nn.Conv2d
    with pytest.raises(ValueError, match="no layer left"):
        ltc.LTC(model, X_DW, lam=0.01, include="dw")
    assert set(ltc.LTC(model, X_DW, lam=0.01, exclude="c2").ranks) == {"c1"}
    assert set(ltc.LTC(model, X_DW, lam=0.01, include="c*", exclude="c1").ranks) == {"c2"}
    assert set(ltc.LTC(model, X_DW, lam=0.01, include="fc").ranks) == {"fc"}  # explicit include of a linear


@pytest.mark.parametrize(
    "kw",
    [
        dict(lam=0.1, target_sr=2.0),
        dict(),
        dict(lam=-1.0),
        dict(lam=math.nan),
        dict(lam=0.1, mu0=0.0),
        dict(lam=0.1, mu0=-1e-3),
        dict(target_sr=0.5),
        dict(target_sr=math.inf),
        dict(lam=0.1, mu_growth=0.9),
        dict(lam=0.1, cost="flops"),
        dict(lam=0.1, min_rank=0),
    ],
)
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        ltc.LTC(_net(0), X_NET, **kw)


# --------------------------------------------------------------------------------------------- 8. converged
@pytest.mark.parametrize("cls,lam", [(ltc.LTC, 100.0), (ltc.LRC, 0.2), (ltc.LTC, 0.2)])
def test_converged_once_weights_sit_on_theta(cls, lam):
    model = _net(4, a=8, b=8, c=6, d=6)
    comp = cls(model, X_NET, lam=lam, mu0=0.01, compress_linear=True)
    assert any(r is not None for r in comp.ranks.values())
    assert not comp.converged  # random weights are far from Θ
    for _ in range(6 if cls is ltc.LTC and lam < 1 else 1):
        # W := Θ, φ := 0, step twice. At min_rank (LTC, λ=100) and for the matrix scheme (LRC) the C step
        # reproduces Θ at once; a Tucker-2 Θ's own HOSVD can prefer other ranks, so it may take a few rounds.
        with torch.no_grad():
            for s in comp.layers.values():
                s.weight.copy_(s.theta)
                s.phi.zero_()
        comp.step()
        comp.step()
        if comp.converged:
            break
    assert comp.converged
    assert comp.history[-1]["ranks"] == comp.history[-2]["ranks"]
    assert comp.distance() < comp.tol
    with torch.no_grad():
        model.c2.weight.add_(1.0)
    assert not comp.converged


def test_not_converged_after_construction_even_if_all_dense():
    comp = ltc.LTC(_net(0), X_NET, lam=1e-8, mu0=10.0)
    assert all(r is None for r in comp.ranks.values())
    assert not comp.converged
    comp.step()
    assert comp.converged  # all dense: Θ = W, φ = 0 and the ranks did not change


# --------------------------------------------------------------------------------------------- threads
def test_layer_thread_pool_matches_serial_and_restores_threads():
    """With several intra-op threads the C step spreads the layers over a worker pool; the result is the
    serial one, bit for bit, and the caller's thread count is restored."""
    model, x = _resnet(3)
    results = []
    for n_threads in (1, 2):
        torch.set_num_threads(n_threads)
        try:
            comp = ltc.LTC(copy.deepcopy(model), x, target_sr=4.0, compress_linear=True)
            assert torch.get_num_threads() == n_threads
            comp.step()
            assert torch.get_num_threads() == n_threads
            results.append(comp)
        finally:
            torch.set_num_threads(1)
    serial, pooled = results
    assert serial.ranks == pooled.ranks and serial.lam == pooled.lam
    for n in serial.layers:
        assert torch.equal(serial.layers[n].theta, pooled.layers[n].theta), n
        assert torch.equal(serial.layers[n].phi, pooled.layers[n].phi), n


def test_hooi_sweeps_record_their_own_error():
    """With ``n_iter > 0`` Θ comes from HOOI at the chosen ranks: its recorded error is the true ‖Z − Θ‖²,
    no larger than the truncated HOSVD's (the table's)."""
    model = _net(6, a=8, b=8, c=6, d=6)
    hosvd = ltc.LTC(model, X_NET, lam=1.0, mu0=0.03)
    hooi = ltc.LTC(model, X_NET, lam=1.0, mu0=0.03, n_iter=3)
    assert hooi.ranks == hosvd.ranks
    tucker = [n for n, r in hooi.ranks.items() if isinstance(r, tuple)]
    assert tucker
    for n in tucker:
        s = hooi.layers[n]
        true = float((s.weight.detach().double() - s.theta.double()).square().sum())
        assert s.err == pytest.approx(true, rel=1e-9)
        assert s.err <= hosvd.layers[n].err * (1 + 1e-6)
