"""Model zoo: torchvision-layout ResNet/VGG/MobileNetV2/ShuffleNetV2 and a small CPU CNN.

>>> from ltc import models
>>> net = models.create("resnet34_cifar", num_classes=10, width=0.25)
>>> models.default_input_size("resnet34_cifar")
32
"""

from .mobilenet import mobilenet_v2
from .registry import create, default_input_size, list_models, register_model, scale_channels
from .resnet import resnet18, resnet34, resnet34_cifar, resnet50
from .shufflenet import shufflenet_v2
from .small import small_cnn
from .vgg import vgg16, vgg16_cifar

__all__ = [
    "create",
    "default_input_size",
    "list_models",
    "mobilenet_v2",
    "register_model",
    "resnet18",
    "resnet34",
    "resnet34_cifar",
    "resnet50",
    "scale_channels",
    "shufflenet_v2",
    "small_cnn",
    "vgg16",
    "vgg16_cifar",
]
