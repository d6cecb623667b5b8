"""Tests for ltc.cost: profile() MACs agree with torch's FlopCounterMode (FLOPs / 2), params with numel, the
SPEC section 2 cost formulas with the deployed modules, and profiling leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ltc.cost import (
    LayerGeometry,
    dense_cost,
    format_count,
    linear_cost,
    matrix_cost,
    profile,
    record_geometry,
    tucker2_cost,
)
from ltc.layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [
    # PyTorch warns that padding='same' with an even kernel copies the input; expected here.
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
    # FlopCounterMode's first use imports libcst, which emits DeprecationWarnings of its own.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:libcst"),
]
seeds = st.integers(0, 2**31 - 1)


def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Total FLOPs / 2 counted by torch for one forward pass of the whole batch."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    total = counter.get_total_flops()
    assert total % 2 == 0
    return total // 2


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _out_size(n: int, lo: int, hi: int, k: int, d: int, s: int) -> int:
    return (n + lo + hi - d * (k - 1) - 1) // s + 1


def draw_conv(draw, c: int, h: int, w: int, grouped: bool) -> tuple[nn.Conv2d, int, int, int]:
    """A random valid conv for a (c, h, w) input; returns it and the output (c, h, w)."""
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0])) if grouped else 1
    out = groups * draw(st.integers(1, max(1, 8 // groups)))
    k = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    dil = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = [1, 1] if kind == "same" else [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    if kind == "int":
        padding = draw(st.integers(0, 2))
        pad = [padding, padding]
    elif kind == "tuple":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        pad = list(padding)
    else:
        padding, pad = kind, [0, 0]
    sizes = [h, w]
    los, his = [0, 0], [0, 0]
    for i in range(2):
        lo = hi = pad[i]
        if kind == "same":
            tot = dil[i] * (k[i] - 1)
            lo, hi = tot // 2, tot - tot // 2
        if sizes[i] + lo + hi < dil[i] * (k[i] - 1) + 1:  # kernel too large for this input: make it 1 wide
            k[i], dil[i] = 1, 1
            if kind == "same":
                lo = hi = 0
        los[i], his[i] = lo, hi
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    if mode == "reflect" and any(max(los[i], his[i]) >= sizes[i] for i in range(2)):
        mode = "zeros"
    if mode == "circular" and any(max(los[i], his[i]) > sizes[i] for i in range(2)):
        mode = "zeros"
    conv = nn.Conv2d(
        c,
        out,
        tuple(k),
        stride=tuple(stride),
        padding=padding,
        dilation=tuple(dil),
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=mode,
    )
    h2, w2 = (_out_size(sizes[i], los[i], his[i], k[i], dil[i], stride[i]) for i in range(2))
    return conv, out, h2, w2


@st.composite
def models(draw):
    """A small random CNN: Conv2d (random geometry, groups, bias), Tucker2Conv2d, MatrixLowRankConv2d, ReLU,
    BatchNorm2d and Linear / LowRankLinear along the width axis, then Flatten and a (low-rank) Linear head.
    Returns the model and a batch of 1..3 inputs."""
    seed = draw(seeds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        c, h, w = draw(st.integers(1, 6)), draw(st.integers(3, 9)), draw(st.integers(3, 9))
        x = torch.randn(draw(st.integers(1, 3)), c, h, w)
        layers: list[nn.Module] = []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["conv", "conv", "tucker", "matrix", "relu", "bn", "linear_w"]))
            if kind in ("conv", "tucker", "matrix"):
                conv, c, h, w = draw_conv(draw, c, h, w, grouped=kind == "conv")
                if kind == "tucker":
                    ranks = (draw(st.integers(1, conv.in_channels)), draw(st.integers(1, conv.out_channels)))
                    layers.append(Tucker2Conv2d.from_conv(conv, ranks))
                elif kind == "matrix":
                    full = min(
                        conv.out_channels, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
                    )
                    layers.append(MatrixLowRankConv2d.from_conv(conv, draw(st.integers(1, full))))
                else:
                    layers.append(conv)
            elif kind == "relu":
                layers.append(nn.ReLU())
            elif kind == "bn":
                layers.append(nn.BatchNorm2d(c))
            else:  # a linear layer over the last axis: c * h feature vectors ("positions") per sample
                lin = nn.Linear(w, draw(st.integers(1, 6)), bias=draw(st.booleans()))
                w = lin.out_features
                if draw(st.booleans()):
                    lin = LowRankLinear.from_linear(lin, draw(st.integers(1, min(lin.in_features, w))))
                layers.append(nn.Sequential(lin, nn.ReLU()))
        head = nn.Linear(c * h * w, draw(st.integers(1, 5)), bias=draw(st.booleans()))
        if draw(st.booleans()):
            head = LowRankLinear.from_linear(
                head, draw(st.integers(1, min(head.in_features, head.out_features)))
            )
        model = nn.Sequential(*layers, nn.Flatten(), head)
    if draw(st.booleans()):
        model.eval()
    return model, x


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), m.training)
        for name, m in model.named_modules()
    }


@settings(max_examples=200)
@given(case=models())
def test_profile_macs_equal_flop_counter_and_params_equal_numel(case):
    model, x = case
    keys = list(model.state_dict().keys())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_counts(model)
    n_params, n_buffers = len(list(model.parameters())), len(list(model.buffers()))

    prof = profile(model, x)

    # Profiling leaves the model as it was: no new parameters, buffers, state or hooks, same modes, and
    # (eval-mode forward) batch-norm running statistics untouched.
    assert list(model.state_dict().keys()) == keys
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert hook_counts(model) == hooks
    assert (len(list(model.parameters())), len(list(model.buffers()))) == (n_params, n_buffers)

    assert prof.macs * x.shape[0] == flop_counter_macs(model, x)
    assert prof.params == numel(model)
    assert prof.flops == 2 * prof.macs
    assert prof.input_shape == tuple(x.shape[1:])
    # One record per Conv2d / Linear leaf, in module order; per-layer MACs sum to the total.
    leaves = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert [lp.name for lp in prof.layers] == leaves
    assert sum(lp.macs for lp in prof.layers) == prof.macs
    modules = dict(model.named_modules())
    for lp in prof.layers:
        assert lp.params == sum(p.numel() for p in modules[lp.name].parameters(recurse=False))


@st.composite
def conv_and_input(draw):
    c, h, w = draw(st.integers(1, 12)), draw(st.integers(3, 9)), draw(st.integers(3, 9))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(draw(seeds))
        conv, *_ = draw_conv(draw, c, h, w, grouped=False)
        x = torch.randn(draw(st.integers(1, 3)), c, h, w)
    return conv, x


@settings(max_examples=200)
@given(case=conv_and_input(), data=st.data())
def test_cost_formulas_match_the_deployed_modules(case, data):
    conv, x = case
    s, t = conv.in_channels, conv.out_channels
    kh, kw = conv.kernel_size
    bias = t if conv.bias is not None else 0
    geom = record_geometry(conv, x)[""]
    with torch.no_grad():
        h_out, w_out = conv(x).shape[2:]
    h_in, w_in = x.shape[2:]
    assert geom.in_hw == (h_in, w_in) and geom.out_hw == (h_out, w_out) and geom.kind == "conv"

    # Dense.
    assert dense_cost(geom) == (numel(conv), h_out * w_out * s * t * kh * kw)
    assert dense_cost(geom)[0] == s * t * kh * kw + bias

    # Tucker-2, SPEC section 2, literally.
    r_in, r_out = data.draw(st.integers(1, s), label="r_in"), data.draw(st.integers(1, t), label="r_out")
    tk = Tucker2Conv2d.from_conv(conv, (r_in, r_out))
    params, macs = tucker2_cost(geom, r_in, r_out)
    assert params == s * r_in + r_in * r_out * kh * kw + r_out * t + bias == numel(tk)
    assert macs == h_in * w_in * s * r_in + h_out * w_out * (r_in * r_out * kh * kw + r_out * t)
    assert macs == profile(tk, x).macs
    assert macs * x.shape[0] == flop_counter_macs(tk, x)

    # Matrix (LRC) scheme.
    rank = data.draw(st.integers(1, min(t, s * kh * kw)), label="rank")
    mx = MatrixLowRankConv2d.from_conv(conv, rank)
    params, macs = matrix_cost(geom, rank)
    assert params == rank * (s * kh * kw + t) + bias == numel(mx)
    assert macs == h_out * w_out * rank * (s * kh * kw + t) == profile(mx, x).macs

    # The formulas are vectorised: a whole (r_in, r_out) grid in one expression equals the int version.
    ri = torch.arange(1, s + 1)[:, None]
    ro = torch.arange(1, t + 1)[None, :]
    grid_p, grid_m = tucker2_cost(geom, ri, ro)
    assert grid_p.shape == grid_m.shape == (s, t)
    assert (int(grid_p[r_in - 1, r_out - 1]), int(grid_m[r_in - 1, r_out - 1])) == tucker2_cost(
        geom, r_in, r_out
    )
    mp, mm = matrix_cost(geom, torch.arange(1, 4))
    assert [int(v) for v in mm] == [matrix_cost(geom, r)[1] for r in (1, 2, 3)]
    assert [int(v) for v in mp] == [matrix_cost(geom, r)[0] for r in (1, 2, 3)]


@settings(max_examples=200)
@given(
    in_f=st.integers(1, 12),
    out_f=st.integers(1, 12),
    bias=st.booleans(),
    lead=st.sampled_from([(2,), (1, 3), (2, 2, 3)]),
    data=st.data(),
)
def test_linear_cost_matches_low_rank_linear(in_f, out_f, bias, lead, data):
    lin = nn.Linear(in_f, out_f, bias=bias)
    x = torch.randn(*lead, in_f)
    geom = record_geometry(lin, x)[""]
    positions = 1
    for d in lead[1:]:
        positions *= d
    assert geom.kind == "linear" and geom.positions == positions
    assert dense_cost(geom) == (numel(lin), profile(lin, x).macs)
    assert dense_cost(geom)[1] == in_f * out_f * positions
    rank = data.draw(st.integers(1, min(in_f, out_f)), label="rank")
    lr = LowRankLinear.from_linear(lin, rank)
    params, macs = linear_cost(geom, rank)
    assert params == rank * (in_f + out_f) + (out_f if bias else 0) == numel(lr)
    assert macs == rank * (in_f + out_f) * positions == profile(lr, x).macs
    assert macs * lead[0] == flop_counter_macs(lr, x)


# ------------------------------------------------------------------------------------------- unit tests


def test_grouped_conv_dense_cost_counts_in_channels_per_group():
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=4)
    x = torch.randn(2, 8, 6, 5)
    geom = record_geometry(conv, x)[""]
    assert geom.groups == 4
    assert dense_cost(geom) == (12 * 2 * 9 + 12, 6 * 5 * 12 * 2 * 9)
    assert dense_cost(geom)[1] * 2 == flop_counter_macs(conv, x)


def test_profile_restores_each_modules_own_training_flag():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 6)
    model(x)  # materialise the lazy layer
    model.train()
    model[1].eval()  # e.g. a frozen batch norm inside a training model
    before = {n: m.training for n, m in model.named_modules()}
    profile(model, x)
    assert {n: m.training for n, m in model.named_modules()} == before
    model.eval()
    profile(model, x)
    assert not any(m.training for m in model.modules())


def test_profile_accepts_a_tuple_input_and_prints_macs():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    x, y = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    prof = profile(Two(), (x, y))
    assert prof.macs == 2 * 16 * 2 * 3 and prof.params == 2 * (6 + 3) and prof.input_shape == (2, 4, 4)
    text = str(prof)
    assert "MACs per sample" in text and "FLOPs = 2·MACs" in text and "Conv 1x1 2->3" in text
    assert "more layers" in prof.table(max_rows=1)


def test_record_geometry_rejects_unbatched_conv_input_and_removes_hooks():
    conv = nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match=r"conv '' received a 3-D input; expected \(N, C, H, W\)"):
        record_geometry(conv, torch.randn(2, 5, 5))
    assert len(conv._forward_hooks) == 0


def test_layer_geometry_pixels_and_format_count():
    g = LayerGeometry("c", "conv", 3, 4, (3, 3), 1, True, (7, 5), (4, 3), 1, (3, 7, 5), (4, 4, 3))
    assert g.in_pixels == 35 and g.out_pixels == 12
    assert format_count(3_664_000_000) == "3.66 G"
    assert format_count(21_797_672) == "21.80 M"
    assert format_count(1_500) == "1.50 K"
    assert format_count(999) == "999"


def test_float64_models_profile_the_same():
    model = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 4))
    x = torch.randn(2, 3, 7, 7)
    p32 = profile(model, x)
    model64, x64 = model.double(), x.double()
    p64 = profile(model64, x64)
    assert (p64.macs, p64.params) == (p32.macs, p32.params)
    assert p64.macs * 2 == flop_counter_macs(model64, x64)
    tk = Tucker2Conv2d.from_conv(model64[0], (2, 3))
    g = record_geometry(model64, x64)["0"]
    assert tucker2_cost(g, 2, 3) == (numel(tk), profile(tk, x64).macs)


@CUDA
def test_cuda_profile_matches_cpu():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10))
    x = torch.randn(2, 3, 4, 4)
    cpu = profile(model, x)
    gpu = profile(model.cuda(), x.cuda())
    assert (gpu.macs, gpu.params) == (cpu.macs, cpu.params)
