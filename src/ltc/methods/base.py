"""The method registry, and what every method shares.

A method decides how the ranks (or, for ``prune``, the channels) are picked; everything else (layers, costs,
deployment, BatchNorm re-estimation, distillation, training, fine-tuning) is shared. ``build(model,
example_input, **settings, **options)`` returns a :class:`Compression`: an :class:`~ltc.engine.LCEngine` for the
low-rank methods, a pruning plan for ``prune``. Building computes nothing that the method does not need:
``ltc`` / ``lrc`` run their first C step at ``engine.start()``, ``oneshot`` at the driver's ``start()``, and the
assignment methods (``vbmf``, ``uniform``) never run one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from ..engine import LTC, LCEngine

__all__ = ["Compression", "Method", "register_method", "get_method", "list_methods", "ENGINE_KEYS"]

# Arguments passed through to LCEngine; anything else goes to the method's own options.
ENGINE_KEYS = ("lam", "target_sr", "cost", "include", "exclude", "compress_linear", "mu0", "mu_growth", "mu_cap",
               "min_rank", "rank_multiple", "n_iter", "tol", "weighting", "metric", "calibration_images", "damping",
               "centered", "penalty_step",
               "calibration", "latency_table")


class Compression(Protocol):
    """What the driver needs from a method's result: ranks, SR/CR, the deployed model and resumable state."""

    ranks: dict[str, Any]
    history: list[dict[str, Any]]
    lam: float

    @property
    def sr(self) -> float: ...

    @property
    def cr(self) -> float: ...

    def start(self) -> None: ...

    def compressed_model(self) -> nn.Module: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Method:
    """A compression method.

    ``learns``: it runs LC steps (L step + C step) before fine-tuning; otherwise its ranks are final once built
    and the whole epoch budget goes to fine-tuning. ``lam``: ``'required'`` (exactly one of ``lam`` and
    ``target_sr``), ``'never'`` (ranks by its own rule; ``target_sr`` optional), or ``'target'`` (``target_sr``
    required, no λ). ``options``: the names of its own options (``method_options``); ``check_options`` raises
    ``ValueError`` on a bad option value (called with the settings, before anything trains, and by ``build``).
    """

    name: str
    learns: bool
    build: Callable[..., Any]
    summary: str
    lam: str = "required"
    options: tuple[str, ...] = ()
    check_options: Callable[[dict[str, Any]], None] | None = None

    def check(self, lam: Any, target_sr: Any, options: dict[str, Any]) -> None:
        """The method's rules on λ, the target and its options; the same ``ValueError`` from every entry point."""
        from ..engine import check_lam_target

        if self.lam == "required":
            check_lam_target(lam, target_sr)
        elif lam is not None:
            raise ValueError(f"method {self.name!r} picks its ranks without λ; drop lam (give target_sr, or its "
                             f"options {', '.join(self.options) or 'none'})")
        elif self.lam == "target" and target_sr is None:
            raise ValueError(f"method {self.name!r} needs target_sr (the theoretical speed-up to prune to)")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = f"only the options {', '.join(repr(o) for o in self.options)}" if self.options else "no options"
            raise ValueError(f"method {self.name!r} takes {allowed}, not {unknown}")
        if self.check_options is not None:
            self.check_options(options)


_METHODS: dict[str, Method] = {}


def register_method(name: str, *, learns: bool, summary: str, lam: str = "required",
                    options: tuple[str, ...] = (),
                    check_options: Callable[[dict[str, Any]], None] | None = None,
                    ) -> Callable[[Callable[..., Any]], Method]:
    def deco(fn: Callable[..., Any]) -> Method:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        m = Method(name, learns, fn, summary, lam, options, check_options)
        _METHODS[name] = m
        return m

    return deco


def get_method(name: str) -> Method:
    """A registered method by name; an unknown name lists the choices."""
    try:
        return _METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Choose one of: {', '.join(sorted(_METHODS))}") from None


def list_methods() -> list[str]:
    return sorted(_METHODS)


def split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(engine kwargs, method options)``."""
    eng = {k: v for k, v in kwargs.items() if k in ENGINE_KEYS}
    return eng, {k: v for k, v in kwargs.items() if k not in ENGINE_KEYS}


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

    Returns the engine and the budget target taken out of ``eng`` (such methods take no λ)."""
    eng = dict(eng)
    target = eng.pop("target_sr", None)
    eng.pop("lam", None)
    return LTC(model, example_input, lam=0.0, **eng), target


def meet_target(
    engine: LCEngine, target: float, ranks_at: Callable[[float], dict[str, Any]], *, fill: bool = False
) -> float:
    """Assign ``ranks_at(x)`` for the largest ``x`` in [0, 1] whose ranks still meet ``target`` (SR for
    ``cost='macs'``, CR for ``cost='params'``); ranks grow with ``x``. Returns that ``x``.

    ``fill=True`` then spends what is left of the budget: the layers whose ranks step up just above ``x`` (with
    channel counts that share factors, many step together, and the ratio can land far above the target) are moved
    to that next step one at a time, the cheapest first, as long as the target still holds."""

    def feasible(x: float) -> bool:
        return ratio_of(engine, ranks_at(x)) >= target

    if not feasible(0.0):
        raise ValueError(
            f"target {target:g} is out of reach for this method: its smallest ranks give "
            f"{ratio_of(engine, ranks_at(0.0)):.3g}"
        )
    x = bisect_largest(feasible)
    ranks = ranks_at(x)
    if fill and x < 1.0:
        nxt = ranks_at(min(1.0, x + 2.0**-36))  # past the bisection's bracket (2^-40), before any other step
        kind = _ratio_kind(engine)
        ups = sorted((engine.layer_cost(engine.layers[n], nxt[n], kind)
                      - engine.layer_cost(engine.layers[n], ranks[n], kind), n) for n in ranks if nxt[n] != ranks[n])
        for _, n in ups:
            trial = {**ranks, n: nxt[n]}
            if ratio_of(engine, trial) >= target:
                ranks = trial
    engine.assign(ranks)
    return x


def ratio_of(engine: LCEngine, ranks: dict[str, Any]) -> float:
    """The SR (``cost='macs'``) or CR (``cost='params'``) the engine would report with ``ranks`` assigned,
    from the cost formulas alone (no projection: cheap enough to call in a bisection loop)."""
    kind = _ratio_kind(engine)
    total = (engine.fixed_params if kind == "params" else engine.fixed_macs) + sum(
        engine.layer_cost(s, ranks.get(name, s.rank), kind) for name, s in engine.layers.items())
    return (engine.base_params if kind == "params" else engine.base_macs) / max(total, 1)


def _ratio_kind(engine: LCEngine) -> str:
    """The count a target is met in: params for ``cost='params'``, MACs otherwise."""
    return "params" if engine.cost_kind == "params" else "macs"
