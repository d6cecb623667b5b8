"""``ltc.compress``: the ready-made pipeline for users who do not bring their own loop.

Base model in, compressed and fine-tuned model out::

    result = ltc.compress(model, train_loader, val_loader=val_loader, target_sr=5, epochs=15)
    print(result.summary())
    small = result.model

It is a short driver over the one training loop, :func:`ltc.train.fit`: the learning methods (``ltc``, ``lrc``)
run ``steps x epochs_per_step`` epochs of L steps through ``fit`` (extra loss = the engine's penalty, the C step at
the end of every ``epochs_per_step`` epochs, the engine's state in the checkpoint), then every method deploys,
re-estimates BatchNorm, and fine-tunes through ``fit`` again. ``epochs`` is the whole budget: the learning
methods split it into LC and fine-tuning epochs, the others fine-tune for all of it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .batchnorm import recalibrate_batchnorm
from .cost import Profile, format_count, profile
from .engine import EngineSettings
from .latency import check_memory_format, to_memory_format
from .latency_table import RUNTIMES
from .methods import get_method
from .settings import (
    BN_DATA,
    COMPRESS_PENALTY_STEPS,
    LC_LR_SCHEDULES,
    MEMORY_FORMATS,
    MU_PATHS,
    OPTIMIZERS,
    TARGET_SCHEDULES,
    check_choice,
    check_int,
    check_number,
)
from .surgery import unwrap
from .train import current_lr, evaluate, fit, make_optimizer, make_scheduler, read_checkpoint
from .utils import is_main_process, resolve_device, seed_everything

_logger = logging.getLogger("ltc")

__all__ = ["CompressConfig", "EpochPlan", "Result", "compress", "full_ranks", "meet_speedup", "CHECKPOINT_NAME",
           "MAX_PULL"]

CHECKPOINT_NAME = "checkpoint.pt"
WRITER = "ltc.compress"
# settings that decide which ranks a run learns: resuming a checkpoint with other values is refused
_IDENTITY_KEYS = ("method", "lam", "target_sr", "cost", "include", "exclude", "compress_linear", "min_rank",
                  "rank_multiple", "weighting", "metric", "method_options", "steps", "epochs_per_step", "lr",
                  "lr_schedule", "lr_anneal", "penalty_step")
# Largest lr_eff·ρ_k of any layer: SGD with Nesterov momentum 0.9 on the penalty alone is stable up to
# lr·ρ ≈ 1.36, i.e. lr_eff·ρ ≈ 13.6; 2 leaves room for the loss's own curvature.
MAX_PULL = 2.0
_ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineSettings) if f.name != "conv_scheme")


@dataclass(frozen=True)
class EpochPlan:
    """How a run spends its epochs: ``lc_steps`` L steps of ``epochs_per_step`` epochs, then ``finetune``.

    ``epochs_per_step`` below 1 is a fraction of an epoch: each L step trains on the first
    ``ceil(epochs_per_step x batches)`` batches of one freshly shuffled epoch, so the L steps take
    ``lc_steps x epochs_per_step`` epochs of data; a budget (``epochs``) counts them rounded up."""

    lc_steps: int
    epochs_per_step: int | float
    finetune: int

    @property
    def fraction(self) -> float | None:
        """The fraction of an epoch each L step takes, or ``None`` for whole epochs."""
        return float(self.epochs_per_step) if self.epochs_per_step < 1 else None

    @property
    def lc_fit_epochs(self) -> int:
        """The passes :func:`ltc.train.fit` makes in the LC phase: one per L step for a fraction of an epoch."""
        return self.lc_steps if self.fraction is not None else self.lc_steps * int(self.epochs_per_step)

    @property
    def step_fit_epochs(self) -> int:
        """The passes of one L step (a C step follows every this many)."""
        return 1 if self.fraction is not None else int(self.epochs_per_step)

    def lc_epochs_of(self, fit_epochs: int) -> int | float:
        """Epochs of data in ``fit_epochs`` LC passes."""
        return fit_epochs * self.fraction if self.fraction is not None else fit_epochs

    @property
    def lc_epochs(self) -> int | float:
        return self.lc_epochs_of(self.lc_fit_epochs)

    @property
    def total(self) -> int | float:
        return self.lc_epochs + self.finetune

    def describe(self) -> str:
        ft = f"{self.finetune} fine-tuning epoch{'s' * (self.finetune != 1)}"
        if not self.lc_steps:
            return f"{ft} ({self.total} in all)"
        return (f"{self.lc_steps} LC step{'s' * (self.lc_steps != 1)} x {self.epochs_per_step:g} epoch"
                f"{'s' * (self.epochs_per_step != 1)} + {ft} = {self.total:g} epochs")


@dataclass
class CompressConfig:
    """Every knob of :func:`compress`, validated here once (the CLI's YAML ``compress:`` section maps onto it
    one to one; JSON-able).

    Rank selection: ``method``; ``lam``, ``target_sr`` or ``target_speedup`` (exactly one for ``ltc`` / ``lrc`` /
    ``oneshot``; ``target_sr`` or nothing for ``vbmf`` / ``uniform``; ``target_sr`` for ``prune``); ``cost``
    ('macs', 'params', or 'latency': a measured per-layer table, :mod:`ltc.latency_table`, on ``latency_runtime``
    with ``latency_threads`` at ``latency_batch``, in ``latency_memory_format``; default 'latency' with
    ``target_speedup``, else 'macs'); ``latency_memory_format``: the layout the deployed network runs in under eager
    PyTorch, ``'contiguous'`` (NCHW) or ``'channels_last'`` (NHWC, measurably faster for factorised networks on the
    CPU): the latency table, the measured speed-up and the returned model all use it;
    ``target_speedup``: the measured speed-up to reach (:func:`meet_speedup`: the deployed network is timed against
    the base, BatchNorm folded, the table calibrated on the timing and the C step re-targeted while it misses by more
    than 10 %, at most 3 times; before training, so that the L steps aim at the calibrated target and an unreachable
    target is refused on the clock, and again after the L steps; ``Result.speedup`` logs the attempts, the
    pre-training ones under ``"before_training"``);
    layer globs; ``compress_linear``; ``min_rank``; ``rank_multiple`` (ranks multiples of it; default 8 for the
    latency cost, else 1);
    ``n_iter`` (HOOI sweeps); ``weighting`` and ``metric`` (see :class:`~ltc.engine.LCEngine`; ``metric='data'``
    measures errors on ``calibration_images`` images of the calibration data, on their covariance with
    ``centered``, damped by ``damping``); ``method_options`` (e.g.
    ``{"weaken": 0.5}`` for vbmf, ``{"fraction": 0.3}`` for uniform, ``{"round_to": 8}`` for prune).

    Epoch budget: ``epochs`` is the whole budget; the learning methods spend ``steps x epochs_per_step`` of it in
    LC steps and the rest fine-tuning, the others fine-tune for all of it. Without ``epochs``, fine-tuning takes
    ``finetune_epochs`` (default 5) after any LC steps. Giving both is allowed only when they agree.

    LC schedule: μ grows geometrically from ``mu0`` (first L step) to ``mu_final`` (last L step; with
    ``steps=1`` the single L step runs at ``mu_final``). With ``lr_eff = lr/(1 − momentum)``, one L step pulls layer
    ``k``'s gap ``W − Θ`` in by ``exp(-lr_eff·ρ_k·iterations)``; ``mu_cap='layer'`` (default) caps each layer's
    penalty weight at ``ρ_k ≤ 2/lr_eff``, the largest pull SGD follows stably, so that layers with large ``w_k``
    saturate while the others keep growing (``'global'``, the first version of ltc: μ itself is capped so that the
    layer pulled most stays stable, which throttles every other layer; ``'none'``: no cap). ``mu_final=None``
    (default): with ``pull=None`` (default) the layer pulled least reaches the cap in the last L step, so every
    layer ends pinned to its Tucker-2 projection and the deployed Θ is what training reached; with ``pull=p`` (the
    first version: 5) the last L step closes the least-pulled layer's gap by ``e^p`` only. ``mu_growth`` overrides
    the path. ``penalty_step``: ``'gradient'`` adds the penalty to the loss (the cap is then divided by the data
    metric's largest eigenvalue, so that SGD stays stable, and the other directions of ``W − Θ`` are pulled that much
    less); ``'proximal'`` applies its exact step after each optimizer step
    (:meth:`ltc.engine.LCEngine.proximal_step`, stable at any ρ), the cap divided by the metric's *smallest*
    eigenvalue. ``mu_path`` (the automatic path: not with ``mu_final`` or ``mu_growth``): ``'pin'`` (the proximal
    step's default) ends it where the least-pulled layer's least-pulled direction reaches the cap, so that the last L
    step pins every direction; ``'stable'`` (the gradient step's, its only choice) where the least-pulled layer
    reaches it as weighted (``w_k``). Both start at ``mu0``; on VGG-16 (width 0.25, CIFAR-10) the stable path ends
    31x lower (μ 34.3 against 1055.6), the gap growing geometrically from step to step.
    L steps use learning rate ``lr`` (``lr_schedule``: ``'cosine'``, held at ``lr`` for the first ``1 − lr_anneal``
    of the LC epochs and annealed to 0 over the rest (``lr_anneal=1``: cosine over all of them), or ``'restart'``:
    decayed by ``lr_decay`` per epoch and restarted each L step, as in the LC paper's scripts) and weight decay
    ``weight_decay`` on all weights except the compressed layers', which get ``lc_weight_decay`` (their regulariser
    is the penalty). Each pass's penalty weights are divided by its learning rate's fraction of ``lr``
    (:meth:`ltc.engine.LCEngine.set_lr_scale`): an annealed schedule then pulls ``W`` toward ``Θ`` as hard per
    iteration as the μ path says, and the gradient noise that keeps ``W`` off ``Θ`` falls with the learning rate.
    ``skip_converged``: stop the LC steps once ``‖W − Θ‖/‖W‖ < tol`` and ranks are stable (the
    epochs left go to fine-tuning). ``target_schedule`` (budget mode with ``target_sr``): ``'fixed'`` (the SPEC:
    every C step aims at the target) or ``'gradual'``: C step ``j`` (0 = the first, before any L step) aims at
    ``target_sr ** min(1, (j + 1) / steps)``, so the network is compressed a little more at every step and the last L
    step trains at the target (as gradual pruning does; :func:`gradual_targets`).

    Every method: ``recalibrate_bn`` re-estimates BatchNorm statistics after deployment (over ``bn_batches``
    batches, all of them when ``None``, of ``bn_data``: ``'calibration'``, the calibration images without
    augmentation, or ``'train'``, the training batches as augmented for training) before any accuracy is measured;
    ``kd_weight`` in [0, 1] distils from the base network during L steps and fine-tuning (``kd_temperature``; see
    :func:`ltc.train.distillation_loss`). Fine-tuning: ``finetune_lr`` with a cosine schedule.

    Defaults differ from the SPEC where the ablation (``benchmarks/results/quality_summary.md``, resnet34_cifar
    width 0.25 on CIFAR-10, SR 10, 15 epochs) measured better: ``metric='data'`` (SPEC: ``'weight'``),
    ``min_rank=2`` (SPEC: 1), ``kd_weight=0.5``, ``lc_weight_decay=0``, and ``steps=25`` L steps of
    ``epochs_per_step=0.2`` (5 LC epochs, a C step every fifth of an epoch; SPEC: 1-2 epochs per L step), and an
    L-step rate held for 80 % of the LC epochs and annealed over the last 20 % (``lr_schedule='cosine'``,
    ``lr_anneal=0.2``; SPEC: the LC scripts' restarted rate, ``lr_schedule='restart'``), and
    ``penalty_step='proximal'`` (SPEC: the penalty's gradient in the loss, ``'gradient'``). Every SPEC choice stays
    reachable by setting the field.
    """

    method: str = "ltc"
    lam: float | None = None
    target_sr: float | None = None
    target_speedup: float | None = None
    cost: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    compress_linear: bool = False
    min_rank: int = 2
    rank_multiple: int | None = None
    n_iter: int = 0
    weighting: str = "relative"
    metric: str = "data"
    calibration_images: int = 512
    damping: float = 0.01
    centered: bool = True
    penalty_step: str = "proximal"
    method_options: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    steps: int = 25
    epochs_per_step: int | float = 0.2
    finetune_epochs: int | None = None
    mu0: float = 1e-3
    mu_growth: float | None = None
    mu_final: float | None = None
    mu_path: str | None = None
    mu_cap: str = "layer"
    pull: float | None = None
    tol: float = 1e-3
    skip_converged: bool = True
    target_schedule: str = "fixed"
    optimizer: str = "sgd"
    lr: float = 0.01
    lr_schedule: str = "cosine"
    lr_anneal: float = 0.2
    lr_decay: float = 0.99
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lc_weight_decay: float = 0.0
    finetune_lr: float = 0.01
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    latency_runtime: str = "eager"
    latency_threads: int | None = None
    latency_batch: int = 1
    latency_memory_format: str = "contiguous"
    recalibrate_bn: bool = True
    bn_data: str = "calibration"
    bn_batches: int | None = None
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name`` (the CLI's help and the benchmarks quote it rather than repeat it)."""
        return cls.__dataclass_fields__[name].default

    def __post_init__(self) -> None:
        method = get_method(self.method)
        if isinstance(self.include, str):
            self.include = [self.include]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        check_number("target_speedup", self.target_speedup, ge=1, optional=True, what="(a measured speed-up)")
        if self.target_speedup is not None:
            if self.target_sr is not None:
                raise ValueError("give target_sr (MAC speed-up) or target_speedup (measured speed-up), not both")
            if self.cost not in (None, "latency"):
                raise ValueError(f"target_speedup is a budget on measured latency: it needs cost='latency', got "
                                 f"cost={self.cost!r}; drop cost, or give target_sr for a MAC budget")
        if (self.cost == "latency" or self.target_speedup is not None) and method.lam != "required":
            raise ValueError(f"method {self.method!r} has no latency cost; the measured-latency cost and "
                             "target_speedup work with ltc, lrc and oneshot")
        check_choice("latency_runtime", self.latency_runtime, RUNTIMES)
        check_int("latency_threads", self.latency_threads, ge=1, optional=True)
        check_int("latency_batch", self.latency_batch, ge=1)
        check_choice("latency_memory_format", self.latency_memory_format, MEMORY_FORMATS)
        check_memory_format(self.latency_memory_format, self.latency_runtime,
                            names=("latency_memory_format", "latency_runtime"))
        self.penalty_step = check_choice("penalty_step", self.penalty_step, COMPRESS_PENALTY_STEPS)
        EngineSettings(**self._engine_values())  # the engine's own checks: one message per bad value everywhere
        method.check(self.lam, self._target(), self.method_options)
        if method.name == "prune":
            from .methods.prune import require_torch_pruning

            require_torch_pruning()
        check_int("steps", self.steps, ge=1)
        self.epochs_per_step = check_epochs_per_step(self.epochs_per_step)
        check_int("epochs", self.epochs, ge=0, optional=True)
        check_int("finetune_epochs", self.finetune_epochs, ge=0, optional=True)
        check_int("bn_batches", self.bn_batches, ge=1, optional=True)
        check_choice("bn_data", self.bn_data, BN_DATA)
        check_int("seed", self.seed, ge=0)
        check_number("lr", self.lr, gt=0)
        check_number("finetune_lr", self.finetune_lr, gt=0)
        check_number("lr_decay", self.lr_decay, gt=0, le=1)
        check_number("mu_growth", self.mu_growth, ge=1, optional=True, what="(μ increases)")
        check_number("mu_final", self.mu_final, gt=0, optional=True)
        check_number("pull", self.pull, gt=0, optional=True)
        check_choice("mu_cap", self.mu_cap, ("layer", "global", "none"))
        if self.mu_path is not None:
            self.mu_path = check_choice("mu_path", self.mu_path, MU_PATHS)
        if self.mu_path is not None and (self.mu_final is not None or self.mu_growth is not None):
            given = "mu_final" if self.mu_final is not None else "mu_growth"
            raise ValueError(f"mu_path={self.mu_path!r} shapes the automatic μ path and {given} sets the path itself; "
                             f"give one of them")
        if self.penalty_step == "late-proximal" and self.lr_schedule != "cosine":
            raise ValueError("penalty_step='late-proximal' switches to the proximal step where the L-step rate anneals "
                             "(lr_schedule='cosine', the last lr_anneal of the LC epochs); set lr_schedule='cosine' or "
                             "another penalty_step")
        if self.mu_path == "pin" and self.penalty_step == "gradient":
            raise ValueError("mu_path='pin' needs penalty_step='proximal': the gradient step caps each layer's pull by "
                             "its metric's largest eigenvalue, so a path aimed past that only reaches the cap sooner; "
                             "leave mu_path out or set penalty_step='proximal'")
        check_choice("lr_schedule", self.lr_schedule, LC_LR_SCHEDULES)
        check_number("lr_anneal", self.lr_anneal, gt=0, le=1, what="(the share of the LC epochs that anneal)")
        if self.lr_schedule != "cosine" and self.lr_anneal != self.default("lr_anneal"):
            raise ValueError(f"lr_anneal={self.lr_anneal:g} shapes lr_schedule='cosine'; with "
                             f"lr_schedule={self.lr_schedule!r} leave it out")
        check_choice("target_schedule", self.target_schedule, TARGET_SCHEDULES)
        if self.target_schedule == "gradual":
            if self.target_sr is None:
                raise ValueError("target_schedule='gradual' moves a MAC budget step by step: it needs target_sr "
                                 "(not lam or target_speedup); give target_sr, or target_schedule='fixed'")
            if not method.learns:
                raise ValueError(f"target_schedule='gradual' needs a method with L steps (ltc, lrc); method "
                                 f"{self.method!r} picks its ranks once: use target_schedule='fixed'")
        self.optimizer = check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_number("momentum", self.momentum, ge=0, lt=1)
        check_number("weight_decay", self.weight_decay, ge=0)
        check_number("lc_weight_decay", self.lc_weight_decay, ge=0)
        check_number("label_smoothing", self.label_smoothing, ge=0, lt=1)
        check_number("grad_clip", self.grad_clip, gt=0, optional=True)
        check_number("kd_weight", self.kd_weight, ge=0, le=1)
        check_number("kd_temperature", self.kd_temperature, gt=0)
        self.plan()  # an inconsistent epoch budget fails here

    def _engine_values(self) -> dict[str, Any]:
        values = {k: getattr(self, k) for k in _ENGINE_FIELDS if k not in ("mu_growth", "mu_cap")}
        values.update(target_sr=self._target(), cost=self.resolved_cost(), rank_multiple=self.resolved_rank_multiple())
        if self.penalty_step == "late-proximal":  # the engine starts with the gradient step; compress() switches it
            values["penalty_step"] = "gradient"
        return values

    def _target(self) -> float | None:
        return self.target_speedup if self.target_speedup is not None else self.target_sr

    def resolved_cost(self) -> str:
        """``cost``, or its default: ``'latency'`` with ``target_speedup``, else ``'macs'``."""
        return self.cost or ("latency" if self.target_speedup is not None else "macs")

    def resolved_rank_multiple(self) -> int:
        """``rank_multiple``, or its default: 8 for the latency cost (ranks that run fast), else 1."""
        if self.rank_multiple is not None:
            return self.rank_multiple
        return 8 if self.resolved_cost() == "latency" else 1

    def plan(self) -> EpochPlan:
        """The epochs each phase takes (see the class docstring); a ``ValueError`` when they cannot add up."""
        lc_steps = self.steps if get_method(self.method).learns else 0
        lc = whole(lc_steps * self.epochs_per_step)  # a fraction of an epoch counts as a whole one
        if self.epochs is None:
            return EpochPlan(lc_steps, self.epochs_per_step, 5 if self.finetune_epochs is None else
                             self.finetune_epochs)
        ft = self.epochs - lc
        if ft < 0:
            raise ValueError(f"epochs={self.epochs} is less than the LC steps' {lc} (steps={self.steps} x "
                             f"epochs_per_step={self.epochs_per_step}); raise epochs or lower steps")
        if self.finetune_epochs is not None and self.finetune_epochs != ft:
            raise ValueError(f"finetune_epochs={self.finetune_epochs} does not add up with epochs={self.epochs} "
                             f"({lc} LC epochs + {ft} fine-tuning); give one of them")
        return EpochPlan(lc_steps, self.epochs_per_step, ft)

    def resolved_mu_path(self) -> str:
        """``mu_path``, or its default for ``penalty_step``: ``'pin'`` for the proximal step, ``'stable'`` for the
        gradient one."""
        return self.mu_path or ("pin" if self.penalty_step == "proximal" else "stable")

    def proximal_from(self, passes: int) -> int:
        """The first of ``passes`` LC passes (0-based) whose penalty is applied by its proximal step: 0 for
        ``'proximal'``, the first annealed pass for ``'late-proximal'`` (:func:`anneal_passes`), ``passes`` (none)
        for ``'gradient'``."""
        if self.penalty_step == "late-proximal":
            return passes - anneal_passes(passes, self.lr_anneal)
        return 0 if self.penalty_step == "proximal" else passes

    def engine_kwargs(self) -> dict[str, Any]:
        """The settings the method's ``build`` takes (the engine's and the method's own options)."""
        return {**self._engine_values(), **self.method_options}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage_target(self, c_step: int) -> float | None:
        """The target C step ``c_step`` aims at (0 = the first C step, before any L step): ``target_sr`` itself, or
        its gradual schedule's stage (see :func:`gradual_targets`)."""
        if self.target_schedule != "gradual" or self.target_sr is None:
            return self._target()
        return gradual_targets(self.target_sr, self.steps)[min(c_step, self.steps)]

    def lr_eff(self, lr: float | None = None) -> float:
        """The step size of plain gradient descent that SGD with momentum ``m`` and rate ``lr`` (default: the
        config's) amounts to."""
        lr = self.lr if lr is None else lr
        return lr / (1.0 - self.momentum) if self.optimizer == "sgd" else lr

    def schedule(self, iters_per_epoch: int | None, scale_range: tuple[float, float]) -> dict[str, float | None]:
        """The μ path for an engine whose layer weights span ``scale_range``: ``{mu0, mu_growth, mu_final,
        mu_cap}`` (see the class docstring)."""
        lr_eff = self.lr_eff()
        w_min, w_max = scale_range
        iters = max(1, (iters_per_epoch or 100) * self.epochs_per_step)
        cap = MAX_PULL / lr_eff if self.mu_cap == "layer" else None
        if self.mu_growth is not None:
            mu0 = self.mu0
            mu_final = mu0 * self.mu_growth ** (self.steps - 1)
            return {"mu0": mu0, "mu_growth": self.mu_growth, "mu_final": mu_final, "mu_cap": cap}
        mu_final = self.mu_final
        if mu_final is None:
            # pull=None: every layer ends at the stability cap (the layer pulled least reaches it in the last L step)
            mu_final = MAX_PULL / (lr_eff * w_min) if self.pull is None else self.pull / (lr_eff * iters * w_min)
            if self.mu_cap == "global":
                mu_final = min(mu_final, MAX_PULL / (lr_eff * w_max))
        mu_final = max(float(mu_final), self.mu0) if self.steps > 1 else float(mu_final)
        mu0 = self.mu0 if self.steps > 1 else mu_final
        growth = (mu_final / mu0) ** (1.0 / (self.steps - 1)) if self.steps > 1 else 1.0
        return {"mu0": mu0, "mu_growth": growth, "mu_final": mu_final, "mu_cap": cap}


def whole(x: float) -> int:
    """``ceil(x)``, blind to float round-off (``5 x 0.2`` is 1 whole epoch, not 2)."""
    return math.ceil(round(x, 9))


def check_epochs_per_step(value: Any) -> int | float:
    """``value`` as a whole number of epochs (an int >= 1) or a fraction of one (a float in (0, 1)); a ``ValueError``
    naming both forms otherwise."""
    check_number("epochs_per_step", value, gt=0)
    if value >= 1 and float(value).is_integer():
        return int(value)
    if value < 1:
        return float(value)
    raise ValueError(f"epochs_per_step must be a whole number of epochs (>= 1) or a fraction of one in (0, 1), "
                     f"got {value!r}")


def gradual_targets(target: float, steps: int) -> list[float]:
    """The targets of a gradual schedule for C steps ``0..steps``: ``target ** min(1, (j + 1) / steps)``, geometric
    from ``target ** (1/steps)`` up to ``target``, reached at C step ``steps - 1`` so that the last L step trains
    toward the final ranks."""
    check_number("target", target, ge=1)
    check_int("steps", steps, ge=1)
    return [float(target) ** min(1.0, (j + 1) / steps) for j in range(steps + 1)]


def full_ranks(compression: Any) -> dict[str, Any]:
    """``{name: (S, T)}`` for Tucker-2 layers, ``{name: full rank}`` for matrix/SVD layers (engines), or the
    compression's own ``full_ranks`` (channel pruning)."""
    if hasattr(compression, "full_ranks") and not callable(compression.full_ranks):
        return dict(compression.full_ranks)
    out: dict[str, Any] = {}
    for name, s in compression.layers.items():
        full = s.scheme.full_rank(s.module)
        out[name] = tuple(full) if len(full) == 2 else int(full[0])
    return out


@dataclass
class Result:
    """What :func:`compress` returns. MACs are per sample; SR and CR are theoretical (from the profiles);
    accuracies are fractions in [0, 1]; ``w_theta_final`` is ``‖W − Θ‖/‖W‖`` at the last C step (learning
    methods only)."""

    model: nn.Module
    method: str
    ranks: dict[str, Any]
    full_ranks: dict[str, Any]
    lam: float
    target_sr: float | None
    base: Profile
    compressed: Profile
    base_acc: float | None
    acc_before_finetune: float | None
    acc: float | None
    history: list[dict[str, Any]]
    log: list[dict[str, Any]]
    config: dict[str, Any]
    plan: dict[str, int] = field(default_factory=dict)
    w_theta_final: float | None = None
    speedup: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def sr(self) -> float:
        return self.base.macs / max(self.compressed.macs, 1)

    @property
    def cr(self) -> float:
        return self.base.params / max(self.compressed.params, 1)

    def summary(self) -> str:
        """A slides-style table: base and compressed MACs, SR, params, CR, accuracy."""

        def pct(a: float | None) -> str:
            return "—" if a is None else f"{100 * a:.2f}"

        rows = [
            ("base", self.base.macs, 1.0, self.base.params, 1.0, pct(self.base_acc)),
            (self.method, self.compressed.macs, self.sr, self.compressed.params, self.cr, pct(self.acc)),
        ]
        lines = ["| model | MACs | SR | params | CR | acc (%) |", "|---|---|---|---|---|---|"]
        for name, macs, sr, params, cr, acc in rows:
            lines.append(f"| {name} | {format_count(macs)} | {sr:.2f} | {format_count(params)} | {cr:.2f} | {acc} |")
        if self.acc_before_finetune is not None:
            lines.append(f"\naccuracy before fine-tuning (BatchNorm re-estimated): {pct(self.acc_before_finetune)} %")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (no tensors, no model)."""

        def jr(r: Any) -> Any:
            return list(r) if isinstance(r, tuple) else r

        return {
            "method": self.method,
            "lam": self.lam,
            "target_sr": self.target_sr,
            "sr": self.sr,
            "cr": self.cr,
            "base": {"macs": self.base.macs, "params": self.base.params, "acc": self.base_acc},
            "compressed": {
                "macs": self.compressed.macs,
                "params": self.compressed.params,
                "acc": self.acc,
                "acc_before_finetune": self.acc_before_finetune,
            },
            "ranks": {n: jr(r) for n, r in self.ranks.items()},
            "full_ranks": {n: jr(r) for n, r in self.full_ranks.items()},
            "plan": dict(self.plan),
            "w_theta_final": self.w_theta_final,
            "speedup": dict(self.speedup),
            "history": self.history,
            "log": self.log,
            "config": self.config,
            "seconds": self.seconds,
        }


def _config(config: CompressConfig | None, kwargs: dict[str, Any]) -> CompressConfig:
    if config is None:
        return CompressConfig(**kwargs)
    return dataclasses.replace(config, **kwargs) if kwargs else config


def _identity(cfg: CompressConfig, model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: the rank-deciding settings and the base model
    (parameter shapes and a checksum of its weights)."""
    now = json.loads(json.dumps(cfg.to_dict(), default=str))
    state = unwrap(model).state_dict()
    return {
        "settings": {k: now[k] for k in _IDENTITY_KEYS},
        "base_shapes": {k: list(v.shape) for k, v in state.items()},
        "base_sum": float(sum(float(v.double().abs().sum()) for v in state.values() if v.is_floating_point())),
    }


def _check_resume(path: Path, cfg: CompressConfig, model: nn.Module) -> dict[str, Any]:
    """Read the run's checkpoint and refuse it when it belongs to another method, setting or base model."""
    ckpt = read_checkpoint(path, writer=WRITER)
    saved, now = (ckpt.get("extra") or {}).get("run") or {}, _identity(cfg, model)
    if saved.get("base_shapes") != now["base_shapes"]:
        diff = [k for k in now["base_shapes"] if saved.get("base_shapes", {}).get(k) != now["base_shapes"][k]]
        raise ValueError(
            f"checkpoint {path} belongs to another model (parameters {', '.join(diff[:3])} have other shapes or "
            "are missing); resume it with the base model it was started from, or start afresh without resume"
        )
    s_old, s_new = saved.get("settings", {}), now["settings"]
    diff = [k for k in _IDENTITY_KEYS if s_old.get(k) != s_new[k]]
    if diff:
        pairs = ", ".join(f"{k}: {s_old.get(k)!r} -> {s_new[k]!r}" for k in diff)
        raise ValueError(f"checkpoint {path} belongs to a run with other settings ({pairs}); resume with the run's "
                         "settings, or start afresh in another checkpoint dir")
    if not math.isclose(saved.get("base_sum", 0.0), now["base_sum"], rel_tol=1e-9):
        raise ValueError(f"checkpoint {path} was started from other base weights; resume it with the base model it "
                         "was started from, or start afresh without resume")
    return ckpt


def compress(
    model: nn.Module,
    train_loader: Iterable[Any],
    *,
    example_input: Tensor | None = None,
    val_loader: Iterable[Any] | None = None,
    calibration_loader: Iterable[Any] | None = None,
    config: CompressConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    base_acc: float | None = None,
    **kwargs: Any,
) -> Result:
    """Compress a trained ``model`` with a method (default ``'ltc'``) and fine-tune it.

    Args:
        model: the trained base network; it is not modified (a copy is trained). It is the distillation
            teacher when ``kd_weight > 0``.
        train_loader: batches ``(x, y)`` for the L steps and fine-tuning. Under torchrun give each process its
            share (a ``DistributedSampler``): training runs DDP-wrapped, C steps use rank 0's result, only rank 0
            writes.
        example_input: one input batch ``(N, C, H, W)`` to record layer sizes; default: the first batch.
        val_loader: if given, accuracies (fractions in [0, 1]) are measured for the base, right after deployment
            (BatchNorm re-estimated) and after fine-tuning.
        calibration_loader: training batches without augmentation, for BatchNorm re-estimation and the data
            metric; default ``train_loader``.
        config / kwargs: a :class:`CompressConfig`, or its fields as keyword arguments (``target_sr=5,
            epochs=15, ...``); kwargs override the config's fields.
        checkpoint_dir: if given, an atomic checkpoint is written after every epoch (only on the main process);
            ``resume=True`` continues from it (bit-identically on CPU). A checkpoint of another method, model,
            base weights or rank setting is refused with a ``ValueError``.
        base_acc: the base model's validation accuracy if already known (skips one evaluation).

    Raises:
        ValueError: a bad setting, layer glob or unreachable target (before any training), or an unusable
            checkpoint on resume.
        NonFiniteLossError: a batch loss or the weights became NaN/inf; the last checkpoint is left as it was.
    """
    cfg = _config(config, kwargs)
    method, plan = get_method(cfg.method), cfg.plan()
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    work = copy.deepcopy(unwrap(model)).to(device)
    if example_input is None:
        example_input = next(iter(train_loader))[0][:1]
    example_input = example_input.to(device)
    calib = calibration_loader if calibration_loader is not None else train_loader
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and ckpt_path is None:
        raise ValueError("resume=True needs checkpoint_dir (the folder of the run to continue)")
    ckpt = _check_resume(ckpt_path, cfg, work) if resume and ckpt_path is not None and ckpt_path.exists() else None
    if resume and ckpt is None:
        _logger.info("ltc: resume=True but there is no checkpoint at %s yet; starting the run from the beginning",
                     ckpt_path)
    stage = ckpt["stage"] if ckpt is not None else None
    identity = _identity(cfg, work)
    teacher = _teacher(model, device) if cfg.kd_weight > 0 else None
    base_prof = profile(work, example_input)
    table = _latency_table(work, example_input, cfg, progress) if cfg.resolved_cost() == "latency" else None
    comp = method.build(work, example_input, calibration=calib, latency_table=table, **cfg.engine_kwargs())
    if plan.lc_steps:
        pulls = comp.floor_range if cfg.resolved_mu_path() == "pin" else comp.scale_range
        sched = cfg.schedule(_len(train_loader), pulls)
        comp.set_schedule(**{k: v for k, v in sched.items() if k != "mu_final"})
    speed: dict[str, Any] = {}
    if ckpt is None and cfg.target_speedup is not None:
        # calibrate the table on the clock before any training: the L steps aim at the table target that measures
        # target_speedup on the base weights, and an unreachable target is refused on a measurement
        speed = _meet(comp, model, example_input, cfg, refuse=True)
    elif ckpt is None:
        comp.start()  # the first C step (or the rank rule) checks the target's reachability before any training
        if plan.lc_steps and cfg.target_schedule == "gradual":  # its first stage, from the same weights
            comp.retarget(cfg.stage_target(0))
    if base_acc is None and val_loader is not None:
        base_acc = (ckpt["extra"] or {}).get("base_acc") if ckpt is not None else _acc(work, val_loader, device, cfg)
    if progress and is_main_process():
        print(f"[{cfg.method}] epochs: {plan.describe()}", flush=True)
    common = {"device": device, "amp": cfg.amp, "channels_last": cfg.channels_last, "grad_clip": cfg.grad_clip,
              "label_smoothing": cfg.label_smoothing, "teacher": teacher, "kd_weight": cfg.kd_weight,
              "kd_temperature": cfg.kd_temperature, "checkpoint_path": ckpt_path, "writer": WRITER, "seed": cfg.seed,
              "progress": progress}
    log = _MemoryLog()

    def extra(more: dict[str, Any] | None = None) -> Any:
        def get() -> dict[str, Any]:
            return {"run": identity, "base_acc": base_acc, "compression": comp.state_dict(), "log": log.rows,
                    **(more or {})}
        return get

    def restore(state: dict[str, Any]) -> None:
        try:
            if cfg.penalty_step == "late-proximal":  # the step the interrupted run had reached
                comp.set_penalty_step(state["compression"].get("penalty_step", "gradient"))
            comp.load_state_dict(state["compression"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint {ckpt_path}: {exc}") from None
        log.rows[:] = list(state.get("log") or [])

    # ---------------------------------------------------------------- LC steps (learning methods only)
    lc_done = 0
    if plan.lc_steps and stage != "finetune":
        if cfg.penalty_step == "late-proximal" and ckpt is None:
            comp.set_penalty_step(_step_of_pass(cfg, plan, 0))
        lc_loader = train_loader if plan.fraction is None else FirstBatches(train_loader, plan.fraction)
        lc_opt = _lc_optimizer(work, comp, cfg)
        lc_hist = fit(work, lc_loader, val_loader, epochs=plan.lc_fit_epochs, stage="lc", resume=ckpt is not None,
                      extra_state=(extra(), restore), **_penalty_hooks(comp, cfg, lc_opt),
                      on_epoch_end=_c_step_hook(comp, cfg, plan, lc_opt), describe=_lc_label(plan),
                      log=log, optimizer=lc_opt, scheduler=None, **common,
                      **_lc_scheduler_kw(cfg, plan))
        lc_done = len(lc_hist)
    elif stage == "finetune":
        restore(ckpt["extra"])  # type: ignore[index]
        lc_done = int(ckpt["extra"].get("lc_epochs_done", plan.lc_fit_epochs))  # type: ignore[index]

    # ---------------------------------------------------------------- deploy, re-estimate BatchNorm, fine-tune
    if stage == "finetune":
        speed = dict(ckpt["extra"].get("speedup") or {})  # type: ignore[index]
    elif cfg.target_speedup is not None and (plan.lc_steps or ckpt is not None):  # the L steps moved the ranks
        before = speed
        speed = _meet(comp, model, example_input, cfg)
        if before:
            speed["before_training"] = before
    small = comp.compressed_model().to(device)
    if stage == "finetune":
        acc_before = ckpt["extra"].get("acc_before")  # type: ignore[index]
    else:
        if cfg.recalibrate_bn:
            recalibrate_batchnorm(small, train_loader if cfg.bn_data == "train" else calib, cfg.bn_batches)
        acc_before = _acc(small, val_loader, device, cfg)
    # LC epochs skipped once converged go to fine-tuning (whole epochs: a fraction of one is counted as one)
    lc_epochs = plan.lc_epochs_of(lc_done)
    ft_epochs = plan.finetune + whole(plan.lc_epochs) - whole(lc_epochs)
    opt = make_optimizer(small, name=cfg.optimizer, lr=cfg.finetune_lr, momentum=cfg.momentum,
                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    fit(small, train_loader, val_loader, epochs=ft_epochs, stage="finetune", resume=stage == "finetune",
        optimizer=opt, scheduler=make_scheduler(opt, "cosine", epochs=max(ft_epochs, 1)), epoch_offset=lc_done,
        # "lc_epochs_done" counts LC passes of fit (a fraction of an epoch each with epochs_per_step < 1)
        extra_state=(extra({"acc_before": acc_before, "lc_epochs_done": lc_done, "speedup": speed}), restore),
        on_epoch_end=lambda e, row: {"phase": "finetune", "epoch": lc_done + e},  # rows count the whole run
        describe=lambda e: f"fine-tuning epoch {e + 1}/{ft_epochs}", log=log, **common)
    acc = _acc(small, val_loader, device, cfg)
    if cfg.latency_memory_format != "contiguous":
        to_memory_format(small, cfg.latency_memory_format)  # the layout its speed was measured in
    history = getattr(comp, "history", [])
    learned = method.learns and bool(history)
    return Result(
        model=small, method=cfg.method, ranks=dict(comp.ranks), full_ranks=full_ranks(comp), lam=comp.lam,
        target_sr=cfg.target_sr, base=base_prof, compressed=profile(small, example_input), base_acc=base_acc,
        acc_before_finetune=acc_before, acc=acc, history=history, log=log.rows, config=cfg.to_dict(),
        plan={"lc_steps": plan.lc_steps, "epochs_per_step": plan.epochs_per_step, "lc_epochs": lc_epochs,
              "finetune": ft_epochs, "total": lc_epochs + ft_epochs},
        w_theta_final=history[-1]["distance"] if learned else None, speedup=speed,
        seconds=time.perf_counter() - t_start,
    )


class _MemoryLog:
    """Per-epoch rows kept in memory for :func:`fit` (they travel in the checkpoint and end in ``Result.log``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))

    def truncate(self, n: int) -> None:
        del self.rows[n:]


def _c_step_hook(comp: Any, cfg: CompressConfig, plan: EpochPlan, optimizer: torch.optim.Optimizer) -> Any:
    """The end-of-epoch hook of the LC phase: a C step after every ``epochs_per_step`` epochs, then the penalty
    scaled to the learning rate of the next pass (the scheduler has stepped already; ``LCEngine.set_lr_scale``)."""

    def hook(epoch: int, row: dict[str, Any]) -> dict[str, Any] | None:
        out = _c_step(epoch, row)
        lr = current_lr(optimizer)
        if epoch < plan.lc_fit_epochs and lr > 0:  # after the last pass a cosine schedule has reached 0
            comp.set_lr_scale(lr / cfg.lr)
        if cfg.penalty_step == "late-proximal":  # the step of the next pass
            comp.set_penalty_step(_step_of_pass(cfg, plan, epoch))
        return out

    def _c_step(epoch: int, row: dict[str, Any]) -> dict[str, Any] | None:
        out: dict[str, Any] = {"phase": "lc", "mu": comp.mu}
        if epoch % plan.step_fit_epochs:
            return out
        c_step = epoch // plan.step_fit_epochs
        target = cfg.stage_target(c_step)
        comp.step(target if cfg.target_schedule == "gradual" else None)
        h = comp.history[-1]
        out.update({"step": h["step"], "sr": h["sr"], "lam": h["lam"], "distance": h["distance"]})
        if cfg.target_schedule == "gradual":
            out["target"] = target
        final = target == cfg._target()  # a gradual schedule does not stop before it reaches the target
        if cfg.skip_converged and final and comp.converged and epoch < plan.lc_fit_epochs:
            out["stop"] = True
        return out

    return hook


def _step_of_pass(cfg: CompressConfig, plan: EpochPlan, index: int) -> str:
    """How LC pass ``index`` (0-based) applies the penalty."""
    return "proximal" if index >= cfg.proximal_from(plan.lc_fit_epochs) else "gradient"


def _lc_optimizer(model: nn.Module, comp: Any, cfg: CompressConfig) -> torch.optim.Optimizer:
    """The L steps' optimizer: the compressed layers' weights get ``lc_weight_decay``, the rest ``weight_decay``."""
    held = {id(p) for p in comp.decayed_parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) in held], "weight_decay": cfg.lc_weight_decay},
              {"params": [p for p in model.parameters() if id(p) not in held]}]
    return make_optimizer(groups, name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)


def _penalty_hooks(comp: Any, cfg: CompressConfig, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """How the L steps apply the penalty: ``fit``'s ``extra_loss`` (gradient) or ``after_step`` (proximal, with the
    optimizer's effective step at its current rate)."""
    if cfg.penalty_step == "gradient":
        return {"extra_loss": comp.penalty}

    def proximal() -> None:
        comp.proximal_step(cfg.lr_eff(current_lr(optimizer)))

    if cfg.penalty_step == "proximal":
        return {"after_step": proximal}
    # 'late-proximal': whichever step the engine is set to for this pass (_c_step_hook switches it)
    return {"extra_loss": lambda: comp.penalty() if comp.penalty_step == "gradient" else 0.0,
            "after_step": lambda: proximal() if comp.penalty_step == "proximal" else None}


def anneal_passes(passes: int, share: float) -> int:
    """How many of the ``passes`` LC passes the cosine of ``lr_schedule='cosine'`` spans (the passes before it run at
    ``lr``): ``share x passes`` rounded half up, at least 2 (a cosine's first pass runs at the full rate, so a span of
    one would anneal nothing) and at most ``passes``. 25 passes, share 0.2: the last 5, at 1, 0.90, 0.65, 0.35 and
    0.10 of ``lr``."""
    return min(passes, max(2, math.floor(round(share * passes, 9) + 0.5)))


def _lc_scheduler_kw(cfg: CompressConfig, plan: EpochPlan) -> dict[str, Any]:
    if cfg.lr_schedule == "cosine":  # held at lr, then annealed over the last lr_anneal of the LC passes
        hold = plan.lc_fit_epochs - anneal_passes(plan.lc_fit_epochs, cfg.lr_anneal)
        return {"sched_cfg": {"name": "cosine", "epochs": plan.lc_fit_epochs, "hold_epochs": hold}}
    return {"sched_cfg": {"name": "exp", "gamma": cfg.lr_decay, "epochs": plan.step_fit_epochs,
                          "cycle": plan.step_fit_epochs}}


def _lc_label(plan: EpochPlan) -> Any:
    """Names LC pass ``e`` (0-based) in progress messages."""
    if plan.fraction is not None:
        return lambda e: f"L step {e + 1}/{plan.lc_steps} ({plan.fraction:g} epoch)"
    n = plan.step_fit_epochs
    return lambda e: f"L step {e // n + 1}/{plan.lc_steps}, epoch {e % n + 1}/{n}"


class FirstBatches:
    """The first ``ceil(fraction x len(loader))`` batches of each pass over ``loader`` (at least one): an L step of a
    fraction of an epoch. Everything else (``sampler``, ``generator``, ...) is the loader's, so :func:`fit` seeds each
    pass's order as it seeds a whole epoch and a resumed run sees the same batches."""

    def __init__(self, loader: Iterable[Any], fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        n = _len(loader)
        if n is None:
            raise ValueError("an L step of a fraction of an epoch needs a loader with a length (len(loader))")
        self.loader, self.batches = loader, max(1, whole(fraction * n))

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.loader), self.batches)

    def __getattr__(self, name: str) -> Any:  # only called for names not found on the wrapper itself
        try:
            loader = self.__dict__["loader"]
        except KeyError:  # not initialised yet (copy, pickle): behave as a plain object would
            raise AttributeError(name) from None
        return getattr(loader, name)


SPEEDUP_TOLERANCE = 0.10  # a measured speed-up this far from target_speedup triggers a correction
MAX_CORRECTIONS = 3


def _latency_table(model: nn.Module, example_input: Tensor, cfg: CompressConfig, progress: bool) -> Any:
    """The measured-latency table of the base model on the run's runtime, threads and batch (cached on disk), for
    the layers the run compresses (the others only count in the whole model's time)."""
    from .engine import select_layers
    from .latency_table import LatencyTable

    layers, _ = select_layers(model, cfg.include, cfg.exclude, cfg.compress_linear)
    return LatencyTable.build(model, example_input, runtime=cfg.latency_runtime, threads=cfg.latency_threads,
                              layers=layers, memory_format=cfg.latency_memory_format,
                              batch=cfg.latency_batch, rank_multiple=cfg.resolved_rank_multiple(),
                              conv_scheme="matrix" if cfg.method == "lrc" else "tucker2",
                              progress=progress and is_main_process())


def _meet(comp: Any, base: nn.Module, example_input: Tensor, cfg: CompressConfig, refuse: bool = False) -> Any:
    return meet_speedup(comp, base, example_input, cfg.target_speedup, runtime=cfg.latency_runtime,
                        threads=cfg.latency_threads, batch=cfg.latency_batch,
                        memory_format=cfg.latency_memory_format, refuse=refuse)


def _timed_on_rank0(comp: Any, timing: dict[str, Any]) -> dict[str, Any]:
    """Under ``torch.distributed`` every process adopts rank 0's timing, so that all take the same decisions (the
    processes share the machine: their own timings differ)."""
    from .utils import world_size

    if world_size() == 1:
        return timing
    dev = next(iter(comp.layers.values())).theta.device
    t = torch.tensor([timing["speedup"], timing["base_ms"], timing["compressed_ms"]], dtype=torch.float64,
                     device=dev)
    torch.distributed.broadcast(t, src=0)
    sp, b, c = t.tolist()
    return {**timing, "speedup": sp, "base_ms": b, "compressed_ms": c}


def meet_speedup(comp: Any, base: nn.Module, example_input: Tensor, target: float, *, runtime: str = "eager",
                 threads: int | None = None, batch: int = 1, repeats: int | None = None,
                 memory_format: str = "contiguous", refuse: bool = False, confirm: bool = True) -> dict[str, Any]:
    """Make a budget-mode latency engine's deployed network reach ``target`` measured speed-up over ``base``.

    Times the deployed network against the base (interleaved, BatchNorm folded, ``runtime`` with ``threads`` at
    ``batch``, both in ``memory_format``; under ``torch.distributed`` rank 0's timing counts). While the measured
    speed-up misses ``target`` by more than 10 %, the table is calibrated on the last measurement
    (:func:`ltc.latency_table.savings_scale`: measured time = base − b · the table's saving) and the C step
    re-targeted at the table speed-up that gives ``target`` under it (:func:`ltc.latency_table.table_target`), at
    most :data:`MAX_CORRECTIONS` times, stopping when the ranks repeat. With ``confirm`` (default) a timing within
    10 % is not taken on its own: the network is timed a second time, independently, and its measured speed-up is
    the geometric mean of the two (``attempts[k]["timings"]``), which must be within 10 % too; a network is never
    accepted on one lucky timing (the loop keeps the closest of several noisy attempts, so a single timing of the
    kept network over-states how close it is). A calibrated target beyond the table's
    reach deploys the table's fastest configuration instead (once).

    An engine that has not started is started at ``target``; when the table alone says ``target`` is out of reach it
    is started at the table's fastest configuration, so reachability is decided on the clock: with ``refuse=True``
    (``ltc.compress`` before training) a ``ValueError`` names the best measured speed-up when the fastest
    configuration was timed and every attempt misses ``target`` by more than 10 %. The attempt closest to the target
    is kept (the engine is returned to its choice). Returns ``{"target", "predicted", "measured", "corrections",
    "chosen_attempt", "attempts": [...], "stopped", "table_refused", "table_best", "runtime", "memory_format"}``
    (``predicted``: the table's uncalibrated prediction; ``stopped``: why corrections ended before the target was
    met, else ``None``; ``table_refused``: the table alone put ``target`` out of reach; ``table_best``: the table's
    fastest predicted speed-up once the loop needed it, else ``None``). ``repeats``: interleaved runs per timing;
    default :func:`ltc.latency.default_repeats` (20 in eager PyTorch, 100 under ONNX Runtime, whose timings are
    noisier)."""
    from .engine import UnreachableTarget
    from .latency import compare_latency, default_repeats
    from .latency_table import savings_scale, table_target

    target = float(target)
    repeats = default_repeats(runtime) if repeats is None else int(repeats)
    x = example_input[:1].expand(batch, *example_input.shape[1:]).contiguous().cpu()
    ref = copy.deepcopy(unwrap(base)).cpu().eval()
    table_best: float | None = None
    fastest: dict[str, Any] | None = None  # the ranks of the table's fastest configuration, once deployed

    def to_fastest(best: float) -> None:
        nonlocal table_best, fastest
        table_best = best
        comp.retarget(max(1.0, best))  # the budget check has slack for rounding: exactly the fastest is in reach
        fastest = dict(comp.ranks)

    def timed(small: nn.Module) -> dict[str, Any]:
        return _timed_on_rank0(comp, compare_latency(ref, small, x, threads=threads, repeats=repeats, fold_bn=True,
                                                     runtime=runtime, memory_format=memory_format))

    table_refused = False
    if not comp.started:
        try:
            comp.retarget(target)
        except UnreachableTarget as exc:
            table_refused = True
            to_fastest(exc.best)
    attempts: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    choices: list[dict[str, Any]] = []
    stopped: str | None = None
    changed = False  # whether a C step ran after the last timing
    for i in range(MAX_CORRECTIONS + 1):
        small = comp.compressed_model().cpu().eval()
        lat = timed(small)
        timings = [lat["speedup"]]
        if confirm and abs(lat["speedup"] / target - 1) <= SPEEDUP_TOLERANCE:  # within reach: time it again
            again = timed(small)
            timings.append(again["speedup"])
            lat = {k: math.sqrt(lat[k] * again[k]) for k in ("speedup", "base_ms", "compressed_ms")}
        p, s = comp.predicted_speedup, lat["speedup"]
        attempts.append({"engine_target": comp.target, "predicted": p, "measured": s, "timings": timings,
                         "base_ms": lat["base_ms"], "compressed_ms": lat["compressed_ms"], "sr": comp.sr,
                         "scale": savings_scale(p, s)})
        seen.append(dict(comp.ranks))
        choices.append(comp.choice())
        stopped, changed = None, False
        if abs(s / target - 1) <= SPEEDUP_TOLERANCE:
            break
        if i == MAX_CORRECTIONS:
            stopped = f"{MAX_CORRECTIONS} corrections made"
            break
        scale = attempts[-1]["scale"]
        changed = True
        try:
            comp.retarget(min(max(1.0, table_target(target, scale)), 1e12))  # inf: no table speed-up gives it
        except UnreachableTarget as exc:  # beyond the table: its fastest configuration, measured once
            stopped = (f"calibrated on the clock (measured saving = {scale:.2f} x the table's), {target:g}x is "
                       f"beyond the table's fastest configuration ({exc.best:.2f}x predicted)")
            if fastest is not None and fastest in seen:
                break
            to_fastest(exc.best)
        if dict(comp.ranks) in seen:  # the grid has no point in between: no progress left
            stopped = stopped or "the correction gave ranks already timed"
            break
    best = min(range(len(attempts)), key=lambda k: abs(attempts[k]["measured"] / target - 1))
    reached = max(a["measured"] for a in attempts)
    if refuse and fastest is not None and fastest in seen and reached < target * (1 - SPEEDUP_TOLERANCE):
        timed = "the network" if len(attempts) == 1 else f"the fastest of the {len(attempts)} networks"
        raise ValueError(
            f"target_speedup {target:g} is out of reach on this machine: {timed} timed, with the latency table's "
            f"fastest configuration (every compressed layer at its fastest option, predicted {table_best:.2f}x) "
            f"among them, measures {reached:.2f}x ({runtime}, {memory_format}, batch {batch}); lower the target to "
            f"at most {reached:.2f}, compress more layers (include/compress_linear) or lower min_rank")
    if best != len(attempts) - 1 or changed:  # back to the attempt kept, whatever C steps came after it
        comp.restore_choice(choices[best])
    chosen = attempts[best]
    return {"target": target, "predicted": chosen["predicted"], "measured": chosen["measured"],
            "corrections": len(attempts) - 1, "chosen_attempt": best, "attempts": attempts,
            "stopped": stopped, "table_refused": table_refused, "table_best": table_best, "runtime": runtime,
            "memory_format": memory_format}


def _teacher(model: nn.Module, device: torch.device) -> nn.Module:
    t = copy.deepcopy(unwrap(model)).to(device).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def _len(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:  # an iterable-style loader has no length
        return None


def _acc(model: nn.Module, loader: Iterable[Any] | None, device: torch.device, cfg: CompressConfig) -> float | None:
    if loader is None:
        return None
    return float(evaluate(model, loader, device=device, amp=cfg.amp, channels_last=cfg.channels_last).acc)
