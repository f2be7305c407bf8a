"""One cached file as the store knows it in memory: its chunks present, their digests, and
what readers may take on trust. The disk (:mod:`.layout`) is the truth; this is its index.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.manifest import ChunkLayout, FileIdentity, Manifest

#: The file in each entry holding its bytes (also the name of its torrent's one file).
DATA_FILE = "data"

_stamps = itertools.count(1)


def new_stamp() -> int:
    """A number never handed out before in this process (see :attr:`Entry.stamps`)."""
    return next(_stamps)


@dataclass
class Entry:
    """One cached file: what is known about its chunks (in memory; disk is the truth)."""

    identity: FileIdentity
    chunk_size: int
    path: Path
    digests: dict[int, str] = field(default_factory=dict)  # every digest ever verified
    present: set[int] = field(default_factory=set)  # chunks journaled present in the data file
    sha1s: dict[int, str] = field(default_factory=dict)  # piece hashes known (P2P)
    last_used: float = 0.0
    #: Per present chunk, a number that is new each time its bytes land: a reader that checked
    #: a chunk remembers the stamp it checked (the FUSE view), and checks again when it changes.
    stamps: dict[int, int] = field(default_factory=dict)
    #: The data file's mtime after the store's (or libtorrent's adopted) last write: a later
    #: mtime means someone else wrote the file, and checks remembered for it are void.
    data_mtime_ns: int = 0
    #: Chunks whose bytes in the data file this process wrote from memory that matched the
    #: digest, or hashed in place: good unless someone else writes the file (``distrust``).
    known_good: set[int] = field(default_factory=set)

    @property
    def key(self) -> str:
        return self.identity.key()

    @property
    def layout(self) -> ChunkLayout:
        return ChunkLayout(self.identity.size, self.chunk_size)

    @property
    def cached_bytes(self) -> int:
        layout = self.layout
        return sum(layout.length(i) for i in self.present)

    @property
    def complete(self) -> bool:
        return len(self.present) == self.layout.count

    @property
    def data_path(self) -> Path:
        """The file holding this entry's bytes, chunk ``i`` at ``i * chunk_size``."""
        return self.path / DATA_FILE

    def offset(self, index: int) -> int:
        return index * self.chunk_size

    def manifest(self) -> Manifest:
        """What is known so far: digests and piece hashes of the chunks seen."""
        count = self.layout.count
        return Manifest(self.identity, self.chunk_size,
                        [self.digests.get(i) for i in range(count)],
                        [self.sha1s.get(i) for i in range(count)])

    def note_own_write(self, st: os.stat_result) -> None:
        """The data file as it stands after a write of ours (``st``: its stat then)."""
        # max(): writers finish in any order; an older mtime recorded last would only cost a recheck.
        self.data_mtime_ns = max(self.data_mtime_ns, st.st_mtime_ns)
