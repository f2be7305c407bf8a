"""The FUSE view with real parts: a real mount, a real S3 server, faults at a proxy, real readers.

Every test mounts under its own temp dir and always unmounts (``fusermount3 -u -z``),
also when it fails. Fault tests prove their faults fired; concurrency tests count the
origin GETs they caused.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.data import put_random
from support.faultproxy import Fault

MiB = 1 << 20
FAST_RETRIES = ["--retry-base-delay-s", "0.01", "--retry-max-delay-s", "0.05", "--retry-attempts", "12"]


def _fuse_missing() -> str | None:
    if os.geteuid() != 0:
        return "mounting in tests needs root"
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        return "needs /dev/fuse and fusermount3 (Debian fuse3)"
    try:
        from coldbrew.fuse.mount import load_mfusepy

        load_mfusepy()
    except Exception as e:
        return f"FUSE binding unavailable: {e}"
    return None


# Skipped only on a developer machine that cannot mount; in CI a missing FUSE is a failure.
pytestmark = pytest.mark.skipif(bool(_fuse_missing()) and not os.environ.get("CI"),
                                reason=_fuse_missing() or "")


@pytest.fixture
def mnt(tmp_path):
    """A mountpoint, unmounted after the test whatever happened."""
    path = tmp_path / "models"
    yield path
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


def _mounted(make_agent, bucket, mnt, proxy=None, extra=()):
    return make_agent(f"s3://{bucket}", endpoint=proxy.url if proxy else None,
                      extra_args=["--mount", str(mnt), "--chunk-size", "1MiB", *FAST_RETRIES, *extra])


def _errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_MMAP_READER = r"""
import hashlib, mmap, sys
with open(sys.argv[1], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    for offset in map(int, sys.argv[2:]):
        print(hashlib.sha256(m[offset:offset + 70_000]).hexdigest())
"""


# --- bytes ---------------------------------------------------------------------------------------


def test_every_byte_is_exact_under_s3_faults(bucket, s3_client, make_agent, proxy, mnt):
    files = {
        "llama/model.safetensors": put_random(s3_client, bucket, "llama/model.safetensors", 8 * MiB + 99, 1),
        "llama/weights.bin": put_random(s3_client, bucket, "llama/weights.bin", 12 * MiB + 7, 2),
        "llama/data/shard.dat": put_random(s3_client, bucket, "llama/data/shard.dat", 10 * MiB + 3, 3),
        "llama/config.json": put_random(s3_client, bucket, "llama/config.json", 333, 4),
        "README": put_random(s3_client, bucket, "README", 10, 5),
        "llama/empty.txt": b"",
    }
    s3_client.put_object(Bucket=bucket, Key="llama/empty.txt", Body=b"")
    agent = _mounted(make_agent, bucket, mnt, proxy, extra=["--fetch-concurrency", "4"])
    # Faults on object bytes (ranged GETs) only; listings and HEADs stay clean.
    proxy.add_fault(Fault.status(503, "SlowDown"), method="GET", ranged_only=True, probability=0.1, seed=1)
    proxy.add_fault(Fault.status(500, "InternalError"), method="GET", ranged_only=True, count=3)
    proxy.add_fault(Fault.truncate(100_000), method="GET", ranged_only=True, probability=0.1, seed=2)
    proxy.add_fault(Fault.reset(), method="GET", ranged_only=True, count=2)

    found = {str(Path(d, f).relative_to(mnt)) for d, _, fs in os.walk(mnt) for f in fs}
    assert found == set(files)

    # Thousands of random preads of a cold file (no prefetch for *.dat: the reads drive the fetches).
    data = files["llama/data/shard.dat"]
    rng = random.Random(7)
    fds = [os.open(mnt / "llama/data/shard.dat", os.O_RDONLY) for _ in range(3)]
    try:
        for fd in fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        bad = 0
        for n in range(6000):  # with the agent's 5000 (tests/test_agent_faults.py): over 10,000
            offset = rng.randrange(len(data))
            length = rng.choice([1, 17, 4096, 65536, MiB + 3, 3 * MiB])
            bad += os.pread(fds[n % 3], length, offset) != data[offset:offset + length]
        assert bad == 0
    finally:
        for fd in fds:
            os.close(fd)

    # A few reads through mmap, of a file not read yet. (In another process: a page fault on the
    # mount holds this process's GIL, and the fault proxy serving that fault runs in this process.)
    weights = files["llama/weights.bin"]
    offsets = [len(weights) - 5, 0, 5 * MiB - 1, 9 * MiB + 12345]
    out = subprocess.run([sys.executable, "-c", _MMAP_READER, str(mnt / "llama/weights.bin"),
                          *map(str, offsets)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [_sha(weights[o:o + 70_000]) for o in offsets]

    # sha256sum of every file, as any program would do it.
    out = subprocess.run(["sha256sum", *sorted(files)], cwd=mnt, capture_output=True, text=True, check=True)
    got = dict(reversed(line.split("  ", 1)) for line in out.stdout.splitlines())
    assert got == {k: _sha(v) for k, v in files.items()}

    fired = proxy.counts["fired"]
    assert fired["status"] >= 4 and fired["truncate"] >= 1 and fired["reset"] == 2, fired
    retries = sum(v for (name, _), v in agent.metrics().items() if name == "coldbrew_origin_retries_total")
    assert retries >= fired["status"] + fired["truncate"]
    assert agent.metric("coldbrew_corrupt_chunks_total", source="cache") == 0
    # (Files wholly cached by the time sha256sum opened them may be passed through to the
    # kernel: those reads never reach the agent, so not every byte is counted here.)
    assert agent.metric("coldbrew_fuse_read_bytes_total") >= len(data) // 2
    assert agent.metric("coldbrew_fuse_ops_total", op="read", outcome="ok") > 0
    assert agent.metric("coldbrew_fuse_op_seconds_count", op="read") > 0
    assert agent.metric("coldbrew_fuse_ops_total", op="getattr", outcome="ENOENT") >= 0


def test_corrupt_chunk_on_disk_is_never_served(bucket, s3_client, make_agent, proxy, mnt):
    data = put_random(s3_client, bucket, "m/rot.dat", 4 * MiB, 11)
    agent = _mounted(make_agent, bucket, mnt, proxy)
    path = mnt / "m/rot.dat"
    assert path.read_bytes() == data
    files = sorted((agent.cache_dir / "coldbrew-v2" / "files").glob("*/*/data"))
    assert len(files) == 1 and files[0].read_bytes() == data
    with open(files[0], "r+b") as f:  # flip one byte of chunk 2 in place
        f.seek(2 * MiB + 777)
        b = f.read(1)
        f.seek(2 * MiB + 777)
        f.write(bytes([b[0] ^ 1]))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel's copy goes; ours is asked again
        proxy.reset_counts()
        assert os.pread(fd, MiB, 2 * MiB) == data[2 * MiB:3 * MiB]
    finally:
        os.close(fd)
    assert agent.metric("coldbrew_corrupt_chunks_total", source="cache") == 1
    assert proxy.counts["ranged_gets"] == 1, "exactly the bad chunk is fetched again"
    assert files[0].read_bytes() == data


def _passthrough_missing() -> str | None:
    from coldbrew.fuse import passthrough
    from coldbrew.fuse.mount import load_mfusepy

    why = passthrough.supported_by(load_mfusepy())
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
    return why or (f"Linux {os.uname().release} has no FUSE passthrough (6.9+)"
                   if release < (6, 9) else None)


# ./dev setup builds a libfuse that has it; like FUSE itself, it is required in CI.
needs_passthrough = pytest.mark.skipif(
    not _fuse_missing() and bool(_passthrough_missing()) and not os.environ.get("CI"),
    reason=(_passthrough_missing() or "") if not _fuse_missing() else "")


def _opens(agent, mode):
    return agent.metric("coldbrew_fuse_opens_total", mode=mode) or 0


def _wait_released(agent):
    """The kernel sends RELEASE after close() has returned: wait until the agent saw it."""
    deadline = time.monotonic() + 5
    while agent.metric("coldbrew_fuse_open_files") and time.monotonic() < deadline:
        time.sleep(0.02)


@needs_passthrough
def test_a_wholly_cached_file_is_passed_through_to_the_kernel(bucket, s3_client, make_agent, mnt):
    data = put_random(s3_client, bucket, "m/pt.dat", 5 * MiB + 3, 21)
    agent = _mounted(make_agent, bucket, mnt)
    agent.cli("prewarm", f"s3://{bucket}/m/pt.dat", "--wait", "--quiet", check=True)
    path = mnt / "m/pt.dat"
    before = agent.metric("coldbrew_fuse_read_bytes_total")
    assert path.read_bytes() == data
    offsets = [len(data) - 5, 0, 3 * MiB - 1]
    out = subprocess.run([sys.executable, "-c", _MMAP_READER, str(path), *map(str, offsets)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [_sha(data[o:o + 70_000]) for o in offsets]
    assert _opens(agent, "passthrough") == 2 and _opens(agent, "cached") == 0
    # The kernel read the cache's data file itself: not one byte was asked of the agent.
    assert agent.metric("coldbrew_fuse_read_bytes_total") == before


def test_with_passthrough_off_cached_files_are_read_through_the_agent(bucket, s3_client, make_agent, mnt):
    data = put_random(s3_client, bucket, "m/off.dat", 2 * MiB + 9, 24)
    agent = _mounted(make_agent, bucket, mnt, extra=["--fuse-passthrough", "false"])
    agent.cli("prewarm", f"s3://{bucket}/m/off.dat", "--wait", "--quiet", check=True)
    assert (mnt / "m/off.dat").read_bytes() == data
    assert _opens(agent, "cached") == 1 and _opens(agent, "passthrough") == 0
    assert agent.metric("coldbrew_fuse_read_bytes_total") == len(data)


@needs_passthrough
def test_passthrough_waits_until_the_file_is_whole_and_no_other_open_remains(
        bucket, s3_client, make_agent, mnt):
    data = put_random(s3_client, bucket, "m/cold.dat", 3 * MiB + 1, 22)
    agent = _mounted(make_agent, bucket, mnt)
    path = mnt / "m/cold.dat"
    with open(path, "rb") as first:  # cold: read through the agent
        assert first.read() == data
        with open(path, "rb") as second:  # whole now, but the kernel allows no passthrough
            assert second.read() == data  # beside an open that may use the page cache (mmap)
    assert _opens(agent, "direct") == 2 and _opens(agent, "passthrough") == 0
    _wait_released(agent)
    with open(path, "rb") as third:
        assert third.read() == data
        with open(path, "rb") as fourth:
            assert fourth.read(100) == data[:100]
    assert _opens(agent, "passthrough") == 2


def _pages_cached(path: Path) -> int:
    """Pages of ``path``'s own page cache (for a file on the mount: the mount's, not the data
    file's), by cachestat(2) (Linux 6.5+)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    span = (ctypes.c_uint64 * 2)(0, 0)  # offset 0, length 0: the whole file
    stat_out = (ctypes.c_uint64 * 5)()  # nr_cache, nr_dirty, nr_writeback, nr_evicted, ...
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, span, stat_out, 0) != 0:  # SYS_cachestat on x86-64 and arm64
            raise OSError(ctypes.get_errno(), "cachestat")
    finally:
        os.close(fd)
    return stat_out[0]


@needs_passthrough
def test_a_cold_read_leaves_one_copy_in_page_cache_and_mmap_still_works(
        bucket, s3_client, make_agent, mnt):
    data = put_random(s3_client, bucket, "m/stream.safetensors", 6 * MiB + 11, 25)
    cold = put_random(s3_client, bucket, "m/mapped.bin", 5 * MiB + 3, 26)
    agent = _mounted(make_agent, bucket, mnt)
    path = mnt / "m/stream.safetensors"
    with open(path, "rb") as f:  # cold: streamed through the agent into this buffer
        assert f.read() == data
    assert _opens(agent, "direct") == 1
    assert agent.metric("coldbrew_fuse_read_bytes_total") == len(data)
    _wait_released(agent)
    assert _pages_cached(path) == 0, "the mount kept no copy: the data file's pages are the one"
    # An mmap of a file opened cold (direct_io) works too: safetensors maps its files.
    offsets = [len(cold) - 9, 0, 2 * MiB + 17]
    out = subprocess.run([sys.executable, "-c", _MMAP_READER, str(mnt / "m/mapped.bin"),
                          *map(str, offsets)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [_sha(cold[o:o + 70_000]) for o in offsets]
    assert _opens(agent, "direct") == 2
    assert _opens(agent, "passthrough") == 1, "cachestat's own open of the whole file"


def test_without_passthrough_the_mount_keeps_its_page_cache(bucket, s3_client, make_agent, mnt):
    """The counterpart of the test above: cachestat does see the mount's own pages."""
    data = put_random(s3_client, bucket, "m/kept.dat", 4 * MiB, 27)
    agent = _mounted(make_agent, bucket, mnt, extra=["--fuse-passthrough", "false"])
    path = mnt / "m/kept.dat"
    assert path.read_bytes() == data
    assert _opens(agent, "cached") == 1
    assert _pages_cached(path) == len(data) // os.sysconf("SC_PAGE_SIZE")


@needs_passthrough
def test_a_new_version_is_opened_once_the_one_passed_through_is_closed(
        bucket, s3_client, make_agent, mnt):
    """The kernel takes no open of an inode passed through that is not passed through to
    the same file: until the old version's last close, the path shows and opens it."""
    v1 = put_random(s3_client, bucket, "m/ver.dat", 3 * MiB, 28)
    agent = _mounted(make_agent, bucket, mnt, extra=["--fuse-metadata-ttl-s", "0.2"])
    agent.cli("prewarm", f"s3://{bucket}/m/ver.dat", "--wait", "--quiet", check=True)
    path = mnt / "m/ver.dat"
    with open(path, "rb") as old:
        assert old.read(100) == v1[:100]
        v2 = put_random(s3_client, bucket, "m/ver.dat", 2 * MiB + 5, 29)
        time.sleep(1.2)  # past the view's metadata TTL and the kernel's attribute cache
        assert os.stat(path).st_size == len(v1)
        with open(path, "rb") as joined:
            assert os.fstat(joined.fileno()).st_size == len(v1)
            assert joined.read() == v1, "one whole version, never a mix, never EIO"
    assert _opens(agent, "passthrough") == 2 and _opens(agent, "direct") == 0
    assert "shows and opens the version open now" in agent.log_path.read_text()
    _wait_released(agent)
    time.sleep(1.1)  # the kernel's attribute cache
    assert os.stat(path).st_size == len(v2)
    assert path.read_bytes() == v2
    assert _opens(agent, "direct") == 1, "v2 is cold: streamed through the agent"


@needs_passthrough
def test_a_byte_flipped_in_a_passed_through_file_is_caught_at_open(
        bucket, s3_client, make_agent, proxy, mnt):
    data = put_random(s3_client, bucket, "m/flip.dat", 4 * MiB, 23)
    agent = _mounted(make_agent, bucket, mnt, proxy)
    agent.cli("prewarm", f"s3://{bucket}/m/flip.dat", "--wait", "--quiet", check=True)
    (cache_file,) = (agent.cache_dir / "coldbrew-v2" / "files").glob("*/*/data")
    path = mnt / "m/flip.dat"
    assert path.read_bytes() == data and _opens(agent, "passthrough") == 1
    with open(cache_file, "r+b") as f:  # the disk rots under the agent
        f.seek(MiB + 4321)
        b = f.read(1)
        f.seek(MiB + 4321)
        f.write(bytes([b[0] ^ 0x10]))
    proxy.reset_counts()
    assert path.read_bytes() == data, "checked at open: the bad chunk is fetched again"
    assert agent.metric("coldbrew_corrupt_chunks_total", source="cache") == 1
    assert proxy.counts["ranged_gets"] == 1, "exactly the bad chunk"
    assert _opens(agent, "passthrough") == 1, "that open went through the agent"
    _wait_released(agent)
    assert path.read_bytes() == data
    assert _opens(agent, "passthrough") == 2, "whole and checked again: passed through"


def test_safetensors_safe_open_over_the_mount(bucket, s3_client, make_agent, mnt, tmp_path):
    np = pytest.importorskip("numpy")
    from safetensors import safe_open
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    tensors = {
        "embed.weight": rng.standard_normal((1024, 768), dtype=np.float32),
        "layers.0.attn.qkv": rng.standard_normal((768, 2304)).astype(np.float16),
        "layers.0.mlp.bias": rng.integers(-2**31, 2**31, size=(3072,), dtype=np.int32),
        "scalar": np.array(3.5, dtype=np.float64),
        "mask": rng.integers(0, 2, size=(17, 33)).astype(np.bool_),
    }
    src = tmp_path / "model.safetensors"
    save_file(tensors, str(src), metadata={"format": "np"})
    s3_client.upload_file(str(src), bucket, "gpt/model.safetensors")
    _mounted(make_agent, bucket, mnt)

    with safe_open(str(src), framework="np") as want, safe_open(str(mnt / "gpt/model.safetensors"),
                                                                framework="np") as got:
        assert sorted(got.keys()) == sorted(want.keys()) == sorted(tensors)
        assert got.metadata() == want.metadata()
        for name in tensors:
            a, b = got.get_tensor(name), want.get_tensor(name)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name


# --- POSIX answers ----------------------------------------------------------------------------------


def test_read_only_every_change_is_refused_and_the_origin_untouched(bucket, s3_client, make_agent, proxy, mnt):
    put_random(s3_client, bucket, "m/a.bin", 2 * MiB, 1)
    put_random(s3_client, bucket, "m/sub/b.json", 100, 2)

    def origin_state():
        listed = s3_client.list_objects_v2(Bucket=bucket)["Contents"]
        return sorted((o["Key"], o["ETag"], o["Size"]) for o in listed)

    before = origin_state()
    _mounted(make_agent, bucket, mnt, proxy)
    f, d = mnt / "m/a.bin", mnt / "m/sub"
    assert f.read_bytes()[:10]  # the view works
    attempts = {
        "open O_WRONLY": lambda: os.open(f, os.O_WRONLY),
        "open O_RDWR": lambda: os.open(f, os.O_RDWR),
        "open O_TRUNC": lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
        "open O_APPEND": lambda: os.open(f, os.O_WRONLY | os.O_APPEND),
        "create": lambda: os.open(mnt / "m/new.bin", os.O_WRONLY | os.O_CREAT, 0o644),
        "create excl": lambda: os.open(mnt / "new.bin", os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644),
        "truncate": lambda: os.truncate(f, 0),
        "unlink": lambda: os.unlink(f),
        "rename": lambda: os.rename(f, mnt / "m/moved.bin"),
        "rename dir": lambda: os.rename(d, mnt / "m/moved"),
        "mkdir": lambda: os.mkdir(mnt / "m/newdir"),
        "rmdir": lambda: os.rmdir(d),
        "symlink": lambda: os.symlink("a.bin", mnt / "m/link"),
        "link": lambda: os.link(f, mnt / "m/hard"),
        "chmod": lambda: os.chmod(f, 0o777),
        "chown": lambda: os.chown(f, 1000, 1000),
        "utime": lambda: os.utime(f, (1, 1)),
        "mkfifo": lambda: os.mkfifo(mnt / "m/fifo"),
        "mknod": lambda: os.mknod(mnt / "m/node", 0o600 | stat.S_IFREG),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
        "removexattr": lambda: os.removexattr(f, "user.x"),
    }
    answers = {name: _errno_of(fn) for name, fn in attempts.items()}
    assert answers == {name: errno.EROFS for name in attempts}
    assert origin_state() == before
    methods = proxy.counts["by_method"]
    assert set(methods) <= {"GET", "HEAD"}, methods


def test_posix_answers(bucket, s3_client, make_agent, mnt):
    data = put_random(s3_client, bucket, "m/w.bin", 3 * MiB + 1, 1)
    put_random(s3_client, bucket, "m/sub/deep/x.txt", 5, 2)
    agent = _mounted(make_agent, bucket, mnt)
    f = mnt / "m/w.bin"

    assert _errno_of(os.stat, mnt / "m/missing.bin") == errno.ENOENT
    assert _errno_of(os.stat, mnt / "nope/missing.bin") == errno.ENOENT
    assert _errno_of(os.listdir, mnt / "nope") == errno.ENOENT
    assert _errno_of(os.stat, f / "x") == errno.ENOTDIR
    assert _errno_of(os.listdir, f) == errno.ENOTDIR
    dfd = os.open(mnt / "m/sub", os.O_RDONLY)
    try:
        assert _errno_of(os.read, dfd, 10) == errno.EISDIR
    finally:
        os.close(dfd)
    assert _errno_of(os.open, mnt / "m/sub", os.O_WRONLY) in (errno.EISDIR, errno.EROFS)

    st = os.stat(f)
    head = s3_client.head_object(Bucket=bucket, Key="m/w.bin")
    assert stat.S_ISREG(st.st_mode) and st.st_size == len(data) == head["ContentLength"]
    assert int(st.st_mtime) == int(head["LastModified"].timestamp())
    assert stat.S_ISDIR(os.stat(mnt / "m/sub/deep").st_mode)
    assert sorted(os.listdir(mnt / "m")) == ["sub", "w.bin"]

    # Inode numbers: stable across calls, in listings, and across a restart of the agent.
    inodes = {p: os.stat(mnt / p).st_ino for p in ("m", "m/w.bin", "m/sub", "m/sub/deep/x.txt")}
    assert len(set(inodes.values())) == len(inodes)
    assert {e.name: e.inode() for e in os.scandir(mnt / "m")} == {"sub": inodes["m/sub"], "w.bin": inodes["m/w.bin"]}
    assert agent.stop() == 0
    agent.start()
    assert {p: os.stat(mnt / p).st_ino for p in inodes} == inodes


def test_object_changed_under_an_open_file_is_estale(bucket, s3_client, make_agent, mnt):
    v1 = put_random(s3_client, bucket, "m/v.dat", 8 * MiB, 21)
    agent = _mounted(make_agent, bucket, mnt)
    path = mnt / "m/v.dat"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead into later chunks
        assert os.pread(fd, 4096, 0) == v1[:4096]
        v2 = put_random(s3_client, bucket, "m/v.dat", 5 * MiB + 77, 22)
        assert _errno_of(os.pread, fd, 4096, 6 * MiB) == errno.ESTALE
        assert os.pread(fd, 4096, 0) == v1[:4096], "the cached part of the pinned version still reads"
        assert os.fstat(fd).st_size == len(v1), "an open file keeps its version's size"
    finally:
        os.close(fd)
    assert agent.metric("coldbrew_fuse_ops_total", op="read", outcome="ESTALE") >= 1
    time.sleep(1.1)  # the kernel's own attribute cache (1 s); the view forgot the old version at once
    assert os.stat(path).st_size == len(v2)
    assert path.read_bytes() == v2


def test_eio_when_the_origin_fails_and_when_it_stalls_never_a_hang(bucket, s3_client, make_agent, proxy, mnt):
    put_random(s3_client, bucket, "m/fail.dat", 2 * MiB, 1)
    put_random(s3_client, bucket, "m/slow.dat", 2 * MiB, 2)
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=[
        "--mount", str(mnt), "--chunk-size", "1MiB", "--retry-attempts", "3", "--retry-base-delay-s", "0.01",
        "--retry-max-delay-s", "0.02", "--fuse-read-timeout-s", "1.5"])
    assert os.stat(mnt / "m/fail.dat").st_size == 2 * MiB

    # Every GET of object bytes fails: after the retries, EIO.
    proxy.add_fault(Fault.status(503, "SlowDown"), method="GET", ranged_only=True)
    started = time.monotonic()
    assert _errno_of((mnt / "m/fail.dat").read_bytes) == errno.EIO
    assert time.monotonic() - started < 10
    assert proxy.counts["fired"]["status"] >= 3

    # The origin stalls: EIO after fuse_read_timeout_s, not a hang.
    proxy.clear_faults()
    proxy.add_fault(Fault.delay(30), method="GET", ranged_only=True)
    started = time.monotonic()
    assert _errno_of((mnt / "m/slow.dat").read_bytes) == errno.EIO
    assert time.monotonic() - started < 10
    assert proxy.counts["fired"]["delay"] >= 1
    assert agent.metric("coldbrew_fuse_timeouts_total", op="read") >= 1
    assert agent.metric("coldbrew_fuse_ops_total", op="read", outcome="EIO") >= 2


# --- concurrency ---------------------------------------------------------------------------------------


def test_two_readers_of_one_cold_file_fetch_each_chunk_once(bucket, s3_client, make_agent, proxy, mnt):
    files = {"m/shared.safetensors": put_random(s3_client, bucket, "m/shared.safetensors", 12 * MiB + 5, 1),
             "m/shared.dat": put_random(s3_client, bucket, "m/shared.dat", 9 * MiB, 2)}
    agent = _mounted(make_agent, bucket, mnt, proxy)
    for key in files:
        os.stat(mnt / key)  # metadata first; the counts below are object bytes only
    proxy.reset_counts()
    proxy.add_fault(Fault.delay(0.05), method="GET", ranged_only=True)  # fetches overlap the readers
    for key, data in files.items():
        procs = [subprocess.Popen(["sha256sum", str(mnt / key)], stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=60)[0] for p in procs]
        assert [o.split()[0] for o in outs] == [_sha(data)] * 2
    assert proxy.counts["ranged_gets"] == 13 + 9, proxy.counts
    assert agent.metric("coldbrew_origin_requests_total", op="get", outcome="ok") == 13 + 9
    assert agent.metric("coldbrew_singleflight_joins_total") >= 1


# --- lifecycle ------------------------------------------------------------------------------------------

_READER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
done = 0
try:
    while True:
        piece = os.read(fd, 1 << 20)
        if not piece:
            break
        done += len(piece)
        print(done, flush=True)
except OSError as e:
    print("ERRNO", e.errno, flush=True)
    sys.exit(3)
print("EOF", flush=True)
"""


def test_kill9_mid_read_errors_the_reader_and_the_next_start_cleans_the_stale_mount(
        bucket, s3_client, make_agent, proxy, mnt):
    data = put_random(s3_client, bucket, "m/big.bin", 32 * MiB, 9)
    agent = _mounted(make_agent, bucket, mnt, proxy)
    proxy.bandwidth = 4 * MiB  # ~8 s for the file: the kill lands mid-read
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(mnt / "m/big.bin")],
                              stdout=subprocess.PIPE, text=True)
    try:
        first = reader.stdout.readline()
        assert first.strip().isdigit(), first
        agent.kill()  # SIGKILL: no unmount, no goodbye
        killed = time.monotonic()
        rest = reader.stdout.read()
        assert reader.wait(timeout=15) == 3, rest
        assert time.monotonic() - killed < 10
    finally:
        if reader.poll() is None:
            reader.kill()
    assert "ERRNO" in rest and "EOF" not in rest
    assert int(rest.split("ERRNO")[1]) in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    assert _errno_of(os.statvfs, mnt) == errno.ENOTCONN, "a stale mount is left behind"

    proxy.bandwidth = None
    agent.start()
    assert agent.metric("coldbrew_fuse_stale_mounts_cleaned_total") == 1
    assert (mnt / "m/big.bin").read_bytes() == data


def test_sigterm_unmounts_even_with_a_file_open(bucket, s3_client, make_agent, mnt):
    data = put_random(s3_client, bucket, "m/x.bin", 3 * MiB, 4)
    agent = _mounted(make_agent, bucket, mnt)
    assert agent.client.health()["mount"] == str(mnt)
    fd = os.open(mnt / "m/x.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == data[:100]
        started = time.monotonic()
        assert agent.stop() == 0
        assert time.monotonic() - started < 10
        assert not os.path.ismount(mnt)
        assert os.listdir(mnt) == []
        assert _errno_of(os.pread, fd, 100, 2 * MiB + 5) in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    finally:
        _errno_of(os.close, fd)  # the flush on close fails too once the agent is gone


def test_a_live_mount_is_not_taken_over(bucket, s3_client, make_agent, mnt):
    put_random(s3_client, bucket, "m/x.bin", 100, 4)
    _mounted(make_agent, bucket, mnt)
    second = make_agent(f"s3://{bucket}", start=False, name="second",
                        extra_args=["--mount", str(mnt), "--chunk-size", "1MiB"])
    with pytest.raises(RuntimeError, match="already mounted by a running coldbrew agent"):
        second.start()
    assert second.proc.returncode == 2
    assert (mnt / "m/x.bin").stat().st_size == 100


def test_agent_without_mount_has_no_fuse(bucket, make_agent):
    agent = make_agent(f"s3://{bucket}")
    assert agent.client.health()["mount"] is None
    assert "coldbrew_fuse_ops_total" not in {name for name, _ in agent.metrics()}

