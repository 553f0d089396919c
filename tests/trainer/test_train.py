"""End-to-end Composer training of a tiny TREAD DiT on real MDS shards (single process, CPU)."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tread_scale.config import config_from_dict
from tread_scale.trainer.builder import build_trainer, train
from tread_scale.weights import load_weights

from tests.conftest import tiny_run_cfg


def test_train_end_to_end_writes_checkpoint_weights_and_grid(latent_dataset, tmp_path):
    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, sampling={"every": "2ba", "num_images": 4, "steps": 2}))
    result = train(cfg)
    run = tmp_path / "t"
    assert result.batches == 4
    assert (run / "checkpoints" / "ep0-ba4-rank0.pt").is_file()
    assert (run / "checkpoints" / "latest-rank0.pt").is_symlink()
    assert sorted(p.name for p in (run / "samples").glob("ba*.png")) == ["ba00000002.png", "ba00000004.png"]
    assert result.ema_weights == run / "ema" / "ba00000004.safetensors"
    weights, meta = load_weights(run / "ema" / "latest.safetensors")
    assert meta["step"] == 4 and meta["routing"]["routes"] == [{"rate": 0.5, "start": 1, "end": 2}]
    assert meta["data"]["latent_shape"] == [4, 8, 8] and "pos_embed" in weights
    assert "remote: " in (run / "config.yaml").read_text()


def _ema(path: Path):
    return load_weights(path)[0]


def test_autoresume_continues_from_the_right_batch_with_algorithm_state(latent_dataset, tmp_path):
    base = tiny_run_cfg(latent_dataset, tmp_path / "a", train={"max_duration": "4ba", "save_interval": "2ba"})
    first = train(config_from_dict(base))
    assert first.batches == 4
    resumed_cfg = config_from_dict({**base, "train": {**base["train"], "max_duration": "6ba"}})
    trainer, handles = build_trainer(resumed_cfg)
    assert int(trainer.state.timestamp.batch) == 4  # resumed, not restarted
    algo = trainer.state.algorithms[0]
    assert algo.state_dict()["routes"] == [{"rate": 0.5, "start": 1, "end": 2}]
    assert trainer.state.model.net.router is algo.router
    trainer.fit()
    trainer.close()
    # the resumed run ends exactly where an uninterrupted 6-batch run ends
    straight = train(config_from_dict(tiny_run_cfg(latent_dataset, tmp_path / "b", train={"max_duration": "6ba",
                                                                                       "save_interval": "2ba"})))
    a, b = _ema(tmp_path / "a" / "t" / "ema" / "latest.safetensors"), _ema(straight.ema_weights)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_routing_is_applied_to_training_batches_only(latent_dataset, tmp_path):
    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, train={"max_duration": "3ba",
                                                                          "device_microbatch_size": 4}))
    trainer, _ = build_trainer(cfg)
    net = trainer.state.model.net
    assert net.router is not None and net.router.rank == 0
    lengths = []
    net.blocks[1].register_forward_pre_hook(lambda m, args: lengths.append((m.training, args[0].shape[:2])))
    trainer.fit()
    trainer.close()
    # 3 batches x 2 microbatches of 4 samples; the routed block sees 8 of the 16 tokens
    assert lengths == [(True, (4, 8))] * 6


def test_dense_run_has_no_router(latent_dataset, tmp_path):
    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, routing={"routes": []},
                                        train={"max_duration": "1ba"}))
    trainer, _ = build_trainer(cfg)
    assert trainer.state.model.net.router is None and trainer.state.algorithms == []
    trainer.close()


def test_wandb_offline_needs_no_api_key(latent_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, train={"max_duration": "2ba"},
                                        logging={"wandb": {"enabled": True, "mode": "offline", "project": "p"}}))
    assert train(cfg).batches == 2
    assert list((tmp_path / "t" / "wandb").glob("offline-run-*")), "no offline wandb run was written"


def test_dataset_that_does_not_fit_the_model_fails_before_training(latent_dataset, tmp_path):
    from tread_scale.errors import DatasetMismatchError

    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, model={"in_channels": 3}))
    with pytest.raises(DatasetMismatchError, match=r"latents have shape \(4, 8, 8\).*expects \(3, 8, 8\)"):
        train(cfg)
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_metrics_report_routing_aware_flops_and_mfu(latent_dataset, tmp_path):
    import json

    from tread_scale.models.flops import model_flops

    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, logging={"metrics_interval": 1, "peak_flops": 1e9}))
    trainer, _ = build_trainer(cfg)
    model = trainer.state.model
    net = model.net
    routed, dense = model.train_flops_per_sample(), model_flops(net, []).train_dense
    assert routed == pytest.approx(model_flops(net, cfg.routes).train_routed) and routed < 0.9 * dense
    assert model.flops_per_batch({"latent": torch.zeros(8, 4, 8, 8)}) == pytest.approx(8 * routed)
    trainer.fit()
    trainer.close()
    records = [json.loads(l) for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records[1:]:
        assert r["tflops_per_device"] == pytest.approx(r["samples_per_s"] * routed / 1e12, rel=0.01, abs=1e-4)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] * 1e12 / 1e9, rel=0.01, abs=1e-4)


def test_compiled_blocks_train_like_eager_ones(latent_dataset, tmp_path):
    """``train.compile`` compiles each block (aot_eager here: the same graph capture as inductor, no C++ build)."""
    import json

    def run(out, **train):
        cfg = tiny_run_cfg(latent_dataset, out, train={"max_duration": "3ba", "deterministic": False, **train},
                           logging={"metrics_interval": 1})
        trainer, _ = build_trainer(config_from_dict(cfg))
        compiled = [type(b.forward).__name__ for b in trainer.state.model.net.blocks]
        trainer.fit()
        trainer.close()
        return compiled, [json.loads(l)["loss"] for l in (out / "t" / "metrics.jsonl").read_text().splitlines()]

    _, eager = run(tmp_path / "a")
    torch._dynamo.reset()
    _, compiled = run(tmp_path / "b", compile=True, compile_backend="aot_eager")
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
