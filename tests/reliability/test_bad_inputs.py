"""R4: a catalogue of bad inputs, each failing with a message that names what is wrong."""

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from streaming.base.util import clean_stale_shared_memory

from tread_scale.config import config_from_dict
from tread_scale.data.conversion.writer import ConvertOptions, convert
from tread_scale.data.stream.dataset import LatentStreamingDataset
from tread_scale.data.conversion.sources import NpyFolderSource
from tread_scale.errors import CheckpointError, ConfigError, DatasetError, DatasetMismatchError, RouteError
from tread_scale.trainer.builder import build_trainer, train
from tread_scale.trainer.callbacks.nonfinite import TrainingDivergedError

from tests.conftest import tiny_run_cfg


def _copy(src, dst):
    shutil.copytree(src, dst)
    for p in dst.rglob("*.mds"):  # keep only the compressed shards, as a remote dataset has them
        p.unlink()
    return dst


def test_corrupt_shard_names_the_shard(latent_dataset, tmp_path):
    data = _copy(latent_dataset, tmp_path / "data")
    shard = data / "group_00000" / "shard.00001.mds.zstd"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    clean_stale_shared_memory()
    ds = LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, remote=str(data), local=str(tmp_path / "c"),
                                batch_size=1, validate_hash="xxh64", shuffle=False)
    with pytest.raises(DatasetError, match=r"shard group_00000/shard.00001.mds is corrupt \(checksum mismatch"):
        for i in range(len(ds)):
            ds[i]


def test_truncated_index_names_the_file(latent_dataset, tmp_path):
    data = _copy(latent_dataset, tmp_path / "data")
    index = data / "index.json"
    index.write_text(index.read_text()[:100])
    clean_stale_shared_memory()
    with pytest.raises(DatasetError, match=r"data: index.json is truncated or corrupt"):
        LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, local=str(data), batch_size=1)


def test_wrong_latent_shape(latent_dataset, tmp_path):
    with pytest.raises(DatasetMismatchError, match=r"latents have shape \(4, 8, 8\).*expects \(4, 16, 16\)"):
        train(config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, model={"input_size": 16})))


def test_wrong_latent_dtype(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    np.save(tmp_path / "src" / "a" / "x.npy", np.zeros((4, 8, 8), np.int64))
    with pytest.raises(DatasetError, match=r"x.npy: latent dtype int64 is not a float type"):
        convert(NpyFolderSource(folder=str(tmp_path / "src")), str(tmp_path / "o"), ConvertOptions(progress=False))


def test_labels_out_of_range(latent_dataset, tmp_path):
    with pytest.raises(DatasetMismatchError, match=r"dataset has 5 classes but model.num_classes=3"):
        train(config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, model={"num_classes": 3})))


def test_nan_in_latents(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lat = np.zeros((3, 4, 8, 8), np.float32)
    lat[1, 0, 0, 0] = np.inf
    np.savez(src / "b.npz", latents=lat, labels=np.zeros(3, int))
    with pytest.raises(DatasetError, match=r"b.npz\[1\]: latent contains NaN or Inf"):
        convert(NpyFolderSource(folder=str(src)), str(tmp_path / "o"), ConvertOptions(progress=False))


def test_unknown_and_ill_typed_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_duraton'; did you mean 'train.max_duration'"):
        config_from_dict(tiny_run_cfg("/d", tmp_path, train={"max_duraton": "2ba"}))
    with pytest.raises(ConfigError, match=r"train.global_batch_size: expected an integer, got '8x'"):
        config_from_dict(tiny_run_cfg("/d", tmp_path, train={"global_batch_size": "8x"}))


def test_bad_route(tmp_path):
    with pytest.raises(RouteError, match=r"routing.routes\[0\] \(rate=0.5, start=3, end=1\)"):
        config_from_dict(tiny_run_cfg("/d", tmp_path, routing={"routes": [{"rate": 0.5, "start": 3, "end": 1}]}))


def test_missing_credentials_and_wrong_bucket(s3_env, monkeypatch, tmp_path):
    from tread_scale.errors import ObjectStoreError

    cfg = config_from_dict(tiny_run_cfg("s3://no-such-bucket/data", tmp_path))
    with pytest.raises(ObjectStoreError, match=r"bucket 'no-such-bucket' does not exist at http://127.0.0.1:\d+"):
        train(cfg)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(ObjectStoreError, match=r"no S3 credentials found"):
        train(config_from_dict(tiny_run_cfg(f"s3://{s3_env}/data", tmp_path)))


def _poison(trainer, at_step):
    """Make the loss NaN from batch ``at_step`` on (a divergence, as a too-large learning rate would)."""
    model = trainer.state.model
    real = model.objective.training_loss

    def training_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if model.step + 1 >= at_step else loss

    model.objective.training_loss = training_loss


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(latent_dataset, tmp_path):
    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, train={"max_duration": "6ba", "save_interval": "2ba"}))
    trainer, _ = build_trainer(cfg)
    _poison(trainer, 4)
    with pytest.raises(TrainingDivergedError, match=r"the loss became NaN/Inf at batch 4"):
        trainer.fit()
    trainer.close()
    ckpts = tmp_path / "t" / "checkpoints"
    assert os.readlink(ckpts / "latest-rank0.pt") == "ep0-ba2-rank0.pt"
    state = torch.load(ckpts / "ep0-ba2-rank0.pt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["state"]["model"].values() if torch.is_tensor(v))


def test_nan_loss_skip_policy_skips_updates(latent_dataset, tmp_path):
    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, train={"max_duration": "5ba", "save_interval": "5ba",
                                                                         "nonfinite_loss": "skip",
                                                                         "max_skipped_batches": 2}))
    trainer, _ = build_trainer(cfg)
    _poison(trainer, 3)
    before = None

    def snapshot():
        return {k: v.detach().clone() for k, v in trainer.state.model.net.state_dict().items()}

    with pytest.raises(TrainingDivergedError, match=r"at batch 5 after 2 skipped batches in a row"):
        from composer.core import Callback

        class Snap(Callback):
            def batch_end(self, state, logger):
                nonlocal before
                if int(state.timestamp.batch) == 2:
                    before = snapshot()

        trainer.state.callbacks.append(Snap())
        trainer.fit()
    after = snapshot()
    trainer.close()
    assert all(torch.equal(before[k], after[k]) for k in before), "skipped batches must not change the weights"


def test_no_space_left_for_a_checkpoint(latent_dataset, tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode()[:200]}")
    try:
        cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, train={
            "max_duration": "6ba", "save_interval": "2ba", "save_folder": str(small / "ckpt")}))
        with pytest.raises(CheckpointError, match=r"no space left on the device holding .*ckpt while writing a "
                                                  r"checkpoint.*the last complete checkpoint \(ep0-ba2-rank0.pt\) is intact"):
            train(cfg)
        assert os.readlink(small / "ckpt" / "latest-rank0.pt") == "ep0-ba2-rank0.pt"
        torch.load(small / "ckpt" / "ep0-ba2-rank0.pt", map_location="cpu", weights_only=False)  # complete
    finally:
        subprocess.run(["umount", str(small)], check=False)
