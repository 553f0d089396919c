"""Checkpoints in object storage that autoresume can trust.

Composer uploads a checkpoint asynchronously and then a ``latest-rank0.pt.symlink`` object once the
checkpoint object *exists*. Some S3-compatible stores keep a truncated object when an upload is cut off
(s3rver does), so "exists" is not "complete"; and a run that dies before its symlink upload leaves the
remote folder without a usable pointer. Two pieces close that gap (for non-sharded checkpoints):

* :class:`CheckpointManifests` — after Composer saves a checkpoint, a background thread waits until the
  remote object has exactly the local file's size, then writes ``<key>.manifest.json`` (size, SHA-256).
  A checkpoint without a manifest is never trusted.
* :func:`repair_remote_latest` — before a run starts, point the remote symlink at the newest checkpoint
  whose manifest matches its object (or remove it when none does), so autoresume never loads a partial
  checkpoint and does not fall back to step 0 while a complete one exists; unverified checkpoint objects
  newer than that one are moved to ``<prefix>/orphaned/`` (likely partial; in place they would block the
  re-upload of those steps).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from tread_scale.compat.composer import upload_workers_alive
from tread_scale.data import object_store as s3
from tread_scale.trainer.checkpointing.local import batch_of

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
SYMLINK = "latest-rank0.pt.symlink"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _remote_size(bucket: str, key: str) -> int | None:
    from botocore.exceptions import ClientError

    try:
        return int(s3.s3_client(max_attempts=2).head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError:
        return None


class CheckpointManifests(Callback):
    """Write a manifest for every checkpoint once its remote copy is complete (see the module docstring).

    On rank 0, after each batch (at most every ``poll_seconds``), every checkpoint Composer has saved but
    not yet verified is checked with one ``HEAD`` request; when the remote size equals the local file's, the
    manifest is written. The end of training waits up to ``fit_end_wait`` seconds for the last ones.

    Args:
        save_folder: The ``s3://`` checkpoint folder.
        poll_seconds: Minimum seconds between checks.
        fit_end_wait: Seconds the end of training waits for pending verifications.
    """

    def __init__(self, save_folder: str, poll_seconds: float = 2.0, fit_end_wait: float = 120.0) -> None:
        self.bucket, self.prefix = s3.parse_s3_uri(save_folder)
        self.poll_seconds = poll_seconds
        self.fit_end_wait = fit_end_wait
        self._pending: dict[str, dict] = {}
        self._seen: set[str] = set()
        self._last = 0.0

    def _collect(self, state: State) -> None:
        from composer.callbacks import CheckpointSaver

        for cb in state.callbacks:
            if isinstance(cb, CheckpointSaver):
                for path in cb.saved_checkpoints:
                    p = Path(path)
                    if path not in self._seen and p.is_file():
                        self._seen.add(path)
                        entry = {"local": p, "size": p.stat().st_size, "sha256": None}
                        threading.Thread(target=lambda e=entry: e.update(sha256=_sha256(e["local"])),
                                         daemon=True).start()
                        self._pending[f"{self.prefix}/{p.name}"] = entry

    def _check(self) -> None:
        self._last = time.time()
        for key, entry in list(self._pending.items()):
            if _remote_size(self.bucket, key) == entry["size"]:
                body = json.dumps({"key": key, "size": entry["size"], "sha256": entry["sha256"]}).encode()
                s3.s3_client().put_object(Bucket=self.bucket, Key=key + MANIFEST_SUFFIX, Body=body)
                log.info("checkpoint s3://%s/%s verified complete (%d bytes)", self.bucket, key, entry["size"])
                del self._pending[key]

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        self._collect(state)
        if self._pending and time.time() - self._last >= self.poll_seconds:
            self._check()

    def fit_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        self._collect(state)
        deadline = time.time() + self.fit_end_wait
        while self._pending and time.time() < deadline and upload_workers_alive(logger):
            self._check()
            if self._pending:
                time.sleep(1.0)
        for key in self._pending:
            log.error("checkpoint s3://%s/%s was not complete in object storage by the end of training; "
                      "autoresume will not use it", self.bucket, key)


    def close(self, state: State, logger: Logger) -> None:
        """Also when training failed (e.g. a later upload was cut off): verify what did arrive, once."""
        if dist.get_global_rank() != 0:
            return
        self._collect(state)
        if self._pending:
            try:
                self._check()
            except Exception as e:  # noqa: BLE001 - shutting down; the original error matters more
                log.warning("could not verify checkpoint uploads while shutting down: %s", e)


def repair_remote_latest(save_folder: str) -> str | None:
    """Point the remote ``latest`` symlink at the newest verified checkpoint; returns its key (or ``None``)."""
    from botocore.exceptions import ClientError

    bucket, prefix = s3.parse_s3_uri(save_folder)
    client = s3.s3_client()
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            if "/" not in o["Key"][len(prefix) + 1:]:  # this folder only, not orphaned/ or ema/
                objects[o["Key"]] = int(o["Size"])
    verified = []
    for key in objects:
        if key.endswith(MANIFEST_SUFFIX):
            target = key[: -len(MANIFEST_SUFFIX)]
            manifest = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
            if objects.get(target) == manifest["size"]:
                verified.append(target)
    symlink_key = f"{prefix}/{SYMLINK}"
    current = None
    if symlink_key in objects:
        current = client.get_object(Bucket=bucket, Key=symlink_key)["Body"].read().decode().strip()

    best = max(verified, key=batch_of, default=None)
    floor = batch_of(best) if best else -1
    for key in objects:
        if key.endswith(".pt") and key not in verified and batch_of(key) > floor:
            aside = f"{prefix}/orphaned/{key.rsplit('/', 1)[-1]}"
            log.warning("moving s3://%s/%s to %s: it has no verified manifest (an upload that did not complete)",
                        bucket, key, aside)
            try:
                s3.s3_client(max_attempts=2).copy_object(Bucket=bucket, Key=aside, CopySource={"Bucket": bucket, "Key": key})
            except ClientError as e:  # a store may not be able to read back a cut-off object at all
                log.warning("could not copy s3://%s/%s (%s); deleting it: it is unreadable and would block the "
                            "re-upload of that step", bucket, key, e.response.get("Error", {}).get("Code"))
            client.delete_object(Bucket=bucket, Key=key)
    if current == best:
        return best
    if best is None:
        if current is not None:
            log.warning("remote latest checkpoint %s has no verified manifest and no complete checkpoint exists; "
                        "removing the pointer (training starts fresh)", current)
            client.delete_object(Bucket=bucket, Key=symlink_key)
        return None
    client.put_object(Bucket=bucket, Key=symlink_key, Body=best.encode())
    if current is None:
        log.warning("no remote latest pointer; the newest complete checkpoint is %s: resuming from it", best)
    else:
        log.warning("remote latest pointed at %s, which is missing or incomplete; resuming from the newest "
                    "complete checkpoint %s", current, best)
    return best
