"""A background thread of the dataset that dies of an error still reports its exit (no hang at epoch end)."""

import pytest
from streaming import StreamingDataset
from streaming.base.dataset import _Iterator
from streaming.base.util import clean_stale_shared_memory

from tread_scale.data.dataset import LatentStreamingDataset


@pytest.mark.parametrize("thread", ["_prepare_thread", "_ready_thread"])
def test_dying_thread_reports_its_exit(latent_dataset, tmp_path, monkeypatch, thread):
    import shutil

    shutil.copytree(latent_dataset, tmp_path / "data")
    clean_stale_shared_memory()
    ds = LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, local=str(tmp_path / "data"), batch_size=1)

    def boom(self, it):
        raise ConnectionError("endpoint gone")

    monkeypatch.setattr(StreamingDataset, thread, boom)
    it = _Iterator(list(range(4)))
    with pytest.raises(ConnectionError):
        getattr(ds, thread)(it)
    assert it._num_exited == 1, "streaming's end-of-iteration wait would never finish"
