"""The BitTorrent view of one cache entry, and who fetches which chunk from the origin. Pure.

One torrent per cache entry: a single-file torrent whose one file is the entry's data
file (``<entry>/data``, the file's bytes at their own offsets) and whose pieces are the
chunks, so libtorrent reads and writes the very bytes the cache holds::

    info = {"coldbrew-key": <FileIdentity.key()>, "name": "data", "piece length": chunk_size,
            "length": size, "pieces": sha1_0 + sha1_1 + ...}

Every agent builds the info dict from the same manifest (identity, chunk size, SHA-1
per chunk), so they all agree on the info-hash without talking. ``coldbrew-key`` is
an extra info key (clients keep unknown keys and hash them): the same bytes under two
URIs are still two torrents, never "already in session" with the other entry's files.

Striping: when several agents want a file nobody has yet, chunk ``i`` is fetched from
the origin by one of them only, :func:`stripe_owner`, and the others take it from that
one — so N agents pull each byte from the origin about once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ..core.manifest import Manifest

#: The name of the torrent's one file: the data file inside a cache entry (store.DATA_FILE).
TORRENT_FILE = "data"


def bencode(value: Any) -> bytes:
    """Canonical bencoding (dict keys sorted as raw bytes, as BEP 3 requires)."""
    if isinstance(value, bool):
        raise TypeError("bencode has no booleans")
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, (bytes, bytearray)):
        return b"%d:%s" % (len(value), bytes(value))
    if isinstance(value, list):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    if isinstance(value, dict):
        items = sorted((k.encode() if isinstance(k, str) else bytes(k), v) for k, v in value.items())
        return b"d" + b"".join(bencode(k) + bencode(v) for k, v in items) + b"e"
    raise TypeError(f"cannot bencode {type(value).__name__}")


def info_dict(manifest: Manifest, ca_pem: bytes | None = None) -> dict[str, Any]:
    """The info dict; with ``ca_pem`` an SSL torrent (libtorrent talks TLS, to holders of a
    certificate signed by that CA only, :mod:`.tls`) — a different info-hash, so agents with
    and without TLS never share a swarm."""
    if not manifest.shareable:
        raise ValueError(f"{manifest.identity.uri}: piece hashes unknown; cannot build its torrent")
    layout = manifest.layout
    if layout.count == 0:
        raise ValueError(f"{manifest.identity.uri} is empty; there is nothing to share")
    info: dict[str, Any] = {
        "coldbrew-key": manifest.identity.key(),
        "name": TORRENT_FILE,
        "piece length": manifest.chunk_size,
        "length": layout.size,
        "pieces": b"".join(bytes.fromhex(h) for h in manifest.sha1s if h is not None),
    }
    if ca_pem:
        info["ssl-cert"] = ca_pem
    return info


def torrent_bytes(manifest: Manifest, ca_pem: bytes | None = None) -> bytes:
    """The .torrent (metainfo) for ``manifest``: just the info dict, no trackers."""
    return bencode({"info": info_dict(manifest, ca_pem)})


def info_hash(manifest: Manifest, ca_pem: bytes | None = None) -> str:
    return hashlib.sha1(bencode(info_dict(manifest, ca_pem))).hexdigest()


def salt(key: str) -> int:
    """Per-file rotation of the stripes, so no agent owns chunk 0 of every file."""
    return int(key[:8], 16)


def stripe_owner(index: int, key: str, members: Sequence[bytes]) -> bytes:
    """The member that fetches chunk ``index`` from the origin (members: peer ids, any order)."""
    if not members:
        raise ValueError("no members")
    ordered = sorted(members)
    return ordered[(index + salt(key)) % len(ordered)]
