"""`make demo`'s jobs (class and text), shortened: moto server, demo data to S3 as MDS, TREAD training, sampling."""

import json

import numpy as np

from tread_scale.devtools import demo


def test_demo_job_runs_end_to_end_on_moto(tmp_path, capsys):
    assert demo.main([f"output_dir={tmp_path}", "train.max_duration=6ba", "train.save_interval=3ba",
                      "sampling.every=null", "sampling.steps=2", "data.num_workers=2"]) == 0
    out = capsys.readouterr().out
    assert "tread_scale demo finished" in out and "s3://tread-demo/shapes  (4096 samples" in out
    run = tmp_path / "demo"
    assert (run / "checkpoints" / "ep0-ba6-rank0.pt").is_file()
    assert (run / "final" / "grid.png").is_file() and (run / "ema" / "latest.safetensors").is_file()
    assert "6 batches" in out


def test_text_demo_job_runs_end_to_end_on_moto(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tread_scale.devtools.demo_shapes.DEMO_NUM_SAMPLES", 256)  # the job reads it at call time
    monkeypatch.setattr(demo, "TEXT_ENCODERS", tmp_path / "encoders")
    monkeypatch.setattr(demo, "EVAL_MODELS", tmp_path / "eval")
    monkeypatch.setattr(demo, "DEMO_EVAL_NUM", 8)
    monkeypatch.setattr(demo, "DEMO_EVAL_REF", 16)
    assert demo.main(["--demo", "text", f"output_dir={tmp_path}", "train.max_duration=4ba", "train.save_interval=2ba",
                      "sampling.every=2ba", "sampling.num_images=4", "sampling.steps=2", "data.num_workers=0"]) == 0
    out = capsys.readouterr().out
    assert "tread_scale text-to-image demo finished" in out and "s3://tread-demo/shapes-captions  (256 captioned" in out
    run = tmp_path / "mmdit-demo"
    assert (run / "ema" / "latest.safetensors").is_file() and (run / "samples" / "ba00000002.png").is_file()
    assert len((run / "samples" / "captions.txt").read_text().splitlines()) == 4
    final = (run / "final" / "captions.txt").read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in final] == demo.DEMO_PROMPTS and (run / "final" / "grid.png").is_file()
    assert "4 batches" in out
    assert "aspect-ratio buckets  40x24: 64, 32x32: 128, 24x40: 64" in out
    with np.load(run / "final-wide" / "samples.npz") as z:
        assert z["images"].shape == (len(demo.DEMO_PROMPTS), 24, 40, 3)
    scores = json.loads((run / "final" / "scores.json").read_text())
    assert scores["num_samples"] == 8 and scores["protocol"]["prompts"] == "captions of s3://tread-demo/shapes-captions " \
        "(first 8)" and 0 <= scores["clip_score"] <= 100 and scores["fid"] > 0
    assert f"prompt FID-8          {scores['fid']:.4g}" in out and "random stand-ins" in out
