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

import pytest

from tests.parallel.compare import (
    BACKENDS, RESUME_AT, STEPS, assert_checkpoint_layout, assert_matches, backend_run_cfg, run_outcome,
)
from tests.parallel.launcher import launch, losses

pytestmark = pytest.mark.slow  # > 30 s each on a 2-core CPU (make test-quick skips them)


@pytest.fixture(scope="module")
def reference(latent_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    launch(backend_run_cfg(latent_dataset, out, "ref"), 1, out)
    return run_outcome(out / "ref")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_ranks_match_one_process_and_resume_exactly(backend, latent_dataset, tmp_path, reference):
    cfg = backend_run_cfg(latent_dataset, tmp_path, backend)
    # first 3 steps, checkpoint at 3; then a relaunch of the same command autoresumes to 6
    launch(cfg, 2, tmp_path, *BACKENDS[backend], f"train.max_duration={RESUME_AT}ba")
    run = tmp_path / backend
    assert sorted(losses(run)) == list(range(1, RESUME_AT + 1))
    launch(cfg, 2, tmp_path, *BACKENDS[backend])
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    assert_matches(run, reference, range(1, STEPS + 1))
    assert_checkpoint_layout(run, backend)


def test_activation_checkpointing_under_fsdp_changes_nothing(latent_dataset, tmp_path, reference):
    cfg = backend_run_cfg(latent_dataset, tmp_path, "fsdp_ac")
    launch(cfg, 2, tmp_path, *BACKENDS["fsdp_reshard"], "parallelism.activation_checkpointing=true")
    assert_matches(tmp_path / "fsdp_ac", reference, range(1, STEPS + 1))


def test_deepspeed_offload_trains(latent_dataset, tmp_path, reference):
    cfg = backend_run_cfg(latent_dataset, tmp_path, "zero3_offload")
    launch(cfg, 2, tmp_path, *BACKENDS["zero3"], "parallelism.deepspeed.offload_optimizer=true",
           "parallelism.deepspeed.offload_params=true")
    assert_matches(tmp_path / "zero3_offload", reference, range(1, STEPS + 1))
