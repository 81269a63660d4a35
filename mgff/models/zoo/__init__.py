"""Backbones registered with timm: importing this package makes them available to ``timm.create_model``.

* UniFormer: ``uniformer_small``, ``uniformer_small_plus``, ``uniformer_small_plus_dim64``,
  ``uniformer_base``, ``uniformer_base_ls``
"""
from . import uniformer
from .uniformer import UniFormer
