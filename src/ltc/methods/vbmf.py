"""`vbmf`: Tucker-2 ranks from EVBMF of the two channel unfoldings (Kim et al., ICLR 2016).

Options: ``weaken`` in [0, 1] moves every rank toward full (``r + round(weaken·(full − r))``, halves up). With a
``target_sr`` and no ``weaken``, the largest weakening that still meets the target is used. If EVBMF's own ranks
already fall short of the target, every rank is instead shrunk toward ``min_rank`` by one common fraction
(``m + round(x·(r − m))``, the largest ``x`` in [0, 1] that meets it; logged), so that vbmf is compared at the
target SR like every other method.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from ..engine import LCEngine
from ..vbmf import evbmf, vbmf_tucker2_ranks
from .base import Example, Model, assignment_engine, meet_target, register_method

log = logging.getLogger("ltc")


def _weakened(r: int, full: int, weaken: float) -> int:
    # halves round up, as in vbmf_tucker2_ranks (Python's round() would round them to even)
    return min(full, max(1, r + math.floor(weaken * (full - r) + 0.5)))


def _shrunk(r: int, floor: int, x: float) -> int:
    # x = 1: EVBMF's own rank; x = 0: the floor (ranks already at or below it stay)
    return r if r <= floor else floor + math.floor(x * (r - floor) + 0.5)


def _per_axis(own: dict[str, Any], fn: Callable[[int, int], int], full: dict[str, Any]) -> dict[str, Any]:
    """``fn(rank, full rank)`` on each axis of every layer's rank (a Tucker-2 pair or a matrix rank)."""
    return {n: tuple(fn(v, f) for v, f in zip(r, full[n], strict=True)) if isinstance(r, tuple) else fn(r, full[n])
            for n, r in own.items()}


def check_options(options: dict[str, Any]) -> None:
    """``weaken`` in [0, 1]."""
    weaken = options.get("weaken")
    if weaken is not None and not (isinstance(weaken, int | float) and 0.0 <= weaken <= 1.0):
        raise ValueError(f"weaken must lie in [0, 1], got {weaken!r}")


@register_method("vbmf", learns=False, lam="never", options=("weaken",), check_options=check_options,
                 summary="EVBMF ranks of both unfoldings, one-shot (Kim et al. 2016)")
def build(model: Model, example_input: Example, *, weaken: float | None = None, **kwargs: Any) -> LCEngine:
    eng = kwargs
    check_options({"weaken": weaken})
    engine, target = assignment_engine(model, example_input, eng)
    own: dict[str, Any] = {}
    full: dict[str, Any] = {}
    for name, s in engine.layers.items():
        w = s.weight.detach()
        if s.scheme.name == "tucker2":
            own[name] = vbmf_tucker2_ranks(w)
            full[name] = (w.shape[1], w.shape[0])
        else:
            mat = w.reshape(w.shape[0], -1)
            own[name] = max(1, evbmf(mat).rank)
            full[name] = min(mat.shape)

    def ranks_at(x: float) -> dict[str, Any]:
        return _per_axis(own, lambda r, fu: _weakened(r, fu, x), full)

    if weaken is not None or target is None:
        engine.assign(ranks_at(weaken or 0.0))
        return engine
    engine.assign(own)
    ratio = engine.sr if engine.cost_kind == "macs" else engine.cr
    if ratio < target:
        floor = engine.min_rank

        def shrunk(x: float) -> dict[str, Any]:
            return _per_axis(own, lambda r, _: _shrunk(r, floor, x), full)

        x = meet_target(engine, target, shrunk)
        log.info("ltc: EVBMF's own ranks give %.3g, short of the target %.3g; shrunk toward min_rank=%d by %.3f",
                 ratio, target, floor, 1.0 - x)
        return engine
    x = meet_target(engine, target, ranks_at)
    log.info("ltc: vbmf weakened by %.3f to meet the target %.3g", x, target)
    return engine
