"""``weighting='fisher'``: the loss sensitivity of each layer's relative output error
(:func:`ltc.metrics.collect_output_sensitivity`) and what the C step does with it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ltc
from ltc.metrics import collect_output_sensitivity

SETTINGS = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], max_examples=20)


class Chain(nn.Module):
    """conv-BN-ReLU, conv-ReLU, conv, pool, linear: no biases, so scaling a conv's output and dividing the next
    layer's weight by the same factor leaves the function unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8, eps=1e-10)  # an eps that no scale of c1 makes visible
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(8, 6, 1, bias=False)
        self.fc = nn.Linear(6, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.c1(x)))
        x = self.c3(torch.relu(self.c2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _chain(seed: int) -> Chain:
    torch.manual_seed(seed)
    net = Chain()
    with torch.no_grad():
        net.bn.running_mean.normal_(0, 0.3)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.train()  # the collector must switch to eval mode (and back)


def _brute_force(model: nn.Module, batches: list[torch.Tensor], layer: str, seed: int) -> float:
    """``E‖g‖² · E‖y − ȳ‖² / n`` with each image's output gradient taken alone, labels drawn as the collector
    draws them (one generator, batch after batch, from the eval-mode softmax)."""
    model = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        labels = torch.cat([torch.multinomial(torch.softmax(model(b).double(), 1), 1, generator=gen).squeeze(1)
                            for b in batches])
    x = torch.cat(batches)
    module = dict(model.named_modules())[layer]
    g2, ys = 0.0, []
    store: dict[str, torch.Tensor] = {}
    h = module.register_forward_hook(lambda _m, _a, out: store.__setitem__("y", out))
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), labels[i : i + 1])
        (g,) = torch.autograd.grad(loss, [store["y"]])
        g2 += float(g.double().square().sum())
        ys.append(store["y"].detach().double())
    h.remove()
    y = torch.cat(ys)
    rows = y.movedim(1, -1).reshape(-1, y.shape[1]) if y.dim() > 2 else y
    energy = float((rows - rows.mean(0)).square().sum()) / len(x)
    return g2 / len(x) * energy / y[0].numel()


@SETTINGS
@given(n=st.integers(2, 6), batch=st.integers(1, 4), seed=st.integers(0, 2**16),
       layer=st.sampled_from(["c1", "c2", "c3", "fc"]))
def test_sensitivity_matches_each_image_alone(n, batch, seed, layer):
    """The batched hooks give what image-by-image gradients give (eval-mode BatchNorm couples no images), over
    several batches; no parameter's ``.grad`` is touched and every module's train flag is restored."""
    model = _chain(seed)
    x = torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed + 1))
    batches = list(x.split(batch))
    got = collect_output_sensitivity(model, ["c1", "c2", "c3", "fc"], batches, images=n, seed=seed)
    assert got[layer] == pytest.approx(_brute_force(model, batches, layer, seed), rel=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.bn.training


@SETTINGS
@given(log_scales=st.lists(st.floats(-2, 2), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_fisher_weighting_is_invariant_to_function_preserving_rescaling(log_scales, seed):
    """Scaling conv ``k``'s output by ``s_k`` and the next layer's weight by ``1/s_k`` changes nothing the network
    computes: the sensitivities (gradient down by ``s``, output energy up by ``s²``) and the ranks the budget-mode C
    step chooses stay the same."""
    model = _chain(seed).eval()
    scaled = copy.deepcopy(model)
    s1, s2, s3 = (10.0**v for v in log_scales)
    with torch.no_grad():  # c1 feeds BatchNorm, which undoes any scale: only c2 -> c3 -> fc carry one
        scaled.c2.weight.mul_(s2)
        scaled.c3.weight.mul_(s3 / s2)
        scaled.fc.weight.div_(s3)
        scaled.c1.weight.mul_(s1)
        scaled.bn.running_mean.mul_(s1)
        scaled.bn.running_var.mul_(s1**2)
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(scaled(x), model(x), rtol=1e-4, atol=1e-5)
    names = ["c1", "c2", "c3"]
    a = collect_output_sensitivity(model, names, x, images=16)
    b = collect_output_sensitivity(scaled, names, x, images=16)
    assert b == pytest.approx(a, rel=1e-3)
    ra = ltc.LTC(model, x[:1], target_sr=2.0, weighting="fisher", calibration=x, calibration_images=16)
    rb = ltc.LTC(scaled, x[:1], target_sr=2.0, weighting="fisher", calibration=x, calibration_images=16)
    ra.start()
    rb.start()
    assert ra.ranks == rb.ranks


class TwoBranch(nn.Module):
    """Two identical branches; the second's contribution to the logits is multiplied by ``eps``."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.a = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.b = copy.deepcopy(self.a)
        self.head = nn.Linear(12, 4)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        ya, yb = (torch.relu(conv(x)).mean(dim=(2, 3)) for conv in (self.a, self.b))
        return self.head(ya) + self.eps * self.head(yb)


def test_fisher_gives_rank_to_the_branch_the_loss_cares_about():
    """The second branch's output gradient is ``eps`` times the first's and its output the same: its sensitivity
    is ``eps²`` times smaller, so the weights (geometric mean 1) are exactly ``1/eps`` and ``eps`` times the relative
    ones. ``'relative'`` sees two identical layers (ranks equal up to the budget's granularity); ``'fisher'`` moves
    rank from the branch the loss ignores to the other at the same budget."""
    eps = 0.01
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    comps = {}
    for weighting in ("relative", "fisher"):
        comps[weighting] = ltc.LTC(TwoBranch(eps), x[:1], target_sr=2.0, include=["a", "b"], weighting=weighting,
                                   calibration=x, calibration_images=32)
        comps[weighting].start()
    rel, fis = comps["relative"], comps["fisher"]
    assert fis.layers["a"].scale == pytest.approx(rel.layers["a"].scale / eps, rel=1e-6)
    assert fis.layers["b"].scale == pytest.approx(rel.layers["b"].scale * eps, rel=1e-6)
    size = {w: {n: r[0] * r[1] for n, r in c.ranks.items()} for w, c in comps.items()}
    assert abs(size["relative"]["a"] - size["relative"]["b"]) <= 8
    assert size["fisher"]["a"] > max(size["relative"].values())
    assert size["fisher"]["b"] < min(size["relative"].values())


def test_fisher_needs_calibration_and_logits():
    with pytest.raises(ValueError, match="weighting='fisher' needs calibration inputs"):
        ltc.LTC(_chain(0), torch.randn(1, 3, 6, 6), target_sr=2.0, weighting="fisher")
    dense = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    x = torch.randn(4, 3, 8, 8)
    comp = ltc.LTC(dense, x[:1], target_sr=2.0, weighting="fisher", calibration=x)
    with pytest.raises(ValueError, match=r"needs a classifier returning \(N, classes\) logits; the model returned "
                                         r"\(4, 4, 4, 4\): use weighting='relative'"):
        comp.start()
