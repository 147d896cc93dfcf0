"""Artifact store over file:// and a real S3 server (rclone serve s3 on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from interiorfusion_core.errors import ChecksumError, StorageError
from interiorfusion_core.storage import LocalStore, S3Store, open_store, validate_key


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/", "..", "a\\b"])
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(StorageError, match="invalid artifact key"):
        validate_key(key)


def test_uri_parsing(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path.as_uri()), LocalStore)
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    s3 = open_store("s3://bucket/some/prefix")
    assert isinstance(s3, S3Store) and s3.bucket == "bucket" and s3.prefix == "some/prefix"
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        open_store("gs://bucket/x")


def _exercise(store) -> None:
    info = store.put_bytes("a/b/c.bin", b"hello")
    assert info.sha256 == hashlib.sha256(b"hello").hexdigest() and info.size == 5
    assert store.get_bytes("a/b/c.bin", info.sha256) == b"hello"
    assert store.exists("a/b/c.bin") and not store.exists("a/b/missing")
    store.put_json("a/x.json", {"k": 1})
    assert store.get_json("a/x.json") == {"k": 1}
    assert list(store.list("a")) == ["a/b/c.bin", "a/x.json"]
    child = store.child("a")
    assert child.get_bytes("b/c.bin") == b"hello"
    assert store.stat("a/b/c.bin").sha256 == info.sha256
    with pytest.raises(ChecksumError, match="a/b/c.bin"):
        store.get_bytes("a/b/c.bin", "0" * 64)
    with pytest.raises(StorageError, match="no such artifact"):
        store.get_bytes("nope")
    store.delete_prefix("a")
    assert list(store.list()) == []


def test_local_store(tmp_path: Path) -> None:
    _exercise(LocalStore(tmp_path / "store"))


DATA = bytes(range(256)) * 4  # 1 KiB, every offset distinguishable


def _ranges(store) -> None:
    """get_range(key, start, end) is bytes [start, end): `end` exclusive, like a slice."""
    store.put_bytes("r/blob.bin", DATA)
    for start, end in [(0, 1), (3, 7), (0, len(DATA)), (1000, 1024), (255, 513), (10, 10)]:
        assert store.get_range("r/blob.bin", start, end) == DATA[start:end], (start, end)
    assert store.child("r").get_range("blob.bin", 5, 9) == DATA[5:9]
    assert store.get_range("r/blob.bin", 1020, 2000) == DATA[1020:]  # past the end: what there is
    assert store.get_range("r/blob.bin", 5000, 5010) == b""  # starts past the end: nothing
    with pytest.raises(StorageError, match="no such artifact"):
        store.get_range("r/missing.bin", 0, 4)
    with pytest.raises(StorageError, match="no such artifact"):
        store.get_range("r/missing.bin", 0, 0)
    with pytest.raises(ValueError, match="invalid byte range"):
        store.get_range("r/blob.bin", 8, 4)
    with pytest.raises(ValueError, match="invalid byte range"):
        store.get_range("r/blob.bin", -1, 4)


def test_local_store_range_reads(tmp_path: Path) -> None:
    _ranges(LocalStore(tmp_path / "store"))


def test_range_reads_through_a_wrapping_store(tmp_path: Path) -> None:
    from interiorfusion_core.contract import RecordingStore

    # ArtifactStore's fallback (slice of the whole object) until RecordingStore passes get_range through
    _ranges(RecordingStore(LocalStore(tmp_path / "store")))


def test_local_store_never_leaves_partial_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    def broken():
        yield b"part"
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="write failed"):
        store._publish("x.bin", broken)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.servers
def test_s3_store(s3_env: str) -> None:
    _exercise(open_store(s3_env))


@pytest.mark.servers
def test_s3_store_range_reads(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from interiorfusion_core import storage

    store = open_store(s3_env)
    _ranges(store)
    client = storage.s3_client()
    sent: list[str] = []
    real = client.get_object

    def get_object(**kwargs):
        sent.append(kwargs.get("Range"))
        return real(**kwargs)

    monkeypatch.setattr(client, "get_object", get_object)
    assert store.get_range("r/blob.bin", 3, 7) == DATA[3:7]
    assert sent == ["bytes=3-6"]  # one ranged GET; HTTP ranges are inclusive


def _child_session_reuse(queue: Any, bucket: str) -> None:
    from interiorfusion_core import storage

    sessions = len(storage._S3_SESSIONS)
    clients = len(storage._S3_CLIENTS)
    client = storage.s3_client()
    client.head_bucket(Bucket=bucket)  # its own connections work
    queue.put((len(storage._S3_SESSIONS) - sessions, id(storage._S3_SESSIONS[storage._credentials()]),
               len(storage._S3_CLIENTS) - clients, id(client)))


@pytest.mark.servers
def test_a_forked_worker_takes_the_parents_unused_spare_client(s3_env: str) -> None:
    """A DataLoader worker is forked afresh every epoch: it builds no session and no client, but takes the spare
    its parent built beside its own and never used (so no connection is shared across the fork); the parent
    keeps its spare for the next fork."""
    import multiprocessing

    from interiorfusion_core import storage

    bucket = s3_env.removeprefix("s3://").split("/")[0]
    parent = storage.s3_client()
    parent.head_bucket(Bucket=bucket)  # the parent's own client has connected
    session_id = id(storage._S3_SESSIONS[storage._credentials()])
    spares = [c for pid, c in storage._S3_SPARES.values() if pid == os.getpid()]
    assert len(spares) >= 1 and all(c is not parent for c in spares)
    ctx = multiprocessing.get_context("fork")
    for _ in range(2):  # two epochs' workers: the same spare serves both
        queue = ctx.Queue()
        proc = ctx.Process(target=_child_session_reuse, args=(queue, bucket))
        proc.start()
        new_sessions, child_session_id, new_clients, child_client = queue.get(timeout=60)
        proc.join(60)
        assert proc.exitcode == 0
        assert new_sessions == 0 and child_session_id == session_id  # the parent's session, inherited
        assert new_clients == 1  # the child's own entry (its pid is part of the client's key) ...
        assert child_client in {id(c) for c in spares} and child_client != id(parent)  # ... the unused spare
    assert storage.s3_client() is parent


@pytest.mark.servers
def test_s3_corrupted_object_names_the_key(s3_env: str, s3_server) -> None:
    store = open_store(s3_env)
    info = store.put_bytes("shards/shard-000000.tar", os.urandom(4096))
    # Flip a bit on the server's disk behind its back, keeping the modification time (silent bit rot).
    path = s3_server.root / s3_server.bucket / store.prefix / "shards/shard-000000.tar"
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ChecksumError, match=r"checksum mismatch for 'shards/shard-000000\.tar'"):
        store.get_bytes("shards/shard-000000.tar", info.sha256)
    # Without a manifest's sha256 the object's own recorded sha256 (metadata) still catches it.
    with pytest.raises(ChecksumError):
        store.get_bytes("shards/shard-000000.tar")
    with pytest.raises(ChecksumError):
        store.get_file("shards/shard-000000.tar", s3_server.root.parent / "dl.bin")
    assert not (s3_server.root.parent / "dl.bin").exists()


@pytest.mark.servers
def test_s3_missing_bucket_is_one_sentence(s3_env: str) -> None:
    with pytest.raises(StorageError, match="does not exist|no such artifact|failed"):
        open_store("s3://no-such-bucket-xyz/p").put_bytes("k", b"x")


@pytest.mark.servers
@pytest.mark.slow
def test_s3_200mb_multipart_round_trip(s3_env: str, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for i in range(200):
            chunk = block[i:] + block[:i]
            h.update(chunk)
            f.write(chunk)
    store = open_store(s3_env)
    info = store.put_file("big/blob.bin", src)
    assert info.size == 200 << 20 and info.sha256 == h.hexdigest()
    dest = store.get_file("big/blob.bin", tmp_path / "back.bin", info.sha256)
    assert dest.stat().st_size == 200 << 20
    assert store.stat("big/blob.bin").sha256 == h.hexdigest()
