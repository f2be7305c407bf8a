"""The cache's on-disk layout: the entry directory format, and what is recovered from it at start.

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
            unchecked            present while a peer's manifest is not yet checked against
                                 the origin: a restart drops the entry's chunks
            used                 empty; its mtime is the entry's last use (for LRU)

Recovery. At start the lock is taken, ``tmp/`` and entries whose ``meta.json`` never
landed are removed, caches of earlier layouts are removed (a cache: refetched, not
converted), and each entry is loaded by replaying its journal. A torn last journal line
(a crash mid-append) is cut off on disk; an unreadable or mismatched ``meta.json`` drops
the entry; a data file that is missing or of the wrong size loses the entry's chunks.

Privacy. ``coldbrew-v2/`` is 0700 and every file in it 0600: cached weights are often a
company's most valuable files, and others on the node read them through the FUSE view or the
control socket, which check what they ask for. ``take`` tightens a directory left wider by an
earlier release; the 0700 directory alone already closes its older 0644 files.

Everything here is plain file I/O and raises OSError; what a failure means to the
caller is decided by the store (:mod:`.failures`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
from pathlib import Path

from ..core.manifest import FileIdentity, Manifest, drop_line, journal_line, parse_journal, replay_journal
from ..errors import CacheError
from .blocks import allocate, punch_hole
from .entry import Entry, new_stamp

log = logging.getLogger("coldbrew.store")

LAYOUT_VERSION = "coldbrew-v2"
#: Layouts of earlier releases: a cache, so removed at start (not converted).
OLD_LAYOUTS = ("coldbrew-v1",)
#: meta.json's own format number (inside the layout version).
META_FORMAT = 2
#: The mark of an entry filled under a peer's manifest not yet checked (see the layout).
UNCHECKED = "unchecked"
#: Modes of the layout directory and of every file in it (see "Privacy").
DIR_MODE = 0o700
FILE_MODE = 0o600


def read_journal(path: Path) -> list[bytes]:
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


def _private(path: str, flags: int) -> int:
    """An ``open(..., opener=)`` that creates the file 0600 (see "Privacy")."""
    return os.open(path, flags, FILE_MODE)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    written = 0
    while written < len(data):  # pwrite may write less than asked (a signal, a full disk)
        written += os.pwrite(fd, data[written:], offset + written)


class CacheDir:
    """One cache directory in the current layout: its lock, its entries' files."""

    def __init__(self, cache_dir: Path) -> None:
        self.root = Path(cache_dir) / LAYOUT_VERSION
        self._lock_fd: int | None = None

    # --- taking the directory, and what a crash left ----------------------------------------

    def take(self) -> int:
        """Hold the directory (one agent per cache) and clean what a crash left; returns the
        number of temp files removed. Raises :class:`CacheError`."""
        try:
            self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(self.root, DIR_MODE)  # also a directory an earlier release left 0755
            (self.root / "files").mkdir(mode=DIR_MODE, exist_ok=True)
            (self.root / "tmp").mkdir(mode=DIR_MODE, exist_ok=True)
            self._lock_fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise CacheError(f"cannot use cache directory {self.root.parent}: {e.strerror}") from e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"cache directory {self.root.parent} is in use by another agent "
                             "(one agent per cache directory)") from None
        removed = self._wipe_tmp()
        self._remove_old_layouts()
        return removed

    def release(self) -> None:
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
        for name in OLD_LAYOUTS:
            old = self.root.parent / name
            if not old.is_dir() or old.is_symlink():
                continue
            try:  # an agent of that release still running on this directory keeps its files
                fd = os.open(old / "LOCK", os.O_RDWR | os.O_CREAT, FILE_MODE)
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

    # --- loading entries ---------------------------------------------------------------------

    def load_entries(self) -> list[Entry]:
        """Every readable entry, its journal replayed (unreadable ones are removed)."""
        found = (self._load_entry(meta.parent)
                 for meta in sorted(self.root.glob("files/*/*/meta.json")))
        return [entry for entry in found if entry is not None]

    def _load_entry(self, path: Path) -> Entry | None:
        try:
            meta = json.loads((path / "meta.json").read_bytes())
            identity = FileIdentity(meta["uri"], meta["etag"], int(meta["size"]))
            entry = Entry(identity, int(meta["chunk_size"]), path)
            if identity.key() != path.name:
                raise ValueError("key does not match directory name")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("dropping unreadable cache entry", extra={"path": str(path), "error": str(e)})
            shutil.rmtree(path, ignore_errors=True)
            return None
        layout = entry.layout
        if (path / UNCHECKED).exists():  # a member's manifest was never checked: start clean
            log.warning("dropping chunks that an unchecked peer manifest vouched for",
                        extra={"uri": identity.uri})
            self.clear_chunks(entry)
        entry.digests, entry.present = replay_journal(read_journal(path / "journal"), layout.count)
        entry.sha1s = parse_journal(read_journal(path / "pieces"), layout.count, width=40)
        try:
            ok = entry.data_path.is_file() and entry.data_path.stat().st_size == layout.size
        except OSError:
            ok = False
        if not ok and entry.present:  # the bytes the journal vouches for are not there
            log.warning("cache entry lost its data file; its chunks will be fetched again",
                        extra={"uri": identity.uri})
            entry.present.clear()
        entry.stamps = {i: new_stamp() for i in entry.present}
        try:
            entry.last_used = (path / "used").stat().st_mtime
        except FileNotFoundError:
            entry.last_used = 0.0
        return entry

    # --- an entry's files ----------------------------------------------------------------------

    def entry_path(self, key: str) -> Path:
        return self.root / "files" / key[:2] / key

    def create(self, entry: Entry) -> None:
        """An entry's directory: an empty (sparse) data file of the object's size, for chunks
        to land at their offsets, then its meta.json."""
        entry.path.parent.mkdir(mode=DIR_MODE, exist_ok=True)  # parents=True would make it 0777 & ~umask
        entry.path.mkdir(mode=DIR_MODE, exist_ok=True)
        fd = os.open(entry.data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.ftruncate(fd, entry.identity.size)
        finally:
            os.close(fd)
        identity = entry.identity
        meta = {"format": META_FORMAT, "uri": identity.uri, "etag": identity.etag,
                "size": identity.size, "chunk_size": entry.chunk_size}
        self._atomic_write(entry.path / "meta.json", json.dumps(meta).encode())

    @staticmethod
    def remove(entry: Entry) -> None:
        shutil.rmtree(entry.path, ignore_errors=True)

    @staticmethod
    def mark_used(entry: Entry) -> None:
        """The ``used`` file's mtime is now (LRU order survives restarts)."""
        (entry.path / "used").touch(FILE_MODE)

    @staticmethod
    def journal(entry: Entry, index: int, chunk_digest: str | None, sha1: str | None) -> None:
        """Record chunk ``index`` as landed (its digest) and/or its piece hash."""
        if chunk_digest is not None:
            with open(entry.path / "journal", "ab", opener=_private) as f:
                f.write(journal_line(index, chunk_digest))
        if sha1 is not None:
            with open(entry.path / "pieces", "ab", opener=_private) as f:
                f.write(journal_line(index, sha1))

    @staticmethod
    def forget_chunk(entry: Entry, index: int) -> None:
        """Journal chunk ``index`` as dropped and give its blocks back. A failing disk is
        ignored: at worst the entry is refetched."""
        with contextlib.suppress(OSError):
            with open(entry.path / "journal", "ab", opener=_private) as f:
                f.write(drop_line(index))
        with contextlib.suppress(OSError):
            fd = os.open(entry.data_path, os.O_WRONLY)
            try:
                punch_hole(fd, entry.offset(index), entry.layout.length(index))
                entry.note_own_write(os.fstat(fd))
            finally:
                os.close(fd)

    @staticmethod
    def open_data(entry: Entry) -> int:
        """The entry's data file, open for reading and writing at its full size."""
        fd = os.open(entry.data_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            if os.fstat(fd).st_size != entry.identity.size:  # recreated: it is every chunk's home
                os.ftruncate(fd, entry.identity.size)
        except OSError:
            os.close(fd)
            raise
        return fd

    def write_at(self, entry: Entry, offset: int, data: memoryview) -> None:
        """``data`` written into the entry's data file at ``offset``."""
        fd = self.open_data(entry)
        try:
            allocate(fd, offset, len(data))  # as a landing does: a full disk fails before a byte
            pwrite_all(fd, data, offset)
            entry.note_own_write(os.fstat(fd))
        finally:
            os.close(fd)

    def clear_chunks(self, entry: Entry) -> None:
        """Forget every chunk, digest and piece hash of ``entry``, on disk: empty journals, a
        hole for a data file, no manifest, no :data:`UNCHECKED` mark (that last)."""
        for name in ("journal", "pieces"):
            self._atomic_write(entry.path / name, b"")
        with contextlib.suppress(FileNotFoundError):
            (entry.path / "manifest.json").unlink()
        with contextlib.suppress(OSError):
            fd = os.open(entry.data_path, os.O_WRONLY)
            try:
                punch_hole(fd, 0, entry.identity.size)
                entry.note_own_write(os.fstat(fd))
            finally:
                os.close(fd)
        self.set_unchecked(entry, False)

    @staticmethod
    def set_unchecked(entry: Entry, unchecked: bool) -> None:
        """Mark ``entry`` as filled under a peer's manifest not yet checked against the origin
        (a restart then drops its chunks), or clear the mark."""
        if unchecked:
            (entry.path / UNCHECKED).touch(FILE_MODE)
        else:
            with contextlib.suppress(FileNotFoundError):
                (entry.path / UNCHECKED).unlink()

    # --- manifests -----------------------------------------------------------------------------

    def save_manifest(self, entry: Entry, manifest: Manifest) -> None:
        self._atomic_write(entry.path / "manifest.json", manifest.dumps())

    @staticmethod
    def load_manifest(entry: Entry) -> Manifest | None:
        """The entry's saved manifest; None if there is none, or none usable for it."""
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

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = self.root / "tmp" / f"{path.parent.name}.{path.name}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            view, written = memoryview(data), 0
            while written < len(view):
                written += os.write(fd, view[written:])
        finally:
            os.close(fd)
        os.rename(tmp, path)
