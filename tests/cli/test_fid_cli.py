"""`tread-scale sample` and `tread-scale fid` end to end, on one and on two ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tread_scale.cli import main
from tread_scale.evaluation.inception import FIDInception, save_inception
from tread_scale.evaluation.metrics import ReferenceStats

from tests.conftest import REPO, tiny_run_cfg

COMMON = ["--steps", "2", "--batch-size", "4", "--seed", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    data = root / "data"
    assert main(["convert", "demo", "--num-samples", "40", "--resolution", "8", "--out", str(data), "--no-progress"]) == 0
    cfg = tiny_run_cfg(str(data), root / "runs", model={"in_channels": 3, "num_classes": 6},
                       train={"max_duration": "2ba"})
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "c.yaml")]) == 0
    torch.manual_seed(0)
    inception = save_inception(FIDInception().eval(), root / "inception.safetensors")
    return {"root": root, "data": str(data), "run": str(root / "runs" / "t"), "inception": str(inception)}


def _composer(*args, cwd):
    from composer.utils import get_free_tcp_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "NODE_RANK": "0"}  # torchrun: see tests/parallel/launcher.py
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(get_free_tcp_port()), "-m", "tread_scale.cli", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.slow
def test_fid_against_data_and_against_saved_statistics(trained, capsys):
    t = trained
    ref = t["root"] / "ref.npz"
    out1 = t["root"] / "r1.json"
    assert main(["fid", t["run"], "--inception", t["inception"], "--ref-data", t["data"], "--save-ref", str(ref),
                 "--num", "12", "--extra", "--out", str(out1), *COMMON]) == 0
    r1 = json.loads(out1.read_text())
    assert r1["num_samples"] == 12 and r1["fid"] >= 0
    assert {"sfid", "inception_score", "precision", "recall"} <= set(r1)
    stats = ReferenceStats.load(ref)
    assert stats.mu.shape == (2048,) and stats.sigma.shape == (2048, 2048) and stats.mu_s.shape == (2023,)
    out2 = t["root"] / "r2.json"
    assert main(["fid", t["run"], "--inception", t["inception"], "--ref", str(ref), "--num", "12",
                 "--out", str(out2), *COMMON]) == 0
    assert json.loads(out2.read_text())["fid"] == pytest.approx(r1["fid"], rel=1e-9)


def test_two_ranks_sample_exactly_the_images_of_one(trained):
    t = trained
    one, two = t["root"] / "s1", t["root"] / "s2"
    args = ["--num", "10", "--cfg-scale", "1.5", "--tread-scale", "1.3", "--strong-rate", "0.2", "--weak-rate", "0.5"]
    assert main(["sample", t["run"], "--out", str(one), *args, *COMMON]) == 0
    _composer("sample", t["run"], "--out", str(two), *args, *COMMON, cwd=REPO)
    a, b = np.load(one / "samples.npz"), np.load(two / "samples.npz")
    assert np.array_equal(a["seeds"], b["seeds"]) and np.array_equal(a["labels"], b["labels"])
    assert np.array_equal(a["latents"], b["latents"]) and np.array_equal(a["images"], b["images"])


@pytest.mark.slow
def test_two_ranks_give_the_fid_of_one(trained):
    t = trained
    ref = t["root"] / "ref2.npz"
    out1, out2 = t["root"] / "f1.json", t["root"] / "f2.json"
    assert main(["fid", t["run"], "--inception", t["inception"], "--ref-data", t["data"], "--save-ref", str(ref),
                 "--ref-num", "10", "--num", "10", "--out", str(out1), *COMMON]) == 0
    _composer("fid", t["run"], "--inception", t["inception"], "--ref", str(ref), "--num", "10", "--out", str(out2),
              *COMMON, cwd=REPO)
    assert json.loads(out2.read_text())["fid"] == pytest.approx(json.loads(out1.read_text())["fid"], rel=1e-9)


def test_fid_errors_are_clear(trained, capsys):
    t = trained
    assert main(["fid", t["run"], "--inception", str(t["root"] / "nope.pth"), "--ref", "x.npz"]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err
    assert main(["fid", t["run"], "--inception", t["inception"], "--ref", str(t["root"] / "missing.npz")]) == 2
    assert "reference statistics" in capsys.readouterr().err


@pytest.mark.slow  # ~60 s: a reference and three settings of FID-4 with a random Inception (299 px on a CPU)
def test_guidance_sweep_reports_fid_and_sampling_flops_per_setting(trained, capsys):
    from tread_scale.models.flops import model_flops
    from tread_scale.routing.routes import Route
    from tread_scale.sampling import load_net

    t = trained
    out = t["root"] / "sweep.jsonl"
    base = ["fid", t["run"], "--inception", t["inception"], "--ref-data", t["data"], "--ref-num", "4", "--num", "4",
            *COMMON]
    specs = ["cfg=1", "cfg=2,interval=0.3:100", "cfg=2,tread=1.5,strong=0.25,weak=0.5"]
    assert main([*base, *[a for s in specs for a in ("--sweep", s)], "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sweep"] for r in rows] == specs and all(np.isfinite(r["fid"]) for r in rows)
    net, _ = load_net(t["run"], torch.device("cpu"))
    dense = model_flops(net, []).dense
    routed = {rate: model_flops(net, [Route(rate, r.start, r.end) for r in net.router.routes]).routed
              for rate in (0.25, 0.5)}
    evals = 2 * 2 - 1  # EDM-Heun, 2 steps: 3 network evaluations per image
    assert rows[0]["sampling_flops_per_image"] == pytest.approx(evals * dense, rel=1e-12)
    # CFG adds an unconditional pass at the levels within the interval (not all of EDM's 3 evaluations)
    assert rows[1]["flops_vs_first"] in (pytest.approx(4 / 3, rel=1e-12), pytest.approx(5 / 3, rel=1e-12))
    # TREAD guidance: the strong and weak routed passes replace the conditional one, CFG adds a dense one
    assert rows[2]["flops_vs_first"] == pytest.approx((routed[0.25] + routed[0.5] + dense) / dense, rel=1e-12)
    capsys.readouterr()
    assert main([*base, "--sweep", "cfg=2,temperature=3"]) == 2
    assert "'temperature=3' is not KEY=VALUE with KEY one of cfg, tread" in capsys.readouterr().err
