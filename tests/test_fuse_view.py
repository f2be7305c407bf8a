"""The FUSE view's logic without a mount: paths, attributes, errnos, page-cache flags, verification.

A real :class:`~coldbrew.agent.cache.store.ChunkStore` on a temp dir and a small fake origin stand
behind the view; the view's coroutines run on an event loop in a thread, as in the agent.
(The real mount is exercised in ``test_fuse.py``.)
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from coldbrew.agent.cache.store import ChunkStore, Limits
from coldbrew.agent.config import load_config, parse_globs
from coldbrew.agent.errors import ObjectChanged, ObjectNotFound, OriginUnavailable
from coldbrew.agent.fetch.fetcher import Fetcher, OpenFile
from coldbrew.agent.metrics import AgentMetrics
from coldbrew.agent.origin.health import OriginHealth
from coldbrew.agent.origin.origin import ObjectInfo
from coldbrew.fuse import bufvec
from coldbrew.fuse.metrics import FuseMetrics
from coldbrew.fuse.view import View, ViewSettings, inode_of

KiB = 1 << 10
CHUNK = 64 * KiB


class FakeOrigin:
    """Objects in a dict; counts what the view asked for."""

    root = "s3://b/models"
    can_land = False  # bytes come through read_into, which this fake counts

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.calls: list[str] = []
        self.health = OriginHealth()

    def put(self, rel: str, data: bytes, etag: str = "e1") -> None:
        self.objects[rel] = data
        self.etags[rel] = etag

    def _rel(self, uri: str) -> str:
        return uri[len(self.root):].strip("/")

    async def list_dir(self, uri: str, quick: bool = False) -> list[dict]:
        self.calls.append(f"list {self._rel(uri)}")
        prefix = self._rel(uri)
        prefix = prefix + "/" if prefix else ""
        out: dict[str, dict] = {}
        for rel, data in self.objects.items():
            if not rel.startswith(prefix):
                continue
            name, _, rest = rel[len(prefix):].partition("/")
            if rest:
                out[name] = {"uri": f"{self.root}/{prefix}{name}", "name": name, "type": "directory", "size": 0}
            else:
                out[name] = {"uri": f"{self.root}/{rel}", "name": name, "type": "file", "size": len(data),
                             "etag": self.etags[rel]}
        if not out and prefix:
            raise ObjectNotFound(f"{uri}: nothing here")
        return list(out.values())

    async def stat(self, uri: str, quick: bool = False) -> ObjectInfo:
        rel = self._rel(uri)
        self.calls.append(f"stat {rel}")
        if rel not in self.objects:
            raise ObjectNotFound(f"{uri} not found")
        return ObjectInfo(uri, len(self.objects[rel]), self.etags[rel], 1_700_000_000.5)

    async def read_into(self, info: ObjectInfo, start: int, buf: memoryview) -> None:
        rel = self._rel(info.uri)
        self.calls.append(f"get {rel} {start}")
        if self.etags[rel] != info.etag:
            raise ObjectChanged(f"{info.uri} changed")
        buf[:] = self.objects[rel][start:start + len(buf)]


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, daemon=True)
    t.start()
    yield lp

    async def drain() -> None:  # read-ahead a test started must not outlive its loop
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(drain(), lp).result(5)
    lp.call_soon_threadsafe(lp.stop)
    t.join(5)
    lp.close()


@pytest.fixture
def world(tmp_path, loop):
    origin = FakeOrigin()
    metrics = AgentMetrics()
    store = ChunkStore(tmp_path / "cache", CHUNK, Limits(None, 0), metrics)
    store.open()

    async def make() -> Fetcher:
        fetcher = Fetcher(origin, store, metrics, concurrency=2)  # type: ignore[arg-type]
        fetcher.stat = origin.stat  # no stat cache: every refresh is visible in origin.calls
        return fetcher

    fetcher = asyncio.run_coroutine_threadsafe(make(), loop).result(5)
    view = View(fetcher, loop, ViewSettings(read_timeout_s=5, metadata_ttl_s=60), FuseMetrics(metrics.registry))
    yield SimpleNamespace(origin=origin, store=store, fetcher=fetcher, view=view, metrics=metrics)
    view.close()
    store.close()


def _errno(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def _fi(flags: int = os.O_RDONLY) -> SimpleNamespace:
    return SimpleNamespace(flags=flags, fh=0, keep_cache=0, direct_io=0)


def _read(view: View, path: str, size: int, offset: int, fi) -> bytes:
    """What libfuse would send: the vector read_buf builds, read back, then freed."""
    slot = ctypes.c_void_p()
    assert view.read_buf(path, ctypes.pointer(slot), size, offset, fi) == 0
    try:
        return bufvec.read_back(slot.value)
    finally:
        bufvec.release(slot.value)


# --- pure parts ------------------------------------------------------------------------------


def test_inode_numbers_are_stable_distinct_and_never_reserved():
    paths = [f"m/{i}/model-{j}.safetensors" for i in range(100) for j in range(100)]
    inodes = [inode_of(p) for p in paths]
    assert len(set(inodes)) == len(paths)
    assert inodes == [inode_of(p) for p in paths]
    assert inode_of("") == 1 and all(i > 1 for i in inodes) and all(i < 2**63 for i in inodes)


def test_prefetch_globs_parse():
    assert parse_globs("*.safetensors, *.bin") == ("*.safetensors", "*.bin")
    assert parse_globs("none") == () and parse_globs("") == ()
    assert parse_globs(["*.gguf"]) == ("*.gguf",)
    cfg = load_config(env={"COLDBREW_ORIGIN": "s3://b"})
    assert cfg.mount is None and cfg.fuse_prefetch == ("*.safetensors", "*.bin")
    assert cfg.fuse_read_timeout_s == 60 and cfg.fuse_readahead == 4 << 20
    cfg = load_config(env={"COLDBREW_ORIGIN": "s3://b", "COLDBREW_FUSE_PREFETCH": "*"}, flags={"mount": "/models"})
    assert str(cfg.mount) == "/models" and cfg.fuse_prefetch == ("*",)


# --- metadata and errnos ------------------------------------------------------------------------


def test_attributes_listing_and_errnos(world):
    world.origin.put("llama/model.safetensors", b"x" * 1000)
    world.origin.put("llama/tok/vocab.json", b"{}")
    view = world.view
    root = view.getattr("/")
    assert stat.S_ISDIR(root["st_mode"]) and root["st_ino"] == 1
    a = view.getattr("/llama/model.safetensors")
    assert stat.S_ISREG(a["st_mode"]) and a["st_mode"] & 0o777 == 0o444 and a["st_size"] == 1000
    assert a["st_mtime"] == 1_700_000_000_500_000_000 and a["st_ino"] == inode_of("llama/model.safetensors")
    assert stat.S_ISDIR(view.getattr("/llama/tok")["st_mode"])
    names = [n for n, _, _ in view.readdir("/llama", 0)]
    assert names == [".", "..", "model.safetensors", "tok"]
    assert _errno(view.getattr, "/llama/missing") == errno.ENOENT
    assert _errno(view.getattr, "/nowhere/missing") == errno.ENOENT
    assert _errno(view.getattr, "/llama/model.safetensors/x") == errno.ENOTDIR
    assert _errno(view.readdir, "/llama/model.safetensors", 0) == errno.ENOTDIR
    assert _errno(view.opendir, "/llama/model.safetensors") == errno.ENOTDIR
    assert _errno(view.open, "/llama/tok", _fi()) == errno.EISDIR
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        assert _errno(view.open, "/llama/model.safetensors", _fi(flags)) == errno.EROFS
    for op, args in (("mkdir", ("/x", 0o755)), ("unlink", ("/llama/model.safetensors",)),
                     ("rename", ("/a", "/b")), ("chmod", ("/llama", 0o777)), ("truncate", ("/a", 0)),
                     ("create", ("/n", 0o644, _fi())), ("write", ("/a", b"x", 0, _fi())),
                     ("setxattr", ("/a", "user.x", b"1", 0)), ("symlink", ("/a", "/b"))):
        assert _errno(getattr(view, op), *args) == errno.EROFS, op
    # One listing per directory however many lookups (within metadata_ttl_s).
    for _ in range(5):
        view.getattr("/llama/tok/vocab.json")
    assert world.origin.calls.count("list llama") == 1
    assert world.metrics.value("coldbrew_fuse_ops_total", op="getattr", outcome="ENOENT") == 2


def test_reads_are_exact_pinned_and_verified(world):
    data = os.urandom(5 * CHUNK + 123)
    world.origin.put("m/w.dat", data)
    view = world.view
    fi = _fi()
    view.open("/m/w.dat", fi)
    handle = view.handles.get(fi.fh)
    assert world.store.pinned(handle.file.entry)
    assert _read(view, "/m/w.dat", 1000, 0, fi) == data[:1000]
    assert _read(view, "/m/w.dat", 2 * CHUNK, CHUNK - 10, fi) == data[CHUNK - 10:3 * CHUNK - 10]  # spans
    assert _read(view, "/m/w.dat", 10_000, len(data) - 50, fi) == data[-50:]  # short at the end
    assert _read(view, "/m/w.dat", 10, len(data), fi) == b""
    # A byte flipped in the data file (not by the store) is caught at the next open: the
    # chunk is dropped, counted and fetched again; the chunks around it are checked again.
    # The flip comes after the read-ahead has settled: a store write after it would record
    # the flip's mtime as its own (the mtime check sees writes *since* the store's last).
    entry = handle.file.entry
    view.release("/m/w.dat", fi)
    _settle(world.store, handle.file.entry)
    assert not world.store.pinned(handle.file.entry)
    with open(entry.data_path, "r+b") as f:
        f.seek(CHUNK + 5)
        b = f.read(1)
        f.seek(CHUNK + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    fi = _fi()
    view.open("/m/w.dat", fi)
    gets = sum(c.startswith("get ") for c in world.origin.calls)
    assert _read(view, "/m/w.dat", 2 * CHUNK, 0, fi) == data[:2 * CHUNK]
    assert world.metrics.value("coldbrew_corrupt_chunks_total", source="cache") == 1
    assert sum(c.startswith("get ") for c in world.origin.calls) == gets + 1
    # The store's own writes do not void what was checked: the next open checks nothing.
    view.release("/m/w.dat", fi)
    fi = _fi()
    view.open("/m/w.dat", fi)
    checked = dict(view.files._checked)
    assert _read(view, "/m/w.dat", 2 * CHUNK, 0, fi) == data[:2 * CHUNK]
    assert view.files._checked == checked and (entry.key, 0) in checked, "chunk 0 was hashed once"
    assert 1 in entry.known_good, "chunk 1 was written by the store from checked bytes"
    view.release("/m/w.dat", fi)
    _settle(world.store, entry)


def _settle(store, entry) -> None:
    """Wait for the read-ahead that sequential reads start (it pins the file) to end."""
    deadline = time.monotonic() + 5
    while store.pinned(entry) and time.monotonic() < deadline:
        time.sleep(0.01)


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_reads_hand_libfuse_descriptors_that_stay_open_while_it_may_use_them(world, monkeypatch):
    """read_buf answers with (fd, offset): libfuse reads the bytes after we return, so a
    descriptor dropped from the view's table meanwhile is closed only after the thread that
    served it moves on, and a file's descriptor is closed when its last handle is released."""
    import coldbrew.fuse.datafiles as datafiles_module

    monkeypatch.setattr(datafiles_module, "_FDS_KEPT", 2)
    files = {name: os.urandom(2 * CHUNK) for name in ("a", "b", "c")}
    for name, data in files.items():
        world.origin.put(f"m/{name}.dat", data)
    view = world.view
    before = _open_fds()
    fis = {}
    for name in files:
        fis[name] = _fi()
        view.open(f"/m/{name}.dat", fis[name])

    # Another thread (a libfuse worker) serves a.dat and keeps its reply's descriptor.
    worker = ThreadPoolExecutor(1)
    slot = ctypes.c_void_p()
    worker.submit(view.read_buf, "/m/a.dat", ctypes.pointer(slot), 100, 0, fis["a"]).result()
    try:
        fd_a = bufvec.FuseBufVec.from_address(slot.value).buf[0].fd
        assert bufvec.read_back(slot.value) == files["a"][:100]
    finally:
        bufvec.release(slot.value)
    # This thread reads b and c: a's descriptor leaves the table (only 2 are kept), but
    # the worker's last reply used it, so it must still be open.
    for name in ("b", "c"):
        assert _read(view, f"/m/{name}.dat", 100, CHUNK, fis[name]) == files[name][CHUNK:CHUNK + 100]
    a_key = view.handles.get(fis["a"].fh).file.entry.key
    assert a_key not in view.files._files, "a.dat was dropped from the table"
    a_data = view.handles.get(fis["a"].fh).file.entry.data_path
    assert _is_open(fd_a) and os.fstat(fd_a).st_ino == a_data.stat().st_ino, \
        "closed while libfuse could still be reading from it"
    assert len(_open_fds() - before) <= 3  # 2 kept + the one held for the worker
    # Once the worker serves something else, the old descriptor is closed.
    assert worker.submit(_read, view, "/m/c.dat", 100, 0, fis["c"]).result() == files["c"][:100]
    assert not _is_open(fd_a)
    # A read spanning two chunks of one file is one range of its data file (no copy).
    slot = ctypes.c_void_p()
    view.read_buf("/m/b.dat", ctypes.pointer(slot), 200, CHUNK - 100, fis["b"])
    try:
        vec = bufvec.FuseBufVec.from_address(slot.value)
        assert vec.count == 1 and vec.buf[0].fd >= 0 and vec.buf[0].size == 200
        assert bufvec.read_back(slot.value) == files["b"][CHUNK - 100:CHUNK + 100]
    finally:
        bufvec.release(slot.value)
    # A worker that served last and then went away (libfuse ends idle threads) holds nothing
    # once the files are released.
    assert worker.submit(_read, view, "/m/a.dat", 100, 0, fis["a"]).result() == files["a"][:100]
    worker.shutdown()
    for name in files:
        view.release(f"/m/{name}.dat", fis[name])
    assert _open_fds() == before, "descriptors leaked after the last release"


def test_reads_are_exact_when_the_cache_cannot_store_chunks(tmp_path, loop):
    """A cache with room for only the 7-byte last chunk: the others come back from the
    fetcher as bytes and the view answers from memory (a malloc'd piece libfuse frees),
    still exact, also for a read joining a chunk in memory and one in a file."""
    origin = FakeOrigin()
    data = os.urandom(3 * CHUNK + 7)
    origin.put("m/full.dat", data)
    metrics = AgentMetrics()
    store = ChunkStore(tmp_path / "cache", CHUNK, Limits(CHUNK // 2, 0), metrics)
    store.open()

    async def make() -> Fetcher:
        return Fetcher(origin, store, metrics, concurrency=2)  # type: ignore[arg-type]

    fetcher = asyncio.run_coroutine_threadsafe(make(), loop).result(5)
    view = View(fetcher, loop, ViewSettings(read_timeout_s=5, prefetch=()), FuseMetrics(metrics.registry))
    try:
        fi = _fi()
        view.open("/m/full.dat", fi)
        assert _read(view, "/m/full.dat", 1000, 5, fi) == data[5:1005]
        assert _read(view, "/m/full.dat", 2 * CHUNK, CHUNK // 2, fi) == data[CHUNK // 2:CHUNK // 2 + 2 * CHUNK]
        assert _read(view, "/m/full.dat", CHUNK, 3 * CHUNK - 3, fi) == data[3 * CHUNK - 3:]
        handle = view.handles.get(fi.fh)
        assert set(handle.uncached) == {0, 1, 2}, "served from memory"
        assert not any(store.has(handle.file.entry, i) for i in range(3))
        assert list(view.files._files) == [handle.file.entry.key], "the last chunk came from its file"
        assert 3 in handle.file.entry.known_good
        view.release("/m/full.dat", fi)
    finally:
        view.close()
        store.close()


def test_object_changed_under_an_open_file(world):
    data = os.urandom(5 * CHUNK)
    world.origin.put("m/v.dat", data)
    view = world.view
    fi = _fi()
    view.open("/m/v.dat", fi)
    assert _read(view, "/m/v.dat", 100, 0, fi) == data[:100]
    world.origin.put("m/v.dat", os.urandom(100), etag="e2")
    assert _read(view, "/m/v.dat", 100, 0, fi) == data[:100], "cached: the pinned version"
    assert _errno(_read, view, "/m/v.dat", 100, 3 * CHUNK, fi) == errno.ESTALE
    assert view.getattr("/m/v.dat", fi)["st_size"] == len(data), "fstat: the pinned version"
    assert view.getattr("/m/v.dat")["st_size"] == 100, "the view forgot the old version at once"
    view.release("/m/v.dat", fi)
    fi = _fi()
    view.open("/m/v.dat", fi)
    assert _read(view, "/m/v.dat", 1000, 0, fi) == world.origin.objects["m/v.dat"]
    view.release("/m/v.dat", fi)


def test_page_cache_flags_follow_the_etag(world):
    world.origin.put("m/a.bin", b"1" * 100, etag="e1")
    view = world.view

    def opened():
        fi = _fi()
        view.open("/m/a.bin", fi)
        return fi

    first = opened()
    assert (first.keep_cache, first.direct_io) == (0, 0), "first open: the kernel starts clean"
    again = opened()
    assert (again.keep_cache, again.direct_io) == (1, 0), "same ETag: keep the kernel's pages"
    world.origin.put("m/a.bin", b"2" * 100, etag="e2")
    view.forget("m/a.bin")
    newer = opened()
    assert (newer.keep_cache, newer.direct_io) == (0, 1), "two versions open at once: bypass the cache"
    for fi in (first, again, newer):
        view.release("/m/a.bin", fi)
    clean = opened()
    assert (clean.keep_cache, clean.direct_io) == (0, 0), "after a mix: drop the kernel's pages once"
    assert (opened().keep_cache, opened().direct_io) == (1, 0)


class KernelRules:
    """Stands in for the kernel's side of passthrough (the real one is in test_fuse.py): hands
    out backing ids and enforces its rules per inode (Linux 6.9+, fs/fuse/iomode.c): an inode
    passed through takes only passthrough opens of the same backing file (any other open
    fails with EIO), and no passthrough open while it is open with the page cache. A
    direct_io open uses no page cache unless it is mmapped (which this fake never does)."""

    enabled = True

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.files: dict[int, int] = {}  # backing id -> inode of the file registered
        self.closed: list[int] = []
        self.inode: dict[str, tuple[str, int]] = {}  # path -> ("passthrough", id) / ("cached", opens)

    def register(self, fd: int) -> int:
        backing_id = next(self.ids)
        self.files[backing_id] = os.fstat(fd).st_ino
        return backing_id

    def unregister(self, backing_id: int) -> None:
        self.closed.append(backing_id)

    def answer(self, fi, backing_id: int) -> None:
        fi.keep_cache = fi.direct_io = 0
        fi.backing_id = backing_id

    def opened(self, path: str, fi) -> str:
        """What the kernel would do with the view's answer; AssertionError where it refuses."""
        mode, held = self.inode.get(path, ("", 0))
        if getattr(fi, "backing_id", 0):
            assert mode != "cached", "ETXTBSY: the inode is open with the page cache"
            assert mode == "" or held == fi.backing_id, "EBUSY: another backing file"
            self.inode[path] = ("passthrough", fi.backing_id)
            return "passthrough"
        assert mode != "passthrough", "EIO: the inode is passed through"
        if fi.direct_io:
            return "direct"
        self.inode[path] = ("cached", held + 1)
        return "cached"

    def released(self, path: str, mode: str) -> None:
        """The kernel leaves an inode's io mode when the last open in it closes."""
        held_mode, n = self.inode.get(path, ("", 0))
        if held_mode == "cached" and mode == "cached":
            self.inode[path] = ("cached", n - 1) if n > 1 else ("", 0)
        elif held_mode == "passthrough" and mode == "passthrough" and not any(
                h.mode == "passthrough" for h in self.view.handles.values()):
            del self.inode[path]


def _kernel_world(world, direct_mmap: bool):
    kernel = KernelRules()
    kernel.view = world.view
    world.view.modes.passthrough = kernel  # type: ignore[assignment]
    world.view.modes.direct_mmap = direct_mmap

    def opened(path: str):
        fi = _fi()
        world.view.open(path, fi)
        return fi, kernel.opened(path.strip("/"), fi)

    def release(path: str, fi) -> None:
        mode = world.view.handles.get(fi.fh).mode
        world.view.release(path, fi)
        kernel.released(path.strip("/"), mode)

    return kernel, opened, release


def test_passthrough_obeys_the_kernels_rules_per_inode(world):
    kernel, opened, release = _kernel_world(world, direct_mmap=True)
    view = world.view
    data = os.urandom(2 * CHUNK + 5)
    world.origin.put("m/p.dat", data, etag="e1")

    cold, mode = opened("/m/p.dat")
    assert mode == "direct", "not cached yet: streamed through the agent, no page cache"
    assert _read(view, "/m/p.dat", len(data), 0, cold) == data
    second, mode = opened("/m/p.dat")
    assert mode == "direct", "whole now, but an open that may mmap the page cache remains"
    release("/m/p.dat", cold)
    release("/m/p.dat", second)
    first, mode = opened("/m/p.dat")
    assert mode == "passthrough" and first.backing_id == 1
    entry = view.handles.get(first.fh).file.entry
    assert kernel.files[1] == entry.data_path.stat().st_ino, "the cache's data file is the backing file"
    again, mode = opened("/m/p.dat")
    assert mode == "passthrough" and again.backing_id == 1, "one backing file per inode"

    world.origin.put("m/p.dat", os.urandom(3 * CHUNK), etag="e2")
    view.forget("m/p.dat")
    held, mode = opened("/m/p.dat")
    assert mode == "passthrough" and held.backing_id == 1, "the kernel takes no other open"
    assert _read(view, "/m/p.dat", len(data) + 9, 0, held) == data, "the version passed through"
    assert view.getattr("/m/p.dat")["st_size"] == len(data), "and the path shows it"
    for fi in (first, again, held):
        release("/m/p.dat", fi)
    assert kernel.closed == [1], "the id goes when its last open does"
    assert view.getattr("/m/p.dat")["st_size"] == 3 * CHUNK
    newer, mode = opened("/m/p.dat")
    assert mode == "direct" and _read(view, "/m/p.dat", 10, 0, newer) == world.origin.objects["m/p.dat"][:10]
    release("/m/p.dat", newer)
    assert world.metrics.value("coldbrew_fuse_opens_total", mode="passthrough") == 3
    assert world.metrics.value("coldbrew_fuse_opens_total", mode="direct") == 3


def test_without_direct_mmap_cold_opens_use_the_page_cache_and_wait_for_passthrough(world):
    """Passthrough without mmap of direct_io files (Linux has had both since 6.9, but the view
    must not rely on it): cold opens use the page cache, and hold passthrough off."""
    kernel, opened, release = _kernel_world(world, direct_mmap=False)
    data = os.urandom(CHUNK + 7)
    world.origin.put("m/c.dat", data)
    cold, mode = opened("/m/c.dat")
    assert mode == "cached" and _read(world.view, "/m/c.dat", len(data), 0, cold) == data
    second, mode = opened("/m/c.dat")
    assert mode == "cached", "whole now, but the kernel allows no passthrough beside the page cache"
    release("/m/c.dat", cold)
    release("/m/c.dat", second)
    third, mode = opened("/m/c.dat")
    assert mode == "passthrough"
    release("/m/c.dat", third)


def test_a_dropped_chunk_is_fetched_again_before_an_open_joins_the_passthrough(world):
    kernel, opened, release = _kernel_world(world, direct_mmap=True)
    view = world.view
    data = os.urandom(3 * CHUNK)
    world.origin.put("m/d.dat", data)
    warm, _ = opened("/m/d.dat")
    assert _read(view, "/m/d.dat", len(data), 0, warm) == data
    release("/m/d.dat", warm)
    first, mode = opened("/m/d.dat")
    assert mode == "passthrough"
    entry = view.handles.get(first.fh).file.entry
    world.store.drop_chunk(entry, 1)  # e.g. found corrupt by a reader of the cache's API
    gets = [c for c in world.origin.calls if c.startswith("get ")]
    joined, mode = opened("/m/d.dat")
    assert mode == "passthrough" and world.store.has(entry, 1)
    assert [c for c in world.origin.calls if c.startswith("get ")] == [*gets, f"get m/d.dat {CHUNK}"], \
        "exactly the dropped chunk"
    with open(entry.data_path, "rb") as f:
        assert f.read() == data, "the data file the kernel reads is whole again"

    async def down(*_):
        raise OriginUnavailable("the origin is down")

    world.store.drop_chunk(entry, 2)
    world.origin.read_into = down  # type: ignore[method-assign]
    refused = _fi()
    assert _errno(view.open, "/m/d.dat", refused) == errno.EIO, "never a hole passed through"
    assert view.modes.page("m/d.dat").backing.opens == 2, "the opens passed through are untouched"
    for fi in (first, joined):
        release("/m/d.dat", fi)
    assert kernel.closed == [1] and view.modes.page("m/d.dat").backing is None


def test_a_refused_backing_file_turns_passthrough_off_and_the_open_still_works(world):
    """Without CAP_SYS_ADMIN the kernel refuses to register a backing file: that open, and
    every later one, reads through the agent."""
    from coldbrew.fuse.passthrough import Passthrough

    class Refusing(Passthrough):
        def __init__(self) -> None:  # no libfuse session here: the ioctl itself is refused
            self.enabled = True
            self.asked = 0

        def _fd(self) -> int:
            self.asked += 1
            raise PermissionError(errno.EPERM, "Operation not permitted")

    refusing = Refusing()
    view = world.view
    view.modes.passthrough = refusing
    data = os.urandom(CHUNK + 3)
    world.origin.put("m/r.dat", data)
    fi = _fi()
    view.open("/m/r.dat", fi)
    assert _read(view, "/m/r.dat", len(data), 0, fi) == data
    view.release("/m/r.dat", fi)
    for _ in range(2):  # whole now: passthrough is tried once, refused, and not tried again
        fi = _fi()
        view.open("/m/r.dat", fi)
        assert _read(view, "/m/r.dat", 10, 0, fi) == data[:10]
        view.release("/m/r.dat", fi)
    assert refusing.asked == 1 and not refusing.enabled
    assert world.metrics.value("coldbrew_fuse_opens_total", mode="cached") == 3


def test_a_stalled_origin_is_eio_after_the_deadline(world):
    world.origin.put("m/slow.dat", b"z" * CHUNK)

    async def stall(info, start, buf):
        await asyncio.sleep(0.6)
        raise OriginUnavailable("the origin is down")

    world.origin.read_into = stall
    view = View(world.fetcher, world.view.loop, ViewSettings(read_timeout_s=0.3), world.view.metrics)
    fi = _fi()
    view.open("/m/slow.dat", fi)
    assert _errno(_read, view, "/m/slow.dat", 10, 0, fi) == errno.EIO
    assert world.metrics.value("coldbrew_fuse_timeouts_total", op="read") == 1
    view.release("/m/slow.dat", fi)
    time.sleep(0.5)  # let the abandoned fetch end before the loop stops


def test_prefetch_on_open_follows_the_globs(world, loop):
    world.origin.put("m/model.safetensors", b"s" * (3 * CHUNK))
    world.origin.put("m/notes.txt", b"t" * (3 * CHUNK))
    view = world.view
    for path in ("/m/model.safetensors", "/m/notes.txt"):
        fi = _fi()
        view.open(path, fi)
        f: OpenFile = view.handles.get(fi.fh).file

        async def settle(f=f):
            task = world.fetcher._prefetch.get(f.entry.key)
            if task is not None:
                await task
            return len(f.entry.present)

        cached = asyncio.run_coroutine_threadsafe(settle(), loop).result(5)
        assert cached == (3 if path.endswith(".safetensors") else 0), path
        view.release(path, fi)
