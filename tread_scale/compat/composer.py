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
"""

from __future__ import annotations

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

_fixed = {"signal_file": False, "ddp_passthrough": False}


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
