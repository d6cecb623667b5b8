"""A small timm-like registry of model constructors.

Every registered constructor has the signature
``fn(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3, **kwargs) -> nn.Module``.
The registry wraps it so that arguments are validated and the returned module carries a plain-dict
``ltc_config`` attribute from which the same architecture can be rebuilt with ``create(**ltc_config)``.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = [
    "ModelFn",
    "create",
    "default_input_size",
    "list_models",
    "register_model",
    "scale_channels",
]

ModelFn = Callable[..., nn.Module]

_MODELS: dict[str, ModelFn] = {}
_INPUT_SIZES: dict[str, int] = {}


def scale_channels(channels: int, width: float) -> int:
    """Return ``channels * width`` rounded to the nearest integer (halves round up), at least 1."""
    return max(1, math.floor(channels * width + 0.5))


def _validate(num_classes: Any, width: Any, in_channels: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if (
        isinstance(width, bool)
        or not isinstance(width, int | float)
        or not math.isfinite(width)
        or width <= 0
    ):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")


def register_model(name: str, *, input_size: int = 224) -> Callable[[ModelFn], ModelFn]:
    """Decorator registering a model constructor under ``name``.

    ``input_size`` is the model's default (square) input resolution, returned by
    :func:`default_input_size`. Registering an existing name raises ``ValueError``.
    The decorated function validates its arguments and sets ``model.ltc_config``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(fn: ModelFn) -> ModelFn:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")

        @functools.wraps(fn)
        def wrapper(
            num_classes: int = 1000, width: float = 1.0, in_channels: int = 3, **kwargs: Any
        ) -> nn.Module:
            _validate(num_classes, width, in_channels)
            model = fn(num_classes=num_classes, width=width, in_channels=in_channels, **kwargs)
            model.ltc_config = {
                "name": name,
                "num_classes": num_classes,
                "width": float(width),
                "in_channels": in_channels,
                **kwargs,
            }
            return model

        _MODELS[name] = wrapper
        _INPUT_SIZES[name] = int(input_size)
        return wrapper

    return decorator


def _unknown(name: str) -> ValueError:
    available = list_models()
    close = difflib.get_close_matches(str(name), available, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown model {name!r}.{hint} Available models: {', '.join(available)}")


def create(
    name: str, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """Build the registered model ``name``.

    ``width`` multiplies every channel count, ``in_channels`` changes the first convolution only, and
    extra keyword arguments (e.g. ``dropout``) go to the constructor. The result has ``ltc_config``
    set, so ``create(**model.ltc_config)`` rebuilds the same architecture.
    Raises ``ValueError`` for an unknown name or invalid arguments.
    """
    if name not in _MODELS:
        raise _unknown(name)
    return _MODELS[name](num_classes=num_classes, width=width, in_channels=in_channels, **kwargs)


def list_models() -> list[str]:
    """Return the sorted names of all registered models."""
    return sorted(_MODELS)


def default_input_size(name: str) -> int:
    """Return the default square input resolution of model ``name`` (e.g. 224, 32 or 28)."""
    if name not in _INPUT_SIZES:
        raise _unknown(name)
    return _INPUT_SIZES[name]
