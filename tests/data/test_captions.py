"""Captioned datasets: ``convert captions`` (sidecar, manifest, npz, demo), text in batches, encoder checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming.base.util import clean_stale_shared_memory

from tread_scale.data import object_store as s3
from tread_scale.data.conversion.captions import CaptionFolderSource, CaptionNpzSource
from tread_scale.data.conversion.text_encoder import TextEncoder, check_text_encoders, folder_hashes
from tread_scale.data.conversion.writer import DONE_FILE, GROUP_DONE, ConvertOptions, convert
from tread_scale.data.metadata import META_FILE, check_text_against_model, read_empty_prompt, read_metadata
from tread_scale.data.stream.dataset import LatentStreamingDataset
from tread_scale.data.stream.location import default_cache, stream_location
from tread_scale.devtools.demo_data import CaptionDemoSource, build_tiny_text_encoder, write_captioned_demo
from tread_scale.devtools.demo_shapes import demo_caption_image
from tread_scale.errors import ConfigError, DatasetError, DatasetMismatchError

OPTS = dict(progress=False, shard_size="8kb")
WORDS = ["a", "red", "green", "blue", "square", "circle", "at", "top", "left", "bottom", "right", "and"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("encoders")
    return {"t5": build_tiny_text_encoder(root / "t5", "t5", seed=0, vocab=WORDS),
            "clip": build_tiny_text_encoder(root / "clip", "clip", seed=0, vocab=WORDS)}


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                              norm_num_groups=4, layers_per_block=1, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae") / "vae"
    model.save_pretrained(path)
    return str(path)


def _captions(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) for _ in range(n)]


def _images(root: Path, n: int, sidecar: bool = True, size: int = 16) -> tuple[list[Path], list[str]]:
    """``n`` random PNGs under ``root`` (some in a subfolder), with sidecar captions when asked."""
    from PIL import Image

    rng = np.random.default_rng(0)
    files, captions = [], _captions(n)
    for i in range(n):
        path = root / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size + 2, 3), dtype=np.uint8)).save(path)
        if sidecar:
            path.with_suffix(".txt").write_text(captions[i] + "\n")
        files.append(path)
    order = sorted(range(n), key=lambda i: files[i])
    return [files[i] for i in order], [captions[i] for i in order]


def read_all(root: str, cache: str | None = None, captions: bool = True) -> dict:
    """Every sample of a captioned dataset as one batch in id order, read twice (streaming's reader, which
    fetches or decompresses the shards, then the memory-mapped fast path); both reads must agree."""
    clean_stale_shared_memory()
    meta = read_metadata(root)
    ds = LatentStreamingDataset(latent_shape=meta.latent_shape, num_classes=meta.num_classes,
                                text_shape=meta.text.shape, captions=captions, shuffle=False, batch_size=1,
                                **stream_location(root, cache or default_cache(root)))
    ids = list(range(len(ds)))
    first, second = ds.get_batch(ids), ds.get_batch(ids)
    for key, value in first.items():
        assert (torch.equal(value, second[key]) if torch.is_tensor(value) else value == second[key]), key
    order = np.argsort(first["id"])
    return {k: v[torch.from_numpy(order)] if torch.is_tensor(v) else [v[i] for i in order] for k, v in first.items()}


def _assert_text_equals_encoder(batch: dict, encoded: dict) -> None:
    for key in ("text_emb", "text_mask", "text_pooled"):
        assert batch[key].dtype == encoded[key].dtype and torch.equal(batch[key], encoded[key]), key


# --------------------------------------------------------------------------- sources
def test_sidecar_folder_through_a_vae_and_both_encoders(tmp_path, encoders, vae):
    from diffusers import AutoencoderKL

    from tread_scale.data.conversion.sources import _load_image
    from tread_scale.rng import mix_seed

    files, captions = _images(tmp_path / "img", 5)
    (tmp_path / "img" / "notes.md").write_text("not an image")
    out = str(tmp_path / "out")
    meta = convert(CaptionFolderSource(input=str(tmp_path / "img"), resolution=16, vae=vae, max_length=8, **encoders),
                   out, ConvertOptions(**OPTS))
    t = meta.text
    assert meta.num_classes == 1 and meta.latent_shape == (4, 8, 8) and meta.scaling_factor == 0.5
    assert [e["kind"] for e in t.encoders] == ["clip", "t5"] and (t.seq_len, t.emb_dim, t.pooled_dim) == (16, 32, 16)
    assert t.pooled == "clip" and t.max_length == 8 and len(t.encoders[1]["weights_sha256"]) == 64
    batch = read_all(out)
    assert batch["caption"] == captions and batch["label"].tolist() == [0] * 5
    encoded = TextEncoder.from_folders(**encoders, max_length=8).encode(captions)
    _assert_text_equals_encoder(batch, encoded)
    # the same latents as `convert images` makes: one chunk, sampled with mix_seed(seed, 0)
    model = AutoencoderKL.from_pretrained(vae).eval()
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(np.stack([_load_image(f, 16) for f in files]))).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(mix_seed(0, 0))) * 0.5
    assert torch.equal(batch["latent"], expected.half())
    empty = read_empty_prompt(out)
    _assert_text_equals_encoder({k: v[None] for k, v in empty.items()},
                                TextEncoder.from_folders(**encoders, max_length=8).encode([""]))


def test_jsonl_and_csv_manifests_give_the_same_dataset(tmp_path, encoders):
    files, captions = _images(tmp_path / "img", 4, sidecar=False)
    rel = [f.relative_to(tmp_path).as_posix() for f in files]
    lines = [json.dumps({"path": r, "caption": c}) + "\n" for r, c in zip(rel, captions)]
    (tmp_path / "m.jsonl").write_text("".join(lines))
    (tmp_path / "m.csv").write_text("image,text\n" + "".join(f'{r},"{c}"\n' for r, c in zip(rel, captions)))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    meta = convert(CaptionFolderSource(input=str(tmp_path / "m.jsonl"), resolution=8, t5=encoders["t5"], max_length=8),
                   a, ConvertOptions(**OPTS))
    convert(CaptionFolderSource(input=str(tmp_path / "m.csv"), resolution=8, t5=encoders["t5"], max_length=8), b,
            ConvertOptions(**OPTS))
    assert meta.text.pooled == "t5_mean" and meta.text.shape == (8, 32, 32)
    x, y = read_all(a), read_all(b)
    assert x["caption"] == captions and all(torch.equal(x[k], y[k]) for k in ("latent", "text_emb", "text_pooled"))
    encoded = TextEncoder.from_folders(t5=encoders["t5"], max_length=8).encode(captions)
    _assert_text_equals_encoder(x, encoded)
    mask = encoded["text_mask"][..., None].float()  # T5 alone: pooled is the masked mean of its tokens
    emb = TextEncoder.from_folders(t5=encoders["t5"], max_length=8).encode(captions, out_dtype=torch.float32)
    assert torch.allclose(x["text_pooled"].float(), (emb["text_emb"] * mask).sum(1) / mask.sum(1), atol=1e-3)


def test_precomputed_npz(tmp_path, encoders):
    rng = np.random.default_rng(0)
    src = tmp_path / "npz"
    src.mkdir()
    lat = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    emb = rng.standard_normal((3, 6, 10)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0]] * 3, bool)
    pooled = rng.standard_normal((3, 5)).astype(np.float32)
    np.savez(src / "a.npz", latents=lat, text_emb=emb, text_mask=mask, text_pooled=pooled,
             caption=np.array(["one", "two", "three"]))
    np.savez(src / "b.npz", latent=lat[0], text_emb=emb[0], text_mask=mask[0], text_pooled=pooled[0])
    with pytest.raises(DatasetError, match=r"no empty-prompt embedding.*empty_prompt.npz.*--t5/--clip"):
        convert(CaptionNpzSource(folder=str(src)), str(tmp_path / "o"), ConvertOptions(**OPTS))
    np.savez(src / "empty_prompt.npz", text_emb=emb[1], text_mask=mask[1], text_pooled=pooled[1])
    meta = convert(CaptionNpzSource(folder=str(src)), str(tmp_path / "o"), ConvertOptions(**OPTS))
    assert meta.text.shape == (6, 10, 5) and meta.text.pooled == "stored" and meta.text.encoders == []
    got = read_all(str(tmp_path / "o"))
    assert got["caption"] == ["one", "two", "three", ""]
    assert torch.equal(got["latent"], torch.from_numpy(np.concatenate([lat, lat[:1]])).half())
    assert torch.equal(got["text_emb"], torch.from_numpy(np.concatenate([emb, emb[:1]])).half())
    assert torch.equal(got["text_mask"], torch.from_numpy(np.concatenate([mask, mask[:1]])))
    assert torch.equal(got["text_pooled"], torch.from_numpy(np.concatenate([pooled, pooled[:1]])).half())
    assert torch.equal(read_empty_prompt(str(tmp_path / "o"))["text_emb"], torch.from_numpy(emb[1]).half())
    # with encoders, the embeddings' shapes must be theirs
    with pytest.raises(DatasetError, match=r"a.npz: text embeddings have seq_len=6 but the given encoders with "
                                           r"--max-length 8 make seq_len=8"):
        convert(CaptionNpzSource(folder=str(src), t5=encoders["t5"], max_length=8), str(tmp_path / "o2"),
                ConvertOptions(**OPTS))


# --------------------------------------------------------------------------- errors and counts
def test_missing_and_empty_captions_name_the_image(tmp_path, encoders):
    files, _ = _images(tmp_path / "img", 3)
    files[1].with_suffix(".txt").unlink()
    files[2].with_suffix(".txt").write_text("  \n")
    missing = rf"2 image\(s\) have no caption.*\.txt file.*{files[1].name}.*{files[2].name}"
    with pytest.raises(DatasetError, match=missing):
        convert(CaptionFolderSource(input=str(tmp_path / "img"), resolution=8, t5=encoders["t5"]), str(tmp_path / "o"),
                ConvertOptions(**OPTS))
    assert not (tmp_path / "o").exists()  # raised before any work
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": f"img/{files[0].relative_to(tmp_path / 'img')}"}) + "\n")
    with pytest.raises(DatasetError, match=rf"1 image\(s\) have no caption.*{files[0].name} \(.*m.jsonl:1\)"):
        convert(CaptionFolderSource(input=str(tmp_path / "m.jsonl"), resolution=8, t5=encoders["t5"]),
                str(tmp_path / "o"), ConvertOptions(**OPTS))
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "img/nope.png", "caption": "a"}) + "\n")
    with pytest.raises(DatasetError, match=r"m.jsonl:1: image .*nope.png does not exist"):
        convert(CaptionFolderSource(input=str(tmp_path / "m.jsonl"), resolution=8, t5=encoders["t5"]),
                str(tmp_path / "o"), ConvertOptions(**OPTS))
    with pytest.raises(ConfigError, match=r"--clip .*nowhere.*no such folder"):
        convert(CaptionFolderSource(input=str(tmp_path / "img"), resolution=8, clip=str(tmp_path / "nowhere")),
                str(tmp_path / "o"), ConvertOptions(**OPTS))


def test_over_long_captions_are_truncated_and_counted(tmp_path, encoders, caplog):
    _, captions = _images(tmp_path / "img", 6)
    long = sum(len(c.split()) + 1 > 4 for c in captions)  # T5 adds </s>
    assert 0 < long < 6
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING):
        meta = convert(CaptionFolderSource(input=str(tmp_path / "img"), resolution=8, t5=encoders["t5"], max_length=4),
                       str(out), ConvertOptions(**OPTS))
    assert meta.text.truncated == long and json.loads((out / DONE_FILE).read_text())["text"]["truncated"] == long
    assert f"{long} caption(s) had more tokens than max_length=4 and were truncated" in caplog.text
    assert read_all(str(out))["text_mask"].sum(1).max() == 4


# --------------------------------------------------------------------------- processes, resumption, S3
def test_processes_2_write_the_same_bits_as_1_and_resume(tmp_path, encoders, vae, caplog):
    _images(tmp_path / "img", 10)
    source = CaptionFolderSource(input=str(tmp_path / "img"), resolution=16, vae=vae, batch_size=4, max_length=8,
                                 **encoders)
    one, two = tmp_path / "one", tmp_path / "two"
    convert(source, str(one), ConvertOptions(**OPTS))
    convert(source, str(two), ConvertOptions(processes=2, **OPTS))  # groups of 5 split the chunk [4, 8)
    a, b = read_all(str(one)), read_all(str(two))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    assert json.loads((one / META_FILE).read_text())["text"] == json.loads((two / META_FILE).read_text())["text"]
    # a rerun finds the done-file; an interrupted run redoes only its unfinished group
    shard = next((two / "group_00000").glob("shard.*"))
    stamp = shard.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        convert(source, str(two), ConvertOptions(processes=2, **OPTS))
    assert "already holds this conversion" in caplog.text
    (two / DONE_FILE).unlink()
    (two / "text_empty.npz").unlink()
    (two / "group_00001" / GROUP_DONE).unlink()
    convert(source, str(two), ConvertOptions(processes=2, **OPTS))
    assert shard.stat().st_mtime_ns == stamp
    c = read_all(str(two))
    assert all(torch.equal(a[k], c[k]) if torch.is_tensor(a[k]) else a[k] == c[k] for k in a)
    # resumed with other --processes, a group marker of other items is not taken for done
    (two / DONE_FILE).unlink()
    convert(source, str(two), ConvertOptions(processes=1, **OPTS))
    assert read_metadata(str(two)).num_samples == 10 and read_all(str(two))["id"] == list(range(10))


def test_convert_images_output_does_not_depend_on_the_split(tmp_path, vae):
    """``convert images`` shares the chunked image path: groups that split a chunk write the same bits."""
    from tread_scale.data.conversion.sources import ImageFolderSource

    from tests.data.helpers import read_back

    for cls in ("a", "b"):
        _images(tmp_path / "img" / cls, 5, sidecar=False)
    source = ImageFolderSource(folder=str(tmp_path / "img"), resolution=16, vae=vae, batch_size=4)
    convert(source, str(tmp_path / "one"), ConvertOptions(**OPTS))
    convert(source, str(tmp_path / "split"), ConvertOptions(group_size=3, **OPTS))  # as --processes would split
    a, b = read_back(str(tmp_path / "one")), read_back(str(tmp_path / "split"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_captioned_demo_to_s3_streams_back_with_text(s3_env, tmp_path):
    from tread_scale.data.stream.dataset import BatchLoader

    uri = f"s3://{s3_env}/captions"
    meta = write_captioned_demo(uri, str(tmp_path / "enc"), encoders=("t5", "clip"), num_samples=24, resolution=16,
                                shard_size="16kb")
    assert meta.text.shape == (32, 32, 16) and meta.num_classes == 1
    keys = {o["Key"] for o in s3.s3_client().list_objects_v2(Bucket=s3_env, Prefix="captions/")["Contents"]}
    assert {"captions/index.json", "captions/tread_meta.json", "captions/text_empty.npz"} <= keys
    assert not any(k.rsplit("/", 1)[-1].startswith(".") for k in keys)  # group markers stay in staging
    clean_stale_shared_memory()
    ds = LatentStreamingDataset(latent_shape=(3, 16, 16), num_classes=1, text_shape=meta.text.shape, batched=True,
                                batch_size=8, shuffle=False, remote=uri, local=str(tmp_path / "cache"))
    batches = list(BatchLoader(ds, num_workers=0))
    assert len(batches) == 3
    b = batches[0]
    assert b["latent"].shape == (8, 3, 16, 16) and b["latent"].dtype == torch.float16
    assert b["label"].dtype == torch.int64 and b["label"].tolist() == [0] * 8
    assert b["text_emb"].shape == (8, 32, 32) and b["text_emb"].dtype == torch.float16
    assert b["text_mask"].shape == (8, 32) and b["text_mask"].dtype == torch.bool
    assert b["text_pooled"].shape == (8, 16) and b["text_pooled"].dtype == torch.float16
    ids = [i for batch in batches for i in batch["id"]]
    captions = [c for batch in batches for c in batch["caption"]]
    assert sorted(ids) == list(range(24))
    assert captions == [demo_caption_image(i, 16)[1] for i in ids]
    encoder = TextEncoder.for_dataset(meta.text, t5=str(tmp_path / "enc" / "t5"), clip=str(tmp_path / "enc" / "clip"))
    encoded = encoder.encode(captions)
    keys = ("text_emb", "text_mask", "text_pooled")
    _assert_text_equals_encoder({k: torch.cat([batch[k] for batch in batches]) for k in keys}, encoded)
    assert torch.equal(torch.cat([batch["latent"] for batch in batches]),
                       torch.from_numpy(np.stack([demo_caption_image(i, 16)[0] for i in ids])).half())
    empty = read_empty_prompt(uri)
    assert torch.equal(empty["text_emb"], encoder.encode([""])["text_emb"][0])


# --------------------------------------------------------------------------- checks
def test_encoder_and_model_checks_name_the_mismatch(tmp_path, encoders):
    out = str(tmp_path / "o")
    meta = convert(CaptionDemoSource(num_samples=4, resolution=8, t5=encoders["t5"], max_length=8), out,
                   ConvertOptions(**OPTS))
    check_text_encoders(meta, t5=encoders["t5"])  # the same folder passes
    other = build_tiny_text_encoder(tmp_path / "t5b", "t5", seed=1, vocab=WORDS)
    with pytest.raises(ConfigError, match=r"t5 encoder .*t5b.*its weights \(sha256 .*\) differ from those of 't5'"):
        check_text_encoders(meta, t5=other, where=out)
    with pytest.raises(ConfigError, match=r"converted with text encoder\(s\) t5=t5, but clip=.* were given"):
        check_text_encoders(meta.text, clip=encoders["clip"])
    with pytest.raises(ConfigError, match=r"model_type 'clip_text_model', expected one of \('t5'"):
        check_text_encoders(meta, t5=encoders["clip"])
    check_text_against_model(meta, emb_dim=32, pooled_dim=32, where=out, max_tokens=8)
    with pytest.raises(DatasetMismatchError, match=r"tokens have width 32 \(text.emb_dim\) but the model takes 64"):
        check_text_against_model(meta, emb_dim=64, pooled_dim=32, where=out)
    with pytest.raises(DatasetMismatchError, match=r"8 text tokens per sample \(text.seq_len\).*at most 4"):
        check_text_against_model(meta, emb_dim=32, pooled_dim=32, where=out, max_tokens=4)
    clean_stale_shared_memory()
    with pytest.raises(DatasetMismatchError, match=r"stores text_emb as ndarray:float16:8,32 but ndarray:float16:8,16"):
        LatentStreamingDataset(latent_shape=(3, 8, 8), num_classes=1, text_shape=(8, 16, 32), local=out,
                               remote=None, batch_size=1)


def test_class_datasets_read_as_before(latent_dataset, tmp_path):
    """No text section in their metadata; batches hold latent, label, id only, equal to streaming's own read."""
    from streaming import StreamingDataset

    meta = read_metadata(latent_dataset)
    assert meta.text is None and "text" not in json.loads(Path(latent_dataset, META_FILE).read_text())
    with pytest.raises(DatasetMismatchError, match="has no text embeddings"):
        check_text_encoders(meta, t5="x")
    with pytest.raises(DatasetError, match="has no text embeddings"):
        read_empty_prompt(latent_dataset)
    clean_stale_shared_memory()
    plain = StreamingDataset(shuffle=False, batch_size=1, **stream_location(latent_dataset, str(tmp_path / "c1")))
    want = [plain[i] for i in range(len(plain))]
    ds = LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, shuffle=False, batch_size=1,
                                **stream_location(latent_dataset, str(tmp_path / "c2")))
    ids = list(range(len(ds)))
    for batch in (ds.get_batch(ids), ds.get_batch(ids)):  # streaming's reader, then the memory map
        assert set(batch) == {"latent", "label", "id"} and batch["latent"].dtype == torch.float16
        assert np.array_equal(batch["latent"].numpy(), np.stack([w["latent"] for w in want]))
        assert batch["label"].tolist() == [w["label"] for w in want] and batch["id"] == [w["id"] for w in want]
    with pytest.raises(DatasetMismatchError, match=r"has no 'text_emb' column .*captioned dataset"):
        LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, text_shape=(8, 32, 32), batch_size=1,
                               **stream_location(latent_dataset, str(tmp_path / "c3")))


def test_text_encoder_combines_t5_and_clip(encoders, tmp_path):
    both = TextEncoder.from_folders(**encoders, max_length=6)
    t5 = TextEncoder.from_folders(t5=encoders["t5"], max_length=6)
    clip = TextEncoder.from_folders(clip=encoders["clip"], max_length=6)
    captions = ["a red square", "a blue circle at top left and a green square"]
    b, t, c = both.encode(captions), t5.encode(captions), clip.encode(captions)
    assert b["text_emb"].shape == (2, 12, 32) and b["text_pooled"].shape == (2, 16)
    assert torch.equal(b["text_emb"][:, :6], c["text_emb"]) and torch.equal(b["text_emb"][:, 6:], t["text_emb"])
    assert torch.equal(b["text_mask"], torch.cat([c["text_mask"], t["text_mask"]], 1))
    assert torch.equal(b["text_pooled"], c["text_pooled"])
    assert b["truncated"] == [False, True] and t["text_mask"][0].tolist() == [True] * 4 + [False] * 2
    assert torch.equal(both.encode(captions)["text_emb"], b["text_emb"])  # deterministic
    # the tiny encoders tell the demo's words apart and are rebuilt bit for bit
    assert not torch.equal(t5.encode(["a red square"])["text_emb"], t5.encode(["a blue square"])["text_emb"])
    again = build_tiny_text_encoder(tmp_path / "again", "clip", seed=0, vocab=WORDS)
    assert folder_hashes(again) == folder_hashes(encoders["clip"])


def test_cli_convert_captions(tmp_path, encoders):
    from tread_scale.cli import main

    _images(tmp_path / "img", 3)
    out = tmp_path / "o"
    assert main(["convert", "captions", str(tmp_path / "img"), "--vae", "none", "--resolution", "8", "--t5",
                 encoders["t5"], "--max-length", "8", "--out", str(out), "--no-progress", "--shard-size", "8kb"]) == 0
    assert read_metadata(str(out)).text.shape == (8, 32, 32)
    assert main(["convert", "captions", str(tmp_path / "img"), "--vae", "none", "--out", str(tmp_path / "x")]) != 0


def test_convert_captions_reports_the_longest_caption_and_unknown_words(tmp_path, encoders, caplog):
    """Issue 22.9: the summary names the longest caption's tokens per encoder (also in the metadata), and words
    the tokenizers do not know (silently ``<unk>`` before) are named in one warning."""
    from tread_scale.cli import main

    files, _ = _images(tmp_path / "img", 4, sidecar=False, size=8)
    captions = ["a red square", "a zebra square at top left", "a purple circle and a zebra", "a blue circle"]
    for path, caption in zip(files, captions):
        path.with_suffix(".txt").write_text(caption + "\n")
    out = tmp_path / "o"
    with caplog.at_level(logging.INFO):
        assert main(["convert", "captions", str(tmp_path / "img"), "--vae", "none", "--resolution", "8",
                     "--t5", encoders["t5"], "--clip", encoders["clip"], "--max-length", "8", "--batch-size", "2",
                     "--out", str(out), "--no-progress"]) == 0
    longest = max(len(c.split()) for c in captions)  # T5 adds </s>, CLIP <|startoftext|> and <|endoftext|>
    assert read_metadata(str(out)).text.longest_tokens == {"t5": longest + 1, "clip": longest + 2}
    assert f"longest caption: {longest + 2} tokens (clip), {longest + 1} tokens (t5) (--max-length 8)" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert warnings == ["caption words the encoder 'clip' does not know (encoded as <unk>): 'zebra', 'purple'; "
                        "caption words the encoder 't5' does not know (encoded as <unk>): 'zebra', 'purple'"]


def test_unknown_words_of_prompts_are_named_once_per_call(encoders, caplog):
    from tread_scale.data.conversion.text_encoder import UNKNOWN_WORDS_SHOWN

    encoder = TextEncoder.from_folders(t5=encoders["t5"], max_length=8)
    with caplog.at_level(logging.WARNING):
        encoded = encoder.encode(["a zebra square", "a purple Zebra", "a red square"], batch_size=1)
    assert encoded["unknown"] == [{"t5": ["zebra"]}, {"t5": ["purple", "Zebra"]}, {}]
    assert encoded["tokens"] == [{"t5": 4}, {"t5": 4}, {"t5": 4}]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "prompt words the encoder 't5' does not know (encoded as <unk>): 'zebra', 'purple', 'Zebra'"]
    caplog.clear()
    many = [f"w{i}" for i in range(UNKNOWN_WORDS_SHOWN + 3)]
    with caplog.at_level(logging.WARNING):
        encoder.encode([" ".join(many)])
        encoder.encode(["a red square"], warn_unknown="prompt")
    shown = ", ".join(repr(w) for w in many[:UNKNOWN_WORDS_SHOWN])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"prompt words the encoder 't5' does not know (encoded as <unk>): {shown} and 3 more"]


def test_a_bad_manifest_line_is_named(tmp_path):
    from tread_scale.data.conversion.captions import _read_manifest
    from tread_scale.errors import DatasetError

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.png", "caption": "a red circle"}\n\n{"path": "b.png", caption}\n')
    with pytest.raises(DatasetError, match=r"m.jsonl:3: not valid JSON .*expected a JSON object with path and caption"):
        _read_manifest(manifest)
    manifest.write_text('{"path": "a.png"}\n["b.png"]\n')
    with pytest.raises(DatasetError, match=r"m.jsonl:2: expected a JSON object with path and caption, got a list"):
        _read_manifest(manifest)
    manifest.write_text('{"path": "a.png", "caption": "x"}\n')
    assert _read_manifest(manifest) == [("a.png", "x", f"{manifest}:1")]
