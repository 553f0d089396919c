"""Issue 21: the fine-tuner's path end to end on CPU: SD3 weights in, captions in SD3's text layout, a TREAD
fine-tune that starts from the imported weights, diffusers weights out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_run_cfg
from tests.test_sd3 import _sd3
from tests.trainer.test_train_mmdit import _captioned_images
from tread_scale.cli import main


@pytest.mark.slow  # ~30 s: three tiny encoders, a conversion, 4 training batches, an export
def test_import_sd3_finetune_with_tread_and_export_to_diffusers(tmp_path):
    from diffusers import SD3Transformer2DModel

    from tread_scale.data.metadata import read_metadata
    from tread_scale.data.text_encoder import build_tiny_text_encoder
    from tread_scale.models import TextCondition
    from tread_scale.sampling import load_net
    from tread_scale.weights import load_weights

    _captioned_images(tmp_path / "img", tmp_path / "unused-t5")
    enc = {k: build_tiny_text_encoder(tmp_path / k, k, seed=i, width=w)
           for i, (k, w) in enumerate((("clip_l", 32), ("clip_g", 48), ("t5", 96)))}
    data = tmp_path / "data"
    assert main(["convert", "captions", str(tmp_path / "img"), "--vae", "none", "--resolution", "8",
                 "--clip-l", enc["clip_l"], "--clip-g", enc["clip_g"], "--t5", enc["t5"], "--max-length", "8",
                 "--out", str(data), "--no-progress", "--shard-size", "8kb"]) == 0
    assert read_metadata(str(data)).text.shape == (77 + 8, 96, 40)

    _sd3("rms_norm", in_channels=3, out_channels=3, joint_attention_dim=96, pooled_projection_dim=40)\
        .save_pretrained(tmp_path / "sd3")
    weights = tmp_path / "sd3.safetensors"
    assert main(["import-sd3", str(tmp_path / "sd3"), "--out", str(weights)]) == 0
    imported, meta = load_weights(weights)
    assert meta["objective"] == {"kind": "rf", "shift": 3.0} and meta["model"]["timestep_scale"] == 1000.0

    cfg = tiny_run_cfg(str(data), tmp_path / "runs", train={"max_duration": "4ba", "save_interval": "2ba"},
                       routing={"routes": [{"rate": 0.5, "start": 1, "end": 1}]},
                       objective={"kind": "rf", "shift": 3.0, "label_dropout": 0.25})
    cfg["model"] = {"name": None, "family": "mmdit", "depth": 3, "hidden_size": 32, "num_heads": 4,
                    "patch_size": 2, "in_channels": 3, "input_size": 8, "pos_embed": "sd3",
                    "pos_embed_max_size": 12, "qk_norm": True, "text_mask": False, "init_from": str(weights)}
    cfg["run_name"] = "ft"
    cfg["sampling"] = {"every": None, "at_fit_end": False}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "ft.yaml")]) == 0
    ema = tmp_path / "runs" / "ft" / "ema" / "latest.safetensors"
    tuned, _ = load_weights(ema)
    # started from the imported weights: after 4 small steps every block is still close to them, not to a re-init
    w = "blocks.0.img.qkv.weight"
    assert (tuned[w] - imported[w]).norm() < 0.1 * imported[w].norm()

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
