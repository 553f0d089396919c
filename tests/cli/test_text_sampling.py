"""Sampling text-to-image MMDiTs: prompts as the condition, CFG with the empty prompt, TREAD guidance, encoders
checked against the recorded hashes, ``tread-scale sample --prompt``, and training grids with captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from tread_scale.cli import main
from tread_scale.config import ModelConfig, RoutingConfig, config_from_dict, to_dict
from tread_scale.data.conversion.text_encoder import TextEncoder
from tread_scale.devtools.demo_data import build_tiny_text_encoder, write_captioned_demo
from tread_scale.devtools.demo_shapes import demo_caption
from tread_scale.diffusion.guidance import Guidance
from tread_scale.errors import ConfigError
from tread_scale.factory import build_dit, build_net
from tread_scale.models.conditioning import TextCondition
from tread_scale.routing.routes import Route
from tread_scale.sampling import (CAPTIONS_FILE, PromptSet, captioned_grid, dataset_prompts, generate, sample_latents,
                                  seeded_noise)
from tread_scale.sampling.grid import prompt_rows
from tread_scale.weights import DataFacts, WeightsMeta, load_weights_and_meta, save_weights

from tests.conftest import tiny_run_cfg

#: A tiny MMDiT on the 3x16x16 captioned demo (the run config's route 1->2 fits its 3 blocks).
MMDIT = {"name": None, "family": "mmdit", "depth": 3, "hidden_size": 32, "num_heads": 2, "patch_size": 4,
         "in_channels": 3, "input_size": 16}
PROMPTS = ["a red circle at top left", "a blue square at bottom right and a green cross at top right"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> TextEncoder:
    folder = build_tiny_text_encoder(tmp_path_factory.mktemp("enc") / "t5", "t5", seed=0)
    return TextEncoder.from_folders(t5=folder, max_length=16)


def _net(routes=(), width=32):
    cfg = ModelConfig(name=None, family="mmdit", depth=2, hidden_size=32, num_heads=2, patch_size=2, in_channels=3,
                      input_size=8, text_dim=width, pooled_dim=width, text_len=16, init="xavier_all")
    torch.manual_seed(0)
    return build_net(cfg, routes).eval()


def _prompts(encoder: TextEncoder, prompts: list[str]) -> PromptSet:
    return PromptSet(prompts, TextCondition.from_batch(encoder.encode(prompts)).to("cpu", torch.float32))


def _generate(net, prompts: PromptSet, indices, batch_size, guidance=None, seed=7):
    out = {}
    for idx, lat, _, ys in generate(net, "rf", indices, seed=seed, num_classes=1, steps=3, guidance=guidance,
                                    edm=None, device=torch.device("cpu"), batch_size=batch_size, prompts=prompts):
        out.update({i: (latent, y) for i, latent, y in zip(idx, lat, ys)})
    return out


# ------------------------------------------------------------------ the library


def test_only_the_prompt_changes_the_sample(encoder):
    net = _net()
    cond = TextCondition.from_batch(encoder.encode([PROMPTS[0], PROMPTS[0], PROMPTS[1]])).to("cpu", torch.float32)
    noise = seeded_noise([5, 5, 5], (3, 8, 8))  # one seed for all three
    lat = sample_latents(net, "rf", cond, noise, 3)
    assert torch.equal(lat[0], lat[1])  # same prompt, same seed: the same sample
    assert (lat[0] - lat[2]).abs().max() > 1e-3  # another prompt, same seed: another sample


def test_samples_cycle_through_prompts_and_do_not_depend_on_batching(encoder):
    net = _net()
    prompts = _prompts(encoder, PROMPTS)
    whole = _generate(net, prompts, list(range(5)), batch_size=5)
    assert [whole[i][1] for i in range(5)] == [0, 1, 0, 1, 0]
    alone = _generate(net, prompts, [3], batch_size=5)  # padded with copies of itself: other companions
    assert torch.equal(alone[3][0], whole[3][0])
    pairs = _generate(net, prompts, list(range(5)), batch_size=2)  # other batch shapes: equal up to rounding
    for i in range(5):
        torch.testing.assert_close(pairs[i][0], whole[i][0], atol=1e-5, rtol=1e-5)


def test_cfg_uses_the_empty_prompt_and_tread_guidance_runs(encoder):
    net = _net(routes=[Route(rate=0.5, start=0, end=1)])
    empty = TextCondition.from_batch(encoder.encode([""]))
    net.set_null_condition(empty)
    prompts = _prompts(encoder, PROMPTS)
    plain = _generate(net, prompts, [0, 1], 2)
    cfg = _generate(net, prompts, [0, 1], 2, Guidance(cfg_scale=3.0))
    both = _generate(net, prompts, [0, 1], 2, Guidance(cfg_scale=3.0, tread_scale=2.0))
    for i in (0, 1):
        assert cfg[i][0].isfinite().all() and both[i][0].isfinite().all()
        assert (cfg[i][0] - plain[i][0]).abs().max() > 1e-4 and (both[i][0] - cfg[i][0]).abs().max() > 1e-4
    # cfg_scale 0 is the unconditional prediction: every prompt gives the same sample for the same seed
    uncond = _generate(net, _prompts(encoder, [PROMPTS[0]]), [0], 1, Guidance(cfg_scale=0.0))
    uncond_other = _generate(net, _prompts(encoder, [PROMPTS[1]]), [0], 1, Guidance(cfg_scale=0.0))
    assert torch.equal(uncond[0][0], uncond_other[0][0])


def test_a_dit_takes_no_prompts_and_an_mmdit_needs_them(encoder):
    with pytest.raises(ConfigError, match="samples from prompts"):
        next(generate(_net(), "rf", [0], seed=0, num_classes=1, steps=1, guidance=None, edm=None,
                      device=torch.device("cpu"), batch_size=1))
    dit = build_dit(ModelConfig(name=None, depth=1, hidden_size=32, num_heads=2, patch_size=2, in_channels=3,
                                input_size=8, num_classes=2))
    with pytest.raises(ConfigError, match="prompts apply to text-conditioned"):
        next(generate(dit, "rf", [0], seed=0, num_classes=2, steps=1, guidance=None, edm=None,
                      device=torch.device("cpu"), batch_size=1, prompts=_prompts(encoder, PROMPTS)))


def test_prompt_grids_have_a_row_per_prompt_and_wrap_into_blocks():
    assert prompt_rows(7, 3) == [[0, 3, 6], [1, 4], [2, 5]] and prompt_rows(2, 5) == [[0], [1]]
    images = np.full((10, 8, 8, 3), 200, np.uint8)
    eight = captioned_grid(images[:8], [f"prompt {i}" for i in range(8)])
    ten = captioned_grid(images, [f"prompt {i}" for i in range(10)])  # two blocks of five rows side by side
    assert eight.dtype == np.uint8 and eight.shape[2] == 3 and min(eight.shape[:2]) >= 96
    assert ten.shape[0] < eight.shape[0] and ten.shape[1] >= 2 * eight.shape[1]


# ------------------------------------------------------------------ a tiny trained run and the CLI


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioned")
    meta = write_captioned_demo(str(root / "data"), str(root / "enc"), num_samples=64, resolution=16,
                                shard_size="16kb")
    return root, meta


@pytest.fixture(scope="module")
def trained(captioned, tmp_path_factory):
    """A 4-batch MMDiT run through ``tread-scale train``: grids at batches 2 and 4, validation loss, EMA weights."""
    root, _ = captioned
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_run_cfg(str(root / "data"), out, run_name="mm")
    cfg["model"] = MMDIT
    cfg["text"] = {"t5": str(root / "enc" / "t5")}
    cfg["sampling"] = {"every": "2ba", "num_images": 4, "steps": 2, "cfg_scale": 2.0}
    cfg["evaluation"] = {"val_every": "2ba", "val_num_samples": 8, **_fid_files(out)}
    (out / "mm.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(out / "mm.yaml")]) == 0
    return out / "mm", root


def _fid_files(out) -> dict:
    """In-training FID-4 with a CLIP score at batch 4: a random Inception, random reference statistics and a
    tiny random CLIP, saved under ``out``."""
    from tread_scale.evaluation.clip_score import build_tiny_clip
    from tread_scale.evaluation.inception import FIDInception, save_inception
    from tread_scale.evaluation.metrics import ReferenceStats

    torch.manual_seed(0)
    inception = str(save_inception(FIDInception().eval(), out / "inception.safetensors"))
    feats = np.random.default_rng(0).standard_normal((64, 2048))
    ReferenceStats(feats.mean(0), np.cov(feats, rowvar=False)).save(out / "ref.npz")
    clip = build_tiny_clip(out / "clip", vocab=sorted({w for p in PROMPTS for w in p.split()}))
    return {"fid_every": "4ba", "fid_num_samples": 4, "fid_steps": 2, "fid_batch_size": 2, "fid_cfg_scale": 1.5,
            "inception": inception, "reference": str(out / "ref.npz"), "clip": clip}


def test_weights_record_the_text_facts_and_encoder_folders(trained, captioned):
    run, root = trained
    _, meta = load_weights_and_meta(run / "ema" / "latest.safetensors")
    assert meta.model["family"] == "mmdit" and meta.model["text_dim"] == captioned[1].text.emb_dim
    assert meta.text == {"t5": str((root / "enc" / "t5").resolve()), "clip": None, "clip_l": None, "clip_g": None}
    text = meta.data.text_metadata()
    assert text.encoders == captioned[1].text.encoders and text.seq_len == captioned[1].text.seq_len


def test_training_grids_show_the_datasets_first_captions(trained):
    run, root = trained
    samples = run / "samples"
    assert (samples / "ba00000002.png").is_file() and (samples / "ba00000004.png").is_file()
    rows = (samples / CAPTIONS_FILE).read_text().splitlines()
    assert rows == [f"row {i + 1} (1 image): {demo_caption(i)}" for i in range(4)]
    first = dataset_prompts(str(root / "data"), 4)
    assert first.prompts == [demo_caption(i) for i in range(4)] and first.condition.emb.shape[0] == 4
    val = [r for r in map(json.loads, (run / "eval.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4] and all(np.isfinite(r["val_loss"]) for r in val)


def test_sample_prompts_from_the_cli(trained, tmp_path):
    run, _ = trained
    file = tmp_path / "prompts.txt"
    file.write_text("# one a line\na yellow ring at bottom left\n\n")
    out = tmp_path / "s"
    assert main(["sample", str(run), "--out", str(out), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--prompts", str(file), "--steps", "2", "--cfg-scale", "2", "--tread-scale", "1.5",
                 "--device", "cpu"]) == 0
    npz = np.load(out / "samples.npz")
    prompts = PROMPTS + ["a yellow ring at bottom left"]
    assert npz["images"].shape == (12, 16, 16, 3) and npz["prompt_ids"].tolist() == [i % 3 for i in range(12)]
    assert npz["prompts"].tolist() == [prompts[i % 3] for i in range(12)] and npz["seeds"].tolist() == list(range(12))
    assert (out / CAPTIONS_FILE).read_text().splitlines()[2] == f"row 3 (4 images): {prompts[2]}"
    assert (out / "grid.png").is_file()
    # the same seeds and prompt give the same sample whatever else is sampled with it
    again = tmp_path / "again"
    assert main(["sample", str(run), "--out", str(again), "--prompt", PROMPTS[1], "--num", "1", "--seed", "1",
                 "--steps", "2", "--cfg-scale", "2", "--tread-scale", "1.5", "--device", "cpu"]) == 0
    np.testing.assert_allclose(np.load(again / "samples.npz")["latents"][0], npz["latents"][1], atol=1e-5)


def test_sample_names_the_prompt_words_the_encoder_does_not_know(trained, tmp_path, caplog):
    """Issue 22.9: unknown words became ``<unk>`` silently; one warning now names them."""
    run, _ = trained
    with caplog.at_level("WARNING"):
        assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--prompt", "a zebra circle at top left",
                     "--prompt", "a purple square and a zebra", "--num", "2", "--steps", "1", "--device", "cpu"]) == 0
    assert [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()] == [
        "prompt words the encoder 't5' does not know (encoded as <unk>): 'zebra', 'purple'"]


def test_sample_names_a_wrong_or_missing_encoder(trained, tmp_path, capsys):
    run, _ = trained
    other = build_tiny_text_encoder(tmp_path / "other", "t5", seed=1)
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--prompt", "a red circle at top left",
                 "--t5", other]) == 2
    err = capsys.readouterr().err
    assert "its weights (sha256" in err and "differ from those of 't5'" in err
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--prompt", "x", "--t5",
                 str(tmp_path / "gone")]) == 2
    assert "--t5 " in (err := capsys.readouterr().err) and "no such folder" in err
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--prompt", "x", "--clip", other]) == 2
    assert "without a clip encoder" in capsys.readouterr().err


def test_labels_for_an_mmdit_and_prompts_for_a_dit_are_clear_errors(trained, tmp_path, capsys):
    run, _ = trained
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--labels", "0,1"]) == 2
    assert "text-to-image MMDiT" in (err := capsys.readouterr().err) and "--prompt" in err
    assert main(["sample", str(run), "--out", str(tmp_path / "s")]) == 2
    assert "give the prompts" in capsys.readouterr().err
    cfg = ModelConfig(name=None, depth=1, hidden_size=32, num_heads=2, patch_size=2, in_channels=3, input_size=8,
                      num_classes=6)
    dit = save_weights(tmp_path / "dit.safetensors", build_dit(cfg).state_dict(),
                       WeightsMeta(model=to_dict(cfg), routing=to_dict(RoutingConfig()), objective={"kind": "rf"},
                                   data=DataFacts(latent_shape=[3, 8, 8], num_classes=6)))
    assert main(["sample", str(dit), "--out", str(tmp_path / "s"), "--prompt", "a red circle"]) == 2
    assert "class-conditional DiT" in (err := capsys.readouterr().err) and "--labels" in err


# ------------------------------------------------------------------ config checks


def test_prompts_without_encoders_and_a_clip_score_without_fid_are_rejected_at_validation(tmp_path):
    base = tiny_run_cfg("/d", tmp_path, model=MMDIT)
    with pytest.raises(ConfigError, match="sampling.prompts needs the text encoders"):
        config_from_dict({**base, "sampling": {"prompts": ["a red circle"]}})
    ref = tmp_path / "f.npz"
    ref.write_bytes(b"")
    fid = {"fid_every": "2ba", "inception": str(ref), "reference": str(ref)}
    with pytest.raises(ConfigError, match="evaluation.clip: 'nope' is not a folder"):
        config_from_dict({**base, "evaluation": {**fid, "clip": "nope"}})
    with pytest.raises(ConfigError, match="evaluation.clip: the CLIP score .* needs model.family: mmdit"):
        config_from_dict(tiny_run_cfg("/d", tmp_path, evaluation={**fid, "clip": str(tmp_path)}))
    config_from_dict({**base, "evaluation": fid})  # in-training FID of an MMDiT: its validation captions


def test_training_grid_prompts_are_encoded_with_the_checked_encoders(captioned, tmp_path):
    from tread_scale.trainer.callbacks import grid_prompts

    root, meta = captioned
    cfg = config_from_dict(tiny_run_cfg(str(root / "data"), tmp_path, model=MMDIT, text={"t5": str(root / "enc/t5")},
                                        sampling={"prompts": PROMPTS, "num_images": 4}))
    prompts = grid_prompts(cfg, meta, rank=0)
    assert prompts.prompts == PROMPTS and prompts.condition.emb.shape == (2, *meta.text.shape[:2])
    assert grid_prompts(cfg, meta, rank=1) is None
    other = build_tiny_text_encoder(tmp_path / "other", "t5", seed=3)
    cfg.text.t5 = other
    with pytest.raises(ConfigError, match="differ from those of 't5'"):
        grid_prompts(cfg, meta, rank=0)


# ------------------------------------------------------------------ prompt-set FID and CLIP score (issue 22.1, 22.2)


@pytest.mark.slow  # ~70 s: a random Inception on CPU over 16 reference and 7 generated images, twice
def test_prompt_fid_and_clip_score_of_an_mmdit_run(trained, tmp_path, capsys):
    from tread_scale.evaluation.clip_score import CLIPScorer, build_tiny_clip
    from tread_scale.evaluation.inception import FIDInception, save_inception

    run, root = trained
    torch.manual_seed(0)
    inception = str(save_inception(FIDInception().eval(), tmp_path / "inception.safetensors"))
    clip = build_tiny_clip(tmp_path / "clip", vocab=sorted({w for p in PROMPTS for w in p.split()}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([*PROMPTS, "a green triangle"]) + "\n")
    common = ["--inception", inception, "--ref-data", str(root / "data"), "--ref-num", "16", "--steps", "2",
              "--batch-size", "2", "--device", "cpu", "--cfg-scale", "2"]
    out = tmp_path / "fid.json"
    assert main(["fid", str(run), *common, "--prompts", str(prompts), "--clip-score", clip, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["num_samples"] == 3 and np.isfinite(r["fid"]) and r["fid"] > 0  # one image per prompt by default
    assert r["comparable_to_published"] is False and "no named published protocol" in r["comparable_reason"]
    p = r["protocol"]
    assert p["num_prompts"] == 3 and p["seed"] == 0 and p["resolution"] == [16, 16] and p["reference"] == "pixel-data"
    assert p["guidance"]["cfg_scale"] == 2.0 and p["sampler"].startswith("edm 2 steps")
    # the CLIP score is the one of the very images `sample` makes with the same seeds, prompts and batching (CLIP
    # in other batches: float32 rounding only)
    assert main(["sample", str(run), "--out", str(tmp_path / "s"), "--prompts", str(prompts), "--num", "3",
                 "--steps", "2", "--batch-size", "2", "--device", "cpu", "--cfg-scale", "2"]) == 0
    images = np.load(tmp_path / "s" / "samples.npz")["images"]
    expected = CLIPScorer(clip).score(images, [*PROMPTS, "a green triangle"])
    assert r["clip_score"] == pytest.approx(expected, abs=1e-4) and r["clip_model"]["folder"] == clip

    assert main(["fid", str(run), *common, "--prompt-data", str(root / "data"), "--num", "4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["num_samples"] == 4 and r["protocol"]["prompts"] == f"captions of {root / 'data'} (first 4)"
    assert "clip_score" not in r
    capsys.readouterr()
    for extra, message in ((["--num", "5", "--prompts", str(prompts)], "one image per prompt, and the prompt set"),
                           ([], "a text-to-image model's FID needs one prompt set")):
        assert main(["fid", str(run), *common, *extra]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow  # ~30 s: the same FID-4 and CLIP score again, through the CLI
def test_in_training_fid_and_clip_score_of_an_mmdit_equal_the_cli_on_its_weights(trained, tmp_path):
    run, root = trained
    (rec,) = [r for r in (json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()) if "fid" in r]
    assert rec["step"] == 4 and rec["num_samples"] == 4 and rec["prompts"] == f"captions of {root / 'data'} (first 4)"
    assert rec["comparable_to_published"] is False and "no named published protocol" in rec["comparable_reason"]
    assert 0 <= rec["clip_score"] <= 100 and rec["clip_model"]["folder"] == str(run.parent / "clip")
    out, files = tmp_path / "fid.json", run.parent
    assert main(["fid", str(run / "ema" / "ba00000004.safetensors"), "--inception", str(files / "inception.safetensors"),
                 "--ref", str(files / "ref.npz"), "--prompt-data", str(root / "data"), "--num", "4", "--steps", "2",
                 "--batch-size", "2", "--cfg-scale", "1.5", "--clip-score", str(files / "clip"), "--device", "cpu",
                 "--out", str(out)]) == 0
    cli = json.loads(out.read_text())
    assert cli["fid"] == pytest.approx(rec["fid"], rel=1e-6)
    assert cli["clip_score"] == pytest.approx(rec["clip_score"], abs=1e-6)
