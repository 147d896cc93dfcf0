"""Shards: plain POSIX (ustar) tar files in the webdataset convention, plus a JSON index per shard.

`shard-000000.tar` holds each sample's members as consecutive entries `{key}.{name}`; any tar tool or the
webdataset library reads it. Beside it, `shard-000000.idx.json` records each sample's byte span in the tar
and the sha256 of that span, so a reader can fetch one sample with one ranged read (`ArtifactStore.get_range`:
an S3 `Range` GET or a local seek) and verify it on its own: a corrupt or truncated sample is detected and skipped
without losing the shard.
Tars are written deterministically (mtime 0, uid/gid 0, fixed member order), so the same samples give the
same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from interiorfusion_data.format import INDEX_FORMAT, EncodedSample, SampleError

BLOCK = 512


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".idx.json"


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def tar_header(name: str, size: int) -> bytes:
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name too long for ustar: {name}")
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = _octal(0o644, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(0, 12)
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    chk = sum(h)
    h[148:156] = f"{chk:06o}".encode() + b"\0 "
    return bytes(h)


def sample_tar_bytes(sample: EncodedSample) -> bytes:
    """The tar entries of one sample (headers, data, padding), in member order."""
    parts = []
    for name, data in sample.members.items():
        parts.append(tar_header(f"{sample.key}.{name}", len(data)))
        parts.append(data)
        pad = (-len(data)) % BLOCK
        if pad:
            parts.append(b"\0" * pad)
    return b"".join(parts)


class ShardWriter:
    """Appends samples to a local tar file and records their spans for the index."""

    def __init__(self, path: Path, shard: str):
        self.path = Path(path)
        self.shard = shard
        self._f: BinaryIO = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._sha = hashlib.sha256()
        self._offset = 0
        self.samples: list[dict[str, Any]] = []

    def add(self, sample: EncodedSample) -> None:
        data = sample_tar_bytes(sample)
        self._f.write(data)
        self._sha.update(data)
        self.samples.append({"key": sample.key, "offset": self._offset, "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest(), **sample.index})
        self._offset += len(data)

    def close(self) -> dict[str, Any]:
        # End of archive: two zero blocks, padded to tar's 10 KiB record size like GNU tar.
        end = b"\0" * (2 * BLOCK)
        total = self._offset + len(end)
        end += b"\0" * ((-total) % 10240)
        self._f.write(end)
        self._sha.update(end)
        self._f.close()
        return {"format": INDEX_FORMAT, "shard": self.shard, "size": self._offset + len(end),
                "sha256": self._sha.hexdigest(), "samples": self.samples}


def parse_members(data: bytes, where: str = "") -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the tar entries in `data`; stops at an end-of-archive block. Raises SampleError on a
    damaged header (bad checksum), a truncated entry or a non-file entry."""
    pos, n = 0, len(data)
    while pos + BLOCK <= n:
        h = data[pos:pos + BLOCK]
        if h == b"\0" * BLOCK:
            return
        try:
            stored = int(h[148:156].split(b"\0")[0].strip() or b"0", 8)
            size = int(h[124:136].split(b"\0")[0].strip() or b"0", 8)
        except ValueError:
            raise SampleError(f"{where}: damaged tar header at byte {pos}") from None
        if stored != sum(h[:148]) + 32 * 8 + sum(h[156:]):
            raise SampleError(f"{where}: tar header checksum mismatch at byte {pos}")
        if h[156:157] not in (b"0", b"\0"):
            raise SampleError(f"{where}: unexpected tar entry type {h[156:157]!r} at byte {pos}")
        name = h[0:100].split(b"\0")[0].decode(errors="replace")
        start = pos + BLOCK
        if start + size > n:
            raise SampleError(f"{where}: entry '{name}' is truncated ({n - start} of {size} bytes)")
        yield name, data[start:start + size]
        pos = start + size + (-size) % BLOCK
    if pos < n:
        raise SampleError(f"{where}: {n - pos} trailing bytes do not form a tar block")


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the basename up to its first dot; the member name is the rest."""
    directory, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot:
        raise SampleError(f"tar entry '{name}' has no extension")
    return (f"{directory}/{key}" if directory else key), ext


def sample_members(data: bytes, key: str, where: str = "") -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for name, blob in parse_members(data, where):
        k, ext = split_key(name)
        if k != key:
            raise SampleError(f"{where}: entry '{name}' belongs to sample '{k}', not '{key}'")
        members[ext] = blob
    if not members:
        raise SampleError(f"{where}: sample '{key}' has no entries")
    return members


def iter_tar_samples(data: bytes, where: str = "") -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a whole shard (no index needed): (key, members) per sample, in order."""
    current: str | None = None
    members: dict[str, bytes] = {}
    for name, blob in parse_members(data, where):
        key, ext = split_key(name)
        if key != current and current is not None:
            yield current, members
            members = {}
        current = key
        members[ext] = blob
    if current is not None:
        yield current, members
