"""Which source each file of a load is read from, chosen once per file when it is opened.

* a local path: in place (:class:`~coldbrew.loader.sources.LocalFileSource`);
* a remote URI with the node agent reachable on its socket: through the agent's verified
  chunk cache (:class:`~coldbrew.loader.sources.AgentSource`), if the URI lies in what the
  agent serves (its origin and ``allowed_roots``, which it names in its health reply);
* a remote URI without an agent: the write-through cache's copy when it holds this exact
  version (URI, ETag, size), the origin behind it for any block that fails its check
  (:class:`~coldbrew.loader.sources.CacheFileSource`); else the origin itself
  (:class:`~coldbrew.loader.sources.OriginSource`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from coldbrew.agent.core.manifest import FileIdentity
from coldbrew.agent.errors import AgentUnavailable, HeaderError, OriginUnavailable, OutsideRoots
from coldbrew.loader.locate import is_remote, local_path
from coldbrew.loader.sources import (
    AgentSource,
    CacheFileSource,
    LocalFileSource,
    OriginSource,
    Source,
)

if TYPE_CHECKING:
    from coldbrew.agent.control.client import AgentClient
    from coldbrew.loader.origins import Origins
    from coldbrew.loader.writeback import WriteThroughCache

log = logging.getLogger("coldbrew.loader")

#: Files opened at once (each open reads its header: a GET or two for a remote file).
_OPENS_IN_FLIGHT = 8


async def find_agent(socket: str | None, wanted: bool | None, target: str) -> AgentClient | None:
    """The node agent's client if it answers on ``socket`` and serves ``target``. ``wanted``:
    None uses it when it does, True requires it (AgentUnavailable if it does not answer,
    OutsideRoots if ``target`` is not in its roots), False never uses it.

    A target outside the agent's roots is read as if there were no agent: with this process's
    own credentials, which is what the agent's scope asks of a reader (it will not be a
    deputy for URIs it was not set up to serve)."""
    if wanted is False:
        return None
    from coldbrew.agent.control.client import AgentClient
    from coldbrew.agent.control.scope import Scope

    client = AgentClient(socket, timeout_s=10.0)
    try:
        health = await asyncio.get_running_loop().run_in_executor(None, client.health)
    except (AgentUnavailable, OSError) as e:
        if wanted:
            raise AgentUnavailable(f"agent=True but {e}") from None
        log.debug("coldbrew.loader: no agent (%s); reading from the origin", e)
        return None
    roots = health.get("roots")
    if not isinstance(roots, list):  # an agent older than the field: it answers for itself
        return client
    try:
        Scope(tuple(str(r) for r in roots)).check(target)
    except OutsideRoots as e:
        if wanted:
            raise OutsideRoots(f"agent=True but {e}") from None
        log.info("coldbrew.loader: %s; reading it from the origin with this process's own "
                 "credentials", e)
        return None
    return client


class SourceOpener:
    """Opens the source of each file: in place, through ``agent``, from ``cache`` or from
    ``origins``, as the module docstring says."""

    def __init__(self, agent: AgentClient | None, origins: Origins,
                 cache: WriteThroughCache | None, *, agent_required: bool = False) -> None:
        self.agent = agent
        #: agent=True: a load whose agent goes away fails; else it goes on from the origin.
        self.agent_required = agent_required
        self.origins = origins
        self.cache = cache

    async def open_all(self, files: list[str]) -> list[Source]:
        """Every file's source, in order; if one fails, those already open are closed."""
        gate = asyncio.Semaphore(_OPENS_IN_FLIGHT)

        async def one(location: str) -> Source:
            async with gate:
                return await self.open(location)

        tasks = [asyncio.ensure_future(one(f)) for f in files]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            opened = await asyncio.gather(*tasks, return_exceptions=True)
            for s in opened:
                if isinstance(s, Source):
                    await s.close()
            raise

    async def _from_origin(self, identity: FileIdentity) -> Source:
        """This version of a file, from the origin (the agent went away mid-load)."""
        from coldbrew.agent.origin.origin import ObjectInfo  # fsspec: only when needed

        origin = await self.origins.get(identity.uri)
        return OriginSource(origin, ObjectInfo(identity.uri, identity.size, identity.etag))

    async def open(self, location: str) -> Source:
        if not is_remote(location):
            return await LocalFileSource.open(local_path(location))
        if self.agent is not None:
            fallback = None if self.agent_required else self._from_origin
            return await AgentSource.open(self.agent, location, prefetch=False, fallback=fallback)
        origin = await self.origins.get(location)
        loop = asyncio.get_running_loop()
        held = None if self.cache is None else await loop.run_in_executor(
            None, self.cache.latest, location)
        try:  # with a cached copy to stand in, the origin gets a short, bounded chance
            info = await origin.stat(location, quick=held is not None)
        except OriginUnavailable as e:
            if held is None or origin.unreachable_policy == "fail":
                raise
            assert self.cache is not None
            log.warning("coldbrew.loader: %s; serving the cached copy of %s without checking its "
                        "version (origin_unreachable = serve-cached)", e, location)
            return await CacheFileSource.open_entry(held, self.cache, None, location)
        if self.cache is not None:
            entry = await asyncio.get_running_loop().run_in_executor(
                None, self.cache.lookup, info.identity)
            if entry is not None:
                fallback = OriginSource(origin, info)
                try:
                    return await CacheFileSource.open_entry(entry, self.cache, fallback, location)
                except (OSError, HeaderError) as e:
                    log.warning("coldbrew.loader: cache entry for %s unusable (%s); reading the "
                                "origin", location, e)
                    self.cache.discard(entry)
        return await OriginSource.open(origin, info)
