import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tread_scale.data.conversion.writer import DONE_FILE, GROUP_DONE, ConvertOptions, convert
from tread_scale.data.stream.dataset import LatentStreamingDataset
from tread_scale.devtools.demo_shapes import demo_image
from tread_scale.data.metadata import check_against_model, read_metadata
from tread_scale.data.conversion.sources import ImageFolderSource, NpyFolderSource
from tread_scale.devtools.demo_data import DemoSource
from tread_scale.errors import DatasetError, DatasetMismatchError

from tests.conftest import write_npz_latents
from tests.data.helpers import read_back

OPTS = dict(progress=False, shard_size="8kb")


def test_demo_roundtrip(tmp_path):
    out = str(tmp_path / "demo")
    meta = convert(DemoSource(num_samples=30, resolution=8), out, ConvertOptions(**OPTS))
    assert meta.latent_shape == (3, 8, 8) and meta.num_samples == 30 and meta.vae == "none"
    assert meta.class_names[:2] == ["red_disc", "green_square"]
    ids, lat, lab = read_back(out)
    assert ids.tolist() == list(range(30))
    for i in (0, 7, 29):
        img, label = demo_image(i, 8)
        assert np.array_equal(lat[i], img.astype(np.float16)) and lab[i] == label
    index = json.loads((Path(out) / "index.json").read_text())
    assert len(index["shards"]) > 1
    assert index["shards"][0]["compression"] == "zstd"
    columns = dict(zip(index["shards"][0]["column_names"], index["shards"][0]["column_encodings"]))
    assert columns == {"latent": "ndarray:float16:3,8,8", "label": "int", "id": "int"}


def test_npz_batch_roundtrip(tmp_path):
    lat, lab = write_npz_latents(tmp_path / "src", n=40)
    out = str(tmp_path / "mds")
    convert(NpyFolderSource(folder=str(tmp_path / "src")), out, ConvertOptions(**OPTS))
    ids, got, labels = read_back(out)
    assert np.array_equal(got, lat.astype(np.float16)) and np.array_equal(labels, lab)
    assert read_metadata(out).num_classes == lab.max() + 1


def test_npy_files_with_labels_csv_and_class_folders(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "csv"
    src.mkdir()
    arrays = [rng.standard_normal((4, 8, 8)).astype(np.float32) for _ in range(5)]
    for i, a in enumerate(arrays):
        np.save(src / f"x{i}.npy", a)
    (src / "labels.csv").write_text("path,label\n" + "".join(f"x{i}.npy,{i % 3}\n" for i in range(5)))
    convert(NpyFolderSource(folder=str(src)), str(tmp_path / "o1"), ConvertOptions(**OPTS))
    _, got, labels = read_back(str(tmp_path / "o1"))
    assert np.array_equal(got, np.stack(arrays).astype(np.float16)) and labels.tolist() == [0, 1, 2, 0, 1]

    dirs = tmp_path / "dirs"
    for cls in ("cat", "dog"):
        (dirs / cls).mkdir(parents=True)
        np.save(dirs / cls / "a.npy", arrays[0])
    meta = convert(NpyFolderSource(folder=str(dirs)), str(tmp_path / "o2"), ConvertOptions(**OPTS))
    assert meta.class_names == ["cat", "dog"] and read_back(str(tmp_path / "o2"))[2].tolist() == [0, 1]


def _png_folder(root: Path, n_per_class=3, size=16):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return sorted(root.glob("*/*.png"))


def test_image_folder_pixels_skip_non_images_with_a_warning(tmp_path, caplog):
    from tread_scale.data.conversion.sources import _load_image

    files = _png_folder(tmp_path / "img")
    (tmp_path / "img" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "img" / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    with caplog.at_level(logging.WARNING):
        meta = convert(ImageFolderSource(folder=str(tmp_path / "img"), resolution=8, vae="none"), str(tmp_path / "o"),
                       ConvertOptions(**OPTS))
    assert "notes.txt: not an image file" in caplog.text
    assert "broken.png: cannot be read as an image" in caplog.text
    assert meta.num_samples == 6 and meta.latent_shape == (3, 8, 8) and meta.class_names == ["a", "b"]
    ids, got, labels = read_back(str(tmp_path / "o"))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(got[0], _load_image(files[0], 8).astype(np.float16))


@pytest.fixture
def tiny_vae(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, scaling_factor=0.5)
    path = tmp_path / "vae"
    vae.save_pretrained(path)
    return str(path)


def test_image_folder_through_a_local_vae(tmp_path, tiny_vae):
    from diffusers import AutoencoderKL

    from tread_scale.data.conversion.sources import _load_image
    from tread_scale.rng import mix_seed

    files = _png_folder(tmp_path / "img", n_per_class=2)
    meta = convert(ImageFolderSource(folder=str(tmp_path / "img"), resolution=16, vae=tiny_vae, batch_size=8),
                   str(tmp_path / "o"), ConvertOptions(**OPTS))
    assert meta.latent_shape == (4, 8, 8) and meta.scaling_factor == 0.5 and meta.vae != "none"
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    pixels = torch.from_numpy(np.stack([_load_image(f, 16) for f in files]))
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(mix_seed(0, 0))) * 0.5
    _, got, _ = read_back(str(tmp_path / "o"))
    assert np.array_equal(got, expected.numpy().astype(np.float16))


def test_missing_vae_folder_is_a_clear_error(tmp_path):
    _png_folder(tmp_path / "img", n_per_class=1)
    from tread_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="no config.json there"):
        convert(ImageFolderSource(folder=str(tmp_path / "img"), vae=str(tmp_path / "novae")), str(tmp_path / "o"),
                ConvertOptions(**OPTS))


def test_rerun_skips_finished_work_and_resumes_unfinished_groups(tmp_path, caplog):
    out = tmp_path / "o"
    opts = ConvertOptions(group_size=10, **OPTS)
    convert(DemoSource(num_samples=30, resolution=8), str(out), opts)
    shard = next((out / "group_00000").glob("shard.*"))
    stamp = shard.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        convert(DemoSource(num_samples=30, resolution=8), str(out), opts)
    assert "already holds this conversion" in caplog.text and shard.stat().st_mtime_ns == stamp
    # an interrupted run: the done-file and one group's marker are missing
    (out / DONE_FILE).unlink()
    (out / "group_00001" / GROUP_DONE).unlink()
    g1 = next((out / "group_00001").glob("shard.*"))
    os.utime(g1, ns=(1, 1))
    convert(DemoSource(num_samples=30, resolution=8), str(out), opts)
    assert shard.stat().st_mtime_ns == stamp and next((out / "group_00001").glob("shard.*")).stat().st_mtime_ns != 1
    assert read_back(str(out))[0].tolist() == list(range(30))


def test_output_holding_another_conversion_is_kept(tmp_path):
    out = str(tmp_path / "o")
    convert(DemoSource(num_samples=10, resolution=8), out, ConvertOptions(**OPTS))
    with pytest.raises(DatasetError, match="already holds a different conversion.*--overwrite"):
        convert(DemoSource(num_samples=12, resolution=8), out, ConvertOptions(**OPTS))
    assert read_metadata(out).num_samples == 10
    convert(DemoSource(num_samples=12, resolution=8), out, ConvertOptions(overwrite=True, **OPTS))
    assert read_metadata(out).num_samples == 12 and len(read_back(out)[0]) == 12


def test_processes_write_groups_and_merge_one_index(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    convert(DemoSource(num_samples=40, resolution=8), one, ConvertOptions(**OPTS))
    convert(DemoSource(num_samples=40, resolution=8), two, ConvertOptions(processes=2, **OPTS))
    assert sorted(p.name for p in Path(two).glob("group_*")) == ["group_00000", "group_00001"]
    a, b = read_back(one), read_back(two)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("case,message", [
    ("empty", "holds no .npy or .npz files"),
    ("nan", r"bad.npy: latent contains NaN or Inf"),
    ("shape", r"z.npy: latent shape \(4, 4, 4\) differs from the dataset's \(4, 8, 8\)"),
    ("nolabel", r"x.npy: no label"),
    ("label", r"label 7 is outside 0..2"),
])
def test_bad_npy_inputs_name_the_file(tmp_path, case, message):
    src = tmp_path / "src"
    src.mkdir()
    good = np.zeros((4, 8, 8), np.float32)
    if case == "nan":
        (src / "a").mkdir(), (src / "b").mkdir()
        np.save(src / "a" / "good.npy", good)
        np.save(src / "b" / "bad.npy", np.full((4, 8, 8), np.nan, np.float32))
    elif case == "shape":
        (src / "c").mkdir()
        np.save(src / "c" / "a.npy", good)
        np.save(src / "c" / "z.npy", np.zeros((4, 4, 4), np.float32))
    elif case == "nolabel":
        np.save(src / "x.npy", good)
    elif case == "label":
        np.savez(src / "b.npz", latents=np.zeros((2, 4, 8, 8), np.float32), labels=np.array([0, 7]))
    source = NpyFolderSource(folder=str(src), num_classes=3 if case == "label" else None)
    with pytest.raises(DatasetError, match=message):
        convert(source, str(tmp_path / "o"), ConvertOptions(**OPTS))


def test_empty_image_folder(tmp_path):
    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "img" / "a" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="holds no images"):
        convert(ImageFolderSource(folder=str(tmp_path / "img"), vae="none"), str(tmp_path / "o"), ConvertOptions(**OPTS))


def test_metadata_mismatch_names_both_shapes(latent_dataset):
    meta = read_metadata(latent_dataset)
    with pytest.raises(DatasetMismatchError, match=r"shape \(4, 8, 8\).*expects \(3, 8, 8\).*model.in_channels=3"):
        check_against_model(meta, in_channels=3, input_size=8, num_classes=5, where=latent_dataset)
    with pytest.raises(DatasetMismatchError, match="dataset has 5 classes but model.num_classes=4"):
        check_against_model(meta, in_channels=4, input_size=8, num_classes=4, where=latent_dataset)


def test_reader_checks_columns_and_labels(latent_dataset):
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    with pytest.raises(DatasetMismatchError, match=r"shard group_00000/shard.00000.mds stores latents of shape \(4, 8, 8\)"):
        LatentStreamingDataset(latent_shape=(4, 16, 16), num_classes=5, local=latent_dataset, batch_size=1)
    clean_stale_shared_memory()
    ds = LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=1, local=latent_dataset, batch_size=1)
    with pytest.raises(DatasetError, match=r"sample \d+ in shard group_00000/shard.\d+.mds has label [1-4], "
                                           r"outside 0..0 \(model.num_classes=1\)"):
        for i in range(len(ds)):
            ds[i]
    with pytest.raises(DatasetError, match=r"sample \d+ in shard group_00000/shard.\d+.mds has label [1-4], "
                                           r"outside 0..0 \(model.num_classes=1\)"):
        ds.get_batch(range(len(ds)))  # the training loader's batch read checks the same


def test_missing_label_column_is_named(tmp_path):
    from streaming import MDSWriter
    from streaming.base.util import clean_stale_shared_memory

    out = tmp_path / "nolabel"
    with MDSWriter(out=str(out), columns={"latent": "ndarray:float16:4,8,8"}) as w:
        w.write({"latent": np.zeros((4, 8, 8), np.float16)})
    clean_stale_shared_memory()
    with pytest.raises(DatasetMismatchError, match=r"shard shard.00000.mds has no 'label' column \(columns: \['latent'\]\)"):
        LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, local=str(out), batch_size=1)
