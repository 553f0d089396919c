"""``EMA``: exponential moving average of the DiT's trainable parameters, as a Composer callback."""

from __future__ import annotations

import logging
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from tread_scale.parallel.params import full_state_dict, gather_full, local_piece, piece_of_full
from tread_scale.trainer.model import dit_of

log = logging.getLogger(__name__)


class EMA(Callback):
    """Shadow copy ``θ_ema ← decay·θ_ema + (1 − decay)·θ`` after every optimizer step (spec §4.2).

    Only parameters with ``requires_grad`` are averaged (the fixed positional table is a buffer). The
    shadow is kept in fp32 and **sharded exactly like the parameters**: a DTensor under FSDP2, the rank's flat
    partition under DeepSpeed ZeRO-3, a full copy otherwise. Its memory is therefore one extra copy of
    each rank's parameter shard (4 bytes per local parameter element in fp32), and the update is a local
    ``lerp`` with no communication. Full tensors are gathered only to save a non-sharded checkpoint,
    export weights or sample.

    Args:
        decay: EMA decay per step (0.9999 in the reference; constant, no warm-up).
    """

    def __init__(self, decay: float = 0.9999) -> None:
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] | None = None
        self._params: dict[str, torch.Tensor] = {}
        self._sharded_checkpoint = False

    def _trainable(self, state: State) -> dict[str, torch.Tensor]:
        return {n: p for n, p in dit_of(state.model).named_parameters() if p.requires_grad}

    def before_load(self, state: State, logger: Logger) -> None:
        # after the model is wrapped/sharded and before a checkpoint is loaded into the shadow
        self._params = self._trainable(state)
        self._sharded_checkpoint = bool(getattr(state, "fsdp_sharded_state_dict_enabled", False))
        if self.shadow is None:
            self.shadow = {n: local_piece(p).float().clone() for n, p in self._params.items()}

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.shadow is None:
            self.before_load(state, logger)
        self._params = self._trainable(state)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.shadow is None:
            return
        with torch.no_grad():
            names = list(self.shadow)
            torch._foreach_lerp_([self.shadow[n] for n in names], [local_piece(self._params[n]).float() for n in names],
                                 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        if self.shadow is None:
            return {"decay": self.decay, "shadow": {}}
        if self._sharded_checkpoint:  # DCP saves and loads DTensors shard by shard, in place
            return {"decay": self.decay, "shadow": self.shadow}
        return {"decay": self.decay,
                "shadow": {n: gather_full(self._params[n], t) for n, t in self.shadow.items()}}

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
                src = loaded[n]
                if src is t:
                    continue
                if type(src) is type(t) and src.shape == t.shape:
                    t.copy_(src.to(t.device, t.dtype))
                else:
                    t.copy_(piece_of_full(self._params[n], t, src))
        log.info("EMA restored from checkpoint (%d tensors)", len(self.shadow))

    def full_state_dict(self, state: State) -> dict[str, torch.Tensor]:
        """The DiT's full state dict on CPU with EMA values for the averaged parameters (collective)."""
        return full_state_dict(dit_of(state.model), self.shadow)
