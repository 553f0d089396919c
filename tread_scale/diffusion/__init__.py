"""Diffusion objectives, samplers and guidance (plain PyTorch)."""

from tread_scale.diffusion.edm import EDM, edm_heun_sample, edm_sigma_steps
from tread_scale.diffusion.guidance import Guidance, GuidedPredictor
from tread_scale.diffusion.rectified_flow import RectifiedFlow, rf_euler_sample

__all__ = ["EDM", "edm_heun_sample", "edm_sigma_steps", "RectifiedFlow", "rf_euler_sample", "Guidance", "GuidedPredictor"]
