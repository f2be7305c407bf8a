"""The on-disk chunk cache: its layout, crash safety, verification and eviction.

Layout (a versioned contract — the version is in the path; tests pin it)::

    <cache_dir>/coldbrew-v2/
        LOCK                     flock held by the one agent using this cache
        tmp/                     small files being written (meta, manifest); wiped at start
        files/<kk>/<key>/        one entry per (uri, etag, size); key = FileIdentity.key()
            meta.json            identity + chunk size, written once (temp + rename)
            data                 the file's bytes at their own offsets: a sparse file of the
                                 object's size, chunk i at i * chunk_size
            journal              "<index> <xxh3-128>\\n" after chunk i landed in ``data``,
                                 "<index> -\\n" after it was dropped; the last line per chunk wins
            pieces               "<index> <sha1>\\n": BitTorrent piece hashes (P2P on only)
            manifest.json        the file's whole manifest, once every piece hash is known
            used                 empty; its mtime is the entry's last use (for LRU)

One data file per cached file, not one file per chunk: the FUSE view hands a complete
file to the kernel whole (passthrough: the kernel reads ``data`` itself), the loader maps
it, and P2P is a single-file torrent over it (one piece per chunk) — everyone reads the
very same bytes, never a second copy.

A chunk is written in place (``pwrite`` at its offset; from the origin, piece by piece as
it arrives, through a :class:`Landing` that first allocates the chunk's blocks, so a full
disk is known before its GET) and only then recorded in the journal, so a crash
leaves a chunk either journaled or not: bytes in ``data`` that no journal line vouches for
are never served (and are overwritten when the chunk is fetched again). A dropped chunk's
bytes are punched out of ``data`` (a hole: the space comes back).

No fsync on the hot path: measured here, fsync caps writes at ~0.29 GB/s against
~1.1 GB/s without, below the S3 transport. Durability comes from verification
instead: every chunk read back from disk is checked against its journal digest,
so a chunk torn by a power loss is detected and fetched again — speed lost, not
correctness.

All methods are blocking and thread-safe; the fetcher calls them from worker
threads. Any OSError from the disk becomes :class:`CacheError` (or
:class:`CacheFull`), which callers treat as "serve from origin, uncached".
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import shutil
import threading
import time
import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core import eviction
from .blocks import allocate, punch_hole
from ..errors import CacheError, CacheFull, CorruptData, FileBusy, UsageError
from ..core.manifest import (ChunkLayout, FileIdentity, Manifest, digest, digester, drop_line,
                       journal_line, parse_journal, replay_journal)
from ..metrics import AgentMetrics

log = logging.getLogger("coldbrew.store")

LAYOUT_VERSION = "coldbrew-v2"
#: Layouts of earlier releases: a cache, so removed at start (not converted).
_OLD_LAYOUTS = ("coldbrew-v1",)
#: The file in each entry holding its bytes (also the name of its torrent's one file).
DATA_FILE = "data"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_stamps = itertools.count(1)


def _read_journal(path: Path) -> list[bytes]:
    """The journal's complete lines; a torn tail (crash mid-append) is cut off on disk.

    Cutting matters: the next append would otherwise be glued onto the
    fragment and could read back as another chunk's line ("1" + "3 <d>" = "13 <d>").
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end].splitlines()


def digest_chunk_fd(fd: int, offset: int, length: int) -> str | None:
    """The digest of the chunk at ``offset`` of an open data file; None if the file is too
    short to hold it.

    Hashed through a read-only mmap: no copy and no buffer to allocate (on these VMs
    fresh memory is the expensive part), and the pages it faults in are the ones the
    next reader wants anyway.
    """
    if os.fstat(fd).st_size < offset + length:
        return None
    if length == 0:
        return digest(b"")
    skew = offset % mmap.ALLOCATIONGRANULARITY  # a map starts on a page; a chunk need not
    with mmap.mmap(fd, length + skew, access=mmap.ACCESS_READ, offset=offset - skew) as m:
        if not skew:
            return digest(m)
        with memoryview(m) as whole, whole[skew:] as part:
            return digest(part)


def _digest_chunk(path: Path, offset: int, length: int) -> str | None:
    with open(path, "rb") as f:
        return digest_chunk_fd(f.fileno(), offset, length)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    written = 0
    while written < len(data):  # pwrite may write less than asked (a signal, a full disk)
        written += os.pwrite(fd, data[written:], offset + written)


def _note_own_write(entry: "Entry", st: os.stat_result) -> None:
    # max(): writers finish in any order; an older mtime recorded last would only cost a recheck.
    entry.data_mtime_ns = max(entry.data_mtime_ns, st.st_mtime_ns)


@dataclass
class Entry:
    """One cached file: what is known about its chunks (in memory; disk is the truth)."""

    identity: FileIdentity
    chunk_size: int
    path: Path
    digests: dict[int, str] = field(default_factory=dict)  # every digest ever verified
    present: set[int] = field(default_factory=set)  # chunks journaled present in the data file
    sha1s: dict[int, str] = field(default_factory=dict)  # piece hashes known (P2P)
    last_used: float = 0.0
    #: Per present chunk, a number that is new each time its bytes land: a reader that checked
    #: a chunk remembers the stamp it checked (the FUSE view), and checks again when it changes.
    stamps: dict[int, int] = field(default_factory=dict)
    #: The data file's mtime after the store's (or libtorrent's adopted) last write: a later
    #: mtime means someone else wrote the file, and checks remembered for it are void.
    data_mtime_ns: int = 0
    #: Chunks whose bytes in the data file this process wrote from memory that matched the
    #: digest, or hashed in place: good unless someone else writes the file (``distrust``).
    known_good: set[int] = field(default_factory=set)

    @property
    def key(self) -> str:
        return self.identity.key()

    @property
    def layout(self) -> ChunkLayout:
        return ChunkLayout(self.identity.size, self.chunk_size)

    @property
    def cached_bytes(self) -> int:
        layout = self.layout
        return sum(layout.length(i) for i in self.present)

    @property
    def complete(self) -> bool:
        return len(self.present) == self.layout.count

    @property
    def data_path(self) -> Path:
        """The file holding this entry's bytes, chunk ``i`` at ``i * chunk_size``."""
        return self.path / DATA_FILE

    def offset(self, index: int) -> int:
        return index * self.chunk_size

    def manifest(self) -> Manifest:
        """What is known so far: digests and piece hashes of the chunks seen."""
        count = self.layout.count
        return Manifest(self.identity, self.chunk_size,
                        [self.digests.get(i) for i in range(count)],
                        [self.sha1s.get(i) for i in range(count)])


@dataclass
class Landing:
    """Room held for one chunk, and its entry's data file open to take the chunk in place,
    piece by piece as it arrives (:meth:`ChunkStore.land_piece`), hashed on the way.

    Handed back with :meth:`ChunkStore.commit_landing` or :meth:`ChunkStore.abandon_landing`.
    """

    entry: Entry
    index: int
    fd: int
    offset: int
    length: int
    reserved: int  # bytes of room held (0 when the chunk was already present)
    received: int = 0  # bytes written so far, from the chunk's start
    hasher: Any = None  # the chunk digest of those bytes, so far
    sha1: Any = None  # and their piece hash, where one is wanted (P2P)


@dataclass(frozen=True)
class Limits:
    size_bytes: int | None  # None: no limit but the disk and its reserve
    reserve_bytes: int


class ChunkStore:
    def __init__(self, cache_dir: Path, chunk_size: int, limits: Limits,
                 metrics: AgentMetrics | None = None, piece_hashes: bool = False) -> None:
        self.root = Path(cache_dir) / LAYOUT_VERSION
        self.chunk_size = chunk_size
        self.limits = limits
        self.metrics = metrics
        #: Also record each chunk's SHA-1 (the torrent piece hash) as it is written.
        self.piece_hashes = piece_hashes
        #: Called (with the store lock held, before any file goes) when an entry loses a
        #: chunk or is evicted: P2P must stop serving those files first.
        self.on_change: list[Callable[[Entry], None]] = []
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._pins: Counter[str] = Counter()
        self._used = 0
        #: Room promised to chunks being written now (not yet in ``_used``): without it,
        #: concurrent writers all see the same free space and overshoot the limit.
        self._reserved = 0
        self._lock_fd: int | None = None

    # --- lifecycle --------------------------------------------------------------

    def open(self) -> None:
        """Take the cache, clean what a crash left, and load the index from disk."""
        import fcntl

        try:
            (self.root / "files").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
            self._lock_fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CacheError(f"cannot use cache directory {self.root.parent}: {e.strerror}") from e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"cache directory {self.root.parent} is in use by another agent "
                             "(one agent per cache directory)") from None
        removed = self._wipe_tmp()
        self._remove_old_layouts()
        for meta in sorted(self.root.glob("files/*/*/meta.json")):
            self._load_entry(meta.parent)
        log.info("cache opened", extra={"dir": str(self.root), "files": len(self._entries),
                                        "bytes": self._used, "temp_files_removed": removed})
        self._publish_gauges()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _wipe_tmp(self) -> int:
        count = 0
        for p in (self.root / "tmp").iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            count += 1
        # An entry whose meta.json never landed (crash or full disk at creation) is junk.
        for d in self.root.glob("files/*/*"):
            if not (d / "meta.json").exists():
                shutil.rmtree(d, ignore_errors=True)
        return count

    def _remove_old_layouts(self) -> None:
        import fcntl

        for name in _OLD_LAYOUTS:
            old = self.root.parent / name
            if not old.is_dir() or old.is_symlink():
                continue
            try:  # an agent of that release still running on this directory keeps its files
                fd = os.open(old / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                log.warning("removing a cache of an earlier layout (it is refetched as needed)",
                            extra={"dir": str(old)})
                shutil.rmtree(old, ignore_errors=True)
            except BlockingIOError:
                log.warning("a cache of an earlier layout is in use by another agent; left alone",
                            extra={"dir": str(old)})
            finally:
                os.close(fd)

    def _load_entry(self, path: Path) -> None:
        try:
            meta = json.loads((path / "meta.json").read_bytes())
            identity = FileIdentity(meta["uri"], meta["etag"], int(meta["size"]))
            entry = Entry(identity, int(meta["chunk_size"]), path)
            if identity.key() != path.name:
                raise ValueError("key does not match directory name")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("dropping unreadable cache entry", extra={"path": str(path), "error": str(e)})
            shutil.rmtree(path, ignore_errors=True)
            return
        layout = entry.layout
        entry.digests, entry.present = replay_journal(_read_journal(path / "journal"), layout.count)
        entry.sha1s = parse_journal(_read_journal(path / "pieces"), layout.count, width=40)
        try:
            ok = entry.data_path.is_file() and entry.data_path.stat().st_size == layout.size
        except OSError:
            ok = False
        if not ok and entry.present:  # the bytes the journal vouches for are not there
            log.warning("cache entry lost its data file; its chunks will be fetched again",
                        extra={"uri": identity.uri})
            entry.present.clear()
        entry.stamps = {i: next(_stamps) for i in entry.present}
        try:
            entry.last_used = (path / "used").stat().st_mtime
        except FileNotFoundError:
            entry.last_used = 0.0
        self._entries[entry.key] = entry
        self._used += entry.cached_bytes

    # --- entries ------------------------------------------------------------------

    def entry(self, identity: FileIdentity) -> Entry:
        """The entry for ``identity``, created (meta.json on disk) if new."""
        key = identity.key()
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                return found
            entry = Entry(identity, self.chunk_size, self.root / "files" / key[:2] / key)
            self._entries[key] = entry
        try:
            entry.path.mkdir(parents=True, exist_ok=True)
            self._create_data_file(entry)
            meta = {"format": 2, "uri": identity.uri, "etag": identity.etag,
                    "size": identity.size, "chunk_size": self.chunk_size}
            self._atomic_write(entry.path / "meta.json", json.dumps(meta).encode())
        except OSError as e:
            # The entry still works in memory; chunks will fail to write and be served uncached.
            self._count_write_error(e)
            log.warning("cannot create cache entry", extra={"uri": identity.uri, "error": str(e)})
        self._publish_gauges()
        return entry

    @staticmethod
    def _create_data_file(entry: Entry) -> None:
        """An empty (sparse) data file of the object's size: chunks land at their offsets."""
        fd = os.open(entry.data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, entry.identity.size)
        finally:
            os.close(fd)

    def find(self, key: str) -> Entry | None:
        with self._lock:
            return self._entries.get(key)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def other_versions(self, identity: FileIdentity) -> list[Entry]:
        with self._lock:
            return [e for e in self._entries.values()
                    if e.identity.uri == identity.uri and e.identity != identity]

    def touch(self, entry: Entry) -> None:
        """Mark ``entry`` used now (LRU order survives restarts via the ``used`` file's mtime)."""
        now = time.time()
        if now - entry.last_used < 1.0:
            return  # LRU needs no finer clock; spare the syscall on hot paths
        entry.last_used = now
        try:
            (entry.path / "used").touch()
        except OSError:
            pass

    # --- pins: what is in use is never evicted -----------------------------------

    def pin(self, entry: Entry) -> None:
        with self._lock:
            self._pins[entry.key] += 1

    def unpin(self, entry: Entry) -> None:
        with self._lock:
            self._pins[entry.key] -= 1
            if self._pins[entry.key] <= 0:
                del self._pins[entry.key]

    def pinned(self, entry: Entry) -> bool:
        with self._lock:
            return self._pins.get(entry.key, 0) > 0

    # --- chunks -------------------------------------------------------------------

    def has(self, entry: Entry, index: int) -> bool:
        return index in entry.present

    def read_verified(self, entry: Entry, index: int) -> bytes:
        """Chunk ``index``'s bytes, checked against its digest.

        A mismatch drops the chunk (so it is fetched again), counts it and raises
        :class:`CorruptData`; an unreadable file raises :class:`CacheError`.
        """
        length = entry.layout.length(index)
        try:
            with open(entry.data_path, "rb") as f:
                data = os.pread(f.fileno(), length, entry.offset(index))
        except OSError as e:
            self.drop_chunk(entry, index)
            raise CacheError(f"cannot read cached chunk {index} of {entry.identity.uri}: {e}") from e
        if len(data) != length or digest(data) != entry.digests.get(index):
            self.report_corrupt(entry, index)
            raise CorruptData(f"cached chunk {index} of {entry.identity.uri} failed its digest "
                              "check; it was removed and will be fetched again")
        return data

    def verify_present(self, entry: Entry, index: int) -> bool:
        """True if chunk ``index`` is on disk and intact; a bad one is dropped and counted.

        Hashes through a read-only mmap: no copy, and the pages it faults in are
        the ones the next reader wants anyway.
        """
        try:
            found = _digest_chunk(entry.data_path, entry.offset(index), entry.layout.length(index))
        except OSError:
            self.drop_chunk(entry, index)
            return False
        ok = found is not None and found == entry.digests.get(index)
        if not ok:
            self.report_corrupt(entry, index)
        return ok

    def distrust(self, entry: Entry) -> None:
        """Someone other than the store wrote ``entry``'s data file: check its chunks again
        before serving them without a digest check of their own (FUSE passthrough)."""
        with self._lock:
            entry.known_good.clear()

    def report_corrupt(self, entry: Entry, index: int) -> None:
        """A reader found chunk ``index`` corrupt: count it and drop it."""
        if self.metrics:
            self.metrics.corrupt_chunks.labels("cache").inc()
        log.warning("corrupt chunk dropped", extra={"uri": entry.identity.uri, "chunk": index})
        self.drop_chunk(entry, index)

    def drop_chunk(self, entry: Entry, index: int) -> None:
        """Forget chunk ``index``: journaled as dropped, its blocks given back to the disk."""
        with self._lock:
            self._notify(entry)
            entry.known_good.discard(index)
            entry.stamps.pop(index, None)  # a check of the old bytes must not vouch for new ones
            if index in entry.present:
                entry.present.discard(index)
                self._used -= entry.layout.length(index)
        with contextlib.suppress(OSError):  # a failing disk: the entry is refetched at worst
            with open(entry.path / "journal", "ab") as f:
                f.write(drop_line(index))
        with contextlib.suppress(OSError):
            fd = os.open(entry.data_path, os.O_WRONLY)
            try:
                punch_hole(fd, entry.offset(index), entry.layout.length(index))
                _note_own_write(entry, os.fstat(fd))
            finally:
                os.close(fd)
        self._publish_gauges()

    def write_chunk(self, entry: Entry, index: int, data: memoryview) -> str:
        """Store verified bytes of chunk ``index``: written at its offset, then journaled.
        Returns the digest.

        Raises :class:`CacheFull` when no room can be made, :class:`CacheError`
        when the disk fails, :class:`CorruptData` if the bytes disagree with a
        digest already known for this chunk (a peer or origin returned other bytes).
        """
        chunk_digest = digest(data)
        known = entry.digests.get(index)
        if known is not None and known != chunk_digest:
            raise CorruptData(f"chunk {index} of {entry.identity.uri} arrived with different bytes "
                              "than before (digest mismatch)")
        if len(data) != entry.layout.length(index):
            raise CorruptData(f"chunk {index} of {entry.identity.uri} has {len(data)} bytes, "
                              f"expected {entry.layout.length(index)}")
        with self._room(entry, index, len(data)):
            sha1 = hashlib.sha1(data).hexdigest() if self._wants_sha1(entry, index) else None
            try:
                self._pwrite(entry, entry.offset(index), data)
                self._journal(entry, index, chunk_digest, sha1)
            except OSError as e:
                raise self._write_error(e, entry) from e
            self._mark_present(entry, index, chunk_digest, sha1)
        return chunk_digest

    def open_landing(self, entry: Entry, index: int) -> Landing:
        """Make room for chunk ``index``, give it its disk blocks (:func:`allocate`) and open
        the data file for it to be written in place.

        Raises :class:`CacheFull` / :class:`CacheError` like :meth:`write_chunk` (a full disk
        shows here, before any byte is fetched); then nothing is held.
        """
        length = entry.layout.length(index)
        reserved = 0 if index in entry.present else length
        if reserved:
            self._make_room(reserved, entry)
        fd = -1
        try:
            fd = self._open_data(entry)
            allocate(fd, entry.offset(index), length)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            self._release_room(reserved)
            raise self._write_error(e, entry) from e
        landing = Landing(entry, index, fd, entry.offset(index), length, reserved)
        self._start_landing(landing)
        return landing

    def _start_landing(self, landing: Landing) -> None:
        landing.received, landing.hasher = 0, digester()
        landing.sha1 = hashlib.sha1() if self._wants_sha1(landing.entry, landing.index) else None

    def _wants_sha1(self, entry: Entry, index: int) -> bool:
        """A chunk's piece hash is computed as it is written, once, and only for P2P."""
        return self.piece_hashes and index not in entry.sha1s

    def land_piece(self, landing: Landing, pos: int, piece: memoryview) -> None:
        """Write bytes at ``pos`` of the landing chunk. Pieces come in order; one at ``pos`` 0
        starts the chunk again (the origin was retried). Raises like :meth:`write_chunk`."""
        if pos == 0 and landing.received:
            self._start_landing(landing)
        if pos != landing.received or pos + len(piece) > landing.length:
            raise UsageError(f"chunk {landing.index} of {landing.entry.identity.uri}: piece at "
                             f"{pos} (+{len(piece)}) after {landing.received} of {landing.length} bytes")
        try:
            _pwrite_all(landing.fd, piece, landing.offset + pos)
        except OSError as e:
            raise self._write_error(e, landing.entry) from e
        landing.hasher.update(piece)
        if landing.sha1 is not None:
            landing.sha1.update(piece)
        landing.received += len(piece)

    def commit_landing(self, landing: Landing) -> str:
        """Journal a chunk that landed whole; returns its digest. The landing is closed.

        Raises :class:`CorruptData` if its bytes disagree with a digest verified before
        (their blocks are then given back), :class:`CacheError` if the disk fails.
        """
        entry, index = landing.entry, landing.index
        try:
            if landing.received != landing.length:
                raise CorruptData(f"chunk {index} of {entry.identity.uri}: {landing.received} of "
                                  f"{landing.length} bytes landed")
            chunk_digest = landing.hasher.hexdigest()
            sha1 = landing.sha1.hexdigest() if landing.sha1 is not None else None
            known = entry.digests.get(index)
            if known is not None and known != chunk_digest:
                self._discard_landed(landing)
                raise CorruptData(f"chunk {index} of {entry.identity.uri} arrived with different "
                                  "bytes than before (digest mismatch)")
            try:
                self._journal(entry, index, chunk_digest, sha1)
                _note_own_write(entry, os.fstat(landing.fd))
            except OSError as e:
                raise self._write_error(e, entry) from e
            self._mark_present(entry, index, chunk_digest, sha1)
            return chunk_digest
        finally:
            self._close_landing(landing)

    def abandon_landing(self, landing: Landing) -> None:
        """Close a landing whose chunk did not arrive whole. What part of it was written stays
        unjournaled, never served, and its blocks go back to the disk; a present chunk it had
        begun to overwrite is dropped."""
        if landing.fd >= 0 and (landing.received or landing.index not in landing.entry.present):
            self._discard_landed(landing)
        self._close_landing(landing)

    def _discard_landed(self, landing: Landing) -> None:
        """Give back what a landing wrote (and the blocks allocated for it)."""
        if landing.index in landing.entry.present:  # its old bytes were overwritten
            self.drop_chunk(landing.entry, landing.index)
        else:
            with contextlib.suppress(OSError):
                punch_hole(landing.fd, landing.offset, landing.length)

    def _close_landing(self, landing: Landing) -> None:
        if landing.fd >= 0:
            os.close(landing.fd)
            landing.fd = -1
            self._release_room(landing.reserved)

    def adopt_chunk(self, entry: Entry, index: int, sha1: str, expected: str | None = None) -> str:
        """Take in chunk ``index`` that libtorrent wrote in place and checked against ``sha1``.

        The file is hashed where it lies (page cache: it was just written) for its xxh3
        digest, which must equal ``expected`` (the manifest's, when it has one) and any
        digest verified before; then it is journaled like any other chunk. Returns the digest.
        """
        want = entry.layout.length(index)
        try:
            chunk_digest = _digest_chunk(entry.data_path, entry.offset(index), want)
        except OSError as e:
            raise CacheError(f"cannot read chunk {index} of {entry.identity.uri} from peers: {e}"
                             ) from e
        if chunk_digest is None:
            raise CorruptData(f"chunk {index} of {entry.identity.uri} from peers is not in its "
                              "data file (the file is shorter)")
        known = entry.digests.get(index)
        if known is not None and known != chunk_digest:
            raise CorruptData(f"chunk {index} of {entry.identity.uri} from peers differs from "
                              "the bytes verified before (digest mismatch)")
        if expected is not None and expected != chunk_digest:
            raise CorruptData(f"chunk {index} of {entry.identity.uri} from peers differs from "
                              "its manifest's digest")
        try:
            with self._room(entry, index, want):
                try:
                    self._journal(entry, index, chunk_digest,
                                  sha1 if index not in entry.sha1s else None)
                except OSError as e:
                    raise self._write_error(e, entry) from e
                self._mark_present(entry, index, chunk_digest, sha1)
            with contextlib.suppress(OSError):
                _note_own_write(entry, os.stat(entry.data_path))
        except CacheFull:
            self.drop_chunk(entry, index)  # its blocks go back; libtorrent has it no more
            raise
        return chunk_digest

    @staticmethod
    def _journal(entry: Entry, index: int, chunk_digest: str | None, sha1: str | None) -> None:
        if chunk_digest is not None:
            with open(entry.path / "journal", "ab") as f:
                f.write(journal_line(index, chunk_digest))
        if sha1 is not None:
            with open(entry.path / "pieces", "ab") as f:
                f.write(journal_line(index, sha1))

    def _mark_present(self, entry: Entry, index: int, chunk_digest: str, sha1: str | None) -> None:
        with self._lock:
            entry.digests[index] = chunk_digest
            if sha1 is not None:
                entry.sha1s[index] = sha1
            entry.stamps[index] = next(_stamps)
            entry.known_good.add(index)
            if index not in entry.present:
                entry.present.add(index)
                self._used += entry.layout.length(index)
        self._publish_gauges()

    def piece_hash(self, entry: Entry, index: int) -> str:
        """SHA-1 of present chunk ``index`` (read from disk, verified, and journaled once)."""
        found = entry.sha1s.get(index)
        if found is not None:
            return found
        sha1 = hashlib.sha1(self.read_verified(entry, index)).hexdigest()
        try:
            self._journal(entry, index, None, sha1)
        except OSError as e:
            raise self._write_error(e, entry) from e
        entry.sha1s[index] = sha1
        return sha1

    def save_manifest(self, entry: Entry, manifest: Manifest) -> None:
        """Keep a shareable manifest with the entry (so a restart can seed without rehashing)."""
        try:
            self._atomic_write(entry.path / "manifest.json", manifest.dumps())
        except OSError as e:
            raise self._write_error(e, entry) from e

    def load_manifest(self, entry: Entry) -> Manifest | None:
        try:
            manifest = Manifest.from_json(json.loads((entry.path / "manifest.json").read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable manifest", extra={"uri": entry.identity.uri,
                                                               "error": str(e)})
            return None
        if manifest.identity != entry.identity or manifest.chunk_size != entry.chunk_size:
            return None
        return manifest

    @staticmethod
    def _open_data(entry: Entry) -> int:
        """The entry's data file, open for reading and writing at its full size."""
        fd = os.open(entry.data_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != entry.identity.size:  # recreated: it is every chunk's home
                os.ftruncate(fd, entry.identity.size)
        except OSError:
            os.close(fd)
            raise
        return fd

    @classmethod
    def _pwrite(cls, entry: Entry, offset: int, data: memoryview) -> None:
        fd = cls._open_data(entry)
        try:
            allocate(fd, offset, len(data))  # as a landing does: a full disk fails before a byte
            _pwrite_all(fd, data, offset)
            _note_own_write(entry, os.fstat(fd))
        finally:
            os.close(fd)

    @staticmethod
    def _write_file(path: Path, data: memoryview) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = self.root / "tmp" / f"{path.parent.name}.{path.name}.{threading.get_ident()}"
        self._write_file(tmp, memoryview(data))
        os.rename(tmp, path)

    def _write_error(self, e: OSError, entry: Entry) -> CacheError:
        self._count_write_error(e)
        if e.errno in _FULL_ERRNOS:
            return CacheFull(f"cache disk {self.root.parent} is full; serving "
                             f"{entry.identity.uri} from origin without caching")
        return CacheError(f"cannot write to cache disk {self.root.parent}: {e.strerror or e}")

    def _count_write_error(self, e: OSError) -> None:
        if self.metrics:
            reason = "full" if e.errno in _FULL_ERRNOS else errno.errorcode.get(e.errno or 0, "other")
            self.metrics.cache_write_errors.labels(reason.lower()).inc()

    # --- capacity and eviction -----------------------------------------------------

    def capacity(self) -> int:
        """Most bytes the cache may hold right now (its limit, minus the disk reserve)."""
        try:
            st = os.statvfs(self.root)
            disk_total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        except OSError:
            return self._used
        limit = self.limits.size_bytes if self.limits.size_bytes is not None else disk_total
        return eviction.capacity_bytes(limit, self._used, free, self.limits.reserve_bytes)

    @property
    def used_bytes(self) -> int:
        return self._used

    @contextlib.contextmanager
    def _room(self, entry: Entry, index: int, nbytes: int) -> Iterator[None]:
        """Room for chunk ``index`` held while it is written (none needed if it is present)."""
        if index in entry.present:  # rewriting a present chunk needs no new room
            yield
            return
        self._make_room(nbytes, entry)
        try:
            yield
        finally:
            self._release_room(nbytes)

    def _release_room(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def _make_room(self, nbytes: int, for_entry: Entry) -> None:
        """Evict until ``nbytes`` more fit, and reserve them; CacheFull if they cannot."""
        with self._lock:
            need = self._used + self._reserved + nbytes - self.capacity()
            if need > 0:
                candidates = [eviction.Candidate(e.key, e.cached_bytes, e.last_used,
                                                 self._pins.get(e.key, 0) > 0 or e is for_entry)
                              for e in self._entries.values()]
                for victim in eviction.choose_victims(candidates, need):
                    self._evict_locked(self._entries[victim.key], reason="lru")
                if self._used + self._reserved + nbytes > self.capacity():
                    if self.metrics:
                        self.metrics.cache_write_errors.labels("full").inc()
                    raise CacheFull(f"cache {self.root.parent} is full ({self._used} bytes used, "
                                    "the rest in use); serving from origin without caching")
            self._reserved += nbytes

    def evict(self, entry: Entry) -> int:
        """Remove a whole file from the cache unless it is in use. Returns bytes freed."""
        with self._lock:
            if self._pins.get(entry.key, 0) > 0:
                raise FileBusy(f"{entry.identity.uri} is in use (open or being loaded); "
                                   "not evicted")
            return self._evict_locked(entry, reason="request")

    def _evict_locked(self, entry: Entry, reason: str) -> int:
        self._notify(entry)
        freed = entry.cached_bytes
        self._entries.pop(entry.key, None)
        self._used -= freed
        entry.present.clear()
        shutil.rmtree(entry.path, ignore_errors=True)
        if self.metrics and reason == "lru":
            self.metrics.cache_evictions.inc()
            self.metrics.cache_evicted_bytes.inc(freed)
        log.info("evicted", extra={"uri": entry.identity.uri, "bytes": freed, "reason": reason})
        self._publish_gauges()
        return freed

    def _notify(self, entry: Entry) -> None:
        for hook in self.on_change:
            try:
                hook(entry)
            except Exception as e:  # noqa: BLE001 - a hook must never stop an eviction
                log.warning("cache change hook failed", extra={"uri": entry.identity.uri,
                                                                "error": str(e)})

    def _publish_gauges(self) -> None:
        if self.metrics:
            self.metrics.cache_bytes.set(self._used)
            self.metrics.cache_files.set(sum(1 for e in self._entries.values() if e.present))
            self.metrics.cache_capacity.set(self.capacity())

