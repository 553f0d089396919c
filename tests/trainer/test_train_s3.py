"""Training that streams its data from, and checkpoints to, a real S3 server (s3rver on 127.0.0.1)."""

import shutil

from tread_scale.config import config_from_dict
from tread_scale.data import object_store as s3
from tread_scale.data.conversion.writer import ConvertOptions, convert
from tread_scale.data.conversion.sources import NpyFolderSource
from tread_scale.trainer.builder import build_trainer, train

from tests.conftest import tiny_run_cfg, write_npz_latents


def test_stream_from_s3_checkpoint_to_s3_and_autoresume_from_there(s3_env, tmp_path):
    write_npz_latents(tmp_path / "src")
    data = f"s3://{s3_env}/latents"
    convert(NpyFolderSource(folder=str(tmp_path / "src")), data, ConvertOptions(progress=False, shard_size="16kb"))
    ckpt = f"s3://{s3_env}/runs/t/checkpoints"
    base = tiny_run_cfg(data, tmp_path / "out", train={"max_duration": "2ba", "save_interval": "2ba",
                                                        "save_folder": ckpt},
                        data={"remote": data, "num_workers": 2})
    assert train(config_from_dict(base)).batches == 2
    keys = {o["Key"] for o in s3.s3_client().list_objects_v2(Bucket=s3_env, Prefix="runs/t/")["Contents"]}
    assert "runs/t/checkpoints/ep0-ba2-rank0.pt" in keys
    assert {"runs/t/checkpoints/ema/ba00000002.safetensors", "runs/t/checkpoints/ema/latest.safetensors"} <= keys
    # a fresh machine: nothing local survives, the run resumes from object storage
    shutil.rmtree(tmp_path / "out")
    cfg = config_from_dict({**base, "train": {**base["train"], "max_duration": "4ba"}})
    trainer, _ = build_trainer(cfg)
    assert int(trainer.state.timestamp.batch) == 2
    trainer.fit()
    trainer.close()
    keys = {o["Key"] for o in s3.s3_client().list_objects_v2(Bucket=s3_env, Prefix="runs/t/")["Contents"]}
    assert "runs/t/checkpoints/ep0-ba4-rank0.pt" in keys
