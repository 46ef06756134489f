"""The one client for object storage: obstore (one wheel for s3://, gs://, az://, http(s)://),
with its retries and ranged reads, and the standard credentials and endpoints of each store
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION / AWS_ENDPOINT_URL for S3, MinIO and
Ceph; GOOGLE_APPLICATION_CREDENTIALS for GCS; AZURE_STORAGE_ACCOUNT_NAME / _KEY for Azure).

obstore is not fork-safe (its Tokio runtime and connection pools do not survive a fork), so this
module is imported only by the node's fetcher process (storage/fetcher.py, started as a fresh
interpreter) and by the publishing command, never by a trainer or a loader worker.
"""
import os
from pathlib import Path

import obstore
from obstore.store import from_url

from storage.errors import StorageError

SCHEMES = ("s3://", "gs://", "az://", "https://", "http://")


def open_store(url: str):
    """An obstore store rooted at `url` (its path is the prefix every name is relative to)."""
    url = url.rstrip("/")
    client = {}
    # Plain HTTP only where asked for: an http:// URL, or an S3 endpoint given as http:// (MinIO, a test server).
    if url.startswith("http://") or os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        client["allow_http"] = True
    retry = {"max_retries": 5, "retry_timeout": _timedelta(float(os.environ.get("STORAGE_RETRY_TIMEOUT_S", 120)))}
    try:
        return from_url(url, client_options=client, retry_config=retry)
    except Exception as e:  # obstore raises its own errors for a URL or configuration it cannot take
        raise StorageError(f"--data {url}: cannot open it ({_short(e)}): use s3://BUCKET/PREFIX, gs://..., az://... "
                           f"or https://HOST/PATH, with the store's usual credentials in the environment") from None


def _timedelta(seconds: float):
    from datetime import timedelta
    return timedelta(seconds=seconds)


def _short(e: Exception) -> str:
    """obstore's messages carry a multi-line debug dump: its first line is the useful part."""
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


def read_range(store, name: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of object `name` (ranged GET; obstore retries transient failures)."""
    return bytes(obstore.get_range(store, name, start=start, end=end))


def read_all(store, name: str) -> bytes | None:
    """The whole object, or None when there is none of that name."""
    try:
        return bytes(obstore.get(store, name).bytes())
    except FileNotFoundError:
        return None


def put_file(store, name: str, path: Path):
    """Upload one file (obstore splits a large one into a multipart upload)."""
    try:
        with open(path, "rb") as f:
            obstore.put(store, name, f)
    except Exception as e:  # obstore's own errors: one line naming the object and what to check
        raise StorageError(f"{name}: cannot upload {path} ({_short(e)}): check that the bucket exists, the "
                           f"credentials and the endpoint (AWS_ENDPOINT_URL for MinIO/Ceph)") from None


def describe_error(e: Exception) -> str:
    return _short(e)
