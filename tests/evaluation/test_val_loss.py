"""The fixed-timestep validation loss: bitwise the same across runs and across 1 vs 2 ranks (real gloo
processes), equal in training to the same protocol applied to the exported weights, bad data refused."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import torch

from tests.conftest import tiny_run_cfg
from tread_scale.diffusion.edm import EDM
from tread_scale.diffusion.rectified_flow import RectifiedFlow
from tread_scale.errors import DatasetError
from tread_scale.evaluation.val_loss import (COMPARABLE_REASON, default_levels, load_valset, per_sample_losses,
                                             summarize)
from tread_scale.models.dit import DiT

N = 20  # chunks of 8, 8 and 4: the last chunk is short, and 2 ranks get unequal shares


def _net(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=5,
              init="xavier_all").eval()
    with torch.no_grad():  # a zero-initialised output layer would make every loss the same constant
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _objectives():
    return {"rf": RectifiedFlow(shift=3.0), "edm": EDM()}


def _rank_worker(rank, store, data, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    valset = load_valset(data, N, latent_shape=(4, 8, 8))
    tables = {kind: per_sample_losses(_net(), obj, valset, default_levels(kind), rank, 2,
                                      lambda t: dist.all_reduce(t))
              for kind, obj in _objectives().items()}
    if rank == 0:
        torch.save(tables, out)
    dist.barrier()
    dist.destroy_process_group()


def test_validation_loss_is_bitwise_the_same_across_runs_and_on_one_or_two_ranks(latent_dataset, tmp_path):
    valset = load_valset(latent_dataset, N, latent_shape=(4, 8, 8))
    assert len(valset) == N
    one = {kind: per_sample_losses(_net(), obj, valset, default_levels(kind)) for kind, obj in _objectives().items()}
    again = load_valset(latent_dataset, N, latent_shape=(4, 8, 8))  # a second run reads and draws the same
    assert all(torch.equal(one[k], per_sample_losses(_net(), o, again, default_levels(k)))
               for k, o in _objectives().items())
    torch.multiprocessing.spawn(_rank_worker, args=(tmp_path / "store", latent_dataset, tmp_path / "t.pt"), nprocs=2)
    two = torch.load(tmp_path / "t.pt")
    for kind in one:
        assert one[kind].shape == (N, len(default_levels(kind))) and (one[kind] > 0).all()
        assert torch.equal(one[kind], two[kind]), f"{kind}: 2 ranks differ from 1"
        assert summarize(one[kind], default_levels(kind)) == summarize(two[kind], default_levels(kind))
    # the levels matter (a loss that ignored t would pass the equalities above)
    assert len(set(one["rf"].mean(0).tolist())) == 8
    assert default_levels("rf") == [0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875, 0.8125, 0.9375]


def test_bad_validation_data_is_refused_naming_it(latent_dataset, tmp_path):
    with pytest.raises(DatasetError, match=rf"validation data {latent_dataset}: latents of shape \(4, 8, 8\), the "
                                           r"model takes \(4, 16, 16\)"):
        load_valset(latent_dataset, 4, latent_shape=(4, 16, 16))
    with pytest.raises(DatasetError, match=r"has no column\(s\) \['text_emb', 'text_mask', 'text_pooled'\] \(a "
                                           "text-conditioned model validates on captioned data\\)"):
        load_valset(latent_dataset, 4, text=True)
    with pytest.raises(DatasetError, match="no index.json"):
        load_valset(str(tmp_path / "nothing"), 4)


def test_in_training_validation_loss_on_held_out_data_equals_the_protocol_on_the_exported_weights(
        latent_dataset, tmp_path):
    from tread_scale.config import config_from_dict
    from tread_scale.factory import build_objective
    from tread_scale.sampling import load_net
    from tread_scale.trainer.builder import train

    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, train={"max_duration": "2ba"},
                                        objective={"kind": "rf", "shift": 2.0},
                                        evaluation={"val_every": "2ba", "val_num_samples": 12,
                                                    "val_data": latent_dataset}))
    train(cfg)
    (rec,) = [json.loads(line) for line in (tmp_path / "t" / "eval.jsonl").read_text().splitlines()]
    assert rec["step"] == 2 and set(rec["val_loss_by_level"]) == {str(v) for v in default_levels("rf")}
    assert rec["val_protocol"] == {"data": latent_dataset, "num_samples": 12, "levels": default_levels("rf"),
                                   "objective": "rf", "noise_seed": 0xE7A1, "objective_args": {},
                                   "comparable_to_published": False, "comparable_reason": COMPARABLE_REASON}
    net, _ = load_net(tmp_path / "t" / "ema" / "latest.safetensors", torch.device("cpu"))
    table = per_sample_losses(net.eval(), build_objective(cfg.objective), load_valset(latent_dataset, 12),
                              default_levels("rf"))
    assert summarize(table, default_levels("rf"))["val_loss"] == rec["val_loss"]
