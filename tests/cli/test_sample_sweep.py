"""``tread-scale sample --sweep``: a folder per guidance setting, and ``sweep.jsonl`` with its sampling FLOPs."""

import json

import numpy as np
import pytest
import torch

from tests.cli.test_sample_grid import _png
from tread_scale.cli import main
from tread_scale.config import ModelConfig, RoutingConfig, to_dict
from tread_scale.factory import build_dit
from tread_scale.models.flops import model_flops
from tread_scale.routing.routes import Route
from tread_scale.sampling import load_net
from tread_scale.weights import DataFacts, WeightsMeta, save_weights

COMMON = ["--num", "5", "--steps", "2", "--batch-size", "4", "--seed", "3", "--device", "cpu"]


def _weights(path, routes, kind="rf"):
    cfg = ModelConfig(name=None, depth=4, hidden_size=32, num_heads=2, patch_size=2, in_channels=3, input_size=8,
                      num_classes=6)
    torch.manual_seed(0)
    routing = RoutingConfig(routes=routes)
    meta = WeightsMeta(model=to_dict(cfg), routing=to_dict(routing), objective={"kind": kind},
                       data=DataFacts(latent_shape=[3, 8, 8], num_classes=6), run_name="sweep-test")
    # perturbed: a fresh DiT's zero-initialised output layers would make every guidance setting sample alike
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in build_dit(cfg, routing.routes).state_dict().items()}
    return save_weights(path, state, meta)


@pytest.fixture
def routed(tmp_path):
    return _weights(tmp_path / "routed.safetensors", [Route(0.5, 1, 2)])


@pytest.fixture
def dense(tmp_path):
    return _weights(tmp_path / "dense.safetensors", [])


def _sweep(weights, out, specs, *extra):
    return main(["sample", str(weights), "--out", str(out), *COMMON, *extra,
                 *[a for s in specs for a in ("--sweep", s)]])


def test_sweep_writes_a_folder_per_setting_and_their_sampling_flops(routed, tmp_path):
    out = tmp_path / "sweep"
    specs = ["cfg=1", "cfg=3", "cfg=3,tread=1.5,strong=0.25,weak=0.5"]
    assert _sweep(routed, out, specs, "--labels", "1,4") == 0
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["sweep"] for r in rows] == specs
    assert [r["folder"] for r in rows] == [str(out / f) for f in ("0-cfg-1", "1-cfg-3",
                                                                 "2-cfg-3-tread-1.5-strong-0.25-weak-0.5")]
    assert rows[1]["guidance"]["cfg_scale"] == 3 and rows[1]["guidance"]["tread_scale"] is None
    assert rows[2]["guidance"]["tread_scale"] == 1.5 and rows[2]["guidance"]["strong_rate"] == 0.25
    for r in rows:
        assert (out / r["folder"] / "grid.png").is_file()
        npz = np.load(out / r["folder"] / "samples.npz")
        assert npz["labels"].tolist() == [1, 4, 1, 4, 1] and npz["seeds"].tolist() == [3, 4, 5, 6, 7]

    net, _ = load_net(routed, torch.device("cpu"))
    dense_flops = model_flops(net, []).dense
    routed_flops = {rate: model_flops(net, [Route(rate, r.start, r.end) for r in net.router.routes]).routed
                    for rate in (0.25, 0.5)}
    assert rows[0]["sampling_flops_per_image"] == pytest.approx(2 * dense_flops, rel=1e-12)  # RF-Euler: 2 calls
    assert rows[0]["flops_vs_first"] == 1
    assert rows[1]["flops_vs_first"] == pytest.approx(2, rel=1e-12)  # CFG: an unconditional pass every call
    # TREAD guidance: strong and weak routed passes replace the conditional one, CFG adds a dense one
    assert rows[2]["flops_vs_first"] == pytest.approx(
        (routed_flops[0.25] + routed_flops[0.5] + dense_flops) / dense_flops, rel=1e-12)
    # the guided settings sample other latents from the same noise
    first = np.load(out / rows[0]["folder"] / "samples.npz")["latents"]
    assert not np.allclose(first, np.load(out / rows[1]["folder"] / "samples.npz")["latents"])


def test_cfg_1_setting_equals_a_plain_sample_run(dense, tmp_path):
    out, plain = tmp_path / "sweep", tmp_path / "plain"
    assert _sweep(dense, out, ["cfg=1", "cfg=2"], "--cfg-scale", "4") == 0
    assert main(["sample", str(dense), "--out", str(plain), *COMMON, "--cfg-scale", "1"]) == 0
    swept, ref = np.load(out / "0-cfg-1" / "samples.npz"), np.load(plain / "samples.npz")
    assert sorted(swept.files) == sorted(ref.files)
    for key in ref.files:
        assert np.array_equal(swept[key], ref[key]), key
    assert np.array_equal(_png(out / "0-cfg-1" / "grid.png"), _png(plain / "grid.png"))
    # the second setting is CFG 2, not the command's --cfg-scale 4 (the spec replaces it)
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert rows[1]["guidance"]["cfg_scale"] == 2 and rows[1]["flops_vs_first"] == pytest.approx(2, rel=1e-12)


def test_edm_heun_cfg_doubles_every_evaluation(tmp_path):
    weights = _weights(tmp_path / "edm.safetensors", [], kind="edm")
    out = tmp_path / "sweep"
    assert _sweep(weights, out, ["cfg=1", "cfg=2"]) == 0
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    net, _ = load_net(weights, torch.device("cpu"))
    assert rows[0]["sampling_flops_per_image"] == pytest.approx(3 * model_flops(net, []).dense, rel=1e-12)
    assert rows[1]["flops_vs_first"] == pytest.approx(2, rel=1e-12)


def test_bad_spec_is_a_clear_error_before_any_sampling(routed, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _sweep(routed, out, ["cfg=2", "cfg=2,temperature=3"]) == 2
    err = capsys.readouterr().err
    assert "--sweep 'cfg=2,temperature=3'" in err and "'temperature=3' is not KEY=VALUE" in err
    assert not out.exists()
    assert _sweep(routed, out, ["cfg=2", "cfg=x"]) == 2
    assert "--sweep 'cfg=x': cfg='x' is not valid" in capsys.readouterr().err
    assert _sweep(routed, out, ["cfg=2", "tread=1.5,strong=0.8,weak=0.2"]) == 2
    assert "strong_rate (0.8) must not exceed weak_rate" in capsys.readouterr().err
    assert not out.exists()


def test_tread_spec_on_dense_weights_is_refused_before_sampling(dense, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _sweep(dense, out, ["cfg=2", "cfg=2,tread=1.5"]) == 2
    err = capsys.readouterr().err
    assert "--sweep 'cfg=2,tread=1.5': TREAD guidance needs weights trained with routes" in err
    assert not out.exists()


def test_sweep_with_geneval_is_refused(dense, tmp_path, capsys):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "prompt": "a photo of a cat"}) + "\n")
    assert main(["sample", str(dense), "--out", str(tmp_path / "g"), "--geneval", str(meta),
                 "--sweep", "cfg=2"]) == 2
    assert "--sweep samples a grid per guidance setting; it does not combine with --geneval" in \
        capsys.readouterr().err
