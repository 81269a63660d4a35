"""Backbones registered with timm: importing this package makes them available to ``timm.create_model``.

* UniFormer: ``uniformer_small``, ``uniformer_small_plus``, ``uniformer_small_plus_dim64``,
  ``uniformer_base``, ``uniformer_base_ls``
* LiTv2: ``litv2_s``, ``litv2_m``, ``litv2_b``
"""
from . import litv2, uniformer  # noqa: F401  (importing registers the models with timm)
from .litv2 import LiTv2
from .uniformer import UniFormer

__all__ = ['LiTv2', 'UniFormer']
