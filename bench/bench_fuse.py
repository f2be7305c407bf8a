#!/usr/bin/env python3
"""Benchmark: reading a model through the FUSE view against its baselines, side by side, in one run.

One local S3 server (SeaweedFS ``weed mini`` on 127.0.0.1), one object of ``--size``
bytes (``model.safetensors``, so the view prefetches it on open), agents started
with ``--mount``, and five readings of the same bytes, each run in every repetition:

  (1) direct          the agent's cache file (the entry's data file) read straight from
                      disk, warm in the page cache — the local ceiling.
  (2) FUSE, cached    first read through the mount of a fully cached file (data file warm,
                      nothing of it in the mount's page cache yet): the view's own cost.
                      With FUSE passthrough (libfuse >= 3.16, Linux >= 6.9) the kernel reads
                      the data file itself; without it, requests answered by ``read_buf``.
  (3) FUSE, again     the same file read through the mount again, a new open: passed
                      through again, or served from the page cache the view let the mount
                      keep (``keep_cache``).
  (4) FUSE, cold      a fresh agent (empty cache, fresh mount) and the file read through
                      the mount straight from S3: open starts the in-order prefetch. With
                      passthrough the open is direct_io (the bytes go from the agent into
                      the reader's buffer, and the mount keeps no second copy of them in
                      page cache: shown after the table); without it, the mount's pages.
  (5) prewarm, cold   a fresh agent and ``coldbrew prewarm URI --wait``: the agent's own
                      S3-to-cache speed, the reference for (4). Timed by the job's own
                      elapsed_s (the stricter figure; the CLI's wall time is shown too).

Every reader is the same loop: ``readv`` into one reused 8 MiB buffer, in this process.
For context it also times [info] the same bytes read from a local file whose page cache
is in 4 KiB folios, as a FUSE file's is (the agent's data file sits in large folios).
Bars: (2)/(1) throughput >= 0.5; (3)/(1) >= 0.9; (4)/(5) >= 0.8. Bars are marked
PASS/FAIL; the exit status is 0 regardless (a benchmark, not a test).

    python bench/bench_fuse.py --size 1GiB --runs 3
    python bench/bench_fuse.py --size 256MiB --runs 1 --json /tmp/fuse.json

Needs root (to mount, set the mount's read-ahead and drop the page cache), /dev/fuse,
Debian ``fuse3`` and mfusepy. Everything listens on 127.0.0.1 only; the server, the
agents, their mounts and the temp files are removed at exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

from coldbrew.fuse.mount import fuse_library

BUCKET = "coldbrew-bench"
KEY = "bench/model.safetensors"


def _digest_file(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    buf = bytearray(16 * C.MiB)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [view]):
            h.update(view[:n])
    finally:
        os.close(fd)
    return h.hexdigest()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size: int = args.size
        self.uri = f"s3://{BUCKET}/{KEY}"
        self.workdir = Path(tempfile.mkdtemp(prefix="coldbrew-bench-fuse-", dir=args.workdir))
        self.src = self.workdir / "src.bin"
        self.s3: Any = None
        self.s3_env: dict[str, str] = {}
        self.agents: list[tuple[C.AgentProc, Path]] = []
        self.runs: list[dict[str, Any]] = []
        self.drop = args.drop_caches
        self.timeout_s = max(300.0, self.size / (5 * C.MB))
        self.src_digest = ""
        self.etag = ""
        self.notes: list[str] = []

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # --- set-up ------------------------------------------------------------------------------

    def start_s3(self) -> None:
        from boto3.s3.transfer import TransferConfig

        from coldbrew.agent.devtools.locals3 import LocalS3

        self.s3 = LocalS3(self.workdir / "s3", log_path=self.workdir / "weed.log")
        self.s3.start()
        self.s3_env = self.s3.env()
        client = self.s3.client()
        client.create_bucket(Bucket=BUCKET)
        with open(self.src, "wb") as f:
            left = self.size
            while left > 0:
                n = min(16 * C.MiB, left)
                f.write(os.urandom(n))
                left -= n
        t0 = time.perf_counter()
        client.upload_file(str(self.src), BUCKET, KEY, Config=TransferConfig(
            multipart_threshold=64 * C.MiB, multipart_chunksize=64 * C.MiB, max_concurrency=4))
        self.etag = client.head_object(Bucket=BUCKET, Key=KEY)["ETag"]
        self.src_digest = _digest_file(self.src)
        self.log(f"local S3 on {self.s3.endpoint_url}; {self.uri}: {C.format_size(self.size)} random "
                 f"bytes uploaded in {time.perf_counter() - t0:.1f} s")

    def start_agent(self, name: str) -> tuple[C.AgentProc, Path]:
        mnt = self.workdir / f"{name}-mnt"
        agent = C.AgentProc(self.workdir, f"s3://{BUCKET}", self.s3_env, name, extra_args=[
            "--mount", str(mnt), "--chunk-size", str(self.args.chunk_size),
            "--fetch-concurrency", str(self.args.concurrency)])
        self.agents.append((agent, mnt))
        agent.start(timeout_s=120)
        return agent, mnt

    def stop_agent(self, agent: C.AgentProc, mnt: Path) -> None:
        agent.stop()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
        agent.remove_cache()

    def origin_files(self) -> list[Path]:
        return [p for p in C.files_under(self.workdir / "s3") if p.name != "weed.log"]

    def prepare_cold(self) -> None:
        """Same page-cache state before each cold contender: only the S3 server's data warm."""
        if self.drop:
            C.drop_caches()
            C.read_files(self.origin_files())
        else:
            C.sync()

    def prefault(self, models: int = 1) -> float:
        """Free as much recently-used memory as the reading will fill with page cache."""
        return C.prefault_page_cache(self.workdir, models * self.size) if self.args.prefault else 0.0

    def timed_read(self, paths: list[Path], agent: C.AgentProc | None = None,
                   cpu: dict[str, float] | None = None, fills: int = 1) -> float:
        self.prefault(fills)
        before = self._cpu(agent)
        started = time.perf_counter()
        n = C.read_files(paths)
        seconds = time.perf_counter() - started
        if cpu is not None:
            cpu.update({k: v - before[k] for k, v in self._cpu(agent).items() if k in before})
        if n != self.size:
            raise RuntimeError(f"read {n} bytes from {paths[0]}..., wanted {self.size}")
        return seconds

    def _cpu(self, agent: C.AgentProc | None) -> dict[str, float]:
        """CPU seconds so far: the agent, the S3 server, and this process (the reader)."""
        t = os.times()
        out = {"reader": t.user + t.system}
        for name, pid in (("agent", agent.pid if agent else None), ("s3", self.s3.proc.pid)):
            value = C.proc_cpu_s(pid) if pid else None
            if value is not None:
                out[name] = value
        return out

    def small_folio_read(self) -> float:
        """[info] The same bytes read from the page cache in 4 KiB folios, as FUSE's cache holds them.

        The agent writes its data file in large pieces, so the kernel caches it in large
        folios (2 MiB here), which read faster than the 4 KiB folios a FUSE file gets.
        Written 4 KiB at a time, a local copy is cached in 4 KiB folios too.
        """
        copy = self.workdir / "small-folios.bin"
        src = os.open(self.src, os.O_RDONLY)
        dst = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while piece := os.read(src, 4096):
                os.write(dst, piece)
        finally:
            os.close(src)
            os.close(dst)
        try:
            C.read_files([copy])
            return self.timed_read([copy])
        finally:
            copy.unlink()

    def check_same(self, path: Path, what: str) -> None:
        if _digest_file(path) != self.src_digest:
            raise RuntimeError(f"{what}: {path} differs from the source object")

    # --- contenders -------------------------------------------------------------------------------

    def prewarm_cold(self) -> dict[str, Any]:
        agent, mnt = self.start_agent("prewarm")
        try:
            env = agent.cli_env()
            C.timed_run([*C.coldbrew_command(), "status"], env=env, timeout_s=60)  # CLI code warm
            self.prepare_cold()
            self.prefault()
            cmd = [*C.coldbrew_command(), "prewarm", self.uri, "--wait", "--json"]
            before = self._cpu(agent)
            seconds, result = C.timed_run(cmd, env=env, timeout_s=self.timeout_s)
            after = self._cpu(agent)
            job = json.loads(result.stdout)
            if job["state"] != "done" or job["bytes_done"] != self.size:
                raise RuntimeError(f"prewarm did not finish: {result.stdout}\n{agent.log_tail()}")
            out = {"prewarm_cli": seconds, "prewarm_job": job["elapsed_s"],
                   "prewarm_command": shlex.join(cmd),
                   "cpu_prewarm": {k: after[k] - before[k] for k in ("agent", "s3") if k in before}}
            # The cached file, read straight from the cache and through the mount.
            C.sync()
            cached = sorted(agent.cache_dir.glob("coldbrew-v2/files/*/*/data"))
            if sum(p.stat().st_size for p in cached) != self.size:
                raise RuntimeError("the cache does not hold exactly the file's bytes")
            C.read_files(cached)  # warm, as (2) finds them
            out["direct"] = self.timed_read(cached)
            out["direct_small_folios"] = self.small_folio_read()
            fuse_path = mnt / KEY
            out["cpu_fuse_cached"] = {}
            out["fuse_cached"] = self.timed_read([fuse_path], agent, out["cpu_fuse_cached"])
            out["fuse_again"] = self.timed_read([fuse_path])
            self.check_same(fuse_path, "(2)/(3) FUSE read")
            out["fuse_read_requests"] = agent.metric("coldbrew_fuse_op_seconds_count", op="read")
            out["fuse_read_seconds_in_view"] = agent.metric("coldbrew_fuse_op_seconds_sum", op="read")
            out["fuse_read_bytes"] = agent.metric("coldbrew_fuse_read_bytes_total")
            out["fuse_opens"] = {mode: agent.metric("coldbrew_fuse_opens_total", mode=mode) or 0
                                 for mode in ("passthrough", "cached", "direct")}
            return out
        finally:
            self.stop_agent(agent, mnt)

    def fuse_cold(self) -> dict[str, Any]:
        agent, mnt = self.start_agent("cold")
        try:
            self.prepare_cold()
            cpu: dict[str, float] = {}
            # Two models' worth of page cache: the data file and the mount's own pages.
            seconds = self.timed_read([mnt / KEY], agent, cpu, fills=2)
            out = {"fuse_cold": seconds, "cpu_fuse_cold": cpu,
                   "origin_gets": agent.metric("coldbrew_origin_requests_total", op="get", outcome="ok"),
                   "origin_bytes": agent.metric("coldbrew_origin_bytes_total"),
                   "fuse_cold_opens": {mode: agent.metric("coldbrew_fuse_opens_total", mode=mode) or 0
                                       for mode in ("passthrough", "cached", "direct")},
                   # Measured by a new open (passed through: it adds no mount pages).
                   "mount_page_cache_after_cold": C.cached_bytes(mnt / KEY)}
            self.check_same(mnt / KEY, "(4) cold FUSE read")
            return out
        finally:
            self.stop_agent(agent, mnt)

    def run(self) -> None:
        self.start_s3()
        for r in range(self.args.runs):
            rec: dict[str, Any] = {"run": r + 1}
            order = ("prewarm", "cold") if r % 2 == 0 else ("cold", "prewarm")
            for which in order:
                self.log(f"run {r + 1}/{self.args.runs}: "
                         + ("(5) prewarm cold, then (1) direct, (2) FUSE cached, (3) FUSE again"
                            if which == "prewarm" else "(4) FUSE cold"))
                rec.update(self.prewarm_cold() if which == "prewarm" else self.fuse_cold())
            self.runs.append(rec)
            self.log("  " + "  ".join(f"{k}={rec[k]:.3f}s" for k in _TIMED if k in rec))

    def close(self) -> None:
        for agent, mnt in self.agents:
            try:
                agent.stop()
            except Exception as e:
                print(f"warning: stopping agent: {e}", file=sys.stderr)
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
        if self.s3 is not None:
            self.s3.stop()
        if self.args.keep:
            print(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- figures ----------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        med = {k: C.median([rec[k] for rec in self.runs if k in rec]) for k in _TIMED}

        def ratio(base: str, other: str) -> float | None:
            return med[base] / med[other] if med.get(base) and med.get(other) else None

        bars = {
            "fuse_cached_over_direct": (ratio("direct", "fuse_cached"), 0.5),
            "fuse_again_over_direct": (ratio("direct", "fuse_again"), 0.9),
            "fuse_cold_over_prewarm": (ratio("prewarm_job", "fuse_cold"), 0.8),
        }
        return {"medians_s": med, "bars": {k: {"value": v, "bar": b, "pass": v is not None and v >= b}
                                           for k, (v, b) in bars.items()},
                "cold_vs_prewarm_cli": ratio("prewarm_cli", "fuse_cold"),
                "again_vs_small_folios": ratio("direct_small_folios", "fuse_again")}

    def print_report(self, rep: dict[str, Any], argv: list[str]) -> None:
        med = rep["medians_s"]
        print()
        print(f"coldbrew FUSE benchmark — {KEY}, {C.format_size(self.size)} ({self.size} bytes), "
              f"{self.args.runs} run(s), median shown; MB/s = 10^6 bytes/s")
        print(f"chunk {C.format_size(self.args.chunk_size)}, fetch concurrency {self.args.concurrency}; "
              f"machine: {os.cpu_count()} CPUs, {platform.platform()}")
        print("mode: " + self.mode_text())
        print()
        labels = {
            "direct": "(1) direct read of the cache's data file (warm)",
            "direct_small_folios": "[info] same bytes, 4 KiB page-cache folios",
            "fuse_cached": "(2) FUSE, first read of a fully cached file",
            "fuse_again": "(3) FUSE, repeated read (new open)",
            "fuse_cold": "(4) FUSE, cold read from S3 (prefetch on open)",
            "prewarm_job": "(5) coldbrew prewarm cold: job elapsed_s",
            "prewarm_cli": "(5) coldbrew prewarm cold: CLI wall time",
        }
        w = max(len(v) for v in labels.values()) + 2
        print(f"{'reading':<{w}}{'median s':>10}{'MB/s':>9}   runs (s)")
        for k, label in labels.items():
            if med.get(k) is None:
                continue
            runs = " ".join(f"{rec[k]:.3f}" for rec in self.runs if k in rec)
            print(f"{label:<{w}}{med[k]:>10.3f}{C.fmt(C.mbps(self.size, med[k]), '.0f'):>9}   {runs}")
        print()
        names = {"fuse_cached_over_direct": "(2)/(1) throughput", "fuse_again_over_direct": "(3)/(1) throughput",
                 "fuse_cold_over_prewarm": "(4)/(5) throughput (vs the job's elapsed_s)"}
        print("bars:")
        for k, b in rep["bars"].items():
            print(f"  {'PASS' if b['pass'] else 'FAIL'}  {names[k]} = {C.fmt(b['value'], '.2f')} "
                  f"(bar >= {b['bar']})")
        print(f"  info  (4) vs (5) by the prewarm CLI's wall time: {C.fmt(rep['cold_vs_prewarm_cli'], '.2f')}")
        print(f"  info  (3) vs the same bytes cached in 4 KiB folios: {C.fmt(rep['again_vs_small_folios'], '.2f')} "
              "(without passthrough a FUSE file's page cache is 4 KiB folios; the data file's are large)")
        print()
        print("CPU seconds (median over runs; 2 cores = 2 s per wall second):")
        for key, label in (("cpu_fuse_cached", "(2) FUSE cached"), ("cpu_fuse_cold", "(4) FUSE cold"),
                           ("cpu_prewarm", "(5) prewarm")):
            parts = []
            for who in ("agent", "s3", "reader"):
                vals = [rec[key][who] for rec in self.runs if key in rec and who in rec[key]]
                if vals:
                    parts.append(f"{who} {C.median(vals):.2f}")
            if parts:
                print(f"  {label}: " + ", ".join(parts))
        reqs = [rec.get("fuse_read_requests") for rec in self.runs if rec.get("fuse_read_requests")]
        secs = [rec.get("fuse_read_seconds_in_view") for rec in self.runs if rec.get("fuse_read_requests")]
        if reqs:
            print(f"  (2) FUSE read requests: {C.median(reqs):.0f} (mean {self.size / C.median(reqs) / C.MiB:.2f} "
                  f"MiB each), mean {C.median(secs) / C.median(reqs) * 1e3:.3f} ms each inside the view")
        for key, label in (("fuse_opens", "(2)/(3)"), ("fuse_cold_opens", "(4)")):
            opens = [rec[key] for rec in self.runs if rec.get(key)]
            if opens:
                print(f"  {label} opens by mode (last run): " + ", ".join(
                    f"{mode} {n:.0f}" for mode, n in opens[-1].items()))
        kept = [rec["mount_page_cache_after_cold"] for rec in self.runs
                if rec.get("mount_page_cache_after_cold") is not None]
        if kept:
            print(f"  the mount's own page cache after (4): {C.format_size(max(kept))} at most "
                  "(besides the data file's pages, which hold the model once)")
        print(f"  libfuse: {fuse_library() or 'the system one'}")
        for note in self.notes:
            print(f"note: {note}")
        print()
        print("reproduce: " + shlex.join(argv))
        if self.runs:
            print("timed: readv(8 MiB) loops in this process over the cache's data file and "
                  "$MOUNT/" + KEY + " ; " + self.runs[-1]["prewarm_command"])

    def mode_text(self) -> str:
        parts = ["prefault (right before every clock a scratch file as big as the page cache the "
                 "reading fills is written and deleted: the model's size; twice that for (4), where "
                 "the mount's pages may hold a second copy)" if self.args.prefault else "no prefault"]
        parts.append("page cache dropped before each cold reading, then the S3 server's data re-read"
                     if self.drop else "page cache not dropped (sync only)")
        parts.append("a fresh agent (empty cache, fresh mount) for each of (4) and (5); (1)-(3) on (5)'s "
                     "agent after its prewarm; (4)/(5) order alternates per run")
        return "; ".join(parts)


_TIMED = ("direct", "direct_small_folios", "fuse_cached", "fuse_again", "fuse_cold", "prewarm_job", "prewarm_cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--size", type=C.size_arg, default=C.size_arg("1GiB"), help="object size (default 1GiB)")
    p.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    p.add_argument("--chunk-size", type=C.size_arg, default=C.size_arg("16MiB"), help="agent chunk size (default 16MiB)")
    p.add_argument("--concurrency", type=int, default=8, help="agent fetch concurrency (default 8)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every figure here")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false", default=True,
                   help="do not drop the page cache before cold readings")
    p.add_argument("--no-prefault", dest="prefault", action="store_false", default=True,
                   help="skip the page-cache prefault before each clock")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp work dir (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.runs <= 100:
        print("--runs must be between 1 and 100", file=sys.stderr)
        return 2
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        print("bench_fuse needs root, /dev/fuse and fusermount3 (Debian: apt-get install fuse3)",
              file=sys.stderr)
        return 2
    full_argv = [sys.executable, *sys.argv]
    bench = Bench(args)

    def agent_logs() -> None:
        for agent, _ in bench.agents:
            print(agent.log_tail(), file=sys.stderr)

    status = C.run_guarded(bench.run, bench.close, agent_logs)
    if not bench.runs:
        return status
    rep = bench.report()
    bench.print_report(rep, full_argv)
    if args.json:
        C.write_json(args.json, {"command": shlex.join(full_argv), "size": bench.size,
                                 "chunk_size": args.chunk_size, "concurrency": args.concurrency,
                                 "mode": bench.mode_text(), "runs": bench.runs, "report": rep,
                                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}})
    return status


if __name__ == "__main__":
    sys.exit(main())
