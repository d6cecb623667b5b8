"""``root/<class>/*.(jpg|jpeg|png|bmp)`` image folders, as a directory or a ``.zip``, decoded with Pillow."""

from __future__ import annotations

import functools
import io
import mmap
import os
import struct
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .datasets import ImageDataset
from .errors import DataError
from .transforms import Transform, pair

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "decode_image", "find_splits"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
_FORMAT_BY_EXT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_EXT_TEXT = "/".join(e[1:] for e in IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------------------------------------
# directory / zip tree


def _junk(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


@dataclass(frozen=True)
class _Tree:
    """Folders of a directory or zip: ``""`` is the root, paths use ``/``."""

    is_zip: bool
    files: dict[str, list[str]]  # folder -> image paths directly inside (zip member names / relative paths)
    children: dict[str, list[str]]  # folder -> child folders

    def kids(self, d: str) -> list[str]:
        return self.children.get(d, [])

    def images_under(self, d: str) -> list[str]:
        out, stack = [], [d]
        while stack:
            cur = stack.pop()
            out.extend(self.files.get(cur, []))
            stack.extend(self.kids(cur))
        return sorted(out)


def _build_tree(is_zip: bool, dirs: set[str], files: dict[str, list[str]]) -> _Tree:
    children: dict[str, set[str]] = {}
    for d in dirs:
        parts = d.split("/")
        for k in range(1, len(parts) + 1):
            children.setdefault("/".join(parts[: k - 1]), set()).add("/".join(parts[:k]))
    return _Tree(
        is_zip,
        {k: sorted(v) for k, v in files.items()},
        {k: sorted(v) for k, v in children.items()},
    )


@functools.lru_cache(maxsize=8)
def _scan_cached(path: str, _mtime: int, _size: int) -> _Tree:
    root = Path(path)
    dirs: set[str] = set()
    files: dict[str, list[str]] = {}
    if root.is_dir():
        for cur, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not _junk(d)]
            rel = Path(cur).relative_to(root).as_posix()
            rel = "" if rel == "." else rel
            if rel:
                dirs.add(rel)
            imgs = [
                f"{rel}/{f}" if rel else f
                for f in filenames
                if not _junk(f) and f.lower().endswith(IMAGE_EXTENSIONS)
            ]
            if imgs:
                files[rel] = imgs
        return _build_tree(False, dirs, files)
    try:
        with zipfile.ZipFile(root) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"cannot open {root} as a zip archive: {e}") from e
    for name in names:
        parts = name.rstrip("/").split("/")
        if any(_junk(p) for p in parts if p):
            continue
        if name.endswith("/"):
            dirs.add("/".join(parts))
            continue
        folder = "/".join(parts[:-1])
        if folder:
            dirs.add(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS):
            files.setdefault(folder, []).append(name)
    return _build_tree(True, dirs, files)


def _scan(root: Path) -> _Tree:
    st = root.stat()
    return _scan_cached(str(root.resolve()), st.st_mtime_ns, st.st_size)


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(
            f"image folder {root} does not exist; expected a directory or .zip laid out as "
            f"root/<class>/*.{{{_EXT_TEXT.replace('/', ',')}}}"
        )
    if root.is_file() and not zipfile.is_zipfile(root):
        raise DataError(
            f"{root} is neither a directory nor a .zip archive of root/<class>/*.jpg image folders"
        )


def _descend(tree: _Tree, node: str) -> str:
    """Follow single-child folders until a level whose children hold images or that branches."""
    while True:
        kids = tree.kids(node)
        if any(tree.files.get(k) for k in kids) or len(kids) != 1:
            return node
        node = kids[0]


def find_splits(root: str | Path) -> dict[str, str] | None:
    """Split folders of a tree like ``chest_xray/{train,val,test}/<class>/``: ``{"train": "chest_xray/train",
    "val": ..., "test": ...}`` (paths inside ``root``), or ``None`` for a plain ``<class>/`` tree.
    ``valid``/``validation``/``dev`` count as ``val``, ``training``/``testing`` as train/test. A lone split
    folder on the way down (a zip holding only ``train/<class>/``) counts too: ``{"train": "train"}``.
    A split may be absent (a tree of only ``val/`` and ``test/`` gives no ``"train"``)."""
    root = Path(root)
    _check_root(root)
    tree = _scan(root)
    node = ""
    while True:
        kids = tree.kids(node)
        if any(tree.files.get(k) for k in kids):  # class level: was a folder on the way a split name?
            parts = node.split("/") if node else []
            for k in range(len(parts), 0, -1):
                alias = SPLIT_ALIASES.get(parts[k - 1].lower())
                if alias:
                    return {alias: "/".join(parts[:k])}
            return None
        found: dict[str, str] = {}
        for k in kids:
            alias = SPLIT_ALIASES.get(k.rsplit("/", 1)[-1].lower())
            if alias and alias not in found:
                found[alias] = k
        if found:
            return found
        if len(kids) != 1:
            return None
        node = kids[0]


class _ZipReader:
    """Reads zip members; stored and deflated ones are sliced from an mmap of the archive and CRC-checked,
    several times faster than ``ZipFile.read`` per member. Others (encrypted, bzip2, ...) use zipfile."""

    def __init__(self, path: Path) -> None:
        self.zf = zipfile.ZipFile(path)
        self.info = {i.filename: i for i in self.zf.infolist()}
        self._fh = open(path, "rb")  # noqa: SIM115 - lives as long as the reader
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)

    def read(self, name: str) -> bytes:
        info = self.info[name]
        if info.flag_bits & 1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            return self.zf.read(name)
        off = info.header_offset
        if self._mm[off : off + 4] != b"PK\x03\x04":
            raise zipfile.BadZipFile("bad local file header")
        n, m = struct.unpack("<HH", self._mm[off + 26 : off + 30])
        start = off + 30 + n + m
        data = self._mm[start : start + info.compress_size]
        if info.compress_type == zipfile.ZIP_DEFLATED:
            data = zlib.decompress(data, -15)
        if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
            raise zipfile.BadZipFile("CRC or size mismatch (the archive is damaged)")
        return data

    def close(self) -> None:
        self._mm.close()
        self._fh.close()
        self.zf.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# --------------------------------------------------------------------------------------------------------
# decoding


def _to_uint8_gray(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit ``L`` by scaling (Pillow's convert would clip)."""
    a = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
        a = np.clip(np.rint(a.astype(np.float64) / 257.0), 0, 255)
    elif im.mode == "F" and a.max(initial=0) <= 1.0:
        a = np.clip(np.rint(a * 255.0), 0, 255)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


def _open_image(data: bytes, name: str) -> Image.Image:
    fmt = _FORMAT_BY_EXT.get(os.path.splitext(name)[1].lower())
    if fmt is not None:  # try the format the extension names first: skips Pillow's format probing
        try:
            return Image.open(io.BytesIO(data), formats=[fmt])
        except UnidentifiedImageError:
            pass
    return Image.open(io.BytesIO(data))


def decode_image(
    data: bytes,
    where: str,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    *,
    name: str | None = None,
) -> np.ndarray:
    """Decode image bytes to ``uint8 (H, W, C)``.

    ``channels`` 1 (``L``) or 3 (``RGB``) converts; ``None`` keeps gray modes as 1 channel, the rest as 3.
    ``size`` ``(height, width)`` resizes with Pillow's antialiased bilinear filter (JPEGs are first
    DCT-downscaled with ``draft``, which is much faster for large photos). Truncated or unreadable data
    raises :class:`DataError` naming ``where``. ``name`` (default ``where``) is the file name whose
    extension hints the format to try first.
    """
    try:
        im = _open_image(data, name if name is not None else where)
        if size is not None and im.format == "JPEG":
            im.draft("L" if channels == 1 else "RGB", (size[1], size[0]))
        im.load()
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"corrupt or truncated image {where}: {e}; re-export or delete that file") from e
    if channels is None:
        channels = 1 if im.mode in _GRAY_MODES else 3
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_uint8_gray(im)
    want = "L" if channels == 1 else "RGB"
    if im.mode != want:
        im = im.convert(want)
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    a = np.array(im)  # a writable copy (np.asarray of a PIL image is read-only)
    return a[:, :, None] if a.ndim == 2 else a


# --------------------------------------------------------------------------------------------------------
# dataset


class ImageFolder(ImageDataset):
    """Images under ``root/<class>/`` (any depth below the class folder), from a directory or a ``.zip``.

    Class folders are found automatically: the root itself, or the first level below a chain of single
    folders (so ``train/<class>/`` in a zip works). ``subdir`` selects one split of a tree such as
    ``chest_xray/{train,val,test}/<class>/``: a folder path inside ``root``, matched exactly or as the
    shallowest folder ending in it (``subdir="train"`` finds ``chest_xray/train``). Hidden entries and
    ``__MACOSX`` are ignored; labels follow sorted class-folder names unless ``classes`` fixes the order.

    Args:
        root: directory or ``.zip``.
        subdir: split folder to read (see above).
        classes: expected class names, label ``k`` = ``classes[k]``; a folder not in it is an error and a
            missing folder is allowed (for a held-out set lacking a class).
        transform: applied to the ``uint8 (C, H, W)`` image; ``None`` gives ``float32`` in ``[0, 1]``.
        image_size: resize every image to this int (square) or ``(height, width)`` while decoding. Without
            it every image must have the size of the first one.
        channels: 1 (``L``) or 3 (``RGB``); ``None`` keeps the mode of the first image (gray -> 1, else 3).
        in_memory: decode everything once into ``self.data``, a ``uint8 (N, C, H, W)`` tensor.
        progress: show a tqdm bar while decoding in memory.

    Lazy mode reads one file per item; a zip is opened on first use in each process, so the dataset is
    safe to use with ``DataLoader(num_workers > 0)``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        subdir: str | None = None,
        classes: Sequence[str] | None = None,
        transform: Transform | None = None,
        image_size: int | Sequence[int] | None = None,
        channels: int | None = None,
        in_memory: bool = False,
        progress: bool = True,
    ) -> None:
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None, got {channels}")
        self.root = Path(root)
        _check_root(self.root)
        tree = _scan(self.root)
        self.is_zip = tree.is_zip
        self.prefix = self._resolve(tree, subdir)
        self.source = f"{self.root}/{self.prefix}" if self.prefix else str(self.root)
        folders = tree.kids(self.prefix)
        names = [k.rsplit("/", 1)[-1] for k in folders]
        if classes is None:
            self.classes = sorted(names)
        else:
            self.classes = [str(c) for c in classes]
            unknown = [n for n in names if n not in self.classes]
            if unknown:
                raise DataError(
                    f"class folders {unknown} in {self.source} are not among the expected classes "
                    f"{self.classes}; rename them or pass the matching classes"
                )
        index = {c: i for i, c in enumerate(self.classes)}
        self.class_to_idx = index
        samples: list[tuple[str, int]] = []
        for folder, name in sorted(zip(folders, names, strict=True), key=lambda t: index[t[1]]):
            imgs = tree.images_under(folder)
            if not imgs:
                raise DataError(
                    f"class folder {self._where_dir(folder)} is empty (no .{_EXT_TEXT} files); "
                    "delete it or add images"
                )
            samples.extend((p, index[name]) for p in imgs)
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self._zf: _ZipReader | None = None
        self._zf_pid: int | None = None
        self._fixed_size = image_size is not None
        first = self._load(0, channels, pair(image_size) if image_size is not None else None)
        self.num_channels = int(first.shape[2])
        self.image_size = (int(first.shape[0]), int(first.shape[1]))
        self.in_memory = False
        self.data: torch.Tensor | None = None
        if in_memory:
            self.decode_all(progress=progress)

    # -- layout ------------------------------------------------------------------------------------------
    def _where_dir(self, folder: str) -> str:
        return f"'{folder}/' in {self.root}" if self.is_zip else str(self.root / folder)

    def _where(self, rel: str) -> str:
        return f"'{rel}' in {self.root}" if self.is_zip else str(self.root / rel)

    def _resolve(self, tree: _Tree, subdir: str | None) -> str:
        node = ""
        if subdir:
            want = subdir.strip("/")
            all_dirs = {d for kids in tree.children.values() for d in kids}
            cands = [d for d in all_dirs if d == want] or [d for d in all_dirs if d.endswith("/" + want)]
            if not cands:
                top = tree.kids(_descend(tree, ""))
                raise DataError(f"no folder {want!r} in {self.root}; folders there: {[k + '/' for k in top]}")
            depth = min(d.count("/") for d in cands)
            cands = sorted(d for d in cands if d.count("/") == depth)
            if len(cands) > 1:
                raise DataError(f"subdir {want!r} is ambiguous in {self.root}: {cands}; pass a longer path")
            node = cands[0]
        node = _descend(tree, node)
        kids = tree.kids(node)
        where = self._where_dir(node) if node else str(self.root)
        if any(tree.files.get(k) for k in kids):
            return node
        splits = sorted({k.rsplit("/", 1)[-1] for k in kids if k.rsplit("/", 1)[-1].lower() in SPLIT_ALIASES})
        if splits:
            raise DataError(
                f"{where} holds split folders {splits}, not class folders; pass subdir={splits[0]!r} "
                "(ltc.data.build uses them as train/val/test automatically)"
            )
        if tree.files.get(node):
            raise DataError(
                f"no class folders found in {where}: its images sit directly inside; expected "
                "root/<class>/*.jpg (one sub-folder per class)"
            )
        raise DataError(
            f"no class folders with images found in {where} (found folders {[k + '/' for k in kids]}); "
            f"expected root/<class>/*.{{{_EXT_TEXT.replace('/', ',')}}}"
        )

    # -- reading -----------------------------------------------------------------------------------------
    def _zip(self) -> _ZipReader:
        pid = os.getpid()
        if self._zf is None or self._zf_pid != pid:  # one handle per (worker) process
            self._zf = _ZipReader(self.root)
            self._zf_pid = pid
        return self._zf

    def _read(self, rel: str) -> bytes:
        try:
            if self.is_zip:
                return self._zip().read(rel)
            return (self.root / rel).read_bytes()
        except (OSError, zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"cannot read image {self._where(rel)}: {e}") from e

    def _load(
        self, index: int, channels: int | None = None, size: tuple[int, int] | None = None
    ) -> np.ndarray:
        rel = self.samples[index][0]
        return decode_image(self._read(rel), self._where(rel), channels, size, name=rel)

    def _load_checked(self, index: int) -> np.ndarray:
        size = self.image_size if self._fixed_size else None
        a = self._load(index, self.num_channels, size)
        if a.shape[:2] != self.image_size:
            h, w = self.image_size
            raise DataError(
                f"image {self._where(self.samples[index][0])} is {a.shape[1]}x{a.shape[0]} but "
                f"{self._where(self.samples[0][0])} is {w}x{h}; images must share a size, or pass "
                "image_size=N to resize them all"
            )
        return a

    def decode_all(self, progress: bool = True) -> None:
        """Decode every image once into ``self.data`` (``uint8 (N, C, H, W)``); later items come from it."""
        h, w = self.image_size
        data = torch.empty((len(self.samples), self.num_channels, h, w), dtype=torch.uint8)
        view = data.numpy()
        it = range(len(self.samples))
        bar = tqdm(
            it,
            desc=f"decoding {self.root.name}",
            unit="img",
            disable=not progress,
            mininterval=0.5,
            leave=False,
        )
        for i in bar:
            view[i] = self._load_checked(i).transpose(2, 0, 1)
        self.data = data
        self.in_memory = True
        if self._zf is not None:  # every item now comes from memory
            self._zf.close()
            self._zf = None

    def raw(self, index: int) -> torch.Tensor:
        if self.data is not None:
            return self.data[index]
        return torch.from_numpy(np.ascontiguousarray(self._load_checked(index).transpose(2, 0, 1)))

    def raw_batch(self, indices: Sequence[int]) -> torch.Tensor:
        if self.data is not None:
            return self.data[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        return super().raw_batch(indices)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zf"] = None
        state["_zf_pid"] = None
        return state
