"""Which files to evict to make room: least recently used first, whole files. Pure.

File granularity because a model is used whole: evicting half of every file
would leave nothing loadable. Files in use (open, being loaded or fetched) are
never chosen; if they are all that is left, the caller gets fewer bytes than it
asked for and decides what that means (usually: serve from origin, uncached).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    key: str
    bytes: int
    last_used: float
    pinned: bool


def capacity_bytes(size_limit: int, used: int, free_on_disk: int, reserve: int) -> int:
    """How many bytes the cache may hold now: its own limit, and never eat into the reserve.

    ``used + free_on_disk`` is what the cache could grow to if it owned the whole
    disk's free space; the reserve keeps room for everything else on the node.
    """
    return max(0, min(size_limit, used + free_on_disk - reserve))


def choose_victims(candidates: Iterable[Candidate], need_bytes: int) -> list[Candidate]:
    """Unpinned files, oldest use first, until their bytes add up to ``need_bytes``."""
    if need_bytes <= 0:
        return []
    chosen: list[Candidate] = []
    freed = 0
    for c in sorted(candidates, key=lambda c: (c.last_used, c.key)):
        if c.pinned or c.bytes == 0:
            continue
        chosen.append(c)
        freed += c.bytes
        if freed >= need_bytes:
            break
    return chosen
