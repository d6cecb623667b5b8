"""Image transforms as plain torch ops (no torchvision).

Every transform takes and returns a ``(C, H, W)`` tensor (most also accept extra leading batch
dimensions ``(..., C, H, W)``; random ones then draw once for the whole batch). Pixel-level transforms
(:class:`RandomCrop`, :class:`RandomHorizontalFlip`, :class:`CenterCrop`, :class:`Resize`,
:class:`ToChannels`) work on ``uint8`` as well as floating tensors and keep the dtype, so augmentation can
run on the compact ``uint8`` image before :class:`ToFloat` and :class:`Normalize`.

Random transforms draw from torch's global RNG unless given a ``torch.Generator``; the global RNG is what
``DataLoader`` seeds differently in each worker process, so workers do not repeat each other's crops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "CenterCrop",
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "ToChannels",
    "ToFloat",
    "Transform",
    "eval_transform",
    "pair",
    "train_transform",
]

Transform = Callable[[torch.Tensor], torch.Tensor]
"""Anything mapping a ``(C, H, W)`` tensor to a ``(C, H, W)`` tensor."""

# ITU-R 601-2 luma weights, the same ones Pillow uses for ``convert("L")``.
LUMA = (0.299, 0.587, 0.114)


def pair(size: int | Sequence[int]) -> tuple[int, int]:
    """Return ``size`` as ``(height, width)``; an int means a square."""
    if isinstance(size, int):
        h = w = size
    else:
        if len(size) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
        h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def _check_image(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} expects a (C, H, W) tensor, got {shape}")


def _from_float_like(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a float result back to ``dtype`` (rounding and clamping for integer types)."""
    if dtype.is_floating_point:
        return y.to(dtype)
    info = torch.iinfo(dtype)
    return y.round().clamp_(info.min, info.max).to(dtype)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class ToFloat:
    """``uint8`` in ``[0, 255]`` -> ``float32`` in ``[0, 1]``; floating input is only cast to ``float32``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(255.0)
        if x.dtype.is_floating_point:
            return x.to(torch.float32)
        raise ValueError(f"ToFloat expects uint8 or floating input, got {x.dtype}")

    def __repr__(self) -> str:
        return "ToFloat()"


class Normalize:
    """``(x - mean[c]) / std[c]`` per channel, for floating ``(..., C, H, W)`` input."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std need the same non-zero length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "Normalize")
        if not x.dtype.is_floating_point:
            raise ValueError(f"Normalize expects a floating tensor (apply ToFloat first), got {x.dtype}")
        if x.shape[-3] != self.mean.shape[0]:
            raise ValueError(f"Normalize has {self.mean.shape[0]} channels but the image has {x.shape[-3]}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class RandomCrop:
    """Zero-pad each side by ``padding`` pixels, then crop a random ``size`` window.

    Args:
        size: output ``(height, width)`` or an int for a square.
        padding: pixels of zeros added on every side before cropping.
        generator: optional ``torch.Generator``; default is torch's global RNG.
    """

    def __init__(
        self, size: int | Sequence[int], padding: int = 0, generator: torch.Generator | None = None
    ) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.size = pair(size)
        self.padding = int(padding)
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "RandomCrop")
        p = self.padding
        if p:
            x = F.pad(x, (p, p, p, p), mode="constant", value=0)
        th, tw = self.size
        h, w = x.shape[-2:]
        if h < th or w < tw:
            raise ValueError(f"RandomCrop of {th}x{tw} does not fit a padded image of {h}x{w}")
        i = int(torch.randint(0, h - th + 1, (1,), generator=self.generator))
        j = int(torch.randint(0, w - tw + 1, (1,), generator=self.generator))
        return x[..., i : i + th, j : j + tw]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror the width axis with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "RandomHorizontalFlip")
        if float(torch.rand((), generator=self.generator)) < self.p:
            return x.flip(-1)
        return x

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize to exactly ``size`` (an int means a square, *not* the shorter side) with antialiased bilinear
    interpolation (``F.interpolate(..., mode="bilinear", antialias=True)``). Integer input is rounded back
    to its dtype. A no-op when the image already has that size."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = pair(size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "Resize")
        if tuple(x.shape[-2:]) == self.size:
            return x
        lead = x.shape[:-3]
        y = x.reshape(-1, *x.shape[-3:]).to(torch.float32)
        y = F.interpolate(y, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return _from_float_like(y, x.dtype).reshape(*lead, x.shape[-3], *self.size)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class CenterCrop:
    """Crop the central ``size`` window; sides smaller than ``size`` are zero-padded first."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = pair(size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "CenterCrop")
        th, tw = self.size
        h, w = x.shape[-2:]
        if h < th or w < tw:
            ph, pw = max(th - h, 0), max(tw - w, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="constant", value=0)
            h, w = x.shape[-2:]
        i, j = (h - th) // 2, (w - tw) // 2
        return x[..., i : i + th, j : j + tw]

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


class ToChannels:
    """Convert the channel count to ``n``: 1 -> 3 repeats the gray plane; 3 -> 1 takes ITU-R 601-2 luma
    (0.299 R + 0.587 G + 0.114 B, like Pillow); 4 (RGBA) -> 3 drops alpha; same count is a no-op."""

    def __init__(self, n: int) -> None:
        if n not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {n}")
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "ToChannels")
        c = x.shape[-3]
        if c == 4:
            x, c = x[..., :3, :, :], 3
        if c == self.n:
            return x
        if c == 1 and self.n == 3:
            return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
        if c == 3 and self.n == 1:
            w = torch.tensor(LUMA, dtype=torch.float32).view(3, 1, 1)
            y = (x.to(torch.float32) * w).sum(dim=-3, keepdim=True)
            return _from_float_like(y, x.dtype)
        raise ValueError(f"cannot convert {c} channels to {self.n}")

    def __repr__(self) -> str:
        return f"ToChannels({self.n})"


def default_padding(image_size: int | Sequence[int]) -> int:
    """Crop padding used by :func:`train_transform`: 1/8 of the smaller side (4 px at 32, 2 px at 16)."""
    return max(1, round(min(pair(image_size)) / 8))


def train_transform(
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    channels: int | None = None,
    augment: bool = True,
    *,
    hflip: bool = True,
    padding: int | None = None,
) -> Compose:
    """Training pipeline for ``uint8`` CHW input -> normalized ``float32`` CHW.

    ``ToChannels(channels)`` (if given) -> ``Resize(image_size)`` -> [augment: ``RandomCrop(image_size,
    padding)`` with ``padding`` defaulting to :func:`default_padding`, then ``RandomHorizontalFlip`` unless
    ``hflip=False``] -> ``ToFloat`` -> ``Normalize(mean, std)``.
    """
    ops: list[Transform] = []
    if channels is not None:
        ops.append(ToChannels(channels))
    ops.append(Resize(image_size))
    if augment:
        pad = default_padding(image_size) if padding is None else padding
        ops.append(RandomCrop(image_size, padding=pad))
        if hflip:
            ops.append(RandomHorizontalFlip())
    ops += [ToFloat(), Normalize(mean, std)]
    return Compose(ops)


def eval_transform(
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    channels: int | None = None,
) -> Compose:
    """Deterministic pipeline: ``ToChannels`` (if given) -> ``Resize`` -> ``ToFloat`` -> ``Normalize``."""
    ops: list[Transform] = []
    if channels is not None:
        ops.append(ToChannels(channels))
    ops += [Resize(image_size), ToFloat(), Normalize(mean, std)]
    return Compose(ops)
