"""The one integrity check: do a chunk's bytes match the digest recorded for them?

Every reader of cached bytes asks it here — the store before it serves a chunk, the FUSE
view before it maps a data file, the CLI's ``coldbrew get`` and the loader before they copy
from the agent's data file — so "intact" means one thing everywhere; the store also hashes
a chunk a peer wrote in place with :func:`digest_at` before it adopts it. The digest itself
is :func:`coldbrew.agent.core.manifest.digest` (which the store also uses to *record* the
digest of a fresh chunk); this module only compares against it.

An unknown digest (``None``) is never intact: a chunk nobody has verified is not served as
verified. Hashing a file's range goes through a read-only mmap: no copy and no buffer to
allocate (on these VMs fresh memory is the expensive part), and the pages it faults in are
the ones the next reader wants anyway.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable

from ..core.manifest import digest, digester

Buffer = bytes | bytearray | memoryview


def intact(data: Buffer, expected: str | None) -> bool:
    """True if ``data`` is the chunk whose digest is ``expected``."""
    return expected is not None and digest(data) == expected


def intact_pieces(pieces: Iterable[Buffer], expected: str | None) -> bool:
    """:func:`intact` for a chunk held in several buffers, in order (no join, no copy)."""
    if expected is None:
        return False
    h = digester()
    for piece in pieces:
        h.update(piece)
    return h.hexdigest() == expected


def digest_at(fd: int, offset: int, length: int) -> str | None:
    """The digest of the ``length`` bytes at ``offset`` of open file ``fd``; None if the file
    is too short to hold them. Raises OSError if the file cannot be read."""
    if os.fstat(fd).st_size < offset + length:
        return None
    if length == 0:
        return digest(b"")
    skew = offset % mmap.ALLOCATIONGRANULARITY  # a map starts on a page; a chunk need not
    with mmap.mmap(fd, length + skew, access=mmap.ACCESS_READ, offset=offset - skew) as m:
        if not skew:
            return digest(m)
        with memoryview(m) as whole, whole[skew:] as part:
            return digest(part)


def intact_at(fd: int, offset: int, length: int, expected: str | None) -> bool:
    """True if the chunk at ``offset`` of open file ``fd`` matches ``expected``; a file too
    short or unreadable is not intact."""
    if expected is None:
        return False
    try:
        return digest_at(fd, offset, length) == expected
    except OSError:
        return False
