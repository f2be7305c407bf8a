"""Byte sources: where a load's bytes come from, behind one small interface.

A source is opened on one file version (an identity: URI, ETag, size), hands
the engine that file's header bytes, and then fills byte ranges into
destination memory: ``await source.fill(begin, end, views)`` writes file bytes
``[begin, end)`` into ``views`` — ``(file offset, memoryview)`` pairs, sorted,
disjoint, inside the range; bytes between views are not wanted. The engine
never sees HTTP, cache files or digests. The sources:

* :class:`LocalFileSource` — a local path (a FUSE mount path is one too):
  ``preadv`` straight into the destination, one syscall per range.
* :class:`CacheFileSource` — a committed write-through entry: ``preadv`` like a
  local file, then every block checked against its digest; a bad block
  is read from the origin instead and the entry is dropped.
* :class:`AgentSource` — the node agent: ``ensure`` makes chunks present, the
  chunks are read from its data file with ``preadv`` and verified against its digests
  (a bad one is reported, re-ensured, then streamed); chunks the agent could not
  cache (cache full) are streamed over the socket.
* :class:`OriginSource` — S3 or any fsspec URL through the agent's
  :class:`~coldbrew.agent.origin.origin.Origin` (retries, backoff, If-Match pinned to
  the ETag): one ranged GET per span, read straight into the destination memory
  of every tensor it carries (the bytes between them into scratch).

Every range a source reads lies in one block of ``span_bytes`` (the engine
plans on that grid), which is what lets the verified sources check whole
blocks without reading anything twice.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import stat as stat_mod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coldbrew.agent.cache.verify import intact_pieces
from coldbrew.agent.core.manifest import FileIdentity, digest
from coldbrew.agent.errors import (
    AgentError,
    AgentUnavailable,
    CorruptData,
    HeaderError,
    ObjectChanged,
    ObjectNotFound,
)
from coldbrew.loader.header import HEADER_PREFIX_BYTES, SafetensorsHeader, header_length, parse_prefix

if TYPE_CHECKING:
    from coldbrew.agent.control.client import AgentClient
    from coldbrew.agent.control.protocol import Chunk, EnsureReply

log = logging.getLogger("coldbrew.loader")

#: One (file offset, destination bytes) pair of a fill.
View = tuple[int, memoryview]

DEFAULT_SPAN_BYTES = 16 << 20
#: First ranged GET of a remote file: enough for the header of any usual model shard.
HEADER_PROBE_BYTES = 1 << 20
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


# --- shared helpers --------------------------------------------------------------------


def cover(begin: int, end: int, views: Sequence[View]) -> list[memoryview]:
    """Buffers covering ``[begin, end)`` in order: the views, and scratch for the gaps."""
    gaps = []
    cursor = begin
    for offset, v in views:
        if offset > cursor:
            gaps.append((cursor, offset))
        cursor = offset + len(v)
    if cursor < end:
        gaps.append((cursor, end))
    scratch = memoryview(bytearray(sum(e - b for b, e in gaps))) if gaps else None
    out: list[memoryview] = []
    used = 0
    cursor = begin
    for offset, v in views:
        if offset > cursor:
            out.append(scratch[used:used + offset - cursor])  # type: ignore[index]
            used += offset - cursor
        out.append(v)
        cursor = offset + len(v)
    if cursor < end:
        out.append(scratch[used:used + end - cursor])  # type: ignore[index]
    return out


def pread_into(fd: int, offset: int, buffers: Sequence[memoryview]) -> int:
    """``preadv`` until ``buffers`` are full or the file ends; returns bytes read."""
    bufs = [b for b in buffers if len(b)]
    done = 0
    while bufs:
        n = os.preadv(fd, bufs[:_IOV_MAX], offset + done)
        if n == 0:
            return done
        done += n
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        if n:
            bufs[0] = bufs[0][n:]
    return done


def parse_header_bytes(data: bytes, size: int, source: str) -> SafetensorsHeader:
    """Parse and validate against the file's size; a truncated file names its first cut tensor."""
    try:
        return parse_prefix(data, file_size=size, source=source)
    except HeaderError as e:
        try:
            claimed = parse_prefix(data, file_size=None, source=source)
        except HeaderError:
            raise e from None
        cut = next((t for t in claimed.tensors if t.end > size), None)
        if cut is None:
            raise
        raise HeaderError(
            f"{source}: truncated: tensor {cut.name!r} needs bytes {cut.begin}-{cut.end} but the "
            f"file has only {size} bytes (the header says the data ends at {claimed.data_end})"
        ) from None


@dataclass
class SourceStats:
    """Bytes read, by where they came from (for the summary line)."""

    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, n: int) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n


class Source:
    """What the engine needs from a byte source. Subclasses fill in the rest."""

    #: For messages: the URI or path as the caller named it.
    name: str
    kind: str
    identity: FileIdentity
    header: SafetensorsHeader
    header_bytes: bytes
    #: Reads are planned on this grid (the agent's chunk, the cache entry's block).
    span_bytes: int = DEFAULT_SPAN_BYTES
    #: When True, a block is read (and verified) whole: plan one read per block.
    whole_blocks: bool = False

    def __init__(self) -> None:
        self.stats = SourceStats()

    async def fill(self, begin: int, end: int, views: Sequence[View]) -> None:
        raise NotImplementedError

    async def start(self, full: bool) -> None:
        """The load of this file begins (``full``: every tensor is wanted)."""

    async def finish(self) -> None:
        """All reads done: check the file did not change; release what is held."""

    async def close(self) -> None:
        """Release what is held, also after a failed load. Idempotent."""


# --- local files ---------------------------------------------------------------------


class LocalFileSource(Source):
    """A local file (also a FUSE path): one fd, ``preadv`` into the destination."""

    kind = "local"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.name = path
        self.fd = -1
        self._stat: os.stat_result | None = None

    @classmethod
    async def open(cls, path: str) -> LocalFileSource:
        self = cls(path)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._open)
        return self

    def _open(self) -> None:
        try:
            self.fd = os.open(self.name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.name}: no such file") from None
        try:
            st = os.fstat(self.fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise HeaderError(f"{self.name}: not a regular file")
            self._stat = st
            self.identity = FileIdentity(self.name, f"{st.st_ino}-{st.st_mtime_ns}", st.st_size)
            prefix = self._read(0, min(st.st_size, HEADER_PREFIX_BYTES))
            n = header_length(prefix, source=self.name)
            self.header_bytes = prefix + self._read(HEADER_PREFIX_BYTES, min(n, st.st_size - HEADER_PREFIX_BYTES))
            self.header = parse_header_bytes(self.header_bytes, st.st_size, self.name)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def _read(self, offset: int, length: int) -> bytes:
        buf = bytearray(max(length, 0))
        n = pread_into(self.fd, offset, [memoryview(buf)])
        return bytes(buf[:n])

    async def fill(self, begin: int, end: int, views: Sequence[View]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._fill, begin, end, views)
        self.stats.add(self.kind, end - begin)

    def _fill(self, begin: int, end: int, views: Sequence[View]) -> None:
        buffers = cover(begin, end, views)
        n = pread_into(self.fd, begin, buffers)
        if n != end - begin:
            raise ObjectChanged(f"{self.name}: the file ended at byte {begin + n} while reading "
                                f"bytes {begin}-{end}; it was truncated or replaced during the load")

    async def finish(self) -> None:
        st = os.fstat(self.fd)
        assert self._stat is not None
        if (st.st_size, st.st_mtime_ns) != (self._stat.st_size, self._stat.st_mtime_ns):
            raise ObjectChanged(f"{self.name} was modified while it was being loaded "
                                "(size or mtime changed); load it again")
        await self.close()

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- the write-through cache ----------------------------------------------------------


class CacheFileSource(LocalFileSource):
    """A committed write-through entry: a local file whose every block is verified.

    A block that fails its digest is read from ``fallback`` (the origin, pinned
    to the same ETag) instead, and the entry is dropped when the load ends.
    """

    kind = "cache"
    whole_blocks = True

    def __init__(self, entry: Any, cache: Any, fallback: OriginSource | None, name: str) -> None:
        super().__init__(str(entry.data_path))
        self.entry = entry
        self.cache = cache
        self.fallback = fallback
        self.uri = name
        self.span_bytes = entry.block_bytes
        self.bad_blocks = 0

    @classmethod
    async def open_entry(cls, entry: Any, cache: Any, fallback: OriginSource | None,
                         name: str) -> CacheFileSource:
        self = cls(entry, cache, fallback, name)
        await asyncio.get_running_loop().run_in_executor(None, self._open)
        if (self.identity.size != entry.identity.size
                or digest(self.header_bytes) != entry.header_digest):
            await self.close()
            cache.discard(entry)
            raise CorruptData(f"cache entry {entry.data_path} for {name} failed its header check")
        self.identity = entry.identity
        self.name = name  # messages name the URI; the fd stays on the cache file
        self.header = parse_header_bytes(self.header_bytes, self.identity.size, name)
        return self

    def _fill(self, begin: int, end: int, views: Sequence[View]) -> None:
        index = begin // self.entry.block_bytes
        block_begin, block_end = self.entry.block_range(index)
        buffers = cover(block_begin, block_end, views)
        n = pread_into(self.fd, block_begin, buffers)
        if n != block_end - block_begin or not intact_pieces(buffers, self.entry.digests[index]):
            raise CorruptData(f"block {index}")

    async def fill(self, begin: int, end: int, views: Sequence[View]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._fill, begin, end, views)
            self.stats.add(self.kind, end - begin)
            return
        except CorruptData:
            self.bad_blocks += 1
            if self.bad_blocks == 1:
                log.warning("coldbrew.loader: cached copy of %s failed its digest check at bytes "
                            "%d-%d; reading from the origin and dropping the entry",
                            self.uri, begin, end)
        if self.fallback is None:
            raise CorruptData(f"{self.uri}: the cached copy {self.entry.data_path} is corrupt at "
                              f"bytes {begin}-{end} and no origin is available to read instead")
        await self.fallback.fill(begin, end, views)
        self.stats.add("origin", end - begin)

    async def finish(self) -> None:
        await self.close()
        if self.bad_blocks:
            self.cache.discard(self.entry)


# --- the node agent -------------------------------------------------------------------


class AgentSource(Source):
    """Bytes through the node agent's cache: its data files, verified, read with ``preadv``."""

    kind = "agent"
    whole_blocks = True

    def __init__(self, client: AgentClient, uri: str,
                 fallback: Callable[[FileIdentity], Awaitable[Source]] | None = None) -> None:
        super().__init__()
        self.client = client
        self.fallback = fallback
        #: Where the rest of the file is read once the agent stopped answering (``fallback``).
        self.instead: Source | None = None
        self.name = uri
        self.lease: str | None = None
        self.etag = ""
        self.size = 0
        self.corrupt_chunks = 0
        self.streamed_chunks = 0
        #: False once the agent's data files proved unreadable here: stream instead.
        self.direct = True

    @classmethod
    async def open(cls, client: AgentClient, uri: str, *, prefetch: bool,
                   fallback: Callable[[FileIdentity], Awaitable[Source]] | None = None
                   ) -> AgentSource:
        """``fallback`` (``agent=None``: "use it if it answers"): how to read this version of
        the file without the agent, should it stop answering mid-load (a restart, an upgrade)."""
        self = cls(client, uri, fallback)
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(
            None, lambda: client.ensure_range(uri, 0, 0, prefetch=prefetch))
        self.lease, self.etag, self.size = first.lease, first.etag, first.size
        self.span_bytes = first.chunk_size
        self.identity = FileIdentity(first.uri, self.etag, self.size)
        try:
            data = await self._read_bytes(0, min(self.size, self.span_bytes))
            n = header_length(data[:HEADER_PREFIX_BYTES], source=uri)
            need = min(HEADER_PREFIX_BYTES + n, self.size)
            if need > len(data):
                data += await self._read_bytes(len(data), need - len(data))
            self.header_bytes = data[:need]
            self.header = parse_header_bytes(self.header_bytes, self.size, uri)
        except BaseException:
            await self.close()
            raise
        return self

    async def _read_bytes(self, offset: int, length: int) -> bytes:
        """Small reads (the header): through verified chunk fills, chunk by chunk. Not counted
        in the load's bytes by source: the load reads these chunks again for their tensors (a
        2 GiB model in 2 shards counted 2.18 GB, two 16 MiB first chunks twice)."""
        buf = bytearray(max(length, 0))
        pos = offset
        counted = dict(self.stats.by_kind)
        while pos < offset + length:
            chunk_end = min((pos // self.span_bytes + 1) * self.span_bytes, offset + length)
            await self.fill(pos, chunk_end, [(pos, memoryview(buf)[pos - offset:chunk_end - offset])])
            pos = chunk_end
        self.stats.by_kind = counted
        return bytes(buf)

    async def start(self, full: bool) -> None:
        if full:  # the agent reads the rest of the file ahead of us, in order
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: self.client.ensure_range(lease=self.lease, offset=0, length=0,
                                                           prefetch=True))
            except AgentUnavailable as e:
                await self._without_agent(e)

    async def _ensure(self, offset: int, length: int) -> EnsureReply:
        loop = asyncio.get_running_loop()
        window = await loop.run_in_executor(
            None, lambda: self.client.ensure_range(lease=self.lease, offset=offset, length=length))
        if window.etag != self.etag:
            raise ObjectChanged(f"{self.name} changed at the origin during the load "
                                f"(ETag {self.etag} → {window.etag}); load it again")
        return window

    async def fill(self, begin: int, end: int, views: Sequence[View]) -> None:
        if self.instead is None:
            try:
                return await self._fill(begin, end, views)
            except AgentUnavailable as e:
                await self._without_agent(e)
        assert self.instead is not None
        await self.instead.fill(begin, end, views)
        self.stats.add(self.instead.kind, end - begin)

    async def _without_agent(self, error: AgentUnavailable) -> None:
        """The agent went away mid-load: read the rest of this version from the origin, or
        raise (``agent=True``, or no way to read it otherwise)."""
        if self.instead is not None:
            return
        if self.fallback is None:
            raise error
        log.warning("coldbrew.loader: the agent stopped answering while %s was loading (%s); "
                    "reading the rest of it from the origin", self.name, error)
        self.instead = await self.fallback(self.identity)
        self.lease = None  # the agent that held it is gone

    async def _fill(self, begin: int, end: int, views: Sequence[View]) -> None:
        loop = asyncio.get_running_loop()
        index = begin // self.span_bytes
        chunk_begin = index * self.span_bytes
        chunk_len = min(self.span_bytes, self.size - chunk_begin)
        window = await self._ensure(chunk_begin, chunk_len)
        chunk = window.chunks[0]
        if chunk.cached and self.direct:
            got = await loop.run_in_executor(None, _read_chunk, chunk, views)
            if got is _Read.OK:
                self.stats.add(self.kind, end - begin)
                return
            if got is _Read.UNREADABLE:
                self._no_direct_reads(chunk)
            else:  # failed its digest here: the agent re-checks it, drops and refetches it
                self.corrupt_chunks += 1
                log.warning("coldbrew.loader: agent chunk %d of %s failed its digest check; "
                            "asking the agent to fetch it again", index, self.name)
                await loop.run_in_executor(None, self.client.report_corrupt, self.lease, index)
                chunk = (await self._ensure(chunk_begin, chunk_len)).chunks[0]
                if chunk.cached and await loop.run_in_executor(None, _read_chunk, chunk,
                                                               views) is _Read.OK:
                    self.stats.add(self.kind, end - begin)
                    return
        # Not cached (the agent's disk is full), not ours to open, or still bad: the agent
        # streams verified bytes over the socket.
        await loop.run_in_executor(None, self._stream, begin, end, views)
        self.streamed_chunks += 1
        self.stats.add("agent-stream", end - begin)

    def _no_direct_reads(self, chunk: Chunk) -> None:
        """The agent's files are private to it (0600 under a 0700 directory) unless this
        process runs as the agent's user: stream every chunk from now on, and say so once."""
        self.direct = False
        log.info("coldbrew.loader: cannot open the agent's cache file %s (another user, or "
                 "another mount namespace); streaming %s over the agent's socket",
                 chunk.path, self.name)

    def _stream(self, begin: int, end: int, views: Sequence[View]) -> None:
        buffers = cover(begin, end, views)
        pos = 0
        current = 0
        for piece in self.client.read(lease=self.lease, offset=begin, length=end - begin):
            piece = memoryview(piece)
            while len(piece):
                target = buffers[current][pos:]
                take = min(len(target), len(piece))
                target[:take] = piece[:take]
                piece = piece[take:]
                pos += take
                if pos == len(buffers[current]):
                    current, pos = current + 1, 0
        if current < len(buffers):
            raise ObjectChanged(f"{self.name}: the agent's stream of bytes {begin}-{end} ended early")

    async def finish(self) -> None:
        """The agent's last word on the bytes read: a file filled under a peer's manifest is
        checked against the origin before its tensors are handed over (raises if it failed).
        Without the agent (it went away), the origin source's own check instead."""
        if self.instead is not None:
            await self.instead.finish()
            return
        try:
            if self.lease is not None:
                await asyncio.get_running_loop().run_in_executor(None, self._verify, self.lease)
        finally:
            await self.close()

    def _verify(self, lease: str) -> None:
        try:
            self.client.verify(lease)
        except AgentUnavailable:
            if self.fallback is None:
                raise
            # Gone after the last byte arrived: those bytes passed the agent's digests; only
            # a peer manifest's verdict is lost (docs/security.md, Manifests).
            log.warning("coldbrew.loader: the agent stopped answering before its last word on "
                        "%s; its bytes passed their digests", self.name)
        except AgentError as e:
            if "404" not in str(e):
                raise
            # An agent older than /v1/verify checks nothing more: there is nothing to wait for.
            log.info("coldbrew.loader: the agent has no /v1/verify (an older version)")

    async def close(self) -> None:
        if self.instead is not None:
            await self.instead.close()
        if self.lease is not None:
            lease, self.lease = self.lease, None
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.client.release, lease)
            except (AgentUnavailable, OSError):
                pass


class _Read(enum.Enum):
    OK = "ok"
    CORRUPT = "corrupt"  # the bytes there fail the chunk's digest (or the file is short)
    UNREADABLE = "unreadable"  # this process may not open the file


def _read_chunk(chunk: Chunk, views: Sequence[View]) -> _Read:
    """Read a whole chunk from the agent's data file into ``views`` (+ scratch) and check
    its digest. The chunk lies at its own offset in that file (the object's layout)."""
    if chunk.path is None:
        return _Read.CORRUPT
    try:
        fd = os.open(chunk.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        # EACCES: the agent's private cache; ENOENT: a cache dir this mount namespace does not
        # see (the lease keeps the entry from eviction). The socket serves it either way.
        return _Read.UNREADABLE
    try:
        begin, length = chunk.offset, chunk.length
        if os.fstat(fd).st_size < begin + length:
            return _Read.CORRUPT
        buffers = cover(begin, begin + length, views)
        if pread_into(fd, begin, buffers) != length:
            return _Read.CORRUPT
        return _Read.OK if intact_pieces(buffers, chunk.digest) else _Read.CORRUPT
    finally:
        os.close(fd)


# --- the origin (no agent) ------------------------------------------------------------


def origin_root(uri: str) -> str:
    """The root an :class:`Origin` is made for: ``s3://bucket``, or ``proto://``."""
    scheme, _, rest = uri.partition("://")
    if scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        return f"{scheme}://{rest.split('/', 1)[0]}"
    return f"{scheme}://"


class OriginSource(Source):
    """Ranged GETs from the origin, pinned to one ETag, straight into destination memory."""

    kind = "origin"

    def __init__(self, origin: Any, info: Any) -> None:
        super().__init__()
        self.origin = origin
        self.info = info
        self.name = info.uri
        self.identity = info.identity
        self.requests = 0

    @classmethod
    async def open(cls, origin: Any, info: Any) -> OriginSource:
        self = cls(origin, info)
        size = info.size
        probe = bytearray(min(size, HEADER_PROBE_BYTES))
        await self._read(0, memoryview(probe))
        n = header_length(bytes(probe[:HEADER_PREFIX_BYTES]), source=self.name)
        need = min(HEADER_PREFIX_BYTES + n, size)
        if need > len(probe):
            rest = bytearray(need - len(probe))
            await self._read(len(probe), memoryview(rest))
            # A new buffer, not ``+=``: the executor thread that filled ``probe`` may hold its
            # view a moment after the read has returned (it drops its work item only after
            # setting the result), and a bytearray with a view cannot be resized (BufferError,
            # seen once in CI).
            probe = probe + rest
        self.header_bytes = bytes(probe[:need])
        self.header = parse_header_bytes(self.header_bytes, size, self.name)
        return self

    async def _read(self, begin: int, view: memoryview | list[memoryview]) -> None:
        # The origin's own limit (fixed, or adapting to the link), shared by every file the
        # process loads from it.
        async with self.origin.flow.gate():
            self.requests += 1
            await self.origin.read_into(self.info, begin, view)

    async def fill(self, begin: int, end: int, views: Sequence[View]) -> None:
        """One ranged GET for the span, scattered into its tensors' memory (the bytes between
        them into scratch): a span of many small tensors costs one request, not one each."""
        wanted = [(offset, v) for offset, v in views if len(v)]
        if wanted:
            first, last = wanted[0][0], wanted[-1][0] + len(wanted[-1][1])
            parts = cover(first, last, wanted)
            await self._read(first, parts[0] if len(parts) == 1 else parts)
        self.stats.add(self.kind, end - begin)
