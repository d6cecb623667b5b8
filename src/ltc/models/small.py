"""A compact CNN for CPU demos and tests (default input 28x28, e.g. MNIST-sized images)."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model, scale_channels

__all__ = ["SmallCNN", "small_cnn"]


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Four conv3x3+BN+ReLU blocks (32, 64, 128, 128 channels times ``width``) with a 2x2 max-pool after
    the 2nd and 4th, global average pool and a linear ``classifier``.

    Works for any input of at least 4x4; 28x28 by default (7x7 before the global pool).
    """

    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        c1, c2, c3, c4 = (scale_channels(c, width) for c in (32, 64, 128, 128))
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1),
            *_conv_bn_relu(c1, c2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c2, c3),
            *_conv_bn_relu(c3, c4),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c4, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model("small_cnn", input_size=28)
def small_cnn(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> SmallCNN:
    """Compact 4-conv CNN for CPU demos/tests, 28x28 input."""
    return SmallCNN(num_classes, width, in_channels)
