"""Shared fixtures: tiny model configs, demo datasets on disk, a real S3 server (s3rver) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Nothing a test does may land in the home folder or reach the network.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session", autouse=True)
def _no_strays():
    """After the whole session: no child process left running.

    (Files left in /dev/shm are checked by ``make test`` after this process has exited: streaming's
    shared memory of in-process datasets is released only at interpreter exit.)
    """
    import psutil

    yield
    def helper(proc) -> bool:  # per-interpreter helpers that exit with this process, not strays
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            return True
        return ("resource_tracker" in cmd or "forkserver" in cmd or "_inductor/compile_worker" in cmd
                or proc.name() == "wandb-core")

    me = psutil.Process()
    children = [c for c in me.children(recursive=True) if not helper(c)]
    _, children = psutil.wait_procs(children, timeout=15)  # give processes that are shutting down time to exit
    children = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    described = []
    for c in children:
        try:
            described.append((c.pid, " ".join(c.cmdline())[:200]))
            c.kill()
        except psutil.Error:
            pass
    assert not children, f"stray processes after the tests: {described}"


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb"))
    for var in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_model_cfg(**over) -> dict:
    """A depth-4, width-64 DiT on 4x8x8 latents: fast enough for every CPU test."""
    cfg = {"name": None, "depth": 4, "hidden_size": 64, "num_heads": 4, "patch_size": 2, "in_channels": 4,
           "input_size": 8, "num_classes": 5}
    cfg.update(over)
    return cfg


def tiny_run_cfg(remote: str, out: Path, **over) -> dict:
    """A full run config for a tiny model on the dataset at ``remote``, writing under ``out``."""
    cfg = {
        "run_name": "t",
        "output_dir": str(out),
        "seed": 3,
        "model": tiny_model_cfg(),
        "routing": {"routes": [{"rate": 0.5, "start": 1, "end": 2}]},
        "optimizer": {"lr": 1e-3},
        "ema": {"decay": 0.9},
        "data": {"remote": remote, "num_workers": 0, "shuffle": True},
        "train": {"max_duration": "4ba", "global_batch_size": 8, "device": "cpu", "precision": "fp32",
                  "save_interval": "2ba"},
        "sampling": {"every": None, "num_images": 4, "steps": 3},
        "logging": {"progress_bar": False, "console_interval": "1ba", "level": "INFO"},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def write_npz_latents(folder: Path, n: int = 64, shape=(4, 8, 8), num_classes: int = 5, seed: int = 0):
    """Random latents as one batched .npz (latents, labels); returns the arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((n, *shape)).astype(np.float32)
    lab = rng.integers(0, num_classes, n)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "batch.npz", latents=lat, labels=lab)
    return lat, lab


@pytest.fixture(scope="session")
def latent_dataset(tmp_path_factory) -> str:
    """A local MDS dataset of 64 random 4x8x8 latents with 5 classes, in several shards."""
    from tread_scale.data.conversion.writer import ConvertOptions, convert
    from tread_scale.data.conversion.sources import NpyFolderSource

    root = tmp_path_factory.mktemp("latents")
    write_npz_latents(root / "src")
    out = root / "mds"
    convert(NpyFolderSource(folder=str(root / "src"), num_classes=5), str(out),
            ConvertOptions(shard_size="16kb", progress=False))
    return str(out)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real s3rver process (SigV4 checks, keep-alive connections) on 127.0.0.1, for the whole session."""
    from tread_scale.devtools import local_s3

    if local_s3.s3rver_bin() is None:
        pytest.fail("s3rver is not installed: run `make s3rver` (the Makefile's test target does it)")
    server = local_s3.start("s3rver", data_dir=tmp_path_factory.mktemp("s3rver-data"),
                            log_dir=tmp_path_factory.mktemp("s3rver-log"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Environment of a client of :func:`s3_server`, plus a fresh bucket; yields the bucket name."""
    import uuid

    for k, v in s3_server.client_env().items():
        monkeypatch.setenv(k, v)
    bucket = f"t-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    yield bucket


def copy_tree(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)
