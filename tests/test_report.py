"""Tables (ltc.report) and figures (ltc.plots) from fake-but-consistent run folders."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ltc import plots, report
from ltc.api import Result
from ltc.cli import main
from ltc.cost import Profile
from ltc.methods import list_methods
from ltc.results import SCHEMA_VERSION, RunResult

# VGG-16 (CIFAR) conv layers: (S, T)
VGG_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512),
             (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
VGG_NAMES = [f"features.{i}" for i in (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)]


def fake_result(method: str = "ltc", lam: float = 1e-3, *, model: str = "vgg16_cifar", dataset: str = "cifar10",
                base_macs: float = 332.0e6, base_params: float = 33.647e6, base_acc: float = 0.936,
                sr: float = 5.61, cr: float = 1.71, acc: float = 0.9189, acc_before: float | None = 0.4,
                frac: float = 0.3, steps: int = 4, label: str | None = None, matrix: bool = False,
                dense: tuple[int, ...] = (0,), target_sr: float | None = None,
                latency: dict[str, Any] | None = None) -> dict[str, Any]:
    """A result.json dict shaped like what ``ltc compress`` writes (RunResult.from_compression); SR/CR consistent
    with MACs."""
    ranks: dict[str, Any] = {}
    full: dict[str, Any] = {}
    for i, (name, (s, t)) in enumerate(zip(VGG_NAMES, VGG_CONVS, strict=True)):
        if matrix:
            full[name] = min(t, 9 * s)
            ranks[name] = None if i in dense else max(1, round(full[name] * frac))
        else:
            full[name] = [s, t]
            ranks[name] = None if i in dense else [max(1, round(s * frac)), max(1, round(t * frac))]
    history = []
    for k in range(steps):
        f = 1.0 - (1.0 - frac) * (k + 1) / steps
        hr = {n: (None if r is None else [max(1, round(v * f / frac)) for v in r] if isinstance(r, list)
                  else max(1, round(r * f / frac))) for n, r in ranks.items()}
        hr = {n: (min(v, full[n]) if isinstance(v, int) else v) for n, v in hr.items()}
        s_k = 1 + (sr - 1) * (k + 1) / steps
        c_k = 1 + (cr - 1) * (k + 1) / steps
        history.append({"step": k + 1, "mu": 1e-3 * 1.25**k, "lam": lam, "ranks": hr, "err": {n: 0.1 for n in hr},
                        "distance": 0.3 * 0.5**k, "macs": base_macs / s_k, "params": base_params / c_k,
                        "sr": s_k, "cr": c_k, "seconds": 0.1})
    out: dict[str, Any] = {
        "kind": "compress", "method": method, "lam": lam, "target_sr": target_sr, "sr": sr, "cr": cr,
        "base": {"macs": base_macs, "params": base_params, "acc": base_acc},
        "compressed": {"macs": base_macs / sr, "params": base_params / cr, "acc": acc,
                       "acc_before_finetune": acc_before},
        "ranks": ranks, "full_ranks": full, "history": history if method in ("ltc", "lrc") else [],
        "log": [{"phase": "lc", "step": 1, "epoch": 1, "train_loss": 1.0}], "config": {"method": method},
        "seconds": 1.0, "model": model, "dataset": dataset,
    }
    if label is not None:
        out["label"] = label
    if latency is not None:
        out["latency"] = latency
    return out


def train_result(model: str = "vgg16_cifar", dataset: str = "cifar10", acc: float = 0.936, macs: float = 332.0e6,
                 params: float = 33.647e6) -> dict[str, Any]:
    return {"kind": "train", "model": model, "dataset": dataset, "acc": acc, "macs": macs, "params": params,
            "epochs": 3}


def write_run(root: Path, name: str, data: dict[str, Any]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(data))
    return d


@pytest.fixture()
def runs(tmp_path: Path) -> list[dict[str, Any]]:
    paths = [
        write_run(tmp_path, "base_vgg", train_result()),
        write_run(tmp_path, "ltc_vgg", fake_result()),
        write_run(tmp_path, "vbmf_vgg", fake_result("vbmf", 0.0, sr=3.01, cr=1.61, acc=0.905, acc_before=0.2)),
        write_run(tmp_path, "lrc_vgg", fake_result("lrc", 2e-3, sr=3.57, cr=1.61, acc=0.9092, matrix=True)),
        write_run(tmp_path, "mnv2", train_result("mobilenet_v2", acc=0.6654, macs=0.09e9, params=2.24e6)),
        write_run(tmp_path, "ltc_r34_xray", fake_result(model="resnet34", dataset="data/pneumoniamnist.npz",
                                                        base_macs=3.664e9, base_params=21.286e6, base_acc=0.9679,
                                                        sr=13.14, cr=15.58, acc=0.96)),
    ]
    return report.load_runs(paths)


# ------------------------------------------------------------------------------------------------ loading


def test_load_runs_folder_and_file(tmp_path: Path) -> None:
    d = write_run(tmp_path, "a", fake_result())
    r1, r2 = report.load_runs([d, d / "result.json"])
    assert r1["method"] == "ltc" and r1["_path"] == str(d) == r2["_path"]
    # read through RunResult: the record as the schema defines it (defaults filled in, foreign keys dropped)
    assert r1 == {**RunResult.read(d / "result.json").to_dict(), "_path": str(d)}
    assert r1["schema"] == SCHEMA_VERSION and r1["finetune"] is None and "not_a_field" not in r1


def test_load_runs_errors_name_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty)) + ".*result.json"):
        report.load_runs([empty])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        report.load_runs([tmp_path / "nowhere"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "result.json").write_text('{"method": "ltc", ')
    with pytest.raises(ValueError, match=re.escape(str(broken / "result.json")) + ".*not valid JSON"):
        report.load_runs([broken])
    lacking = write_run(tmp_path, "lacking", {"method": "ltc", "base": {}})
    with pytest.raises(ValueError, match="lacking.*compressed"):
        report.load_runs([lacking])
    listy = write_run(tmp_path, "listy", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="listy.*expected an object"):
        report.load_runs([listy])
    parent = tmp_path / "parent"
    write_run(parent, "child", fake_result())
    with pytest.raises(FileNotFoundError, match="child"):
        report.load_runs([parent])


# ---------------------------------------------------------------------------------------------- RunResult


_finite = st.floats(allow_nan=False, allow_infinity=False)
_frac = st.floats(0.0, 1.0)
_json_leaf = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _finite | st.text(max_size=8)
_row_lists = st.lists(st.dictionaries(st.text(max_size=6), _json_leaf, max_size=4), max_size=3)


@st.composite
def run_results(draw: st.DrawFn) -> RunResult:
    common = {"model": draw(st.text(min_size=1, max_size=12)), "dataset": draw(st.text(max_size=12)),
              "seconds": draw(st.floats(0, 1e6)), "data": draw(st.dictionaries(st.text(max_size=6), _json_leaf,
                                                                                max_size=3)),
              "history": draw(_row_lists)}
    if draw(st.booleans()):
        return RunResult(kind="train", acc=draw(st.none() | _frac), macs=draw(st.integers(0, 10**12)),
                         params=draw(st.integers(0, 10**9)), epochs=draw(st.integers(0, 500)), **common)
    ranks = draw(st.dictionaries(st.text(min_size=1, max_size=8),
                                 st.none() | st.integers(1, 512) | st.lists(st.integers(1, 512), min_size=2,
                                                                            max_size=2), max_size=4))
    profile = st.fixed_dictionaries({"macs": st.integers(1, 10**12), "params": st.integers(1, 10**9),
                                     "acc": st.none() | _frac})
    return RunResult(kind="compress", method=draw(st.sampled_from(list_methods())), label=draw(st.none() | st.text()),
                     lam=draw(st.none() | st.floats(0, 1e6)), target_sr=draw(st.none() | st.floats(1, 100)),
                     sr=draw(st.floats(1, 100)), cr=draw(st.floats(1, 100)), base=draw(profile),
                     compressed=draw(profile), ranks=ranks, log=draw(_row_lists),
                     latency=draw(st.dictionaries(st.just("batch1"), st.dictionaries(st.text(max_size=6), _finite,
                                                                                      max_size=3))),
                     w_theta_final=draw(st.none() | _frac), base_run=draw(st.none() | st.text(max_size=10)),
                     **common)


@settings(max_examples=60, deadline=None)
@given(res=run_results())
def test_run_result_write_read_round_trip(res: RunResult) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "result.json"
        res.write(path)
        back = RunResult.read(path)
        text = path.read_text(encoding="utf-8")
    assert back == res
    assert json.loads(text) == res.to_dict() and back.to_dict() == res.to_dict()
    assert RunResult.from_dict(res.to_dict()) == res


def test_a_written_record_names_what_wrote_it_and_an_older_one_reads_without(tmp_path: Path) -> None:
    """``write`` stamps ``written_by``: this ltc's version, the commit of its source checkout, torch, this CPU and the
    date; a record from before the field reads back with it empty."""
    import datetime as dt

    import torch

    import ltc
    from ltc.utils import cpu_name, source_commit

    res = RunResult(kind="train", model="m", acc=0.5, macs=10, params=3)
    before = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    res.write(tmp_path / "result.json")
    made = RunResult.read(tmp_path / "result.json").written_by
    assert (made["ltc"], made["torch"], made["cpu"]) == (ltc.__version__, torch.__version__, cpu_name())
    assert made["commit"] == source_commit()
    stamped = dt.datetime.strptime(made["date"], "%Y-%m-%d %H:%M UTC").replace(tzinfo=dt.UTC)
    assert before <= stamped <= dt.datetime.now(dt.UTC)
    old = {k: v for k, v in res.to_dict().items() if k != "written_by"}
    assert RunResult.from_dict(old).written_by == {}


def test_source_commit_names_the_checkout_and_only_source_changes_make_it_dirty(tmp_path: Path, monkeypatch) -> None:
    """A package at ``<repo>/src/ltc`` gets the repo's short commit; an edit under ``src/`` adds ``+dirty``, an edit
    elsewhere (a benchmark result) does not; a package dir that is not ``src/ltc`` of its checkout, or no git on the
    PATH, gives ``None``."""
    import shutil
    import subprocess

    from ltc.utils import source_commit

    if shutil.which("git") is None:
        pytest.skip("needs git")
    pkg = tmp_path / "repo" / "src" / "ltc"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (tmp_path / "repo" / "results.md").write_text("a\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path / "repo",
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    head = git("rev-parse", "--short", "HEAD")
    assert source_commit(pkg) == head
    (tmp_path / "repo" / "results.md").write_text("b\n")
    assert source_commit(pkg) == head
    (pkg / "__init__.py").write_text("x = 2\n")
    assert source_commit(pkg) == head + "+dirty"
    other = tmp_path / "repo" / "lib"
    other.mkdir()
    assert source_commit(other) is None
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert source_commit(pkg) is None


def test_run_result_stores_non_finite_numbers_as_null(tmp_path: Path) -> None:
    res = RunResult(kind="train", model="m", acc=float("nan"), macs=10, params=3,
                    history=[{"val_loss": float("inf"), "val_acc": None, "lr": 0.1}])
    res.write(tmp_path / "result.json")

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in result.json: not strict JSON")

    json.loads((tmp_path / "result.json").read_text(), parse_constant=refuse)
    back = RunResult.read(tmp_path / "result.json")  # a base run without validation accuracy still reads back
    assert back.acc is None and back.history == [{"val_loss": None, "val_acc": None, "lr": 0.1}]


def test_run_result_from_compression_keeps_the_result() -> None:
    prof = [Profile(macs=m, params=p, layers=(), input_shape=(1, 1, 16, 16)) for m, p in ((1200, 90), (300, 45))]
    result = Result(model=nn.Identity(), method="ltc", ranks={"conv": (2, 3)}, full_ranks={"conv": (4, 8)}, lam=0.5,
                    target_sr=None, base=prof[0], compressed=prof[1], base_acc=0.9, acc_before_finetune=0.5,
                    acc=0.85, history=[{"step": 0, "distance": 0.25}], log=[{"epoch": 1, "phase": "lc"}],
                    config={"method": "ltc", "lam": 0.5}, plan={"lc_steps": 1, "finetune": 2}, w_theta_final=0.25,
                    seconds=3.0)
    run = RunResult.from_compression(result, model="small_cnn", dataset="digits", label="LTC")
    assert run.kind == "compress" and run.compress_config == {"method": "ltc", "lam": 0.5} and run.config == {}
    assert (run.model, run.dataset, run.label, run.method, run.lam) == ("small_cnn", "digits", "LTC", "ltc", 0.5)
    assert run.ranks == {"conv": [2, 3]} and run.full_ranks == {"conv": [4, 8]}
    assert run.base == {"macs": 1200, "params": 90, "acc": 0.9}
    assert run.compressed == {"macs": 300, "params": 45, "acc": 0.85, "acc_before_finetune": 0.5}
    assert (run.sr, run.cr) == (result.sr, result.cr) and run.plan == result.plan and run.log == result.log
    assert RunResult.from_dict(run.to_dict()) == run


def test_run_result_legacy_record_without_kind_is_a_compression(tmp_path: Path) -> None:
    data = fake_result()
    del data["kind"]
    d = write_run(tmp_path, "old", data)
    res = RunResult.read(d / "result.json")
    assert res.kind == "compress" and res.method == "ltc" and res.sr == data["sr"]


_VALID = {"train": train_result(), "compress": fake_result()}


@pytest.mark.parametrize(("kind", "change", "message"), [
    ("compress", {"schema": 2}, "result schema 2, this ltc reads 1"),
    ("train", {"schema": "1"}, "result schema '1'"),
    ("train", {"kind": "sweep"}, "unknown run kind 'sweep'"),
    ("train", {"macs": None}, "base-model (kind 'train') result lacks the key(s) macs"),
    ("train", {"params": "drop", "model": "drop"}, "lacks the key(s) params, model"),
    ("compress", {"compressed": "drop"}, "compression result lacks the key(s) compressed"),
    ("compress", {"method": None, "base": "drop"}, "lacks the key(s) method, base"),
    ("compress", {"model": "drop"}, "lacks the key(s) model"),
])
def test_run_result_refuses_foreign_records(kind: str, change: dict[str, Any], message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = {**_VALID[kind], **change}
    data = {k: v for k, v in data.items() if v != "drop"}
    d = write_run(tmp_path, "run", data)
    file = d / "result.json"
    pattern = re.escape(str(file)) + ".*" + re.escape(message)
    with pytest.raises(ValueError, match=pattern):
        RunResult.read(file)
    with pytest.raises(ValueError, match=pattern):
        report.load_runs([d])
    good = write_run(tmp_path, "good", _VALID["train"])
    code = main(["report", str(good), str(d), "--out", str(tmp_path / "rep")])  # ltc report reads through it
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ltc: error:") and str(file) in err and message in err
    assert not (tmp_path / "rep").exists()  # nothing written from half of the runs
    assert main(["report", str(good), "--out", str(tmp_path / "rep")]) == 0
    assert "| VGG-16 |" in capsys.readouterr().out and (tmp_path / "rep" / "table1.md").is_file()


def test_run_result_kind_is_checked_on_construction() -> None:
    with pytest.raises(ValueError, match="kind must be 'train' or 'compress', got 'base'"):
        RunResult(kind="base", model="m")


# ------------------------------------------------------------------------------------------------- tables


def _rows(t: report.Table, col: str, value: str) -> list[dict[str, str]]:
    return [r for r in t.rows if r[col] == value]


def test_table1_numbers_and_layout(runs: list[dict[str, Any]]) -> None:
    t = report.table1(runs)
    assert "MACs (G)" in t.columns and "Params (M)" in t.columns
    models = [r["Model"] for r in t.rows]
    i = models.index("VGG-16")
    assert models[i + 1:i + 4] == ["Tucker-VBMF", "LRC", "LTC"]  # base row first, methods in canonical order
    base, ltc = t.rows[i], t.rows[i + 3]
    assert (base["Dataset"], base["MACs (G)"], base["SR"], base["Params (M)"], base["Acc (%)"]) == \
        ("CIFAR-10", "0.33", "1.00", "33.65", "93.60")
    assert (ltc["Dataset"], ltc["MACs (G)"], ltc["SR"], ltc["Params (M)"], ltc["CR"], ltc["Acc (%)"]) == \
        ("", "0.06", "5.61", "19.68", "1.71", "91.89")
    r34 = _rows(t, "Model", "ResNet-34")[0]  # no train run: base row from the compression run's base record
    assert (r34["Dataset"], r34["MACs (G)"], r34["Params (M)"], r34["Acc (%)"]) == \
        ("PneumoniaMNIST", "3.66", "21.29", "96.79")
    assert "MobileNetV2" in models  # a train run without compression runs is still a base row
    md = t.to_markdown()
    assert "FLOPs" in md and "MACs" in md  # the footnote on units
    assert math.isclose(t.values[i + 3]["SR"], 5.61)


def test_table1_small_models_use_m_and_latency(tmp_path: Path) -> None:
    small = fake_result(model="small_cnn", dataset="digits", base_macs=1.2e6, base_params=3e3, sr=2.0, cr=1.5,
                        latency={"batch1": {"base_ms": 2.0, "compressed_ms": 1.25, "speedup": 1.6}})
    t = report.table1([small])
    assert "MACs (M)" in t.columns and "Params (K)" in t.columns
    assert [r["MACs (M)"] for r in t.rows] == ["1.20", "0.60"]
    assert [r["Params (K)"] for r in t.rows] == ["3.00", "2.00"]
    col = "Measured speed-up (batch 1)"
    assert [r[col] for r in t.rows] == ["1.00", "1.60"]
    assert report.pick_unit([0.29e9, 0.013e9]) == ("G", 1e9)
    assert report.pick_unit([0.29e9, 0.004e9]) == ("M", 1e6)
    assert report.pick_unit([0.35e9, 0.063e9], min_shown=0.1) == ("M", 1e6)  # slides' Table 3 is in M
    assert report.pick_unit([3.68e9, 0.28e9], min_shown=0.1) == ("G", 1e9)  # Table 2 in G
    assert report.fmt_acc(None) == "—" and report.fmt_acc(0.5) == "50.00"


def test_markdown_and_csv_round_trip(runs: list[dict[str, Any]]) -> None:
    for t in (report.table1(runs), report.table4(runs), report.sweep_table(runs), report.table_layers(runs)):
        lines = t.to_markdown().splitlines()
        k = next(i for i, line in enumerate(lines) if line.startswith("| "))
        assert lines[k] == "| " + " | ".join(t.columns) + " |"
        assert re.fullmatch(r"\|(-{3}:?\|)+", lines[k + 1]) and lines[k + 1].count("|") == len(t.columns) + 1
        assert all(line.count("|") == len(t.columns) + 1 for line in lines[k + 2:k + 2 + len(t.rows)])
        back = list(csv.DictReader(io.StringIO(t.to_csv())))
        assert back == t.rows


def test_table_layers(tmp_path: Path) -> None:
    runs = [fake_result(label=lab, sr=s, acc=a) for lab, s, a in
            (("Conv1", 1.002, 0.8488), ("Conv2-13", 5.24, 0.9245), ("ConvAll", 5.29, 0.9189))]
    t = report.table_layers(runs)
    assert [r["Model"] for r in t.rows] == ["VGG-16", "Conv1", "Conv2-13", "ConvAll"]
    assert t.columns == ["Dataset", "Model", "MACs (M)", "Params (M)", "Acc (%)"]  # 0.33 G vs 63 M -> M
    assert t.rows[0]["MACs (M)"] == "332.00" and t.rows[0]["Acc (%)"] == "93.60"
    assert t.rows[2]["MACs (M)"] == f"{332.0 / 5.24:.2f}" and t.rows[2]["Acc (%)"] == "92.45"
    assert t.rows[0]["Dataset"] == "CIFAR-10" and t.rows[1]["Dataset"] == ""


def test_table4_comparison(runs: list[dict[str, Any]]) -> None:
    t = report.table4(runs)
    assert t.columns[0] == "Method"
    assert {"CIFAR-10 SR", "CIFAR-10 CR", "CIFAR-10 Acc (%)", "CIFAR-10 ΔAcc (pp)", "PneumoniaMNIST SR"} <= \
        set(t.columns)
    by = {r["Method"]: r for r in t.rows}
    ltc = by["LTC (VGG-16)"]
    assert (ltc["CIFAR-10 SR"], ltc["CIFAR-10 CR"], ltc["CIFAR-10 Acc (%)"], ltc["CIFAR-10 ΔAcc (pp)"]) == \
        ("5.61", "1.71", "91.89", "-1.71")
    assert ltc["CIFAR-10 Acc before FT (%)"] == "40.00"
    assert ltc["PneumoniaMNIST SR"] == "/"  # not run on that dataset
    assert by["Tucker-VBMF (VGG-16)"]["CIFAR-10 SR"] == "3.01"
    mn = by["MobileNetV2"]
    assert (mn["CIFAR-10 SR"], mn["CIFAR-10 CR"], mn["CIFAR-10 Acc (%)"]) == ("/", "/", "66.54")
    assert "VGG-16" not in by  # the base model is the Δacc reference, not a row
    assert list(by)[0] == "MobileNetV2"  # lightweight nets first, as in the slides
    assert by["LTC (ResNet-34)"]["PneumoniaMNIST ΔAcc (pp)"] == "-0.79"


def test_sweep_table_sorted_by_lambda() -> None:
    lams = [1e-2, 1e-4, 1e-3]
    rs = [fake_result(lam=lam, sr=1 + 100 * lam, acc=0.9 - lam) for lam in lams]
    t = report.sweep_table(rs)
    assert [r["λ"] for r in t.rows] == ["0.0001", "0.001", "0.01"]
    assert [r["SR"] for r in t.rows] == ["1.01", "1.10", "2.00"]
    assert t.columns == ["λ", "SR", "CR", "MACs (G)", "Params (M)", "Acc (%)", "Acc before FT (%)"]
    assert t.rows[0]["Acc (%)"] == "89.99"
    # same method twice in table 1 -> rows told apart by λ
    names = [r["Model"] for r in report.table1(rs).rows]
    assert names[1:] == ["LTC [λ=0.0001]", "LTC [λ=0.001]", "LTC [λ=0.01]"]


def test_write_tables(tmp_path: Path, runs: list[dict[str, Any]]) -> None:
    tables = {"table1": report.table1(runs), "table4": report.table4(runs)}
    paths = report.write_tables(tables, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["table1.csv", "table1.md", "table4.csv", "table4.md"]
    assert (tmp_path / "out" / "table1.md").read_text() == tables["table1"].to_markdown()
    assert (tmp_path / "out" / "table4.csv").read_text() == tables["table4"].to_csv()
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_report_does_not_import_matplotlib() -> None:
    code = "import sys, ltc.report, ltc.plots; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# -------------------------------------------------------------------------------------------------- plots


def _check_figure(paths: list[Path]) -> None:
    import matplotlib.image

    assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
    png = next(p for p in paths if p.suffix == ".png")
    pdf = next(p for p in paths if p.suffix == ".pdf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert not list(png.parent.glob(".*tmp*"))


def test_plot_rank_distribution_mixed_ranks(tmp_path: Path) -> None:
    tucker = fake_result(lam=1e-3, dense=(0, 5))
    matrix = fake_result("lrc", lam=2e-4, matrix=True, dense=(0,))
    mixed = fake_result(lam=5e-3)
    mixed["ranks"]["features.3"] = 17  # an int rank against an [S, T] full rank
    mixed["full_ranks"]["features.40"] = 512  # a matrix layer
    mixed["ranks"]["features.40"] = 40
    mixed["ranks"]["features.37"] = None  # dense
    run_dir = write_run(tmp_path, "run_dir", fake_result(lam=0.0))

    class FakeResult:  # anything with to_dict() (ltc.api.Result) is accepted
        def to_dict(self) -> dict[str, Any]:
            return mixed

    paths = plots.plot_rank_distribution([tucker, matrix, FakeResult(), run_dir], tmp_path / "figs" / "ranks.png")
    _check_figure(paths)
    assert paths[0] == tmp_path / "figs" / "ranks.png" and paths[1] == tmp_path / "figs" / "ranks.pdf"
    with pytest.raises(ValueError, match="no compression runs"):
        plots.plot_rank_distribution([train_result()], tmp_path / "x")


def test_plot_lambda_sweep(tmp_path: Path) -> None:
    rs = [fake_result(lam=lam, sr=1 + 1e3 * lam, cr=1 + 5e2 * lam, acc=0.93 - 3 * lam) for lam in (1e-4, 1e-3, 1e-2)]
    rs.append(fake_result("lrc", lam=1e-3, matrix=True, sr=2.5, cr=1.4))  # a second series
    _check_figure(plots.plot_lambda_sweep(rs, tmp_path / "sweep"))
    with pytest.raises(ValueError, match="no compression runs"):
        plots.plot_lambda_sweep([train_result()], tmp_path / "z")


def test_lambda_axis_scale() -> None:
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    plots._set_lam_scale(ax, [1e-4, 1e-3])
    assert ax.get_xscale() == "log"
    plots._set_lam_scale(ax, [0.0, 1e-3])  # λ = 0 cannot sit on a log axis
    assert ax.get_xscale() == "symlog"


def test_plot_trajectories(tmp_path: Path) -> None:
    r = fake_result(steps=6, target_sr=5.0, dense=(0, 3))
    r["full_ranks"]["features.40"] = 512  # one matrix layer among the Tucker ones
    for h, lam in zip(r["history"], (1e-3, 2e-3, 4e-3, 3e-3, 3e-3, 3e-3), strict=True):
        h["lam"] = lam  # budget mode: λ moves
        h["ranks"]["features.40"] = 100
    for h, step in zip(r["history"], (0, 0, 1, 2, 3, 4), strict=True):
        h["step"] = step  # as the engine records it: the initial C step and the first LC step are both 0
    _check_figure(plots.plot_trajectories(r, tmp_path / "traj"))
    assert plots._edges([0.0, 1.0, 2.0]) == [-0.5, 0.5, 1.5, 2.5] and plots._edges([3.0]) == [2.5, 3.5]
    values, labels = plots._rank_rows(r, r["history"])
    assert labels[:2] == ["features.0 in", "features.0 out"] and labels[-1] == "features.40"
    assert math.isnan(values[0]) and math.isclose(values[-1], 100 / 512)
    with pytest.raises(ValueError, match="no LC history"):
        plots.plot_trajectories(fake_result("vbmf"), tmp_path / "none")


def test_plot_accuracy_vs_sr(tmp_path: Path, runs: list[dict[str, Any]]) -> None:
    _check_figure(plots.plot_accuracy_vs_sr(runs, tmp_path / "acc_sr"))
    with pytest.raises(ValueError, match="no compression runs"):
        plots.plot_accuracy_vs_sr([train_result()], tmp_path / "y")


def test_short_layer_name() -> None:
    assert plots.short_layer_name("layer3.1.conv2") == "L3.1.c2"
    assert plots.short_layer_name("layer4.0.downsample.0") == "L4.0.ds.0"
    assert len(plots.short_layer_name("a" * 40)) == 16
