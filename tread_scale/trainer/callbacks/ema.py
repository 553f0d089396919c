"""``EMA``: exponential moving average of the DiT's trainable parameters, as a Composer callback."""

from __future__ import annotations

import logging
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from tread_scale.trainer.backends.master import MasterWeights, master_state_dict, master_weights
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
    communication. Full tensors are gathered only to save a non-sharded checkpoint, export weights or sample.

    Args:
        decay: EMA decay per step (0.9999 in the reference; constant, no warm-up).
    """

    def __init__(self, decay: float = 0.9999) -> None:
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] | None = None
        self._master: MasterWeights | None = None
        self._sharded_checkpoint = False

    def _prepare(self, state: State) -> None:
        params = {n: p for n, p in dit_of(state.model).named_parameters() if p.requires_grad}
        self._master = master_weights(state.model, params)

    def before_load(self, state: State, logger: Logger) -> None:
        # after the model is wrapped/sharded (and a DeepSpeed engine built), before a checkpoint is loaded
        self._prepare(state)
        self._sharded_checkpoint = bool(getattr(state, "fsdp_sharded_state_dict_enabled", False))
        if self.shadow is None:
            self.shadow = {n: t.float().clone() for n, t in self._master.local().items()}

    def fit_start(self, state: State, logger: Logger) -> None:
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

    def state_dict(self) -> dict[str, Any]:
        if self.shadow is None:
            return {"decay": self.decay, "shadow": {}}
        if self._sharded_checkpoint:  # DCP saves and loads DTensors shard by shard, in place
            return {"decay": self.decay, "shadow": self.shadow}
        return {"decay": self.decay, "shadow": {n: self._master.gather(n, t) for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
