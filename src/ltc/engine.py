"""The learning-compression (LC) engine, scheme-agnostic (SPEC section 3).

Lifecycle, around the user's own training loop (prepare, step, convert)::

    comp = LTC(model, example_input, target_sr=5)     # records layer sizes; computes nothing yet
    comp.start()                                       # first C step on the reference weights (also done lazily)
    for step in range(steps):
        ...train with  loss = criterion(model(x), y) + comp.penalty()   # the L step
        comp.step()                                    # C step, multipliers, mu <- growth * mu
    # or, with penalty_step="proximal": no penalty in the loss, comp.proximal_step(lr / (1 - momentum)) after
    # every optimizer.step()
    small = comp.compressed_model()                    # then re-estimate BatchNorm: ltc.recalibrate_batchnorm

The augmented Lagrangian ``Q = L(W) + λ Σ C_k(r_k) + Σ_k ρ_k/2 ‖W_k − Θ_k − φ_k/ρ_k‖²_k`` is minimised by
alternating the L step (SGD on ``L + penalty()``) and the C step. Layer ``k``'s penalty weight is
``ρ_k = min(μ·w_k, mu_cap) / lr_scale``: ``w_k`` compares layers (``weighting``), ``mu_cap`` (optional) keeps each
layer's pull within what SGD can follow, so that a large ``w_k`` no longer throttles every other layer's μ, and
``lr_scale`` (:meth:`LCEngine.set_lr_scale`, 1 by default) keeps that pull per iteration while the learning rate
anneals. The C step picks,
for each layer, the rank minimising ``λ·C_k(r)/C_ref + μ/2·w_k·err_k(r)`` over the rank grid plus the dense
option, on ``Z_k = W_k − φ_k/ρ_k``, and sets ``Θ_k`` to the projection of ``Z_k`` at that rank. ``‖·‖_k`` and
``err_k`` are the layer's metric (:mod:`ltc.metrics`): weight space, or the layer's inputs (``metric='data'``).
Budget mode replaces λ by a target SR (or CR) and finds λ each C step. Which layers use which scheme (Tucker-2,
matrix, SVD) is decided here once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import heapq
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .cost import LayerGeometry, dense_cost, profile, record_geometry
from .layers import check_decomposable_conv
from .metrics import Whitening, collect_input_moments, collect_output_sensitivity, metric_mode, whitening_from_moment
from .schemes import Candidates, Scheme, get_scheme
from .settings import COSTS, METRICS, PENALTY_STEPS, WEIGHTINGS, check_choice, check_int, check_number
from .surgery import replace_modules, unwrap

__all__ = ["LCEngine", "LTC", "LRC", "EngineSettings", "LayerState", "select_layers", "ENGINE_STATE_VERSION",
           "check_lam_target", "deploy_ranks", "UnreachableTarget"]

log = logging.getLogger("ltc")

ENGINE_STATE_VERSION = 3
Rank = int | tuple[int, int] | None
LayerMap = Callable[[Callable[[str], Any], list[str]], list[Any]]


def check_lam_target(lam: Any, target_sr: Any, *, required: bool = True) -> None:
    """The shared rule on λ and a budget target: at most one (exactly one when ``required``)."""
    if lam is not None and target_sr is not None:
        raise ValueError("give exactly one of lam (λ, the cost weight) and target_sr (budget mode), not both")
    if required and lam is None and target_sr is None:
        raise ValueError("give exactly one of lam (λ, the cost weight) and target_sr (budget mode)")


@dataclass
class EngineSettings:
    """The engine's settings, validated once here (``CompressConfig`` and the CLI build the same object, so every
    entry point gives the same message for the same bad value). See :class:`LCEngine` for their meaning."""

    lam: float | None = None
    target_sr: float | None = None
    cost: str = "macs"
    include: list[str] | None = None
    exclude: list[str] | None = None
    compress_linear: bool = False
    conv_scheme: str = "tucker2"
    mu0: float = 1e-3
    mu_growth: float = 1.25
    mu_cap: float | None = None
    min_rank: int = 1
    rank_multiple: int = 1
    n_iter: int = 0
    tol: float = 1e-3
    weighting: str = "relative"
    metric: str = "weight"
    calibration_images: int = 512
    damping: float = 0.01
    centered: bool = True
    penalty_step: str = "gradient"

    def __post_init__(self) -> None:
        check_number("lam", self.lam, ge=0, optional=True)
        check_number("target_sr", self.target_sr, ge=1, optional=True, what="(a speed-up)")
        self.cost = check_choice("cost", self.cost, COSTS)
        self.include, self.exclude = _as_list(self.include), _as_list(self.exclude)
        self.conv_scheme = check_choice("conv_scheme", self.conv_scheme, ("tucker2", "matrix"))
        self.mu0 = float(check_number("mu0", self.mu0, gt=0))  # type: ignore[arg-type]
        self.mu_growth = float(check_number("mu_growth", self.mu_growth, ge=1, what="(μ increases)"))  # type: ignore
        check_number("mu_cap", self.mu_cap, gt=0, optional=True)
        check_int("min_rank", self.min_rank, ge=1)
        check_int("rank_multiple", self.rank_multiple, ge=1)
        check_int("n_iter", self.n_iter, ge=0)
        check_number("tol", self.tol, ge=0)
        self.weighting = check_choice("weighting", self.weighting, WEIGHTINGS)
        self.metric = check_choice("metric", self.metric, METRICS)
        check_int("calibration_images", self.calibration_images, ge=1)
        check_number("damping", self.damping, ge=0)
        self.penalty_step = check_choice("penalty_step", self.penalty_step, PENALTY_STEPS)


@dataclass
class LayerState:
    """Per-layer state of the LC engine. ``rank`` is ``None`` when the dense option won; ``scale`` is the
    layer's weight ``w_k`` in the C step (its penalty weight is ``min(μ·w_k, mu_cap)``); ``err`` is the unweighted
    error in the layer's metric; ``whitening`` is the data metric's factor (``None``: weight space)."""

    name: str
    module: nn.Module
    scheme: Scheme
    geometry: LayerGeometry
    theta: Tensor
    phi: Tensor
    rank: Rank = None
    err: float = 0.0
    scale: float = 1.0
    whitening: Whitening | None = None
    history_ranks: list[Rank] = field(default_factory=list)

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    def weight_with_targets(self) -> Tensor:
        """The layer's weight, with ``theta`` and ``phi`` moved to its device first (the model may have moved)."""
        w = self.module.weight
        if self.theta.device != w.device:
            self.theta, self.phi = self.theta.to(w.device), self.phi.to(w.device)
        return w

    def to_metric(self, x: Tensor) -> Tensor:
        """``x ×_in L`` (identity for the weight metric)."""
        return x if self.whitening is None else self.whitening.apply(x)

    def from_metric(self, x: Tensor) -> Tensor:
        return x if self.whitening is None else self.whitening.unapply(x)


def _as_list(globs: str | Iterable[str] | None) -> list[str] | None:
    if globs is None:
        return None
    return [globs] if isinstance(globs, str) else list(globs)


def select_layers(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    compress_linear: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """Names of the layers to compress, and ``{name: reason}`` for matched layers left dense.

    Default: every ungrouped ``nn.Conv2d`` (and every ``nn.Linear`` with ``compress_linear``). ``include`` /
    ``exclude`` are ``fnmatch`` globs on ``model.named_modules()`` names (``'layer1.*'``, ``'features.0'``);
    a glob that matches no conv/linear layer is an error, never a silent no-op.
    """
    inc, exc = _as_list(include), _as_list(exclude)
    leaves = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    if not leaves:
        raise ValueError("the model has no nn.Conv2d or nn.Linear layer to compress")
    for kind, globs in (("include", inc), ("exclude", exc)):
        for g in globs or []:
            if not fnmatch.filter(leaves, g):
                sample = ", ".join(list(leaves)[:6])
                raise ValueError(
                    f"{kind} glob {g!r} matches no conv or linear layer; layer names look like: {sample}, ..."
                )
    chosen, skipped = [], {}
    for name, m in leaves.items():
        explicit = inc is not None and any(fnmatch.fnmatchcase(name, g) for g in inc)
        if inc is not None and not explicit:
            continue
        if exc is not None and any(fnmatch.fnmatchcase(name, g) for g in exc):
            continue
        if isinstance(m, nn.Linear):
            if compress_linear or explicit:
                chosen.append(name)
            continue
        if m.groups != 1:
            skipped[name] = f"grouped conv (groups={m.groups}) left dense"
            continue
        chosen.append(name)
    if not chosen:
        raise ValueError("no layer left to compress after include/exclude; check the globs")
    return chosen, skipped


class UnreachableTarget(ValueError):
    """A budget target beyond what every layer at its cheapest option reaches; ``best``: the target that is reached
    then (SR, CR or the latency table's predicted speed-up, as the engine's cost)."""

    def __init__(self, message: str, *, best: float) -> None:
        super().__init__(message)
        self.best = float(best)


def _is_distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


class LCEngine:
    """The learning-compression engine. ``LTC`` and ``LRC`` are this engine with a conv scheme chosen.

    Construction records each layer's sizes (one forward pass of ``example_input``) and checks the settings; it
    runs no C step. :meth:`start` runs the first one (on the reference weights, at ``mu0``, ``φ = 0``);
    :meth:`penalty`, :meth:`step` and :meth:`compressed_model` call it if it has not run.

    Args:
        model: the network being trained (a ``DistributedDataParallel`` wrapper is unwrapped). Its weights
            are the reference for the first C step.
        example_input: one batch ``(N, C, H, W)`` used once to record each layer's input/output sizes.
        lam: λ ≥ 0, the weight of the cost term (dimensionless: costs are divided by ``C_ref``, the summed
            dense cost of the compressed layers). Exactly one of ``lam`` and ``target_sr`` must be given.
        target_sr: budget mode: the whole model's theoretical speed-up (``cost='macs'``), compression
            ratio (``cost='params'``) or predicted latency speed-up (``cost='latency'``) to meet, ≥ 1. λ is found
            exactly each C step (lower convex hull, then a greedy fill of the remaining budget).
        cost: ``'macs'``, ``'params'`` or ``'latency'`` (needs ``latency_table``, see :mod:`ltc.latency_table`).
        include / exclude: ``fnmatch`` globs on module names; see :func:`select_layers`.
        compress_linear: also compress ``nn.Linear`` layers by SVD.
        conv_scheme: ``'tucker2'`` (LTC; 1x1 convs get the two-conv SVD scheme) or ``'matrix'`` (LRC).
        mu0, mu_growth: the penalty schedule ``μ_j = mu0 · mu_growth^j`` (``μ_j``: the μ of L step ``j``).
        mu_cap: largest penalty weight ``ρ_k`` of any layer (``None``: no cap). Set it to about
            ``2 (1 − momentum) / lr`` so no layer's pull outruns SGD (``ltc.compress`` does).
        min_rank: smallest rank considered on each axis.
        rank_multiple: ranks considered are multiples of this (and the full rank): hardware-friendly widths.
        n_iter: HOOI sweeps when projecting at the chosen ranks (0 = truncated HOSVD).
        tol: ``converged`` once ``‖W − Θ‖/‖W‖ < tol`` and the ranks did not change in the last C step.
        weighting: how layers' errors compare. ``'relative'`` (default) weights layer ``k``'s penalty and
            C-step error by ``w_k = mean_j E_j / E_k`` with ``E_k`` its reference weight energy in the metric
            (``‖W_k‖²``, or ``‖W_k ×_in L_k‖²`` for the data metric), so that rank allocation trades *relative*
            errors: with BatchNorm a conv's weight scale is arbitrary, and absolute errors would starve the layers
            whose weights happen to be small. ``'absolute'``: ``w_k = 1`` (SPEC §3 as written). ``'fisher'``:
            the relative weights times each layer's loss sensitivity ``F_k`` (normalised to a geometric mean of 1;
            :func:`ltc.metrics.collect_output_sensitivity`), measured once on the reference weights and the
            calibration inputs, so that layers whose relative output error costs the loss more keep more rank.
        metric: ``'weight'`` (SPEC §3) or ``'data'`` (:mod:`ltc.metrics`: the layer's output error on
            ``calibration_images`` calibration inputs, refreshed at every C step).
        centered: the data metric measures the inputs' covariance (default) rather than their second moment: the
            shift of a layer's output mean is what BatchNorm re-estimation after deployment corrects, and with it
            the post-ReLU mean direction would dominate the metric (measured: one-shot SR 10 on resnet34_cifar
            width 0.25, BatchNorm re-estimated, 37.0 % centred against 27.8 % uncentred before fine-tuning).
        calibration: the inputs for ``metric='data'``: a loader of ``(x, y)`` batches or a tensor of inputs.
        damping: the data metric's ``Σ + damping·mean(diag Σ)·I``.
        penalty_step: how the L steps apply the penalty. ``'gradient'``: add :meth:`penalty` to the loss; SGD
            follows a layer's pull stably only while ``lr_eff·ρ_k`` times the metric's largest eigenvalue stays
            small, so ``mu_cap`` is divided by it. ``'proximal'``: call :meth:`proximal_step` after every optimizer
            step instead (exact, stable for any ``ρ_k``), and ``mu_cap`` is divided by the metric's *smallest*
            eigenvalue, so that at the cap every direction of ``W − Θ`` is pulled in, not only the largest.
        latency_table: per-layer measured latencies for ``cost='latency'`` (:class:`ltc.latency_table.LatencyTable`).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor | tuple[Any, ...],
        *,
        calibration: Any = None,
        latency_table: Any = None,
        **settings: Any,
    ) -> None:
        cfg = EngineSettings(**settings)
        check_lam_target(cfg.lam, cfg.target_sr)
        for key, value, instead in (("metric", "data", "weight"), ("weighting", "fisher", "relative")):
            if getattr(cfg, key) == value and calibration is None:  # settings that run the network on data
                raise ValueError(f"{key}={value!r} needs calibration inputs: pass calibration=loader (a few hundred "
                                 f"training images) or {key}={instead!r}")
        if cfg.cost == "latency" and latency_table is None:
            raise ValueError("cost='latency' needs a latency_table (ltc.latency_table.LatencyTable.build(model, x)); "
                             "or use cost='macs'")
        self.settings = cfg
        self.model = unwrap(model)
        self.cost_kind = cfg.cost
        self.lam = float(cfg.lam) if cfg.lam is not None else 0.0
        self.target = float(cfg.target_sr) if cfg.target_sr is not None else None
        self.mu = cfg.mu0
        self.mu0, self.mu_growth, self.mu_cap = cfg.mu0, cfg.mu_growth, cfg.mu_cap
        self.lr_scale = 1.0
        self.min_rank, self.rank_multiple = int(cfg.min_rank), int(cfg.rank_multiple)
        self.n_iter, self.tol = int(cfg.n_iter), float(cfg.tol)
        self.conv_scheme, self.weighting, self.metric = cfg.conv_scheme, cfg.weighting, cfg.metric
        self.penalty_step = cfg.penalty_step
        self._warned_penalty = False
        self.calibration = calibration
        self.latency_table = latency_table
        self.steps_done = 0
        self.history: list[dict[str, Any]] = []
        self.started = False
        self._prepared = False
        self._ranks_changed = True

        names, skipped = select_layers(self.model, cfg.include, cfg.exclude, cfg.compress_linear)
        for name, why in skipped.items():
            log.info("ltc: %s: %s", name, why)
        self.skipped = skipped
        geoms = record_geometry(self.model, example_input)
        prof = profile(self.model, example_input)
        self.base_macs, self.base_params = prof.macs, prof.params
        modules = dict(self.model.named_modules())
        self.layers: dict[str, LayerState] = {}
        for name in names:
            if name not in geoms:
                raise ValueError(
                    f"layer '{name}' was not called by the forward pass of example_input; exclude it or "
                    "pass an input that reaches it"
                )
            mod = modules[name]
            if isinstance(mod, nn.Conv2d):
                check_decomposable_conv(mod, name)
                one_by_one = tuple(mod.kernel_size) == (1, 1)
                scheme = get_scheme("matrix" if (cfg.conv_scheme == "matrix" or one_by_one) else "tucker2")
            else:
                scheme = get_scheme("svd")
            w = mod.weight.detach()
            self.layers[name] = LayerState(name, mod, scheme, geoms[name], w.clone(), torch.zeros_like(w))
        self.ref_params = sum(dense_cost(s.geometry)[0] for s in self.layers.values())
        self.ref_macs = sum(dense_cost(s.geometry)[1] for s in self.layers.values())
        self.fixed_params = self.base_params - self.ref_params
        self.fixed_macs = self.base_macs - self.ref_macs
        if cfg.cost == "latency":
            self.latency_table.check_layers({n: s.geometry for n, s in self.layers.items()})
            self.ref_latency = sum(self.latency_table.dense_ms(s.geometry) for s in self.layers.values())
            # the layers timed one by one can add up to more than the whole model timed at once (tiny networks,
            # where the isolated timings carry overhead the model amortises): nothing is left fixed then, and the
            # base is the layers' sum, so that a prediction never drops to zero time
            self.fixed_latency = max(float(self.latency_table.model_ms) - self.ref_latency, 0.0)
            self.base_cost_latency = self.fixed_latency + self.ref_latency
        self.c_ref = float({"macs": self.ref_macs, "params": self.ref_params}.get(cfg.cost) or
                           getattr(self, "ref_latency", 1.0))

    # ----------------------------------------------------------------------------------------- lifecycle
    def prepare(self) -> None:
        """Measure the metric (data metric: the calibration pass) and the layers' weights ``w_k`` on the reference
        weights. Cheap; :meth:`start` and :attr:`scale_range` call it."""
        if self._prepared:
            return
        self._refresh_metric()
        if self.weighting in ("relative", "fisher"):
            energy = {n: float(s.to_metric(s.theta.double()).square().sum()) for n, s in self.layers.items()}
            mean = sum(energy.values()) / len(energy)
            for n, s in self.layers.items():
                s.scale = mean / energy[n] if energy[n] > 0 else 1.0
        if self.weighting == "fisher":
            for n, f in self._fisher_factors().items():
                self.layers[n].scale *= f
        self._prepared = True

    def _fisher_factors(self) -> dict[str, float]:
        """``{name: F_k / geomean_j F_j}`` (:func:`ltc.metrics.collect_output_sensitivity` on the reference weights),
        the same on every process."""
        sens = collect_output_sensitivity(self.model, list(self.layers), self.calibration,
                                          self.settings.calibration_images)
        floor = max(max(sens.values()), 1e-300) * 1e-12  # a layer the loss ignores still gets a (tiny) weight
        logs = {n: math.log(max(v, floor)) for n, v in sens.items()}
        mid = sum(logs.values()) / len(logs)
        factors = torch.tensor([math.exp(v - mid) for v in logs.values()], dtype=torch.float64)
        if _is_distributed():
            factors = factors.to(next(iter(self.layers.values())).weight.device)
            torch.distributed.broadcast(factors, src=0)
        return dict(zip(logs, factors.tolist(), strict=True))

    def start(self) -> None:
        """The first C step: on the reference weights at ``mu0`` with ``φ = 0`` (a no-op once started)."""
        if self.started:
            return
        self.prepare()
        cands = self._c_step()
        self.started = True  # only once the C step succeeded: a failed one (unreachable target) is not a start
        self._log_mu_diagnostic(cands)

    def set_schedule(self, *, mu0: float | None = None, mu_growth: float | None = None,
                     mu_cap: float | None = None) -> None:
        """Set the μ path before the run (``mu0`` only before :meth:`start`); values are checked as settings."""
        changes = {k: v for k, v in (("mu0", mu0), ("mu_growth", mu_growth), ("mu_cap", mu_cap)) if v is not None}
        if not changes:
            return
        cfg = dataclasses.replace(self.settings, **changes)
        if "mu0" in changes:
            if self.started:
                raise RuntimeError("set_schedule(mu0=...) after start(): the first C step already ran at mu0")
            self.mu0 = self.mu = cfg.mu0
        self.mu_growth, self.mu_cap, self.settings = cfg.mu_growth, cfg.mu_cap, cfg

    def _refresh_metric(self) -> None:
        if self.metric != "data":
            return
        modes = {n: metric_mode(s.module, s.scheme.name) for n, s in self.layers.items()}
        moments = collect_input_moments(self.model, modes, self.calibration, self.settings.calibration_images,
                                        centered=self.settings.centered)
        for n, s in self.layers.items():
            if not bool(torch.isfinite(moments[n]).all()):
                raise FloatingPointError(
                    f"C step {len(self.history) + 1}: layer {n!r} sees NaN/inf inputs on the calibration images (the "
                    "network's activations overflow although its weights are finite); lower the learning rate, or "
                    "use metric='weight', which does not run the network")
            wh = whitening_from_moment(moments[n], modes[n], self.settings.damping)
            s.whitening = wh.to(s.weight.device)
        if _is_distributed():
            for s in self.layers.values():
                assert s.whitening is not None
                for t in (s.whitening.L, s.whitening.L_inv):
                    torch.distributed.broadcast(t, src=0)
                c = torch.tensor([s.whitening.curvature, s.whitening.floor], dtype=torch.float64,
                                 device=s.whitening.L.device)
                torch.distributed.broadcast(c, src=0)
                s.whitening.curvature, s.whitening.floor = float(c[0]), float(c[1])

    # ----------------------------------------------------------------------------------------- queries
    @property
    def ranks(self) -> dict[str, Rank]:
        """``{name: (r_in, r_out)}`` for Tucker-2 layers, ``{name: r}`` for matrix/SVD layers, ``None`` = dense."""
        return {n: s.rank for n, s in self.layers.items()}

    def layer_cost(self, s: LayerState, rank: Rank, kind: str) -> float:
        """Cost of layer ``s`` at ``rank`` (``None``: dense) in ``kind`` ('params', 'macs' or 'latency')."""
        if kind == "latency":
            return float(self.latency_table.layer_ms(s.geometry, s.scheme.name, rank))
        p, m = dense_cost(s.geometry) if rank is None else s.scheme.cost(s.geometry, rank)
        return float(p if kind == "params" else m)

    def _totals(self) -> tuple[int, int]:
        params, macs = self.fixed_params, self.fixed_macs
        for s in self.layers.values():
            p, m = dense_cost(s.geometry) if s.rank is None else s.scheme.cost(s.geometry, s.rank)
            params, macs = params + int(p), macs + int(m)
        return params, macs

    def _base_fixed(self, kind: str) -> tuple[float, float]:
        """``(whole base model's cost, cost of what is not compressed)`` in ``kind``."""
        if kind == "macs":
            return float(self.base_macs), float(self.fixed_macs)
        if kind == "params":
            return float(self.base_params), float(self.fixed_params)
        return self.base_cost_latency, self.fixed_latency

    @property
    def macs(self) -> int:
        """Theoretical MACs per sample of the model if compressed now."""
        return self._totals()[1]

    @property
    def params(self) -> int:
        """Parameter count of the model if compressed now."""
        return self._totals()[0]

    @property
    def sr(self) -> float:
        """Theoretical speed-up: base MACs / compressed MACs (whole model)."""
        return self.base_macs / max(self.macs, 1)

    @property
    def cr(self) -> float:
        """Compression ratio: base params / compressed params (whole model)."""
        return self.base_params / max(self.params, 1)

    @property
    def predicted_speedup(self) -> float | None:
        """Base latency / predicted latency of the model if compressed now (``cost='latency'`` only)."""
        if self.cost_kind != "latency":
            return None
        base, fixed = self._base_fixed("latency")
        total = fixed + sum(self.layer_cost(s, s.rank, "latency") for s in self.layers.values())
        return base / max(total, 1e-12)

    def distance(self) -> float:
        """``‖W − Θ‖ / ‖W‖`` in weight space over all compressed layers."""
        num = den = 0.0
        for s in self.layers.values():
            w = s.weight.detach()
            num += float((w - s.theta.to(w.device)).square().sum())
            den += float(w.square().sum())
        return math.sqrt(num / max(den, 1e-300))

    def metric_distance(self) -> float:
        """``‖(W − Θ) ×_in L‖ / ‖W ×_in L‖`` over all compressed layers, in the layers' metric (equal to
        :meth:`distance` for the weight metric): what the layers' outputs lose if deployed now, relative."""
        num = den = 0.0
        for s in self.layers.values():
            w = s.weight.detach().double()
            num += float(s.to_metric(w - s.theta.to(w.device).double()).square().sum())
            den += float(s.to_metric(w).square().sum())
        return math.sqrt(num / max(den, 1e-300))

    @property
    def scale_range(self) -> tuple[float, float]:
        """``(min_k w_k, max_k w_k)``: the layers' weights (layer ``k`` is pulled with ``min(μ·w_k, mu_cap)``)."""
        self.prepare()
        scales = [s.scale for s in self.layers.values()]
        return min(scales), max(scales)

    @property
    def floor_range(self) -> tuple[float, float]:
        """``(min_k w_k·f_k, max_k w_k·f_k)`` with ``f_k`` the smallest eigenvalue of layer ``k``'s metric (1 in weight
        space): how hard μ pulls each layer's least-pulled direction (``mu_path='pin'``, the proximal L step's
        default, ends the μ path where the smallest of them reaches the cap)."""
        self.prepare()
        pulls = [s.scale * (1.0 if s.whitening is None else s.whitening.floor) for s in self.layers.values()]
        return min(pulls), max(pulls)

    def rho(self, s: LayerState) -> float:
        """Layer ``s``'s penalty weight ``ρ_k = min(μ·w_k, mu_cap / c_k) / lr_scale``; ``c_k`` is the metric's largest
        eigenvalue (the normalised input moment's; 1 in weight space) for the gradient L step, its smallest for the
        proximal one (see ``penalty_step``); see :meth:`set_lr_scale`."""
        r = self.mu * s.scale
        if self.mu_cap is not None:
            wh = s.whitening
            c = 1.0 if wh is None else (wh.curvature if self.penalty_step == "gradient" else wh.floor)
            r = min(r, self.mu_cap / c)
        return r / self.lr_scale

    def set_lr_scale(self, scale: float) -> None:
        """The L steps' learning rate from now on, as a fraction of the one the μ path (and ``mu_cap``) was made
        for. Every ``ρ_k`` is divided by it, so that one SGD iteration pulls ``W`` toward ``Θ`` as hard as the μ path
        says while the learning rate anneals: the gradient noise around ``Θ`` (about ``lr/ρ``) then falls with the
        square of the learning rate instead of staying where the cap left it. Like the cap, it changes how hard ``W``
        is pulled, not what the C step buys: ranks are still chosen with ``μ·w_k``. :func:`ltc.compress` sets it
        before every L pass from its optimizer."""
        check_number("scale", scale, gt=0, what="(the learning rate's fraction of its initial value)")
        self.lr_scale = float(scale)

    def set_penalty_step(self, step: str) -> None:
        """Switch how the L steps from now on apply the penalty (``'gradient'`` or ``'proximal'``), and with it the
        cap on each ρ_k (see ``penalty_step``); :func:`ltc.compress` switches to the proximal step for the annealed
        L steps with ``penalty_step='late-proximal'``. Recorded in :meth:`state_dict`."""
        self.penalty_step = check_choice("penalty_step", step, PENALTY_STEPS)

    @property
    def converged(self) -> bool:
        """True when ``‖W − Θ‖/‖W‖ < tol`` and the last C step changed no rank: the L step can be skipped."""
        return self.started and (not self._ranks_changed) and self.distance() < self.tol

    # ----------------------------------------------------------------------------------------- L step
    def penalty(self) -> Tensor:
        """``Σ_k ρ_k/2 · ‖W_k − Θ_k − φ_k/ρ_k‖²_k``, differentiable in the weights; add it to the training loss.

        With ``penalty_step='proximal'`` the L steps apply it by :meth:`proximal_step` instead: the first call then
        warns (added to the loss as well it would pull twice, and at the proximal cap its gradient step diverges)."""
        if self.penalty_step == "proximal" and not self._warned_penalty:
            self._warned_penalty = True
            warnings.warn("penalty() on an engine built with penalty_step='proximal': its L steps apply the penalty "
                          "by proximal_step() after each optimizer step, so adding penalty() to the loss as well "
                          "pulls twice (and at the proximal cap its gradient step can diverge). To add penalty() to "
                          "the loss instead, build the engine with penalty_step='gradient'.", stacklevel=2)
        self.start()
        total: Tensor | None = None
        for s in self.layers.values():
            w = s.weight_with_targets()
            rho = self.rho(s)
            d = 0.5 * rho * s.to_metric(w - s.theta - s.phi / rho).square().sum()
            total = d if total is None else total + d
        assert total is not None
        return total

    @torch.no_grad()
    def proximal_step(self, step_size: float) -> None:
        """The penalty's exact step: ``W_k ← argmin_W ‖W − W_k‖²/(2η) + ρ_k/2·‖W − T_k‖²_k`` with
        ``T_k = Θ_k + φ_k/ρ_k`` and ``η = step_size``, i.e. ``W_k ← T_k + (W_k − T_k) ×_in (I + η·ρ_k·Σ_k)⁻¹``
        (``Σ_k = I`` in weight space). Call it after every optimizer step instead of adding :meth:`penalty` to the
        loss (``penalty_step='proximal'``). ``step_size``: the optimizer's effective step, ``lr / (1 − momentum)``
        for SGD with momentum (for small ``η·ρ_k`` the pull then equals the gradient L step's). Stable for any
        ``ρ_k``."""
        check_number("step_size", step_size, ge=0)
        self.start()
        for s in self.layers.values():
            w = s.weight_with_targets()
            rho = self.rho(s)
            a = float(step_size) * rho
            target = s.theta + s.phi / rho
            gap = w - target
            w.copy_(target + (gap / (1.0 + a) if s.whitening is None else s.whitening.shrink(a, gap)))

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The compressed layers' weights: :func:`ltc.compress` trains them without weight decay in L steps (the
        penalty is their regulariser; weight decay would pull them toward 0, away from Θ)."""
        return [s.module.weight for s in self.layers.values()]

    # ----------------------------------------------------------------------------------------- C step
    def step(self, target: float | None = None) -> None:
        """One C step at the current μ, then ``φ_k ← φ_k − ρ_k (W_k − Θ_k)`` and ``μ ← mu_growth · μ``.

        With the data metric the calibration statistics are measured again first. The C step that follows the
        ``j``-th L step is recorded in ``history`` as step ``j`` (1-based; :meth:`start`'s C step is step 0).
        ``target``: budget mode only, the SR (or speed-up) this C step and the later ones aim at (a gradual
        schedule moves it step by step; :func:`ltc.compress` with ``target_schedule='gradual'``)."""
        if target is not None:
            if self.target is None:
                raise ValueError("step(target=...) needs budget mode (an engine built with target_sr)")
            check_number("target", target, ge=1)
            self.target = float(target)
        self.start()
        self.steps_done += 1
        self._refresh_metric()
        with self._layer_map() as lmap:
            self._c_step(lmap)
            with torch.no_grad():
                for s in self.layers.values():
                    w = s.weight.detach()
                    s.phi = s.phi - self.rho(s) * (w - s.theta)
        self.mu *= self.mu_growth

    def _shifted(self, s: LayerState) -> Tensor:
        w = s.weight.detach()
        return w - s.phi / self.rho(s)

    @contextlib.contextmanager
    def _layer_map(self) -> Iterator[LayerMap]:
        """A ``map(fn, layer_names)`` for the per-layer work of a C step. On a CPU with several intra-op
        threads, the layers go to a pool of that many worker threads with one intra-op thread each (the
        main thread too, while the pool lives): the per-layer decompositions are small and independent, so
        this scales far better than threading each eigh, and it keeps OpenMP barriers out of the way when
        the machine is oversubscribed. The caller's thread count is restored afterwards."""
        n_threads = torch.get_num_threads()
        on_cpu = all(s.weight.device.type == "cpu" for s in self.layers.values())
        if n_threads <= 1 or len(self.layers) < 2 or not on_cpu:
            yield lambda fn, names: [fn(n) for n in names]
            return
        torch.set_num_threads(1)
        try:
            # torch.set_num_threads is partly thread-local (OpenMP, MKL): set it inside each worker as well
            with ThreadPoolExecutor(
                max_workers=min(n_threads, len(self.layers)),
                thread_name_prefix="ltc-cstep",
                initializer=torch.set_num_threads,
                initargs=(1,),
            ) as pool:
                yield lambda fn, names: list(pool.map(fn, names))
        finally:
            torch.set_num_threads(n_threads)

    def _c_step(self, lmap: LayerMap | None = None) -> dict[str, Candidates]:
        if lmap is None:
            with self._layer_map() as own:
                return self._c_step(own)
        t0 = time.perf_counter()
        shifted = {name: s.to_metric(self._shifted(s)) for name, s in self.layers.items()}
        # largest decompositions first, for balance: work ~ numel * max(T, S) (Grams, rotation, eigh)
        order = sorted(shifted, key=lambda n: -shifted[n].numel() * max(shifted[n].shape[:2]))

        def analyse(name: str) -> tuple[str, Candidates]:
            s = self.layers[name]
            return name, self._candidates(s, shifted[name])

        cands = dict(lmap(analyse, order))
        cands = {n: cands[n] for n in self.layers}
        if self.target is None:
            choice = {n: self._argmin(c, self.lam) for n, c in cands.items()}
        else:
            hulls = dict(lmap(lambda n: (n, _lower_hull(cands[n], self.cost_kind)), order))
            choice, self.lam = self._budget(cands, hulls)

        def project(name: str) -> tuple[str, tuple[Rank, Tensor, float]]:
            s, c, idx, z = self.layers[name], cands[name], choice[name], shifted[name]
            if idx is None:
                return name, (None, s.from_metric(z).clone(), 0.0)
            rank = c.rank_of(idx)
            theta, _ = s.scheme.project(z, rank, c.analysis, self.n_iter)
            # HOOI sweeps (n_iter > 0) lower the error below the truncated-HOSVD table's: measure it
            if self.n_iter == 0:
                err = float(c.err[idx]) / s.scale
            else:
                err = float((z.double() - theta.double()).square().sum())
            return name, (rank, s.from_metric(theta), err)

        done = dict(lmap(project, order))
        # The first C step has no previous ranks: it always counts as a change (so ``converged`` is False).
        old = self.ranks if self.history else None
        for name, s in self.layers.items():
            s.rank, s.theta, s.err = done[name]
        if _is_distributed():
            self._broadcast()
        self._ranks_changed = old != self.ranks
        self._record(time.perf_counter() - t0, "C step")
        return cands

    def candidates(self, s: LayerState, z: Tensor) -> Candidates:
        """The scheme's candidate table for ``z`` (already in the layer's metric coordinates), unweighted, with the
        engine's rank grid and, for ``cost='latency'``, the latency of every cell."""
        c = s.scheme.candidates(z, s.geometry, self.min_rank, self.rank_multiple)
        if self.cost_kind == "latency":
            c.costs["latency"] = self.latency_table.grid_ms(s.geometry, s.scheme.name, c.axes).to(c.err.device)
            c.dense["latency"] = float(self.latency_table.dense_ms(s.geometry))
        return c

    def _candidates(self, s: LayerState, z: Tensor) -> Candidates:
        """:meth:`candidates` with errors weighted by the layer's ``w_k``."""
        c = self.candidates(s, z)
        return c if s.scale == 1.0 else dataclasses.replace(c, err=c.err * s.scale)

    def _record(self, seconds: float, what: str) -> None:
        """Append the current state (ranks, errors, costs, SR/CR, ‖W − Θ‖/‖W‖) to ``history`` and log it."""
        params, macs = self._totals()
        prev = self.history[-1]["ranks"] if self.history else None
        ranks = {n: (list(r) if isinstance(r, tuple) else r) for n, r in self.ranks.items()}
        row = {
            "step": self.steps_done,
            "mu": self.mu,
            "lr_scale": self.lr_scale,  # the L step's learning rate / the μ path's (ρ_k carries 1 / lr_scale)
            "lam": self.lam,
            "target": self.target,  # the budget this C step aimed at (None in λ mode)
            "ranks": ranks,
            "moved": None if prev is None else sum(prev[n] != ranks[n] for n in ranks),
            "err": {n: s.err for n, s in self.layers.items()},
            "distance": self.distance(),
            "distance_metric": self.metric_distance() if self.metric != "weight" else None,
            "macs": macs,
            "params": params,
            "sr": self.base_macs / max(macs, 1),
            "cr": self.base_params / max(params, 1),
            "seconds": seconds,
        }
        if self.cost_kind == "latency":
            row["predicted_speedup"] = self.predicted_speedup
        self.history.append(row)
        log.info(
            "ltc: %s %d  mu=%.3g  lam=%.3g  SR=%.2f  CR=%.2f  |W-Theta|/|W|=%.3g  (%.2fs)",
            what,
            self.steps_done,
            self.mu,
            self.lam,
            row["sr"],
            row["cr"],
            row["distance"],
            seconds,
        )

    def _argmin(self, c: Candidates, lam: float) -> int | None:
        """Joint argmin of ``λ·C/C_ref + μ/2·err`` over the grid and the dense option (None)."""
        scale = lam / self.c_ref
        obj = scale * c.cost(self.cost_kind) + 0.5 * self.mu * c.err
        idx = int(torch.argmin(obj))
        dense = scale * c.dense_cost(self.cost_kind)
        return None if dense < float(obj[idx]) else idx

    # ----------------------------------------------------------------------------------------- budget
    def _budget(
        self, cands: dict[str, Candidates], hulls: dict[str, list[tuple[float, float, int | None]]] | None = None
    ) -> tuple[dict[str, int | None], float]:
        """Smallest λ whose ranks meet the budget (exact, over the breakpoints of each layer's lower convex
        hull of (cost, err)), then a greedy fill of the remaining budget one rank step at a time."""
        assert self.target is not None
        kind = self.cost_kind
        base, fixed = self._base_fixed(kind)
        budget = base / self.target - fixed
        if hulls is None:
            hulls = {n: _lower_hull(c, kind) for n, c in cands.items()}
        hulls = {n: hulls[n] for n in cands}
        floor = sum(h[0][0] for h in hulls.values())
        if floor > budget + 1e-9:
            best = base / (fixed + floor)
            what = {"macs": "SR", "params": "CR", "latency": "speed-up (latency table)"}[kind]
            where = (f"at its fastest option (rank {self.min_rank} or up, or dense where that is faster)"
                     if kind == "latency" else f"at min_rank={self.min_rank}")
            raise UnreachableTarget(
                f"target {what} {self.target:g} is out of reach: with every compressed "
                f"layer {where} the model reaches {best:.2f}; lower the target, "
                "compress more layers (include/compress_linear) or lower min_rank", best=best
            )
        # Segments (ratio = error drop per added cost) of all hulls; every layer takes its segments in order.
        segs = []
        for n, h in hulls.items():
            for k in range(1, len(h)):
                dc, de = h[k][0] - h[k - 1][0], h[k - 1][1] - h[k][1]
                segs.append((de / dc, dc, n))
        segs.sort(key=lambda t: -t[0])
        pos = {n: 0 for n in hulls}
        total = floor
        price = 0.0
        taken = math.inf  # smallest ratio among the segments taken
        for ratio, dc, n in segs:
            if total + dc > budget:
                price = ratio
                break
            total += dc
            pos[n] += 1
            taken = ratio
        # At λ = price exactly, the refused segment is a tie that the λ-mode argmin may break either way (and
        # over budget); report a λ just above it, still below the cheapest taken segment when possible, so
        # that the plain λ-mode C step at this λ gives this hull solution (cost within the budget).
        if price > 0:
            above = price * (1 + 1e-6)
            price = above if above < taken else (math.sqrt(price * taken) if taken > price else above)
        lam = price * self.mu * self.c_ref / 2.0
        choice = {n: hulls[n][pos[n]][2] for n in hulls}
        choice = _greedy_fill(cands, choice, kind, budget - total)
        return choice, lam

    # ----------------------------------------------------------------------------------------- diagnostics
    def _log_mu_diagnostic(self, cands: dict[str, Candidates]) -> None:
        """Log, per layer, the smallest μ at which it can leave min_rank at the current λ (``cands``: the
        candidates of the C step just run, on the current shifted weights)."""
        if self.lam <= 0:
            return
        for name, c in cands.items():
            cost = c.cost(self.cost_kind)
            c0, e0 = float(cost[0]), float(c.err[0])
            better = c.err < e0
            if not bool(better.any()):
                continue
            mus = 2 * self.lam * (cost[better] - c0) / (self.c_ref * (e0 - c.err[better]))
            mu_min = max(float(mus.min()), 0.0)
            log.info("ltc: %s can leave min_rank once mu >= %.3g (mu now %.3g)", name, mu_min, self.mu)

    def mu_to_leave_min_rank(self) -> dict[str, float]:
        """Per layer, the smallest μ at which the C step can choose more than ``min_rank`` at the current λ."""
        self.start()
        out = {}
        for name, s in self.layers.items():
            c = self._candidates(s, s.to_metric(self._shifted(s)))
            cost = c.cost(self.cost_kind)
            better = c.err < c.err[0]
            if not bool(better.any()) or self.lam <= 0:
                out[name] = 0.0
                continue
            mus = 2 * self.lam * (cost[better] - cost[0]) / (self.c_ref * (c.err[0] - c.err[better]))
            out[name] = max(float(mus.min()), 0.0)
        return out

    # ----------------------------------------------------------------------------------------- DDP
    def _broadcast(self) -> None:
        """Make Θ, the ranks, the errors and λ of rank 0 those of every process (deployment rebuilds the
        factors from Θ, so nothing else needs sending)."""
        dist = torch.distributed
        for s in self.layers.values():
            s.theta = s.theta.contiguous()
            dist.broadcast(s.theta, src=0)
        codes = []
        for s in self.layers.values():
            r = s.rank
            codes.append([-1, -1] if r is None else ([r, -1] if isinstance(r, int) else list(r)))
        dev = next(iter(self.layers.values())).theta.device
        t = torch.tensor(codes, dtype=torch.int64, device=dev)
        dist.broadcast(t, src=0)
        floats = torch.tensor([self.lam] + [s.err for s in self.layers.values()], dtype=torch.float64, device=dev)
        dist.broadcast(floats, src=0)
        values = floats.tolist()
        self.lam = values[0]
        for s, (a, b), err in zip(self.layers.values(), t.tolist(), values[1:], strict=True):
            s.rank = None if a < 0 else (a if b < 0 else (a, b))
            s.err = err

    # ----------------------------------------------------------------------------------------- results
    def _factors(self, s: LayerState) -> Any:
        """Factors rebuilt from Θ alone (Θ has exactly the chosen ranks, in any metric), so that the deployed
        network depends only on the state that checkpoints hold: a run resumed from a checkpoint deploys
        bit-identically to an uninterrupted one."""
        _, factors = s.scheme.project(s.theta, s.rank, None, 0)
        return factors

    def compressed_model(self) -> nn.Module:
        """A new module: a copy of the model with each compressed layer replaced by its factorised form
        built from the last Θ (dense where the dense option won). The original model is left untouched.

        The copy keeps the dense network's BatchNorm running statistics, which no longer match the new layers'
        outputs: re-estimate them with :func:`ltc.recalibrate_batchnorm` (``ltc.compress`` does) before
        measuring accuracy."""
        self.start()
        model = copy.deepcopy(self.model)
        modules = dict(model.named_modules())
        new = {}
        for name, s in self.layers.items():
            if s.rank is not None:
                new[name] = s.scheme.deploy(modules[name], self._factors(s))
        return replace_modules(model, new)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Θ, φ, μ, λ, ranks, metric factors, step count and history: everything needed to resume
        bit-identically."""
        return {
            "version": ENGINE_STATE_VERSION,
            "mu": self.mu,
            "mu_growth": self.mu_growth,
            "mu_cap": self.mu_cap,
            "lr_scale": self.lr_scale,
            "lam": self.lam,
            "target": self.target,
            "cost": self.cost_kind,
            "weighting": self.weighting,
            "metric": self.metric,
            "penalty_step": self.penalty_step,
            "started": self.started,
            "steps_done": self.steps_done,
            "ranks_changed": self._ranks_changed,
            "history": copy.deepcopy(self.history),
            "layers": {
                n: {
                    "theta": s.theta.detach().clone(),
                    "phi": s.phi.detach().clone(),
                    "rank": list(s.rank) if isinstance(s.rank, tuple) else s.rank,
                    "scheme": s.scheme.name,
                    "err": s.err,
                    "scale": s.scale,
                    "whitening": None if s.whitening is None else {
                        "L": s.whitening.L.detach().clone(), "L_inv": s.whitening.L_inv.detach().clone(),
                        "mode": s.whitening.mode, "curvature": s.whitening.curvature, "floor": s.whitening.floor},
                }
                for n, s in self.layers.items()
            },
        }

    def choice(self) -> dict[str, Any]:
        """The current C-step outcome (target, λ, and per layer rank, Θ and error), to return to with
        :meth:`restore_choice` after other C steps (``ltc.api.meet_speedup`` keeps the attempt closest to its
        target this way, whatever multiplier and μ updates came in between)."""
        return {"target": self.target, "lam": self.lam,
                "layers": {n: (s.rank, s.theta.detach().clone(), s.err) for n, s in self.layers.items()}}

    def restore_choice(self, choice: dict[str, Any]) -> None:
        """Go back to a :meth:`choice` (recorded in ``history``)."""
        t0 = time.perf_counter()
        old = self.ranks
        self.target, self.lam = choice["target"], choice["lam"]
        for n, (rank, theta, err) in choice["layers"].items():
            s = self.layers[n]
            s.rank, s.theta, s.err = rank, theta.clone(), err
        self._ranks_changed = old != self.ranks
        self._record(time.perf_counter() - t0, "restored C step")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Raises ``ValueError`` if it belongs to another model or version."""
        if state.get("version") != ENGINE_STATE_VERSION:
            raise ValueError(
                f"engine state version {state.get('version')!r} is not this ltc's ({ENGINE_STATE_VERSION}); "
                "re-run the compression with this version"
            )
        for key, mine in (("cost", self.cost_kind), ("weighting", self.weighting), ("metric", self.metric),
                          ("penalty_step", self.penalty_step)):
            if state.get(key, mine) != mine:
                raise ValueError(
                    f"this engine state was made with {key}={state[key]!r}, this engine uses {key}={mine!r}; "
                    f"build the engine with the same {key}"
                )
        saved = state["layers"]
        if set(saved) != set(self.layers):
            missing, extra = sorted(set(self.layers) - set(saved)), sorted(set(saved) - set(self.layers))
            raise ValueError(
                "this engine state belongs to another model or layer selection: "
                f"missing layers {missing[:5]}, unexpected layers {extra[:5]}"
            )
        for n, s in self.layers.items():
            d = saved[n]
            if tuple(d["theta"].shape) != tuple(s.weight.shape) or d["scheme"] != s.scheme.name:
                raise ValueError(
                    f"engine state for layer '{n}' has shape {tuple(d['theta'].shape)} / scheme {d['scheme']}, "
                    f"the model has {tuple(s.weight.shape)} / {s.scheme.name}: another model's state"
                )
        for n, s in self.layers.items():
            d = saved[n]
            dev = s.weight.device
            s.theta, s.phi = d["theta"].to(dev).clone(), d["phi"].to(dev).clone()
            r = d["rank"]
            s.rank = tuple(r) if isinstance(r, list) else r
            s.err, s.scale = float(d["err"]), float(d["scale"])
            wh = d.get("whitening")
            s.whitening = None if wh is None else Whitening(wh["L"].to(dev).clone(), wh["L_inv"].to(dev).clone(),
                                                            str(wh["mode"]), float(wh["curvature"]),
                                                            float(wh.get("floor", 1.0)))
        self.mu, self.lam, self.steps_done = float(state["mu"]), float(state["lam"]), int(state["steps_done"])
        if self.target is not None and state.get("target") is not None:  # a budget re-targeted during the run
            self.target = float(state["target"])
        self.mu_growth = float(state["mu_growth"])
        self.mu_cap = None if state["mu_cap"] is None else float(state["mu_cap"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        # a state saved before start() holds no metric or layer weights yet: start() measures them
        self.started = self._prepared = bool(state["started"])
        self._ranks_changed = bool(state["ranks_changed"])
        self.history = copy.deepcopy(state["history"])

    def retarget(self, target: float) -> None:
        """Budget mode: a C step for another target at the current weights and multipliers (no multiplier update, no
        μ growth), recorded in ``history``; before :meth:`start`, the first C step at that target. Raises
        :class:`UnreachableTarget` (the engine unchanged) when the target is beyond every option.
        :func:`ltc.api.meet_speedup` uses it to calibrate the latency table on the clock."""
        if self.target is None:
            raise ValueError("retarget() needs budget mode (an engine built with target_sr)")
        check_number("target", target, ge=1)
        old, self.target = self.target, float(target)
        try:
            if self.started:
                self._c_step()
            else:  # the first C step, at this target
                self.start()
        except ValueError:  # out of reach: the engine stays at its last target and ranks
            self.target = old
            raise

    def assign(self, ranks: dict[str, Rank]) -> None:
        """Set given ranks (``None`` = dense) and project the current weights onto them (in the engine's metric),
        bypassing the objective: no C step runs. Used by one-shot baselines that pick ranks by another rule."""
        unknown = set(ranks) - set(self.layers)
        if unknown:
            raise ValueError(f"assign(): unknown layers {sorted(unknown)[:5]}")
        self.prepare()
        t0 = time.perf_counter()
        old = self.ranks if self.started else None
        for name, r in ranks.items():
            s = self.layers[name]
            w = self._shifted(s)
            if r is None:
                s.rank, s.theta, s.err = None, w.clone(), 0.0
            else:
                s.rank = r
                z = s.to_metric(w)
                theta, _ = s.scheme.project(z, r, None, self.n_iter)
                s.err = float((z.double() - theta.double()).square().sum())
                s.theta = s.from_metric(theta)
        self.started = True
        self._ranks_changed = old != self.ranks
        self._record(time.perf_counter() - t0, "assigned ranks")


def _lower_hull(c: Candidates, kind: str) -> list[tuple[float, float, int | None]]:
    """The lower convex hull of a layer's (cost, err) options, cheapest first, error strictly falling:
    ``[(cost, err, index or None for dense), ...]``. Only these points can win the λ objective.

    Vectorised: a Pareto filter on the grid sorted by (cost, err), then repeated removal, all at once, of
    every point lying on or above the chord of its two neighbours (such a point is never a hull vertex, so
    removing several per pass is safe); the last few passes fall back to a monotone chain."""
    cost = c.cost(kind).detach().to("cpu", torch.float64).numpy()
    err = c.err.detach().to("cpu", torch.float64).numpy()
    dense_c = float(c.dense_cost(kind))
    order = np.argsort(cost, kind="stable")
    cs, es = cost[order], err[order]
    keep = np.ones(len(cs), dtype=bool)
    keep[1:] = es[1:] < np.minimum.accumulate(es)[:-1]  # strictly below every earlier (no dearer) point
    # the dense option (error 0) dominates every grid point at its cost or above with a positive error
    keep &= (cs < dense_c) | ((cs == dense_c) & (es <= 0))
    x, y, idx = cs[keep], es[keep], order[keep].astype(np.int64)
    if len(x) > 1:
        last = np.append(x[1:] != x[:-1], True)  # of equal costs keep the last kept: the smallest error
        x, y, idx = x[last], y[last], idx[last]
    with_dense = len(y) == 0 or y[-1] > 0
    if with_dense:
        x, y, idx = np.append(x, dense_c), np.append(y, 0.0), np.append(idx, -1)
    for _ in range(64):
        if len(x) < 3:
            break
        # middle point on or above the segment from its left to its right neighbour
        bad = (y[1:-1] - y[:-2]) * (x[2:] - x[:-2]) >= (y[2:] - y[:-2]) * (x[1:-1] - x[:-2])
        if not bad.any():
            break
        keep = np.ones(len(x), dtype=bool)
        keep[1:-1] = ~bad
        x, y, idx = x[keep], y[keep], idx[keep]
    pts = [(a, b, None if k < 0 else k) for a, b, k in zip(x.tolist(), y.tolist(), idx.tolist(), strict=True)]
    hull: list[tuple[float, float, int | None]] = []
    for p in pts:  # monotone chain: a no-op unless the passes above stopped early
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _greedy_fill(
    cands: dict[str, Candidates], choice: dict[str, int | None], kind: str, room: float
) -> dict[str, int | None]:
    """Spend the budget left after bisection: repeatedly take the single rank step (one axis +1, or the
    switch to dense) with the largest error drop per added cost that still fits."""
    choice = dict(choice)
    tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def moves(name: str) -> list[tuple[float, float, int | None]]:
        c, idx = cands[name], choice[name]
        if idx is None:
            return []
        if name not in tables:
            tables[name] = (
                c.cost(kind).detach().to("cpu", torch.float64).numpy(),
                c.err.detach().to("cpu", torch.float64).numpy(),
            )
        cost, err = tables[name]
        cur_c, cur_e = float(cost[idx]), float(err[idx])
        out = []
        stride = 1
        for axis in range(len(c.grid_shape) - 1, -1, -1):
            pos = (idx // stride) % c.grid_shape[axis]
            if pos + 1 < c.grid_shape[axis]:
                j = idx + stride
                out.append((float(cost[j]) - cur_c, cur_e - float(err[j]), j))
            stride *= c.grid_shape[axis]
        out.append((float(c.dense_cost(kind)) - cur_c, cur_e, None))
        return out

    heap: list[tuple[float, int, str, int | None, float, int | None]] = []
    counter = 0

    def push(name: str) -> None:
        nonlocal counter
        for dc, de, j in moves(name):
            if de <= 0:
                continue
            key = -math.inf if dc <= 0 else -de / dc
            counter += 1
            heapq.heappush(heap, (key, counter, name, j, dc, choice[name]))

    for n in choice:
        push(n)
    deferred: list[tuple[float, int, str, int | None, float, int | None]] = []
    while heap:
        item = heapq.heappop(heap)
        _, _, name, j, dc, frm = item
        if frm != choice[name]:
            continue  # stale: the layer has moved since this entry was pushed
        if dc > room:
            deferred.append(item)
            continue
        choice[name] = j
        room -= dc
        push(name)
        if dc < 0:  # room grew: moves that did not fit before may fit now
            for d in deferred:
                heapq.heappush(heap, d)
            deferred.clear()
    return choice


def deploy_ranks(model: nn.Module, example_input: Tensor, ranks: dict[str, Any], *,
                 conv_scheme: str = "tucker2") -> nn.Module:
    """A compressed copy of ``model`` at the given ranks (``{layer: (r_in, r_out) | r | None}``, ``None`` = dense),
    factors from the truncated HOSVD / SVD of its weights: the architecture a run recorded, rebuilt (e.g. to time
    it or to count its MACs). Lists (as JSON stores them) are read as ``(r_in, r_out)``."""
    eng = LCEngine(model, example_input, lam=0.0, conv_scheme=conv_scheme, include=list(ranks))
    eng.assign({n: tuple(r) if isinstance(r, list) else r for n, r in ranks.items()})
    return eng.compressed_model()


class LTC(LCEngine):
    """Learning Tucker Compression: the LC engine with Tucker-2 for kh x kw convs (1x1 convs take the
    two-conv SVD scheme, where Tucker-2 would degenerate into three matrices) and SVD for linears
    (``compress_linear=True``). All arguments are those of :class:`LCEngine`, minus ``conv_scheme``."""

    def __init__(self, model: nn.Module, example_input: Tensor | tuple[Any, ...], **kwargs: Any) -> None:
        if "conv_scheme" in kwargs:
            raise TypeError("LTC always uses the Tucker-2 scheme; use LCEngine(conv_scheme=...) for others")
        super().__init__(model, example_input, conv_scheme="tucker2", **kwargs)


class LRC(LCEngine):
    """Low-rank compression with learned ranks (Idelbayev & Carreira-Perpiñán 2020): the same LC engine with
    the matrix scheme (``W`` reshaped to ``T x (S·kh·kw)``) for every conv."""

    def __init__(self, model: nn.Module, example_input: Tensor | tuple[Any, ...], **kwargs: Any) -> None:
        if "conv_scheme" in kwargs:
            raise TypeError("LRC always uses the matrix scheme; use LCEngine(conv_scheme=...) for others")
        super().__init__(model, example_input, conv_scheme="matrix", **kwargs)
