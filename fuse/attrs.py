"""The attributes the mount shows, as mfusepy wants them (times in integer nanoseconds). Pure.

Everything is read-only (directories 0555, files 0444), owned by the agent's uid/gid;
a time the origin does not give is the mount's own start.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Any

from ..agent.origin.origin import ObjectInfo
from .namespace import Node, inode_of


@dataclass(frozen=True)
class Attributes:
    uid: int
    gid: int
    mounted_ns: int  # the time shown where the origin gives none
    chunk_size: int  # a file's preferred I/O size follows the cache's chunks

    def of(self, rel: str, is_dir: bool, size: int = 0, mtime_ns: int | None = None) -> dict[str, Any]:
        t = mtime_ns if mtime_ns is not None else self.mounted_ns
        common = {"st_ino": inode_of(rel), "st_uid": self.uid, "st_gid": self.gid,
                  "st_atime": t, "st_mtime": t, "st_ctime": t}
        if is_dir:
            return {**common, "st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_size": 0}
        return {**common, "st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": size,
                "st_blocks": (size + 511) // 512, "st_blksize": min(self.chunk_size, 1 << 20)}

    def of_node(self, node: Node) -> dict[str, Any]:
        return self.of(node.rel, node.is_dir, node.size, node.mtime_ns)

    def of_version(self, rel: str, info: ObjectInfo) -> dict[str, Any]:
        """A file as one version of it (the one an open file is pinned to)."""
        return self.of(rel, False, info.size, int(info.mtime * 1e9) if info.mtime is not None else None)

    @staticmethod
    def listing(rel: str, nodes: dict[str, Node]) -> list[Any]:
        """``readdir``'s answer for directory ``rel`` holding ``nodes``."""
        out: list[Any] = [(".", {"st_mode": stat.S_IFDIR, "st_ino": inode_of(rel)}, 0),
                          ("..", {"st_mode": stat.S_IFDIR}, 0)]
        for name, node in sorted(nodes.items()):
            mode = stat.S_IFDIR if node.is_dir else stat.S_IFREG
            out.append((name, {"st_mode": mode, "st_ino": inode_of(node.rel)}, 0))
        return out

    def statfs(self, used_bytes: int) -> dict[str, int]:
        bsize = self.chunk_size
        return {"f_bsize": bsize, "f_frsize": bsize, "f_blocks": -(-used_bytes // bsize),
                "f_bfree": 0, "f_bavail": 0, "f_files": 0, "f_ffree": 0, "f_namemax": 1024}
