"""`sbatch slurm/train_xl.sh` on a real Slurm (Debian's slurmctld + two slurmd emulating two nodes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None,
                                reason="starting slurmd/munged needs root and Debian packages")]

TINY = ["model.name=null", "model.depth=4", "model.hidden_size=64", "model.num_heads=4", "model.patch_size=2",
        "model.input_size=8", "model.num_classes=5", "routing.routes[0].start=1", "routing.routes[0].end=2",
        "data.num_workers=0", "train.global_batch_size=8", "train.device=cpu", "train.precision=fp32",
        "sampling.every=null", "logging.progress_bar=false", "logging.metrics_interval=1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "LOCAL_SLURM_DIR": str(state), "LOCAL_SLURM_NODES": "2"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "local_slurm.sh"), "start"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", str(REPO / "scripts" / "local_slurm.sh"), "stop"], env=env, timeout=120)


def _sbatch(slurm_env, tmp_path, *args, wait=True, procs=1):
    env = {**slurm_env, "TREAD_PRIVATE_DEV_SHM": "1", "TREAD_PROCS_PER_NODE": str(procs),
           "TREAD_OUTPUT_DIR": str(tmp_path / "runs"), "TREAD_REPO": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = ["sbatch", "--parsable", f"--chdir={tmp_path}", "--nodes=2", "--time=00:30:00"]
    cmd += ["--wait"] if wait else []
    proc = subprocess.run([*cmd, str(REPO / "slurm" / "train_xl.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=900)
    job = proc.stdout.strip().split(";")[0]
    return proc, job


def _job(slurm_env, job) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm_env, capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def test_train_xl_runs_across_two_nodes(slurm, latent_dataset, tmp_path):
    proc, job = _sbatch(slurm, tmp_path, *TINY, f"data.remote={latent_dataset}", "train.max_duration=4ba",
                        "train.save_interval=2ba", procs=2)
    out = (tmp_path / f"slurm-tread-xl2-{job}.out").read_text()
    assert proc.returncode == 0, out[-3000:]
    host = os.uname().nodename.split(".")[0]
    assert f"2 node(s) x 2 proc(s) = world 4, master {host}-node1" in out
    run = tmp_path / "runs" / f"tread-xl2-{job}"
    assert (run / "checkpoints" / "ep0-ba4-rank0.pt").is_file() and (run / "ema" / "latest.safetensors").is_file()
    logs = run / "logs"
    texts = [p.read_text() for p in sorted(logs.glob("node-*.log")) + sorted(logs.glob("rank*.stderr.txt"))]
    agreed = {int(m) for t in texts for m in re.findall(r"rank(\d) INFO tread_scale.trainer.run: run [^:]+: ddp over 4 rank", t)}
    assert agreed == {0, 1, 2, 3}, "every rank must report a world of 4"
    assert sorted(p.name for p in logs.glob("node-*.log")) == [f"node-0-{job}.log", f"node-1-{job}.log"]
    assert "AWS_SECRET_ACCESS_KEY" not in out


def test_usr1_checkpoints_requeues_and_resumes(slurm, latent_dataset, tmp_path):
    _, job = _sbatch(slurm, tmp_path, *TINY, f"data.remote={latent_dataset}", "train.max_duration=400ba",
                     "train.save_interval=1000ba", wait=False)  # long enough not to end before the signal lands
    run = tmp_path / "runs" / f"tread-xl2-{job}"
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(1)
    else:
        pytest.fail(f"job {job} did not start training: {_job(slurm, job)}")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        info = _job(slurm, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        if info.get("JobState") == "PENDING" and info.get("Restarts") == "1":
            # Slurm holds a requeued job back for about two minutes; a test need not wait for that
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=False)
        time.sleep(2)
    out = (tmp_path / f"slurm-tread-xl2-{job}.out").read_text()
    assert info.get("JobState") == "COMPLETED", out[-3000:]
    assert info.get("Restarts") == "1", out[-3000:]
    batch = int(re.search(r"checkpointed at batch (\d+) after a preemption request", out).group(1))
    assert "requeueing job" in out and "(restart 1)" in out
    ckpts = run / "checkpoints"
    assert (ckpts / f"ep0-ba{batch}-rank0.pt").is_file() or list(ckpts.glob(f"ep*-ba{batch}-rank0.pt"))
    assert list(ckpts.glob("ep*-ba400-rank0.pt")), sorted(p.name for p in ckpts.iterdir())
    assert "Autoresuming training from checkpoint" in (run / "logs" / f"node-0-{job}.log").read_text()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == list(range(1, 401)) and steps.index(batch) < len(steps) - 1
