"""Aspect-ratio buckets: ``tread-scale convert images|captions --buckets SPEC`` (issue 23, item 2)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tread_scale.data.conversion.buckets import CROP_RULE, Fit, area_buckets, assign, fit, parse_buckets
from tread_scale.data.conversion.captions import CaptionFolderSource
from tread_scale.data.conversion.sources import ImageFolderSource
from tread_scale.data.conversion.writer import DONE_FILE, GROUP_DONE, ConvertOptions, convert
from tread_scale.data.metadata import (BUCKET_KEYS, META_FILE, LatentMetadata, bucket_of_ids, bucket_ranges,
                                       decode_captions, read_metadata)
from tread_scale.data.stream.direct import read_first_samples
from tread_scale.errors import ConfigError

OPTS = dict(progress=False, shard_size="8kb")
SPEC = "32px:8"
# (width, height) of the generated images, cycled; the comments name the bucket of 32px:8 each lands in
SIZES = [(24, 48),  # 1:2 → 24x48, no crop
         (48, 24),  # 2:1 → 48x24, no crop
         (32, 32),  # 1:1 → 32x32
         (40, 20),  # 2:1 → 48x24, upscaled, no crop
         (20, 40),  # 1:2 → 24x48
         (30, 32),  # near-square → 32x32, 1 row cut top and bottom
         (33, 30),  # near-square → 32x32
         (64, 16)]  # 4:1 → 64x16


def _png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _halves() -> np.ndarray:
    """48x24 (W x H): left half red, right half blue."""
    a = np.zeros((24, 48, 3), np.uint8)
    a[:, :24, 0] = 255
    a[:, 24:, 2] = 255
    return a


def _framed() -> np.ndarray:
    """50x20 (W x H): grey, with green 5-pixel bands at the left and right edges (cropped away in 48x24)."""
    a = np.full((20, 50, 3), 128, np.uint8)
    a[:, :5] = (0, 255, 0)
    a[:, 45:] = (0, 255, 0)
    return a


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """20 random PNGs of mixed aspect ratios in two class folders, plus the halves and framed images."""
    root = tmp_path_factory.mktemp("buckets") / "img"
    rng = np.random.default_rng(0)
    for i in range(20):
        w, h = SIZES[i % len(SIZES)]
        _png(root / ("cat" if i % 2 else "dog") / f"{i:02d}.png", rng.integers(0, 256, (h, w, 3)))
    _png(root / "cat" / "halves.png", _halves())
    _png(root / "dog" / "framed.png", _framed())
    return root


def _read(root: str) -> list[dict]:
    return read_first_samples(root, 10 ** 6)


def _by_name(source, samples: list[dict]) -> dict[str, dict]:
    plan = source.plan()
    return {Path(plan.items[int(s["id"])][0]).name: s for s in samples}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != DONE_FILE}


# --------------------------------------------------------------------------- pure functions
def test_area_spec_lists_sdxl_style_buckets():
    spec = parse_buckets(SPEC)
    assert spec.buckets == ((56, 16), (64, 16), (40, 24), (48, 24), (32, 32), (24, 40), (24, 48), (16, 56), (16, 64))
    assert spec.base == (32, 32) and spec.spec == SPEC
    big = parse_buckets("1024px:64")
    assert (1024, 1024) in big.buckets and big.base == (1024, 1024)
    assert {(h, w) for w, h in big.buckets} == set(big.buckets)  # mirrored
    for w, h in big.buckets:
        assert w % 64 == 0 and h % 64 == 0 and 0.25 <= w / h <= 4
        assert abs(w * h - 1024 ** 2) <= 1024 * 64  # h is the multiple of 64 nearest to area / w (or its mirror)
    assert list(big.buckets) == sorted(big.buckets, key=lambda b: (b[1], b[0])) == area_buckets(1024, 64)


def test_explicit_list_is_sorted_and_its_base_is_the_largest():
    spec = parse_buckets("32x32, 48x16,16x48")
    assert spec.buckets == ((48, 16), (32, 32), (16, 48)) and spec.base == (32, 32)
    assert parse_buckets("30x10,10x30", multiple=1).base == (10, 30)  # equal areas: the later one


@pytest.mark.parametrize("spec,multiple,message", [
    ("32x32,33x16", 8, r"entry '33x16': side 33 is not a multiple of 8"),
    ("32x32,big", 1, r"entry 'big' is not WIDTHxHEIGHT"),
    ("32x0", 1, r"entry '32x0': side 0 must be positive"),
    ("32x32,32x32", 1, r"entry '32x32' is listed twice"),
    ("36px:8", 1, r"AREA 36px is not a multiple of MULT 8"),
    ("32px:4", 8, r"MULT 4 is not a multiple of 8"),
])
def test_bad_specs_name_the_entry(spec, multiple, message):
    with pytest.raises(ConfigError, match=message):
        parse_buckets(spec, multiple=multiple)


def test_assign_nearest_ratio_in_log_space_ties_to_larger_area():
    buckets = parse_buckets(SPEC).buckets
    assert assign(40, 20, buckets) == (48, 24)
    assert assign(100, 100, buckets) == (32, 32)
    # 2:1 between 1.4 and 2.7: linearly 1.4 is nearer, in log space 2.7 is
    assert assign(40, 20, [(56, 40), (54, 20)]) == (54, 20)
    # 2:1 is as far from 1:1 as from 4:1 in log space: the larger area wins, then landscape before portrait
    assert assign(40, 20, [(40, 40), (64, 16)]) == (40, 40)
    assert assign(40, 20, [(32, 32), (64, 16)]) == (64, 16)
    assert assign(20, 20, [(16, 48), (48, 16)]) == (48, 16)
    with pytest.raises(ConfigError, match="no buckets"):
        assign(1, 1, [])


def test_fit_covers_the_bucket_with_the_smallest_centred_crop():
    assert fit(40, 20, (48, 24)) == Fit((24, 48), (0, 0, 20, 40))  # 2:1 into 2:1: scaled, nothing cut
    assert fit(96, 48, (48, 24)) == Fit((24, 48), (0, 0, 48, 96))
    assert fit(100, 50, (32, 32)) == Fit((32, 64), (0, 25, 50, 50))  # the middle square
    assert fit(50, 20, (48, 24)) == Fit((24, 60), (0, 5, 20, 40))
    assert fit(24, 48, (24, 40)) == Fit((48, 24), (4, 0, 40, 24))
    assert fit(30, 32, (32, 32)) == Fit((34, 32), (1, 0, 30, 30))


# --------------------------------------------------------------------------- conversion
def test_images_convert_into_buckets(tmp_path, image_folder):
    source = ImageFolderSource(folder=str(image_folder), vae="none", batch_size=4, buckets=SPEC)
    out = tmp_path / "out"
    meta = convert(source, str(out), ConvertOptions(group_size=3, **OPTS))
    assert meta.num_samples == 22 and meta.latent_shape == (3, 32, 32) and meta.class_names == ["cat", "dog"]
    assert meta.bucket_spec == SPEC and meta.crop_rule == CROP_RULE
    assert [(b["image_size"], b["latent_shape"], b["count"]) for b in meta.buckets] == [
        ([16, 64], [3, 16, 64], 2), ([24, 48], [3, 24, 48], 8), ([32, 32], [3, 32, 32], 7),
        ([48, 24], [3, 48, 24], 5)]
    ranges = bucket_ranges(meta)
    assert [r[:2] for r in ranges] == [(0, 2), (2, 10), (10, 17), (17, 22)]
    assert bucket_of_ids(meta).tolist() == [0] * 2 + [1] * 8 + [2] * 7 + [3] * 5
    assert read_metadata(str(out)) == meta
    samples = _read(str(out))
    assert [int(s["id"]) for s in samples] == list(range(22))
    for s, k in zip(samples, bucket_of_ids(meta)):
        assert s["latent"].shape == tuple(meta.buckets[k]["latent_shape"]) and s["latent"].dtype == np.float16
    # groups never mix buckets; each shard declares its bucket's shape
    index = json.loads((out / "index.json").read_text())
    for shard in index["shards"]:
        columns = dict(zip(shard["column_names"], shard["column_encodings"]))
        assert set(columns) == {"latent", "label", "id", "orig_size", "crop_box"}
        assert (columns["orig_size"], columns["crop_box"]) == ("ndarray:int32:2", "ndarray:int32:4")
        group = shard["raw_data"]["basename"].split("/")[0]
        rng = json.loads((out / group / GROUP_DONE).read_text())["range"]
        assert len({bucket_of_ids(meta)[i] for i in range(*rng)}) == 1
        c, h, w = meta.buckets[bucket_of_ids(meta)[rng[0]]]["latent_shape"]
        assert columns["latent"] == f"ndarray:float16:{c},{h},{w}"
    # per-sample sizes and crops, and the pixels that come out of them
    named = _by_name(source, samples)
    halves = named["halves.png"]
    assert halves["orig_size"].tolist() == [24, 48] and halves["crop_box"].tolist() == [0, 0, 24, 48]
    assert halves["latent"].shape == (3, 24, 48)
    assert (halves["latent"][:, :, :24] == np.array([1, -1, -1], np.float16)[:, None, None]).all()
    assert (halves["latent"][:, :, 24:] == np.array([-1, -1, 1], np.float16)[:, None, None]).all()
    framed = named["framed.png"]
    assert framed["orig_size"].tolist() == [20, 50] and framed["crop_box"].tolist() == [0, 5, 20, 40]
    assert np.allclose(framed["latent"], 128 / 127.5 - 1, atol=1e-2)  # the green edges were cropped away
    near_square = named["05.png"]  # 30x32 (W x H)
    assert near_square["orig_size"].tolist() == [32, 30] and near_square["crop_box"].tolist() == [1, 0, 30, 30]
    assert named["04.png"]["crop_box"].tolist() == [0, 0, 40, 20] and named["04.png"]["latent"].shape == (3, 48, 24)
    # within a bucket the original (sorted path) order is kept
    plan = source.plan()
    for start, stop, _ in ranges:
        paths = [plan.items[i][0] for i in range(start, stop)]
        assert paths == sorted(paths)


def test_processes_2_write_the_same_bytes_and_resume(tmp_path, image_folder):
    source = ImageFolderSource(folder=str(image_folder), vae="none", batch_size=4, buckets=SPEC)
    one, two = tmp_path / "one", tmp_path / "two"
    convert(source, str(one), ConvertOptions(group_size=4, **OPTS))
    convert(source, str(two), ConvertOptions(group_size=4, processes=2, **OPTS))
    a = _files(one)
    assert a == _files(two) and any(k.endswith(".mds.zstd") for k in a)
    # an interrupted run redoes only its unfinished group
    groups = sorted(p.name for p in one.glob("group_*"))
    kept = next((one / groups[0]).glob("shard.*"))
    stamp = kept.stat().st_mtime_ns
    (one / DONE_FILE).unlink()
    (one / groups[-1] / GROUP_DONE).unlink()
    convert(source, str(one), ConvertOptions(group_size=4, **OPTS))
    assert kept.stat().st_mtime_ns == stamp and _files(one) == a


def test_without_buckets_the_output_is_the_square_one(tmp_path, image_folder):
    source = ImageFolderSource(folder=str(image_folder), vae="none", resolution=16)
    assert set(source.describe()) == {"kind", "folder", "resolution", "vae", "seed", "files", "stamp"}
    bucketed = ImageFolderSource(folder=str(image_folder), buckets=SPEC).describe()
    assert bucketed["buckets"] == SPEC and "resolution" not in bucketed  # the buckets decide the sizes
    out = tmp_path / "sq"
    meta = convert(source, str(out), ConvertOptions(**OPTS))
    assert meta.buckets is None and meta.bucket_spec is None and meta.crop_rule is None
    assert not set(BUCKET_KEYS) & set(json.loads((out / META_FILE).read_text()))
    samples = _read(str(out))
    assert {s["latent"].shape for s in samples} == {(3, 16, 16)} and set(samples[0]) == {"latent", "label", "id"}
    assert bucket_ranges(meta) == [(0, 22, (3, 16, 16))] and not bucket_of_ids(meta).any()
    # metadata written before buckets existed still loads
    old = {k: v for k, v in json.loads(meta.to_json()).items()}
    assert LatentMetadata.from_json(json.dumps(old), "old").buckets is None


def test_cli_convert_images_with_buckets_logs_them(tmp_path, image_folder, caplog, capsys):
    from tread_scale.cli import main

    out = tmp_path / "cli"
    with caplog.at_level(logging.INFO):
        assert main(["convert", "images", str(image_folder), "--vae", "none", "--buckets", SPEC, "--out", str(out),
                     "--no-progress", "--shard-size", "8kb"]) == 0
    meta = read_metadata(str(out))
    assert [b["count"] for b in meta.buckets] == [2, 8, 7, 5]
    assert "4 aspect-ratio bucket(s) from --buckets 32px:8" in caplog.text
    assert "48x24 px (WxH), latent (3, 24, 48): 8 sample(s), ids [2, 10)" in caplog.text
    assert main(["convert", "images", str(image_folder), "--vae", "none", "--buckets", "32x32,wide",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--buckets '32x32,wide': entry 'wide' is not WIDTHxHEIGHT" in capsys.readouterr().err


def test_buckets_through_a_vae(tmp_path, image_folder):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                              norm_num_groups=4, layers_per_block=1, scaling_factor=0.5)
    model.save_pretrained(tmp_path / "vae")
    vae = str(tmp_path / "vae")
    meta = convert(ImageFolderSource(folder=str(image_folder), vae=vae, batch_size=4, buckets="16x16,24x8"),
                   str(tmp_path / "out"), ConvertOptions(**OPTS))
    assert meta.latent_shape == (4, 8, 8) and meta.scaling_factor == 0.5
    assert [b["latent_shape"] for b in meta.buckets] == [[4, 4, 12], [4, 8, 8]]
    assert {s["latent"].shape for s in _read(str(tmp_path / "out"))} == {(4, 4, 12), (4, 8, 8)}
    with pytest.raises(ConfigError, match=r"entry '15x16': side 15 is not a multiple of 2"):
        ImageFolderSource(folder=str(image_folder), vae=vae, buckets="15x16").plan()


def test_buckets_to_s3(s3_env, tmp_path, image_folder):
    uri = f"s3://{s3_env}/buckets"
    source = ImageFolderSource(folder=str(image_folder), vae="none", batch_size=4, buckets=SPEC)
    meta = convert(source, uri, ConvertOptions(group_size=5, **OPTS))
    remote = read_metadata(uri)
    assert remote == meta and [b["count"] for b in remote.buckets] == [2, 8, 7, 5]
    samples = _read(uri)
    assert [s["latent"].shape for s in samples] == [
        tuple(remote.buckets[k]["latent_shape"]) for k in bucket_of_ids(remote)]


def test_captions_with_buckets(tmp_path, image_folder):
    from tread_scale.devtools.demo_data import build_tiny_text_encoder

    words = ["a", "red", "blue", "cat", "dog", "wide", "tall"]
    t5 = build_tiny_text_encoder(tmp_path / "t5", "t5", seed=0, vocab=words)
    folder = tmp_path / "cap"
    captions = {}
    for i, path in enumerate(sorted(image_folder.glob("*/*.png"))):
        target = folder / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        captions[path.name] = " ".join(words[(i + k) % len(words)] for k in range(1 + i % 4))
        target.with_suffix(".txt").write_text(captions[path.name] + "\n")
    source = CaptionFolderSource(input=str(folder), vae="none", t5=t5, max_length=8, batch_size=3, buckets=SPEC)
    meta = convert(source, str(tmp_path / "out"), ConvertOptions(group_size=4, **OPTS))
    assert meta.text is not None and meta.text.shape == (8, 32, 32) and meta.bucket_spec == SPEC
    assert sum(b["count"] for b in meta.buckets) == meta.num_samples == 22
    samples = _read(str(tmp_path / "out"))
    assert set(samples[0]) == {"latent", "label", "id", "orig_size", "crop_box", "text_emb", "text_mask",
                               "text_pooled", "caption"}
    for name, s in _by_name(source, samples).items():
        assert decode_captions(s["caption"]) == [captions[name]]
        assert s["text_emb"].shape == (8, 32)
    for s, k in zip(samples, bucket_of_ids(meta)):
        assert s["latent"].shape == tuple(meta.buckets[k]["latent_shape"])
    assert _by_name(source, samples)["halves.png"]["crop_box"].tolist() == [0, 0, 24, 48]


def test_the_training_reader_batches_a_converted_bucketed_dataset(tmp_path, image_folder):
    """The converted metadata is what ``LatentStreamingDataset(buckets=...)`` takes: every batch one bucket."""
    from streaming.base.util import clean_stale_shared_memory

    from tread_scale.data.stream.dataset import BatchLoader, LatentStreamingDataset
    from tread_scale.data.stream.location import default_cache, stream_location

    out = str(tmp_path / "out")
    meta = convert(ImageFolderSource(folder=str(image_folder), vae="none", buckets=SPEC), out,
                   ConvertOptions(group_size=4, **OPTS))
    clean_stale_shared_memory()
    ds = LatentStreamingDataset(latent_shape=meta.latent_shape, num_classes=2, batch_size=2, batched=True,
                                shuffle=True, shuffle_seed=1, num_canonical_nodes=1, buckets=meta.buckets,
                                **stream_location(out, default_cache(out)))
    batches = list(BatchLoader(ds, num_workers=0))
    assert len(batches) == 1 + 4 + 3 + 2  # each bucket's last odd sample is left out of the epoch
    of = bucket_of_ids(meta)
    for batch in batches:
        (k,) = {int(of[int(i)]) for i in batch["id"]}
        assert tuple(batch["latent"].shape) == (2, *meta.buckets[k]["latent_shape"])
