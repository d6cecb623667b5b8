"""The learning-compression (LC) engine, scheme-agnostic (SPEC section 3).

Lifecycle, around the user's own training loop::

    comp = LCEngine(model, example_input, lam=1e-3)      # first C step at mu0 on the reference weights
    for step in range(steps):
        ...train with  loss = criterion(model(x), y) + comp.penalty()   # the L step
        comp.step()                                          # C step, multipliers, mu <- a * mu
    small = comp.compressed_model()

The augmented Lagrangian ``Q = L(W) + λ Σ C_k(r_k) + μ/2 Σ w_k ‖W_k − Θ_k − φ_k/(μ w_k)‖²`` is minimised by
alternating the L step (SGD on ``L + penalty()``) and the C step, which for each layer picks the rank minimising
``λ·C_k(r)/C_ref + μ/2·w_k·err_k(r)`` over the whole rank grid plus the dense option, on
``Z_k = W_k − φ_k/(μ w_k)``, and sets ``Θ_k`` to the projection of ``Z_k`` at that rank. The layer weights
``w_k`` are 1 (``weighting='absolute'``, SPEC §3) or ``mean_j ‖W_j‖² / ‖W_k‖²`` (``'relative'``: errors
compared relative to each layer's weight scale). Budget mode replaces λ by a target SR (or CR)
and finds λ each C step. Which layers use which scheme (Tucker-2, matrix, SVD) is decided here once.
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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .cost import LayerGeometry, dense_cost, profile, record_geometry
from .layers import check_decomposable_conv
from .schemes import Candidates, Scheme, get_scheme
from .surgery import replace_modules, unwrap

__all__ = ["LCEngine", "LTC", "LRC", "LayerState", "select_layers", "ENGINE_STATE_VERSION"]

log = logging.getLogger("ltc")

ENGINE_STATE_VERSION = 2
WEIGHTINGS = ("relative", "absolute")
Rank = int | tuple[int, int] | None
LayerMap = Callable[[Callable[[str], Any], list[str]], list[Any]]


@dataclass
class LayerState:
    """Per-layer state of the LC engine. ``rank`` is ``None`` when the dense option won; ``scale`` is the
    layer's weight ``w_k`` in the penalty and the C step (its own μ is ``μ·w_k``); ``err`` is unweighted."""

    name: str
    module: nn.Module
    scheme: Scheme
    geometry: LayerGeometry
    theta: Tensor
    phi: Tensor
    rank: Rank = None
    err: float = 0.0
    scale: float = 1.0
    history_ranks: list[Rank] = field(default_factory=list)

    @property
    def weight(self) -> Tensor:
        return self.module.weight


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


def _is_distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


class LCEngine:
    """The learning-compression engine. ``LTC`` and ``LRC`` are this engine with a conv scheme chosen.

    Args:
        model: the network being trained (a ``DistributedDataParallel`` wrapper is unwrapped). Its weights
            are the reference for the first C step.
        example_input: one batch ``(N, C, H, W)`` used once to record each layer's input/output sizes.
        lam: λ ≥ 0, the weight of the cost term (dimensionless: costs are divided by ``C_ref``, the summed
            dense cost of the compressed layers). Exactly one of ``lam`` and ``target`` must be given.
        target_sr: budget mode: the whole model's theoretical speed-up (``cost='macs'``) or compression
            ratio (``cost='params'``) to meet, ≥ 1. λ is found by bisection each C step.
        cost: ``'macs'`` or ``'params'``.
        include / exclude: ``fnmatch`` globs on module names; see :func:`select_layers`.
        compress_linear: also compress ``nn.Linear`` layers by SVD.
        conv_scheme: ``'tucker2'`` (LTC; 1x1 convs get the two-conv SVD scheme) or ``'matrix'`` (LRC).
        mu0, mu_growth: the penalty schedule ``μ_j = mu0 · mu_growth^j``.
        min_rank: smallest rank considered on each axis.
        n_iter: HOOI sweeps when projecting at the chosen ranks (0 = truncated HOSVD).
        tol: ``converged`` once ``‖W − Θ‖/‖W‖ < tol`` and the ranks did not change in the last C step.
        weighting: how layers' errors compare. ``'relative'`` (default) weights layer ``k``'s penalty and
            C-step error by ``w_k = mean_j ‖W_j‖² / ‖W_k‖²`` (reference weights), so that rank allocation
            trades *relative* errors: with BatchNorm a conv's weight scale is arbitrary, and absolute errors
            would starve the layers whose weights happen to be small. ``'absolute'``: ``w_k = 1`` (SPEC §3
            as written).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor | tuple[Any, ...],
        *,
        lam: float | None = None,
        target_sr: float | None = None,
        cost: str = "macs",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        compress_linear: bool = False,
        conv_scheme: str = "tucker2",
        mu0: float = 1e-3,
        mu_growth: float = 1.25,
        min_rank: int = 1,
        n_iter: int = 0,
        tol: float = 1e-3,
        weighting: str = "relative",
    ) -> None:
        if (lam is None) == (target_sr is None):
            raise ValueError("give exactly one of lam (λ, the cost weight) and target_sr (budget mode)")
        if lam is not None and not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
        if target_sr is not None and not (math.isfinite(target_sr) and target_sr >= 1):
            raise ValueError(f"target_sr must be a finite number >= 1 (a speed-up), got {target_sr}")
        if cost not in ("macs", "params"):
            raise ValueError(f"cost must be 'macs' or 'params', got {cost!r}")
        if not (math.isfinite(mu0) and mu0 > 0):
            raise ValueError(f"mu0 must be a finite number > 0, got {mu0}")
        if not (math.isfinite(mu_growth) and mu_growth >= 1):
            raise ValueError(f"mu_growth must be >= 1 (μ increases), got {mu_growth}")
        if int(min_rank) < 1:
            raise ValueError(f"min_rank must be >= 1, got {min_rank}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if conv_scheme not in ("tucker2", "matrix"):
            raise ValueError(f"conv_scheme must be 'tucker2' or 'matrix', got {conv_scheme!r}")
        self.model = unwrap(model)
        self.cost_kind = cost
        self.lam = float(lam) if lam is not None else 0.0
        self.target = float(target_sr) if target_sr is not None else None
        self.mu = float(mu0)
        self.mu0, self.mu_growth = float(mu0), float(mu_growth)
        self.min_rank, self.n_iter, self.tol = int(min_rank), int(n_iter), float(tol)
        self.conv_scheme = conv_scheme
        self.weighting = weighting
        self.steps_done = 0
        self.history: list[dict[str, Any]] = []
        self._ranks_changed = True

        names, skipped = select_layers(self.model, include, exclude, compress_linear)
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
                scheme = get_scheme("matrix" if (conv_scheme == "matrix" or one_by_one) else "tucker2")
            else:
                scheme = get_scheme("svd")
            w = mod.weight.detach()
            self.layers[name] = LayerState(name, mod, scheme, geoms[name], w.clone(), torch.zeros_like(w))
        if weighting == "relative":
            norms = {n: float(s.theta.double().square().sum()) for n, s in self.layers.items()}
            mean = sum(norms.values()) / len(norms)
            for n, s in self.layers.items():
                s.scale = mean / norms[n] if norms[n] > 0 else 1.0
        self.ref_params = sum(dense_cost(s.geometry)[0] for s in self.layers.values())
        self.ref_macs = sum(dense_cost(s.geometry)[1] for s in self.layers.values())
        self.c_ref = float(self.ref_macs if cost == "macs" else self.ref_params)
        self.fixed_params = self.base_params - self.ref_params
        self.fixed_macs = self.base_macs - self.ref_macs
        self._log_mu_diagnostic(self._c_step())

    # ----------------------------------------------------------------------------------------- queries
    @property
    def ranks(self) -> dict[str, Rank]:
        """``{name: (r_in, r_out)}`` for Tucker-2 layers, ``{name: r}`` for matrix/SVD layers, ``None`` = dense."""
        return {n: s.rank for n, s in self.layers.items()}

    def _totals(self) -> tuple[int, int]:
        params, macs = self.fixed_params, self.fixed_macs
        for s in self.layers.values():
            p, m = dense_cost(s.geometry) if s.rank is None else s.scheme.cost(s.geometry, s.rank)
            params, macs = params + int(p), macs + int(m)
        return params, macs

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

    def distance(self) -> float:
        """``‖W − Θ‖ / ‖W‖`` over all compressed layers."""
        num = den = 0.0
        for s in self.layers.values():
            w = s.weight.detach()
            num += float((w - s.theta.to(w.device)).square().sum())
            den += float(w.square().sum())
        return math.sqrt(num / max(den, 1e-300))

    @property
    def scale_range(self) -> tuple[float, float]:
        """``(min_k w_k, max_k w_k)``: the layers' weights in the penalty (layer ``k`` is pulled with ``μ·w_k``)."""
        scales = [s.scale for s in self.layers.values()]
        return min(scales), max(scales)

    @property
    def converged(self) -> bool:
        """True when ``‖W − Θ‖/‖W‖ < tol`` and the last C step changed no rank: the L step can be skipped."""
        return (not self._ranks_changed) and self.distance() < self.tol

    # ----------------------------------------------------------------------------------------- L step
    def penalty(self) -> Tensor:
        """``μ/2 · Σ_k w_k ‖W_k − Θ_k − φ_k/(μ w_k)‖²``, differentiable in the weights; add it to the training loss."""
        total: Tensor | None = None
        for s in self.layers.values():
            w = s.weight
            if s.theta.device != w.device:
                s.theta, s.phi = s.theta.to(w.device), s.phi.to(w.device)
            d = s.scale * (w - s.theta - s.phi / (self.mu * s.scale)).square().sum()
            total = d if total is None else total + d
        assert total is not None
        return 0.5 * self.mu * total

    # ----------------------------------------------------------------------------------------- C step
    def step(self) -> None:
        """One C step at the current μ, then ``φ_k ← φ_k − μ w_k (W_k − Θ_k)`` and ``μ ← mu_growth · μ``.

        The C step that follows the ``j``-th L step is recorded in ``history`` as step ``j`` (1-based; the
        construction's C step is step 0)."""
        self.steps_done += 1
        with self._layer_map() as lmap:
            self._c_step(lmap)
            with torch.no_grad():
                for s in self.layers.values():
                    w = s.weight.detach()
                    s.phi = s.phi - self.mu * s.scale * (w - s.theta)
        self.mu *= self.mu_growth

    def _shifted(self, s: LayerState) -> Tensor:
        w = s.weight.detach()
        return w - s.phi / (self.mu * s.scale)

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
        shifted = {name: self._shifted(s) for name, s in self.layers.items()}
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
                return name, (None, z.clone(), 0.0)
            rank = c.rank_of(idx)
            theta, _ = s.scheme.project(z, rank, c.analysis, self.n_iter)
            # HOOI sweeps (n_iter > 0) lower the error below the truncated-HOSVD table's: measure it
            if self.n_iter == 0:
                err = float(c.err[idx]) / s.scale
            else:
                err = float((z.double() - theta.double()).square().sum())
            return name, (rank, theta, err)

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

    def _candidates(self, s: LayerState, z: Tensor) -> Candidates:
        """The scheme's candidate table for ``z`` with errors weighted by the layer's ``w_k``."""
        c = s.scheme.candidates(z, s.geometry, self.min_rank)
        return c if s.scale == 1.0 else dataclasses.replace(c, err=c.err * s.scale)

    def _record(self, seconds: float, what: str) -> None:
        """Append the current state (ranks, errors, costs, SR/CR, ‖W − Θ‖/‖W‖) to ``history`` and log it."""
        params, macs = self._totals()
        row = {
            "step": self.steps_done,
            "mu": self.mu,
            "lam": self.lam,
            "ranks": {n: (list(r) if isinstance(r, tuple) else r) for n, r in self.ranks.items()},
            "err": {n: s.err for n, s in self.layers.items()},
            "distance": self.distance(),
            "macs": macs,
            "params": params,
            "sr": self.base_macs / max(macs, 1),
            "cr": self.base_params / max(params, 1),
            "seconds": seconds,
        }
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
        base = self.base_macs if kind == "macs" else self.base_params
        fixed = self.fixed_macs if kind == "macs" else self.fixed_params
        budget = base / self.target - fixed
        if hulls is None:
            hulls = {n: _lower_hull(c, kind) for n, c in cands.items()}
        hulls = {n: hulls[n] for n in cands}
        floor = sum(h[0][0] for h in hulls.values())
        if floor > budget + 1e-9:
            best = base / (fixed + floor)
            raise ValueError(
                f"target {'SR' if kind == 'macs' else 'CR'} {self.target:g} is out of reach: with every compressed "
                f"layer at min_rank={self.min_rank} the model reaches {best:.3g}; lower the target, "
                "compress more layers (include/compress_linear) or lower min_rank"
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
        out = {}
        for name, s in self.layers.items():
            c = self._candidates(s, self._shifted(s))
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
        """Factors rebuilt from Θ alone (not those of the C step's analysis of Z), so that the deployed network
        depends only on the state that checkpoints hold: a run resumed from a checkpoint deploys bit-identically
        to an uninterrupted one."""
        _, factors = s.scheme.project(s.theta, s.rank, None, 0)
        return factors

    def compressed_model(self) -> nn.Module:
        """A new module: a copy of the model with each compressed layer replaced by its factorised form
        built from the last Θ (dense where the dense option won). The original model is left untouched."""
        model = copy.deepcopy(self.model)
        modules = dict(model.named_modules())
        new = {}
        for name, s in self.layers.items():
            if s.rank is not None:
                new[name] = s.scheme.deploy(modules[name], self._factors(s))
        return replace_modules(model, new)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Θ, φ, μ, λ, ranks, step count and history: everything needed to resume bit-identically."""
        return {
            "version": ENGINE_STATE_VERSION,
            "mu": self.mu,
            "lam": self.lam,
            "target": self.target,
            "cost": self.cost_kind,
            "weighting": self.weighting,
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
                }
                for n, s in self.layers.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Raises ``ValueError`` if it belongs to another model or version."""
        if state.get("version") != ENGINE_STATE_VERSION:
            raise ValueError(
                f"engine state version {state.get('version')!r} is not this ltc's ({ENGINE_STATE_VERSION}); "
                "re-run the compression with this version"
            )
        if state.get("cost", self.cost_kind) != self.cost_kind:
            raise ValueError(
                f"this engine state was made with cost={state['cost']!r}, this engine uses cost={self.cost_kind!r}; "
                "build the engine with the same cost"
            )
        if state.get("weighting", self.weighting) != self.weighting:
            raise ValueError(
                f"this engine state was made with weighting={state['weighting']!r}, this engine uses "
                f"weighting={self.weighting!r}; build the engine with the same weighting"
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
        self.mu, self.lam, self.steps_done = float(state["mu"]), float(state["lam"]), int(state["steps_done"])
        self._ranks_changed = bool(state["ranks_changed"])
        self.history = copy.deepcopy(state["history"])

    def assign(self, ranks: dict[str, Rank]) -> None:
        """Set given ranks (``None`` = dense) and project the current weights onto them, bypassing the
        objective. Used by one-shot baselines that pick ranks by another rule."""
        unknown = set(ranks) - set(self.layers)
        if unknown:
            raise ValueError(f"assign(): unknown layers {sorted(unknown)[:5]}")
        t0 = time.perf_counter()
        old = self.ranks
        for name, r in ranks.items():
            s = self.layers[name]
            w = self._shifted(s)
            if r is None:
                s.rank, s.theta, s.err = None, w.clone(), 0.0
            else:
                s.rank = r
                s.theta, _ = s.scheme.project(w, r, None, self.n_iter)
                s.err = float((w - s.theta).square().sum())
        self._ranks_changed = self._ranks_changed or old != self.ranks
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
