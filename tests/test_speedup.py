"""``target_speedup``: budget mode on measured latency. The table is injected and the measured speed-up replaced by
a deterministic function of the deployed network, so nothing here depends on the machine's speed: checked are the
settings' rules, the refusal of an unreachable target, and the correction loop (re-target while the measured
speed-up misses by more than 10 %, at most 3 times, logged)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ltc
import ltc.api
import ltc.latency
from ltc import CompressConfig
from ltc.cost import record_geometry
from ltc.latency_table import LatencyTable


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 48, 3, padding=1)
        self.fc = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean(dim=(2, 3)))


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.arange(32) % 4), batch_size=16)


def _ms(g, part: str, rank) -> float:
    """Latency proportional to MACs (plus a fixed 0.001 ms per op): a deterministic stand-in for a measurement."""
    from ltc.cost import dense_cost, tucker2_cost

    if part == "dense":
        return 0.001 + 1e-6 * dense_cost(g)[1]
    if part.startswith("tucker2"):
        r_in, r_out = rank if isinstance(rank, tuple) else (rank, rank)
        return 0.001 + 1e-6 * tucker2_cost(g, r_in, r_out)[1] / 3
    return 0.001 + 1e-6 * g.out_pixels * int(rank if not isinstance(rank, tuple) else rank[0]) * (
        g.in_channels * g.kernel_size[0] * g.kernel_size[1] + g.out_channels) / 2


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> LatencyTable:
    torch.manual_seed(0)
    geoms = record_geometry(Net(), X)
    dense_total = sum(_ms(g, "dense", None) for n, g in geoms.items() if n != "fc")
    tab = LatencyTable.from_latency_function({n: g for n, g in geoms.items() if n != "fc"}, _ms,
                                             model_ms=dense_total + 0.01)
    monkeypatch.setattr(ltc.api, "_latency_table", lambda *a, **k: tab)
    return tab


def _measured_as(factor: float | list[float], monkeypatch: pytest.MonkeyPatch,
                 of_target: float | None = None) -> list[float]:
    """Make every timing report ``factor`` x the table's predicted speed-up (a list: one factor per call, the last
    repeats); with ``of_target``, ``factor`` x that target instead, whatever network is deployed."""
    calls: list[float] = []
    real = ltc.latency.compare_latency

    def fake(base, small, x, **kw):
        out = real(base, small, x, repeats=1, warmup=0)
        f = factor[min(len(calls), len(factor) - 1)] if isinstance(factor, list) else factor
        out["speedup"] = f * (fake.engine.predicted_speedup if of_target is None else of_target)
        calls.append(out["speedup"])
        return out

    monkeypatch.setattr(ltc.latency, "compare_latency", fake)
    real_retarget = ltc.engine.LCEngine.retarget
    real_start = ltc.engine.LCEngine.start

    def start(self):
        fake.engine = self
        return real_start(self)

    monkeypatch.setattr(ltc.engine.LCEngine, "start", start)
    monkeypatch.setattr(ltc.engine.LCEngine, "retarget", real_retarget)
    return calls


@pytest.mark.parametrize("kw, message", [
    ({"method": "vbmf", "target_speedup": 2.0}, "method 'vbmf' has no latency cost"),
    ({"method": "ltc", "target_speedup": 2.0, "cost": "macs"}, "target_speedup is a budget on measured latency"),
    ({"method": "ltc", "target_speedup": 2.0, "target_sr": 3.0}, "give target_sr (MAC speed-up) or target_speedup"),
    ({"method": "oneshot", "target_speedup": 0.5}, "target_speedup must be a finite number >= 1"),
    ({"method": "prune", "cost": "latency", "target_sr": 2.0}, "method 'prune' has no latency cost"),
])
def test_settings_rules(kw: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        CompressConfig(**kw)
    assert message in str(info.value)


def test_latency_cost_defaults_to_hardware_friendly_ranks() -> None:
    c = CompressConfig(method="ltc", target_speedup=2.0)
    assert c.resolved_cost() == "latency" and c.resolved_rank_multiple() == 8
    assert CompressConfig(method="ltc", target_sr=2.0).resolved_rank_multiple() == 1
    assert CompressConfig(method="ltc", target_speedup=2.0, rank_multiple=4).resolved_rank_multiple() == 4


def test_unreachable_target_speedup_is_refused_with_the_best_reachable(table, monkeypatch) -> None:
    _measured_as(1.0, monkeypatch)
    with pytest.raises(ValueError, match=r"target speed-up \(latency table\) 50 is out of reach: .* the model "
                                         r"reaches (\d+\.?\d*)") as info:
        ltc.compress(Net(), _loader(), method="oneshot", target_speedup=50.0, epochs=0, progress=False)
    best = float(str(info.value).split("reaches ")[1].split(";")[0])
    assert 1.0 < best < 50.0


def test_a_prediction_within_10_percent_needs_no_correction(table, monkeypatch) -> None:
    calls = _measured_as(0.95, monkeypatch)
    r = ltc.compress(Net(), _loader(), method="oneshot", target_speedup=1.5, epochs=0, progress=False,
                     recalibrate_bn=False)
    assert r.speedup["corrections"] == 0 and len(calls) == 1
    assert r.speedup["measured"] == pytest.approx(0.95 * r.speedup["predicted"])
    assert r.speedup["predicted"] >= 1.5


def test_a_missed_target_is_corrected_by_retargeting(table, monkeypatch) -> None:
    """The table predicts a third too much: the first deployment measures 0.75 x its prediction, the loop re-targets
    the C step at predicted x target / measured, and the network it keeps lands within 10 % of the target."""
    calls = _measured_as(0.75, monkeypatch)
    r = ltc.compress(Net(), _loader(), method="oneshot", target_speedup=2.0, epochs=0, progress=False,
                     recalibrate_bn=False)
    att = r.speedup["attempts"]
    assert r.speedup["corrections"] == len(att) - 1 >= 1 and len(calls) == len(att)
    assert att[1]["engine_target"] == pytest.approx(att[0]["predicted"] * 2.0 / att[0]["measured"])
    assert abs(r.speedup["measured"] / 2.0 - 1) <= 0.10
    assert att[0]["sr"] < att[r.speedup["chosen_attempt"]]["sr"]  # it compressed harder than the table said
    kept = att[r.speedup["chosen_attempt"]]
    assert r.sr == pytest.approx(kept["sr"])  # the deployed network is the attempt kept


def test_corrections_stop_after_three(table, monkeypatch) -> None:
    """Every timing misses the target by 30 % or more, however the engine is re-targeted: the loop times the first
    deployment and exactly MAX_CORRECTIONS = 3 corrections, then gives up and keeps the attempt that came closest
    (the third, measured at 0.7 x target), leaving the engine at its ranks."""
    target, fractions = 1.5, [0.5, 0.6, 0.7, 0.55]
    assert ltc.api.MAX_CORRECTIONS == 3 and all(abs(f - 1) > 2 * ltc.api.SPEEDUP_TOLERANCE for f in fractions)
    calls = _measured_as(fractions, monkeypatch, of_target=target)
    r = ltc.compress(Net(), _loader(), method="oneshot", target_speedup=target, epochs=0, progress=False,
                     recalibrate_bn=False)
    sp = r.speedup
    att = sp["attempts"]
    assert sp["corrections"] == 3 and len(att) == len(calls) == 4  # the first timing, then one per correction
    assert sp["stopped"] is None and sp["target"] == target
    assert [a["measured"] for a in att] == pytest.approx([f * target for f in fractions])
    assert att[0]["engine_target"] == target
    for prev, nxt in zip(att, att[1:], strict=False):  # each correction re-targets at predicted x target / measured
        assert nxt["engine_target"] == pytest.approx(prev["predicted"] * target / prev["measured"])
    for a in att:
        assert set(a) == {"engine_target", "predicted", "measured", "base_ms", "compressed_ms", "sr"}
        assert a["predicted"] >= a["engine_target"] and a["base_ms"] > 0 and a["compressed_ms"] > 0
    assert len({a["sr"] for a in att}) == 4  # every correction deployed another network: none stopped early
    assert sp["chosen_attempt"] == 2
    assert (sp["predicted"], sp["measured"]) == (att[2]["predicted"], att[2]["measured"])
    # the engine went back to the kept attempt's ranks: the C steps are the first, 3 corrections and the return
    assert len(r.history) == 5 and r.history[-1]["ranks"] == r.history[2]["ranks"]
    assert r.sr == pytest.approx(att[2]["sr"])
    assert r.history[-1]["predicted_speedup"] == pytest.approx(att[2]["predicted"])


@pytest.mark.parametrize("compress_linear", [False, True])
def test_the_run_times_only_the_layers_it_compresses(compress_linear: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers left dense only count in the whole model's time: their factorised forms are never timed (VGG-16's
    25088x4096 linear alone would have held up an ONNX Runtime table for many minutes)."""
    seen = {}
    monkeypatch.setattr(LatencyTable, "build", classmethod(lambda cls, model, x, **kw: seen.update(kw)))
    cfg = ltc.CompressConfig(target_speedup=2.0, compress_linear=compress_linear)
    ltc.api._latency_table(Net(), torch.randn(1, 3, 8, 8), cfg, False)
    convs = [n for n, m in Net().named_modules() if isinstance(m, nn.Conv2d)]
    assert seen["layers"] == convs + (["fc"] if compress_linear else [])


def test_a_correction_beyond_the_tables_reach_keeps_the_closest_attempt(table, monkeypatch) -> None:
    """Near the fastest the table allows, a table that over-predicts asks the correction for more than it can give:
    the loop stops there (saying why) and keeps what it reached, instead of failing the run."""
    _measured_as(1.0, monkeypatch)
    with pytest.raises(ValueError) as info:
        ltc.compress(Net(), _loader(), method="oneshot", target_speedup=50.0, epochs=0, progress=False)
    best = float(str(info.value).split("reaches ")[1].split(";")[0])
    target = 0.95 * best
    calls = _measured_as(0.5, monkeypatch)
    r = ltc.compress(Net(), _loader(), method="oneshot", target_speedup=target, epochs=0, progress=False,
                     recalibrate_bn=False)
    assert r.speedup["corrections"] == 0 and len(calls) == 1
    # the correction asked for predicted x target / measured = 2 x target
    assert f"target speed-up (latency table) {2 * target:g} is out of reach" in r.speedup["stopped"]
    assert r.speedup["measured"] == pytest.approx(0.5 * r.speedup["predicted"])
