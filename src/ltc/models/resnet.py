"""ResNet-18/34/50 with torchvision's module layout (state_dicts load with ``strict=True``).

Default input: 224x224 for ``resnet18/34/50``; 32x32 for ``resnet34_cifar`` (same weights layout,
max-pool replaced by ``nn.Identity``).
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model, scale_channels

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet34_cifar", "resnet50"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck (ResNet v1.5: the stride sits on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-layout ResNet: conv1 7x7/2, bn1, relu, maxpool, layer1..4, avgpool, fc.

    ``width`` scales all channel counts; ``in_channels`` only changes ``conv1``; with
    ``cifar_stem=True`` the max-pool is an ``nn.Identity`` (same state_dict keys).
    Input: ``(N, in_channels, H, W)``, 224x224 for ImageNet, 32x32 for the CIFAR variant.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        width: float = 1.0,
        in_channels: int = 3,
        cifar_stem: bool = False,
    ):
        super().__init__()
        planes = [scale_channels(c, width) for c in (64, 128, 256, 512)]
        self.inplanes = scale_channels(64, width)
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


@register_model("resnet18")
def resnet18(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> ResNet:
    """ResNet-18 (11.69 M parameters at 1000 classes), 224x224 input."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width, in_channels)


@register_model("resnet34")
def resnet34(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> ResNet:
    """ResNet-34 (21.80 M parameters at 1000 classes), 224x224 input."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, width, in_channels)


@register_model("resnet34_cifar", input_size=32)
def resnet34_cifar(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> ResNet:
    """ResNet-34 for 32x32 input: 7x7/2 stem kept, max-pool replaced by ``nn.Identity``."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, width, in_channels, cifar_stem=True)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> ResNet:
    """ResNet-50 v1.5 (25.56 M parameters at 1000 classes), 224x224 input."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width, in_channels)
