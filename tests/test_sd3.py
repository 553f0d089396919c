"""Issue 21.1-2: SD3 weights in (``import-sd3``), diffusers weights out (``export`` of an MMDiT), proven against
diffusers' own ``SD3Transformer2DModel`` and ``StableDiffusion3Pipeline`` on tiny random models built here."""

from __future__ import annotations

import pytest
import torch

from tread_scale.errors import CheckpointError
from tread_scale.models import MMDiT, TextCondition

TEXT, POOLED = 24, 12


def _sd3(qk_norm, depth=3, seed=0, **over):
    """A tiny random SD3Transformer2DModel (every parameter drawn, so no term hides behind a zero init)."""
    from diffusers import SD3Transformer2DModel

    args = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=depth, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=TEXT, caption_projection_dim=32,
                pooled_projection_dim=POOLED, out_channels=4, pos_embed_max_size=12, qk_norm=qk_norm)
    args.update(over)
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm_" in name else 0.0, 0.2)
    return model


def _ours_at(weights, size):
    """Our MMDiT of the imported weights, built for latents of ``size`` (the position table is cropped)."""
    from tread_scale.factory import build_net
    from tread_scale.weights import load_weights_and_meta

    state, meta = load_weights_and_meta(weights)
    cfg = meta.model_config()
    cfg.input_size = size
    net = build_net(cfg).eval()
    net.load_state_dict(state)
    return net


def _both(ref, net, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, size, size, generator=g), torch.rand(2, generator=g)
    emb, pooled = torch.randn(2, 5, TEXT, generator=g), torch.randn(2, POOLED, generator=g)
    with torch.no_grad():
        theirs = ref(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t * 1000).sample
        ours = net(x, t, TextCondition(emb, torch.zeros(2, 5, dtype=torch.bool), pooled))  # padding attended
    return theirs, ours


def _assert_close(a, b):
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"], ids=["sd3-medium-like", "sd35-large-like"])
def test_import_equals_diffusers_and_export_round_trips_bitwise(tmp_path, qk_norm):
    from diffusers import SD3Transformer2DModel

    from tread_scale.cli import main

    ref = _sd3(qk_norm)
    ref.save_pretrained(tmp_path / "sd3")
    assert main(["import-sd3", str(tmp_path / "sd3"), "--out", str(tmp_path / "w.safetensors")]) == 0
    for size in (8, 12, 4):  # the sample size, a larger and a smaller latent: centre crops of the 12x12 table
        ref_at = _sd3(qk_norm, sample_size=size)
        ref_at.load_state_dict(ref.state_dict())
        _assert_close(*_both(ref_at, _ours_at(tmp_path / "w.safetensors", size), size))
    assert main(["export", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "out")]) == 0
    back = SD3Transformer2DModel.from_pretrained(tmp_path / "out").state_dict()
    original = ref.state_dict()
    assert set(back) == set(original)
    differ = sorted(k for k in original if not torch.equal(original[k], back[k]))
    # only the last block's text queries, whose output SD3 discards: written as zeros / an identity norm
    assert differ == sorted(k for k in (f"transformer_blocks.2.attn.add_q_proj.{s}" for s in ("weight", "bias")))\
        + ([f"transformer_blocks.2.attn.norm_added_q.weight"] if qk_norm else [])
    assert not back["transformer_blocks.2.attn.add_q_proj.weight"].any()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_our_own_mmdit_exports_to_an_sd3_diffusers_computes_alike(tmp_path, qk_norm):
    from diffusers import SD3Transformer2DModel

    from tread_scale.sd3 import export_sd3_diffusers
    from tread_scale.weights import DataFacts, WeightsMeta, save_weights

    torch.manual_seed(3)
    net = MMDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, text_dim=TEXT,
                pooled_dim=POOLED, pos_embed="sd3", pos_embed_max_size=10, qk_norm=qk_norm, timestep_scale=1000.0,
                text_mask=False, init="xavier_all").eval()
    model = {"name": None, "family": "mmdit", "depth": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 2,
             "in_channels": 4, "input_size": 8, "text_dim": TEXT, "pooled_dim": POOLED, "pos_embed": "sd3",
             "pos_embed_max_size": 10, "qk_norm": qk_norm, "timestep_scale": 1000.0, "text_mask": False}
    path = save_weights(tmp_path / "ours.safetensors", net.state_dict(),
                        WeightsMeta(model=model, routing={}, objective={"kind": "rf"},
                                    data=DataFacts(latent_shape=[4, 8, 8], num_classes=0)))
    ref = SD3Transformer2DModel.from_pretrained(export_sd3_diffusers(path, tmp_path / "d")).eval()
    _assert_close(*_both(ref, net, 8))


def test_unsupported_members_and_layouts_are_refused_by_name(tmp_path):
    from tread_scale.sd3 import export_sd3_diffusers, import_sd3
    from tread_scale.weights import DataFacts, WeightsMeta, save_weights

    _sd3(None, dual_attention_layers=(0,)).save_pretrained(tmp_path / "mmditx")
    with pytest.raises(CheckpointError, match=r"MMDiT-X \(SD3.5-Medium: dual attention in blocks \(0,\)\)"):
        import_sd3(tmp_path / "mmditx", tmp_path / "x.safetensors")
    rope = MMDiT(input_size=8, hidden_size=32, depth=2, num_heads=4, text_dim=TEXT, pooled_dim=POOLED)
    model = {"name": None, "family": "mmdit", "depth": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 2,
             "input_size": 8, "text_dim": TEXT, "pooled_dim": POOLED, "pos_embed": "rope", "timestep_scale": 1000.0}
    path = save_weights(tmp_path / "rope.safetensors", rope.state_dict(),
                        WeightsMeta(model=model, routing={}, objective={"kind": "rf"},
                                    data=DataFacts(latent_shape=[4, 8, 8], num_classes=0)))
    with pytest.raises(CheckpointError, match="model.pos_embed='rope'"):
        export_sd3_diffusers(path, tmp_path / "r")
    with pytest.raises(CheckpointError, match="expected a diffusers SD3Transformer2DModel folder"):
        import_sd3(tmp_path / "nowhere", tmp_path / "n.safetensors")


def test_import_refuses_an_empty_prompt_dataset_without_captions(tmp_path, latent_dataset):
    from tread_scale.errors import DatasetError
    from tread_scale.sd3 import import_sd3

    _sd3(None, depth=2).save_pretrained(tmp_path / "src")
    with pytest.raises(DatasetError, match=f"--empty-prompt {latent_dataset}: the dataset has no captions"):
        import_sd3(tmp_path / "src", tmp_path / "w.safetensors", empty_prompt=latent_dataset)
    assert not (tmp_path / "w.safetensors").exists()


def _original_layout(ours: dict, depth: int, qk_norm: bool) -> dict:
    """Our state as SD3's original single-file layout (what Stability's checkpoints hold)."""
    names = {"pooled_embedder": "y_embedder"}
    out = {}
    for k, v in ours.items():
        if k.startswith("blocks.") or k.startswith("null_"):
            continue
        head = k.split(".")[0]
        out["model.diffusion_model." + k.replace(head, names.get(head, head), 1)] = v
    for i in range(depth):
        for stream, block in (("img", "x_block"), ("txt", "context_block")):
            s, o = f"blocks.{i}.{stream}.", f"model.diffusion_model.joint_blocks.{i}.{block}."
            out[o + "adaLN_modulation.1.weight"] = ours[s + "adaLN_modulation.1.weight"]
            out[o + "adaLN_modulation.1.bias"] = ours[s + "adaLN_modulation.1.bias"]
            if s + "kv.weight" in ours:  # pre-only: the original keeps a full qkv
                for suffix in ("weight", "bias"):
                    kv = ours[s + f"kv.{suffix}"]
                    out[o + f"attn.qkv.{suffix}"] = torch.cat([torch.zeros_like(kv[: kv.shape[0] // 2]), kv])
                if qk_norm:
                    out[o + "attn.ln_k.weight"] = ours[s + "k_norm.weight"]
                    out[o + "attn.ln_q.weight"] = torch.ones_like(ours[s + "k_norm.weight"])
                continue
            for part, mine in (("attn.qkv", "qkv"), ("attn.proj", "proj"), ("mlp.fc1", "mlp.fc1"),
                               ("mlp.fc2", "mlp.fc2")):
                for suffix in ("weight", "bias"):
                    out[o + f"{part}.{suffix}"] = ours[s + f"{mine}.{suffix}"]
            if qk_norm:
                out[o + "attn.ln_q.weight"] = ours[s + "q_norm.weight"]
                out[o + "attn.ln_k.weight"] = ours[s + "k_norm.weight"]
    return out


def test_a_single_original_layout_file_imports_like_its_diffusers_folder(tmp_path):
    from safetensors.torch import save_file

    from tread_scale.sd3 import import_sd3
    from tread_scale.weights import load_weights

    _sd3("rms_norm").save_pretrained(tmp_path / "sd3")
    folder_weights, _ = load_weights(import_sd3(tmp_path / "sd3", tmp_path / "a.safetensors"))
    save_file(_original_layout(folder_weights, 3, True), str(tmp_path / "sd3_original.safetensors"))
    file_weights, meta = load_weights(import_sd3(tmp_path / "sd3_original.safetensors", tmp_path / "b.safetensors",
                                                 input_size=8))
    assert set(file_weights) == set(folder_weights)
    assert all(torch.equal(file_weights[k], folder_weights[k]) for k in folder_weights)
    assert meta["model"]["qk_norm"] is True and meta["objective"] == {"kind": "rf", "shift": 3.0}


def test_stable_diffusion_3_pipeline_generates_with_our_export(tmp_path):
    """A real client: diffusers' StableDiffusion3Pipeline with tiny local CLIP-L, CLIP-G, T5 and VAE, and the
    transformer our export wrote, generates an image from a prompt."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    from tread_scale.devtools.demo_data import build_tiny_text_encoder
    from tread_scale.sd3 import export_sd3_diffusers, import_sd3

    words = ["a", "red", "circle"]
    enc = {k: build_tiny_text_encoder(tmp_path / k, k, seed=i, vocab=words, width=w)
           for i, (k, w) in enumerate((("clip_l", 32), ("clip_g", 48), ("t5", 96)))}
    _sd3("rms_norm", depth=2, joint_attention_dim=96, pooled_projection_dim=16 + 24).save_pretrained(tmp_path / "src")
    weights = import_sd3(tmp_path / "src", tmp_path / "w.safetensors")
    transformer = SD3Transformer2DModel.from_pretrained(export_sd3_diffusers(weights, tmp_path / "transformer"))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, scaling_factor=1.5, shift_factor=0.1)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(enc["clip_l"]),
        tokenizer=AutoTokenizer.from_pretrained(enc["clip_l"]),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(enc["clip_g"]),
        tokenizer_2=AutoTokenizer.from_pretrained(enc["clip_g"]),
        text_encoder_3=T5EncoderModel.from_pretrained(enc["t5"]), tokenizer_3=AutoTokenizer.from_pretrained(enc["t5"]))
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=2.0, output_type="np",
                 max_sequence_length=8, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and (image >= 0).all() and (image <= 1).all() and image.std() > 0
