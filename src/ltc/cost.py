"""Layer geometry, the cost model of SPEC section 2, and ``profile()``.

Units: **MACs** are multiply-accumulates of conv and linear layers per input sample (one image);
FLOPs = 2·MACs. **params** are parameter counts (weights and biases). ``SR`` = base MACs / compressed
MACs, ``CR`` = base params / compressed params.

The cost formulas are written once and work on Python ints and on tensors alike, so the same code fills a
whole ``(r_in, r_out)`` grid in one vectorised expression.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "LayerGeometry",
    "LayerProfile",
    "Profile",
    "record_geometry",
    "profile",
    "dense_cost",
    "tucker2_cost",
    "matrix_cost",
    "linear_cost",
    "format_count",
]

N = TypeVar("N", int, Tensor)


@dataclass(frozen=True)
class LayerGeometry:
    """What one forward pass records about a conv or linear leaf.

    ``kind`` is ``"conv"`` or ``"linear"``. For convs, ``in_hw`` / ``out_hw`` are the input / output spatial
    sizes ``(H, W)``. For linears, ``positions`` is the number of feature vectors per sample (1 for a plain
    classifier head, the sequence length for token inputs). ``in_shape`` / ``out_shape`` exclude the batch.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    groups: int
    bias: bool
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    positions: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def in_pixels(self) -> int:
        return self.in_hw[0] * self.in_hw[1]

    @property
    def out_pixels(self) -> int:
        return self.out_hw[0] * self.out_hw[1]


def dense_cost(g: LayerGeometry) -> tuple[int, int]:
    """``(params, MACs)`` of the layer as it is (grouped convs included)."""
    if g.kind == "linear":
        params = g.in_channels * g.out_channels
        macs = params * g.positions
    else:
        kh, kw = g.kernel_size
        params = g.out_channels * (g.in_channels // g.groups) * kh * kw
        macs = g.out_pixels * params
    return params + (g.out_channels if g.bias else 0), macs


def tucker2_cost(g: LayerGeometry, r_in: N, r_out: N) -> tuple[N, N]:
    """``(params, MACs)`` of a Tucker-2 conv at ranks ``(r_in, r_out)``; ints or broadcastable tensors."""
    kh, kw = g.kernel_size
    s, t = g.in_channels, g.out_channels
    params = s * r_in + r_in * r_out * kh * kw + r_out * t + (t if g.bias else 0)
    macs = g.in_pixels * s * r_in + g.out_pixels * (r_in * r_out * kh * kw + r_out * t)
    return params, macs


def matrix_cost(g: LayerGeometry, rank: N) -> tuple[N, N]:
    """``(params, MACs)`` of the matrix (LRC) scheme at ``rank``: kh x kw conv S→r, then 1x1 r→T."""
    kh, kw = g.kernel_size
    width = g.in_channels * kh * kw + g.out_channels
    params = rank * width + (g.out_channels if g.bias else 0)
    macs = g.out_pixels * rank * width
    return params, macs


def linear_cost(g: LayerGeometry, rank: N) -> tuple[N, N]:
    """``(params, MACs)`` per sample of a linear layer factorised by SVD at ``rank``."""
    width = g.in_channels + g.out_channels
    params = rank * width + (g.out_channels if g.bias else 0)
    macs = rank * width * g.positions
    return params, macs


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


def _leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            yield name, m


@torch.no_grad()
def record_geometry(model: nn.Module, example_input: Tensor | tuple[Any, ...]) -> dict[str, LayerGeometry]:
    """Run one forward pass of ``example_input`` (batch ``N`` first) and record every ``nn.Conv2d`` and
    ``nn.Linear`` leaf's geometry, keyed by its ``model.named_modules()`` name.

    Adds no buffers or parameters to ``model``; hooks are removed afterwards and the train/eval mode is
    restored. A module called several times keeps the first call's geometry and is flagged in the error.
    """
    records: dict[str, LayerGeometry] = {}
    handles = []

    def make_hook(name: str, mod: nn.Module):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            if name in records:
                return
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                if x.dim() != 4:
                    raise ValueError(f"conv '{name}' received a {x.dim()}-D input; expected (N, C, H, W)")
                records[name] = LayerGeometry(
                    name=name,
                    kind="conv",
                    in_channels=module.in_channels,
                    out_channels=module.out_channels,
                    kernel_size=_pair(module.kernel_size),
                    groups=module.groups,
                    bias=module.bias is not None,
                    in_hw=(int(x.shape[2]), int(x.shape[3])),
                    out_hw=(int(output.shape[2]), int(output.shape[3])),
                    positions=1,
                    in_shape=tuple(int(d) for d in x.shape[1:]),
                    out_shape=tuple(int(d) for d in output.shape[1:]),
                )
            else:
                positions = math.prod(int(d) for d in x.shape[1:-1]) if x.dim() > 1 else 1
                records[name] = LayerGeometry(
                    name=name,
                    kind="linear",
                    in_channels=module.in_features,
                    out_channels=module.out_features,
                    kernel_size=(1, 1),
                    groups=1,
                    bias=module.bias is not None,
                    in_hw=(1, 1),
                    out_hw=(1, 1),
                    positions=positions,
                    in_shape=tuple(int(d) for d in x.shape[1:]),
                    out_shape=tuple(int(d) for d in output.shape[1:]),
                )

        return hook

    for name, m in _leaves(model):
        handles.append(m.register_forward_hook(make_hook(name, m)))
    modes = [(m, m.training) for m in model.modules()]  # each module's own flag (e.g. a frozen BN in eval)
    model.eval()
    try:
        if isinstance(example_input, tuple):
            model(*example_input)
        else:
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return records


@dataclass(frozen=True)
class LayerProfile:
    """One conv/linear leaf: ``macs`` per sample, ``params`` (its own weights and bias), shapes without batch."""

    name: str
    type: str
    params: int
    macs: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    detail: str


@dataclass(frozen=True)
class Profile:
    """Totals and per-layer records of a model for one input size.

    ``macs``: conv + linear multiply-accumulates per sample; ``params``: every parameter of the model
    (batch norm included); ``layers``: one :class:`LayerProfile` per conv/linear leaf, in module order.
    """

    macs: int
    params: int
    layers: tuple[LayerProfile, ...]
    input_shape: tuple[int, ...]

    @property
    def flops(self) -> int:
        """FLOPs = 2·MACs (the paper's "FLOPs" are MACs)."""
        return 2 * self.macs

    def table(self, max_rows: int | None = None) -> str:
        """A readable per-layer table with totals."""
        head = f"{'layer':<40} {'type':<22} {'in':>16} {'out':>16} {'params':>10} {'MACs':>10}"
        lines = [head, "-" * len(head)]
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        for lp in rows:
            lines.append(
                f"{lp.name[:40]:<40} {lp.detail[:22]:<22} {'x'.join(map(str, lp.in_shape)):>16} "
                f"{'x'.join(map(str, lp.out_shape)):>16} {format_count(lp.params):>10} {format_count(lp.macs):>10}"
            )
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers")
        lines.append("-" * len(head))
        shape = "x".join(map(str, self.input_shape))
        lines.append(
            f"total for input {shape}: {format_count(self.macs)} MACs per sample "
            f"({format_count(self.flops)} FLOPs = 2·MACs), {format_count(self.params)} params "
            f"({self.params:,})"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _describe(mod: nn.Module, g: LayerGeometry) -> str:
    if g.kind == "linear":
        return f"Linear {g.in_channels}->{g.out_channels}"
    kh, kw = g.kernel_size
    grp = f" g{g.groups}" if g.groups != 1 else ""
    return f"Conv {kh}x{kw} {g.in_channels}->{g.out_channels}{grp}"


def profile(model: nn.Module, example_input: Tensor | tuple[Any, ...]) -> Profile:
    """Count MACs per sample (conv and linear layers only, the paper's convention) and params.

    ``example_input`` is a batch ``(N, C, H, W)``; MACs are divided by ``N``. Equals
    ``torch.utils.flop_counter.FlopCounterMode`` total / 2 / N on models whose MACs come from conv and
    linear layers. Factorised layers (:class:`~ltc.layers.Tucker2Conv2d` etc.) are counted through their
    real ``nn.Conv2d`` / ``nn.Linear`` parts.
    """
    geoms = record_geometry(model, example_input)
    modules = dict(model.named_modules())
    layers = []
    for name, g in geoms.items():
        mod = modules[name]
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        _, macs = dense_cost(g)
        layers.append(LayerProfile(name, type(mod).__name__, own, macs, g.in_shape, g.out_shape, _describe(mod, g)))
    first = example_input[0] if isinstance(example_input, tuple) else example_input
    params = sum(p.numel() for p in model.parameters())
    return Profile(
        macs=sum(lp.macs for lp in layers),
        params=params,
        layers=tuple(layers),
        input_shape=tuple(int(d) for d in first.shape[1:]),
    )


def format_count(n: float) -> str:
    """``3_664_000_000 -> '3.66 G'``, ``21_797_672 -> '21.80 M'``."""
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"
