"""`tread-scale plot`: validation loss, FID and CLIP score against steps, training wall-clock and training FLOPs;
`--target` prints the time to a target of every run, dense vs TREAD; the cumulative clock of ``metrics.jsonl``.

The fast tests write run folders by hand (``config.yaml``, ``metrics.jsonl``, ``eval.jsonl``, a
``fid_curve.jsonl``); the slow one trains a dense and a TREAD MMDiT on the captioned demo.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tread_scale.cli import main
from tread_scale.plot import Clock, Target, load_series, time_to_target
from tread_scale.trainer.callbacks import metrics_log
from tread_scale.trainer.callbacks.metrics_log import MetricsLog

from tests.cli.test_text_sampling import MMDIT, captioned  # noqa: F401 (a fixture)
from tests.conftest import tiny_run_cfg

TREAD = [{"rate": 0.5, "start": 1, "end": 2}]
#: One panel of the figure, in pixels (5.5 x 3.5 inches at 110 dpi).
PANEL = (605, 385)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _run(root, name, routes, sec_per_step, flops_per_step, val, fid=None, clip=None):
    """A run folder: metrics every 10 steps up to 100 (cumulative training clock), eval records as given."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"run_name": name, "routing": {"routes": routes}}))
    _write(run / "metrics.jsonl", [
        {"step": s, "loss": 2.0 - s / 100, "samples": 8 * s, "wall_s": 3.0 * s, "train_wall_s": sec_per_step * s,
         "train_flops": flops_per_step * s} for s in range(10, 101, 10)])
    records = [{"step": s, "val_loss": v, "val_loss_by_level": {"1.0": v}, "val_protocol": {}} for s, v in val.items()]
    for s, f in (fid or {}).items():
        records.append({"step": s, "fid": f, "num_samples": 4, **({"clip_score": clip[s]} if clip else {})})
    _write(run / "eval.jsonl", sorted(records, key=lambda r: r["step"]))
    return run


@pytest.fixture
def runs(tmp_path):
    """A dense run (2 s and 1e12 FLOPs a step) and a TREAD run (1.5 s and 6e11 FLOPs a step), FID of the TREAD
    run from its FID curve (whose own wall_s is another clock: the run's metrics.jsonl times it)."""
    dense = _run(tmp_path, "dense", [], 2.0, 1e12, {25: 1.0, 50: 0.8, 75: 0.5, 100: 0.45}, fid={50: 40.0, 100: 30.0})
    tread = _run(tmp_path, "tread", TREAD, 1.5, 6e11, {25: 0.9, 50: 0.5, 75: 0.4, 100: 0.35})
    _write(tread / "fid_curve.jsonl", [
        {"step": s, "wall_s": 999.0, "fid": f, "clip_score": c, "val_loss": 9.0, "run": "tread",
         "routing": {"routes": TREAD}} for s, f, c in ((50, 35.0, 0.20), (100, 25.0, 0.31))])
    return dense, tread


def test_series_time_every_metric_by_the_runs_clock(runs):
    dense, tread = runs
    d, t = load_series(dense), load_series(tread)
    assert (d.label, d.dense, t.label, t.dense) == ("dense (dense)", True, "tread (TREAD 1->2@0.5)", False)
    assert set(d.metrics) == {"loss", "val_loss", "fid"} and set(t.metrics) == {"loss", "val_loss", "fid", "clip_score"}
    # step 75 lies between the records of steps 70 and 80: interpolated, not the nearest record's
    p = t.metrics["val_loss"][2]
    assert (p.step, p.value, p.wall_s, p.flops) == (75, 0.4, 112.5, pytest.approx(4.5e13))
    # the curve's points take the run's clock, not the curve's own wall_s; val_loss comes from eval.jsonl
    assert [(p.step, p.wall_s, p.value) for p in t.metrics["fid"]] == [(50, 75.0, 35.0), (100, 150.0, 25.0)]
    assert [p.value for p in t.metrics["clip_score"]] == [0.20, 0.31]
    assert [p.step for p in d.metrics["loss"]] == list(range(10, 101, 10))


def test_clock_interpolates_extrapolates_one_interval_and_starts_at_zero():
    c = Clock([10, 20], [5.0, 9.0], None)
    assert [c.at(s)[0] for s in (5, 10, 15, 20, 30, 31)] == [2.5, 5.0, 7.0, 9.0, 13.0, None]
    assert c.at(15)[1] is None


def test_target_table_dense_vs_tread(runs, capsys, tmp_path):
    dense, tread = runs
    png = tmp_path / "curves.png"
    assert main(["plot", str(dense), str(tread), "--out", str(png), "--target", "val_loss=0.5",
                 "--target", "clip_score=0.3", "--target", "fid=28"]) == 0
    out = capsys.readouterr().out
    assert out == (
        "target val_loss <= 0.5 (lower is better)\n"
        "run                     step  wall-clock (s)  training FLOPs  wall vs dense  FLOPs vs dense\n"
        "dense (dense)             75          150.00       7.500e+13\n"
        "tread (TREAD 1->2@0.5)    50           75.00       3.000e+13          0.500           0.400\n"
        "\n"
        "target clip_score >= 0.3 (higher is better)\n"
        "run                     step  wall-clock (s)  training FLOPs\n"
        f"dense (dense)           no clip_score in {dense}\n"
        "tread (TREAD 1->2@0.5)   100          150.00       6.000e+13\n"
        "\n"
        "target fid <= 28 (lower is better)\n"
        "run                     step  wall-clock (s)  training FLOPs\n"
        "dense (dense)           not reached (best 30 at step 100)\n"
        "tread (TREAD 1->2@0.5)   100          150.00       6.000e+13\n")
    # rows: loss, validation loss, FID, CLIP score; columns: step, wall-clock, FLOPs
    with Image.open(png) as im:
        assert im.size == (3 * PANEL[0], 4 * PANEL[1])


def test_target_json_lines(runs, capsys):
    dense, tread = runs
    assert main(["plot", str(dense), str(tread), "--target", "val_loss=0.5", "--target", "loss=1.5", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["metric"], r["run"], r["status"], r["step"]) for r in lines] == [
        ("val_loss", "dense (dense)", "reached", 75), ("val_loss", "tread (TREAD 1->2@0.5)", "reached", 50),
        ("loss", "dense (dense)", "reached", 50), ("loss", "tread (TREAD 1->2@0.5)", "reached", 50)]
    v = lines[1]
    assert (v["target"], v["higher_is_better"], v["dense"], v["wall_s"], v["flops"]) == (0.5, False, False, 75.0, 3e13)
    assert (v["wall_vs_dense"], v["flops_vs_dense"], v["input"]) == (0.5, 0.4, str(tread))
    assert lines[3]["wall_vs_dense"] == 0.75 and lines[3]["flops_vs_dense"] == pytest.approx(0.6)
    assert lines[0]["wall_vs_dense"] is None  # the dense run itself


def test_no_ratio_without_exactly_one_dense_run(runs, tmp_path):
    dense, tread = runs
    other = _run(tmp_path, "dense2", [], 1.0, 1e12, {50: 0.1})
    results = time_to_target([load_series(x) for x in (dense, other, tread)], [Target("val_loss", 0.5)])
    assert [r.step for r in results] == [75, 50, 50] and all(r.wall_vs_dense is None for r in results)
    results = time_to_target([load_series(tread)], [Target("val_loss", 0.1)])
    assert (results[0].status, results[0].best, results[0].best_step) == ("not reached", 0.35, 100)


def test_curve_file_alone_uses_its_own_wall_clock(runs, tmp_path, capsys):
    _, tread = runs
    curve = tmp_path / "tread-fid.jsonl"
    curve.write_text((tread / "fid_curve.jsonl").read_text())
    assert main(["plot", str(curve), "--target", "fid=30"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row == "tread (TREAD 1->2@0.5) [tread-fid]   100          999.00               -"
    png = tmp_path / "curve.png"
    assert main(["plot", str(curve), "--out", str(png), "--target", "val_loss=5"]) == 0  # val_loss and CLIP from it
    with Image.open(png) as im:  # rows: validation loss, FID, CLIP score; columns: step, wall-clock
        assert im.size == (2 * PANEL[0], 3 * PANEL[1])


def test_old_metrics_logs_give_no_flops_and_no_clock_after_a_restart(tmp_path, capsys):
    run = tmp_path / "old"
    _write(run / "metrics.jsonl", [{"step": s, "loss": 1.0 / s, "wall_s": w} for s, w in ((1, 4.0), (2, 8.0))])
    assert main(["plot", str(run), "--target", "loss=0.5"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "old (dense)     2            8.00               -"
    _write(run / "metrics.jsonl", [{"step": s, "loss": 1.0 / s, "wall_s": w} for s, w in ((1, 4.0), (2, 1.0))])
    assert main(["plot", str(run), "--target", "loss=0.5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["step"], r["wall_s"], r["flops"]) == (2, None, None)


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "accuracy=0.5"], "--target 'accuracy=0.5': unknown metric 'accuracy' (one of loss, val_loss, fid, "
                                   "clip_score)"),
    (["--target", "val_loss"], "--target 'val_loss': give METRIC=VALUE, e.g. val_loss=0.35"),
    (["--target", "fid=low"], "--target 'fid=low': 'low' is not a number"),
    (["--target", "fid=nan"], "--target 'fid=nan': the value must be finite"),
    ([], "nothing to do: give --out FILE.png and/or --target METRIC=VALUE"),
    (["--json", "--out", "x.png"], "--json prints the --target results"),
])
def test_target_errors_name_the_option(runs, capsys, args, message):
    assert main(["plot", str(runs[0]), *args]) == 2
    assert message in capsys.readouterr().err


def test_metrics_log_counts_every_batch_and_continues_across_a_resume(tmp_path, monkeypatch):
    """``train_flops`` sums every batch (``interval`` 2, FLOPs per sample changing as a schedule would);
    ``train_wall_s`` leaves out the time between batches (evaluation) and both continue after a resume."""
    now = [100.0]
    monkeypatch.setattr(metrics_log.time, "time", lambda: now[0])
    per_sample = {b: 10.0 if b <= 2 else 5.0 for b in range(1, 9)}
    model = SimpleNamespace(train_flops_per_sample=lambda latent_hw=None: 0.0)
    state = SimpleNamespace(model=model, device=SimpleNamespace(name="cpu"),
                            timestamp=SimpleNamespace(batch=0, sample=0),
                            total_loss_dict={"loss/train/total": torch.tensor(0.5)},
                            batch={"latent": torch.zeros(8, 4, 8, 12)})  # a bucket's batch: FLOPs at its size
    sizes = []
    logger = SimpleNamespace(log_metrics=lambda m: None)
    path = tmp_path / "metrics.jsonl"

    def batches(cb, first, last):
        for b in range(first, last + 1):
            cb.before_dataloader(state, logger)
            now[0] += 1.0  # one second of training
            model.train_flops_per_sample = lambda hw, f=per_sample[b]: sizes.append(hw) or f  # this batch's routes
            state.timestamp = SimpleNamespace(batch=b, sample=8 * b)
            cb.batch_end(state, logger)
            now[0] += 10.0  # evaluation and checkpoints: not training time

    cb = MetricsLog(path, interval=2)
    cb.fit_start(state, logger)
    batches(cb, 1, 4)
    saved = cb.state_dict()
    resumed = MetricsLog(path, interval=2)
    resumed.load_state_dict(saved)
    resumed.fit_start(state, logger)
    batches(resumed, 5, 6)
    records = _lines(path)
    assert [(r["step"], r["train_flops"], r["train_wall_s"]) for r in records] == [
        (2, 160.0, 2.0), (4, 240.0, 4.0), (6, 320.0, 6.0)]
    assert records[2]["wall_s"] == 12.0  # wall_s restarts at the resume and counts evaluation
    assert set(sizes) == {(8, 12)}

    old = MetricsLog(tmp_path / "old.jsonl", interval=2)
    old.load_state_dict({})  # a checkpoint written before the counters were saved
    old.fit_start(state, logger)
    batches(old, 7, 8)
    (r,) = _lines(tmp_path / "old.jsonl")
    assert r["step"] == 8 and "train_flops" not in r and "train_wall_s" not in r and old.state_dict() == {}


# ---- two tiny trained runs, end to end (slow) ----


def _train_mm(root, data, enc, name, routes):
    cfg = tiny_run_cfg(data, root, run_name=name, routing={"routes": routes},
                       optimizer={"lr": 3e-3}, train={"max_duration": "12ba", "save_interval": "12ba"},
                       logging={"metrics_interval": 2}, evaluation={"val_every": "3ba", "val_num_samples": 8})
    cfg["model"] = MMDIT
    cfg["text"] = {"t5": enc}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / f"{name}.yaml")]) == 0
    return root / name


@pytest.mark.slow
def test_time_to_target_of_trained_dense_and_tread_runs(captioned, tmp_path, capsys):  # noqa: F811
    root, _ = captioned
    dense = _train_mm(tmp_path, str(root / "data"), str(root / "enc" / "t5"), "dense", [])
    tread = _train_mm(tmp_path, str(root / "data"), str(root / "enc" / "t5"), "tread", TREAD)
    vals, metrics = {}, {}
    for run in (dense, tread):
        vals[run.name] = {r["step"]: r["val_loss"] for r in _lines(run / "eval.jsonl") if "val_loss" in r}
        metrics[run.name] = {r["step"]: r for r in _lines(run / "metrics.jsonl")}
    assert all(list(v) == [3, 6, 9, 12] for v in vals.values()) and all(list(m) == [2, 4, 6, 8, 10, 12]
                                                                       for m in metrics.values())
    # the FLOPs of every batch are counted, not only of the logged ones; TREAD's are fewer
    for m in metrics.values():
        assert m[4]["train_flops"] == pytest.approx(2 * m[2]["train_flops"], rel=1e-9)
    assert metrics["tread"][12]["train_flops"] < 0.9 * metrics["dense"][12]["train_flops"]
    assert all(0 < m[12]["train_wall_s"] < m[12]["wall_s"] for m in metrics.values())  # evaluation left out
    best = {name: min(v.values()) for name, v in vals.items()}
    both = math.ceil(max(best.values()) * 1e4) / 1e4  # both runs reach it
    one = float(f"{(best['dense'] + best['tread']) / 2:.6g}")  # only the better run reaches it
    assert min(best.values()) < one < max(best.values())
    capsys.readouterr()
    png = tmp_path / "curves.png"
    args = ["plot", str(dense), str(tread), "--target", f"val_loss={both}", "--target", f"val_loss={one}"]
    assert main([*args, "--out", str(png)]) == 0
    table = capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    results = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    for r in results[:2]:
        name = "dense" if r["dense"] else "tread"
        step = next(s for s, v in vals[name].items() if v <= r["target"])
        assert r["status"] == "reached" and r["step"] == step
        # a step between two records (3, 9) is interpolated between them
        steps = [0, *metrics[name]]
        for key, field in (("wall_s", "train_wall_s"), ("flops", "train_flops")):
            at = np.interp(step, steps, [0.0, *(m[field] for m in metrics[name].values())])
            assert r[key] == pytest.approx(at, rel=1e-9)
        assert f"{r['step']:>4}  " in table and f"{r['wall_s']:.2f}" in table and f"{r['flops']:.3e}" in table
    assert results[1]["wall_vs_dense"] == pytest.approx(results[1]["wall_s"] / results[0]["wall_s"])
    assert results[1]["flops_vs_dense"] == pytest.approx(results[1]["flops"] / results[0]["flops"])
    loser = "tread" if best["dense"] < best["tread"] else "dense"
    assert [r["status"] for r in results[2:]] == (["reached", "not reached"] if loser == "tread"
                                                  else ["not reached", "reached"])
    assert f"not reached (best {best[loser]:.4g} at step" in table
    with Image.open(png) as im:  # loss and validation loss rows; step, wall-clock and FLOPs columns
        assert im.size == (3 * PANEL[0], 2 * PANEL[1])
