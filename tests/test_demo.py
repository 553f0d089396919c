"""`make demo`'s job, shortened: moto server, demo data to S3 as MDS, TREAD training, sampling."""

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
