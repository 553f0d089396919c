"""Issue 21.1-2, 21.5: SD3's text layout from three local encoders, CLIP's penultimate layer, and the text length
that training and ``dry-run`` use.

The reference is diffusers' ``StableDiffusion3Pipeline.encode_prompt`` on the same tiny random CLIP-L, CLIP-G
and T5 (built and saved here): our converter must write exactly what it computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data.test_captions import _images, read_all
from tread_scale.data.metadata import adopt_text_shape, read_metadata
from tread_scale.data.conversion.text_encoder import TextEncoder, recorded_clip_layer
from tread_scale.devtools.demo_data import build_tiny_text_encoder
from tread_scale.errors import ConfigError, DatasetMismatchError

WORDS = ["a", "red", "green", "blue", "square", "circle", "at", "top", "left", "bottom", "right", "and"]
PROMPTS = ["a red circle at top left", "blue square", ""]
T5_TOKENS = 12


@pytest.fixture(scope="module")
def sd3_encoders(tmp_path_factory) -> dict[str, str]:
    """CLIP-L (width 32, pooled 16), CLIP-G (48, pooled 24) and a T5 wider than both together (96)."""
    root = tmp_path_factory.mktemp("sd3-encoders")
    return {"clip_l": build_tiny_text_encoder(root / "clip_l", "clip_l", seed=1, vocab=WORDS, width=32),
            "clip_g": build_tiny_text_encoder(root / "clip_g", "clip_g", seed=2, vocab=WORDS, width=48),
            "t5": build_tiny_text_encoder(root / "t5", "t5", seed=3, vocab=WORDS, width=96)}


def _pipeline(folders):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    return StableDiffusion3Pipeline(
        transformer=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folders["clip_l"]),
        tokenizer=AutoTokenizer.from_pretrained(folders["clip_l"]),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folders["clip_g"]),
        tokenizer_2=AutoTokenizer.from_pretrained(folders["clip_g"]),
        text_encoder_3=T5EncoderModel.from_pretrained(folders["t5"]),
        tokenizer_3=AutoTokenizer.from_pretrained(folders["t5"]))


def test_sd3_layout_equals_the_sd3_pipelines_encode_prompt(sd3_encoders):
    with torch.no_grad():
        emb, _, pooled, _ = _pipeline(sd3_encoders).encode_prompt(
            PROMPTS, PROMPTS, PROMPTS, device="cpu", do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
    ours = TextEncoder.from_folders(**sd3_encoders, max_length=T5_TOKENS).encode(PROMPTS, out_dtype=torch.float32)
    assert ours["text_emb"].shape == (3, 77 + T5_TOKENS, 96) and ours["text_pooled"].shape == (3, 16 + 24)
    assert torch.equal(ours["text_emb"], emb) and torch.equal(ours["text_pooled"], pooled)
    # the mask marks the CLIP tokens (start, words, end) and T5's (words, </s>); padding is attended by SD3
    assert ours["text_mask"].sum(1).tolist() == [8 + 7, 4 + 3, 2 + 1]


def test_sd3_trio_is_required_together(sd3_encoders):
    with pytest.raises(ConfigError, match="--clip-l, --clip-g and --t5 together"):
        TextEncoder.from_folders(clip_l=sd3_encoders["clip_l"], clip_g=sd3_encoders["clip_g"])
    with pytest.raises(ConfigError, match="given: --t5, --clip, --clip-l, --clip-g"):
        TextEncoder.from_folders(**sd3_encoders, clip=sd3_encoders["clip_l"])


def test_clip_tokens_come_from_the_penultimate_layer_and_older_datasets_keep_the_last(sd3_encoders):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    folder = sd3_encoders["clip_l"]
    tok, model = AutoTokenizer.from_pretrained(folder), CLIPTextModelWithProjection.from_pretrained(folder)
    batch = tok(PROMPTS[:1], padding="max_length", max_length=77, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    new = TextEncoder.from_folders(clip=folder, max_length=77).encode(PROMPTS[:1], out_dtype=torch.float32)
    old = TextEncoder.from_folders(clip=folder, max_length=77, clip_layer=-1).encode(PROMPTS[:1],
                                                                                   out_dtype=torch.float32)
    assert torch.equal(new["text_emb"], out.hidden_states[-2])
    assert torch.equal(old["text_emb"], out.last_hidden_state)
    assert not torch.allclose(new["text_emb"], old["text_emb"])

    class Meta:  # metadata of a dataset converted before the layer was recorded
        encoders = [{"kind": "clip", "name": "clip"}]
    assert recorded_clip_layer(Meta) == -1


def test_convert_captions_writes_sd3s_layout_and_text_len_is_checked(tmp_path, sd3_encoders):
    from tread_scale.cli import main
    from tread_scale.config import ModelConfig
    from tread_scale.sampling import encode_prompts

    _images(tmp_path / "img", 3)
    out = tmp_path / "o"
    assert main(["convert", "captions", str(tmp_path / "img"), "--vae", "none", "--resolution", "8",
                 "--clip-l", sd3_encoders["clip_l"], "--clip-g", sd3_encoders["clip_g"], "--t5", sd3_encoders["t5"],
                 "--max-length", str(T5_TOKENS), "--out", str(out), "--no-progress", "--shard-size", "8kb"]) == 0
    meta = read_metadata(str(out))
    assert meta.text.layout == "sd3" and meta.text.shape == (77 + T5_TOKENS, 96, 40)
    assert [e["kind"] for e in meta.text.encoders] == ["clip_l", "clip_g", "t5"]
    assert [e.get("hidden_layer") for e in meta.text.encoders] == [-2, -2, None]
    # prompts for this dataset are encoded the same way as its captions were
    stored = read_all(str(out))
    caption = stored["caption"][0]
    again = encode_prompts([caption], meta.text, **sd3_encoders)
    row = stored["caption"].index(caption)
    assert torch.equal(again.condition.emb[0].half(), stored["text_emb"][row])
    # the model's text length must be the dataset's (dry-run plans with it)
    model = ModelConfig(name=None, family="mmdit", depth=2, hidden_size=32, num_heads=2, patch_size=2,
                        text_len=T5_TOKENS)
    with pytest.raises(DatasetMismatchError, match=rf"captions are {77 + T5_TOKENS} tokens \(sd3 layout: clip_l 77 "
                                                    rf"\+ clip_g 77 \+ t5 {T5_TOKENS}\) but model.text_len={T5_TOKENS}"):
        adopt_text_shape(model, meta, str(out))
    model.text_len = None
    adopt_text_shape(model, meta, str(out))
    assert (model.text_len, model.text_dim, model.pooled_dim) == (77 + T5_TOKENS, 96, 40)


def test_dry_run_plans_with_a_local_datasets_text_shape(tmp_path, sd3_encoders, capsys):
    from tread_scale.cli import main

    _images(tmp_path / "img", 2)
    data = tmp_path / "d"
    assert main(["convert", "captions", str(tmp_path / "img"), "--vae", "none", "--resolution", "8", "--t5",
                 sd3_encoders["t5"], "--max-length", "6", "--out", str(data), "--no-progress"]) == 0
    base = ["dry-run", "yamls/mmdit_demo.yaml", "model.input_size=8", "--world-size", "1"]
    assert main([*base, f"data.remote={data}"]) == 0
    report = capsys.readouterr().out
    assert f"6 tokens of width 96, pooled 96, from {data}" in report and "+ 6 text tokens of width 96" in report
    assert main([*base, f"data.remote={tmp_path / 'nowhere'}"]) == 2
    assert "no MDS dataset there" in capsys.readouterr().err
