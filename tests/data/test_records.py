"""The record view of MDS shards: re-mapped when a shard file is replaced; the finiteness test is exact."""

import os
import shutil

import numpy as np
import pytest
from streaming.base.util import clean_stale_shared_memory

from tread_scale.data.stream.dataset import LatentStreamingDataset
from tread_scale.data.stream.records import finite_rows, shard_layout, shard_records


def test_a_replaced_shard_file_is_mapped_again(latent_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(latent_dataset, data)
    clean_stale_shared_memory()
    ds = LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, local=str(data), batch_size=1)
    for i in (0, 1):
        ds.prepare_shard(i)  # the dataset holds compressed shards; this decompresses them
    first, second = (shard_layout(ds.shards[i]) for i in (0, 1))
    before = shard_records(first)["label"].copy()
    # An evicted and re-fetched shard is a new file at the same path; here with other labels.
    raw = bytearray(open(first.path, "rb").read())
    offset = first.record.fields["label"][1] + int(np.frombuffer(raw, "<u4", count=1, offset=4)[0])
    raw[offset:offset + 8] = int((before[0] + 1) % 5).to_bytes(8, "little")
    with open(first.path + ".new", "wb") as f:
        f.write(raw)
    os.replace(first.path + ".new", first.path)
    shard_records(second)  # mapping another shard forgets mappings of replaced files
    after = shard_records(first)["label"]
    assert after[0] == (before[0] + 1) % 5 and np.array_equal(after[1:], before[1:])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_finite_rows_agrees_with_isfinite(dtype):
    x = np.random.default_rng(0).standard_normal((6, 4, 3, 3)).astype(dtype)
    x[1, 0, 0, 0] = np.nan
    x[3, 2, 1, 1] = -np.inf
    x[4, 0, 0, 0] = np.finfo(dtype).max
    x[5, 1, 2, 2] = np.finfo(dtype).smallest_subnormal
    assert finite_rows(x).tolist() == np.isfinite(x.reshape(6, -1)).all(axis=1).tolist() == \
        [True, False, True, False, True, True]
