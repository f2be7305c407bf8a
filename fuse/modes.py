"""How each open is answered: passed through to the cache's data file, through the mount's
page cache, or ``direct_io`` — decided per path, by what else of that path is open.

Passthrough. A file that is wholly cached, every chunk checked, is opened in passthrough
mode where the kernel and libfuse allow it (:mod:`.passthrough`): the kernel then reads
the data file itself, at its speed, and none of those reads reach the view. The kernel's
rules per inode (Linux 6.9+): while one open of it is passed through, it takes no open
that is not, and no other backing file (it fails such an open with EIO); and no
passthrough beside an open that may use the mount's page cache (a cached open, or an mmap
of a ``direct_io`` one). So while a path is passed through, every open of it is too, to
the same version: a new version of the object at the origin is opened once the last open
of the old one has closed.

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
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from ..agent.cache.store import Entry
from ..agent.fetch.fetcher import OpenFile
from ..agent.origin.origin import ObjectInfo
from .passthrough import Passthrough

log = logging.getLogger("coldbrew.fuse")


@dataclass
class Backing:
    """A data file the kernel passes one path's opens through to."""

    key: str  # the entry (version) passed through
    info: ObjectInfo  # that version, for the opens that join it
    backing_id: int
    fd: int  # ours, closed with the id
    opens: int = 0


@dataclass
class PageState:
    """Per path: the ETag whose bytes the kernel may hold, and the ETags open now."""

    etag: str | None = None
    dirty: bool = False  # two versions were open at once: drop the pages at the next clean open
    open_etags: dict[str, int] = field(default_factory=dict)
    page_opens: int = 0  # opens not passed through, which may use the page cache (mmap)
    backing: Backing | None = None  # passed through to this, while open
    held_etag: str | None = None  # a newer version kept waiting by ``backing`` (logged once)


class OpenModes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pages: dict[str, PageState] = {}
        #: Set by the mount when the kernel and libfuse can pass files through.
        self.passthrough: Passthrough | None = None
        #: Set by the mount when, besides, the kernel lets ``direct_io`` files be mmapped: the
        #: opens not passed through are ``direct_io`` then (see the module's docstring).
        self.direct_mmap = False

    @property
    def can_pass_through(self) -> bool:
        return self.passthrough is not None and self.passthrough.enabled

    def page(self, rel: str) -> PageState | None:
        with self._lock:
            return self._pages.get(rel)

    def held_version(self, rel: str, etag: str | None) -> ObjectInfo | None:
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

    def joins(self, rel: str, key: str) -> bool:
        """True if ``rel`` is passed through to entry ``key`` now (an open of it joins that)."""
        with self._lock:
            page = self._pages.get(rel)
            return page is not None and page.backing is not None and page.backing.key == key

    def opened(self, rel: str, f: OpenFile, whole: bool, fi: Any) -> str | None:
        """Answer ``fi`` for an open of ``f`` and count it; returns the mode, or None (and
        counts nothing) if the path is passed through to another version now."""
        with self._lock:
            page = self._pages.setdefault(rel, PageState())
            mode = self._choose(page, f, whole, fi)
            if mode is not None:
                page.open_etags[f.info.etag] = page.open_etags.get(f.info.etag, 0) + 1
            return mode

    def _choose(self, page: PageState, f: OpenFile, whole: bool, fi: Any) -> str | None:
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
        if others or (self.direct_mmap and self.can_pass_through):
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

    def _pass_through(self, page: PageState, fi: Any) -> str:
        assert page.backing is not None and self.passthrough is not None
        page.backing.opens += 1
        self.passthrough.answer(fi, page.backing.backing_id)
        return "passthrough"

    def _register(self, entry: Entry, info: ObjectInfo) -> Backing | None:
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
        return Backing(entry.key, info, backing_id, fd)

    def _unregister(self, backing: Backing) -> None:
        if self.passthrough is not None:
            self.passthrough.unregister(backing.backing_id)
        os.close(backing.fd)

    def closed(self, rel: str, etag: str, mode: str) -> None:
        """An open counted by :meth:`opened` was released; the last passed through to a
        backing file gives it back to the kernel."""
        with self._lock:
            page = self._pages.get(rel)
            if page is None:
                return
            page.open_etags[etag] = page.open_etags.get(etag, 1) - 1
            if page.open_etags[etag] <= 0:
                del page.open_etags[etag]
            if mode != "passthrough":
                page.page_opens -= 1
            elif page.backing is not None:
                page.backing.opens -= 1
                if page.backing.opens <= 0:
                    self._unregister(page.backing)
                    page.backing, page.held_etag = None, None

    def close(self) -> None:
        """Give every backing file back (the mount is going away)."""
        with self._lock:
            for page in self._pages.values():
                if page.backing is not None:
                    self._unregister(page.backing)
                    page.backing = None
