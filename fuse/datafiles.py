"""The cache's data files as the view serves them: held open, their chunks checked, and their
descriptors closed only once libfuse is done with them.

Checks. A chunk is checked against its digest before it is first served from a data file,
and the check is remembered until its bytes land again (the store's per-chunk stamp).
Chunks the store wrote itself from bytes that matched their digest are known good
(``Entry.known_good``) and need no check. At every open the data file's mtime is compared
with the store's own last write: if something else wrote the file, what was known or
checked about it is forgotten, so every chunk is checked again before it is served (and a
replaced file is reopened).

Descriptor lifetime. libfuse reads a reply's bytes from our descriptors after ``read_buf``
returns, on the same thread, before that thread takes its next request. So a descriptor
dropped from the table (it holds ``_FDS_KEPT``) is closed only once no thread's last reply
used it; all of an entry's descriptors are closed when the view's last handle on it goes.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from ..agent.cache import verify
from ..agent.cache.store import ChunkStore, Entry

#: Data files kept open across reads (one descriptor per cached file).
_FDS_KEPT = 256


@dataclass(eq=False)
class DataFile:
    """A cache entry's data file, held open to serve reads from."""

    key: str  # the entry's key
    ino: int
    fd: int
    closed: bool = False


class DataFiles:
    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._files: OrderedDict[str, DataFile] = OrderedDict()
        self._served: dict[int, tuple[int, ...]] = {}  # thread -> descriptors of its last reply
        self._retired: list[DataFile] = []  # dropped from _files, closed once no reply uses them
        #: (entry key, chunk) -> the store's stamp of the bytes checked against the digest.
        self._checked: dict[tuple[str, int], int] = {}
        #: entry key -> (inode, mtime) of its data file when an open last looked.
        self._seen: dict[str, tuple[int, int]] = {}
        self._stripes = [threading.Lock() for _ in range(64)]

    # --- checks --------------------------------------------------------------------------------

    def checked(self, entry: Entry, index: int) -> DataFile | None:
        """The data file, with chunk ``index`` in it checked; None if the chunk is not present
        (any more), the file is gone, or the chunk is corrupt (then dropped and counted)."""
        data = self._open(entry)
        if data is None:
            self.store.drop_chunk(entry, index)
            return None
        key, stamp = (entry.key, index), entry.stamps.get(index)
        if stamp is None:
            return None  # dropped meanwhile: the caller fetches it again
        if index in entry.known_good or self._checked.get(key) == stamp:
            return data
        # Kernel read-ahead asks for several pieces of one chunk at once: check it once.
        with self._stripes[hash(key) % len(self._stripes)]:
            if self._checked.get(key) != stamp:
                if not _intact(data, entry, index):
                    self.store.report_corrupt(entry, index)
                    return None
                self._checked[key] = stamp
        return data

    def whole_and_checked(self, entry: Entry) -> bool:
        """Every chunk present and checked (those not known good are hashed now; a bad one
        is dropped, and the read path fetches it again)."""
        return entry.complete and all(self.checked(entry, index) is not None
                                      for index in range(entry.layout.count))

    def notice_outside_writes(self, entry: Entry) -> None:
        """At open: if someone other than the store wrote the data file (since the last open,
        or since the store's last write), check its chunks again before serving them."""
        try:
            st = os.stat(entry.data_path)
        except OSError:
            return
        now = (st.st_ino, st.st_mtime_ns)
        with self._lock:
            seen = self._seen.get(entry.key)
            self._seen[entry.key] = now
            if seen == now:
                return
            if st.st_mtime_ns != entry.data_mtime_ns:  # not the store's last write
                self.store.distrust(entry)
                for key in [k for k in self._checked if k[0] == entry.key]:
                    del self._checked[key]
            held = self._files.get(entry.key)
            if held is not None and held.ino != st.st_ino:
                self._retire(self._files.pop(entry.key))

    # --- descriptors -----------------------------------------------------------------------------

    def _open(self, entry: Entry) -> DataFile | None:
        """The entry's data file, open (kept across reads); None if it is not on disk."""
        found = self._files.get(entry.key)
        if found is not None and not found.closed:
            return found
        with self._stripes[hash(entry.key) % len(self._stripes)]:
            found = self._files.get(entry.key)
            if found is not None and not found.closed:
                return found
            try:
                fd = os.open(entry.data_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            data = DataFile(entry.key, os.fstat(fd).st_ino, fd)
            with self._lock:
                old = self._files.pop(entry.key, None)
                if old is not None:
                    self._retire(old)
                self._files[entry.key] = data
                while len(self._files) > _FDS_KEPT:
                    self._retire(self._files.popitem(last=False)[1])
        return data

    def hold(self, sources: Iterable[DataFile]) -> bool:
        """Keep ``sources`` open until this thread's next reply (libfuse reads from them after
        ``read_buf`` returns). False if one was closed meanwhile: look them up again."""
        sources = list(sources)
        with self._lock:
            if any(s.closed for s in sources):
                return False
            self._served[threading.get_ident()] = tuple({s.fd for s in sources})
            self._close_retired()
        return True

    def _retire(self, data: DataFile) -> None:  # under _lock
        self._retired.append(data)
        self._close_retired()

    def _close_retired(self) -> None:  # under _lock
        if not self._retired:
            return
        busy = {fd for fds in self._served.values() for fd in fds}
        keep = []
        for data in self._retired:
            if data.fd in busy:
                keep.append(data)
            else:
                data.closed = True
                os.close(data.fd)
        self._retired = keep

    def close_entry(self, key: str) -> None:
        """Close every descriptor of an entry no handle has open: the kernel sends RELEASE only
        after its last read of the file, so none of them is in use (also those a thread that
        has since exited served last)."""
        with self._lock:
            closing = [self._files.pop(key)] if key in self._files else []
            closing += [m for m in self._retired if m.key == key]
            if not closing:
                return
            self._retired = [m for m in self._retired if m.key != key]
            fds = {m.fd for m in closing}
            for data in closing:
                data.closed = True
                os.close(data.fd)
            for tid in [t for t, served in self._served.items() if fds.intersection(served)]:
                del self._served[tid]

    def close(self) -> None:
        with self._lock:
            for data in [*self._files.values(), *self._retired]:
                data.closed = True
                os.close(data.fd)
            self._files.clear()
            self._retired.clear()
            self._served.clear()


def _intact(data: DataFile, entry: Entry, index: int) -> bool:
    """The one integrity check (:mod:`coldbrew.agent.cache.verify`) on the held descriptor;
    an unreadable range counts as not intact: the chunk is dropped and fetched again."""
    start, end = entry.layout.bounds(index)
    return verify.intact_at(data.fd, start, end - start, entry.digests.get(index))
