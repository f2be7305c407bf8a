"""Probe: how fast one agent warms a file from a single peer, and what each side spends.

    python bench/probes/probe_peer.py [--size 1GiB] [--runs 3] [--agent-arg=--p2p-upload-limit=0 ...]

One local S3 server, one object of ``--size`` random bytes. Agent A prewarms it from S3;
then, per run, a fresh agent B (its P2P port and A's as its only peer) prewarms it with A
as its only source, and the probe prints B's time and throughput, both agents' CPU seconds,
the bytes B wrote (``/proc/<pid>/io``) and where its bytes came from. Groundwork for P2P
throughput (bench/RESULTS.md, P2P rollout). Everything listens on 127.0.0.1; the work dir
is removed at exit unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/_common

import _common as C

from coldbrew.agent.devtools.locals3 import LocalS3, free_port_pair

BUCKET, KEY = "probe-peer", "model.bin"


def _io(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


def _status(agent: C.AgentProc) -> dict:
    out = C.timed_run([*C.coldbrew_command(), "status", "--json"], env=agent.cli_env(), timeout_s=30)[1]
    return json.loads(out.stdout)["agent"]


def _agent(work: Path, env: dict[str, str], name: str, me: int, peer: int, extra: list[str]) -> C.AgentProc:
    return C.AgentProc(work, f"s3://{BUCKET}", env, name, [
        "--p2p-port", str(me), "--p2p-address", "127.0.0.1", "--peers", f"127.0.0.1:{peer}",
        "--peers-refresh-s", "1", *extra]).start()


def _prewarm(agent: C.AgentProc) -> float:
    seconds, _ = C.timed_run([*C.coldbrew_command(), "prewarm", f"s3://{BUCKET}/{KEY}", "--wait",
                              "--quiet"], env=agent.cli_env(), timeout_s=600)
    return seconds


def run(args: argparse.Namespace, work: Path) -> None:
    s3 = LocalS3(work / "s3", log_path=work / "weed.log")
    s3.start()
    agents: list[C.AgentProc] = []
    try:
        env = s3.env()
        client = s3.client()
        client.create_bucket(Bucket=BUCKET)
        src = work / "src.bin"
        with open(src, "wb") as f:
            for left in range(args.size, 0, -16 * C.MiB):
                f.write(os.urandom(min(16 * C.MiB, left)))
        client.upload_file(str(src), BUCKET, KEY)
        src.unlink()
        pa, pb = free_port_pair(), free_port_pair()
        a = _agent(work, env, "a", pa, pb, args.agent_arg)
        agents.append(a)
        C.log(f"A from S3: {_prewarm(a):.2f} s")
        for r in range(args.runs):
            b = _agent(work, env, f"b{r}", pb, pa, args.agent_arg)
            agents.append(b)
            deadline = time.monotonic() + 30
            while not _status(b)["p2p"]["peers"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"B did not find A:\n{b.log_tail()}")
                time.sleep(0.2)
            C.sync()
            C.prefault_page_cache(work, args.size)
            cpu0, io0 = [C.proc_cpu_s(x.pid) or 0.0 for x in (a, b)], _io(b.pid)
            seconds = _prewarm(b)
            cpu1, io1 = [C.proc_cpu_s(x.pid) or 0.0 for x in (a, b)], _io(b.pid)
            st = _status(b)
            C.log(f"run {r + 1}: B from its peer {seconds:.2f} s ({args.size / seconds / 1e6:.0f} MB/s); "
                  f"CPU-s A {cpu1[0] - cpu0[0]:.2f}, B {cpu1[1] - cpu0[1]:.2f}; B wrote "
                  f"{C.format_size(io1['write_bytes'] - io0['write_bytes'])}; from peers "
                  f"{C.format_size(st['p2p']['bytes_from_peers'])}, from S3 {C.format_size(st['origin_bytes'])}")
            b.stop()
            b.remove_cache()
            agents.remove(b)
    finally:
        for x in agents:
            x.stop()
        s3.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=C.size_arg, default=C.size_arg("1GiB"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--agent-arg", action="append", default=[],
                   help="extra argument for both agents, e.g. --agent-arg=--p2p-upload-limit=0")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp work dir")
    p.add_argument("--keep", action="store_true", help="keep the work dir (agent logs) afterwards")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="coldbrew-probe-peer-", dir=args.workdir))
    try:
        run(args, work)
    finally:
        if args.keep:
            print(f"kept {work} (the agents' logs: a.log, b0.log, ...)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
