"""The ``tread-scale`` command line: clear errors with exit code 2, and the sample command."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tread_scale.cli import main
from tread_scale.config import config_from_dict, dump_config

from tests.conftest import tiny_run_cfg


def test_train_with_an_unknown_key_exits_2_naming_it(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config_from_dict(tiny_run_cfg("/d", tmp_path))))
    assert main(["train", str(path), "trian.max_duration=2ba"]) == 2
    assert "unknown config key 'trian'; did you mean 'train'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "unknown_key"])
def test_an_error_is_reported_once(tmp_path, case):
    """Issue 22.9: a TreadScaleError was both logged and printed, so it appeared twice on stderr."""
    if case == "missing":
        path, message = tmp_path / "nope.yaml", "does not exist"
    else:
        path, message = tmp_path / "c.yaml", "unknown config key 'trian'"
        path.write_text("trian: {}\n")
    proc = subprocess.run([sys.executable, "-m", "tread_scale.cli", "train", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    assert output.count(message) == 1, output
    assert "tread-scale train: error: " in proc.stderr


def test_convert_empty_folder_exits_2(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main(["convert", "npy", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "holds no .npy or .npz files" in capsys.readouterr().err


def test_convert_demo_then_train_then_sample(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["convert", "demo", "--num-samples", "48", "--resolution", "8", "--out", str(data), "--no-progress"]) == 0
    cfg = tiny_run_cfg(str(data), tmp_path / "runs", model={"in_channels": 3, "num_classes": 6},
                       train={"max_duration": "2ba"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "routing.routes[0].rate=0.25"]) == 0
    run = tmp_path / "runs" / "t"
    assert yaml.safe_load((run / "config.yaml").read_text())["routing"]["routes"][0]["rate"] == 0.25
    out = tmp_path / "s"
    assert main(["sample", str(run), "--out", str(out), "--num", "6", "--steps", "2", "--cfg-scale", "2",
                 "--tread-scale", "1.5", "--strong-rate", "0.2", "--weak-rate", "0.5", "--batch-size", "4"]) == 0
    npz = np.load(out / "samples.npz")
    assert npz["latents"].shape == (6, 3, 8, 8) and npz["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    assert npz["images"].dtype == np.uint8 and (out / "grid.png").stat().st_size > 0
    # same seeds, same samples, whatever the batch size
    out2 = tmp_path / "s2"
    assert main(["sample", str(run), "--out", str(out2), "--num", "6", "--steps", "2", "--cfg-scale", "2",
                 "--tread-scale", "1.5", "--strong-rate", "0.2", "--weak-rate", "0.5", "--batch-size", "6"]) == 0
    assert np.allclose(np.load(out2 / "samples.npz")["latents"], npz["latents"], atol=1e-5)


def test_sample_refuses_pickles(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not really")
    assert main(["sample", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "only .safetensors weight files are loaded" in capsys.readouterr().err
