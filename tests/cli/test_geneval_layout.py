"""``tread-scale sample --geneval``: samples in GenEval's folder layout, to be scored in GenEval's own environment
(issue 22.6)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tread_scale.cli import main
from tread_scale.config import ModelConfig, RoutingConfig, to_dict
from tread_scale.data.conversion.captions import text_plan
from tread_scale.data.conversion.text_encoder import TextEncoder
from tread_scale.devtools.demo_data import build_tiny_text_encoder
from tread_scale.errors import ConfigError
from tread_scale.factory import build_dit, build_net
from tread_scale.models.conditioning import TextCondition
from tread_scale.routing.routes import Route
from tread_scale.sampling.geneval import RECORD_FILE, prompt_runs, read_geneval_metadata, write_geneval_layout
from tread_scale.weights import DataFacts, WeightsMeta, save_weights

#: GenEval-like metadata lines (the prompts use the tiny encoder's words: none becomes <unk>).
LINES = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle at top left"},
    {"tag": "two_object", "include": [{"class": "square", "count": 1}, {"class": "cross", "count": 1}],
     "prompt": "a blue square at bottom right and a green cross at top right"},
    {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "green"}], "prompt": "a green circle"},
]
COMMON = ["--steps", "2", "--cfg-scale", "2", "--tread-scale", "1.5", "--device", "cpu"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A random 2-block MMDiT on 3x8x8 pixels (one route) whose weights record the text facts of a tiny local T5:
    what ``sample`` needs to encode prompts, without a training run."""
    root = tmp_path_factory.mktemp("geneval")
    t5 = build_tiny_text_encoder(root / "t5", "t5", seed=0)
    text = text_plan({"t5": t5}, 16, [line["prompt"] for line in LINES], 256)
    cfg = ModelConfig(name=None, family="mmdit", depth=2, hidden_size=32, num_heads=2, patch_size=2, in_channels=3,
                      input_size=8, num_classes=0, text_dim=text.emb_dim, pooled_dim=text.pooled_dim,
                      text_len=text.seq_len, init="xavier_all")
    torch.manual_seed(0)
    net = build_net(cfg, [Route(rate=0.5, start=0, end=1)]).eval()
    encoder = TextEncoder.from_folders(t5=t5, max_length=16)
    net.set_null_condition(TextCondition.from_batch(encoder.encode([""])))
    routing = dataclasses.replace(RoutingConfig(), routes=[Route(rate=0.5, start=0, end=1)])
    meta = WeightsMeta(model=to_dict(cfg), routing=to_dict(routing), objective={"kind": "rf"},
                       data=DataFacts(latent_shape=[3, 8, 8], num_classes=0, text=dataclasses.asdict(text)),
                       text={"t5": t5, "clip": None, "clip_l": None, "clip_g": None}, run_name="geneval-test")
    return str(save_weights(root / "mm.safetensors", net.state_dict(), meta))


def _metadata(tmp_path, lines=LINES, name="evaluation_metadata.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _files(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def test_two_prompts_of_two_images_in_genevals_layout_equal_sample_prompts(weights, tmp_path):
    meta = _metadata(tmp_path, LINES[:2])
    out = tmp_path / "geneval"
    assert main(["sample", weights, "--geneval", str(meta), "--per-prompt", "2", "--seed", "5", "--out", str(out),
                 *COMMON]) == 0
    assert _files(out) == ["00000/metadata.jsonl", "00000/samples/0000.png", "00000/samples/0001.png",
                           "00001/metadata.jsonl", "00001/samples/0000.png", "00001/samples/0001.png", RECORD_FILE]
    for p, line in enumerate(LINES[:2]):
        text = (out / f"{p:05d}" / "metadata.jsonl").read_text()
        assert len(text.splitlines()) == 1 and json.loads(text) == line  # GenEval json.load()s the whole file
    images = {(p, k): _png(out / f"{p:05d}" / "samples" / f"{k:04d}.png") for p in range(2) for k in range(2)}
    assert all(im.shape == (8, 8, 3) and im.dtype == np.uint8 for im in images.values())
    # the seed rule: image k of prompt p is sample p * 2 + k of `sample --prompts` with each prompt twice in a row
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{line['prompt']}\n" * 2 for line in LINES[:2]))
    assert main(["sample", weights, "--prompts", str(prompts), "--num", "4", "--seed", "5",
                 "--out", str(tmp_path / "s"), *COMMON]) == 0
    npz = np.load(tmp_path / "s" / "samples.npz")
    assert npz["seeds"].tolist() == [5, 6, 7, 8]
    for (p, k), im in images.items():
        np.testing.assert_array_equal(im, npz["images"][p * 2 + k])
    assert not np.array_equal(images[0, 0], images[0, 1])  # other seeds, other images
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["weights"] == weights and len(record["weights_sha256"]) == 64 and record["metadata"] == str(meta)
    assert {k: record[k] for k in ("num_prompts", "images_per_prompt", "seed", "objective", "steps", "batch_size")} == \
        {"num_prompts": 2, "images_per_prompt": 2, "seed": 5, "objective": "rf", "steps": 2, "batch_size": 4}
    assert record["guidance"]["cfg_scale"] == 2.0 and record["guidance"]["tread_scale"] == 1.5
    assert record["seed_rule"] == "image k of prompt p: seed + p * images_per_prompt + k"


def test_a_run_started_again_skips_finished_prompts_and_refuses_other_settings(weights, tmp_path, caplog, capsys):
    meta = _metadata(tmp_path)
    out = tmp_path / "geneval"
    args = ["sample", weights, "--geneval", str(meta), "--per-prompt", "2", "--out", str(out), "--batch-size", "2",
            *COMMON]
    assert main(args) == 0
    before = {f: (out / f).read_bytes() for f in _files(out)}
    (out / "00001" / "samples" / "0001.png").unlink()  # as a run killed while writing prompt 1 leaves it
    (out / "00001" / "samples" / ".0001.png.tmp").write_bytes(b"half a png")
    for f in (out / "00002").rglob("*"):
        if f.is_file():
            f.unlink()
    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert "1 of 3 prompts already hold their 2 images" in caplog.text
    after = {f: (out / f).read_bytes() for f in _files(out) if not f.endswith(".tmp")}
    assert after == before  # the same images again: seeds do not depend on which prompts are left
    capsys.readouterr()
    assert main([*args[:-len(COMMON)], *COMMON, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert RECORD_FILE in err and "seed: 0 there, 1 now" in err and "another --out" in err
    assert main([*args, "--num", "2"]) == 2
    assert "leave out --num" in capsys.readouterr().err


def test_a_bad_metadata_line_is_named(tmp_path, capsys, weights):
    good = json.dumps(LINES[0])
    for bad, message in (("{not json", "not valid JSON"), ('["a photo of a bench"]', "expected a JSON object"),
                         ('{"tag": "single_object"}', 'expected a non-empty string "prompt", got no "prompt" key'),
                         ('{"prompt": " "}', 'got "prompt": " "'), ('{"prompt": 3}', 'got "prompt": 3')):
        path = tmp_path / "m.jsonl"
        path.write_text(f"{good}\n\n{bad}\n{good}\n")
        with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}:3: .*{re.escape(message)}"):
            read_geneval_metadata(path)
    assert main(["sample", weights, "--geneval", str(path), "--out", str(tmp_path / "o")]) == 2
    assert f"{path}:3: expected a non-empty string" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    path.write_text("\n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        read_geneval_metadata(path)
    with pytest.raises(ConfigError, match="no such file"):
        read_geneval_metadata(tmp_path / "nowhere.jsonl")
    assert [m["prompt"] for m in read_geneval_metadata(_metadata(tmp_path))] == [m["prompt"] for m in LINES]


def test_geneval_takes_mmdit_weights_only_and_no_other_prompts(weights, tmp_path, capsys):
    meta = _metadata(tmp_path)
    cfg = ModelConfig(name=None, depth=1, hidden_size=32, num_heads=2, patch_size=2, in_channels=3, input_size=8,
                      num_classes=6)
    dit = save_weights(tmp_path / "dit.safetensors", build_dit(cfg).state_dict(),
                       WeightsMeta(model=to_dict(cfg), routing=to_dict(RoutingConfig()), objective={"kind": "rf"},
                                   data=DataFacts(latent_shape=[3, 8, 8], num_classes=6)))
    assert main(["sample", str(dit), "--geneval", str(meta), "--out", str(tmp_path / "o")]) == 2
    assert "class-conditional DiT" in (err := capsys.readouterr().err) and "GenEval scores text-to-image" in err
    assert main(["sample", weights, "--geneval", str(meta), "--prompt", "a red circle", "--labels", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "leave out --prompt, --labels" in capsys.readouterr().err
    assert main(["sample", weights, "--prompt", "a red circle", "--per-prompt", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--per-prompt goes with --geneval" in capsys.readouterr().err
    assert main(["sample", weights, "--geneval", str(meta), "--per-prompt", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--per-prompt must be >= 1" in capsys.readouterr().err
    (tmp_path / "o" / "00000").mkdir(parents=True)  # a folder this command did not write: not resumed
    assert main(["sample", weights, "--geneval", str(meta), "--out", str(tmp_path / "o")]) == 2
    assert "no tread_scale.json" in capsys.readouterr().err


def test_layout_files_appear_whole_or_not_at_all(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    write_geneval_layout(LINES, {2: images}, tmp_path)
    assert _files(tmp_path) == ["00002/metadata.jsonl", "00002/samples/0000.png", "00002/samples/0001.png"]
    np.testing.assert_array_equal(_png(tmp_path / "00002" / "samples" / "0001.png"), images[1])  # 7 wide, 5 high

    def killed(self, fp, *args, **kwargs):
        fp = open(fp, "wb")
        fp.write(b"\x89PNG half")
        fp.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        write_geneval_layout(LINES, {0: images}, tmp_path)
    assert _files(tmp_path / "00000") == ["metadata.jsonl"]  # neither a half PNG nor its temporary file
    with pytest.raises(ValueError, match="outside the 3 prompts"):
        write_geneval_layout(LINES, {3: images}, tmp_path)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        write_geneval_layout(LINES, [images.astype(np.float32)], tmp_path)
    assert prompt_runs([0, 1, 2, 3, 7, 8, 10], 3) == [[0, 1, 2], [3], [7, 8], [10]]


def _rank_worker(rank, store, weights, meta, out):
    from datetime import timedelta

    import torch.distributed as dist

    from tread_scale.diffusion.guidance import Guidance
    from tread_scale.parallel.process_group import leave_process_group
    from tread_scale.sampling.geneval import sample_geneval

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    got = sample_geneval(weights, meta, out, per_prompt=3, seed=2, steps=2, guidance=Guidance(cfg_scale=2.0),
                         batch_size=2, device="cpu")
    assert (got["written"] == 3) if rank == 0 else got == {}
    leave_process_group()


def test_two_ranks_write_the_files_of_one(weights, tmp_path):
    """Rank r makes images r, r + 2, ... of each run of prompts; rank 0 writes them all, as one process does."""
    meta = _metadata(tmp_path)
    torch.multiprocessing.spawn(_rank_worker, args=(tmp_path / "store", weights, str(meta), str(tmp_path / "two")),
                                nprocs=2)
    assert main(["sample", weights, "--geneval", str(meta), "--per-prompt", "3", "--seed", "2", "--steps", "2",
                 "--cfg-scale", "2", "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "one")]) == 0
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one == two and len(one) == 3 * 4 + 1
    for f in one:
        if f.endswith(".png"):
            np.testing.assert_array_equal(_png(tmp_path / "one" / f), _png(tmp_path / "two" / f))
