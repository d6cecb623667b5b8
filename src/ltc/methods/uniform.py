"""`uniform`: one rank fraction, or one energy threshold, for every layer; one-shot.

Options: ``fraction`` in (0, 1] (rank = ceil(fraction·full) on each axis) or ``energy`` in (0, 1] (per layer,
the cheapest rank keeping that fraction of ‖W‖²). With a ``target_sr`` and neither option, the largest
single fraction that meets the target is found by bisection, and the layers that would step up next take that
step one at a time, cheapest first, while the target holds (one fraction alone overshoots: at width 0.25 with
``min_rank=2``, ResNet-34's ranks for target SR 10 give SR 12.1, with this fill 10.1).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..engine import LCEngine
from .base import Example, Model, assignment_engine, meet_target, register_method


def check_options(options: dict[str, Any]) -> None:
    """``fraction`` and ``energy``: at most one, each in (0, 1]."""
    fraction, energy = options.get("fraction"), options.get("energy")
    if fraction is not None and energy is not None:
        raise ValueError("give at most one of fraction and energy")
    for label, v in (("fraction", fraction), ("energy", energy)):
        if v is not None and not (isinstance(v, int | float) and 0.0 < v <= 1.0):
            raise ValueError(f"{label} must lie in (0, 1], got {v!r}")


@register_method("uniform", learns=False, lam="never", options=("fraction", "energy"), check_options=check_options,
                 summary="one rank fraction or energy threshold for all layers")
def build(
    model: Model,
    example_input: Example,
    *,
    fraction: float | None = None,
    energy: float | None = None,
    **kwargs: Any,
) -> LCEngine:
    eng = kwargs
    check_options({"fraction": fraction, "energy": energy})
    engine, target = assignment_engine(model, example_input, eng)
    fulls = {}
    for name, s in engine.layers.items():
        w = s.weight
        fulls[name] = (w.shape[1], w.shape[0]) if s.scheme.name == "tucker2" else min(w.shape[0], w[0].numel())
    lo = engine.min_rank

    def ranks_at(f: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n, full in fulls.items():
            if isinstance(full, tuple):
                out[n] = tuple(min(fu, max(lo, math.ceil(f * fu))) for fu in full)
            else:
                out[n] = min(full, max(lo, math.ceil(f * full)))
        return out

    if energy is not None:
        engine.assign(_energy_ranks(engine, energy))
    elif fraction is not None or target is None:
        engine.assign(ranks_at(fraction if fraction is not None else 0.5))
    else:
        meet_target(engine, target, ranks_at, fill=True)
    return engine


def _energy_ranks(engine: LCEngine, energy: float) -> dict[str, Any]:
    """Per layer, the cheapest grid rank whose projection keeps ``energy`` of ‖W‖² in the engine's metric (exact
    error tables)."""
    engine.prepare()
    out: dict[str, Any] = {}
    for name, s in engine.layers.items():
        w = s.to_metric(s.weight.detach())
        c = engine.candidates(s, w)
        total = float(w.double().square().sum())
        ok = c.err <= (1.0 - energy) * total + 1e-12 * total
        cost = c.cost(engine.cost_kind).clone()
        cost[~ok] = torch.inf
        out[name] = c.rank_of(int(torch.argmin(cost))) if bool(ok.any()) else None
    return out
