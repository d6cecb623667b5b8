"""Tests for ``ltc.serialization``: safe save/load of compressed and channel-pruned models, format versions."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from _io_models import (
    MyNet,
    compress_mynet,
    matrix_small_cnn,
    other_files,
    randomise_bn,
    shapes_of,
    structure_of,
    tucker_resnet18,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import ltc
from ltc import models
from ltc import serialization as ser
from ltc.layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d
from ltc.methods import get_method

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def x32() -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tucker_resnet(x32: Tensor) -> nn.Module:
    return tucker_resnet18(x32)


@pytest.fixture(scope="module")
def matrix_cnn() -> nn.Module:
    return matrix_small_cnn()


def rewrite(src: Path, dst: Path, **changes: object) -> dict:
    """Copy the ltc file ``src`` to ``dst`` through torch.save with top-level entries changed."""
    raw = torch.load(src, weights_only=True)
    raw.update(changes)
    torch.save(raw, dst)
    return raw


def as_version_1(src: Path, dst: Path) -> None:
    """What ltc 0.1 wrote: format version 1, no records of plain layers."""
    raw = torch.load(src, weights_only=True)
    structure = json.loads(raw["structure"])
    assert "plain" in structure
    del structure["plain"]
    raw["version"] = 1
    raw["structure"] = json.dumps(structure)
    torch.save(raw, dst)


# ----------------------------------------------------------------------------------------------- save / load


def test_roundtrip_zoo_tucker(tucker_resnet: nn.Module, x32: Tensor, tmp_path: Path) -> None:
    path = tmp_path / "resnet.ltc"
    ltc.save(tucker_resnet, path, meta={"acc": 0.91, "note": "test"})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "ltc-model" and raw["version"] == ser.FORMAT_VERSION == 2
    assert raw["ltc_version"] == ltc.__version__
    assert set(raw) == {"format", "version", "ltc_version", "structure", "state_dict", "meta"}
    assert all(isinstance(v, Tensor) for v in raw["state_dict"].values())

    loaded = ltc.load(path)  # from the file alone
    assert not loaded.training
    assert loaded.ltc_config == tucker_resnet.ltc_config
    assert structure_of(loaded) == structure_of(tucker_resnet)
    assert any(isinstance(m, Tucker2Conv2d) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x32), tucker_resnet(x32))

    info = ser.read_info(path)
    assert info["meta"] == {"acc": 0.91, "note": "test"}
    assert info["structure"]["root"] == "ResNet"
    assert info["structure"]["layers"]["conv1"]["type"] == "tucker2"
    # plain records: the BNs and the dense layers, never the convs inside a factorised layer
    plain = info["structure"]["plain"]
    assert plain["bn1"]["type"] == "batchnorm2d" and plain["bn1"]["num_features"] == tucker_resnet.bn1.num_features
    assert not any(name.startswith("conv1.") for name in plain)
    assert set(plain).isdisjoint(info["structure"]["layers"])
    assert other_files(tmp_path, {"resnet.ltc"}) == []


def test_roundtrip_zoo_matrix_and_lowrank_linear(matrix_cnn: nn.Module, tmp_path: Path) -> None:
    kinds = {type(m) for m in matrix_cnn.modules()}
    assert MatrixLowRankConv2d in kinds and LowRankLinear in kinds
    path = tmp_path / "cnn.ltc"
    ltc.save(matrix_cnn, path)
    loaded = ltc.load(path)
    assert structure_of(loaded) == structure_of(matrix_cnn)
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), matrix_cnn(x))
    layers = ser.read_info(path)["structure"]["layers"]
    assert layers["classifier"] == {
        "type": "lowrank_linear",
        "rank": 4,
        "in_features": 64,
        "out_features": 10,
        "bias": True,
    }


def test_roundtrip_user_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = compress_mynet(randomise_bn(MyNet())).eval()
    path = tmp_path / "mynet.ltc"
    ltc.save(net, path)
    fresh = MyNet()
    loaded = ltc.load(path, model=fresh)
    assert isinstance(fresh.stem, nn.Conv2d)  # the given model is left untouched
    assert structure_of(loaded) == structure_of(net)
    assert loaded.stem.core.padding_mode == "reflect" and loaded.stem.core.stride == (2, 2)
    assert loaded.body[0].first.dilation == (2, 2)
    x = torch.randn(2, 3, 17, 19)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    # an already-compressed instance of the same architecture works as well
    with torch.no_grad():
        assert torch.equal(ltc.load(path, model=compress_mynet(MyNet()))(x), net(x))


def test_save_unwraps_and_keeps_dtype(tmp_path: Path) -> None:
    net = compress_mynet(MyNet()).double().eval()
    path = tmp_path / "dp.ltc"
    ltc.save(nn.DataParallel(net), path)
    loaded = ltc.load(path, model=MyNet())
    assert next(loaded.parameters()).dtype == torch.float64
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


ONE_LAYER = {
    "conv": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5)),
    "linear": (lambda: nn.Linear(6, 4), (2, 6)),
    "bn": (lambda: nn.BatchNorm2d(3), (2, 3, 5, 5)),
}


@pytest.mark.parametrize("kind", ONE_LAYER)
def test_roundtrip_model_that_is_one_plain_layer(kind: str, tmp_path: Path) -> None:
    """The root module itself may be a conv/linear/BN: its plain record must not stop the load."""
    make, shape = ONE_LAYER[kind]
    torch.manual_seed(0)
    saved = randomise_bn(make()).eval()
    path = tmp_path / "one.ltc"
    ltc.save(saved, path)
    loaded = ltc.load(path, model=make())
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), saved(x))


# ----------------------------------------------------------------------------------------------- channel pruning


@pytest.fixture(scope="module", params=[("small_cnn", 0.5, 28), ("resnet34_cifar", 0.125, 32)], ids=lambda p: p[0])
def pruned_zoo(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module, Tensor]:
    pytest.importorskip("torch_pruning")
    name, width, size = request.param
    torch.manual_seed(0)
    base = randomise_bn(models.create(name, num_classes=10, width=width)).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    pruner = get_method("prune").build(base, x, target_sr=3.0)
    pruner.start()
    assert pruner.sr == pytest.approx(3.0, rel=0.031)
    return base, pruner.compressed_model().eval(), x


def test_roundtrip_pruned_zoo_model(pruned_zoo: tuple[nn.Module, nn.Module, Tensor], tmp_path: Path) -> None:
    base, pruned, x = pruned_zoo
    changed = {n for n, s in shapes_of(pruned).items() if shapes_of(base)[n] != s}
    assert any(shapes_of(pruned)[n][0] == "BatchNorm2d" for n in changed)  # BNs shrink with their convs
    assert len(changed) >= 3
    path = tmp_path / "pruned.ltc"
    ltc.save(pruned, path, meta={"method": "prune"})
    loaded = ltc.load(path)  # from the file alone: the zoo rebuilds the dense net, the records resize it
    assert loaded.ltc_config == base.ltc_config
    assert shapes_of(loaded) == shapes_of(pruned)
    assert not loaded.training
    x5 = torch.randn(5, *x.shape[1:])
    with torch.no_grad():
        assert torch.equal(loaded(x5), pruned(x5))
    plain = ser.read_info(path)["structure"]["plain"]
    for name, module in pruned.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert plain[name]["num_features"] == module.num_features
        elif isinstance(module, nn.Conv2d):
            assert (plain[name]["in_channels"], plain[name]["out_channels"]) == (
                module.in_channels,
                module.out_channels,
            )


def test_roundtrip_pruned_then_factorised_zoo_model(pruned_zoo: tuple[nn.Module, nn.Module, Tensor],
                                                    tmp_path: Path) -> None:
    """Channel pruning, then Tucker-2 on the pruned net: the file alone rebuilds both (factorised layers whose
    dense channels were pruned take their geometry from the record)."""
    base, pruned, x = pruned_zoo
    eng = get_method("oneshot").build(pruned, x, target_sr=2.0)
    eng.start()
    both = eng.compressed_model().eval()
    factorised = [n for n, m in both.named_modules() if type(m) in (Tucker2Conv2d, LowRankLinear)]
    resized = [n for n in factorised if n in shapes_of(base) and shapes_of(base)[n] != shapes_of(pruned)[n]]
    assert resized  # the case: a factorised layer whose dense conv had been pruned
    path = tmp_path / "both.ltc"
    ltc.save(both, path)
    for loaded in (ltc.load(path), ltc.load(path, model=base)):
        assert shapes_of(loaded) == shapes_of(both)
        x5 = torch.randn(5, *x.shape[1:])
        with torch.no_grad():
            assert torch.equal(loaded(x5), both(x5))


def test_roundtrip_pruned_user_model(tmp_path: Path) -> None:
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    net = randomise_bn(MyNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = get_method("prune").build(net, x, target_sr=3.0)
    pruner.start()
    pruned = pruner.compressed_model().eval()
    assert pruned.stem.out_channels < net.stem.out_channels and pruned.bn.num_features == pruned.stem.out_channels
    path = tmp_path / "pruned_mynet.ltc"
    ltc.save(pruned, path)
    with pytest.raises(ValueError, match=r"ltc.load\(path, model=MyNet\(\)\)"):
        ltc.load(path)
    fresh = MyNet()
    loaded = ltc.load(path, model=fresh)
    assert shapes_of(fresh) == shapes_of(MyNet())  # the given model is left untouched
    assert shapes_of(loaded) == shapes_of(pruned)
    assert loaded.stem.padding_mode == "reflect" and loaded.body[0].dilation == (2, 2)
    x = torch.randn(3, 3, 17, 15)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


class Plain(nn.Module):
    """Plain layers only (a Tucker stem of fixed geometry aside): conv, BN, a depthwise conv, BatchNorm1d, linear."""

    def __init__(self, c1: int = 8, c2: int = 12, hidden: int = 6, eps: float = 1e-5, tucker: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1, eps=eps)
        self.dw = nn.Conv2d(c1, c1, 3, padding=1, groups=c1)  # depthwise: groups follow the channels
        self.conv2 = nn.Conv2d(c1, c2, 1)
        self.bn2 = nn.BatchNorm2d(c2, eps=eps, momentum=None)
        self.fc1 = nn.Linear(c2, hidden)
        self.bn3 = nn.BatchNorm1d(hidden, eps=eps, affine=False)
        self.fc2 = nn.Linear(hidden, 4)
        if tucker:
            self.stem = Tucker2Conv2d.from_conv(self.stem, (2, 3))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(self.stem(x))))
        x = torch.relu(self.bn2(self.conv2(self.dw(x))))
        return self.fc2(torch.relu(self.bn3(self.fc1(x.mean((2, 3))))))


@settings(max_examples=15)
@given(
    c1=st.integers(1, 10),
    c2=st.integers(1, 14),
    hidden=st.integers(1, 8),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    tucker=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_resized_plain_layers(
    c1: int, c2: int, hidden: int, eps: float, tucker: bool, double: bool, seed: int
) -> None:
    """Any channel counts (smaller or larger than the given model's) load onto ``Plain()`` of the default widths.
    (Layers whose shape is unchanged keep the given model's hyper-parameters, so the template gets the same eps.)"""
    torch.manual_seed(seed)
    saved = Plain(c1, c2, hidden, eps, tucker)
    with torch.no_grad():
        for m in saved.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.01, 2)  # eps matters at this scale
    saved = (saved.double() if double else saved).eval()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "plain.ltc"
        ltc.save(saved, path)
        loaded = ltc.load(path, model=Plain(eps=eps))
    assert shapes_of(loaded) == shapes_of(saved)
    assert structure_of(loaded) == structure_of(saved)
    assert loaded.dw.groups == c1 and loaded.bn1.eps == eps and loaded.bn2.momentum is None
    assert loaded.bn3.affine is False
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64 if double else torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(x), saved(x))


def test_resized_batchnorm_takes_its_settings_from_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = Plain(5, 7, 3, eps=0.5)  # every BN resized (defaults: 8, 12, 6), eps large enough to matter
    saved.bn1.momentum = 0.3
    with torch.no_grad():
        for m in (saved.bn1, saved.bn2, saved.bn3):
            m.running_var.uniform_(0.01, 1)
    saved.eval()
    ltc.save(saved, tmp_path / "p.ltc")
    loaded = ltc.load(tmp_path / "p.ltc", model=Plain(eps=1e-5))
    assert [m.eps for m in (loaded.bn1, loaded.bn2, loaded.bn3)] == [0.5] * 3
    assert (loaded.bn1.momentum, loaded.bn2.momentum, loaded.bn3.affine) == (0.3, None, False)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), saved(x))


# ----------------------------------------------------------------------------------------------- version 1 files


def test_version_1_file_loads(tucker_resnet: nn.Module, x32: Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = compress_mynet(randomise_bn(MyNet())).eval()
    for model, given_model, x in ((tucker_resnet, None, x32), (net, MyNet(), torch.randn(2, 3, 16, 16))):
        v2, v1 = tmp_path / "v2.ltc", tmp_path / "v1.ltc"
        ltc.save(model, v2, meta={"acc": 0.5})
        as_version_1(v2, v1)
        info = ser.read_info(v1)
        assert "plain" not in info["structure"] and info["meta"] == {"acc": 0.5}
        loaded = ltc.load(v1, model=given_model)
        assert structure_of(loaded) == structure_of(model)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_version_1_file_of_a_pruned_model_fails_clearly(
    pruned_zoo: tuple[nn.Module, nn.Module, Tensor], tmp_path: Path
) -> None:
    """Without the plain records the resized layers cannot be rebuilt: the weight check says why."""
    _, pruned, _ = pruned_zoo
    ltc.save(pruned, tmp_path / "v2.ltc")
    as_version_1(tmp_path / "v2.ltc", tmp_path / "v1.ltc")
    with pytest.raises(ValueError, match=r"do not fit the model.*shape mismatch \(file vs model\)"):
        ltc.load(tmp_path / "v1.ltc")


# ----------------------------------------------------------------------------------------------- errors


@pytest.fixture
def mynet_file(tmp_path: Path) -> Path:
    path = tmp_path / "mynet.ltc"
    ltc.save(compress_mynet(MyNet()), path)
    return path


def test_error_not_an_ltc_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="not a readable ltc model file.*ltc.save"):
        ltc.load(junk)
    plain = tmp_path / "plain.pt"
    torch.save(MyNet().state_dict(), plain)
    with pytest.raises(ValueError, match="not an ltc model file.*plain state_dict.*ltc.save"):
        ltc.load(plain)
    with pytest.raises(FileNotFoundError):
        ltc.load(tmp_path / "missing.ltc")


def test_error_truncated_file(mynet_file: Path, tmp_path: Path) -> None:
    data = mynet_file.read_bytes()
    cut = tmp_path / "cut.ltc"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted, truncated"):
        ltc.load(cut, model=MyNet())


def test_error_corrupted_structure(mynet_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.ltc"
    rewrite(mynet_file, bad, structure="{not json")
    with pytest.raises(ValueError, match="corrupted ltc model file"):
        ltc.load(bad, model=MyNet())


def test_error_other_format_version(mynet_file: Path, tmp_path: Path) -> None:
    newer = tmp_path / "v3.ltc"
    rewrite(mynet_file, newer, version=3, ltc_version="9.0")
    with pytest.raises(ValueError, match=r"format version 3 \(written by ltc 9.0\).*reads version 2.*upgrade ltc"):
        ltc.load(newer, model=MyNet())
    older = tmp_path / "v0.ltc"
    rewrite(mynet_file, older, version=0, ltc_version="0.0.1")
    with pytest.raises(ValueError, match=r"format version 0 .*load it with ltc 0.0.1"):
        ser.read_info(older)


def test_error_user_model_needs_model(mynet_file: Path) -> None:
    with pytest.raises(ValueError, match=r"pass the uncompressed model: ltc.load\(path, model=MyNet\(\)\)"):
        ltc.load(mynet_file)


def test_error_unknown_layer_names(mynet_file: Path) -> None:
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    msg = r"records (a layer|factorised layers) '.*' that the given Sequential does not have.*saved from \(MyNet\)"
    with pytest.raises(ValueError, match=msg):
        ltc.load(mynet_file, model=other)


def test_other_channel_counts_take_the_files_geometry(mynet_file: Path) -> None:
    """The file records every layer's channels (resized by pruning or not): an instance of the same class with other
    channel counts loads to exactly the saved model."""
    saved = ltc.load(mynet_file, model=MyNet())
    other = ltc.load(mynet_file, model=MyNet(width=4))
    assert shapes_of(other) == shapes_of(saved)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(other(x), saved(x))


def test_error_layer_kernel_mismatch(mynet_file: Path) -> None:
    net = MyNet()
    net.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2, padding_mode="reflect", bias=True)
    msg = r"layer 'stem' of the given MyNet is Conv2d\(3->8, kernel \(5, 5\)\), the file's is Conv2d\(3->8, kernel " \
          r"\(3, 3\)\); pass an instance of the architecture the file was saved from \(MyNet\)"
    with pytest.raises(ValueError, match=msg):
        ltc.load(mynet_file, model=net)


def test_error_state_dict_mismatch(mynet_file: Path) -> None:
    with pytest.raises(ValueError, match="do not fit the model.*missing: extra.*same architecture"):
        ltc.load(mynet_file, model=MyNet(extra=True))


def test_error_meta_not_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="meta must be a JSON-serialisable dict"):
        ltc.save(MyNet(), tmp_path / "m.ltc", meta={"x": object()})
    assert other_files(tmp_path, set()) == []


def test_interrupted_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = compress_mynet(MyNet()).eval()
    path = tmp_path / "model.ltc"
    ltc.save(net, path)
    before = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save(obj, f, *args, **kwargs)
        f.seek(0)  # type: ignore[attr-defined]
        f.truncate(100)  # type: ignore[attr-defined]  # half-written ...
        raise RuntimeError("simulated crash mid-write")  # ... then the process dies

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ltc.save(MyNet(width=4), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert other_files(tmp_path, {"model.ltc"}) == []
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ltc.load(path, model=MyNet())(x), net(x))
