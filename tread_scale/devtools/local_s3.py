"""Run an S3-compatible server on 127.0.0.1 for the demo and the tests.

Backends:

* ``moto``: moto's server from this environment (``moto[server]``); accepts any credentials, answers
  ``Connection: close``. The demo's embedded store.
* ``s3rver``: the npm package s3rver 3.7.1, installed by ``make s3rver`` into ``.cache/s3rver``; checks
  SigV4 signatures (keys ``S3RVER``/``S3RVER``) and keeps connections alive, like real S3 and Ceph RGW.
  The tests use it because keep-alive is what exposes connection-sharing bugs.

Usage: ``python -m tread_scale.devtools.local_s3 start --backend moto`` prints ``export`` lines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
S3RVER_DIR = Path(os.environ.get("TREAD_S3RVER_DIR", REPO_ROOT / ".cache" / "s3rver"))
CREDENTIALS = {"moto": ("tread-demo-key", "tread-demo-secret"), "s3rver": ("S3RVER", "S3RVER")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def s3rver_bin() -> Path | None:
    p = S3RVER_DIR / "node_modules" / ".bin" / "s3rver"
    return p if p.exists() else None


@dataclass
class LocalS3:
    """A running local S3 server.

    Attributes:
        backend: ``moto`` or ``s3rver``.
        port: TCP port on 127.0.0.1.
        process: The server process.
        data_dir: Storage folder (s3rver).
    """

    backend: str
    port: int
    process: subprocess.Popen
    data_dir: Path | None = None
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client_env(self) -> dict[str, str]:
        key, secret = CREDENTIALS[self.backend]
        return {"S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def create_bucket(self, name: str) -> None:
        import boto3

        e = self.client_env()
        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, hard: bool = False) -> None:
        """Stop the server (``hard``: SIGKILL at once, as a crash would: open connections are reset)."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def __enter__(self) -> LocalS3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_until_up(server: LocalS3, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not server.alive():
            log = server.log_path.read_text() if server.log_path and server.log_path.exists() else ""
            raise RuntimeError(f"{server.backend} exited at start (code {server.process.returncode}):\n{log[-2000:]}")
        try:
            urllib.request.urlopen(server.endpoint + "/", timeout=1)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is up
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{server.backend} did not answer on {server.endpoint} within {timeout:.0f} s")


def start(backend: str = "moto", port: int | None = None, data_dir: str | Path | None = None,
          log_dir: str | Path | None = None) -> LocalS3:
    """Start a server on 127.0.0.1 and wait until it answers.

    Args:
        backend: ``moto`` or ``s3rver``.
        port: Port; a free one when ``None``.
        data_dir: Storage folder for s3rver (a temporary one when ``None``).
        log_dir: Where the server's output goes.

    Raises:
        RuntimeError: If the backend is not installed or does not come up.
    """
    port = port or free_port()
    log_dir = Path(log_dir or os.environ.get("TMPDIR", "/tmp"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"local-s3-{backend}-{port}.log"
    data = None
    if backend == "moto":
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe), "-H", HOST, "-p", str(port)] if exe.exists() else \
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    elif backend == "s3rver":
        exe = s3rver_bin()
        if exe is None or shutil.which("node") is None:
            raise RuntimeError(f"s3rver is not installed at {S3RVER_DIR} (run `make s3rver`; it needs node and npm)")
        import tempfile

        data = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="s3rver-"))
        data.mkdir(parents=True, exist_ok=True)
        cmd = ["node", str(exe), "-d", str(data), "-a", HOST, "-p", str(port), "--silent", "--no-vhost-buckets"]
    else:
        raise ValueError(f"unknown backend {backend!r} (moto or s3rver)")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = LocalS3(backend, port, proc, data, log_path)
    _wait_until_up(server)
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("--backend", default="moto", choices=["moto", "s3rver"])
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--bucket", action="append", default=[])
    s.add_argument("--pidfile", required=True)
    t = sub.add_parser("stop")
    t.add_argument("--pidfile", required=True)
    args = p.parse_args(argv)
    if args.cmd == "start":
        server = start(args.backend, args.port or None)
        for b in args.bucket:
            server.create_bucket(b)
        Path(args.pidfile).write_text(str(server.process.pid))
        for k, v in server.client_env().items():
            print(f"export {k}={v}")
        return 0
    pid = int(Path(args.pidfile).read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    Path(args.pidfile).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
