"""VGG-16 with torchvision's module layout.

``vgg16``: torchvision ``vgg16`` (no BatchNorm), 224x224 input.
``vgg16_cifar``: torchvision ``vgg16_bn`` feature layout for 32x32 input; the 1x1x512 feature map is
flattened straight into ``Linear(512, 4096)`` (no 7x7 average pool).
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model, scale_channels

__all__ = ["VGG", "VGG16_CFG", "make_features", "vgg16", "vgg16_cifar"]

# Conv widths of VGG-16 ("D"), "M" = 2x2 max-pool; torchvision ``features`` indices follow from this list.
VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"]
VGG16_CFG += [512, 512, 512, "M", 512, 512, 512, "M"]


def make_features(
    cfg: list[int | str], width: float = 1.0, in_channels: int = 3, batch_norm: bool = False
) -> nn.Sequential:
    """Build torchvision's ``features`` Sequential (conv3x3[, BN], ReLU, ..., MaxPool2d(2))."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        c_out = scale_channels(int(v), width)
        layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
        c_in = c_out
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG with ``features``, ``avgpool`` and a 3-layer ``classifier`` (torchvision layout).

    With ``pool_size=7`` (ImageNet) ``avgpool`` is ``AdaptiveAvgPool2d((7, 7))``; with ``pool_size=None``
    (CIFAR) it is an ``nn.Identity`` and the features must already be 1x1 (32x32 input).
    ``width`` also scales the 4096-unit hidden layers.
    """

    def __init__(
        self,
        features: nn.Sequential,
        num_classes: int = 1000,
        width: float = 1.0,
        pool_size: int | None = 7,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.features = features
        c_last = scale_channels(512, width)
        hidden = scale_channels(4096, width)
        if pool_size is None:
            self.avgpool: nn.Module = nn.Identity()
            flat = c_last
        else:
            self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
            flat = c_last * pool_size * pool_size
        self.classifier = nn.Sequential(
            nn.Linear(flat, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


@register_model("vgg16")
def vgg16(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3, dropout: float = 0.5) -> VGG:
    """VGG-16 without BatchNorm (138.36 M parameters at 1000 classes), 224x224 input."""
    return VGG(make_features(VGG16_CFG, width, in_channels), num_classes, width, pool_size=7, dropout=dropout)


@register_model("vgg16_cifar", input_size=32)
def vgg16_cifar(
    num_classes: int = 1000, width: float = 1.0, in_channels: int = 3, dropout: float = 0.5
) -> VGG:
    """VGG-16 with BatchNorm for 32x32 input (33.647 M parameters at 10 classes)."""
    features = make_features(VGG16_CFG, width, in_channels, batch_norm=True)
    return VGG(features, num_classes, width, pool_size=None, dropout=dropout)
