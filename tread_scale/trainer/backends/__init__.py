"""Composer-facing glue of the sharding backends: FSDP2 through Composer, DeepSpeed ZeRO integrated by us.

The plain-torch side of parallelism (memory planning, scaling projection, process groups) is
:mod:`tread_scale.parallel`; DDP needs no glue (Composer wraps the model itself) beyond an optional bf16
gradient-reduction hook. Where each backend keeps the fp32 master weights is :mod:`.master`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger

from tread_scale.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Backend:
    """How the ``Trainer`` is built for a backend: its class, extra arguments, callbacks to run first."""

    trainer_cls: type
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    first_callbacks: list = field(default_factory=list)


class DDPBF16GradReduce(Callback):
    """Under DDP, reduce gradients in bf16 with PyTorch's ``bf16_compress_hook`` (``grad_reduce_dtype: bf16``).

    The hook casts each fp32 gradient bucket to bf16, all-reduces it and writes the mean back into the fp32
    bucket. It is registered at ``FIT_START``, once Composer has wrapped the model in DDP (a single process
    has no DDP wrapper and nothing to reduce).
    """

    def __init__(self) -> None:
        self.registered = False

    def fit_start(self, state: State, logger: Logger) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
        from torch.nn.parallel import DistributedDataParallel

        if not self.registered and isinstance(state.model, DistributedDataParallel):
            state.model.register_comm_hook(None, bf16_compress_hook)
            self.registered = True
            log.info("DDP reduces gradients in bf16 (bf16_compress_hook)")


def build_backend(cfg, run) -> Backend:
    """The backend of ``cfg.parallelism`` (ddp, fsdp or deepspeed) for this run.

    Args:
        cfg: The validated :class:`~tread_scale.config.RunConfig` (backend sections resolved).
        run: The :class:`~tread_scale.trainer.run.RunContext` (micro-batch, world, precision, device).

    Raises:
        ConfigError: For bf16 gradient reduction without bf16 training.
    """
    from composer import Trainer

    par = cfg.parallelism
    reduce_dtype = par.grad_reduce_dtype
    if reduce_dtype == "bf16" and run.precision != "amp_bf16":
        raise ConfigError(f"parallelism.grad_reduce_dtype=bf16 needs bf16 training; train.precision resolved to "
                          f"{run.precision}")
    if run.device == "cpu" and run.precision == "amp_bf16":
        from tread_scale.compat.composer import allow_bf16_autocast_on_cpu

        allow_bf16_autocast_on_cpu()
    if run.rank == 0:
        log.info("gradients reduced in %s (parallelism.grad_reduce_dtype) under %s", reduce_dtype, run.precision)
    if par.backend == "fsdp":
        from tread_scale.compat.composer import keep_fsdp2_forward_inputs_dtype
        from tread_scale.compat.torch import average_fsdp2_gradients_on_gloo
        from tread_scale.trainer.backends.fsdp import fsdp2_config

        keep_fsdp2_forward_inputs_dtype()  # bf16 parameters, but inputs (the residual stream) as autocast leaves them
        average_fsdp2_gradients_on_gloo()  # upstream sums on gloo (CPU) instead of averaging

        return Backend(Trainer, {"parallelism_config": {"fsdp": fsdp2_config(par.fsdp, reduce_dtype)}})
    if par.backend == "deepspeed":
        from tread_scale.trainer.backends.deepspeed import DeepSpeedCheckpoint, DeepSpeedTrainer, deepspeed_config

        config = deepspeed_config(par.deepspeed, run.microbatch, run.world, run.precision,
                                  cfg.optimizer.grad_clip_norm, run.device, reduce_dtype)
        saver = DeepSpeedCheckpoint(cfg.checkpoint_folder(), run.run_dir / "deepspeed", cfg.train.save_interval,
                                    cfg.train.save_num_checkpoints_to_keep)
        return Backend(DeepSpeedTrainer, {"deepspeed_config": config}, [saver])
    return Backend(Trainer, first_callbacks=[DDPBF16GradReduce()] if reduce_dtype == "bf16" else [])
