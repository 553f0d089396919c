"""DiT backbones (plain ``torch.nn.Module``; no trainer imports)."""

from tread_scale.models.dit import DiT
from tread_scale.models.registry import DIT_SIZES, PATCH_SIZES, DiTSize, model_names, parse_model_name

__all__ = ["DiT", "DIT_SIZES", "PATCH_SIZES", "DiTSize", "model_names", "parse_model_name"]
