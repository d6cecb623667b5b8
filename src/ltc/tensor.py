"""Pure tensor algebra for Tucker-2 and matrix low-rank approximation.

No ``nn.Module`` and no training here: functions of tensors only, float32 or float64, CPU or CUDA.

Conventions (SPEC section 1): a conv weight ``W`` has shape ``(T, S, kh, kw)``; mode 0 is the output
channels (``T``), mode 1 the input channels (``S``). Ranks are always written ``(r_in, r_out)``.
Tucker-2 keeps the spatial modes and factors the two channel modes::

    W ≈ G ×_0 U ×_1 V,   U: (T, r_out), V: (S, r_in) orthonormal columns, G: (r_out, r_in, kh, kw)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Tucker2Factors",
    "LowRankFactors",
    "unfold",
    "fold",
    "mode_product",
    "leading_left_singular_vectors",
    "tucker2",
    "tucker2_error_table",
    "tucker2_analysis",
    "Tucker2Analysis",
    "truncated_svd",
    "matrix_error_table",
    "matrix_analysis",
    "MatrixAnalysis",
    "check_conv_weight",
    "check_tucker2_ranks",
]


class Tucker2Factors(NamedTuple):
    """Tucker-2 factors of a ``(T, S, kh, kw)`` tensor.

    ``core``: ``(r_out, r_in, kh, kw)``; ``u_out``: ``(T, r_out)``; ``v_in``: ``(S, r_in)``; both factor
    matrices have orthonormal columns.
    """

    core: Tensor
    u_out: Tensor
    v_in: Tensor

    @property
    def ranks(self) -> tuple[int, int]:
        """``(r_in, r_out)``."""
        return int(self.v_in.shape[1]), int(self.u_out.shape[1])

    def to_tensor(self) -> Tensor:
        """Rebuild the ``(T, S, kh, kw)`` approximation ``core ×_0 u_out ×_1 v_in``."""
        return torch.einsum("oiab,to,si->tsab", self.core, self.u_out, self.v_in)


class LowRankFactors(NamedTuple):
    """A rank-``r`` matrix factorisation ``M ≈ left @ right`` with ``left`` ``(m, r)``, ``right`` ``(r, n)``."""

    left: Tensor
    right: Tensor

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def to_tensor(self) -> Tensor:
        return self.left @ self.right


def unfold(x: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding: a matrix of shape ``(x.shape[mode], prod(other dims))``.

    The remaining modes keep their order (row-major), so ``fold(unfold(x, m), m, x.shape) == x``.
    """
    mode = _check_mode(x, mode)
    return torch.movedim(x, mode, 0).reshape(x.shape[mode], -1)


def fold(matrix: Tensor, mode: int, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of :func:`unfold`: turn a ``(shape[mode], -1)`` matrix back into a tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    if not -len(shape) <= mode < len(shape):
        raise ValueError(f"mode {mode} is out of range for a {len(shape)}-way shape {shape}")
    mode %= len(shape)  # negative modes count from the end, as in unfold
    moved = (shape[mode],) + shape[:mode] + shape[mode + 1 :]
    if matrix.numel() != torch.Size(shape).numel() or matrix.shape[0] != shape[mode]:
        raise ValueError(f"a matrix of shape {tuple(matrix.shape)} cannot fold into {shape} along mode {mode}")
    return torch.movedim(matrix.reshape(moved), 0, mode)


def mode_product(x: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """``x ×_mode matrix``: contract mode ``mode`` of ``x`` (size I) with the columns of ``matrix`` (J, I).

    The result has size J along ``mode``.
    """
    mode = _check_mode(x, mode)
    if matrix.dim() != 2 or matrix.shape[1] != x.shape[mode]:
        raise ValueError(
            f"mode_product needs a (J, {x.shape[mode]}) matrix for mode {mode}, got {tuple(matrix.shape)}"
        )
    out = torch.tensordot(matrix, x, dims=([1], [mode]))  # (J, other modes...)
    return torch.movedim(out, 0, mode)


def _check_mode(x: Tensor, mode: int) -> int:
    if not -x.dim() <= mode < x.dim():
        raise ValueError(f"mode {mode} is out of range for a {x.dim()}-way tensor")
    return mode % x.dim()


def _sorted_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric PSD matrix, eigenvalues descending (clamped at 0)."""
    evals, evecs = torch.linalg.eigh(gram)
    return evals.flip(0).clamp_min(0), evecs.flip(1)


def leading_left_singular_vectors(matrix: Tensor, r: int | None = None) -> Tensor:
    """The ``r`` leading left singular vectors of a 2-D ``matrix`` ``(m, n)`` as an ``(m, r)`` tensor.

    Computed from the eigenvectors of the ``m x m`` Gram matrix in float64 (cheap when ``m << n``) and
    returned in ``matrix``'s dtype. ``r=None`` returns the full ``m x m`` orthonormal basis.
    """
    if matrix.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    m = matrix.shape[0]
    r = m if r is None else int(r)
    if not 0 <= r <= m:
        raise ValueError(f"rank {r} is out of range [0, {m}] for a matrix with {m} rows")
    a = matrix.to(torch.float64)  # float32 Gram matrices lose the small modes
    _, vecs = _sorted_eigh(a @ a.T)
    return vecs[:, :r].to(matrix.dtype)


def check_conv_weight(weight: Tensor) -> None:
    """Raise ``ValueError`` unless ``weight`` is a 4-D floating conv weight ``(T, S, kh, kw)``."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"expected a torch.Tensor conv weight, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(
            f"expected a 4-D conv weight of shape (T, S, kh, kw), got a {weight.dim()}-D tensor of shape "
            f"{tuple(weight.shape)}; for a matrix use truncated_svd / matrix_error_table"
        )
    if not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got dtype {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"the weight is empty (shape {tuple(weight.shape)})")


def check_tucker2_ranks(ranks: tuple[int, int], shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """Validate ``(r_in, r_out)`` against a ``(T, S, kh, kw)`` shape; return them as ints."""
    try:
        r_in, r_out = (int(r) for r in ranks)
    except (TypeError, ValueError):
        raise ValueError(f"ranks must be a pair (r_in, r_out) of ints, got {ranks!r}") from None
    t, s = int(shape[0]), int(shape[1])
    if not 1 <= r_in <= s:
        raise ValueError(f"r_in={r_in} is out of range: it must lie in [1, S={s}] (input channels)")
    if not 1 <= r_out <= t:
        raise ValueError(f"r_out={r_out} is out of range: it must lie in [1, T={t}] (output channels)")
    return r_in, r_out


def tucker2(weight: Tensor, ranks: tuple[int, int], n_iter: int = 0) -> Tucker2Factors:
    """Tucker-2 of a conv weight ``(T, S, kh, kw)`` at ranks ``(r_in, r_out)``.

    Truncated HOSVD: ``u_out`` / ``v_in`` are the leading left singular vectors of the mode-0 / mode-1
    unfoldings and ``core = W ×_0 u_outᵀ ×_1 v_inᵀ``. ``n_iter > 0`` adds that many HOOI sweeps at fixed
    ranks, which never raise the approximation error. Factors are returned in ``weight``'s dtype and device.
    """
    check_conv_weight(weight)
    r_in, r_out = check_tucker2_ranks(ranks, weight.shape)
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    w = weight.detach().to(torch.float64)
    u = leading_left_singular_vectors(unfold(w, 0), r_out)
    v = leading_left_singular_vectors(unfold(w, 1), r_in)
    for _ in range(n_iter):
        # Each half-sweep maximises ||core||^2 over one factor with the other fixed (monotone ALS).
        u = leading_left_singular_vectors(unfold(mode_product(w, v.T, 1), 0), r_out)
        v = leading_left_singular_vectors(unfold(mode_product(w, u.T, 0), 1), r_in)
    core = torch.einsum("tsab,to,si->oiab", w, u, v)
    dt = weight.dtype
    return Tucker2Factors(core.to(dt), u.to(dt), v.to(dt))


class Tucker2Analysis(NamedTuple):
    """Everything the C step needs from one weight, computed once (float64).

    ``u``: ``(T, T)`` and ``v``: ``(S, S)`` full orthonormal bases sorted by singular value; ``rotated``:
    ``W ×_0 uᵀ ×_1 vᵀ`` of shape ``(T, S, kh, kw)``; ``table``: the ``(S+1, T+1)`` exact error table.
    """

    u: Tensor
    v: Tensor
    rotated: Tensor
    table: Tensor

    def factors(self, ranks: tuple[int, int], dtype: torch.dtype | None = None) -> Tucker2Factors:
        """Truncated-HOSVD factors at ``(r_in, r_out)``, reusing the rotation (no new decomposition)."""
        r_in, r_out = check_tucker2_ranks(ranks, (self.u.shape[0], self.v.shape[0]))
        dt = dtype or self.rotated.dtype
        core = self.rotated[:r_out, :r_in]
        return Tucker2Factors(core.to(dt), self.u[:, :r_out].to(dt), self.v[:, :r_in].to(dt))


def tucker2_analysis(weight: Tensor) -> Tucker2Analysis:
    """Full singular bases of both channel unfoldings, the rotated weight and the exact error table."""
    check_conv_weight(weight)
    w = weight.detach().to(torch.float64)
    t, s = w.shape[:2]
    u = leading_left_singular_vectors(unfold(w, 0))  # (T, T)
    v = leading_left_singular_vectors(unfold(w, 1))  # (S, S)
    # Rotate into both bases with two plain matrix products (faster than one 3-operand einsum).
    c = (u.T @ w.reshape(t, -1)).reshape(t, s, -1)  # (T', S, kh*kw)
    c = torch.matmul(v.T, c).reshape(w.shape)  # (T', S', kh, kw)
    energy = c.square().sum(dim=(2, 3))  # (T, S): energy of each (out, in) basis pair
    block = energy.cumsum(0).cumsum(1)  # block[i, j] = sum over out <= i, in <= j
    total = w.square().sum()
    table = torch.empty(s + 1, t + 1, dtype=torch.float64, device=w.device)
    table[0, :] = total
    table[:, 0] = total
    table[1:, 1:] = (total - block.T).clamp_min(0)
    return Tucker2Analysis(u, v, c, table)


def tucker2_error_table(weight: Tensor) -> Tensor:
    """Exact squared Frobenius error of the truncated-HOSVD projection at every pair of ranks.

    Returns a float64 tensor of shape ``(S+1, T+1)`` on ``weight``'s device: entry ``[r_in, r_out]`` is
    ``‖W − Π(W)‖²`` where ``Π`` projects onto the ``r_out`` / ``r_in`` leading singular subspaces of the
    two channel unfoldings (row / column 0 = rank 0, error ``‖W‖²``). Computed by rotating ``W`` once into the
    full singular bases, ``E[i, j] = Σ_ab C[i, j, a, b]²`` and a 2-D cumulative sum, all in float64.
    """
    return tucker2_analysis(weight).table


def truncated_svd(matrix: Tensor, rank: int, balance: bool = True) -> LowRankFactors:
    """Best rank-``rank`` factorisation of a 2-D ``matrix`` ``(m, n)`` (Eckart–Young).

    With ``balance`` the singular values are split as ``sqrt(s)`` into both factors, which keeps the two
    factors on the same scale for later training.
    """
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    full = min(matrix.shape)
    if not 1 <= int(rank) <= full:
        raise ValueError(f"rank={rank} is out of range: it must lie in [1, {full}] for shape {tuple(matrix.shape)}")
    a = matrix.detach().to(torch.float64)
    u, sv, vh = torch.linalg.svd(a, full_matrices=False)
    u, sv, vh = u[:, :rank], sv[:rank], vh[:rank]
    if balance:
        root = sv.sqrt()
        left, right = u * root, root[:, None] * vh
    else:
        left, right = u * sv, vh
    return LowRankFactors(left.to(matrix.dtype), right.to(matrix.dtype))


def matrix_error_table(matrix: Tensor) -> Tensor:
    """Squared Frobenius error of the best rank-``r`` approximation for ``r = 0 .. min(m, n)``.

    Float64, shape ``(min(m, n) + 1,)``: the tail sums of the squared singular values.
    """
    if matrix.dim() != 2:
        raise ValueError(f"matrix_error_table expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    sv2 = torch.linalg.svdvals(matrix.detach().to(torch.float64)).square()
    tail = sv2.flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


class MatrixAnalysis(NamedTuple):
    """A matrix's singular structure from the Gram matrix of its shorter side (float64).

    ``basis``: full orthonormal eigenbasis (sorted, descending) of ``M Mᵀ`` when ``rows_side`` else of
    ``Mᵀ M``; ``sv2``: squared singular values, descending; ``table``: :func:`matrix_error_table`.
    """

    matrix: Tensor
    basis: Tensor
    sv2: Tensor
    table: Tensor
    rows_side: bool

    def factors(self, rank: int, dtype: torch.dtype | None = None) -> LowRankFactors:
        """Best rank-``rank`` factors, singular values split as ``sqrt(s)`` into both sides."""
        full = self.sv2.shape[0]
        if not 1 <= int(rank) <= full:
            raise ValueError(f"rank={rank} is out of range: it must lie in [1, {full}]")
        dt = dtype or self.matrix.dtype
        b = self.basis[:, :rank]
        root = self.sv2[:rank].sqrt().sqrt()
        root = torch.where(root > 0, root, torch.ones_like(root))
        if self.rows_side:
            left, right = b * root, (b.T @ self.matrix) / root[:, None]
        else:
            left, right = (self.matrix @ b) / root, b.T * root[:, None]
        return LowRankFactors(left.to(dt), right.to(dt))


def matrix_analysis(matrix: Tensor) -> MatrixAnalysis:
    """Singular bases, squared singular values and the error table of a 2-D matrix, in float64."""
    if matrix.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    a = matrix.detach().to(torch.float64)
    rows_side = a.shape[0] <= a.shape[1]
    sv2, basis = _sorted_eigh(a @ a.T if rows_side else a.T @ a)
    tail = sv2.flip(0).cumsum(0).flip(0)
    table = torch.cat([tail, tail.new_zeros(1)])
    return MatrixAnalysis(a, basis, sv2, table, rows_side)
