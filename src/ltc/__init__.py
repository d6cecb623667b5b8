"""ltc: Learning Tucker Compression for CNNs (Hao, Li, Wu, DCC 2022).

Train a CNN and learn the Tucker-2 ranks of its convolutions at the same time, then deploy every chosen
conv as three real convs (1x1, kxk core, 1x1). Units: MACs (multiply-accumulates per sample; FLOPs =
2·MACs), SR = base MACs / compressed MACs (theoretical speed-up), CR = base params / compressed params.

Two ways in::

    result = ltc.compress(model, train_loader, val_loader=val_loader, target_sr=5, epochs=15)   # the pipeline
    comp = ltc.LTC(model, x, target_sr=5); ...loss + comp.penalty()...; comp.step()             # your own loop

Layers of the package, bottom up: ``tensor`` (maths) → ``layers`` → ``cost`` / ``latency`` → ``metrics`` /
``schemes`` → ``engine`` → ``methods`` → ``train`` / ``data`` / ``models`` → ``api`` → ``pipelines`` → ``cli``.
"""

from .api import CompressConfig, Result, compress
from .batchnorm import fold_batchnorm, recalibrate_batchnorm
from .cost import LayerGeometry, LayerProfile, Profile, format_count, profile, record_geometry
from .engine import LRC, LTC, LCEngine
from .export import export_onnx, export_torchscript
from .layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d
from .serialization import load, save
from .tensor import (
    LowRankFactors,
    Tucker2Factors,
    fold,
    matrix_error_table,
    mode_product,
    truncated_svd,
    tucker2,
    tucker2_error_table,
    unfold,
)

__version__ = "0.2.0"

__all__ = [
    "CompressConfig",
    "LCEngine",
    "LRC",
    "LTC",
    "LayerGeometry",
    "LayerProfile",
    "LowRankFactors",
    "LowRankLinear",
    "MatrixLowRankConv2d",
    "Profile",
    "Result",
    "Tucker2Conv2d",
    "Tucker2Factors",
    "__version__",
    "compress",
    "export_onnx",
    "export_torchscript",
    "fold",
    "fold_batchnorm",
    "format_count",
    "load",
    "matrix_error_table",
    "mode_product",
    "profile",
    "recalibrate_batchnorm",
    "record_geometry",
    "save",
    "truncated_svd",
    "tucker2",
    "tucker2_error_table",
    "unfold",
]
