"""Cross-field validation: bad values name their key, routes are checked against the depth, and the
chosen parallelism backend's section is resolved to its defaults."""

import dataclasses

import pytest

from tread_scale.config import (DeepSpeedConfig, FSDPConfig, RunConfig, config_from_dict, dump_config, from_dict,
                                load_config, resolve_backend_sections, validate)
from tread_scale.errors import ConfigError, RouteError
from tread_scale.routing import Route

from tests.conftest import tiny_run_cfg


@pytest.mark.parametrize("override,message", [
    ("train.global_batch_size=abc", r"train.global_batch_size: expected an integer, got 'abc'"),
    ("train.global_batch_size=true", r"train.global_batch_size: expected an integer, got True"),
    ("objective.kind=ddpm", r"objective.kind: 'ddpm' is not one of 'edm', 'rf'"),
    ("optimizer.betas=[0.9]", r"optimizer.betas: expected 2 values"),
    ("ema.decay=1.5", r"ema.decay must be in \(0, 1\)"),
    ("model.name=DiT-B/2", r"model.depth=4 contradicts model.name=DiT-B/2"),
    ("routing.routes[0].end=9", r"routing.routes\[0\] \(rate=0.5, start=1, end=9\): end=9 is outside a model of depth 4"),
    ("routing.routes[1]={rate: 0.5, start: 2, end: 3}", r"routing.routes\[1\].*sorted and non-overlapping"),
    ("routing.routes[0].rte=0.3", r"unknown config key 'routing.routes\[0\].rte'; did you mean 'routing.routes\[0\].rate'"),
    ("routing.routes[0].rate=true", r"routing.routes\[0\].rate: expected a number, got True"),
    ("data.remote=", r"data.remote must be set"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config_from_dict(tiny_run_cfg("/data", tmp_path))))
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_route_errors_are_config_errors(tmp_path):
    with pytest.raises(RouteError):
        config_from_dict(tiny_run_cfg("/d", tmp_path, routing={"routes": [{"rate": 1.0, "start": 0, "end": 1}]}))


def test_route_outside_the_paper_model_names_the_route(tmp_path):
    cfg = tiny_run_cfg("/d", tmp_path, model={"name": "DiT-XL/2", "depth": None, "hidden_size": None,
                                              "num_heads": None, "patch_size": None},
                       routing={"routes": [{"rate": 0.5, "start": 2, "end": 30}]})
    with pytest.raises(RouteError, match=r"^routing.routes\[0\] \(rate=0.5, start=2, end=30\): end=30 is outside a "
                                         r"model of depth 28"):
        config_from_dict(cfg)


def test_config_routes_are_the_model_code_routes(tmp_path):
    cfg = config_from_dict(tiny_run_cfg("/d", tmp_path, routing={"routes": [{"rate": 0.5, "start": 1, "end": -2}]}))
    assert cfg.routing.routes == [Route(0.5, 1, -2)] and type(cfg.routing.routes[0]) is Route
    assert cfg.routes == [Route(0.5, 1, -2)]


@pytest.mark.parametrize("backend,fsdp,deepspeed", [("ddp", None, None), ("fsdp", FSDPConfig(), None),
                                                     ("deepspeed", None, DeepSpeedConfig())])
def test_the_chosen_backend_section_is_resolved_to_its_defaults(tmp_path, backend, fsdp, deepspeed):
    cfg = config_from_dict(tiny_run_cfg("/d", tmp_path, parallelism={"backend": backend}))
    assert (cfg.parallelism.fsdp, cfg.parallelism.deepspeed) == (fsdp, deepspeed)


def test_a_given_backend_section_is_kept(tmp_path):
    cfg = config_from_dict(tiny_run_cfg("/d", tmp_path, parallelism={"backend": "deepspeed",
                                                                     "deepspeed": {"zero_stage": 3}}))
    assert cfg.parallelism.deepspeed == DeepSpeedConfig(zero_stage=3) and cfg.parallelism.fsdp is None


def test_resolution_is_idempotent_and_part_of_validate(tmp_path):
    raw = from_dict(RunConfig, tiny_run_cfg("/d", tmp_path, parallelism={"backend": "fsdp"}))
    assert raw.parallelism.fsdp is None
    resolved = resolve_backend_sections(dataclasses.replace(raw, parallelism=dataclasses.replace(raw.parallelism)))
    assert resolved.parallelism.fsdp == FSDPConfig()
    assert resolve_backend_sections(resolved) == resolved
    assert validate(raw).parallelism.fsdp == FSDPConfig()


MMDIT = {"name": None, "family": "mmdit", "depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2,
         "in_channels": 4, "input_size": 8}


@pytest.mark.parametrize("model,pos_embed", [
    (MMDIT, "rope"),
    ({**MMDIT, "num_classes": 5}, "rope"),  # a DiT base's classes are unused by an MMDiT
    ({**MMDIT, "pos_embed": "learned"}, "learned"),
    ({"name": "MMDiT-T/2", "in_channels": 4, "input_size": 8}, "rope"),
])
def test_an_mmdit_config_resolves_to_what_the_network_uses(tmp_path, model, pos_embed):
    """Issue 22.9: an MMDiT's resolved config said num_classes: 1000 and pos_embed: null."""
    from tread_scale.factory import build_net

    data = tiny_run_cfg("/d", tmp_path, objective={"kind": "rf"}, routing={"routes": []})
    data["model"] = model
    cfg = config_from_dict(data)
    assert cfg.model.num_classes == 0 and cfg.model.pos_embed == pos_embed
    assert build_net(cfg.model).pos_embed_type == pos_embed
    assert build_net(from_dict(RunConfig, data).model).pos_embed_type == pos_embed  # what null built before
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg  # the saved config reads back to the same config


def test_a_dit_config_is_unchanged_by_resolution(tmp_path):
    cfg = config_from_dict(tiny_run_cfg("/d", tmp_path))
    assert cfg.model.num_classes == 5 and cfg.model.pos_embed is None
    with pytest.raises(ConfigError, match=r"model.num_classes must be >= 1, got 0"):
        config_from_dict(tiny_run_cfg("/d", tmp_path, model={"num_classes": 0}))
