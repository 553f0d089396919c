"""Loading a run config: yaml files, ``base:`` inheritance, typed overrides, unknown keys and the yaml dump."""

import pytest

from tread_scale.config import RunConfig, apply_override, config_from_dict, dump_config, load_config, parse_override
from tread_scale.errors import ConfigError
from tread_scale.parallel.plan import dry_run

from tests.conftest import REPO, tiny_run_cfg


def test_unknown_key_names_it_and_the_nearest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.learning_rate'.*did you mean 'optimizer.lr'"):
        config_from_dict(tiny_run_cfg("/d", tmp_path, optimizer={"learning_rate": 1.0}))
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'"):
        config_from_dict({**tiny_run_cfg("/d", tmp_path), "trian": {}})


def test_overrides_are_typed_and_reach_lists(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config_from_dict(tiny_run_cfg("/data", tmp_path))))
    cfg = load_config(path, ["routing.routes[0].rate=0.25", "optimizer.betas=[0.8, 0.95]", "train.device_microbatch_size=2",
                             "sampling.every=null", "logging.wandb.tags=[a, b]"])
    assert cfg.routing.routes[0].rate == 0.25 and cfg.optimizer.betas == (0.8, 0.95)
    assert cfg.train.device_microbatch_size == 2 and cfg.sampling.every is None
    assert cfg.logging.wandb.tags == ["a", "b"]


def test_override_parsing():
    assert parse_override("a.b[2].c=0.5") == (["a", "b", 2, "c"], 0.5)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_override("a.b")
    with pytest.raises(ConfigError, match="malformed key segment"):
        parse_override("a..b=1")
    data = {"r": []}
    apply_override(data, ["r", 0, "rate"], 0.3, "r[0].rate=0.3")
    assert data == {"r": [{"rate": 0.3}]}
    with pytest.raises(ConfigError, match="past the end"):
        apply_override(data, ["r", 5, "rate"], 0.3, "r[5].rate=0.3")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml' is not valid yaml"):
        load_config(bad)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "yamls").glob("*.yaml")))
def test_shipped_yamls_validate(name):
    import yaml

    raw = yaml.safe_load((REPO / "yamls" / name).read_text())
    # a fine-tune recipe names the imported weights it starts from, which do not exist here
    over = ["model.init_from=null"] if (raw.get("model") or {}).get("init_from") else []
    cfg = load_config(REPO / "yamls" / name, over)
    assert isinstance(cfg, RunConfig)
    assert "memory/rank" in dry_run(cfg, 8)  # builds the model (meta device) and plans it


@pytest.mark.parametrize("name,world,routes", [("mmdit_2b_256.yaml", 64, [(0.5, 2, 20)]),
                                               ("mmdit_2b_1024.yaml", 64, [(0.5, 2, 20)]),
                                               ("mmdit_2b_512.yaml", 64, [(0.5, 2, 20)]),
                                               ("mmdit_8b_1024.yaml", 512, [(0.5, 2, 34)]),
                                               ("sd35_large_tread_finetune.yaml", 512, [(0.5, 2, 34)])])
def test_mmdit_yamls_fit_the_cluster_they_state(name, world, routes):
    cfg = load_config(REPO / "yamls" / name, ["model.init_from=null"])
    assert [(r.rate, r.start, r.end) for r in cfg.routing.routes] == routes  # i = 2, j = B - 4
    report = dry_run(cfg, world, "80GB")
    assert "fits" in report and "333 text tokens of width 4096" in report


def test_paper_configs():
    b2 = load_config(REPO / "yamls" / "tread_b2.yaml")
    assert b2.model.name == "DiT-B/2" and [(r.rate, r.start, r.end) for r in b2.routing.routes] == [(0.5, 2, 8)]
    assert b2.model.init == "xavier_all" and b2.optimizer.lr == 1e-4 and b2.train.global_batch_size == 256
    xl = load_config(REPO / "yamls" / "tread_xl2.yaml")
    assert xl.model.name == "DiT-XL/2" and [(r.rate, r.start, r.end) for r in xl.routing.routes] == [(0.5, 2, 24)]
    assert xl.train.global_batch_size == 256 and xl.ema.decay == 0.9999
    for dense in ("dit_b2.yaml", "dit_xl2.yaml"):
        assert load_config(REPO / "yamls" / dense).routing.routes == []


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])
def test_dump_roundtrip(tmp_path, backend):
    cfg = config_from_dict(tiny_run_cfg("/data", tmp_path, parallelism={"backend": backend}))
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_base_files_merge_and_cycles_fail(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nrun_name: a\ntrain: {global_batch_size: 4}\n")
    (tmp_path / "b.yaml").write_text("run_name: b\ndata: {remote: /x}\ntrain: {max_duration: 9ba}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.run_name, cfg.train.global_batch_size, cfg.train.max_duration, cfg.data.remote) == ("a", 4, "9ba", "/x")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="form a cycle"):
        load_config(tmp_path / "a.yaml")
