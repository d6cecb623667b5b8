"""`prune`: structured channel pruning (Torch-Pruning) to the same MAC target, the baseline practitioners reach for.

L2-magnitude channel importance (``torch_pruning.importance.MagnitudeImportance(p=2)``, normalised by its mean
within each group), ranked globally (``global_pruning=True``, the default: one pruning ratio for the whole
network, each layer keeping at least 10 % of its channels; ``False``: the same ratio in every group). Torch-Pruning
keeps coupled channels, e.g. across residual additions, in one group; the classifier's outputs are never pruned.
The ratio is found by bisection so that the whole model's SR lands within 3 % of ``target_sr`` (``cost='params'``:
CR; see :meth:`ChannelPruning.start`). Measured on ``resnet34_cifar`` / ``vgg16_cifar`` at width 0.25, global
ranking lands within 3 % of SR 5 and 10; the uniform ratio misses ResNet-34's SR 10 by 4.4 % (one channel of a
6-channel residual group is 5 % of the MACs left).

The pruned network holds only plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` layers with fewer channels,
so it runs as fast as its shape and saves, loads and exports like any other. Options: ``round_to`` (keep channel
counts multiples of it), ``global_pruning``. Needs the optional dependency ``torch-pruning``
(``pip install -e ".[prune]"``).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from typing import Any

import torch
from torch import nn

from ..cost import profile
from ..engine import select_layers
from ..surgery import unwrap
from .base import Example, Model, register_method

log = logging.getLogger("ltc")

INSTALL_HINT = 'method \'prune\' needs Torch-Pruning: pip install -e ".[prune]" (or pip install torch-pruning)'
TOLERANCE = 0.03  # SR may land this far above the target


def require_torch_pruning() -> Any:
    """The ``torch_pruning`` module, or an ``ImportError`` naming the install command."""
    if importlib.util.find_spec("torch_pruning") is None:
        raise ImportError(INSTALL_HINT)
    import torch_pruning

    return torch_pruning


class ChannelPruning:
    """The result of ``prune``: the ratio found, the pruned network and its channel counts.

    ``ranks``: ``{layer: (in_channels, out_channels)}`` kept for every conv/linear whose shape changed;
    ``full_ranks``: the same layers' original channels. :meth:`state_dict` holds the ratio only: pruning is
    deterministic, so :meth:`load_state_dict` rebuilds the same network from the base model.
    """

    def __init__(self, model: nn.Module, example_input: Example, *, target_sr: float, cost: str = "macs",
                 include: Any = None, exclude: Any = None, compress_linear: bool = False,
                 round_to: int | None = None, global_pruning: bool = True) -> None:
        if cost not in ("macs", "params"):
            raise ValueError(f"method 'prune' supports cost 'macs' or 'params', got {cost!r}")
        check_options({"round_to": round_to, "global_pruning": global_pruning})
        self.tp = require_torch_pruning()
        self.model = unwrap(model)
        self.example = example_input
        self.target = float(target_sr)
        self.cost_kind = cost
        self.round_to, self.global_pruning = round_to, bool(global_pruning)
        names, _ = select_layers(self.model, include, exclude, compress_linear=True)
        self.selected = set(names) if (include or exclude) else None
        self.compress_linear = compress_linear
        base = profile(self.model, example_input)
        self.base_macs, self.base_params = base.macs, base.params
        self.ratio = 0.0
        self.lam = 0.0
        self.history: list[dict[str, Any]] = []
        self._pruned: nn.Module | None = None

    # ------------------------------------------------------------------------------------------- pruning
    def _ignored(self, net: nn.Module) -> list[nn.Module]:
        """The classifier (the layers producing the model's output) and every layer the globs leave out."""
        with torch.no_grad():
            out = net(self.example)
        n_out = int(out.shape[1]) if out.dim() > 1 else 1
        ignored = []
        for name, m in net.named_modules():
            if not isinstance(m, nn.Conv2d | nn.Linear):
                continue
            head = isinstance(m, nn.Linear) and m.out_features == n_out
            skip = self.selected is not None and name not in self.selected
            if head or skip or (isinstance(m, nn.Linear) and not self.compress_linear):
                ignored.append(m)
        return ignored

    def prune_at(self, ratio: float) -> nn.Module:
        """A pruned copy of the base model at ``ratio`` (fraction of channels removed per group)."""
        net = copy.deepcopy(self.model)
        flags = [(m, m.training) for m in net.modules()]
        net.eval()
        try:
            if ratio > 0:
                imp = self.tp.importance.MagnitudeImportance(p=2)
                pruner = self.tp.pruner.MetaPruner(
                    net, self.example, importance=imp, pruning_ratio=float(ratio),
                    ignored_layers=self._ignored(net), round_to=self.round_to, global_pruning=self.global_pruning,
                    max_pruning_ratio=0.9,
                )
                pruner.step()
        finally:
            for m, t in flags:
                m.training = t
        return net

    def _ratio_of(self, net: nn.Module) -> float:
        p = profile(net, self.example)
        return (self.base_macs / max(p.macs, 1)) if self.cost_kind == "macs" else self.base_params / max(p.params, 1)

    def start(self) -> None:
        """Find the pruning ratio whose SR (CR) lands closest to the target, within 3 %, by bisection: the
        smallest ratio meeting the target, or the largest ratio just below it when that one is closer (channel
        counts are discrete: at small widths one channel of a residual group moves SR by several per cent)."""
        if self._pruned is not None:
            return
        hi = 0.9  # above this Torch-Pruning skips groups that would lose every channel: SR falls again
        top = self._ratio_of(self.prune_at(hi))
        if top < self.target:
            raise ValueError(f"target {self.target:g} is out of reach for channel pruning: pruning {hi:.0%} of the "
                             f"channels gives {top:.3g}; lower the target")
        lo, r_lo, r_hi = 0.0, 1.0, top
        for _ in range(30):
            if r_hi <= self.target * (1 + TOLERANCE) or hi - lo < 1e-4:
                break
            mid = 0.5 * (lo + hi)
            r = self._ratio_of(self.prune_at(mid))
            self.history.append({"ratio": mid, "sr_or_cr": r})
            if r >= self.target:
                hi, r_hi = mid, r
            else:
                lo, r_lo = mid, r
        above, below = r_hi / self.target - 1, 1 - r_lo / self.target
        pick = hi if above <= TOLERANCE or above <= below else lo
        self._set(pick)
        got = self.sr if self.cost_kind == "macs" else self.cr
        if abs(got / self.target - 1) > TOLERANCE:
            log.warning("ltc: prune: the closest ratio gives %.3g, more than %.0f %% from the target %.3g "
                        "(channel counts are discrete)", got, 100 * TOLERANCE, self.target)

    def _set(self, ratio: float) -> None:
        self.ratio = float(ratio)
        self._pruned = self.prune_at(self.ratio)
        prof = profile(self._pruned, self.example)
        self._macs, self._params = prof.macs, prof.params
        old = {n: m for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
        self.ranks: dict[str, Any] = {}
        self.full_ranks: dict[str, Any] = {}
        for n, m in self._pruned.named_modules():
            if n in old and isinstance(m, nn.Conv2d | nn.Linear):
                shape, full = tuple(m.weight.shape[:2]), tuple(old[n].weight.shape[:2])
                if shape != full:
                    self.ranks[n] = (shape[1], shape[0])
                    self.full_ranks[n] = (full[1], full[0])
        self.history.append({"ratio": self.ratio, "sr": self.sr, "cr": self.cr, "macs": self._macs,
                             "params": self._params})

    @property
    def sr(self) -> float:
        return self.base_macs / max(self._macs, 1)

    @property
    def cr(self) -> float:
        return self.base_params / max(self._params, 1)

    def compressed_model(self) -> nn.Module:
        self.start()
        assert self._pruned is not None
        return copy.deepcopy(self._pruned)

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set(float(state["ratio"]))
        self.history = list(state["history"])


def check_options(options: dict[str, Any]) -> None:
    """``round_to``: an int >= 1 (channel counts kept at its multiples); ``global_pruning``: a bool."""
    round_to = options.get("round_to")
    if round_to is not None and (not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1):
        raise ValueError(f"round_to must be an int >= 1, got {round_to!r}")
    if not isinstance(options.get("global_pruning", True), bool):
        raise ValueError(f"global_pruning must be true or false, got {options['global_pruning']!r}")


@register_method("prune", learns=False, lam="target", options=("round_to", "global_pruning"),
                 check_options=check_options,
                 summary="Torch-Pruning L2 channel pruning to the target (optional dependency)")
def build(model: Model, example_input: Example, *, target_sr: float | None = None, cost: str = "macs",
          include: Any = None, exclude: Any = None, compress_linear: bool = False, round_to: int | None = None,
          global_pruning: bool = True, **_shared: Any) -> ChannelPruning:
    """``_shared``: the low-rank methods' settings (metric, μ, ...), which channel pruning does not use."""
    if target_sr is None:
        raise ValueError("method 'prune' needs target_sr (the theoretical speed-up to prune to)")
    return ChannelPruning(model, example_input, target_sr=target_sr, cost=cost, include=include, exclude=exclude,
                          compress_linear=compress_linear, round_to=round_to, global_pruning=global_pruning)
