"""Tests for ``ltc.io``: safe save/load of compressed models, BatchNorm folding, ONNX/TorchScript export."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import ltc
from ltc import io as lio
from ltc import models
from ltc.layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d
from ltc.surgery import replace_modules

FACTORISED = (Tucker2Conv2d, MatrixLowRankConv2d, LowRankLinear)


# ----------------------------------------------------------------------------------------------- helpers


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def structure_of(model: nn.Module) -> dict[str, tuple[str, object]]:
    out: dict[str, tuple[str, object]] = {}
    for name, m in model.named_modules():
        if isinstance(m, Tucker2Conv2d):
            out[name] = ("tucker2", m.ranks)
        elif isinstance(m, MatrixLowRankConv2d | LowRankLinear):
            out[name] = (type(m).__name__, m.rank)
    return out


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def other_files(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p not in keep)


class MyNet(nn.Module):
    """A user-defined architecture (not in the zoo) with unusual conv geometry."""

    def __init__(self, width: int = 8, extra: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1, padding_mode="reflect", bias=True)
        self.bn = nn.BatchNorm2d(width)
        self.body = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=2, dilation=2, bias=False),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 1, bias=True),
        )
        self.head = nn.Linear(2 * width, 5)
        if extra:
            self.extra = nn.BatchNorm2d(2 * width)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.head(self.body(x).mean((2, 3)))


def compress_mynet(net: MyNet) -> nn.Module:
    torch.manual_seed(1)
    return replace_modules(
        net,
        {
            "stem": Tucker2Conv2d.from_conv(net.stem, (2, 5)),
            "body.0": MatrixLowRankConv2d.from_conv(net.body[0], 6),
            "body.2": Tucker2Conv2d.from_conv(net.body[2], (7, 9)),
            "head": LowRankLinear.from_linear(net.head, 3),
        },
    )


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def x32() -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tucker_resnet(x32: Tensor) -> nn.Module:
    torch.manual_seed(0)
    base = randomise_bn(models.create("resnet18", num_classes=10, width=0.25))
    return ltc.LTC(base, x32, target_sr=3).compressed_model().eval()


@pytest.fixture(scope="module")
def matrix_cnn() -> nn.Module:
    torch.manual_seed(0)
    base = randomise_bn(models.create("small_cnn", num_classes=10, width=0.5))
    x = torch.randn(2, 3, 28, 28)
    engine = ltc.LCEngine(base, x, target_sr=2, conv_scheme="matrix", compress_linear=True)
    engine.assign({"classifier": 4})  # make sure the linear head is factorised too
    return engine.compressed_model().eval()


# ----------------------------------------------------------------------------------------------- save / load


def test_roundtrip_zoo_tucker(tucker_resnet: nn.Module, x32: Tensor, tmp_path: Path) -> None:
    path = tmp_path / "resnet.ltc"
    lio.save(tucker_resnet, path, meta={"acc": 0.91, "note": "test"})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "ltc-model" and raw["version"] == 1 and raw["ltc_version"] == ltc.__version__
    assert set(raw) == {"format", "version", "ltc_version", "structure", "state_dict", "meta"}
    assert all(isinstance(v, Tensor) for v in raw["state_dict"].values())

    loaded = lio.load(path)  # from the file alone
    assert not loaded.training
    assert loaded.ltc_config == tucker_resnet.ltc_config
    assert structure_of(loaded) == structure_of(tucker_resnet)
    assert any(isinstance(m, Tucker2Conv2d) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x32), tucker_resnet(x32))

    info = lio.read_info(path)
    assert info["meta"] == {"acc": 0.91, "note": "test"}
    assert info["structure"]["root"] == "ResNet"
    assert info["structure"]["layers"]["conv1"]["type"] == "tucker2"
    assert other_files(tmp_path, {"resnet.ltc"}) == []


def test_roundtrip_zoo_matrix_and_lowrank_linear(matrix_cnn: nn.Module, tmp_path: Path) -> None:
    kinds = {type(m) for m in matrix_cnn.modules()}
    assert MatrixLowRankConv2d in kinds and LowRankLinear in kinds
    path = tmp_path / "cnn.ltc"
    lio.save(matrix_cnn, path)
    loaded = lio.load(path)
    assert structure_of(loaded) == structure_of(matrix_cnn)
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), matrix_cnn(x))
    layers = lio.read_info(path)["structure"]["layers"]
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
    lio.save(net, path)
    fresh = MyNet()
    loaded = lio.load(path, model=fresh)
    assert isinstance(fresh.stem, nn.Conv2d)  # the given model is left untouched
    assert structure_of(loaded) == structure_of(net)
    assert loaded.stem.core.padding_mode == "reflect" and loaded.stem.core.stride == (2, 2)
    assert loaded.body[0].first.dilation == (2, 2)
    x = torch.randn(2, 3, 17, 19)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    # an already-compressed instance of the same architecture works as well
    with torch.no_grad():
        assert torch.equal(lio.load(path, model=compress_mynet(MyNet()))(x), net(x))


def test_save_unwraps_and_keeps_dtype(tmp_path: Path) -> None:
    net = compress_mynet(MyNet()).double().eval()
    path = tmp_path / "dp.ltc"
    lio.save(nn.DataParallel(net), path)
    loaded = lio.load(path, model=MyNet())
    assert next(loaded.parameters()).dtype == torch.float64
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


# ----------------------------------------------------------------------------------------------- errors


@pytest.fixture
def mynet_file(tmp_path: Path) -> Path:
    path = tmp_path / "mynet.ltc"
    lio.save(compress_mynet(MyNet()), path)
    return path


def test_error_not_an_ltc_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="not a readable ltc model file.*ltc.save"):
        lio.load(junk)
    plain = tmp_path / "plain.pt"
    torch.save(MyNet().state_dict(), plain)
    with pytest.raises(ValueError, match="not an ltc model file.*plain state_dict.*ltc.save"):
        lio.load(plain)
    with pytest.raises(FileNotFoundError):
        lio.load(tmp_path / "missing.ltc")


def test_error_truncated_file(mynet_file: Path, tmp_path: Path) -> None:
    data = mynet_file.read_bytes()
    cut = tmp_path / "cut.ltc"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted, truncated"):
        lio.load(cut, model=MyNet())


def test_error_corrupted_structure(mynet_file: Path, tmp_path: Path) -> None:
    raw = torch.load(mynet_file, weights_only=True)
    raw["structure"] = "{not json"
    bad = tmp_path / "bad.ltc"
    torch.save(raw, bad)
    with pytest.raises(ValueError, match="corrupted ltc model file"):
        lio.load(bad, model=MyNet())


def test_error_other_format_version(mynet_file: Path, tmp_path: Path) -> None:
    raw = torch.load(mynet_file, weights_only=True)
    raw["version"] = 2
    newer = tmp_path / "v2.ltc"
    torch.save(raw, newer)
    with pytest.raises(ValueError, match="format version 2.*reads version 1.*upgrade ltc"):
        lio.load(newer, model=MyNet())


def test_error_user_model_needs_model(mynet_file: Path) -> None:
    with pytest.raises(ValueError, match=r"pass the uncompressed model: ltc.load\(path, model=MyNet\(\)\)"):
        lio.load(mynet_file)


def test_error_unknown_layer_names(mynet_file: Path) -> None:
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    msg = "'stem'.*does not have.*architecture the file was saved from.*MyNet"
    with pytest.raises(ValueError, match=msg):
        lio.load(mynet_file, model=other)


def test_error_layer_shape_mismatch(mynet_file: Path) -> None:
    msg = "layer 'stem' of the given MyNet is Conv2d\\(3->4.*file's is.*MyNet"
    with pytest.raises(ValueError, match=msg):
        lio.load(mynet_file, model=MyNet(width=4))


def test_error_state_dict_mismatch(mynet_file: Path) -> None:
    with pytest.raises(ValueError, match="do not fit the model.*missing: extra.*same architecture"):
        lio.load(mynet_file, model=MyNet(extra=True))


def test_error_meta_not_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="meta must be a JSON-serialisable dict"):
        lio.save(MyNet(), tmp_path / "m.ltc", meta={"x": object()})
    assert other_files(tmp_path, set()) == []


def test_interrupted_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = compress_mynet(MyNet()).eval()
    path = tmp_path / "model.ltc"
    lio.save(net, path)
    before = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save(obj, f, *args, **kwargs)
        f.seek(0)  # type: ignore[attr-defined]
        f.truncate(100)  # type: ignore[attr-defined]  # half-written ...
        raise RuntimeError("simulated crash mid-write")  # ... then the process dies

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        lio.save(MyNet(width=4), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert other_files(tmp_path, {"model.ltc"}) == []
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(lio.load(path, model=MyNet())(x), net(x))


# ----------------------------------------------------------------------------------------------- BN folding


def test_fold_batchnorm_compressed_resnet(tucker_resnet: nn.Module, x32: Tensor) -> None:
    tucker_resnet.train()  # fold_batchnorm must use eval semantics and leave the original alone
    try:
        folded = lio.fold_batchnorm(tucker_resnet)
    finally:
        tucker_resnet.eval()
    assert any(isinstance(m, nn.BatchNorm2d) for m in tucker_resnet.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not folded.training
    assert folded.layer1[0].conv1.last.bias is not None  # Tucker-2 + BN folds into `last`
    with torch.no_grad():
        assert rel_err(folded(x32), tucker_resnet(x32)) < 1e-5


def test_fold_batchnorm_sequential_and_fallback() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    seq = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.BatchNorm2d(8),  # follows a ReLU: must stay
        Tucker2Conv2d.from_conv(conv, (4, 5)),
        nn.BatchNorm2d(12),
        MatrixLowRankConv2d.from_conv(nn.Conv2d(12, 6, 3, padding=1), 3),
        nn.BatchNorm2d(6),
    )
    randomise_bn(seq)
    x = torch.randn(2, 3, 10, 10)

    class Untraceable(nn.Module):  # data-dependent control flow defeats torch.fx: Sequential fallback
        def __init__(self) -> None:
            super().__init__()
            self.seq = seq

        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 1e9:
                return x
            return self.seq(x)

    for model in (seq, Untraceable()):
        folded = lio.fold_batchnorm(model)
        kinds = [type(m) for m in (folded.seq if isinstance(folded, Untraceable) else folded)]
        assert kinds.count(nn.BatchNorm2d) == 1 and kinds[3] is nn.BatchNorm2d
        with torch.no_grad():
            assert rel_err(folded(x), model.eval()(x)) < 1e-5


# ----------------------------------------------------------------------------------------------- export


def test_export_onnx_compressed_resnet(tucker_resnet: nn.Module, x32: Tensor, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    with torch.no_grad():
        scale = float(tucker_resnet(x32).abs().max())
    path = tmp_path / "resnet.onnx"
    diff = lio.export_onnx(tucker_resnet, path, x32, opset=17)
    assert 0.0 <= diff <= 1e-4 * scale
    assert lio.onnx_conv_weights_are_constant(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 3, 32, 32)  # the batch dimension is dynamic
    (out,) = session.run(None, {"input": x5.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(out), tucker_resnet(x5)) < 1e-4
    assert other_files(tmp_path, {"resnet.onnx"}) == []


def test_export_onnx_dynamo_exporter(matrix_cnn: nn.Module, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "cnn18.onnx"
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        scale = float(matrix_cnn(x).abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diff = lio.export_onnx(matrix_cnn, path, x, opset=18, fold_bn=True)
    assert diff <= 1e-4 * scale
    assert lio.onnx_conv_weights_are_constant(path)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 18
    assert not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # dynamic batch


def test_onnx_conv_weights_are_constant_detects_inputs(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(torch.randn(4, 3, 3, 3).numpy(), "w")
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    w_info = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)

    def model(nodes: list, inputs: list, inits: list) -> onnx.ModelProto:
        graph = helper.make_graph(nodes, "g", inputs, [y_info], initializer=inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    assert lio.onnx_conv_weights_are_constant(model([conv], [x_info], [w]))
    assert not lio.onnx_conv_weights_are_constant(model([conv], [x_info, w_info], []))  # weight is an input
    assert not lio.onnx_conv_weights_are_constant(model([conv], [x_info, w_info], [w]))  # overridable
    const = helper.make_node("Constant", [], ["w"], value=w)
    assert lio.onnx_conv_weights_are_constant(model([const, conv], [x_info], []))
    ident = helper.make_node("Identity", ["w0"], ["w"])
    w0 = numpy_helper.from_array(torch.randn(4, 3, 3, 3).numpy(), "w0")
    path = tmp_path / "chain.onnx"
    onnx.save(model([ident, conv], [x_info], [w0]), str(path))
    assert lio.onnx_conv_weights_are_constant(path)  # a constant chain counts, from a file path too


def test_export_torchscript_compressed_resnet(tucker_resnet: nn.Module, x32: Tensor, tmp_path: Path) -> None:
    path = tmp_path / "resnet.ts"
    with torch.no_grad():
        ref = tucker_resnet(x32)
    diff = lio.export_torchscript(tucker_resnet, path, x32, fold_bn=True)
    assert diff <= 1e-4 * float(ref.abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(path))
    with torch.no_grad():
        assert rel_err(scripted(x32), ref) < 1e-4
    assert other_files(tmp_path, {"resnet.ts"}) == []


class Noisy(nn.Module):
    """Not deterministic in eval mode: every export check must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y + torch.rand_like(y)


def test_export_mismatch_raises_and_writes_nothing(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="TorchScript export does not match PyTorch.*not written"):
        lio.export_torchscript(Noisy(), tmp_path / "noisy.ts", x)
    with pytest.raises(RuntimeError, match="ONNX export.*does not match PyTorch.*not written"):
        lio.export_onnx(Noisy(), tmp_path / "noisy.onnx", x)
    assert other_files(tmp_path, set()) == []
    # check=False writes the file and returns NaN
    assert math.isnan(lio.export_torchscript(Noisy(), tmp_path / "noisy.ts", x, check=False))
    assert (tmp_path / "noisy.ts").exists()
