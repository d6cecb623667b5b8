"""Tests for ltc.vbmf (empirical VBMF rank selection)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ltc.vbmf import EVBMFResult, _free_energy, evbmf, evbmf_threshold_factor, vbmf_tucker2_ranks


@pytest.fixture(autouse=True)
def _single_thread():
    """Small SVDs: BLAS/OpenMP threads only add latency (badly so on a loaded machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional; only affects speed
        yield
        return
    with threadpool_limits(limits=1):
        yield


SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _low_rank_plus_noise(rng: np.random.Generator, L: int, M: int, r: int, sigma: float, margin: float):
    """U diag(s) V^T + N(0, sigma^2) noise with every s_k >= margin * noise edge sigma*(sqrt(L)+sqrt(M))."""
    edge = sigma * (math.sqrt(L) + math.sqrt(M))  # largest noise singular value (Marchenko-Pastur edge)
    s = edge * rng.uniform(margin, 3 * margin, size=r)
    U, _ = np.linalg.qr(rng.standard_normal((L, r)))
    V, _ = np.linalg.qr(rng.standard_normal((M, r)))
    return (U * s) @ V.T + sigma * rng.standard_normal((L, M)), s


@SETTINGS
@given(
    L=st.integers(20, 200),
    M=st.integers(20, 200),
    r=st.integers(1, 10),
    log_sigma=st.floats(-3.0, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_recovers_true_rank(L: int, M: int, r: int, log_sigma: float, seed: int) -> None:
    r = min(r, min(L, M) // 4)  # keep the rank well below EVB's ceiling ceil(L / (1 + alpha)) - 1
    rng = np.random.default_rng(seed)
    sigma = 10.0**log_sigma
    Y, s = _low_rank_plus_noise(rng, L, M, r, sigma, margin=3.0)
    res = evbmf(Y)
    assert isinstance(res, EVBMFResult)
    assert res.rank == r
    assert 0.6 < res.sigma2 / sigma**2 < 1.4
    sv = res.singular_values
    assert sv.shape == (min(L, M),)
    assert torch.all(sv[r:] == 0)
    # shrinkage: retained values are positive and strictly below the observed singular values
    observed = np.linalg.svd(Y, compute_uv=False)[:r]
    assert torch.all(sv[:r] > 0)
    assert np.all(sv[:r].numpy() < observed)
    assert np.allclose(sv[:r].numpy(), observed, rtol=0.2)
    # transpose invariance
    res_t = evbmf(Y.T)
    assert res_t.rank == res.rank
    assert math.isclose(res_t.sigma2, res.sigma2, rel_tol=1e-6)


@SETTINGS
@given(L=st.integers(20, 200), M=st.integers(20, 200), log_sigma=st.floats(-4.0, 4.0), seed=st.integers(0, 2**31))
def test_pure_noise_gives_rank_zero(L: int, M: int, log_sigma: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sigma = 10.0**log_sigma
    res = evbmf(sigma * rng.standard_normal((L, M)))
    assert res.rank == 0
    assert torch.all(res.singular_values == 0)
    assert 0.6 < res.sigma2 / sigma**2 < 1.4


@pytest.mark.parametrize("shape", [(300, 300), (150, 600), (600, 150)])
def test_sigma2_accurate_for_large_matrices(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    sigma = 0.37
    Y, _ = _low_rank_plus_noise(rng, *shape, r=6, sigma=sigma, margin=2.0)
    res = evbmf(Y)
    assert res.rank == 6
    assert abs(res.sigma2 / sigma**2 - 1) < 0.2
    assert abs(evbmf(sigma * rng.standard_normal(shape)).sigma2 / sigma**2 - 1) < 0.2


def test_sigma2_is_global_minimiser_of_free_energy() -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        L, M = (int(v) for v in rng.integers(5, 80, size=2))
        Y = rng.standard_normal((L, M))
        Y += rng.standard_normal((L, 3)) @ rng.standard_normal((3, M)) * rng.uniform(0.2, 2.0)
        res = evbmf(Y)
        Yo = Y if L <= M else Y.T
        l, m = Yo.shape
        y = np.linalg.svd(Yo, compute_uv=False) ** 2
        xbar = evbmf_threshold_factor(l / m)
        grid = np.linspace(math.log(res.sigma2) - 2.0, math.log(res.sigma2) + 2.0, 4001)
        # restrict the brute-force grid to the admissible interval
        h = math.ceil(l / (1 + l / m)) - 1
        lower = max(y[h] / (m * xbar), y[h:].mean() / m)
        upper = y.sum() / (l * m)
        grid = grid[(grid >= math.log(lower)) & (grid <= math.log(upper))]
        f_hat = _free_energy(np.array([math.log(res.sigma2)]), y, l, m, l / m, xbar)[0]
        assert f_hat <= _free_energy(grid, y, l, m, l / m, xbar).min() + 1e-9
        assert lower * (1 - 1e-9) <= res.sigma2 <= upper * (1 + 1e-9)


def test_threshold_constants() -> None:
    # tau_bar = 2.5129 at alpha = 1 (paper); threshold above the Marchenko-Pastur edge (1 + sqrt(alpha))^2
    assert math.isclose(evbmf_threshold_factor(1.0), 3.5129 * (1 + 1 / 2.5129), rel_tol=1e-4)
    for alpha in (1e-4, 0.01, 0.1, 0.5, 1.0):
        assert evbmf_threshold_factor(alpha) > (1 + math.sqrt(alpha)) ** 2
    with pytest.raises(ValueError):
        evbmf_threshold_factor(0.0)


def test_given_sigma2_and_threshold_rule() -> None:
    rng = np.random.default_rng(1)
    L, M = 30, 50
    Y = rng.standard_normal((L, M))
    s = np.linalg.svd(Y, compute_uv=False)
    thr2 = s[4] ** 2 * 0.999 + s[5] ** 2 * 0.001  # between 5th and 6th singular values
    sigma2 = thr2 / (M * evbmf_threshold_factor(L / M))
    res = evbmf(Y, sigma2=sigma2)
    assert res.rank == 5
    assert res.sigma2 == sigma2
    with pytest.raises(ValueError):
        evbmf(Y, sigma2=-1.0)


def test_numpy_torch_and_dtypes_agree() -> None:
    rng = np.random.default_rng(2)
    Y, _ = _low_rank_plus_noise(rng, 40, 70, 3, 0.1, margin=3.0)
    a = evbmf(Y)
    b = evbmf(torch.from_numpy(Y))
    c = evbmf(torch.from_numpy(Y).float())
    assert a.rank == b.rank == c.rank == 3
    assert a.singular_values.dtype == torch.float64
    assert c.singular_values.dtype == torch.float32
    assert math.isclose(a.sigma2, b.sigma2, rel_tol=1e-12)
    assert math.isclose(a.sigma2, c.sigma2, rel_tol=1e-3)


@pytest.mark.parametrize(
    "Y",
    [
        np.ones((1, 1)),
        np.array([[-3.0]]),
        np.ones((1, 9)),
        np.arange(9.0).reshape(9, 1),
        np.zeros((4, 6)),
        np.zeros((1, 1)),
        np.ones((2, 2)),
        np.eye(7),
        np.outer(np.arange(1.0, 6.0), np.arange(1.0, 9.0)),  # exactly rank 1
        np.diag([1e12, 1.0, 1e-12, 0.0]),  # huge dynamic range
        np.full((3, 5), 1e150),
        np.full((3, 5), 1e-150),
        np.random.default_rng(0).standard_normal((200, 3)).astype(np.float32),
        np.array([[1, 2], [3, 4]]),  # integer input
    ],
)
def test_edge_cases_do_not_raise(Y: np.ndarray) -> None:
    res = evbmf(Y)
    assert math.isfinite(res.sigma2) and res.sigma2 >= 0
    assert 0 <= res.rank <= min(Y.shape)
    assert res.singular_values.shape == (min(Y.shape),)
    assert torch.isfinite(res.singular_values).all()
    assert evbmf(Y.T).rank == res.rank


def test_edge_case_values() -> None:
    zero = evbmf(np.zeros((4, 6)))
    assert zero.rank == 0 and zero.sigma2 == 0.0 and torch.equal(zero.singular_values, torch.zeros(4))
    assert evbmf(np.ones((1, 1))).rank == 0  # a single number cannot be told apart from noise
    assert evbmf(np.outer(np.arange(1.0, 6.0), np.arange(1.0, 9.0))).rank == 1  # noise-free rank 1
    big = np.diag([1e12, 1e11, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert evbmf(big).rank == 2
    with pytest.raises(ValueError):
        evbmf(np.ones(3))
    with pytest.raises(ValueError):
        evbmf(np.array([[1.0, np.nan]]))


def _tucker2_weight(rng: np.random.Generator, T: int, S: int, k: int, r_out: int, r_in: int, noise: float):
    core = rng.standard_normal((r_out, r_in, k, k))
    U_out, _ = np.linalg.qr(rng.standard_normal((T, r_out)))
    U_in, _ = np.linalg.qr(rng.standard_normal((S, r_in)))
    W = np.einsum("abij,ta,sb->tsij", core, U_out, U_in)
    return torch.from_numpy(W + noise * rng.standard_normal(W.shape)).float()


@pytest.mark.parametrize(
    "T,S,k,r_out,r_in", [(64, 48, 3, 8, 5), (32, 96, 3, 4, 12), (128, 64, 1, 7, 7), (16, 16, 5, 3, 2)]
)
def test_vbmf_tucker2_ranks_recovers_core_ranks(T: int, S: int, k: int, r_out: int, r_in: int) -> None:
    # (for 1x1 kernels both unfoldings are U_out core U_in^T, so the ranks coincide)
    rng = np.random.default_rng(T * S + k)
    W = _tucker2_weight(rng, T, S, k, r_out, r_in, noise=1e-3)
    assert vbmf_tucker2_ranks(W) == (r_in, r_out)


def test_vbmf_tucker2_ranks_weaken_and_floor() -> None:
    rng = np.random.default_rng(0)
    T, S, k = 64, 48, 3
    W = _tucker2_weight(rng, T, S, k, r_out=8, r_in=5, noise=1e-3)
    assert vbmf_tucker2_ranks(W, weaken=1.0) == (S, T)
    r_in, r_out = vbmf_tucker2_ranks(W, weaken=0.5)
    assert r_in == 5 + round(0.5 * (S - 5)) and r_out == 8 + math.floor(0.5 * (T - 8) + 0.5)
    # pure noise: EVBMF rank 0, floored at 1
    noise = torch.randn(T, S, k, k, generator=torch.Generator().manual_seed(0))
    assert vbmf_tucker2_ranks(noise) == (1, 1)
    # 1x1 conv with more outputs than inputs: out-unfolding rank bounded by S
    assert vbmf_tucker2_ranks(torch.randn(32, 4, 1, 1), weaken=1.0) == (4, 4)
    W.requires_grad_(True)
    assert vbmf_tucker2_ranks(W) == (5, 8)
    with pytest.raises(ValueError):
        vbmf_tucker2_ranks(W, weaken=1.5)
    with pytest.raises(ValueError):
        vbmf_tucker2_ranks(torch.randn(4, 4))
