"""Compressed layers built from real ``nn.Conv2d`` / ``nn.Linear`` parts.

Every factorised layer is a small ``nn.Module`` holding ordinary PyTorch layers (never a functional
re-implementation), so MAC counters, exporters, pruners and quantizers see plain convolutions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .tensor import LowRankFactors, Tucker2Factors, check_tucker2_ranks, truncated_svd, tucker2

__all__ = ["Tucker2Conv2d", "MatrixLowRankConv2d", "LowRankLinear", "check_decomposable_conv"]


def check_decomposable_conv(conv: nn.Module, name: str | None = None) -> nn.Conv2d:
    """Return ``conv`` if it is a plain, ungrouped ``nn.Conv2d``; otherwise raise a clear error."""
    label = f"layer '{name}'" if name else "the layer"
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{label} is a {type(conv).__name__}, not an nn.Conv2d; only Conv2d layers decompose")
    if conv.groups != 1:
        raise ValueError(
            f"{label} is a grouped conv (groups={conv.groups}); grouped and depthwise convs are not decomposed, "
            "leave it dense (exclude it)"
        )
    return conv


def _conv_like(conv: nn.Conv2d, in_ch: int, out_ch: int, bias: bool) -> nn.Conv2d:
    """A conv with ``conv``'s kernel, stride, padding, dilation and padding mode, but new channels."""
    return nn.Conv2d(
        in_ch,
        out_ch,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=bias,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


def _pointwise(in_ch: int, out_ch: int, bias: bool, like: Tensor, stride: tuple[int, int] = (1, 1)) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=bias, device=like.device, dtype=like.dtype)


def _copy_bias(dst: nn.Conv2d | nn.Linear, src: nn.Conv2d | nn.Linear) -> None:
    if src.bias is not None:
        assert dst.bias is not None
        dst.bias.data.copy_(src.bias.detach())


class Tucker2Conv2d(nn.Module):
    """A Tucker-2 factorised convolution: ``first`` (1x1, S→r_in), ``core`` (kh x kw, r_in→r_out, the
    original stride/padding/dilation/padding_mode) and ``last`` (1x1, r_out→T, the original bias).

    Input ``(N, S, H, W)``, output ``(N, T, H_out, W_out)``, exactly as the conv it replaces.
    """

    def __init__(self, first: nn.Conv2d, core: nn.Conv2d, last: nn.Conv2d) -> None:
        super().__init__()
        self.first, self.core, self.last = first, core, last

    @property
    def ranks(self) -> tuple[int, int]:
        """``(r_in, r_out)``."""
        return self.core.in_channels, self.core.out_channels

    @property
    def in_channels(self) -> int:
        return self.first.in_channels

    @property
    def out_channels(self) -> int:
        return self.last.out_channels

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: Tucker2Factors) -> Tucker2Conv2d:
        """Build the three convs from ``factors`` of ``conv``'s weight (shapes checked against ``conv``)."""
        conv = check_decomposable_conv(conv)
        t, s = conv.out_channels, conv.in_channels
        r_in, r_out = factors.ranks
        if factors.u_out.shape[0] != t or factors.v_in.shape[0] != s:
            raise ValueError(
                f"factors of a ({factors.u_out.shape[0]}, {factors.v_in.shape[0]}, ...) weight do not fit a conv "
                f"with {t} output and {s} input channels"
            )
        w = conv.weight
        first = _pointwise(s, r_in, bias=False, like=w)
        core = _conv_like(conv, r_in, r_out, bias=False)
        last = _pointwise(r_out, t, bias=conv.bias is not None, like=w)
        with torch.no_grad():
            first.weight.copy_(factors.v_in.T.reshape(r_in, s, 1, 1))
            core.weight.copy_(factors.core)
            last.weight.copy_(factors.u_out.reshape(t, r_out, 1, 1))
        _copy_bias(last, conv)
        return cls(first, core, last)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, int], n_iter: int = 0) -> Tucker2Conv2d:
        """Decompose ``conv`` (ungrouped ``nn.Conv2d``) at ranks ``(r_in, r_out)`` by truncated HOSVD
        (+ ``n_iter`` HOOI sweeps). At full ranks the output equals ``conv``'s to float rounding."""
        conv = check_decomposable_conv(conv)
        check_tucker2_ranks(ranks, conv.weight.shape)
        return cls.from_factors(conv, tucker2(conv.weight.detach(), ranks, n_iter=n_iter))

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.core(self.first(x)))

    def to_weight(self) -> Tensor:
        """The equivalent dense ``(T, S, kh, kw)`` weight."""
        f = Tucker2Factors(
            self.core.weight, self.last.weight.flatten(1), self.first.weight.flatten(1).T
        )
        return f.to_tensor()

    def extra_repr(self) -> str:
        return f"ranks(r_in, r_out)={self.ranks}"


class MatrixLowRankConv2d(nn.Module):
    """The LRC matrix scheme for a conv: ``W`` reshaped to ``T x (S·kh·kw)`` at rank ``r``.

    ``first``: kh x kw conv S→r with the original stride/padding/dilation/padding_mode, no bias;
    ``last``: 1x1 conv r→T with the original bias. For a 1x1 conv this is the two-conv SVD scheme.
    """

    def __init__(self, first: nn.Conv2d, last: nn.Conv2d) -> None:
        super().__init__()
        self.first, self.last = first, last

    @property
    def rank(self) -> int:
        return self.first.out_channels

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: LowRankFactors) -> MatrixLowRankConv2d:
        """``factors.left`` ``(T, r)`` and ``factors.right`` ``(r, S·kh·kw)`` of ``conv``'s reshaped weight."""
        conv = check_decomposable_conv(conv)
        t, s = conv.out_channels, conv.in_channels
        kh, kw = conv.kernel_size
        r = factors.rank
        if factors.left.shape[0] != t or factors.right.shape[1] != s * kh * kw:
            raise ValueError(
                f"factors of a {tuple(factors.left.shape[:1]) + tuple(factors.right.shape[1:])} matrix do not fit "
                f"a conv whose reshaped weight is ({t}, {s * kh * kw})"
            )
        first = _conv_like(conv, s, r, bias=False)
        last = _pointwise(r, t, bias=conv.bias is not None, like=conv.weight)
        with torch.no_grad():
            first.weight.copy_(factors.right.reshape(r, s, kh, kw))
            last.weight.copy_(factors.left.reshape(t, r, 1, 1))
        _copy_bias(last, conv)
        return cls(first, last)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> MatrixLowRankConv2d:
        """Decompose ``conv`` by truncated SVD of its ``T x (S·kh·kw)`` reshaped weight at ``rank``."""
        conv = check_decomposable_conv(conv)
        return cls.from_factors(conv, truncated_svd(conv.weight.detach().flatten(1), rank))

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.first(x))

    def to_weight(self) -> Tensor:
        """The equivalent dense ``(T, S, kh, kw)`` weight."""
        w = self.last.weight.flatten(1) @ self.first.weight.flatten(1)
        return w.reshape(self.last.out_channels, *self.first.weight.shape[1:])

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class LowRankLinear(nn.Module):
    """A linear layer ``out x in`` factorised by truncated SVD: ``first`` (in→r, no bias), ``last``
    (r→out, the original bias). Input ``(..., in)``, output ``(..., out)``."""

    def __init__(self, first: nn.Linear, last: nn.Linear) -> None:
        super().__init__()
        self.first, self.last = first, last

    @property
    def rank(self) -> int:
        return self.first.out_features

    @classmethod
    def from_factors(cls, linear: nn.Linear, factors: LowRankFactors) -> LowRankLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        out_f, in_f = linear.out_features, linear.in_features
        r = factors.rank
        if factors.left.shape[0] != out_f or factors.right.shape[1] != in_f:
            raise ValueError(f"factors do not fit a linear layer of shape ({out_f}, {in_f})")
        w = linear.weight
        first = nn.Linear(in_f, r, bias=False, device=w.device, dtype=w.dtype)
        last = nn.Linear(r, out_f, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            first.weight.copy_(factors.right)
            last.weight.copy_(factors.left)
        _copy_bias(last, linear)
        return cls(first, last)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Decompose ``linear`` by truncated SVD at ``rank`` (1 ≤ rank ≤ min(in, out))."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        return cls.from_factors(linear, truncated_svd(linear.weight.detach(), rank))

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.first(x))

    def to_weight(self) -> Tensor:
        """The equivalent dense ``(out, in)`` weight."""
        return self.last.weight @ self.first.weight

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
