"""Compression methods as small plug-ins of the LC engine.

A method only decides how ranks are picked; everything else (which layers, costs, projection, deployment,
training, fine-tuning) is shared. Each method builds an :class:`~ltc.engine.LCEngine` holding its ranks:

| name      | ranks from                                              | L steps (learning) |
|-----------|---------------------------------------------------------|--------------------|
| `ltc`     | the LC loop with the Tucker-2 scheme (the paper)        | yes                |
| `lrc`     | the LC loop with the matrix scheme (Idelbayev 2020)     | yes                |
| `oneshot` | one LTC C step on the pretrained weights (ablation)     | no                 |
| `vbmf`    | EVBMF of both channel unfoldings (Kim et al. 2016)      | no                 |
| `uniform` | one rank fraction (or energy threshold) for all layers  | no                 |
| `prune`   | Torch-Pruning L2 channel pruning to the same target     | no                 |
"""

from __future__ import annotations

from . import lrc, ltc, oneshot, prune, uniform, vbmf  # noqa: E402,F401  (registration)
from .base import Compression, Method, get_method, list_methods, register_method

__all__ = ["Compression", "Method", "get_method", "list_methods", "register_method"]
