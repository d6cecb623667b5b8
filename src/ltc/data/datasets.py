"""In-memory datasets, file-format readers (CIFAR-10 batches, MedMNIST npz, scikit-learn digits), a
stratified deterministic split and per-channel statistics.

All datasets yield ``(image, label)`` with ``image`` a ``(C, H, W)`` float tensor (the output of
``transform``, or ``uint8 / 255`` as ``float32`` when ``transform`` is ``None``) and ``label`` an ``int``.
They expose ``targets`` (``list[int]``), ``classes`` (``list[str]``), ``num_channels`` and ``image_size``
(``(height, width)``), both describing the ``uint8`` image handed to ``transform``, and ``raw(i)`` /
``raw_batch(indices)`` for that untransformed ``uint8`` image.
"""

from __future__ import annotations

import copy
import pickle
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data import Subset as TorchSubset

from .errors import DataError
from .transforms import Compose, Resize, ToChannels, ToFloat, Transform, pair

__all__ = [
    "ArrayDataset",
    "ImageDataset",
    "Subset",
    "channel_stats",
    "load_cifar10",
    "load_digits",
    "load_npz",
    "read_cifar10",
    "split",
    "split_indices",
]

_TO_FLOAT = ToFloat()


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Common base: subclasses set the attributes below and implement :meth:`raw`.

    Attributes:
        targets: label of every item, ``list[int]`` of length ``len(self)``.
        classes: class names; label ``k`` is ``classes[k]``.
        num_channels: channels of the ``uint8`` image given to ``transform`` (1 or 3).
        image_size: ``(height, width)`` of that image in pixels.
        transform: callable on the ``uint8 (C, H, W)`` tensor, or ``None`` for plain ``[0, 1]`` floats.
        source: where the data came from, for messages.
    """

    targets: list[int]
    classes: list[str]
    num_channels: int
    image_size: tuple[int, int]
    transform: Transform | None
    source: str

    def __len__(self) -> int:
        return len(self.targets)

    def raw(self, index: int) -> torch.Tensor:
        """The untransformed ``uint8 (C, H, W)`` image ``index``."""
        raise NotImplementedError

    def raw_batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Untransformed ``uint8 (B, C, H, W)`` images."""
        return torch.stack([self.raw(int(i)) for i in indices])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)}")
        x = self.raw(index)
        x = self.transform(x) if self.transform is not None else _TO_FLOAT(x)
        return x, self.targets[index]

    def with_transform(self, transform: Transform | None) -> ImageDataset:
        """A shallow copy sharing the data but applying ``transform``."""
        new = copy.copy(self)
        new.transform = transform
        return new

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        h, w = self.image_size
        return (
            f"{type(self).__name__}({self.source!r}, n={len(self)}, classes={len(self.classes)}, "
            f"shape=({self.num_channels}, {h}, {w}))"
        )


# --------------------------------------------------------------------------------------------------------
# in-memory arrays


def _to_uint8_nchw(images: Any, layout: str | None, source: str) -> torch.Tensor:
    """Images as a contiguous ``uint8 (N, C, H, W)`` tensor; accepts ``(N, H, W)``, NHWC or NCHW."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise DataError(
            f"{source}: images must be a numpy array or torch tensor, got {type(images).__name__}"
        )
    if x.dtype != torch.uint8:
        raise DataError(
            f"{source}: images must be uint8 (0..255), got {x.dtype}; convert floats in [0, 1] with "
            "(x * 255).round() cast to uint8"
        )
    if x.ndim == 3:
        return x.unsqueeze(1).contiguous()
    if x.ndim != 4:
        raise DataError(
            f"{source}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got {tuple(x.shape)}"
        )
    if layout is None:
        chans = (1, 3, 4)
        nhwc, nchw = x.shape[3] in chans, x.shape[1] in chans
        if nhwc and nchw:  # tie: prefer the reading that gives square images
            nhwc = x.shape[1] == x.shape[2] or x.shape[2] != x.shape[3]
        elif not (nhwc or nchw):
            raise DataError(
                f"{source}: cannot tell the channel axis of images shaped {tuple(x.shape)}; "
                "expected 1, 3 or 4 channels first or last (pass layout='NHWC' or 'NCHW')"
            )
        layout = "NHWC" if nhwc else "NCHW"
    if layout.upper() == "NHWC":
        x = x.permute(0, 3, 1, 2)
    elif layout.upper() != "NCHW":
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    if x.shape[1] not in (1, 3, 4):
        raise DataError(f"{source}: images have {x.shape[1]} channels; only 1, 3 or 4 are supported")
    return x.contiguous()


def _to_labels(labels: Any, source: str) -> list[int]:
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{source}: labels must be (N,) or (N, 1) class indices, got shape {y.shape} "
            "(multi-label data is not supported)"
        )
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))):
            raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, found {int(y.min())}")
    return y.tolist()


class ArrayDataset(ImageDataset):
    """Images held in memory as one ``uint8`` tensor.

    Args:
        images: ``uint8`` array/tensor ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` with C in 1, 3, 4
            (the layout is guessed from where the 1/3/4 sits; force it with ``layout``). RGBA drops alpha.
        labels: ``N`` class indices, shape ``(N,)`` or ``(N, 1)``.
        classes: class names; default ``["0", ..., str(max_label)]``.
        transform: applied to the ``uint8 (C, H, W)`` image; ``None`` gives ``float32`` in ``[0, 1]``.
        channels: convert to 1 or 3 channels per item (see :class:`~ltc.data.transforms.ToChannels`).
        image_size: resize per item (antialiased bilinear) to this int (square) or ``(height, width)``.
        source: name used in messages.
    """

    def __init__(
        self,
        images: Any,
        labels: Any,
        classes: Sequence[str] | None = None,
        transform: Transform | None = None,
        *,
        channels: int | None = None,
        image_size: int | Sequence[int] | None = None,
        layout: str | None = None,
        source: str = "arrays",
    ) -> None:
        self.source = source
        self.data = _to_uint8_nchw(images, layout, source)
        self.targets = _to_labels(labels, source)
        if len(self.targets) != self.data.shape[0]:
            raise DataError(
                f"{source}: {self.data.shape[0]} images but {len(self.targets)} labels; "
                "images and labels must have the same length"
            )
        n_cls = max(self.targets, default=-1) + 1
        self.classes = [str(k) for k in range(n_cls)] if classes is None else [str(c) for c in classes]
        if n_cls > len(self.classes):
            raise DataError(
                f"{source}: label {n_cls - 1} but only {len(self.classes)} classes {self.classes}"
            )
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None, got {channels}")
        stored = self.data.shape[1]
        self.num_channels = channels if channels is not None else min(stored, 3)
        self.image_size = pair(image_size) if image_size is not None else tuple(self.data.shape[2:])
        ops: list[Transform] = []
        if self.num_channels != stored:
            ops.append(ToChannels(self.num_channels))
        if self.image_size != tuple(self.data.shape[2:]):
            ops.append(Resize(self.image_size))
        self._convert = Compose(ops) if ops else None
        self.transform = transform

    def raw(self, index: int) -> torch.Tensor:
        x = self.data[index]
        return self._convert(x) if self._convert is not None else x

    def raw_batch(self, indices: Sequence[int]) -> torch.Tensor:
        x = self.data[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        return self._convert(x) if self._convert is not None else x


# --------------------------------------------------------------------------------------------------------
# subsets and splitting


class Subset(TorchSubset):
    """``torch.utils.data.Subset`` that keeps ``targets``, ``classes``, ``num_channels``, ``image_size``."""

    dataset: ImageDataset

    def __init__(self, dataset: ImageDataset, indices: Sequence[int]) -> None:
        if isinstance(dataset, Subset):  # flatten nested subsets
            indices = [dataset.indices[int(i)] for i in indices]
            dataset = dataset.dataset
        super().__init__(dataset, [int(i) for i in indices])
        base = dataset.targets
        self.targets: list[int] = [int(base[i]) for i in self.indices]

    classes = property(lambda self: self.dataset.classes)
    num_channels = property(lambda self: self.dataset.num_channels)
    image_size = property(lambda self: self.dataset.image_size)
    source = property(lambda self: self.dataset.source)
    transform = property(lambda self: self.dataset.transform)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes)

    def raw(self, index: int) -> torch.Tensor:
        return self.dataset.raw(self.indices[index])

    def raw_batch(self, indices: Sequence[int]) -> torch.Tensor:
        return self.dataset.raw_batch([self.indices[int(i)] for i in indices])

    def with_transform(self, transform: Transform | None) -> Subset:
        """The same indices over a copy of the dataset that applies ``transform``."""
        return Subset(self.dataset.with_transform(transform), self.indices)

    def __repr__(self) -> str:
        return f"Subset({self.dataset!r}, n={len(self)})"


def split_indices(
    targets: Sequence[int], val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of ``range(len(targets))`` into sorted ``(train, val)`` int64 index arrays.

    Each class contributes ``n_c * val_fraction`` rounded half up items to ``val`` (at least 1 and at most
    ``n_c - 1`` when it has 2 or more items and ``val_fraction > 0``), chosen by a ``numpy`` PCG64 generator
    seeded with ``seed``: identical across runs, machines and platforms.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    t = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(t):
        idx = np.flatnonzero(t == c)
        n = idx.size
        k = int(np.floor(n * val_fraction + 0.5))
        if val_fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        val.append(rng.permutation(idx)[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(t.size, dtype=np.int64), val_idx)
    return train_idx, val_idx.astype(np.int64)


def split(dataset: ImageDataset, val_fraction: float = 0.1, seed: int = 0) -> tuple[Subset, Subset]:
    """Deterministic stratified ``(train_subset, val_subset)`` of ``dataset`` (see :func:`split_indices`)."""
    train_idx, val_idx = split_indices(dataset.targets, val_fraction, seed)
    return Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())


def channel_stats(
    dataset: ImageDataset, max_images: int = 10_000, seed: int = 0, batch: int = 512
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel values scaled to ``[0, 1]`` over at most ``max_images`` items
    (a seeded random sample when there are more), computed on the untransformed images. A std below
    1/255 (a constant channel) is reported as 1.0 so normalization never divides by ~0."""
    n = len(dataset)
    if n == 0:
        raise DataError(f"{dataset.source}: cannot compute statistics of an empty dataset")
    if n > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))
    else:
        idx = np.arange(n)
    c = dataset.num_channels
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, idx.size, batch):
        x = dataset.raw_batch(idx[start : start + batch].tolist()).to(torch.float64).div_(255.0)
        s += x.sum(dim=(0, 2, 3))
        s2 += x.square().sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / count
    std = (s2 / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std < 1 / 255, torch.ones_like(std), std)
    return [round(float(m), 6) for m in mean], [round(float(v), 6) for v in std]


# --------------------------------------------------------------------------------------------------------
# CIFAR-10 python batches

_CIFAR_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
_CIFAR_FILES = {"train": _CIFAR_TRAIN, "test": ("test_batch",)}
_CIFAR_DIR = "cifar-10-batches-py"


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (what the CIFAR batches contain), never arbitrary code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        norm = module.replace("numpy.core", "numpy._core")
        if (norm, name) in self._ALLOWED:
            for mod in (norm, norm.replace("numpy._core", "numpy.core")):  # numpy 2 / numpy 1 spelling
                try:
                    return super().find_class(mod, name)
                except (ImportError, AttributeError):
                    continue
        if (module, name) in {("_codecs", "encode"), ("builtins", "bytearray"), ("__builtin__", "bytearray")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def _unpickle(data: bytes, name: str) -> dict[str, Any]:
    import io

    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure means a corrupt file
        raise DataError(f"corrupt CIFAR-10 batch file {name}: {e}; re-download cifar-10-python.tar.gz") from e
    if not isinstance(obj, dict):
        raise DataError(
            f"corrupt CIFAR-10 batch file {name}: expected a pickled dict, got {type(obj).__name__}"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_files(path: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    """Raw bytes of the wanted batch files from a folder, its parent, or the official tar.gz."""
    found: dict[str, bytes] = {}
    if path.is_dir():
        folder = path
        if not any((path / f).is_file() for f in ("batches.meta", *_CIFAR_TRAIN, "test_batch")):
            if (path / _CIFAR_DIR).is_dir():
                folder = path / _CIFAR_DIR
        missing = [f for f in wanted if not (folder / f).is_file()]
        if missing:
            raise DataError(
                f"CIFAR-10 folder {folder} is missing {', '.join(missing)}; expected the official "
                f"'{_CIFAR_DIR}' folder (batches.meta, data_batch_1..5, test_batch) extracted from "
                "cifar-10-python.tar.gz, or pass the .tar.gz itself"
            )
        for f in wanted:
            found[f] = (folder / f).read_bytes()
        return found
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    fh = tar.extractfile(member)
                    if fh is not None:
                        found[base] = fh.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(
            f"cannot read CIFAR-10 archive {path}: {e}; re-download cifar-10-python.tar.gz"
        ) from e
    missing = [f for f in wanted if f not in found]
    if missing:
        raise DataError(
            f"archive {path} is missing {', '.join(missing)}; expected the official cifar-10-python.tar.gz "
            f"holding {_CIFAR_DIR}/(batches.meta, data_batch_1..5, test_batch)"
        )
    return found


def read_cifar10(
    path: str | Path, splits: Sequence[str] = ("train", "test"), **kwargs: Any
) -> dict[str, ArrayDataset]:
    """Read several splits of CIFAR-10 in one pass (the tar.gz is decompressed once); see
    :func:`load_cifar10`. ``kwargs`` go to each :class:`ArrayDataset`."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"CIFAR-10 source {path} does not exist; pass the '{_CIFAR_DIR}' folder or the .tar.gz"
        )
    for s in splits:
        if s not in _CIFAR_FILES:
            raise DataError(f"CIFAR-10 has splits 'train' and 'test', not {s!r}")
    wanted = ["batches.meta", *[f for s in splits for f in _CIFAR_FILES[s]]]
    raw = _cifar_files(path, wanted)
    meta = _unpickle(raw["batches.meta"], f"{path}/batches.meta")
    names = meta.get("label_names")
    if not isinstance(names, list):
        raise DataError(f"{path}/batches.meta has no 'label_names'; keys found: {sorted(meta)}")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    out: dict[str, ArrayDataset] = {}
    for s in splits:
        images, labels = [], []
        for f in _CIFAR_FILES[s]:
            batch = _unpickle(raw[f], f"{path}/{f}")
            if "data" not in batch or "labels" not in batch:
                raise DataError(
                    f"CIFAR-10 batch {path}/{f} lacks 'data' or 'labels'; keys found: {sorted(batch)}"
                )
            data = np.asarray(batch["data"])
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
                raise DataError(
                    f"CIFAR-10 batch {path}/{f}: 'data' must be uint8 (N, 3072), "
                    f"got {data.dtype} {data.shape}"
                )
            lab = list(batch["labels"])
            if len(lab) != data.shape[0]:
                raise DataError(f"CIFAR-10 batch {path}/{f}: {data.shape[0]} images but {len(lab)} labels")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.extend(lab)
        out[s] = ArrayDataset(
            np.concatenate(images), labels, classes, layout="NCHW", source=f"{path} [{s}]", **kwargs
        )
    return out


def load_cifar10(path: str | Path, split: str = "train", **kwargs: Any) -> ArrayDataset:
    """CIFAR-10 from the official ``cifar-10-batches-py`` folder (or its parent) or
    ``cifar-10-python.tar.gz`` (members are read from the archive, nothing is extracted to disk).

    ``split="train"`` concatenates ``data_batch_1..5`` (50,000 images), ``"test"`` is ``test_batch``.
    Images are ``uint8 (3, 32, 32)``; classes come from ``batches.meta``. The pickles are loaded with an
    unpickler that only accepts numpy arrays. ``kwargs`` (``channels``, ``image_size``, ``transform``) are
    set on the returned :class:`ArrayDataset`.
    """
    return read_cifar10(path, (split,), **kwargs)[split]


# --------------------------------------------------------------------------------------------------------
# MedMNIST-style npz


def load_npz(path: str | Path, **kwargs: Any) -> dict[str, ArrayDataset]:
    """Read a MedMNIST-style ``.npz`` into ``{"train": ..., "val": ..., "test": ...}`` (splits present only).

    Expects ``train_images`` / ``train_labels`` and optionally ``val_*`` and ``test_*``; images ``uint8``
    ``(N, H, W)`` or ``(N, H, W, C)``, labels ``(N,)`` or ``(N, 1)``. Class names are ``"0".."K-1"`` with
    ``K`` = the largest label over all splits + 1. ``kwargs`` go to each :class:`ArrayDataset`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path} as .npz: {e}") from e
    keys = sorted(arrays)
    expected = "expected train_images, train_labels, val_images, val_labels (test_* optional), as in MedMNIST"
    if "train_images" not in arrays or "train_labels" not in arrays:
        raise DataError(f"{path} lacks train_images/train_labels; keys found: {keys}; {expected}")
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in arrays or f"{s}_labels" in arrays]
    for s in splits:
        for part in ("images", "labels"):
            if f"{s}_{part}" not in arrays:
                raise DataError(f"{path} has {s}_* but lacks '{s}_{part}'; keys found: {keys}; {expected}")
    labels = {s: _to_labels(arrays[f"{s}_labels"], f"{path} [{s}_labels]") for s in splits}
    n_cls = max(max(v, default=0) for v in labels.values()) + 1
    classes = [str(k) for k in range(n_cls)]
    return {
        s: ArrayDataset(arrays[f"{s}_images"], labels[s], classes, source=f"{path} [{s}]", **kwargs)
        for s in splits
    }


# --------------------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(**kwargs: Any) -> ArrayDataset:
    """scikit-learn's bundled handwritten digits (UCI optdigits test set; no download): 1797 images,
    10 classes ``"0".."9"``, 1 channel. The 8x8 values 0..16 are scaled to ``uint8`` with
    ``round(v * 255 / 16)`` and upsampled to 16x16 by nearest neighbour (each pixel becomes a 2x2 block,
    so no value is invented). ``kwargs`` go to :class:`ArrayDataset`."""
    from sklearn.datasets import load_digits as _sk_load_digits

    d: Mapping[str, Any] = _sk_load_digits()
    img = np.rint(np.asarray(d["images"], dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    img = img.repeat(2, axis=1).repeat(2, axis=2)
    return ArrayDataset(img, np.asarray(d["target"]), [str(k) for k in range(10)], source="digits", **kwargs)
