"""The mount's names: paths resolved over the origin's listing, their inode numbers, and the
attributes known for them, cached for ``metadata_ttl_s``.

``/<path>`` on the mount is ``<origin root>/<path>``. Directories are listed from the
origin one level at a time; a file's size, ETag and mtime come from its listing where the
origin's listing carries an mtime, else from a stat (the fetcher's stat cache first).
Within the TTL every lookup is answered from memory, on the FUSE thread.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import xxhash

from ..agent.fetch.fetcher import Fetcher
from ..agent.origin.origin import ObjectInfo
from .bridge import LoopBridge


@dataclass
class Node:
    """What the view knows about one path: from a listing, refined by a stat for files."""

    rel: str
    uri: str
    is_dir: bool
    size: int = 0
    etag: str | None = None
    mtime_ns: int | None = None
    stat_at: float = 0.0  # monotonic time of the last stat (files)


def inode_of(rel: str) -> int:
    """A stable inode number for a path (the same across mounts and restarts)."""
    if not rel:
        return 1
    # A name for a path, not an integrity check, so not manifest.digest (xxh3-128): xxh3-64
    # fits FUSE's 64-bit inode, and inodes stay put should the chunk digest ever change.
    return (xxhash.xxh3_64_intdigest(rel.encode("utf-8", "surrogateescape")) >> 1) | 2


def rel_of(path: str | None) -> str:
    """A FUSE path (``/a/b``) as the view names it (``a/b``; the root is ``""``)."""
    return (path or "/").strip("/")


class Namespace:
    def __init__(self, fetcher: Fetcher, bridge: LoopBridge, metadata_ttl_s: float,
                 mounted_ns: int) -> None:
        self.fetcher = fetcher
        self.origin = fetcher.origin
        self.versions = fetcher.versions
        self.bridge = bridge
        self.ttl_s = metadata_ttl_s
        self.mounted_ns = mounted_ns  # the mtime of what the origin gives none
        self._lock = threading.Lock()
        self._listings: dict[str, tuple[float, dict[str, Node]]] = {}

    def uri(self, rel: str) -> str:
        return f"{self.origin.root}/{rel}" if rel else self.origin.root

    def listing(self, rel_dir: str) -> dict[str, Node]:
        """One directory level, cached for ``metadata_ttl_s``."""
        now = time.monotonic()
        cached = self._listings.get(rel_dir)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        items = self.bridge.call("readdir", self.versions.list_dir(self.uri(rel_dir)))
        nodes = {item["name"]: _node(rel_dir, item, now) for item in items if _named(item)}
        with self._lock:
            self._listings[rel_dir] = (now, nodes)
        return nodes

    def forget(self, rel: str) -> None:
        """Drop what the view knows about ``rel`` (its directory is listed again next time)."""
        with self._lock:
            self._listings.pop(rel.rpartition("/")[0], None)

    def lookup(self, rel: str) -> Node:
        """The node at ``rel``; ENOENT if it does not exist, ENOTDIR if a parent is a file."""
        if not rel:
            return Node("", self.origin.root, True)
        parent, _, name = rel.rpartition("/")
        if parent and not self.lookup(parent).is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        node = self.listing(parent).get(name)
        if node is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        if not node.is_dir and (node.mtime_ns is None or
                                time.monotonic() - node.stat_at >= self.ttl_s):
            self._refresh(node)
        return node

    def _refresh(self, node: Node) -> None:
        """Size, ETag and mtime of a file from the origin (the fetcher's stat cache first)."""
        info: ObjectInfo = self.bridge.call("getattr", self.fetcher.stat(node.uri))
        node.size, node.etag = info.size, info.etag
        node.mtime_ns = int(info.mtime * 1e9) if info.mtime is not None else self.mounted_ns
        node.stat_at = time.monotonic()


def _named(item: dict[str, Any]) -> bool:
    """A listing item the mount can show (a name that is one path component)."""
    name = item["name"]
    return bool(name) and name not in (".", "..") and "/" not in name


def _node(rel_dir: str, item: dict[str, Any], now: float) -> Node:
    name = item["name"]
    mtime = item.get("mtime")  # when the origin's listing carries it, no HEAD is needed
    return Node(f"{rel_dir}/{name}" if rel_dir else name, item["uri"], item["type"] == "directory",
                int(item.get("size") or 0), item.get("etag"),
                int(mtime * 1e9) if mtime is not None else None,
                now if mtime is not None else 0.0)
