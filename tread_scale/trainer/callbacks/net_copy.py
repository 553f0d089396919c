"""The network as the callbacks that sample or evaluate see it: unwrapped, with the EMA (or raw) weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from composer.core import State

from tread_scale.models.dit import DiT
from tread_scale.trainer.backends.master import gather_master_state, master_state_dict, master_state_specs
from tread_scale.trainer.callbacks.ema import EMA
from tread_scale.trainer.model import dit_of
from tread_scale.weights import WeightsMeta, safetensors_order, save_weights_streaming


def weights_to_sample(state: State, ema: EMA | None) -> dict[str, torch.Tensor]:
    """The network's full state dict on CPU, EMA values where averaged, else the fp32 master weights (collective)."""
    return ema.full_state_dict(state) if ema is not None else master_state_dict(state.model, dit_of(state.model))


def save_weights_to_sample(state: State, ema: EMA | None, path: Path | None, meta: WeightsMeta) -> Path | None:
    """Write :func:`weights_to_sample`'s weights to ``path`` without any rank holding them all (collective).

    Every rank calls it; the one rank that passes a ``path`` (global rank 0) receives the tensors one at a time,
    in the file's order, and writes each as it arrives (:func:`~tread_scale.weights.save_weights_streaming`:
    the file is byte-identical to ``save_weights(path, weights_to_sample(...), meta)``); the others take part
    in each tensor's gather and keep nothing. Peak host memory: about one full tensor on rank 0.

    Returns:
        ``path`` on the writing rank, ``None`` elsewhere.
    """
    from composer.utils import dist

    model, net = state.model, dit_of(state.model)
    specs = master_state_specs(model, net)
    tensors = gather_master_state(model, net, safetensors_order(specs), ema.shadow if ema is not None else None,
                                  dst=0)
    if path is None:
        for _ in tensors:
            pass
        return None
    if dist.get_global_rank() != 0:
        raise ValueError("save_weights_to_sample: only global rank 0 writes the file")
    return save_weights_streaming(path, specs, tensors, meta)


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
