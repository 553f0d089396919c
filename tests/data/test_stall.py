"""Issue 12: nodes never race on one folder, a shard given back is taken over, and every data wait is bounded.

The two-node stall: streaming coordinates a cache folder only within a node, and a local dataset of
compressed shards was decompressed *in its own folder* by every node. Two nodes then wrote the same
temporary file; one failed its rename and gave the shard back (REMOTE) while a peer on its node waited
for it to become local, a wait that checked for REMOTE only once, before waiting: for ever.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from streaming.base.util import clean_stale_shared_memory

from tests.conftest import REPO
from tread_scale.compat.streaming import set_shard_state
from tread_scale.data.stream.dataset import BatchLoader, LatentStreamingDataset
from tread_scale.data.stream.location import compressed_shards, stream_location
from tread_scale.errors import DatasetError, DataStallError


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _dataset(data: Path, cache: Path, **kw) -> LatentStreamingDataset:
    clean_stale_shared_memory()
    opts = {"batched": True, "batch_size": 4, "shuffle": False, **kw}
    return LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, **stream_location(str(data), str(cache)),
                                  **opts)


def test_training_never_writes_into_a_compressed_dataset(latent_dataset, tmp_path, monkeypatch):
    """The cause of the two-node stall, checked deterministically: each node decompresses into its own cache."""
    from tread_scale.config import config_from_dict
    from tread_scale.data.metadata import read_metadata
    from tread_scale.trainer.data import build_dataloader
    from tests.conftest import tiny_run_cfg

    data = Path(shutil.copytree(latent_dataset, tmp_path / "data"))
    assert compressed_shards(str(data)) > 0
    before = _digest(data)
    cfg = config_from_dict(tiny_run_cfg(str(data), tmp_path / "runs"))
    for node in (0, 1):
        monkeypatch.setenv("NODE_RANK", str(node))
        clean_stale_shared_memory()
        loader = build_dataloader(cfg, read_metadata(str(data)), 4)
        assert loader.dataset.streams[0].local == str(tmp_path / "runs" / "t" / "data_cache" / f"node{node}")
        assert sum(len(b["id"]) for b in loader) == 64
        del loader
    assert _digest(data) == before, "training wrote into the dataset's folder"


def test_uncompressed_local_dataset_is_read_in_place(latent_dataset, tmp_path):
    data = Path(shutil.copytree(latent_dataset, tmp_path / "data"))
    ds = _dataset(data, tmp_path / "cache")
    assert sum(len(b["id"]) for b in BatchLoader(ds, num_workers=0)) == 64  # decompresses into the cache
    raw = Path(ds.streams[0].local)
    plain = tmp_path / "plain"
    shutil.copytree(data, plain)
    for f in raw.rglob("*.mds"):
        shutil.copy(f, plain / f.relative_to(raw))
    assert compressed_shards(str(plain)) == 0
    assert stream_location(str(plain), str(tmp_path / "unused")) == {"remote": None, "local": str(plain)}


_NODE = textwrap.dedent("""
    import sys, time
    from tread_scale.data.stream.dataset import BatchLoader, LatentStreamingDataset
    from tread_scale.data.stream.location import stream_location
    data, node, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    ds = LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, batched=True, batch_size=2, shuffle=True,
                                predownload=4, stall_timeout=30, **stream_location(data, data + "-cache/node" + node))
    while time.time() < start:
        time.sleep(0.001)
    print("batches", sum(1 for _ in BatchLoader(ds, num_workers=0)), flush=True)
""")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="emulated nodes need root (unshare)")
def test_two_emulated_nodes_share_a_compressed_dataset_folder(tmp_path):
    """Two nodes (private /dev/shm and temp dir each, as slurm/node_launch.sh emulates them) read one folder.

    Before the fix this delivered every batch on both nodes in 1 of 6 runs here: one node failed its
    rename, or silently ended its epoch with no batch at all.
    """
    from tests.conftest import write_npz_latents
    from tread_scale.data.conversion.writer import ConvertOptions, convert
    from tread_scale.data.conversion.sources import NpyFolderSource

    write_npz_latents(tmp_path / "src", n=256)
    data = tmp_path / "data"
    convert(NpyFolderSource(folder=str(tmp_path / "src"), num_classes=5), str(data),
            ConvertOptions(shard_size="4kb", progress=False))
    script = tmp_path / "node.py"
    script.write_text(_NODE)
    start = time.time() + 4
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs tmpfs /dev/shm && TMPDIR="$(mktemp -d)" exec "$0" "$@"', sys.executable, str(script),
         str(data), str(node), str(start)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "batches 128" in out, err[-3000:]


def _claim(ds: LatentStreamingDataset, shard_id: int) -> None:
    """What another process of this node does when it starts preparing a shard."""
    set_shard_state(ds, shard_id, "PREPARING")


def test_a_shard_given_back_while_waited_for_is_taken_over(latent_dataset, tmp_path):
    """The lost wake-up: a preparer whose download fails sets the shard back to REMOTE; the waiter takes over."""
    ds = _dataset(Path(shutil.copytree(latent_dataset, tmp_path / "data")), tmp_path / "cache", stall_timeout=60)
    _claim(ds, 0)
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.extend(len(b["id"]) for b in BatchLoader(ds, num_workers=0)),
                              daemon=True)
    reader.start()
    time.sleep(1.0)
    assert reader.is_alive() and not got, "the reader did not wait for the claimed shard"
    set_shard_state(ds, 0, "REMOTE")  # the other process's download failed: it gives the shard back
    reader.join(timeout=60)
    assert not reader.is_alive(), "the reader still waits for a shard nobody prepares (the issue-12 hang)"
    assert sum(got) == 64


def test_a_shard_nobody_finishes_fails_within_the_stall_timeout(latent_dataset, tmp_path, capfd):
    ds = _dataset(Path(shutil.copytree(latent_dataset, tmp_path / "data")), tmp_path / "cache", stall_timeout=2)
    _claim(ds, 0)  # claimed by a process that then hangs or dies
    started = time.monotonic()
    with pytest.raises(DataStallError) as e:
        next(iter(BatchLoader(ds, num_workers=0)))
    assert time.monotonic() - started < 30
    name = ds.shards[0].raw_data.basename
    message = str(e.value)
    for part in (name, "PREPARING", "rank 0", "node 0", "data.stall_timeout=2"):
        assert part in message, message
    assert "most recent call first" in capfd.readouterr().err, "no thread dump on stderr"


def test_a_failed_background_download_fails_the_epoch_instead_of_ending_it(latent_dataset, tmp_path):
    """streaming 0.13.0 ends the epoch early, silently, when its download thread dies."""
    data = Path(shutil.copytree(latent_dataset, tmp_path / "data"))
    ds = _dataset(data, tmp_path / "cache")
    for f in data.rglob("*.mds.zstd"):
        f.unlink()  # every download now fails
    with pytest.raises(DatasetError, match="FileNotFoundError"):
        for _ in BatchLoader(ds, num_workers=0):
            pass


def test_stall_timeout_is_checked(latent_dataset, tmp_path):
    with pytest.raises(DatasetError, match="stall_timeout"):
        _dataset(Path(latent_dataset), tmp_path / "cache", stall_timeout=0)
