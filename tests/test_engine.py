"""Tests for the LC engine (``ltc.engine``: ``LCEngine``, ``LTC``, ``LRC``), SPEC section 3.

The C step is checked against an independent brute force: plain loops over every candidate rank, each
projected by a HOSVD / SVD written here with numpy (not ltc's tensor code), costs from the SPEC section 2
formulas written here, and the objective ``λ·C_k(r)/C_ref + μ/2·w_k·err_k(r)`` minimised over the grid plus the
dense option. For the data metric the same brute force runs in whitened coordinates ``Z ×_in L`` with ``L`` the
Cholesky factor of the layers' input second moments, measured here by our own forward hooks.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ltc
from ltc import models
from ltc.engine import ENGINE_STATE_VERSION, LTC, EngineSettings, LCEngine
from ltc.metrics import Whitening
from ltc.schemes import Candidates, rank_values

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


def _grid(full: int, min_rank: int, multiple: int) -> list[int]:
    """The ranks allowed on an axis of size ``full``: ``min_rank..full``, multiples of ``multiple``, and ``full``."""
    return [r for r in range(min(min_rank, full), full + 1) if r % multiple == 0 or r == full]


def _mode(mod: nn.Module, matrix_convs: bool) -> str:
    """Which input features the data metric whitens: unfolded patches for a kxk conv under the matrix scheme."""
    kxk = isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) != (1, 1)
    return "patch" if (kxk and matrix_convs) else "channel"


def _right(x: np.ndarray, m: np.ndarray, mode: str) -> np.ndarray:
    """``x ×_in m``: the input-channel (or whole-patch) mode of a weight times ``m``."""
    if x.ndim == 2 or mode == "patch":
        return (x.reshape(x.shape[0], -1) @ m).reshape(x.shape)
    return np.einsum("tsab,sr->trab", x, m)


def _input_moments(model: nn.Module, data: torch.Tensor, names, matrix_convs: bool,
                   centered: bool = True) -> dict[str, np.ndarray]:
    """The covariance (``centered``, the engine's default) or ``E[x xᵀ]`` of each layer's input features (pixels'
    channel vectors, unfolded patches, or rows), float64, by our own hooks."""
    mods = dict(model.named_modules())
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def hook(name: str):
        def record(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].detach().double()
            if isinstance(mod, nn.Linear):
                r = x.reshape(-1, x.shape[-1])
            elif _mode(mod, matrix_convs) == "patch":
                cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
                r = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            else:
                r = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            rows[name].append(r.numpy())

        return record

    hooks = [mods[n].register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(data)
    for h in hooks:
        h.remove()
    out = {}
    for n, rs in rows.items():
        r = np.concatenate(rs)
        if centered:
            r = r - r.mean(0)
        out[n] = r.T @ r / r.shape[0]
    return out


def _whitening(sigma: np.ndarray, damping: float) -> np.ndarray:
    """``L`` with ``L Lᵀ = Σ / mean(diag Σ) + damping·I`` (the data metric's normalisation; a layer whose inputs
    are all zero, behind dead ReLUs, keeps ``Σ = damping·I``)."""
    mean = float(np.mean(np.diag(sigma)))
    s = 0.5 * (sigma + sigma.T) / (mean if mean > 0 else 1.0) + damping * np.eye(len(sigma))
    return np.linalg.cholesky(s)


def _data_metric(model: nn.Module, data: torch.Tensor, names, matrix_convs: bool, damping: float = 0.01,
                 centered: bool = True):
    """``{layer: L}`` of the data metric on ``data``."""
    return {n: _whitening(s, damping) for n, s in _input_moments(model, data, names, matrix_convs, centered).items()}


def _options(mod: nn.Module, shp, z: np.ndarray, min_rank: int, matrix_convs: bool, multiple: int = 1,
             L: np.ndarray | None = None) -> list[tuple]:
    """``[(rank, params, macs, err, theta)]`` for every rank of the grid, by plain loops and numpy SVDs.

    With ``L`` (data metric) the projection is taken of ``Z ×_in L``, ``err`` is measured there and ``Θ`` is
    mapped back with ``×_in L⁻¹``."""
    bias = 0 if mod.bias is None else mod.bias.numel()
    mode = _mode(mod, matrix_convs)
    zw = z if L is None else _right(z, L, mode)

    def back(theta_w: np.ndarray) -> np.ndarray:
        return theta_w if L is None else _right(theta_w, np.linalg.inv(L), mode)

    out = []
    if isinstance(mod, nn.Linear) or matrix_convs or tuple(mod.kernel_size) == (1, 1):
        m = zw.reshape(zw.shape[0], -1)
        u, sv, vh = np.linalg.svd(m, full_matrices=False)
        if isinstance(mod, nn.Linear):
            width, pix = m.shape[0] + m.shape[1], 1
        else:
            width, pix = m.shape[1] + m.shape[0], shp[1][2] * shp[1][3]  # S·kh·kw + T, H_out·W_out
        for r in _grid(len(sv), min_rank, multiple):
            theta = (u[:, :r] * sv[:r]) @ vh[:r]
            err = float(((m - theta) ** 2).sum())
            out.append((r, r * width + bias, pix * r * width, err, back(theta.reshape(z.shape))))
        return out
    t, s, kh, kw = zw.shape
    h_in, w_in = shp[0][2:]
    h_out, w_out = shp[1][2:]
    u_full = np.linalg.svd(zw.reshape(t, -1), full_matrices=False)[0]
    v_full = np.linalg.svd(zw.transpose(1, 0, 2, 3).reshape(s, -1), full_matrices=False)[0]
    for r_in in _grid(s, min_rank, multiple):
        for r_out in _grid(t, min_rank, multiple):
            u, v = u_full[:, :r_out], v_full[:, :r_in]
            core = np.einsum("tsab,to,si->oiab", zw, u, v)
            theta = np.einsum("oiab,to,si->tsab", core, u, v)
            err = float(((zw - theta) ** 2).sum())
            params = s * r_in + r_in * r_out * kh * kw + r_out * t + bias
            macs = h_in * w_in * s * r_in + h_out * w_out * (r_in * r_out * kh * kw + r_out * t)
            out.append(((r_in, r_out), params, macs, err, back(theta)))
    return out


def _all_options(comp: LCEngine, model: nn.Module, x: torch.Tensor, z: dict[str, torch.Tensor], kind: str,
                 min_rank: int, matrix_convs: bool, multiple: int = 1, metric: dict[str, np.ndarray] | None = None):
    """``({layer: [(rank, cost, err, theta)] + [dense]}, C_ref, {layer: dense cost})`` for ``comp``'s layers."""
    shp = _shapes(model, x)
    mods = dict(model.named_modules())
    k = 0 if kind == "params" else 1
    dense = {n: _dense(mods[n], shp[n])[k] for n in comp.ranks}
    table = {}
    for n in comp.ranks:
        zn = z[n].detach().to(torch.float64).numpy()
        opts = _options(mods[n], shp[n], zn, min_rank, matrix_convs, multiple, None if metric is None else metric[n])
        table[n] = [(o[0], o[1 + k], o[3], o[4]) for o in opts] + [(None, dense[n], 0.0, zn)]
    return table, float(sum(dense.values())), dense


def _energy(z: np.ndarray, L: np.ndarray | None, mode: str) -> float:
    return float(((z if L is None else _right(z, L, mode)) ** 2).sum())


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
    *,
    multiple: int = 1,
    metric: dict[str, np.ndarray] | None = None,
    rtol: float = 1e-9,
    err_rtol: float = 1e-6,
    theta_rtol: float = 1e-5,
) -> dict[str, object]:
    """Assert that ``comp``'s ranks, errors and Θ are those of the brute-force argmin on ``z`` of
    ``λ·C/C_ref + μ/2·w·err`` (``weights``: the layers' ``w``, default 1; ``metric``: the layers' ``L``, default
    weight space; ``multiple``: the rank grid's step); return the brute-force ranks."""
    table, c_ref, _ = _all_options(comp, model, x, z, kind, min_rank, matrix_convs, multiple, metric)
    mods = dict(model.named_modules())
    best_ranks = {}
    for n, opts in table.items():
        wn = 1.0 if weights is None else weights[n]
        obj = [lam * o[1] / c_ref + 0.5 * mu * wn * o[2] for o in opts]
        best = min(obj)
        zn = z[n].detach().to(torch.float64).numpy()
        energy = _energy(zn, None if metric is None else metric[n], _mode(mods[n], matrix_convs))
        tol = rtol * (abs(best) + mu * wn * energy + 1e-300)
        winners = [o[0] for o, v in zip(opts, obj, strict=True) if v <= best + tol]
        chosen = comp.ranks[n]
        assert chosen in winners, (n, chosen, winners, lam, mu, kind)
        best_ranks[n] = winners[0] if len(winners) == 1 else chosen
        opt = next(o for o in opts if o[0] == chosen)
        s = comp.layers[n]
        assert s.err == pytest.approx(opt[2], rel=err_rtol, abs=err_rtol * 1e-3 * energy + 1e-12)
        theta = s.theta.detach().to(torch.float64).numpy()
        assert np.abs(theta - opt[3]).max() <= theta_rtol * max(np.abs(zn).max(), 1e-30), n
    return best_ranks


def _budget_check(
    comp: LCEngine,
    model: nn.Module,
    x: torch.Tensor,
    z: dict[str, torch.Tensor],
    mu: float,
    kind: str,
    target: float,
    min_rank: int,
    matrix_convs: bool,
    weights: dict[str, float],
    *,
    multiple: int = 1,
    metric: dict[str, np.ndarray] | None = None,
    err_rtol: float = 1e-6,
    theta_rtol: float = 1e-5,
) -> None:
    """Budget mode against the brute force over the same grid: the chosen ranks are grid options with the brute
    force's Θ and error; the whole model meets the target; the brute-force λ-mode argmin at the engine's λ meets
    it too and has no smaller weighted error (the budget solution starts from it and only spends what is left);
    and no single rank step up (one axis, or dense) that lowers the error still fits in what is left."""
    table, _, dense = _all_options(comp, model, x, z, kind, min_rank, matrix_convs, multiple, metric)
    mods = dict(model.named_modules())
    prof = ltc.profile(model, x)
    base = float(prof.macs if kind == "macs" else prof.params)
    budget = base / target - (base - sum(dense.values()))  # what the compressed layers may cost in all
    total = werr = 0.0
    for n, opts in table.items():
        chosen = comp.ranks[n]
        opt = next((o for o in opts if o[0] == chosen), None)
        assert opt is not None, (n, chosen, "not on the grid")
        zn = z[n].detach().to(torch.float64).numpy()
        energy = _energy(zn, None if metric is None else metric[n], _mode(mods[n], matrix_convs))
        s = comp.layers[n]
        assert s.err == pytest.approx(opt[2], rel=err_rtol, abs=err_rtol * 1e-3 * energy + 1e-12)
        assert np.abs(s.theta.detach().double().numpy() - opt[3]).max() <= theta_rtol * np.abs(zn).max(), n
        total += opt[1]
        werr += weights[n] * opt[2]
    assert total <= budget * (1 + 1e-12), (total, budget)
    assert base / (base - sum(dense.values()) + total) == pytest.approx(comp.sr if kind == "macs" else comp.cr)
    assert comp.lam > 0
    # the λ-mode argmin at the engine's λ
    lam_total = lam_werr = 0.0
    for n, opts in table.items():
        obj = [comp.lam * o[1] / sum(dense.values()) + 0.5 * mu * weights[n] * o[2] for o in opts]
        o = opts[int(np.argmin(obj))]
        lam_total += o[1]
        lam_werr += weights[n] * o[2]
    assert lam_total <= budget * (1 + 1e-12)
    assert werr <= lam_werr * (1 + 1e-6) + 1e-12
    # maximal: every single step up that lowers the error costs more than the room left
    room = budget - total
    for n, opts in table.items():
        chosen = comp.ranks[n]
        if chosen is None:
            continue
        by_rank = {o[0]: o for o in opts}
        cur = by_rank[chosen]
        axes = [sorted({o[0] for o in opts if o[0] is not None})] if isinstance(chosen, int) else [
            sorted({o[0][0] for o in opts if o[0] is not None}), sorted({o[0][1] for o in opts if o[0] is not None})]
        steps: list[object] = [None]
        for i, ax in enumerate(axes):
            r = chosen if isinstance(chosen, int) else chosen[i]
            if ax.index(r) + 1 < len(ax):
                nxt = ax[ax.index(r) + 1]
                steps.append(nxt if isinstance(chosen, int) else tuple(nxt if j == i else chosen[j] for j in range(2)))
        for st_ in steps:
            o = by_rank[st_]
            if cur[2] - o[2] > 1e-6 * cur[2] + 1e-12:
                assert o[1] - cur[1] > room, (n, chosen, st_, o[1] - cur[1], room)


def _cost_of(comp: LCEngine, kind: str) -> int:
    return comp.macs if kind == "macs" else comp.params


def _started(cls, model: nn.Module, x: torch.Tensor, **kw) -> LCEngine:
    """An engine after its first C step."""
    comp = cls(model, x, **kw)
    comp.start()
    return comp

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
    comp.start()
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
    a = _started(cls, model, X_NET, mu0=0.1, weighting="relative", target_sr=target)
    b = _started(cls, scaled, X_NET, mu0=0.1, weighting="relative", target_sr=target)
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
    ranks = {w: _started(ltc.LTC, model, X_NET, target_sr=3.0, mu0=0.1, weighting=w).ranks["c2"]
             for w in ("relative", "absolute")}
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
    assert float(comp.penalty().detach()) == pytest.approx(expect, rel=1e-5)
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
        comp = _started(ltc.LTC, model, X_NET, lam=lam, mu0=mu, cost=kind, compress_linear=True, min_rank=min_rank,
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
        comp = _started(cls, model, X_NET, lam=float(lam), mu0=0.01, cost=kind, compress_linear=True)
        costs.append(_cost_of(comp, kind))
    assert all(c1 >= c2 for c1, c2 in zip(costs, costs[1:], strict=False)), costs
    assert costs[0] > costs[-1]
    errs, costs = [], []
    for mu in np.logspace(-4, 1, 12):
        comp = _started(cls, model, X_NET, lam=0.05, mu0=float(mu), cost=kind, compress_linear=True)
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

    cost = torch.tensor([float(c) for c, _ in pts], dtype=torch.float64)
    err = torch.tensor([float(e) for _, e in pts], dtype=torch.float64)
    cand = Candidates((tuple(range(1, len(pts) + 1)),), {"macs": cost}, err, {"macs": float(dense)}, None)
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
    comp = _started(ltc.LTC, model, x, target_sr=target)
    assert target <= comp.sr <= 1.03 * target
    # λ: the λ-mode C step at comp.lam gives the hull solution, within the budget; any smaller λ overshoots
    assert _started(ltc.LTC, copy.deepcopy(model), x, lam=comp.lam).sr >= target
    assert _started(ltc.LTC, copy.deepcopy(model), x, lam=comp.lam * (1 - 1e-3)).sr < target
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
        comp = _started(ltc.LTC, model, x, target_sr=float(target))
        assert target <= comp.sr <= 1.03 * target
        assert _started(ltc.LTC, model, x, lam=comp.lam).sr >= target
        assert _started(ltc.LTC, model, x, lam=comp.lam * (1 - 1e-3)).sr < target


@pytest.mark.parametrize("target", [2.0, 5.0])
def test_budget_mode_meets_target_cr(target):
    model, x = _small_cnn(1)
    comp = _started(ltc.LTC, model, x, target_sr=target, cost="params")
    assert target <= comp.cr <= 1.03 * target
    assert ltc.profile(comp.compressed_model(), x).params == comp.params
    _noise_step(comp, model, torch.Generator().manual_seed(3))
    assert target <= comp.cr <= 1.03 * target


def test_unreachable_target_says_what_is_reachable():
    """Construction computes nothing, so an unreachable target is reported by the first C step."""
    model, x = _small_cnn()
    comp = ltc.LTC(model, x, target_sr=1e4)
    with pytest.raises(ValueError, match=r"out of reach.*reaches \d"):
        comp.start()
    assert not comp.started
    with pytest.raises(ValueError, match=r"CR .*reaches \d"):
        ltc.LTC(model, x, target_sr=1e4, cost="params").penalty()


def _engine_snapshot(comp: LCEngine) -> dict:
    return {"target": comp.target, "lam": comp.lam, "mu": comp.mu, "steps_done": comp.steps_done,
            "ranks": dict(comp.ranks), "history": len(comp.history), "sr": comp.sr,
            "theta": {n: s.theta.clone() for n, s in comp.layers.items()},
            "phi": {n: s.phi.clone() for n, s in comp.layers.items()},
            "err": {n: s.err for n, s in comp.layers.items()}}


def _same_snapshot(a: dict, b: dict) -> bool:
    tensors = ("theta", "phi")
    return ({k: v for k, v in a.items() if k not in tensors} == {k: v for k, v in b.items() if k not in tensors}
            and all(torch.equal(a[k][n], b[k][n]) for k in tensors for n in a[k]))


def test_retarget_meets_the_new_target_and_an_out_of_reach_one_changes_nothing():
    model, x = _small_cnn()
    comp = _started(ltc.LTC, model, x, target_sr=2.0)
    _noise_step(comp, model, torch.Generator().manual_seed(5))  # multipliers and μ away from their start
    before = _engine_snapshot(comp)
    comp.retarget(2.0)  # a C step at the current weights, multipliers and μ
    at_two = _engine_snapshot(comp)
    assert (at_two["mu"], at_two["steps_done"], at_two["history"]) == (before["mu"], before["steps_done"],
                                                                       before["history"] + 1)
    comp.retarget(4.0)  # a C step for the new target: no multiplier update, no μ growth, recorded in history
    assert comp.target == 4.0 and 4.0 <= comp.sr <= 1.03 * 4.0 and comp.ranks != at_two["ranks"]
    assert (comp.mu, comp.steps_done, len(comp.history)) == (at_two["mu"], at_two["steps_done"], at_two["history"] + 1)
    assert all(torch.equal(s.phi, at_two["phi"][n]) for n, s in comp.layers.items())
    assert comp.history[-1]["ranks"] == {n: (list(r) if isinstance(r, tuple) else r) for n, r in comp.ranks.items()}
    at_four = _engine_snapshot(comp)
    with pytest.raises(ValueError, match=r"target SR 10000 is out of reach: .* the model reaches \d+\.\d\d"):
        comp.retarget(1e4)
    assert _same_snapshot(_engine_snapshot(comp), at_four)  # target, ranks, Θ, λ and history as they were
    comp.retarget(2.0)  # the same weights, multipliers and target: the same ranks and Θ as before
    assert comp.ranks == at_two["ranks"] and comp.lam == at_two["lam"]
    assert all(torch.equal(s.theta, at_two["theta"][n]) for n, s in comp.layers.items())


def test_retarget_needs_budget_mode_and_a_target_of_at_least_one():
    model, x = _small_cnn()
    comp = _started(ltc.LTC, model, x, lam=1.0)
    before = _engine_snapshot(comp)
    with pytest.raises(ValueError, match=re.escape("retarget() needs budget mode (an engine built with target_sr)")):
        comp.retarget(2.0)
    assert comp.target is None and _same_snapshot(_engine_snapshot(comp), before)
    budget = _started(ltc.LTC, model, x, target_sr=2.0)
    before = _engine_snapshot(budget)
    for bad in (0.5, math.nan):
        with pytest.raises(ValueError, match=re.escape(f"target must be a finite number >= 1, got {bad!r}")):
            budget.retarget(bad)
    assert _same_snapshot(_engine_snapshot(budget), before)


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
    comp = _started(ltc.LTC, model, X_NET, lam=1.0, mu0=0.1, compress_linear=True, weighting="absolute")
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
    comp = _started(ltc.LTC, model, x, target_sr=5.0, compress_linear=True)
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
    on = _started(ltc.LTC, model, X_NET, lam=10.0, compress_linear=True)
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
    "kw, message",
    [
        (dict(lam=0.1, target_sr=2.0), "give exactly one of lam (λ, the cost weight) and target_sr (budget mode), "
                                       "not both"),
        (dict(), "give exactly one of lam (λ, the cost weight) and target_sr (budget mode)"),
        (dict(lam=-1), "lam must be a finite number >= 0, got -1"),
        (dict(lam=math.nan), "lam must be a finite number >= 0, got nan"),
        (dict(lam=True), "lam must be a finite number >= 0, got True"),
        (dict(lam=0.1, mu0=0.0), "mu0 must be a finite number > 0, got 0.0"),
        (dict(lam=0.1, mu0=-1e-3), "mu0 must be a finite number > 0, got -0.001"),
        (dict(target_sr=0.5), "target_sr must be a finite number >= 1 (a speed-up), got 0.5"),
        (dict(target_sr=math.inf), "target_sr must be a finite number >= 1 (a speed-up), got inf"),
        (dict(lam=0.1, mu_growth=0.5), "mu_growth must be a finite number >= 1 (μ increases), got 0.5"),
        (dict(lam=0.1, mu_cap=0), "mu_cap must be a finite number > 0, got 0"),
        (dict(lam=0.1, cost="x"), "cost must be one of 'macs', 'params', 'latency', got 'x'"),
        (dict(lam=0.1, min_rank=0), "min_rank must be an int >= 1, got 0"),
        (dict(lam=0.1, rank_multiple=0), "rank_multiple must be an int >= 1, got 0"),
        (dict(lam=0.1, rank_multiple=2.0), "rank_multiple must be an int >= 1, got 2.0"),
        (dict(lam=0.1, n_iter=-1), "n_iter must be an int >= 0, got -1"),
        (dict(lam=0.1, weighting="equal"), "weighting must be one of 'relative', 'absolute', 'fisher', got 'equal'"),
        (dict(lam=0.1, metric="activations"), "metric must be one of 'weight', 'data', got 'activations'"),
        (dict(lam=0.1, calibration_images=0), "calibration_images must be an int >= 1, got 0"),
        (dict(lam=0.1, damping=-0.1), "damping must be a finite number >= 0, got -0.1"),
        (dict(lam=0.1, metric="data"), "metric='data' needs calibration inputs"),
        (dict(lam=0.1, cost="latency"), "cost='latency' needs a latency_table"),
    ],
)
def test_bad_settings_name_the_setting_and_the_value(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ltc.LTC(_net(0), X_NET, **kw)
    if "needs" not in message and "exactly one" not in message:  # a setting's own check: EngineSettings' message
        with pytest.raises(ValueError, match=re.escape(message)):
            EngineSettings(**kw)


def test_settings_are_normalised_and_unknown_ones_refused():
    s = EngineSettings(lam=1, cost="MACS", metric="Data", weighting="ABSOLUTE", conv_scheme="Matrix")
    assert (s.cost, s.metric, s.weighting, s.conv_scheme) == ("macs", "data", "absolute", "matrix")
    comp = ltc.LTC(_net(0), X_NET, lam=1, cost="Params", include="c*", metric="WEIGHT", weighting="Absolute")
    assert comp.cost_kind == "params" and comp.settings.include == ["c*"]
    assert (comp.metric, comp.weighting) == (comp.settings.metric, comp.settings.weighting) == ("weight", "absolute")
    assert comp.state_dict()["metric"] == "weight" and comp.state_dict()["weighting"] == "absolute"
    rel = ltc.LTC(_net(0), X_NET, lam=1, weighting="RELATIVE")
    rel.prepare()  # the normalised name takes effect: layers get the relative weights w_k, not 1
    assert rel.weighting == "relative" and any(lay.scale != 1.0 for lay in rel.layers.values())
    with pytest.raises(TypeError, match="mu_final"):
        ltc.LTC(_net(0), X_NET, lam=0.1, mu_final=1.0)
    with pytest.raises(TypeError, match="Tucker-2"):
        ltc.LTC(_net(0), X_NET, lam=0.1, conv_scheme="matrix")
    with pytest.raises(TypeError, match="matrix scheme"):
        ltc.LRC(_net(0), X_NET, lam=0.1, conv_scheme="tucker2")
    with pytest.raises(ValueError, match="conv_scheme must be one of 'tucker2', 'matrix', got 'cp'"):
        LCEngine(_net(0), X_NET, lam=0.1, conv_scheme="cp")


# --------------------------------------------------------------------------------------------- 8. converged
@pytest.mark.parametrize("cls,lam", [(ltc.LTC, 100.0), (ltc.LRC, 0.2), (ltc.LTC, 0.2)])
def test_converged_once_weights_sit_on_theta(cls, lam):
    model = _net(4, a=8, b=8, c=6, d=6)
    comp = _started(cls, model, X_NET, lam=lam, mu0=0.01, compress_linear=True)
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
    assert not comp.converged  # not started
    comp.start()
    assert all(r is None for r in comp.ranks.values())
    assert not comp.converged  # the first C step counts as a change
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
    hosvd = _started(ltc.LTC, model, X_NET, lam=1.0, mu0=0.03)
    hooi = _started(ltc.LTC, model, X_NET, lam=1.0, mu0=0.03, n_iter=3)
    assert hooi.ranks == hosvd.ranks
    tucker = [n for n, r in hooi.ranks.items() if isinstance(r, tuple)]
    assert tucker
    for n in tucker:
        s = hooi.layers[n]
        true = float((s.weight.detach().double() - s.theta.double()).square().sum())
        assert s.err == pytest.approx(true, rel=1e-9)
        assert s.err <= hosvd.layers[n].err * (1 + 1e-6)


# --------------------------------------------------------------------------------------------- 9. lifecycle
class _Unreadable:
    """Calibration data that fails the test if anything reads it."""

    def __iter__(self):
        raise AssertionError("the calibration data was read")


def test_construction_computes_nothing():
    model = _net(0)
    comp = ltc.LTC(model, X_NET, lam=0.05, metric="data", calibration=_Unreadable(), compress_linear=True)
    assert not comp.started and comp.history == [] and comp.steps_done == 0
    assert set(comp.ranks) == {"c1", "c2", "c3", "c4", "fc"} and all(r is None for r in comp.ranks.values())
    for s in comp.layers.values():
        assert torch.equal(s.theta, s.weight) and not s.phi.any()
        assert s.whitening is None and s.scale == 1.0
    assert comp.sr == 1.0 and comp.cr == 1.0
    with pytest.raises(AssertionError, match="calibration data was read"):
        comp.start()  # the first C step is where the metric is measured


@pytest.mark.parametrize("first_use", ["start", "penalty", "step", "compressed_model", "mu_to_leave_min_rank"])
def test_first_use_runs_the_first_c_step_once(first_use):
    """``penalty()``, ``step()``, ``compressed_model()`` and ``mu_to_leave_min_rank()`` start the engine lazily:
    the same first C step as an explicit ``start()``, run once."""
    model = _net(1)
    ref = _started(ltc.LTC, copy.deepcopy(model), X_NET, lam=1.0, mu0=0.1, compress_linear=True)
    comp = ltc.LTC(model, X_NET, lam=1.0, mu0=0.1, compress_linear=True)
    getattr(comp, first_use)()
    assert comp.started
    assert _strip(comp.history[:1]) == _strip(ref.history)
    if first_use == "step":
        ref.step()
        assert comp.steps_done == 1 and len(comp.history) == 2
    for n, s in comp.layers.items():
        assert torch.equal(s.theta, ref.layers[n].theta) and torch.equal(s.phi, ref.layers[n].phi), n
    assert comp.ranks == ref.ranks and any(r is not None for r in comp.ranks.values())
    rows = len(comp.history)
    comp.start()
    comp.penalty()
    comp.compressed_model()
    assert len(comp.history) == rows and comp.ranks == ref.ranks


def test_set_schedule_sets_the_path_before_the_first_c_step():
    model = _net(2, a=8, b=8, c=6)
    comp = ltc.LTC(model, X_NET, lam=0.05, mu0=10.0)
    comp.set_schedule(mu0=0.003, mu_growth=2.0)
    comp.start()
    ref = _started(ltc.LTC, model, X_NET, lam=0.05, mu0=0.003, mu_growth=2.0)
    assert comp.ranks == ref.ranks != _started(ltc.LTC, model, X_NET, lam=0.05, mu0=10.0).ranks
    assert comp.history[0]["mu"] == 0.003
    with pytest.raises(RuntimeError, match="after start"):
        comp.set_schedule(mu0=0.1)
    with pytest.raises(ValueError, match=re.escape("mu_growth must be a finite number >= 1 (μ increases), got 0.5")):
        comp.set_schedule(mu_growth=0.5)
    with pytest.raises(ValueError, match=re.escape("mu_cap must be a finite number > 0, got -1")):
        comp.set_schedule(mu_cap=-1)
    comp.set_schedule(mu_growth=3.0, mu_cap=1e-3)
    comp.step()
    assert comp.mu == pytest.approx(0.009)
    assert all(comp.rho(s) == 1e-3 for s in comp.layers.values())  # μ·w_k = 0.009·w_k is above the cap here


# --------------------------------------------------------------------------------------------- 10. assign
def _calibration(cin: int, n: int = 6, hw: int = 10, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated, uncentred channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cin, cin, generator=g) + 2 * torch.eye(cin)
    x = torch.einsum("nchw,cd->ndhw", torch.randn(n, cin, hw, hw, generator=g), mix)
    return x + torch.randn(1, cin, 1, 1, generator=g)


@pytest.mark.parametrize("metric", ["weight", "data"])
def test_assign_projects_the_given_ranks_and_runs_no_c_step(metric):
    model = _net(3, a=6, b=7, c=5)
    calib = _calibration(3)
    comp = ltc.LTC(model, X_NET, lam=0.05, mu0=0.1, compress_linear=True, metric=metric,
                   calibration=calib if metric == "data" else None)
    given_ranks = {"c1": (2, 3), "c3": 2, "fc": 1, "c4": None}
    comp.assign(given_ranks)
    assert comp.started and comp.steps_done == 0 and len(comp.history) == 1
    assert comp.ranks == {"c1": (2, 3), "c2": None, "c3": 2, "c4": None, "fc": 1}  # c2 not given: left dense
    L = _data_metric(model, calib, list(comp.layers), False) if metric == "data" else None
    shp, mods = _shapes(model, X_NET), dict(model.named_modules())
    for n, r in given_ranks.items():
        s, w = comp.layers[n], comp.layers[n].weight.detach().double().numpy()
        if r is None:
            assert torch.equal(s.theta, s.weight) and s.err == 0.0
            continue
        opt = next(o for o in _options(mods[n], shp[n], w, 1, False, L=None if L is None else L[n]) if o[0] == r)
        assert s.err == pytest.approx(opt[3], rel=1e-4)
        assert np.abs(s.theta.double().numpy() - opt[4]).max() <= 1e-4 * np.abs(w).max(), n
    assert torch.equal(comp.layers["c2"].theta, comp.layers["c2"].weight)
    # nothing later runs a C step behind the caller's back ...
    comp.start()
    comp.penalty()
    small = comp.compressed_model()
    assert len(comp.history) == 1 and comp.ranks["c1"] == (2, 3)
    assert isinstance(small.c1, ltc.Tucker2Conv2d) and small.c1.ranks == (2, 3)
    assert type(small.c2) is nn.Conv2d and isinstance(small.fc, ltc.LowRankLinear)
    # ... and step() runs the objective's C step from there (φ = 0: on Z = W), then updates the multipliers
    comp.step()
    assert comp.steps_done == 1 and len(comp.history) == 2
    z = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
    energy = {n: _energy(z[n].double().numpy(), None if L is None else L[n], "channel") for n in z}
    w = {n: sum(energy.values()) / len(energy) / energy[n] for n in z}
    _brute_force_check(comp, model, X_NET, z, 0.05, 0.1, "macs", 1, False, w, metric=L, rtol=1e-6, err_rtol=1e-4,
                       theta_rtol=1e-4)
    for n, s in comp.layers.items():
        torch.testing.assert_close(s.phi, -0.1 * w[n] * (z[n] - s.theta), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown layers"):
        comp.assign({"nope": 1})


# --------------------------------------------------------------------------------------------- 11. data metric
def _identity_moments(model: nn.Module, layers: dict[str, str], data, images: int = 512,
                      centered: bool = True) -> dict[str, torch.Tensor]:
    """A stand-in for ``collect_input_moments`` whose Σ is a multiple of I for every layer."""
    mods = dict(model.named_modules())
    out = {}
    for n, mode in layers.items():
        w = mods[n].weight
        out[n] = 4.0 * torch.eye(w[0].numel() if mode == "patch" else w.shape[1], dtype=torch.float64)
    return out


@settings(SETTINGS, max_examples=12)
@given(
    cin=st.integers(1, 4),
    a=st.integers(2, 6),
    b=st.integers(2, 6),
    c=st.integers(1, 5),
    k1=st.sampled_from([1, 3]),
    lrc=st.booleans(),
    relative=st.booleans(),
    budget=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_data_metric_with_identity_moments_is_the_weight_metric(cin, a, b, c, k1, lrc, relative, budget, seed):
    """Σ = c·I (normalised to I, no damping): every C step (ranks, λ, Θ, errors), multiplier and penalty equals
    the weight metric's (up to rounding)."""
    model = _net(seed, cin=cin, a=a, b=b, c=c, k1=k1)
    x = torch.randn(1, cin, 9, 9, generator=torch.Generator().manual_seed(seed))
    cls = ltc.LRC if lrc else ltc.LTC
    kw = dict(mu0=0.05, mu_growth=1.5, compress_linear=True, weighting="relative" if relative else "absolute",
              **({"target_sr": 1.4} if budget else {"lam": 0.05}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ltc.engine, "collect_input_moments", _identity_moments)
        models_ = [copy.deepcopy(model), copy.deepcopy(model)]
        data = cls(models_[0], x, metric="data", calibration=x, damping=0.0, **kw)
        weight = cls(models_[1], x, **kw)
        gen = torch.Generator().manual_seed(seed + 1)
        for step in range(3):
            if step:
                noise = [0.1 * torch.randn(p.shape, generator=gen) for p in model.parameters()]
                with torch.no_grad():
                    for m in models_:
                        for p, e in zip(m.parameters(), noise, strict=True):
                            p.add_(e)
            try:
                weight.step() if step else weight.start()
            except ValueError as exc:  # an unreachable target: the data metric says the same
                with pytest.raises(ValueError, match=re.escape(str(exc))):
                    data.step() if step else data.start()
                return
            data.step() if step else data.start()
            assert data.ranks == weight.ranks and data.mu == weight.mu
            assert data.lam == pytest.approx(weight.lam, rel=1e-12)
            for n, s in data.layers.items():
                ref = weight.layers[n]
                assert s.whitening is not None and torch.equal(s.whitening.L, torch.eye(len(s.whitening.L),
                                                                                         dtype=torch.float64))
                # equal up to rounding (the whitened copy's memory layout changes the summation order)
                scale = float(ref.theta.abs().max()) + 1e-30
                torch.testing.assert_close(s.theta, ref.theta, rtol=1e-6, atol=1e-6 * scale)
                torch.testing.assert_close(s.phi, ref.phi, rtol=1e-6, atol=1e-6 * float(ref.phi.abs().max()) + 1e-30)
                assert s.err == pytest.approx(ref.err, rel=1e-6, abs=1e-9 * scale**2), n
                assert s.scale == pytest.approx(ref.scale, rel=1e-12), n
            assert float(data.penalty().detach()) == pytest.approx(float(weight.penalty().detach()), rel=1e-6,
                                                                   abs=1e-12)


@pytest.mark.parametrize("cls", [ltc.LTC, ltc.LRC])
@pytest.mark.parametrize("kw", [{"lam": 0.3}, {"lam": 3.0}, {"target_sr": 2.5}])
def test_identity_whitening_set_after_prepare_gives_the_weight_metrics_c_step(cls, kw):
    """The metric is the layers' ``Whitening``: replaced by the identity between ``prepare()`` and ``start()``,
    the data-metric engine's first C step is the weight metric's."""
    model = _net(9, a=8, b=8, c=6, d=5)
    data = cls(model, X_NET, mu0=0.05, compress_linear=True, weighting="absolute", metric="data",
               calibration=_calibration(3, seed=9), **kw)
    data.prepare()
    for s in data.layers.values():
        d = len(s.whitening.L)
        assert not torch.equal(s.whitening.L, torch.eye(d, dtype=torch.float64))  # the measured metric is not I
        s.whitening = Whitening(torch.eye(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64),
                                s.whitening.mode, 1.0)
    data.start()
    weight = _started(cls, model, X_NET, mu0=0.05, compress_linear=True, weighting="absolute", **kw)
    assert data.ranks == weight.ranks and any(r is not None for r in data.ranks.values())
    assert data.lam == pytest.approx(weight.lam, rel=1e-12)
    for n, s in data.layers.items():
        ref = weight.layers[n]
        torch.testing.assert_close(s.theta, ref.theta, rtol=1e-6, atol=1e-6 * float(ref.theta.abs().max()))
        assert s.err == pytest.approx(ref.err, rel=1e-6, abs=1e-12), n


@settings(SETTINGS, max_examples=20)
@given(
    cin=st.integers(1, 4),
    a=st.integers(1, 6),
    b=st.integers(1, 6),
    c=st.integers(1, 5),
    d=st.integers(1, 4),
    k1=st.sampled_from([1, 3]),
    log_lam=st.floats(-3, 2),
    log_mu=st.floats(-4, 0),
    kind=st.sampled_from(["macs", "params"]),
    min_rank=st.integers(1, 2),
    lrc=st.booleans(),
    relative=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_data_metric_c_step_is_the_whitened_brute_force_argmin(
    cin, a, b, c, d, k1, log_lam, log_mu, kind, min_rank, lrc, relative, seed
):
    """The C step under the data metric: brute force over the rank grid on ``‖(Z − Θ) ×_in L‖²`` (the Tucker-2 /
    SVD projection taken of ``Z ×_in L`` and mapped back), ``L`` from the layers' inputs on the calibration data
    (patches for the matrix scheme's kxk convs), measured again before each C step; ``w_k`` from the reference
    weights' energy in the metric."""
    lam, mu = 10.0**log_lam, 10.0**log_mu
    model = _net(seed, cin=cin, a=a, b=b, c=c, d=d, k1=k1)
    x = torch.randn(1, cin, 9, 9)
    calib = _calibration(cin, n=5, hw=9, seed=seed)
    cls = ltc.LRC if lrc else ltc.LTC
    comp = cls(model, x, lam=lam, mu0=mu, cost=kind, compress_linear=True, min_rank=min_rank, mu_growth=1.5,
               weighting="relative" if relative else "absolute", metric="data", calibration=calib)
    names = list(comp.layers)
    tol = dict(metric=None, rtol=1e-6, err_rtol=1e-4, theta_rtol=1e-4)
    L0 = _data_metric(model, calib, names, lrc)
    z0 = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
    energy = {n: _energy(z0[n].double().numpy(), L0[n], _mode(comp.layers[n].module, lrc)) for n in names}
    w = {n: (sum(energy.values()) / len(energy)) / energy[n] if relative else 1.0 for n in names}
    comp.start()
    _brute_force_check(comp, model, x, z0, lam, mu, kind, min_rank, lrc, w, **{**tol, "metric": L0})

    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(2):  # two L steps stand-ins; the second C step sees φ ≠ 0 and a new metric
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        mu1 = comp.mu
        phi = {n: s.phi.clone() for n, s in comp.layers.items()}
        wts = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
        comp.step()
    L1 = _data_metric(model, calib, names, lrc)
    z1 = {n: wts[n] - phi[n] / (mu1 * w[n]) for n in names}
    _brute_force_check(comp, model, x, z1, lam, mu1, kind, min_rank, lrc, w, **{**tol, "metric": L1})
    for n, s in comp.layers.items():  # multipliers: φ ← φ − μ w (W − Θ), in weight coordinates
        torch.testing.assert_close(s.phi, phi[n] - mu1 * w[n] * (wts[n] - s.theta), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lrc", [False, True], ids=["ltc", "lrc"])
@pytest.mark.parametrize("target,multiple", [(1.5, 1), (2.5, 1), (4.0, 1), (2.0, 2), (1.8, 3)])
def test_data_metric_budget_mode_against_the_whitened_brute_force(lrc, target, multiple):
    model = _net(7, a=8, b=8, c=6, d=5)
    calib = _calibration(3, seed=7)
    cls = ltc.LRC if lrc else ltc.LTC
    comp = cls(model, X_NET, target_sr=target, mu0=0.05, compress_linear=True, metric="data", calibration=calib,
               rank_multiple=multiple)
    names = list(comp.layers)
    L0 = _data_metric(model, calib, names, lrc)
    z0 = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
    energy = {n: _energy(z0[n].double().numpy(), L0[n], _mode(comp.layers[n].module, lrc)) for n in names}
    w = {n: (sum(energy.values()) / len(energy)) / energy[n] for n in names}
    comp.start()
    assert target <= comp.sr
    tol = dict(multiple=multiple, err_rtol=1e-4, theta_rtol=1e-4)
    _budget_check(comp, model, X_NET, z0, 0.05, "macs", target, 1, lrc, w, metric=L0, **tol)
    mu1, phi = comp.mu, {n: s.phi.clone() for n, s in comp.layers.items()}
    _noise_step(comp, model, torch.Generator().manual_seed(1), scale=0.2)
    z1 = {n: s.weight.detach() - phi[n] / (mu1 * w[n]) for n, s in comp.layers.items()}
    _budget_check(comp, model, X_NET, z1, mu1, "macs", target, 1, lrc, w,
                  metric=_data_metric(model, calib, names, lrc), **tol)


def _one_layer(kind: str, s: int, t: int, k: int, stride: int, padding: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.Linear(s, t) if kind == "linear" else nn.Conv2d(s, t, 1 if kind == "1x1" else k, stride=stride,
                                                                padding=padding)
    return nn.Sequential(layer).double()


def _features(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows whose second moment is the layer's exact output-error metric: the input patches each output
    reads (for a 1x1 conv: the pixels it reads, with stride and zero padding)."""
    if isinstance(layer, nn.Linear):
        return x
    cols = F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _output_rows(y: torch.Tensor) -> torch.Tensor:
    return y if y.dim() == 2 else y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


@settings(SETTINGS, max_examples=20)
@given(
    kind=st.sampled_from(["linear", "1x1", "kxk"]),
    s=st.integers(1, 5),
    t=st.integers(1, 5),
    k=st.sampled_from([2, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    seed=st.integers(0, 2**20),
    centered=st.booleans(),
)
def test_data_metric_error_table_is_the_measured_output_error(kind, s, t, k, stride, padding, seed, centered):
    """For a linear, a 1x1 conv and (matrix scheme, patch metric) a kxk conv, with no damping: every entry of
    the error table is the mean squared output error of the deployed layer at that rank on the calibration
    inputs (strided and padded convs included), up to the metric's normalisation ``mean(diag Σ)``; assign()
    records the same error. ``centered`` (the default): the error of the outputs about their mean, i.e. what is
    left once BatchNorm re-estimation has removed the output's mean shift."""
    model = _one_layer(kind, s, t, k, stride, padding, seed)
    layer = model[0]
    g = torch.Generator().manual_seed(seed)
    shape = (8 * s + 4, s) if kind == "linear" else (6, s, 7, 7)
    x = torch.einsum("nc...,cd->nd...", torch.randn(*shape, generator=g, dtype=torch.float64),
                     torch.randn(s, s, generator=g, dtype=torch.float64) + 2 * torch.eye(s, dtype=torch.float64))
    x = x + torch.randn(s, generator=g, dtype=torch.float64).reshape((1, s) + (1,) * (x.dim() - 2))
    comp = LCEngine(model, x[:2], lam=0.0, conv_scheme="matrix", compress_linear=True, metric="data",
                    calibration=x, damping=0.0, weighting="absolute", centered=centered)
    comp.prepare()
    st_ = comp.layers["0"]
    assert st_.whitening.mode == ("patch" if kind == "kxk" else "channel")
    rows = _features(layer, x)
    if centered:
        rows = rows - rows.mean(0)
    scale = float(rows.square().sum(1).mean()) / rows.shape[1]  # mean(diag Σ)
    table = comp.candidates(st_, st_.to_metric(layer.weight.detach()))
    with torch.no_grad():
        y = layer(x)
    with torch.no_grad():
        bias = 0 if layer.bias is None else layer.bias.reshape((1, -1) + (1,) * (y.dim() - 2))
        energy = float(_output_rows(y - bias).square().sum(1).mean())
    for i in range(len(table.err)):
        rank = table.rank_of(i)
        comp.assign({"0": rank})
        assert st_.err == pytest.approx(float(table.err[i]), rel=1e-9, abs=1e-12 * energy)
        with torch.no_grad():
            diff = _output_rows(comp.compressed_model()[0](x) - y)
        if centered:
            diff = diff - diff.mean(0)
        measured = float(diff.square().sum(1).mean())
        assert measured == pytest.approx(scale * float(table.err[i]), rel=1e-7, abs=1e-10 * energy), rank


@settings(SETTINGS, max_examples=10)
@given(s=st.integers(1, 4), t=st.integers(1, 4), k=st.sampled_from([2, 3]), seed=st.integers(0, 2**20))
def test_tucker2_data_metric_is_exact_when_pixels_are_independent(s, t, k, seed):
    """Tucker-2 kxk convs use the channel second moment, which ignores correlations between neighbouring pixels
    (the spatial-independence approximation; for natural images it is not the exact output error). It is exact
    when no window sees two nonzero pixels: one nonzero pixel per image, away from the border (valid conv), so
    that every kernel offset sees it once. Then the mean over images of the summed squared output error is
    ``mean(diag M)·err`` with ``M`` the pixels' channel second moment."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(s, t, k)).double()
    g = torch.Generator().manual_seed(seed)
    n, hw = 4 * s + 2, 2 * k + 1
    v = torch.randn(n, s, generator=g, dtype=torch.float64) @ (torch.randn(s, s, generator=g, dtype=torch.float64)
                                                               + 2 * torch.eye(s, dtype=torch.float64))
    x = torch.zeros(n, s, hw, hw, dtype=torch.float64)
    pos = torch.randint(k - 1, hw - k + 1, (n, 2), generator=g)
    for i in range(n):
        x[i, :, pos[i, 0], pos[i, 1]] = v[i]
    comp = ltc.LTC(model, x[:1], lam=0.0, metric="data", calibration=x, damping=0.0, weighting="absolute",
                   centered=False)
    comp.prepare()
    st_ = comp.layers["0"]
    assert st_.scheme.name == "tucker2" and st_.whitening.mode == "channel"
    scale = float(v.square().sum(1).mean()) / s  # mean(diag M)
    table = comp.candidates(st_, st_.to_metric(model[0].weight.detach()))
    with torch.no_grad():
        y = model(x)
    for i in range(len(table.err)):
        rank = table.rank_of(i)
        comp.assign({"0": rank})
        with torch.no_grad():
            measured = float((comp.compressed_model()(x) - y).square().sum(dim=(1, 2, 3)).mean())
        tol = 1e-12 * float(y.square().sum())
        assert measured == pytest.approx(scale * float(table.err[i]), rel=1e-7, abs=tol), rank


@pytest.mark.parametrize("cls", [ltc.LTC, ltc.LRC])
def test_data_metric_deploys_theta(cls):
    """Θ of the data metric is the whitened projection mapped back: still of the chosen ranks, so the deployed
    factorised layers' equivalent weights are Θ (and differ from the plain weight-space projection)."""
    model = _net(4, a=8, b=8, c=6, d=6)
    calib = _calibration(3, seed=4)
    comp = _started(cls, model, X_NET, lam=0.3, mu0=0.1, compress_linear=True, metric="data", calibration=calib)
    assert any(r is not None for r in comp.ranks.values())
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        small = comp.compressed_model()
        differs = 0
        for n, s in comp.layers.items():
            if s.rank is None:
                continue
            sub = small.get_submodule(n)
            torch.testing.assert_close(sub.to_weight(), s.theta, rtol=1e-4, atol=1e-5 * float(s.theta.abs().max()))
            plain, _ = s.scheme.project(comp._shifted(s), s.rank)  # weight-space projection at the same rank
            differs += not torch.allclose(plain, s.theta, rtol=1e-3, atol=1e-3 * float(s.theta.abs().max()))
        assert differs  # the metric mattered
        _check_deployed(comp, model, X_NET)
        _noise_step(comp, model, gen, scale=0.2)


# --------------------------------------------------------------------------------------------- 12. rank multiples
@settings(SETTINGS, max_examples=300)
@given(full=st.integers(1, 80), min_rank=st.integers(-2, 90), multiple=st.integers(-1, 20))
def test_rank_values_are_the_multiples_and_the_full_rank(full, min_rank, multiple):
    vals = rank_values(full, min_rank, multiple)
    lo, m = min(max(min_rank, 1), full), max(multiple, 1)
    assert vals == sorted(set(vals)) and vals[-1] == full
    assert all(lo <= r <= full and (r % m == 0 or r == full) for r in vals)
    assert {r for r in range(lo, full + 1) if r % m == 0} <= set(vals)  # every allowed multiple is there
    assert vals[0] == (lo if m == 1 else next((r for r in range(lo, full + 1) if r % m == 0), full))


@settings(SETTINGS, max_examples=15)
@given(
    cin=st.integers(1, 4),
    a=st.integers(1, 9),
    b=st.integers(1, 9),
    c=st.integers(1, 7),
    d=st.integers(1, 6),
    multiple=st.integers(2, 4),
    min_rank=st.integers(1, 3),
    log_lam=st.floats(-3, 2),
    log_mu=st.floats(-4, 0),
    lrc=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_rank_multiple_restricts_the_grid(cin, a, b, c, d, multiple, min_rank, log_lam, log_mu, lrc, seed):
    """Every chosen rank is a multiple of ``rank_multiple`` or the full rank, and it is the brute-force argmin
    over that restricted grid; the candidate table's axes are that grid and index/rank round trip."""
    lam, mu = 10.0**log_lam, 10.0**log_mu
    model = _net(seed, cin=cin, a=a, b=b, c=c, d=d)
    x = torch.randn(1, cin, 9, 9)
    cls = ltc.LRC if lrc else ltc.LTC
    comp = _started(cls, model, x, lam=lam, mu0=mu, compress_linear=True, min_rank=min_rank, rank_multiple=multiple,
                    weighting="absolute")
    z = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
    _brute_force_check(comp, model, x, z, lam, mu, "macs", min_rank, lrc, multiple=multiple)
    for n, s in comp.layers.items():
        full = s.scheme.full_rank(s.module)
        r = s.rank
        if r is not None:
            for ri, fi in zip((r,) if isinstance(r, int) else r, full, strict=True):
                assert ri % multiple == 0 or ri == fi, (n, r, full)
        table = comp.candidates(s, s.weight.detach())
        assert table.axes == tuple(tuple(_grid(f, min_rank, multiple)) for f in full)
        assert len(table.err) == math.prod(table.grid_shape)
        for i in range(len(table.err)):
            assert table.index_of(table.rank_of(i)) == i
        off = full[0] + 1 if len(full) == 1 else (full[0] + 1, full[1])
        with pytest.raises(ValueError, match="not on the candidate grid"):
            table.index_of(off)


@pytest.mark.parametrize("target,multiple", [(2.0, 2), (3.0, 2), (2.0, 3), (1.5, 4)])
def test_rank_multiple_budget_mode_meets_the_target_on_the_restricted_grid(target, multiple):
    model = _net(8, a=8, b=9, c=6, d=5)
    comp = ltc.LTC(model, X_NET, target_sr=target, mu0=0.05, rank_multiple=multiple, weighting="absolute")
    z0 = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
    comp.start()
    w = {n: 1.0 for n in comp.layers}
    _budget_check(comp, model, X_NET, z0, 0.05, "macs", target, 1, False, w, multiple=multiple)
    mu1, phi = comp.mu, {n: s.phi.clone() for n, s in comp.layers.items()}
    _noise_step(comp, model, torch.Generator().manual_seed(2), scale=0.2)
    z1 = {n: s.weight.detach() - phi[n] / mu1 for n, s in comp.layers.items()}
    _budget_check(comp, model, X_NET, z1, mu1, "macs", target, 1, False, w, multiple=multiple)


def test_rank_multiple_on_a_resnet():
    model, x = _resnet(4)
    comp = _started(ltc.LTC, model, x, target_sr=5.0, rank_multiple=4)
    assert 5.0 <= comp.sr
    for n, s in comp.layers.items():
        if s.rank is not None:
            r = (s.rank,) if isinstance(s.rank, int) else s.rank
            assert all(ri % 4 == 0 or ri == fi for ri, fi in zip(r, s.scheme.full_rank(s.module), strict=True)), n
    assert ltc.profile(comp.compressed_model(), x).macs == comp.macs


# --------------------------------------------------------------------------------------------- 13. μ cap
def _penalty_hessian_top(comp: LCEngine, s) -> float:
    """Largest eigenvalue of the penalty's Hessian in one layer's weights, by autograd."""
    w = s.weight
    g = torch.autograd.grad(comp.penalty(), w, create_graph=True)[0].reshape(-1)
    rows = [torch.autograd.grad(g[i], w, retain_graph=True)[0].reshape(-1) for i in range(g.numel())]
    h = torch.stack(rows).double()
    return float(torch.linalg.eigvalsh(0.5 * (h + h.T))[-1])


@pytest.mark.parametrize("metric", ["weight", "data"])
def test_mu_cap_bounds_every_layers_penalty_curvature(metric):
    """The penalty's curvature in layer k's weights is ``ρ_k·λ_max(Σ_k)`` (``λ_max = 1`` in weight space): with
    ``mu_cap`` it never exceeds the cap; layers whose ``μ·w_k·λ_max`` lies below it keep the uncapped value."""
    model = _net(5, a=3, b=4, c=3, d=3)
    calib = _calibration(3, seed=5)
    data = metric == "data"
    comp = ltc.LTC(model, X_NET, lam=0.05, mu0=0.02, mu_growth=2.0, compress_linear=True, metric=metric,
                   calibration=calib if data else None)
    names = list(comp.layers)

    def curvatures() -> dict[str, float]:  # λ_max of the normalised, damped input moments, by our own hooks
        if not data:
            return {n: 1.0 for n in names}
        sigma = _input_moments(model, calib, names, False)
        return {n: float(np.linalg.eigvalsh(0.5 * (sg + sg.T) / np.mean(np.diag(sg)) + 0.01 * np.eye(len(sg)))[-1])
                for n, sg in sigma.items()}

    comp.prepare()
    curv = curvatures()
    uncapped = sorted(2 * 0.02 * comp.layers[n].scale * curv[n] for n in names)  # at the μ after one step
    cap = math.sqrt(uncapped[1] * uncapped[-2])  # between the 2nd smallest and the 2nd largest
    comp.set_schedule(mu_cap=cap)
    comp.start()
    _noise_step(comp, model, torch.Generator().manual_seed(5), scale=0.05)
    curv = curvatures()  # the metric is measured again at each C step
    capped = 0
    for n, s in comp.layers.items():
        top = _penalty_hessian_top(comp, s)
        free = comp.mu * s.scale * curv[n]
        assert top <= cap * (1 + 1e-5), n
        assert top == pytest.approx(min(free, cap), rel=1e-4), n
        capped += free > cap
    assert 0 < capped < len(names)


@settings(SETTINGS, max_examples=20)
@given(seed=st.integers(0, 2**16), log_eta=st.floats(-3, 3), metric=st.sampled_from(["weight", "data"]),
       lrc=st.booleans())
def test_proximal_step_is_the_exact_minimiser_of_the_step_objective(seed, log_eta, metric, lrc):
    """After ``proximal_step(η)`` the gradient of ``‖W − W₀‖²/(2η) + penalty()`` in every compressed weight is 0
    (the penalty's own autograd gradient, in its metric), for step sizes from 1e-3 to 1e3."""
    model = _net(seed % 7, a=5, b=6, c=4).double()  # float64: the check at η = 1e3 cancels 6 digits
    calib = _calibration(3, seed=seed).double()
    comp = (ltc.LRC if lrc else ltc.LTC)(model, X_NET.double(), target_sr=2.0, mu0=0.3, compress_linear=True,
                                        metric=metric, calibration=calib if metric == "data" else None,
                                        penalty_step="proximal")
    comp.start()
    _noise_step(comp, model, torch.Generator().manual_seed(seed), scale=0.1)  # φ ≠ 0, W ≠ Θ
    w0 = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
    eta = 10.0 ** log_eta
    comp.proximal_step(eta)
    with pytest.warns(UserWarning, match=r"penalty_step='proximal'.*pulls twice"):  # here it is the objective
        grads = torch.autograd.grad(comp.penalty(), [s.weight for s in comp.layers.values()])
    assert any(s.rank is not None for s in comp.layers.values())
    for (n, s), g in zip(comp.layers.items(), grads, strict=True):
        if s.rank is None:  # a dense layer's Θ + φ/ρ is W itself: it stays
            assert torch.allclose(s.weight.detach(), w0[n], rtol=1e-12, atol=0), n
            continue
        move = (s.weight.detach() - w0[n]) / eta
        assert float(move.norm()) > 0, n
        assert torch.allclose(move, -g, rtol=1e-7, atol=1e-9 * float(g.norm())), n


@pytest.mark.parametrize("metric", ["weight", "data"])
def test_proximal_step_pins_w_where_the_gradient_step_diverges(metric):
    """At ``η·ρ_k·λ_min(Σ_k) = 1e6`` one proximal step puts every layer at ``Θ + φ/ρ`` (the penalty's minimiser),
    where a plain gradient step of the same size on the same penalty blows up."""
    model = _net(4, a=5, b=6, c=4)
    calib = _calibration(3, seed=4)
    comp = ltc.LTC(model, X_NET, target_sr=2.0, mu0=1.0, compress_linear=True, metric=metric,
                   calibration=calib if metric == "data" else None, penalty_step="proximal")
    comp.start()
    _noise_step(comp, model, torch.Generator().manual_seed(4), scale=0.1)
    floor = min(comp.rho(s) * (1.0 if s.whitening is None else s.whitening.floor) for s in comp.layers.values())
    eta = 1e6 / floor
    before = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
    with pytest.warns(UserWarning, match="proximal"):
        grads = torch.autograd.grad(comp.penalty(), [s.weight for s in comp.layers.values()])
    comp.proximal_step(eta)
    for (n, s), g in zip(comp.layers.items(), grads, strict=True):
        target = s.theta + s.phi / comp.rho(s)
        assert torch.allclose(s.weight.detach(), target, atol=1e-5 * float(target.norm())), n
        if s.rank is not None:  # (a dense layer sits at its target already)
            assert float((before[n] - eta * g - target).norm()) > 1e3 * float((before[n] - target).norm()), n
    assert any(s.rank is not None for s in comp.layers.values())


def test_penalty_warns_once_on_a_proximal_engine_and_never_on_a_gradient_one():
    """Adding ``penalty()`` to the loss of an engine whose L steps are proximal would pull twice: the first call says
    so and names the fix; later calls and the gradient engine stay quiet."""
    import warnings

    for step in ("gradient", "proximal"):
        comp = ltc.LTC(_net(1, a=5, b=6, c=4), X_NET, target_sr=2.0, penalty_step=step)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            first, second = comp.penalty(), comp.penalty()
        assert float(first.detach()) == float(second.detach())  # the warning changes nothing
        msgs = [str(w.message) for w in got]
        if step == "gradient":
            assert msgs == []
        else:
            assert len(msgs) == 1 and "build the engine with penalty_step='gradient'" in msgs[0]


def test_the_proximal_cap_is_set_by_the_smallest_eigenvalue_and_the_gradient_cap_by_the_largest():
    """With ``mu_cap`` and μ far past it, every layer's ρ is ``mu_cap / λ_max(Σ_k)`` for the gradient L step and
    ``mu_cap / λ_min(Σ_k)`` for the proximal one (``Σ_k`` normalised and damped, by our own hooks)."""
    model = _net(5, a=5, b=6, c=4)
    calib = _calibration(3, seed=5)
    names = None
    got = {}
    for step in ("gradient", "proximal"):
        comp = ltc.LTC(copy.deepcopy(model), X_NET, lam=0.05, mu0=1e6, mu_cap=2.0, compress_linear=True,
                       metric="data", calibration=calib, penalty_step=step)
        comp.start()
        names = list(comp.layers)
        got[step] = {n: comp.rho(s) for n, s in comp.layers.items()}
    sigma = _input_moments(model, calib, names, False)
    ev = {n: np.linalg.eigvalsh(0.5 * (sg + sg.T) / np.mean(np.diag(sg)) + 0.01 * np.eye(len(sg)))
          for n, sg in sigma.items()}
    assert got["gradient"] == pytest.approx({n: 2.0 / e[-1] for n, e in ev.items()}, rel=1e-6)
    assert got["proximal"] == pytest.approx({n: 2.0 / e[0] for n, e in ev.items()}, rel=1e-6)


def test_mu_cap_saturates_the_layers_it_reaches_and_lets_the_others_grow():
    """A layer with a huge ``w_k`` (tiny weights under relative weighting) sits at ``ρ_k = mu_cap`` from the
    start while the others follow ``μ·w_k``; the penalty, the multipliers and the C step's ``Z = W − φ/ρ_k`` use
    the capped ρ, the rank choice ``λ·C/C_ref + μ/2·w_k·err`` the uncapped ``μ·w_k``."""
    model = _net(6, a=6, b=7, c=5)
    with torch.no_grad():
        model.c2.weight.mul_(1e-3)
    cap, lam = 1.0, 0.05
    comp = ltc.LTC(model, X_NET, lam=lam, mu0=1e-3, mu_growth=2.0, mu_cap=cap)
    sq_ = {n: float(s.weight.detach().double().square().sum()) for n, s in comp.layers.items()}
    w = {n: sum(sq_.values()) / len(sq_) / sq_[n] for n in sq_}
    comp.start()
    gen = torch.Generator().manual_seed(6)
    rhos = []
    for _ in range(4):
        mu = comp.mu
        rho = {n: min(mu * w[n], cap) for n in w}
        rhos.append(rho)
        assert {n: comp.rho(s) for n, s in comp.layers.items()} == pytest.approx(rho, rel=1e-12)
        expect = sum(0.5 * rho[n] * float((s.weight.detach().double() - s.theta.double()
                                           - s.phi.double() / rho[n]).square().sum()) for n, s in comp.layers.items())
        assert float(comp.penalty().detach()) == pytest.approx(expect, rel=1e-5)
        phi0 = {n: s.phi.clone() for n, s in comp.layers.items()}
        with torch.no_grad():
            for s in comp.layers.values():
                s.weight.add_(0.05 * s.weight.std() * torch.randn(s.weight.shape, generator=gen))
        w1 = {n: s.weight.detach().clone() for n, s in comp.layers.items()}
        comp.step()
        z = {n: w1[n] - phi0[n] / rho[n] for n in w}
        _brute_force_check(comp, model, X_NET, z, lam, mu, "macs", 1, False, w, rtol=1e-7)
        for n, s in comp.layers.items():
            torch.testing.assert_close(s.phi, phi0[n] - rho[n] * (w1[n] - s.theta), rtol=1e-5,
                                       atol=1e-6 * float(s.phi.abs().max() + 1e-30))
    assert all(r["c2"] == cap for r in rhos)  # saturated from the first step
    others = [n for n in w if n != "c2"]
    assert all(rhos[-1][n] == pytest.approx(8 * rhos[0][n]) and rhos[-1][n] < cap for n in others)  # growing


def test_a_penalty_scaled_to_the_learning_rate_pulls_as_hard_per_iteration():
    """SGD on the penalty alone: at a tenth of the learning rate with ``lr_scale=0.1`` every iterate equals the
    full-rate run's (``lr·ρ_k`` is what one iteration pulls by), while the same small rate without the scale is left
    further from Θ."""

    def pull(lr: float, scale: float | None) -> list[float]:
        model = _net(0, scale=0.3)
        comp = ltc.LTC(model, X_NET, target_sr=2.0, mu0=2.0, compress_linear=True)
        comp.start()
        if scale is not None:
            comp.set_lr_scale(scale)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        out = []
        for _ in range(6):
            opt.zero_grad()
            comp.penalty().backward()
            opt.step()
            out.append(comp.distance())
        return out

    full, scaled, plain = pull(0.05, None), pull(0.005, 0.1), pull(0.005, None)
    assert scaled == pytest.approx(full, rel=1e-5)
    assert full[-1] < 0.5 * full[0]  # the pull is real
    assert plain[-1] > 2 * full[-1]
    comp = ltc.LTC(_net(0), X_NET, lam=0.05)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        comp.set_lr_scale(0.0)


# --------------------------------------------------------------------------------------------- 14. state, v3
def test_state_dict_round_trip_with_the_data_metric_resumes_bit_identically():
    calib = _calibration(3, n=6, seed=11)
    n_steps, k = 4, 2
    kw = dict(target_sr=2.0, compress_linear=True, mu0=0.05, metric="data", calibration=calib, mu_cap=2.0)
    model_a, opt_a = _setup(0)
    comp_a = ltc.LTC(model_a, X_NET, **kw)
    _lc_steps(model_a, opt_a, comp_a, range(k))
    pen_k = comp_a.penalty().detach().clone()
    ranks_k = dict(comp_a.ranks)
    _lc_steps(model_a, opt_a, comp_a, range(k, n_steps))

    model_b, opt_b = _setup(0)
    comp_b = ltc.LTC(model_b, X_NET, **kw)
    _lc_steps(model_b, opt_b, comp_b, range(k))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "comp": comp_b.state_dict()}, buf)
    whitening_b = {n: s.whitening.L.clone() for n, s in comp_b.layers.items()}
    del model_b, opt_b, comp_b
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["comp"]["version"] == ENGINE_STATE_VERSION == 3 and saved["comp"]["metric"] == "data"
    model_c, opt_c = _setup(99)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    comp_c = ltc.LTC(model_c, X_NET, **kw)
    comp_c.load_state_dict(saved["comp"])
    assert comp_c.started and comp_c.ranks == ranks_k
    for n, s in comp_c.layers.items():
        assert torch.equal(s.whitening.L, whitening_b[n]), n
    assert torch.equal(comp_c.penalty().detach(), pen_k)  # the resumed penalty, before any new C step
    _lc_steps(model_c, opt_c, comp_c, range(k, n_steps))
    for (na, pa), (nc, pc) in zip(model_a.named_parameters(), model_c.named_parameters(), strict=True):
        assert na == nc and torch.equal(pa, pc), na
    for n in comp_a.layers:
        a, c = comp_a.layers[n], comp_c.layers[n]
        assert torch.equal(a.theta, c.theta) and torch.equal(a.phi, c.phi), n
        assert torch.equal(a.whitening.L, c.whitening.L) and a.whitening.curvature == c.whitening.curvature, n
    assert comp_a.ranks == comp_c.ranks and (comp_a.mu, comp_a.lam) == (comp_c.mu, comp_c.lam)
    assert _strip(comp_a.history) == _strip(comp_c.history)
    assert torch.equal(comp_a.penalty(), comp_c.penalty())


def test_state_of_another_version_or_metric_is_refused():
    calib = _calibration(3)
    comp = ltc.LTC(_net(0), X_NET, lam=0.05, metric="data", calibration=calib)
    comp.start()
    state = comp.state_dict()
    with pytest.raises(ValueError, match="made with metric='data', this engine uses metric='weight'"):
        ltc.LTC(_net(0), X_NET, lam=0.05).load_state_dict(state)
    old = dict(state, version=2)
    with pytest.raises(ValueError, match=r"engine state version 2 is not this ltc's \(3\)"):
        ltc.LTC(_net(0), X_NET, lam=0.05, metric="data", calibration=calib).load_state_dict(old)
    # a state saved before start() resumes as not started: the first C step still runs, once
    fresh = ltc.LTC(_net(0), X_NET, lam=0.05, metric="data", calibration=calib)
    other = ltc.LTC(_net(0), X_NET, lam=0.05, metric="data", calibration=calib)
    other.load_state_dict(fresh.state_dict())
    assert not other.started
    other.start()
    assert other.ranks == comp.ranks and len(other.history) == 1


def test_retarget_before_start_is_the_first_c_step_and_an_unreachable_one_leaves_the_engine_unstarted() -> None:
    from ltc.engine import UnreachableTarget

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(1, 3, 8, 8)
    e = LTC(net, x, target_sr=2.0)
    with pytest.raises(UnreachableTarget) as info:
        e.retarget(1e6)
    assert not e.started and e.target == 2.0 and not e.history
    assert 1.0 < info.value.best < 1e6 and f"reaches {info.value.best:.2f}" in str(info.value)
    e.retarget(3.0)
    assert e.started and e.target == 3.0 and e.sr >= 3.0 and len(e.history) == 1
    ref = LTC(net, x, target_sr=3.0)
    ref.start()
    assert e.ranks == ref.ranks


def test_a_re_targeted_budget_survives_a_state_round_trip_and_a_choice_can_be_restored() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(1, 3, 8, 8)
    e = LTC(net, x, target_sr=2.0)
    e.start()
    kept, ranks = e.choice(), e.ranks
    e.retarget(4.0)
    assert e.ranks != ranks
    other = LTC(net, x, target_sr=2.0)
    other.load_state_dict(e.state_dict())
    assert other.target == 4.0 and other.ranks == e.ranks
    e.restore_choice(kept)
    assert e.target == 2.0 and e.ranks == ranks and e.history[-1]["ranks"] == e.history[0]["ranks"]
    assert all(torch.equal(e.layers[n].theta, kept["layers"][n][1]) for n in e.layers)
