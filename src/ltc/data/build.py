"""One entry point from a data source string to ready-to-train datasets and loaders."""

from __future__ import annotations

import random
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .datasets import ImageDataset, Subset, channel_stats, load_digits, load_npz, read_cifar10, split_indices
from .errors import ACCEPTED_SOURCES, DataError
from .folder import ImageFolder, find_splits
from .transforms import eval_transform, train_transform

__all__ = [
    "DataBundle",
    "ShardSampler",
    "build",
    "calibration_loader",
    "detect_format",
    "eval_loader",
    "load_split",
    "loaders",
    "seed_worker",
]

IN_MEMORY_BUDGET = 2 << 30
"""``in_memory=None`` decodes an image folder into RAM when the ``uint8`` tensor fits in this many bytes."""
STATS_IMAGES = 10_000
"""Mean/std use at most this many training images (in memory) ..."""
STATS_IMAGES_LAZY = 2_000
"""... or this many when every image must be decoded from disk."""

Data = ImageDataset | Subset


@dataclass
class DataBundle:
    """Datasets ready for training. ``train`` augments (if asked), ``val``/``test`` do not; all yield
    ``(float32 (in_channels, image_size, image_size) normalized with mean/std, int label)``.

    Attributes:
        train, val, test: datasets (``val`` is ``None`` only for ``val_fraction=0`` without a file split;
            ``test`` is ``None`` when the source has no test split).
        num_classes: ``len(classes)``.
        in_channels: 1 or 3.
        image_size: side of the square images in pixels.
        classes: class names; label ``k`` is ``classes[k]``.
        mean, std: per-channel normalization used by every split (pixel values scaled to ``[0, 1]``).
        source: the ``source`` string given to :func:`build`.
        format: ``"digits"``, ``"cifar"``, ``"folder"`` or ``"npz"``.
        val_from: ``"file"`` (the source's own split) or ``"split"`` (carved from train with ``seed``).
    """

    train: Data
    val: Data | None
    test: Data | None
    num_classes: int
    in_channels: int
    image_size: int
    classes: list[str]
    mean: list[float]
    std: list[float]
    source: str
    format: str = ""
    val_from: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input image."""
        return (self.in_channels, self.image_size, self.image_size)

    def __repr__(self) -> str:
        n = {
            k: (len(v) if v is not None else None)
            for k, v in (("train", self.train), ("val", self.val), ("test", self.test))
        }
        return (
            f"DataBundle(source={self.source!r}, format={self.format!r}, sizes={n}, classes={self.classes}, "
            f"input_shape={self.input_shape}, mean={self.mean}, std={self.std})"
        )


def detect_format(source: str | Path) -> str:
    """``"digits"``, ``"cifar"`` (batches folder or tar), ``"npz"`` or ``"folder"`` (directory or zip)."""
    if str(source).strip().lower() == "digits":
        return "digits"
    p = Path(source).expanduser()
    if not p.exists():
        raise DataError(f"data source {str(source)!r} not found; {ACCEPTED_SOURCES}")
    if p.is_dir():
        markers = ("batches.meta", "data_batch_1", "test_batch")
        if any((p / f).is_file() for f in markers) or (p / "cifar-10-batches-py").is_dir():
            return "cifar"
        return "folder"
    name = p.name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".zip") or (zipfile.is_zipfile(p) and not tarfile.is_tarfile(p)):
        return "folder"
    if tarfile.is_tarfile(p):
        return "cifar"
    raise DataError(f"{p}: unrecognized file type; {ACCEPTED_SOURCES}")


@dataclass
class _Loaded:
    fmt: str
    splits: dict[str, ImageDataset]
    named_splits: bool  # False for a plain <class>/ folder, which may stand for any one split


def _open(
    source: str | Path,
    *,
    image_size: int | None,
    channels: int | None,
    in_memory: bool | None,
    classes: Sequence[str] | None,
    decode: Sequence[str],
    progress: bool,
) -> _Loaded:
    fmt = detect_format(source)
    kw = {"image_size": image_size, "channels": channels}
    if fmt == "digits":
        loaded = _Loaded(fmt, {"train": load_digits(**kw)}, True)
    elif fmt == "cifar":
        loaded = _Loaded(fmt, read_cifar10(Path(source).expanduser(), ("train", "test"), **kw), True)
    elif fmt == "npz":
        loaded = _Loaded(fmt, load_npz(Path(source).expanduser(), **kw), True)
    else:
        root = Path(source).expanduser()
        found = find_splits(root)
        subdirs = found if found is not None else {"train": None}
        names = [n for n in ("train", "val", "test") if n in subdirs]  # the first sets size/channels/classes
        first = ImageFolder(root, subdir=subdirs[names[0]], classes=classes, progress=progress, **kw)
        out = {names[0]: first}
        fixed = {"image_size": first.image_size, "channels": first.num_channels, "classes": first.classes}
        for name in names[1:]:
            out[name] = ImageFolder(root, subdir=subdirs[name], progress=progress, **fixed)
        for name, ds in out.items():
            nbytes = len(ds) * ds.num_channels * ds.image_size[0] * ds.image_size[1]
            want = in_memory if in_memory is not None else nbytes <= IN_MEMORY_BUDGET
            if want and (name in decode or found is None):
                ds.decode_all(progress=progress)
        loaded = _Loaded(fmt, out, found is not None)
    have = next(iter(loaded.splits.values())).classes
    if classes is not None and fmt != "folder" and list(classes) != have:
        raise DataError(f"{source} has classes {have}, not the expected {list(classes)}")
    return loaded


def _train_val(loaded: _Loaded, val_fraction: float, seed: int) -> tuple[Data | None, Data | None, str]:
    train = loaded.splits.get("train")
    if "val" in loaded.splits:
        return train, loaded.splits["val"], "file"
    if train is None or val_fraction <= 0:
        return train, None, ""
    tr, va = split_indices(train.targets, val_fraction, seed)
    return Subset(train, tr.tolist()), Subset(train, va.tolist()), "split"


def _square(ds: Data, source: str | Path) -> int:
    h, w = ds.image_size
    if h != w:
        raise DataError(
            f"images in {source} are {w}x{h}, not square; pass image_size=N to resize them to NxN"
        )
    return h


def _stats(
    train: Data | None, ds: Data, mean: Sequence[float] | None, std: Sequence[float] | None, seed: int
) -> tuple[list[float], list[float]]:
    """Given mean/std (checked against ``ds``), else computed from ``train``."""
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    if mean is not None and std is not None:
        if len(mean) != ds.num_channels or len(std) != ds.num_channels:
            raise DataError(
                f"mean/std have {len(mean)}/{len(std)} values but images have {ds.num_channels} channels"
            )
        return [float(m) for m in mean], [float(s) for s in std]
    if train is None:
        raise DataError(f"{ds.source} has no train split to compute mean/std from; pass mean and std "
                        "(or like=bundle, the training DataBundle)")
    base = train.dataset if isinstance(train, Subset) else train
    lazy = isinstance(base, ImageFolder) and base.data is None
    return channel_stats(train, STATS_IMAGES_LAZY if lazy else STATS_IMAGES, seed=seed)


def build(
    source: str | Path = "digits",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
    in_memory: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: bool = True,
) -> DataBundle:
    """Load ``source`` and return train/val/test datasets with transforms applied.

    Args:
        source: ``"digits"`` (bundled scikit-learn digits, 16x16 gray), a CIFAR-10 ``cifar-10-batches-py``
            folder or ``cifar-10-python.tar.gz``, an image folder (directory or ``.zip``; a
            ``{train,val,test}/<class>/`` tree uses its split folders), or a MedMNIST-style ``.npz``.
        image_size: resize every image to ``image_size x image_size``; default the native (square) size.
        channels: 1 or 3 to convert; default the source's own (image folders: the first image's mode).
        val_fraction: fraction of each class carved from train for ``val`` when the source has no val split.
        seed: seed of that split (and of the image sample used for statistics).
        augment: random crop (zero padding of 1/8 of the side) + horizontal flip on train; the digits get
            no flip, a mirrored digit is not the same digit.
        in_memory: image folders only: decode all images into RAM once; default when they fit in 2 GiB.
        mean, std: per-channel normalization; default computed from the train part (<= 10k images; 2k when
            decoded lazily from disk).
        progress: tqdm bars while decoding.
    """
    loaded = _open(
        source,
        image_size=image_size,
        channels=channels,
        in_memory=in_memory,
        classes=None,
        decode=("train", "val", "test"),
        progress=progress,
    )
    train, val, val_from = _train_val(loaded, val_fraction, seed)
    if train is None:
        raise DataError(
            f"{source} has no train split (it has {sorted(loaded.splits)}); expected a train/ folder"
        )
    if train.num_classes < 2:
        raise DataError(
            f"{source} has {train.num_classes} class ({train.classes}); classification needs >= 2"
        )
    size = _square(train, source)
    c = train.num_channels
    mean_, std_ = _stats(train, train, mean, std, seed)
    tf_train = train_transform(size, mean_, std_, c, augment, hflip=loaded.fmt != "digits")
    tf_eval = eval_transform(size, mean_, std_, c)
    test = loaded.splits.get("test")
    return DataBundle(
        train=train.with_transform(tf_train),
        val=val.with_transform(tf_eval) if val is not None else None,
        test=test.with_transform(tf_eval) if test is not None else None,
        num_classes=train.num_classes,
        in_channels=c,
        image_size=size,
        classes=list(train.classes),
        mean=mean_,
        std=std_,
        source=str(source),
        format=loaded.fmt,
        val_from=val_from,
    )


def load_split(
    source: str | Path,
    split: str = "test",
    *,
    like: DataBundle | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    in_memory: bool | None = None,
    progress: bool = True,
) -> Data:
    """One split of ``source`` with the evaluation transform, e.g. to score a checkpoint on a test folder.

    ``split`` is ``"train"``, ``"val"`` or ``"test"``. A source without that split: ``"val"`` is the same
    seeded carve-out of train that :func:`build` makes (and ``"train"`` the rest); a plain
    ``<class>/`` image folder (no split folders) is used whole as ``"test"``. Anything else is a
    :class:`DataError`.

    Pass ``like=bundle`` (the training :class:`DataBundle`) to reuse its image size, channels, mean/std and
    class order, so labels and normalization match the model; explicit arguments override it. Without
    them mean/std are computed from this source's train part, as :func:`build` does.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if like is not None:
        image_size = like.image_size if image_size is None else image_size
        channels = like.in_channels if channels is None else channels
        mean = like.mean if mean is None else mean
        std = like.std if std is None else std
        classes = like.classes if classes is None else classes
    loaded = _open(
        source,
        image_size=image_size,
        channels=channels,
        in_memory=in_memory,
        classes=classes,
        decode=(split,) if mean is not None else ("train", split),
        progress=progress,
    )
    train, val, _ = _train_val(loaded, val_fraction, seed)
    ds: Data | None
    if split == "train":
        ds = train
    elif split == "val":
        ds = val
    else:
        ds = loaded.splits.get("test")
        if ds is None and not loaded.named_splits:
            ds = loaded.splits["train"]
    if ds is None:
        raise DataError(
            f"{source} has no {split!r} split (it has {sorted(loaded.splits)}); pass a source that holds "
            "one, e.g. a held-out <class>/ folder"
        )
    size = _square(ds, source)
    mean_, std_ = _stats(train, ds, mean, std, seed)
    return ds.with_transform(eval_transform(size, mean_, std_, ds.num_channels))


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy and ``random`` in a worker from torch's per-worker seed (torch's own
    global RNG, used by the random transforms, is already seeded per worker by ``DataLoader``)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class ShardSampler(torch.utils.data.Sampler[int]):
    """In-order indices ``rank, rank + world, ...``: each process evaluates its own share, none twice (the
    evaluation sums its counts over the processes)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loaders(
    bundle: DataBundle,
    batch_size: int = 128,
    workers: int = 0,
    seed: int = 0,
    *,
    eval_batch_size: int | None = None,
    distributed: bool = False,
) -> tuple[DataLoader, DataLoader | None]:
    """``(train_loader, val_loader)``: train shuffled by a ``torch.Generator`` seeded with ``seed``; val in
    order (``None`` when the bundle has no val). When the last train batch would hold a single sample it is
    dropped (BatchNorm cannot train on one). With ``workers=0`` augmentation draws from the main process's
    global torch RNG: call ``torch.manual_seed`` for fully repeatable runs.

    ``distributed``: under torch.distributed with several processes, each process gets its share of every
    epoch: train through a ``DistributedSampler`` (seeded, shuffled, ``set_epoch`` by :func:`ltc.train.fit`,
    last partial batch dropped), val through a :class:`ShardSampler`."""
    from ..utils import rank, world_size

    g = torch.Generator()
    g.manual_seed(seed)
    common = {
        "num_workers": workers,
        "worker_init_fn": seed_worker if workers > 0 else None,
        "persistent_workers": workers > 0,
    }
    n = len(bundle.train)
    world = world_size() if distributed else 1
    if world > 1:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(bundle.train, shuffle=True, seed=seed, drop_last=True)
        train = DataLoader(bundle.train, batch_size=batch_size, sampler=sampler, **common)
    else:
        train = DataLoader(
            bundle.train,
            batch_size=batch_size,
            shuffle=True,
            generator=g,
            drop_last=n > 1 and n % batch_size == 1,
            **common,
        )
    val = None
    if bundle.val is not None:
        sampler_v = ShardSampler(len(bundle.val), rank(), world) if world > 1 else None
        val = DataLoader(bundle.val, batch_size=eval_batch_size or batch_size, shuffle=False, sampler=sampler_v,
                         **common)
    return train, val


def calibration_loader(bundle: DataBundle, images: int = 2048, seed: int = 0, batch_size: int = 128) -> DataLoader:
    """A fixed, seeded sample of ``images`` training images without augmentation, in a fixed order: what
    BatchNorm re-estimation and the data metric of the C step read (the same images on every process and in
    every pass, so that resumed runs repeat them)."""
    n = len(bundle.train)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(images, n)].tolist()
    tf = eval_transform(bundle.image_size, bundle.mean, bundle.std, bundle.in_channels)
    return DataLoader(Subset(bundle.train, idx).with_transform(tf), batch_size=batch_size, shuffle=False)


def eval_loader(dataset: Data, batch_size: int = 256, workers: int = 0) -> DataLoader:
    """In-order loader for evaluation (e.g. over :func:`load_split`'s result)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=seed_worker if workers > 0 else None,
    )
