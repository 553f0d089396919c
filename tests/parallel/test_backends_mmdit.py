"""The text-to-image MMDiT under DDP, FSDP2 (ZeRO-3 and ZeRO-2 style) and DeepSpeed ZeRO 1/2/3 on 2 real
processes (gloo, CPU), against one process.

The DiT's claims (:mod:`tests.parallel.test_backends`), made for a tiny TREAD MMDiT trained on a captioned
dataset (text embeddings with padding, the stored empty prompt as the null condition, caption dropout on):
each backend trains 3 batches, checkpoints, and an autoresumed trainer continues to 6; then

* the global-batch loss agrees with a single-process run at every step within 1e-4 (relative);
* the EMA weights agree within 1e-3 (absolute) after 6 steps (the DiT test's bound and reason);
* the exported EMA weights carry the null condition, equal to the dataset's empty prompt, under every backend.

All six backends train in **one** ``torchrun`` launch, one after another: this module is also the entry
point (``python -m tests.parallel.test_backends_mmdit CONFIG --backends=ddp,...``). Start-up is most of a
launch on a 2-core CPU (about 40 of 50 s), so one launch instead of twelve keeps this file at 1.5-3 minutes
(12 launches: over 10). The resume is therefore a new trainer in the same processes, reading the checkpoint from disk;
the DiT test covers resuming in fresh processes, and that path does not depend on the model family.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.parallel.compare import (
    BACKENDS, RESUME_AT, STEPS, assert_checkpoint_layout, assert_matches, backend_run_cfg, run_outcome,
)


def mmdit_run_cfg(data: str, out: Path, name: str) -> dict:
    """A tiny TREAD MMDiT run (depth 3, width 64, 3x8x8 pixels, patch 2: 16 image tokens, 8 routed in block 1)."""
    cfg = backend_run_cfg(data, out, name, routing={"routes": [{"rate": 0.5, "start": 1, "end": 1}]},
                          objective={"kind": "rf", "label_dropout": 0.25})
    cfg["model"] = {"name": None, "family": "mmdit", "depth": 3, "hidden_size": 64, "num_heads": 4, "patch_size": 2,
                    "in_channels": 3, "input_size": 8}
    return cfg


def main(argv: list[str]) -> int:
    """Entry point of the launch: train each backend ``RESUME_AT`` batches, then resume it to ``STEPS``."""
    from tread_scale.config import load_config
    from tread_scale.trainer.builder import train

    config, rest = argv[0], argv[1:]
    names = next(a.split("=", 1)[1] for a in rest if a.startswith("--backends=")).split(",")
    overrides = [a for a in rest if not a.startswith("--backends=")]
    for name in names:
        for steps in (RESUME_AT, STEPS):
            train(load_config(config, [*overrides, *BACKENDS[name], f"run_name={name}",
                                       f"train.max_duration={steps}ba"]))
    return 0


pytestmark = pytest.mark.slow  # one 2-rank launch of 1.5-3 min on a 2-core CPU (make test-quick skips it)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> str:
    """The captioned demo at 8x8 pixels: 64 samples, a tiny T5 (16 tokens of width 32, mostly padding)."""
    from tread_scale.devtools.demo_data import write_captioned_demo

    root = tmp_path_factory.mktemp("captioned")
    write_captioned_demo(str(root / "data"), str(root / "enc"), num_samples=64, resolution=8, shard_size="16kb")
    return str(root / "data")


@pytest.fixture(scope="module")
def reference(captioned, tmp_path_factory):
    """A single-process run (in this process) of the same config: losses and EMA weights after ``STEPS``."""
    from tread_scale.config import config_from_dict
    from tread_scale.trainer.builder import train

    out = tmp_path_factory.mktemp("reference")
    train(config_from_dict(mmdit_run_cfg(captioned, out, "ref")))
    return run_outcome(out / "ref")


@pytest.fixture(scope="module")
def runs(captioned, tmp_path_factory) -> Path:
    """Every backend trained by one 2-rank launch; returns the folder holding one run folder per backend."""
    from tests.parallel.launcher import launch

    out = tmp_path_factory.mktemp("backends")
    launch(mmdit_run_cfg(captioned, out, "mmdit"), 2, out, f"--backends={','.join(BACKENDS)}",
           module="tests.parallel.test_backends_mmdit", timeout=900)
    return out


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_mmdit_two_ranks_match_one_process_and_resume(backend, runs, reference, captioned):
    from tread_scale.data.metadata import read_empty_prompt

    run = runs / backend
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"not resumed at step {RESUME_AT} (a restart logs 1..3 twice): {steps}"
    weights = assert_matches(run, reference, steps)
    ref_weights = reference[1]
    empty = read_empty_prompt(captioned)
    assert weights["null_mask"].dtype == ref_weights["null_mask"].dtype
    for buffer, key in (("null_emb", "text_emb"), ("null_mask", "text_mask"), ("null_pooled", "text_pooled")):
        assert weights[buffer].equal(ref_weights[buffer]), buffer
        assert weights[buffer][0].equal(empty[key].to(weights[buffer].dtype)), f"{buffer} is not the empty prompt"
    assert_checkpoint_layout(run, backend)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
