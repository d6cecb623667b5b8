"""How the C step measures a layer's approximation error: the engine's pluggable metrics.

* ``weight`` (the slides): ``‖W − Θ‖²`` in weight space.
* ``data``: ``‖(W − Θ) ×_in L‖²`` with ``Σ = L Lᵀ`` the (damped) covariance of the layer's inputs (or their
  uncentred second moment), estimated with forward hooks on a few hundred calibration images. It is what the
  layer's output loses on those inputs, its mean shift aside (BatchNorm re-estimation corrects that): exactly for
  1x1 convs, linears and the matrix (LRC) scheme's patch covariance; for a kh x kw conv under Tucker-2 the channel
  covariance ignores correlations between neighbouring pixels (spatial independence).

A metric is a per-layer :class:`Whitening` (or ``None`` for the weight metric): the engine takes the Tucker-2 /
SVD projection and its exact error table of ``Z ×_in L`` and maps ``Θ`` back with ``×_in L⁻¹``, so the deployed
layer has the same ranks and is still three real convs. Pure tensor code plus forward hooks; no training here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Whitening", "collect_input_moments", "collect_output_sensitivity", "whitening_from_moment", "input_batches",
           "metric_mode"]


@dataclass
class Whitening:
    """The right factor of a layer's data metric: ``err(Θ) = ‖(W − Θ) ×_in L‖²``.

    ``L``: ``(d, d)`` lower-triangular with ``Σ = L Lᵀ``; ``L_inv`` its inverse (float64). ``mode``:
    ``'channel'`` (``d`` = the input channels, dim 1 of the weight) or ``'patch'`` (``d = S·kh·kw``, the
    weight reshaped to ``(T, S·kh·kw)``: the exact metric of a kh x kw conv's unfolded input patches).
    ``Σ`` is normalised to a mean eigenvalue of 1 (the metric's scale is the engine's ``w_k``); ``curvature`` is
    its largest eigenvalue, by which the penalty's curvature exceeds ``ρ_k`` (the gradient L step caps
    ``ρ_k·curvature``); ``floor`` its smallest (the proximal L step caps ``ρ_k·floor``).
    """

    L: Tensor
    L_inv: Tensor
    mode: str
    curvature: float = 1.0
    floor: float = 1.0
    _shrink: tuple[float, Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def apply(self, x: Tensor) -> Tensor:
        """``x ×_in L`` (error coordinates), in ``x``'s dtype."""
        return _right(x, self.L, self.mode)

    def unapply(self, x: Tensor) -> Tensor:
        """``x ×_in L⁻¹`` (back to weight coordinates)."""
        return _right(x, self.L_inv, self.mode)

    def to(self, device: torch.device | str) -> Whitening:
        return Whitening(self.L.to(device), self.L_inv.to(device), self.mode, self.curvature, self.floor)

    def shrink(self, a: float, x: Tensor) -> Tensor:
        """``x ×_in (I + a·Σ)⁻¹``, ``Σ = L Lᵀ``, ``a ≥ 0``: the proximal step of the penalty ``a/2·‖x ×_in L‖²``
        (the matrix is cached for the last ``a``), in ``x``'s dtype."""
        if self._shrink is None or self._shrink[0] != a:
            sigma = self.L.double() @ self.L.double().T
            eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
            self._shrink = (a, torch.linalg.solve(eye + a * sigma, eye))
        return _right(x, self._shrink[1], self.mode)


def _right(x: Tensor, m: Tensor, mode: str) -> Tensor:
    m = m.to(device=x.device, dtype=x.dtype)
    if x.dim() == 2 or mode == "patch":
        return (x.reshape(x.shape[0], -1) @ m).reshape(x.shape)
    return torch.einsum("ts...,sr->tr...", x, m)


def metric_mode(module: nn.Module, scheme: str) -> str:
    """``'patch'`` for the matrix scheme on a kh x kw conv (its exact metric), ``'channel'`` otherwise."""
    if scheme == "matrix" and isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1):
        return "patch"
    return "channel"


def _features(module: nn.Module, x: Tensor, mode: str) -> Tensor:
    """The rows whose second moment is the layer's metric: ``(n, d)`` float64."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).double()
    if mode == "patch" or tuple(module.kernel_size) == (1, 1):  # a 1x1 conv reads only the strided/padded pixels
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride) if module.padding_mode == "zeros" else F.unfold(
            F.pad(x, _pad4(module), mode=module.padding_mode), module.kernel_size, dilation=module.dilation,
            stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
    return x.movedim(1, -1).reshape(-1, x.shape[1]).double()


def _pad4(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    ph, pw = conv.padding if isinstance(conv.padding, tuple) else (conv.padding, conv.padding)
    return (int(pw), int(pw), int(ph), int(ph))


def input_batches(data: Any, images: int) -> Iterator[Tensor]:
    """Input batches from ``data`` (a loader of ``(x, y, ...)`` / dicts with ``'input'``, a tensor ``(N, ...)`` or
    a list of tensors) until ``images`` samples have been yielded."""
    if isinstance(data, Tensor):
        data = [data]
    seen = 0
    for batch in data:
        x = batch["input"] if isinstance(batch, dict) else (batch[0] if isinstance(batch, list | tuple) else batch)
        if not isinstance(x, Tensor):
            raise TypeError("calibration data must yield tensors or (inputs, targets) batches")
        x = x[: images - seen]
        seen += x.shape[0]
        yield x
        if seen >= images:
            return
    if seen == 0:
        raise ValueError("the calibration data yielded no images; pass a loader or tensor of training inputs")


@contextlib.contextmanager
def _hooked_eval(model: nn.Module, hooks: dict[nn.Module, Any]) -> Iterator[torch.device]:
    """Forward hooks on, every module in eval mode, for a calibration pass; yields the model's device. The hooks
    are removed and each module's train/eval flag restored on the way out."""
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield next((p.device for p in model.parameters()), torch.device("cpu"))
    finally:
        for h in handles:
            h.remove()
        for m, t in flags:
            m.training = t


def _check_called(counts: dict[str, int]) -> None:
    missing = [n for n, c in counts.items() if c == 0]
    if missing:
        raise ValueError(f"layers {missing[:5]} were not called by the forward pass of the calibration data")


@torch.no_grad()
def collect_input_moments(
    model: nn.Module, layers: dict[str, str], data: Any, images: int = 512, *, centered: bool = False
) -> dict[str, Tensor]:
    """``{name: Σ}``: the second moment ``E[x xᵀ]`` (float64, ``(d, d)``) of each named layer's input features, or
    with ``centered`` their covariance ``E[(x − E x)(x − E x)ᵀ]``, over the first ``images`` samples of ``data``.
    ``layers`` maps module names to ``'channel'`` / ``'patch'`` (see :class:`Whitening`). The model runs in eval mode
    (BatchNorm uses its running statistics and is not updated); every module's train/eval flag is restored."""
    modules = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    means: dict[str, Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in layers}

    def hook(name: str, mode: str) -> Any:
        def fn(mod: nn.Module, inputs: tuple[Any, ...], _out: Any) -> None:
            rows = _features(mod, inputs[0].detach(), mode)
            acc, tot = rows.T @ rows, rows.sum(0)
            sums[name] = acc if name not in sums else sums[name] + acc
            means[name] = tot if name not in means else means[name] + tot
            counts[name] += rows.shape[0]

        return fn

    with _hooked_eval(model, {modules[n]: hook(n, m) for n, m in layers.items()}) as device:
        for x in input_batches(data, images):
            model(x.to(device))
    _check_called(counts)
    out = {}
    for n in layers:
        m2 = sums[n] / counts[n]
        if centered:
            mu = means[n] / counts[n]
            m2 = m2 - torch.outer(mu, mu)
        out[n] = m2
    return out


def whitening_from_moment(sigma: Tensor, mode: str, damping: float = 0.01) -> Whitening:
    """The :class:`Whitening` of a second moment ``Σ``, normalised to ``Σ / mean(diag Σ) + damping·I`` (so that
    dead input channels keep a positive weight and the inverse exists)."""
    s = sigma.double()
    d = s.shape[0]
    scale = float(torch.diagonal(s).mean()) if d else 1.0
    scale = scale if scale > 0 else 1.0
    eye = torch.eye(d, dtype=s.dtype, device=s.device)
    s = 0.5 * (s + s.T) / scale + damping * eye
    scale = 1.0
    jitter = 0.0
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(s + jitter * scale * eye)
        if int(info) == 0:
            break
        jitter = max(jitter * 10, 1e-10)
    else:  # pragma: no cover - a damped PSD matrix always factors
        raise ValueError("the input second moment is not positive definite even after damping")
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    ev = torch.linalg.eigvalsh(s) if d else torch.ones(1, dtype=s.dtype)
    return Whitening(L, L_inv, mode, float(ev[-1]), float(ev[0]))


def collect_output_sensitivity(
    model: nn.Module, layers: list[str], data: Any, images: int = 512, *, seed: int = 0
) -> dict[str, float]:
    """``{name: F_k}``: how much the loss cares about a *relative* error in each named layer's output.

    ``F_k = E‖g_k‖² · E‖y_k − ȳ_k‖² / n_k``, per image: ``y_k`` the layer's output (``n_k`` elements, ``ȳ_k`` its
    per-channel mean), ``g_k = ∂ℓ/∂y_k`` with ``ℓ = −log p(ŷ | x)`` at a label ``ŷ`` drawn from the model's own
    softmax (the Fisher information; no labels needed), over the first ``images`` samples of ``data``. Under the
    Kronecker-factored approximation with isotropic output gradients, perturbing the output by ``Δy`` with
    ``‖Δy‖² = δ²·‖y − ȳ‖²`` raises the expected loss by ``½·F_k·δ²``: ``F_k`` puts layers' relative errors on the
    loss's scale. The model must return ``(N, classes)`` logits; it runs in eval mode (no BatchNorm coupling, so the
    batch's output gradient is every image's own) and no parameter's ``.grad`` is touched."""
    modules = dict(model.named_modules())
    g2 = {n: 0.0 for n in layers}
    s1: dict[str, Tensor] = {}
    s2: dict[str, Tensor] = {}
    count = {n: 0 for n in layers}  # images seen by each layer
    per_image = {n: 0 for n in layers}  # n_k

    def hook(name: str) -> Any:
        def fn(_mod: nn.Module, _inputs: tuple[Any, ...], out: Any) -> None:
            if not isinstance(out, Tensor):
                return
            y = out.detach().double()
            ch = y.movedim(1, -1).reshape(-1, y.shape[1]) if y.dim() > 2 else y.reshape(-1, y.shape[-1])
            s1[name] = ch.sum(0) + s1.get(name, 0)
            s2[name] = ch.square().sum(0) + s2.get(name, 0)
            count[name] += y.shape[0]
            per_image[name] = y[0].numel()
            if out.requires_grad:
                out.register_hook(lambda g: g2.__setitem__(name, g2[name] + float(g.double().square().sum())))

        return fn

    gen = torch.Generator().manual_seed(seed)
    with _hooked_eval(model, {modules[n]: hook(n) for n in layers}) as device, torch.enable_grad():
        for x in input_batches(data, images):
            x = x.to(device).requires_grad_(True)
            logits = model(x)
            if not isinstance(logits, Tensor) or logits.dim() != 2:
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"weighting='fisher' needs a classifier returning (N, classes) logits; the model "
                                 f"returned {shape}: use weighting='relative'")
            probs = torch.softmax(logits.detach().double().cpu(), dim=1)
            labels = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(logits.device)
            loss = F.cross_entropy(logits, labels, reduction="sum")
            torch.autograd.grad(loss, [x])
    _check_called(count)
    out = {}
    for n in layers:
        rows = count[n] * per_image[n] / s1[n].numel()  # (image, position) pairs per channel
        energy = float((s2[n] - s1[n].square() / rows).sum()) / count[n]
        out[n] = (g2[n] / count[n]) * energy / per_image[n]
    return out
