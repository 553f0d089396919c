"""DiT and MMDiT backbones (plain ``torch.nn.Module``; no trainer imports)."""

from tread_scale.models.conditioning import TextCondition
from tread_scale.models.dit import DiT
from tread_scale.models.mmdit import MMDiT
from tread_scale.models.registry import (
    DIT_SIZES, MMDIT_PATCH_SIZES, MMDIT_SIZES, PATCH_SIZES, DiTSize, ModelSpec, model_names, model_spec,
    parse_model_name,
)

__all__ = ["DiT", "MMDiT", "TextCondition", "DIT_SIZES", "PATCH_SIZES", "MMDIT_SIZES", "MMDIT_PATCH_SIZES",
           "DiTSize", "ModelSpec", "model_names", "model_spec", "parse_model_name"]
