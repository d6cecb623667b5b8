"""Compression schemes: what the learning-compression engine needs to know about one kind of layer.

A scheme turns a weight into a flat table of candidate ranks with their cost and exact projection error
(:class:`Candidates`), projects a weight onto a chosen rank, and builds the deployed module. The engine is
scheme-agnostic: it only ever sees these tables.

- :class:`Tucker2Scheme`: ``(r_in, r_out)`` Tucker-2 of a kh x kw conv (LTC).
- :class:`MatrixScheme`: rank ``r`` of the ``T x (S·kh·kw)`` reshaped conv weight (LRC; also LTC's choice
  for 1x1 convs, where Tucker-2 degenerates to a three-factor matrix product).
- :class:`LinearSVDScheme`: rank ``r`` of an ``nn.Linear`` weight.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .cost import LayerGeometry, dense_cost, linear_cost, matrix_cost, tucker2_cost
from .layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d
from .tensor import matrix_analysis, tucker2, tucker2_analysis

__all__ = ["Candidates", "rank_values", "Scheme", "Tucker2Scheme", "MatrixScheme", "LinearSVDScheme", "SCHEMES",
           "get_scheme"]

Rank = int | tuple[int, int]


def rank_values(full: int, min_rank: int = 1, multiple: int = 1) -> list[int]:
    """The ranks a C step may choose on one axis of size ``full``: ``min_rank..full`` restricted to multiples of
    ``multiple`` (hardware-friendly widths), always including ``full``; never empty."""
    lo = min(max(int(min_rank), 1), full)
    m = max(int(multiple), 1)
    values = [r for r in range(lo, full + 1) if r % m == 0 or r == full]
    return values or [full]


@dataclass
class Candidates:
    """A layer's options as a dense grid of ranks, flattened row-major.

    ``axes``: the allowed rank values along each rank axis, ascending (1-D for matrix schemes, ``(r_in values,
    r_out values)`` for Tucker-2); flat index ``k`` ↔ ``(axes[0][i], axes[1][j])`` with ``k = i·len(axes[1]) + j``.
    ``costs``: ``{"params": ..., "macs": ..., ...}`` float64 tensors of length ``prod(grid_shape)`` (the engine may
    add ``"latency"``); ``dense``: the same keys for the dense layer. ``err``: the exact squared projection error in
    the engine's metric. The dense option (error 0) is not in the grid. ``analysis`` carries the decomposition so
    that projecting at a chosen rank needs no new one.
    """

    axes: tuple[tuple[int, ...], ...]
    costs: dict[str, Tensor]
    err: Tensor
    dense: dict[str, float]
    analysis: Any

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(len(a) for a in self.axes)

    def cost(self, kind: str) -> Tensor:
        return self.costs[kind]

    def dense_cost(self, kind: str) -> float:
        return self.dense[kind]

    def rank_of(self, index: int) -> Rank:
        """Rank at flat ``index`` (an int for 1-D grids, ``(r_in, r_out)`` for Tucker-2)."""
        idx = []
        for size in reversed(self.grid_shape):
            idx.append(index % size)
            index //= size
        rank = tuple(ax[i] for ax, i in zip(self.axes, reversed(idx), strict=True))
        return rank[0] if len(rank) == 1 else rank  # type: ignore[return-value]

    def index_of(self, rank: Rank) -> int:
        """Flat index of ``rank`` (inverse of :meth:`rank_of`)."""
        r = (rank,) if isinstance(rank, int) else tuple(rank)
        index = 0
        for ax, value in zip(self.axes, r, strict=True):
            if value not in ax:
                raise ValueError(f"rank {rank} is not on the candidate grid {self.axes}")
            index = index * len(ax) + ax.index(value)
        return index


class Scheme(ABC):
    """One way of compressing one kind of layer."""

    name: str = ""

    @abstractmethod
    def full_rank(self, module: nn.Module) -> tuple[int, ...]:
        """Largest rank along each axis."""

    @abstractmethod
    def candidates(self, weight: Tensor, geometry: LayerGeometry, min_rank: int = 1, multiple: int = 1) -> Candidates:
        """Cost and exact error of every rank of :func:`rank_values` (per axis) for ``weight``."""

    @abstractmethod
    def project(self, weight: Tensor, rank: Rank, analysis: Any = None, n_iter: int = 0) -> tuple[Tensor, Any]:
        """``(Θ, factors)``: the projection of ``weight`` onto rank ``rank`` and its factors."""

    @abstractmethod
    def deploy(self, module: nn.Module, factors: Any) -> nn.Module:
        """The compressed module built from ``factors`` (``module`` supplies stride, padding, bias...)."""

    @abstractmethod
    def cost(self, geometry: LayerGeometry, rank: Rank) -> tuple[int, int]:
        """``(params, MACs)`` at ``rank``."""


def _f64(x: int | Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


class Tucker2Scheme(Scheme):
    """Tucker-2 ``(r_in, r_out)`` of a kh x kw conv; deployed as :class:`~ltc.layers.Tucker2Conv2d`."""

    name = "tucker2"

    def full_rank(self, module: nn.Module) -> tuple[int, int]:
        return module.in_channels, module.out_channels

    def candidates(self, weight: Tensor, geometry: LayerGeometry, min_rank: int = 1, multiple: int = 1) -> Candidates:
        t, s = weight.shape[:2]
        ax_in, ax_out = tuple(rank_values(s, min_rank, multiple)), tuple(rank_values(t, min_rank, multiple))
        an = tucker2_analysis(weight)
        dev = an.table.device
        i_in = torch.tensor(ax_in, device=dev)
        i_out = torch.tensor(ax_out, device=dev)
        r_in = i_in.to(torch.float64)[:, None]
        r_out = i_out.to(torch.float64)[None, :]
        params, macs = tucker2_cost(geometry, r_in, r_out)
        err = an.table[i_in][:, i_out]
        shape = (len(ax_in), len(ax_out))
        dp, dm = dense_cost(geometry)
        costs = {"params": params.expand(shape).reshape(-1), "macs": macs.expand(shape).reshape(-1)}
        return Candidates((ax_in, ax_out), costs, err.reshape(-1), {"params": float(dp), "macs": float(dm)}, an)

    def project(self, weight: Tensor, rank: Rank, analysis: Any = None, n_iter: int = 0) -> tuple[Tensor, Any]:
        if n_iter > 0 or analysis is None:
            f = tucker2(weight, rank, n_iter=n_iter)  # type: ignore[arg-type]
        else:
            f = analysis.factors(rank, dtype=weight.dtype)
        return f.to_tensor(), f

    def deploy(self, module: nn.Module, factors: Any) -> nn.Module:
        return Tucker2Conv2d.from_factors(module, factors)

    def cost(self, geometry: LayerGeometry, rank: Rank) -> tuple[int, int]:
        r_in, r_out = rank  # type: ignore[misc]
        return tucker2_cost(geometry, int(r_in), int(r_out))


class _MatrixBase(Scheme):
    def _matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)

    def full_rank(self, module: nn.Module) -> tuple[int]:
        w = module.weight
        return (min(w.shape[0], w[0].numel()),)

    def _cost(self, geometry: LayerGeometry, rank: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def candidates(self, weight: Tensor, geometry: LayerGeometry, min_rank: int = 1, multiple: int = 1) -> Candidates:
        mat = self._matrix(weight)
        ax = tuple(rank_values(min(mat.shape), min_rank, multiple))
        an = matrix_analysis(mat)
        idx = torch.tensor(ax, device=an.table.device)
        r = idx.to(torch.float64)
        params, macs = self._cost(geometry, r)
        dp, dm = dense_cost(geometry)
        costs = {"params": _f64(params).expand(r.shape), "macs": _f64(macs).expand(r.shape)}
        return Candidates((ax,), costs, an.table[idx], {"params": float(dp), "macs": float(dm)}, an)

    def project(self, weight: Tensor, rank: Rank, analysis: Any = None, n_iter: int = 0) -> tuple[Tensor, Any]:
        r = int(rank if isinstance(rank, int) else rank[0])
        an = analysis if analysis is not None else matrix_analysis(self._matrix(weight))
        f = an.factors(r, dtype=weight.dtype)
        return f.to_tensor().reshape(weight.shape), f

    def cost(self, geometry: LayerGeometry, rank: Rank) -> tuple[int, int]:
        return self._cost(geometry, int(rank if isinstance(rank, int) else rank[0]))


class MatrixScheme(_MatrixBase):
    """Rank ``r`` of the ``T x (S·kh·kw)`` reshaped conv weight; deployed as
    :class:`~ltc.layers.MatrixLowRankConv2d` (kh x kw conv S→r, then 1x1 r→T)."""

    name = "matrix"

    def _cost(self, geometry: LayerGeometry, rank: Any) -> tuple[Any, Any]:
        return matrix_cost(geometry, rank)

    def deploy(self, module: nn.Module, factors: Any) -> nn.Module:
        return MatrixLowRankConv2d.from_factors(module, factors)


class LinearSVDScheme(_MatrixBase):
    """Rank ``r`` of an ``nn.Linear`` weight ``(out, in)``; deployed as :class:`~ltc.layers.LowRankLinear`."""

    name = "svd"

    def _cost(self, geometry: LayerGeometry, rank: Any) -> tuple[Any, Any]:
        return linear_cost(geometry, rank)

    def deploy(self, module: nn.Module, factors: Any) -> nn.Module:
        return LowRankLinear.from_factors(module, factors)


SCHEMES: dict[str, type[Scheme]] = {"tucker2": Tucker2Scheme, "matrix": MatrixScheme, "svd": LinearSVDScheme}


def get_scheme(name: str) -> Scheme:
    """A scheme by name: ``'tucker2'``, ``'matrix'`` or ``'svd'``."""
    try:
        return SCHEMES[name]()
    except KeyError:
        raise ValueError(f"unknown compression scheme {name!r}; choose one of {sorted(SCHEMES)}") from None
