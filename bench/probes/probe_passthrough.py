"""Probe: FUSE passthrough through mfusepy, read speed against the backing file itself.

    ./dev setup && .venv/bin/python bench/probes/probe_passthrough.py [--size 1GiB]

Groundwork for issue 4's cached-read bars (bench/RESULTS.md). A FUSE file opened in
passthrough mode is read by the kernel straight from a backing file, so no request reaches
the daemon and the page cache is the backing file's own. This probe mounts a one-file view
over a local file with mfusepy on libfuse >= 3.16 (Debian 12 has 3.14:
``tools/build_libfuse.sh`` builds 3.17 from Debian trixie's source; ``./dev setup`` puts it
in .venv/libfuse), twice: once with passthrough, once answering ``read`` from Python (the
view's old path). It reads each the same way the FUSE benchmark does and checks the bytes.

How passthrough is asked for from mfusepy's high-level API is in
:mod:`coldbrew.fuse.passthrough`, which this probe uses as the view does.

Needs root, /dev/fuse and fusermount3. Everything is removed at exit.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/_common
import _common as C

from coldbrew.fuse.mount import fuse_library, load_mfusepy
from coldbrew.fuse.passthrough import FUSE_CAP_PASSTHROUGH, Passthrough, supported_by


def make_ops(mfusepy, backing: Path, passthrough: bool):
    size = backing.stat().st_size
    kernel = Passthrough(mfusepy)  # the view's own: register a backing file, answer the open

    class OneFile(mfusepy.Operations):
        use_ns = True

        def init_with_config(self, conn, config):
            if passthrough:
                if not conn.capable & FUSE_CAP_PASSTHROUGH:
                    raise SystemExit("the kernel does not offer FUSE passthrough")
                conn.want |= FUSE_CAP_PASSTHROUGH
                conn.max_backing_stack_depth = 1

        def getattr(self, path, fh=None):
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
            if path == "/model.bin":
                return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": size}
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))

        def readdir(self, path, fh):
            return [".", "..", "model.bin"]

        def open(self, path, fi):
            fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
            fi.fh = fd
            if passthrough:
                backing_id = kernel.register(fd)
                if backing_id is None:
                    raise OSError(errno.EPERM, "the kernel refused the backing file")
                kernel.answer(fi, backing_id)
            else:
                fi.keep_cache = 1
            return 0

        def read(self, path, size_, offset, fi):  # raw_fi: the whole fuse_file_info
            return os.pread(fi.fh, size_, offset)

        def release(self, path, fi):
            os.close(fi.fh)  # the kernel holds its own reference to a backing file
            return 0

    return OneFile()


def serve(backing: Path, mnt: Path, passthrough: bool) -> int:
    """The daemon side, in its own process (as the agent is to the programs reading)."""
    mfusepy = load_mfusepy()
    mfusepy.FUSE(make_ops(mfusepy, backing, passthrough), str(mnt), raw_fi=True, foreground=True,
                 ro=True, nothreads=False)
    return 0


def mount(backing: Path, mnt: Path, passthrough: bool) -> subprocess.Popen:
    daemon = subprocess.Popen([sys.executable, __file__, "--serve", str(backing), str(mnt),
                               "passthrough" if passthrough else "read"])
    deadline = time.monotonic() + 10
    while os.stat(mnt).st_dev == os.stat(mnt.parent).st_dev:
        if time.monotonic() > deadline or daemon.poll() is not None:
            daemon.kill()
            raise RuntimeError(f"mounting {mnt} failed (passthrough needs root and a kernel >= 6.9)")
        time.sleep(0.05)
    return daemon


def drop_mount_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(path: Path, size: int) -> float:
    started = time.perf_counter()
    n = C.read_files([path])
    seconds = time.perf_counter() - started
    if n != size:
        raise RuntimeError(f"read {n} of {size} bytes from {path}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=C.size_arg, default=C.size_arg("1GiB"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--serve", nargs=3, metavar=("BACKING", "MNT", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(Path(args.serve[0]), Path(args.serve[1]), args.serve[2] == "passthrough")
    mfusepy = load_mfusepy()
    print(f"libfuse {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor} "
          f"({fuse_library() or 'system'})")
    why = supported_by(mfusepy)
    if why is not None:
        print(f"no passthrough: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="coldbrew-passthrough-"))
    backing = work / "backing.bin"
    with open(backing, "wb") as f:
        for _ in range(args.size // (16 << 20)):
            f.write(os.urandom(16 << 20))
    size = backing.stat().st_size
    rows: dict[str, list[float]] = {}
    try:
        for mode in ("passthrough", "read"):
            mnt = work / f"mnt-{mode}"
            mnt.mkdir()
            daemon = mount(backing, mnt, mode == "passthrough")
            try:
                for _ in range(args.runs):
                    C.read_files([backing])
                    rows.setdefault("direct (backing file, warm)", []).append(timed(backing, size))
                    drop_mount_pages(mnt / "model.bin")
                    rows.setdefault(f"{mode}: first read", []).append(timed(mnt / "model.bin", size))
                    rows.setdefault(f"{mode}: again", []).append(timed(mnt / "model.bin", size))
                if subprocess.run(["cmp", "-s", str(backing), str(mnt / "model.bin")]).returncode:
                    raise RuntimeError(f"{mode}: the bytes differ")
            finally:
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
                daemon.wait(10)
        print(f"\n{C.format_size(size)} file, {args.runs} runs, median; bytes checked with cmp\n")
        for name, secs in rows.items():
            med = sorted(secs)[len(secs) // 2]
            print(f"{name:32} {med:7.3f} s {size / med / 1e9:6.2f} GB/s   "
                  + " ".join(f"{s:.3f}" for s in secs))
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
