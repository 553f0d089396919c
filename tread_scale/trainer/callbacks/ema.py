"""``EMA``: exponential moving average of the DiT's trainable parameters, as a Composer callback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from tread_scale.errors import CheckpointError
from tread_scale.trainer.backends.master import (MasterWeights, is_deepspeed_engine, master_state_dict,
                                                 master_weights)
from tread_scale.trainer.model import dit_of

log = logging.getLogger(__name__)


class EMA(Callback):
    """Shadow copy ``θ_ema ← decay·θ_ema + (1 − decay)·θ`` after every optimizer step (spec §4.2).

    ``θ`` is the **fp32 master copy** the optimizer updates, under every backend and precision
    (:mod:`tread_scale.trainer.backends.master`): the module's parameters under DDP, FSDP2's fp32 shards
    (whatever its ``mixed_precision`` policy gathers for compute), and under DeepSpeed the ZeRO optimizer's
    fp32 partition, not the bf16 parameters its bf16 mode computes with. Only parameters with
    ``requires_grad`` are averaged (the fixed positional table is a buffer).

    The shadow is kept in fp32 and **sharded like the master weights**: a DTensor under FSDP2, the rank's
    fragment of the flat fp32 partition under DeepSpeed ZeRO-1/2/3, a full copy under DDP. Its memory is
    therefore one extra fp32 copy of each rank's master shard, and the update is a local ``lerp`` with no
    communication. Full tensors are gathered only to save a non-sharded checkpoint (DDP, FSDP2 with
    ``state_dict_type: full``), export weights (one tensor at a time, onto rank 0) or sample.

    Checkpoints under DeepSpeed are sharded too: :class:`~tread_scale.trainer.backends.deepspeed.DeepSpeedCheckpoint`
    has each rank write its fragments next to the engine checkpoint (:meth:`save_shards`,
    :mod:`~tread_scale.trainer.backends.ema_shards`), and the Composer checkpoint's EMA state is then only a
    marker (``decay``, ``layout``, ``tag``, ``world_size``); loading it defers the values to :meth:`load_shards`,
    which the engine checkpoint's load calls right after Composer's. Composer checkpoints that hold the full
    EMA (older ones, and the other backends) load as before.

    Args:
        decay: EMA decay per step (0.9999 in the reference; constant, no warm-up).
    """

    def __init__(self, decay: float = 0.9999) -> None:
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] | None = None
        self._master: MasterWeights | None = None
        self._sharded_checkpoint = False
        self._deepspeed = False
        self._shards_tag: str | None = None  # shard files that hold the current shadow (until the next update)
        self._pending: dict[str, Any] | None = None  # a loaded marker whose shard files are still to be read

    def _prepare(self, state: State) -> None:
        params = {n: p for n, p in dit_of(state.model).named_parameters() if p.requires_grad}
        self._master = master_weights(state.model, params)
        self._deepspeed = is_deepspeed_engine(state.model)

    def before_load(self, state: State, logger: Logger) -> None:
        # after the model is wrapped/sharded (and a DeepSpeed engine built), before a checkpoint is loaded
        self._prepare(state)
        self._sharded_checkpoint = bool(getattr(state, "fsdp_sharded_state_dict_enabled", False))
        if self.shadow is None:
            self.shadow = {n: t.float().clone() for n, t in self._master.local().items()}

    def fit_start(self, state: State, logger: Logger) -> None:
        if self._pending is not None:
            raise CheckpointError(f"the checkpoint's EMA is in the DeepSpeed EMA shard files of tag "
                                  f"{self._pending.get('tag')!r}, which were not loaded (the engine checkpoint's "
                                  "load reads them: is the DeepSpeedCheckpoint callback missing?)")
        if self.shadow is None:
            self.before_load(state, logger)
        self._prepare(state)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.shadow is None:
            return
        with torch.no_grad():
            names = list(self.shadow)
            master = self._master.local()  # fresh views: a checkpoint load may rebuild DeepSpeed's mapping
            torch._foreach_lerp_([self.shadow[n] for n in names], [master[n].float() for n in names],
                                 1.0 - self.decay)
        self._shards_tag = None

    def save_shards(self, folder: str | Path, tag: str) -> Path | None:
        """DeepSpeed: write this rank's EMA fragments to ``folder`` (every rank; no communication).

        Until the next update, :meth:`state_dict` then gives only a marker pointing at them.

        Returns:
            The rank's file, or ``None`` without a DeepSpeed engine or before the EMA is prepared.
        """
        if self.shadow is None or not self._deepspeed:
            return None
        from tread_scale.trainer.backends.ema_shards import save_ema_shard

        path = save_ema_shard(folder, self._master, self.shadow, self.decay, tag)
        self._shards_tag = tag
        return path

    def load_shards(self, folder: str | Path, tag: str) -> bool:
        """DeepSpeed: restore the shadow from the fragment files of ``tag`` if the loaded state pointed at them.

        Each rank reads the ranges of its own pieces from whichever files hold them (memory-mapped).

        Returns:
            Whether the EMA was restored (``False``: the loaded checkpoint held the full EMA, or none).

        Raises:
            CheckpointError: If the marker names another tag, or the files are missing, incomplete or of
                other shapes.
        """
        if self._pending is None:
            return False
        if self._pending.get("tag") != tag:
            raise CheckpointError(f"the Composer checkpoint's EMA points at the DeepSpeed tag "
                                  f"{self._pending.get('tag')!r}, but the engine checkpoint being loaded is {tag!r}")
        from tread_scale.trainer.backends.ema_shards import EMAShards

        shards = EMAShards(folder)
        if shards.tag != tag:
            raise CheckpointError(f"{folder}: EMA shard files of tag {shards.tag!r}, expected {tag!r}")
        missing = sorted(set(self.shadow) - set(shards.shapes))
        if missing:
            raise CheckpointError(f"{folder}: the EMA shard files lack parameters {missing[:5]}")
        with torch.no_grad():
            for n, t in self.shadow.items():
                shape = self._master.full_shape(n)
                if tuple(shards.shapes[n]) != tuple(shape):
                    raise CheckpointError(f"{folder}: EMA parameter {n!r} has shape {shards.shapes[n]} in the "
                                          f"shard files, {shape} in the model")
                start, stop = self._master.span(n)
                piece = torch.zeros(t.shape, dtype=torch.float32)
                piece[: stop - start] = shards.read(n, start, stop)
                t.copy_(piece)
        self._pending = None
        self._shards_tag = tag
        log.info("EMA restored from the DeepSpeed EMA shard files %s (%d tensors, written by %d ranks)", folder,
                 len(self.shadow), shards.world_size)
        return True

    def state_dict(self) -> dict[str, Any]:
        if self.shadow is None:
            return {"decay": self.decay, "shadow": {}}
        if self._shards_tag is not None:  # DeepSpeed: the values are in the tag's EMA shard files
            from tread_scale.trainer.backends.ema_shards import LAYOUT

            return {"decay": self.decay, "layout": LAYOUT, "tag": self._shards_tag,
                    "world_size": self._master.world, "shadow": {}}
        if self._sharded_checkpoint:  # DCP saves and loads DTensors shard by shard, in place
            return {"decay": self.decay, "shadow": self.shadow}
        if self._deepspeed:
            log.warning("EMA: no DeepSpeed EMA shard files were written for this checkpoint; gathering the full "
                        "EMA into it on every rank")
        return {"decay": self.decay, "shadow": {n: self._master.gather(n, t) for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("layout") is not None:
            from tread_scale.trainer.backends.ema_shards import LAYOUT

            if state["layout"] != LAYOUT:
                raise CheckpointError(f"EMA state of layout {state['layout']!r} in the checkpoint; this code reads "
                                      f"{LAYOUT!r} or the full EMA")
            if self.shadow is None or not self._deepspeed:
                raise CheckpointError("the checkpoint's EMA is in DeepSpeed EMA shard files "
                                      f"(tag {state.get('tag')!r}): "
                                      "resume it with parallelism.backend=deepspeed")
            self._pending = dict(state)
            return
        loaded = state.get("shadow") or {}
        if not loaded:
            return
        if self.shadow is None:
            raise RuntimeError("EMA state was loaded before the model was prepared (no BEFORE_LOAD event)")
        missing = set(self.shadow) - set(loaded)
        if missing:
            raise RuntimeError(f"EMA state in the checkpoint lacks parameters {sorted(missing)[:5]}")
        with torch.no_grad():
            for n, t in self.shadow.items():
                if loaded[n] is not t:
                    t.copy_(self._master.piece_of(n, loaded[n]))
        log.info("EMA restored from checkpoint (%d tensors)", len(self.shadow))

    def full_state_dict(self, state: State) -> dict[str, torch.Tensor]:
        """The DiT's full state dict on CPU, fp32 EMA values for the averaged parameters (collective)."""
        return master_state_dict(state.model, dit_of(state.model), self.shadow)
