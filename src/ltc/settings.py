"""Setting names and value checks, in one place.

Every settings object (:class:`~ltc.engine.EngineSettings`, :class:`~ltc.api.CompressConfig`,
:class:`~ltc.train.TrainConfig`) validates its fields with these helpers, and the YAML configs of the command line
are turned into those objects, so the engine, the Python API and the CLI give the same message for the same bad
value. The messages name the setting, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "BN_DATA",
    "COSTS",
    "LC_LR_SCHEDULES",
    "METRICS",
    "OPTIMIZERS",
    "PENALTY_STEPS",
    "SCHEDULES",
    "TARGET_SCHEDULES",
    "WEIGHTINGS",
    "check_choice",
    "check_int",
    "check_number",
    "is_number",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
"""Optimizer names accepted everywhere (case-insensitive)."""
SCHEDULES = ("cosine", "step", "exp", "none")
"""Learning-rate schedules of :func:`ltc.train.make_scheduler`."""
COSTS = ("macs", "params", "latency")
"""What the C step trades against the error: MACs, parameters, or measured latency (a per-layer table)."""
WEIGHTINGS = ("relative", "absolute", "fisher")
"""How layers' errors compare in the C step (see :class:`~ltc.engine.LCEngine`)."""
METRICS = ("weight", "data")
"""How a layer's approximation error is measured: in weight space, or on the layer's inputs (data-aware)."""
PENALTY_STEPS = ("gradient", "proximal")
"""How an L step applies the LC penalty: as a gradient added to the loss, or as its exact (proximal) step after each
optimizer step (:meth:`~ltc.engine.LCEngine.proximal_step`)."""
COMPRESS_PENALTY_STEPS = (*PENALTY_STEPS, "late-proximal")
""":func:`ltc.compress` also has ``'late-proximal'``: the gradient while the L-step rate is held, the proximal step in
the L steps it anneals over."""
MU_PATHS = ("pin", "stable")
"""Where the automatic μ path ends: where every direction of the least-pulled layer reaches the cap (the proximal
step's), or where the layer does as weighted (the gradient step's) (:mod:`ltc.api`)."""
MEMORY_FORMATS = ("contiguous", "channels_last")
"""Layouts a network is timed and run in under eager PyTorch: NCHW (PyTorch's default) or NHWC weights."""
TARGET_SCHEDULES = ("fixed", "gradual")
"""How budget mode reaches ``target_sr`` over the C steps: at every C step, or a step at a time (:mod:`ltc.api`)."""
BN_DATA = ("calibration", "train")
"""What BatchNorm statistics are re-estimated on after deployment: the calibration images (no augmentation) or the
training batches as augmented for training."""
LC_LR_SCHEDULES = ("cosine", "restart")
"""How the L steps' learning rate moves: held, then annealed over the last ``lr_anneal`` of the LC epochs (cosine), or
restarted each L step (:mod:`ltc.api`)."""


def is_number(v: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def check_number(
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    optional: bool = False,
    what: str = "",
) -> float | None:
    """``value`` as a float if it is a finite number within the bounds; otherwise a ``ValueError`` naming it.

    ``what`` is appended to the message (e.g. ``"(a speed-up)"``)."""
    if value is None and optional:
        return None
    bounds = []
    if gt is not None:
        bounds.append(f"> {gt:g}")
    if ge is not None:
        bounds.append(f">= {ge:g}")
    if lt is not None:
        bounds.append(f"< {lt:g}")
    if le is not None:
        bounds.append(f"<= {le:g}")
    if ge is not None and le is not None:
        rule = f"lie in [{ge:g}, {le:g}]"
    elif ge is not None and lt is not None:
        rule = f"lie in [{ge:g}, {lt:g})"
    elif gt is not None and le is not None:
        rule = f"lie in ({gt:g}, {le:g}]"
    else:
        rule = "be a finite number" + (f" {' and '.join(bounds)}" if bounds else "")
    msg = f"{name} must {rule}{f' {what}' if what else ''}, got {value!r}"
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(msg)
    v = float(value)
    if (gt is not None and not v > gt) or (ge is not None and not v >= ge) or (lt is not None and not v < lt) or (
        le is not None and not v <= le
    ):
        raise ValueError(msg)
    return v


def check_int(name: str, value: Any, *, ge: int | None = None, optional: bool = False) -> int | None:
    """``value`` if it is an int (not a bool) ``>= ge``; otherwise a ``ValueError`` naming it."""
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or (ge is not None and value < ge):
        rule = f"an int >= {ge}" if ge is not None else "an int"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` (lower-cased) if it is one of ``choices``; otherwise a ``ValueError`` listing them."""
    options = tuple(choices)
    key = value.lower() if isinstance(value, str) else value
    if key not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in options)}, got {value!r}")
    return str(key)
