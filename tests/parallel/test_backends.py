"""DDP, FSDP2 (ZeRO-3 and ZeRO-2 style) and DeepSpeed ZeRO 1/2/3 on 2 real processes (gloo, CPU).

Each backend trains the same tiny TREAD DiT from the same seed on the same global batch as a
single-process run. Stated tolerances:

* the global-batch loss agrees at every step within 1e-4 (relative): only the order of floating-point
  reductions differs;
* the EMA weights agree within 1e-3 (absolute) after 6 steps: Adam normalises each gradient entry, so an
  entry whose gradient is ~0 can move by up to lr = 1e-3 per step either way when reductions round
  differently.

A run checkpointed at step 3 and resumed (autoresume) reproduces steps 4..6 within the same tolerances.
"""

import shutil

import pytest
import torch

from tests.conftest import tiny_run_cfg
from tests.parallel.launcher import launch, losses
from tread_scale.weights import load_weights

pytestmark = pytest.mark.slow  # > 30 s each on a 2-core CPU (make test-quick skips them)

BACKENDS = {
    "ddp": ["parallelism.backend=ddp"],
    "fsdp_reshard": ["parallelism.backend=fsdp", "parallelism.fsdp.reshard_after_forward=true"],
    "fsdp_keep": ["parallelism.backend=fsdp", "parallelism.fsdp.reshard_after_forward=false",
                  "parallelism.fsdp.state_dict_type=full"],
    "zero1": ["parallelism.backend=deepspeed", "parallelism.deepspeed.zero_stage=1"],
    "zero2": ["parallelism.backend=deepspeed", "parallelism.deepspeed.zero_stage=2"],
    "zero3": ["parallelism.backend=deepspeed", "parallelism.deepspeed.zero_stage=3"],
}
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-3


def _cfg(data, out, name, **over):
    cfg = tiny_run_cfg(data, out, train={"max_duration": "6ba", "save_interval": "3ba", "global_batch_size": 8,
                                         "device_microbatch_size": 2},
                       logging={"metrics_interval": 1}, **over)
    cfg["run_name"] = name
    cfg["sampling"] = {"every": None, "at_fit_end": False}
    return cfg


@pytest.fixture(scope="module")
def reference(latent_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    launch(_cfg(latent_dataset, out, "ref"), 1, out)
    return losses(out / "ref"), load_weights(out / "ref" / "ema" / "latest.safetensors")[0]


def _assert_matches(run, reference, steps):
    ref_losses, ref_weights = reference
    got = losses(run)
    for s in steps:
        assert got[s] == pytest.approx(ref_losses[s], rel=LOSS_RTOL), f"step {s}: {got[s]} vs {ref_losses[s]}"
    weights, meta = load_weights(run / "ema" / "latest.safetensors")
    assert meta["step"] == 6 and weights.keys() == ref_weights.keys()
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
    assert worst < WEIGHT_ATOL, f"EMA weights differ by {worst}"


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_ranks_match_one_process_and_resume_exactly(backend, latent_dataset, tmp_path, reference):
    cfg = _cfg(latent_dataset, tmp_path, backend)
    # first 3 steps, checkpoint at 3; then a relaunch of the same command autoresumes to 6
    launch(cfg, 2, tmp_path, *BACKENDS[backend], "train.max_duration=3ba")
    run = tmp_path / backend
    assert sorted(losses(run)) == [1, 2, 3]
    launch(cfg, 2, tmp_path, *BACKENDS[backend])
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    _assert_matches(run, reference, range(1, 7))
    ckpts = run / "checkpoints"
    if backend == "fsdp_reshard":
        assert (ckpts / "ep0-ba3").is_dir() and list((ckpts / "ep0-ba3").glob("*.distcp"))  # sharded (DCP)
    if backend.startswith("zero"):
        assert (ckpts / "deepspeed" / "ba3").is_dir() and (ckpts / "deepspeed" / "ba6").is_dir()


def test_activation_checkpointing_under_fsdp_changes_nothing(latent_dataset, tmp_path, reference):
    cfg = _cfg(latent_dataset, tmp_path, "fsdp_ac")
    launch(cfg, 2, tmp_path, *BACKENDS["fsdp_reshard"], "parallelism.activation_checkpointing=true")
    _assert_matches(tmp_path / "fsdp_ac", reference, range(1, 7))


def test_deepspeed_offload_trains(latent_dataset, tmp_path, reference):
    cfg = _cfg(latent_dataset, tmp_path, "zero3_offload")
    launch(cfg, 2, tmp_path, *BACKENDS["zero3"], "parallelism.deepspeed.offload_optimizer=true",
           "parallelism.deepspeed.offload_params=true")
    _assert_matches(tmp_path / "zero3_offload", reference, range(1, 7))
