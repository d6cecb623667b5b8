"""BatchNorm after deployment: re-estimating its statistics, and folding it into the preceding conv.

* :func:`recalibrate_batchnorm`: a deployed (compressed or pruned) network keeps the dense network's running
  statistics, which no longer describe its layers' outputs; one pass over training batches re-estimates them.
  Every method in ltc does this before any accuracy is reported.
* :func:`fold_batchnorm`: fold every BatchNorm2d that directly follows a conv into that conv (eval semantics),
  for latency measurements and export.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .layers import MatrixLowRankConv2d, Tucker2Conv2d
from .metrics import input_batches
from .surgery import replace_modules, unwrap
from .utils import world_size

__all__ = ["fold_batchnorm", "recalibrate_batchnorm"]

log = logging.getLogger(__name__)

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable[Any], batches: int | None = None) -> nn.Module:
    """Re-estimate the running mean and variance of every BatchNorm layer of ``model`` from ``loader``, in place.

    Statistics are reset, then averaged cumulatively (``momentum=None``) over ``batches`` batches of ``loader``
    (``None``: all of it) in a train-mode forward pass of the BatchNorm layers only (dropout and the rest stay in
    eval mode), without gradients. Use training images without augmentation. Under torch.distributed the
    statistics are averaged over the processes, so every process ends with the same ones. Each batch counts
    alike (as in ``torch.optim.swa_utils.update_bn``). Each module's train/eval flag and momentum are restored, and
    if the loader fails the previous statistics too. Returns ``model``. A model without BatchNorm is left as is.
    """
    core = unwrap(model)
    bns = [m for m in core.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    flags = [(m, m.training) for m in core.modules()]
    momenta = [bn.momentum for bn in bns]
    saved = [{k: v.clone() for k, v in bn.state_dict().items() if k.startswith(("running_", "num_batches"))}
             for bn in bns]
    device = next((p.device for p in core.parameters()), torch.device("cpu"))
    ok = False
    try:
        core.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        seen = 0
        for i, x in enumerate(input_batches(loader, 1 << 62)):
            if batches is not None and i >= batches:
                break
            core(x.to(device))
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_batchnorm: the loader yielded no batches")
        if world_size() > 1:
            n = world_size()
            for bn in bns:
                for t in (bn.running_mean, bn.running_var):
                    torch.distributed.all_reduce(t)
                    t.div_(n)
        ok = True
    finally:
        if not ok:  # a failing loader: put the old statistics back rather than leave them reset
            for bn, st in zip(bns, saved, strict=True):
                bn.load_state_dict({**bn.state_dict(), **st})
        for bn, mom in zip(bns, momenta, strict=True):
            bn.momentum = mom
        for m, t in flags:
            m.training = t
    return model


def _conv_of(module: nn.Module) -> nn.Conv2d | None:
    """The conv whose output a following BN normalises: the conv itself, or a factorised layer's ``last``."""
    if isinstance(module, Tucker2Conv2d | MatrixLowRankConv2d):
        return module.last if type(module.last) is nn.Conv2d else None
    return module if type(module) is nn.Conv2d else None


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    """``(conv name, bn name)`` pairs where the BN's only input is the conv's output and both are called
    once, from a torch.fx symbolic trace; ``None`` when the model cannot be traced."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # dynamic control flow, unsupported Python, ...
        log.debug("fold_batchnorm: torch.fx trace failed (%s); using nn.Sequential adjacency", exc)
        return None
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN_TYPES):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if type(modules.get(src.target)) is not nn.Conv2d:
            continue
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` pairs of adjacent children of plain ``nn.Sequential`` containers."""
    pairs = []
    for seq_name, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        prefix = f"{seq_name}." if seq_name else ""
        items = list(seq.named_children())
        for (name_a, a), (name_b, b) in zip(items, items[1:], strict=False):
            if isinstance(b, _BN_TYPES) and _conv_of(a) is not None:
                conv_name = prefix + name_a + (".last" if _conv_of(a) is not a else "")
                pairs.append((conv_name, prefix + name_b))
    return pairs


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """``conv`` ← ``bn(conv(x))`` with the BN's running statistics (eval semantics)."""
    w = conv.weight
    wide = torch.float64 if w.device.type not in ("mps",) else w.dtype
    var = bn.running_var.to(wide)
    mean = bn.running_mean.to(wide)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(wide)
    bias = conv.bias.to(wide) if conv.bias is not None else torch.zeros_like(mean)
    new_bias = (bias - mean) * scale
    if bn.bias is not None:
        new_bias = new_bias + bn.bias.to(wide)
    conv.weight.copy_((w.to(wide) * scale.reshape(-1, 1, 1, 1)).to(w.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(w.dtype))
    else:
        conv.bias.copy_(new_bias.to(w.dtype))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm2d that directly follows a conv folded into it.

    Pairs come from a torch.fx symbolic trace (so ResNet's ``conv1``/``bn1`` siblings are found); if the model
    cannot be traced, from adjacent children of ``nn.Sequential`` containers. A Tucker2Conv2d or
    MatrixLowRankConv2d followed by BN has the BN folded into its ``last`` 1x1 conv. Each folded BN becomes
    ``nn.Identity``; BNs without running statistics, or whose conv output is used elsewhere, are kept. In eval
    mode the outputs equal the original's to float rounding. ``model`` itself is left untouched.
    """
    net = copy.deepcopy(unwrap(model)).eval()
    pairs = _pairs_fx(net)
    if pairs is None:
        pairs = _pairs_sequential(net)
    modules = dict(net.named_modules())
    replaced: dict[str, nn.Module] = {}
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, _BN_TYPES)
        if bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
            continue
        if bn_name in replaced:
            continue
        _fold_into(conv, bn)
        replaced[bn_name] = nn.Identity()
    replace_modules(net, replaced)
    log.debug("fold_batchnorm: folded %d BatchNorm layers", len(replaced))
    return net
