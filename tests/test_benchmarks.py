"""The benchmark scripts' own logic that results depend on (``benchmarks/`` is not a package: imported by path)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import ltc
import ltc.runs
from ltc import models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
quality = pytest.importorskip("quality")
latency = pytest.importorskip("latency")
batchnorm = pytest.importorskip("batchnorm")

SUMMARY_RUN_KEYS = {"dataset", "model", "width", "method", "target_sr", "seed", "sr", "cr", "acc",
                    "acc_before_finetune", "epochs", "w_theta_final", "latency_speedup", "seconds", "model_path",
                    "lam", "ranks", "full_ranks"}


def test_quality_protocol_is_the_issue_s() -> None:
    """The default profile: 6 methods x SR 5 and 10 on 3 (dataset, model) pairs, 3 seeds on the headline, 1
    elsewhere (3 for the close pairs), every method at the same 15-epoch budget; the ablation first, seed by seed."""
    rows = quality.protocol_rows()
    main = [r for r in rows if r.group == "main"]
    assert {(r.dataset, r.model) for r in main} == {("cifar10", "resnet34_cifar"), ("cifar10", "vgg16_cifar"),
                                                     ("pneumoniamnist", "resnet34_cifar")}
    assert {r.method for r in main} == {"ltc", "lrc", "oneshot", "vbmf", "uniform", "prune"}
    head = [r for r in main if (r.dataset, r.model, r.target) == quality.HEADLINE]
    assert sorted({r.seed for r in head}) == [0, 1, 2] and len(head) == 18
    close = [r for r in main if r.seed > 0 and (r.dataset, r.model, r.target) != quality.HEADLINE]
    assert {(r.dataset, r.model, r.target, r.method, r.seed) for r in close} == {
        (*key, m, s) for key, ms in quality.CLOSE.items() for m in ms for s in (1, 2)}
    assert len(main) == 18 + 6 * 5 + len(close) and len({r.id for r in rows}) == len(rows)
    abl = [r for r in rows if r.group == "ablation"]
    first = [r for r in abl if r.seed == 0]
    assert rows[: len(first)] == first  # the ablation's seed 0 decides the defaults: it runs first
    assert rows[len(first): len(first) + 18] == head  # then the headline
    assert rows[-(len(abl) - len(first)):] == [r for r in abl if r.seed > 0]  # the other seeds last
    assert quality.EPOCHS == 15


def _base(tmp_path: Path) -> ltc.runs.LoadedModel:
    """A stand-in base run (small_cnn on digits) for building row configs."""
    return ltc.runs.LoadedModel(models.create("small_cnn", num_classes=10, in_channels=1), path=tmp_path / "m.pt",
                                run_dir=None, data={"source": "digits"}, result={}, meta={})


def _settings(compress: dict) -> ltc.CompressConfig:
    """A config's ``compress`` section as the library validates it (unset keys dropped)."""
    fields = ltc.CompressConfig.__dataclass_fields__
    return ltc.CompressConfig(**{k: v for k, v in compress.items() if k in fields and v is not None})


def test_speed_pair_asks_one_row_for_a_measured_speed_up_and_the_other_for_an_sr(tmp_path: Path) -> None:
    """The latency-cost row's config is budget mode on measured latency (no MAC target beside it, which the settings
    would refuse); the MAC-cost row is the headline's LTC at its SR. Both are named by what they ask for."""
    base = _base(tmp_path)
    speed = [r for r in quality.protocol_rows() if r.group == "speed"]
    lat, mac = speed
    assert lat.id == f"cifar10/resnet34_cifar/ltc-latency/x{quality.SPEED_TARGET:g}/seed0"
    assert mac.id == f"cifar10/resnet34_cifar/ltc-macs/sr{quality.SPEED_MAC_SR:g}/seed0"
    c = quality.row_config(lat, 15, base)["compress"]
    assert (c["cost"], c["target_speedup"], c["target_sr"], c["epochs"]) == ("latency", quality.SPEED_TARGET, None, 15)
    _settings(c)  # the settings accept it
    m = quality.row_config(mac, 15, base)["compress"]
    assert (m["target_sr"], m.get("target_speedup")) == (quality.SPEED_MAC_SR, None) and m["cost"] in (None, "macs")


def test_rows_with_equal_settings_share_a_run_folder(tmp_path: Path) -> None:
    """A main row whose resolved settings equal an ablation row's reuses its run (the folder hashes the settings),
    and any difference in a setting gives another folder."""
    base = _base(tmp_path)
    a = quality.Row("digits", "small_cnn", "ltc", 2.0, 0, "ablation", "x", {"kd_weight": 0.0})
    b = quality.Row("digits", "small_cnn", "ltc", 2.0, 0)
    c = quality.Row("digits", "small_cnn", "ltc", 2.0, 0, "ablation", "y", {"kd_weight": 0.5})
    fa, fb, fc = (r.folder(tmp_path, quality.row_config(r, 4, base)) for r in (a, b, c))
    default_kd = ltc.CompressConfig.default("kd_weight")
    assert (fa == fb) == (default_kd == 0.0)
    assert fc != fa and (fc == fb) == (default_kd == 0.5)


def test_the_ablation_row_named_the_default_is_what_the_main_ltc_rows_run(tmp_path: Path) -> None:
    """``quality.DEFAULTS`` spells out the library's defaults: its headline row shares the main LTC row's folder, and
    the rows it superseded (``COSINE``, ``CURRENT``) do not."""
    base = _base(tmp_path)
    main = quality.Row("cifar10", "resnet34_cifar", "ltc", 10.0, 0)
    rows = {name: quality.Row("cifar10", "resnet34_cifar", m, 10.0, 0, "ablation", name, over)
            for name, m, over in quality.ABLATION}
    default = [name for name, _m, over in quality.ABLATION if over is quality.DEFAULTS]
    assert len(default) == 1

    def folder(row):
        return row.folder(tmp_path, quality.row_config(row, 15, base))

    assert folder(rows[default[0]]) == folder(main)
    others = {folder(r) for name, r in rows.items() if name != default[0] and r.method == "ltc"}
    assert folder(main) not in others


def test_a_scaled_budget_keeps_the_lc_share_and_plans_as_stated(tmp_path: Path) -> None:
    """--budget-scale K: every method gets K x 15 epochs; the LC methods' L steps K epochs each (a fifth of an epoch
    stays a fraction), so the epoch plan splits K x (LC, fine-tuning) of the 15-epoch protocol; others untouched."""
    base = _base(tmp_path)
    ltc_row = quality.Row("cifar10", "resnet34_cifar", "ltc", 10.0, 0)
    short = quality.Row("cifar10", "resnet34_cifar", "ltc", 10.0, 0, "ablation", "s", {"epochs_per_step": 0.2})
    one = quality.Row("cifar10", "resnet34_cifar", "oneshot", 10.0, 0)

    def plan(row, scale):
        c = quality.row_config(row, 15 * scale, base, scale)["compress"]
        return c, _settings(c).plan()

    for scale in (1, 2, 3):
        c, p = plan(ltc_row, scale)
        assert c["epochs"] == 15 * scale and p.lc_epochs == 5 * scale and p.finetune == 10 * scale
        c, p = plan(short, scale)
        assert c["epochs_per_step"] == pytest.approx(0.2 * scale)
        c, p = plan(one, scale)
        assert c["epochs"] == 15 * scale and (p.lc_steps, p.finetune) == (0, 15 * scale)
    with pytest.raises(SystemExit):
        quality.main(["--budget-scale", "0", "--list"])


@pytest.mark.parametrize("epochs, per_step, steps", [(2, None, 5), (4, None, 15), (2, 1, 1), (4, 1, 3), (15, 0.5, 25)])
def test_a_short_budget_takes_as_many_default_steps_as_leave_an_epoch_to_finetune(tmp_path: Path, epochs: int,
                                                                                per_step, steps: int) -> None:
    """Without steps in its overrides a row takes the library's default steps, cut to what fits in the budget less
    one fine-tuning epoch at the row's epochs_per_step (the default fifth of an epoch, or the override)."""
    assert ltc.CompressConfig.default("steps") >= 25  # else the cases below do not cut
    over = {} if per_step is None else {"epochs_per_step": per_step}
    row = quality.Row("cifar10", "resnet34_cifar", "ltc", 10.0, 0, "ablation", "r", over)
    c = quality.row_config(row, epochs, _base(tmp_path))["compress"]
    if per_step is None:
        assert ltc.CompressConfig.default("epochs_per_step") == 0.2
    p = _settings(c).plan()
    assert c["steps"] == steps and p.finetune >= 1 and ltc.api.whole(p.lc_epochs) + p.finetune == epochs


@pytest.mark.slow
def test_quality_smoke_writes_the_summary_schema_and_resumes(tmp_path: Path, capsys) -> None:
    """One smoke row end to end: the summary has the issue's fixed schema, accuracies are fractions, the model file
    exists; a second run skips the finished row (nothing retrained)."""
    argv = ["--smoke", "--only", r"/oneshot/", "--out", str(tmp_path), "--threads", "1"]
    assert quality.main(argv) == 0
    doc = json.loads((tmp_path / "quality_smoke.json").read_text())
    assert set(doc) >= {"protocol", "bases", "runs"}
    assert {"command", "date", "machine", "epoch_budget", "wall_seconds"} <= set(doc["protocol"])
    (run,) = doc["runs"]
    assert SUMMARY_RUN_KEYS <= set(run) and run["method"] == "oneshot" and run["epochs"] == 2
    assert 0.0 <= run["acc"] <= 1.0 and 0.0 <= run["acc_before_finetune"] <= 1.0 and run["w_theta_final"] is None
    assert Path(run["model_path"]).is_file()
    assert {"dataset", "model", "width", "train_images", "val_images", "epochs", "val_acc", "val_acc_last10"} <= set(
        doc["bases"][0])
    md = (tmp_path / "quality_smoke.md").read_text()
    assert "Tucker one-shot" in md and "| digits | small_cnn |" in md
    capsys.readouterr()
    assert quality.main(argv) == 0
    assert "=== digits/small_cnn/oneshot" not in capsys.readouterr().out  # finished rows are skipped
    assert json.loads((tmp_path / "quality_smoke.json").read_text())["runs"] == doc["runs"]
    # --redo visits the finished row again; its run folder (same settings) is complete, so nothing is retrained
    assert quality.main([*argv, "--redo", "/oneshot/"]) == 0
    out = capsys.readouterr().out
    assert "=== digits/small_cnn/oneshot" in out and "is already complete; skipping" in out
    assert json.loads((tmp_path / "quality_smoke.json").read_text())["runs"] == doc["runs"]
    # --remeasure: the saved model timed against its base again, the markdown says so
    assert quality.main([*argv, "--remeasure"]) == 0
    again = json.loads((tmp_path / "quality_smoke.json").read_text())
    assert again["runs"][0]["latency_speedup_quiet"] > 0 and again["protocol"]["remeasured"]["repeats"] == 100
    assert "re-timed on a quiet machine" in (tmp_path / "quality_smoke.md").read_text()


def test_decaying_spectrum_gives_the_channel_unfoldings_a_power_law() -> None:
    """The random full-size weights the latency benchmark times get singular values ~ k^-alpha on both channel
    unfoldings (times a random core's), so a C step sees structure to allocate by; norms are kept."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(32, 48, 3))
    before = net[0].weight.norm().item()
    latency.decaying_spectrum(net, alpha=1.0)
    w = net[0].weight.detach()
    assert w.norm().item() == pytest.approx(before, rel=1e-5)
    for mode in (0, 1):
        sv = torch.linalg.svdvals(ltc.unfold(w, mode))
        assert sv[0] / sv[-1] > 10  # a random Gaussian 48 x 288 unfolding has a ratio near 1.5
        assert bool((sv[:-1] >= sv[1:]).all())


def test_latency_markdown_reports_refusals_and_failures() -> None:
    doc = {"protocol": {"command": "x", "date": "d", "machine": {"cpu": "c", "cpu_count": 2, "torch": "t"},
                        "threads": 2, "wall_seconds": 60.0, "onnxruntime": "1"},
           "cases": [{"model": "m", "runtime": "eager", "batch": 1, "table": {"measured_ops": 3, "build_seconds": 1.0,
                                                                               "model_ms": 1.0},
                      "rows": [{"target": 5.0, "refused": "target speed-up 5 is out of reach: ... reaches 1.4"}]},
                     {"model": "n", "runtime": "onnxruntime", "batch": 1, "error": "RuntimeError: boom"}]}
    md = latency.markdown(doc)
    assert "refused: target speed-up 5 is out of reach" in md and "failed: RuntimeError: boom" in md
    assert "Runs per timing" not in md  # cases from before the runs were recorded claim nothing


def test_latency_benchmark_times_each_runtime_with_the_library_default_runs(tmp_path, monkeypatch) -> None:
    """Without --repeats each case takes the library's runs per timing for its runtime (eager-nhwc is eager), as
    meet_speedup does; --repeats overrides every runtime; the markdown states what each case took."""
    asked: list[tuple[str, int]] = []

    def fake(name, runtime, batch, threads, targets, repeats, say, retime_repeats=50):
        asked.append((runtime, repeats))
        return {"model": name, "runtime": runtime, "batch": batch, "repeats": repeats, "rows": [],
                "table": {"measured_ops": 0, "build_seconds": 0.0, "model_ms": 1.0}}

    monkeypatch.setattr(latency, "run_case", fake)
    argv = ["--models", "small_cnn", "--runtimes", "eager", "eager-nhwc", "onnxruntime", "--cifar-batch", "0",
            "--out", str(tmp_path)]
    assert latency.main(argv) == 0
    assert asked == [("eager", 20), ("eager-nhwc", 20), ("onnxruntime", 100)]
    md = (tmp_path / "latency.md").read_text()
    assert "Runs per timing in the loop and the MAC-cost rows: eager 20, eager-nhwc 20, onnxruntime 100." in md
    asked.clear()
    assert latency.main([*argv, "--repeats", "7", "--name", "again"]) == 0
    assert asked == [("eager", 7), ("eager-nhwc", 7), ("onnxruntime", 7)]


def test_quality_summary_keeps_every_command_and_the_metric_distance() -> None:
    """A summary written before the command list existed keeps its one command first; the metric-space distance
    falls back to the weight-space one for metric='weight' and is absent for one-shot methods."""
    old = {"command": "python benchmarks/quality.py --only a", "date": "d0", "commit": "c0"}
    assert quality._commands(old) == [{"command": old["command"], "date": "d0", "commit": "c0"}]
    assert quality._commands({}) == []
    later = {**old, "commands": [{"command": "x"}, {"command": "y"}]}
    assert [c["command"] for c in quality._commands(later)] == ["x", "y"]

    class R:
        def __init__(self, hist: list[dict], w: float | None) -> None:
            self.history, self.w_theta_final = hist, w

    assert quality.metric_distance(R([{"distance": 0.3, "distance_metric": 0.1}], 0.3)) == 0.1
    assert quality.metric_distance(R([{"distance": 0.3, "distance_metric": None}], 0.3)) == 0.3
    assert quality.metric_distance(R([], None)) is None


def test_quality_rank_figure_comes_from_the_records_and_names_what_it_leaves_out(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """The headline figure is drawn from the ranks kept in the summary, not from run folders; a record without ranks
    whose folder is gone is left out and named, and rows that are not the headline's seed-0 main rows are ignored."""
    monkeypatch.setattr(quality, "HEADLINE", ("digits", "small_cnn", 2.0))
    head = {"dataset": "digits", "model": "small_cnn", "target_sr": 2.0, "group": "main", "seed": 0}
    ltc_rec = {**head, "method": "ltc", "lam": 0.5, "sr": 2.0, "cr": 2.5, "model_path": str(tmp_path / "gone/model.pt"),
               "ranks": {"conv1": [2, 3], "fc": None}, "full_ranks": {"conv1": [8, 16], "fc": None}}
    old_rec = {**head, "method": "oneshot", "sr": 2.0, "cr": 2.4, "model_path": str(tmp_path / "gone/model.pt")}
    seed1 = {**ltc_rec, "seed": 1, "method": "uniform"}
    figs, missing = quality.headline_figure({"runs": [ltc_rec, old_rec, seed1]}, tmp_path / "ranks")
    assert missing == ["oneshot"]
    assert [Path(f).name for f in figs] == ["ranks.png"] and (tmp_path / "ranks.png").stat().st_size > 0
    assert quality.headline_figure({"runs": [old_rec]}, tmp_path / "none") == ([], ["oneshot"])


def test_quality_paired_line_pairs_by_seed_and_skips_unshared_seeds() -> None:
    by = {"ltc": [{"seed": 0, "acc": 0.75}, {"seed": 1, "acc": 0.78}, {"seed": 2, "acc": 0.70}],
          "oneshot": [{"seed": 1, "acc": 0.77}, {"seed": 0, "acc": 0.76}],  # seeds out of order, seed 2 missing
          "prune": [{"seed": 3, "acc": 0.5}]}  # no shared seed: left out
    line = quality.paired_line(by, "ltc")
    assert line == "LTC minus each method, paired by seed (points): Tucker one-shot +0.00 ± 1.41 (2 seeds)."
    assert quality.paired_line({"ltc": by["ltc"]}, "ltc") == ""


def test_quality_variants_run_on_three_seeds_after_the_close_pairs_and_differ_from_the_defaults_in_one_setting(
        tmp_path: Path) -> None:
    """A variant row (``VARIANTS``) runs seeds 0-2 (0 for one that only explains a choice) after the close pairs'
    seeds and before the ablation's other seeds; its resolved settings are the main LTC row's with its overrides,
    nothing else."""
    base = _base(tmp_path)
    rows = quality.protocol_rows()
    var = [r for r in rows if r.group == "variant"]
    assert [(r.variant, r.seed) for r in var] == [(v[3], s) for v in quality.VARIANTS for s in (0, 1, 2)
                                                  if s == 0 or v[3] not in quality.SEED0_ONLY]
    assert {r.variant for r in var if r.seed == 2} == {v[3] for v in quality.VARIANTS} - quality.SEED0_ONLY
    first = rows.index(var[0])
    assert rows[first: first + len(var)] == var
    assert all(r.group == "main" and r.seed > 0 for r in rows[first - 4: first])  # the close pairs' seeds
    assert all(r.group == "ablation" and r.seed > 0 for r in rows[first + len(var):])
    for r in var:
        main = quality.Row(r.dataset, r.model, r.method, r.target, r.seed)
        mine, theirs = (quality.row_config(x, 15, base)["compress"] for x in (r, main))
        assert {k for k in mine if mine[k] != theirs.get(k)} == set(r.overrides)
        assert r.folder(tmp_path, {"compress": mine}) != main.folder(tmp_path, {"compress": theirs})


def test_quality_summary_puts_a_variant_in_its_own_table_paired_with_the_default_ltc_rows() -> None:
    """The variant's table follows the setting's Methods table and its paired line compares with that table's LTC
    rows, seed by seed."""
    proto = {"command": "c", "date": "d", "commit": "x", "epoch_budget": 15, "wall_seconds": 60.0,
             "machine": {"cpu": "cpu", "cpu_count": 2, "torch": "t"}}
    key = {"dataset": "cifar10", "model": "vgg16_cifar", "target_sr": 10.0, "sr": 10.0, "cr": 1.7,
           "acc_before_finetune": 0.4, "latency_speedup": 1.2, "w_theta_final": 0.001, "w_theta_final_metric": 0.0,
           "epochs": 15, "seconds": 600.0}
    runs = [{**key, "group": "main", "variant": None, "method": "ltc", "seed": s, "acc": a}
            for s, a in enumerate((0.62, 0.61, 0.63))]
    runs += [{**key, "group": "main", "variant": None, "method": "uniform", "seed": 0, "acc": 0.63}]
    runs += [{**key, "group": "variant", "variant": "ltc+gradient", "method": "ltc", "seed": s, "acc": a}
             for s, a in enumerate((0.645, 0.64))]
    md = quality.markdown({"protocol": proto, "bases": [], "runs": runs})
    methods = md.index("## Methods: cifar10 / vgg16_cifar / target SR 10")
    variant = md.index("## One change to LTC's defaults: cifar10 / vgg16_cifar / target SR 10")
    assert methods < variant
    table = md[variant:]
    assert "| ltc+gradient | 2 | 64.25 ± 0.35 | s0 64.50 / s1 64.00 |" in table
    assert "LTC minus each variant, paired by seed (points): ltc+gradient -2.75 ± 0.35 (2 seeds)." in table
    assert "Tucker uniform" not in table


def test_quality_records_a_target_the_method_cannot_reach_and_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    """A row whose target is beyond the method's reach (here SR 1000 on small_cnn) is recorded as refused with the
    engine's message, the next row still runs, and a rerun skips it."""
    rows = [quality.Row("digits", "small_cnn", "oneshot", 1000.0, 0), quality.Row("digits", "small_cnn", "oneshot",
                                                                                  2.0, 0)]
    monkeypatch.setattr(quality, "smoke_rows", lambda: rows)
    argv = ["--smoke", "--out", str(tmp_path), "--threads", "1"]
    assert quality.main(argv) == 0
    doc = json.loads((tmp_path / "quality_smoke.json").read_text())
    (ref,) = doc["refused"]
    assert ref["id"] == "digits/small_cnn/oneshot/sr1000/seed0" and "target SR 1000 is out of reach" in ref["message"]
    assert [r["id"] for r in doc["runs"]] == ["digits/small_cnn/oneshot/sr2/seed0"]
    assert "| digits/small_cnn/oneshot/sr1000/seed0 | target SR 1000 is out of reach" in (
        tmp_path / "quality_smoke.md").read_text()
    capsys.readouterr()
    assert quality.main([*argv, "--list"]) == 0
    assert "refused  digits/small_cnn/oneshot/sr1000/seed0" in capsys.readouterr().out
    assert quality.main(argv) == 0
    assert "=== digits/small_cnn/oneshot/sr1000" not in capsys.readouterr().out


def test_batchnorm_benchmark_measures_each_source_on_a_copy() -> None:
    """Each way of getting the statistics is measured on a copy (the model keeps its own), 'calibration' equals a
    re-estimation by hand on the calibration loader, and the markdown reports the difference of the two sources."""
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    from ltc.batchnorm import recalibrate_batchnorm
    from ltc.train import evaluate

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 16, 16, generator=g), torch.arange(96) % 4
    train = DataLoader(TensorDataset(x + 1.0, y), batch_size=8)  # other statistics than the calibration images
    calib = DataLoader(TensorDataset(x, y), batch_size=16)
    val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    model = models.create("small_cnn", num_classes=4, in_channels=1, width=0.25).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = batchnorm.accuracies(model, train, val, calib)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert acc["stored"] == evaluate(model, val).acc
    assert acc["calibration"] == evaluate(recalibrate_batchnorm(copy.deepcopy(model), calib), val).acc
    doc = {"command": "c", "date": "d", "machine": {"cpu": "cpu", "cpu_count": 2, "torch": "t"}, "commit": "x",
           "rows": [{"model": "m", "network": "base", "acc": {"stored": 0.5, "calibration": 0.25, "train16": 0.3,
                                                            "train": 0.75}}]}
    assert "| m | base | 50.00 | 25.00 | 30.00 | 75.00 | +50.00 |" in batchnorm.markdown(doc)


def test_base_record_names_the_commit_that_trained_a_base_here(tmp_path: Path) -> None:
    """A base whose result.json says what wrote it (``written_by``) carries that into the summary; one from before
    the field (``written_by`` empty) gets no invented record unless a provenance file stands beside it."""
    _common = pytest.importorskip("_common")
    from ltc.results import RunResult

    folder = tmp_path / "base"
    folder.mkdir()
    res = RunResult(kind="train", model="small_cnn", dataset="digits", acc=0.5, macs=10, params=5, epochs=2,
                    history=[{"val_acc": 0.25}, {"val_acc": 0.5}], data={"sizes": {"train": 8, "val": 4}})
    res.write(folder / "result.json")
    made = json.loads((folder / "result.json").read_text())["written_by"]
    rec = _common.base_record(folder, "digits", 0.5)
    assert rec["trained"] == {"commit": made["commit"], "date": made["date"], "ltc": made["ltc"]}
    assert rec["val_acc_last10"] == [0.25, 0.5]
    (folder / _common.PROVENANCE).write_text(json.dumps({"commit": "abc1234", "date": "2026-12-07 19:06 UTC"}))
    assert _common.base_record(folder, "digits", 0.5)["trained"]["date"] == made["date"]  # the record's own stamp wins
    (folder / _common.PROVENANCE).unlink()
    old = {k: v for k, v in res.to_dict().items() if k != "written_by"}  # a record from before the field
    (folder / "result.json").write_text(json.dumps(old))
    assert "trained" not in _common.base_record(folder, "digits", 0.5)
    (folder / _common.PROVENANCE).write_text(json.dumps({"commit": "abc1234", "date": "2026-12-07 19:06 UTC"}))
    rec = _common.base_record(folder, "digits", 0.5)
    assert rec["trained"] == {"commit": "abc1234", "date": "2026-12-07 19:06 UTC", "ltc": None}
    doc = json.loads((_common.RESULTS / "quality_summary.json").read_text())
    assert "| here, 2026-12-07 19:06 UTC, commit abc1234 |" in quality.markdown({**doc, "bases": [rec]})
    wheel = {**rec, "trained": {"commit": None, "date": "d", "ltc": "0.2.0"}}  # written by an installed ltc
    assert "| here, d, ltc 0.2.0 (no checkout) |" in quality.markdown({**doc, "bases": [wheel]})
    shared = {**rec, "path": "../shared/bases/x"}  # a shared base: its README says how it was made
    assert "| `../shared/bases` (its README) |" in quality.markdown({**doc, "bases": [shared]})
