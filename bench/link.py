"""An emulated S3 link for the benchmarks: round-trip delay and a per-connection rate cap, in a
network namespace the benchmark makes and removes.

Real S3 answers after tens of milliseconds and gives one TCP connection tens of MB/s, so a
client needs many requests in flight; S3 on loopback has neither, and defaults tuned there
are tuned for nothing real. This kernel has no netem and no fq qdisc, so:

* **Delay:** an iptables rule sends the S3 port's packets (both directions, on the
  namespace's loopback) to an NFQUEUE, and ``bench/link/holdq.c`` holds each for half the
  round trip before letting it through. Only the S3 port: the S3 server's own internal
  traffic (master, volume, filer) is not delayed.
* **Per-connection cap:** the namespace's ``net.ipv4.tcp_rmem`` / ``tcp_wmem`` maxima bound
  each connection's window, and a window per round trip is its rate (1 MiB at 20 ms ≈ 24 MB/s:
  Linux advertises about half the receive buffer).

Usage, from a benchmark's ``main``: ``link.enter(args.link)`` re-runs the benchmark inside a
fresh namespace (and returns only there); once its S3 server is up, ``with
link.delaying(spec, s3.port):`` adds the rules and starts the delay, and ``link.verify(...)``
prints what one connection gets. The namespace goes when the benchmark ends.

Needs root, iptables, a C compiler and libnetfilter-queue (Debian: ``iptables gcc
libnetfilter-queue-dev``); the benchmark says which one is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from coldbrew.agent.units import parse_size

INSIDE = "COLDBREW_BENCH_LINK_NS"
QUEUE = 7


@dataclass(frozen=True)
class LinkSpec:
    rtt_s: float
    conn_bytes_per_s: float

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """``rtt=20ms,conn=25MB/s`` (rtt in ms or s; conn in bytes/s with a size unit)."""
        fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
        try:
            rtt = fields["rtt"]
            conn = fields["conn"].removesuffix("/s")
        except KeyError:
            raise SystemExit(f"--link {text!r}: give rtt= and conn=, e.g. rtt=20ms,conn=25MB/s") from None
        match = re.fullmatch(r"([\d.]+)\s*(ms|s)", rtt)
        if not match:
            raise SystemExit(f"--link rtt={rtt!r}: a number of ms or s, e.g. 20ms")
        rtt_s = float(match[1]) / (1000 if match[2] == "ms" else 1)
        return cls(rtt_s, float(parse_size(conn)))

    @property
    def window_bytes(self) -> int:
        """The TCP buffer maximum that caps one connection near ``conn_bytes_per_s``."""
        return max(64 << 10, int(2 * self.conn_bytes_per_s * self.rtt_s))

    def __str__(self) -> str:
        return f"rtt {self.rtt_s * 1000:g} ms, {self.conn_bytes_per_s / 1e6:g} MB/s per connection"


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise SystemExit(f"--link needs `{tool}` (Debian: apt-get install {package})")


def enter(text: str | None) -> LinkSpec | None:
    """With ``--link``: run this benchmark again inside a new namespace with the link's TCP
    buffers, and exit with its status (the namespace removed). Inside, return the spec."""
    if not text:
        return None
    spec = LinkSpec.parse(text)
    if os.environ.get(INSIDE):
        return spec
    if os.geteuid() != 0:
        raise SystemExit("--link needs root (it makes a network namespace)")
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"), ("cc", "gcc")):
        _need(tool, package)
    name = f"coldbrew-link-{os.getpid()}"
    _run("ip", "netns", "add", name)
    try:
        inside = ["ip", "netns", "exec", name]
        _run(*inside, "ip", "link", "set", "lo", "up")
        w = spec.window_bytes
        for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
            _run(*inside, "sysctl", "-q", "-w", f"{key}=4096 {min(w, 131072)} {w}")
        env = {**os.environ, INSIDE: name}
        code = subprocess.run([*inside, sys.executable, *sys.argv], env=env).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    sys.exit(code)


def _holdq(workdir: Path) -> Path:
    source = Path(__file__).with_name("link") / "holdq.c"
    binary = workdir / "holdq"
    result = subprocess.run(["cc", "-O2", "-o", str(binary), str(source), "-lnetfilter_queue"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit("--link: building bench/link/holdq.c failed (Debian: apt-get install "
                         f"libnetfilter-queue-dev):\n{result.stderr[-1500:]}")
    return binary


@contextlib.contextmanager
def delaying(spec: LinkSpec, port: int, workdir: Path) -> Iterator[None]:
    """Half the round trip each way on TCP ``port`` of this namespace's loopback."""
    binary = _holdq(workdir)
    rules = [["OUTPUT", "-o", "lo", "-p", "tcp", "--dport", str(port)],
             ["OUTPUT", "-o", "lo", "-p", "tcp", "--sport", str(port)]]
    proc = subprocess.Popen([str(binary), str(QUEUE), str(int(spec.rtt_s / 2 * 1e6))],
                            stderr=subprocess.DEVNULL)
    time.sleep(0.2)  # bound to the queue before any packet is sent to it
    try:
        for rule in rules:
            _run("iptables", "-A", *rule, "-j", "NFQUEUE", "--queue-num", str(QUEUE))
        yield
    finally:
        for rule in rules:
            subprocess.run(["iptables", "-D", *rule, "-j", "NFQUEUE", "--queue-num", str(QUEUE)],
                           check=False, capture_output=True)
        proc.kill()
        proc.wait()


def verify(client: object, bucket: str, key: str, size: int) -> str:
    """One connection's time to first byte and rate on the link, as a line to print."""
    started = time.perf_counter()
    resp = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{size - 1}")  # type: ignore[attr-defined]
    body = resp["Body"]
    first = body.read(1)
    first_s = time.perf_counter() - started
    got = len(first) + len(body.read())
    seconds = time.perf_counter() - started
    return (f"link check: one connection, {got / 1e6:.0f} MB: first byte after {first_s * 1000:.0f} "
            f"ms, {got / (seconds - first_s) / 1e6:.1f} MB/s after it")
