"""Tests for ``ltc.export``: ONNX / TorchScript export of compressed models, checked against PyTorch."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from _io_models import matrix_small_cnn, other_files, rel_err, tucker_resnet18
from torch import Tensor, nn

import ltc
from ltc.export import onnx_conv_weights_are_constant

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


# ----------------------------------------------------------------------------------------------- export


def test_export_onnx_compressed_resnet(tucker_resnet: nn.Module, x32: Tensor, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    with torch.no_grad():
        scale = float(tucker_resnet(x32).abs().max())
    path = tmp_path / "resnet.onnx"
    diff = ltc.export_onnx(tucker_resnet, path, x32, opset=17)
    assert 0.0 <= diff <= 1e-4 * scale
    assert onnx_conv_weights_are_constant(path)
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
        diff = ltc.export_onnx(matrix_cnn, path, x, opset=18, fold_bn=True)
    assert diff <= 1e-4 * scale
    assert onnx_conv_weights_are_constant(path)
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
    assert onnx_conv_weights_are_constant(model([conv], [x_info], [w]))
    assert not onnx_conv_weights_are_constant(model([conv], [x_info, w_info], []))  # weight is an input
    assert not onnx_conv_weights_are_constant(model([conv], [x_info, w_info], [w]))  # overridable
    const = helper.make_node("Constant", [], ["w"], value=w)
    assert onnx_conv_weights_are_constant(model([const, conv], [x_info], []))
    ident = helper.make_node("Identity", ["w0"], ["w"])
    w0 = numpy_helper.from_array(torch.randn(4, 3, 3, 3).numpy(), "w0")
    path = tmp_path / "chain.onnx"
    onnx.save(model([ident, conv], [x_info], [w0]), str(path))
    assert onnx_conv_weights_are_constant(path)  # a constant chain counts, from a file path too


def test_export_torchscript_compressed_resnet(tucker_resnet: nn.Module, x32: Tensor, tmp_path: Path) -> None:
    path = tmp_path / "resnet.ts"
    with torch.no_grad():
        ref = tucker_resnet(x32)
    diff = ltc.export_torchscript(tucker_resnet, path, x32, fold_bn=True)
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
        ltc.export_torchscript(Noisy(), tmp_path / "noisy.ts", x)
    with pytest.raises(RuntimeError, match="ONNX export.*does not match PyTorch.*not written"):
        ltc.export_onnx(Noisy(), tmp_path / "noisy.onnx", x)
    assert other_files(tmp_path, set()) == []
    # check=False writes the file and returns NaN
    assert math.isnan(ltc.export_torchscript(Noisy(), tmp_path / "noisy.ts", x, check=False))
    assert (tmp_path / "noisy.ts").exists()


def test_export_channel_pruned_model(tmp_path: Path) -> None:
    """A pruned network (plain layers with fewer channels), saved and loaded, exports with its BNs folded."""
    pytest.importorskip("torch_pruning")
    pytest.importorskip("onnxruntime")
    from ltc import models
    from ltc.methods import get_method

    torch.manual_seed(0)
    x = torch.randn(2, 3, 28, 28)
    pruner = get_method("prune").build(models.create("small_cnn", num_classes=10, width=0.5), x, target_sr=3.0)
    ltc.save(pruner.compressed_model(), tmp_path / "pruned.ltc")
    pruned = ltc.load(tmp_path / "pruned.ltc")
    with torch.no_grad():
        scale = float(pruned(x).abs().max())
    assert ltc.export_torchscript(pruned, tmp_path / "p.ts", x, fold_bn=True) <= 1e-4 * scale
    assert ltc.export_onnx(pruned, tmp_path / "p.onnx", x, opset=17, fold_bn=True) <= 1e-4 * scale
    assert onnx_conv_weights_are_constant(tmp_path / "p.onnx")
    assert other_files(tmp_path, {"pruned.ltc", "p.ts", "p.onnx"}) == []
