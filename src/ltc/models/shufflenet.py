"""ShuffleNetV2 with torchvision's ``shufflenet_v2_x1_0`` module layout, 224x224 input."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .registry import register_model, scale_channels

__all__ = ["InvertedResidual", "ShuffleNetV2", "channel_shuffle", "shufflenet_v2"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``x`` (N, C, H, W) across ``groups`` groups."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


def _depthwise_conv(i: int, o: int, kernel_size: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    return nn.Conv2d(i, o, kernel_size, stride, padding, bias=False, groups=i)


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit: channel split (stride 1) or two-branch downsampling (stride 2), then shuffle."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        if not 1 <= stride <= 3:
            raise ValueError(f"illegal stride value {stride}")
        self.stride = stride
        branch_features = oup // 2
        if stride == 1 and inp != branch_features * 2:
            raise ValueError(f"stride-1 unit needs inp == oup (even), got inp={inp}, oup={oup}")
        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise_conv(inp, inp, kernel_size=3, stride=stride, padding=1),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            _depthwise_conv(branch_features, branch_features, kernel_size=3, stride=stride, padding=1),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision-layout ShuffleNetV2 (conv1, maxpool, stage2..4, conv5, fc).

    ``width`` scales the stem (24), the stage widths (116, 232, 464; rounded to the nearest even
    number, at least 2) and conv5 (1024). Input: ``(N, in_channels, 224, 224)``.
    """

    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        stages_repeats = [4, 8, 4]
        stem = scale_channels(24, width)
        stage_channels = [max(2, 2 * math.floor(c * width / 2 + 0.5)) for c in (116, 232, 464)]
        last = scale_channels(1024, width)
        self._stage_out_channels = [stem, *stage_channels, last]

        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 2, 1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        c_in = stem
        self.stage2: nn.Sequential
        self.stage3: nn.Sequential
        self.stage4: nn.Sequential
        for name, repeats, c_out in zip(
            ("stage2", "stage3", "stage4"), stages_repeats, stage_channels, strict=True
        ):
            seq = [InvertedResidual(c_in, c_out, 2)]
            seq.extend(InvertedResidual(c_out, c_out, 1) for _ in range(repeats - 1))
            setattr(self, name, nn.Sequential(*seq))
            c_in = c_out
        self.conv5 = nn.Sequential(
            nn.Conv2d(c_in, last, 1, 1, 0, bias=False),
            nn.BatchNorm2d(last),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x).mean([2, 3])
        return self.fc(x)


@register_model("shufflenet_v2")
def shufflenet_v2(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> ShuffleNetV2:
    """ShuffleNetV2 x1.0 (2.28 M parameters at 1000 classes), 224x224 input."""
    return ShuffleNetV2(num_classes, width, in_channels)
