"""Tests for ltc.tensor: unfold/fold/mode_product, Tucker-2 (HOSVD + HOOI), the exact error table and the
matrix (SVD) helpers, each checked against an independent brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ltc.tensor import (
    Tucker2Factors,
    check_tucker2_ranks,
    fold,
    leading_left_singular_vectors,
    matrix_analysis,
    matrix_error_table,
    mode_product,
    truncated_svd,
    tucker2,
    tucker2_analysis,
    tucker2_error_table,
    unfold,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

seeds = st.integers(0, 2**31 - 1)
channels = st.integers(1, 12)
kernels = st.integers(1, 3)


def randn(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@st.composite
def conv_weights(draw, dtype=torch.float64):
    """A (T, S, kh, kw) weight: Gaussian, rank-deficient in its channel modes, or with a decaying spectrum,
    at a random overall scale."""
    t, s, kh, kw = draw(channels), draw(channels), draw(kernels), draw(kernels)
    seed = draw(seeds)
    kind = draw(st.sampled_from(["gauss", "low_rank", "decay"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    w = randn((t, s, kh, kw), seed, torch.float64)
    if kind == "low_rank":
        # W = G x_0 A x_1 B with thin A, B: both channel unfoldings are rank-deficient (zero singular values).
        ro, ri = draw(st.integers(1, t)), draw(st.integers(1, s))
        a, b = randn((t, ro), seed + 1, torch.float64), randn((s, ri), seed + 2, torch.float64)
        w = torch.einsum("oiab,to,si->tsab", randn((ro, ri, kh, kw), seed + 3, torch.float64), a, b)
    elif kind == "decay":
        w = w * torch.logspace(0, -3, t, dtype=torch.float64)[:, None, None, None]
    return (w * scale).to(dtype)


def sq_err(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float((w.double() - approx.double()).square().sum())


def assert_orthonormal_columns(m: torch.Tensor, atol: float) -> None:
    eye = torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
    dev = float((m.T @ m - eye).abs().max()) if m.shape[1] else 0.0
    assert dev <= atol, f"columns not orthonormal: max |M^T M - I| = {dev:.3g} > {atol:.3g}"


def einsum_mode_product(x: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    letters = "abcdefg"[: x.dim()]
    out = letters.replace(letters[mode], "z")
    return torch.einsum(f"{letters},z{letters[mode]}->{out}", x, matrix)


# --------------------------------------------------------------------------------------------- unfold / fold


@settings(max_examples=200)
@given(
    shape=st.lists(st.integers(1, 5), min_size=3, max_size=4).map(tuple),
    mode_frac=st.floats(0, 0.999),
    negative=st.booleans(),
    seed=seeds,
    j=st.integers(1, 5),
)
def test_unfold_fold_roundtrip_and_mode_product_match_einsum(shape, mode_frac, negative, seed, j):
    x = randn(shape, seed, torch.float64)
    mode = int(mode_frac * len(shape))
    m = unfold(x, mode)
    assert m.shape == (shape[mode], x.numel() // shape[mode])
    # Row-major order of the remaining modes: the unfolding is movedim + reshape.
    torch.testing.assert_close(m, torch.movedim(x, mode, 0).reshape(shape[mode], -1), rtol=0, atol=0)
    assert torch.equal(fold(m, mode, x.shape), x)
    neg = mode - len(shape)
    if negative:
        assert torch.equal(unfold(x, neg), m)
        assert torch.equal(fold(unfold(x, neg), neg, x.shape), x)

    mat = randn((j, shape[mode]), seed + 1, torch.float64)
    y = mode_product(x, mat, neg if negative else mode)
    expected_shape = list(shape)
    expected_shape[mode] = j
    assert y.shape == tuple(expected_shape)
    torch.testing.assert_close(y, einsum_mode_product(x, mat, mode), rtol=1e-12, atol=1e-12)
    # The defining identity: unfold(x x_m M, m) = M @ unfold(x, m).
    torch.testing.assert_close(unfold(y, mode), mat @ m, rtol=1e-12, atol=1e-12)


def test_unfold_of_a_conv_weight_is_the_channel_matricisation():
    w = randn((5, 4, 3, 2), 0)
    torch.testing.assert_close(unfold(w, 0), w.reshape(5, -1), rtol=0, atol=0)
    torch.testing.assert_close(unfold(w, 1), w.permute(1, 0, 2, 3).reshape(4, -1), rtol=0, atol=0)


def test_unfold_fold_mode_product_reject_bad_arguments():
    x = randn((2, 3, 4), 0)
    with pytest.raises(ValueError, match="mode 3 is out of range"):
        unfold(x, 3)
    with pytest.raises(ValueError, match="out of range"):
        fold(unfold(x, 0), 5, x.shape)
    with pytest.raises(ValueError, match="cannot fold"):
        fold(randn((3, 8), 1), 0, x.shape)
    with pytest.raises(ValueError, match=r"\(J, 3\) matrix for mode 1"):
        mode_product(x, randn((2, 4), 2), 1)
    with pytest.raises(ValueError, match=r"\(J, 3\) matrix"):
        mode_product(x, randn((3,), 2), 1)


# ------------------------------------------------------------------------------------------------- tucker2


@settings(max_examples=200)
@given(w=conv_weights(), data=st.data())
def test_tucker2_factor_shapes_orthonormality_and_core(w, data):
    t, s, kh, kw = w.shape
    r_in, r_out = data.draw(st.integers(1, s), label="r_in"), data.draw(st.integers(1, t), label="r_out")
    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        f = tucker2(w.to(dtype), (r_in, r_out))
        assert isinstance(f, Tucker2Factors)
        assert f.core.shape == (r_out, r_in, kh, kw)
        assert f.u_out.shape == (t, r_out) and f.v_in.shape == (s, r_in)
        assert f.ranks == (r_in, r_out)
        assert f.core.dtype == f.u_out.dtype == f.v_in.dtype == dtype
        assert_orthonormal_columns(f.u_out, atol)
        assert_orthonormal_columns(f.v_in, atol)
        assert f.to_tensor().shape == w.shape
    f = tucker2(w, (r_in, r_out))
    # core = W x_0 U^T x_1 V^T, and to_tensor() = core x_0 U x_1 V.
    core = mode_product(mode_product(w, f.u_out.T, 0), f.v_in.T, 1)
    torch.testing.assert_close(f.core, core, rtol=1e-10, atol=1e-12 * float(w.abs().max()))
    rebuilt = mode_product(mode_product(f.core, f.u_out, 0), f.v_in, 1)
    torch.testing.assert_close(f.to_tensor(), rebuilt, rtol=1e-10, atol=1e-12 * float(w.abs().max()))


@settings(max_examples=200)
@given(w=conv_weights())
def test_tucker2_at_full_ranks_reconstructs_the_weight(w):
    t, s = w.shape[:2]
    scale = float(w.abs().max())
    torch.testing.assert_close(tucker2(w, (s, t)).to_tensor(), w, rtol=0, atol=1e-10 * scale)
    w32 = w.float()
    torch.testing.assert_close(tucker2(w32, (s, t)).to_tensor(), w32, rtol=0, atol=1e-5 * scale)


@settings(max_examples=200)
@given(w=conv_weights(), data=st.data())
def test_hooi_is_never_worse_than_hosvd_and_keeps_orthonormal_factors(w, data):
    t, s = w.shape[:2]
    r_in, r_out = data.draw(st.integers(1, s), label="r_in"), data.draw(st.integers(1, t), label="r_out")
    n_iter = data.draw(st.integers(1, 5), label="n_iter")
    total = float(w.square().sum())
    tol = 1e-10 * total
    hosvd, hooi = tucker2(w, (r_in, r_out)), tucker2(w, (r_in, r_out), n_iter=n_iter)
    assert_orthonormal_columns(hooi.u_out, 1e-10)
    assert_orthonormal_columns(hooi.v_in, 1e-10)
    e0, e1 = sq_err(w, hosvd.to_tensor()), sq_err(w, hooi.to_tensor())
    assert e1 <= e0 + tol, (e0, e1)
    # The reconstruction is an orthogonal projection: error = ||W||^2 - ||core||^2.
    assert abs(e1 - (total - float(hooi.core.square().sum()))) <= tol
    if data.draw(st.booleans(), label="float32"):
        f32 = tucker2(w.float(), (r_in, r_out), n_iter=n_iter)
        assert f32.core.dtype == torch.float32
        assert_orthonormal_columns(f32.u_out, 1e-5)
        assert_orthonormal_columns(f32.v_in, 1e-5)


def test_hooi_sweeps_are_monotone():
    for seed in range(5):
        w = randn((9, 7, 3, 2), seed, torch.float64)
        errs = [sq_err(w, tucker2(w, (3, 2), n_iter=k).to_tensor()) for k in range(6)]
        assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:], strict=False)), errs


def test_hooi_strictly_improves_on_a_weight_where_hosvd_is_suboptimal():
    # Fixed, seeded example: one sweep must find a strictly better subspace than plain HOSVD here.
    w = randn((8, 6, 3, 3), 7, torch.float64)
    e0 = sq_err(w, tucker2(w, (2, 2)).to_tensor())
    e5 = sq_err(w, tucker2(w, (2, 2), n_iter=5).to_tensor())
    assert e5 < e0 * (1 - 1e-6)


# -------------------------------------------------------------------------------------- exact error table


def brute_force_table(w64: torch.Tensor) -> torch.Tensor:
    """err[r_in, r_out] = ||W - tucker2(W, (r_in, r_out)).to_tensor()||^2 for every cell, in float64."""
    t, s = w64.shape[:2]
    table = torch.empty(s + 1, t + 1, dtype=torch.float64)
    table[0, :] = table[:, 0] = w64.square().sum()
    for r_in in range(1, s + 1):
        for r_out in range(1, t + 1):
            table[r_in, r_out] = sq_err(w64, tucker2(w64, (r_in, r_out)).to_tensor())
    return table


def svd_projection_table(w64: torch.Tensor) -> torch.Tensor:
    """The same table from torch.linalg.svd bases and explicit projectors (independent of ltc's eigh)."""
    t, s = w64.shape[:2]
    u = torch.linalg.svd(unfold(w64, 0), full_matrices=True)[0]
    v = torch.linalg.svd(unfold(w64, 1), full_matrices=True)[0]
    mask_u = torch.tril(torch.ones(t, t, dtype=torch.float64))  # row k keeps the first k+1 columns
    mask_v = torch.tril(torch.ones(s, s, dtype=torch.float64))
    pu = torch.einsum("ki,ai,bi->kab", mask_u, u, u)  # (T, T, T): projector of rank k+1
    pv = torch.einsum("ki,ai,bi->kab", mask_v, v, v)  # (S, S, S)
    proj = torch.einsum("mtu,nsv,uvab->nmtsab", pu, pv, w64)  # [r_in-1, r_out-1]
    table = torch.empty(s + 1, t + 1, dtype=torch.float64)
    table[0, :] = table[:, 0] = w64.square().sum()
    table[1:, 1:] = (proj - w64).square().sum(dim=(2, 3, 4, 5))
    return table


@settings(max_examples=200)
@given(w=conv_weights(dtype=torch.float32))
def test_error_table_equals_brute_force_in_every_cell(w):
    # w is float32; w64 is its exact float64 copy. One brute force (float64) checks both tables.
    w64 = w.double()
    t, s = w.shape[:2]
    total = float(w64.square().sum())
    brute = brute_force_table(w64)
    for weight in (w64, w):
        table = tucker2_error_table(weight)
        assert table.dtype == torch.float64 and table.shape == (s + 1, t + 1)
        assert torch.all(table[0, :] == total) and torch.all(table[:, 0] == total)
        torch.testing.assert_close(table, brute, rtol=0, atol=1e-8 * total)
    torch.testing.assert_close(table, svd_projection_table(w64), rtol=0, atol=1e-8 * total)
    # Monotone non-increasing in both ranks; zero at full ranks; never above the slides' separable bound.
    assert torch.all(table[1:, :] <= table[:-1, :] + 1e-10 * total)
    assert torch.all(table[:, 1:] <= table[:, :-1] + 1e-10 * total)
    assert float(table[s, t]) <= 1e-10 * total
    tail_out = matrix_error_table(unfold(w64, 0))  # index r_out, length min(T, S*kh*kw) + 1
    tail_in = matrix_error_table(unfold(w64, 1))
    tail_out = torch.cat([tail_out, tail_out.new_zeros(t + 1 - len(tail_out))])
    tail_in = torch.cat([tail_in, tail_in.new_zeros(s + 1 - len(tail_in))])
    assert torch.all(table <= tail_in[:, None] + tail_out[None, :] + 1e-10 * total)


@settings(max_examples=200)
@given(w=conv_weights(), data=st.data())
def test_tucker2_analysis_factors_match_tucker2(w, data):
    t, s = w.shape[:2]
    r_in, r_out = data.draw(st.integers(1, s), label="r_in"), data.draw(st.integers(1, t), label="r_out")
    a = tucker2_analysis(w)
    assert a.u.shape == (t, t) and a.v.shape == (s, s) and a.rotated.shape == w.shape
    assert_orthonormal_columns(a.u, 1e-10)
    assert_orthonormal_columns(a.v, 1e-10)
    scale = float(w.abs().max())
    f, g = a.factors((r_in, r_out)), tucker2(w, (r_in, r_out))
    torch.testing.assert_close(f.to_tensor(), g.to_tensor(), rtol=0, atol=1e-10 * scale)
    assert a.factors((r_in, r_out), dtype=torch.float32).core.dtype == torch.float32
    total = float(w.square().sum())
    assert abs(sq_err(w, f.to_tensor()) - float(a.table[r_in, r_out])) <= 1e-8 * total


# -------------------------------------------------------------------------------------- matrices / SVD


@st.composite
def matrices(draw):
    m, n = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    a = randn((m, n), draw(seeds), torch.float64)
    if draw(st.booleans()):  # rank-deficient
        r = draw(st.integers(1, min(m, n)))
        a = randn((m, r), draw(seeds), torch.float64) @ randn((r, n), draw(seeds), torch.float64)
    return a * draw(st.sampled_from([1e-3, 1.0, 1e3]))


@settings(max_examples=200)
@given(a=matrices(), data=st.data(), balance=st.booleans())
def test_truncated_svd_and_matrix_error_table_match_torch_svd(a, data, balance):
    m, n = a.shape
    full = min(m, n)
    rank = data.draw(st.integers(1, full), label="rank")
    u, sv, vh = torch.linalg.svd(a, full_matrices=False)
    total = float(a.square().sum())
    scale = float(a.abs().max())

    table = matrix_error_table(a)
    assert table.dtype == torch.float64 and table.shape == (full + 1,)
    brute = torch.tensor([float(sv[r:].square().sum()) for r in range(full + 1)], dtype=torch.float64)
    torch.testing.assert_close(table, brute, rtol=0, atol=1e-10 * total)
    assert abs(float(table[0]) - total) <= 1e-10 * total and float(table[full]) == 0.0

    f = truncated_svd(a, rank, balance=balance)
    assert f.left.shape == (m, rank) and f.right.shape == (rank, n) and f.rank == rank
    best = (u[:, :rank] * sv[:rank]) @ vh[:rank]
    err = sq_err(a, f.to_tensor())
    # Eckart-Young: the error is the tail sum (the product itself is unique only up to ties in sv).
    assert abs(err - float(table[rank])) <= 1e-8 * total
    if rank == full or float(sv[rank - 1] - sv[rank]) > 1e-6 * float(sv[0]):
        torch.testing.assert_close(f.to_tensor(), best, rtol=0, atol=1e-8 * scale)
    if balance:
        # sqrt(s) split: column norms of left == row norms of right == sqrt(s).
        torch.testing.assert_close(f.left.norm(dim=0), sv[:rank].sqrt(), rtol=1e-8, atol=1e-8 * scale**0.5)
        torch.testing.assert_close(f.right.norm(dim=1), sv[:rank].sqrt(), rtol=1e-8, atol=1e-8 * scale**0.5)
    else:
        assert_orthonormal_columns(f.right.T, 1e-10)

    an = matrix_analysis(a)
    torch.testing.assert_close(an.table, table, rtol=0, atol=1e-10 * total)
    fa = an.factors(rank)
    assert abs(sq_err(a, fa.to_tensor()) - float(table[rank])) <= 1e-8 * total
    assert fa.left.shape == (m, rank) and fa.right.shape == (rank, n)

    f32 = truncated_svd(a.float(), rank)
    assert f32.left.dtype == torch.float32 and matrix_error_table(a.float()).dtype == torch.float64


@settings(max_examples=200)
@given(a=matrices(), data=st.data())
def test_leading_left_singular_vectors_span_the_svd_subspace(a, data):
    m = a.shape[0]
    r = data.draw(st.integers(0, m), label="r")
    b = leading_left_singular_vectors(a, r)
    assert b.shape == (m, r)
    assert_orthonormal_columns(b, 1e-10)
    full = leading_left_singular_vectors(a)
    assert full.shape == (m, m)
    # The captured energy ||B^T A||^2 equals the sum of the r largest squared singular values.
    sv2 = torch.linalg.svdvals(a).square()
    total = float(sv2.sum())
    assert abs(float((b.T @ a).square().sum()) - float(sv2[:r].sum())) <= 1e-9 * total


# ------------------------------------------------------------------------------------- bad input, float64


def test_rank_errors_name_the_rank_and_the_allowed_range():
    w = randn((6, 4, 3, 3), 0)
    with pytest.raises(ValueError, match=r"r_in=0 is out of range.*\[1, S=4\]"):
        tucker2(w, (0, 3))
    with pytest.raises(ValueError, match=r"r_in=5 is out of range.*\[1, S=4\]"):
        tucker2(w, (5, 3))
    with pytest.raises(ValueError, match=r"r_out=0 is out of range.*\[1, T=6\]"):
        tucker2(w, (2, 0))
    with pytest.raises(ValueError, match=r"r_out=7 is out of range.*\[1, T=6\]"):
        tucker2(w, (2, 7))
    for bad in ((1, 2, 3), (2,), 3, "ab", None):
        with pytest.raises(ValueError, match=r"pair \(r_in, r_out\)"):
            tucker2(w, bad)
    with pytest.raises(ValueError, match=r"r_out=9 .*\[1, T=6\]"):
        check_tucker2_ranks((1, 9), w.shape)
    with pytest.raises(ValueError, match="n_iter must be >= 0"):
        tucker2(w, (2, 2), n_iter=-1)
    with pytest.raises(ValueError, match=r"r_in=5 is out of range"):
        tucker2_analysis(w).factors((5, 1))


@pytest.mark.parametrize("fn", [lambda w: tucker2(w, (1, 1)), tucker2_error_table, tucker2_analysis])
@pytest.mark.parametrize("shape", [(4, 3, 3), (4, 3), (2, 2, 2, 2, 2)])
def test_non_4d_weights_are_rejected_with_a_4d_message(fn, shape):
    with pytest.raises(ValueError, match="4-D"):
        fn(randn(shape, 0))


def test_non_float_empty_and_non_tensor_weights_are_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        tucker2_error_table(torch.ones(2, 2, 1, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        tucker2_error_table(torch.ones(0, 2, 1, 1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tucker2_error_table([[[[1.0]]]])


def test_matrix_helpers_reject_bad_input():
    a = randn((4, 6), 0)
    for rank in (0, 5, -1):
        with pytest.raises(ValueError, match=rf"rank={rank} is out of range.*\[1, 4\]"):
            truncated_svd(a, rank)
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(randn((2, 3, 4), 0), 1)
    with pytest.raises(ValueError, match="2-D"):
        matrix_error_table(randn((2, 3, 4), 0))
    with pytest.raises(ValueError, match="2-D"):
        matrix_analysis(randn((5,), 0))
    with pytest.raises(ValueError, match=r"rank=5 is out of range"):
        matrix_analysis(a).factors(5)
    with pytest.raises(ValueError, match=r"rank 5 is out of range \[0, 4\]"):
        leading_left_singular_vectors(a, 5)


def test_everything_keeps_float64():
    w = randn((5, 4, 2, 3), 3, torch.float64)
    f = tucker2(w, (2, 3), n_iter=2)
    assert f.core.dtype == f.u_out.dtype == f.v_in.dtype == torch.float64
    assert tucker2_error_table(w).dtype == torch.float64
    lr = truncated_svd(unfold(w, 0), 2)
    assert lr.left.dtype == lr.right.dtype == torch.float64


# ----------------------------------------------------------------------------------------------- CUDA


@CUDA
def test_cuda_tucker2_and_error_table_match_cpu():
    w = randn((16, 12, 3, 3), 5)
    wc = w.cuda()
    table = tucker2_error_table(wc)
    assert table.device.type == "cuda" and table.dtype == torch.float64
    total = float(w.double().square().sum())
    torch.testing.assert_close(table.cpu(), tucker2_error_table(w), rtol=0, atol=1e-8 * total)
    f = tucker2(wc, (5, 7), n_iter=2)
    assert f.core.device.type == "cuda" and f.core.dtype == torch.float32
    assert (
        abs(sq_err(w, f.to_tensor().cpu()) - sq_err(w, tucker2(w, (5, 7), n_iter=2).to_tensor()))
        <= 1e-5 * total
    )
    lr = truncated_svd(unfold(wc, 0), 4)
    assert lr.left.device.type == "cuda"
    assert matrix_error_table(unfold(wc, 0)).device.type == "cuda"
