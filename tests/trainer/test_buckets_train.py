"""Issue 23 end to end: mixed-aspect images → buckets in S3 → TREAD training on 2 ranks (DDP and FSDP2), kill -9
mid-epoch and resume, the sample ledger showing every sample once, samples at two bucket sizes; and elastic
resume 2 -> 1 and 1 -> 2 ranks."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_run_cfg
from tests.parallel.launcher import kill_after, launch, losses
from tread_scale.data.conversion.sources import ImageFolderSource
from tread_scale.data.conversion.writer import ConvertOptions, convert
from tread_scale.data.metadata import bucket_of_ids
from tread_scale.sampling import sample_to_folder
from tread_scale.trainer.callbacks.sample_ledger import consumed
from tread_scale.weights import load_weights

pytestmark = pytest.mark.slow  # 2-rank runs: about 2 minutes in all on a 2-core CPU

SPEC = "16x16,24x12,12x24"
# (width, height) of the source images: 16 near-square, 16 landscape, 16 portrait -> 16 samples in each bucket
SIZES = [(20 + i % 3, 20 + i % 2) for i in range(16)] + [(40 + i, 20) for i in range(16)] + \
        [(18, 36 + i) for i in range(16)]
STEPS = 6  # one epoch: 48 samples in global batches of 8 (2 steps per bucket)


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        folder = root / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def _cfg(data, out, name, backend):
    cfg = tiny_run_cfg(data, out, run_name=name,
                       model={"in_channels": 3, "input_size": 16, "num_classes": 2, "init": "xavier_all"},
                       train={"max_duration": f"{STEPS}ba", "save_interval": "2ba", "global_batch_size": 8,
                              "deterministic": True},
                       logging={"metrics_interval": 1, "sample_ledger": True},
                       sampling={"every": None, "at_fit_end": False})
    cfg["data"]["num_canonical_nodes"] = 1
    cfg["parallelism"] = {"backend": backend}
    return cfg


def test_bucketed_images_train_on_two_ranks_resume_after_kill_and_sample_at_two_sizes(mixed_images, s3_env,
                                                                                      tmp_path):
    data = f"s3://{s3_env}/buckets"
    meta = convert(ImageFolderSource(folder=str(mixed_images), vae="none", buckets=SPEC), data,
                   ConvertOptions(progress=False, shard_size="8kb"))
    assert [(b["latent_shape"], b["count"]) for b in meta.buckets] == \
        [([3, 12, 24], 16), ([3, 16, 16], 16), ([3, 24, 12], 16)]
    bucket = bucket_of_ids(meta)

    launch(_cfg(data, tmp_path / "a", "ddp", "ddp"), 2, tmp_path)
    launch(_cfg(data, tmp_path / "c", "fsdp", "fsdp"), 2, tmp_path)  # FSDP2 uninterrupted
    killed = _cfg(data, tmp_path / "b", "fsdp", "fsdp")
    kill_after(killed, 2, tmp_path, step=random.Random(23).randint(3, 4))  # mid-epoch, after the step-2 checkpoint
    assert max(losses(tmp_path / "b" / "fsdp")) < STEPS, "killed before the end"
    launch(killed, 2, tmp_path)  # the same command again: autoresume

    a, b = tmp_path / "a" / "ddp", tmp_path / "b" / "fsdp"
    steps_a, steps_b = consumed(a / "ledger"), consumed(b / "ledger")
    assert sorted(steps_a) == list(range(1, STEPS + 1)) and steps_a == steps_b, "the same batches, killed or not"
    ids = [i for s in steps_a.values() for i in s]
    assert sorted(ids) == list(range(48)), "every sample exactly once in the epoch"
    for step, batch in steps_a.items():
        assert len(set(bucket[batch].tolist())) == 1, f"step {step} mixes buckets"
    assert {int(bucket[batch[0]]) for batch in steps_a.values()} == {0, 1, 2}
    # FSDP2 killed with SIGKILL and resumed ends bitwise where FSDP2 uninterrupted ends; DDP trains the same
    c = tmp_path / "c" / "fsdp"
    wb, wc = load_weights(b / "ema" / "latest.safetensors")[0], load_weights(c / "ema" / "latest.safetensors")[0]
    assert all(torch.equal(wb[k], wc[k]) for k in wb), "resumed FSDP2 weights differ from the uninterrupted run"
    assert losses(b) == pytest.approx(losses(c), rel=1e-6) and consumed(c / "ledger") == steps_b
    assert losses(b) == pytest.approx(losses(a), rel=1e-4)
    wa = load_weights(a / "ema" / "latest.safetensors")[0]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)

    for size, (h, w) in (("24x12", (12, 24)), ("12x24", (24, 12))):
        out = sample_to_folder(str(a), str(tmp_path / f"samples-{size}"), num=4, steps=2, device="cpu", size=size)
        with np.load(out["npz"]) as z:
            assert z["images"].shape == (4, h, w, 3) and np.isfinite(z["latents"]).all()


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_elastic_resume_of_bucketed_data_sees_every_sample_once(before, after, mixed_images, tmp_path):
    data = str(tmp_path / "data")
    meta = convert(ImageFolderSource(folder=str(mixed_images), vae="none", buckets=SPEC), data,
                   ConvertOptions(progress=False, shard_size="8kb"))
    cfg = _cfg(data, tmp_path, f"elastic{before}{after}", "ddp")
    cfg["train"]["deterministic"] = False
    launch(cfg, before, tmp_path, "train.max_duration=3ba", "train.save_interval=3ba")  # stops mid-epoch
    launch(cfg, after, tmp_path)
    steps = consumed(tmp_path / cfg["run_name"] / "ledger")
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert sorted(i for s in steps.values() for i in s) == list(range(48)), "every sample exactly once"
    bucket = bucket_of_ids(meta)
    assert all(len(set(bucket[batch].tolist())) == 1 for batch in steps.values())
