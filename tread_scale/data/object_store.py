"""One way to reach S3-compatible object storage, used by conversion, training checks and sampling.

The endpoint comes from ``S3_ENDPOINT_URL`` (what mosaicml-streaming and Composer read), falling back to
boto3's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; credentials and region come from boto3's
standard chain. Secrets are never logged.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tread_scale.errors import ObjectStoreError

log = logging.getLogger(__name__)

ENDPOINT_VARS = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_s3(uri: str) -> bool:
    """Whether ``uri`` is an ``s3://`` URI."""
    return str(uri).startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into ``(bucket, prefix)`` (prefix without surrounding slashes).

    Raises:
        ObjectStoreError: If the URI is not of that form.
    """
    if not is_s3(uri):
        raise ObjectStoreError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ObjectStoreError(f"{uri!r} names no bucket (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(base, *parts))


def s3_endpoint() -> str | None:
    """The configured endpoint URL, or ``None`` for AWS itself."""
    for var in ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def describe_endpoint() -> str:
    ep = s3_endpoint()
    return ep if ep else "AWS S3 (no S3_ENDPOINT_URL set)"


def s3_client(connect_timeout: float = 10.0, read_timeout: float = 60.0, max_attempts: int = 5):
    """A boto3 S3 client configured the same way everywhere in tread_scale.

    Args:
        connect_timeout: Seconds to wait for a connection.
        read_timeout: Seconds to wait for a response.
        max_attempts: Total attempts per request (standard retry mode, with backoff).
    """
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    region = session.region_name or "us-east-1"
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if s3_endpoint() else None,
    )
    return session.client("s3", endpoint_url=s3_endpoint(), region_name=region, config=config)


def check_credentials() -> None:
    """Raise :class:`ObjectStoreError` unless boto3 can find credentials.

    mosaicml-streaming silently falls back to unsigned requests without credentials; we refuse instead.
    """
    import boto3
    from botocore.exceptions import BotoCoreError

    try:
        creds = boto3.session.Session().get_credentials()
    except BotoCoreError as e:
        raise ObjectStoreError(f"S3 credentials are unusable: {type(e).__name__}: {e}") from None
    if creds is None or not creds.access_key or not creds.secret_key:
        raise ObjectStoreError(
            "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / an "
            f"instance role) for the endpoint {describe_endpoint()}"
        )


def check_s3_access(uri: str, timeout: float = 10.0) -> None:
    """Fail early and clearly if ``uri``'s bucket cannot be reached with the current credentials.

    Raises:
        ObjectStoreError: Naming the endpoint and bucket, for missing credentials, an unreachable endpoint,
            a missing bucket or denied access.
    """
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    bucket, _ = parse_s3_uri(uri)
    check_credentials()
    client = s3_client(connect_timeout=timeout, read_timeout=timeout, max_attempts=2)
    try:
        client.head_bucket(Bucket=bucket)
    except EndpointConnectionError:
        raise ObjectStoreError(f"cannot reach the S3 endpoint {describe_endpoint()} (for {uri})") from None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise ObjectStoreError(f"bucket {bucket!r} does not exist at {describe_endpoint()} (for {uri})") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise ObjectStoreError(f"access to bucket {bucket!r} at {describe_endpoint()} was denied ({code}): "
                                   "check the credentials") from None
        raise ObjectStoreError(f"S3 error {code} for bucket {bucket!r} at {describe_endpoint()}") from None
    except BotoCoreError as e:
        raise ObjectStoreError(f"cannot reach the S3 endpoint {describe_endpoint()} (for {uri}): "
                               f"{type(e).__name__}") from None


def read_bytes(uri: str) -> bytes | None:
    """Contents of a local file or S3 object, or ``None`` if it does not exist."""
    if not is_s3(uri):
        p = Path(uri)
        return p.read_bytes() if p.is_file() else None
    from botocore.exceptions import ClientError

    bucket, key = parse_s3_uri(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def upload_file(local: str | os.PathLike, uri: str, client=None) -> None:
    """Upload one file to ``uri``."""
    bucket, key = parse_s3_uri(uri)
    (client or s3_client()).upload_file(str(local), bucket, key)


def download_file(uri: str, local: str | os.PathLike) -> None:
    """Download ``uri`` to ``local`` atomically (via a temporary name)."""
    bucket, key = parse_s3_uri(uri)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + ".part")
    s3_client().download_file(bucket, key, str(tmp))
    tmp.replace(local)


def upload_tree(local_dir: str | os.PathLike, uri: str, files: list[Path] | None = None, threads: int = 8) -> int:
    """Upload files under ``local_dir`` to the prefix ``uri``, keeping relative paths.

    Args:
        local_dir: Root folder.
        uri: Destination prefix.
        files: Files to upload (default: every file under ``local_dir``), in an order that is kept per
            call: pass the index last in a separate call so that nothing points at a missing shard.
        threads: Parallel uploads.

    Returns:
        Number of files uploaded.
    """
    root = Path(local_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if files is None else files
    client = s3_client()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda p: upload_file(p, join_uri(uri, p.relative_to(root).as_posix()), client), files))
    return len(files)


def delete_prefix(uri: str) -> int:
    """Delete every object under the prefix ``uri``; returns how many were deleted."""
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client()
    deleted = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            deleted += len(keys)
    return deleted
