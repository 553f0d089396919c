"""FSDP2 through Composer: the ``FSDP2Config`` of a run, HSDP included."""

from __future__ import annotations

from dataclasses import dataclass

from composer.utils.parallelism import FSDP2Config

from tread_scale.config import FSDPConfig
from tread_scale.errors import ConfigError


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


def composer_mixed_precision(mixed_precision: str, grad_reduce_dtype: str = "fp32") -> str:
    """Composer's FSDP2 policy name for our ``fsdp.mixed_precision`` and ``parallelism.grad_reduce_dtype``.

    Composer's policies (``get_mixed_precision``), under ``amp_bf16``: ``DEFAULT`` gathers bf16 parameters
    for compute and reduce-scatters gradients in fp32; ``PURE`` also reduces in bf16; ``FULL`` keeps both in
    fp32. The sharded master weights (and hence the optimizer and the EMA) are fp32 under all three.

    Raises:
        ConfigError: For ``pure`` (replaced by ``grad_reduce_dtype``) or ``full`` with bf16 reduction.
    """
    if mixed_precision == "pure":
        raise ConfigError("parallelism.fsdp.mixed_precision=pure is replaced by parallelism.grad_reduce_dtype=bf16")
    if mixed_precision == "full":
        if grad_reduce_dtype != "fp32":
            raise ConfigError("parallelism.grad_reduce_dtype=bf16 needs parallelism.fsdp.mixed_precision=default")
        return "FULL"
    return "PURE" if grad_reduce_dtype == "bf16" else "DEFAULT"


def fsdp2_config(cfg: FSDPConfig, grad_reduce_dtype: str = "fp32") -> HSDP2Config:
    """The Composer FSDP2 config for our settings (wrap units come from ``DiT.fsdp_wrap_fn``)."""
    return HSDP2Config(reshard_after_forward=cfg.reshard_after_forward,
                       mixed_precision=composer_mixed_precision(cfg.mixed_precision, grad_reduce_dtype),
                       state_dict_type=cfg.state_dict_type, activation_checkpointing=False, replicate=cfg.replicate)
