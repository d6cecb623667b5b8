"""The method registry and the engine arguments every method shares."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..cost import dense_cost
from ..engine import LCEngine

__all__ = ["Method", "register_method", "get_method", "list_methods", "ENGINE_KEYS"]

# Arguments passed through to LCEngine; anything else goes to the method's own options.
ENGINE_KEYS = ("lam", "target_sr", "cost", "include", "exclude", "compress_linear", "mu0", "mu_growth",
               "min_rank", "n_iter", "tol", "weighting")


@dataclass(frozen=True)
class Method:
    """A compression method: ``build(model, example_input, **engine_kwargs, **options) -> LCEngine``.

    ``learns``: the method runs LC steps (L step + C step) before fine-tuning; otherwise the engine's ranks
    are final at construction and the budget goes to fine-tuning.
    """

    name: str
    learns: bool
    build: Callable[..., LCEngine]
    summary: str


_METHODS: dict[str, Method] = {}


def register_method(name: str, *, learns: bool, summary: str) -> Callable[[Callable[..., LCEngine]], Method]:
    def deco(fn: Callable[..., LCEngine]) -> Method:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        m = Method(name, learns, fn, summary)
        _METHODS[name] = m
        return m

    return deco


def get_method(name: str) -> Method:
    """A registered method by name; an unknown name lists the choices."""
    try:
        return _METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Choose one of: {', '.join(sorted(_METHODS))}") from None


def list_methods() -> list[str]:
    return sorted(_METHODS)


def split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(engine kwargs, method options)``."""
    eng = {k: v for k, v in kwargs.items() if k in ENGINE_KEYS}
    return eng, {k: v for k, v in kwargs.items() if k not in ENGINE_KEYS}


def reject_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise TypeError(f"method {name!r} takes no option(s) {sorted(options)}")


def bisect_largest(feasible: Callable[[float], bool], lo: float = 0.0, hi: float = 1.0, iters: int = 40) -> float:
    """The largest ``x`` in ``[lo, hi]`` with ``feasible(x)``, for a predicate true below a threshold."""
    if feasible(hi):
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return lo


Model = nn.Module
Example = Tensor | tuple[Any, ...]


def assignment_engine(model: Model, example_input: Example, eng: dict[str, Any]) -> tuple[LCEngine, float | None]:
    """An engine for methods that pick ranks by their own rule (then :meth:`LCEngine.assign`).

    Returns the engine and the budget target taken out of ``eng`` (``lam`` means nothing to such methods).
    """
    from ..engine import LTC

    eng = dict(eng)
    target = eng.pop("target_sr", None)
    eng.pop("lam", None)
    return LTC(model, example_input, lam=0.0, **eng), target


def meet_target(engine: LCEngine, target: float, ranks_at: Callable[[float], dict[str, Any]]) -> float:
    """Assign ``ranks_at(x)`` for the largest ``x`` in [0, 1] whose ranks still meet ``target`` (SR for
    ``cost='macs'``, CR for ``cost='params'``); ranks grow with ``x``. Returns that ``x``."""

    def feasible(x: float) -> bool:
        return ratio_of(engine, ranks_at(x)) >= target

    if not feasible(0.0):
        raise ValueError(
            f"target {target:g} is out of reach for this method: its smallest ranks give "
            f"{ratio_of(engine, ranks_at(0.0)):.3g}"
        )
    x = bisect_largest(feasible)
    engine.assign(ranks_at(x))
    return x


def ratio_of(engine: LCEngine, ranks: dict[str, Any]) -> float:
    """The SR (``cost='macs'``) or CR (``cost='params'``) the engine would report with ``ranks`` assigned,
    from the cost formulas alone (no projection: cheap enough to call in a bisection loop)."""
    macs = engine.cost_kind == "macs"
    total = engine.fixed_macs if macs else engine.fixed_params
    for name, s in engine.layers.items():
        r = ranks.get(name, s.rank)
        p, m = dense_cost(s.geometry) if r is None else s.scheme.cost(s.geometry, r)
        total += int(m if macs else p)
    return (engine.base_macs if macs else engine.base_params) / max(total, 1)
