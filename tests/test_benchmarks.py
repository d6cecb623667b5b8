"""The benchmark scripts' own logic that results depend on (``benchmarks/`` is not a package: imported by path)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import ltc
from ltc import models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
latency = pytest.importorskip("latency")


@pytest.mark.parametrize("method", ["ltc", "lrc"])
def test_latency_rebuilds_the_quality_runs_architectures_exactly(tmp_path: Path, method: str) -> None:
    """``latency.py --quality`` times the architecture a quality row deployed, rebuilt from its recorded ranks:
    same MACs and params as the engine that chose them (so the SR beside each time is the row's SR)."""
    torch.manual_seed(0)
    base = models.create("resnet34_cifar", num_classes=10, width=0.0625, in_channels=1)
    x = torch.randn(1, 1, 28, 28)
    eng = (ltc.LRC if method == "lrc" else ltc.LTC)(base, x, target_sr=4.0)
    ranks = {n: list(r) if isinstance(r, tuple) else r for n, r in eng.ranks.items()}
    doc = {
        "bases": {"toy/resnet34_cifar": {"model": "resnet34_cifar", "num_classes": 10, "width": 0.0625,
                                         "in_channels": 1, "image_size": 28}},
        "rows": [
            {"kind": "compare", "dataset": "toy", "model": "resnet34_cifar", "method": method, "target_sr": 4.0,
             "ranks": ranks, "sr": eng.sr, "key": f"compare|toy|resnet34_cifar|{method}|4"},
            {"kind": "compare", "dataset": "toy", "model": "resnet34_cifar", "method": "uniform", "target_sr": 4.0,
             "ranks": ranks, "sr": eng.sr, "key": "not selected"},
        ],
    }
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(doc))
    groups = latency.quality_groups(str(path), [method], round_to=8)
    assert len(groups) == 1
    g = groups[0]
    assert g.input_shape == (1, 28, 28)
    assert [v.label for v in g.variants] == [f"{method} SR 4", f"{method} SR 4 r8"]
    exact, rounded = g.variants
    prof = ltc.profile(exact.model, x)
    assert (prof.macs, prof.params) == (eng.macs, eng.params)
    assert exact.sr == pytest.approx(eng.sr, rel=1e-12)
    assert rounded.sr <= exact.sr  # rounding ranks up only adds MACs
