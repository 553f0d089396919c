"""End-to-end text-to-image training: ``tread-scale convert captions`` straight to a real S3 server (s3rver), a
tiny TREAD MMDiT streamed from it with checkpoints on it, an exact autoresume from object storage alone, and
what the exported EMA weights are good for (``load_net``, ``sample``, ``plot``, a fine-tune's ``model.init_from``;
``export`` of a RoPE MMDiT is refused: diffusers' SD3 has only its stored position table)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tread_scale.cli import main
from tread_scale.config import config_from_dict
from tread_scale.data import object_store as s3
from tread_scale.data.metadata import read_empty_prompt, read_metadata
from tread_scale.trainer.builder import build_trainer, train
from tread_scale.weights import load_weights

from tests.conftest import tiny_run_cfg

NUM_IMAGES = 32  # four batches of 8: one epoch


def _captioned_images(root: Path, encoder: Path) -> None:
    """Random PNGs with a ``<stem>.txt`` caption beside each (a third in a subfolder), and a tiny T5 that knows
    the captions' words."""
    from PIL import Image

    from tread_scale.devtools.demo_shapes import demo_caption
    from tread_scale.devtools.demo_data import build_tiny_text_encoder

    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        path = root / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(path)
        path.with_suffix(".txt").write_text(demo_caption(i) + "\n")
    build_tiny_text_encoder(encoder, "t5", seed=0)


def _cfg(data: str, out: Path, steps: int, **train_over) -> dict:
    """A tiny TREAD MMDiT (depth 3, width 64; 3x8x8 pixels: 16 image tokens, half routed past block 1) with
    caption dropout, streaming ``data`` with 2 workers."""
    cfg = tiny_run_cfg(data, out, train={"max_duration": f"{steps}ba", "save_interval": "2ba", **train_over},
                       data={"remote": data, "num_workers": 2}, logging={"metrics_interval": 1},
                       routing={"routes": [{"rate": 0.5, "start": 1, "end": 1}]},
                       objective={"kind": "rf", "label_dropout": 0.25})
    cfg["model"] = {"name": None, "family": "mmdit", "depth": 3, "hidden_size": 64, "num_heads": 4, "patch_size": 2,
                    "in_channels": 3, "input_size": 8}
    cfg["run_name"] = "m"
    cfg["sampling"] = {"every": None, "at_fit_end": False}
    return cfg


@pytest.mark.slow  # ~40 s of CPU (3 short trainings, 2 with S3 checkpoints, a conversion, sampling)
def test_captions_to_s3_then_mmdit_streams_checkpoints_and_resumes_exactly_from_s3(s3_env, tmp_path, capsys):
    from tread_scale.devtools.demo_shapes import demo_caption
    from tread_scale.models.mmdit import MMDiT
    from tread_scale.sampling import load_net

    _captioned_images(tmp_path / "img", tmp_path / "t5")
    data = f"s3://{s3_env}/captions"
    assert main(["convert", "captions", str(tmp_path / "img"), "--vae", "none", "--resolution", "8", "--t5",
                 str(tmp_path / "t5"), "--max-length", "16", "--out", data, "--no-progress",
                 "--shard-size", "8kb"]) == 0
    meta = read_metadata(data)
    assert meta.num_samples == NUM_IMAGES and meta.latent_shape == (3, 8, 8) and meta.text.shape == (16, 32, 32)

    # 2 batches with checkpoints on S3; then a fresh machine (nothing local) resumes from S3 to 4
    ckpt = f"s3://{s3_env}/runs/m/checkpoints"
    base = _cfg(data, tmp_path / "out", 2, save_folder=ckpt)
    assert train(config_from_dict(base)).batches == 2
    keys = {o["Key"] for o in s3.s3_client().list_objects_v2(Bucket=s3_env, Prefix="runs/m/")["Contents"]}
    assert {"runs/m/checkpoints/ep0-ba2-rank0.pt", "runs/m/checkpoints/ema/ba00000002.safetensors"} <= keys
    shutil.rmtree(tmp_path / "out")
    trainer, _ = build_trainer(config_from_dict(_cfg(data, tmp_path / "out", 4, save_folder=ckpt)))
    assert int(trainer.state.timestamp.batch) == 2  # resumed from object storage, not restarted
    assert isinstance(trainer.state.model.net, MMDiT) and trainer.state.model.net.router is not None
    trainer.fit()
    trainer.close()
    resumed = tmp_path / "resumed.safetensors"
    s3.s3_client().download_file(s3_env, "runs/m/checkpoints/ema/ba00000004.safetensors", str(resumed))

    # the same 4 batches without a break (local checkpoints) end in the same weights, bit for bit
    straight = train(config_from_dict(_cfg(data, tmp_path / "straight", 4)))
    a, meta_a = load_weights(resumed)
    b, _ = load_weights(straight.ema_weights)
    assert meta_a["step"] == 4 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]

    # the export is a complete MMDiT: load_net rebuilds it with the dataset's text widths and its null condition
    net, wmeta = load_net(resumed, torch.device("cpu"))
    assert isinstance(net, MMDiT) and (net.text_dim, net.pooled_dim, net.text_len) == (32, 32, 16)
    assert wmeta.model_config().model_family() == "mmdit" and wmeta.data.latent_shape == [3, 8, 8]
    empty = read_empty_prompt(data)
    for buffer, key in (("null_emb", "text_emb"), ("null_mask", "text_mask"), ("null_pooled", "text_pooled")):
        assert buffer in a and getattr(net, buffer)[0].equal(empty[key].to(a[buffer].dtype)), buffer
    assert not bool(net.null_mask.all())  # the empty prompt is padding after its end token
    with torch.no_grad():
        out = net(torch.randn(2, 3, 8, 8), torch.rand(2), net.null_condition.expand(2))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()

    # sample (prompts encoded by the encoder the dataset records) and plot apply; export needs SD3's positions
    assert main(["sample", str(resumed), "--out", str(tmp_path / "samples"), "--prompt", demo_caption(0),
                 "--t5", str(tmp_path / "t5"), "--num", "2", "--steps", "2"]) == 0
    assert (tmp_path / "samples" / "grid.png").is_file()
    assert main(["plot", str(tmp_path / "straight" / "m"), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").is_file()
    capsys.readouterr()
    assert main(["export", str(resumed), "--out", str(tmp_path / "diffusers")]) == 2
    err = capsys.readouterr().err
    assert "model.pos_embed='rope'" in err and "diffusers' SD3" in err, err
    assert not (tmp_path / "diffusers").exists()
    # fid without a prompt set refuses before any reference or sample work (an MMDiT samples one image per prompt)
    from tread_scale.evaluation.inception import FIDInception, save_inception

    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    inception = save_inception(FIDInception(), tmp_path / "inception.safetensors")
    assert main(["fid", str(resumed), "--inception", str(inception), "--ref", str(ref)]) == 2
    assert "a text-to-image model's FID needs one prompt set: --prompts FILE" in capsys.readouterr().err

    # a fine-tune from these weights (model.init_from) drops captions to this dataset's empty prompt, not the
    # file's (here a different one, of another length)
    from tread_scale.trainer.data import prepare_data_access
    from tread_scale.trainer.model import build_model
    from tread_scale.weights import save_weights

    other = {**a, "null_emb": torch.randn(1, 4, 32), "null_mask": torch.ones(1, 4, dtype=torch.bool)}
    save_weights(tmp_path / "other.safetensors", other, meta_a)
    cfg = _cfg(data, tmp_path / "ft", 1)
    cfg = config_from_dict({**cfg, "model": {**cfg["model"], "init_from": str(tmp_path / "other.safetensors")}})
    model, _ = build_model(cfg, "cpu", prepare_data_access(cfg))
    assert model.net.null_emb[0].equal(empty["text_emb"].float()) and model.net.null_mask[0].equal(empty["text_mask"])
    assert model.net.blocks[1].img.qkv.weight.equal(a["blocks.1.img.qkv.weight"])


def test_export_refuses_an_mmdit_before_writing_anything(tmp_path):
    from tread_scale.config import ModelConfig, to_dict
    from tread_scale.errors import CheckpointError
    from tread_scale.export import export_diffusers
    from tread_scale.factory import build_net
    from tread_scale.weights import save_weights

    cfg = ModelConfig(name="MMDiT-T/2", input_size=8, in_channels=4, text_dim=16, pooled_dim=8, text_len=4)
    net = build_net(cfg)
    meta = {"model": to_dict(cfg), "routing": {"routes": []}, "objective": {"kind": "rf"},
            "data": {"latent_shape": [4, 8, 8], "num_classes": 1, "vae": "none"}}
    path = save_weights(tmp_path / "mmdit.safetensors", net.state_dict(), meta)
    with pytest.raises(CheckpointError, match=r"mmdit.safetensors holds a text-to-image MMDiT, which "
                                              r"DiTTransformer2DModel cannot hold; it exports as an SD3"):
        export_diffusers(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
