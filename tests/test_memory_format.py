"""``channels_last``: the layout a compressed network is timed and returned in (eager PyTorch). Checked: the layout
helpers round-trip and keep outputs, timing works on copies (the caller's models keep their layout), the latency
table times every op in NHWC and keys its cache by layout, ONNX Runtime refuses the option, the settings validate it,
``compress`` returns the model in the layout it was timed in, and save / load keeps it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ltc
import ltc.latency_table as lt
from ltc import CompressConfig
from ltc.latency import compare_latency, interleaved_latency, measure_latency, memory_format_of, to_memory_format
from ltc.latency_table import LatencyTable

CL = torch.channels_last


class Net(nn.Module):
    def __init__(self, c: int = 8, k: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, c, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, 2 * c, k, padding=k // 2)
        self.fc = nn.Linear(2 * c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(x)).mean(dim=(2, 3)))


class Spy(nn.Module):
    """A conv that records in the class-wide ``seen`` (shared by its copies) whether its input and weight are NHWC
    at every call."""

    seen: list[tuple[bool, bool]] = []

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Spy.seen.append((_nhwc(x), _nhwc(self.conv.weight)))
        return self.conv(x)


def _nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


@settings(max_examples=15, deadline=None)
@given(c=st.integers(2, 12), k=st.sampled_from([2, 3, 5]), hw=st.integers(4, 9), seed=st.integers(0, 2**16))
def test_layout_round_trip_keeps_the_outputs(c: int, k: int, hw: int, seed: int) -> None:
    torch.manual_seed(seed)
    net = Net(c, k).eval()
    x = torch.randn(2, 3, hw, hw)
    ref = net(x)
    assert memory_format_of(net) == "contiguous"
    assert to_memory_format(net, "channels_last") is net
    assert memory_format_of(net) == "channels_last" and _nhwc(net.c1.weight) and _nhwc(net.c2.weight)
    assert net.fc.weight.is_contiguous()  # 2-D weights are untouched
    out = net(x)  # NCHW input into an NHWC network
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    to_memory_format(net, "contiguous")
    assert memory_format_of(net) == "contiguous" and net.c2.weight.is_contiguous()


def test_unknown_layout_is_named() -> None:
    with pytest.raises(ValueError, match=r"memory_format must be one of 'contiguous', 'channels_last', got 'nhwc'"):
        to_memory_format(Net(), "nhwc")


@pytest.mark.parametrize("fold_bn", [False, True])
def test_timing_in_channels_last_leaves_the_callers_models_alone(fold_bn: bool) -> None:
    base, small = Net(), Net(4)
    res = compare_latency(base, small, torch.zeros(1, 3, 8, 8), threads=1, warmup=0, repeats=2, fold_bn=fold_bn,
                          memory_format="channels_last")
    assert res["memory_format"] == "channels_last" and res["speedup"] > 0
    assert memory_format_of(base) == memory_format_of(small) == "contiguous"


@pytest.mark.parametrize("timer", ["measure", "interleaved"])
def test_eager_timing_runs_a_copy_in_nhwc(timer: str) -> None:
    """The weights of the copy are NHWC; the input is passed as given (NCHW): the network's layout is its weights'."""
    spy, x = Spy(), torch.zeros(1, 4, 6, 6)
    Spy.seen.clear()
    if timer == "measure":
        measure_latency(spy, x, threads=1, warmup=1, repeats=2)
        assert Spy.seen == [(False, False)] * 3
        Spy.seen.clear()
        measure_latency(spy, x, threads=1, warmup=1, repeats=2, memory_format="channels_last")
    else:
        interleaved_latency({"a": spy}, x, threads=1, warmup=1, repeats=2, memory_format="channels_last")
    assert Spy.seen == [(False, True)] * 3
    assert not _nhwc(spy.conv.weight)


@pytest.mark.parametrize("call", [
    lambda: compare_latency(Net(), Net(), torch.zeros(1, 3, 8, 8), runtime="onnxruntime",
                            memory_format="channels_last"),
    lambda: LatencyTable.build(Net(), torch.zeros(1, 3, 8, 8), runtime="onnxruntime", memory_format="channels_last",
                               progress=False),
    lambda: CompressConfig(method="ltc", target_speedup=2.0, latency_runtime="onnxruntime",
                           latency_memory_format="channels_last"),
])
def test_onnxruntime_refuses_a_pytorch_layout(call) -> None:
    with pytest.raises(ValueError, match=r"channels_last.* is a PyTorch \(eager\) layout; ONNX Runtime chooses its "
                                         r"own.*'contiguous'"):
        call()


def test_settings_name_the_valid_layouts() -> None:
    with pytest.raises(ValueError, match=r"latency_memory_format.*'contiguous', 'channels_last'"):
        CompressConfig(method="ltc", target_sr=2.0, latency_memory_format="NHWC")
    assert CompressConfig(method="ltc", target_sr=2.0, latency_memory_format="channels_last").to_dict()[
        "latency_memory_format"] == "channels_last"


def test_table_times_every_op_in_nhwc_and_keys_the_cache_by_layout(monkeypatch, tmp_path) -> None:
    """The one timing function gets the layout; in channels_last every 4-D input and conv weight it runs is NHWC
    (so a 1x1 factor is timed as it runs inside an NHWC network), and the two layouts keep separate cache files."""
    seen: list[tuple[str, tuple[bool, ...]]] = []
    real = lt._time_module

    def spy_median(run, timing, sync):
        run()
        return 1.0

    def spying(module, inputs, timing):
        ok: list[bool] = []

        def look(m, args):  # what each conv really runs on: its input as passed, its weight after the conversion
            if m.in_channels > 1:
                ok.append(_nhwc(args[0]) and (m.kernel_size == (1, 1) or _nhwc(m.weight)))

        hooks = [m.register_forward_pre_hook(look) for m in module.modules() if isinstance(m, nn.Conv2d)]
        out = real(module, inputs, timing)
        for h in hooks:
            h.remove()
        seen.append((timing.memory_format, tuple(ok)))
        return out

    monkeypatch.setattr(lt, "_median_ms", spy_median)
    monkeypatch.setattr(lt, "_time_module", spying)
    LatencyTable.build(Net(16), torch.zeros(1, 3, 8, 8), threads=1, cache_dir=tmp_path, progress=False)
    n = len(seen)
    assert n > 3 and all(f == "contiguous" and not any(ok) for f, ok in seen)  # NCHW: no conv sees NHWC
    seen.clear()
    t = LatencyTable.build(Net(16), torch.zeros(1, 3, 8, 8), threads=1, cache_dir=tmp_path, progress=False,
                           memory_format="channels_last")
    assert len(seen) == n and all(f == "channels_last" and all(ok) for f, ok in seen)
    assert sum(len(ok) for _, ok in seen) > n // 2  # the check saw convs in most ops (not linears, 1-channel)
    assert t.info["memory_format"] == "channels_last" and t.measured == n
    assert len(list(tmp_path.glob("*.json"))) == 2 and len(list(tmp_path.glob("*-nhwc-*.json"))) == 1


def test_compress_returns_the_model_in_the_timed_layout_and_save_load_keeps_it(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8, generator=g), torch.arange(16) % 4), batch_size=8)
    torch.manual_seed(0)
    r = ltc.compress(Net(16), loader, method="oneshot", target_sr=2.0, epochs=0, progress=False,
                     latency_memory_format="channels_last", metric="weight")
    assert memory_format_of(r.model) == "channels_last"
    x = torch.randn(2, 3, 8, 8, generator=g)
    ltc.save(r.model, tmp_path / "m.pt")
    back = ltc.load(tmp_path / "m.pt", model=Net(16))
    assert memory_format_of(back) == "channels_last"
    torch.testing.assert_close(back(x), r.model.eval()(x))
    plain = ltc.compress(Net(16), loader, method="oneshot", target_sr=2.0, epochs=0, progress=False, metric="weight")
    ltc.save(plain.model, tmp_path / "p.pt")
    assert memory_format_of(plain.model) == memory_format_of(ltc.load(tmp_path / "p.pt", model=Net(16))) == "contiguous"
