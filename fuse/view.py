"""The read-only POSIX view of the origin: a thin mfusepy ``Operations`` adapter over the fetcher.

``/<path>`` on the mount is ``<origin root>/<path>``: directories are listed from the
origin one level at a time, files are read through the node cache, so a read through
the mount warms the cache for the next process (and, later, for peers).

Threads. libfuse calls these methods on its own worker threads. Anything that needs
the agent (a listing, a stat, opening a file, making a chunk present) is a coroutine
run on the agent's event loop with a deadline (``read_timeout_s``); past it the
syscall fails with EIO — a reader never hangs on a dead origin. Everything else
(attributes from the listing cache, bytes of a chunk already on disk) is answered on
the FUSE thread without touching the loop.

Bytes. A cached file's data file (the store keeps each file's bytes at their own
offsets) is opened once and kept open; a read is answered with ``read_buf``: the
descriptor and offset go to libfuse, which moves the bytes into the kernel itself
(spliced, where the kernel allows), so no Python code copies a cached byte. Each chunk
is checked against its digest before it is first served (:mod:`.datafiles`: when, and
how long a check holds); a chunk that fails is dropped (counted as corrupt) and fetched
again. Chunks the cache could not store (disk full or failing) come back from the
fetcher as bytes and are kept per open file, a few at a time.

Passthrough. A file that is wholly cached, every chunk checked, is opened in passthrough
mode where the kernel and libfuse allow it (:mod:`.passthrough`): the kernel then reads
the data file itself, at its speed, and none of those reads reach this module. Chunks
not known good are hashed at that open. The kernel's rules per inode (Linux 6.9+): while
one open of it is passed through, it takes no open that is not, and no other backing
file (it fails such an open with EIO); and no passthrough beside an open that may use the
mount's page cache (a cached open, or an mmap of a ``direct_io`` one). So while a path
is passed through, every open of it is too, to the same version: a new version of the
object at the origin is opened once the last open of the old one has closed.

Other opens. Where passthrough works, an open that cannot be passed through (the file is
not whole yet, or another open keeps the inode from passthrough) is ``direct_io``: its
reads stream through the agent into the reader's buffer and leave no second copy of the
model in the mount's page cache, since the opens after it are passed through to the data
file's pages. An mmap of such a file still works (the mount asks the kernel to allow it)
and uses the mount's page cache.

Page cache (without passthrough). An open file is pinned to one ETag (``Fetcher.open``),
so its bytes never change: the kernel may keep them across opens (``keep_cache``), and a
second read runs at page-cache speed. When a path's ETag changes, the next open drops the
kernel's pages; while two versions of one path are open at once, the newer one bypasses
the page cache (``direct_io``) so their reads never mix. (Two versions both mmapped at
once can still share pages: the kernel maps a ``direct_io`` file through the page cache.)

Errors come from the agent's one errno table (:func:`coldbrew.agent.errors.errno_for`):
ENOENT, EACCES, EIO (origin down after retries, or the deadline passed), ESTALE (the
object changed under an open file and the bytes asked for are not cached). Every
mutating operation fails with EROFS.

This module does not import mfusepy (the agent runs without it when nothing is
mounted); :mod:`coldbrew.fuse.mount` hands a :class:`View` to mfusepy.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import functools
import itertools
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import xxhash

from ..agent.errors import ColdbrewError, ObjectChanged, RequestTimeout, errno_for
from ..agent.fetch.fetcher import Fetcher, OpenFile, Priority
from ..agent.origin.origin import ObjectInfo
from ..agent.cache.store import Entry
from . import bufvec
from .datafiles import DataFile, DataFiles
from .metrics import FuseMetrics
from .passthrough import Passthrough

log = logging.getLogger("coldbrew.fuse")

T = TypeVar("T")

#: Chunks the cache could not store, kept per open file (bytes in memory).
_UNCACHED_KEPT = 4


@dataclass(frozen=True)
class ViewSettings:
    read_timeout_s: float = 60.0
    #: File name globs prefetched whole, in order, when opened.
    prefetch: tuple[str, ...] = ("*.safetensors", "*.bin")
    metadata_ttl_s: float = 10.0
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)


@dataclass
class Node:
    """What the view knows about one path: from a listing, refined by a stat for files."""

    rel: str
    uri: str
    is_dir: bool
    size: int = 0
    etag: str | None = None
    mtime_ns: int | None = None
    stat_at: float = 0.0  # monotonic time of the last stat (files)


@dataclass
class _Handle:
    rel: str
    file: OpenFile
    mode: str = "cached"  # "passthrough", "cached" (the mount's page cache), "direct" (direct_io)
    uncached: OrderedDict[int, bytearray] = field(default_factory=OrderedDict)
    last_index: int = -1


@dataclass
class _Backing:
    """A data file the kernel passes one path's opens through to."""

    key: str  # the entry (version) passed through
    info: ObjectInfo  # that version, for the opens that join it
    backing_id: int
    fd: int  # ours, closed with the id
    opens: int = 0


@dataclass
class _PageState:
    """Per path: the ETag whose bytes the kernel may hold, and the ETags open now."""

    etag: str | None = None
    dirty: bool = False  # two versions were open at once: drop the pages at the next clean open
    open_etags: dict[str, int] = field(default_factory=dict)
    page_opens: int = 0  # opens not passed through, which may use the page cache (mmap)
    backing: _Backing | None = None  # passed through to this, while open
    held_etag: str | None = None  # a newer version kept waiting by ``backing`` (logged once)


def inode_of(rel: str) -> int:
    """A stable inode number for a path (the same across mounts and restarts)."""
    if not rel:
        return 1
    return (xxhash.xxh3_64_intdigest(rel.encode("utf-8", "surrogateescape")) >> 1) | 2


def _rel(path: str | None) -> str:
    return (path or "/").strip("/")


def _erofs(*_: Any, **__: Any) -> int:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def _op(name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Count and time an operation, and turn any error into the errno the syscall returns."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(self: View, *args: Any) -> T:
            started = time.perf_counter()
            code: int | None = None
            try:
                return fn(self, *args)
            except OSError as e:
                code = errno_for(e) if isinstance(e, ColdbrewError) else (e.errno or errno.EIO)
                if isinstance(e, ColdbrewError) or not e.errno:
                    self._log_error(name, args, e, code)
                    raise OSError(code, str(e)) from None
                raise
            except Exception as e:  # a bug must cost one EIO, not the mount
                code = errno_for(e)
                if not isinstance(e, ColdbrewError):
                    log.exception("FUSE %s failed unexpectedly", name, extra={"path": args[:1]})
                else:
                    self._log_error(name, args, e, code)
                raise OSError(code, str(e)) from None
            finally:
                self.metrics.observe(name, code, time.perf_counter() - started)

        return run

    return wrap


class View:
    """mfusepy Operations for the read-only view (use with ``raw_fi=True``)."""

    #: mfusepy: times in integer nanoseconds.
    use_ns = True

    def __init__(self, fetcher: Fetcher, loop: asyncio.AbstractEventLoop, settings: ViewSettings,
                 metrics: FuseMetrics) -> None:
        self.fetcher = fetcher
        self.store = fetcher.store
        self.origin = fetcher.origin
        self.loop = loop
        self.settings = settings
        self.metrics = metrics
        self.mounted_ns = time.time_ns()
        self._lock = threading.Lock()
        self._listings: dict[str, tuple[float, dict[str, Node]]] = {}
        self._handles: dict[int, _Handle] = {}
        self._fh = itertools.count(1)
        self._open_per_entry: dict[str, int] = {}
        self._pages: dict[str, _PageState] = {}
        self.files = DataFiles(self.store)
        self.on_init: Callable[[Any, Any], None] | None = None
        #: Set by the mount when the kernel and libfuse can pass files through.
        self.passthrough: Passthrough | None = None
        #: Set by the mount when, besides, the kernel lets ``direct_io`` files be mmapped: the
        #: opens not passed through are ``direct_io`` then (see the module's docstring).
        self.direct_mmap = False

    # --- the bridge to the agent's event loop -------------------------------------------------

    def _call(self, op: str, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the agent's loop; EIO if it has not finished within the deadline."""
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed: the agent is shutting down
            coro.close()
            raise OSError(errno.EIO, "the agent is shutting down") from None
        try:
            return future.result(self.settings.read_timeout_s)
        except TimeoutError:
            if future.done():
                raise  # the coroutine's own TimeoutError
            future.cancel()  # the fetch itself is shielded and goes on for whoever waits next
            self.metrics.timeouts.labels(op).inc()
            raise RequestTimeout(f"{op}: no answer within fuse_read_timeout_s="
                              f"{self.settings.read_timeout_s:g} s") from None

    def _log_error(self, op: str, args: tuple[Any, ...], e: BaseException, code: int) -> None:
        level = logging.DEBUG if code in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR) else logging.WARNING
        log.log(level, "FUSE %s failed", op, extra={"path": args[0] if args else None,
                                                    "errno": errno.errorcode.get(code), "error": str(e)})

    # --- metadata ------------------------------------------------------------------------------

    def _uri(self, rel: str) -> str:
        return f"{self.origin.root}/{rel}" if rel else self.origin.root

    def _listing(self, rel_dir: str) -> dict[str, Node]:
        """One directory level, cached for ``metadata_ttl_s``."""
        now = time.monotonic()
        cached = self._listings.get(rel_dir)
        if cached is not None and now - cached[0] < self.settings.metadata_ttl_s:
            return cached[1]
        items = self._call("readdir", self.origin.list_dir(self._uri(rel_dir)))
        nodes: dict[str, Node] = {}
        for item in items:
            name = item["name"]
            if not name or name in (".", "..") or "/" in name:
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            is_dir = item["type"] == "directory"
            mtime = item.get("mtime")  # when the origin's listing carries it, no HEAD is needed
            nodes[name] = Node(rel, item["uri"], is_dir, int(item.get("size") or 0), item.get("etag"),
                               int(mtime * 1e9) if mtime is not None else None,
                               now if mtime is not None else 0.0)
        with self._lock:
            self._listings[rel_dir] = (now, nodes)
        return nodes

    def forget(self, rel: str) -> None:
        """Drop what the view knows about ``rel`` (its directory is listed again next time)."""
        with self._lock:
            self._listings.pop(rel.rpartition("/")[0], None)

    def _lookup(self, rel: str) -> Node:
        """The node at ``rel``; ENOENT if it does not exist, ENOTDIR if a parent is a file."""
        if not rel:
            return Node("", self.origin.root, True)
        parent, _, name = rel.rpartition("/")
        if parent and not self._lookup(parent).is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        node = self._listing(parent).get(name)
        if node is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        if not node.is_dir and (node.mtime_ns is None or
                                time.monotonic() - node.stat_at >= self.settings.metadata_ttl_s):
            self._refresh(node)
        return node

    def _refresh(self, node: Node) -> None:
        """Size, ETag and mtime of a file from the origin (the fetcher's stat cache first)."""
        info: ObjectInfo = self._call("getattr", self.fetcher.stat(node.uri))
        node.size, node.etag = info.size, info.etag
        node.mtime_ns = int(info.mtime * 1e9) if info.mtime is not None else self.mounted_ns
        node.stat_at = time.monotonic()

    def _attrs(self, rel: str, is_dir: bool, size: int = 0, mtime_ns: int | None = None) -> dict[str, Any]:
        t = mtime_ns if mtime_ns is not None else self.mounted_ns
        common = {"st_ino": inode_of(rel), "st_uid": self.settings.uid, "st_gid": self.settings.gid,
                  "st_atime": t, "st_mtime": t, "st_ctime": t}
        if is_dir:
            return {**common, "st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_size": 0}
        return {**common, "st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": size,
                "st_blocks": (size + 511) // 512, "st_blksize": min(self.store.chunk_size, 1 << 20)}

    @_op("getattr")
    def getattr(self, path: str | None, fi: Any = None) -> dict[str, Any]:
        handle = self._handles.get(fi.fh) if fi is not None else None
        if handle is not None:  # fstat on an open file: the version it is pinned to
            info = handle.file.info
            return self._attrs(handle.rel, False, info.size,
                               int(info.mtime * 1e9) if info.mtime is not None else None)
        rel = _rel(path)
        node = self._lookup(rel)
        held = self._held_version(rel, node.etag)
        if held is not None:  # the path shows the version its opens get (see _held_version)
            return self._attrs(rel, False, held.size,
                               int(held.mtime * 1e9) if held.mtime is not None else None)
        return self._attrs(rel, node.is_dir, node.size, node.mtime_ns)

    @_op("opendir")
    def opendir(self, path: str) -> int:
        if not self._lookup(_rel(path)).is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return 0

    @_op("readdir")
    def readdir(self, path: str, fh: int) -> list[Any]:
        rel = _rel(path)
        if not self._lookup(rel).is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        out: list[Any] = [(".", {"st_mode": stat.S_IFDIR, "st_ino": inode_of(rel)}, 0),
                          ("..", {"st_mode": stat.S_IFDIR}, 0)]
        for name, node in sorted(self._listing(rel).items()):
            mode = stat.S_IFDIR if node.is_dir else stat.S_IFREG
            out.append((name, {"st_mode": mode, "st_ino": inode_of(node.rel)}, 0))
        return out

    @_op("statfs")
    def statfs(self, path: str) -> dict[str, int]:
        bsize = self.store.chunk_size
        return {"f_bsize": bsize, "f_frsize": bsize, "f_blocks": -(-self.store.used_bytes // bsize),
                "f_bfree": 0, "f_bavail": 0, "f_files": 0, "f_ffree": 0, "f_namemax": 1024}

    # --- files ---------------------------------------------------------------------------------

    def _wants_prefetch(self, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(name, g) for g in self.settings.prefetch)

    async def _open(self, info: ObjectInfo, prefetch: bool) -> OpenFile:
        f = self.fetcher.open_info(info)  # pinned to the version the view just reported
        self.store.pin(f.entry)
        if prefetch and f.entry.layout.count:
            self.fetcher.prefetch(f, 0)
        return f

    @_op("open")
    def open(self, path: str, fi: Any) -> int:
        flags = fi.flags
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        rel = _rel(path)
        node = self._lookup(rel)
        if node.is_dir:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        info = ObjectInfo(node.uri, node.size, node.etag or "",
                          node.mtime_ns / 1e9 if node.mtime_ns is not None else None)
        prefetch = self._wants_prefetch(rel)
        for _ in range(3):
            info = self._held_version(rel, info.etag) or info
            f = self._call("open", self._open(info, prefetch))
            try:
                mode = self._open_mode(rel, f, fi)
            except BaseException:
                self.store.unpin(f.entry)
                raise
            if mode is not None:
                break
            self.store.unpin(f.entry)  # passed through to another version meanwhile: join it
        else:
            raise OSError(errno.EIO, f"{info.uri}: its passthrough kept changing under the open")
        self.metrics.open_files.inc()
        self.metrics.opens.labels(mode).inc()
        return 0

    def _held_version(self, rel: str, etag: str | None) -> ObjectInfo | None:
        """The version ``rel`` is passed through to, if that is not ``etag``: the kernel takes
        no open of the inode that is not passed through to the same file, so until that
        version's last close the path shows and opens it (one whole version, never a mix)."""
        with self._lock:
            page = self._pages.get(rel)
            if page is None or page.backing is None or page.backing.info.etag == etag:
                return None
            held, first_time = page.backing.info, page.held_etag != etag
            page.held_etag = etag
        if first_time:
            log.info("the object changed at the origin while open through the mount in passthrough "
                     "mode; the path shows and opens the version open now until its last close",
                     extra={"uri": held.uri, "etag_open": held.etag, "etag_new": etag})
        return held

    def _open_mode(self, rel: str, f: OpenFile, fi: Any) -> str | None:
        """Record the open and answer ``fi``; None: the path is passed through to another
        version now (open that one instead)."""
        self.files.notice_outside_writes(f.entry)
        whole = self._may_pass_through(f.entry)
        with self._lock:
            page = self._pages.get(rel)
            joins = page is not None and page.backing is not None and page.backing.key == f.entry.key
        if joins and not whole:  # a chunk was dropped since (found corrupt): fetch it again first
            whole = self._make_whole(f)
        with self._lock:
            page = self._pages.setdefault(rel, _PageState())
            mode = self._choose_mode(page, f, whole, fi)
            if mode is None:
                return None
            fh = next(self._fh)
            key = f.entry.key
            self._open_per_entry[key] = self._open_per_entry.get(key, 0) + 1
            self._handles[fh] = _Handle(rel, f, mode)
            page.open_etags[f.info.etag] = page.open_etags.get(f.info.etag, 0) + 1
        fi.fh = fh
        return mode

    def _make_whole(self, f: OpenFile) -> bool:
        missing = [i for i in range(f.entry.layout.count) if not self.store.has(f.entry, i)]
        self._call("open", self.fetcher.ensure_all(f, missing, Priority.READ))
        return self.files.whole_and_checked(f.entry)

    def _choose_mode(self, page: _PageState, f: OpenFile, whole: bool, fi: Any) -> str | None:
        """Passthrough, the page cache, or direct_io for this open (under ``_lock``); None if
        the path is passed through to another version."""
        etag, key = f.info.etag, f.entry.key
        if page.backing is not None:  # the kernel takes only opens passed through to it
            if page.backing.key != key:
                return None
            if not whole:
                raise OSError(errno.EIO, f"{f.info.uri}: a chunk of this file, passed through to "
                                         "the cache, could not be stored again (see the log)")
            return self._pass_through(page, fi)
        if whole and not page.page_opens:
            page.backing = self._register(f.entry, f.info)
            if page.backing is not None:
                return self._pass_through(page, fi)
        page.page_opens += 1
        others = any(e != etag and n > 0 for e, n in page.open_etags.items())
        if others or (self.direct_mmap and self._may_register()):
            # Another version is open (stay out of the shared page cache), or later opens
            # will be passed through to the data file's pages: keep no second copy.
            fi.direct_io, fi.keep_cache = 1, 0
            page.dirty = page.dirty or others
            return "direct"
        if page.etag == etag and not page.dirty:
            fi.keep_cache = 1  # same immutable bytes as before: keep the kernel's pages
        else:
            fi.keep_cache = 0  # the kernel drops what it held for this path
            page.etag, page.dirty = etag, False
        return "cached"

    def _pass_through(self, page: _PageState, fi: Any) -> str:
        assert page.backing is not None and self.passthrough is not None
        page.backing.opens += 1
        self.passthrough.answer(fi, page.backing.backing_id)
        return "passthrough"

    def _register(self, entry: Entry, info: ObjectInfo) -> _Backing | None:
        """The entry's data file registered as a backing file (None: passthrough refused)."""
        pt = self.passthrough
        if pt is None or not pt.enabled:
            return None
        try:
            fd = os.open(entry.data_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        backing_id = pt.register(fd)
        if backing_id is None:
            os.close(fd)
            return None
        return _Backing(entry.key, info, backing_id, fd)

    def _unregister(self, backing: _Backing) -> None:
        if self.passthrough is not None:
            self.passthrough.unregister(backing.backing_id)
        os.close(backing.fd)

    def _may_register(self) -> bool:
        return self.passthrough is not None and self.passthrough.enabled

    def _may_pass_through(self, entry: Entry) -> bool:
        return self._may_register() and self.files.whole_and_checked(entry)

    @_op("release")
    def release(self, path: str | None, fi: Any) -> int:
        with self._lock:
            handle = self._handles.pop(fi.fh, None)
            if handle is None:
                return 0
            key = handle.file.entry.key
            left = self._open_per_entry.get(key, 1) - 1
            if left > 0:
                self._open_per_entry[key] = left
            else:
                self._open_per_entry.pop(key, None)
                self.files.close_entry(key)
            page = self._pages.get(handle.rel)
            if page is not None:
                etag = handle.file.info.etag
                page.open_etags[etag] = page.open_etags.get(etag, 1) - 1
                if page.open_etags[etag] <= 0:
                    del page.open_etags[etag]
                if handle.mode != "passthrough":
                    page.page_opens -= 1
                elif page.backing is not None:
                    page.backing.opens -= 1
                    if page.backing.opens <= 0:
                        self._unregister(page.backing)
                        page.backing, page.held_etag = None, None
        self.store.unpin(handle.file.entry)
        self.metrics.open_files.dec()
        return 0

    @_op("read")
    def read_buf(self, path: str | None, bufpp: Any, size: int, offset: int, fi: Any) -> int:
        """Answer a read with where its bytes are: libfuse moves them (see :mod:`.bufvec`)."""
        handle = self._handles.get(fi.fh)
        if handle is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        f = handle.file
        end = min(offset + size, f.info.size)
        pieces = self._pieces(handle, offset, end) if offset < end else []
        if len(pieces) == 1 and isinstance(pieces[0], tuple):
            addr = bufvec.from_file(*pieces[0])
        else:  # several chunks or bytes in memory: one joined copy
            addr = bufvec.from_pieces(pieces)
        bufvec.hand_over(bufpp, addr)
        self.metrics.read_bytes.inc(max(end - offset, 0))
        return 0

    def _pieces(self, handle: _Handle, offset: int, end: int) -> list[bufvec.FilePiece | bytearray]:
        """Where bytes [offset, end) are (neighbouring ranges of one file joined); every file
        descriptor in it stays open until this thread's next read (libfuse reads from them
        after we return)."""
        layout = handle.file.entry.layout
        first, last = offset // layout.chunk_size, (end - 1) // layout.chunk_size
        for _ in range(8):
            sources = [self._chunk(handle, index) for index in range(first, last + 1)]
            if self.files.hold(s for s in sources if isinstance(s, DataFile)):
                break  # else one was closed between lookup and here (rare): look again
        else:
            raise OSError(errno.EIO, f"{handle.file.info.uri}: its data file kept changing under the read")
        pieces: list[bufvec.FilePiece | bytearray] = []
        for index, source in zip(range(first, last + 1), sources):
            start = index * layout.chunk_size
            lo, hi = max(offset, start), min(end, start + layout.length(index))
            if not isinstance(source, DataFile):
                pieces.append(source if (lo, hi) == (start, start + len(source))
                              else source[lo - start:hi - start])
            elif pieces and isinstance(pieces[-1], tuple) and pieces[-1][0] == source.fd:
                fd, at, n = pieces[-1]  # the next chunk of the same file: one range
                pieces[-1] = (fd, at, n + hi - lo)
            else:
                pieces.append((source.fd, lo, hi - lo))
        return pieces

    def _chunk(self, handle: _Handle, index: int) -> DataFile | bytearray:
        """Chunk ``index``: the data file it was checked in, or the bytes when the cache could
        not store them."""
        kept = handle.uncached.get(index)
        if kept is not None:
            return kept
        f = handle.file
        entry = f.entry
        if handle.last_index == index - 1 and index and not self.store.has(entry, index):
            # A sequential reader went past what is cached: fetch the rest ahead of it.
            self.loop.call_soon_threadsafe(self.fetcher.prefetch, f, index + 1)
        handle.last_index = index
        for _ in range(3):
            if not self.store.has(entry, index):
                try:
                    data = self._call("read", self.fetcher.ensure(f, index, Priority.READ))
                except ObjectChanged:
                    self.forget(handle.rel)  # the next open sees the new version
                    raise
                if data is not None:  # the cache could not store it: here are the bytes
                    kept = handle.uncached[index] = bytearray(data)
                    while len(handle.uncached) > _UNCACHED_KEPT:
                        handle.uncached.popitem(last=False)
                    return kept
            found = self.files.checked(f.entry, index)
            if found is not None:
                return found
        raise OSError(errno.EIO, f"chunk {index} of {f.info.uri} kept failing its digest check")

    # --- read-only: every change is refused ------------------------------------------------------

    mkdir = rmdir = unlink = rename = symlink = link = chmod = chown = truncate = _erofs
    utimens = create = write = mknod = setxattr = removexattr = _erofs

    # --- lifecycle -------------------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        if self.on_init is not None:
            self.on_init(conn, config)

    def destroy(self, path: str) -> None:
        self.close()

    def close(self) -> None:
        """Release every pin still held by files left open (the mount is going away)."""
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            self._open_per_entry.clear()
            for page in self._pages.values():
                if page.backing is not None:
                    self._unregister(page.backing)
                    page.backing = None
        self.files.close()
        for handle in handles:
            self.store.unpin(handle.file.entry)
            self.metrics.open_files.dec()

    def open_handles(self) -> Iterator[_Handle]:
        return iter(list(self._handles.values()))
