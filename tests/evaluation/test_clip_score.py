"""CLIP score (:mod:`tread_scale.evaluation.clip_score`) against torchmetrics' ``CLIPScore`` on a tiny local CLIP."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from tread_scale.devtools.demo_data import build_tiny_text_encoder
from tread_scale.errors import ConfigError
from tread_scale.evaluation.clip_score import CONVENTION, CLIPScorer, build_tiny_clip

TOL = 1e-4
CAPTIONS = [
    "a red circle at top left",
    "a blue square at bottom right",
    "a green triangle",
    "red and blue",
    "a yellow circle at bottom left and a green square at top right",
    # 95 words: 97 tokens with the start and end tokens, past the 77 text positions, so it is cut
    " ".join(["a red circle at top left and a blue square at bottom right"] * 7) + " a red circle",
]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    # torchmetrics 1.7.4 loads a path with CLIPModel.from_pretrained only when it contains "openai" (else it
    # refuses the name), so the folder's name carries it; from_pretrained of a local folder downloads nothing.
    return build_tiny_clip(tmp_path_factory.mktemp("openai_tiny_clip") / "clip", seed=0)


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return CLIPScorer(clip_folder, batch_size=4)  # 6 pairs: a full batch and a partial one


@pytest.fixture(scope="module")
def images():
    # 40x40, so the processor's resize (shortest edge to 32) and crop are exercised
    return np.random.default_rng(0).integers(0, 256, size=(len(CAPTIONS), 40, 40, 3), dtype=np.uint8)


def _chw(images: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images]


def test_equals_torchmetrics_per_pair_and_mean(clip_folder, scorer, images, caplog):
    from torchmetrics.functional.multimodal.clip_score import clip_score
    from torchmetrics.multimodal.clip_score import CLIPScore

    with caplog.at_level(logging.WARNING, logger="tread_scale.evaluation.clip_score"):
        ours = scorer.scores(images, CAPTIONS)
    assert "1 of 6 captions" in caplog.text and "77" in caplog.text
    raw = scorer.scores(images, CAPTIONS, clamp=False)
    assert ours.dtype == torch.float64 and ours.shape == (len(CAPTIONS),)

    metric = CLIPScore(model_name_or_path=clip_folder)
    metric.update(_chw(images), CAPTIONS)
    tm_mean = float(metric.compute())

    # Per pair: torchmetrics' functional clip_score of one pair is 100 * max(cos, 0) of that pair.
    loaded = lambda: (metric.model, metric.processor)  # noqa: E731 (the same weights, loaded once)
    tm_pairs = torch.tensor([float(clip_score(im, [cap], loaded)) for im, cap in zip(_chw(images), CAPTIONS)],
                            dtype=torch.float64)
    assert (ours - tm_pairs).abs().max() < TOL

    # The CLIPScore class clamps the mean of the unclamped scores ...
    assert abs(max(float(raw.mean()), 0.0) - tm_mean) < TOL
    # ... so on pairs with a positive cosine (every pair, with a trained CLIP) it is our mean.
    positive = (raw > 0).numpy()
    assert 0 < positive.sum() < len(CAPTIONS)  # this random CLIP has both signs: the clamp is exercised
    metric_pos = CLIPScore(model_name_or_path=clip_folder)
    kept = [c for c, keep in zip(CAPTIONS, positive) if keep]
    metric_pos.update(_chw(images[positive]), kept)
    assert abs(scorer.score(images[positive], kept) - float(metric_pos.compute())) < TOL


def test_layouts_give_the_same_scores(scorer, images):
    nhwc_numpy = scorer.scores(images, CAPTIONS)
    nhwc_tensor = scorer.scores(torch.from_numpy(images), CAPTIONS)
    nchw_tensor = scorer.scores(torch.stack(_chw(images)), CAPTIONS)
    torch.testing.assert_close(nhwc_tensor, nhwc_numpy, rtol=0, atol=1e-9)
    torch.testing.assert_close(nchw_tensor, nhwc_numpy, rtol=0, atol=1e-9)
    # batch size does not change the per-pair scores (beyond float32 rounding of batched matmuls, ~1e-5)
    one_batch = CLIPScorer(scorer.folder, batch_size=64).scores(images, CAPTIONS)
    torch.testing.assert_close(one_batch, nhwc_numpy, rtol=0, atol=TOL)


def test_scores_are_clamped_at_zero(scorer, images):
    clamped = scorer.scores(images, CAPTIONS)
    raw = scorer.scores(images, CAPTIONS, clamp=False)
    assert (clamped >= 0).all() and (clamped <= 100).all()
    assert (raw < 0).any()
    torch.testing.assert_close(clamped, raw.clamp(min=0), rtol=0, atol=0)


def test_describe_names_the_model(clip_folder, scorer, tmp_path):
    facts = scorer.describe()
    assert facts["folder"] == clip_folder
    assert facts["convention"] == CONVENTION == "torchmetrics CLIPScore: 100 * max(cos, 0)"
    assert facts["projection_dim"] == 16 and facts["image_size"] == 32 and facts["text_max_positions"] == 77
    assert len(facts["weights_sha256"]) == 16 and facts["weight_files"] == ["model.safetensors"]
    # the same seed writes the same weights; another seed other weights
    assert CLIPScorer(build_tiny_clip(tmp_path / "same", seed=0)).describe()["weights_sha256"] == \
        facts["weights_sha256"]
    assert CLIPScorer(build_tiny_clip(tmp_path / "other", seed=1)).describe()["weights_sha256"] != \
        facts["weights_sha256"]


def test_bad_folders_raise_config_error(clip_folder, tmp_path):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(ConfigError, match="no_such_clip.*does not exist"):
        CLIPScorer(missing)
    text_only = build_tiny_text_encoder(tmp_path / "text_only_clip", kind="clip")  # a CLIPTextModel, no vision
    with pytest.raises(ConfigError, match="text_only_clip.*clip_text_model.*not a CLIP model"):
        CLIPScorer(text_only)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ConfigError, match="empty_folder.*no config.json"):
        CLIPScorer(empty)
    no_processor = tmp_path / "model_only"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{clip_folder}/{name}", no_processor / name)
    with pytest.raises(ConfigError, match="model_only.*no image processor"):
        CLIPScorer(no_processor)


def test_bad_inputs_raise_value_error(scorer, images):
    with pytest.raises(ValueError, match="5 images and 6 captions"):
        scorer.scores(images[:5], CAPTIONS)
    with pytest.raises(ValueError, match="uint8"):
        scorer.scores(images.astype(np.float32) / 255, CAPTIONS)
    with pytest.raises(ValueError, match="RGB"):
        scorer.scores(images[..., :2], CAPTIONS)
    with pytest.raises(ValueError, match="list of strings"):
        scorer.scores(images[:1], "a red circle")
