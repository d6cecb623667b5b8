"""Empirical variational Bayesian matrix factorisation (EVBMF) for rank selection.

Implements the global analytic solution of fully observed empirical VBMF from

    S. Nakajima, M. Sugiyama, S. D. Babacan, R. Tomioka, "Global analytic solution of
    fully-observed variational Bayesian matrix factorization", JMLR 14 (2013),

with the noise-variance estimation of Nakajima, Tomioka, Sugiyama, Babacan, "Condition for
perfect dimensionality recovery by variational Bayesian PCA", JMLR 16 (2015).

Model: ``Y = B A^T + E`` with ``Y`` of shape ``(L, M)``, ``L <= M`` (the matrix is transposed
otherwise), Gaussian noise of variance ``sigma2`` and Gaussian priors on the columns of ``A`` and
``B`` whose variances are learned (empirical Bayes).  With ``alpha = L / M`` and singular values
``gamma_h`` of ``Y``, write ``x_h = gamma_h^2 / (M sigma2)`` and

    tau(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2,
    psi1(x) = log(tau(x) + 1) + alpha log(tau(x) / alpha + 1) - tau(x).

``tau_bar`` is the unique positive zero of ``t -> log(t + 1) + alpha log(t / alpha + 1) - t``
(``tau_bar = 2.5129`` for ``alpha = 1``, ``~2.5129 sqrt(alpha)`` in general; we solve for it
exactly) and ``x_bar = (1 + tau_bar)(1 + alpha / tau_bar)``.  A component survives iff
``x_h > x_bar``, i.e. ``gamma_h > sqrt(M sigma2 (1 + tau_bar)(1 + alpha / tau_bar))``, and its
posterior-mean singular value is

    gamma_hat_h = gamma_h / 2 * (1 - (L + M) sigma2 / gamma_h^2
                                 + sqrt((1 - (L + M) sigma2 / gamma_h^2)^2 - 4 L M sigma2^2 / gamma_h^4)).

The noise variance minimises (up to constants) the free energy

    F(sigma2) = L log(sigma2) + sum_h x_h + sum_{h: x_h > x_bar} psi1(x_h)

over ``max(gamma_{H+1}^2 / (M x_bar), mean_{h > H} gamma_h^2 / M) <= sigma2 <= ||Y||_F^2 / (L M)``
with ``H = ceil(L / (1 + alpha)) - 1`` (the largest rank EVB can return).  The objective is not
convex in general, so we minimise it by a log-spaced grid search followed by golden-section
refinement (no SciPy needed, nothing that can fail on degenerate bounds).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["EVBMFResult", "evbmf", "vbmf_tucker2_ranks", "evbmf_threshold_factor"]

_GRID_POINTS = 256
_GOLDEN_ITERS = 80
# Lower limit of the sigma2 search interval relative to its upper limit; only reached for
# (numerically) noise-free low-rank matrices, where the free energy decreases towards sigma2 -> 0.
_MIN_REL_SIGMA2 = 1e-16


class EVBMFResult(NamedTuple):
    """Result of :func:`evbmf`.

    Attributes:
        rank: number of singular values of ``Y`` strictly above the EVB threshold
            ``sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))``; may be 0 (pure noise).
        sigma2: noise variance per entry of ``Y`` (estimated unless given), in squared units of ``Y``.
            0.0 for the all-zero (or empty) matrix.
        singular_values: shape ``(min(L, M),)``, descending; the EVB posterior-mean (shrunk)
            singular values, exactly 0 beyond ``rank``. CPU tensor with the floating dtype of
            ``Y`` (default dtype for non-floating input).
    """

    rank: int
    sigma2: float
    singular_values: torch.Tensor


@lru_cache(maxsize=4096)
def _tau_bar(alpha: float) -> float:
    """Positive root of ``log(t+1) + alpha*log(t/alpha+1) - t`` (concave, 0 at t=0, slope 1 there)."""

    def f(t: float) -> float:
        return math.log1p(t) + alpha * math.log1p(t / alpha) - t

    lo, hi = 0.0, max(1.0, 4.0 * math.sqrt(alpha))
    while f(hi) > 0.0:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if f(mid) > 0.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def evbmf_threshold_factor(alpha: float) -> float:
    """``x_bar = (1 + tau_bar)(1 + alpha / tau_bar)`` for ``alpha = L / M`` in ``(0, 1]``.

    The EVB truncation threshold on singular values is ``sqrt(M * sigma2 * x_bar)``.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    tb = _tau_bar(float(alpha))
    return (1.0 + tb) * (1.0 + alpha / tb)


def _free_energy(log_v: np.ndarray, y: np.ndarray, L: int, M: int, alpha: float, xbar: float) -> np.ndarray:
    """Free energy (up to constants) at ``sigma2 = exp(log_v)``; ``y`` are squared singular values."""
    log_v = np.atleast_1d(np.asarray(log_v, dtype=np.float64))
    v = np.exp(log_v)[:, None]
    x = y[None, :] / (M * v)
    obj = L * log_v + x.sum(axis=1)
    mask = x > xbar
    if mask.any():
        xs = np.where(mask, x, xbar)  # keep the square root real on masked-out entries
        b = xs - (1.0 + alpha)
        tau = 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))
        psi1 = np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau
        obj = obj + np.where(mask, psi1, 0.0).sum(axis=1)
    return obj


def _minimise_sigma2(y: np.ndarray, L: int, M: int, alpha: float, xbar: float) -> float:
    """Estimate sigma2 (in units of ``y``) by bounded minimisation of the free energy."""
    upper = float(y.sum()) / (L * M)
    h_max = math.ceil(L / (1.0 + alpha)) - 1  # largest rank EVB can return; h_max < L
    lower = max(float(y[h_max]) / (M * xbar), float(y[h_max:].mean()) / M)
    lower = max(lower, upper * _MIN_REL_SIGMA2)
    if not lower < upper * (1.0 - 1e-12):
        return upper
    a, b = math.log(lower), math.log(upper)
    grid = np.linspace(a, b, _GRID_POINTS)
    vals = _free_energy(grid, y, L, M, alpha, xbar)
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, _GRID_POINTS - 1)]
    best_u, best_f = float(grid[i]), float(vals[i])
    # golden-section search on [lo, hi] in log(sigma2)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = float(_free_energy(c, y, L, M, alpha, xbar)[0]), float(_free_energy(d, y, L, M, alpha, xbar)[0])
    for _ in range(_GOLDEN_ITERS):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = float(_free_energy(c, y, L, M, alpha, xbar)[0])
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = float(_free_energy(d, y, L, M, alpha, xbar)[0])
    for u, fu in ((c, fc), (d, fd)):
        if fu < best_f:
            best_u, best_f = float(u), fu
    return min(max(math.exp(best_u), lower), upper)


def _singular_values(Y: torch.Tensor) -> np.ndarray:
    """Singular values of a float64 CPU matrix (LAPACK gesdd via NumPy, torch as fallback)."""
    try:
        return np.linalg.svd(Y.numpy(), compute_uv=False)
    except np.linalg.LinAlgError:  # convergence failure on pathological input
        return torch.linalg.svdvals(Y).numpy()


def evbmf(Y: torch.Tensor | np.ndarray, sigma2: float | None = None) -> EVBMFResult:
    """Empirical VBMF of a fully observed matrix (rank selection + shrinkage).

    Args:
        Y: 2-D tensor or array of shape ``(L, M)`` (any orientation; transposed internally so that
            rows <= columns). Computation is done on the CPU in float64.
        sigma2: known noise variance per entry; estimated by free-energy minimisation if ``None``.

    Returns:
        :class:`EVBMFResult` ``(rank, sigma2, singular_values)``: the EVB rank (0 for pure noise;
        callers that need a usable rank should floor it at 1), the (estimated) noise variance, and
        the ``min(L, M)`` shrunk singular values (zeros beyond ``rank``).

    Raises:
        ValueError: if ``Y`` is not 2-D or has non-finite entries, or if ``sigma2`` is negative.
    """
    t = torch.as_tensor(Y)
    if t.ndim != 2:
        raise ValueError(f"evbmf expects a 2-D matrix, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError("evbmf expects a real matrix")
    out_dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if t.shape[0] > t.shape[1]:
        t = t.T
    L, M = t.shape
    if sigma2 is not None and not (math.isfinite(sigma2) and sigma2 >= 0.0):
        raise ValueError(f"sigma2 must be a finite non-negative number, got {sigma2}")
    if L == 0:
        return EVBMFResult(0, float(sigma2 or 0.0), torch.zeros(0, dtype=out_dtype))
    if not bool(torch.isfinite(t).all()):
        raise ValueError("evbmf: Y contains NaN or inf entries")

    amax = float(t.abs().max())
    if amax == 0.0:
        return EVBMFResult(0, float(sigma2 or 0.0), torch.zeros(L, dtype=out_dtype))
    # Work in units where the largest singular value is 1 (robust to huge/tiny magnitudes).
    s = _singular_values(t / amax).astype(np.float64)
    s = np.clip(np.sort(s)[::-1], 0.0, None)
    smax = float(s[0])
    if smax == 0.0:  # underflow after scaling; cannot happen for finite nonzero input in practice
        return EVBMFResult(0, float(sigma2 or 0.0), torch.zeros(L, dtype=out_dtype))
    s = s / smax
    scale2 = (amax * smax) ** 2  # sigma2_physical = v * scale2

    alpha = L / M
    xbar = evbmf_threshold_factor(alpha)
    if sigma2 is None:
        v = _minimise_sigma2(s * s, L, M, alpha, xbar)
        sigma2_out = v * scale2
    else:
        v = float(sigma2) / scale2
        sigma2_out = float(sigma2)

    threshold = math.sqrt(M * v * xbar)
    rank = int(np.count_nonzero(s > threshold))
    shrunk = np.zeros_like(s)
    if rank > 0:
        g = s[:rank]
        r = 1.0 - (L + M) * v / (g * g)
        disc = np.maximum(r * r - 4.0 * L * M * v * v / g**4, 0.0)
        shrunk[:rank] = np.maximum(0.5 * g * (r + np.sqrt(disc)), 0.0) * (amax * smax)
    return EVBMFResult(rank, float(sigma2_out), torch.from_numpy(shrunk).to(out_dtype))


def vbmf_tucker2_ranks(weight: torch.Tensor, weaken: float = 0.0) -> tuple[int, int]:
    """Tucker-2 ranks ``(r_in, r_out)`` of a conv weight from EVBMF of its two unfoldings.

    Args:
        weight: conv kernel of shape ``(T, S, kh, kw)`` (out channels, in channels, kernel).
        weaken: in ``[0, 1]``; each rank ``r`` becomes ``r + round(weaken * (full - r))`` (halves
            rounded up), where ``full`` is the maximal rank of the unfolding (``min(S, T*kh*kw)``
            for ``r_in``, ``min(T, S*kh*kw)`` for ``r_out``). 0 keeps the EVBMF ranks, 1 gives full.

    Returns:
        ``(r_in, r_out)``: EVBMF rank of the in-channel unfolding ``W.transpose(0, 1).reshape(S, -1)``
        and of the out-channel unfolding ``W.reshape(T, -1)``, each floored at 1.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a conv weight of shape (T, S, kh, kw), got {tuple(weight.shape)}")
    if not (0.0 <= weaken <= 1.0):
        raise ValueError(f"weaken must be in [0, 1], got {weaken}")
    w = weight.detach()
    T, S = w.shape[0], w.shape[1]
    if w.numel() == 0:
        raise ValueError(f"empty conv weight of shape {tuple(w.shape)}")

    def one(mat: torch.Tensor) -> int:
        full = min(mat.shape)
        r = max(1, evbmf(mat).rank)
        r = r + math.floor(weaken * (full - r) + 0.5)
        return int(min(max(r, 1), full))

    r_out = one(w.reshape(T, -1))
    r_in = one(w.transpose(0, 1).reshape(S, -1))
    return r_in, r_out
