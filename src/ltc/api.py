"""``ltc.compress``: the ready-made loop for users who do not bring their own.

Base model in, compressed and fine-tuned model out::

    result = ltc.compress(model, train_loader, example_input=x, target_sr=5, steps=10,
                          epochs_per_step=1, finetune_epochs=5, val_loader=val_loader)
    print(result.summary())
    small = result.model

The learning methods (``ltc``, ``lrc``) spend ``steps × epochs_per_step`` epochs in LC steps (L step: SGD on
``loss + penalty()``, lr restarted each step and decayed per epoch; then the C step) and ``finetune_epochs``
fine-tuning the compressed network with ranks fixed. One-shot methods (``oneshot``, ``vbmf``, ``uniform``)
spend the same total epoch budget on fine-tuning (``equal_budget=True``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .cost import Profile, format_count, profile
from .engine import WEIGHTINGS, LCEngine
from .methods import get_method
from .surgery import unwrap
from .train import (
    NonFiniteLossError,
    evaluate,
    load_error_reason,
    make_optimizer,
    make_scheduler,
    prepare_loader_epoch,
    train_one_epoch,
)
from .utils import atomic_torch_save, get_rng_state, is_main_process, resolve_device, set_rng_state, world_size

__all__ = ["CompressConfig", "Result", "compress", "full_ranks"]

CHECKPOINT_NAME = "compress.pt"
CHECKPOINT_FORMAT = "ltc-compress"
CHECKPOINT_VERSION = 1
# settings that decide which ranks a run learns: resuming a checkpoint with other values is refused
_IDENTITY_KEYS = ("method", "lam", "target_sr", "cost", "include", "exclude", "compress_linear", "min_rank",
                  "weighting", "method_options")


@dataclass
class CompressConfig:
    """Every knob of :func:`compress` (JSON-able; the CLI's YAML configs map onto it one to one).

    Rank selection: ``method``, ``lam`` or ``target_sr`` (exactly one for ``ltc``/``lrc``/``oneshot``),
    ``cost`` ('macs' or 'params'), layer globs, ``compress_linear``, ``min_rank``, ``n_iter`` (HOOI sweeps),
    ``weighting`` ('relative' or 'absolute' layer errors, see :class:`~ltc.engine.LCEngine`),
    ``method_options`` (e.g. ``{"weaken": 0.5}`` for vbmf, ``{"fraction": 0.3}`` for uniform).
    LC schedule: ``mu0``, ``mu_growth``, ``steps`` C steps, ``epochs_per_step`` epochs per L step at learning
    rate ``lr`` decayed by ``lr_decay`` per epoch and restarted each L step. ``mu_growth=None`` (default) grows
    μ geometrically from ``mu0`` to ``mu_final`` at the last L step; ``mu_final=None`` (default) picks the μ at
    which one L step's penalty pull, ``exp(-lr_eff·μ·iterations)`` with ``lr_eff = lr/(1 − momentum)``,
    closes the gap ``W − Θ`` by a factor ``e^5`` in the layer pulled least (capped at ``lr_eff·μ·w_k ≤ 2`` in the
    layer pulled most, for stability; ``w_k``: the engine's layer weights, see ``weighting``). Otherwise a short
    run ends with μ too small for the weights to reach their low-rank projection, and the deployed network
    (built from Θ) loses what training learned.
    Fine-tuning: ``finetune_epochs`` at ``finetune_lr`` with a cosine schedule.
    """

    method: str = "ltc"
    lam: float | None = None
    target_sr: float | None = None
    cost: str = "macs"
    include: list[str] | None = None
    exclude: list[str] | None = None
    compress_linear: bool = False
    min_rank: int = 1
    n_iter: int = 0
    mu0: float = 1e-3
    mu_growth: float | None = None
    mu_final: float | None = None
    tol: float = 1e-3
    weighting: str = "relative"
    method_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 10
    epochs_per_step: int = 1
    finetune_epochs: int = 5
    equal_budget: bool = True
    optimizer: str = "sgd"
    lr: float = 0.01
    lr_decay: float = 0.99
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    finetune_lr: float = 0.01
    label_smoothing: float = 0.0
    skip_converged: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "epochs_per_step", "finetune_epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("lr", "finetune_lr"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a number > 0, got {v!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must lie in (0, 1], got {self.lr_decay}")
        # the engine's numbers too, so that a typo fails here and not after minutes of evaluation
        if self.lam is not None and not (_is_number(self.lam) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if self.target_sr is not None and not (
            _is_number(self.target_sr) and math.isfinite(self.target_sr) and self.target_sr >= 1
        ):
            raise ValueError(f"target_sr must be a finite number >= 1 (a speed-up), got {self.target_sr!r}")
        if self.cost not in ("macs", "params"):
            raise ValueError(f"cost must be 'macs' or 'params', got {self.cost!r}")
        if not (_is_number(self.mu0) and math.isfinite(self.mu0) and self.mu0 > 0):
            raise ValueError(f"mu0 must be a finite number > 0, got {self.mu0!r}")
        if self.mu_growth is not None and not (
            _is_number(self.mu_growth) and math.isfinite(self.mu_growth) and self.mu_growth >= 1
        ):
            raise ValueError(f"mu_growth must be a finite number >= 1 (μ increases), got {self.mu_growth!r}")
        if self.mu_final is not None and not (
            _is_number(self.mu_final) and math.isfinite(self.mu_final) and self.mu_final > 0
        ):
            raise ValueError(f"mu_final must be a finite number > 0, got {self.mu_final!r}")
        for name, lo in (("min_rank", 1), ("n_iter", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not (_is_number(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if str(self.optimizer).lower() not in ("sgd", "adam", "adamw"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose 'sgd', 'adam' or 'adamw'")
        if not (_is_number(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if not (_is_number(self.weight_decay) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not (_is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing!r}")
        if isinstance(self.include, str):
            self.include = [self.include]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        get_method(self.method)  # unknown method -> clear error now, not after training

    def engine_kwargs(self) -> dict[str, Any]:
        keys = ("lam", "target_sr", "cost", "include", "exclude", "compress_linear", "min_rank", "n_iter",
                "mu0", "mu_growth", "tol", "weighting")
        kw = {k: getattr(self, k) for k in keys}
        return {**kw, **self.method_options}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolve_schedule(
        self, iters_per_epoch: int | None, scale_range: tuple[float, float] = (1.0, 1.0)
    ) -> CompressConfig:
        """A copy with ``mu_growth`` (and ``mu_final``) filled in; see the class docstring.

        ``scale_range``: the smallest and largest layer weight ``w_k`` of the engine (its layer ``k`` is pulled
        with ``μ·w_k``): the automatic ``mu_final`` closes the slowest layer's gap, within the stability cap
        of the fastest."""
        if self.mu_growth is not None:
            return self
        lr_eff = self.lr / (1.0 - self.momentum) if self.optimizer == "sgd" and self.momentum < 1 else self.lr
        w_min, w_max = scale_range
        mu_final = self.mu_final
        if mu_final is None:
            iters = max(1, (iters_per_epoch or 100) * self.epochs_per_step)
            mu_final = min(5.0 / (lr_eff * iters * w_min), MAX_PULL / (lr_eff * w_max))
        mu_final = max(float(mu_final), self.mu0)
        growth = (mu_final / self.mu0) ** (1.0 / (self.steps - 1)) if self.steps > 1 else 1.0
        return dataclasses.replace(self, mu_growth=growth, mu_final=mu_final)


def build_engine(
    cfg: CompressConfig, model: nn.Module, example_input: Tensor, iters_per_epoch: int | None
) -> tuple[LCEngine, CompressConfig]:
    """``cfg.method``'s engine for ``model`` (its first C step runs here) and ``cfg`` with the μ path resolved
    for that engine's layer weights (the automatic ``mu_final`` depends on them; see
    :meth:`CompressConfig.resolve_schedule`)."""
    kwargs = cfg.engine_kwargs()
    if cfg.mu_growth is None:  # the first C step runs at mu0 whatever the growth: fill it in once the engine exists
        kwargs["mu_growth"] = 1.0
    engine = get_method(cfg.method).build(model, example_input, **kwargs)
    cfg = cfg.resolve_schedule(iters_per_epoch, engine.scale_range)
    engine.mu_growth = float(cfg.mu_growth)  # type: ignore[arg-type]
    return engine, cfg


# Largest lr_eff·μ·w_k the automatic schedule allows: plain SGD with Nesterov momentum 0.9 on the penalty alone
# is stable up to lr·μ·w_k ≈ 1.36, i.e. lr_eff·μ·w_k ≈ 13.6; 2 leaves room for the loss's own curvature.
MAX_PULL = 2.0


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def full_ranks(engine: LCEngine) -> dict[str, Any]:
    """``{name: (S, T)}`` for Tucker-2 layers, ``{name: full rank}`` for matrix/SVD layers."""
    out: dict[str, Any] = {}
    for name, s in engine.layers.items():
        full = s.scheme.full_rank(s.module)
        out[name] = tuple(full) if len(full) == 2 else int(full[0])
    return out


@dataclass
class Result:
    """What :func:`compress` returns. MACs are per sample; SR and CR are theoretical (from the profiles)."""

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
            lines.append(f"\naccuracy before fine-tuning: {pct(self.acc_before_finetune)} %")
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
            "history": self.history,
            "log": self.log,
            "config": self.config,
            "seconds": self.seconds,
        }

    def save_json(self, path: str | Path) -> None:
        from .utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str))


def _seed_epoch(loader: Iterable[Any], seed: int, epoch: int) -> None:
    """Make epoch ``epoch``'s shuffling and augmentation a function of (seed, epoch) alone, so a resumed run
    sees the same batches as an uninterrupted one."""
    s = (seed * 1_000_003 + epoch) % (2**63)
    torch.manual_seed(s)  # augmentation in the main process (workers=0) draws from the global RNG
    prepare_loader_epoch(loader, epoch, seed=None)  # samplers with set_epoch
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(s)


def _acc(model: nn.Module, loader: DataLoader | None, device: torch.device, cfg: CompressConfig) -> float | None:
    if loader is None:
        return None
    return float(evaluate(model, loader, device=device, amp=cfg.amp, channels_last=cfg.channels_last).acc)


def compress(
    model: nn.Module,
    train_loader: DataLoader,
    *,
    example_input: Tensor | None = None,
    val_loader: DataLoader | None = None,
    config: CompressConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    base_acc: float | None = None,
    **kwargs: Any,
) -> Result:
    """Compress a trained ``model`` with a method (default ``'ltc'``) and fine-tune it.

    Args:
        model: the trained base network; it is not modified (a copy is trained).
        train_loader: batches ``(x, y)`` for the L steps and fine-tuning.
        example_input: one input batch ``(N, C, H, W)`` to record layer sizes; default: the first batch.
        val_loader: if given, accuracies (fractions in [0, 1]) are measured before, after compression and
            after fine-tuning.
        config / kwargs: a :class:`CompressConfig`, or its fields as keyword arguments
            (``target_sr=5, steps=10, ...``); kwargs override the config's fields.
        checkpoint_dir: if given, an atomic checkpoint is written after every LC step and fine-tuning epoch
            (only on the main process); ``resume=True`` continues from it (bit-identically on CPU). A checkpoint
            of another method, model, ltc version or rank setting (λ, target, cost, layers, min_rank) is
            refused with a ``ValueError``.
        base_acc: the base model's validation accuracy if already known (skips one evaluation).

    Under ``torch.distributed`` with more than one process (torchrun), the model is trained wrapped in
    ``DistributedDataParallel`` (gradients averaged; give each process its share of the data, e.g. with a
    ``DistributedSampler``), every C step uses rank 0's result, and only rank 0 writes the checkpoint.

    Returns:
        a :class:`Result` with the compressed model, ranks, profiles, accuracies and logs.

    Raises:
        ValueError: a bad setting, layer glob or unreachable target (before any training), or an unusable
            checkpoint on resume.
        NonFiniteLossError: a batch loss or the weights became NaN/inf; the checkpoint of the last good LC step
            or fine-tuning epoch is left as it was.
    """
    cfg = dataclasses.replace(config, **kwargs) if config is not None else CompressConfig(**kwargs)
    method = get_method(cfg.method)
    try:
        iters_per_epoch: int | None = len(train_loader)
    except TypeError:  # an iterable-style loader has no length
        iters_per_epoch = None
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    work = copy.deepcopy(unwrap(model)).to(device)
    if example_input is None:
        example_input = next(iter(train_loader))[0][:1]
    example_input = example_input.to(device)
    base_prof = profile(work, example_input)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    state: dict[str, Any] | None = None
    if resume:
        if ckpt_path is None:
            raise ValueError("resume=True needs checkpoint_dir (the folder of the run to continue)")
        if not ckpt_path.exists():
            raise FileNotFoundError(f"resume: no checkpoint at {ckpt_path}; run without resume first")
        state = _load_checkpoint(ckpt_path, cfg, device)
        try:
            work.load_state_dict(state["base_model"])
        except RuntimeError as exc:
            raise ValueError(
                f"checkpoint {ckpt_path} belongs to another model ({_first_line(exc)}); resume it with the "
                "base model it was started from, or start afresh without resume"
            ) from None
    work_ddp = _ddp(work, device)  # under torchrun: gradients averaged over the processes

    # the first C step also checks the layer globs, the ranks and the reachability of the target: before any
    # training or evaluation
    engine, cfg = build_engine(cfg, work, example_input, iters_per_epoch)
    if base_acc is None and val_loader is not None:
        base_acc = state["base_acc"] if state is not None else _acc(work, val_loader, device, cfg)
    log_rows: list[dict[str, Any]] = []
    base_state = {k: v.detach().clone() for k, v in work.state_dict().items()}
    epoch_counter = 0
    start_step = 0
    if state is not None:
        try:
            work.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {ckpt_path} belongs to another model ({_first_line(exc)})") from None
        try:
            engine.load_state_dict(state["engine"])
        except ValueError as exc:
            raise ValueError(f"checkpoint {ckpt_path}: {exc}") from None
        log_rows = list(state["log"])
        start_step = int(state["step"])
        epoch_counter = int(state["epoch_counter"])
        set_rng_state(state["rng"])

    def kept() -> str:
        if ckpt_path is None or not ckpt_path.is_file():
            return "No checkpoint was written"
        return (f"The last good checkpoint {ckpt_path} is unchanged: resume from it (with a lower lr) or start "
                "afresh")

    def train_epoch(model: nn.Module, where: str, **kw: Any) -> Any:
        try:
            st = train_one_epoch(model, train_loader, device=device, amp=cfg.amp, channels_last=cfg.channels_last,
                                 label_smoothing=cfg.label_smoothing, progress=False, desc=where, **kw)
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{where}: {exc} {kept()}") from None
        _sync_buffers(unwrap(model))
        bad = _nonfinite(unwrap(model))
        if bad:
            raise NonFiniteLossError(
                f"{where}: the weights became NaN/inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                f"although every batch loss was finite: training diverged; lower the learning rate. {kept()}"
            )
        return st

    def save(phase: str, step: int, model_state: dict[str, Tensor], extra: dict[str, Any] | None = None) -> None:
        if ckpt_path is None or not is_main_process():
            return
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "method": cfg.method,
                "phase": phase,
                "step": step,
                "epoch_counter": epoch_counter,
                "base_model": base_state,
                "base_acc": base_acc,
                "model": model_state,
                "engine": engine.state_dict(),
                "log": log_rows,
                "rng": get_rng_state(),
                "config": json.dumps(cfg.to_dict(), default=str),
                **(extra or {}),
            },
            ckpt_path,
        )

    # ---------------------------------------------------------------- LC steps (learning methods only)
    steps = cfg.steps if method.learns else 0
    if state is None or state["phase"] == "lc":
        bar = _progress(range(start_step, steps), progress, desc=f"{cfg.method} LC steps", total=steps,
                        initial=start_step)
        for step in bar:
            if not (cfg.skip_converged and engine.converged):
                opt = make_optimizer(work.parameters(), name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                                     nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
                sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
                for e in range(cfg.epochs_per_step):
                    _seed_epoch(train_loader, cfg.seed, epoch_counter)
                    st = train_epoch(work_ddp, f"L step {step + 1}/{steps}, epoch {e + 1}/{cfg.epochs_per_step}",
                                     optimizer=opt, extra_loss=engine.penalty)
                    sched.step()
                    epoch_counter += 1
                    log_rows.append({"phase": "lc", "step": step + 1, "epoch": epoch_counter, "mu": engine.mu,
                                     "train_loss": st.loss, "penalty": st.extra_loss, "train_acc": st.acc,
                                     "seconds": st.seconds})
            engine.step()
            h = engine.history[-1]
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(SR=f"{h['sr']:.2f}", lam=f"{h['lam']:.2g}", mu=f"{h['mu']:.2g}",
                                dist=f"{h['distance']:.2g}")
            save("lc", step + 1, work.state_dict())

    # ---------------------------------------------------------------- deploy, then fine-tune
    small = engine.compressed_model().to(device)
    resumed_ft = state is not None and state["phase"] == "finetune"
    acc_before = state["acc_before"] if resumed_ft else _acc(small, val_loader, device, cfg)
    ft_epochs = cfg.finetune_epochs
    if cfg.equal_budget and not method.learns:
        ft_epochs += cfg.steps * cfg.epochs_per_step
    opt = make_optimizer(small.parameters(), name=cfg.optimizer, lr=cfg.finetune_lr, momentum=cfg.momentum,
                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, name="cosine", epochs=max(ft_epochs, 1))
    ft_start = 0
    if resumed_ft:
        small.load_state_dict(state["small"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ft_start = int(state["ft_epoch"])

    def save_ft(done: int) -> None:
        save("finetune", steps, work.state_dict(), {
            "small": small.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "ft_epoch": done, "acc_before": acc_before,
        })

    if not resumed_ft:
        # the deployed model as built from the factors of the last C step: a resume rebuilds the factors from Θ,
        # equal only up to rounding, so without this checkpoint a run killed between the last C step and the
        # first fine-tuning checkpoint would not resume bit-identically
        save_ft(0)
    small_ddp = _ddp(small, device) if ft_start < ft_epochs else small
    for ep in _progress(range(ft_start, ft_epochs), progress, desc="fine-tune", total=ft_epochs, initial=ft_start):
        _seed_epoch(train_loader, cfg.seed, epoch_counter)
        st = train_epoch(small_ddp, f"fine-tuning epoch {ep + 1}/{ft_epochs}", optimizer=opt)
        sched.step()
        epoch_counter += 1
        row = {"phase": "finetune", "epoch": epoch_counter, "train_loss": st.loss, "train_acc": st.acc,
               "seconds": st.seconds}
        log_rows.append(row)
        save_ft(ep + 1)
    acc = _acc(small, val_loader, device, cfg)
    comp_prof = profile(small, example_input)
    return Result(
        model=small,
        method=cfg.method,
        ranks=engine.ranks,
        full_ranks=full_ranks(engine),
        lam=engine.lam,
        target_sr=cfg.target_sr,
        base=base_prof,
        compressed=comp_prof,
        base_acc=base_acc,
        acc_before_finetune=acc_before,
        acc=acc,
        history=engine.history,
        log=log_rows,
        config=cfg.to_dict(),
        seconds=time.perf_counter() - t_start,
    )


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + (" ..." if len(text) > 300 else "")


def _nonfinite(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` holding a NaN or an inf."""
    return [k for k, v in module.state_dict().items()
            if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when running under torch.distributed with > 1 process."""
    if world_size() <= 1:
        return module
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def _sync_buffers(module: nn.Module) -> None:
    """Under torch.distributed: rank 0's buffers (BatchNorm running statistics) on every process. DDP syncs them
    at the start of each forward only, so after an epoch every process holds the statistics of its own last
    batch; the C step, the checkpoint and the returned model must not depend on the process."""
    if world_size() <= 1:
        return
    for b in module.buffers():
        if b.is_floating_point():
            torch.distributed.broadcast(b.data, src=0)


def _load_checkpoint(path: Path, cfg: CompressConfig, device: torch.device) -> dict[str, Any]:
    """Read a :func:`compress` checkpoint; a clear ``ValueError`` for anything else or another run's."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, random bytes, pickled objects refused by weights_only
        raise ValueError(
            f"checkpoint {path} cannot be read ({load_error_reason(exc)}); it is not a checkpoint of ltc.compress "
            "or it is damaged: start afresh without resume"
        ) from None
    if not isinstance(state, dict) or "engine" not in state or state.get("format", CHECKPOINT_FORMAT) != \
            CHECKPOINT_FORMAT:
        what = f"format {state.get('format')!r}" if isinstance(state, dict) and state.get("format") else (
            "a plain dict" if isinstance(state, dict) else f"a {type(state).__name__}")
        raise ValueError(
            f"checkpoint {path} is not a checkpoint of ltc.compress (it holds {what}); point checkpoint_dir at "
            "a compression run's folder, or start afresh without resume"
        )
    if state.get("version") != CHECKPOINT_VERSION or state.get("method") != cfg.method:
        raise ValueError(
            f"checkpoint {path} was written by another ltc version or method ({state.get('method')!r}, "
            f"checkpoint version {state.get('version')!r}, this ltc writes {CHECKPOINT_VERSION}); start afresh "
            "without --resume or use another checkpoint dir"
        )
    try:
        saved = json.loads(state.get("config") or "{}")
    except (TypeError, ValueError):
        saved = {}
    now = json.loads(json.dumps(cfg.to_dict(), default=str))
    diff = [k for k in _IDENTITY_KEYS if k in saved and saved[k] != now.get(k)]
    if diff:
        pairs = ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in diff)
        raise ValueError(
            f"checkpoint {path} belongs to a run with other settings ({pairs}); resume with the run's settings, "
            "or start afresh in another checkpoint dir"
        )
    return state


def _progress(it: Iterable[Any], enabled: bool, **kw: Any) -> Any:
    if not enabled or not is_main_process():
        return it
    from tqdm.auto import tqdm

    return tqdm(it, leave=False, **kw)
