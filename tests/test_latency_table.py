"""Tests for ``ltc.latency_table.LatencyTable``, the measured-latency cost model of the C step (``cost='latency'``).

Nothing here asserts a timing: the timing function is replaced by a deterministic fake that counts its calls, or
latencies are injected with ``LatencyTable.from_latency_function``. Checked: the disk cache (what is measured, what
is reused, which settings change the key, a corrupt file), the interpolation (exact for linear / bilinear latencies,
exact at grid points, ``grid_ms`` = ``layer_ms``), the rank grid, and the engine's C step with a latency table
against an independent brute force (errors from numpy SVDs / HOSVD, latencies from the injected function).
"""

from __future__ import annotations

import json
import math
import tempfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import ltc
from ltc import latency_table as lt
from ltc.cost import LayerGeometry, record_geometry
from ltc.latency_table import LatencyTable, OpSpec, measured_ranks
from ltc.schemes import rank_values

SETTINGS = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])


class Net(nn.Module):
    """A kxk conv with bias, a strided kxk conv with BatchNorm, a 1x1 conv, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 7, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(7)
        self.c3 = nn.Conv2d(7, 5, 1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.bn(self.c2(x)))
        x = self.c3(x)
        return self.fc(x.mean(dim=(2, 3)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


X = torch.randn(1, 3, 8, 8)


# --------------------------------------------------------------------------------------------- fake timing
@pytest.fixture
def timed(monkeypatch):
    """Replace the one timing function by a deterministic fake; return the list of what it timed."""
    calls: list[tuple] = []

    def fake(module: nn.Module, inputs: tuple, timing) -> float:
        shape = tuple(inputs[0].shape)
        dims = (getattr(module, "in_channels", getattr(module, "in_features", None)),
                getattr(module, "out_channels", getattr(module, "out_features", None)))
        calls.append((type(module).__name__, repr(module), shape, timing.runtime, timing.threads, dims))
        return 0.01 + 1e-4 * sum(p.numel() for p in module.parameters()) * math.prod(shape[2:] or (1,))

    monkeypatch.setattr(lt, "_time_module", fake)
    return calls


def _build(model=None, x=X, **kw) -> LatencyTable:
    kw.setdefault("threads", 1)
    kw.setdefault("progress", False)
    return LatencyTable.build(model if model is not None else _net(), x, **kw)


# --------------------------------------------------------------------------------------------- 1. cache
def test_second_build_measures_nothing(timed, tmp_path):
    first = _build(cache_dir=tmp_path)
    n = len(timed)
    assert n == first.measured > 1 and first.cached == 0
    assert len(set(timed)) == n, "an op was timed twice in one build"
    assert sum(c[0] == "Net" for c in timed) == 1  # the whole model, once
    timed.clear()
    second = _build(cache_dir=tmp_path)
    assert timed == [] and second.measured == 0 and second.cached == n
    assert second.to_dict()["layers"] == first.to_dict()["layers"] and second.model_ms == first.model_ms
    assert len(list(tmp_path.glob("*.json"))) == 1


@pytest.mark.parametrize("change", [{"threads": 2}, {"batch": 2}, {"runtime": "onnxruntime"}])
def test_other_threads_batch_or_runtime_measure_again(timed, tmp_path, change):
    _build(cache_dir=tmp_path)
    n = len(timed)
    timed.clear()
    other = _build(cache_dir=tmp_path, **change)
    assert other.measured == n == len(timed) and other.cached == 0
    if "batch" in change:
        assert other.batch == 2 and all(c[2][0] == 2 for c in timed)
    timed.clear()
    assert _build(cache_dir=tmp_path).measured == 0 and timed == []  # both environments are kept
    assert _build(cache_dir=tmp_path, **change).measured == 0 and timed == []


def test_another_input_size_reuses_only_the_ops_of_the_same_shape(timed, tmp_path):
    _build(cache_dir=tmp_path)
    linear_ops = sum(c[0] == "Linear" for c in timed)
    n = len(timed)
    timed.clear()
    other = _build(x=torch.randn(1, 3, 10, 10), cache_dir=tmp_path)
    # every conv op runs at another resolution (and the model on another input); the head's ops are the same
    assert other.cached == linear_ops > 0 and other.measured == n - linear_ops == len(timed)
    assert not any(c[0] == "Linear" for c in timed)


_spec = st.builds(
    OpSpec,
    kind=st.just("conv"),
    in_channels=st.integers(1, 3),
    out_channels=st.integers(1, 3),
    bias=st.booleans(),
    in_shape=st.tuples(st.integers(1, 2), st.integers(3, 4), st.integers(3, 4)),
    kernel_size=st.sampled_from([(1, 1), (3, 3), (3, 1)]),
    stride=st.sampled_from([(1, 1), (2, 2), (1, 2)]),
    padding=st.sampled_from([(0, 0), (1, 1), (1, 0), "same"]),
    dilation=st.sampled_from([(1, 1), (2, 2)]),
    padding_mode=st.sampled_from(["zeros", "reflect"]),
) | st.builds(OpSpec, kind=st.just("linear"), in_channels=st.integers(1, 3), out_channels=st.integers(1, 3),
              bias=st.booleans(), in_shape=st.tuples(st.integers(1, 3)) | st.tuples(st.integers(1, 2),
                                                                                      st.integers(1, 3)))


@SETTINGS
@given(a=_spec, b=_spec)
def test_op_keys_differ_exactly_when_the_shapes_differ(a, b):
    assert (a.key == b.key) == (a == b)


def test_env_var_sets_the_cache_dir(timed, tmp_path, monkeypatch):
    monkeypatch.setenv("LTC_LATENCY_CACHE", str(tmp_path / "env"))
    _build()
    assert len(list((tmp_path / "env").glob("*.json"))) == 1
    timed.clear()
    assert _build().measured == 0 and timed == []


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "ltc-latency-cache", "version": 1, '
                                     '"entries": {"a": "fast"}}', '{"format": "other", "version": 1}'])
def test_corrupt_cache_file_is_ignored_with_a_warning(timed, tmp_path, content):
    _build(cache_dir=tmp_path)
    n = len(timed)
    (path,) = tmp_path.glob("*.json")
    path.write_text(content)
    timed.clear()
    with pytest.warns(UserWarning, match="corrupt latency cache"):
        again = _build(cache_dir=tmp_path)
    assert again.measured == n == len(timed)
    timed.clear()
    assert _build(cache_dir=tmp_path).measured == 0 and timed == []  # the file was rewritten, valid


def test_real_timing_smoke(tmp_path):
    """The real timing path (eager and ONNX Runtime) on tiny ops: positive finite latencies; threads restored.
    No timing is compared."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x = torch.randn(1, 2, 4, 4)
    torch.set_num_threads(1)
    for runtime in ("eager", "onnxruntime"):
        tab = LatencyTable.build(model, x, runtime=runtime, threads=2, repeats=1, warmup=0, cache_dir=tmp_path,
                                 progress=False)
        assert torch.get_num_threads() == 1
        assert tab.measured > 0 and tab.info["runtime"].startswith(runtime) and tab.info["threads"] == 2
        geoms = record_geometry(model, x)
        assert math.isfinite(tab.model_ms) and tab.model_ms > 0
        g, lin = geoms["0"], geoms["2"]
        grid = tab.grid_ms(g, "tucker2", (tuple(range(1, 3)), tuple(range(1, 4))))
        assert torch.isfinite(grid).all() and (grid > 0).all()
        assert tab.layer_ms(lin, "svd", 2) > 0 and tab.dense_ms(lin) > 0


# --------------------------------------------------------------------------------------------- 2. interpolation
def _conv_geometry(s: int, t: int, k: int, bias: bool = False, hw: int = 5, name: str = "c") -> LayerGeometry:
    return LayerGeometry(name=name, kind="conv", in_channels=s, out_channels=t, kernel_size=(k, k), groups=1,
                         bias=bias, in_hw=(hw, hw), out_hw=(hw, hw), positions=1, in_shape=(s, hw, hw),
                         out_shape=(t, hw, hw))


def _linear_geometry(i: int, o: int, name: str = "fc") -> LayerGeometry:
    return LayerGeometry(name=name, kind="linear", in_channels=i, out_channels=o, kernel_size=(1, 1), groups=1,
                         bias=True, in_hw=(1, 1), out_hw=(1, 1), positions=1, in_shape=(i,), out_shape=(o,))


_coef = st.floats(0.0, 3.0, allow_nan=False)


@settings(SETTINGS, max_examples=40)
@given(s=st.integers(1, 40), t=st.integers(1, 40), k=st.sampled_from([1, 3]), multiple=st.integers(1, 9),
       small=st.sets(st.integers(1, 5), max_size=3), points=st.integers(2, 6),
       c=st.lists(_coef, min_size=9, max_size=9))
def test_interpolation_is_exact_for_linear_and_bilinear_latencies(s, t, k, multiple, small, points, c):
    conv, fc = _conv_geometry(s, t, k), _linear_geometry(s, t)

    def ms(g, part, rank):
        if part == "dense":
            return 7.0
        if part == "tucker2.core":
            ri, ro = rank
            return c[0] + c[1] * ri + c[2] * ro + c[3] * ri * ro
        return (c[4] + c[5] * rank) if part.endswith("first") else (c[6] + c[7] * rank)

    tab = LatencyTable.from_latency_function([conv, fc], ms, 10.0, rank_multiple=multiple, small_ranks=small,
                                             core_points=points, conv_scheme="both")
    assert tab.dense_ms(conv) == 7.0 and tab.layer_ms(conv, "tucker2", None) == 7.0
    lowest = min(measured_ranks(s, multiple, small)), min(measured_ranks(t, multiple, small))
    for ri in range(1, s + 1):
        for ro in range(1, t + 1):
            if k == 3:  # 1x1 convs have no Tucker-2 form
                a, b = max(ri, lowest[0]), max(ro, lowest[1])  # held constant below the smallest measured rank
                want = (c[4] + c[5] * a) + (c[0] + c[1] * a + c[2] * b + c[3] * a * b) + (c[6] + c[7] * b)
                assert tab.layer_ms(conv, "tucker2", (ri, ro)) == pytest.approx(want, rel=1e-12, abs=1e-12)
    for scheme, g, full in (("matrix", conv, min(t, s * k * k)), ("svd", fc, min(s, t))):
        low = min(measured_ranks(full, multiple, small))
        for r in range(1, full + 1):
            a = max(r, low)
            want = (c[4] + c[5] * a) + (c[6] + c[7] * a)
            assert tab.layer_ms(g, scheme, r) == pytest.approx(want, rel=1e-12, abs=1e-12)


def _noise_ms(seed: int, dense: tuple[float, float] = (0.5, 2.0), part: tuple[float, float] = (0.05, 0.65)):
    """Pseudo-random latencies, a function of (seed, layer, part, rank): no structure an interpolation could use."""

    def ms(g, p, rank):
        u = zlib.crc32(repr((seed, g.name, p, rank)).encode()) / 2**32
        lo, hi = dense if p == "dense" else part
        return lo + (hi - lo) * u

    return ms


@SETTINGS
@given(s=st.integers(1, 30), t=st.integers(1, 30), multiple=st.integers(1, 8), points=st.integers(2, 5),
       seed=st.integers(0, 1000), min_rank=st.integers(1, 3), step=st.integers(1, 4))
def test_grid_points_are_the_entries_and_grid_ms_is_layer_ms(s, t, multiple, points, seed, min_rank, step):
    conv, one, fc = _conv_geometry(s, t, 3, name="k3"), _conv_geometry(s, t, 1, name="k1"), _linear_geometry(s, t)
    ms = _noise_ms(seed)
    tab = LatencyTable.from_latency_function([conv, one, fc], ms, 50.0, rank_multiple=multiple, core_points=points)
    (e3,) = [e for e in tab.entries if e.geometry == conv]
    for ri in e3.core.r_in:
        for ro in e3.core.r_out:
            want = ms(conv, "tucker2.first", ri) + ms(conv, "tucker2.core", (ri, ro)) + ms(conv, "tucker2.last", ro)
            assert tab.layer_ms(conv, "tucker2", (ri, ro)) == want
    for g, scheme in ((one, "matrix"), (fc, "svd")):
        for r in measured_ranks(min(s, t), multiple):
            assert tab.layer_ms(g, scheme, r) == ms(g, f"{scheme}.first", r) + ms(g, f"{scheme}.last", r)
    # the engine's candidate grid (any min_rank / multiple), cell by cell
    for g, scheme, fulls in ((conv, "tucker2", (s, t)), (one, "matrix", (min(s, t),)), (fc, "svd", (min(s, t),))):
        axes = tuple(tuple(rank_values(f, min_rank, step)) for f in fulls)
        grid = tab.grid_ms(g, scheme, axes)
        assert grid.dtype == torch.float64 and grid.shape == (math.prod(len(a) for a in axes),)
        cells = [(a, b) for a in axes[0] for b in axes[1]] if len(axes) == 2 else list(axes[0])
        assert grid.tolist() == [tab.layer_ms(g, scheme, r) for r in cells]


def test_round_trip_through_json_and_file(tmp_path):
    geoms = record_geometry(_net(), X)
    tab = LatencyTable.from_latency_function(geoms, _noise_ms(3), 9.0, rank_multiple=2, core_points=3)
    back = LatencyTable.from_dict(json.loads(json.dumps(tab.to_dict())))
    tab.save(tmp_path / "t.json")
    loaded = LatencyTable.load(tmp_path / "t.json")
    for other in (back, loaded):
        assert other.to_dict() == tab.to_dict() and other.model_ms == 9.0
        for g in geoms.values():
            scheme = "svd" if g.kind == "linear" else ("matrix" if g.kernel_size == (1, 1) else "tucker2")
            axes = ((1, 2, 3), (1, 2, 4)) if scheme == "tucker2" else ((1, 2, 3),)
            assert torch.equal(other.grid_ms(g, scheme, axes), tab.grid_ms(g, scheme, axes))
    with pytest.raises(ValueError, match="not an ltc latency table"):
        LatencyTable.from_dict({"format": "x"})


def test_lookup_is_by_shape_and_mismatches_are_named():
    model = _net()
    geoms = record_geometry(model, X)
    tab = LatencyTable.from_latency_function(geoms, _noise_ms(1), 9.0)
    renamed = {f"other.{n}": LayerGeometry(**{**g.__dict__, "name": f"other.{n}"}) for n, g in geoms.items()}
    tab.check_layers(renamed)  # same shapes, other names: one table serves both
    assert tab.layer_ms(renamed["other.c2"], "tucker2", (3, 4)) == tab.layer_ms(geoms["c2"], "tucker2", (3, 4))
    bigger = record_geometry(model, torch.randn(1, 3, 12, 12))
    with pytest.raises(ValueError, match=r"3 layer\(s\).*'c1' \(conv 3x3 3->6 at 12x12.*measured a layer of that "
                                         r"name as conv 3x3 3->6 at 8x8"):
        tab.check_layers(bigger)
    with pytest.raises(ValueError, match="no measurement for 3 layer.*'c1'"):
        ltc.LTC(model, torch.randn(1, 3, 12, 12), lam=1.0, cost="latency", latency_table=tab)
    with pytest.raises(ValueError, match="measured at batch 1, not 2"):
        tab.check_layers(geoms, batch=2)
    # LRC needs the matrix form of the kxk convs: a Tucker-2-only table says so at the first C step
    lrc = ltc.LRC(model, X, lam=1.0, cost="latency", latency_table=tab)
    with pytest.raises(ValueError, match=r"no 'matrix' measurements for layer 'c[12]'.*conv_scheme='matrix'"):
        lrc.start()
    both = LatencyTable.from_latency_function(geoms, _noise_ms(1), 9.0, conv_scheme="both")
    ltc.LRC(model, X, lam=1.0, cost="latency", latency_table=both).start()


# --------------------------------------------------------------------------------------------- 5. rank grid
@settings(SETTINGS, max_examples=40)
@given(a=st.integers(5, 21), b=st.integers(5, 21), c=st.integers(5, 21), multiple=st.integers(3, 8),
       small=st.sets(st.integers(1, 4), max_size=3), points=st.integers(2, 5))
def test_measured_ranks_are_small_ranks_multiples_or_full(timed, a, b, c, multiple, small, points):
    timed.clear()
    model = nn.Sequential(nn.Conv2d(3, a, 3, padding=1), nn.Conv2d(a, b, 1), nn.Conv2d(b, c, 3),
                          nn.Flatten(), nn.Linear(c * 2 * 2, 9))
    x = torch.randn(1, 3, 4, 4)
    with tempfile.TemporaryDirectory() as cache:
        tab = _build(model, x, rank_multiple=multiple, small_ranks=small, core_points=points, cache_dir=cache)

    def allowed(full: int) -> set[int]:
        return {r for r in small if r <= full} | set(range(multiple, full + 1, multiple)) | {full}

    dims = {3, a, b, c, c * 4, 9}  # the layers' own channel counts (the fixed side of every part)
    for e in tab.entries:
        g = e.geometry
        for part, curve in e.curves.items():
            scheme = part.split(".")[0]
            full = (g.in_channels if part == "tucker2.first" else g.out_channels) if scheme == "tucker2" else \
                min(g.out_channels, g.in_channels * g.kernel_size[0] * g.kernel_size[1])
            assert list(curve.ranks) == sorted(allowed(full)), (g.name, part)
        if e.core is not None:
            for ax, full in ((e.core.r_in, g.in_channels), (e.core.r_out, g.out_channels)):
                assert set(ax) <= allowed(full) and ax[0] == min(allowed(full)) and ax[-1] == full
                assert len(ax) <= points
    # every timed op's channel counts are a layer's own (the fixed side; the full ranks are among them) or ranks
    # from small_ranks or multiples of rank_multiple
    ranks = set(small) | set(range(multiple, 100, multiple))
    parts = [c for c in timed if c[0] in ("Conv2d", "Linear")]
    assert len(parts) == len(timed) - 1
    for *_, (cin, cout) in parts:
        assert cin in dims | ranks and cout in dims | ranks, (cin, cout)


def _inputs_seen(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    seen: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen.setdefault(name, tuple(inputs[0].shape))

        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_timed_parts_are_the_deployed_layers_parts(timed, tmp_path):
    """Each timed part is exactly a part of the deployed factorised layer (same module, same input shape)."""
    model = _net()
    tab = _build(model, X, rank_multiple=2, core_points=3, conv_scheme="both", cache_dir=tmp_path)
    done = {(c[1], c[2]) for c in timed}
    shapes = _inputs_seen(model, X)
    for e in tab.entries:
        (name,) = e.names
        layer = model.get_submodule(name)
        assert (repr(layer), shapes[name]) in done  # the dense layer
        deployed = []
        if e.core is not None:
            deployed += [ltc.Tucker2Conv2d.from_conv(layer, (a, b)) for a in e.core.r_in for b in e.core.r_out]
        if "matrix.first" in e.curves:
            deployed += [ltc.MatrixLowRankConv2d.from_conv(layer, r) for r in e.curves["matrix.first"].ranks]
        if "svd.first" in e.curves:
            deployed += [ltc.LowRankLinear.from_linear(layer, r) for r in e.curves["svd.first"].ranks]
        assert deployed
        for d in deployed:
            part_inputs = _inputs_seen(d, torch.randn(shapes[name]))
            for part, shape in part_inputs.items():
                assert (repr(d.get_submodule(part)), shape) in done, (name, part, repr(d.get_submodule(part)), shape)


# --------------------------------------------------------------------------------------------- engine
def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: m.weight.detach().double().numpy() for n, m in model.named_modules() if
            isinstance(m, nn.Conv2d | nn.Linear)}


def _scheme(w: np.ndarray) -> str:
    return "svd" if w.ndim == 2 else ("matrix" if w.shape[2:] == (1, 1) else "tucker2")


def _errors(w: np.ndarray) -> dict:
    """``{rank: squared error}`` of the truncated HOSVD (kxk conv) / SVD (1x1 conv, linear), by numpy."""
    if _scheme(w) != "tucker2":
        sv = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)
        return {r: float((sv[r:] ** 2).sum()) for r in range(1, len(sv) + 1)}
    t, s = w.shape[:2]
    u_full = np.linalg.svd(w.reshape(t, -1), full_matrices=False)[0]
    v_full = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(s, -1), full_matrices=False)[0]
    out = {}
    for ri in range(1, s + 1):
        for ro in range(1, t + 1):
            u, v = u_full[:, :ro], v_full[:, :ri]
            theta = np.einsum("oiab,to,si->tsab", np.einsum("tsab,to,si->oiab", w, u, v), u, v)
            out[(ri, ro)] = float(((w - theta) ** 2).sum())
    return out


def _options(model: nn.Module, ms, names) -> dict[str, list[tuple]]:
    """``{layer: [(rank, latency, err)] + [(None, dense latency, 0)]}``, latencies straight from ``ms``."""
    geoms = record_geometry(model, X)
    ws = _weights(model)
    out = {}
    for n in names:
        g, w = geoms[n], ws[n]
        sch = _scheme(w)
        opts = []
        for r, err in _errors(w).items():
            if sch == "tucker2":
                lat = ms(g, "tucker2.first", r[0]) + ms(g, "tucker2.core", r) + ms(g, "tucker2.last", r[1])
            else:
                lat = ms(g, f"{sch}.first", r) + ms(g, f"{sch}.last", r)
            opts.append((r, lat, err))
        out[n] = opts + [(None, ms(g, "dense", None), 0.0)]
    return out


def _rank_ms(seed: int):
    """Latencies that grow with the rank (a part at full rank costs about half the dense layer), plus noise that
    makes them non-monotone: compression is a trade-off, and a full-rank form is slower than dense."""
    noise = _noise_ms(seed, dense=(0.5, 2.0), part=(0.0, 0.05))

    def ms(g, part, rank):
        if part == "dense":
            return noise(g, part, rank)
        if part == "tucker2.core":
            frac = rank[0] * rank[1] / (g.in_channels * g.out_channels)
        else:
            full = g.in_channels if part == "tucker2.first" else min(
                g.out_channels, g.in_channels * g.kernel_size[0] * g.kernel_size[1])
            frac = (rank[0] if isinstance(rank, tuple) else rank) / full
        return 0.5 * noise(g, "dense", None) * frac + noise(g, part, rank)

    return ms


NAMES = ("c1", "c2", "c3", "fc")
FIXED = 0.7  # latency of what is not compressed


def _exact_table(model: nn.Module, ms) -> LatencyTable:
    """Every rank measured (multiple 1, full core grid): the table's value at every rank is ``ms``'s."""
    geoms = record_geometry(model, X)
    model_ms = FIXED + sum(ms(geoms[n], "dense", None) for n in NAMES)
    return LatencyTable.from_latency_function(geoms, ms, model_ms, rank_multiple=1, small_ranks=(), core_points=64)


def _relative_weights(model: nn.Module) -> dict[str, float]:
    energy = {n: float((w ** 2).sum()) for n, w in _weights(model).items() if n in NAMES}
    mean = sum(energy.values()) / len(energy)
    return {n: mean / e for n, e in energy.items()}


@SETTINGS
@given(seed=st.integers(0, 10_000), log_lam=st.floats(-3, 1), log_mu=st.floats(-3, 1), structured=st.booleans())
def test_lambda_c_step_is_the_brute_force_argmin_of_latency(seed, log_lam, log_mu, structured):
    lam, mu = 10.0**log_lam, 10.0**log_mu
    model, ms = _net(seed), (_rank_ms if structured else _noise_ms)(seed)
    comp = ltc.LTC(model, X, lam=lam, mu0=mu, cost="latency", latency_table=_exact_table(model, ms),
                   compress_linear=True)
    comp.start()
    opts, w = _options(model, ms, NAMES), _relative_weights(model)
    c_ref = sum(o[-1][1] for o in opts.values())
    for n, layer_opts in opts.items():
        obj = [lam * lat / c_ref + 0.5 * mu * w[n] * err for _, lat, err in layer_opts]
        best = min(obj)
        tol = 1e-9 * (abs(best) + mu * w[n] * float((_weights(model)[n] ** 2).sum()))
        winners = [o[0] for o, v in zip(layer_opts, obj, strict=True) if v <= best + tol]
        assert comp.ranks[n] in winners, (n, comp.ranks[n], winners)


@SETTINGS
@given(seed=st.integers(0, 10_000), frac=st.floats(0.05, 0.95), log_mu=st.floats(-3, 1), structured=st.booleans())
def test_budget_c_step_meets_the_predicted_speedup(seed, frac, log_mu, structured):
    mu = 10.0**log_mu
    model, ms = _net(seed), (_rank_ms if structured else _noise_ms)(seed)
    table = _exact_table(model, ms)
    opts, w = _options(model, ms, NAMES), _relative_weights(model)
    base = table.model_ms
    fastest = base / (FIXED + sum(min(o[1] for o in layer_opts) for layer_opts in opts.values()))
    assume(fastest > 1.01)
    target = 1 + frac * (fastest - 1)
    comp = ltc.LTC(model, X, target_sr=target, mu0=mu, cost="latency", latency_table=table, compress_linear=True)
    comp.start()
    chosen = {n: next(o for o in opts[n] if o[0] == comp.ranks[n]) for n in NAMES}
    predicted = base / (FIXED + sum(o[1] for o in chosen.values()))
    assert comp.predicted_speedup == pytest.approx(predicted, rel=1e-12)
    assert predicted >= target * (1 - 1e-12)
    assert comp.history[-1]["predicted_speedup"] == comp.predicted_speedup
    if comp.lam == 0:
        # the budget holds every layer's most accurate option (a full-rank form can be faster than dense): taken
        energy = {n: float((v ** 2).sum()) for n, v in _weights(model).items()}
        assert all(chosen[n][2] <= 1e-9 * energy[n] for n in NAMES)  # dense, or a full rank (rounding error only)
        return
    # the λ found: its plain λ-mode argmin (brute force) is within the budget too, and no better in weighted error
    c_ref = sum(o[-1][1] for o in opts.values())
    lam_total = lam_err = 0.0
    for n, layer_opts in opts.items():
        o = min(layer_opts, key=lambda o: comp.lam * o[1] / c_ref + 0.5 * mu * w[n] * o[2])
        lam_total, lam_err = lam_total + o[1], lam_err + w[n] * o[2]
    assert base / (FIXED + lam_total) >= target * (1 - 1e-9)
    assert sum(w[n] * chosen[n][2] for n in NAMES) <= lam_err * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("mode", [{"lam": 0.05}, {"target_sr": 1.5}])
def test_layer_never_faster_factorised_stays_dense(mode):
    """c2's factorised forms never beat its dense latency: the C step keeps it dense, compresses the others."""
    model = _net(0)
    geoms = record_geometry(model, X)

    def ms(g, part, rank):
        if part == "dense":
            return 1.0
        if g.name == "c2":
            return 0.34  # three parts: 1.02 ms at any rank
        r = rank if isinstance(rank, int) else rank[0] * rank[1]
        return 0.01 + 0.001 * r

    table = LatencyTable.from_latency_function(geoms, ms, 4.5, rank_multiple=2)
    assert table.grid_ms(geoms["c2"], "tucker2", (tuple(range(1, 7)), tuple(range(1, 8)))).min() > 1.0
    comp = ltc.LTC(model, X, cost="latency", latency_table=table, mu0=1e-4, **mode)
    comp.start()
    assert comp.ranks["c2"] is None
    assert comp.ranks["c1"] is not None and comp.ranks["c3"] is not None
    if "target_sr" in mode:
        assert comp.predicted_speedup >= 1.5


@pytest.mark.parametrize("latency", [_noise_ms, _rank_ms])
def test_unreachable_latency_target_reports_the_best_speedup(latency):
    model, ms = _net(5), latency(5)
    table = _exact_table(model, ms)
    opts = _options(model, ms, NAMES)
    best = table.model_ms / (FIXED + sum(min(o[1] for o in layer_opts) for layer_opts in opts.values()))
    comp = ltc.LTC(model, X, target_sr=best * 1.05, cost="latency", latency_table=table, compress_linear=True)
    with pytest.raises(ValueError, match=r"target speed-up \(latency table\) .* out of reach") as info:
        comp.start()
    assert f"reaches {best:.3g};" in str(info.value)
    assert not comp.started
    # just below the best, it is reached
    ok = ltc.LTC(model, X, target_sr=best * 0.999, cost="latency", latency_table=table, compress_linear=True)
    ok.start()
    assert ok.predicted_speedup >= best * 0.999


def test_onnx_sessions_time_without_spinning_threads():
    """Sessions timed side by side must not busy-wait (one session's spinning pool takes the other's cores); the
    ONNX Runtime default stays reachable. The session computes what the module does."""
    pytest.importorskip("onnxruntime")
    from ltc.latency import onnx_session

    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 2, 4, 4)
    for spinning, flag in ((False, "0"), (True, "1")):
        sess = onnx_session(model, (x,), 2, **({"spinning": True} if spinning else {}))
        opts = sess.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == flag
        assert opts.intra_op_num_threads == 2
        (out,) = sess.run(None, {"x0": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-5, rtol=1e-5)
