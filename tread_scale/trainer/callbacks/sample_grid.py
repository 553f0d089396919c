"""``SampleGrid``: sample a fixed set of seeds and labels (or prompts) with the EMA weights and write a PNG grid."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from tread_scale.imaging import save_png
from tread_scale.models.dit import DiT
from tread_scale.sampling import CAPTIONS_FILE, PromptSet, SamplerSettings, render_grid, write_captions
from tread_scale.trainer.callbacks.ema import EMA
from tread_scale.trainer.callbacks.net_copy import NetCopy, weights_to_sample

log = logging.getLogger(__name__)


class SampleGrid(Callback):
    """Every ``interval`` (and at the end of training), sample ``num_images`` images and save a grid.

    Sampling runs on rank 0 on an unwrapped copy of the network loaded with the EMA weights, so it works
    the same under every parallelism backend. Seeds are ``seed + i`` and labels cycle through the classes
    (a text-conditioned model: the ``prompts``, a row per prompt with the prompt written beside it, and listed
    in ``captions.txt`` next to the grids), so successive grids are directly comparable. The sampling itself
    is :func:`tread_scale.sampling.render_grid`.

    Args:
        make_net: Builds an unwrapped DiT or MMDiT of the trained architecture (rank 0 only).
        ema: EMA callback whose weights are sampled (raw weights if ``None``).
        out_dir: Folder for ``ba<N>.png`` and ``latest.png``.
        interval: e.g. ``500ba``; ``None`` samples only at the end of training.
        sampler: Objective, steps, guidance scale and σ_data of the sampler.
        num_classes: Labels cycle through ``0..num_classes-1``.
        num_images: Images per grid.
        seed: First seed.
        decode: Maps latents to images in [-1, 1] (a VAE decoder), or ``None`` for pixel-space data.
        at_fit_end: Also sample when training ends.
        prompts: The prompts of a text-conditioned model (encoded at start, or a dataset's first captions).
    """

    def __init__(self, make_net: Callable[[], DiT], ema: EMA | None, out_dir: str | Path, interval: str | None,
                 sampler: SamplerSettings, num_classes: int, num_images: int = 16, seed: int = 0,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, at_fit_end: bool = True,
                 prompts: PromptSet | None = None) -> None:
        self.net = NetCopy(make_net)
        self.ema = ema
        self.out_dir = Path(out_dir)
        self.sampler = sampler
        self.num_classes = num_classes
        self.num_images = num_images
        self.seed = seed
        self.decode = decode
        self.at_fit_end = at_fit_end
        self.prompts = prompts
        self._due = (create_interval_scheduler(interval, include_end_of_training=False, checkpoint_events=False)
                     if interval else None)
        self._last_batch = -1
        self.last_grid: Path | None = None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        due = event == Event.BATCH_END and self._due is not None and self._due(state, event)
        completed = state.max_duration is not None and state.timestamp >= state.max_duration  # not a preemption stop
        final = (event == Event.FIT_END and self.at_fit_end and completed
                 and int(state.timestamp.batch) != self._last_batch)
        if due or final:
            self._last_batch = int(state.timestamp.batch)
            self.generate(state, logger)

    @torch.no_grad()
    def generate(self, state: State, logger: Logger) -> Path | None:
        """Sample the grid now (rank 0 samples; every rank takes part in gathering the weights).

        Returns:
            The written ``ba<N>.png`` on rank 0, ``None`` elsewhere.
        """
        weights = weights_to_sample(state, self.ema)
        if dist.get_global_rank() != 0:
            return None
        net = self.net.load(state, weights)
        grid = render_grid(net, self.sampler, self.num_images, self.num_classes, self.seed, self.decode,
                           prompts=self.prompts)
        step = int(state.timestamp.batch)
        path = save_png(self.out_dir / f"ba{step:08d}.png", grid)
        if self.prompts is not None:
            write_captions(self.out_dir / CAPTIONS_FILE, self.prompts.prompts, self.num_images)
        shutil.copyfile(path, self.out_dir / "latest.png")
        logger.log_images(grid, name="samples", channels_last=True, step=step)
        log.info("sample grid at batch %d: %s", step, path)
        self.last_grid = path
        self.net.park()
        return path
