"""Datasets, transforms and loaders for ``ltc`` (torch + Pillow only, no torchvision, no downloads).

Entry points: :func:`build` (source string -> :class:`DataBundle`), :func:`loaders` (bundle -> seeded
``DataLoader`` pair) and :func:`load_split` (one split of any source, e.g. a held-out test folder).
Sources: ``"digits"`` (bundled), CIFAR-10 python batches (folder or tar.gz), ``<class>/`` image folders
(directory or zip) and MedMNIST-style ``.npz``. Every problem with a source raises :class:`DataError`.
"""

from .build import (
    DataBundle,
    ShardSampler,
    build,
    calibration_loader,
    detect_format,
    eval_loader,
    load_split,
    loaders,
    seed_worker,
)
from .datasets import (
    ArrayDataset,
    ImageDataset,
    Subset,
    channel_stats,
    load_cifar10,
    load_digits,
    load_npz,
    read_cifar10,
    split,
    split_indices,
)
from .errors import DataError
from .folder import IMAGE_EXTENSIONS, ImageFolder, decode_image, find_splits
from .transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    ToChannels,
    ToFloat,
    eval_transform,
    train_transform,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "CenterCrop",
    "Compose",
    "DataBundle",
    "DataError",
    "ImageDataset",
    "ImageFolder",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "ShardSampler",
    "Subset",
    "ToChannels",
    "ToFloat",
    "build",
    "calibration_loader",
    "channel_stats",
    "decode_image",
    "detect_format",
    "eval_loader",
    "eval_transform",
    "find_splits",
    "load_cifar10",
    "load_digits",
    "load_npz",
    "load_split",
    "loaders",
    "read_cifar10",
    "seed_worker",
    "split",
    "split_indices",
    "train_transform",
]
