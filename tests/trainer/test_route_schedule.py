"""A routing schedule in a real training run: kept tokens, FLOPs and resume follow its stages."""

import json

import pytest
import torch

from tread_scale.config import config_from_dict
from tread_scale.errors import ConfigError
from tread_scale.models.flops import model_flops
from tread_scale.routing.routes import Route
from tread_scale.routing.schedule import RouteSchedule
from tread_scale.trainer.builder import build_trainer, train
from tread_scale.weights import load_weights

from tests.conftest import tiny_run_cfg

# batches: 0 dense, 1-2 ramp step 0 (dense), 3-4 half rate, 5 full, 6- dense
SCHEDULE = {"dense_until": 1, "ramp_batches": 4, "ramp_levels": 2, "dense_from": 6}


def _cfg(remote, out, duration, **over):
    return tiny_run_cfg(remote, out, routing={"routes": [{"rate": 0.5, "start": 1, "end": 2}], "schedule": SCHEDULE},
                        train={"max_duration": duration, "save_interval": "3ba"}, **over)


def test_kept_tokens_flops_and_logged_factor_follow_the_stages(latent_dataset, tmp_path):
    cfg = config_from_dict(_cfg(latent_dataset, tmp_path, "7ba", logging={"metrics_interval": 1}))
    trainer, _ = build_trainer(cfg)
    net = trainer.state.model.net
    seen = []
    net.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]) if m.training else None)
    trainer.fit()
    trainer.close()
    schedule = RouteSchedule(**SCHEDULE)
    factors = [schedule.factor(b) for b in range(7)]
    assert factors == [0, 0, 0, 0.5, 0.5, 1, 0]
    # 16 image tokens; rate 0.25 keeps 12, rate 0.5 keeps 8; one micro-batch per batch
    assert seen == [16, 16, 16, 12, 12, 8, 16]
    records = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rate_factor"] for r in records] == factors
    for r, f in zip(records[1:], factors[1:]):  # the first record includes start-up time
        per_sample = model_flops(net, [Route(0.5 * f, 1, 2)]).train_routed
        assert r["tflops_per_device"] * 1e12 / r["samples_per_s"] == pytest.approx(per_sample, rel=0.02)


def test_resume_across_a_stage_boundary_is_exact(latent_dataset, tmp_path):
    first = train(config_from_dict(_cfg(latent_dataset, tmp_path / "a", "3ba")))
    assert first.batches == 3  # stopped at the end of the dense ramp step; batch 3 starts the half rate
    resumed = train(config_from_dict(_cfg(latent_dataset, tmp_path / "a", "7ba")))
    straight = train(config_from_dict(_cfg(latent_dataset, tmp_path / "b", "7ba")))
    assert resumed.batches == straight.batches == 7
    a, b = load_weights(resumed.ema_weights)[0], load_weights(straight.ema_weights)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dense_stage_trains_exactly_like_a_dense_run(latent_dataset, tmp_path):
    scheduled = train(config_from_dict(tiny_run_cfg(
        latent_dataset, tmp_path / "s", routing={"schedule": {"dense_until": 2}}, train={"max_duration": "2ba"})))
    dense = train(config_from_dict(tiny_run_cfg(latent_dataset, tmp_path / "d", routing={"routes": []},
                                                train={"max_duration": "2ba"})))
    a, b = load_weights(scheduled.ema_weights)[0], load_weights(dense.ema_weights)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_without_routes_is_refused(latent_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"routing.schedule is set but routing.routes is empty"):
        config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, routing={"routes": [], "schedule": {"dense_from": 5}}))
