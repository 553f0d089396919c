"""Bad sharding configs fail before any work, with the key at fault named."""

import pytest

from tread_scale.config import DeepSpeedConfig, FSDPConfig, ParallelismConfig, config_from_dict, validate_parallelism
from tread_scale.errors import ConfigError

from tests.conftest import tiny_run_cfg


@pytest.mark.parametrize("parallelism,message", [
    ({"backend": "deepspeed", "deepspeed": {"zero_stage": 4}}, r"parallelism.deepspeed.zero_stage must be 1, 2 or 3, got 4"),
    ({"backend": "deepspeed", "deepspeed": {"zero_stage": 2, "offload_params": True}},
     r"parallelism.deepspeed.offload_params needs zero_stage 3 \(got 2\)"),
    ({"backend": "megatron"}, r"parallelism.backend: 'megatron' is not one of 'ddp', 'fsdp', 'deepspeed'"),
    ({"backend": "deepspeed", "fsdp": {"reshard_after_forward": False}},
     r"parallelism.fsdp is set but parallelism.backend is 'deepspeed'"),
    ({"backend": "ddp", "deepspeed": {"zero_stage": 1}}, r"parallelism.deepspeed is set but parallelism.backend is 'ddp'"),
    ({"backend": "fsdp", "fsdp": {"replicate": 0}}, r"parallelism.fsdp.replicate must be >= 1"),
    ({"backend": "fsdp", "fsdp": {"sharding": "full"}}, r"unknown config key 'parallelism.fsdp.sharding'"),
    ({"grad_reduce_dtype": "fp16"}, r"parallelism.grad_reduce_dtype: 'fp16' is not one of 'fp32', 'bf16'"),
    ({"backend": "fsdp", "fsdp": {"mixed_precision": "pure"}},
     r"mixed_precision=pure is replaced by parallelism.grad_reduce_dtype=bf16"),
    ({"backend": "fsdp", "grad_reduce_dtype": "bf16", "fsdp": {"mixed_precision": "full"}},
     r"grad_reduce_dtype=bf16 needs parallelism.fsdp.mixed_precision=default"),
    ({"grad_reduce_dtype": "bf16"}, r"grad_reduce_dtype=bf16 needs train.precision amp_bf16 .*got fp32"),
])
def test_bad_parallelism_configs(tmp_path, parallelism, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(tiny_run_cfg("/d", tmp_path, parallelism=parallelism))


def test_mesh_that_does_not_divide_the_world():
    with pytest.raises(ConfigError, match=r"replicate=2 does not divide the world size 3"):
        validate_parallelism(ParallelismConfig(backend="fsdp", fsdp=FSDPConfig(replicate=2)), world_size=3)
    validate_parallelism(ParallelismConfig(backend="fsdp", fsdp=FSDPConfig(replicate=2)), world_size=4)


def test_deepspeed_config_maps_our_keys():
    from tread_scale.trainer.backends.deepspeed import deepspeed_config

    ds = deepspeed_config(DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True), microbatch=4,
                          world_size=8, precision="amp_bf16", grad_clip_norm=None, device="gpu")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 32
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0 by default; the reference does not clip
    assert ds["managed_gradient_accumulation"] is False and ds["gradient_accumulation_steps"] == 1
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ds["bf16"] == {"enabled": True}
    assert deepspeed_config(DeepSpeedConfig(zero_stage=1), 4, 2, "fp32", 1.0, "cpu")["zero_optimization"]["overlap_comm"] is False
    with pytest.raises(ConfigError, match="not amp_fp16"):
        deepspeed_config(DeepSpeedConfig(), 4, 2, "amp_fp16", None, "gpu")


def test_hsdp_config_asks_composer_for_a_2d_mesh():
    from tread_scale.trainer.backends.fsdp import fsdp2_config

    cfg = fsdp2_config(FSDPConfig(replicate=2, reshard_after_forward=False), "bf16")
    assert cfg.data_parallel_replicate_degree == 2 and cfg.data_parallel_shard_degree == -1
    assert cfg.reshard_after_forward is False and cfg.mixed_precision == "PURE"
    assert fsdp2_config(FSDPConfig()).data_parallel_replicate_degree is None


def test_validate_parallelism_resolves_a_missing_section():
    p = ParallelismConfig(backend="deepspeed")
    validate_parallelism(p)
    assert p.deepspeed == DeepSpeedConfig() and p.fsdp is None


def test_gradient_reduction_dtype_reaches_every_backend():
    """``parallelism.grad_reduce_dtype`` (fp32 by default) sets FSDP2's and DeepSpeed's reduction dtype."""
    from tread_scale.trainer.backends.deepspeed import deepspeed_config
    from tread_scale.trainer.backends.fsdp import composer_mixed_precision

    assert ParallelismConfig().grad_reduce_dtype == "fp32"
    # Composer's policies: DEFAULT = bf16 params, fp32 reduce; PURE = bf16 both; FULL = fp32 both
    assert composer_mixed_precision("default") == "DEFAULT" and composer_mixed_precision("full") == "FULL"
    assert composer_mixed_precision("default", "bf16") == "PURE"
    for reduce in ("fp32", "bf16"):
        ds = deepspeed_config(DeepSpeedConfig(), 4, 2, "amp_bf16", None, "gpu", reduce)
        assert ds["communication_data_type"] == reduce and ds["data_types"] == {"grad_accum_dtype": reduce}
    assert deepspeed_config(DeepSpeedConfig(), 4, 2, "amp_bf16", None, "gpu")["communication_data_type"] == "fp32"
    with pytest.raises(ConfigError, match="needs train.precision amp_bf16"):
        deepspeed_config(DeepSpeedConfig(), 4, 2, "fp32", None, "cpu", "bf16")
