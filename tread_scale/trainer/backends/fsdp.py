"""FSDP2 through Composer: the ``FSDP2Config`` of a run, HSDP included."""

from __future__ import annotations

from dataclasses import dataclass

from composer.utils.parallelism import FSDP2Config

from tread_scale.config import FSDPConfig


@dataclass
class HSDP2Config(FSDP2Config):
    """Composer's ``FSDP2Config`` with a replica count: Composer then builds a 2-D
    ``(data_parallel_replicate, data_parallel_shard)`` mesh, i.e. HSDP (shard within a replica group,
    all-reduce across groups). With ``replicate = 1`` it is plain FSDP2.
    """

    replicate: int = 1

    @property
    def data_parallel_replicate_degree(self) -> int | None:  # type: ignore[override]
        return self.replicate if self.replicate > 1 else None


def fsdp2_config(cfg: FSDPConfig) -> HSDP2Config:
    """The Composer FSDP2 config for our settings (wrap units come from ``DiT.fsdp_wrap_fn``)."""
    return HSDP2Config(reshard_after_forward=cfg.reshard_after_forward, mixed_precision=cfg.mixed_precision.upper(),
                       state_dict_type=cfg.state_dict_type, activation_checkpointing=False, replicate=cfg.replicate)
