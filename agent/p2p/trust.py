"""A member's manifest on probation: checked end to end against the origin before it counts.

The piece hashes a peer's manifest names are what every chunk from peers is verified
against, so a lying member would have its own altered bytes pass. While such a manifest
is unchecked (:class:`Probation`), the agent uses it to fetch but does not keep it, does
not offer it to others, marks the entry so that a restart drops its chunks, and hashes the
file's bytes in order as they land (:func:`advance`) against what the origin vouches for
(:mod:`coldbrew.agent.core.vouch`). When the last byte is in, the verdict:

* match: the manifest is kept and offered like one built here;
* mismatch: the entry's chunks and every digest they brought are dropped, the member is
  banned and counted, and the file comes from the origin again (the caller does that).

Readers of the FUSE view may see bytes of an unchecked file before the verdict; the loader
asks for the verdict before it hands tensors over (docs/security.md, Manifests).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..cache.entry import Entry
from ..core.manifest import Manifest
from ..core.vouch import FileCheck, Vouch

#: Bytes hashed per read of the data file (the chunks just landed: the page cache has them).
READ_BYTES = 4 << 20
#: How often the check looks for newly landed chunks while the file fills.
POLL_S = 0.05


@dataclass(eq=False)
class Probation:
    """A manifest from member ``member`` for ``entry``, until the origin's word settles it."""

    entry: Entry
    manifest: Manifest
    member: str
    vouch: Vouch
    check: FileCheck = field(init=False)
    verdict: asyncio.Future[bool | None] = field(init=False)
    #: The origin's own bytes of a chunk failed the manifest's piece hash: proven false.
    refuted: bool = False

    def __post_init__(self) -> None:
        self.check = FileCheck(self.vouch)
        self.verdict = asyncio.get_running_loop().create_future()

    @property
    def what(self) -> str:
        return f"the origin's {self.vouch.source} of {self.entry.identity.uri}"


def advance(p: Probation) -> bool:
    """Hash the file's bytes from where the check stands for as long as its chunks are in
    the cache, in order. True once every byte has been hashed. Blocking (a worker thread)."""
    check, entry = p.check, p.entry
    layout = entry.layout
    if check.done:
        return True
    fd = os.open(entry.data_path, os.O_RDONLY)
    try:
        while not check.done:
            index = check.offset // layout.chunk_size
            if index not in entry.present:
                return False  # not landed yet: the next round goes on from here
            end = min(layout.bounds(index)[1], check.offset + READ_BYTES)
            data = os.pread(fd, end - check.offset, check.offset)
            if len(data) != end - check.offset:
                return False  # the data file is shorter than its chunks: try again
            check.feed(data)
    finally:
        os.close(fd)
    return True


async def settle(p: Probation, alive: Callable[[], bool]) -> bool | None:
    """Hash ``p``'s file as it fills; the verdict once it is whole, None if ``alive()``
    turns false first (the entry left the cache, or sharing stopped)."""
    while alive():
        if await asyncio.to_thread(advance, p):
            return p.check.matches()
        await asyncio.sleep(POLL_S)
    return None

