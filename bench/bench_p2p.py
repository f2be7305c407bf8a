"""P2P rollout: N agents prewarm one model at once from a bandwidth-capped origin.

Issue 5's bar, side by side in one run, on one local S3 server behind a proxy that
caps the origin's total bandwidth (a shared S3 prefix / NAT / egress budget):

1. one agent alone (no peers): the time a single node needs;
2. N agents, P2P off: every node pulls the whole model from the origin;
3. N agents, P2P on, manifests published (``coldbrew publish``);
4. the same with the cluster identity (mTLS: the peer endpoint over HTTPS with client
   certificates, every torrent an SSL torrent), from a CA made here as cert-manager would.

For each: seconds until every agent has every byte cached (``prewarm --wait`` on all
at the same moment), and the origin bytes the proxy forwarded. Bars: with P2P,
origin bytes <= 1.1x the model and time(all N) <= 1.6x time(one alone); with TLS,
time <= 1.1x the same rollout without it and origin bytes still <= 1.1x the model.

Prefault (as in the other benchmarks; ``--no-prefault`` to skip): right before each
clock, a scratch file as big as what the agents are about to cache (N x the model) is
written and deleted. These VMs hand freed memory back to the host, and the first write
to it costs ~1.4 CPU-s per GiB of page cache (see ``_common.prefault_page_cache``). N
agents on one VM write N models' worth of page cache on the same 2 cores; N real nodes
each write one, on their own memory and cores.

    ./dev bench p2p                      # 1 GiB model, N=4, origin capped at 100 MB/s
    ./dev bench p2p --size 256MiB --n 3  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _common as C
from support.faultproxy import FaultProxy

from coldbrew.agent.devtools.locals3 import free_port_pair

BUCKET = "p2p-bench"
CHUNK = "16MiB"


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.size = args.size
        self.shards = args.shards
        self.results: dict[str, Any] = {}

    def setup(self) -> None:
        from coldbrew.agent.devtools.certs import ClusterCA

        self.ca = ClusterCA.create("coldbrew bench CA")
        from coldbrew.agent.devtools.locals3 import LocalS3

        self.s3 = LocalS3(self.workdir / "s3", log_path=self.workdir / "weed.log")
        self.s3.start()
        self.env = self.s3.env()
        client = self.s3.client()
        client.create_bucket(Bucket=BUCKET)
        part = self.size // self.shards
        t0 = time.perf_counter()
        # raw/: the same shards unpublished, so their manifests come from a peer and are
        # checked against the origin's ETag (--check only).
        for prefix in ("model", "raw") if self.args.check else ("model",):
            for i in range(self.shards):
                key = f"{prefix}/model-{i + 1:05d}-of-{self.shards:05d}.safetensors"
                C.upload_random(client, BUCKET, key, part)
        C.log(f"model: {self.shards} shards, {C.format_size(part * self.shards)} uploaded "
                 f"in {time.perf_counter() - t0:.1f} s")
        self.model_bytes = part * self.shards
        t0 = time.perf_counter()
        C.timed_run([*C.coldbrew_command(), "publish", f"s3://{BUCKET}/model/", "--chunk-size",
                     CHUNK, "--quiet"], env={**os.environ, **self.env})
        C.log(f"coldbrew publish: {time.perf_counter() - t0:.1f} s (read once, hashed, "
                 "manifests written beside the shards)")
        self.proxy = FaultProxy("127.0.0.1", self.s3.port).start()
        self.proxy.bandwidth = self.args.origin_bw

    def scenario(self, name: str, n: int, p2p: bool, tls: bool = False,
                 prefix: str = "model", seeded: bool = False) -> dict[str, Any]:
        """``seeded``: agent 0 prewarms first, untimed; the clock is the others', from it."""
        ports = [free_port_pair() for _ in range(n)]
        agents = []
        for i in range(n):
            extra = ["--chunk-size", CHUNK, "--cache-reserve", "0"]
            if p2p:
                others = ",".join(f"127.0.0.1:{p}" for p in ports if p != ports[i])
                extra += ["--p2p-port", str(ports[i]), "--p2p-address", "127.0.0.1",
                          "--peers-refresh-s", "1"] + (["--peers", others] if others else [])
                if tls:
                    extra += ["--p2p-tls-dir", str(self.ca.issue(self.workdir / f"{name}-{i}-tls", f"{name}-{i}"))]
            env = {**self.env, "AWS_ENDPOINT_URL": self.proxy.url}
            agents.append(C.AgentProc(self.workdir, f"s3://{BUCKET}", env, f"{name}-{i}", extra))
        try:
            for a in agents:
                a.start()
            if p2p and n > 1:
                self._wait_peers(agents, n - 1)
            if self.args.prefault:
                C.prefault_page_cache(self.workdir, n * self.model_bytes)
            if seeded:
                C.timed_run([*C.coldbrew_command(), "prewarm", f"s3://{BUCKET}/{prefix}/", "--wait",
                             "--quiet"], env=agents[0].cli_env(), timeout_s=900)
                self._wait_shared(agents[0], self.shards)
            self.proxy.reset_counts()
            timed = agents[1:] if seeded else agents
            cpu0 = [C.proc_cpu_s(a.pid) or 0.0 for a in timed]
            seconds = self._prewarm_all(timed, prefix)
            origin = self.proxy.counts["response_body_bytes"]
            cpu = [round((C.proc_cpu_s(a.pid) or 0.0) - c, 1) for a, c in zip(timed, cpu0)]
            from_peers = [int(a.metric("coldbrew_p2p_received_bytes_total") or 0) for a in agents]
            cached = [self._cached(a) for a in agents]
        finally:
            for a in agents:
                a.stop()
                a.remove_cache()
        if any(c != self.model_bytes for c in cached):
            raise RuntimeError(f"{name}: not every agent holds the whole model: {cached}")
        rec = {"agents": n, "p2p": p2p, "seconds_all": round(max(seconds), 2),
               "seconds_each": [round(s, 2) for s in seconds], "origin_bytes": origin,
               "origin_x_model": round(origin / self.model_bytes, 3),
               "bytes_from_peers": from_peers, "agent_cpu_s": cpu}
        C.log(f"{name}: all {n} ready in {rec['seconds_all']:.1f} s; origin sent "
                 f"{rec['origin_x_model']:.2f}x the model; from peers "
                 f"{[C.format_size(b) for b in from_peers]}; agent CPU-s {cpu}")
        return rec

    def _wait_peers(self, agents: list[C.AgentProc], count: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(int(a.metric("coldbrew_p2p_peers") or 0) >= count for a in agents):
                return
            time.sleep(0.1)
        raise RuntimeError("agents did not find each other")

    def _wait_shared(self, agent: C.AgentProc, count: int) -> None:
        deadline = time.monotonic() + 30
        while int(agent.metric("coldbrew_p2p_torrents") or 0) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("the seed did not share the model")
            time.sleep(0.1)

    def _prewarm_all(self, agents: list[C.AgentProc], prefix: str = "model") -> list[float]:
        barrier = threading.Barrier(len(agents))
        seconds = [0.0] * len(agents)
        t0 = [0.0]

        def run(i: int) -> None:
            barrier.wait()
            if i == 0:
                t0[0] = time.perf_counter()
            C.timed_run([*C.coldbrew_command(), "prewarm", f"s3://{BUCKET}/{prefix}/", "--wait",
                         "--quiet"], env=agents[i].cli_env(), timeout_s=900)
            seconds[i] = time.perf_counter() - t0[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(agents))]
        for t in threads:
            t.start()
        timeline, last = [], 0
        while any(t.is_alive() for t in threads):  # origin MB per second, for the record
            time.sleep(1.0)
            now = self.proxy.counts["response_body_bytes"]
            timeline.append(round((now - last) / 1e6))
            last = now
        for t in threads:
            t.join()
        C.log(f"origin MB/s, second by second: {timeline}")
        return seconds

    @staticmethod
    def _cached(a: C.AgentProc) -> int:
        _, out = C.timed_run([*C.coldbrew_command(), "status", "--json"], env=a.cli_env())
        return sum(f["cached_bytes"] for f in json.loads(out.stdout)["files"])

    def run_check(self) -> int:
        """The end-to-end check of peers' manifests, side by side with published ones: one
        seed, then N-1 agents pull from it over mTLS (docs/security.md, Manifests)."""
        n = self.args.n
        self.setup()
        try:
            published = self.scenario("published", n, p2p=True, tls=True, seeded=True)
            checked = self.scenario("checked", n, p2p=True, tls=True, prefix="raw", seeded=True)
        finally:
            self.proxy.stop()
            self.s3.stop()
        ratio = checked["seconds_all"] / published["seconds_all"]
        print()
        print(f"model {C.format_size(self.model_bytes)} in {self.shards} shards, chunk {CHUNK}, "
              f"one seed then {n - 1} agents over mTLS")
        for label, rec in (("manifests published", published),
                           ("manifests from the seed, checked", checked)):
            print(f"{label:34} {rec['seconds_all']:>8.1f} s  origin {rec['origin_x_model']:.2f}x  "
                  f"agent CPU-s {rec['agent_cpu_s']}")
        print(f"time, checked / published: {ratio:.2f}x")
        if self.args.json:
            C.write_json(self.args.json, {"published": published, "checked": checked,
                                          "ratio": round(ratio, 3)})
        return 0

    def run(self) -> int:
        if self.args.check:
            return self.run_check()
        n = self.args.n
        self.setup()
        try:
            alone = self.scenario("alone", 1, p2p=False)
            off = self.scenario("p2p-off", n, p2p=False) if not self.args.skip_off else None
            on = self.scenario("p2p-on", n, p2p=True)
            tls = self.scenario("p2p-tls", n, p2p=True, tls=True) if not self.args.skip_tls else None
        finally:
            self.proxy.stop()
            self.s3.stop()
        time_ratio = on["seconds_all"] / alone["seconds_all"]
        print()
        print(f"model {C.format_size(self.model_bytes)} in {self.shards} shards, chunk {CHUNK}, "
              f"origin capped at {self.args.origin_bw / 1e6:.0f} MB/s, N = {n}; prefault "
              + ("on (N x model of page cache written and freed before each clock)"
                 if self.args.prefault else "off"))
        print(f"{'':24} {'all ready (s)':>14} {'origin bytes / model':>22}")
        for label, rec in (("one agent alone", alone), (f"{n} agents, P2P off", off),
                           (f"{n} agents, P2P on", on), (f"{n} agents, P2P + mTLS", tls)):
            if rec:
                print(f"{label:24} {rec['seconds_all']:>14.1f} {rec['origin_x_model']:>22.2f}")
        ok_bytes = on["origin_x_model"] <= 1.1
        ok_time = time_ratio <= 1.6
        print(f"bar: origin bytes with P2P <= 1.1x model: {on['origin_x_model']:.2f}x "
              f"{'PASS' if ok_bytes else 'FAIL'}")
        print(f"bar: time for all {n} <= 1.6x one alone: {time_ratio:.2f}x "
              f"{'PASS' if ok_time else 'FAIL'}")
        tls_ratio = tls["seconds_all"] / on["seconds_all"] if tls else None
        if tls:
            print(f"bar: time with mTLS <= 1.1x without: {tls_ratio:.2f}x "
                  f"{'PASS' if tls_ratio <= 1.1 else 'FAIL'}; origin bytes {tls['origin_x_model']:.2f}x "
                  f"{'PASS' if tls['origin_x_model'] <= 1.1 else 'FAIL'}")
        if self.args.json:
            C.write_json(self.args.json, {"alone": alone, "off": off, "on": on, "tls": tls,
                                          "time_ratio": round(time_ratio, 3),
                                          "tls_ratio": round(tls_ratio, 3) if tls_ratio else None})
        return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=C.size_arg, default=C.size_arg("1GiB"))
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--origin-bw", type=float, default=100e6, help="origin cap, bytes/s (100e6)")
    p.add_argument("--skip-off", action="store_true", help="skip the N agents without P2P run")
    p.add_argument("--skip-tls", action="store_true", help="skip the N agents with P2P over mTLS run")
    p.add_argument("--check", action="store_true",
                   help="only: peers' manifests checked against the origin vs published ones")
    p.add_argument("--no-prefault", dest="prefault", action="store_false",
                   help="skip writing and freeing N x model-size of page cache before each clock")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="coldbrew-p2p-bench-"))
    try:
        return Bench(args, workdir).run()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
