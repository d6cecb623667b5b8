"""Models and helpers shared by test_serialization.py, test_batchnorm.py and test_export.py (not a test module)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ltc.layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d
from ltc.surgery import replace_modules


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding / saving is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def structure_of(model: nn.Module) -> dict[str, tuple[str, object]]:
    """``{name: (kind, ranks)}`` of every factorised layer."""
    out: dict[str, tuple[str, object]] = {}
    for name, m in model.named_modules():
        if isinstance(m, Tucker2Conv2d):
            out[name] = ("tucker2", m.ranks)
        elif isinstance(m, MatrixLowRankConv2d | LowRankLinear):
            out[name] = (type(m).__name__, m.rank)
    return out


def shapes_of(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (type, weight shape)}`` of every conv / linear / BatchNorm (what channel pruning changes)."""
    return {
        name: (type(m).__name__, tuple(m.weight.shape))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm1d | nn.BatchNorm2d) and m.weight is not None
    }


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def other_files(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p not in keep)


class MyNet(nn.Module):
    """A user-defined architecture (not in the zoo) with unusual conv geometry."""

    def __init__(self, width: int = 8, extra: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1, padding_mode="reflect", bias=True)
        self.bn = nn.BatchNorm2d(width)
        self.body = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=2, dilation=2, bias=False),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 1, bias=True),
        )
        self.head = nn.Linear(2 * width, 5)
        if extra:
            self.extra = nn.BatchNorm2d(2 * width)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.head(self.body(x).mean((2, 3)))


def compress_mynet(net: MyNet) -> nn.Module:
    torch.manual_seed(1)
    return replace_modules(
        net,
        {
            "stem": Tucker2Conv2d.from_conv(net.stem, (2, 5)),
            "body.0": MatrixLowRankConv2d.from_conv(net.body[0], 6),
            "body.2": Tucker2Conv2d.from_conv(net.body[2], (7, 9)),
            "head": LowRankLinear.from_linear(net.head, 3),
        },
    )


def tucker_resnet18(x32: Tensor) -> nn.Module:
    """ResNet-18 (width 0.25) with random BN statistics, Tucker-2 compressed by LTC at SR 3, in eval mode."""
    import ltc
    from ltc import models

    torch.manual_seed(0)
    base = randomise_bn(models.create("resnet18", num_classes=10, width=0.25))
    return ltc.LTC(base, x32, target_sr=3).compressed_model().eval()


def matrix_small_cnn() -> nn.Module:
    """small_cnn (width 0.5) with matrix low-rank convs and a factorised linear head, in eval mode."""
    import ltc
    from ltc import models

    torch.manual_seed(0)
    base = randomise_bn(models.create("small_cnn", num_classes=10, width=0.5))
    x = torch.randn(2, 3, 28, 28)
    engine = ltc.LCEngine(base, x, target_sr=2, conv_scheme="matrix", compress_linear=True)
    engine.start()  # the first C step picks the conv ranks (construction computes none) ...
    engine.assign({"classifier": 4})  # ... and the linear head is factorised too
    return engine.compressed_model().eval()
