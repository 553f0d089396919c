"""Where each backend keeps the fp32 master weights the optimizer updates, as per-rank local pieces.

Under bf16 autocast the optimizer of every backend steps on fp32 weights, but what the module holds differs:

* DDP and a single process: the module's parameters are the fp32 master weights (autocast casts a bf16
  copy per op);
* FSDP2: the module's sharded parameters (DTensors) stay fp32 under every ``mixed_precision`` policy; only
  the unsharded copies gathered for forward/backward are bf16 (``default``);
* DeepSpeed: in bf16 mode the module's parameters *are* bf16 (ZeRO-3: their partitions); the fp32 master
  copy lives in the ZeRO optimizer's flat partitions (:class:`~tread_scale.compat.deepspeed.DeepSpeedMaster`).

:func:`master_weights` gives one interface over the three, so the EMA averages, and exports write, the fp32
weights the optimizer updates, under every backend and precision.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from tread_scale.parallel.params import full_shape, gather_full, gather_full_to, local_piece, piece_of_full


class MasterWeights(Protocol):
    """The fp32 master copy of a set of parameters, as this rank holds it.

    ``local()`` gives name → local piece (a view that the optimizer updates in place); ``gather`` and
    ``piece_of`` convert between a value laid out like a local piece and the full parameter-shaped tensor;
    ``gather_to`` gathers onto one rank only.
    """

    params: dict[str, nn.Parameter]

    def local(self) -> dict[str, torch.Tensor]: ...

    def gather(self, name: str, piece: torch.Tensor) -> torch.Tensor: ...

    def gather_to(self, name: str, piece: torch.Tensor, dst: int = 0) -> torch.Tensor | None: ...

    def full_shape(self, name: str) -> tuple[int, ...]: ...

    def piece_of(self, name: str, full: torch.Tensor) -> torch.Tensor: ...


class ModuleMaster:
    """The module's own parameters as master weights: plain tensors (DDP, one process) or DTensors (FSDP2).

    Args:
        params: Name → parameter.
    """

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.params = params

    def local(self) -> dict[str, torch.Tensor]:
        return {n: local_piece(p) for n, p in self.params.items()}

    def gather(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        return gather_full(self.params[name], piece)

    def gather_to(self, name: str, piece: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        return gather_full_to(self.params[name], piece, dst)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return full_shape(self.params[name])

    def piece_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        param = self.params[name]
        like = local_piece(param)
        if type(full) is type(like) and full.shape == like.shape:
            return full.detach().to(like.device, torch.float32, copy=True)
        return piece_of_full(param, like.float(), full)


def is_deepspeed_engine(model: nn.Module) -> bool:
    """Whether ``model`` is a ``DeepSpeedEngine`` (without importing DeepSpeed when nothing has)."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def master_weights(model: nn.Module, params: dict[str, nn.Parameter]) -> MasterWeights:
    """The fp32 master weights of ``params`` (parameters of ``model``, the possibly wrapped training model)."""
    if is_deepspeed_engine(model):
        from tread_scale.compat.deepspeed import DeepSpeedMaster

        return DeepSpeedMaster(model, params)
    return ModuleMaster(params)


def master_state_dict(model: nn.Module, net: nn.Module,
                      replace: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``net``'s full state dict on CPU with the fp32 master values of its trainable parameters (collective).

    Args:
        model: The training model as the trainer holds it (wrapped, sharded or a DeepSpeed engine).
        net: The module inside ``model`` whose state dict is wanted (the DiT).
        replace: Name → local piece (laid out like the master's) used instead of the master value, e.g. the
            EMA shadow.
    """
    replace = replace or {}
    params = dict(net.named_parameters())
    master = master_weights(model, {n: p for n, p in params.items() if p.requires_grad})
    local = master.local()
    out: dict[str, torch.Tensor] = {}
    for name, value in net.state_dict(keep_vars=True).items():
        if name in master.params:
            out[name] = master.gather(name, replace.get(name, local[name]))
        elif name in params:
            out[name] = gather_full(params[name], local_piece(params[name]))
        else:
            out[name] = gather_full(value, value.detach())
    return out


def master_state_specs(model: nn.Module, net: nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name → (dtype, full shape) of each tensor :func:`master_state_dict` gives, without gathering anything."""
    params = dict(net.named_parameters())
    master = master_weights(model, {n: p for n, p in params.items() if p.requires_grad})
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, value in net.state_dict(keep_vars=True).items():
        if name in master.params:
            out[name] = (torch.float32, master.full_shape(name))
        else:
            out[name] = (value.dtype, full_shape(params.get(name, value)))
    return out


def gather_master_state(model: nn.Module, net: nn.Module, names: Sequence[str],
                        replace: dict[str, torch.Tensor] | None = None,
                        dst: int = 0) -> Iterator[tuple[str, torch.Tensor | None]]:
    """:func:`master_state_dict`'s tensors one at a time, in the order of ``names``, gathered onto rank ``dst``.

    Every rank must iterate to the end (each tensor is a collective under the sharded backends); rank ``dst``
    gets ``(name, full CPU tensor)``, the others ``(name, None)`` and keep nothing, so no rank ever holds
    more than about one full tensor.

    Args:
        model: The training model as the trainer holds it.
        net: The module inside ``model`` (the DiT).
        names: Names of ``net.state_dict()``, in the order wanted (the same on every rank).
        replace: Name → local piece used instead of the master value (the EMA shadow).
        dst: Global rank that receives the tensors.
    """
    replace = replace or {}
    params = dict(net.named_parameters())
    master = master_weights(model, {n: p for n, p in params.items() if p.requires_grad})
    state, local = net.state_dict(keep_vars=True), master.local()
    for name in names:
        if name in master.params:
            yield name, master.gather_to(name, replace.get(name, local[name]), dst)
        elif name in params:
            yield name, gather_full_to(params[name], local_piece(params[name]), dst)
        else:
            yield name, gather_full_to(state[name], state[name].detach(), dst)


__all__ = ["MasterWeights", "ModuleMaster", "is_deepspeed_engine", "master_weights", "master_state_dict",
           "master_state_specs", "gather_master_state"]
