"""The bucketed batch plan: one bucket per step on every rank, each sample once, the same steps for any world."""

from __future__ import annotations

import numpy as np
import pytest

from tread_scale.data.stream.buckets import epoch_left_out, plan_epoch, steps_per_epoch, worker_ids
from tread_scale.devtools.synthetic import write_bucketed_latents
from tread_scale.errors import DatasetError

RANGES = [(0, 45), (45, 38), (83, 21)]  # deliberately not multiples of any batch
BUCKET_OF = np.repeat(np.arange(3), [45, 38, 21])


def _steps_seen(plan, first_step, ranks, workers):
    """What a run on ``ranks`` x ``workers`` reads from ``first_step`` on, rebuilt step by step as global batches
    (the DataLoader takes a rank's workers round-robin; all ranks' slices of one step make its global batch)."""
    g = plan.shape[1]
    b = g // ranks
    per = {(r, w): worker_ids(plan, first_step, r, ranks, w, workers).reshape(-1, b)
           for r in range(ranks) for w in range(workers)}
    steps = []
    for k in range(len(plan) - first_step):
        w, i = k % workers, k // workers
        steps.append(np.concatenate([per[(r, w)][i] for r in range(ranks)]))
    return np.array(steps).reshape(-1, g)


def test_every_step_is_one_bucket_and_each_sample_is_read_once():
    plan = plan_epoch(RANGES, 8, seed=3, epoch=0)
    assert plan.shape == (steps_per_epoch(RANGES, 8), 8) == (5 + 4 + 2, 8)
    for step in plan:
        assert len(set(BUCKET_OF[step])) == 1
    used = plan.ravel()
    assert len(np.unique(used)) == len(used)
    left = epoch_left_out(RANGES, 8, 3, 0)
    assert sorted(np.concatenate([used, left]).tolist()) == list(range(104))
    assert np.bincount(BUCKET_OF[left], minlength=3).tolist() == [45 % 8, 38 % 8, 21 % 8]
    # another epoch: another order and another left-out set; the same seed and epoch: the same plan
    assert not np.array_equal(plan_epoch(RANGES, 8, 3, 1), plan)
    assert not np.array_equal(epoch_left_out(RANGES, 8, 3, 1), left)
    assert np.array_equal(plan_epoch(RANGES, 8, 3, 0), plan)


@pytest.mark.parametrize("ranks,workers", [(1, 1), (1, 3), (2, 1), (2, 2), (4, 2), (8, 1)])
def test_the_steps_are_the_same_for_any_world(ranks, workers):
    plan = plan_epoch(RANGES, 8, seed=11, epoch=2)
    assert np.array_equal(_steps_seen(plan, 0, ranks, workers), plan)


@pytest.mark.parametrize("before,after", [((2, 2), (1, 2)), ((1, 1), (2, 3)), ((4, 1), (1, 1))])
def test_elastic_resume_at_every_step_continues_the_same_sequence(before, after):
    plan = plan_epoch(RANGES, 8, seed=5, epoch=0)
    for cut in range(len(plan) + 1):
        head = _steps_seen(plan, 0, *before)[:cut]
        tail = _steps_seen(plan, cut, *after)
        assert np.array_equal(np.concatenate([head, tail]), plan), cut


def test_unshuffled_plan_keeps_sample_order_bucket_by_bucket():
    plan = plan_epoch(RANGES, 8, seed=0, epoch=0, shuffle=False)
    assert plan[0].tolist() == list(range(8))
    assert plan[5].tolist() == list(range(45, 53))


def test_errors_name_the_problem():
    with pytest.raises(DatasetError, match="no bucket holds a whole global batch of 64 samples .*45, 38, 21"):
        plan_epoch(RANGES, 64, 0, 0)
    with pytest.raises(DatasetError, match="does not split over 3 ranks"):
        worker_ids(plan_epoch(RANGES, 8, 0, 0), 0, 0, 3, 0, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_reader_batches_one_bucket_at_a_time(tmp_path, workers):
    from streaming.base.util import clean_stale_shared_memory

    from tread_scale.data.stream.dataset import BatchLoader, LatentStreamingDataset

    shapes = [((4, 8, 8), 20), ((4, 8, 12), 13), ((4, 12, 8), 9)]
    buckets = write_bucketed_latents(tmp_path / "d", shapes)
    clean_stale_shared_memory()
    ds = LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=3, local=str(tmp_path / "d"), batch_size=4,
                                batched=True, shuffle=True, shuffle_seed=7, num_canonical_nodes=1, buckets=buckets)
    loader = BatchLoader(ds, num_workers=workers)
    batches = list(loader)
    assert len(batches) == len(loader) == 5 + 3 + 2
    ranges = [(b["start"], b["count"]) for b in buckets]
    plan = plan_epoch(ranges, 4, 7, 0)
    for batch, step in zip(batches, plan):
        assert batch["id"] == step.tolist()
        (shape,) = {s for s, n in shapes if any(b["start"] <= i < b["start"] + b["count"] for b in buckets
                                                if tuple(b["latent_shape"]) == s for i in step)}
        assert tuple(batch["latent"].shape) == (4, *shape)


def test_buckets_that_do_not_match_the_shards_are_refused(tmp_path):
    from streaming.base.util import clean_stale_shared_memory

    from tread_scale.data.stream.dataset import LatentStreamingDataset
    from tread_scale.errors import DatasetMismatchError

    buckets = write_bucketed_latents(tmp_path / "d", [((4, 8, 8), 8), ((4, 8, 12), 8)])
    common = dict(latent_shape=(4, 8, 8), num_classes=3, local=str(tmp_path / "d"), batch_size=4, batched=True,
                  num_canonical_nodes=1)
    clean_stale_shared_memory()
    wrong_shape = [dict(buckets[0]), {**buckets[1], "latent_shape": [4, 12, 8]}]
    with pytest.raises(DatasetMismatchError, match=r"shard group-00001/.* \(4, 8, 12\).*none of the buckets"):
        LatentStreamingDataset(buckets=wrong_shape, **common)
    clean_stale_shared_memory()
    with pytest.raises(DatasetError, match="buckets of the metadata hold 15 samples but the shards hold 16"):
        LatentStreamingDataset(buckets=[buckets[0], {**buckets[1], "count": 7}], **common)


def test_validation_and_first_sample_reads_take_the_base_bucket(tmp_path):
    from tread_scale.data.metadata import META_FILE, LatentMetadata
    from tread_scale.data.stream.direct import base_bucket, read_first_samples
    from tread_scale.evaluation.val_loss import load_valset

    root = tmp_path / "d"
    buckets = write_bucketed_latents(root, [((4, 8, 12), 6), ((4, 8, 8), 5), ((4, 12, 8), 4)], shard_size="1kb")
    (root / META_FILE).write_text(LatentMetadata(latent_shape=(4, 8, 8), num_classes=3, num_samples=15,
                                                 buckets=buckets).to_json())
    assert base_bucket(str(root)) == (6, 5)
    ids = [int(s["id"]) for s in read_first_samples(str(root), 4, start=7)]
    assert ids == [7, 8, 9, 10]  # across shard boundaries (1 kB shards hold a few samples each)
    valset = load_valset(str(root), 16, latent_shape=(4, 8, 8))
    assert valset.x.shape == (5, 4, 8, 8)


def test_training_refuses_buckets_the_model_cannot_run(tmp_path):
    from tests.conftest import tiny_run_cfg
    from tread_scale.config import config_from_dict
    from tread_scale.data.metadata import LatentMetadata
    from tread_scale.errors import DatasetMismatchError
    from tread_scale.trainer.data import check_buckets_against_model

    def meta(*hws):
        return LatentMetadata(latent_shape=(4, 8, 8), num_classes=3, num_samples=len(hws),
                              buckets=[{"latent_shape": [4, h, w], "start": i, "count": 1} for i, (h, w) in enumerate(hws)])

    dit = config_from_dict(tiny_run_cfg(str(tmp_path), tmp_path))  # patch 2, sin-cos positions: any even grid
    check_buckets_against_model(dit, meta((8, 8), (8, 12), (4, 16)))
    with pytest.raises(DatasetMismatchError, match=r"bucket 8x13 \(latent\): patch_size 2 does not divide"):
        check_buckets_against_model(dit, meta((8, 8), (8, 13)))
    mmdit = tiny_run_cfg(str(tmp_path), tmp_path)
    mmdit["model"] = {**mmdit["model"], "family": "mmdit", "text_dim": 16, "pooled_dim": 8, "text_len": 4,
                      "num_classes": 0, "pos_embed": "learned"}
    with pytest.raises(DatasetMismatchError, match=r"bucket 8x12 \(latent\): pos_embed='learned' has a position "
                                                   r"table for the configured patch grid 4x4"):
        check_buckets_against_model(config_from_dict(mmdit), meta((8, 8), (8, 12)))
