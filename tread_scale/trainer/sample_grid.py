"""``SampleGrid``: sample a fixed set of seeds and labels with the EMA weights and write a PNG grid."""

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

from tread_scale.diffusion.guidance import Guidance
from tread_scale.imaging import make_grid, save_png, to_uint8
from tread_scale.models.dit import DiT
from tread_scale.sampling import sample_latents, seeded_noise
from tread_scale.parallel.params import full_state_dict
from tread_scale.trainer.ema import EMA
from tread_scale.trainer.utils import dit_of

log = logging.getLogger(__name__)


class SampleGrid(Callback):
    """Every ``interval`` (and at the end of training), sample ``num_images`` images and save a grid.

    Sampling runs on rank 0 on an unwrapped copy of the network loaded with the EMA weights, so it works
    the same under every parallelism backend. Seeds are ``seed + i`` and labels cycle through the classes,
    so successive grids are directly comparable.

    Args:
        make_net: Builds an unwrapped DiT of the trained architecture (rank 0 only).
        ema: EMA callback whose weights are sampled (raw weights if ``None``).
        out_dir: Folder for ``ba<N>.png`` and ``latest.png``.
        interval: e.g. ``500ba``; ``None`` samples only at the end of training.
        objective: ``edm`` or ``rf``.
        num_classes: Labels cycle through ``0..num_classes-1``.
        num_images: Images per grid.
        steps: Sampler steps.
        cfg_scale: Classifier-free guidance scale (1 = none).
        seed: First seed.
        decode: Maps latents to images in [-1, 1] (a VAE decoder), or ``None`` for pixel-space data.
        at_fit_end: Also sample when training ends.
        sigma_data: σ_data of the EDM objective.
    """

    def __init__(self, make_net: Callable[[], DiT], ema: EMA | None, out_dir: str | Path, interval: str | None,
                 objective: str, num_classes: int, num_images: int = 16, steps: int = 18, cfg_scale: float = 1.0,
                 seed: int = 0, decode: Callable[[torch.Tensor], torch.Tensor] | None = None, at_fit_end: bool = True,
                 sigma_data: float = 0.5) -> None:
        self.make_net = make_net
        self.ema = ema
        self.out_dir = Path(out_dir)
        self.objective = objective
        self.num_classes = num_classes
        self.num_images = num_images
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.seed = seed
        self.decode = decode
        self.sigma_data = sigma_data
        self.at_fit_end = at_fit_end
        self._due = (create_interval_scheduler(interval, include_end_of_training=False, checkpoint_events=False)
                     if interval else None)
        self._net: DiT | None = None
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
        if self.ema is not None:
            weights = self.ema.full_state_dict(state)
        else:
            weights = full_state_dict(dit_of(state.model))
        if dist.get_global_rank() != 0:
            return None
        device = next(dit_of(state.model).parameters()).device
        if self._net is None:
            self._net = self.make_net()
        net = self._net.to(device)
        net.load_state_dict(weights, strict=True)
        seeds = [self.seed + i for i in range(self.num_images)]
        labels = torch.tensor([i % self.num_classes for i in range(self.num_images)], device=device)
        noise = seeded_noise(seeds, (net.in_channels, *net.input_size)).to(device)
        from tread_scale.diffusion.edm import EDM

        latents = sample_latents(net, self.objective, labels, noise, self.steps, Guidance(cfg_scale=self.cfg_scale),
                                 edm=EDM(sigma_data=self.sigma_data))
        images = self.decode(latents) if self.decode is not None else latents
        nrow = self.num_classes if self.num_classes <= 12 else min(self.num_images, 8)  # a column per class
        grid = make_grid(to_uint8(images), nrow=nrow)
        step = int(state.timestamp.batch)
        path = save_png(self.out_dir / f"ba{step:08d}.png", grid)
        shutil.copyfile(path, self.out_dir / "latest.png")
        logger.log_images(grid, name="samples", channels_last=True, step=step)
        log.info("sample grid at batch %d: %s", step, path)
        self.last_grid = path
        net.to("cpu")
        return path
