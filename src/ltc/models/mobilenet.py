"""MobileNetV2 with torchvision's module layout (``features`` + ``classifier``), 224x224 input."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model

__all__ = ["Conv2dNormActivation", "InvertedResidual", "MobileNetV2", "make_divisible", "mobilenet_v2"]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``min_value``, default ``divisor``),
    never going more than 10 % below ``v`` (torchvision's ``_make_divisible``)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """Sequential(Conv2d(bias=False), BatchNorm2d, ReLU6) with "same" padding (keys ``0.*``, ``1.*``)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    """Expand 1x1 (skipped when ``expand_ratio == 1``) -> depthwise 3x3 -> linear 1x1 projection."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1))
        layers.extend(
            [
                Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision-layout MobileNetV2.

    ``width`` is torchvision's ``width_mult``: channel counts are rounded to multiples of 8 (minimum 8);
    as in torchvision the last 1x1 conv keeps 1280 channels when ``width < 1``.
    Input: ``(N, in_channels, 224, 224)``.
    """

    def __init__(
        self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3, dropout: float = 0.2
    ):
        super().__init__()
        setting = [
            # t, c, n, s
            [1, 16, 1, 1],
            [6, 24, 2, 2],
            [6, 32, 3, 2],
            [6, 64, 4, 2],
            [6, 96, 3, 1],
            [6, 160, 3, 2],
            [6, 320, 1, 1],
        ]
        input_channel = make_divisible(32 * width, 8)
        self.last_channel = make_divisible(1280 * max(1.0, width), 8)
        features: list[nn.Module] = [Conv2dNormActivation(in_channels, input_channel, stride=2)]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width, 8)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        return self.classifier(x)


@register_model("mobilenet_v2")
def mobilenet_v2(
    num_classes: int = 1000, width: float = 1.0, in_channels: int = 3, dropout: float = 0.2
) -> MobileNetV2:
    """MobileNetV2 (3.50 M parameters at 1000 classes), 224x224 input."""
    return MobileNetV2(num_classes, width, in_channels, dropout)
