"""Shared plumbing for the benchmarks: page-cache control, process sampling, an agent process.

Stdlib only (plus ``coldbrew`` itself), so a benchmark can run wherever the
agent runs. Nothing here is timed; it prepares the state before a clock starts
and reads figures after it stops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from coldbrew.agent.units import format_size  # noqa: F401 - re-exported for the benchmarks

MB = 1_000_000  # throughput is reported in decimal MB/s
MiB = 1 << 20
GiB = 1 << 30
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


# --- page cache and memory -------------------------------------------------------------


def sync() -> None:
    os.sync()


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    """Flush dirty pages, then drop clean page cache, dentries and inodes (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_files(paths: Iterable[Path], buf_bytes: int = 8 * MiB) -> int:
    """Read files once, discarding the bytes, so they sit in the page cache. Returns bytes read."""
    buf = bytearray(buf_bytes)
    view = memoryview(buf)
    total = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            while True:
                n = os.readv(fd, [view])
                if n <= 0:
                    break
                total += n
        finally:
            os.close(fd)
    return total


def cached_bytes(path: Path) -> int | None:
    """Bytes of ``path``'s own page cache by cachestat(2) (Linux 6.5+; None where it is
    missing). For a file on a FUSE mount: the mount's pages, not those of what backs it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    span = (ctypes.c_uint64 * 2)(0, 0)  # offset 0, length 0: the whole file
    out = (ctypes.c_uint64 * 5)()  # nr_cache first
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, span, out, 0) != 0:  # SYS_cachestat (x86-64, arm64)
            return None
    finally:
        os.close(fd)
    return out[0] * os.sysconf("SC_PAGE_SIZE")


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink())


def prefault_page_cache(directory: Path, size: int, piece: int = 16 * MiB) -> float:
    """Write ``size`` bytes to a scratch file in ``directory``, then delete it. Returns seconds.

    These VMs hand freed memory back to the host; the first write to such memory is
    several times slower than to memory the guest just used. Writing and freeing a
    model-sized file right before a clock starts leaves the kernel holding that much
    recently-used memory, which the timed command's page-cache writes then reuse.
    (Measured: a 1 GiB file write after drop_caches took 1.8 s, 0.42 s after this;
    an anonymous-memory prefault gave no gain for page-cache writes.)
    """
    started = time.perf_counter()
    path = Path(directory) / f".prefault-{os.getpid()}"
    buf = bytes(piece)
    view = memoryview(buf)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, view[: min(piece, left)])
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return time.perf_counter() - started


# --- /proc readings --------------------------------------------------------------------


def proc_status_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, RssAnon...), or None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError):
        return None


def children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children so far."""
    r = os.times()
    return r.children_user + r.children_system


class RssSampler:
    """Samples a process's VmRSS every ``interval_s`` in a thread; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            kib = proc_status_kib(self.pid, "VmRSS")
            if kib is None:
                return
            self.peak_kib = max(self.peak_kib, kib)
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        kib = proc_status_kib(self.pid, "VmRSS")  # one last look
        if kib is not None:
            self.peak_kib = max(self.peak_kib, kib)


# --- commands ----------------------------------------------------------------------------


def coldbrew_command() -> list[str]:
    """The ``coldbrew`` entry point of this interpreter's environment."""
    script = Path(sys.executable).parent / "coldbrew"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "coldbrew.agent"]


def timed_run(cmd: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float = 600,
              ) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run a command to completion; wall seconds from spawn to exit. Raises on failure."""
    started = time.perf_counter()
    result = subprocess.run(list(cmd), env=dict(env) if env is not None else None, check=False,
                            capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds, result


# --- an agent process ------------------------------------------------------------------


class AgentProc:
    """A ``coldbrew agent`` daemon in its own process, for one benchmark run."""

    def __init__(self, workdir: Path, origin: str, env: Mapping[str, str], name: str,
                 extra_args: Sequence[str] = ()) -> None:
        self.cache_dir = Path(workdir) / f"{name}-cache"
        self.socket = Path(workdir) / f"{name}.sock"
        self.log_path = Path(workdir) / f"{name}.log"
        self.origin = origin
        self.env = dict(env)
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_address = ""

    def command(self) -> list[str]:
        return [*coldbrew_command(), "agent", "--origin", self.origin,
                "--cache-dir", str(self.cache_dir), "--socket", str(self.socket),
                "--metrics-address", "127.0.0.1:0", "--log-format", "json", *self.extra_args]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cli_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, "COLDBREW_SOCKET": str(self.socket)}

    def start(self, timeout_s: float = 60.0) -> AgentProc:
        from coldbrew.agent.control.client import AgentClient
        from coldbrew.agent.errors import AgentUnavailable

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env})
        client = AgentClient(self.socket, timeout_s=5)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited at start ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                self.metrics_address = client.health()["metrics_address"]
                return self
            except AgentUnavailable:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"agent did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def remove_cache(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample from the agent's /metrics (the first whose labels include ``labels``)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://{self.metrics_address}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return None


def upload_random(client: Any, bucket: str, key: str, size: int, part: int = 64 * MiB) -> None:
    """Upload ``size`` random bytes without a local copy (multipart, parts made on the fly)."""
    from concurrent.futures import ThreadPoolExecutor

    up = client.create_multipart_upload(Bucket=bucket, Key=key)
    try:
        def one(n: int) -> dict[str, Any]:
            length = min(part, size - n * part)
            r = client.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                   PartNumber=n + 1, Body=os.urandom(length))
            return {"PartNumber": n + 1, "ETag": r["ETag"]}
        with ThreadPoolExecutor(3) as ex:
            parts = list(ex.map(one, range(-(-size // part))))
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"])
        raise


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_guarded(run: Callable[[], None], close: Callable[[], None],
                on_failure: Callable[[], None] | None = None) -> int:
    """Run a benchmark so that it always cleans up (S3 server, agents, mounts, temp dirs).

    SIGTERM and SIGHUP count as Ctrl-C; while ``close`` runs, a second Ctrl-C
    cannot cut it short. Returns 0, 1 (it broke: ``on_failure`` may print
    logs) or 130 (interrupted).
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    status = 0
    try:
        run()
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        status = 130
    except Exception as e:
        print(f"\nbenchmark failed: {type(e).__name__}: {e}", file=sys.stderr)
        if on_failure is not None:
            on_failure()
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return status


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- figures -----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def mbps(size: int, seconds: float | None) -> float | None:
    return size / seconds / MB if seconds else None


def fmt(value: float | None, spec: str = ".3f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def write_json(path: Path, data: Any) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def size_arg(text: str) -> int:
    """argparse type for sizes like 1GiB (positive)."""
    import argparse

    from coldbrew.agent.units import parse_size

    try:
        n = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return n
