"""Routing schedules: the factor on the rates by batch, its stages and their mean, and bad values refused."""

import pytest

from tread_scale.errors import RouteError
from tread_scale.routing.router import TokenRouter
from tread_scale.routing.routes import Route
from tread_scale.routing.schedule import RouteSchedule


def test_default_schedule_is_the_full_rate_throughout():
    s = RouteSchedule()
    assert s.is_constant and all(s.factor(b) == 1.0 for b in (0, 1, 10**6))
    assert s.stages(5) == [(0, 4, 1.0)]


def test_dense_start_ramp_in_steps_and_final_dense_phase():
    s = RouteSchedule(dense_until=2, ramp_batches=8, ramp_levels=4, dense_from=14)
    factors = [s.factor(b) for b in range(16)]
    assert factors == [0, 0,  # dense start
                       0, 0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75,  # ramp from 0 in 4 equal steps
                       1, 1, 1, 1,  # full rates
                       0, 0]  # dense phase to the end
    assert s.stages(16) == [(0, 3, 0.0), (4, 5, 0.25), (6, 7, 0.5), (8, 9, 0.75), (10, 13, 1.0), (14, 15, 0.0)]
    assert s.describe(16) == "dense 0-1, ramp 2-9 (4 steps), full 10-13, dense from 14"


@pytest.mark.parametrize("schedule", [RouteSchedule(ramp_batches=7, ramp_levels=3),
                                      RouteSchedule(dense_until=3, ramp_batches=5, ramp_levels=8, dense_from=9),
                                      RouteSchedule(ramp_batches=1000, ramp_levels=8, dense_from=900)])
def test_stages_and_mean_agree_with_the_factor_batch_by_batch(schedule):
    total = 1200
    stages = schedule.stages(total)
    assert stages[0][0] == 0 and stages[-1][1] == total - 1
    assert all(a[1] + 1 == b[0] and a[2] != b[2] for a, b in zip(stages, stages[1:]))
    for first, last, f in stages:
        assert all(schedule.factor(b) == f for b in range(first, last + 1))
    assert len({f for _, _, f in stages}) <= schedule.ramp_levels + 1
    mean = schedule.mean_of(total, lambda f: 1 + f * f)
    assert mean == pytest.approx(sum(1 + schedule.factor(b) ** 2 for b in range(total)) / total)


def test_router_scales_every_route_by_the_factor():
    router = TokenRouter([Route(0.5, 0, 0), Route(0.25, 1, 1)])
    router.check_depth(2)
    router.rate_factor = 0.5
    assert router.active_routes() == [Route(0.25, 0, 0), Route(0.125, 1, 1)]
    plan = router.schedule(2, 16, "cpu", training=True)
    assert plan[0][1].shape == (2, 12) and plan[1][1].shape == (2, 14)
    router.rate_factor = 0.0
    assert router.schedule(2, 16, "cpu", training=True) == {}  # dense: no route applied


@pytest.mark.parametrize("kwargs, match", [
    ({"ramp_batches": -1}, r"routing.schedule.ramp_batches must be an integer number of batches >= 0, got -1"),
    ({"ramp_levels": 0}, r"routing.schedule.ramp_levels must be .* >= 1, got 0"),
    ({"dense_until": 1.5}, r"routing.schedule.dense_until must be an integer"),
    ({"dense_until": 10, "dense_from": 5}, r"dense_from=5 is before routing.schedule.dense_until=10"),
])
def test_bad_schedules_are_refused_by_key(kwargs, match):
    with pytest.raises(RouteError, match=match):
        RouteSchedule(**kwargs).check()


def test_dry_run_reports_the_stages_and_the_run_mean_of_training_flops():
    import torch

    from tread_scale.config import load_config
    from tread_scale.factory import build_net
    from tread_scale.models.flops import model_flops
    from tread_scale.parallel.plan import dry_run

    from tests.conftest import REPO

    over = ["train.max_duration=1000ba", "routing.schedule.dense_until=100", "routing.schedule.ramp_batches=400",
            "routing.schedule.dense_from=900"]
    cfg = load_config(REPO / "yamls" / "tread_b2.yaml", over)
    report = dry_run(cfg, 8)
    assert "schedule      dense 0-99, ramp 100-499 (8 steps), full 500-899, dense from 900" in report
    with torch.device("meta"):
        net = build_net(cfg.model)
    route = cfg.routes[0]
    per_batch = [model_flops(net, [Route(route.rate * cfg.routing.schedule.factor(b), route.start, route.end)])
                 for b in range(1000)]
    mean = sum(f.train_routed for f in per_batch) / 1000
    assert f"over the run's 1000 batches: mean {mean / 1e9:.2f} GFLOP (x{mean / per_batch[0].train_dense:.3f}" in report
