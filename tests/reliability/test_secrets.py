"""R5: planted secrets never reach logs, wandb, saved configs or checkpoints; weights load without pickles."""

import pytest
import yaml

from tread_scale.cli import main

from tests.conftest import tiny_run_cfg

SECRET = "planted-Secret-5bd1f0c7e2"


def _files_containing(root, needle: bytes):
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_planted_secrets_never_leave_the_environment(latent_dataset, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET + "-wandb")
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET + "-token")
    # a careless user also pastes one into the config
    cfg = tiny_run_cfg(latent_dataset, tmp_path / "runs", train={"max_duration": "2ba", "save_interval": "1ba"},
                       logging={"wandb": {"enabled": True, "mode": "offline", "group": SECRET + "-token"},
                                "progress_bar": False, "console_interval": "1ba"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--log-level", "DEBUG", "train", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "runs" / "t"
    assert list((run / "wandb").glob("offline-run-*")), "wandb ran"
    assert (run / "checkpoints" / "ep0-ba2-rank0.pt").is_file()
    leaked = _files_containing(run, SECRET.encode())
    assert leaked == [], f"the secret was written to {leaked}"
    assert "REDACTED" in (run / "config.yaml").read_text()
    out, err = capfd.readouterr()
    assert SECRET not in out and SECRET not in err


@pytest.mark.parametrize("command", ["sample", "export"])
def test_pickled_weights_are_refused(tmp_path, capsys, command):
    import torch

    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "weights.safetensors.pt")
    assert main([command, str(tmp_path / "weights.safetensors.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "only .safetensors weight files are loaded" in capsys.readouterr().err


class _Payload:
    """A pickle that runs code when loaded: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("command", ["fid", "import-dit"])
def test_pickles_with_code_are_not_executed(tmp_path, capsys, command):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"w": _Payload(marker)}, evil)
    if command == "fid":
        args = ["fid", str(tmp_path / "w.safetensors"), "--inception", str(evil), "--ref", str(tmp_path / "r.npz")]
        expected = "pickled models are refused because loading them runs code"
    else:
        args = ["import-dit", str(evil), "--model", "DiT-S/8", "--out", str(tmp_path / "o.safetensors")]
        expected = "refusing to unpickle code"
    assert main(args) == 2
    assert expected in capsys.readouterr().err
    assert not marker.exists(), "the pickle's code ran"
