"""Probe: can any plain downloader that lands its bytes on disk keep up with one that doesn't?

    python bench/probes/probe_landing.py [--size 1GiB] [--runs 3] [--modes mem,pwrite,stream,splice]

(run from the repository root with the project's venv, as root: it drops the page cache)

The agent's bar (c) >= 0.9x (b) compares a prewarm, which puts every byte on disk,
with (b), a ranged-GET download into reused memory. This probe runs the same plain
boto3-thread downloader (8 x 16 MiB ranges, as in bench_agent.py) in several ways,
interleaved, each in a fresh process, on one local S3 server:

* ``mem``: ranges read into reused buffers and dropped: bench_agent's (b);
* ``pwrite``: as ``mem``, plus xxh3 of each range and one ``pwrite`` of it into one data
  file (the agent's first landing path);
* ``splice``: socket -> pipe -> data file with ``splice(2)`` (no copy through user
  memory; plain HTTP only), then xxh3 over the file's pages through a read-only mmap;
* ``direct`` (not by default): as ``pwrite``, with the data file opened ``O_DIRECT``
  (no page cache);
* ``pwrite1`` (not by default): as ``pwrite``, one thread writing at a time;
* ``stream``: each body read 1 MiB at a time into the start of the buffer, hashed
  incrementally and written before the next piece is read (the copy into the page cache
  then reads bytes still in the CPU's cache): what the agent does;
* ``sparse``: as ``stream``, into a data file first truncated to the object's size (the
  agent's data file is);
* ``falloc``: as ``sparse``, each range's blocks allocated (``posix_fallocate``) before
  its GET, as the agent does;
* ``lowat``: as ``falloc``, each body read with its socket's receive low-water mark up
  (``SO_RCVLOWAT``, :class:`coldbrew.agent.origin.s3data.BatchedWakeups`), as the agent does;
  ``memlowat``: ``mem`` read that way (in 1 MiB pieces, nothing written);
* ``mmap`` (not by default): the data file's range mapped, faulted in for writing
  (``MADV_POPULATE_WRITE``) and the body read straight into the mapping.

Before every clock: page cache dropped, the S3 server's data read back in, and a
model-size scratch file written and deleted (bench/_common.prefault_page_cache). The
disk modes' files are checked against the object. It prints each mode's median wall
time, its throughput over ``mem``'s, and client and server CPU seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import mmap
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/_common
import _common as C

from coldbrew.agent.origin.s3data import BatchedWakeups

BUCKET, KEY = "probe-landing", "object.bin"
CONCURRENCY, CHUNK = 8, 16 * C.MiB
MODES = ("mem", "pwrite", "pwrite1", "stream", "sparse", "falloc", "lowat", "memlowat", "splice", "direct", "mmap")
DEFAULT_MODES = "mem,pwrite,stream,splice"
STREAM_PIECE = 1 * C.MiB  # as the agent's (agent/s3data.py)
PIPE_BYTES = 1 * C.MiB
_F_SETPIPE_SZ = 1031
_MADV_POPULATE_WRITE = 23  # Linux 5.14: fault a range in for writing in one call


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _read_into(http_resp: Any, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = http_resp.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _splice_body(http_resp: Any, fd: int, start: int, want: int, pipe: tuple[int, int]) -> int:
    """The body's bytes into ``fd`` at ``start``: what http.client buffered, then splice."""
    buffered = http_resp.fp
    head = buffered.read(len(buffered.peek(1)[:want]))
    os.pwrite(fd, head, start)
    got, sock_fd = len(head), buffered.raw._sock.fileno()
    while got < want:
        try:  # the socket has a timeout, so its fd is non-blocking
            n = os.splice(sock_fd, pipe[1], min(PIPE_BYTES, want - got))
        except BlockingIOError:
            select.select([sock_fd], [], [], 60)
            continue
        if not n:
            break
        moved = 0
        while moved < n:
            moved += os.splice(pipe[0], fd, n - moved, offset_dst=start + got + moved)
        got += n
    http_resp.length = 0
    http_resp.read()  # body consumed: http.client may reuse the connection
    return got


def worker(mode: str, out: str, scratch: str, size: int) -> None:
    import boto3
    import xxhash
    from botocore.config import Config


    s3 = boto3.client("s3", config=Config(max_pool_connections=2 * CONCURRENCY,
                                          response_checksum_validation="when_required"))
    s3.head_object(Bucket=BUCKET, Key=KEY)
    # page-aligned (O_DIRECT needs it) and touched before the clock, like (b)'s buffers
    bufs = [mmap.mmap(-1, CHUNK) for _ in range(CONCURRENCY)]
    for b in bufs:
        b.write(bytes(CHUNK))
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode == "direct" else 0)
    fd = os.open(out, flags, 0o644) if mode not in ("mem", "memlowat") else -1
    if mode in ("mmap", "sparse", "falloc", "lowat"):
        os.ftruncate(fd, size)
    C.prefault_page_cache(Path(scratch), size)
    lock, pending, errors = threading.Lock(), iter(range(0, size, CHUNK)), []
    one_writer = threading.Lock() if mode == "pwrite1" else contextlib.nullcontext()

    def one_range(view: memoryview, start: int, pipe: tuple[int, int]) -> None:
        end = min(start + CHUNK, size)
        if mode in ("falloc", "lowat"):
            os.posix_fallocate(fd, start, end - start)
        resp = s3.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={start}-{end - 1}")
        raw = resp["Body"]._raw_stream
        wakeups = BatchedWakeups(raw) if mode in ("lowat", "memlowat") else None
        if mode == "mmap":
            with mmap.mmap(fd, end - start, offset=start) as pages:
                pages.madvise(_MADV_POPULATE_WRITE)
                mv = memoryview(pages)
                got = _read_into(raw._fp, mv)
                xxhash.xxh3_64_intdigest(mv[:got])
                mv.release()
        elif mode in ("stream", "sparse", "falloc", "lowat", "memlowat"):
            hasher, got, small = xxhash.xxh3_128(), 0, view[:STREAM_PIECE]
            while got < end - start:
                want = min(STREAM_PIECE, end - start - got)
                if wakeups is not None:
                    wakeups.batch(end - start - got - want)
                n = _read_into(raw._fp, small[:want])
                if not n:
                    break
                if mode != "memlowat":
                    hasher.update(small[:n])
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, small[done:n], start + got + done)
                got += n
        elif mode == "splice":
            got = _splice_body(raw._fp, fd, start, end - start, pipe)
            with mmap.mmap(fd, end - start, offset=start, prot=mmap.PROT_READ) as pages:
                xxhash.xxh3_64_intdigest(pages)
        else:
            got = _read_into(raw._fp, view[: end - start])
            if mode not in ("mem", "memlowat"):
                xxhash.xxh3_64_intdigest(view[:got])
                with one_writer:
                    done = 0
                    while done < got:
                        done += os.pwrite(fd, view[done:got], start + done)
        if wakeups is not None:
            wakeups.batch(0)
        raw.release_conn()
        if got != end - start:
            raise RuntimeError(f"short body at {start}: {got} of {end - start}")

    def work(i: int) -> None:
        pipe = os.pipe()
        fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, PIPE_BYTES)
        try:
            while True:
                with lock:
                    start = next(pending, None)
                if start is None:
                    return
                one_range(memoryview(bufs[i]), start, pipe)
        except BaseException as e:
            errors.append(repr(e))

    cpu0, t0 = _cpu_self(), time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, cpu = time.perf_counter() - t0, _cpu_self() - cpu0
    if errors:
        raise RuntimeError(f"{mode}: {errors[0]}")
    if fd >= 0:
        os.close(fd)
    print("RESULT " + json.dumps({"seconds": seconds, "cpu_s": cpu}), flush=True)


def run(args: argparse.Namespace) -> None:
    import xxhash

    from coldbrew.agent.devtools.locals3 import LocalS3

    modes = args.modes.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="coldbrew-landing-"))
    s3 = LocalS3(workdir / "s3", log_path=workdir / "weed.log").start()
    env = {**os.environ, **s3.env()}
    try:
        client = s3.client()
        client.create_bucket(Bucket=BUCKET)
        C.upload_random(client, BUCKET, KEY, args.size)
        want = xxhash.xxh3_128_hexdigest(client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read())
        results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for r in range(args.runs):
            for mode in modes:
                results[mode].append(_one(mode, workdir, s3, env, args.size, want))
                o = results[mode][-1]
                C.log(f"run {r + 1} {mode:7s} {o['seconds']:.3f} s, client {o['cpu_s']:.2f} "
                      f"CPU-s, S3 server {o['server_cpu_s']:.2f} CPU-s")
        _report(results, modes, args)
    finally:
        s3.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _one(mode: str, workdir: Path, s3: Any, env: dict[str, str], size: int, want: str) -> dict[str, float]:
    import xxhash

    out = workdir / "landed.bin"
    C.drop_caches()
    C.read_files([p for p in C.files_under(workdir / "s3") if p.name != "weed.log"])
    server0 = C.proc_cpu_s(s3.proc.pid) or 0.0
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, str(out), str(workdir), str(size)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    o = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    o["server_cpu_s"] = (C.proc_cpu_s(s3.proc.pid) or 0.0) - server0
    if mode not in ("mem", "memlowat"):
        h = xxhash.xxh3_128()
        with open(out, "rb") as f:
            while piece := f.read(16 * C.MiB):
                h.update(piece)
        out.unlink()
        if h.hexdigest() != want:
            raise RuntimeError(f"{mode}: the landed file differs from the object")
    return o


def _report(results: dict[str, list[dict[str, float]]], modes: list[str], args: argparse.Namespace) -> None:
    base = C.median([o["seconds"] for o in results.get("mem", [])])
    print(f"\n{C.format_size(args.size)}, {args.runs} runs each, interleaved; medians:")
    for mode in modes:
        secs = C.median([o["seconds"] for o in results[mode]])
        ratio = f"{base / secs:.3f}" if base and secs else "n/a"
        print(f"  {mode:7s} {secs:.3f} s  throughput / mem {ratio}  client "
              f"{C.median([o['cpu_s'] for o in results[mode]]):.2f} CPU-s  S3 server "
              f"{C.median([o['server_cpu_s'] for o in results[mode]]):.2f} CPU-s  "
              f"runs {' '.join(format(o['seconds'], '.3f') for o in results[mode])}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=C.size_arg, default=C.GiB)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"a comma list of {', '.join(MODES)}")
    args = p.parse_args(argv)
    if not C.can_drop_caches():
        p.error("needs root: every clock starts after the page cache is dropped")
    bad = set(args.modes.split(",")) - set(MODES)
    if bad:
        p.error(f"unknown mode(s) {', '.join(sorted(bad))}; pick from {', '.join(MODES)}")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
