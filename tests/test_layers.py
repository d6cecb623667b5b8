"""Tests for ltc.layers: the deployed factorised layers reproduce the convolution / linear layer they
replace (full ranks) or the conv with the Tucker-2 / SVD-projected weight (reduced ranks), over every conv
geometry."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ltc.layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d, check_decomposable_conv
from ltc.tensor import LowRankFactors, Tucker2Factors, truncated_svd, tucker2

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# PyTorch warns that padding='same' with an even kernel copies the input; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

seeds = st.integers(0, 2**31 - 1)
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def randn(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@st.composite
def conv_cases(draw, dtypes=(torch.float32,)):
    """A random ungrouped ``nn.Conv2d`` (random weights) and a valid input for it.

    Covers int / tuple / 'same' (stride 1) / 'valid' padding, non-square kernels, strides and dilations,
    all four padding modes (input sizes respect reflect's padding < size and circular's padding <= size)
    and bias on/off.
    """
    t, s = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(PADDING_MODES))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1, 1) if kind == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if kind == "int":
        padding = draw(st.integers(0, 2))
        pads = [(padding, padding)] * 2
    elif kind == "tuple":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        pads = [(p, p) for p in padding]
    elif kind == "same":
        padding = "same"
        totals = [d * (kk - 1) for d, kk in zip(dilation, k, strict=True)]
        pads = [(tot // 2, tot - tot // 2) for tot in totals]
    else:
        padding = "valid"
        pads = [(0, 0)] * 2
    hw = []
    for (lo, hi), d, kk in zip(pads, dilation, k, strict=True):
        need = max(1, d * (kk - 1) + 1 - lo - hi)
        if mode == "reflect":
            need = max(need, max(lo, hi) + 1)
        elif mode == "circular":
            need = max(need, max(lo, hi))
        hw.append(draw(st.integers(need, need + 4)))
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(seeds)
    conv = nn.Conv2d(
        s, t, k, stride=stride, padding=padding, dilation=dilation, bias=bias, padding_mode=mode, dtype=dtype
    )
    with torch.no_grad():
        conv.weight.copy_(randn(conv.weight.shape, seed, dtype) / (s * k[0] * k[1]) ** 0.5)
        if bias:
            conv.bias.copy_(randn((t,), seed + 1, dtype))
    x = randn((draw(st.integers(1, 2)), s, *hw), seed + 2, dtype)
    return conv, x


def assert_same_output(got: torch.Tensor, want: torch.Tensor) -> None:
    """max |got - want| <= rel * scale, scale = max |want| (1 if the output is all zeros)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    rel = 1e-5 if want.dtype == torch.float32 else 1e-12
    scale = float(want.abs().max()) or 1.0
    diff = float((got - want).abs().max())
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel:g} x output scale {scale:.3g}"


def weight_conv(conv: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    """``conv`` with the same geometry and bias but ``weight``."""
    other = copy.deepcopy(conv)
    with torch.no_grad():
        other.weight.copy_(weight)
    return other


# ------------------------------------------------------------------------------------- full-rank equivalence


@settings(max_examples=200)
@given(case=conv_cases(dtypes=(torch.float32, torch.float32, torch.float64)))
def test_full_rank_tucker2_and_matrix_convs_reproduce_the_conv(case):
    conv, x = case
    t, s = conv.out_channels, conv.in_channels
    with torch.no_grad():
        want = conv(x)
        tk = Tucker2Conv2d.from_conv(conv, (s, t))
        assert tk.ranks == (s, t)
        assert_same_output(tk(x), want)
        full = min(t, s * conv.kernel_size[0] * conv.kernel_size[1])
        mx = MatrixLowRankConv2d.from_conv(conv, full)
        assert mx.rank == full
        assert_same_output(mx(x), want)


@st.composite
def linear_cases(draw):
    in_f, out_f = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    seed = draw(seeds)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(randn(lin.weight.shape, seed, dtype) / in_f**0.5)
        if bias:
            lin.bias.copy_(randn((out_f,), seed + 1, dtype))
    lead = draw(st.sampled_from([(1,), (3,), (2, 4)]))  # (N,) or (N, L) leading dims
    x = randn((*lead, in_f), seed + 2, dtype)
    return lin, x


@settings(max_examples=200)
@given(case=linear_cases(), data=st.data())
def test_low_rank_linear_full_rank_equivalence_and_reduced_rank_projection(case, data):
    lin, x = case
    full = min(lin.in_features, lin.out_features)
    with torch.no_grad():
        want = lin(x)
        lr = LowRankLinear.from_linear(lin, full)
        assert lr.rank == full
        assert_same_output(lr(x), want)
        rank = data.draw(st.integers(1, full), label="rank")
        lr = LowRankLinear.from_linear(lin, rank)
        assert isinstance(lr.first, nn.Linear) and isinstance(lr.last, nn.Linear)
        assert lr.first.bias is None and (lr.last.bias is None) == (lin.bias is None)
        assert lr.first.weight.shape == (rank, lin.in_features)
        assert lr.last.weight.shape == (lin.out_features, rank)
        projected = truncated_svd(lin.weight, rank).to_tensor()
        torch.testing.assert_close(lr.to_weight(), projected)
        ref = copy.deepcopy(lin)
        ref.weight.copy_(projected)
        assert_same_output(lr(x), ref(x))


# ----------------------------------------------------------------------------------------- reduced ranks


@settings(max_examples=200)
@given(case=conv_cases(), data=st.data())
def test_reduced_rank_tucker2_conv_equals_conv_with_projected_weight(case, data):
    conv, x = case
    t, s = conv.out_channels, conv.in_channels
    r_in, r_out = data.draw(st.integers(1, s), label="r_in"), data.draw(st.integers(1, t), label="r_out")
    n_iter = data.draw(st.sampled_from([0, 0, 2]), label="n_iter")
    with torch.no_grad():
        tk = Tucker2Conv2d.from_conv(conv, (r_in, r_out), n_iter=n_iter)
        projected = tucker2(conv.weight, (r_in, r_out), n_iter=n_iter).to_tensor()
        assert_same_output(tk(x), weight_conv(conv, projected)(x))
        torch.testing.assert_close(tk.to_weight(), projected, rtol=1e-5, atol=1e-6)

    # Structure: three real convs, SPEC section 1.
    first, core, last = tk.first, tk.core, tk.last
    assert all(type(m) is nn.Conv2d for m in (first, core, last))
    assert tk.ranks == (r_in, r_out) and tk.in_channels == s and tk.out_channels == t
    assert first.kernel_size == (1, 1) and first.stride == (1, 1) and first.bias is None
    assert (first.in_channels, first.out_channels) == (s, r_in)
    assert (core.in_channels, core.out_channels) == (r_in, r_out) and core.bias is None
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(core, attr) == getattr(conv, attr), attr
    assert last.kernel_size == (1, 1) and last.stride == (1, 1)
    assert (last.in_channels, last.out_channels) == (r_out, t)
    if conv.bias is None:
        assert last.bias is None
    else:
        assert torch.equal(last.bias, conv.bias)
    assert all(p.dtype == conv.weight.dtype and p.requires_grad for p in tk.parameters())


@settings(max_examples=200)
@given(case=conv_cases(), data=st.data())
def test_reduced_rank_matrix_conv_equals_conv_with_svd_projected_weight(case, data):
    conv, x = case
    t, s = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    rank = data.draw(st.integers(1, min(t, s * kh * kw)), label="rank")
    with torch.no_grad():
        mx = MatrixLowRankConv2d.from_conv(conv, rank)
        projected = truncated_svd(conv.weight.flatten(1), rank).to_tensor().reshape(conv.weight.shape)
        assert_same_output(mx(x), weight_conv(conv, projected)(x))
        torch.testing.assert_close(mx.to_weight(), projected, rtol=1e-5, atol=1e-6)
    first, last = mx.first, mx.last
    assert type(first) is nn.Conv2d and type(last) is nn.Conv2d
    assert (first.in_channels, first.out_channels, first.bias) == (s, rank, None)
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(first, attr) == getattr(conv, attr), attr
    assert last.kernel_size == (1, 1) and (last.in_channels, last.out_channels) == (rank, t)
    assert (last.bias is None) == (conv.bias is None)


# ------------------------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("padding", [1, (2, 0), "same", "valid"])
@pytest.mark.parametrize("bias", [True, False])
def test_every_padding_kind_and_mode_at_full_and_reduced_rank(mode, padding, bias):
    # The grid the property tests sample from, enumerated: every padding kind x padding mode x bias.
    stride = (1, 1) if padding == "same" else (2, 1)
    conv = nn.Conv2d(
        5, 7, (2, 3), stride=stride, padding=padding, dilation=(2, 1), bias=bias, padding_mode=mode
    )
    x = randn((2, 5, 7, 6), 11)
    with torch.no_grad():
        want = conv(x)
        assert_same_output(Tucker2Conv2d.from_conv(conv, (5, 7))(x), want)
        assert_same_output(MatrixLowRankConv2d.from_conv(conv, 7)(x), want)
        projected = tucker2(conv.weight, (3, 4)).to_tensor()
        assert_same_output(Tucker2Conv2d.from_conv(conv, (3, 4))(x), weight_conv(conv, projected)(x))


def test_factorised_layers_copy_weights_and_train():
    conv = nn.Conv2d(6, 8, 3, padding=1)
    tk = Tucker2Conv2d.from_conv(conv, (3, 4))
    before = tk.to_weight().detach().clone()
    with torch.no_grad():
        conv.weight.zero_()  # the factorised layer owns copies, not views
    torch.testing.assert_close(tk.to_weight().detach(), before)
    tk(torch.randn(2, 6, 5, 5)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tk.parameters())
    assert "ranks(r_in, r_out)=(3, 4)" in repr(tk)
    assert "rank=2" in repr(MatrixLowRankConv2d.from_conv(conv, 2))
    assert "rank=2" in repr(LowRankLinear.from_linear(nn.Linear(5, 4), 2))


def test_from_factors_accepts_matching_factors_and_rejects_mismatched_ones():
    conv = nn.Conv2d(4, 6, (3, 2))
    f = tucker2(conv.weight.detach(), (2, 3))
    assert Tucker2Conv2d.from_factors(conv, f).ranks == (2, 3)
    bad = Tucker2Factors(f.core, torch.zeros(5, 3), f.v_in)
    with pytest.raises(ValueError, match="do not fit a conv with 6 output and 4 input channels"):
        Tucker2Conv2d.from_factors(conv, bad)
    lf = truncated_svd(conv.weight.detach().flatten(1), 2)
    assert MatrixLowRankConv2d.from_factors(conv, lf).rank == 2
    with pytest.raises(ValueError, match=r"do not fit a conv whose reshaped weight is \(6, 24\)"):
        MatrixLowRankConv2d.from_factors(conv, LowRankFactors(lf.left, torch.zeros(2, 23)))
    lin = nn.Linear(5, 3)
    with pytest.raises(ValueError, match=r"do not fit a linear layer of shape \(3, 5\)"):
        LowRankLinear.from_factors(lin, LowRankFactors(torch.zeros(3, 2), torch.zeros(2, 4)))


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_and_depthwise_convs_are_refused_by_name(groups):
    conv = nn.Conv2d(4, 8, 3, groups=groups)
    with pytest.raises(ValueError, match=rf"grouped conv \(groups={groups}\)"):
        Tucker2Conv2d.from_conv(conv, (1, 1))
    with pytest.raises(ValueError, match="grouped"):
        MatrixLowRankConv2d.from_conv(conv, 1)
    with pytest.raises(ValueError, match=r"layer 'features\.3' is a grouped conv"):
        check_decomposable_conv(conv, "features.3")


@pytest.mark.parametrize("module", [nn.Linear(4, 4), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.BatchNorm2d(4)])
def test_non_conv2d_modules_raise_type_error(module):
    name = type(module).__name__
    with pytest.raises(TypeError, match=rf"is a {name}, not an nn.Conv2d"):
        Tucker2Conv2d.from_conv(module, (1, 1))
    with pytest.raises(TypeError, match=rf"is a {name}, not an nn.Conv2d"):
        MatrixLowRankConv2d.from_conv(module, 1)
    with pytest.raises(TypeError, match=rf"layer 'head' is a {name}"):
        check_decomposable_conv(module, "head")


def test_conv_rank_errors_name_the_rank_and_its_range():
    conv = nn.Conv2d(4, 6, 3)  # S = 4, T = 6
    cases = [
        ((0, 2), r"r_in=0 is out of range.*\[1, S=4\]"),
        ((5, 2), r"r_in=5 is out of range.*\[1, S=4\]"),
        ((2, 0), r"r_out=0 is out of range.*\[1, T=6\]"),
        ((2, 7), r"r_out=7 is out of range.*\[1, T=6\]"),
        ((1, 2, 3), r"pair \(r_in, r_out\)"),
        ((2,), r"pair \(r_in, r_out\)"),
        (3, r"pair \(r_in, r_out\)"),
    ]
    for ranks, msg in cases:
        with pytest.raises(ValueError, match=msg):
            Tucker2Conv2d.from_conv(conv, ranks)
    for rank in (0, 7):
        with pytest.raises(ValueError, match=rf"rank={rank} is out of range.*\[1, 6\]"):
            MatrixLowRankConv2d.from_conv(conv, rank)


def test_low_rank_linear_rejects_bad_rank_and_non_linear():
    lin = nn.Linear(5, 3)
    for rank in (0, 4, -2):
        with pytest.raises(ValueError, match=rf"rank={rank} is out of range.*\[1, 3\]"):
            LowRankLinear.from_linear(lin, rank)
    with pytest.raises(TypeError, match="expected an nn.Linear, got Conv2d"):
        LowRankLinear.from_linear(nn.Conv2d(3, 3, 1), 1)
    with pytest.raises(TypeError, match="expected an nn.Linear, got ReLU"):
        LowRankLinear.from_linear(nn.ReLU(), 1)


def test_float64_layers_stay_float64_and_match_to_double_precision():
    conv = nn.Conv2d(5, 7, (3, 1), stride=(2, 1), padding=(1, 0), dtype=torch.float64)
    x = torch.randn(2, 5, 9, 6, dtype=torch.float64)
    tk = Tucker2Conv2d.from_conv(conv, (5, 7), n_iter=1)
    assert all(p.dtype == torch.float64 for p in tk.parameters())
    with torch.no_grad():
        assert_same_output(tk(x), conv(x))
        assert_same_output(MatrixLowRankConv2d.from_conv(conv, 7)(x), conv(x))
    lin = nn.Linear(6, 4, dtype=torch.float64)
    lr = LowRankLinear.from_linear(lin, 4)
    assert lr.first.weight.dtype == torch.float64
    with torch.no_grad():
        assert_same_output(lr(x[:, 0, 0]), lin(x[:, 0, 0]))


@CUDA
def test_cuda_layers_live_on_the_conv_device_and_match():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, padding_mode="reflect").cuda()
    x = torch.randn(2, 8, 11, 9, device="cuda")
    tk = Tucker2Conv2d.from_conv(conv, (8, 12))
    mx = MatrixLowRankConv2d.from_conv(conv, 12)
    assert all(p.device.type == "cuda" for p in [*tk.parameters(), *mx.parameters()])
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full fp32 convs
        want = conv(x)
        for got in (tk(x), mx(x)):
            assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    lin = nn.Linear(10, 6).cuda()
    lr = LowRankLinear.from_linear(lin, 6)
    assert lr.last.weight.device.type == "cuda"
