"""`ltc`: the paper's method, learned Tucker-2 ranks by the LC loop."""

from __future__ import annotations

from typing import Any

from ..engine import LTC, LCEngine
from .base import Example, Model, register_method, reject_options, split_kwargs


@register_method("ltc", learns=True, summary="LC loop, Tucker-2 scheme (the paper)")
def build(model: Model, example_input: Example, **kwargs: Any) -> LCEngine:
    eng, opts = split_kwargs(kwargs)
    reject_options("ltc", opts)
    return LTC(model, example_input, **eng)
