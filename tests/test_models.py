"""Tests for the model zoo (``ltc.models``): layouts, parameter counts, MACs, widths and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ltc import models

ALL_MODELS = [
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "resnet34_cifar",
    "resnet50",
    "shufflenet_v2",
    "small_cnn",
    "vgg16",
    "vgg16_cifar",
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs: object) -> nn.Module:
    """Build a full-size model on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return models.create(name, **kwargs)


def count_macs(name: str, num_classes: int, size: int) -> tuple[float, dict[str, int]]:
    model = meta_model(name, num_classes=num_classes).eval()
    x = torch.empty(1, 3, size, size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / 2, ops


# ----------------------------------------------------------------------------------------------- registry


def test_list_models_sorted_and_complete() -> None:
    names = models.list_models()
    assert names == sorted(names)
    assert set(ALL_MODELS) <= set(names)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet18", 224),
        ("resnet34", 224),
        ("resnet34_cifar", 32),
        ("resnet50", 224),
        ("vgg16", 224),
        ("vgg16_cifar", 32),
        ("mobilenet_v2", 224),
        ("shufflenet_v2", 224),
        ("small_cnn", 28),
    ],
)
def test_default_input_size(name: str, size: int) -> None:
    assert models.default_input_size(name) == size


def test_unknown_name_lists_models_and_suggests() -> None:
    with pytest.raises(ValueError, match="resnet34") as info:
        models.create("resnt34")
    msg = str(info.value)
    assert "Did you mean 'resnet34'" in msg
    for name in ALL_MODELS:
        assert name in msg
    with pytest.raises(ValueError, match="unknown model"):
        models.default_input_size("alexnet")


@pytest.mark.parametrize("width", [0, -0.5, float("nan"), float("inf"), "1"])
def test_bad_width(width: object) -> None:
    with pytest.raises(ValueError, match="width"):
        models.create("small_cnn", width=width)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_classes", [0, -3, 2.0, True])
def test_bad_num_classes(num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        models.create("small_cnn", num_classes=num_classes)  # type: ignore[arg-type]


def test_bad_in_channels_and_direct_call_validated() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        models.create("small_cnn", in_channels=0)
    with pytest.raises(ValueError, match="width"):
        models.resnet18(width=0)


def test_register_duplicate_name_rejected() -> None:
    before = models.list_models()
    with pytest.raises(ValueError, match="already registered"):

        @models.register_model("resnet18")
        def _dup(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> nn.Module:
            return nn.Linear(1, num_classes)

    assert models.list_models() == before
    assert models.create("resnet18", width=0.125).fc.in_features == 64


def test_unknown_kwarg_raises_typeerror() -> None:
    with pytest.raises(TypeError):
        models.create("resnet18", width=0.125, bogus=1)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_ltc_config_rebuilds_same_architecture(name: str) -> None:
    model = meta_model(name, num_classes=7, width=0.25, in_channels=1)
    cfg = model.ltc_config
    assert type(cfg) is dict
    assert cfg == {"name": name, "num_classes": 7, "width": 0.25, "in_channels": 1}
    rebuilt = meta_model(**cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_ltc_config_records_extra_kwargs_and_state_dict_roundtrip() -> None:
    model = models.create("vgg16_cifar", num_classes=10, width=0.125, dropout=0.1)
    assert model.ltc_config["dropout"] == 0.1
    assert model.classifier[2].p == 0.1
    rebuilt = models.create(**model.ltc_config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), model(x))


# ------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [
        ("resnet18", 1000, 11_689_512),
        ("resnet34", 1000, 21_797_672),
        ("resnet50", 1000, 25_557_032),
        ("resnet34", 2, 21_285_698),
        ("vgg16", 1000, 138_357_544),
        ("vgg16", 2, 134_268_738),
        ("vgg16_cifar", 10, 33_646_666),
        ("mobilenet_v2", 1000, 3_504_872),
        ("shufflenet_v2", 1000, 2_278_604),
    ],
)
def test_param_counts(name: str, num_classes: int, expected: int) -> None:
    assert n_params(meta_model(name, num_classes=num_classes)) == expected


def test_spec_rounded_param_counts() -> None:
    assert round(n_params(meta_model("resnet34", num_classes=2)) / 1e6, 3) == 21.286
    assert round(n_params(meta_model("vgg16", num_classes=2)) / 1e6, 3) == 134.269
    assert abs(n_params(meta_model("vgg16_cifar", num_classes=10)) / 1e6 - 33.647) < 0.0005
    cifar = n_params(meta_model("resnet34_cifar", num_classes=10))
    assert cifar == n_params(meta_model("resnet34", num_classes=10)) == 21_289_802
    assert round(cifar / 1e6, 2) == 21.29


# ------------------------------------------------------------------------------------------------- MACs


@pytest.mark.parametrize(
    ("name", "num_classes", "size", "expected_gmacs"),
    [
        ("resnet34", 1000, 224, 3.664),
        ("resnet34_cifar", 1000, 32, 0.292),
        ("vgg16_cifar", 10, 32, 0.332),
        ("vgg16", 2, 224, 15.466),
    ],
)
def test_macs(name: str, num_classes: int, size: int, expected_gmacs: float) -> None:
    """Conv + linear MACs match the SPEC figures to the three decimals (in GMACs) they are quoted with."""
    macs, ops = count_macs(name, num_classes, size)
    assert set(ops) == {"aten.convolution", "aten.addmm"}
    assert round(macs / 1e9, 3) == expected_gmacs


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize(("width", "in_channels", "num_classes"), [(1.0, 3, 10), (0.5, 1, 3)])
def test_ltc_profile_agrees_with_torch_flop_counter(name: str, width: float, in_channels: int,
                                                    num_classes: int) -> None:
    """ltc.cost.profile (module hooks and shape formulas) and torch's FlopCounterMode (aten ops) are independent
    counts: MACs = FLOPs / 2 exactly, params the same, for every zoo model (depthwise and grouped convs too)."""
    from ltc.cost import profile

    model = meta_model(name, num_classes=num_classes, width=width, in_channels=in_channels).eval()
    size = models.default_input_size(name)
    x = torch.empty(1, in_channels, size, size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    prof = profile(model, x)
    assert prof.macs * 2 == counter.get_total_flops()
    assert prof.params == n_params(model)


def test_exact_macs() -> None:
    assert count_macs("resnet34", 1000, 224)[0] == 3_663_761_408
    assert count_macs("resnet34_cifar", 1000, 32)[0] == 292_327_424
    assert count_macs("vgg16_cifar", 10, 32)[0] == 332_111_872
    assert count_macs("vgg16", 2, 224)[0] == 15_466_176_512


# --------------------------------------------------------------------------------- torchvision layout


@pytest.mark.parametrize(
    ("name", "n_keys", "shapes"),
    [
        (
            "resnet34",
            218,
            {
                "conv1.weight": (64, 3, 7, 7),
                "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                "layer2.0.downsample.1.num_batches_tracked": (),
                "layer4.2.conv2.weight": (512, 512, 3, 3),
                "fc.weight": (1000, 512),
                "fc.bias": (1000,),
            },
        ),
        ("resnet18", 122, {"layer4.1.bn2.running_var": (512,), "fc.weight": (1000, 512)}),
        (
            "resnet50",
            320,
            {
                "layer1.0.conv1.weight": (64, 64, 1, 1),
                "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                "layer3.5.conv3.weight": (1024, 256, 1, 1),
                "fc.weight": (1000, 2048),
            },
        ),
        (
            "vgg16",
            32,
            {
                "features.0.weight": (64, 3, 3, 3),
                "features.28.weight": (512, 512, 3, 3),
                "features.28.bias": (512,),
                "classifier.0.weight": (4096, 25088),
                "classifier.3.weight": (4096, 4096),
                "classifier.6.weight": (1000, 4096),
            },
        ),
        (
            "vgg16_cifar",
            97,
            {
                "features.1.running_mean": (64,),
                "features.40.weight": (512, 512, 3, 3),
                "features.41.weight": (512,),
                "classifier.0.weight": (4096, 512),
            },
        ),
        (
            "mobilenet_v2",
            314,
            {
                "features.0.0.weight": (32, 3, 3, 3),
                "features.1.conv.0.0.weight": (32, 1, 3, 3),
                "features.1.conv.1.weight": (16, 32, 1, 1),
                "features.2.conv.0.0.weight": (96, 16, 1, 1),
                "features.17.conv.2.weight": (320, 960, 1, 1),
                "features.18.0.weight": (1280, 320, 1, 1),
                "classifier.1.weight": (1000, 1280),
            },
        ),
        (
            "shufflenet_v2",
            338,
            {
                "conv1.0.weight": (24, 3, 3, 3),
                "stage2.0.branch1.0.weight": (24, 1, 3, 3),
                "stage2.0.branch1.2.weight": (58, 24, 1, 1),
                "stage2.1.branch2.0.weight": (58, 58, 1, 1),
                "stage3.7.branch2.3.weight": (116, 1, 3, 3),
                "stage4.3.branch2.5.weight": (232, 232, 1, 1),
                "conv5.0.weight": (1024, 464, 1, 1),
                "fc.weight": (1000, 1024),
            },
        ),
    ],
)
def test_torchvision_state_dict_layout(name: str, n_keys: int, shapes: dict[str, tuple[int, ...]]) -> None:
    sd = meta_model(name).state_dict()
    assert len(sd) == n_keys
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_resnet50_is_v1_5_and_cifar_variant_shares_keys() -> None:
    r50 = meta_model("resnet50")
    assert r50.layer2[0].conv1.stride == (1, 1)
    assert r50.layer2[0].conv2.stride == (2, 2)
    r34 = models.create("resnet34", num_classes=10, width=0.125)
    cifar = models.create("resnet34_cifar", num_classes=10, width=0.125)
    assert isinstance(r34.maxpool, nn.MaxPool2d)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert (
        cifar.conv1.kernel_size == (7, 7) and cifar.conv1.stride == (2, 2) and cifar.conv1.padding == (3, 3)
    )
    cifar.load_state_dict(r34.state_dict(), strict=True)


def test_torchvision_style_init() -> None:
    model = models.create("resnet18", width=0.5)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    w = model.layer3[0].conv1.weight  # kaiming_normal fan_out: std = sqrt(2 / (out * k * k))
    expected_std = math.sqrt(2.0 / (w.shape[0] * 9))
    assert w.std().item() == pytest.approx(expected_std, rel=0.1)
    vgg = models.create("vgg16_cifar", num_classes=10, width=0.25)
    assert torch.all(vgg.classifier[0].bias == 0)
    assert vgg.classifier[0].weight.std().item() == pytest.approx(0.01, rel=0.1)


# --------------------------------------------------------------------------------- forward and width


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shape_at_default_size(name: str) -> None:
    torch.manual_seed(0)
    width = 0.125 if name == "vgg16" else 0.25
    model = models.create(name, num_classes=5, width=width)
    size = models.default_input_size(name)
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name", ["small_cnn", "resnet34_cifar", "vgg16_cifar", "mobilenet_v2", "shufflenet_v2"]
)
def test_in_channels_one(name: str) -> None:
    model = models.create(name, num_classes=3, width=0.25, in_channels=1).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    size = models.default_input_size(name)
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 3)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, size, size))


def test_width_scales_channels() -> None:
    full, half = meta_model("resnet18"), meta_model("resnet18", width=0.5)
    assert (full.conv1.out_channels, half.conv1.out_channels) == (64, 32)
    assert (full.layer4[0].conv2.out_channels, half.layer4[0].conv2.out_channels) == (512, 256)
    assert half.fc.in_features == 256
    assert meta_model("resnet50", width=0.5).fc.in_features == 1024
    assert n_params(half) < n_params(full) / 3

    assert meta_model("resnet18", width=0.001).conv1.out_channels == 1  # at least one channel
    assert meta_model("small_cnn", width=0.3).features[0].out_channels == 10  # round(9.6)

    vgg = meta_model("vgg16_cifar", num_classes=10, width=0.5)
    convs = [m.out_channels for m in vgg.features if isinstance(m, nn.Conv2d)]
    assert convs == [32, 32, 64, 64, 128, 128, 128, 256, 256, 256, 256, 256, 256]
    assert vgg.classifier[0].in_features == 256 and vgg.classifier[0].out_features == 2048

    small = meta_model("small_cnn", width=2.0)
    assert [m.out_channels for m in small.features if isinstance(m, nn.Conv2d)] == [64, 128, 256, 256]


def test_mobilenet_width_divisible_by_8() -> None:
    half = meta_model("mobilenet_v2", width=0.5)
    convs = [m for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert half.features[0][0].out_channels == 16
    assert half.features[17].conv[2].out_channels == 160
    assert half.classifier[1].in_features == 1280  # torchvision keeps the last 1280 channels for width < 1
    tiny = meta_model("mobilenet_v2", width=0.01)
    assert min(c.out_channels for c in tiny.modules() if isinstance(c, nn.Conv2d)) == 8
    assert meta_model("mobilenet_v2", width=1.5).classifier[1].in_features == 1920


def test_shufflenet_width_keeps_even_stages() -> None:
    model = meta_model("shufflenet_v2", width=0.25)
    assert model._stage_out_channels == [6, 30, 58, 116, 256]
    assert model.stage2[0].branch1[2].out_channels == 15
    assert model.fc.in_features == 256
    tiny = models.create("shufflenet_v2", num_classes=4, width=0.01)
    assert tiny._stage_out_channels[1:4] == [2, 2, 4]
    assert tiny(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    for name in ("small_cnn", "resnet34_cifar"):
        model = models.create(name, num_classes=4, width=0.25)
        size = models.default_input_size(name)
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()), name


def test_vgg16_cifar_requires_32px_input() -> None:
    model = models.create("vgg16_cifar", num_classes=10, width=0.125).eval()
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 64, 64))
