"""One artifact API over `file://` and `s3://` URIs.

Every write returns the object's sha256 and size; callers record them (manifests, checkpoint indexes) and pass
them back on read, where the bytes are verified. S3 objects also carry the sha256 as user metadata so a read
without a manifest can still be verified. S3 goes through boto3 with the standard AWS configuration
(`AWS_ENDPOINT_URL`, the credential chain), the transfer manager for multipart parallel transfers, and
botocore's standard retry mode (exponential backoff on throttling, 5xx and connection errors).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from interiorfusion_core.errors import ChecksumError, StorageError

CHUNK = 8 * 1024 * 1024
SHA_META = "sha256"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


def validate_key(key: str) -> str:
    """Keys are relative, '/'-separated, with no empty, '.' or '..' segments."""
    if not key or key.startswith("/") or "\\" in key:
        raise StorageError(f"invalid artifact key {key!r}: keys are relative '/'-separated paths")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid artifact key {key!r}: empty, '.' or '..' segments are not allowed")
    return key


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def check_range(start: int, end: int) -> None:
    if start < 0 or end < start:
        raise ValueError(f"invalid byte range [{start}, {end}): need 0 <= start <= end")


def _check(key: str, uri: str, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise ChecksumError(
            f"{uri}: checksum mismatch for '{key}' (sha256 {actual[:12]}…, recorded {expected[:12]}…); "
            "the object is corrupt or was overwritten"
        )


class ArtifactStore(ABC):
    """A prefix of a bucket or directory. `child()` narrows it; keys are relative to the prefix."""

    @property
    @abstractmethod
    def uri(self) -> str: ...

    def uri_for(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{validate_key(key)}"

    @abstractmethod
    def child(self, prefix: str) -> ArtifactStore: ...

    @abstractmethod
    def put_file(self, key: str, path: str | Path) -> ObjectInfo: ...

    @abstractmethod
    def get_file(self, key: str, path: str | Path, sha256: str | None = None) -> Path: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...

    @abstractmethod
    def get_bytes(self, key: str, sha256: str | None = None) -> bytes: ...

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object: `end` is exclusive, like a slice (`get_range(k, 0, 4)` is the first 4
        bytes). Fewer bytes come back when the object ends before `end` (none when it ends before `start`);
        StorageError when the object does not exist. Not verified (a range has no recorded sha256): callers that
        index ranges record their own digests. Stores override this with a real ranged read; this fallback reads
        the whole object."""
        check_range(start, end)
        return self.get_bytes(key)[start:end]

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and sha256 of an existing object (from metadata where stored, else computed)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix` (relative to this store), in lexicographic order."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None:
        for key in list(self.list(prefix)):
            self.delete(key)

    def put_json(self, key: str, obj: Any) -> ObjectInfo:
        import json

        return self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")

    def get_json(self, key: str, sha256: str | None = None) -> Any:
        import json

        data = self.get_bytes(key, sha256)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self.uri_for(key)}: not valid JSON ({exc})") from None

    def open_local(self, key: str, sha256: str | None = None) -> Path:
        """A local path holding the object (the file itself for local stores, a cached copy for S3)."""
        cache = Path(tempfile.gettempdir()) / "interiorfusion-cache" / hashlib.sha1(
            self.uri_for(key).encode()
        ).hexdigest()
        if not cache.exists():
            self.get_file(key, cache, sha256)
        return cache


class LocalStore(ArtifactStore):
    """A directory. Writes go to a temporary file then `os.replace`, so a reader never sees half an object."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix))

    def _publish(self, key: str, write: Any) -> ObjectInfo:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            h = hashlib.sha256()
            size = 0
            with open(tmp, "wb") as out:
                for block in write():
                    h.update(block)
                    size += len(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"{self.uri_for(key)}: write failed ({exc.strerror or exc})") from None
        return ObjectInfo(key, size, h.hexdigest())

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        def blocks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while block := f.read(CHUNK):
                    yield block

        return self._publish(key, blocks)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._publish(key, lambda: iter([data]))

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        p = self._path(key)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.uri_for(key)}: no such artifact") from None
        _check(key, self.uri_for(key), hashlib.sha256(data).hexdigest(), sha256)
        return data

    def get_file(self, key: str, path: str | Path, sha256: str | None = None) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise StorageError(f"{self.uri_for(key)}: no such artifact")
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(src, tmp)
        if sha256 is not None:
            try:
                _check(key, self.uri_for(key), sha256_file(tmp), sha256)
            except ChecksumError:
                tmp.unlink(missing_ok=True)
                raise
        os.replace(tmp, dest)
        return dest

    def get_range(self, key: str, start: int, end: int) -> bytes:
        check_range(start, end)
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StorageError(f"{self.uri_for(key)}: no such artifact") from None
        except OSError as exc:
            raise StorageError(f"{self.uri_for(key)}: read failed ({exc.strerror or exc})") from None

    def open_local(self, key: str, sha256: str | None = None) -> Path:
        p = self._path(key)
        if not p.is_file():
            raise StorageError(f"{self.uri_for(key)}: no such artifact")
        if sha256 is not None:
            _check(key, self.uri_for(key), sha256_file(p), sha256)
        return p

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ObjectInfo:
        p = self._path(key)
        if not p.is_file():
            raise StorageError(f"{self.uri_for(key)}: no such artifact")
        return ObjectInfo(key, p.stat().st_size, sha256_file(p))

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            yield prefix
            return
        if not base.is_dir():
            return
        found = []
        for p in base.rglob("*"):
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp")):
                found.append(p.relative_to(self.root).as_posix())
        yield from sorted(found)

    def delete(self, key: str) -> None:
        p = self._path(key)
        p.unlink(missing_ok=True)
        # Drop empty parent directories up to the root so listings stay clean.
        for parent in p.parents:
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break


_S3_CLIENTS: dict[tuple, Any] = {}
# boto3 sessions by credentials. A session holds no connection (its clients do), so one made before a fork serves
# the children: a process that builds a client does so in ~8 ms instead of the ~85 ms a new session costs (loading
# the service model again).
_S3_SESSIONS: dict[tuple, Any] = {}
# A spare client per configuration, built beside the process's own and never used by it: it has opened no
# connection, so a forked child can take it as its own client instead of building one (~14 ms of the ~24 ms a
# worker's first read from S3 took; the rest is its first request and connection). Each child takes its
# copy-on-write copy; the parent keeps its spare for the next fork (the next epoch's workers).
_S3_SPARES: dict[tuple, tuple[int, Any]] = {}
_S3_LOCK = threading.Lock()


def _fresh_lock_after_fork() -> None:
    global _S3_LOCK
    _S3_LOCK = threading.Lock()  # a thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_fresh_lock_after_fork)


def _credentials() -> tuple[str | None, ...]:
    """What a boto3 session resolves its credentials from (the key of _S3_SESSIONS)."""
    return tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                             "AWS_PROFILE"))


def s3_client() -> Any:
    """One boto3 client per process and endpoint, configured from the environment. A forked child (a DataLoader
    worker) takes the spare its parent built and never used (`_S3_SPARES`), so it opens its own connections
    without building a client."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    attempts = int(os.environ.get("INTERIORFUSION_S3_MAX_ATTEMPTS", "5"))
    credentials = _credentials()
    config_key = (endpoint, attempts, os.environ.get("AWS_ACCESS_KEY_ID"))
    key = (*config_key, os.getpid())
    with _S3_LOCK:
        if key in _S3_CLIENTS:
            return _S3_CLIENTS[key]
        spare = _S3_SPARES.pop(config_key, None)
        if spare is not None and spare[0] != os.getpid():  # made by an ancestor before the fork: unused
            _S3_CLIENTS[key] = spare[1]
            return spare[1]
        session = _S3_SESSIONS.get(credentials)
        if session is None:  # a session caches the credentials it resolved: one per set of them
            session = _S3_SESSIONS[credentials] = boto3.session.Session()
        config = Config(
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=float(os.environ.get("INTERIORFUSION_S3_CONNECT_TIMEOUT", "10")),
            read_timeout=float(os.environ.get("INTERIORFUSION_S3_READ_TIMEOUT", "60")),
            # Path-style works with every S3 implementation (MinIO, rclone, AWS).
            s3={"addressing_style": "path"},
            # Some S3 servers reject the newer default CRC trailers; sha256 is verified by us anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=32,
        )
        _S3_CLIENTS[key] = session.client("s3", endpoint_url=endpoint, config=config)
        # Built like the process's own; no request is ever sent through it here.
        _S3_SPARES[config_key] = (os.getpid(), session.client("s3", endpoint_url=endpoint, config=config))
        return _S3_CLIENTS[key]


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=16 * 1024 * 1024,
        multipart_chunksize=16 * 1024 * 1024,
        max_concurrency=int(os.environ.get("INTERIORFUSION_S3_CONCURRENCY", "8")),
        use_threads=True,
    )


class S3Store(ArtifactStore):
    def __init__(self, bucket: str, prefix: str = ""):
        if not bucket:
            raise StorageError("invalid S3 URI: no bucket name")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key))

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, join_key(self.prefix, validate_key(prefix)))

    def _fail(self, key: str, action: str, exc: Exception) -> StorageError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
        if code in ("404", "NoSuchKey", "NotFound"):
            return StorageError(f"{self.uri_for(key)}: no such artifact")
        if code == "NoSuchBucket":
            return StorageError(f"{self.uri}: bucket '{self.bucket}' does not exist")
        reason = code or type(exc).__name__
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
        # No S3 error code: the request never got an answer (connection refused/reset, timeout).
        transient = code is None or code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout")
        return StorageError(
            f"{self.uri_for(key)}: {action} failed against {endpoint} ({reason}: {exc})", transient=transient
        )

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        digest = sha256_file(path)
        size = Path(path).stat().st_size
        try:
            s3_client().upload_file(
                str(path), self.bucket, self._key(key),
                ExtraArgs={"Metadata": {SHA_META: digest}}, Config=_transfer_config(),
            )
        except Exception as exc:
            raise self._fail(key, "upload", exc) from None
        return ObjectInfo(key, size, digest)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        digest = hashlib.sha256(data).hexdigest()
        try:
            s3_client().upload_fileobj(
                io.BytesIO(data), self.bucket, self._key(key),
                ExtraArgs={"Metadata": {SHA_META: digest}}, Config=_transfer_config(),
            )
        except Exception as exc:
            raise self._fail(key, "upload", exc) from None
        return ObjectInfo(key, len(data), digest)

    def _recorded_sha(self, key: str) -> str | None:
        try:
            head = s3_client().head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._fail(key, "stat", exc) from None
        # Some servers return user-metadata keys capitalised.
        meta = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
        return meta.get(SHA_META)

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        buf = io.BytesIO()
        try:
            s3_client().download_fileobj(self.bucket, self._key(key), buf, Config=_transfer_config())
        except Exception as exc:
            raise self._fail(key, "download", exc) from None
        data = buf.getvalue()
        expected = sha256 if sha256 is not None else self._recorded_sha(key)
        _check(key, self.uri_for(key), hashlib.sha256(data).hexdigest(), expected)
        return data

    def get_file(self, key: str, path: str | Path, sha256: str | None = None) -> Path:
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            s3_client().download_file(self.bucket, self._key(key), str(tmp), Config=_transfer_config())
            expected = sha256 if sha256 is not None else self._recorded_sha(key)
            _check(key, self.uri_for(key), sha256_file(tmp), expected)
        except StorageError:
            tmp.unlink(missing_ok=True)
            raise
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise self._fail(key, "download", exc) from None
        os.replace(tmp, dest)
        return dest

    def get_range(self, key: str, start: int, end: int) -> bytes:
        check_range(start, end)
        if end == start:
            if not self.exists(key):
                raise StorageError(f"{self.uri_for(key)}: no such artifact")
            return b""
        try:
            # HTTP ranges are inclusive: bytes=start-(end-1).
            resp = s3_client().get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end - 1}")
            return resp["Body"].read()
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
            if code in ("InvalidRange", "416"):
                return b""  # the object ends before `start`
            raise self._fail(key, "ranged read", exc) from None

    def exists(self, key: str) -> bool:
        try:
            s3_client().head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:
            err = self._fail(key, "stat", exc)
            if "no such artifact" in str(err):
                return False
            raise err from None

    def stat(self, key: str) -> ObjectInfo:
        try:
            head = s3_client().head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._fail(key, "stat", exc) from None
        meta = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
        sha = meta.get(SHA_META) or hashlib.sha256(self.get_bytes(key)).hexdigest()
        return ObjectInfo(key, int(head["ContentLength"]), sha)

    def list(self, prefix: str = "") -> Iterator[str]:
        full = join_key(self.prefix, prefix)
        if full:
            full += "/"
        base = f"{self.prefix}/" if self.prefix else ""
        try:
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            keys = [obj["Key"][len(base):] for page in pages for obj in page.get("Contents", [])]
        except Exception as exc:
            raise self._fail(prefix or ".", "list", exc) from None
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        try:
            s3_client().delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._fail(key, "delete", exc) from None


def open_store(uri: str | Path) -> ArtifactStore:
    """`s3://bucket/prefix`, `file:///abs/dir` or a plain local path."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalStore(text)
    raise StorageError(f"{text}: unsupported URI scheme '{parsed.scheme}' (use s3:// or file://)")
