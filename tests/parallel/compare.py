"""What the backend tests (:mod:`tests.parallel.test_backends`, :mod:`tests.parallel.test_backends_mmdit`) share:
the backends and their overrides, the stated tolerances, the run's schedule (``STEPS`` batches, a checkpoint at
``RESUME_AT``) and the comparison of a multi-rank run against a single-process reference.

Light at import (no torch, no project imports): ``tests.parallel.test_backends_mmdit`` is also the entry point
of its ``torchrun`` launch and imports this module in every rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
STEPS, RESUME_AT = 6, 3


def backend_run_cfg(data: str, out: Path, name: str, **over) -> dict:
    """``tiny_run_cfg`` trained ``STEPS`` batches of 8 (microbatches of 2), checkpointed every ``RESUME_AT``,
    the loss logged every step, no sampling; ``over`` as for ``tiny_run_cfg``."""
    from tests.conftest import tiny_run_cfg

    cfg = tiny_run_cfg(data, out, train={"max_duration": f"{STEPS}ba", "save_interval": f"{RESUME_AT}ba",
                                         "global_batch_size": 8, "device_microbatch_size": 2},
                       logging={"metrics_interval": 1}, **over)
    cfg["run_name"] = name
    cfg["sampling"] = {"every": None, "at_fit_end": False}
    return cfg


def run_outcome(run: Path) -> tuple[dict, dict]:
    """A finished run's loss per step and its final EMA weights (the reference a backend is compared with)."""
    from tests.parallel.launcher import losses
    from tread_scale.weights import load_weights

    return losses(run), load_weights(run / "ema" / "latest.safetensors")[0]


def assert_matches(run: Path, reference: tuple[dict, dict], steps) -> dict:
    """The run's loss at each of ``steps`` within ``LOSS_RTOL`` of the reference's, its EMA weights (written at
    step ``STEPS``, the same keys) within ``WEIGHT_ATOL``; returns those weights."""
    from tests.parallel.launcher import losses
    from tread_scale.weights import load_weights

    ref_losses, ref_weights = reference
    got = losses(run)
    for s in steps:
        assert got[s] == pytest.approx(ref_losses[s], rel=LOSS_RTOL), f"step {s}: {got[s]} vs {ref_losses[s]}"
    weights, meta = load_weights(run / "ema" / "latest.safetensors")
    assert meta["step"] == STEPS and weights.keys() == ref_weights.keys()
    worst = max((weights[k].float() - ref_weights[k].float()).abs().max().item() for k in weights)
    assert worst < WEIGHT_ATOL, f"EMA weights differ by {worst}"
    return weights


def assert_checkpoint_layout(run: Path, backend: str) -> None:
    """FSDP2 (resharding) wrote a sharded (DCP) checkpoint at ``RESUME_AT``; DeepSpeed wrote its own at
    ``RESUME_AT`` and ``STEPS``."""
    ckpts = run / "checkpoints"
    if backend == "fsdp_reshard":
        assert list((ckpts / f"ep0-ba{RESUME_AT}").glob("*.distcp")), "FSDP2 did not write a sharded checkpoint"
    if backend.startswith("zero"):
        assert (ckpts / "deepspeed" / f"ba{RESUME_AT}").is_dir() and (ckpts / "deepspeed" / f"ba{STEPS}").is_dir()
