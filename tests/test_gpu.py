"""On a CUDA GPU: bf16 TREAD training end to end, and the GPU benchmark's variants (skipped without a GPU)."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_run_cfg

pytestmark = pytest.mark.gpu


def test_bf16_tread_training_on_gpu(latent_dataset, tmp_path):
    from tread_scale.config import config_from_dict
    from tread_scale.trainer.builder import train
    from tread_scale.trainer.callbacks.metrics_log import read_metrics

    cfg = tiny_run_cfg(latent_dataset, tmp_path, train={"max_duration": "4ba", "device": "gpu",
                                                        "precision": "amp_bf16", "compile": False})
    result = train(config_from_dict(cfg))
    assert result.batches == 4
    losses = [r["loss"] for r in read_metrics(tmp_path / "t" / "metrics.jsonl")]
    assert losses and all(l == l and l < 10 for l in losses)  # finite


def test_gpu_bench_variants_on_gpu():
    from tests.test_benchmarks import _run

    out = _run("benchmarks/gpu_bench.py", "--model", "S/8", "--batch", "4", "--warmup", "1", "--steps", "2",
               "--variants", "dense,tread,reference")
    assert out[-1].startswith("RESULT dense:img_s=")
