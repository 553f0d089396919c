import pytest
import torch
from composer.core import Event

from tread_scale.config import config_from_dict
from tread_scale.routing import Route
from tread_scale.trainer.builder import build_trainer
from tread_scale.trainer.tread_algorithm import TREADRouting

from tests.conftest import tiny_run_cfg
from tests.helpers_composer import FakeLogger, FakeState


def composer_model():
    from tread_scale.diffusion import EDM
    from tread_scale.models import DiT
    from tread_scale.trainer.model import DiffusionModel

    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=5)
    return DiffusionModel(net, EDM())


def test_apply_attaches_router_and_logs_flops_fraction():
    model, logger = composer_model(), FakeLogger()
    algo = TREADRouting([Route(0.5, 1, -2)], seed=5)
    assert algo.match(Event.INIT, None) and not algo.match(Event.BATCH_END, None)
    algo.apply(Event.INIT, FakeState(model), logger)
    assert model.net.router is algo.router and model.net.router.resolved[0].end == 2
    assert logger.hparams["tread/routes"] == [{"rate": 0.5, "start": 1, "end": 2}]
    assert 0.5 < logger.hparams["tread/block_flops_fraction"] < 1.0


def test_applying_twice_is_a_clear_error():
    model = composer_model()
    TREADRouting([Route(0.5, 1, 2)]).apply(Event.INIT, FakeState(model), FakeLogger())
    with pytest.raises(RuntimeError, match="applied twice"):
        TREADRouting([Route(0.5, 1, 2)]).apply(Event.INIT, FakeState(model), FakeLogger())


def test_model_without_blocks_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a model with a block stack"):
        TREADRouting([Route(0.5, 1, 2)]).apply(Event.INIT, FakeState(torch.nn.Linear(2, 2)), FakeLogger())


def test_state_roundtrip_before_and_after_init():
    model = composer_model()
    src = TREADRouting([Route(0.5, 1, 2)], seed=5)
    src.apply(Event.INIT, FakeState(model), FakeLogger())
    src.router.stream.calls = 11
    state = src.state_dict()
    assert state["router"] == {"seed": 5, "calls": 11} and state["routes"] == [{"rate": 0.5, "start": 1, "end": 2}]
    dst = TREADRouting([Route(0.5, 1, 2)], seed=0)
    dst.load_state_dict(state)  # before INIT: kept until the router exists
    dst.apply(Event.INIT, FakeState(composer_model()), FakeLogger())
    assert dst.router.routing_state() == {"seed": 5, "calls": 11}


def test_two_algorithms_in_one_trainer_fail_at_init(latent_dataset, tmp_path, monkeypatch):
    import tread_scale.trainer.builder as builder

    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path))
    real = builder.build_trainer

    original_init = __import__("composer").Trainer.__init__

    def doubled(self, *args, **kwargs):
        kwargs["algorithms"] = list(kwargs["algorithms"]) * 2
        original_init(self, *args, **kwargs)

    monkeypatch.setattr("composer.Trainer.__init__", doubled)
    with pytest.raises(RuntimeError, match="applied twice"):
        real(cfg)
