"""The one training loop of ltc, and its one checkpoint format.

Everything that trains goes through :func:`fit`: base training (``ltc train``), the L steps of the LC methods and
fine-tuning (``ltc.compress``), ``ltc finetune``. It is the only place with a NaN guard, a resume path, epoch
seeding, DistributedDataParallel wrapping and a checkpoint writer. Callers plug in through hooks:

* ``extra_loss()``: added to the batch loss (the LC penalty);
* ``after_step()``: runs after every optimizer step (the LC penalty's proximal step);
* ``teacher`` + ``kd_weight`` / ``kd_temperature``: knowledge distillation from a frozen network;
* ``on_epoch_end(epoch, row)``: runs after each epoch, before the checkpoint (the C step); may return extra row
  fields and ``{"stop": True}`` to end the run early;
* ``extra_state=(get, set)``: more state stored in (and restored from) the checkpoint (the engine's).

Accuracies are fractions in ``[0, 1]``; losses are per-sample means; times are in seconds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from .settings import OPTIMIZERS, SCHEDULES, check_choice, check_int, check_number
from .surgery import unwrap
from .utils import (
    atomic_torch_save,
    atomic_write_text,
    get_rng_state,
    is_main_process,
    json_safe,
    resolve_device,
    seed_everything,
    set_rng_state,
    world_size,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "EpochSeededSampler",
    "EpochStats",
    "EvalStats",
    "NonFiniteLossError",
    "RunLog",
    "TrainConfig",
    "accuracy",
    "count_correct",
    "distillation_loss",
    "evaluate",
    "fit",
    "load_error_reason",
    "make_optimizer",
    "make_scheduler",
    "prepare_loader_epoch",
    "read_checkpoint",
    "train_one_epoch",
]

CHECKPOINT_FORMAT = "ltc-checkpoint"
CHECKPOINT_VERSION = 1


class NonFiniteLossError(RuntimeError):
    """The training loss or the weights became NaN or infinite (raised before anything is checkpointed)."""


@dataclass
class TrainConfig:
    """How :func:`fit` trains a base network (the ``train:`` section of a YAML config), validated here once.

    ``epochs``; ``optimizer`` (``'sgd'``, ``'adam'``, ``'adamw'``) at learning rate ``lr`` with ``momentum`` /
    ``nesterov`` (SGD) and ``weight_decay`` on weights with ``ndim > 1``; ``schedule`` (``'cosine'``, ``'step'``,
    ``'exp'``, ``'none'``) stepped once per epoch after ``warmup_epochs`` of linear ramp; ``label_smoothing``;
    ``amp`` (mixed precision on CUDA), ``channels_last`` (CUDA), ``grad_clip`` (max global gradient norm).
    """

    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    amp: bool = False
    channels_last: bool = False
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, ge=0)
        self.optimizer = check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_number("lr", self.lr, gt=0)
        check_number("momentum", self.momentum, ge=0, lt=1)
        check_number("weight_decay", self.weight_decay, ge=0)
        self.schedule = check_choice("schedule", self.schedule, SCHEDULES)
        check_int("warmup_epochs", self.warmup_epochs, ge=0)
        check_number("label_smoothing", self.label_smoothing, ge=0, lt=1)
        check_number("grad_clip", self.grad_clip, gt=0, optional=True)

    def optimizer_kwargs(self) -> dict[str, Any]:
        return {"name": self.optimizer, "lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def scheduler_kwargs(self) -> dict[str, Any] | None:
        if self.schedule == "none" and self.warmup_epochs == 0:
            return None
        return {"name": self.schedule, "warmup_epochs": self.warmup_epochs}


@dataclass
class EpochStats:
    """Result of :func:`train_one_epoch`.

    Attributes:
        loss: mean training loss per sample (the task loss, or its mix with distillation; without ``extra_loss``).
        extra_loss: mean of ``extra_loss()`` over batches (0.0 when no extra loss is used).
        acc: top-1 accuracy in [0, 1] (NaN if the targets are not class labels).
        samples: number of training samples seen (summed over processes).
        batches: number of batches this process ran.
        seconds: wall-clock time of the epoch.
    """

    loss: float
    extra_loss: float
    acc: float
    samples: int
    batches: int
    seconds: float


@dataclass
class EvalStats:
    """Result of :func:`evaluate`: mean loss per sample, top-1 accuracy in [0, 1], count, seconds."""

    loss: float
    acc: float
    samples: int
    seconds: float


def distillation_loss(
    student: Tensor, teacher: Tensor, target: Tensor, *, weight: float, temperature: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Knowledge distillation (Hinton, Vinyals, Dean 2015): ``(1 − weight)·CE(student, target) +
    weight·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, the KL averaged over the batch. ``student`` /
    ``teacher``: logits ``(N, C)``; ``target``: class indices ``(N,)``; ``weight`` in [0, 1]; ``temperature`` > 0.
    """
    ce = F.cross_entropy(student, target, label_smoothing=label_smoothing)
    if weight == 0:
        return ce
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                  log_target=True, reduction="batchmean")
    return (1.0 - weight) * ce + weight * (t * t) * kl


# --------------------------------------------------------------------------- metrics


def count_correct(output: Tensor, target: Tensor) -> Tensor:
    """Number of top-1 correct predictions as a 0-d int64 tensor on ``output``'s device.

    ``output``: logits ``(N, C)``, or ``(N,)``/``(N, 1)`` binary logits (positive means class 1).
    ``target``: class indices ``(N,)``, or one-hot/soft labels ``(N, C)`` (argmax is used).
    """
    output = output.detach()
    target = target.detach()
    if output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1):
        pred = (output.reshape(-1) > 0).long()
        return (pred == target.reshape(-1).long()).sum()
    pred = output.argmax(dim=1)
    if target.ndim == output.ndim:
        target = target.argmax(dim=1)
    return (pred == target).sum()


def accuracy(output: Tensor, target: Tensor) -> float:
    """Top-1 accuracy of a batch as a fraction in [0, 1] (see :func:`count_correct`)."""
    n = int(target.shape[0])
    return float(count_correct(output, target)) / n if n else float("nan")


def _is_class_target(output: Tensor, target: Tensor) -> bool:
    if target.is_floating_point() and target.ndim != output.ndim:
        return False  # regression targets
    return output.ndim >= 1 and target.ndim >= 1


# --------------------------------------------------------------------------- optimiser / schedule


def make_optimizer(
    params: nn.Module | Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    no_decay: Iterable[nn.Parameter] = (),
) -> Optimizer:
    """Build an SGD / Adam / AdamW optimiser.

    When ``weight_decay > 0`` the trainable parameters are split into two groups: tensors with
    ``ndim > 1`` (conv/linear weights) get ``weight_decay``, tensors with ``ndim <= 1`` (biases,
    norm scales, gates) get none. Param-group dicts are split the same way (their own
    ``weight_decay`` entry wins). Parameters with ``requires_grad=False`` are skipped.

    Args:
        params: a module, an iterable of parameters, or of param-group dicts.
        name: ``"sgd"`` (``momentum``/``nesterov`` apply; Nesterov needs momentum > 0),
            ``"adam"`` (L2 penalty) or ``"adamw"`` (decoupled decay).
        lr: learning rate.
        no_decay: parameters trained without weight decay whatever their shape (e.g. the LC-compressed layers'
            weights during L steps, whose regulariser is the penalty).
    """
    if isinstance(params, nn.Module):
        params = params.parameters()
    items = list(params)
    exempt = {id(p) for p in no_decay}
    groups_in: list[dict[str, Any]] = (
        [dict(g) for g in items] if items and isinstance(items[0], dict) else [{"params": items}]
    )
    groups: list[dict[str, Any]] = []
    for g in groups_in:
        ps = [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])
        ps = [p for p in ps if p.requires_grad]
        rest = {k: v for k, v in g.items() if k != "params"}
        wd = rest.pop("weight_decay", weight_decay)
        if wd > 0:
            decay = [p for p in ps if p.ndim > 1 and id(p) not in exempt]
            plain = [p for p in ps if p.ndim <= 1 or id(p) in exempt]
            if decay:
                groups.append({"params": decay, "weight_decay": wd, **rest})
            if plain:
                groups.append({"params": plain, "weight_decay": 0.0, **rest})
        elif ps:
            groups.append({"params": ps, "weight_decay": 0.0, **rest})
    if not groups:
        raise ValueError("make_optimizer: no trainable parameters (all have requires_grad=False?)")
    key = check_choice("optimizer", name, OPTIMIZERS)
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=bool(nesterov and momentum > 0))
    if key == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(
    optimizer: Optimizer,
    name: str = "cosine",
    epochs: int = 1,
    steps_per_epoch: int = 1,
    step_size: int = 30,
    gamma: float = 0.1,
    warmup_epochs: int = 0,
    cycle: int | None = None,
    hold_epochs: int = 0,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """LR schedule as a resumable ``LambdaLR`` (``None`` for ``name="none"``).

    The scheduler counts calls to ``step()``; :func:`fit` calls it **once per epoch**, after the
    epoch (keep the default ``steps_per_epoch=1`` there). For per-iteration stepping pass
    ``steps_per_epoch=len(loader)`` and call ``step()`` after every batch; all epoch arguments keep
    their meaning in epochs. With ``t`` = epochs elapsed, the LR multiplier is

    * warmup (``t < warmup_epochs``): linear ramp ``(t + 1/steps_per_epoch) / warmup_epochs``;
    * hold (the next ``hold_epochs``): 1 (``"cosine"`` only: warmup, hold, then decay, as in a
      warmup-stable-decay schedule);
    * ``"cosine"``: ``0.5 * (1 + cos(pi * (t - warmup - hold) / (epochs - warmup - hold)))``;
    * ``"step"``: ``gamma ** ((t - warmup) // step_size)``;
    * ``"exp"``: ``gamma ** (t - warmup)`` (per epoch);
    * ``"none"``: 1 (with warmup, only the ramp; without warmup, ``None`` is returned).

    ``cycle``: restart the schedule every ``cycle`` epochs (``t`` counts from the last restart; ``epochs`` is then
    the length of one cycle; warmup and hold repeat in every cycle): the LC methods' L steps restart their learning
    rate each step.
    """
    key = check_choice("schedule", name, SCHEDULES)
    if epochs < 1 or steps_per_epoch < 1 or step_size < 1 or warmup_epochs < 0 or (cycle is not None and cycle < 1):
        raise ValueError("epochs, steps_per_epoch, step_size and cycle must be >= 1 and warmup_epochs >= 0")
    if hold_epochs < 0 or (hold_epochs and key != "cosine"):
        raise ValueError(f"hold_epochs must be >= 0 and only goes with schedule='cosine' (got {hold_epochs} with "
                         f"{key!r})")
    if hold_epochs and warmup_epochs + hold_epochs >= epochs:
        raise ValueError(f"warmup_epochs + hold_epochs = {warmup_epochs + hold_epochs} leaves none of the {epochs} "
                         "epochs to anneal; hold fewer")
    if key == "none" and warmup_epochs == 0:
        return None
    spe = float(steps_per_epoch)
    warm, hold = float(warmup_epochs), float(hold_epochs)
    span = max(float(epochs) - warm - hold, 1.0)

    def factor(step: int) -> float:
        t = step / spe
        if cycle is not None:
            t = t % cycle
        if t < warm:
            return min(1.0, (t + 1.0 / spe) / warm)
        u = t - warm
        if key == "cosine":
            u -= hold
            return 1.0 if u < 0 else 0.5 * (1.0 + math.cos(math.pi * min(u / span, 1.0)))
        if key == "step":
            return gamma ** (int(u) // step_size)
        if key == "exp":
            return gamma**u
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- data order


class EpochSeededSampler(Sampler[int]):
    """Random permutation sampler whose order depends only on ``(seed, epoch)``.

    Call ``set_epoch(e)`` before iterating (:func:`fit` does this every epoch), which makes the
    data order reproducible and resumable without saving any generator state. Use it as
    ``DataLoader(ds, batch_size=..., sampler=EpochSeededSampler(ds, seed=0))``.
    """

    def __init__(self, data_source: Sized, seed: int = 0, shuffle: bool = True) -> None:
        self.n = len(data_source)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def prepare_loader_epoch(loader: Iterable[Any], epoch: int, seed: int | None) -> None:
    """Make the data order of ``epoch`` (0-based) a function of ``(seed, epoch)`` where possible.

    Calls ``sampler.set_epoch(epoch)`` when the sampler has it (EpochSeededSampler,
    DistributedSampler) and, if ``seed`` is given, re-seeds the DataLoader's own ``generator``
    with ``seed + epoch`` (this drives ``shuffle=True`` and the worker seeds).
    """
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    if inner is not None and inner is not sampler and hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)
    gen = getattr(loader, "generator", None)
    if seed is not None and isinstance(gen, torch.Generator):
        gen.manual_seed(int(seed) + int(epoch))


# --------------------------------------------------------------------------- loops


def _prepare_model(
    model: nn.Module, device: str | torch.device, channels_last: bool, amp: bool | str
) -> tuple[torch.device, bool, torch.dtype | None]:
    """Move ``model`` to ``device`` (channels-last memory format only on CUDA); return the device, whether
    channels-last is in force and the autocast dtype (``None``: full precision)."""
    dev = resolve_device(device)
    model.to(dev)
    channels_last = channels_last and dev.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return dev, channels_last, _amp_dtype(amp, dev)


def _amp_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    if not amp or device.type != "cuda":
        return None
    if amp is True or (isinstance(amp, str) and amp.lower() in {"auto", "true", "1"}):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    key = str(amp).lower()
    if key in {"bf16", "bfloat16"}:
        return torch.bfloat16
    if key in {"fp16", "float16", "half"}:
        return torch.float16
    raise ValueError(f"unknown amp setting {amp!r}; use True/False, 'bf16' or 'fp16'")


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        return batch["input"], batch["target"]
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError("batches must be (inputs, targets, ...) tuples or dicts with 'input'/'target'")


def _to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=device.type == "cuda")
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over processes (identity without torch.distributed)."""
    if world_size() == 1:
        return values
    backend = torch.distributed.get_backend()
    dev = device if backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _bar(loader: Iterable[Any], total: int | None, desc: str, progress: bool) -> Any:
    """A tqdm bar over the batches, shown on the main process only when ``progress``."""
    return tqdm(loader, total=total, desc=desc, disable=not progress or not is_main_process(), leave=False,
                dynamic_ncols=True)


def current_lr(optimizer: Optimizer) -> float:
    """The learning rate the optimizer's first parameter group steps with now."""
    return float(optimizer.param_groups[0]["lr"])


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: Optimizer,
    *,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    extra_loss: Callable[[], Tensor | float] | None = None,
    after_step: Callable[[], None] | None = None,
    device: str | torch.device = "cpu",
    amp: bool | str = False,
    channels_last: bool = False,
    grad_clip: float | None = None,
    label_smoothing: float = 0.0,
    progress: bool = True,
    desc: str = "train",
    epoch: int | None = None,
    scaler: torch.amp.GradScaler | None = None,
    teacher: nn.Module | None = None,
    kd_weight: float = 0.0,
    kd_temperature: float = 4.0,
) -> EpochStats:
    """Train ``model`` for one pass over ``loader``.

    Args:
        model: moved to ``device`` (no-op when already there) and put in train mode.
        loader: yields ``(inputs, targets, ...)``.
        criterion: ``loss(outputs, targets)``; default cross-entropy with ``label_smoothing``.
        extra_loss: called once per batch (outside autocast, after the forward pass); its value is
            added to the task loss (this is where the LTC rank penalty plugs in).
        after_step: called after every optimizer step (the LC penalty's proximal step plugs in here).
        amp: mixed precision on CUDA (``True``: bf16 if supported else fp16; or ``"bf16"``/``"fp16"``;
            fp16 uses a GradScaler). Ignored on CPU, as is ``channels_last``.
        grad_clip: max global L2 norm of the gradients (``None``: no clipping).
        epoch: 1-based epoch number used in error messages.
        scaler: GradScaler to reuse across epochs for fp16 (created on demand otherwise).
        teacher: with ``kd_weight > 0``, a frozen network (run in eval mode, no gradients) whose logits the
            model is distilled towards: the loss is :func:`distillation_loss` instead of ``criterion``.

    Raises:
        NonFiniteLossError: when the total loss of a batch is NaN/inf (before ``optimizer.step()``).
    """
    dev, channels_last, amp_dtype = _prepare_model(model, device, channels_last, amp)
    if amp_dtype == torch.float16 and scaler is None:
        scaler = torch.amp.GradScaler("cuda")
    use_scaler = amp_dtype == torch.float16 and scaler is not None
    if criterion is None:
        criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    model.train()
    distil = teacher is not None and kd_weight > 0
    if distil:
        teacher.to(dev).eval()  # type: ignore[union-attr]

    start = time.perf_counter()
    loss_sum = 0.0
    extra_sum = 0.0
    n_samples = 0
    n_batches = 0
    n_class_samples = 0
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    total_batches = len(loader) if isinstance(loader, Sized) else None
    bar = _bar(loader, total_batches, desc, progress)
    where = f"epoch {epoch}, " if epoch is not None else ""
    try:
        for i, batch in enumerate(bar):
            inputs, targets = _split_batch(batch)
            inputs = _to_device(inputs, dev, channels_last)
            targets = targets.to(dev, non_blocking=dev.type == "cuda")
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(inputs)
                if distil:
                    with torch.no_grad():
                        t_out = teacher(inputs)  # type: ignore[misc]
                    loss = distillation_loss(outputs, t_out, targets, weight=kd_weight, temperature=kd_temperature,
                                             label_smoothing=label_smoothing)
                else:
                    loss = criterion(outputs, targets)
            loss = loss.float()
            total = loss
            extra_val = 0.0
            if extra_loss is not None:
                extra = extra_loss()
                extra = extra if isinstance(extra, Tensor) else torch.as_tensor(float(extra), device=dev)
                total = total + extra.to(dev, torch.float32)
                extra_val = float(extra.detach())
            loss_val = float(loss.detach())
            if not (math.isfinite(loss_val) and math.isfinite(extra_val)):
                raise NonFiniteLossError(
                    f"non-finite loss at {where}batch {i + 1}"
                    f"{f'/{total_batches}' if total_batches else ''}: task loss = {loss_val}, "
                    f"extra loss = {extra_val}, lr = {current_lr(optimizer):g}. Training diverged; "
                    "try a lower learning rate (or gradient clipping / a smaller penalty weight)."
                )
            if use_scaler:
                assert scaler is not None
                scaler.scale(total).backward()
                if grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                total.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
            if after_step is not None:
                after_step()

            bs = int(targets.shape[0])
            n_samples += bs
            n_batches += 1
            loss_sum += loss_val * bs
            extra_sum += extra_val
            if _is_class_target(outputs, targets):
                correct += count_correct(outputs, targets)
                n_class_samples += bs
            if not bar.disable and (i % 10 == 0 or i + 1 == total_batches):
                acc_now = float(correct) / n_class_samples if n_class_samples else float("nan")
                post = {"loss": f"{loss_sum / n_samples:.4f}", "acc": f"{acc_now:.4f}"}
                if extra_loss is not None:
                    post["extra"] = f"{extra_sum / n_batches:.4g}"
                bar.set_postfix(post, refresh=False)
    finally:
        bar.close()

    loss_sum, extra_sum, n_samples_f, n_batches_f, correct_f, n_class_f = _all_reduce_sum(
        [loss_sum, extra_sum, float(n_samples), float(n_batches), float(correct), float(n_class_samples)], dev
    )
    return EpochStats(
        loss=loss_sum / n_samples_f if n_samples_f else float("nan"),
        extra_loss=extra_sum / n_batches_f if n_batches_f else 0.0,
        acc=correct_f / n_class_f if n_class_f else float("nan"),
        samples=int(n_samples_f),
        batches=n_batches,
        seconds=time.perf_counter() - start,
    )


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    amp: bool | str = False,
    channels_last: bool = False,
    progress: bool = False,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    desc: str = "eval",
) -> EvalStats:
    """Loss (default cross-entropy) and top-1 accuracy of ``model`` over ``loader``, without grads.

    The model is moved to ``device`` and put in eval mode; the train/eval flag of every submodule
    is restored afterwards (also on error).
    """
    dev, channels_last, amp_dtype = _prepare_model(model, device, channels_last, amp)
    if criterion is None:
        criterion = nn.CrossEntropyLoss()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    n_samples = 0
    n_class_samples = 0
    total_batches = len(loader) if isinstance(loader, Sized) else None
    try:
        with torch.no_grad():
            bar = _bar(loader, total_batches, desc, progress)
            for batch in bar:
                inputs, targets = _split_batch(batch)
                inputs = _to_device(inputs, dev, channels_last)
                targets = targets.to(dev, non_blocking=dev.type == "cuda")
                with torch.autocast(
                    device_type=dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    outputs = model(inputs)
                    loss = criterion(outputs, targets)
                bs = int(targets.shape[0])
                loss_sum += loss.double() * bs
                n_samples += bs
                if _is_class_target(outputs, targets):
                    correct += count_correct(outputs, targets)
                    n_class_samples += bs
            bar.close()
    finally:
        for m, mode in modes:
            m.training = mode
    loss_f, n_f, correct_f, n_class_f = _all_reduce_sum(
        [float(loss_sum), float(n_samples), float(correct), float(n_class_samples)], dev
    )
    return EvalStats(
        loss=loss_f / n_f if n_f else float("nan"),
        acc=correct_f / n_class_f if n_class_f else float("nan"),
        samples=int(n_f),
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------- logging


def _plain(v: Any) -> Any:
    """Convert numpy/torch scalars to Python numbers (JSON- and weights_only-safe)."""
    if isinstance(v, Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


class LogSink(Protocol):
    """Where :func:`fit` appends its per-epoch rows (:class:`RunLog` writes them to files)."""

    def __len__(self) -> int: ...

    def append(self, row: dict[str, Any]) -> None: ...

    def truncate(self, n: int) -> None: ...


class RunLog:
    """Per-epoch rows appended to ``<dir>/log.csv`` and ``<dir>/log.jsonl``.

    Only the main process writes. NaN/inf values are stored as JSON ``null`` / empty CSV cells.
    When a row brings new keys the CSV is rewritten with the extended header; the JSONL file is the
    source of truth. :meth:`truncate` cuts both back to ``n`` rows (used when resuming from a
    checkpoint that recorded the log position).
    """

    def __init__(self, dir: str | Path) -> None:
        self.dir = Path(dir)
        self.csv_path = self.dir / "log.csv"
        self.jsonl_path = self.dir / "log.jsonl"
        if is_main_process():
            self.dir.mkdir(parents=True, exist_ok=True)

    def rows(self) -> list[dict[str, Any]]:
        """All rows from ``log.jsonl``."""
        if not self.jsonl_path.exists():
            return []
        out = []
        with self.jsonl_path.open("r", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
        return out

    def __len__(self) -> int:
        return len(self.rows())

    def _fields(self) -> list[str]:
        if not self.csv_path.exists():
            return []
        with self.csv_path.open("r", encoding="utf-8", newline="") as f:
            return next(csv.reader(f), [])

    @staticmethod
    def _csv_text(fields: list[str], rows: list[dict[str, Any]], header: bool = True) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", restval="")
        if header:
            w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        return buf.getvalue()

    def append(self, row: dict[str, Any]) -> None:
        """Append one row (a flat dict of numbers/strings) to both files."""
        if not is_main_process():
            return
        row = json_safe(row)
        with self.jsonl_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        fields = self._fields()
        new = [k for k in row if k not in fields]
        if not fields or new:
            atomic_write_text(self.csv_path, self._csv_text(fields + new, self.rows()))
        else:
            with self.csv_path.open("a", encoding="utf-8", newline="") as f:
                f.write(self._csv_text(fields, [row], header=False))

    def truncate(self, n: int) -> None:
        """Rewrite both files from the first ``n`` JSONL rows (drops rows logged after that position)."""
        if not is_main_process():
            return
        rows = self.rows()
        n = max(int(n), 0)
        kept = rows[:n]
        atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in kept))
        fields = self._fields()
        for r in kept:
            fields += [k for k in r if k not in fields]
        if fields:
            atomic_write_text(self.csv_path, self._csv_text(fields, kept))


# --------------------------------------------------------------------------- checkpoints


def load_error_reason(exc: BaseException) -> str:
    """A short reason from a ``torch.load`` failure (torch's own texts run to several sentences)."""
    text = " ".join(str(exc).split())
    if "WeightsUnpickler error:" in text:  # random bytes, or pickled objects that weights_only refuses
        detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0].strip()
        return f"not a tensor checkpoint: {detail.rstrip('.')}"
    first = text.split(". ", 1)[0].rstrip(".")
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


_WRITERS = {"ltc.fit": "ltc train / ltc.train.fit", "ltc.compress": "ltc compress / ltc.compress",
            "ltc.finetune": "ltc finetune"}


def read_checkpoint(path: str | Path, *, writer: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit` (``torch.load(weights_only=True)``: no pickled code).

    The file is ``{"format": "ltc-checkpoint", "version", "writer", "ltc_version", "stage", "epoch", "epochs",
    "stopped", "model", "optimizer", "scheduler", "scaler", "rng", "loader_generator", "history", "log_rows",
    "extra"}``. ``writer`` (e.g. ``'ltc.compress'``): refuse a checkpoint that another command wrote.

    Raises:
        FileNotFoundError: no file. ValueError: unreadable, not an ltc checkpoint, another checkpoint version,
        or another writer; each message says what to do.
    """
    p = Path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # truncated zip, random bytes, pickled objects refused by weights_only, ...
        raise ValueError(
            f"checkpoint {p} cannot be read ({load_error_reason(exc)}); it is damaged or not written by ltc: "
            "delete it to start afresh, or resume from another copy"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        what = (f"format {obj.get('format')!r}" if isinstance(obj, dict) and obj.get("format") else
                "a plain dict" if isinstance(obj, dict) else f"a {type(obj).__name__}")
        raise ValueError(f"checkpoint {p} is not an ltc checkpoint (it holds {what}); point at an ltc run folder, "
                         "or start afresh without resume")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {p} was written by another ltc version (checkpoint version {obj.get('version')!r}, "
            f"ltc {obj.get('ltc_version')}; this ltc reads version {CHECKPOINT_VERSION}); start afresh without "
            "--resume or use another checkpoint dir"
        )
    if writer is not None and obj.get("writer") != writer:
        got = _WRITERS.get(str(obj.get("writer")), str(obj.get("writer")))
        raise ValueError(
            f"checkpoint {p} was written by {got}, not by {_WRITERS.get(writer, writer)}; point at a folder of "
            "that kind of run, or start afresh without resume"
        )
    return obj


def _nonfinite_entries(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` holding a NaN or an inf."""
    return [k for k, v in model.state_dict().items()
            if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _kept(ckpt_path: Path | None) -> str:
    if ckpt_path is not None and ckpt_path.is_file():
        return (f"The last good checkpoint {ckpt_path} is unchanged: resume from it (with a lower lr) or start "
                "afresh")
    return "No checkpoint was written"


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel under torch.distributed with > 1 process (else as is)."""
    if world_size() <= 1 or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _sync_buffers(module: nn.Module) -> None:
    """Under torch.distributed: rank 0's buffers (BatchNorm running statistics) on every process. DDP syncs them
    at the start of each forward only, so after an epoch every process holds the statistics of its own last
    batch; checkpoints, C steps and the returned model must not depend on the process."""
    if world_size() <= 1:
        return
    for b in module.buffers():
        if b.is_floating_point():
            torch.distributed.broadcast(b.data, src=0)


def fit(
    model: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    optimizer: Optimizer | None = None,
    opt_cfg: dict[str, Any] | None = None,
    scheduler: Any | None = None,
    sched_cfg: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    extra_loss: Callable[[], Tensor | float] | None = None,
    after_step: Callable[[], None] | None = None,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    teacher: nn.Module | None = None,
    kd_weight: float = 0.0,
    kd_temperature: float = 4.0,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    writer: str = "ltc.fit",
    stage: str = "train",
    extra_state: tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]] | None = None,
    log: LogSink | None = None,
    progress: bool = True,
    amp: bool | str = False,
    channels_last: bool = False,
    grad_clip: float | None = None,
    label_smoothing: float = 0.0,
    seed: int | None = None,
    epoch_offset: int = 0,
    describe: Callable[[int], str] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], dict[str, Any] | None] | None = None,
) -> list[dict[str, Any]]:
    """Train for ``epochs`` epochs, validating, logging and checkpointing after each.

    Args:
        model: moved to ``device`` before the optimiser is built; under torch.distributed with several processes
            it is trained wrapped in ``DistributedDataParallel`` (give each process its share of the data, e.g.
            a ``DistributedSampler``), its buffers are made rank 0's after every epoch, and only rank 0 writes.
        optimizer: used as is; otherwise ``make_optimizer(model, **opt_cfg)`` (defaults if ``None``).
        scheduler: stepped once after every epoch (``ReduceLROnPlateau`` gets the val loss, or the
            train loss without validation); otherwise built by
            ``make_scheduler(optimizer, epochs=epochs, **sched_cfg)`` when ``sched_cfg`` is given.
        extra_loss: added to the loss every batch (see :func:`train_one_epoch`).
        after_step: called after every optimizer step (see :func:`train_one_epoch`).
        teacher, kd_weight, kd_temperature: knowledge distillation (see :func:`distillation_loss`).
        checkpoint_path: if given, after every epoch the main process atomically writes the checkpoint described
            in :func:`read_checkpoint` (``"model"``: the state_dict of the model inside any DDP wrapper, so that a
            run can resume with another number of processes; ``"extra"``: ``extra_state[0]()``). A checkpoint
            whose weights became NaN/inf is never written (``NonFiniteLossError``).
        resume: load ``checkpoint_path`` when it exists and continue after its epoch (starts fresh when it does
            not). It must have been written by ``writer`` at ``stage``. Resuming with the same arguments
            reproduces an uninterrupted run bit-for-bit on CPU: model/optimizer/scheduler/RNG states are
            restored, and the data order is made resumable as described under ``seed``.
        writer, stage: recorded in the checkpoint (what wrote it, and which phase of that run).
        extra_state: ``(get, set)``: ``get()`` is stored under ``"extra"``; ``set(extra)`` restores it on resume.
        log: rows are appended to it (a :class:`RunLog` or any :class:`LogSink`); on resume it is truncated back
            to the checkpoint's position.
        seed: if given, ``seed_everything(seed)`` at the start of a fresh run, and at the start of every epoch
            ``e`` (0-based) the train loader's ``generator`` is re-seeded with ``seed + epoch_offset + e``, so a
            ``DataLoader(shuffle=True, generator=torch.Generator())`` draws an order that depends only on
            ``(seed, epoch)``. Samplers with ``set_epoch`` (e.g. :class:`EpochSeededSampler`,
            ``DistributedSampler``) get ``set_epoch(epoch_offset + e)`` in any case. Without ``seed`` the loader
            generator state is saved/restored with the checkpoint.
        epoch_offset: where this run's epochs sit in a longer schedule (data order only).
        describe: ``describe(e)`` names epoch ``e`` (0-based) in messages; default ``"epoch e+1/epochs"``.
        on_epoch_end: ``f(epoch, row)`` called after each epoch (1-based) before logging and
            checkpointing; a returned dict is merged into the row; ``{"stop": True}`` ends the run after this
            epoch (recorded, so a resumed run stops there too).

    Returns:
        History: one dict per completed epoch (including resumed ones) with keys ``epoch``
        (1-based), ``lr`` (LR used during the epoch), ``train_loss``, ``train_extra_loss``,
        ``train_acc``, ``val_loss``, ``val_acc`` (``None`` without ``val_loader``), ``batches`` (the batches this
        process trained on: a share of the epoch under torch.distributed) and ``seconds``.

    Raises:
        NonFiniteLossError: a batch loss or the weights became NaN/inf; the last checkpoint is left as it was.
        ValueError: ``resume`` with a checkpoint of another writer, stage, model or optimizer.
    """
    check_int("epochs", epochs, ge=0)
    dev = resolve_device(device)
    core = unwrap(model)
    core.to(dev)
    if optimizer is None:
        optimizer = make_optimizer(core, **(opt_cfg or {}))
    if scheduler is None and sched_cfg is not None:
        cfg = dict(sched_cfg)
        cfg.setdefault("epochs", max(epochs, 1))
        scheduler = make_scheduler(optimizer, **cfg)
    amp_dtype = _amp_dtype(amp, dev)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    gen = getattr(train_loader, "generator", None)
    gen = gen if isinstance(gen, torch.Generator) else None
    label = describe or (lambda e: f"epoch {e + 1}/{epochs}")

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path, writer=writer)
        if ckpt.get("stage") != stage:
            raise ValueError(f"checkpoint {ckpt_path} holds stage {ckpt.get('stage')!r} of its run, not {stage!r}")
        if ckpt.get("epochs") not in (None, epochs):
            raise ValueError(
                f"checkpoint {ckpt_path} belongs to a run of {ckpt['epochs']} epochs, not {epochs}; resume with the "
                "run's settings, or start afresh in another folder"
            )
        try:
            # stored without DDP's "module." prefix, so that a run can resume with another number of processes
            core.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            text = " ".join(str(exc).split())
            raise ValueError(
                f"{ckpt_path} belongs to another model or optimizer ({text[:300]}); resume with the same model "
                "and settings, or start afresh in another folder"
            ) from None
        if scheduler is not None and ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if gen is not None and ckpt.get("loader_generator") is not None:
            gen.set_state(ckpt["loader_generator"])
        if extra_state is not None:
            extra_state[1](ckpt.get("extra") or {})
        history = list(ckpt.get("history", []))
        start_epoch = int(ckpt["epoch"])
        if log is not None and ckpt.get("log_rows") is not None:
            log.truncate(int(ckpt["log_rows"]))
        if ckpt.get("stopped"):
            return history
    elif seed is not None:
        seed_everything(seed)

    net = _ddp(model, dev)
    for e in range(start_epoch, epochs):
        t0 = time.perf_counter()
        prepare_loader_epoch(train_loader, epoch_offset + e, seed)
        lr = current_lr(optimizer)
        where = label(e)
        try:
            tr = train_one_epoch(
                net, train_loader, optimizer, criterion=criterion, extra_loss=extra_loss, after_step=after_step,
                device=dev, amp=amp,
                channels_last=channels_last, grad_clip=grad_clip, label_smoothing=label_smoothing,
                progress=progress, desc=where, scaler=scaler, teacher=teacher, kd_weight=kd_weight,
                kd_temperature=kd_temperature,
            )
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{where}: {exc} {_kept(ckpt_path)}") from None
        _sync_buffers(core)
        bad = _nonfinite_entries(core)
        if bad:  # a finite last loss, then a step to NaN/inf: never checkpoint such weights
            raise NonFiniteLossError(
                f"{where}: the weights became NaN/inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                "although every batch loss was finite. Training diverged; try a lower learning rate (or gradient "
                f"clipping). {_kept(ckpt_path)}"
            )
        va = (evaluate(core, val_loader, device=dev, amp=amp, channels_last=channels_last, criterion=criterion)
              if val_loader is not None else None)
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(va.loss if va is not None else tr.loss)
            else:
                scheduler.step()
        row: dict[str, Any] = {
            "epoch": e + 1,
            "lr": lr,
            "train_loss": tr.loss,
            "train_extra_loss": tr.extra_loss,
            "train_acc": tr.acc,
            "val_loss": va.loss if va is not None else None,
            "val_acc": va.acc if va is not None else None,
            "batches": tr.batches,
            "seconds": time.perf_counter() - t0,
        }
        stop = False
        if on_epoch_end is not None:
            more = on_epoch_end(e + 1, row)
            if more:
                more = dict(more)
                stop = bool(more.pop("stop", False))
                row.update(_plain(more))
        row = _plain(row)
        history.append(row)
        if log is not None:
            log.append(row)
        if ckpt_path is not None and is_main_process():
            from . import __version__

            atomic_torch_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "writer": writer,
                    "ltc_version": __version__,
                    "stage": stage,
                    "epoch": e + 1,
                    "epochs": epochs,
                    "stopped": stop,
                    "model": core.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": get_rng_state(),
                    "loader_generator": gen.get_state() if gen is not None else None,
                    "history": history,
                    "log_rows": len(log) if log is not None else None,
                    "extra": extra_state[0]() if extra_state is not None else None,
                },
                ckpt_path,
            )
        if progress and is_main_process():
            msg = f"{where}: lr {lr:.4g} train loss {tr.loss:.4f} acc {tr.acc:.4f}"
            if va is not None:
                msg += f" | val loss {va.loss:.4f} acc {va.acc:.4f}"
            tqdm.write(msg)
        if stop:
            break
    return history
