"""Run training as real processes: ``composer -n N launch.py`` (gloo on CPU), as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def launch(cfg: dict, nprocs: int, tmp_path: Path, *overrides: str, timeout: int = 600,
           module: str | None = None) -> subprocess.CompletedProcess:
    """Train ``cfg`` on ``nprocs`` processes and return the finished process (asserting success).

    ``module``: run this Python module (``python -m``, given the config path and overrides) instead of
    ``launch.py``, e.g. a test's own entry point that adds a probe callback.
    """
    cfg_path = tmp_path / f"cfg-{cfg['run_name']}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    entry = ["-m", module] if module else [str(REPO / "launch.py")]
    if nprocs == 1:
        cmd = [sys.executable, *entry, str(cfg_path), *overrides]
    else:
        # torchrun rather than `composer -n`: the same environment contract (RANK, LOCAL_RANK, WORLD_SIZE,
        # MASTER_ADDR/PORT) at a quarter of the start-up (it imports torch, not Composer: 2 s vs 8 s here);
        # `composer -n` itself is run by the Slurm, signal and kill -9 tests.
        from composer.utils import get_free_tcp_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs), "--master-addr",
               "127.0.0.1", "--master-port", str(get_free_tcp_port()), *entry, str(cfg_path), *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "NODE_RANK": "0"}  # (Composer reads it)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = tmp_path / f"{cfg['run_name']}-{len(list(tmp_path.glob('*.log')))}.log"
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"training failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


def kill_after(cfg: dict, nprocs: int, tmp_path: Path, *overrides: str, step: int, timeout: float = 300) -> None:
    """Start ``cfg`` on ``nprocs`` processes (``composer -n``, or ``python launch.py`` for one) and SIGKILL the
    whole process tree once ``step`` has been logged to ``metrics.jsonl``."""
    from composer.utils import get_free_tcp_port

    path = tmp_path / f"{cfg['run_name']}-kill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if nprocs == 1:
        cmd = [sys.executable, str(REPO / "launch.py"), str(path), *overrides]
    else:
        cmd = [str(Path(sys.executable).with_name("composer")), "-n", str(nprocs), "--master_port",
               str(get_free_tcp_port()), str(REPO / "launch.py"), str(path), *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = Path(cfg["output_dir"]) / cfg["run_name"] / "metrics.jsonl"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if metrics.exists() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines()):
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail(f"the run did not reach the kill step {step} within {timeout:.0f} s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def losses(run_dir: Path) -> dict[int, float]:
    """Global mean loss per step from ``metrics.jsonl`` (the last record of a step wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out
