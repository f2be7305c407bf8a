"""Warm starts without an agent: what a location held last time, and whether it still does.

When every file of a whole load lands in the write-through cache, the cache records the
location's files and versions (:meth:`Recall.remember`). The next load of that location
finds them there (:meth:`Recall.entries`) and can read the cached copies at once, while
:meth:`Recall.current` asks the origin which files and versions the location has now; the
caller hands the tensors over only if the two agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from coldbrew.agent.core.manifest import FileIdentity
from coldbrew.loader.locate import Locator, Target, is_remote
from coldbrew.loader.origins import OwnOrigins
from coldbrew.loader.plan import NameFilter

if TYPE_CHECKING:
    from coldbrew.agent.control.client import AgentClient
    from coldbrew.loader.writeback import CacheEntry, Writeback, WriteThroughCache


class Recall:
    """The write-through cache's record of one location, and the check that it is current."""

    def __init__(self, cache: WriteThroughCache, target: Target, concurrency: int | None,
                 endpoint_url: str | None) -> None:
        self.cache = cache
        self.target = target
        self.concurrency = concurrency
        self.endpoint_url = endpoint_url

    @classmethod
    def for_load(cls, target: Target, *, cache: WriteThroughCache | None, agent: AgentClient | None,
                 names: NameFilter, streaming: bool, concurrency: int | None,
                 endpoint_url: str | None) -> Recall | None:
        """A recall for whole loads without an agent into memory the call returns (not
        streamed) of a remote location; None for any other load."""
        if (cache is None or agent is not None or names is not None or streaming
                or target.is_dir is None or not is_remote(target.location)):
            return None
        return cls(cache, target, concurrency, endpoint_url)

    @property
    def key(self) -> str:
        return ("dir:" if self.target.is_dir else "file:") + self.target.location

    async def entries(self) -> list[CacheEntry] | None:
        """The committed entries of the files this location had last time, if all are here."""
        cache = self.cache

        def look() -> list[CacheEntry] | None:
            identities = cache.recall(self.key)
            if not identities:
                return None
            entries = [cache.lookup(i) for i in identities]
            found = [e for e in entries if e is not None]
            return found if len(found) == len(entries) else None

        return await asyncio.get_running_loop().run_in_executor(None, look)

    async def remember(self, identities: Sequence[FileIdentity]) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, self.cache.remember, self.key, identities)

    async def current(self) -> list[FileIdentity]:
        """The location's files and versions at the origin now, checked on a private loop.

        Setting up an S3 client (imports, botocore's service models) holds a
        thread for most of a second; on the load's own loop that would stall
        the reads it is meant to overlap.
        """
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: asyncio.run(self._identities()))

    async def _identities(self) -> list[FileIdentity]:
        origins = OwnOrigins(self.concurrency, self.endpoint_url)
        try:
            files, _ = await Locator(None, origins).files(self.target, None)

            async def identity(uri: str) -> FileIdentity:
                return (await (await origins.get(uri)).stat(uri)).identity

            return list(await asyncio.gather(*(identity(f) for f in files)))
        finally:
            await origins.close()


async def commit(writebacks: Sequence[Writeback], recall: Recall | None,
                 identities: Sequence[FileIdentity]) -> None:
    """Commit the write-throughs; if all land and ``recall`` is given, record the location's
    ``identities`` for the next warm start."""
    committed = await asyncio.gather(*(wb.commit() for wb in writebacks))
    if recall is not None and all(committed):
        await recall.remember(identities)
