"""`tread-scale fid RUN --every/--all` (the FID curve of a run's EMA exports) and `tread-scale plot` of curves.

The fast tests stand in for the FID itself (a stub of ``fid_of_weights`` over real exported weight files); the
slow ones train tiny runs and compute real FIDs, on one rank and on two.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tread_scale.cli import main
from tread_scale.errors import CheckpointError
from tread_scale.evaluation.inception import FIDInception, save_inception
from tread_scale.evaluation.metrics import ReferenceStats
from tread_scale.plot import load_series
from tread_scale.weights import DataFacts, WeightsMeta, save_weights

from tests.cli.test_fid_cli import _composer
from tests.conftest import REPO, tiny_model_cfg, tiny_run_cfg

TREAD = [{"rate": 0.5, "start": 1, "end": 2}]
STUB_ARGS = ["--inception", "inception.pth", "--ref", "ref.npz", "--num", "8"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _exported_run(root, name, steps, routes):
    """A run folder with ``ema/ba<N>.safetensors`` as EMAExport writes them (training wall-clock 10 s a batch)."""
    meta = WeightsMeta(model=tiny_model_cfg(), objective={"kind": "edm"}, data=DataFacts([4, 8, 8], 5),
                       routing={"routes": routes}, run_name=name)
    for step in steps:
        save_weights(root / name / "ema" / f"ba{step:08d}.safetensors", {"w": torch.zeros(1)},
                     meta.at_step(step, ema=True, train_wall_s=10.0 * step))
    return root / name


@pytest.fixture
def stub_fid(monkeypatch):
    """``fid_of_weights`` replaced by a stub: FID = 100 / step, plus a key the curve must pass through."""
    calls, fail_at = [], set()

    def fid_of_weights(weights, inception, **kwargs):
        step = int(weights.rsplit("ba", 1)[1].split(".")[0])
        calls.append(step)
        if step in fail_at:
            raise CheckpointError(f"{weights}: interrupted")
        return {"fid": 100.0 / step, "num_samples": kwargs["num"], "comparable_to_published": False,
                "comparable_reason": "stub", "only_from_fid_of_weights": step}

    monkeypatch.setattr("tread_scale.evaluation.fid.fid_of_weights", fid_of_weights)
    return calls, fail_at


def test_curve_selects_passes_through_and_resumes(tmp_path, stub_fid, capsys):
    calls, fail_at = stub_fid
    run = _exported_run(tmp_path, "tread", [2, 4, 6, 8], TREAD)
    curve = run / "fid_curve.jsonl"
    fail_at.add(8)  # the evaluation dies at the last checkpoint (as a killed one would): what it did is kept
    assert main(["fid", str(run), "--every", "2ba", *STUB_ARGS]) == 2
    assert calls == [2, 4, 6, 8] and [r["step"] for r in _lines(curve)] == [2, 4, 6]
    fail_at.clear()
    calls.clear()
    capsys.readouterr()
    assert main(["fid", str(run), "--every", "4ba", *STUB_ARGS]) == 0  # 4 is done; only 8 is new
    assert calls == [8] and [json.loads(x)["step"] for x in capsys.readouterr().out.splitlines()] == [8]
    records = _lines(curve)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    r = records[-1]
    assert r["wall_s"] == 80.0 and r["fid"] == 12.5 and r["only_from_fid_of_weights"] == 8
    assert r["comparable_to_published"] is False and r["comparable_reason"] == "stub"
    assert r["weights"] == str(run / "ema" / "ba00000008.safetensors") and r["run"] == "tread"
    assert r["routing"]["routes"] == TREAD and r["settings"]["num"] == 8 and r["settings"]["ref"] == "ref.npz"
    calls.clear()
    assert main(["fid", str(run), "--all", *STUB_ARGS]) == 0
    assert calls == [] and len(_lines(curve)) == 4
    assert main(["fid", str(run), "--all", *STUB_ARGS, "--seed", "1"]) == 2
    assert "step 2 was evaluated with seed=0, this run asks for seed=1; give another --out" in capsys.readouterr().err


def test_curve_errors_are_clear(tmp_path, stub_fid, capsys):
    calls, _ = stub_fid
    run = _exported_run(tmp_path, "tread", [2], TREAD)
    cases = [
        (["fid", str(run / "ema" / "ba00000002.safetensors"), "--all"], "is not a folder (for one weight file"),
        (["fid", str(run), "--every", "1ep"], "give a positive number of batches, e.g. 10000ba"),
        (["fid", str(run), "--every", "3ba"], "no exported weights at a multiple of 3 batches (exported steps: 2)"),
        (["fid", str(run), "--all", "--out", str(tmp_path / "c.json")], "give a .jsonl file"),
        (["fid", str(tmp_path), "--all"], "no exported weights (ba<N>.safetensors) yet"),
    ]
    for args, message in cases:
        assert main([*args, *STUB_ARGS]) == 2, args
        assert message in capsys.readouterr().err, args
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"step": 2, "fid": 1.0, "run": "someone-else"}) + "\n")
    assert main(["fid", str(run), "--all", "--out", str(other), *STUB_ARGS]) == 2
    assert "holds the curve of run 'someone-else', not 'tread'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fid", str(run), "--all", "--every", "2ba", *STUB_ARGS])
    assert "not allowed with argument" in capsys.readouterr().err
    assert calls == []
    assert main(["plot", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "p.png")]) == 2
    assert "not a run folder or a FID curve .jsonl" in capsys.readouterr().err


def test_plot_of_dense_and_tread_curves(tmp_path, stub_fid):
    tread = _exported_run(tmp_path, "tread", [2, 4], TREAD)
    dense = _exported_run(tmp_path, "dense", [2, 4], [])
    dense_curve = tmp_path / "dense-fid5k.jsonl"
    assert main(["fid", str(tread), "--all", *STUB_ARGS]) == 0
    assert main(["fid", str(dense), "--all", "--out", str(dense_curve), *STUB_ARGS]) == 0
    only_fid = tmp_path / "fid.png"
    assert main(["plot", str(tread / "fid_curve.jsonl"), str(dense_curve), "--out", str(only_fid)]) == 0
    (tread / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s, "wall_s": 9.0 * s}) + "\n"
                                                 for s in (1, 2, 3, 4)))
    both = tmp_path / "both.png"
    assert main(["plot", str(tread), str(dense_curve), "--out", str(both)]) == 0  # the run folder's curve is found
    assert load_series(tread).label == "tread (TREAD 1->2@0.5)"
    assert load_series(dense_curve).label == "dense (dense) [dense-fid5k]"
    with Image.open(only_fid) as a, Image.open(both) as b:
        assert a.size[0] > 800 and b.size[0] == a.size[0] and b.size[1] > 1.8 * a.size[1]  # a loss row over FID


# ---- real FIDs of tiny trained runs (slow) ----

VAL = {"val_every": "2ba", "val_num_samples": 8}
COMMON = ["--steps", "2", "--batch-size", "4", "--num", "8", "--seed", "5", "--device", "cpu"]


def _train(root, data, name, max_duration, **over):
    cfg = tiny_run_cfg(data, root / "runs", run_name=name, model={"in_channels": 3, "num_classes": 6},
                       train={"max_duration": max_duration, "save_interval": "2ba"},
                       logging={"metrics_interval": 1}, **over)
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / f"{name}.yaml")]) == 0
    return root / "runs" / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TREAD run trained 2 batches (one export), a random Inception and random reference statistics."""
    root = tmp_path_factory.mktemp("curve")
    data = root / "data"
    assert main(["convert", "demo", "--num-samples", "40", "--resolution", "8", "--out", str(data),
                 "--no-progress"]) == 0
    run = _train(root, str(data), "tread", "2ba", evaluation=VAL)
    torch.manual_seed(0)
    inception = save_inception(FIDInception().eval(), root / "inception.safetensors")
    feats = np.random.default_rng(0).standard_normal((64, 2048))
    ReferenceStats(feats.mean(0), np.cov(feats, rowvar=False)).save(root / "ref.npz")
    return {"root": root, "data": str(data), "run": run,
            "args": ["--inception", str(inception), "--ref", str(root / "ref.npz"), *COMMON]}


@pytest.mark.slow
def test_curve_of_a_run_as_training_goes_on(trained, capsys):
    t = trained
    run, curve = t["run"], t["run"] / "fid_curve.jsonl"
    assert main(["fid", str(run), "--every", "2ba", *t["args"], "--val-data", t["data"], "--val-num", "8"]) == 0
    first = _lines(curve)
    assert [r["step"] for r in first] == [2]
    # the curve's validation loss of the exported checkpoint is the in-training one, bitwise, same protocol
    (in_training,) = [r for r in _lines(run / "eval.jsonl") if r["step"] == 2]
    assert first[0]["val_loss"] == in_training["val_loss"] and first[0]["val_protocol"] == in_training["val_protocol"]
    _train(t["root"], t["data"], "tread", "4ba", evaluation=VAL)  # training goes on (autoresume): only the new export is evaluated
    capsys.readouterr()
    assert main(["fid", str(run), "--all", *t["args"]]) == 0
    assert [json.loads(x)["step"] for x in capsys.readouterr().out.splitlines()] == [4]
    records = _lines(curve)
    assert [r["step"] for r in records] == [2, 4] and records[0] == first[0]
    for r in records:
        assert r["fid"] > 0 and r["num_samples"] == 8 and "comparable_to_published" in r and r["comparable_reason"]
        assert r["routing"]["routes"] == TREAD
    assert 0 < records[0]["wall_s"] < records[1]["wall_s"]  # training wall-clock, continued across the resume
    png = t["root"] / "curves.png"
    assert main(["plot", str(run), "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size[0] > 800 and im.size[1] > 500  # loss and FID rows


@pytest.mark.slow
def test_two_ranks_give_the_curve_of_one(trained):
    t = trained
    run = t["root"] / "runs" / "one-export"  # the first export only: one FID on each side
    (run / "ema").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(t["run"] / "ema" / "ba00000002.safetensors", run / "ema" / "ba00000002.safetensors")
    one, two = t["root"] / "one.jsonl", t["root"] / "two.jsonl"
    assert main(["fid", str(run), "--all", "--out", str(one), *t["args"]]) == 0
    _composer("fid", str(run), "--all", "--out", str(two), *t["args"], cwd=REPO)
    a, b = _lines(one), _lines(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for x, y in zip(a, b):
        assert y["fid"] == pytest.approx(x["fid"], rel=1e-9) and y["num_samples"] == x["num_samples"]
