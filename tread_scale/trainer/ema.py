"""``EMA``: exponential moving average of the DiT's trainable parameters, as a Composer callback."""

from __future__ import annotations

import logging
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from tread_scale.trainer.utils import dit_of

log = logging.getLogger(__name__)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a (possibly sharded DTensor) tensor. Collective for DTensors: call on every rank."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True)


class EMA(Callback):
    """Shadow copy ``θ_ema ← decay·θ_ema + (1 − decay)·θ`` after every optimizer step (spec §4.2).

    Only parameters with ``requires_grad`` are averaged (the fixed positional table is a buffer). The
    shadow lives on the parameters' device and in their layout (sharded when they are), and is saved with
    the checkpoint through :meth:`state_dict`.

    Args:
        decay: EMA decay per step (0.9999 in the reference; constant, no warm-up).
    """

    def __init__(self, decay: float = 0.9999) -> None:
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] | None = None
        self._loaded: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _params(state: State) -> dict[str, torch.Tensor]:
        return {n: p for n, p in dit_of(state.model).named_parameters() if p.requires_grad}

    def fit_start(self, state: State, logger: Logger) -> None:
        params = self._params(state)
        if self._loaded is not None:
            missing = set(params) - set(self._loaded)
            if missing:
                raise RuntimeError(f"EMA state in the checkpoint lacks parameters {sorted(missing)[:5]}")
            self.shadow = {}
            for n, p in params.items():
                src = self._loaded[n]
                if hasattr(p, "device_mesh") and not hasattr(src, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    src = distribute_tensor(src.to(p.device), p.device_mesh, p.placements)
                self.shadow[n] = src.to(device=p.device, dtype=p.dtype).detach().clone()
            self._loaded = None
            log.info("EMA restored from checkpoint (%d tensors)", len(self.shadow))
        elif self.shadow is None:
            self.shadow = {n: p.detach().clone() for n, p in params.items()}

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.shadow is None:
            return
        params = self._params(state)
        with torch.no_grad():
            torch._foreach_lerp_(list(self.shadow.values()), [params[n].detach() for n in self.shadow],
                                 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        shadow = self.shadow if self.shadow is not None else self._loaded
        return {"decay": self.decay, "shadow": None if shadow is None else {n: _full(t) for n, t in shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("shadow") is None:
            return
        self._loaded = dict(state["shadow"])
        self.shadow = None

    def full_state_dict(self, state: State) -> dict[str, torch.Tensor]:
        """The DiT's full state dict on CPU with EMA values for the averaged parameters (collective)."""
        net = dit_of(state.model)
        out = {n: _full(t) for n, t in net.state_dict().items()}
        if self.shadow is not None:
            out.update({n: _full(t) for n, t in self.shadow.items()})
        return out
