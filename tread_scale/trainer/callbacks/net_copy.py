"""The network as the callbacks that sample or evaluate see it: unwrapped, with the EMA (or raw) weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from composer.core import State

from tread_scale.models.dit import DiT
from tread_scale.trainer.backends.master import master_state_dict
from tread_scale.trainer.callbacks.ema import EMA
from tread_scale.trainer.model import dit_of


def weights_to_sample(state: State, ema: EMA | None) -> dict[str, torch.Tensor]:
    """The network's full state dict on CPU, EMA values where averaged, else the fp32 master weights (collective)."""
    return ema.full_state_dict(state) if ema is not None else master_state_dict(state.model, dit_of(state.model))


class NetCopy:
    """An unwrapped DiT or MMDiT of the trained architecture, built once and loaded with given weights on demand.

    It works the same under every parallelism backend (the trained model may be sharded or wrapped), and
    goes back to the CPU between uses so it holds no accelerator memory during training.

    Args:
        make_net: Builds an unwrapped DiT or MMDiT of the trained architecture (an MMDiT's null condition, the
            empty prompt, comes with the weights).
    """

    def __init__(self, make_net: Callable[[], DiT]) -> None:
        self.make_net = make_net
        self._net: DiT | None = None

    def load(self, state: State, weights: dict[str, torch.Tensor]) -> DiT:
        """The copy on the training device with ``weights`` loaded (strictly)."""
        device = next(dit_of(state.model).parameters()).device
        if self._net is None:
            self._net = self.make_net()
        net = self._net.to(device)
        net.load_state_dict(weights, strict=True)
        return net

    def park(self) -> None:
        """Move the copy back to the CPU."""
        if self._net is not None:
            self._net.to("cpu")
