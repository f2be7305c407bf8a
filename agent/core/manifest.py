"""Chunk maths, object identity and per-file manifests. Pure: no I/O here.

A model file is identified by (URI, ETag, size) — a changed object is a new
file, so chunks of two versions can never be mixed. The file is cut into
fixed-size chunks (the last one shorter); each chunk's xxh3-128 digest is
recorded in the file's :class:`Manifest` and checked whenever the chunk is read
from disk (or, later, from a peer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import xxhash

MANIFEST_FORMAT = 1
SIDECAR_DIR = ".coldbrew"


def digest(data: bytes | bytearray | memoryview) -> str:
    """The chunk digest: xxh3-128, hex. ~10 GB/s, so checking every read is cheap."""
    return xxhash.xxh3_128_hexdigest(data)


def digester() -> xxhash.xxh3_128:
    """The chunk digest computed piece by piece: ``update()`` each, then ``hexdigest()``."""
    return xxhash.xxh3_128()


@dataclass(frozen=True)
class FileIdentity:
    """Which bytes a cache entry holds. Equal identities ⇔ identical bytes."""

    uri: str
    etag: str
    size: int

    def key(self) -> str:
        """A short, filesystem-safe, collision-resistant name for this identity."""
        return xxhash.xxh3_128_hexdigest(f"{self.uri}\0{self.etag}\0{self.size}".encode())


@dataclass(frozen=True)
class ChunkLayout:
    """How a file of ``size`` bytes is cut into chunks of ``chunk_size`` bytes."""

    size: int
    chunk_size: int

    def __post_init__(self) -> None:
        if self.size < 0 or self.chunk_size <= 0:
            raise ValueError(f"bad layout: size={self.size} chunk_size={self.chunk_size}")

    @property
    def count(self) -> int:
        return -(-self.size // self.chunk_size)

    def bounds(self, index: int) -> tuple[int, int]:
        """Byte range [start, end) of chunk ``index``."""
        if not 0 <= index < self.count:
            raise IndexError(f"chunk {index} outside 0..{self.count - 1}")
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.size)

    def length(self, index: int) -> int:
        start, end = self.bounds(index)
        return end - start

    def chunks_for(self, offset: int, length: int) -> range:
        """Indexes of the chunks that hold bytes [offset, offset+length), clipped to the file."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return range(0)
        return range(offset // self.chunk_size, (end - 1) // self.chunk_size + 1)


@dataclass
class Manifest:
    """Per-file facts the cache needs: identity, layout and the known chunk digests.

    ``digests[i]`` is None until chunk ``i`` has been fetched once (or the
    manifest was published with every digest known in advance).
    """

    identity: FileIdentity
    chunk_size: int
    digests: list[str | None] = field(default_factory=list)
    #: SHA-1 per chunk (hex): the BitTorrent v1 piece hashes, so peers can share the file.
    sha1s: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        count = self.layout.count
        self.digests = self.digests or [None] * count
        self.sha1s = self.sha1s or [None] * count
        for name, values, width in (("digests", self.digests, 32), ("sha1", self.sha1s, 40)):
            if len(values) != count:
                raise ValueError(f"manifest for {self.identity.uri} has {len(values)} "
                                 f"{name} for {count} chunks")
            if any(v is not None and (len(v) != width or not _is_hex(v)) for v in values):
                raise ValueError(f"manifest for {self.identity.uri}: malformed {name} entry")

    @property
    def layout(self) -> ChunkLayout:
        return ChunkLayout(self.identity.size, self.chunk_size)

    @property
    def complete(self) -> bool:
        return all(d is not None for d in self.digests)

    @property
    def shareable(self) -> bool:
        """Every piece hash is known: the torrent can be built and offered to peers."""
        return all(h is not None for h in self.sha1s)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "uri": self.identity.uri,
            "etag": self.identity.etag,
            "size": self.identity.size,
            "chunk_size": self.chunk_size,
            "digests": self.digests,
            "sha1": self.sha1s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unsupported manifest format {data.get('format')!r}")
        identity = FileIdentity(str(data["uri"]), str(data["etag"]), int(data["size"]))
        return cls(identity, int(data["chunk_size"]), list(data["digests"]),
                   list(data.get("sha1") or []))

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def sidecar_uri(uri: str) -> str:
    """Where ``coldbrew publish`` puts the manifest of ``uri``: a ``.coldbrew/`` folder beside it.

    ``s3://b/llama/model.safetensors`` → ``s3://b/llama/.coldbrew/model.safetensors.manifest.json``
    """
    head, _, name = uri.rpartition("/")
    if not name or "://" not in uri or head.endswith(":/"):
        raise ValueError(f"{uri!r} does not name an object")
    return f"{head}/{SIDECAR_DIR}/{name}.manifest.json"


def is_sidecar(uri_or_path: str) -> bool:
    """True for anything inside a ``.coldbrew/`` sidecar folder (hidden from listings)."""
    return f"/{SIDECAR_DIR}/" in uri_or_path or uri_or_path.startswith(f"{SIDECAR_DIR}/")


def parse_journal(lines: Iterable[bytes], count: int, width: int = 32) -> dict[int, str]:
    """Read a digest journal: one ``<index> <digest>`` line per completed chunk.

    A torn last line (a crash mid-append) or a line that does not parse is
    ignored: that chunk is simply treated as absent and fetched again.
    """
    out: dict[int, str] = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or len(parts[1]) != width:
            continue
        index = int(parts[0])
        if 0 <= index < count:
            out[index] = parts[1].decode("ascii", "replace")
    return out


def journal_line(index: int, chunk_digest: str) -> bytes:
    return f"{index} {chunk_digest}\n".encode()


#: The journal's word for "this chunk's bytes are gone" (corrupt, unreadable, or refused).
DROPPED = "-"


def drop_line(index: int) -> bytes:
    return f"{index} {DROPPED}\n".encode()


def replay_journal(lines: Iterable[bytes], count: int) -> tuple[dict[int, str], set[int]]:
    """Replay a cache entry's chunk journal: ``<index> <digest>`` when a chunk landed in the
    data file, ``<index> -`` when it was dropped. Returns (the last digest verified per chunk,
    the chunks present now). Lines that do not parse (a torn tail) are ignored.
    """
    digests: dict[int, str] = {}
    present: set[int] = set()
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        index, word = int(parts[0]), parts[1].decode("ascii", "replace")
        if not 0 <= index < count:
            continue
        if word == DROPPED:
            present.discard(index)
        elif len(word) == 32:
            digests[index] = word
            present.add(index)
    return digests, present
