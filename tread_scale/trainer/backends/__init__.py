"""Composer-facing glue of the sharding backends: FSDP2 through Composer, DeepSpeed ZeRO integrated by us.

The plain-torch side of parallelism (memory planning, scaling projection, process groups) is
:mod:`tread_scale.parallel`; DDP needs no glue (Composer wraps the model itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Backend:
    """How the ``Trainer`` is built for a backend: its class, extra arguments, callbacks to run first."""

    trainer_cls: type
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    first_callbacks: list = field(default_factory=list)


def build_backend(cfg, run) -> Backend:
    """The backend of ``cfg.parallelism`` (ddp, fsdp or deepspeed) for this run.

    Args:
        cfg: The validated :class:`~tread_scale.config.RunConfig` (backend sections resolved).
        run: The :class:`~tread_scale.trainer.run.RunContext` (micro-batch, world, precision, device).
    """
    from composer import Trainer

    par = cfg.parallelism
    if par.backend == "fsdp":
        from tread_scale.trainer.backends.fsdp import fsdp2_config

        return Backend(Trainer, {"parallelism_config": {"fsdp": fsdp2_config(par.fsdp)}})
    if par.backend == "deepspeed":
        from tread_scale.trainer.backends.deepspeed import DeepSpeedCheckpoint, DeepSpeedTrainer, deepspeed_config

        config = deepspeed_config(par.deepspeed, run.microbatch, run.world, run.precision,
                                  cfg.optimizer.grad_clip_norm, run.device)
        saver = DeepSpeedCheckpoint(cfg.checkpoint_folder(), run.run_dir / "deepspeed", cfg.train.save_interval,
                                    cfg.train.save_num_checkpoints_to_keep)
        return Backend(DeepSpeedTrainer, {"deepspeed_config": config}, [saver])
    return Backend(Trainer)
