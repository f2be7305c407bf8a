"""The read-only POSIX view of the origin: the mfusepy ``Operations``, each delegating to the
part of the view that does that job.

``/<path>`` on the mount is ``<origin root>/<path>``; files are read through the node
cache, so a read through the mount warms the cache for the next process (and for peers).
:class:`View` answers the FUSE operations; what they need is done by:

* :mod:`.namespace` — paths over the origin's listing, inode numbers, metadata TTL;
* :mod:`.attrs` — the attributes shown (pure);
* :mod:`.handles` — open files, and the store pin each holds until release;
* :mod:`.modes` — whether an open is passed through, cached or ``direct_io``;
* :mod:`.reads` — where a read's bytes are, made present first, with read-ahead;
* :mod:`.datafiles` — the data files held open, their chunks checked before served;
* :mod:`.bridge` — the agent's event loop, called with a deadline.

Threads. libfuse calls these methods on its own worker threads. Anything that needs
the agent (a listing, a stat, opening a file, making a chunk present) is a coroutine
run on the agent's event loop with a deadline (``read_timeout_s``); past it the
syscall fails with EIO — a reader never hangs on a dead origin. Everything else
(attributes from the listing cache, bytes of a chunk already on disk) is answered on
the FUSE thread without touching the loop.

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
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..agent.errors import ColdbrewError, errno_for
from ..agent.fetch.fetcher import Fetcher, OpenFile, Priority
from ..agent.origin.origin import ObjectInfo
from . import bufvec
from .attrs import Attributes
from .bridge import LoopBridge
from .datafiles import DataFiles
from .handles import Handle, Handles
from .metrics import FuseMetrics
from .modes import OpenModes
from .namespace import Namespace, inode_of, rel_of
from .reads import Reader

__all__ = ["View", "ViewSettings", "inode_of"]

log = logging.getLogger("coldbrew.fuse")

T = TypeVar("T")


@dataclass(frozen=True)
class ViewSettings:
    read_timeout_s: float = 60.0
    #: File name globs prefetched whole, in order, when opened.
    prefetch: tuple[str, ...] = ("*.safetensors", "*.bin")
    metadata_ttl_s: float = 10.0
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)


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
                    _log_error(name, args, e, code)
                    raise OSError(code, str(e)) from None
                raise
            except Exception as e:  # a bug must cost one EIO, not the mount
                code = errno_for(e)
                if not isinstance(e, ColdbrewError):
                    log.exception("FUSE %s failed unexpectedly", name, extra={"path": args[:1]})
                else:
                    _log_error(name, args, e, code)
                raise OSError(code, str(e)) from None
            finally:
                self.metrics.observe(name, code, time.perf_counter() - started)

        return run

    return wrap


def _log_error(op: str, args: tuple[Any, ...], e: BaseException, code: int) -> None:
    level = logging.DEBUG if code in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR) else logging.WARNING
    log.log(level, "FUSE %s failed", op, extra={"path": args[0] if args else None,
                                                "errno": errno.errorcode.get(code), "error": str(e)})


class View:
    """mfusepy Operations for the read-only view (use with ``raw_fi=True``)."""

    #: mfusepy: times in integer nanoseconds.
    use_ns = True

    def __init__(self, fetcher: Fetcher, loop: asyncio.AbstractEventLoop, settings: ViewSettings,
                 metrics: FuseMetrics) -> None:
        self.fetcher = fetcher
        self.store = fetcher.store
        self.loop = loop
        self.settings = settings
        self.metrics = metrics
        mounted_ns = time.time_ns()
        self.bridge = LoopBridge(loop, settings.read_timeout_s, metrics)
        self.names = Namespace(fetcher, self.bridge, settings.metadata_ttl_s, mounted_ns)
        self.attrs = Attributes(settings.uid, settings.gid, mounted_ns, self.store.chunk_size)
        self.files = DataFiles(self.store)
        self.handles = Handles(self.store, on_last_close=self.files.close_entry)
        #: The mount sets ``modes.passthrough`` (and ``modes.direct_mmap``) where the kernel
        #: and libfuse can pass files through.
        self.modes = OpenModes()
        self.reader = Reader(fetcher, self.store, self.files, self.bridge, on_changed=self.forget)
        self.on_init: Callable[[Any, Any], None] | None = None

    def forget(self, rel: str) -> None:
        """Drop what the view knows about ``rel`` (its directory is listed again next time)."""
        self.names.forget(rel)

    # --- metadata ------------------------------------------------------------------------------

    @_op("getattr")
    def getattr(self, path: str | None, fi: Any = None) -> dict[str, Any]:
        handle = self.handles.get(fi.fh) if fi is not None else None
        if handle is not None:  # fstat on an open file: the version it is pinned to
            return self.attrs.of_version(handle.rel, handle.file.info)
        rel = rel_of(path)
        node = self.names.lookup(rel)
        held = self.modes.held_version(rel, node.etag)
        if held is not None:  # the path shows the version its opens get (see OpenModes)
            return self.attrs.of_version(rel, held)
        return self.attrs.of_node(node)

    @_op("opendir")
    def opendir(self, path: str) -> int:
        if not self.names.lookup(rel_of(path)).is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return 0

    @_op("readdir")
    def readdir(self, path: str, fh: int) -> list[Any]:
        rel = rel_of(path)
        if not self.names.lookup(rel).is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return self.attrs.listing(rel, self.names.listing(rel))

    @_op("statfs")
    def statfs(self, path: str) -> dict[str, int]:
        return self.attrs.statfs(self.store.used_bytes)

    # --- files ---------------------------------------------------------------------------------

    @_op("open")
    def open(self, path: str, fi: Any) -> int:
        flags = fi.flags
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        rel = rel_of(path)
        node = self.names.lookup(rel)
        if node.is_dir:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        info = ObjectInfo(node.uri, node.size, node.etag or "",
                          node.mtime_ns / 1e9 if node.mtime_ns is not None else None)
        prefetch = self._wants_prefetch(rel)
        for _ in range(3):
            info = self.modes.held_version(rel, info.etag) or info
            f = self.bridge.call("open", self._open(info, prefetch))
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

    def _wants_prefetch(self, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(name, g) for g in self.settings.prefetch)

    async def _open(self, info: ObjectInfo, prefetch: bool) -> OpenFile:
        f = self.fetcher.open_info(info)  # pinned to the version the view just reported
        self.store.pin(f.entry)
        if prefetch and f.entry.layout.count:
            self.fetcher.prefetch(f, 0)
        return f

    def _open_mode(self, rel: str, f: OpenFile, fi: Any) -> str | None:
        """Record the open and answer ``fi``; None: the path is passed through to another
        version now (open that one instead)."""
        self.files.notice_outside_writes(f.entry)
        whole = self.modes.can_pass_through and self.files.whole_and_checked(f.entry)
        if not whole and self.modes.joins(rel, f.entry.key):
            whole = self._make_whole(f)  # a chunk was dropped since (found corrupt): fetch it again
        mode = self.modes.opened(rel, f, whole, fi)
        if mode is not None:
            fi.fh = self.handles.add(Handle(rel, f, mode))
        return mode

    def _make_whole(self, f: OpenFile) -> bool:
        missing = [i for i in range(f.entry.layout.count) if not self.store.has(f.entry, i)]
        self.bridge.call("open", self.fetcher.ensure_all(f, missing, Priority.READ))
        return self.files.whole_and_checked(f.entry)

    @_op("release")
    def release(self, path: str | None, fi: Any) -> int:
        handle = self.handles.release(fi.fh)
        if handle is None:
            return 0
        self.modes.closed(handle.rel, handle.file.info.etag, handle.mode)
        self.metrics.open_files.dec()
        return 0

    @_op("read")
    def read_buf(self, path: str | None, bufpp: Any, size: int, offset: int, fi: Any) -> int:
        """Answer a read with where its bytes are: libfuse moves them (see :mod:`.bufvec`)."""
        handle = self.handles.get(fi.fh)
        if handle is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        end = min(offset + size, handle.file.info.size)
        pieces = self.reader.pieces(handle, offset, end) if offset < end else []
        if len(pieces) == 1 and isinstance(pieces[0], tuple):
            addr = bufvec.from_file(*pieces[0])
        else:  # several chunks or bytes in memory: one joined copy
            addr = bufvec.from_pieces(pieces)
        bufvec.hand_over(bufpp, addr)
        self.metrics.read_bytes.inc(max(end - offset, 0))
        return 0

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
        self.modes.close()
        self.files.close()
        for _ in range(self.handles.release_all()):
            self.metrics.open_files.dec()
