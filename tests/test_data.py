"""Tests of ltc.data: real file formats written under tmp_path, bad inputs, transforms, real shared data."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

import ltc.data as D
from ltc.data import DataError
from ltc.data.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    ToChannels,
    ToFloat,
    default_padding,
    eval_transform,
    train_transform,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HSET = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------------------------------------
# helpers writing real formats


def _img(seed: int, h: int = 12, w: int = 10, c: int = 3) -> np.ndarray:
    """Random 4x4 blocks (coarse enough for JPEG to keep them recognisable), ``uint8 (h, w[, c])``."""
    a = np.random.default_rng(seed).integers(0, 256, (h // 4 + 1, w // 4 + 1, c), dtype=np.uint8)
    a = a.repeat(4, axis=0).repeat(4, axis=1)[:h, :w]
    return a[:, :, 0] if c == 1 else a


def _encode(a: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **kw)
    return buf.getvalue()


def _write_tree(root: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


def _write_zip(path: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for d in dirs:
            zf.writestr(d.rstrip("/") + "/", b"")
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _class_files(prefix: str = "", n: int = 3, classes: tuple[str, ...] = ("cat", "dog"), fmt: str = "PNG",
                 h: int = 12, w: int = 10) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    files, arrays = {}, {}
    ext = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp"}[fmt]
    for ci, c in enumerate(classes):
        for i in range(n):
            a = _img(100 * ci + i, h, w)
            name = f"{prefix}{c}/{i:03d}.{ext}"
            files[name] = _encode(a, fmt)
            arrays[name] = a
    return files, arrays


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_batches(n: int = 4, protocol: int = 2) -> dict[str, bytes]:
    """The official cifar-10-batches-py files with ``n`` images per batch."""
    rng = np.random.default_rng(7)
    out = {}
    for k, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        d = {
            b"batch_label": f"batch {k}".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{k}_{i}.png".encode() for i in range(n)],
        }
        out[name] = pickle.dumps(d, protocol=protocol)
    meta = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_cases_per_batch": n, b"num_vis": 3072}
    out["batches.meta"] = pickle.dumps(meta, protocol=protocol)
    return out


def _write_cifar_dir(root: Path, **kw) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, data in _cifar_batches(**kw).items():
        (folder / name).write_bytes(data)
    return folder


def _write_cifar_tar(path: Path, **kw) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in _cifar_batches(**kw).items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _write_npz(
    path: Path, n_train: int = 30, n_val: int = 10, test: bool = False, hw: int = 8, **drop: bool
) -> Path:
    rng = np.random.default_rng(3)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, hw, hw), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 3).reshape(-1, 1).astype(np.uint8),
        "val_images": rng.integers(0, 256, (n_val, hw, hw), dtype=np.uint8),
        "val_labels": (np.arange(n_val) % 3).reshape(-1, 1).astype(np.uint8),
    }
    if test:
        arrays["test_images"] = rng.integers(0, 256, (5, hw, hw), dtype=np.uint8)
        arrays["test_labels"] = np.arange(5) % 3
    for k in drop:
        arrays.pop(k)
    np.savez(path, **arrays)
    return path


# ----------------------------------------------------------------------------------------------------------
# transforms


@st.composite
def images(draw, min_side: int = 1, max_side: int = 20, channels=(1, 3)):
    h = draw(st.integers(min_side, max_side))
    w = draw(st.integers(min_side, max_side))
    c = draw(st.sampled_from(channels))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=g)


@HSET
@given(x=images(), pad=st.integers(0, 4), data=st.data())
def test_random_crop_is_a_window_of_the_zero_padded_image(x, pad, data):
    c, h, w = x.shape
    th = data.draw(st.integers(1, h + 2 * pad))
    tw = data.draw(st.integers(1, w + 2 * pad))
    y = RandomCrop((th, tw), padding=pad)(x)
    assert y.shape == (c, th, tw) and y.dtype == torch.uint8
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=torch.uint8)
    padded[:, pad : pad + h, pad : pad + w] = x
    windows = [
        (i, j)
        for i in range(h + 2 * pad - th + 1)
        for j in range(w + 2 * pad - tw + 1)
        if torch.equal(padded[:, i : i + th, j : j + tw], y)
    ]
    assert windows


@HSET
@given(x=images(min_side=2), pad=st.integers(1, 4))
def test_random_crop_with_padding_keeps_size_and_moves_content(x, pad):
    c, h, w = x.shape
    torch.manual_seed(0)
    outs = [RandomCrop((h, w), padding=pad)(x) for _ in range(30)]
    assert all(o.shape == x.shape for o in outs)
    # with 30 draws over (2p+1)^2 offsets, some crop is shifted (unless the image is constant)
    if x.unique().numel() > 1:
        assert any(not torch.equal(o, x) for o in outs)


def test_random_crop_generator_is_reproducible_and_rejects_too_big():
    x = torch.arange(3 * 8 * 8, dtype=torch.float32).view(3, 8, 8)
    a = [RandomCrop(8, 2, generator=torch.Generator().manual_seed(5))(x) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="does not fit"):
        RandomCrop(20, padding=1)(x)


@HSET
@given(x=images())
def test_flip_p1_flips_exactly_and_p0_is_identity(x):
    y = RandomHorizontalFlip(p=1.0)(x)
    assert torch.equal(y, x.flip(-1))
    assert torch.equal(y[..., 0], x[..., -1])
    assert torch.equal(RandomHorizontalFlip(p=0.0)(x), x)


def test_flip_probability_is_roughly_p():
    x = torch.arange(4, dtype=torch.float32).view(1, 1, 4)
    g = torch.Generator().manual_seed(0)
    t = RandomHorizontalFlip(0.3, generator=g)
    flips = sum(int(t(x)[0, 0, 0] == 3) for _ in range(2000))
    assert 500 < flips < 700


@HSET
@given(x=images(), th=st.integers(1, 24), tw=st.integers(1, 24))
def test_resize_shape_dtype_and_constant_images(x, th, tw):
    y = Resize((th, tw))(x)
    assert y.shape == (x.shape[0], th, tw) and y.dtype == torch.uint8
    assert torch.equal(Resize(tuple(x.shape[1:]))(x), x)  # same size: untouched
    const = torch.full_like(x, 77)
    assert torch.equal(Resize((th, tw))(const), torch.full((x.shape[0], th, tw), 77, dtype=torch.uint8))
    f = Resize((th, tw))(ToFloat()(x))
    assert f.dtype == torch.float32 and f.min() >= -1e-5 and f.max() <= 1 + 1e-5


def test_resize_downscale_is_antialiased():
    # a 1-pixel checkerboard shrunk 32 -> 10 averages to gray with antialiasing; plain bilinear aliases
    # (interior values off by ~80)
    x = ((torch.arange(32).view(1, 32) + torch.arange(32).view(32, 1)) % 2 * 255).to(torch.uint8)[None]
    y = Resize(10)(x)
    assert (y.float() - 127.5)[:, 1:-1, 1:-1].abs().max() <= 2


@HSET
@given(x=images(), th=st.integers(1, 24), tw=st.integers(1, 24))
def test_center_crop_shape_and_center(x, th, tw):
    y = CenterCrop((th, tw))(x)
    assert y.shape == (x.shape[0], th, tw)
    c, h, w = x.shape
    if th <= h and tw <= w:
        i, j = (h - th) // 2, (w - tw) // 2
        assert torch.equal(y, x[:, i : i + th, j : j + tw])


@HSET
@given(x=images(channels=(1, 3, 4)), n=st.sampled_from([1, 3]))
def test_to_channels(x, n):
    y = ToChannels(n)(x)
    assert y.shape == (n, *x.shape[1:]) and y.dtype == torch.uint8
    c = x.shape[0]
    if c == 1 and n == 3:
        assert all(torch.equal(y[k], x[0]) for k in range(3))
    if c in (3, 4) and n == 1:  # matches Pillow's convert("L") within rounding
        pil = np.asarray(Image.fromarray(x[:3].permute(1, 2, 0).numpy(), "RGB").convert("L"))
        assert np.abs(y[0].numpy().astype(int) - pil.astype(int)).max() <= 1
    if c == n:
        assert torch.equal(y, x)


@HSET
@given(x=images())
def test_to_float_and_normalize_values(x):
    f = ToFloat()(x)
    assert f.dtype == torch.float32
    assert torch.allclose(f * 255, x.float())
    c = x.shape[0]
    mean, std = [0.1 * (k + 1) for k in range(c)], [0.5 + 0.1 * k for k in range(c)]
    y = Normalize(mean, std)(f)
    for k in range(c):
        assert torch.allclose(y[k], (f[k] - mean[k]) / std[k], atol=1e-6)


def test_normalize_rejects_bad_input():
    with pytest.raises(ValueError, match="ToFloat"):
        Normalize([0.5], [0.5])(torch.zeros(1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        Normalize([0.5], [0.5])(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="positive"):
        Normalize([0.5], [0.0])


@HSET
@given(x=images(min_side=4), size=st.integers(4, 20), augment=st.booleans())
def test_train_and_eval_transform_pipelines(x, size, augment):
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.5]
    t = train_transform(size, mean, std, channels=3, augment=augment)
    assert isinstance(t, Compose)
    assert ("RandomCrop" in repr(t)) == augment and ("RandomHorizontalFlip" in repr(t)) == augment
    y = t(x)
    assert y.shape == (3, size, size) and y.dtype == torch.float32
    # the documented pipeline, step by step: channels -> resize -> [0, 1] -> (v - mean) / std per channel
    pixels = Resize(size)(ToChannels(3)(x)).double() / 255
    expect = (pixels - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(std)[:, None, None]
    e = eval_transform(size, mean, std, channels=3)
    assert torch.allclose(e(x).double(), expect, atol=1e-5)
    if not augment:  # without augmentation the train pipeline is the eval pipeline
        assert torch.equal(y, e(x))
    else:  # un-normalised, the output is a window of the zero-padded image, mirrored or not
        m, sd = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
        back = ((y * sd + m) * 255).round().to(torch.uint8)
        pad = default_padding(size)
        padded = torch.zeros(3, size + 2 * pad, size + 2 * pad, dtype=torch.uint8)
        padded[:, pad:pad + size, pad:pad + size] = Resize(size)(ToChannels(3)(x))
        windows = [padded[:, i:i + size, j:j + size] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
        assert any(torch.equal(w, back) or torch.equal(w.flip(-1), back) for w in windows)


@HSET
@given(x=images(), size=st.integers(1, 20))
def test_eval_transform_of_a_square_image_is_plain_normalisation(x, size):
    c = x.shape[0]
    sq = Resize(size)(x)  # any square uint8 image of that size
    mean, std = [0.1 * (k + 2) for k in range(c)], [0.2 + 0.05 * k for k in range(c)]
    out = eval_transform(size, mean, std)(sq)
    for k in range(c):  # no resampling, no augmentation: exactly (v / 255 - mean) / std
        assert torch.allclose(out[k], (sq[k].float() / 255 - mean[k]) / std[k], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# arrays, split, digits


@HSET
@given(n=st.integers(1, 5), h=st.integers(2, 9), w=st.integers(2, 9), c=st.sampled_from([1, 3]))
def test_array_dataset_layouts_agree(n, h, w, c):
    rng = np.random.default_rng(n * 100 + h * 10 + w)
    nhwc = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    labels = np.arange(n).reshape(-1, 1)
    a = D.ArrayDataset(nhwc, labels, layout="NHWC")
    b = D.ArrayDataset(torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous(), labels, layout="NCHW")
    assert a.num_channels == c and a.image_size == (h, w) and len(a) == n
    for i in range(n):
        xa, ya = a[i]
        xb, yb = b[i]
        assert xa.shape == (c, h, w) and xa.dtype == torch.float32 and ya == yb == i
        assert torch.equal(xa, xb)
        assert torch.equal((xa * 255).round().to(torch.uint8), torch.from_numpy(nhwc[i]).permute(2, 0, 1))
    if c == 1:
        g = D.ArrayDataset(nhwc[..., 0], labels)
        assert torch.equal(g[0][0], a[0][0])


def test_array_dataset_guesses_layout_and_converts():
    x = np.zeros((4, 3, 32, 32), np.uint8)
    assert D.ArrayDataset(x, [0, 1, 0, 1]).image_size == (32, 32)
    x = np.zeros((4, 32, 32, 3), np.uint8)
    ds = D.ArrayDataset(x, [0, 1, 0, 1], channels=1, image_size=16)
    assert ds[0][0].shape == (1, 16, 16) and ds.num_channels == 1 and ds.image_size == (16, 16)
    assert ds.raw_batch([0, 2]).shape == (2, 1, 16, 16)


def test_array_dataset_errors():
    with pytest.raises(DataError, match="3 images but 2 labels"):
        D.ArrayDataset(np.zeros((3, 4, 4), np.uint8), [0, 1], source="mine")
    with pytest.raises(DataError, match="uint8"):
        D.ArrayDataset(np.zeros((3, 4, 4), np.float32), [0, 1, 2])
    with pytest.raises(DataError, match="multi-label"):
        D.ArrayDataset(np.zeros((3, 4, 4), np.uint8), np.zeros((3, 2), int))
    with pytest.raises(DataError, match="channel axis"):
        D.ArrayDataset(np.zeros((3, 5, 6, 7), np.uint8), [0, 1, 2])


def _documented_val_count(n: int, fraction: float) -> int:
    """``split_indices``' rule: ``round(n * fraction)`` (halves round up), kept in ``[1, n - 1]`` for a class of
    two or more items when ``fraction > 0``."""
    k = int(np.floor(n * fraction + 0.5))
    return min(max(k, 1), n - 1) if fraction > 0 and n >= 2 else k


def _check_split(targets: list[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The properties every split has: sorted int64 parts that are disjoint and cover all items, and from each
    class exactly the documented number of items in ``val``."""
    tr, va = D.split_indices(targets, fraction, seed=seed)
    assert tr.dtype == va.dtype == np.int64
    assert np.array_equal(tr, np.sort(tr)) and np.array_equal(va, np.sort(va))
    assert not set(tr.tolist()) & set(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(targets)))
    t = np.asarray(targets)
    for c in np.unique(t):
        n_c = int((t == c).sum())
        assert int((t[va] == c).sum()) == _documented_val_count(n_c, fraction), (c, n_c, fraction)
    return tr, va


def test_split_is_deterministic_and_stratified_by_the_documented_counts():
    targets = [0] * 10 + [1] * 6 + [2] * 4
    tr, va = _check_split(targets, 0.25, seed=0)
    # 10 x 0.25 = 2.5 and 6 x 0.25 = 1.5 round up: 3 + 2 + 1 validation items
    assert np.bincount(np.asarray(targets)[va]).tolist() == [3, 2, 1]
    tr2, va2 = D.split_indices(targets, 0.25, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    others = [_check_split(targets, 0.25, seed=s)[1] for s in range(1, 40)]
    assert any(not np.array_equal(v, va) for v in others)  # another seed, another draw
    # a random draw within each class, not a fixed pick: over the seeds every item lands in val at least once
    assert set(np.concatenate([va, *others]).tolist()) == set(range(20))
    tr0, va0 = D.split_indices(targets, 0.0, seed=0)
    assert tr0.tolist() == list(range(20)) and va0.size == 0

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 1000)
    ds = D.ArrayDataset(np.zeros((1000, 2, 2), np.uint8), y)
    train, val = D.split(ds, 0.2, seed=3)
    assert len(train) + len(val) == 1000 and not set(train.indices) & set(val.indices)
    for c in range(5):
        n_c = int((y == c).sum())
        assert abs(val.targets.count(c) - 0.2 * n_c) <= 1
    assert train.classes == ds.classes and val.num_channels == 1 and val.image_size == (2, 2)
    # every class with >= 2 items keeps one in each part
    tr, va = D.split_indices([0, 0, 1, 1, 1], 0.01, seed=0)
    assert sorted(np.asarray([0, 0, 1, 1, 1])[va].tolist()) == [0, 1] and len(tr) == 3


@HSET
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=5), fraction=st.floats(0.0, 0.95),
       seed=st.integers(0, 2**32 - 1), order=st.randoms(use_true_random=False))
def test_split_counts_follow_the_documented_rule(counts, fraction, seed, order):
    targets = [c for c, n in enumerate(counts) for _ in range(n)]
    order.shuffle(targets)  # classes interleaved, not in blocks
    _check_split(targets, fraction, seed)


def test_digits_are_the_real_sklearn_digits_upsampled():
    from sklearn.datasets import load_digits

    ds = D.load_digits()
    sk = load_digits()
    assert len(ds) == 1797 and ds.classes == [str(k) for k in range(10)]
    assert ds.num_channels == 1 and ds.image_size == (16, 16)
    assert ds.targets == sk.target.tolist()
    raw = ds.raw(5)[0]
    assert raw.dtype == torch.uint8 and int(ds.data.max()) == 255
    # nearest-neighbour 2x: each source pixel is a 2x2 block equal to round(v * 255 / 16)
    expect = np.rint(sk.images[5] * 255 / 16).astype(np.uint8)
    assert np.array_equal(raw[0::2, 0::2].numpy(), expect)
    assert torch.equal(raw[0::2, 0::2], raw[1::2, 1::2])


def test_build_digits_default():
    b = D.build("digits", progress=False)
    assert b.num_classes == 10 and b.in_channels == 1 and b.image_size == 16 and b.format == "digits"
    assert len(b.train) + len(b.val) == 1797 and b.test is None and b.val_from == "split"
    x, y = b.train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    assert "RandomHorizontalFlip" not in repr(b.train.transform)  # digits are not mirror-symmetric
    xs = torch.stack([b.val[i][0] for i in range(len(b.val))])
    assert abs(xs.mean().item()) < 0.2 and abs(xs.std().item() - 1) < 0.2  # normalized with train stats
    b2 = D.build("digits", seed=0, progress=False)
    assert b.val.indices == b2.val.indices and b.mean == b2.mean
    b3 = D.build("digits", image_size=32, channels=3, augment=False, progress=False)
    assert b3.train[0][0].shape == (3, 32, 32) and b3.input_shape == (3, 32, 32)


def test_loaders_are_seeded():
    b = D.build("digits", augment=False, progress=False)
    first = [next(iter(D.loaders(b, batch_size=64, seed=1)[0])) for _ in range(2)]
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][1], first[1][1])
    other = next(iter(D.loaders(b, batch_size=64, seed=2)[0]))
    assert not torch.equal(first[0][1], other[1])
    train, val = D.loaders(b, batch_size=len(b.train) - 1)  # remainder 1 -> dropped (BatchNorm)
    assert len(train) == 1 and val is not None and len(val.dataset) == len(b.val)


def _epochs(loader, n: int = 2, seed: int = 5) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``n`` passes over ``loader``; the global RNG (augmentation) is reseeded first."""
    torch.manual_seed(seed)
    return [list(loader) for _ in range(n)]


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        len(ea) == len(eb) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                   for (xa, ya), (xb, yb) in zip(ea, eb, strict=True))
        for ea, eb in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def digits():
    return D.build("digits", progress=False)  # augmenting train transform


def test_distributed_loaders_in_one_process_are_the_plain_loaders(digits, tmp_path):
    import torch.distributed as tdist

    from ltc.utils import world_size

    def passes(distributed: bool, seed: int = 3, n: int = 2):  # fresh loaders: their generators are stateful
        train, val = D.loaders(digits, batch_size=100, seed=seed, eval_batch_size=128, distributed=distributed)
        return _epochs(train, n), _epochs(val, n)

    plain = passes(False)
    assert _same_batches(plain[0], passes(True)[0]) and _same_batches(plain[1], passes(True)[1])
    # the same under a torch.distributed group of one process
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert world_size() == 1
        grouped = passes(True)
    finally:
        tdist.destroy_process_group()
    assert _same_batches(plain[0], grouped[0]) and _same_batches(plain[1], grouped[1])
    # the comparison can fail: another seed shuffles otherwise, and the second epoch differs from the first
    assert not _same_batches(plain[0], passes(True, seed=4)[0])
    assert not _same_batches(plain[0][:1], plain[0][1:])


@HSET
@given(n=st.integers(0, 60), world=st.integers(1, 9))
def test_shard_sampler_partitions_the_indices(n, world):
    shards = [list(D.ShardSampler(n, r, world)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n)) and len(flat) == n  # every index once, none twice
    assert all(s == sorted(s) for s in shards)  # in order (evaluation of the same images on every run)
    assert [len(D.ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    assert all(i % world == r for r, s in enumerate(shards) for i in s)


def test_calibration_loader_is_a_fixed_unaugmented_sample_of_train(digits):
    loader = D.calibration_loader(digits, images=300, seed=7, batch_size=64)
    torch.manual_seed(0)
    first = list(loader)
    torch.manual_seed(1)  # another global RNG state: augmentation would change the images
    second = list(loader)
    assert _same_batches([first], [second])
    x = torch.cat([b[0] for b in first])
    y = torch.cat([b[1] for b in first])
    assert x.shape == (300, 1, 16, 16) and [len(b[0]) for b in first] == [64, 64, 64, 64, 44]
    # the images are training images (never validation ones), each once
    base = digits.train.dataset
    idx = loader.dataset.indices
    assert len(set(idx)) == 300 and set(idx) <= set(digits.train.indices) and not set(idx) & set(digits.val.indices)
    # the eval transform: plain normalisation of the stored pixels, computed here independently
    raw = torch.stack([base.raw(i) for i in idx]).double() / 255
    expect = (raw - digits.mean[0]) / digits.std[0]
    assert torch.allclose(x.double(), expect, atol=1e-5)
    assert y.tolist() == [base.targets[i] for i in idx]
    # the train loader augments the same images differently on every pass; the calibration data does not
    train_x = [digits.train[digits.train.indices.index(idx[0])][0] for _ in range(8)]
    assert any(not torch.equal(t, x[0]) for t in train_x)
    # seeded: the same sample again, another seed another sample; never more images than there are
    again = D.calibration_loader(digits, images=300, seed=7, batch_size=100)
    assert again.dataset.indices == idx
    assert D.calibration_loader(digits, images=300, seed=8).dataset.indices != idx
    assert len(D.calibration_loader(digits, images=10**6).dataset) == len(digits.train)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 batches


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_folder_round_trip(tmp_path, protocol):
    folder = _write_cifar_dir(tmp_path, n=4, protocol=protocol)
    raw = {k: pickle.loads(v, encoding="bytes") for k, v in _cifar_batches(n=4, protocol=protocol).items()}
    for path in (folder, tmp_path):  # the folder itself or its parent
        train = D.load_cifar10(path, "train")
        assert len(train) == 20 and train.classes == CIFAR_CLASSES
        assert train.num_channels == 3 and train.image_size == (32, 32)
        want = raw["data_batch_2"][b"data"][1].reshape(3, 32, 32)
        assert np.array_equal(train.raw(5).numpy(), want)
        assert train.targets[5] == raw["data_batch_2"][b"labels"][1]
    test = D.load_cifar10(folder, "test")
    assert len(test) == 4 and test.targets == raw["test_batch"][b"labels"]


def test_cifar_tar_gz_and_build(tmp_path):
    tar = _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", n=6)
    ds = D.load_cifar10(tar, "train")
    assert len(ds) == 30 and ds.classes == CIFAR_CLASSES
    assert not (tmp_path / "cifar-10-batches-py").exists()  # nothing extracted
    b = D.build(str(tar), val_fraction=0.2, progress=False)
    assert b.format == "cifar" and b.test is not None and len(b.test) == 6 and b.in_channels == 3
    assert len(b.train) + len(b.val) == 30
    assert b.train[0][0].shape == (3, 32, 32)
    t = D.load_split(tar, "test", like=b)
    assert len(t) == 6 and torch.equal(t[0][0], b.test[0][0])


def test_cifar_missing_batches_and_bad_pickle(tmp_path):
    folder = _write_cifar_dir(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3") as e:
        D.load_cifar10(folder, "train")
    assert str(folder) in str(e.value)
    assert len(D.load_cifar10(folder, "test")) == 4  # the test split does not need it
    evil = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [print]})
    (folder / "test_batch").write_bytes(evil)
    with pytest.raises(DataError, match="test_batch"):
        D.load_cifar10(folder, "test")
    bad_tar = tmp_path / "x.tar.gz"
    with tarfile.open(bad_tar, "w:gz") as t:
        info = tarfile.TarInfo("readme.txt")
        t.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="missing batches.meta"):
        D.load_cifar10(bad_tar)


# ----------------------------------------------------------------------------------------------------------
# image folders


def test_image_folder_dir_png_round_trip_and_jpeg(tmp_path):
    files, arrays = _class_files(n=3, fmt="PNG")
    jfiles, jarrays = _class_files(n=2, classes=("cat", "dog"), fmt="JPEG")
    bfiles, barrays = _class_files(n=1, classes=("cat", "dog"), fmt="BMP")
    arrays.update(barrays)
    _write_tree(tmp_path / "root", {**files, **jfiles, **bfiles, "notes.txt": b"x", "cat/.DS_Store": b"junk"})
    ds = D.ImageFolder(tmp_path / "root", progress=False)
    assert ds.classes == ["cat", "dog"] and len(ds) == 12
    assert ds.targets == [0] * 6 + [1] * 6 and ds.num_channels == 3 and ds.image_size == (12, 10)
    for i, (rel, label) in enumerate(ds.samples):
        x, y = ds[i]
        assert x.shape == (3, 12, 10) and x.dtype == torch.float32 and y == label
        got = ds.raw(i).permute(1, 2, 0).numpy()
        if rel.endswith((".png", ".bmp")):
            assert np.array_equal(got, arrays[rel])  # lossless
        else:
            err = np.abs(got.astype(int) - jarrays[rel].astype(int)).mean()
            other = np.abs(got.astype(int) - _img(12345).astype(int)).mean()
            assert err < 25 < other  # lossy, but clearly this image
    mem = D.ImageFolder(tmp_path / "root", in_memory=True, progress=False)
    assert mem.data is not None and mem.data.shape == (12, 3, 12, 10)
    assert all(torch.equal(mem[i][0], ds[i][0]) for i in range(len(ds)))


def test_image_folder_channels_and_resize(tmp_path):
    gray = {f"{c}/{i}.png": _encode(_img(i, 6, 6, 1), "PNG") for c in ("a", "b") for i in range(2)}
    _write_tree(tmp_path / "g", gray)
    ds = D.ImageFolder(tmp_path / "g")
    assert ds.num_channels == 1 and ds[0][0].shape == (1, 6, 6)
    rgb = D.ImageFolder(tmp_path / "g", channels=3)
    x = rgb.raw(0)
    assert x.shape == (3, 6, 6) and torch.equal(x[0], x[2]) and torch.equal(x[0], ds.raw(0)[0])
    big = D.ImageFolder(tmp_path / "g", image_size=(4, 5), in_memory=True, progress=False)
    assert big.data.shape == (4, 1, 4, 5) and big.image_size == (4, 5)
    # 16-bit PNGs are scaled, not clipped
    a16 = np.full((4, 4), 65535, np.uint16)
    a16[0, 0] = 257 * 10
    _write_tree(tmp_path / "d16", {"x/a.png": _encode(a16, "PNG"), "y/b.png": _encode(a16, "PNG")})
    r = D.ImageFolder(tmp_path / "d16").raw(0)
    assert r.shape == (1, 4, 4) and int(r[0, 1, 1]) == 255 and int(r[0, 0, 0]) == 10


def test_large_jpeg_is_resized_on_decode(tmp_path):
    a = np.zeros((300, 200, 3), np.uint8)
    a[:, 100:] = 255
    _write_tree(tmp_path / "r", {"x/1.jpg": _encode(a, "JPEG"), "y/1.jpg": _encode(a, "JPEG")})
    ds = D.ImageFolder(tmp_path / "r", image_size=16)
    x = ds.raw(0)
    assert x.shape == (3, 16, 16)
    assert x[:, :, :6].float().mean() < 30 and x[:, :, 10:].float().mean() > 225  # left dark, right bright


def test_image_folder_zip_with_prefix(tmp_path):
    files, arrays = _class_files(prefix="train/", n=3, classes=("b", "a", "c"))
    z = _write_zip(tmp_path / "set.zip", {**files, "__MACOSX/train/a/._000.png": b"junk"}, dirs=("train/",))
    ds = D.ImageFolder(z)
    assert ds.classes == ["a", "b", "c"] and len(ds) == 9 and ds.prefix == "train"
    rel, label = ds.samples[4]
    assert rel == "train/b/001.png" and label == 1
    assert np.array_equal(ds.raw(4).permute(1, 2, 0).numpy(), arrays[rel])
    b = D.build(str(z), val_fraction=0.34, image_size=8, progress=False)
    assert b.format == "folder" and b.val_from == "split" and len(b.val) == 3 and b.test is None
    assert set(b.val.targets) == {0, 1, 2}  # stratified
    with pytest.raises(DataError, match="no 'test' split"):
        D.load_split(z, "test")  # a zip holding only train/ is a named split, not a test set


def _chest_tree() -> dict[str, bytes]:
    files = {}
    for s, n in (("train", 4), ("val", 2), ("test", 3)):
        f, _ = _class_files(prefix=f"chest_xray/{s}/", n=n, classes=("NORMAL", "PNEUMONIA"), fmt="JPEG", h=20,
                            w=24)
        files.update(f)
    f, _ = _class_files(prefix="chest_xray/chest_xray/train/", n=1, classes=("NORMAL", "PNEUMONIA"))
    files.update(f)  # the duplicate nested copy found in the Kaggle zip
    files["__MACOSX/chest_xray/._train"] = b"junk"
    return files


@pytest.mark.parametrize("as_zip", [False, True])
def test_chest_xray_split_tree(tmp_path, as_zip):
    files = _chest_tree()
    src = _write_zip(tmp_path / "cx.zip", files) if as_zip else _write_tree(tmp_path / "cx", files)
    tr = D.ImageFolder(src, subdir="train")
    assert tr.prefix == "chest_xray/train" and tr.classes == ["NORMAL", "PNEUMONIA"] and len(tr) == 8
    assert len(D.ImageFolder(src, subdir="chest_xray/test")) == 6
    with pytest.raises(DataError, match="subdir='test'"):
        D.ImageFolder(src)
    with pytest.raises(DataError, match="no folder 'nope'"):
        D.ImageFolder(src, subdir="nope")
    b = D.build(str(src), image_size=16, progress=False)
    assert b.val_from == "file" and len(b.train) == 8 and len(b.val) == 4 and len(b.test) == 6
    assert b.in_channels == 3 and b.image_size == 16 and b.train[0][0].shape == (3, 16, 16)
    t = D.load_split(src, "test", like=b)
    assert len(t) == 6 and t[0][0].shape == (3, 16, 16)
    # a held-out folder lacking a class keeps the training label order
    held = {k.split("chest_xray/test/")[1]: v for k, v in files.items() if "chest_xray/test/PNEUMONIA" in k}
    ho = D.load_split(_write_tree(tmp_path / "held", held), "test", like=b)
    assert len(ho) == 3 and ho.targets == [1, 1, 1] and ho.classes == ["NORMAL", "PNEUMONIA"]


def test_partial_split_trees(tmp_path):
    # a held-out zip holding only test/<class>/ is a test split; a tree of val/ and test/ has no train
    files, _ = _class_files(prefix="test/", n=2, classes=("NORMAL", "PNEUMONIA"), h=8, w=8)
    z = _write_zip(tmp_path / "held.zip", files)
    assert D.find_splits(z) == {"test": "test"}
    t = D.load_split(z, "test", mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    assert len(t) == 4 and t.classes == ["NORMAL", "PNEUMONIA"]
    with pytest.raises(DataError, match="no train split"):
        D.build(str(z), progress=False)
    vt = {**_class_files(prefix="d/val/", n=1, h=8, w=8)[0]}
    vt.update(_class_files(prefix="d/test/", n=2, h=8, w=8)[0])
    root = _write_tree(tmp_path / "vt", vt)
    assert D.find_splits(root) == {"val": "d/val", "test": "d/test"}
    with pytest.raises(DataError, match="pass mean and std"):
        D.load_split(root, "test")
    assert len(D.load_split(root, "val", mean=[0, 0, 0], std=[1, 1, 1])) == 2


def test_dataloader_workers_over_zip(tmp_path):
    files, _ = _class_files(prefix="train/", n=6, classes=("x", "y", "z"), fmt="JPEG")
    ds = D.ImageFolder(_write_zip(tmp_path / "w.zip", files))
    assert ds.data is None
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False, worker_init_fn=D.seed_worker)
    xs, ys = zip(*loader, strict=True)
    assert torch.cat(ys).tolist() == ds.targets
    assert torch.equal(torch.cat(xs), torch.stack([ds[i][0] for i in range(len(ds))]))
    b = D.build(str(tmp_path / "w.zip"), in_memory=False, image_size=12, progress=False)
    train, _ = D.loaders(b, batch_size=5, workers=2)
    assert sum(len(y) for _, y in train) == len(b.train)


# ----------------------------------------------------------------------------------------------------------
# bad image folders


def test_truncated_jpeg_is_named(tmp_path):
    files, _ = _class_files(n=2, fmt="JPEG")
    files["dog/001.jpg"] = files["dog/001.jpg"][:-40]
    root = _write_tree(tmp_path / "t", files)
    ds = D.ImageFolder(root)  # lazy: the first image is fine
    bad = [i for i, (rel, _) in enumerate(ds.samples) if rel == "dog/001.jpg"][0]
    with pytest.raises(DataError, match="truncated") as e:
        ds[bad]
    assert "dog/001.jpg" in str(e.value)
    with pytest.raises(DataError, match="dog/001.jpg"):
        D.ImageFolder(root, in_memory=True, progress=False)


def test_garbage_jpg_in_zip_is_named(tmp_path):
    files, _ = _class_files(prefix="data/", n=2, fmt="JPEG")
    files["data/cat/001.jpg"] = b"this is not an image at all" * 3
    z = _write_zip(tmp_path / "g.zip", files)
    with pytest.raises(DataError, match="corrupt") as e:
        D.ImageFolder(z, in_memory=True, progress=False)
    assert "'data/cat/001.jpg' in" in str(e.value) and "g.zip" in str(e.value)


def test_empty_class_folder_is_named(tmp_path):
    files, _ = _class_files(n=2)
    root = _write_tree(tmp_path / "e", files, dirs=("bird",))
    with pytest.raises(DataError, match="empty") as e:
        D.ImageFolder(root)
    assert str(root / "bird") in str(e.value)
    z = _write_zip(tmp_path / "e.zip", {f"p/{k}": v for k, v in files.items()}, dirs=("p/fish/",))
    with pytest.raises(DataError, match="'p/fish/'"):
        D.build(str(z), progress=False)


def test_no_class_folders_and_mixed_sizes(tmp_path):
    pngs = {"a.png": _encode(_img(0), "PNG"), "b.png": _encode(_img(1), "PNG")}
    flat = _write_tree(tmp_path / "flat", pngs)
    with pytest.raises(DataError, match="no class folders"):
        D.ImageFolder(flat)
    empty = tmp_path / "nothing"
    (empty / "x").mkdir(parents=True)
    (empty / "y").mkdir()
    (empty / "x" / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="no class folders"):
        D.build(str(empty), progress=False)
    mixed = _write_tree(tmp_path / "mixed", {"a/1.png": _encode(_img(0, 8, 8), "PNG"),
                                             "b/1.png": _encode(_img(1, 9, 8), "PNG")})
    with pytest.raises(DataError, match="image_size") as e:
        D.ImageFolder(mixed, in_memory=True, progress=False)
    assert "b/1.png" in str(e.value)
    assert D.ImageFolder(mixed, image_size=8, in_memory=True, progress=False).data.shape == (2, 3, 8, 8)
    nonsquare = _write_tree(tmp_path / "ns", {"a/1.png": _encode(_img(0, 8, 6), "PNG"),
                                              "b/1.png": _encode(_img(1, 8, 6), "PNG")})
    with pytest.raises(DataError, match="not square"):
        D.build(str(nonsquare), progress=False)


def test_wrong_paths_list_accepted_formats(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        D.build(str(tmp_path / "missing.zip"))
    msg = str(e.value)
    assert "missing.zip" in msg and "cifar-10-python.tar.gz" in msg and ".npz" in msg and ".zip" in msg
    odd = tmp_path / "data.csv"
    odd.write_text("1,2,3")
    with pytest.raises(DataError, match="unrecognized") as e:
        D.build(str(odd))
    assert "data.csv" in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        D.ImageFolder(tmp_path / "nope")
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------------------------------------
# npz


def test_npz_load_and_build(tmp_path):
    p = _write_npz(tmp_path / "m.npz", test=True)
    splits = D.load_npz(p)
    assert set(splits) == {"train", "val", "test"}
    assert len(splits["train"]) == 30 and splits["train"].classes == ["0", "1", "2"]
    assert splits["train"].targets[:4] == [0, 1, 2, 0]  # (N, 1) labels flattened
    b = D.build(str(p), image_size=16, channels=3, progress=False)
    assert b.val_from == "file" and len(b.val) == 10 and len(b.test) == 5 and b.num_classes == 3
    assert b.train[0][0].shape == (3, 16, 16)
    v = D.load_split(p, "val")
    assert len(v) == 10 and v[0][0].shape == (1, 8, 8)
    with pytest.raises(DataError, match="classes"):
        D.load_split(p, "test", classes=["a", "b", "c"])


def test_npz_errors_list_keys(tmp_path):
    p = _write_npz(tmp_path / "no_val_labels.npz", val_labels=True)
    with pytest.raises(DataError, match="val_labels") as e:
        D.load_npz(p)
    assert "keys found: ['train_images', 'train_labels', 'val_images']" in str(e.value)
    assert "no_val_labels.npz" in str(e.value)
    p = tmp_path / "other.npz"
    np.savez(p, x=np.zeros(3), y=np.zeros(3))
    with pytest.raises(DataError, match=r"keys found: \['x', 'y'\]"):
        D.build(str(p))
    p = tmp_path / "mismatch.npz"
    np.savez(p, train_images=np.zeros((5, 4, 4), np.uint8), train_labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="5 images but 4 labels") as e:
        D.load_npz(p)
    assert "mismatch.npz" in str(e.value)
    p = tmp_path / "trainonly.npz"
    np.savez(p, train_images=np.zeros((20, 4, 4), np.uint8), train_labels=np.arange(20) % 2)
    b = D.build(str(p), progress=False)
    assert b.val_from == "split" and len(b.val) == 2
    with pytest.raises(DataError, match="no 'test' split"):
        D.load_split(p, "test")


# ----------------------------------------------------------------------------------------------------------
# real shared data (skipped when ../shared/data is absent)


def _shared(name: str) -> Path:
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"real data {p} not present")
    return p


def test_real_pneumoniamnist_bundle():
    b = D.build(str(_shared("pneumoniamnist-trainval.npz")), progress=False)
    assert (len(b.train), len(b.val), b.test) == (4708, 524, None)
    assert b.classes == ["0", "1"] and b.in_channels == 1 and b.image_size == 28
    assert b.train.targets.count(0) == 1214 and b.train.targets.count(1) == 3494
    assert b.val.targets.count(0) == 135
    x, y = b.val[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y in (0, 1)
    assert 0.3 < b.mean[0] < 0.8 and 0.05 < b.std[0] < 0.4


def test_real_cifar_zip_lazy():
    z = _shared("cifar10-jpeg-train.zip")
    ds = D.ImageFolder(z)
    assert len(ds) == 50_000 and ds.classes == CIFAR_CLASSES and ds.prefix == "train"
    assert ds.targets.count(3) == 5000
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0 and 0 < x.mean() < 1
    assert ds.samples[0][0] == "train/airplane/0000.jpg"


@pytest.mark.slow
def test_real_cifar_zip_in_memory_decode_holds_the_lazy_readers_images():
    z = _shared("cifar10-jpeg-train.zip")
    ds = D.ImageFolder(z, in_memory=True, progress=False)
    assert ds.data.shape == (50_000, 3, 32, 32) and ds.data.dtype == torch.uint8
    mean, _ = D.channel_stats(ds)
    assert np.allclose(mean, [0.4913, 0.4821, 0.4465], atol=0.01)  # README's channel means
    lazy = D.ImageFolder(z)
    assert ds.targets == lazy.targets and ds.classes == lazy.classes
    for i in (0, 12345, 49_999):
        assert torch.equal(ds.raw(i), lazy.raw(i)), i
