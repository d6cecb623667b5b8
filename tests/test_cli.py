"""The ``ltc`` command, run in-process through ``ltc.cli.main`` (and once as ``python -m ltc``)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import ltc
from ltc import config as cfgmod
from ltc.cli import main
from ltc.cost import profile
from ltc.latency import compare_latency, measure_latency
from ltc.methods.prune import INSTALL_HINT
from ltc.results import RunResult
from ltc.train import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
QUIET = ["--no-progress"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def library_error(**config: object) -> str:
    """The message ``ltc.CompressConfig(**config)`` refuses ``config`` with."""
    with pytest.raises(ValueError) as info:
        ltc.CompressConfig(**config)
    return str(info.value)


def log_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def same_weights(a: torch.nn.Module | dict[str, torch.Tensor], b: torch.nn.Module) -> bool:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------ profile


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["resnet34", "--input-size", "224", "--num-classes", "1000"], ["3.66 G MACs", "21.80 M params", "3.68 G"]),
        (["resnet34_cifar", "--input-size", "32", "--num-classes", "1000"], ["0.29 G", "21.80 M params"]),
        (["vgg16_cifar", "--input-size", "32", "--num-classes", "10"], ["0.33 G", "33.65 M params", "352.41 M"]),
        (["vgg16", "--input-size", "224", "--num-classes", "2"], ["15.47 G MACs", "134.27 M params", "15.65 G"]),
    ],
)
def test_profile_matches_spec_rows(argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["profile", *argv], capsys)
    assert code == 0
    for text in expected:
        assert text in out
    assert "MACs per sample" in out and "slides' \"FLOPs\"" in out


def test_profile_of_a_user_callable(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n"
        "def build(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(8, num_classes))\n"
    )
    # conv: 8*8 positions * 3*8*9 = 13,824 MACs; linear 8*4 = 32 -> 13,856 MACs; params 216 + 36 = 252
    code, out, _ = run(["profile", f"{tmp_path / 'mynet.py'}:build", "--input-size", "8", "--num-classes", "4"], capsys)
    assert code == 0
    assert "13.86 K MACs per sample" in out and "252 params" in out
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = run(["profile", "mynet:build", "--input-size", "8"], capsys)
    assert code == 0 and "13.90 K MACs per sample" in out  # 10-class head: 13,824 + 80
    code, _, err = run(["profile", "mynet:nothing"], capsys)
    assert code == 2 and err.startswith("ltc: error:") and "nothing" in err


def test_profile_unknown_model_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["profile", "resnet35"], capsys)
    assert code == 2 and "ltc: error:" in err and "Did you mean" in err


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_config_loads_and_validates(path: Path) -> None:
    cfg = cfgmod.load_config(path)
    assert set(cfg) == set(cfgmod.SECTIONS)
    for _, sub in cfgmod.variants(cfg):
        cfgmod.compress_config(sub)
    raw = yaml.safe_load(path.read_text())
    if "train" in raw:  # trainable configs name a zoo model
        assert cfg["model"]["name"]
    if "variants" in raw or "sweep" in raw:
        assert cfg["run"]["base"]


def test_config_files_cover_the_slides_tables() -> None:
    names = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    for stem in ("cifar10_resnet34", "cifar10_vgg16", "chestxray_resnet34", "chestxray_vgg16"):
        assert f"{stem}.yaml" in names and f"cpu/{stem}.yaml" in names
        assert f"table4/{stem}.yaml" in names
    for extra in ("layers_resnet34_chestxray.yaml", "layers_vgg16_cifar10.yaml", "sweep_lambda.yaml"):
        assert extra in names and f"cpu/{extra}" in names
    layers = cfgmod.variants(cfgmod.load_config(REPO / "configs/layers_resnet34_chestxray.yaml"))
    labels = [c["run"]["label"] for _, c in layers]
    assert labels == ["Conv1", "Layer1", "Layer2", "Layer3", "Layer4", "Layer1 and Layer4", "Layer1 to Layer4",
                      "Conv1 to Layer4"]
    vgg = cfgmod.variants(cfgmod.load_config(REPO / "configs/layers_vgg16_cifar10.yaml"))
    assert [n for n, _ in vgg][-2:] == ["conv2-13", "convall"] and len(vgg) == 15


def test_set_and_flag_overrides(tmp_path: Path) -> None:
    path = REPO / "configs/cifar10_resnet34.yaml"
    cfg = cfgmod.load_config(path, {"train": {"epochs": 2}},
                             ["train.lr=1e-3", "compress.include=[layer1.*, conv1]", "data.batch_size=32"])
    assert cfg["train"]["epochs"] == 2 and cfg["train"]["lr"] == pytest.approx(1e-3)
    assert cfg["compress"]["include"] == ["layer1.*", "conv1"] and cfg["data"]["batch_size"] == 32
    assert cfg["run"]["name"] == "cifar10_resnet34"
    # λ replaces the file's target SR (and vice versa) instead of clashing with it
    cfg = cfgmod.load_config(path, sets=["compress.lam=0.5"])
    assert cfg["compress"]["lam"] == 0.5 and cfg["compress"]["target_sr"] is None
    # '1e-4' is a string to YAML 1.1; it still becomes a number
    cfg = cfgmod.load_config(path, sets=["compress.mu0=1e-4"])
    assert cfg["compress"]["mu0"] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="train.epochs must be an integer"):
        cfgmod.load_config(path, sets=["train.epochs=many"])
    with pytest.raises(ValueError, match="section.key=value"):
        cfgmod.load_config(path, sets=["epochs=3"])


def test_unknown_config_keys_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: small_cnn}\ntrain: {epoch: 3}\n")
    with pytest.raises(ValueError, match=r"unknown train key 'epoch'\. Did you mean 'epochs'\?.*Valid"):
        cfgmod.load_config(bad)
    code, _, err = run(["train", "--config", str(bad), *QUIET], capsys)
    assert code == 2 and err.startswith("ltc: error:") and "'epochs'" in err and "Traceback" not in err
    bad.write_text("trian: {epochs: 3}\n")
    with pytest.raises(ValueError, match="unknown section 'trian'.*Did you mean 'train'"):
        cfgmod.load_config(bad)
    bad.write_text("variants:\n  - {name: a, compress: {metod: ltc}}\n")
    with pytest.raises(ValueError, match="variants\\[0\\].*metod"):
        cfgmod.load_config(bad)
    with pytest.raises(ValueError, match="unknown method"):
        cfgmod.load_config(None, {"compress": {"method": "tucker"}})


# ------------------------------------------------------------------------------------------------ errors


def test_bad_data_path_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--model", "small_cnn", "--data", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "r"),
            *QUIET]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("ltc: error:") and "missing.zip" in err and "Traceback" not in err
    from ltc.data import DataError

    with pytest.raises(DataError):
        main(["--debug", *argv])


def test_no_command_and_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert run([], capsys)[0] == 2
    assert run(["train", "--epochs", "x"], capsys)[0] == 2
    code, out, _ = run(["compress", "--help"], capsys)
    assert code == 0 and "MACs" in out and "SR" in out and "--layers" in out


def test_python_dash_m_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "ltc", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("profile", "train", "compress", "finetune", "eval", "sweep", "report", "plot", "export", "demo"):
        assert cmd in proc.stdout
    assert "MACs" in proc.stdout


# ------------------------------------------------------------------------------------------- end to end


BASE_ARGS = ["--model", "small_cnn", "--width", "0.25", "--data", "digits", "--epochs", "2", "--batch-size", "64",
             "--lr", "0.05", *QUIET]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base run and an LTC compression of it, on the bundled digits (a few seconds on a CPU)."""
    d = tmp_path_factory.mktemp("runs")
    assert main(["train", *BASE_ARGS, "--out", str(d / "base")]) == 0
    comp = ["compress", "--base", str(d / "base"), "--target-sr", "2", "--steps", "2", "--epochs-per-step", "1",
            "--finetune-epochs", "1", "--batch-size", "64", "--out", str(d / "ltc"), *QUIET]
    assert main(comp) == 0
    return d


def test_train_writes_a_run(runs_dir: Path) -> None:
    base = runs_dir / "base"
    for f in ("model.pt", "result.json", "log.csv", "checkpoint.pt", "run.json", "config.yaml"):
        assert (base / f).is_file(), f
    res = RunResult.read(base / "result.json")
    assert res.kind == "train" and res.model == "small_cnn" and res.dataset == "digits" and res.epochs == 2
    assert res.data["image_size"] == 16 and res.data["channels"] == 1
    model = ltc.load(base / "model.pt")
    prof = profile(model, torch.zeros(1, 1, 16, 16))
    assert (res.macs, res.params) == (prof.macs, prof.params)  # the saved model's own profile
    rows = log_rows(base)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert res.acc == pytest.approx(float(rows[-1]["val_acc"]))  # the last epoch's validation accuracy
    assert len(res.history) == 2
    ckpt = read_checkpoint(base / "checkpoint.pt", writer="ltc.fit")
    assert (ckpt["stage"], ckpt["epoch"], ckpt["epochs"]) == ("train", 2, 2)
    assert same_weights(ckpt["model"], model)  # the model file holds the last checkpoint's weights
    with pytest.raises(ValueError, match="not by ltc compress"):
        read_checkpoint(base / "checkpoint.pt", writer="ltc.compress")


def test_train_refuses_to_clobber_and_resumes(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = runs_dir / "base"
    argv = ["train", *BASE_ARGS, "--out", str(base)]
    code, _, err = run(argv, capsys)
    assert code == 2 and "--resume" in err
    before = ltc.load(base / "model.pt")
    log_before, acc_before = (base / "log.csv").read_text(), RunResult.read(base / "result.json").acc
    code, out, _ = run([*argv, "--resume"], capsys)  # all epochs done: nothing to train, same result
    assert code == 0 and "val acc" in out
    assert same_weights(before, ltc.load(base / "model.pt"))
    assert (base / "log.csv").read_text() == log_before  # no epoch was trained again
    assert RunResult.read(base / "result.json").acc == acc_before


def test_interrupted_train_resumes_to_the_same_model(runs_dir: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import ltc.train

    out = runs_dir / "interrupted"
    argv = ["train", *BASE_ARGS, "--out", str(out)]
    real = ltc.train.prepare_loader_epoch

    def stop_at_second_epoch(loader: object, epoch: int, seed: object) -> None:
        if epoch == 1:
            raise KeyboardInterrupt
        real(loader, epoch, seed)

    monkeypatch.setattr(ltc.train, "prepare_loader_epoch", stop_at_second_epoch)
    code, _, err = run(argv, capsys)
    assert code == 130 and "--resume" in err
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and not (out / "model.pt").exists()
    monkeypatch.setattr(ltc.train, "prepare_loader_epoch", real)
    assert run(argv, capsys)[0] == 2  # a started run is not overwritten silently
    code, _, _ = run([*argv, "--resume"], capsys)
    assert code == 0
    # the same seed and settings as the uninterrupted base run: the very same weights and log
    assert same_weights(ltc.load(runs_dir / "base" / "model.pt"), ltc.load(out / "model.pt"))
    drop = ("seconds",)
    rows = [{k: v for k, v in r.items() if k not in drop} for r in log_rows(out)]
    assert rows == [{k: v for k, v in r.items() if k not in drop} for r in log_rows(runs_dir / "base")]


def test_compress_writes_a_run(runs_dir: Path) -> None:
    out = runs_dir / "ltc"
    for f in ("model.pt", "result.json", "log.csv", "checkpoint.pt", "ranks.png", "ranks.pdf", "trajectories.png"):
        assert (out / f).is_file(), f
    assert not (out / "compress.pt").exists()  # one checkpoint format: checkpoint.pt
    res = RunResult.read(out / "result.json")
    base = RunResult.read(runs_dir / "base" / "result.json")
    assert res.kind == "compress" and res.method == "ltc" and res.model == "small_cnn"
    assert res.dataset == "digits" and res.label == "ltc_sr2" and res.base_run == str(runs_dir / "base")
    assert res.sr == pytest.approx(2.0, rel=0.05)
    # the record agrees with the files: base profile and accuracy from the base run, compressed from model.pt
    assert (res.base["macs"], res.base["params"]) == (base.macs, base.params)
    assert res.base["acc"] == pytest.approx(base.acc)  # the same model on the same validation split
    model = ltc.load(out / "model.pt")
    prof = profile(model, torch.zeros(1, 1, 16, 16))
    assert (res.compressed["macs"], res.compressed["params"]) == (prof.macs, prof.params)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    tucker = {n: m for n, m in model.named_modules() if type(m).__name__ == "Tucker2Conv2d"}
    assert tucker and set(tucker) == {n for n, r in res.ranks.items() if r is not None}
    # the epoch plan: 2 LC steps of 1 epoch, then 1 fine-tuning epoch; log.csv has one row per epoch
    assert res.plan["lc_steps"] == 2 and res.plan["finetune"] + res.plan["lc_epochs"] == res.plan["total"] == 3
    rows = log_rows(out)
    assert len(rows) == len(res.log) == 3
    assert sum(r["phase"] == "lc" for r in rows) == res.plan["lc_epochs"]
    ckpt = read_checkpoint(out / "checkpoint.pt", writer="ltc.compress")
    assert ckpt["stage"] == "finetune" and ckpt["epoch"] == ckpt["epochs"] == res.plan["finetune"]
    assert same_weights(ckpt["model"], model)
    lat = res.latency["batch1"]
    assert lat["threads"] == 2 and lat["batch"] == 1 and lat["base_ms"] > 0 and lat["compressed_ms"] > 0


def test_eval_any_checkpoint(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["eval", str(runs_dir / "ltc"), *QUIET], capsys)
    assert code == 0 and "accuracy" in out and "MACs per sample" in out and "[val," in out
    code, out, _ = run(["eval", str(runs_dir / "base" / "checkpoint.pt"), "--split", "train", "--json", *QUIET],
                       capsys)
    assert code == 0
    res = json.loads(out)
    assert res["split"] == "train" and res["samples"] > 1000 and 0 <= res["acc"] <= 1
    code, _, err = run(["eval", str(runs_dir / "ltc"), "--data", "digits", "--split", "test", *QUIET], capsys)
    assert code == 2 and "no 'test' split" in err


def test_layers_glob_matching_nothing(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = runs_dir / "nomatch"
    code, _, err = run(["compress", "--base", str(runs_dir / "base"), "--target-sr", "2", "--layers", "layer9.*",
                        "--out", str(out), *QUIET], capsys)
    assert code == 2 and "layer9.*" in err and "matches no conv or linear layer" in err
    assert not out.exists()  # checked before anything was written


def test_compress_needs_lam_or_target(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = runs_dir / "x"
    code, _, err = run(["compress", "--base", str(runs_dir / "base"), "--out", str(out), *QUIET], capsys)
    assert code == 2 and err == f"ltc: error: {library_error(method='ltc')}\n"
    assert not out.exists()


@pytest.mark.parametrize(("flags", "config"), [
    (["--method", "vbmf", "--lam", "5"], {"method": "vbmf", "lam": 5.0}),
    (["--method", "prune", "--lam", "5"], {"method": "prune", "lam": 5.0}),
    (["--lam", "1", "--kd-weight", "1.5"], {"lam": 1.0, "kd_weight": 1.5}),
    (["--lam", "1", "--rank-multiple", "0"], {"lam": 1.0, "rank_multiple": 0}),
    (["--target-sr", "0.5"], {"target_sr": 0.5}),
    (["--lam", "1", "--mu-path", "pin", "--penalty-step", "gradient"],
     {"lam": 1.0, "mu_path": "pin", "penalty_step": "gradient"}),
    (["--method", "oneshot", "--lam", "1", "--epochs", "3", "--finetune-epochs", "2"],
     {"method": "oneshot", "lam": 1.0, "epochs": 3, "finetune_epochs": 2}),
])
def test_compress_refuses_what_compress_config_refuses(flags: list[str], config: dict[str, object], runs_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = runs_dir / "refused"
    code, _, err = run(["compress", "--base", str(runs_dir / "base"), *flags, "--out", str(out), *QUIET], capsys)
    message = library_error(**config)
    assert code == 2 and err.startswith("ltc: error:") and err.rstrip("\n").endswith(message), (err, message)
    assert "Traceback" not in err and not out.exists()


def test_oneshot_epochs_is_the_fine_tuning_budget(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = runs_dir / "oneshot3"
    code, _, _ = run(["compress", "--base", str(runs_dir / "base"), "--method", "oneshot", "--lam", "5",
                      "--epochs", "3", "--batch-size", "64", "--no-plots", "--out", str(out), *QUIET], capsys)
    assert code == 0
    res = RunResult.read(out / "result.json")
    rows = log_rows(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # exactly the budget, no LC epochs, nothing added
    assert res.plan["lc_epochs"] == 0 and res.plan["finetune"] == res.plan["total"] == 3
    assert len(res.history) == 1 and res.w_theta_final is None  # the one C step, no learning
    assert res.history[0]["ranks"] == res.ranks
    assert read_checkpoint(out / "checkpoint.pt", writer="ltc.compress")["epochs"] == 3


def test_new_compress_flags_reach_the_run(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = runs_dir / "flags"
    code, _, _ = run(["compress", "--base", str(runs_dir / "base"), "--method", "oneshot", "--lam", "2",
                      "--epochs", "0", "--rank-multiple", "4", "--metric", "data", "--kd-weight", "0.5",
                      "--kd-temperature", "2", "--no-plots", "--set", "run.latency_threads=1", "--set",
                      "run.latency_repeats=1", "--out", str(out), *QUIET], capsys)
    assert code == 0
    res = RunResult.read(out / "result.json")
    cc = res.compress_config
    assert (cc["rank_multiple"], cc["metric"], cc["kd_weight"], cc["kd_temperature"]) == (4, "data", 0.5, 2.0)
    chosen = {n: r for n, r in res.ranks.items() if r is not None}
    assert chosen
    for name, ranks in chosen.items():  # each rank a multiple of 4 unless it is the full size of its axis
        for r, full in zip(ranks, res.full_ranks[name], strict=True):
            assert r % 4 == 0 or r == full, (name, ranks, res.full_ranks[name])
    model = ltc.load(out / "model.pt")
    for name, m in model.named_modules():
        if type(m).__name__ == "Tucker2Conv2d":
            assert list(m.ranks) == res.ranks[name]


@pytest.mark.parametrize("kd_weight", [0.5, 0.0])
def test_kd_weight_flag_puts_a_teacher_in_the_training_loop_only_when_positive(
        kd_weight: float, runs_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """One fine-tuning epoch: with --kd-weight > 0 every training batch is distilled (distillation_loss with the
    flag's weight and temperature, against the frozen base in eval mode); with --kd-weight 0 no teacher reaches the
    loop and distillation_loss is never called."""
    import ltc.train

    epochs: list[dict[str, object]] = []
    kd_calls: list[tuple[float, float, bool]] = []
    real_epoch, real_kd = ltc.train.train_one_epoch, ltc.train.distillation_loss

    def spy_epoch(model, loader, *args, **kwargs):
        t = kwargs["teacher"]
        epochs.append({"batches": len(loader), "kd_weight": kwargs["kd_weight"],
                       "teacher": None if t is None else (t.training, any(p.requires_grad for p in t.parameters()))})
        return real_epoch(model, loader, *args, **kwargs)

    def spy_kd(student, teacher, target, *, weight, temperature, **kw):
        kd_calls.append((weight, temperature, teacher.requires_grad))
        return real_kd(student, teacher, target, weight=weight, temperature=temperature, **kw)

    monkeypatch.setattr(ltc.train, "train_one_epoch", spy_epoch)
    monkeypatch.setattr(ltc.train, "distillation_loss", spy_kd)
    out = runs_dir / f"kd{kd_weight:g}"
    code, _, _ = run(["compress", "--base", str(runs_dir / "base"), "--method", "oneshot", "--lam", "2",
                      "--epochs", "1", "--batch-size", "256", "--kd-weight", str(kd_weight), "--kd-temperature",
                      "2", "--no-plots", "--set", "run.latency_threads=1", "--set", "run.latency_repeats=1",
                      "--out", str(out), *QUIET], capsys)  # one quick timing at the end: this test is about training
    assert code == 0
    assert len(epochs) == 1 and epochs[0]["batches"] > 0 and epochs[0]["kd_weight"] == kd_weight
    if kd_weight > 0:
        assert epochs[0]["teacher"] == (False, False)  # eval mode, frozen
        assert kd_calls == [(kd_weight, 2.0, False)] * epochs[0]["batches"]  # type: ignore[operator]
    else:
        assert epochs[0]["teacher"] is None and kd_calls == []
    assert RunResult.read(out / "result.json").compress_config["kd_weight"] == kd_weight


def test_prune_method(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch_pruning")
    out = runs_dir / "prune"
    code, _, _ = run(["compress", "--base", str(runs_dir / "base"), "--method", "prune", "--target-sr", "2",
                      "--epochs", "1", "--batch-size", "64", "--no-plots", "--out", str(out), *QUIET], capsys)
    assert code == 0
    res = RunResult.read(out / "result.json")
    assert res.method == "prune" and 2.0 <= res.sr <= 2.0 * 1.03  # within the method's 3 % tolerance
    model = ltc.load(out / "model.pt")
    prof = profile(model, torch.zeros(1, 1, 16, 16))
    assert (res.compressed["macs"], res.compressed["params"]) == (prof.macs, prof.params)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Tucker2Conv2d" not in kinds and "Conv2d" in kinds  # plain, narrower convs
    base = ltc.load(runs_dir / "base" / "model.pt")
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    base_widths = [m.out_channels for m in base.modules() if isinstance(m, nn.Conv2d)]
    assert len(widths) == len(base_widths) and all(w <= b for w, b in zip(widths, base_widths, strict=True))
    assert sum(widths) < sum(base_widths)
    assert len(log_rows(out)) == 1


def test_prune_without_torch_pruning(runs_dir: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name.split(".")[0] == "torch_pruning" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    out = runs_dir / "prune_missing"
    code, _, err = run(["compress", "--base", str(runs_dir / "base"), "--method", "prune", "--target-sr", "2",
                        "--out", str(out), *QUIET], capsys)
    assert code == 2 and err.startswith("ltc: error:") and 'pip install -e ".[prune]"' in err and INSTALL_HINT in err
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(ImportError, match=r'pip install -e "\.\[prune\]"'):
        ltc.CompressConfig(method="prune", target_sr=2.0)


def test_layer_analysis_and_finetune(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(["compress", "--base", str(runs_dir / "base"), "--method", "oneshot", "--lam", "5",
                      "--layers", "features.3", "features.7", "--steps", "1", "--finetune-epochs", "0",
                      "--label", "Conv2-3", "--out", str(runs_dir / "layers_c23"), *QUIET], capsys)
    assert code == 0
    res = RunResult.read(runs_dir / "layers_c23" / "result.json")
    assert set(res.ranks) == {"features.3", "features.7"} and res.label == "Conv2-3"
    assert log_rows(runs_dir / "layers_c23") == []  # no epochs asked for, none run
    code, out, _ = run(["finetune", "--run", str(runs_dir / "layers_c23"), "--epochs", "1", *QUIET], capsys)
    assert code == 0 and "val acc" in out
    ft = RunResult.read(runs_dir / "layers_c23_ft" / "result.json")
    assert ft.label == "Conv2-3 +ft1" and ft.finetune["epochs"] == 1
    assert ft.finetune["acc_before"] == res.compressed["acc"]
    # distilled from the run's base, as ltc compress fine-tunes (compress.kd_weight's default)
    assert "distilled from" in out and Path(ft.finetune["teacher"]) == Path(res.base_run)
    assert ft.finetune["kd_weight"] == ltc.CompressConfig.default("kd_weight") > 0
    assert ft.ranks == res.ranks and ft.compressed["macs"] == res.compressed["macs"]  # ranks stay fixed
    before, after = (ltc.load(runs_dir / d / "model.pt") for d in ("layers_c23", "layers_c23_ft"))
    assert not same_weights(before, after)  # trained
    assert ft.compressed["acc"] == pytest.approx(ft.finetune["history"][-1]["val_acc"])
    # kd_weight 0: cross-entropy only, nothing named as teacher; a base that moved: said, and cross-entropy only
    code, out, _ = run(["finetune", "--run", str(runs_dir / "layers_c23"), "--epochs", "1", "--set",
                        "compress.kd_weight=0", "--out", str(runs_dir / "layers_c23_ce"), *QUIET], capsys)
    ce = RunResult.read(runs_dir / "layers_c23_ce" / "result.json")
    assert code == 0 and "distilled" not in out and ce.finetune["teacher"] is None and ce.finetune["kd_weight"] == 0
    moved = runs_dir / "layers_c23_moved"
    shutil.copytree(runs_dir / "layers_c23", moved)
    doc = json.loads((moved / "result.json").read_text())
    doc["base_run"] = str(runs_dir / "no_such_base")
    (moved / "result.json").write_text(json.dumps(doc))
    code, out, _ = run(["finetune", "--run", str(moved), "--epochs", "1", *QUIET], capsys)
    assert code == 0 and "no distillation: the run's base" in out and "no_such_base" in out
    assert RunResult.read(runs_dir / "layers_c23_moved_ft" / "result.json").finetune["teacher"] is None


def test_report_and_plot(runs_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rep = tmp_path / "rep"
    code, out, _ = run(["report", str(runs_dir / "base"), str(runs_dir / "ltc"), "--out", str(rep)], capsys)
    assert code == 0 and "Table 1" in out and "SmallCNN" in out and "LTC" in out
    assert (rep / "table1.md").is_file() and (rep / "table1.csv").is_file()
    code, out, _ = run(["report", str(runs_dir), "--compare", "--layers", "--out", str(rep)], capsys)
    assert code == 0 and "Table 4" in out and "Structural analysis" in out
    assert (rep / "table4.csv").is_file() and (rep / "accuracy_vs_sr.png").is_file()
    code, out, _ = run(["plot", str(runs_dir / "ltc"), str(runs_dir / "layers_c23"), "--out", str(tmp_path / "p")],
                       capsys)
    assert code == 0
    assert (tmp_path / "p" / "ltc-ranks.png").is_file() and (tmp_path / "p" / "ranks_all.pdf").is_file()
    code, out, _ = run(["report", str(runs_dir / "base"), str(rep), "--out", str(rep)], capsys)
    assert code == 0 and "1 runs" in out  # a folder without runs (the report itself) is skipped
    code, _, err = run(["report", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "ltc: error:" in err


def test_sweep(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = runs_dir / "sweep"
    code, stdout, _ = run(["sweep", "--base", str(runs_dir / "base"), "--lams", "0.5", "50", "--steps", "1",
                           "--finetune-epochs", "0", "--no-plots", "--set", "run.latency_repeats=5", "--out", str(out),
                           *QUIET], capsys)
    assert code == 0 and "λ sweep" in stdout
    assert (out / "lam_0.5" / "result.json").is_file() and (out / "lam_50" / "result.json").is_file()
    assert (out / "sweep.csv").is_file() and (out / "lambda_sweep.png").is_file() and (out / "ranks.pdf").is_file()
    assert not (out / "lam_0.5" / "ranks.png").exists()  # --no-plots: only the sweep's own figures
    srs = [json.loads((out / f"lam_{v}" / "result.json").read_text())["sr"] for v in ("0.5", "50")]
    assert srs[1] >= srs[0]  # larger λ, smaller network


def test_export(runs_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    code, out, _ = run(["export", str(runs_dir / "ltc"), "--onnx", str(tmp_path / "m.onnx"),
                        "--torchscript", str(tmp_path / "m.ts"), "--fold-bn"], capsys)
    assert code == 0 and "max |ONNX Runtime - PyTorch|" in out and "max |TorchScript - PyTorch|" in out
    assert (tmp_path / "m.onnx").stat().st_size > 0 and (tmp_path / "m.ts").stat().st_size > 0
    assert run(["export", str(runs_dir / "ltc")], capsys)[0] == 2


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    code, out, _ = run(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"], capsys)
    assert code == 0
    assert "| base small_cnn |" in out and "| LTC |" in out and "measured speed-up" in out and "[4/4]" in out
    assert torch.get_num_threads() == threads
    res = json.loads((tmp_path / "demo" / "result.json").read_text())
    assert res["sr"] == pytest.approx(4.0, rel=0.05) and res["label"] == "LTC"
    assert (tmp_path / "demo" / "model.pt").is_file() and (tmp_path / "demo" / "ranks.png").is_file()
    assert (tmp_path / "demo" / "base" / "result.json").is_file()


# ------------------------------------------------------------------------------------------------ latency


def test_latency_measurement_restores_state() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
    net.train()
    threads = torch.get_num_threads()
    st = measure_latency(net, torch.zeros(1, 3, 8, 8), threads=1, warmup=1, repeats=5)
    assert st.repeats == 5 and 0 < st.p10_ms <= st.median_ms <= st.p90_ms
    assert net.training and torch.get_num_threads() == threads
    small = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    res = compare_latency(net, small, torch.zeros(1, 3, 8, 8), threads=1, warmup=1, repeats=4)
    assert res["threads"] == 1 and res["batch"] == 1 and res["repeats"] == 4
    assert "sr" not in res
    assert net.training and torch.get_num_threads() == threads
    with pytest.raises(ValueError):
        measure_latency(net, torch.zeros(1, 3, 8, 8), repeats=0)


def test_compare_latency_reports_consistent_medians_and_times_both_models_alike() -> None:
    """What compare_latency returns is fixed by its inputs and its own arithmetic, whatever the machine's speed:
    the documented keys, the settings echoed, both models run exactly warmup + repeats times (interleaved, in eval
    mode), medians that are the full statistics' medians, and speedup = base_ms / compressed_ms."""
    big = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    tiny = nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(3, 1, 1), nn.Flatten())
    big.train()
    calls: dict[str, list[bool]] = {"base": [], "compressed": []}
    for name, net in (("base", big), ("compressed", tiny)):
        net.register_forward_hook(lambda m, i, o, name=name: calls[name].append(m.training))
    res = compare_latency(big, tiny, torch.zeros(1, 3, 16, 16), threads=1, warmup=2, repeats=7)
    assert set(res) == {"base_ms", "compressed_ms", "speedup", "base", "compressed", "batch", "threads", "device",
                        "repeats", "warmup", "fold_bn", "runtime", "memory_format"}
    assert (res["batch"], res["threads"], res["device"], res["repeats"], res["warmup"], res["fold_bn"],
            res["runtime"], res["memory_format"]) == (1, 1, "cpu", 7, 2, False, "eager", "contiguous")
    assert calls == {"base": [False] * 9, "compressed": [False] * 9}  # every run timed in eval mode
    assert big.training and tiny.training  # the train/eval flags are put back
    for side in ("base", "compressed"):
        st = res[side]
        assert set(st) == {"median_ms", "p10_ms", "p90_ms", "repeats"} and st["repeats"] == 7
        assert math.isfinite(st["median_ms"]) and 0 < st["p10_ms"] <= st["median_ms"] <= st["p90_ms"]
        assert res[f"{side}_ms"] == st["median_ms"]
    assert res["speedup"] == pytest.approx(res["base_ms"] / res["compressed_ms"], rel=1e-12)


def test_compare_latency_speedup_is_the_ratio_of_the_median_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fake clock each forward pass takes a known time (base: 3 ms, then 5 ms, 3 ms, ...; compressed: 1 ms,
    one 9 ms outlier): the reported medians, percentiles and speed-up follow from those times exactly."""
    import types

    import ltc.latency

    clock = [0.0]
    monkeypatch.setattr(ltc.latency, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    base_ms = iter([3.0, 3.0] + [3.0, 5.0, 3.0, 5.0, 3.0])  # 2 warm-up runs, then 5 timed
    small_ms = iter([1.0, 1.0] + [1.0, 1.0, 9.0, 1.0, 1.0])

    class Takes(nn.Module):
        def __init__(self, times: object) -> None:
            super().__init__()
            self.times = times

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            clock[0] += next(self.times) / 1e3  # type: ignore[call-overload]
            return x

    res = compare_latency(Takes(base_ms), Takes(small_ms), torch.zeros(1, 1), threads=1, warmup=2, repeats=5)
    assert res["base_ms"] == pytest.approx(3.0) and res["compressed_ms"] == pytest.approx(1.0)
    assert res["speedup"] == pytest.approx(3.0)
    # linear-interpolated percentiles of the sorted times [3, 3, 3, 5, 5] and [1, 1, 1, 1, 9]
    assert res["base"]["p10_ms"] == pytest.approx(3.0) and res["base"]["p90_ms"] == pytest.approx(5.0)
    assert res["compressed"]["p90_ms"] == pytest.approx(1.0 + 0.6 * 8.0)
