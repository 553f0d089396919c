"""Everything tread_scale changes inside Composer 0.32.1, as named functions.

Composer 0.32.1 is the last release (unmaintained since 2025-07) and removed DeepSpeed in 0.28, so these
seams live here. Each, upstream vs. here:

* :func:`fix_node_signal_file_names`: upstream's ``dist.get_node_signal_file_name`` broadcasts rank 0's
  name (``._signal_file_node0_<random>``) to every node, so during autoresume every node's local rank 0
  writes and deletes the *same* file in a shared checkpoint folder and the second delete fails
  (``FileNotFoundError``). Here each node names its own file (same shared random part).
* :func:`pass_deepspeed_engines_through_ddp`: upstream's ``Trainer.__init__`` wraps the model in DDP
  inline (``prepare_ddp_module``); a DeepSpeed engine must not be wrapped again, so engines pass through.
* :class:`WrappableTrainer`: upstream's private ``Trainer._wrap_model_for_distributed`` (after
  ``Event.INIT``, before checkpoint loading) is where a DeepSpeed engine must be built; here it calls the
  public hook :meth:`WrappableTrainer.wrap_model`.
* :func:`save_checkpoint_now`: upstream saves only at its interval (private
  ``CheckpointSaver._save_checkpoint``); preemption needs a checkpoint at this batch.
* :func:`upload_workers_alive`: upstream hides whether a ``RemoteUploaderDownloader`` worker died
  (``_all_workers_alive``); a run waiting for an upload must stop waiting once no worker can deliver it.
* :func:`allow_bf16_autocast_on_cpu`: upstream refuses every precision but fp32 on a CPU device
  (``_validate_precision``) and its ``get_precision_context`` autocasts only on CUDA or XLA; CPUs with bf16
  units (AVX-512 BF16, AMX) train 2-3x faster under ``torch.autocast("cpu", torch.bfloat16)``, and the
  multi-rank bf16 parity tests of every backend run on CPU, so ``amp_bf16`` on a CPU device autocasts there.
* :func:`keep_fsdp2_forward_inputs_dtype`: upstream's FSDP2 policy (``create_mixed_precision_policy``) keeps
  ``MixedPrecisionPolicy``'s default ``cast_forward_inputs=True``: with bf16 parameters every wrapped
  module's floating inputs are rounded to bf16 (the batch's latents at the root, the residual stream and
  the conditioning at every block), which DDP's autocast never does (its residual stream stays fp32, as
  ``dry-run``'s memory model assumes). Here FSDP2 casts parameters only; autocast casts per op, as under
  DDP and DeepSpeed.
"""

from __future__ import annotations

import contextlib
import random
import string
from typing import Any

import composer
from composer import Trainer

WRITTEN_FOR = "0.32.1"
if composer.__version__ != WRITTEN_FOR:
    raise ImportError(f"tread_scale.compat.composer was written for Composer {WRITTEN_FOR}, but "
                      f"{composer.__version__} is installed: install the pinned version (requirements.lock) or "
                      "re-check every patch in this module against the new version")

_fixed = {"signal_file": False, "ddp_passthrough": False, "cpu_bf16": False, "fsdp2_inputs": False}


def fix_node_signal_file_names() -> None:
    """Give each node its own autoresume signal file (idempotent); see the module docstring."""
    if _fixed["signal_file"]:
        return
    from composer.utils import dist

    def get_node_signal_file_name(rng: random.Random | None = None) -> str:
        rng = rng or random.Random()
        token = ["".join(rng.choices(string.ascii_letters + string.digits, k=6))]
        dist.broadcast_object_list(token, src=0)
        return f"._signal_file_node{dist.get_node_rank()}_{token[0]}"

    dist.get_node_signal_file_name = get_node_signal_file_name
    _fixed["signal_file"] = True


def pass_deepspeed_engines_through_ddp() -> None:
    """Make Composer's inline DDP wrapping leave DeepSpeed engines alone (idempotent)."""
    if _fixed["ddp_passthrough"]:
        return
    import composer.trainer.trainer as composer_trainer

    original = composer_trainer.prepare_ddp_module

    def prepare_ddp_module(model, find_unused_parameters):
        from deepspeed import DeepSpeedEngine

        if isinstance(model, DeepSpeedEngine):
            return model
        return original(model, find_unused_parameters)

    composer_trainer.prepare_ddp_module = prepare_ddp_module
    _fixed["ddp_passthrough"] = True


class WrappableTrainer(Trainer):
    """A Composer ``Trainer`` whose distributed wrapping step is the public, overridable :meth:`wrap_model`."""

    def _wrap_model_for_distributed(self, model, optimizers) -> None:
        self.wrap_model(model, optimizers)

    def wrap_model(self, model: Any, optimizers: Any) -> None:
        """Wrap the model for distributed training (upstream's behaviour unless overridden)."""
        super()._wrap_model_for_distributed(model, optimizers)


def save_checkpoint_now(saver: Any, state: Any, logger: Any) -> None:
    """Have a ``CheckpointSaver`` write (and upload) a checkpoint of this batch, outside its interval."""
    saver._save_checkpoint(state, logger)


def upload_workers_alive(logger: Any) -> bool:
    """False once a ``RemoteUploaderDownloader`` worker has died (its upload failed for good)."""
    from composer.loggers import RemoteUploaderDownloader

    return all(d._all_workers_alive for d in logger.destinations if isinstance(d, RemoteUploaderDownloader))


def allow_bf16_autocast_on_cpu() -> None:
    """Let ``precision='amp_bf16'`` run on a CPU device as ``torch.autocast("cpu", torch.bfloat16)`` (idempotent).

    Patches the names Composer's trainer and its FSDP2 preparation bound at import; see the module docstring.
    """
    if _fixed["cpu_bf16"]:
        return
    import composer.distributed.prepare_distributed as composer_prepare
    import composer.trainer.trainer as composer_trainer
    import torch
    from composer.core.precision import Precision
    from composer.devices import DeviceCPU

    validate = composer_trainer._validate_precision
    precision_context = composer_trainer.get_precision_context

    def _validate_precision(precision, device):
        if isinstance(device, DeviceCPU) and Precision(precision) == Precision.AMP_BF16:
            return
        validate(precision, device)

    @contextlib.contextmanager
    def get_precision_context(precision, precision_config=None, fp8_autocast_enabled=True):
        with precision_context(precision, precision_config, fp8_autocast_enabled):
            if Precision(precision) == Precision.AMP_BF16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    yield
            else:
                yield

    composer_trainer._validate_precision = _validate_precision
    composer_prepare._validate_precision = _validate_precision
    composer_trainer.get_precision_context = get_precision_context
    _fixed["cpu_bf16"] = True


def keep_fsdp2_forward_inputs_dtype() -> None:
    """Build Composer's FSDP2 mixed-precision policies with ``cast_forward_inputs=False`` (idempotent)."""
    if _fixed["fsdp2_inputs"]:
        return
    import composer.distributed.fsdp2 as composer_fsdp2
    from torch.distributed.fsdp import MixedPrecisionPolicy

    upstream = composer_fsdp2.create_mixed_precision_policy

    def create_mixed_precision_policy(precision, mixed_precision):
        policy = upstream(precision, mixed_precision)
        return MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                    output_dtype=policy.output_dtype, cast_forward_inputs=False)

    composer_fsdp2.create_mixed_precision_policy = create_mixed_precision_policy
    _fixed["fsdp2_inputs"] = True
