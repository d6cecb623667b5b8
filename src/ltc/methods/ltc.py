"""`ltc`: the paper's method, learned Tucker-2 ranks by the LC loop."""

from __future__ import annotations

from typing import Any

from ..engine import LTC, LCEngine
from .base import Example, Model, register_method


@register_method("ltc", learns=True, summary="LC loop, Tucker-2 scheme (the paper)")
def build(model: Model, example_input: Example, **kwargs: Any) -> LCEngine:
    return LTC(model, example_input, **kwargs)
