"""Object storage behind one small interface: a local folder or an S3-compatible bucket.

``open_store("file:///abs/dir")`` or ``open_store("s3://bucket/prefix")``; the S3 one
goes through boto3 with ``AWS_ENDPOINT_URL`` (MinIO, rclone, Ceph, ... or AWS itself)
and the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``. Keys are relative,
``/``-separated paths under the store's root. ``check()`` fails within seconds, with
a message naming the URL and the setting to change, instead of boto3's retry loop.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from autoqra_core.errors import AutoQRAError

from infra.settings import Settings


class StoreError(AutoQRAError):
    """Object storage that cannot be reached, authenticated or written."""


class Store(Protocol):
    """What flows and the exporter need from object storage."""

    url: str

    def check(self) -> None: ...
    def put_file(self, local: str | Path, key: str) -> str: ...
    def put_dir(self, local_dir: str | Path, prefix: str) -> list[str]: ...
    def get_file(self, key: str, local: str | Path) -> Path: ...
    def get_dir(self, prefix: str, local_dir: str | Path) -> list[Path]: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def exists(self, key: str) -> bool: ...
    def url_for(self, key: str) -> str: ...


def open_store(url: str | None = None, settings: Settings | None = None, check: bool = True) -> Store:
    """Open ``url`` (default: the ``AUTOQRA_STORE`` setting); ``check=True`` verifies it now."""
    settings = settings or Settings.load()
    url = url or settings.store
    parsed = urlparse(url)
    if parsed.scheme == "file" or (parsed.scheme == "" and url):
        root = Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser().resolve()
        store: Store = LocalStore(root=root)
    elif parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"Store URL {url!r} has no bucket; use s3://BUCKET/PREFIX in AUTOQRA_STORE or --store")
        store = S3Store(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint_url=settings.aws_endpoint_url,
            access_key_id=settings.aws_access_key_id,
            secret_access_key=settings.aws_secret_access_key,
            timeout=settings.request_timeout,
            retries=settings.request_retries,
        )
    else:
        raise StoreError(f"Store URL {url!r} is not file://... or s3://...; fix AUTOQRA_STORE or --store")
    if check:
        store.check()
    return store


def _clean_key(key: str) -> str:
    """Relative ``/``-separated key; refuses ``..`` and absolute paths (no escaping the root)."""
    parts = [p for p in PurePosixPath(str(key).replace("\\", "/")).parts if p not in ("", ".", "/")]
    if not parts or ".." in parts:
        raise StoreError(f"Invalid object key {key!r}: use a relative path without '..'")
    return "/".join(parts)


def _clean_prefix(prefix: str) -> str:
    return "" if prefix.strip("/") in ("", ".") else _clean_key(prefix)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _files_under(local_dir: Path) -> list[Path]:
    if not local_dir.is_dir():
        raise StoreError(f"{local_dir} is not a directory")
    return sorted(p for p in local_dir.rglob("*") if p.is_file())


class _Folders:
    """Folder transfer in terms of each store's own put_file / get_file / list."""

    def put_dir(self, local_dir: str | Path, prefix: str) -> list[str]:
        local_dir = Path(local_dir)
        keys = []
        for path in _files_under(local_dir):
            key = _join(_clean_prefix(prefix), path.relative_to(local_dir).as_posix())
            self.put_file(path, key)
            keys.append(key)
        return keys

    def get_dir(self, prefix: str, local_dir: str | Path) -> list[Path]:
        prefix = _clean_prefix(prefix)
        return [self.get_file(k, Path(local_dir) / k[len(prefix) :].lstrip("/")) for k in self.list(prefix)]


@dataclass
class LocalStore(_Folders):
    """A folder on a local (or shared network) file system."""

    root: Path

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create store folder {self.root} ({exc}); set AUTOQRA_STORE to a writable file:// URL") from exc
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"Store folder {self.root} is not writable; set AUTOQRA_STORE to a writable file:// URL")

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def put_file(self, local: str | Path, key: str) -> str:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)  # readers never see a half-written object
        return self.url_for(key)

    def get_file(self, key: str, local: str | Path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise StoreError(f"No object {key!r} in {self.url}")
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local)
        return local

    def list(self, prefix: str = "") -> list[str]:
        prefix = _clean_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.endswith(".part")
        )

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def url_for(self, key: str) -> str:
        return self._path(key).as_uri()


@dataclass
class S3Store(_Folders):
    """A bucket (and key prefix) on AWS S3 or any S3-compatible server, through boto3."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    region: str = field(default_factory=lambda: os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    timeout: float = 10.0  # seconds per request (connect and read): the AUTOQRA_REQUEST_TIMEOUT setting
    retries: int = 1  # retries after a failed request: the AUTOQRA_REQUEST_RETRIES setting
    _client: Any = field(default=None, init=False, repr=False)
    _bucket_ready: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"s3://{_join(self.bucket, self.prefix)}"

    def _where(self) -> str:
        return f"{self.url} at {self.endpoint_url or 'the AWS default endpoint'}"

    def _make_client(self, fast: bool) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=min(2, self.timeout) if fast else self.timeout,
            read_timeout=min(5, self.timeout) if fast else self.timeout,
            retries={"max_attempts": 1 if fast else 1 + self.retries, "mode": "standard"},
            # S3-compatible servers differ in path-style and new-checksum support: ask for neither.
            s3={"addressing_style": "path"} if self.endpoint_url else None,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=config,
        )

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._make_client(fast=False)
        return self._client

    def check(self) -> None:
        """Reach the endpoint once with short timeouts. A missing bucket is fine here: it is created by the
        first upload (``_ensure_bucket``), so checking has no side effect."""
        from botocore.exceptions import ClientError

        try:
            self._make_client(fast=True).head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreError(
                    f"Credentials rejected by {self._where()} ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from exc
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(f"S3 error {code} from {self._where()}: {exc}; check AUTOQRA_STORE") from exc
        except Exception as exc:  # noqa: BLE001 - botocore's connection errors have no common base worth naming
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception, doing: str = "") -> StoreError:
        from botocore.exceptions import NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return StoreError(f"No credentials for {self._where()}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        return StoreError(
            f"Cannot reach S3 endpoint for {self._where()}{doing} ({type(exc).__name__}). Start the server or "
            f"fix AWS_ENDPOINT_URL, or set AUTOQRA_STORE to a file:// URL to store objects locally."
        )

    def _ensure_bucket(self) -> None:
        """Create the bucket if it is missing, once; outside us-east-1 AWS needs the region as a constraint."""
        if self._bucket_ready:
            return
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            extra = {} if self.region == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": self.region}}
            try:
                self.client.create_bucket(Bucket=self.bucket, **extra)
            except ClientError as exc2:
                code = str(exc2.response.get("Error", {}).get("Code", ""))
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise StoreError(f"Cannot create bucket {self.bucket!r} at {self._where()}: {code}") from exc2
        self._bucket_ready = True

    def _key(self, key: str) -> str:
        return _join(self.prefix, _clean_key(key))

    def put_file(self, local: str | Path, key: str) -> str:
        """Upload one file (bounded: ``timeout`` per request, ``retries`` retries); a dead server is a StoreError
        within seconds, naming the endpoint. Re-uploading the same key overwrites it (idempotent)."""
        try:
            self._ensure_bucket()
            self.client.upload_file(str(local), self.bucket, self._key(key))
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore/boto3 transfer errors: one message for the user
            raise self._unreachable(exc, f" while uploading {key!r}") from exc
        return self.url_for(key)

    def get_file(self, key: str, local: str | Path) -> Path:
        from botocore.exceptions import ClientError

        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(local))
        except ClientError as exc:
            raise StoreError(f"Cannot download {key!r} from {self.url}: {exc}") from exc
        return local

    def list(self, prefix: str = "") -> list[str]:
        full = _join(self.prefix, _clean_prefix(prefix))
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                keys.append(key[len(self.prefix) :].lstrip("/") if self.prefix else key)
        # "a/b" must not match "a/bc": keep exact key or whole path components only.
        want = _clean_prefix(prefix)
        return sorted(k for k in keys if not want or k == want or k.startswith(want + "/"))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"
