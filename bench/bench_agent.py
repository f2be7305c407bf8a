#!/usr/bin/env python3
"""Benchmark: the coldbrew agent against plain S3 downloads, side by side, in one run.

One local S3 server (SeaweedFS ``weed mini`` on 127.0.0.1), one object of
``--size`` bytes, and these contenders, each timed to the moment every byte has
landed:

  (a) s3fs        ``S3FileSystem().get(remote, local_file)`` — the plain way people download.
  (b) ranged GET  HEAD + ``--concurrency`` parallel ``--chunk-size`` ranged GETs read into
                  reused, pre-touched buffers and discarded ("download into memory"):
                  the transport ceiling. Two clients: boto3 in threads (reading with every
                  trick the agent uses: http.client's readinto, the socket's low-water mark)
                  and aiobotocore; the faster median is the ceiling.
  (b+disk)        informational, no bar: (b) with boto3 into one file, its blocks allocated
                  first (fallocate), each range streamed in at its offset in 1 MiB pieces (the
                  fastest plain way to land a download found here, bench/probes/probe_landing.py):
                  what (c) costs beyond it is the cache's own work.
  (c) prewarm     ``coldbrew prewarm URI --wait`` against a fresh agent (fresh cache dir,
                  started before the clock): CLI wall time, and the job's own elapsed_s.
                  Peak agent RSS is sampled (VmRSS every 50 ms) during it.
  (d) warm        ``coldbrew get URI DEST`` out of the warm cache vs ``cp`` of a local file
                  of the same size, both sources read once before timing, both
                  destinations on the same filesystem.

Ratios and their bars: (c)/(b) throughput >= 0.9; (c) faster than (a); (d) get/cp
throughput >= 0.8; with ``--rss-size 4GiB``, the agent's peak RSS while it prewarms
a 4 GiB object < 1 GiB. Bars are marked PASS/FAIL; the exit status is 0 regardless
(a benchmark, not a test).

    python bench/bench_agent.py --size 256MiB --runs 1
    python bench/bench_agent.py --size 1GiB --runs 3 --json /tmp/bench.json
    python bench/bench_agent.py --size 1GiB --runs 3 --rss-size 4GiB   # needs ~12 GB free RAM
    python bench/bench_agent.py --size 1GiB --runs 3 --link rtt=20ms,conn=25MB/s --agent-concurrency 32

Fairness: contenders are interleaved (a, b, b+disk, c, d in every run); before each
cold one the page cache is dropped (root only; ``--no-drop-caches`` otherwise) and the
S3 server's data files are read back in, so the origin is equally warm for all; right
before every clock a model-size scratch file is written and deleted (``--no-prefault``
to skip), because on these VMs page-cache writes into long-free memory run ~4x slower. Everything listens on 127.0.0.1 only (with ``--link``, inside a network namespace
made for the run: bench/link.py); the S3 server, agents and temp files are removed at exit,
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import link

from coldbrew.agent.origin.s3data import TAIL_BYTES, BatchedWakeups

BUCKET = "coldbrew-bench"
WARM_KEY = "bench/warmup.bin"  # a small object every client HEADs before its clock starts
TRANSPORTS = ("boto3", "aiobotocore")

# ======================================================================================
# Worker side: (a) and (b) run in a fresh process each; the clock is taken in there.
# ======================================================================================


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, size)) for start in range(0, size, chunk)]


def _touched_buffers(count: int, size: int) -> list[bytearray]:
    # bytearray(n) memsets its storage: every page is written here, before the clock.
    return [bytearray(size) for _ in range(count)]


def _prefault(spec: dict[str, Any]) -> float:
    if not spec["prefault"]:
        return 0.0
    return C.prefault_page_cache(Path(spec["prefault_dir"]), spec["size"])


def worker_s3fs(spec: dict[str, Any]) -> dict[str, Any]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and keys from AWS_* env
    fs.info(f"{spec['bucket']}/{WARM_KEY}")  # session and one connection up, like the agent's
    prefault_s = _prefault(spec)
    cpu0, t0 = _cpu_self(), time.perf_counter()
    fs.get(f"{spec['bucket']}/{spec['key']}", spec["dest"])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": os.path.getsize(spec["dest"]),
            "cpu_s": _cpu_self() - cpu0, "prefault_s": prefault_s}


def _read_body_boto3(body: Any, view: memoryview, mode: str) -> int:
    """Read an HTTP body into ``view``; returns bytes read. ``mode`` picks how."""
    raw = body._raw_stream  # urllib3 HTTPResponse
    want, got = len(view), 0
    if mode == "fp":
        # http.client's readinto lands socket bytes straight in our buffer (recv_into):
        # no intermediate bytes objects; all but the body's tail with the socket's low-water
        # mark up, as the agent reads (agent/s3data.py). Then the connection goes back.
        fp, wakeups = raw._fp, BatchedWakeups(raw)
        while got < want:
            end = want - 2 * TAIL_BYTES if want - got > 4 * TAIL_BYTES else want
            wakeups.batch(want - end)
            n = fp.readinto(view[got:end])
            if not n:
                break
            got += n
        wakeups.batch(0)
        raw.release_conn()
    elif mode == "readinto":
        while got < want:
            n = raw.readinto(view[got:min(want, got + C.MiB)])
            if not n:
                break
            got += n
    else:  # "read": the public StreamingBody API, copied into the buffer
        while got < want:
            piece = body.read(min(C.MiB, want - got))
            if not piece:
                break
            view[got:got + len(piece)] = piece
            got += len(piece)
    return got


def _land_body_boto3(body: Any, buf: memoryview, fd: int, offset: int, want: int) -> int:
    """Stream a body into ``fd`` at ``offset`` in 1 MiB pieces, each written while it is
    still in the CPU's cache (bench/probes/probe_landing.py). Returns bytes written."""
    raw = body._raw_stream
    piece, got, wakeups = buf[:C.MiB], 0, BatchedWakeups(raw)
    while got < want:
        step = min(C.MiB, want - got)
        wakeups.batch(want - got - step)
        n = raw._fp.readinto(piece[:step])
        if not n:
            break
        done = 0
        while done < n:
            done += os.pwrite(fd, piece[done:n], offset + got + done)
        got += n
    wakeups.batch(0)
    raw.release_conn()
    return got


def worker_boto3(spec: dict[str, Any]) -> dict[str, Any]:
    import threading

    import boto3
    from botocore.config import Config

    conc, chunk = spec["concurrency"], spec["chunk"]
    s3 = boto3.client("s3", config=Config(
        max_pool_connections=2 * conc, retries={"max_attempts": 3, "mode": "standard"},
        response_checksum_validation="when_required"))
    s3.head_object(Bucket=spec["bucket"], Key=WARM_KEY)
    bufs = _touched_buffers(conc, chunk)
    lock = threading.Lock()
    mode = spec["boto3_read"]
    out_fd = os.open(spec["write_path"], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) \
        if spec.get("write_path") else None
    pool = ThreadPoolExecutor(conc)
    prefault_s = _prefault(spec)

    cpu0, t0 = _cpu_self(), time.perf_counter()
    size = s3.head_object(Bucket=spec["bucket"], Key=spec["key"])["ContentLength"]
    pending = iter(_ranges(size, chunk))
    if out_fd is not None:  # the whole file's blocks at once, as aria2 does by default
        os.posix_fallocate(out_fd, 0, size)

    def work(i: int) -> int:
        view = memoryview(bufs[i])
        total = 0
        while True:
            with lock:
                r = next(pending, None)
            if r is None:
                return total
            start, end = r
            resp = s3.get_object(Bucket=spec["bucket"], Key=spec["key"], Range=f"bytes={start}-{end - 1}")
            if out_fd is None:
                got = _read_body_boto3(resp["Body"], view[: end - start], mode)
            else:
                got = _land_body_boto3(resp["Body"], view, out_fd, start, end - start)
            if got != end - start:
                raise RuntimeError(f"short body at {start}: {got} of {end - start}")
            total += got
    total = sum(pool.map(work, range(conc)))
    seconds = time.perf_counter() - t0
    cpu = _cpu_self() - cpu0
    pool.shutdown()
    if out_fd is not None:
        os.close(out_fd)
    return {"seconds": seconds, "bytes": total, "cpu_s": cpu, "prefault_s": prefault_s}


def worker_aiobotocore(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    conc, chunk = spec["concurrency"], spec["chunk"]

    async def main() -> dict[str, Any]:
        session = get_session()
        config = AioConfig(max_pool_connections=2 * conc, retries={"max_attempts": 3, "mode": "standard"},
                           response_checksum_validation="when_required")
        async with session.create_client("s3", config=config) as s3:
            await s3.head_object(Bucket=spec["bucket"], Key=WARM_KEY)
            bufs = _touched_buffers(conc, chunk)
            prefault_s = _prefault(spec)

            cpu0, t0 = _cpu_self(), time.perf_counter()
            size = (await s3.head_object(Bucket=spec["bucket"], Key=spec["key"]))["ContentLength"]
            pending = iter(_ranges(size, chunk))

            async def work(buf: bytearray) -> int:
                view = memoryview(buf)
                total = 0
                for start, end in pending:
                    resp = await s3.get_object(Bucket=spec["bucket"], Key=spec["key"],
                                               Range=f"bytes={start}-{end - 1}")
                    body = resp["Body"]
                    stream = body._raw_stream.content  # aiohttp StreamReader
                    want, got = end - start, 0
                    try:
                        while got < want:
                            piece = await stream.readany()  # whatever arrived; no joining
                            if not piece:
                                break
                            take = min(len(piece), want - got)
                            view[got:got + take] = memoryview(piece)[:take]
                            got += take
                    finally:
                        body.close()
                    if got != want:
                        raise RuntimeError(f"short body at {start}: {got} of {want}")
                    total += got
                return total

            total = sum(await asyncio.gather(*(work(b) for b in bufs)))
            seconds = time.perf_counter() - t0
            return {"seconds": seconds, "bytes": total, "cpu_s": _cpu_self() - cpu0,
                    "prefault_s": prefault_s}

    return asyncio.run(main())


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "s3fs": worker_s3fs, "boto3": worker_boto3, "aiobotocore": worker_aiobotocore}


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = WORKERS[spec["kind"]](spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ======================================================================================
# Driver side
# ======================================================================================


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        #: The emulated S3 link (--link), and what removes its delay at the end.
        self.link = link.LinkSpec.parse(args.link) if args.link else None
        self.linked = contextlib.ExitStack()
        self.size: int = args.size
        self.chunk: int = args.chunk_size
        self.conc: int = args.concurrency
        self.key = f"bench/model-{self.size}.bin"
        self.uri = f"s3://{BUCKET}/{self.key}"
        self.timeout_s = max(300.0, self.size / (5 * C.MB))
        self.workdir = Path(tempfile.mkdtemp(prefix="coldbrew-bench-", dir=args.workdir))
        self.s3: Any = None
        self.s3_env: dict[str, str] = {}
        self.agents: list[C.AgentProc] = []
        self.src = self.workdir / "src.bin"
        self.dest_dir = self.workdir / "dest"
        self.scratch = self.workdir  # where prefault files go: the filesystem the contenders write to
        self.drop = args.drop_caches
        self.runs: list[dict[str, Any]] = []
        self.rss_check: dict[str, Any] | None = None
        self.notes: list[str] = []

    # --- setup ---------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def start_s3(self) -> None:
        from coldbrew.agent.devtools.locals3 import LocalS3

        self.s3 = LocalS3(self.workdir / "s3", log_path=self.workdir / "weed.log")
        t0 = time.perf_counter()
        self.s3.start()
        self.s3_env = self.s3.env()
        self.log(f"local S3 (weed mini, pid {self.s3.proc.pid}) on {self.s3.endpoint_url} "
                 f"in {time.perf_counter() - t0:.1f} s")
        client = self.s3.client()
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key=WARM_KEY, Body=os.urandom(C.MiB))

    def make_object(self) -> None:
        from boto3.s3.transfer import TransferConfig

        t0 = time.perf_counter()
        with open(self.src, "wb") as f:
            left = self.size
            while left > 0:
                n = min(16 * C.MiB, left)
                f.write(os.urandom(n))
                left -= n
        t1 = time.perf_counter()
        client = self.s3.client()
        client.upload_file(str(self.src), BUCKET, self.key, Config=TransferConfig(
            multipart_threshold=64 * C.MiB, multipart_chunksize=64 * C.MiB, max_concurrency=4))
        head = client.head_object(Bucket=BUCKET, Key=self.key)
        if head["ContentLength"] != self.size:
            raise RuntimeError(f"uploaded {head['ContentLength']} bytes, wanted {self.size}")
        self.src_digest = self._digest(self.src)
        self.log(f"object {self.uri}: {C.format_size(self.size)} random bytes, written in "
                 f"{t1 - t0:.1f} s, uploaded in {time.perf_counter() - t1:.1f} s (ETag {head['ETag']})")
        if self.link is not None:  # uploaded at full speed; from here on, the link
            self.linked.enter_context(link.delaying(self.link, self.s3.port, self.workdir))
            self.log(f"link: {self.link}; " + link.verify(client, BUCKET, self.key, 64 * C.MiB))

    @staticmethod
    def _digest(path: Path) -> str:
        import xxhash

        h = xxhash.xxh3_128()
        with open(path, "rb") as f:
            while piece := f.read(16 * C.MiB):
                h.update(piece)
        return h.hexdigest()

    def check_same(self, path: Path, what: str) -> None:
        if os.path.getsize(path) != self.size or self._digest(path) != self.src_digest:
            raise RuntimeError(f"{what}: {path} differs from the source object")

    # --- states before a clock -----------------------------------------------------------

    def origin_files(self) -> list[Path]:
        return [p for p in C.files_under(self.workdir / "s3") if p.name != "weed.log"]

    def prepare_cold(self) -> None:
        """Same page-cache state before every cold contender: only the S3 server's data warm."""
        if self.drop:
            C.drop_caches()
            C.read_files(self.origin_files())  # the origin's disk is not what we measure
        else:
            C.sync()

    def prefault(self, size: int | None = None) -> float:
        if not self.args.prefault:
            return 0.0
        return C.prefault_page_cache(self.scratch, size or self.size)

    def spec(self, kind: str, **extra: Any) -> dict[str, Any]:
        return {"kind": kind, "bucket": BUCKET, "key": self.key, "size": self.size,
                "concurrency": self.conc, "chunk": self.chunk, "boto3_read": self.args.boto3_read,
                "prefault": self.args.prefault, "prefault_dir": str(self.scratch), **extra}

    def run_worker(self, spec: dict[str, Any]) -> dict[str, Any]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        weed0 = C.proc_cpu_s(self.s3.proc.pid)
        result = subprocess.run(cmd, env={**os.environ, **self.s3_env}, capture_output=True,
                                text=True, timeout=self.timeout_s, check=False)
        weed1 = C.proc_cpu_s(self.s3.proc.pid)
        if result.returncode != 0:
            raise RuntimeError(f"worker {spec['kind']} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RESULT "))
        out = json.loads(line[len("RESULT "):])
        if out["bytes"] != self.size:
            raise RuntimeError(f"worker {spec['kind']} got {out['bytes']} bytes, wanted {self.size}")
        out["server_cpu_s_whole_process"] = (weed1 - weed0) if weed0 is not None and weed1 is not None else None
        return out

    # --- contenders ------------------------------------------------------------------------

    def contender_a(self) -> dict[str, Any]:
        self.prepare_cold()
        dest = self.dest_dir / "s3fs.bin"
        try:
            out = self.run_worker(self.spec("s3fs", dest=str(dest)))
            self.check_same(dest, "(a) s3fs get")
        finally:
            dest.unlink(missing_ok=True)
        return out

    def contender_b(self, transport: str) -> dict[str, Any]:
        self.prepare_cold()
        return self.run_worker(self.spec(transport))

    def contender_b_disk(self) -> dict[str, Any]:
        """(b), landing every byte in one file: the best plain download to disk found here."""
        self.prepare_cold()
        out = self.dest_dir / "b-disk.bin"
        try:
            result = self.run_worker(self.spec("boto3", write_path=str(out)))
            self.check_same(out, "(b+disk)")
            return result
        finally:
            out.unlink(missing_ok=True)

    def start_agent(self, name: str) -> C.AgentProc:
        agent = C.AgentProc(self.workdir, f"s3://{BUCKET}", self.s3_env, name, extra_args=[
            "--fetch-concurrency", self.args.agent_concurrency, "--chunk-size", str(self.chunk)])
        self.agents.append(agent)
        return agent.start()

    def contender_c(self, agent: C.AgentProc, key: str | None = None, size: int | None = None,
                    cold_prep: bool = True) -> dict[str, Any]:
        uri = f"s3://{BUCKET}/{key or self.key}"
        size = size or self.size
        env = agent.cli_env()
        if cold_prep:
            self.prepare_cold()
        # Load the CLI's code (page cache) the same way every run; proves the agent answers.
        C.timed_run([*C.coldbrew_command(), "status", "--socket", str(agent.socket)], env=env, timeout_s=60)
        prefault_s = self.prefault(size) if cold_prep else 0.0
        cmd = [*C.coldbrew_command(), "prewarm", uri, "--wait", "--json", "--socket", str(agent.socket)]
        cpu_agent0, cpu_weed0, cpu_cli0 = C.proc_cpu_s(agent.pid), C.proc_cpu_s(self.s3.proc.pid), C.children_cpu_s()
        with C.RssSampler(agent.pid, 0.05) as rss:
            seconds, result = C.timed_run(cmd, env=env, timeout_s=self.timeout_s)
        cpu_agent1, cpu_weed1, cpu_cli1 = C.proc_cpu_s(agent.pid), C.proc_cpu_s(self.s3.proc.pid), C.children_cpu_s()
        job = json.loads(result.stdout)
        if job["state"] != "done" or job["bytes_done"] != size:
            raise RuntimeError(f"prewarm did not finish: {json.dumps(job)}\n{agent.log_tail()}")
        return {"seconds": seconds, "job_elapsed_s": job["elapsed_s"], "bytes": job["bytes_done"],
                "peak_rss_kib": rss.peak_kib, "rss_samples": rss.samples,
                "vm_hwm_kib": C.proc_status_kib(agent.pid, "VmHWM"),
                "agent_cpu_s": _delta(cpu_agent0, cpu_agent1), "cli_cpu_s": cpu_cli1 - cpu_cli0,
                "server_cpu_s_whole_process": _delta(cpu_weed0, cpu_weed1), "prefault_s": prefault_s,
                "command": shlex.join(cmd)}

    def contender_d(self, agent: C.AgentProc, run: int) -> dict[str, Any]:
        C.sync()  # the prewarm's dirty chunk files are written back before any clock
        cache_files = C.files_under(agent.cache_dir)
        C.read_files(cache_files)  # both sources read once: equally warm
        C.read_files([self.src])
        env = agent.cli_env()
        get_dest = self.dest_dir / "get.bin"
        cp_dest = self.dest_dir / "cp.bin"
        order = ["get", "cp"] if run % 2 == 0 else ["cp", "get"]
        out: dict[str, Any] = {"order": order}
        for which in order:
            prefault_s = self.prefault()
            cpu_agent0, cpu_cli0 = C.proc_cpu_s(agent.pid), C.children_cpu_s()
            if which == "get":
                cmd = [*C.coldbrew_command(), "get", self.uri, str(get_dest), "--socket", str(agent.socket)]
                seconds, result = C.timed_run(cmd, env=env, timeout_s=self.timeout_s)
                m = re.search(r" in ([0-9.]+) s ", result.stderr)
                out["get_internal_s"] = float(m.group(1)) if m else None
                out["get_agent_cpu_s"] = _delta(cpu_agent0, C.proc_cpu_s(agent.pid))
                dest = get_dest
            else:
                cmd = ["cp", str(self.src), str(cp_dest)]
                seconds, result = C.timed_run(cmd, env=env, timeout_s=self.timeout_s)
                dest = cp_dest
            out[f"{which}_s"] = seconds
            out[f"{which}_cli_cpu_s"] = C.children_cpu_s() - cpu_cli0
            out[f"{which}_prefault_s"] = prefault_s
            out[f"{which}_command"] = shlex.join(cmd)
            try:
                self.check_same(dest, f"(d) {which}")
            finally:
                dest.unlink(missing_ok=True)
        return out

    # --- the whole thing ----------------------------------------------------------------------

    def run(self) -> None:
        self.dest_dir.mkdir()
        self.start_s3()
        self.make_object()
        transports = TRANSPORTS if self.args.transport == "both" else (self.args.transport,)
        for r in range(self.args.runs):
            rec: dict[str, Any] = {"run": r + 1}
            self.log(f"run {r + 1}/{self.args.runs}: (a) s3fs get")
            rec["a"] = self.contender_a()
            for t in transports:
                self.log(f"run {r + 1}/{self.args.runs}: (b) ranged GETs [{t}]")
                rec[f"b_{t}"] = self.contender_b(t)
            if self.args.disk_reference:
                self.log(f"run {r + 1}/{self.args.runs}: (b+disk) ranged GETs [boto3] streamed into a file")
                rec["b_disk"] = self.contender_b_disk()
            self.log(f"run {r + 1}/{self.args.runs}: (c) coldbrew prewarm --wait, fresh agent")
            agent = self.start_agent(f"agent-run{r + 1}")
            try:
                rec["c"] = self.contender_c(agent)
                self.log(f"run {r + 1}/{self.args.runs}: (d) coldbrew get vs cp, warm")
                rec["d"] = self.contender_d(agent, r)
            finally:
                agent.stop()
                agent.remove_cache()
            self.runs.append(rec)
            self.log("  " + "  ".join(f"{k}={_secs(v)}" for k, v in _flat_seconds(rec).items()))
        if self.args.rss_size:
            self.run_rss_check()

    def run_rss_check(self) -> None:
        size = self.args.rss_size
        need = 2.5 * (size + self.size) + size
        avail = _mem_available()
        self.log(f"RSS check: uploading a {C.format_size(size)} object (weed keeps ~2 GB RSS per "
                 f"GiB stored; MemAvailable {C.format_size(avail)})")
        if avail < need:
            self.log(f"  warning: that may not fit in memory (want ~{C.format_size(need)})")
        key = f"bench/rss-{size}.bin"
        t0 = time.perf_counter()
        C.upload_random(self.s3.client(), BUCKET, key, size)
        self.log(f"  uploaded in {time.perf_counter() - t0:.1f} s; prewarming it with a fresh agent")
        agent = self.start_agent("agent-rss")
        try:
            out = self.contender_c(agent, key=key, size=size, cold_prep=False)
        finally:
            agent.stop()
            agent.remove_cache()
        out["size"] = size
        self.rss_check = out
        try:
            self.s3.client().delete_object(Bucket=BUCKET, Key=key)
        except Exception as e:
            self.log(f"  could not delete {key}: {e}")

    def close(self) -> None:
        self.linked.close()
        for agent in self.agents:
            try:
                agent.stop()
            except Exception as e:
                print(f"warning: stopping agent: {e}", file=sys.stderr)
        if self.s3 is not None:
            self.s3.stop()
        if self.args.keep:
            print(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- figures --------------------------------------------------------------------------

    def series(self) -> dict[str, list[float]]:
        s: dict[str, list[float]] = {}
        for rec in self.runs:
            for k, v in _flat_seconds(rec).items():
                s.setdefault(k, []).append(v)
        return s

    def report(self) -> dict[str, Any]:
        series = self.series()
        med = {k: C.median(v) for k, v in series.items()}
        transports = [f"b_{t}" for t in TRANSPORTS if f"b_{t}" in med]
        best_b = min(transports, key=lambda k: med[k]) if transports else None
        tb = med.get(best_b) if best_b else None
        ta, tc, tcj = med.get("a"), med.get("c_cli"), med.get("c_job")
        tg, tcp = med.get("d_get"), med.get("d_cp")

        def ratio(x: float | None, y: float | None) -> float | None:
            return x / y if x and y else None

        rss_peak_main = max((rec["c"]["peak_rss_kib"] for rec in self.runs), default=None)
        bars = {
            "c_over_b": {"value": ratio(tb, tc), "value_job_elapsed": ratio(tb, tcj), "bar": ">= 0.9",
                         "pass": (ratio(tb, tc) or 0) >= 0.9, "b_transport": best_b},
            "c_over_b_disk": {"value": ratio(med.get("b_disk"), tc),
                              "value_job_elapsed": ratio(med.get("b_disk"), tcj), "bar": None},
            "c_vs_a": {"speedup": ratio(ta, tc), "bar": "faster than (a)", "pass": bool(ta and tc and tc < ta)},
            "d_get_over_cp": {"value": ratio(tcp, tg), "bar": ">= 0.8", "pass": (ratio(tcp, tg) or 0) >= 0.8},
            "rss": {"bar": "< 1 GiB while prewarming 4 GiB",
                    "peak_kib_main": rss_peak_main,
                    "peak_kib_rss_check": self.rss_check["peak_rss_kib"] if self.rss_check else None,
                    "rss_check_size": self.rss_check["size"] if self.rss_check else None,
                    "pass": (self.rss_check["peak_rss_kib"] * 1024 < C.GiB) if self.rss_check else None},
        }
        return {"medians_s": med, "best_b": best_b, "bars": bars, "series_s": series}

    def print_report(self, rep: dict[str, Any], argv: list[str]) -> None:
        med, series, bars = rep["medians_s"], rep["series_s"], rep["bars"]
        size = self.size
        print()
        print(f"coldbrew agent benchmark — object {C.format_size(size)} ({size} bytes), "
              f"{self.args.runs} run(s), median shown; MB/s = 10^6 bytes/s")
        print(f"(b): {self.conc} × {C.format_size(self.chunk)} ranges; agent: fetch_concurrency "
              f"{self.args.agent_concurrency}, chunk {C.format_size(self.chunk)}; "
              f"machine: {os.cpu_count()} CPUs, {platform.platform()}")
        print(f"mode: {self.mode_text()}")
        print()
        labels = {
            "a": "(a) s3fs S3FileSystem.get -> local file",
            "b_boto3": f"(b) ranged GETs, boto3 threads [{self.args.boto3_read}], into memory",
            "b_aiobotocore": "(b) ranged GETs, aiobotocore tasks, into memory",
            "b_disk": "(b+disk) as (b)/boto3, streamed into a file [info]",
            "c_cli": "(c) coldbrew prewarm --wait (CLI wall time)",
            "c_job": "(c) coldbrew prewarm: job elapsed_s",
            "d_get": "(d) coldbrew get, warm cache (CLI wall)",
            "d_get_internal": "(d) coldbrew get: its own copy time",
            "d_cp": "(d) cp of a warm local file",
        }
        w = max(len(v) for v in labels.values()) + 2
        print(f"{'contender':<{w}}{'median s':>10}{'MB/s':>9}   runs (s)")
        for k, label in labels.items():
            if k not in med:
                continue
            mark = "  <- ceiling" if k == rep["best_b"] else ""
            runs = " ".join(f"{v:.3f}" for v in series[k])
            print(f"{label:<{w}}{C.fmt(med[k]):>10}{C.fmt(C.mbps(size, med[k]), '.0f'):>9}   {runs}{mark}")
        print()
        cpu = self.cpu_summary()
        if cpu:
            print("CPU seconds per run (median): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
            print()
        def pf(ok):
            return "n/a " if ok is None else ("PASS" if ok else "FAIL")
        b = bars["c_over_b"]
        print("bars:")
        print(f"  {pf(b['pass'])}  (c)/(b) throughput = {C.fmt(b['value'])} (bar >= 0.9; CLI wall time vs "
              f"{b['b_transport']}); with the job's elapsed_s: {C.fmt(b['value_job_elapsed'])}")
        b = bars["c_over_b_disk"]
        if b["value"] is not None:
            print(f"  info  (c)/(b+disk) = {C.fmt(b['value'])}, with the job's elapsed_s: "
                  f"{C.fmt(b['value_job_elapsed'])} (against a plain download that also lands every byte on disk)")
        b = bars["c_vs_a"]
        print(f"  {pf(b['pass'])}  (c) vs (a): (c) is {C.fmt(b['speedup'], '.2f')}x the speed of s3fs get (bar: faster)")
        b = bars["d_get_over_cp"]
        print(f"  {pf(b['pass'])}  (d) get/cp throughput = {C.fmt(b['value'])} (bar >= 0.8)")
        b = bars["rss"]
        main_rss = f"{b['peak_kib_main'] / 1024:.0f} MiB" if b["peak_kib_main"] else "n/a"
        if self.rss_check:
            rc = self.rss_check
            print(f"  {pf(b['pass'])}  peak agent RSS prewarming {C.format_size(rc['size'])}: "
                  f"{rc['peak_rss_kib'] / 1024:.0f} MiB (VmHWM {rc['vm_hwm_kib'] / 1024:.0f} MiB; bar < 1 GiB); "
                  f"{C.format_size(size)} runs: {main_rss}")
            print(f"        (that prewarm took {rc['seconds']:.2f} s, {C.fmt(C.mbps(rc['size'], rc['seconds']), '.0f')} MB/s, "
                  f"job {rc['job_elapsed_s']:.2f} s: not a speed figure — no page-cache drop or prefault "
                  "for it, so its cache writes land on cold memory)")
        else:
            print(f"  n/a   peak agent RSS during (c) at {C.format_size(size)}: {main_rss} — the 4 GiB bar was "
                  "not checked; pass --rss-size 4GiB (off by default: the S3 server needs ~2 GB RAM per GiB stored)")
        for note in self.notes:
            print(f"note: {note}")
        print()
        print("reproduce: " + shlex.join(argv))
        if self.runs:
            print("commands timed: " + self.runs[-1]["c"]["command"].replace(str(self.workdir), "$WORK")
                  + " ; " + self.runs[-1]["d"]["get_command"].replace(str(self.workdir), "$WORK")
                  + " ; " + self.runs[-1]["d"]["cp_command"].replace(str(self.workdir), "$WORK"))

    def mode_text(self) -> str:
        parts = []
        if self.args.prefault:
            parts.append("prefault (a model-size scratch file written and deleted on the work filesystem right "
                         "before every clock start, in the timed process for (a)/(b), just before spawning "
                         "the command for (c)/(d); (b) also reuses buffers touched before its clock; the agent "
                         "reuses its own slot buffers)")
        else:
            parts.append("no prefault (--no-prefault)")
        if self.drop:
            parts.append("page cache dropped before each cold contender (a, b, b+disk, c), then the S3 "
                         "server's data files re-read so the origin is equally warm for all of them")
        else:
            parts.append("page cache not dropped (sync only)")
        transports = TRANSPORTS if self.args.transport == "both" else (self.args.transport,)
        order = ["a", *(f"b[{t}]" for t in transports), *(["b+disk"] if self.args.disk_reference else []), "c", "d"]
        parts.append(f"order per run: {', '.join(order)} (d alternates get/cp first); "
                     "warm (d): cache chunk files and cp source each read once before timing")
        return "; ".join(parts)

    def cpu_summary(self) -> dict[str, float]:
        out: dict[str, list[float]] = {}
        for rec in self.runs:
            for k in ("a", *[f"b_{t}" for t in TRANSPORTS], "b_disk"):
                if k in rec:
                    out.setdefault(f"{k} client", []).append(rec[k]["cpu_s"])
                    if rec[k].get("server_cpu_s_whole_process") is not None:
                        out.setdefault(f"{k} S3 server", []).append(rec[k]["server_cpu_s_whole_process"])
            c = rec["c"]
            if c.get("agent_cpu_s") is not None:
                out.setdefault("c agent", []).append(c["agent_cpu_s"])
            out.setdefault("c CLI", []).append(c["cli_cpu_s"])
            if c.get("server_cpu_s_whole_process") is not None:
                out.setdefault("c S3 server", []).append(c["server_cpu_s_whole_process"])
            d = rec["d"]
            out.setdefault("d get CLI", []).append(d["get_cli_cpu_s"])
            if d.get("get_agent_cpu_s") is not None:
                out.setdefault("d get agent", []).append(d["get_agent_cpu_s"])
            out.setdefault("d cp", []).append(d["cp_cli_cpu_s"])
        return {k: C.median(v) for k, v in out.items()}


def _delta(a: float | None, b: float | None) -> float | None:
    return b - a if a is not None and b is not None else None


def _flat_seconds(rec: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    if "a" in rec:
        out["a"] = rec["a"]["seconds"]
    for t in TRANSPORTS:
        if f"b_{t}" in rec:
            out[f"b_{t}"] = rec[f"b_{t}"]["seconds"]
    if "b_disk" in rec:
        out["b_disk"] = rec["b_disk"]["seconds"]
    if "c" in rec:
        out["c_cli"] = rec["c"]["seconds"]
        out["c_job"] = rec["c"]["job_elapsed_s"]
    if "d" in rec:
        out["d_get"] = rec["d"]["get_s"]
        if rec["d"].get("get_internal_s") is not None:
            out["d_get_internal"] = rec["d"]["get_internal_s"]
        out["d_cp"] = rec["d"]["cp_s"]
    return out


def _secs(v: float) -> str:
    return f"{v:.2f}s"


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--size", type=C.size_arg, default=C.size_arg("1GiB"), help="object size (default 1GiB)")
    p.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every figure here")
    p.add_argument("--rss-size", type=C.size_arg, default=None, metavar="SIZE",
                   help="also prewarm an object of this size (e.g. 4GiB) with a fresh agent and check its "
                        "peak RSS < 1 GiB; off by default (the S3 server needs ~2 GB RAM per GiB stored)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel ranged GETs of (b) (default 8)")
    p.add_argument("--agent-concurrency", default="auto",
                   help="the agent's fetch_concurrency (default auto, the agent's default; a number fixes it)")
    p.add_argument("--chunk-size", type=C.size_arg, default=C.size_arg("16MiB"), help="range / chunk size (default 16MiB)")
    p.add_argument("--transport", choices=("both", *TRANSPORTS), default="both",
                   help="client(s) for (b); with both, the faster median is the ceiling (default both)")
    p.add_argument("--boto3-read", choices=("fp", "readinto", "read"), default="fp",
                   help="how (b)/boto3 reads a body: fp = http.client readinto straight into the buffer, "
                        "the socket's low-water mark up (default), readinto = urllib3 readinto, read = StreamingBody.read + copy")
    p.add_argument("--no-disk-reference", dest="disk_reference", action="store_false", default=True,
                   help="skip (b+disk), the informational plain download that lands every byte in a file")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false", default=None,
                   help="do not drop the page cache before cold contenders (default: drop when root)")
    p.add_argument("--no-prefault", dest="prefault", action="store_false", default=True,
                   help="skip the model-size page-cache prefault before each clock")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent of the temp work dir (S3 data, cache, destinations); default $TMPDIR")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    p.add_argument("--link", default=None,
                   help="run on an emulated S3 link, e.g. rtt=20ms,conn=25MB/s (bench/link.py; root)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    link.enter(args.link)
    if args.runs < 1 or args.runs > 100:
        print("--runs must be between 1 and 100", file=sys.stderr)
        return 2
    if args.drop_caches is None:
        args.drop_caches = C.can_drop_caches()
    elif args.drop_caches and not C.can_drop_caches():
        print("cannot write /proc/sys/vm/drop_caches (run as root, or pass --no-drop-caches)", file=sys.stderr)
        return 2
    full_argv = [sys.executable, *sys.argv]
    bench = Bench(args)
    if not args.drop_caches:
        bench.notes.append("the page cache was not dropped between contenders"
                           + ("" if C.can_drop_caches() else " (not root)"))
    started = time.time()
    status = C.run_guarded(bench.run, bench.close)
    if not bench.runs:
        return status
    rep = bench.report()
    bench.print_report(rep, full_argv)
    if args.json:
        C.write_json(args.json, {
            "command": shlex.join(full_argv), "cwd": os.getcwd(), "started": started,
            "size": bench.size, "runs_requested": args.runs, "concurrency": bench.conc,
            "chunk_size": bench.chunk, "mode": bench.mode_text(), "drop_caches": bench.drop,
            "prefault": args.prefault, "boto3_read": args.boto3_read,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "runs": bench.runs, "rss_check": bench.rss_check, "cpu_median_s": bench.cpu_summary(),
            **rep, "notes": bench.notes})
        print(f"figures written to {args.json}")
    return status  # 0 whatever the bars say; 1 if it broke, 130 if interrupted


if __name__ == "__main__":
    sys.exit(main())
