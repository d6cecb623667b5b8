"""``target_speedup``: budget mode on measured latency. The table is injected and the measured speed-up replaced by
a deterministic function of the deployed network, so nothing here depends on the machine's speed: checked are the
settings' rules, the refusal of an unreachable target, and the correction loop (re-target while the measured
speed-up misses by more than 10 %, at most 3 times, logged)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ltc
import ltc.api
import ltc.latency
from ltc import CompressConfig
from ltc.cost import record_geometry
from ltc.latency_table import LatencyTable, calibrated_speedup, savings_scale, table_target


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


def _measured_as(factor: float | list[float], monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make every timing report ``factor`` x the table's predicted speed-up (a list: one factor per call, the last
    repeats)."""
    calls: list[float] = []
    real = ltc.latency.compare_latency

    def fake(base, small, x, **kw):
        out = real(base, small, x, repeats=1, warmup=0)
        f = factor[min(len(calls), len(factor) - 1)] if isinstance(factor, list) else factor
        out["speedup"] = f * fake.engine.predicted_speedup
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


def _table_best(table: LatencyTable) -> float:
    """The fastest speed-up the table predicts for Net (every conv at its fastest option), from the engine's own
    refusal."""
    with pytest.raises(ltc.engine.UnreachableTarget) as info:
        ltc.LTC(Net(), X, target_sr=1e6, cost="latency", latency_table=table, rank_multiple=8).start()
    return info.value.best


def test_unreachable_target_speedup_is_refused_on_the_clock_with_the_best_measured(table, monkeypatch) -> None:
    """The table cannot reach 50x: its fastest configuration is deployed and timed (here at 0.9 x the table's
    prediction), and the refusal names that measured speed-up, before any training."""
    best = _table_best(table)
    calls = _measured_as(0.9, monkeypatch)
    with pytest.raises(ValueError) as info:
        ltc.compress(Net(), _loader(), method="oneshot", target_speedup=50.0, epochs=0, progress=False)
    msg = str(info.value)
    assert msg.startswith("target_speedup 50 is out of reach on this machine")
    assert f"measures {0.9 * best:.2f}x" in msg and f"predicted {best:.2f}x" in msg
    assert f"lower the target to at most {0.9 * best:.2f}" in msg
    assert calls[0] == pytest.approx(0.9 * best)


def test_a_target_the_table_refuses_is_met_when_the_clock_beats_the_table(table, monkeypatch) -> None:
    """The table under-predicts by 15 %: a target 1.1 x beyond the table's fastest is within 10 % on the clock, so
    it is not refused; the run keeps the table's fastest configuration."""
    best = _table_best(table)
    _measured_as(1.15, monkeypatch)
    target = 1.1 * best
    r = ltc.compress(Net(), _loader(), method="oneshot", target_speedup=target, epochs=0, progress=False,
                     recalibrate_bn=False)
    sp = r.speedup
    assert sp["table_best"] == pytest.approx(best) and sp["corrections"] == 0
    assert sp["attempts"][0]["engine_target"] == pytest.approx(best)
    assert sp["measured"] == pytest.approx(1.15 * best)


@settings(max_examples=200, deadline=None)
@given(p=st.floats(1.01, 50), b=st.floats(0.1, 3), t=st.floats(1.01, 50))
def test_calibration_maths_round_trips(p: float, b: float, t: float) -> None:
    """``savings_scale`` inverts ``calibrated_speedup`` and ``table_target`` inverts ``calibrated_speedup``; scale 1
    is the table itself."""
    s = calibrated_speedup(p, b)
    if math.isfinite(s) and s < 1e6:
        assert savings_scale(p, s) == pytest.approx(b, rel=1e-6)
    q = table_target(t, b)
    if math.isfinite(q):
        assert calibrated_speedup(q, b) == pytest.approx(t, rel=1e-6)
    else:
        assert (1 - 1 / t) >= b
    assert calibrated_speedup(p, 1.0) == pytest.approx(p) and table_target(t, 1.0) == pytest.approx(t)


def test_calibration_of_a_slower_network_and_of_no_saving() -> None:
    assert savings_scale(2.0, 0.8) == 0.05  # slower than the base: the floor, so the next target asks for more
    assert savings_scale(1.0, 1.3) == 1.0  # nothing saved by the table: nothing to fit
    assert table_target(2.0, 0.5) == math.inf  # half the saving never halves the time


def test_a_prediction_within_10_percent_needs_no_correction(table, monkeypatch) -> None:
    calls = _measured_as(0.95, monkeypatch)
    r = ltc.compress(Net(), _loader(), method="oneshot", target_speedup=1.5, epochs=0, progress=False,
                     recalibrate_bn=False)
    assert r.speedup["corrections"] == 0 and len(calls) == 2  # the timing within 10 %, and its confirmation
    assert r.speedup["attempts"][0]["timings"] == calls
    assert r.speedup["measured"] == pytest.approx(0.95 * r.speedup["predicted"])
    assert r.speedup["predicted"] >= 1.5


def test_a_missed_target_is_corrected_by_retargeting(table, monkeypatch) -> None:
    """The table predicts a third too much: the first deployment measures 0.75 x its prediction, the loop calibrates
    the table's savings on it and re-targets the C step at the table speed-up that measures the target under that
    calibration; the network it keeps lands within 10 % of the target."""
    calls = _measured_as(0.75, monkeypatch)
    r = ltc.compress(Net(), _loader(), method="oneshot", target_speedup=2.0, epochs=0, progress=False,
                     recalibrate_bn=False)
    att = r.speedup["attempts"]
    assert r.speedup["corrections"] == len(att) - 1 >= 1 and len(calls) == sum(len(a["timings"]) for a in att)
    assert [len(a["timings"]) for a in att] == [1] * (len(att) - 1) + [2]  # only the accepted one is confirmed
    b = savings_scale(att[0]["predicted"], att[0]["measured"])
    assert att[0]["scale"] == pytest.approx(b) and att[1]["engine_target"] == pytest.approx(table_target(2.0, b))
    assert abs(r.speedup["measured"] / 2.0 - 1) <= 0.10
    assert att[0]["sr"] < att[r.speedup["chosen_attempt"]]["sr"]  # it compressed harder than the table said
    kept = att[r.speedup["chosen_attempt"]]
    assert r.sr == pytest.approx(kept["sr"])  # the deployed network is the attempt kept


def test_corrections_stop_after_three(table, monkeypatch) -> None:
    """A clock whose bias flips between 0.7 and 1.4 x the table's prediction at every deployment: each calibration
    is wrong for the next network, so every attempt misses by more than 10 %; the loop times the first deployment
    and exactly MAX_CORRECTIONS = 3 corrections, then gives up and keeps the attempt that came closest, leaving
    the engine at its ranks."""
    target, fractions = 4.0, [0.7, 1.4, 0.7, 1.4]
    assert ltc.api.MAX_CORRECTIONS == 3
    calls = _measured_as(fractions, monkeypatch)
    r = ltc.compress(Net(), _loader(), method="oneshot", target_speedup=target, epochs=0, progress=False,
                     recalibrate_bn=False)
    sp = r.speedup
    att = sp["attempts"]
    assert sp["corrections"] == 3 and len(att) == len(calls) == 4  # the first timing, then one per correction
    assert sp["stopped"] == "3 corrections made" and sp["target"] == target and sp["table_best"] is None
    expected = [f * a["predicted"] for f, a in zip(fractions, att, strict=True)]
    assert [a["measured"] for a in att] == pytest.approx(expected)
    assert all(abs(a["measured"] / target - 1) > ltc.api.SPEEDUP_TOLERANCE for a in att)
    assert att[0]["engine_target"] == target
    for prev, nxt in zip(att, att[1:], strict=False):  # each correction re-targets on the last calibration
        assert nxt["engine_target"] == pytest.approx(table_target(target, prev["scale"]))
    for a in att:
        assert set(a) == {"engine_target", "predicted", "measured", "timings", "base_ms", "compressed_ms", "sr",
                          "scale"}
        assert a["predicted"] >= a["engine_target"] and a["base_ms"] > 0 and a["compressed_ms"] > 0
    assert len({a["sr"] for a in att}) == 4  # every correction deployed another network: none stopped early
    k = sp["chosen_attempt"]
    assert all(abs(att[k]["measured"] / target - 1) <= abs(a["measured"] / target - 1) for a in att)
    assert (sp["predicted"], sp["measured"]) == (att[k]["predicted"], att[k]["measured"])
    # the engine went back to the kept attempt's ranks: the C steps are the first, 3 corrections and the return
    assert len(r.history) == 5 and r.history[-1]["ranks"] == r.history[k]["ranks"]
    assert r.sr == pytest.approx(att[k]["sr"])
    assert r.history[-1]["predicted_speedup"] == pytest.approx(att[k]["predicted"])


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


def test_a_correction_beyond_the_tables_reach_deploys_the_fastest_once_then_keeps_the_closest(
        table, monkeypatch) -> None:
    """After training (an engine already started, no refusal), a table that over-predicts asks the correction for
    more than it can give: the loop deploys the table's fastest configuration once, stops there (saying why) and
    keeps the closest attempt; before training (``ltc.compress``) the same timings refuse the target with the
    fastest measured."""
    best = _table_best(table)
    target = 0.7 * best
    calls = _measured_as(0.5, monkeypatch)
    e = ltc.LTC(Net(), X, target_sr=target, cost="latency", latency_table=table, rank_multiple=8)
    e.start()
    sp = ltc.api.meet_speedup(e, Net(), X, target)
    att = sp["attempts"]
    assert len(att) == len(calls) == 2 and att[0]["engine_target"] == target and att[0]["predicted"] < best
    assert att[1]["engine_target"] == pytest.approx(best) and not sp["table_refused"]
    assert sp["table_best"] == pytest.approx(best) and "beyond the table's fastest" in sp["stopped"]
    assert sp["chosen_attempt"] == 1 and sp["measured"] == pytest.approx(0.5 * best)
    fastest = ltc.LTC(Net(), X, target_sr=best, cost="latency", latency_table=table, rank_multiple=8)
    fastest.start()
    assert e.ranks == fastest.ranks  # the engine is left at the attempt kept: every layer at its fastest option
    with pytest.raises(ValueError, match=f"measures {0.5 * best:.2f}x"):
        ltc.compress(Net(), _loader(), method="oneshot", target_speedup=target, epochs=0, progress=False)


def test_a_table_with_nothing_faster_than_dense_refuses_with_the_base_speed(monkeypatch) -> None:
    """Every factorised form slower than the dense conv: the fastest configuration is the base itself (table best
    exactly 1), timed once, and the refusal names 1.00x instead of failing on the fallback's own target."""
    torch.manual_seed(0)
    geoms = {n: g for n, g in record_geometry(Net(), X).items() if n != "fc"}
    slow = LatencyTable.from_latency_function(geoms, lambda g, part, r: 1.0 if part == "dense" else 5.0,
                                              model_ms=3.5)
    monkeypatch.setattr(ltc.api, "_latency_table", lambda *a, **k: slow)
    calls = _measured_as(1.0, monkeypatch)
    with pytest.raises(ValueError, match=r"target_speedup 2 is out of reach .* measures 1\.00x .* at most 1\.00"):
        ltc.compress(Net(), _loader(), method="oneshot", target_speedup=2.0, epochs=0, progress=False)
    assert calls == [pytest.approx(1.0)]


def test_a_learning_run_calibrates_before_training_and_checks_again_after(table, monkeypatch) -> None:
    """``ltc`` with L steps: the table over-predicts (0.8 x), so the pre-training calibration re-targets the engine;
    the L steps run at that calibrated target (the first timing after them is at it), and a one-shot run (no L
    steps) times only before training."""
    calls = _measured_as(0.8, monkeypatch)
    r = ltc.compress(Net(), _loader(), method="ltc", target_speedup=3.0, epochs=2, steps=1, progress=False,
                     recalibrate_bn=False)
    before, after = r.speedup["before_training"], r.speedup
    assert len(calls) == sum(len(a["timings"]) for a in before["attempts"] + after["attempts"])
    kept = before["attempts"][before["chosen_attempt"]]["engine_target"]
    assert kept > 3.0 and after["attempts"][0]["engine_target"] == pytest.approx(kept)
    calls.clear()
    one = ltc.compress(Net(), _loader(), method="oneshot", target_speedup=1.5, epochs=1, progress=False,
                       recalibrate_bn=False)
    assert len(calls) == sum(len(a["timings"]) for a in one.speedup["attempts"])
    assert "before_training" not in one.speedup


def test_a_lucky_timing_is_not_accepted_without_its_confirmation(table, monkeypatch) -> None:
    """The first deployment times exactly at its prediction (within 10 % of the target), but its confirmation
    measures 0.7 x: the two give sqrt(0.7) x the prediction, more than 10 % short, so the loop corrects instead of
    keeping a network that one noisy timing flattered."""
    calls = _measured_as([1.0, 0.7, 0.7], monkeypatch)
    r = ltc.compress(Net(), _loader(), method="oneshot", target_speedup=1.5, epochs=0, progress=False,
                     recalibrate_bn=False)
    first = r.speedup["attempts"][0]
    assert abs(first["timings"][0] / 1.5 - 1) <= ltc.api.SPEEDUP_TOLERANCE  # alone it would have been accepted
    assert first["timings"] == pytest.approx([first["predicted"], 0.7 * first["predicted"]]) == calls[:2]
    assert first["measured"] == pytest.approx(0.7 ** 0.5 * first["predicted"])
    assert abs(first["measured"] / 1.5 - 1) > ltc.api.SPEEDUP_TOLERANCE and r.speedup["corrections"] >= 1
    assert first["scale"] == pytest.approx(savings_scale(first["predicted"], first["measured"]))


def test_layers_timed_alone_outweighing_the_model_leave_nothing_fixed() -> None:
    """Per-layer timings that add up to more than the whole model (tiny networks) would leave the uncompressed part
    a negative cost and let a prediction reach zero time; the base is the layers' sum then."""
    torch.manual_seed(0)
    geoms = {n: g for n, g in record_geometry(Net(), X).items() if n != "fc"}
    dense_total = sum(_ms(g, "dense", None) for g in geoms.values())
    tab = LatencyTable.from_latency_function(geoms, _ms, model_ms=0.5 * dense_total)
    e = ltc.LTC(Net(), X, target_sr=1.5, cost="latency", latency_table=tab, rank_multiple=8)
    e.start()
    assert e.fixed_latency == 0.0 and e.base_cost_latency == pytest.approx(dense_total)
    chosen = sum(e.layer_cost(s, s.rank, "latency") for s in e.layers.values())
    assert 1.5 <= e.predicted_speedup == pytest.approx(dense_total / chosen)


@pytest.mark.parametrize("runtime, asked, used", [("eager", None, 20), ("onnxruntime", None, 100),
                                                   ("onnxruntime", 7, 7)])
def test_timings_take_more_runs_under_onnx_runtime(table, monkeypatch, runtime: str, asked, used: int) -> None:
    """ONNX Runtime's timings are noisier, so each one takes 100 interleaved runs unless asked otherwise (eager 20);
    the runtime is passed through to every timing."""
    seen: list[tuple[str, int]] = []

    def fake(base, small, x, **kw):
        seen.append((kw["runtime"], kw["repeats"]))
        return {"speedup": fake.engine.predicted_speedup, "base_ms": 1.0, "compressed_ms": 1.0}

    monkeypatch.setattr(ltc.latency, "compare_latency", fake)
    eng = ltc.LTC(Net(), X, target_sr=1.5, cost="latency", latency_table=table)
    fake.engine = eng
    out = ltc.api.meet_speedup(eng, Net(), X, 1.5, runtime=runtime, **({} if asked is None else {"repeats": asked}))
    assert seen and set(seen) == {(runtime, used)} and out["runtime"] == runtime


def test_an_unknown_runtime_has_no_default_number_of_runs() -> None:
    with pytest.raises(ValueError, match="runtime must be one of 'eager', 'onnxruntime', got 'tvm'"):
        ltc.latency.default_repeats("tvm")
