"""Everything tread_scale reads or writes inside DeepSpeed 0.19.8's ZeRO optimizers: the fp32 master weights.

In bf16 mode the engine casts the module's parameters to bf16 (``DeepSpeedEngine._cast_module_mixed_precision``:
``p.data = p.data.to(param_dtype)``) and the ZeRO optimizer keeps the fp32 copy the update is applied to
(the *master* weights) in flat partitions, one per rank. Upstream vs. here:

* Reading the master weights: upstream's public helpers are ``deepspeed.utils.safe_get_full_fp32_param``
  (an all-reduce per call and per parameter) and ``safe_get_local_fp32_param`` (ZeRO-3 only, and it moves
  the piece to the accelerator, synchronising a stream per parameter). The EMA needs every parameter's
  local fp32 piece under every stage, every step, where it lives (on the CPU under optimizer offload) and
  without communication. :class:`DeepSpeedMaster` reads it from the optimizer's own bookkeeping: under
  ZeRO-1/2 (``DeepSpeedZeroOptimizer`` and ``BF16_Optimizer``) the parameter's private ``_hp_mapping``
  (this rank's fragment of the flat fp32 partition and where it sits in the parameter; ``None`` when the
  rank owns none of it), under ZeRO-3 ``fp32_partitioned_groups_flat`` at ``grad_position``, which is what
  ``safe_get_local_fp32_param`` reads.
* Initial master weights: upstream builds them from the parameters *after* the bf16 cast, so bf16 training
  starts from bf16-rounded initial weights (DDP and FSDP2 start from the fp32 ones).
  :meth:`DeepSpeedMaster.restore` writes the fp32 initial weights into the master copy (the bf16
  parameters are already their rounding, so nothing else changes).
"""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

WRITTEN_FOR = "0.19.8"
if deepspeed.__version__ != WRITTEN_FOR:
    raise ImportError(f"tread_scale.compat.deepspeed was written for DeepSpeed {WRITTEN_FOR}, but "
                      f"{deepspeed.__version__} is installed: install the pinned version (requirements.lock) or "
                      "re-check how the ZeRO optimizers keep their fp32 partitions")


def _comm_device() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


class DeepSpeedMaster:
    """The fp32 master weights of a DeepSpeed engine's parameters, per parameter, as this rank holds them.

    The local piece of a parameter is a 1-D fp32 view into the optimizer's partition (it changes in place at
    every ``engine.step()``): under ZeRO-1/2 the fragment of the parameter this rank's partition holds
    (possibly empty), under ZeRO-3 the rank's partition of the flattened parameter (``ds_tensor``'s
    elements, padded to ``world × partition``). The pieces of all ranks tile the parameter.

    Args:
        engine: The ``DeepSpeedEngine`` (ZeRO stage 1, 2 or 3; bf16 or fp32).
        params: Name → parameter, each one the engine's optimizer updates.
    """

    def __init__(self, engine, params: dict[str, nn.Parameter]) -> None:
        self.optimizer = engine.optimizer
        self.params = params
        self.stage3 = engine.zero_optimization_stage() == 3
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = torch.device("cpu") if engine.zero_cpu_offload() else next(iter(params.values())).device

    def _piece(self, param: nn.Parameter) -> torch.Tensor:
        if self.stage3:
            group, offset, numel = self.optimizer.grad_position[self.optimizer.get_param_id(param)]
            return self.optimizer.fp32_partitioned_groups_flat[group].detach().narrow(0, offset, numel)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return torch.empty(0, dtype=torch.float32, device=self.device)
        return mapping.hp_fragment.detach()

    def local(self) -> dict[str, torch.Tensor]:
        """Name → this rank's fp32 piece (a view of the master copy; cheap, no communication)."""
        return {n: self._piece(p) for n, p in self.params.items()}

    def gather(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        """The full fp32 CPU tensor whose local piece (laid out like :meth:`local`) is ``piece`` (collective)."""
        param = self.params[name]
        dev = _comm_device()
        if self.stage3:
            parts = [torch.empty(piece.numel(), dtype=torch.float32, device=dev) for _ in range(self.world)]
            dist.all_gather(parts, piece.detach().to(dev, torch.float32).contiguous())
            return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).to("cpu", copy=True)
        full = torch.zeros(param.numel(), dtype=torch.float32, device=dev)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:  # fragments are disjoint: the sum adds zeros to each value, exactly
            start = mapping.lp_fragment_address.start
            full[start: start + piece.numel()] = piece.detach().to(dev, torch.float32)
        if self.world > 1:
            dist.all_reduce(full)
        return full.view(param.shape).to("cpu", copy=True)

    def gather_to(self, name: str, piece: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """Like :meth:`gather`, but only rank ``dst`` receives the full tensor (``None`` elsewhere; collective).

        ZeRO-3 pieces have one size on every rank (``gather``); ZeRO-1/2 fragments differ in size and place,
        so each rank puts its fragment into a zero buffer of the parameter's size for one ``reduce`` to
        ``dst`` (exact: the fragments are disjoint), freed at once on the other ranks.
        """
        param = self.params[name]
        dev = _comm_device()
        if self.world == 1:
            return self.gather(name, piece)
        if self.stage3:
            mine = piece.detach().to(dev, torch.float32).contiguous()
            parts = [torch.empty_like(mine) for _ in range(self.world)] if self.rank == dst else None
            dist.gather(mine, parts, dst=dst)
            if parts is None:
                return None
            return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).to("cpu", copy=True)
        full = torch.zeros(param.numel(), dtype=torch.float32, device=dev)
        start, stop = self.span(name)
        full[start:stop] = piece.detach()[: stop - start].to(dev, torch.float32)
        dist.reduce(full, dst=dst)
        return full.view(param.shape).to("cpu", copy=True) if self.rank == dst else None

    def full_shape(self, name: str) -> tuple[int, ...]:
        """The parameter's full shape (under ZeRO-3 the module holds an empty placeholder)."""
        param = self.params[name]
        return tuple(param.ds_shape) if self.stage3 else tuple(param.shape)

    def span(self, name: str) -> tuple[int, int]:
        """``(start, stop)``: the elements of the flattened parameter this rank's piece holds (its first
        ``stop - start`` values; a ZeRO-3 piece of the last ranks may continue with padding past the end).
        ``start == stop`` when the rank holds none of it.
        """
        param = self.params[name]
        if self.stage3:
            n = self._piece(param).numel()
            start = min(self.rank * n, param.ds_numel)
            return start, min(start + n, param.ds_numel)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return 0, 0
        address = mapping.lp_fragment_address
        return address.start, address.start + address.numel

    def piece_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece (laid out like :meth:`local`, fp32, a new tensor) of a full parameter-shaped tensor."""
        param = self.params[name]
        flat = full.detach().reshape(-1).to(self.device, torch.float32)
        if self.stage3:
            n = self._piece(param).numel()
            padded = torch.zeros(n * self.world, dtype=torch.float32, device=self.device)
            padded[: flat.numel()] = flat
            return padded[self.rank * n: (self.rank + 1) * n].clone()
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return torch.empty(0, dtype=torch.float32, device=self.device)
        address = mapping.lp_fragment_address
        return flat[address.start: address.start + address.numel].clone()

    @torch.no_grad()
    def restore(self, full: dict[str, torch.Tensor]) -> None:
        """Write full fp32 values (e.g. the initial weights before the bf16 cast) into the master copy."""
        local = self.local()
        for name, value in full.items():
            local[name].copy_(self.piece_of(name, value))


__all__ = ["DeepSpeedMaster", "WRITTEN_FOR"]
