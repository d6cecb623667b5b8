"""`oneshot`: LTC's rank allocation (one C step on the pretrained weights) with no L steps.

The ablation that separates the allocation from the learning: the same objective, λ or budget, and the same
metric, but the network goes straight to fine-tuning. Its one C step runs at ``start()``.
"""

from __future__ import annotations

from typing import Any

from ..engine import LTC, LCEngine
from .base import Example, Model, register_method


@register_method("oneshot", learns=False, summary="one LTC C step on the pretrained weights, no L steps")
def build(model: Model, example_input: Example, **kwargs: Any) -> LCEngine:
    return LTC(model, example_input, **kwargs)
