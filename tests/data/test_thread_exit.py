"""A background thread of the dataset that dies of an error still reports its exit (no hang at epoch end)."""

import numpy as np
import pytest
from streaming.base.dataset import _Iterator
from streaming.base.util import clean_stale_shared_memory

from tread_scale.data.stream.dataset import LatentStreamingDataset


@pytest.mark.parametrize("thread", ["_prepare_thread", "_ready_thread"])
def test_dying_thread_reports_its_exit(latent_dataset, tmp_path, monkeypatch, thread):
    import shutil

    shutil.copytree(latent_dataset, tmp_path / "data")
    clean_stale_shared_memory()
    # A remote dataset not downloaded yet: both threads must download its shards, and the download fails.
    ds = LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, remote=str(tmp_path / "data"),
                                local=str(tmp_path / "cache"), batch_size=1)

    def download(shard_id, blocking=True):
        raise ConnectionError("endpoint gone")

    monkeypatch.setattr(ds, "prepare_shard", download)
    monkeypatch.setattr(ds, "_prepare_now", download)
    ds._event = __import__("threading").Event()
    it = _Iterator(np.arange(4))
    with pytest.raises(ConnectionError):
        getattr(ds, thread)(it)
    assert it._num_exited == 1, "streaming's end-of-iteration wait would never finish"
