"""R3: object-store faults with a real S3 server (s3rver): outages, a dead endpoint, cut-off uploads."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_run_cfg, write_npz_latents
from tests.reliability.faulty_proxy import CuttingProxy
from tread_scale.data import object_store as s3
from tread_scale.data.conversion.writer import ConvertOptions, convert
from tread_scale.data.conversion.sources import NpyFolderSource
from tread_scale.devtools import local_s3


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    """A dedicated s3rver (port and data folder of its own) that a test may stop and restart."""
    data_dir = tmp_path / "s3data"
    server = local_s3.start("s3rver", data_dir=data_dir, log_dir=tmp_path)
    for k, v in server.client_env().items():
        monkeypatch.setenv(k, v)
    server.create_bucket("faults")
    state = {"server": server}

    def restart():
        state["server"] = local_s3.start("s3rver", port=server.port, data_dir=data_dir, log_dir=tmp_path)

    state["restart"] = restart
    yield state
    state["server"].stop()


def _dataset(tmp_path, uri):
    write_npz_latents(tmp_path / "src", n=64)
    convert(NpyFolderSource(folder=str(tmp_path / "src")), uri,
            ConvertOptions(shard_size="1kb", compression="none", progress=False))  # ~1 sample per shard


def _start(cfg, tmp_path, *overrides):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # PYTHONFAULTHANDLER: on a hang the test sends SIGABRT and the output shows every thread's stack
    return subprocess.Popen([sys.executable, str(REPO / "launch.py"), str(path), *overrides], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc, timeout: float) -> str:
    """The output of ``proc`` once it exits; on a hang, its threads' stacks (SIGABRT) in the failure."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)
        try:
            out = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out = proc.communicate()[0]
        pytest.fail(f"the run hung; its threads:\n{out[-12000:]}")


def _wait_for_step(run: Path, step: int, proc, timeout=120):
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines()):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    pytest.fail("training did not reach the step")


def _cfg(uri, out, **train):
    return tiny_run_cfg(uri, out, train={"global_batch_size": 2, "save_interval": "1000ba", **train},
                        data={"remote": uri, "num_workers": 0, "predownload": 2, "download_timeout": 10},
                        logging={"metrics_interval": 1})


def test_short_outage_mid_epoch_is_ridden_out(own_s3, tmp_path):
    uri = "s3://faults/short"
    _dataset(tmp_path, uri)
    proc = _start(_cfg(uri, tmp_path / "runs", max_duration="32ba"), tmp_path)  # one epoch: every shard fetched once
    run = tmp_path / "runs" / "t"
    _wait_for_step(run, 2, proc)
    own_s3["server"].stop()
    time.sleep(3)
    own_s3["restart"]()
    out = _finish(proc, 300)
    assert proc.returncode == 0, out[-3000:]
    assert max(json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()) == 32


def test_dead_endpoint_is_a_clear_error_in_bounded_time(own_s3, tmp_path):
    uri = "s3://faults/dead"
    _dataset(tmp_path, uri)
    proc = _start(_cfg(uri, tmp_path / "runs", max_duration="32ba"), tmp_path, "data.download_retry=2")
    _wait_for_step(tmp_path / "runs" / "t", 2, proc)
    own_s3["server"].stop(hard=True)  # gone for good, as a crashed server: connections are reset
    t0 = time.time()
    out = _finish(proc, 180)
    assert time.time() - t0 < 120
    assert proc.returncode == 2, out[-3000:]
    port = own_s3["server"].port
    assert "cannot fetch shard" in out and f"from the S3 endpoint http://127.0.0.1:{port}" in out


@pytest.mark.slow
def test_cut_off_checkpoint_upload_resumes_from_the_previous_complete_one(own_s3, tmp_path, monkeypatch):
    uri = "s3://faults/ckpt-data"
    _dataset(tmp_path, uri)
    import re

    def should_cut(request_line: str) -> bool:
        """Cut every upload of checkpoints 4, 6, 8 (checkpoint 2 and Composer's 'latest' pointer go through:
        the pointer then names a truncated object, which is the hazard being tested)."""
        return request_line.startswith("PUT ") and re.search(r"ep0-ba[468]-rank0\.pt[ ?]", request_line) is not None

    proxy = CuttingProxy(own_s3["server"].port, should_cut)
    ckpt = "s3://faults/runs/t/checkpoints"
    cfg = _cfg(uri, tmp_path / "runs", max_duration="8ba", save_interval="2ba", save_folder=ckpt)
    cfg["data"]["predownload"] = 64
    try:
        env_endpoint = os.environ["S3_ENDPOINT_URL"]
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)  # the run talks to S3 through the proxy
        proc = _start(cfg, tmp_path)
        monkeypatch.setenv("S3_ENDPOINT_URL", env_endpoint)
        out = _finish(proc, 240)
    finally:
        proxy.close()
    assert proxy.cuts >= 1, "no upload was cut"
    assert proc.returncode != 0, "a run whose checkpoint cannot be uploaded must fail"
    keys = {o["Key"] for o in s3.s3_client().list_objects_v2(Bucket="faults", Prefix="runs/")["Contents"]}
    # s3rver keeps what arrived of a cut-off upload (real S3 would not): a truncated object exists, but only
    # checkpoint 2 got a manifest, i.e. was verified complete
    assert "runs/t/checkpoints/ep0-ba2-rank0.pt.manifest.json" in keys, out[-3000:]
    assert "runs/t/checkpoints/ep0-ba4-rank0.pt.manifest.json" not in keys
    # a fresh machine resumes from object storage: the latest complete checkpoint is batch 2
    import shutil

    shutil.rmtree(tmp_path / "runs")
    proc = _start(cfg, tmp_path)
    out = _finish(proc, 300)
    assert proc.returncode == 0, out[-3000:]
    assert "Autoresuming training from checkpoint" in out
    # the truncated objects of checkpoint 4 were moved out of the way (copied aside when the store can read them)
    assert "moving s3://faults/runs/t/checkpoints/ep0-ba4-rank0.pt" in out, out[-3000:]
    steps = [json.loads(l)["step"] for l in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 3 and steps[-1] == 8


def test_failed_shard_download_does_not_leave_readers_waiting(own_s3, tmp_path):
    """streaming 0.13.0 leaves a shard whose download raised 'preparing' for ever; ours gives it back."""
    import threading

    from streaming.base.dataset import _ShardState
    from streaming.base.util import clean_stale_shared_memory

    from tread_scale.data.stream.dataset import LatentStreamingDataset
    from tread_scale.errors import ObjectStoreError

    uri = "s3://faults/stuck"
    _dataset(tmp_path, uri)
    clean_stale_shared_memory()
    ds = LatentStreamingDataset(latent_shape=(4, 8, 8), num_classes=5, remote=uri, local=str(tmp_path / "cache"),
                                batch_size=1, download_retry=1, download_timeout=5)
    own_s3["server"].stop()
    with pytest.raises(Exception):
        ds.prepare_shard(3)  # what streaming's background thread does, against a dead endpoint
    assert ds._shard_states[3] == _ShardState.REMOTE, "the failed shard is still marked as being downloaded"
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_get(ds, 3)), daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "reading a sample of the failed shard hangs"
    assert isinstance(outcome[0], ObjectStoreError) and "cannot fetch shard" in str(outcome[0])
    t0 = time.time()
    assert isinstance(_get(ds, 5, retry=7), ObjectStoreError)  # what the training loop calls: bounded retries
    assert time.time() - t0 < 30, f"a sample of a dead endpoint took {time.time() - t0:.0f} s to fail"


def _get(ds, sample_id, retry=0):
    try:
        return ds.get_item(sample_id, retry=retry)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
