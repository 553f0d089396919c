"""tread_scale: train token-routed (TREAD) diffusion transformers at scale.

The model (:mod:`tread_scale.models`), routing (:mod:`tread_scale.routing`) and objectives
(:mod:`tread_scale.diffusion`) are plain PyTorch. Composer lives only in :mod:`tread_scale.trainer`.
"""

__version__ = "0.1.0"
