"""The seam between the fetcher and the places a chunk can come from.

The fetcher asks its sources in order — the cache, then the peers when P2P is on, then
the origin — for one chunk of an :class:`OpenFile` (a :class:`ChunkRequest`). Each
answers with an :class:`Outcome`, or with the chunk's bytes when it fetched them but the
cache could not keep them. The outcomes are the whole protocol between the sources:

* ``PRESENT``: the chunk is in the cache now.
* ``PASS``: not from me; ask the next source.
* ``GAVE_UP``: I tried and failed (peers too slow, or gone): the sources after me must
  serve it with no second thoughts (:attr:`ChunkRequest.final`).
* ``OWNED_ELSEWHERE``: while this request waited for an origin slot, the chunk became
  another agent's to fetch: ask the sources again from the first (a new round).

A source that shares a file with other agents also tells the origin step how to treat
its chunks (:class:`SharedChunk`, set on the request): whether a chunk is still this
agent's to fetch once a slot is free, and where the origin's bytes go instead of the store.
This module defines those interfaces; the peer side implements them in ``agent/p2p``,
which this package never imports.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Protocol

from ..cache.store import ChunkStore, Entry
from ..origin.origin import ObjectInfo
from .slots import Waiter


class Priority(IntEnum):
    """Lower is sooner."""

    READ = 0  # a reader is blocked on this chunk
    PREFETCH = 5  # a reader will want it soon
    PREWARM = 10  # someone wants it on this node eventually


@dataclass(frozen=True)
class OpenFile:
    """A file pinned to one version (ETag) and its cache entry."""

    info: ObjectInfo
    entry: Entry


class Outcome(Enum):
    """What a source did with a request (the module docstring says what each one asks next)."""

    PRESENT = "present"
    PASS = "pass"
    GAVE_UP = "gave up"
    OWNED_ELSEWHERE = "owned elsewhere"


#: A source's answer: an outcome, or the chunk itself (fetched, but the cache could not keep it).
Answer = Outcome | bytes


class SharedChunk(Protocol):
    """A chunk of a file shared with other agents, as the origin step must treat it."""

    def still_mine(self) -> bool:
        """Once an origin slot is free: is this agent still the one to fetch the chunk?"""
        ...

    def still_shared(self) -> bool:
        """After the origin read: is the file still shared (else its bytes go to the store)?"""
        ...

    async def put(self, piece: bytes) -> None:
        """Take the origin's bytes of the chunk into the cache through the sharing side.

        Raises :class:`~coldbrew.agent.errors.CacheError` if they could not be cached (then
        they are served from memory) and :class:`~coldbrew.agent.errors.ObjectChanged` if
        they do not match what the file's sharers agreed on.
        """
        ...


@dataclass(eq=False)
class ChunkRequest:
    """One fetch of chunk ``index``: shared by every source and round it goes through."""

    file: OpenFile
    index: int
    priority: Priority
    #: When the fetch began (its chunk_fetch_seconds run from here, whoever serves it).
    started: float = field(default_factory=time.monotonic)
    #: Its place in the origin slot queue, boosted when a more urgent caller joins the fetch.
    waiters: list[Waiter] = field(default_factory=list)
    #: No source may send it back: peers gave up on it, or this is the last round.
    final: bool = False
    #: Set by a source that shares the file with other agents (see :class:`SharedChunk`).
    shared: SharedChunk | None = None


class ChunkSource(ABC):
    """One place chunks come from. Besides answering requests, a source hears when a file
    is opened and when its cache entry becomes whole (the peer side shares it then)."""

    #: Names the source in logs.
    name: str = "source"

    @abstractmethod
    async def get(self, request: ChunkRequest) -> Answer:
        """Try to make ``request``'s chunk present (see :class:`Outcome`)."""

    def prepare(self, f: OpenFile) -> None:  # noqa: B027 - a hook most sources need not hear
        """``f`` was just opened: a chance to get ready before reads arrive."""

    def completed(self, f: OpenFile) -> None:  # noqa: B027 - a hook most sources need not hear
        """Every chunk of ``f`` is in the cache now."""

    def unchecked(self, entry: Entry) -> bool:
        """Are ``entry``'s bytes from this source still to be checked once it is whole?"""
        return False

    def rejections(self, entry: Entry) -> int:
        """How often this source's bytes of ``entry`` were found false once cached."""
        return 0

    async def verdict(self, f: OpenFile) -> str | None:
        """Why this source's bytes of ``f`` can be trusted (waiting for a check under way), or
        None if it gave none. Raises :class:`~coldbrew.agent.errors.CorruptData` if a check
        found them false."""
        return None


class CacheSource(ChunkSource):
    """The node cache: the chunk is there or it is not. First in every round, so a chunk
    that arrived while a request waited (a peer's copy, say) is not fetched again."""

    name = "cache"

    def __init__(self, store: ChunkStore) -> None:
        self.store = store

    async def get(self, request: ChunkRequest) -> Answer:
        if self.store.has(request.file.entry, request.index):
            return Outcome.PRESENT
        return Outcome.PASS
