"""Sampling from trained DiTs and MMDiTs: one library for ``tread-scale sample``, ``fid`` and training callbacks.

* :mod:`~tread_scale.sampling.settings`: :class:`SamplerSettings` (objective, steps, CFG, σ_data) and defaults;
* :mod:`~tread_scale.sampling.sampler`: per-sample seeded noise and the EDM-Heun / RF-Euler loop with guidance;
* :mod:`~tread_scale.sampling.generate`: many samples over any number of ranks, the same images whatever the
  batching;
* :mod:`~tread_scale.sampling.loading`: networks rebuilt from weight files, initial weights, VAE decoders;
* :mod:`~tread_scale.sampling.prompts`: prompts of text-to-image models, encoded with checked encoders or read
  from a captioned dataset;
* :mod:`~tread_scale.sampling.grid`: PNG grids (columns, caps, captions beside prompt rows, one grid rendered
  from a network);
* :mod:`~tread_scale.sampling.folder`: ``grid.png`` + ``samples.npz`` of exported weights.
"""

from tread_scale.sampling.folder import sample_to_folder
from tread_scale.sampling.generate import generate, is_text_model, rank_indices, sample_label, world
from tread_scale.sampling.grid import (CAPTIONS_FILE, DEFAULT_GRID_MAX, captioned_grid, grid_columns, grid_image,
                                       render_grid, write_captions)
from tread_scale.sampling.loading import Decoder, load_initial_weights, load_net, make_decoder
from tread_scale.sampling.prompts import PromptSet, dataset_prompts, encode_prompts, read_prompt_file
from tread_scale.sampling.sampler import sample_latents, seeded_noise
from tread_scale.sampling.settings import DEFAULT_STEPS, SamplerSettings, default_steps

__all__ = [
    "SamplerSettings", "default_steps", "DEFAULT_STEPS",
    "seeded_noise", "sample_latents",
    "generate", "is_text_model", "rank_indices", "sample_label", "world",
    "PromptSet", "encode_prompts", "dataset_prompts", "read_prompt_file",
    "load_net", "load_initial_weights", "make_decoder", "Decoder",
    "grid_columns", "grid_image", "render_grid", "captioned_grid", "write_captions", "DEFAULT_GRID_MAX",
    "CAPTIONS_FILE",
    "sample_to_folder",
]
