"""ltc: Learning Tucker Compression for CNNs (Hao, Li, Wu, DCC 2022).

Train a CNN and learn the Tucker-2 ranks of its convolutions at the same time, then deploy every chosen
conv as three real convs (1x1, kxk core, 1x1). Units: MACs (multiply-accumulates per sample; FLOPs =
2·MACs), SR = base MACs / compressed MACs (theoretical speed-up), CR = base params / compressed params.

Layers of the package, bottom up: ``tensor`` (maths) → ``layers`` → ``cost`` → ``schemes`` → ``engine``
→ ``methods`` → ``train`` / ``data`` / ``models`` → ``api`` → ``cli``.
"""

from .cost import LayerGeometry, LayerProfile, Profile, format_count, profile, record_geometry
from .engine import LRC, LTC, LCEngine
from .layers import LowRankLinear, MatrixLowRankConv2d, Tucker2Conv2d
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

__version__ = "0.1.0"

__all__ = [
    "LCEngine",
    "LRC",
    "LTC",
    "LayerGeometry",
    "LayerProfile",
    "LowRankFactors",
    "LowRankLinear",
    "MatrixLowRankConv2d",
    "Profile",
    "Tucker2Conv2d",
    "Tucker2Factors",
    "__version__",
    "fold",
    "format_count",
    "matrix_error_table",
    "mode_product",
    "profile",
    "record_geometry",
    "truncated_svd",
    "tucker2",
    "tucker2_error_table",
    "unfold",
]
