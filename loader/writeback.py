"""Write-through cache for loads without an agent: the same bytes, on local disk, verified.

When no node agent is reachable, the loader reads a file straight from the
origin and, off the critical path, writes the same bytes to a local cache dir
(aiofiles, in the loop's worker threads), so the next load of the same object
is a local read. The rules:

* **Identity.** An entry is keyed by (URI, ETag, size), like the agent's cache:
  a changed object is a new entry, and committing one drops the URI's older
  versions.
* **Never half-written.** Bytes go to a temp file under ``tmp/`` (named with the
  writer's pid), at their file offsets, in whatever order they arrive. Only when
  every block is written is the data renamed into place, and then the sidecar
  (``.json``: identity, block size, one xxh3-128 digest per block and one for the
  header) is renamed beside it. The sidecar is the commit point: data without a
  sidecar is never used; a crash leaves a temp file that the next writer removes.
* **Verified on read.** Block digests are taken from the bytes as fetched,
  before a caller can see the tensors; a reader checks every block it reads
  against them. A tensor the caller changed before its bytes were written, a
  torn file, or bit rot all end as a digest mismatch: that block is read from
  the origin instead and the entry is dropped. A cache fault costs speed,
  never correctness.
* **Off the critical path.** On a CPU load the bytes are already in the
  caller's tensors, so the writes can wait: the loader defers them until the
  load call has returned its tensors (on a machine with few cores, writing 2 GiB
  into the page cache while fetching costs the fetch a second of CPU). A CUDA
  load writes as it goes: its pinned buffers return to the ring only once written.
* **Failure never fails a load.** Any error while writing (disk full, read-only
  dir) abandons the entry with one warning.

Layout (versioned)::

    <cache_dir>/coldbrew-loader-v1/files/<uri-key>/<identity-key>.safetensors
    <cache_dir>/coldbrew-loader-v1/files/<uri-key>/<identity-key>.json
    <cache_dir>/coldbrew-loader-v1/tmp/<identity-key>.<pid>.<token>.part
    <cache_dir>/coldbrew-loader-v1/locations/<location-key>.json

A *location record* remembers which files (and versions) a whole load of a URI
found last time, once all of them are committed. The next load of that URI
reads those entries at once while the origin confirms, in parallel, that they
are still current; if not, the result is thrown away and the load runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coldbrew.agent.cache.blocks import allocate
from coldbrew.agent.core.manifest import FileIdentity, digest, digester

log = logging.getLogger("coldbrew.loader")

LAYOUT = "coldbrew-loader-v1"
FORMAT = 1
DEFAULT_BLOCK_BYTES = 16 << 20
ENV_CACHE_DIR = "COLDBREW_LOADER_CACHE"


def default_cache_dir() -> Path:
    """``$COLDBREW_LOADER_CACHE``, else ``$XDG_CACHE_HOME/coldbrew/loader`` (~/.cache)."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "coldbrew" / "loader"


_writer_pool: tuple[int, Any] | None = None


def _lower_priority() -> None:
    try:  # Linux: a thread's nice value is its own (PRIO_PROCESS with a thread id)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def writer_executor() -> Any:
    """One low-priority thread per process for the cache's file I/O.

    Copying model-sized data into the page cache costs CPU (about a second per
    2 GiB on a small VM); at nice 19 it takes only what fetching and the
    caller leave idle.
    """
    global _writer_pool
    if _writer_pool is None or _writer_pool[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        _writer_pool = (os.getpid(), ThreadPoolExecutor(
            1, thread_name_prefix="coldbrew-writeback", initializer=_lower_priority))
    return _writer_pool[1]


def _uri_key(uri: str) -> str:
    # A file name for the URI; the manifest's digest is as good a name as any and keeps the hash named once.
    return digest(uri.encode())


@dataclass(frozen=True)
class CacheEntry:
    """A committed entry: the file's bytes and what they must hash to."""

    identity: FileIdentity
    data_path: Path
    block_bytes: int
    digests: tuple[str, ...]
    header_digest: str

    def block_range(self, index: int) -> tuple[int, int]:
        begin = index * self.block_bytes
        return begin, min(begin + self.block_bytes, self.identity.size)


def block_count(size: int, block_bytes: int) -> int:
    return -(-size // block_bytes)


class WriteThroughCache:
    """The loader's own cache directory (one per ``cache_dir``)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.base = self.root / LAYOUT
        self.files = self.base / "files"
        self.tmp = self.base / "tmp"
        self.locations = self.base / "locations"
        self._swept = False

    def _paths(self, identity: FileIdentity) -> tuple[Path, Path]:
        folder = self.files / _uri_key(identity.uri)
        key = identity.key()
        return folder / f"{key}.safetensors", folder / f"{key}.json"

    # --- reading ---------------------------------------------------------------------

    def lookup(self, identity: FileIdentity) -> CacheEntry | None:
        """The committed entry for ``identity``, or None (missing, torn or foreign)."""
        data_path, meta_path = self._paths(identity)
        try:
            meta = json.loads(meta_path.read_bytes())
            size = data_path.stat().st_size
        except (OSError, ValueError):
            return None
        try:
            entry = CacheEntry(
                FileIdentity(str(meta["uri"]), str(meta["etag"]), int(meta["size"])),
                data_path, int(meta["block_bytes"]), tuple(str(d) for d in meta["digests"]),
                str(meta["header_digest"]))
            ok = (meta.get("format") == FORMAT and entry.identity == identity
                  and size == identity.size and entry.block_bytes > 0
                  and len(entry.digests) == block_count(size, entry.block_bytes))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            log.warning("coldbrew.loader: cache entry %s does not match %s; ignoring it",
                        meta_path, identity.uri)
            return None
        return entry

    def latest(self, uri: str) -> CacheEntry | None:
        """The most recently committed entry of any version of ``uri``: what is served when
        the origin cannot say which version is current (stale-if-error)."""
        folder = self.files / _uri_key(uri)
        try:
            sidecars = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            return None
        for meta_path in sidecars:
            try:
                meta = json.loads(meta_path.read_bytes())
                identity = FileIdentity(str(meta["uri"]), str(meta["etag"]), int(meta["size"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            entry = self.lookup(identity) if identity.uri == uri else None
            if entry is not None:
                return entry
        return None

    def discard(self, entry: CacheEntry | FileIdentity) -> None:
        """Drop an entry (sidecar first, so it is never served half-removed)."""
        identity = entry.identity if isinstance(entry, CacheEntry) else entry
        data_path, meta_path = self._paths(identity)
        for p in (meta_path, data_path):
            try:
                p.unlink()
            except OSError:
                pass

    def recall(self, location: str) -> tuple[FileIdentity, ...] | None:
        """The files a complete load of ``location`` found last time, or None."""
        try:
            record = json.loads((self.locations / f"{_uri_key(location)}.json").read_bytes())
            if record.get("format") != FORMAT or record.get("location") != location:
                return None
            return tuple(FileIdentity(str(f["uri"]), str(f["etag"]), int(f["size"]))
                         for f in record["files"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def remember(self, location: str, identities: Sequence[FileIdentity]) -> None:
        """Record what a complete load of ``location`` found (a hint: never trusted alone)."""
        record = {"format": FORMAT, "location": location,
                  "files": [{"uri": i.uri, "etag": i.etag, "size": i.size} for i in identities]}
        key = _uri_key(location)
        # In tmp/ and named like the data temp files, so sweep() removes a dead writer's.
        tmp = self.tmp / f"{key}.{os.getpid()}.{secrets.token_hex(4)}.location"
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            self.locations.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.locations / f"{key}.json")
        except OSError as e:
            log.debug("coldbrew.loader: could not record %s (%s)", location, e)
            with contextlib.suppress(OSError):
                tmp.unlink()

    # --- writing ---------------------------------------------------------------------

    def begin(self, identity: FileIdentity, header: bytes,
              block_bytes: int = DEFAULT_BLOCK_BYTES, *, defer: bool = False) -> Writeback:
        return Writeback(self, identity, header, block_bytes, defer=defer)

    def sweep(self) -> None:
        """Remove temp files whose writer process is gone (a crash or a kill mid-load)."""
        if self._swept:
            return
        self._swept = True
        try:
            names = os.listdir(self.tmp)
        except OSError:
            return
        for name in names:
            parts = name.split(".")
            try:
                pid = int(parts[1])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not _alive(pid):
                try:
                    (self.tmp / name).unlink()
                except OSError:
                    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Writeback:
    """One entry being written. Lives on the loader's event loop.

    The engine calls :meth:`open` (writes the header), then for each block of
    the file's data :meth:`add` with the block's digest and its bytes as
    memoryviews, then :meth:`commit`. Each ``add`` returns a future that is done
    once those bytes are written (or the entry was abandoned): a caller that
    must reuse the buffers (the CUDA path's pinned ring) waits on it.
    """

    def __init__(self, cache: WriteThroughCache, identity: FileIdentity, header: bytes,
                 block_bytes: int, *, defer: bool = False) -> None:
        self.cache = cache
        self.identity = identity
        self.header = header
        self.block_bytes = block_bytes
        self.digests: list[str | None] = [None] * block_count(identity.size, block_bytes)
        self.failed: str | None = None
        self.committed = False
        self.bytes_written = 0
        self._tmp = cache.tmp / f"{identity.key()}.{os.getpid()}.{secrets.token_hex(4)}.part"
        self._file: Any = None
        self._queue: asyncio.Queue[tuple[int, Sequence[tuple[int, memoryview]], Any,
                                         asyncio.Future[None]] | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        #: Deferred entries queue their blocks but write nothing before :meth:`go`.
        self._go = asyncio.Event()
        if not defer:
            self._go.set()

    # --- the engine's side -------------------------------------------------------------

    async def open(self) -> bool:
        import aiofiles

        try:
            self.cache.tmp.mkdir(parents=True, exist_ok=True)
            self.cache.sweep()
            self._file = await aiofiles.open(self._tmp, "wb", buffering=0,
                                             executor=writer_executor())
            await self._file.truncate(self.identity.size)
            # The whole file's blocks first: a full disk fails here, before a byte is written,
            # and the writes skip the filesystem's per-block delayed allocation.
            await asyncio.get_running_loop().run_in_executor(
                writer_executor(), allocate, self._file.fileno(), 0, self.identity.size)
            await self._write_at(0, memoryview(self.header))
        except OSError as e:
            self._fail(e)
            return False
        # Blocks that hold only header bytes are known now.
        header_end = len(self.header)
        for index in range(len(self.digests)):
            begin, end = self._block_range(index)
            if end <= header_end:
                self.digests[index] = digest(self.header[begin:end])
        self._writer = asyncio.create_task(self._run())
        return True

    def _block_range(self, index: int) -> tuple[int, int]:
        begin = index * self.block_bytes
        return begin, min(begin + self.block_bytes, self.identity.size)

    def block_digest(self, index: int, begin: int, views: Sequence[memoryview]) -> str:
        """Digest of block ``index`` whose data bytes from ``begin`` on are ``views``.

        The block's header bytes (if any) come first; ``views`` must hold every
        other byte of the block, in order.
        """
        block_begin, block_end = self._block_range(index)
        h = digester()
        header_end = len(self.header)
        if block_begin < header_end:
            h.update(self.header[block_begin:min(block_end, header_end)])
        n = 0
        for v in views:
            h.update(v)
            n += len(v)
        expected = block_end - max(block_begin, header_end)
        if begin != max(block_begin, header_end) or n != expected:
            raise AssertionError(f"block {index}: views cover {begin}+{n}, "
                                 f"expected {max(block_begin, header_end)}+{expected}")
        return h.hexdigest()

    def add(self, index: int, digest: str, pieces: Sequence[tuple[int, memoryview]],
            keep: Any = None) -> asyncio.Future[None]:
        """Queue block ``index``'s bytes: ``pieces`` are (file offset, bytes); ``keep``
        is held until they are written (whatever owns the memory)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.failed:
            done.set_result(None)
            return done
        self.digests[index] = digest
        self._queue.put_nowait((index, pieces, keep, done))
        return done

    def go(self) -> None:
        """Start writing (a deferred entry): the load it came from is done."""
        self._go.set()

    async def commit(self) -> bool:
        """Finish: wait for the writes, then publish data and sidecar. Never raises."""
        self.go()
        try:
            if self._writer is not None:
                self._queue.put_nowait(None)
                await self._writer
            if self.failed:
                return False
            missing = [i for i, d in enumerate(self.digests) if d is None]
            if missing:
                self._fail(RuntimeError(f"blocks {missing[:5]} were never written"))
                return False
            await self._file.close()
            self._file = None
            await asyncio.get_running_loop().run_in_executor(writer_executor(), self._publish)
            self.committed = True
            return True
        except Exception as e:
            self._fail(e)
            return False
        finally:
            await self._cleanup()

    async def abort(self) -> None:
        """The load failed (or was cancelled): drop everything written so far."""
        if not self.failed:
            self.failed = "aborted"
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
            try:
                await self._writer
            except BaseException:
                pass
        await self._cleanup()

    # --- the writer ----------------------------------------------------------------------

    async def _run(self) -> None:
        await self._go.wait()
        while True:
            item = await self._queue.get()
            if item is None:
                return
            index, pieces, keep, done = item
            try:
                if not self.failed:
                    for offset, view in pieces:
                        await self._write_at(offset, view)
            except OSError as e:
                self._fail(e)
            finally:
                del keep
                if not done.done():
                    done.set_result(None)
            if self.failed:
                self._drain_queue()

    def _drain_queue(self) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:
                self._queue.put_nowait(None)  # commit() waits on the writer: let it end
                return
            if not item[3].done():
                item[3].set_result(None)

    async def _write_at(self, offset: int, view: memoryview) -> None:
        if self._file is None:
            raise OSError(f"{self._tmp} is closed")
        await self._file.seek(offset)
        while len(view):
            n = await self._file.write(view)
            if not n:
                raise OSError(f"write to {self._tmp} made no progress")
            self.bytes_written += n
            view = view[n:]

    def _publish(self) -> None:
        data_path, meta_path = self.cache._paths(self.identity)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "uri": self.identity.uri, "etag": self.identity.etag,
                "size": self.identity.size, "block_bytes": self.block_bytes,
                "header_digest": digest(self.header),
                "digests": self.digests}
        meta_tmp = self._tmp.with_suffix(".json.part")
        meta_tmp.write_text(json.dumps(meta))
        # Older versions of the same URI go first (their sidecars before their data).
        for p in sorted(data_path.parent.iterdir(), key=lambda p: p.suffix != ".json"):
            if not p.name.startswith(self.identity.key()):
                p.unlink(missing_ok=True)
        os.replace(self._tmp, data_path)
        os.replace(meta_tmp, meta_path)  # the commit point

    def _fail(self, error: BaseException) -> None:
        if self.failed:
            return
        self.failed = f"{type(error).__name__}: {error}"
        log.warning("coldbrew.loader: could not cache %s in %s (%s); the load goes on from the "
                    "origin", self.identity.uri, self.cache.root, self.failed)
        self._drain_queue()

    async def _cleanup(self) -> None:
        if self._file is not None:
            try:
                await self._file.close()
            except OSError:
                pass
            self._file = None
        if not self.committed:
            for p in (self._tmp, self._tmp.with_suffix(".json.part")):
                try:
                    p.unlink()
                except OSError:
                    pass
