"""DeepSpeed ZeRO 1/2/3 under Composer 0.32 (which removed its own integration in 0.28).

The seams, chosen so that Composer's own training loop, events, callbacks, algorithms, loggers, checkpoint
cadence and autoresume all stay in charge:

* :class:`DeepSpeedTrainer` implements the wrapping hook of
  :class:`~tread_scale.compat.composer.WrappableTrainer` (run after ``Event.INIT``, before checkpoint
  loading) to build the DeepSpeed engine around the ComposerModel and puts the engine in ``state.model``
  (Composer's DDP wrapping passes engines through).
* DeepSpeed runs with ``managed_gradient_accumulation: false`` and PyTorch-style backward: Composer's
  own ``loss.backward()`` per micro-batch (with its micro-batch weighting) accumulates gradients, the
  engine's hooks on its forward output do ZeRO's per-backward work, and ``engine.step()`` — called once
  per batch through :class:`EngineOptimizer`, which stands in ``state.optimizers`` — is the
  accumulation boundary: reduce, clip, update, zero.
* Model and optimizer state leave Composer's checkpoint; :class:`DeepSpeedCheckpoint` saves
  ``engine.save_checkpoint`` at the same cadence, *before* Composer's checkpoint (so a Composer checkpoint
  never points at a missing engine checkpoint), uploads it when checkpoints go to ``s3://``, and loads
  it right after Composer restores its own state. The EMA is saved there too, sharded: each rank writes
  its fragments to ``ba<N>/ema/`` (:mod:`~tread_scale.trainer.backends.ema_shards`), so no rank gathers the
  full EMA to checkpoint; Composer's checkpoint keeps only a marker for it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from tread_scale.compat.composer import WrappableTrainer, pass_deepspeed_engines_through_ddp
from tread_scale.config import DeepSpeedConfig
from tread_scale.data import object_store as s3
from tread_scale.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def deepspeed_config(ds: DeepSpeedConfig, microbatch: int, world_size: int, precision: str,
                     grad_clip_norm: float | None, device: str, grad_reduce_dtype: str = "fp32") -> dict[str, Any]:
    """The DeepSpeed config dict for one run.

    DeepSpeed's own gradient clipping defaults to 1.0; it is set explicitly (0 = off, the reference). In
    bf16 mode DeepSpeed reduces and accumulates gradients in bf16 unless told otherwise;
    ``grad_reduce_dtype`` (``parallelism.grad_reduce_dtype``) sets both ``communication_data_type`` and
    ``data_types.grad_accum_dtype``: ``fp32`` (default) reduces the bf16 gradients of each micro-batch in fp32
    and accumulates them in fp32, as DDP does with fp32 gradients (ZeRO-1 then uses DeepSpeed's
    ``BF16_Optimizer``, whose fp32 accumulation buffer is not partitioned: 4 bytes per parameter, as DDP's
    gradients); ``bf16`` halves the gradient traffic and memory.
    """
    if precision == "amp_fp16":
        raise ConfigError("parallelism.backend=deepspeed supports train.precision amp_bf16 or fp32, not amp_fp16")
    if grad_reduce_dtype not in ("fp32", "bf16"):
        raise ConfigError(f"parallelism.grad_reduce_dtype must be fp32 or bf16, got {grad_reduce_dtype!r}")
    if grad_reduce_dtype == "bf16" and precision != "amp_bf16":
        raise ConfigError(f"parallelism.grad_reduce_dtype=bf16 needs train.precision amp_bf16, not {precision}")
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        # unmanaged accumulation overlaps communication only when gradients are partitioned
        "overlap_comm": ds.overlap_comm and ds.zero_stage >= 2,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.allgather_bucket_size,
    }
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.stage3_prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
        zero["stage3_max_live_parameters"] = ds.stage3_max_live_parameters
        zero["stage3_max_reuse_distance"] = ds.stage3_max_reuse_distance
    pin = device == "gpu"
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": microbatch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": microbatch * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(grad_clip_norm or 0.0),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "amp_bf16"},
        "communication_data_type": grad_reduce_dtype,
        "data_types": {"grad_accum_dtype": grad_reduce_dtype},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class EngineOptimizer:
    """Stands in ``state.optimizers`` for the engine: ``step`` is ``engine.step()``; ``zero_grad`` is a no-op.

    The engine zeroes gradients itself after each step. ``param_groups`` are the real optimizer's, so
    learning-rate monitors and schedulers keep working.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    @property
    def state(self) -> dict:
        return getattr(self.engine.optimizer, "state", {})

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        self.engine.step()
        return loss

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class DeepSpeedTrainer(WrappableTrainer):
    """A Composer ``Trainer`` whose model is a DeepSpeed engine (see the module docstring).

    Args:
        deepspeed_config: The engine's config (:func:`deepspeed_config`).
        **kwargs: ``Trainer`` arguments; ``parallelism_config`` must be unset.
    """

    def __init__(self, *, deepspeed_config: dict[str, Any], **kwargs: Any) -> None:
        if kwargs.get("parallelism_config"):
            raise ConfigError("DeepSpeed cannot be combined with a Composer parallelism config (FSDP/TP)")
        self.deepspeed_config = deepspeed_config
        self.deepspeed_engine = None
        pass_deepspeed_engines_through_ddp()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        super().__init__(**kwargs)

    def wrap_model(self, model, optimizers) -> None:
        import deepspeed

        from tread_scale.compat.deepspeed import DeepSpeedMaster

        optimizer = self.state.optimizers[0]
        trainable = {n: p for n, p in self.state.model.named_parameters() if p.requires_grad}
        bf16 = self.deepspeed_config["bf16"]["enabled"]
        # bf16 mode casts the parameters before the optimizer copies them into its fp32 master partition:
        # keep the fp32 initial weights (on the host, while the engine is built) and put them back there
        initial = {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()} if bf16 else {}
        engine, _, _, _ = deepspeed.initialize(model=self.state.model, optimizer=optimizer,
                                               config=self.deepspeed_config, dist_init_required=False)
        if initial:
            DeepSpeedMaster(engine, trainable).restore(initial)
            del initial
        self.deepspeed_engine = engine
        self.state.model = engine
        self.state.optimizers = EngineOptimizer(engine)
        self.state.serialized_attributes = [a for a in self.state.serialized_attributes
                                            if a not in ("model", "optimizers")]
        z = self.deepspeed_config["zero_optimization"]
        if dist.get_global_rank() == 0:
            log.info("DeepSpeed ZeRO stage %d (offload optimizer: %s, params: %s, bf16: %s, gradients reduced and "
                     "accumulated in %s, fp32 master weights in %s, clip: %s)", z["stage"], "offload_optimizer" in z,
                     "offload_param" in z, self.deepspeed_config["bf16"]["enabled"],
                     self.deepspeed_config["communication_data_type"], type(engine.optimizer).__name__,
                     self.deepspeed_config["gradient_clipping"])


class DeepSpeedCheckpoint(Callback):
    """Saves and restores the engine's model and optimizer state beside Composer's checkpoints.

    Engine checkpoints are ``<folder>/ba<N>/`` (DeepSpeed's own layout, one file per rank for ZeRO
    partitions), with the EMA's fragments, one file per rank, in ``<folder>/ba<N>/ema/``. With an ``s3://`` checkpoint folder they are staged under ``<run_dir>/deepspeed`` and
    uploaded to ``<save_folder>/deepspeed/ba<N>/``.

    Args:
        save_folder: Composer's checkpoint folder (local or ``s3://``).
        staging: Local folder for engine checkpoints when ``save_folder`` is remote.
        interval: Composer's save interval.
        keep: How many engine checkpoints to keep (-1: all), like ``save_num_checkpoints_to_keep``.
    """

    def __init__(self, save_folder: str, staging: str | Path, interval: str, keep: int = -1) -> None:
        self.remote = s3.join_uri(save_folder, "deepspeed") if s3.is_s3(save_folder) else None
        self.local = Path(staging) if self.remote else Path(save_folder) / "deepspeed"
        self._due = create_interval_scheduler(interval)
        self.keep = keep
        self._loaded = False

    @staticmethod
    def _engine(state: State):
        from deepspeed import DeepSpeedEngine

        if not isinstance(state.model, DeepSpeedEngine):
            raise RuntimeError("DeepSpeedCheckpoint needs the DeepSpeedTrainer")
        return state.model

    @staticmethod
    def _emas(state: State) -> list:
        from tread_scale.trainer.callbacks.ema import EMA

        return [cb for cb in state.callbacks if isinstance(cb, EMA)]

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event in (Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT) and self._due(state, event):
            self.save(state)
        elif event == Event.AFTER_LOAD and not self._loaded:
            self._loaded = True
            if int(state.timestamp.batch) > 0:
                self.load(state, int(state.timestamp.batch))

    def save(self, state: State) -> None:
        tag = f"ba{int(state.timestamp.batch)}"
        self.local.mkdir(parents=True, exist_ok=True)
        self._engine(state).save_checkpoint(str(self.local), tag=tag)
        for ema in self._emas(state):
            ema.save_shards(self.local / tag / "ema", tag)
        dist.barrier()
        if self.remote and dist.get_local_rank() == 0:
            s3.upload_tree(self.local, self.remote, sorted(p for p in (self.local / tag).rglob("*") if p.is_file()))
        dist.barrier()
        self._rotate()
        log.info("saved the DeepSpeed engine state to %s", s3.join_uri(self.remote or str(self.local), tag))

    def _rotate(self) -> None:
        if self.keep < 1:
            return
        tags = sorted((p for p in self.local.glob("ba*") if p.is_dir()), key=lambda p: int(p.name[2:]))
        if dist.get_local_rank() == 0:
            for old in tags[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
                if self.remote and dist.get_global_rank() == 0:
                    bucket, prefix = s3.parse_s3_uri(s3.join_uri(self.remote, old.name))
                    s3.delete_prefix(f"s3://{bucket}/{prefix}")

    def load(self, state: State, batch: int) -> None:
        tag = f"ba{batch}"
        where = self.local / tag
        if self.remote and dist.get_local_rank() == 0 and not where.is_dir():
            bucket, prefix = s3.parse_s3_uri(s3.join_uri(self.remote, tag))
            client = s3.s3_client()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) + 1:]
                    s3.download_file(f"s3://{bucket}/{obj['Key']}", where / rel)
        dist.barrier()
        if not where.is_dir():
            raise CheckpointError(f"the Composer checkpoint at batch {batch} has no DeepSpeed engine checkpoint "
                                  f"{s3.join_uri(self.remote or str(self.local), tag)}")
        self._check_world_size(where)
        path, _ = self._engine(state).load_checkpoint(str(self.local), tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load its checkpoint {where}")
        for ema in self._emas(state):
            ema.load_shards(where / "ema", tag)
        log.info("restored the DeepSpeed engine state from %s", where)

    @staticmethod
    def _check_world_size(where: Path) -> None:
        """Refuse, by name, to resume on another world size: ZeRO's optimizer partitions cannot be re-cut.

        DeepSpeed's own check (``ZeRORuntimeException``) fires inside the engine load; the EMA shard files
        record the world size that wrote them, so the mismatch is stated up front, with the folder. (The EMA
        files themselves could be read on any world size: :class:`~.ema_shards.EMAShards`.)
        """
        from tread_scale.trainer.backends.ema_shards import SHARD_NAME

        names = [m for p in (where / "ema").glob("rank*-of-*.safetensors") if (m := SHARD_NAME.fullmatch(p.name))]
        written = {int(m.group(2)) for m in names}
        world = dist.get_world_size()
        if written and written != {world}:
            raise CheckpointError(f"{where} was written by {', '.join(map(str, sorted(written)))} ranks and this run "
                                  f"has {world}: DeepSpeed cannot re-partition a ZeRO checkpoint's optimizer state "
                                  "onto another world size; resume with the same number of ranks")


__all__ = ["DeepSpeedTrainer", "DeepSpeedCheckpoint", "EngineOptimizer", "deepspeed_config"]
