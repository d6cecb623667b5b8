"""`lrc`: the LC loop with the matrix scheme (Idelbayev & Carreira-Perpiñán, CVPR 2020)."""

from __future__ import annotations

from typing import Any

from ..engine import LRC, LCEngine
from .base import Example, Model, register_method, reject_options, split_kwargs


@register_method("lrc", learns=True, summary="LC loop, matrix scheme (Idelbayev & Carreira-Perpinan 2020)")
def build(model: Model, example_input: Example, **kwargs: Any) -> LCEngine:
    eng, opts = split_kwargs(kwargs)
    reject_options("lrc", opts)
    return LRC(model, example_input, **eng)
