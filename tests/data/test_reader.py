"""The memory-mapped read path returns exactly what streaming's reader returns."""

import shutil

import numpy as np
from streaming import StreamingDataset
from streaming.base.util import clean_stale_shared_memory

from tread_scale.data.dataset import LatentStreamingDataset


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
