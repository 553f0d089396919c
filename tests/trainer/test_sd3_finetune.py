"""Issue 21: the fine-tuner's path end to end on CPU: SD3 weights in (with the data's empty prompt as the null
condition), captions in SD3's text layout on the S3 test server, a 20-step TREAD fine-tune from the imported
weights that streams from S3, is killed with SIGKILL and resumes exactly, and diffusers weights out."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_run_cfg
from tests.parallel.launcher import kill_after, launch, losses
from tests.test_sd3 import _sd3
from tests.trainer.test_train_mmdit import _captioned_images
from tread_scale.cli import main

STEPS = 20


def _finetune_cfg(data: str, out: Path, weights: Path, name: str) -> dict:
    cfg = tiny_run_cfg(data, out, train={"max_duration": f"{STEPS}ba", "save_interval": "4ba", "deterministic": True},
                       data={"remote": data, "num_workers": 2}, logging={"metrics_interval": 1},
                       routing={"routes": [{"rate": 0.5, "start": 1, "end": 1}]},
                       objective={"kind": "rf", "shift": 3.0, "label_dropout": 0.25})
    cfg["model"] = {"name": None, "family": "mmdit", "depth": 3, "hidden_size": 32, "num_heads": 4,
                    "patch_size": 2, "in_channels": 3, "input_size": 8, "pos_embed": "sd3",
                    "pos_embed_max_size": 12, "qk_norm": True, "text_mask": False, "init_from": str(weights)}
    cfg["run_name"] = name
    cfg["sampling"] = {"every": None, "at_fit_end": False}
    return cfg


@pytest.mark.slow  # ~2 min: three tiny encoders, a conversion to S3, 20 + 20 training batches, a kill, an export
def test_imported_sd3_finetunes_from_s3_resumes_exactly_after_sigkill_and_exports_to_diffusers(s3_env, tmp_path):
    from diffusers import SD3Transformer2DModel

    from tread_scale.data.metadata import read_empty_prompt, read_metadata
    from tread_scale.devtools.demo_data import build_tiny_text_encoder
    from tread_scale.diffusion.guidance import Guidance
    from tread_scale.errors import ConfigError
    from tread_scale.models import TextCondition
    from tread_scale.sampling import load_net
    from tread_scale.sampling.sampler import sample_latents
    from tread_scale.weights import load_weights

    _captioned_images(tmp_path / "img", tmp_path / "unused-t5")
    enc = {k: build_tiny_text_encoder(tmp_path / k, k, seed=i, width=w)
           for i, (k, w) in enumerate((("clip_l", 32), ("clip_g", 48), ("t5", 96)))}
    data = f"s3://{s3_env}/captions"
    assert main(["convert", "captions", str(tmp_path / "img"), "--vae", "none", "--resolution", "8",
                 "--clip-l", enc["clip_l"], "--clip-g", enc["clip_g"], "--t5", enc["t5"], "--max-length", "8",
                 "--out", data, "--no-progress", "--shard-size", "8kb"]) == 0
    assert read_metadata(data).text.shape == (77 + 8, 96, 40)

    _sd3("rms_norm", in_channels=3, out_channels=3, joint_attention_dim=96, pooled_projection_dim=40)\
        .save_pretrained(tmp_path / "sd3")
    # without the data's empty prompt the weights have no null condition: CFG sampling is refused, not garbage
    bare = tmp_path / "bare.safetensors"
    assert main(["import-sd3", str(tmp_path / "sd3"), "--out", str(bare)]) == 0
    net, _ = load_net(bare, torch.device("cpu"))
    cond = TextCondition(torch.randn(1, 85, 96), torch.ones(1, 85, dtype=torch.bool), torch.randn(1, 40))
    with pytest.raises(ConfigError, match="import-sd3 --empty-prompt"):
        sample_latents(net, "rf", cond, torch.randn(1, 3, 8, 8), 2, Guidance(cfg_scale=2.0), shift=3.0)
    sample_latents(net, "rf", cond, torch.randn(1, 3, 8, 8), 2, shift=3.0)  # plain conditional sampling works

    weights = tmp_path / "sd3.safetensors"
    assert main(["import-sd3", str(tmp_path / "sd3"), "--out", str(weights), "--empty-prompt", data]) == 0
    imported, meta = load_weights(weights)
    assert meta["objective"] == {"kind": "rf", "shift": 3.0} and meta["model"]["timestep_scale"] == 1000.0
    empty = read_empty_prompt(data)
    assert torch.equal(imported["null_emb"][0], empty["text_emb"].float())
    assert torch.equal(imported["null_mask"][0], empty["text_mask"].bool())
    net, _ = load_net(weights, torch.device("cpu"))
    sample_latents(net, "rf", cond, torch.randn(1, 3, 8, 8), 2, Guidance(cfg_scale=2.0), shift=3.0)

    straight = _finetune_cfg(data, tmp_path / "a", weights, "straight")
    launch(straight, 1, tmp_path)
    killed = _finetune_cfg(data, tmp_path / "b", weights, "killed")
    kill_at = random.Random(STEPS).randint(6, 16)  # after at least one checkpoint (every 4 batches)
    kill_after(killed, 1, tmp_path, step=kill_at)
    assert max(losses(tmp_path / "b" / "killed")) < STEPS, "killed before the end"
    launch(killed, 1, tmp_path)  # the same command again: autoresume from the last checkpoint
    a, b = tmp_path / "a" / "straight", tmp_path / "b" / "killed"
    assert losses(a) == pytest.approx(losses(b), rel=1e-6) and sorted(losses(b)) == list(range(1, STEPS + 1))
    ema = b / "ema" / "latest.safetensors"
    wa, (wb, meta) = load_weights(a / "ema" / "latest.safetensors")[0], load_weights(ema)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the resumed fine-tune differs from the uninterrupted one"
    assert meta["step"] == STEPS
    # started from the imported weights: every block is still close to them, not to a re-initialisation
    w = "blocks.0.img.qkv.weight"
    assert (wb[w] - imported[w]).norm() < 0.2 * imported[w].norm()
    assert torch.equal(wb["null_emb"], imported["null_emb"])  # the same empty prompt, from the same data

    assert main(["export", str(ema), "--out", str(tmp_path / "out")]) == 0
    ref = SD3Transformer2DModel.from_pretrained(tmp_path / "out").eval()
    net, _ = load_net(ema, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g)
    emb, pooled = torch.randn(2, 85, 96, generator=g), torch.randn(2, 40, generator=g)
    with torch.no_grad():
        theirs = ref(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t * 1000).sample
        ours = net.eval()(x, t, TextCondition(emb, torch.ones(2, 85, dtype=torch.bool), pooled))
    assert ((theirs - ours).abs().max() / theirs.abs().max()).item() < 1e-4
    assert Path(tmp_path / "out" / "tread_scale.json").is_file()
