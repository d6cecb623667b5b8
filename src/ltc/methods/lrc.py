"""`lrc`: the LC loop with the matrix scheme (Idelbayev & Carreira-Perpiñán, CVPR 2020)."""

from __future__ import annotations

from typing import Any

from ..engine import LRC, LCEngine
from .base import Example, Model, register_method


@register_method("lrc", learns=True, summary="LC loop, matrix scheme (Idelbayev & Carreira-Perpinan 2020)")
def build(model: Model, example_input: Example, **kwargs: Any) -> LCEngine:
    return LRC(model, example_input, **kwargs)
