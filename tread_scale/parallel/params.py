"""Sharding-aware access to parameters: the local piece a rank owns, and full tensors gathered on demand.

Three layouts occur:

* plain tensors (single process, DDP, DeepSpeed ZeRO-1/2): the local piece is the parameter itself;
* DTensors (FSDP2): the local piece is the DTensor, whose ``full_tensor()`` gathers;
* DeepSpeed ZeRO-3: the parameter is a placeholder and ``param.ds_tensor`` is this rank's flat partition of
  the flattened parameter (padded to ``world × partition`` elements).

Gathering functions are collective: every rank must call them.
"""

from __future__ import annotations

import torch
from torch import nn


def is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_tensor")


def local_piece(param: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's share of ``param`` (detached; shares storage)."""
    if is_zero3(param):
        return param.ds_tensor.detach()
    return param.detach()


def gather_full(param: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
    """Full CPU copy of a parameter-shaped value whose local piece is ``piece`` (same layout as ``param``)."""
    if hasattr(piece, "full_tensor"):
        return piece.full_tensor().detach().to("cpu", copy=True)
    if is_zero3(param):
        import torch.distributed as dist

        parts = [torch.empty_like(piece) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, piece.contiguous())
        flat = torch.cat(parts)[: param.ds_numel]
        return flat.view(param.ds_shape).to("cpu", copy=True)
    return piece.detach().to("cpu", copy=True)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The full shape of ``param`` (a ZeRO-3 parameter is an empty placeholder; a DTensor's is its global one)."""
    return tuple(param.ds_shape) if is_zero3(param) else tuple(param.shape)


def gather_full_to(param: torch.Tensor, piece: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
    """Like :func:`gather_full`, but only global rank ``dst`` keeps the full copy (``None`` elsewhere; collective
    under FSDP2 and ZeRO-3, where the other ranks hold one transient tensor at most)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if is_zero3(param) and dist.get_world_size() > 1:
        mine = piece.contiguous()
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())] if rank == dst else None
        dist.gather(mine, parts, dst=dst)
        if parts is None:
            return None
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).to("cpu", copy=True)
    if hasattr(piece, "full_tensor"):
        full = piece.full_tensor()  # an all-gather: one transient full tensor on every rank
        return full.detach().to("cpu", copy=True) if rank == dst else None
    return piece.detach().to("cpu", copy=True) if rank == dst else None


def piece_of_full(param: torch.Tensor, piece: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a full (CPU) parameter-shaped tensor, laid out like ``piece``."""
    if hasattr(piece, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(piece.device, piece.dtype), piece.device_mesh, piece.placements)
    if is_zero3(param):
        import torch.distributed as dist

        n = piece.numel()
        flat = full.reshape(-1).to(piece.device, piece.dtype)
        padded = torch.zeros(n * dist.get_world_size(), dtype=flat.dtype, device=flat.device)
        padded[: flat.numel()] = flat
        r = dist.get_rank()
        return padded[r * n: (r + 1) * n].clone()
    return full.to(piece.device, piece.dtype).clone()


def full_state_dict(net: nn.Module, replace: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The module's full state dict on CPU; ``replace`` maps parameter names to local pieces used instead.

    Collective under FSDP2 and ZeRO-3.
    """
    replace = replace or {}
    params = dict(net.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, value in net.state_dict(keep_vars=True).items():
        if name in params:
            param = params[name]
            out[name] = gather_full(param, replace.get(name, local_piece(param)))
        else:
            out[name] = gather_full(value, value.detach())
    return out
