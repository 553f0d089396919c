"""The memory-mapped read path returns exactly what streaming's reader returns."""

import shutil

import numpy as np
from streaming import StreamingDataset
from streaming.base.util import clean_stale_shared_memory

from tread_scale.data.stream.dataset import LatentStreamingDataset


def test_mapped_samples_equal_streaming_samples(latent_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(latent_dataset, data)
    clean_stale_shared_memory()
    ds = LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, local=str(data), batch_size=1)
    mapped = 0
    for i in range(ds.num_samples):
        ours = ds.get_item(i)
        mapped += ds._mapped_sample(i) is not None
        ref = StreamingDataset.get_item(ds, i)
        assert np.array_equal(ours["latent"].numpy(), ref["latent"]) and ours["latent"].dtype.is_floating_point
        assert int(ours["label"]) == int(ref["label"]) and ours["id"] == int(ref["id"])
    assert mapped == ds.num_samples, "every sample of a local shard is read through the mapping"


def _dataset(root, **kwargs):
    clean_stale_shared_memory()
    return LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, local=str(root), batch_size=8,
                                  shuffle=True, shuffle_seed=3, num_canonical_nodes=1, **kwargs)


def _as_arrays(batches):
    return [(b["latent"].numpy(), b["label"].numpy(), list(b["id"])) for b in batches]


def _epoch(data, batched, state=None):
    """One epoch through the training loader (batched) or a batching DataLoader, from ``state`` if given."""
    from torch.utils.data import DataLoader

    from tread_scale.data.stream.dataset import BatchLoader, collate_latents

    ds = _dataset(data, batched=batched)
    if state is not None:
        ds.load_state_dict(state)
    loader = BatchLoader(ds, num_workers=2) if batched else \
        DataLoader(ds, batch_size=8, collate_fn=collate_latents, num_workers=2, drop_last=True)
    batches = _as_arrays(loader)
    return batches, len(loader), ds.state_dict(num_samples=24, from_beginning=False)


def _same(a, b):
    assert len(a) == len(b)
    for (al, ay, ai), (bl, by, bi) in zip(a, b):
        assert ai == bi and np.array_equal(ay, by) and np.array_equal(al, bl) and al.dtype == bl.dtype


def test_batched_loader_yields_the_batches_a_batching_loader_yields(latent_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(latent_dataset, data)
    want, want_len, state = _epoch(data, batched=False)
    got, got_len, _ = _epoch(data, batched=True)
    assert len(want) == want_len == got_len == 8
    _same(got, want)
    assert sorted(i for _, _, ids in got for i in ids) == list(range(64)), "an epoch reads every sample once"
    # Resumed after 3 batches (Composer's checkpointed position), both continue with the same 5 batches.
    want, _, _ = _epoch(data, batched=False, state=state)
    got, _, _ = _epoch(data, batched=True, state=state)
    assert len(want) == 5
    _same(got, want)


def test_get_batch_equals_collated_samples_across_shards_and_when_a_shard_cannot_be_mapped(latent_dataset,
                                                                                          tmp_path, monkeypatch):
    from tread_scale.data.stream.dataset import collate_latents

    data = tmp_path / "data"
    shutil.copytree(latent_dataset, data)
    ds = _dataset(data)
    assert ds.num_shards > 2
    ids = [63, 0, 17, 40, 5, 33, 62, 1]  # several shards, out of order
    want = _as_arrays([collate_latents([ds.get_item(i) for i in ids])])
    _same(_as_arrays([ds.get_batch(ids)]), want)
    unmapped = ds.spanner[40][0]
    records = ds._records
    monkeypatch.setattr(ds, "_records", lambda shard: None if shard == unmapped else records(shard))
    _same(_as_arrays([ds.get_batch(ids)]), want)


def test_non_finite_latents_are_named_by_sample_and_shard_in_both_reads(tmp_path):
    import pytest
    from streaming import MDSWriter

    from tread_scale.errors import DatasetError

    out = tmp_path / "nan"
    with MDSWriter(out=str(out), columns={"latent": "ndarray:float16:4,8,8", "label": "int", "id": "int"}) as w:
        for i in range(4):
            x = np.zeros((4, 8, 8), np.float16)
            x[1, 2, 3] = np.nan if i == 2 else 0
            w.write({"latent": x, "label": 1, "id": i})
    clean_stale_shared_memory()
    ds = LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, local=str(out), batch_size=4)
    assert ds._records(0) is not None
    with pytest.raises(DatasetError, match=r"sample 2 in shard shard.00000.mds has NaN or Inf latents"):
        ds.get_item(2)
    with pytest.raises(DatasetError, match=r"sample 2 in shard shard.00000.mds has NaN or Inf latents"):
        ds.get_batch([0, 1, 2, 3])
    assert ds.get_batch([3, 0])["id"] == [3, 0]


def test_the_default_cache_of_a_dataset_converted_again_in_place_is_a_fresh_one(tmp_path):
    """streaming trusts a cached index.json: tools outside training (fid --ref-data) must not read an earlier
    conversion's shards after the dataset was converted again at the same address."""
    from tread_scale.data.stream.location import default_cache

    root = tmp_path / "d"
    root.mkdir()
    (root / "index.json").write_text('{"version": 2, "shards": []}')
    first = default_cache(str(root))
    assert default_cache(str(root)) == first  # reruns reuse it
    (root / "index.json").write_text('{"version": 2, "shards": [{"samples": 1}]}')
    assert default_cache(str(root)) != first
