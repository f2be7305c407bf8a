#!/usr/bin/env python3
"""Spike for issue 5 (P2P chunk sharing): libtorrent on top of our chunk-cache layout.

A SPIKE, NOT PRODUCTION CODE. It answers, with small experiments and measured
numbers, how ``agent/peers.py`` should drive libtorrent so that a torrent's
files ARE the cache's chunk files (``<entry>/chunks/00000000`` …, one piece per
chunk, DESIGN decision 6) and no byte is stored twice. Each experiment prints
what it found; ``--json`` writes every figure to a file. Everything listens on
127.0.0.1 with DHT/LSD/UPnP/NAT-PMP off; every wait is bounded; temp files live
under ``--workdir`` (default: a fresh dir in /tmp) and are removed at exit.

Experiments (pass one or more names, or ``all``):

  layout      torrent files == chunk files: v1-only create_torrent + set_hash from
              SHA-1s computed while chunks stream in; save_path = entry dir; name
              "chunks"; piece i == file i; info-hash reproducible in pure Python;
              a "segment" torrent over a subset of the chunk files.
  resume      telling libtorrent which chunks are present (1 GiB / 16 MiB): full
              check vs have_pieces vs have_pieces+no_verify_files vs seed_mode vs
              add_piece; what each costs (time, CPU, bytes read/written) and what
              each does when the store and libtorrent disagree.
  download    a peer fills our layout in place: piece_finished_alert → read the
              chunk with plain open() → xxh3 → journal, per disk backend; a chunk
              renamed in under a live torrent; a SIGKILLed downloader and what the
              store's start-up makes of it.
  priorities  download only the chunks asked for (priority 0 elsewhere), in deadline
              order (all at once vs a small window); close_redundant_connections;
              origin fallback via add_piece, also on top of a half-received piece.
  swarm       two agent processes on loopback, 1 GiB / 16 MiB: MB/s and CPU per disk
              backend; upload rate limits (and why the session-wide one is ignored).
  liar        a peer with one corrupt byte: hash_failed_alert, ban, what is on disk.
  metadata    how agents agree on the torrent without a published .torrent: a
              deterministic info dict, BEP 9 magnet fetch, and an HTTP endpoint sketch.

    . .venv/bin/activate
    python bench/p2p_spike.py all                         # ~2.5 min on 2 shared cores
    python bench/p2p_spike.py swarm --big 256MiB          # one experiment, smaller
    python bench/p2p_spike.py all --json /tmp/p2p.json

What it found (libtorrent 2.1.1, 2 vCPU shared with other work; figures vary ±50 %
run to run, CPU-seconds per GB are the stable ones — see the issue-5 note for more):

  * The layout fits unchanged: files ``chunks/NNNNNNNN``, name "chunks", piece i ==
    file i, no pad files, short last chunk fine; hashes via set_hash, nothing read.
  * Start-up: add_torrent with have_pieces = journal costs ~1 ms and reads nothing
    (libtorrent only stats sizes; a mismatch rejects it and re-hashes every file).
  * Use posix_disk_io: its piece_finished_alert means the bytes are in the file and it
    reopens files per operation (follows our renames). pread (the 2.1 default) and
    mmap keep stale fds after a rename; pread even alerts before the file exists.
  * add_piece (origin bytes into a live torrent) ~4.5-5 CPU-s/GB vs 0.5 for
    store.write_chunk; peer→peer ~5 CPU-s/GB (receiver ~4), 160-320 MB/s here.
  * Only piece priorities (never file priorities: those divert data into a .parts
    file); close_redundant_connections off; ≤2 deadline pieces in flight per torrent.
  * Session upload_rate_limit ignores loopback/private-IP peers unless the peer-class
    filter maps them to the global class. One corrupt piece → that peer is banned.

Internal subcommands ``_seed`` and ``_leech`` run one agent-like libtorrent
process each (used by ``download`` and ``swarm``); they talk JSON lines on stdout
and stop when stdin closes or their ``--max-seconds`` runs out.
"""

# ruff: noqa: B023  (the closures passed to Agent.wait run within the loop turn that defines them)
from __future__ import annotations

import argparse
import hashlib
import http.server
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import libtorrent as lt

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from coldbrew.agent.config import format_size, parse_size
from coldbrew.agent.core.manifest import ChunkLayout, FileIdentity, digest, journal_line
from coldbrew.agent.cache.store import ChunkStore, Entry, Limits, chunk_name
from coldbrew.agent.p2p.torrent import bencode  # the canonical encoder the agent uses

MiB = 1 << 20
FINDINGS: dict[str, Any] = {}  # experiment -> {figure: value}; printed and --json'd


def note(section: str, key: str, value: Any, text: str | None = None) -> None:
    """Record a figure and print it (``text`` is the human line; default key: value)."""
    FINDINGS.setdefault(section, {})[key] = value
    print(f"  [{section}] {text if text is not None else f'{key}: {value}'}", flush=True)


# --- libtorrent plumbing ------------------------------------------------------------------

ALERTS = (lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage
          | lt.alert_category.peer | lt.alert_category.piece_progress | lt.alert_category.connect
          | lt.alert_category.ip_block)


def lt_settings(**overrides: Any) -> dict[str, Any]:
    """Session settings per the DESIGN field notes: loopback only, no discovery, TCP only."""
    s: dict[str, Any] = {
        "listen_interfaces": "127.0.0.1:0",       # an ephemeral port; read back with listen_port()
        "outgoing_interfaces": "",
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        "enable_incoming_utp": False, "enable_outgoing_utp": False,
        "allow_multiple_connections_per_ip": True,  # every agent here is 127.0.0.1
        "alert_mask": int(ALERTS),
        "alert_queue_size": 100_000,
        "user_agent": "coldbrew-p2p-spike",
        "close_redundant_connections": False,       # see priorities: idle seeds must stay connected
        "announce_to_all_trackers": False,
    }
    s.update(overrides)
    return s


def make_session(disk_io: str = "posix", **overrides: Any) -> lt.session:
    params = lt.session_params(lt_settings(**overrides))
    # Write-only property in the binding: reading it back always says "default_disk_io_constructor".
    params.disk_io_constructor = f"{disk_io}_disk_io_constructor"
    ses = lt.session(params)
    deadline = time.monotonic() + 10
    while ses.listen_port() == 0 and time.monotonic() < deadline:
        ses.wait_for_alert(100)
        ses.pop_alerts()
    if ses.listen_port() == 0:
        raise RuntimeError("libtorrent did not start listening on 127.0.0.1")
    return ses


class Ev:
    """The parts of one alert we keep (libtorrent alert objects die at the next pop_alerts)."""

    __slots__ = ("at", "endpoint", "kind", "msg", "piece")

    def __init__(self, a: Any) -> None:
        self.kind = type(a).__name__
        self.piece = getattr(a, "piece_index", None)
        self.msg = a.message()
        ep = getattr(a, "endpoint", None) or getattr(a, "ip", None)
        self.endpoint = tuple(ep) if isinstance(ep, (tuple, list)) else ep
        self.at = time.monotonic()

    def __repr__(self) -> str:
        return f"{self.kind}({self.msg})"


class Agent:
    """One libtorrent session standing in for one agent's peers.py (in this process)."""

    def __init__(self, name: str, disk_io: str = "posix", **overrides: Any) -> None:
        self.name = name
        self.ses = make_session(disk_io, **overrides)
        self.port = self.ses.listen_port()
        self.log: list[Ev] = []

    def add(self, torrent: bytes, save_path: Path, *, have: Iterable[int] | None = None,
            flags: int = 0, piece_priorities: list[int] | None = None,
            verified: Iterable[int] | None = None) -> lt.torrent_handle:
        ti = lt.torrent_info(torrent)
        atp = add_params(ti, save_path, have=have, flags=flags, verified=verified)
        if piece_priorities is not None:
            atp.piece_priorities = piece_priorities
        return self.ses.add_torrent(atp)

    def pump(self, ms: int = 100) -> list[Ev]:
        self.ses.wait_for_alert(ms)
        new = [Ev(a) for a in self.ses.pop_alerts()]
        self.log.extend(new)
        return new

    def wait(self, until: Callable[[], bool], timeout_s: float, what: str,
             on: Callable[[Ev], None] | None = None) -> float:
        """Pump alerts until ``until()``; returns seconds waited; raises TimeoutError."""
        t0 = time.monotonic()
        while not until():
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{self.name}: {what} not within {timeout_s:.0f}s; "
                                   f"last alerts: {self.log[-5:]}")
            for ev in self.pump(50):
                if on:
                    on(ev)
        return time.monotonic() - t0

    def idle(self, seconds: float, on: Callable[[Ev], None] | None = None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for ev in self.pump(50):
                if on:
                    on(ev)

    def count(self, kind: str, since: int = 0) -> int:
        return sum(1 for e in self.log[since:] if e.kind == kind)

    def close(self) -> None:
        for h in self.ses.get_torrents():
            self.ses.remove_torrent(h)
        del self.ses


def add_params(ti: lt.torrent_info, save_path: Path, *, have: Iterable[int] | None = None,
               flags: int = 0, verified: Iterable[int] | None = None) -> lt.add_torrent_params:
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = str(save_path)
    # Not auto-managed (the queue could pause it), not paused: it runs as soon as it's added.
    atp.flags = (lt.torrent_flags.update_subscribe | lt.torrent_flags.apply_ip_filter
                 | lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd
                 | lt.torrent_flags.disable_pex | flags)
    n = ti.num_pieces()
    if have is not None:
        hs = set(have)
        atp.have_pieces = [i in hs for i in range(n)]
    if verified is not None:
        vs = set(verified)
        atp.verified_pieces = [i in vs for i in range(n)]
    return atp


def read_piece(agent: Agent, h: lt.torrent_handle, index: int, timeout_s: float = 10) -> bytes:
    """torrent_handle.read_piece, synchronously (the bytes arrive in a read_piece_alert)."""
    h.read_piece(index)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        agent.ses.wait_for_alert(100)
        for a in agent.ses.pop_alerts():
            if isinstance(a, lt.read_piece_alert) and a.piece == index:
                if a.error.value():
                    raise OSError(a.error.message())
                return bytes(a.buffer)
    raise TimeoutError(f"read_piece({index})")


def connect(h: lt.torrent_handle, port: int) -> None:
    h.connect_peer(("127.0.0.1", port))


def num_have(h: lt.torrent_handle) -> int:
    return sum(1 for x in h.status(lt.torrent_handle.query_pieces).pieces if x)


def proc_io() -> dict[str, int]:
    """This process's syscall read/write byte counters (rchar/wchar): did libtorrent read the data?"""
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v)
    return out


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# --- the torrent for one cache entry ------------------------------------------------------

def info_dict(identity: FileIdentity, chunk_size: int, sha1s: list[bytes]) -> dict[str, Any]:
    """The info dict every agent must build identically for one (uri, etag, size, chunk size).

    ``coldbrew-key`` (our FileIdentity key) is an extra info key: BitTorrent clients
    keep unknown info keys and hash them, so two cache entries with identical bytes
    (same model under two URIs) still get two info-hashes — one torrent per entry,
    never "torrent already in session" with the other entry's save_path.
    """
    layout = ChunkLayout(identity.size, chunk_size)
    return {
        "coldbrew-key": identity.key(),
        "files": [{"length": layout.length(i), "path": [chunk_name(i)]} for i in range(layout.count)],
        "name": "chunks",
        "piece length": chunk_size,
        "pieces": b"".join(sha1s),
    }


def info_hash_pure(identity: FileIdentity, chunk_size: int, sha1s: list[bytes]) -> str:
    return hashlib.sha1(bencode(info_dict(identity, chunk_size, sha1s))).hexdigest()


def torrent_with_libtorrent(identity: FileIdentity, chunk_size: int, sha1s: list[bytes]) -> bytes:
    """The .torrent via libtorrent: v1 only, our piece hashes, nothing read from disk."""
    layout = ChunkLayout(identity.size, chunk_size)
    files = [lt.create_file_entry(f"chunks/{chunk_name(i)}", layout.length(i))
             for i in range(layout.count)]
    ct = lt.create_torrent(files, chunk_size, lt.create_torrent.v1_only)
    for i, h in enumerate(sha1s):
        ct.set_hash(i, h)
    e = ct.generate()
    e[b"info"][b"coldbrew-key"] = identity.key().encode()
    return lt.bencode(e)


def torrent_from_info(info: bytes) -> bytes:
    """A .torrent around raw info-dict bytes (spliced, so the info-hash cannot drift)."""
    return b"d4:info" + info + b"e"


# --- cache entries written the way the store writes them ----------------------------------

class Node:
    """One agent's cache: a real ChunkStore in its own directory."""

    def __init__(self, root: Path, name: str, chunk_size: int) -> None:
        self.dir = root / name
        self.chunk_size = chunk_size
        self.store = ChunkStore(self.dir, chunk_size, Limits(None, 0))
        self.store.open()

    def entry(self, identity: FileIdentity) -> Entry:
        return self.store.entry(identity)

    def close(self) -> None:
        self.store.close()


def chunk_bytes(index: int, length: int, base: bytes) -> bytes:
    """Deterministic, distinct content per chunk (random base, index stamped in front)."""
    stamp = index.to_bytes(16, "little")
    return stamp + base[16:length] if length > 16 else stamp[:length]


def fill_from_origin(node: Node, entry: Entry, base: bytes, only: Iterable[int] | None = None
                     ) -> tuple[list[bytes], float]:
    """'Fetch' chunks from origin and store them (temp + rename + journal), hashing SHA-1 as
    they stream. Returns every chunk's SHA-1 and the seconds spent in SHA-1 alone."""
    layout = entry.layout
    want = set(range(layout.count)) if only is None else set(only)
    sha1s, sha_s = [], 0.0
    for i in range(layout.count):
        data = chunk_bytes(i, layout.length(i), base)
        t = time.perf_counter()
        sha1s.append(hashlib.sha1(data).digest())
        sha_s += time.perf_counter() - t
        if i in want:
            node.store.write_chunk(entry, i, memoryview(data))
    return sha1s, sha_s


def adopt_chunk(entry: Entry, index: int) -> str:
    """What a ChunkStore.adopt_chunk(entry, i) would do after libtorrent wrote + SHA-1'd chunk i
    in place: read it back (page cache), xxh3 it, append the journal line, mark it present.
    (The spike skips the store's byte accounting; production must reserve room first.)"""
    data = entry.chunk_path(index).read_bytes()
    d = digest(data)
    with open(entry.path / "journal", "ab") as f:
        f.write(journal_line(index, d))
    entry.digests[index] = d
    entry.present.add(index)
    return d


def adopt_verified(agent: Agent, h: lt.torrent_handle, entry: Entry, index: int,
                   sha1: bytes, check: bool = True) -> str:
    """adopt_chunk, but first check the file's bytes against the piece's SHA-1.

    Needed with backends that cache writes (pread, the 2.1 default): their
    piece_finished_alert can come before the bytes are in the file (even before the
    file exists). Then flush_cache() and wait for cache_flushed_alert, once.
    Returns "ok", "ok-after-flush" or "not-on-disk" (not journaled: treated as absent).
    """
    def matches() -> bool:
        try:
            return hashlib.sha1(entry.chunk_path(index).read_bytes()).digest() == sha1
        except FileNotFoundError:
            return False

    if not check:  # posix backend: the bytes were in the file before libtorrent hashed them
        adopt_chunk(entry, index)
        return "ok-unchecked"
    if matches():
        adopt_chunk(entry, index)
        return "ok"
    end = time.monotonic() + 2.0  # first just give the backend's write-back a moment
    while time.monotonic() < end:
        agent.pump(20)
        if matches():
            adopt_chunk(entry, index)
            return "ok-after-wait"
    mark = len(agent.log)
    h.flush_cache()
    try:
        agent.wait(lambda: agent.count("cache_flushed_alert", mark) > 0, 10, "cache flushed")
    except TimeoutError:
        pass
    if matches():
        adopt_chunk(entry, index)
        return "ok-after-flush"
    return "not-on-disk"


def ls_entry(entry: Entry) -> list[str]:
    return sorted(str(p.relative_to(entry.path)) for p in entry.path.rglob("*"))


# --- child processes ----------------------------------------------------------------------

class Child:
    """A ``_seed``/``_leech`` subprocess speaking JSON lines; every read has a deadline."""

    def __init__(self, args: list[str]) -> None:
        self.p = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""
        self.seen: list[dict[str, Any]] = []

    def read(self, timeout_s: float) -> dict[str, Any]:
        end = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"child {self.p.args[2:4]} said nothing for {timeout_s:.0f}s")
            r, _, _ = select.select([self.p.stdout], [], [], left)
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    err = self.p.stderr.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"child exited (rc={self.p.wait()}): {err}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        self.seen.append(msg)
        return msg

    def until(self, event: str, timeout_s: float) -> dict[str, Any]:
        end = time.monotonic() + timeout_s
        while True:
            msg = self.read(max(0.1, end - time.monotonic()))
            if msg.get("event") == event:
                return msg

    def stop(self) -> dict[str, Any] | None:
        """Close stdin (the child's cue to exit) and return its last 'exit' message."""
        last = None
        try:
            self.p.stdin.close()
            while True:
                msg = self.read(15)
                if msg.get("event") == "exit":
                    last = msg
                    break
        except (TimeoutError, RuntimeError, ValueError):
            pass
        self.kill()
        return last

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)


def emit(**msg: Any) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def stdin_closed() -> bool:
    r, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(r) and not os.read(sys.stdin.fileno(), 4096)


def child_seed(a: argparse.Namespace) -> None:
    """Seed one entry (every chunk present per the journal) until stdin closes."""
    overrides = json.loads(a.settings)
    agent = Agent("seed", a.disk_io, **overrides)
    if a.global_class:
        # Loopback/LAN peers are in libtorrent's "local" peer class, which has no rate
        # limit; map every address to the global class so upload_rate_limit applies.
        f = lt.ip_filter()
        f.add_rule("0.0.0.0", "255.255.255.255", 1 << agent.ses.global_peer_class_id)
        agent.ses.set_peer_class_filter(f)
    torrent = Path(a.torrent).read_bytes()
    n = lt.torrent_info(torrent).num_pieces()
    h = agent.add(torrent, Path(a.entry), have=range(n))
    if a.torrent_upload_limit:
        h.set_upload_limit(a.torrent_upload_limit)
    agent.wait(lambda: h.status().is_seeding, 30, "seeding")
    cpu0 = cpu_s()
    emit(event="ready", port=agent.port)
    end = time.monotonic() + a.max_seconds
    while time.monotonic() < end and not stdin_closed():
        agent.pump(100)
    st = h.status()
    emit(event="exit", cpu_s=cpu_s() - cpu0, uploaded=st.total_payload_upload,
         errors=[e.msg for e in agent.log if "error" in e.kind][:5])


def child_leech(a: argparse.Namespace) -> None:
    """Download one entry from a peer into a real ChunkStore, journaling each verified piece."""
    overrides = json.loads(a.settings)
    agent = Agent("leech", a.disk_io, **overrides)
    node = Node(Path(a.cache), ".", a.chunk)
    entry = node.entry(FileIdentity(a.uri, a.etag, a.size))
    torrent = Path(a.torrent).read_bytes()
    n = lt.torrent_info(torrent).num_pieces()
    h = agent.add(torrent, entry.path, have=entry.present)
    emit(event="ready", port=agent.port, present=len(entry.present))
    t0, cpu0, times0 = time.monotonic(), cpu_s(), os.times()
    connect(h, a.peer)
    done: set[int] = set(entry.present)
    hash_fail = 0
    ti = lt.torrent_info(torrent)
    adopted: dict[str, int] = {}
    adopt_cpu = 0.0
    cursor = 0  # into agent.log: adopt_verified may pump alerts too, so read them from the log

    end = time.monotonic() + a.max_seconds
    progress = time.monotonic()
    while len(done) < n and time.monotonic() < end and not stdin_closed():
        if time.monotonic() - progress > a.stall_seconds:
            break  # no piece for a while: report what we have
        agent.pump(50)
        finished = []
        while cursor < len(agent.log):
            ev = agent.log[cursor]
            cursor += 1
            if ev.kind == "piece_finished_alert" and ev.piece not in done:
                finished.append(ev.piece)
            elif ev.kind == "hash_failed_alert":
                hash_fail += 1
        if finished:
            progress = time.monotonic()
        while finished:
            i = finished.pop(0)
            tt = time.thread_time()
            how = adopt_verified(agent, h, entry, i, ti.hash_for_piece(i), a.disk_io != "posix")
            adopt_cpu += time.thread_time() - tt
            adopted[how] = adopted.get(how, 0) + 1
            done.add(i)
            emit(event="piece", i=i, t=round(time.monotonic() - t0, 4), how=how)
    elapsed, cpu, times1 = time.monotonic() - t0, cpu_s() - cpu0, os.times()
    if len(done) < n:
        st = h.status()
        emit(event="stalled", have=len(done), peers=st.num_peers, state=str(st.state),
             errc=st.errc.message() if st.errc.value() else "",
             queue=[(q["piece_index"], q["finished"], q["writing"], q["requested"])
                    for q in h.get_download_queue()][:4])
    emit(event="done", complete=len(done) == n, elapsed_s=elapsed, cpu_s=cpu,
         bytes=sum(entry.layout.length(i) for i in done), hash_failed=hash_fail, adopted=adopted,
         adopt_cpu_s=adopt_cpu, user_s=times1.user - times0.user,
         sys_s=times1.system - times0.system)
    while time.monotonic() < end and not stdin_closed():
        time.sleep(0.1)
    emit(event="exit")


# --- experiment 1: layout -----------------------------------------------------------------

def exp_layout(cfg: argparse.Namespace) -> None:
    S = "layout"
    size, cs = cfg.small, cfg.chunk
    size -= cs // 3  # a short last chunk
    ident = FileIdentity("s3://models/m/model.safetensors", '"etag-1"', size)
    node = Node(cfg.workdir, "layout-a", cs)
    entry = node.entry(ident)
    sha1s, sha_s = fill_from_origin(node, entry, cfg.base)
    note(S, "sha1_MBps_python", round(size / sha_s / 1e6),
         f"SHA-1 (hashlib) while chunks stream: {size / sha_s / 1e6:.0f} MB/s on one core "
         f"(xxh3 is ~10x faster; v1 pieces need SHA-1, so the first agent pays this once)")
    t = time.perf_counter()
    torrent = torrent_with_libtorrent(ident, cs, sha1s)
    make_ms = (time.perf_counter() - t) * 1e3
    ti = lt.torrent_info(torrent)
    fs = ti.layout()
    note(S, "create_torrent_ms", round(make_ms, 2),
         f"create_torrent(v1_only)+set_hash for {ti.num_pieces()} pieces: {make_ms:.2f} ms, "
         f"{len(torrent)} B .torrent, no file read")
    mapping_ok = all(
        fs.file_index_at_piece(i) == i
        and [(s.file_index, s.offset, s.size) for s in ti.map_block(i, 0, ti.piece_size(i))]
        == [(i, 0, entry.layout.length(i))]
        for i in range(ti.num_pieces()))
    paths = [fs.file_path(i) for i in range(fs.num_files())]
    pads = sum(1 for i in range(fs.num_files()) if fs.file_flags(i) & fs.flag_pad_file)
    note(S, "name", ti.name(), f"torrent name {ti.name()!r}; files {paths[0]} … {paths[-1]}; "
         f"pad files: {pads}; piece i == file i at offset 0: {mapping_ok}")
    pure = info_hash_pure(ident, cs, sha1s)
    ih = str(ti.info_hashes().v1)
    note(S, "info_hash_pure_python_matches", pure == ih,
         f"info-hash {ih[:16]}…; pure-Python bencode gives the same: {pure == ih} "
         "(manifest.py can compute it without importing libtorrent)")
    note(S, "info_dict_bytes", len(ti.info_section()),
         f"info dict {len(ti.info_section())} B for {format_size(size)} "
         f"(20 B/piece: a 100 GB file at 16 MiB ≈ 120 KB)")

    agent = Agent("A")
    before = ls_entry(entry)
    rch = proc_io()["rchar"]
    h = agent.add(torrent, entry.path, have=range(ti.num_pieces()))
    agent.wait(lambda: h.status().is_seeding, 20, "seeding")
    note(S, "bytes_read_adding_with_have_pieces", proc_io()["rchar"] - rch)
    st = h.status()
    mapped = [str(Path(st.save_path) / fs.file_path(i)) for i in range(fs.num_files())]
    same = mapped == [str(entry.chunk_path(i)) for i in range(entry.layout.count)]
    note(S, "paths_are_chunk_files", same,
         f"save_path=entry dir → libtorrent's files are exactly <entry>/chunks/NNNNNNNN: {same}")
    # read_piece goes through libtorrent's storage: it must return our chunk bytes.
    last = ti.num_pieces() - 1
    ok = read_piece(agent, h, last) == entry.chunk_path(last).read_bytes()
    note(S, "read_piece_equals_chunk_file", ok,
         f"read_piece({last}) == bytes of chunks/{chunk_name(last)} "
         f"({entry.layout.length(last)} B, the short last chunk): {ok}")
    after = ls_entry(entry)
    note(S, "files_added_by_libtorrent", sorted(set(after) - set(before)),
         f"files libtorrent added to the entry dir: {sorted(set(after) - set(before)) or 'none'}")
    # A "segment" torrent over a subset of the chunk files (chunks 4..7 only): shareable as soon
    # as those chunks are fetched, before the whole file's SHA-1s are known.
    seg = list(range(min(4, entry.layout.count - 1), entry.layout.count))
    st = lt.create_torrent([lt.create_file_entry(f"chunks/{chunk_name(i)}", entry.layout.length(i))
                            for i in seg], cs, lt.create_torrent.v1_only)
    for j, i in enumerate(seg):
        st.set_hash(j, sha1s[i])
    e = st.generate()
    e[b"info"][b"coldbrew-key"] = ident.key().encode()
    e[b"info"][b"coldbrew-first-chunk"] = seg[0]
    seg_torrent = lt.bencode(e)
    sh = agent.add(seg_torrent, entry.path, have=range(len(seg)))
    agent.wait(lambda: sh.status().is_seeding, 10, "segment seeding")
    node_b = Node(cfg.workdir, "layout-b", cs)
    entry_b = node_b.entry(ident)
    b = Agent("B")
    bh = b.add(seg_torrent, entry_b.path)
    connect(bh, agent.port)
    b.wait(lambda: bh.status().is_seeding, 30, "segment downloaded")
    landed = sorted(p.name for p in (entry_b.path / "chunks").iterdir())
    same_bytes = all(entry_b.chunk_path(i).read_bytes() == entry.chunk_path(i).read_bytes() for i in seg)
    note(S, "segment_torrent", {"chunks": seg, "landed": landed, "bytes_equal": same_bytes},
         f"a segment torrent over chunks {seg[0]}..{seg[-1]} only (same entry dir, name 'chunks'): "
         f"a peer received {landed}, bytes equal: {same_bytes}")
    b.close()
    node_b.close()
    agent.close()
    node.close()


# --- experiment 2: telling libtorrent what is present -------------------------------------

def exp_resume(cfg: argparse.Namespace) -> None:
    S = "resume"
    size, cs = cfg.big, cfg.chunk
    ident = FileIdentity("s3://models/m/big.safetensors", '"etag-2"', size)
    node = Node(cfg.workdir, "resume-a", cs)
    entry = node.entry(ident)
    count = entry.layout.count
    missing = set(range(3, count, 4))  # a quarter of the chunks were never fetched
    present = sorted(set(range(count)) - missing)
    sha1s, _ = fill_from_origin(node, entry, cfg.base, only=present)
    torrent = torrent_with_libtorrent(ident, cs, sha1s)
    pbytes = sum(entry.layout.length(i) for i in present)
    print(f"  [{S}] entry: {format_size(size)} in {count} × {format_size(cs)} chunks, "
          f"{len(present)} present ({format_size(pbytes)}), {len(missing)} missing; page cache warm")

    def measure(label: str, until_ready: Callable[[Agent, lt.torrent_handle], bool],
                **add_kw: Any) -> tuple[Agent, lt.torrent_handle, dict[str, Any]]:
        agent = Agent(label)
        io0, c0, t0 = proc_io(), cpu_s(), time.perf_counter()
        h = agent.add(torrent, entry.path, **add_kw)
        agent.wait(lambda: until_ready(agent, h), 120, f"{label} ready")
        dt, dc, io1 = time.perf_counter() - t0, cpu_s() - c0, proc_io()
        st = h.status(lt.torrent_handle.query_pieces)
        r = {"seconds": round(dt, 4), "cpu_s": round(dc, 3),
             "read_MiB": round((io1["rchar"] - io0["rchar"]) / MiB, 1),
             "written_MiB": round((io1["wchar"] - io0["wchar"]) / MiB, 1),
             "pieces_have": sum(st.pieces), "state": str(st.state), "seed_mode": bool(st.seed_mode)}
        return agent, h, r

    def checked(agent: Agent, h: lt.torrent_handle) -> bool:
        return agent.count("torrent_checked_alert") > 0 and h.status().state not in (
            lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data)

    # A: no resume data → libtorrent hashes every file it finds (what force_recheck costs too).
    a, h, r = measure("full-check", checked)
    note(S, "A_full_check", r, f"A no have_pieces (full hash check): {r}")
    a.close()
    # B: have_pieces from our journal (default flags).
    a, h, r = measure("have", checked, have=present)
    note(S, "B_have_pieces", r, f"B have_pieces=journal: {r}")
    a.close()
    # C: have_pieces + no_verify_files.
    a, h, r = measure("have-noverify", checked, have=present, flags=lt.torrent_flags.no_verify_files)
    note(S, "C_have_pieces_no_verify", r, f"C have_pieces + no_verify_files: {r}")
    a.close()

    # D: the journal lies (claims a chunk whose file is gone), with and without no_verify_files.
    lie = min(missing)
    a, h, r = measure("have-lie", checked, have=present + [lie])
    rej = [e.msg.split(" ", 1)[1] for e in a.log if e.kind == "fastresume_rejected_alert"]
    r["alerts"] = rej[:1]
    note(S, "D_have_lie", r, f"D have_pieces claims missing chunk {lie}: {r}")
    a.close()
    a, h, r = measure("have-lie-noverify", checked, have=present + [lie],
                      flags=lt.torrent_flags.no_verify_files)
    note(S, "D_have_lie_no_verify_before_request", r["pieces_have"],
         f"D' same with no_verify_files: believed, pieces_have={r['pieces_have']}")
    # …and a peer then asks for the chunk that isn't there, then for one that is.
    peer_node = Node(cfg.workdir, "resume-peer", cs)
    pentry = peer_node.entry(ident)
    peer = Agent("peer")
    ph = peer.add(torrent, pentry.path, piece_priorities=[7 if i == lie else 0 for i in range(count)])
    connect(ph, a.port)
    mark = len(a.log)
    try:
        a.wait(lambda: a.count("file_error_alert", mark) > 0, 10, "read error")
    except TimeoutError:
        pass
    a.idle(1.0)
    peer.idle(0.2)
    st = h.status()
    errs = sorted({e.msg.split(" ", 1)[1].split("(")[0] + "… " + e.msg.rsplit(":", 1)[-1].strip()
                   for e in a.log[mark:] if "error" in e.kind})
    ph.piece_priority(0, 7)
    try:
        peer.wait(lambda: ph.have_piece(0), 10, "piece 0 after the error")
        served_after = True
    except TimeoutError:
        served_after = False
    note(S, "D_have_lie_no_verify_on_request",
         {"seeder_errors": errs, "seeder_paused": bool(st.flags & lt.torrent_flags.paused),
          "seeder_upload_mode": bool(st.flags & lt.torrent_flags.upload_mode),
          "seeder_errc": st.errc.message() if st.errc.value() else "",
          "seeder_still_claims_it": h.have_piece(lie), "peer_got_it": ph.have_piece(lie),
          "other_chunk_served_after": served_after},
         f"D' a peer requests chunk {lie}: seeder posts {errs}; paused="
         f"{bool(st.flags & lt.torrent_flags.paused)}, errc={st.errc.message()!r}, still claims "
         f"the chunk: {h.have_piece(lie)}; another chunk served afterwards: {served_after}")
    peer.close()
    peer_node.close()
    a.close()

    # E: seed_mode on this partial entry (libtorrent stats the files first).
    a, h, r = measure("seed-mode", checked, flags=lt.torrent_flags.seed_mode)
    note(S, "E_seed_mode_partial", r, f"E seed_mode on the partial entry: {r}")
    a.close()
    a, h, r = measure("seed-mode-verified", checked, flags=lt.torrent_flags.seed_mode,
                      verified=present)
    note(S, "E_seed_mode_verified_partial", r, f"E' seed_mode + verified_pieces=journal: {r}")
    a.close()
    # F: seed_mode on a complete entry: instant; each piece is hashed on its first upload.
    for i in sorted(missing):
        node.store.write_chunk(entry, i, memoryview(chunk_bytes(i, entry.layout.length(i), cfg.base)))
    a, h, r = measure("seed-mode-complete", checked, flags=lt.torrent_flags.seed_mode)
    note(S, "F_seed_mode_complete", r, f"F seed_mode on the (now) complete entry: {r}")
    peer_node = Node(cfg.workdir, "resume-peer2", cs)
    pentry = peer_node.entry(ident)
    peer = Agent("peer")
    ph = peer.add(torrent, pentry.path, piece_priorities=[7 if i < 2 else 0 for i in range(count)])
    io0, c0 = proc_io(), cpu_s()
    connect(ph, a.port)
    peer.wait(lambda: ph.have_piece(0) and ph.have_piece(1), 20, "2 pieces")
    a.idle(0.3)
    io1 = proc_io()
    note(S, "F_seed_mode_first_uploads", {
        "pieces_uploaded": 2, "read_MiB_in_process": round((io1["rchar"] - io0["rchar"]) / MiB, 1),
        "still_seed_mode": bool(h.status().seed_mode)},
        f"F' a peer downloads 2 chunks from it: {((io1['rchar'] - io0['rchar']) / MiB):.0f} MiB read "
        f"in this process (both agents; the seeder hashes each chunk before its first upload)")
    peer.close()
    peer_node.close()
    a.close()
    a, h, r = measure("have-complete", checked, have=range(count))
    note(S, "F_have_pieces_complete", r, f"F'' have_pieces=all on the complete entry: {r}")
    a.close()
    # G: add_piece for each present chunk (our bytes, as in hand right after a GET), per backend.
    datas = [entry.chunk_path(i).read_bytes() for i in present]
    # Baseline: what the origin path costs today (store.write_chunk: xxh3, temp, rename, journal).
    nodeb = Node(cfg.workdir, "resume-store-baseline", cs)
    entryb = nodeb.entry(ident)
    C.prefault_page_cache(cfg.workdir, pbytes)
    c0, t0 = cpu_s(), time.perf_counter()
    for i, d in zip(present, datas):
        nodeb.store.write_chunk(entryb, i, memoryview(d))
    dt, dc = time.perf_counter() - t0, cpu_s() - c0
    note(S, "G_baseline_store_write_chunk", {"seconds": round(dt, 3), "MBps": round(pbytes / dt / 1e6),
                                             "cpu_s_per_GB": round(dc / (pbytes / 1e9), 2)},
         f"G baseline store.write_chunk of the same {len(present)} chunks: "
         f"{pbytes / dt / 1e6:.0f} MB/s, {dc / (pbytes / 1e9):.2f} CPU-s/GB")
    nodeb.close()
    shutil.rmtree(entryb.path, ignore_errors=True)
    for disk_io in ("posix", "pread", "mmap"):
        node2 = Node(cfg.workdir, f"resume-addpiece-{disk_io}", cs)
        entry2 = node2.entry(ident)
        a = Agent("add-piece", disk_io)
        h = a.add(torrent, entry2.path)
        a.wait(lambda: h.status().state == lt.torrent_status.downloading, 30, "downloading")
        C.prefault_page_cache(cfg.workdir, pbytes)
        io0, c0, t0 = proc_io(), cpu_s(), time.perf_counter()
        for i, d in zip(present, datas):
            h.add_piece(i, d, 0)
        a.wait(lambda: a.count("piece_finished_alert") >= len(present), 120, "add_piece finished")
        dt, dc, io1 = time.perf_counter() - t0, cpu_s() - c0, proc_io()
        r = {"seconds": round(dt, 3), "MBps": round(pbytes / dt / 1e6), "cpu_s": round(dc, 3),
             "cpu_s_per_GB": round(dc / (pbytes / 1e9), 2),
             "written_MiB": round((io1["wchar"] - io0["wchar"]) / MiB),
             "read_back_MiB": round((io1["rchar"] - io0["rchar"]) / MiB)}
        note(S, f"G_add_piece_{disk_io}", r, f"G {disk_io}: add_piece of {len(present)} chunks into "
             f"an empty entry (libtorrent writes + SHA-1s them): {r}")
        if disk_io != "posix":
            a.close()
            node2.close()
            continue
        keep_agent, keep_h, keep_node, keep_entry = a, h, node2, entry2
    a, h, node2, entry2 = keep_agent, keep_h, keep_node, keep_entry
    # G': add_piece for a chunk that is already on disk and already 'have'.
    i0 = present[0]
    p = entry2.chunk_path(i0)
    st0 = p.stat()
    time.sleep(0.02)
    mark, io0, t0 = len(a.log), proc_io(), time.perf_counter()
    h.add_piece(i0, datas[0], 0)
    a.idle(1.0)
    st1 = p.stat()
    note(S, "G_add_piece_again_ignored", {
        "rewritten": st1.st_mtime_ns != st0.st_mtime_ns, "same_inode": st1.st_ino == st0.st_ino,
        "written_MiB": round((proc_io()["wchar"] - io0["wchar"]) / MiB, 1),
        "alerts": [e.kind for e in a.log[mark:]]},
        f"G' add_piece for a chunk libtorrent already has: file rewritten="
        f"{st1.st_mtime_ns != st0.st_mtime_ns}, alerts={[e.kind for e in a.log[mark:]]}")
    mark, io0 = len(a.log), proc_io()
    h.add_piece(i0, datas[0], lt.torrent_handle.overwrite_existing)
    a.idle(1.0)
    st2 = p.stat()
    note(S, "G_add_piece_overwrite_existing", {
        "rewritten": st2.st_mtime_ns != st1.st_mtime_ns, "same_inode": st2.st_ino == st1.st_ino,
        "written_MiB": round((proc_io()["wchar"] - io0["wchar"]) / MiB, 1)},
        f"G'' …with overwrite_existing: rewritten={st2.st_mtime_ns != st1.st_mtime_ns} "
        f"in place (same inode: {st2.st_ino == st1.st_ino})")
    # H: the alternative to add_piece: write with the store, then re-add the torrent with
    # have_pieces = journal (remove_torrent + add_torrent). What does one re-add cost?
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a.ses.remove_torrent(h)
        a.wait(lambda: a.count("torrent_removed_alert") > len(times), 10, "removed")
        h = a.add(torrent, entry2.path, have=present)
        a.wait(lambda: h.status().state in (lt.torrent_status.downloading, lt.torrent_status.seeding),
               10, "re-added")
        times.append(time.perf_counter() - t0)
    note(S, "H_readd_torrent_ms", round(min(times) * 1e3, 2),
         f"H remove_torrent + add_torrent(have_pieces=journal), {count} pieces: "
         f"{min(times) * 1e3:.1f} ms (min of 5) — but it drops every peer connection and "
         f"partial piece of that torrent")
    a.close()
    node2.close()
    node.close()


# --- experiment 3: a peer fills our layout ------------------------------------------------

def _torrent_file(cfg: argparse.Namespace, torrent: bytes, name: str) -> Path:
    p = cfg.workdir / f"{name}.torrent"
    p.write_bytes(torrent)
    return p


def exp_download(cfg: argparse.Namespace) -> None:
    S = "download"
    size, cs = cfg.small, cfg.chunk
    ident = FileIdentity("s3://models/m/dl.safetensors", '"etag-3"', size)
    seed_node = Node(cfg.workdir, "dl-seed", cs)
    sentry = seed_node.entry(ident)
    sha1s, _ = fill_from_origin(seed_node, sentry, cfg.base)
    torrent = torrent_with_libtorrent(ident, cs, sha1s)
    n = ChunkLayout(size, cs).count
    for disk_io in ("posix", "mmap", "pread", "default"):
        seeder = Agent("seed", disk_io)
        sh = seeder.add(torrent, sentry.path, have=range(n))
        seeder.wait(lambda: sh.status().is_seeding, 20, "seeding")
        node = Node(cfg.workdir, f"dl-leech-{disk_io}", cs)
        entry = node.entry(ident)
        leech = Agent("leech", disk_io)
        h = leech.add(torrent, entry.path)
        readable: list[bool] = []
        partial_seen: list[tuple[int, int]] = []
        adopted: dict[str, int] = {}
        cursor = 0  # adopt_verified pumps alerts too: read piece_finished from the log
        t0 = time.monotonic()
        connect(h, seeder.port)
        while len(readable) < n:
            if time.monotonic() - t0 > 60:
                raise TimeoutError(f"{disk_io}: {len(readable)}/{n} pieces in 60 s")
            leech.pump(50)
            fresh = []
            while cursor < len(leech.log):
                ev = leech.log[cursor]
                cursor += 1
                if ev.kind == "piece_finished_alert":
                    fresh.append(ev.piece)
            for i in fresh:
                # plain open()/read() the moment the alert arrives: is it all there?
                try:
                    data = entry.chunk_path(i).read_bytes()
                    readable.append(hashlib.sha1(data).digest() == sha1s[i])
                except FileNotFoundError:
                    readable.append(False)
                how = adopt_verified(leech, h, entry, i, sha1s[i])
                adopted[how] = adopted.get(how, 0) + 1
                # while here: what do the other chunk files look like mid-download?
                for j in range(n):
                    p = entry.chunk_path(j)
                    if j not in entry.present and p.exists():
                        partial_seen.append((j, p.stat().st_size))
        dt = time.monotonic() - t0
        journal = (entry.path / "journal").read_bytes().splitlines()
        note(S, f"{disk_io}_read_after_piece_finished", {"good_at_alert": sum(readable), "of": n,
                                                         "adopted": adopted},
             f"{disk_io}: {n} piece_finished_alert; open()+read() right at the alert gave the "
             f"verified bytes: {sum(readable)}/{n} (journaled after checking: {adopted}); journal "
             f"lines {len(journal)}; {size / dt / 1e6:.0f} MB/s in-process; unfinished chunk "
             f"files seen mid-download (index, size): {partial_seen[:4]}"
             f"{' …' if len(partial_seen) > 4 else ''}")
        # The store replaces a chunk file (temp + rename = new inode) under a running torrent:
        # does this backend read the new file or a stale open handle to the old one?
        old_bytes = read_piece(seeder, sh, 0)
        marker = b"M" * len(old_bytes)
        tmp = sentry.path / "swap.tmp"
        tmp.write_bytes(marker)
        os.rename(tmp, sentry.chunk_path(0))
        after = read_piece(seeder, sh, 0)
        tmp.write_bytes(old_bytes)
        os.rename(tmp, sentry.chunk_path(0))
        note(S, f"{disk_io}_sees_renamed_chunk", after == marker,
             f"{disk_io}: chunk 0 replaced by rename under a running torrent -> libtorrent reads "
             f"{'the NEW file' if after == marker else 'the OLD (unlinked) inode: stale handle'}")
        leech.close()
        seeder.close()
        node.close()
    # A downloader SIGKILLed mid-piece: what does the store's start-up make of it?
    tfile = _torrent_file(cfg, torrent, "dl")
    seed = Child(["_seed", "--entry", str(sentry.path), "--torrent", str(tfile),
                  "--torrent-upload-limit", str(40 * 10**6), "--max-seconds", "60"])
    port = seed.until("ready", 30)["port"]
    cache = cfg.workdir / "dl-crash"
    leech_c = Child(["_leech", "--cache", str(cache), "--uri", ident.uri, "--etag", ident.etag,
                     "--size", str(size), "--chunk", str(cs), "--torrent", str(tfile),
                     "--peer", str(port), "--max-seconds", "60"])
    leech_c.until("ready", 30)
    leech_c.until("piece", 30)
    leech_c.until("piece", 30)
    time.sleep(0.15)  # mid-way into the next pieces
    leech_c.p.send_signal(signal.SIGKILL)
    leech_c.kill()
    seed.stop()
    root = cache / "coldbrew-v1" / "files"
    edir = next(root.glob("*/*"))
    files = {p.name: p.stat().st_size for p in sorted((edir / "chunks").iterdir())}
    jl = (edir / "journal").read_bytes().splitlines()
    store = ChunkStore(cache, cs, Limits(None, 0))
    store.open()
    e = store.find(ident.key())
    left = sorted(p.name for p in (edir / "chunks").iterdir())
    note(S, "crash", {"chunk_files_before_restart": files, "journal_lines": len(jl),
                      "present_after_restart": sorted(e.present) if e else None,
                      "files_after_restart": left},
         f"SIGKILL after 2 journaled pieces: chunk files {files} (a partial file has the full "
         f"size only if the last block landed; libtorrent writes in place, sparse), journal "
         f"lines {len(jl)}; ChunkStore.open() keeps {sorted(e.present) if e else None} and "
         f"deletes the rest → files now {left}")
    store.close()
    seed_node.close()


# --- experiment 4: priorities -------------------------------------------------------------

def exp_priorities(cfg: argparse.Namespace) -> None:
    S = "priorities"
    size, cs = cfg.small, cfg.chunk
    ident = FileIdentity("s3://models/m/prio.safetensors", '"etag-4"', size)
    seed_node = Node(cfg.workdir, "prio-seed", cs)
    sentry = seed_node.entry(ident)
    sha1s, _ = fill_from_origin(seed_node, sentry, cfg.base)
    torrent = torrent_with_libtorrent(ident, cs, sha1s)
    n = ChunkLayout(size, cs).count

    # 1. close_redundant_connections: with every priority 0 we are "upload only" like the seed.
    for crc in (True, False):
        seeder = Agent("seed", close_redundant_connections=crc)
        sh = seeder.add(torrent, sentry.path, have=range(n))
        seeder.wait(lambda: sh.status().is_seeding, 20, "seeding")
        node = Node(cfg.workdir, f"prio-l-{crc}", cs)
        entry = node.entry(ident)
        leech = Agent("leech", close_redundant_connections=crc)
        h = leech.add(torrent, entry.path, piece_priorities=[0] * n)
        connect(h, seeder.port)
        leech.idle(2.0)
        peers = h.status().num_peers
        got = num_have(h)
        t0 = time.monotonic()
        h.piece_priority(1, 7)
        try:
            leech.wait(lambda: h.have_piece(1), 5 if crc else 20, "piece 1")
            late = f"{time.monotonic() - t0:.2f}s"
        except TimeoutError:
            late = "not within 5 s (no peer left; needs connect_peer again)"
        note(S, f"close_redundant_connections_{crc}", {"peers_after_idle": peers, "pieces": got,
                                                       "later_request": late},
             f"close_redundant_connections={crc}: all priorities 0 → {got} pieces fetched, "
             f"peers after 2 s idle: {peers}; later priority 7 on piece 1 → {late}")
        leech.close()
        seeder.close()
        node.close()

    # 2. deadlines on priority-0 pieces; order of arrival; nothing else fetched.
    seeder = Agent("seed", close_redundant_connections=False)
    sh = seeder.add(torrent, sentry.path, have=range(n))
    seeder.wait(lambda: sh.status().is_seeding, 20, "seeding")
    node = Node(cfg.workdir, "prio-l", cs)
    entry = node.entry(ident)
    leech = Agent("leech", close_redundant_connections=False)
    h = leech.add(torrent, entry.path, piece_priorities=[0] * n)
    connect(h, seeder.port)
    leech.wait(lambda: h.status().num_peers > 0, 10, "connected")
    order: list[int] = []

    def on(ev: Ev) -> None:
        if ev.kind == "piece_finished_alert":
            order.append(ev.piece)

    asked = [n - 1, 2, 5]
    for k, i in enumerate(asked):
        h.set_piece_deadline(i, 100 * k)  # alone, on a priority-0 piece
    leech.wait(lambda: len(order) >= len(asked), 30, "deadline pieces", on)
    leech.idle(1.0, on)
    prios = h.get_piece_priorities()
    on_disk = sorted(p.name for p in (entry.path / "chunks").iterdir())
    note(S, "deadline_on_priority_0", {"asked": asked, "arrived": order,
                                       "priorities_after": [prios[i] for i in asked],
                                       "chunk_files": on_disk, "entry_files": ls_entry(entry)},
         f"set_piece_deadline(i, 0/100/200 ms) on priority-0 pieces {asked}: arrived {order}; "
         f"their priority became {[prios[i] for i in asked]}; files on disk {on_disk}; "
         f"entry dir {ls_entry(entry)}")
    leech.close()
    node.close()

    # 3. a reader wants every chunk in a given order: all deadlines at once vs a small window.
    want = [n - 2, n // 2, 1, n - 1, 0] + [i for i in range(n) if i not in (n - 2, n // 2, 1, n - 1, 0)]
    for window in (n, 2, 1):
        node = Node(cfg.workdir, f"prio-w{window}", cs)
        entry = node.entry(ident)
        leech = Agent("leech", close_redundant_connections=False)
        h = leech.add(torrent, entry.path, piece_priorities=[0] * n)
        connect(h, seeder.port)
        leech.wait(lambda: h.status().num_peers > 0, 10, "connected")
        got: list[int] = []
        asked_n = [0]

        def ask() -> None:  # the fetcher's job: keep at most `window` chunks in flight per swarm
            while asked_n[0] < len(want) and asked_n[0] - len(got) < window:
                h.set_piece_deadline(want[asked_n[0]], 50 * asked_n[0])
                asked_n[0] += 1

        def on_w(ev: Ev) -> None:
            if ev.kind == "piece_finished_alert":
                got.append(ev.piece)
                ask()

        t0 = time.monotonic()
        ask()
        leech.wait(lambda: len(got) >= n, 90, f"window {window}", on_w)
        dt = time.monotonic() - t0
        inv = sum(1 for a_, b_ in itertools.pairwise(got) if want.index(a_) > want.index(b_))
        first = got.index(want[0]) + 1
        note(S, f"order_window_{window}", {"wanted": want, "arrived": got, "adjacent_inversions": inv,
                                           "wanted_first_arrived_as": first,
                                           "MBps_in_process": round(size / dt / 1e6)},
             f"{'all ' + str(n) + ' deadlines at once' if window == n else f'window of {window}'}: "
             f"wanted {want} arrived {got} ({inv} adjacent inversions; the first wanted came #{first}); "
             f"{size / dt / 1e6:.0f} MB/s (both sessions in this process)")
        leech.close()
        node.close()
    seeder.close()

    # 4. origin fallback: a peer has only even chunks; the odd one we need comes from "origin".
    half = Agent("half-seed")
    hn = Node(cfg.workdir, "prio-half", cs)
    hentry = hn.entry(ident)
    fill_from_origin(hn, hentry, cfg.base, only=range(0, n, 2))
    hh = half.add(torrent, hentry.path, have=hentry.present)
    half.wait(lambda: hh.status().state == lt.torrent_status.downloading, 20, "half seed up")
    hh.prioritize_pieces([0] * n)  # it serves only
    node = Node(cfg.workdir, "prio-fallback", cs)
    entry = node.entry(ident)
    leech = Agent("leech")
    h = leech.add(torrent, entry.path, piece_priorities=[0] * n)
    connect(h, half.port)
    leech.wait(lambda: h.status().num_peers > 0, 10, "connected")
    leech.idle(0.5)
    half.pump(10)
    avail = h.piece_availability()
    decisions = {}
    done: list[int] = []

    def on2(ev: Ev) -> None:
        if ev.kind == "piece_finished_alert":
            done.append(ev.piece)

    for i in (0, 1):
        if avail[i] > 0:
            h.set_piece_deadline(i, 0)
            decisions[i] = f"peer (availability {avail[i]})"
        else:
            h.add_piece(i, chunk_bytes(i, entry.layout.length(i), cfg.base), 0)
            decisions[i] = "origin → add_piece (availability 0)"
    leech.wait(lambda: len(done) >= 2, 20, "0 and 1", on2)
    for i in done:
        adopt_chunk(entry, i)
    note(S, "origin_fallback", {"availability": list(avail), "decisions": decisions, "done": done},
         f"peer availability per piece {list(avail)} → {decisions}; both finished: {sorted(done)}")
    leech.close()
    half.close()
    node.close()
    hn.close()

    # 5. origin fallback for a chunk a slow peer is half-way through: add_piece on top of it.
    slow = Agent("slow-seed")
    sh = slow.add(torrent, sentry.path, have=range(n))
    sh.set_upload_limit(4_000_000)
    slow.wait(lambda: sh.status().is_seeding, 20, "slow seeding")
    node = Node(cfg.workdir, "prio-midway", cs)
    entry = node.entry(ident)
    leech = Agent("leech")
    h = leech.add(torrent, entry.path, piece_priorities=[0] * n)
    connect(h, slow.port)
    leech.wait(lambda: h.status().num_peers > 0, 10, "connected")
    target = 2
    h.set_piece_deadline(target, 0)
    leech.idle(1.5)
    slow.pump(10)
    partial = [q for q in h.get_download_queue() if q["piece_index"] == target]
    blocks = sum(1 for b in partial[0]["blocks"] if b["state"] == 3) if partial else 0  # 3: finished
    mark, t0 = len(leech.log), time.monotonic()
    h.add_piece(target, chunk_bytes(target, entry.layout.length(target), cfg.base), 0)
    leech.wait(lambda: h.have_piece(target), 20, "piece after add_piece")
    dt = time.monotonic() - t0
    leech.idle(1.0)
    ok = hashlib.sha1(entry.chunk_path(target).read_bytes()).digest() == sha1s[target]
    note(S, "origin_fallback_midway", {"peer_blocks_already_in": blocks,
                                       "add_piece_to_finished_s": round(dt, 3),
                                       "hash_failed": leech.count("hash_failed_alert", mark),
                                       "bytes_correct": ok},
         f"slow peer (4 MB/s) had delivered {blocks} of {cs // 16384} blocks of chunk {target}; "
         f"add_piece(origin bytes) on top → finished in {dt * 1e3:.0f} ms, hash_failed "
         f"{leech.count('hash_failed_alert', mark)}, file bytes correct {ok}")
    leech.close()
    slow.close()
    node.close()
    seed_node.close()


# --- experiment 5: two processes ----------------------------------------------------------

def _swarm_once(cfg: argparse.Namespace, sentry: Entry, ident: FileIdentity, tfile: Path,
                name: str, disk_io: str = "posix", settings: dict[str, Any] | None = None,
                global_class: bool = False, torrent_limit: int = 0,
                chunk: int | None = None) -> dict[str, Any]:
    chunk = chunk or cfg.chunk
    sargs = ["_seed", "--entry", str(sentry.path), "--torrent", str(tfile), "--disk-io", disk_io,
             "--settings", json.dumps(settings or {}), "--max-seconds", "300"]
    if global_class:
        sargs.append("--global-class")
    if torrent_limit:
        sargs += ["--torrent-upload-limit", str(torrent_limit)]
    seed = Child(sargs)
    cache = cfg.workdir / f"swarm-{name}"
    try:
        port = seed.until("ready", 60)["port"]
        C.prefault_page_cache(cfg.workdir, ident.size)
        scpu0 = C.proc_cpu_s(seed.p.pid) or 0.0
        leech = Child(["_leech", "--cache", str(cache), "--uri", ident.uri, "--etag", ident.etag,
                       "--size", str(ident.size), "--chunk", str(chunk), "--torrent", str(tfile),
                       "--peer", str(port), "--disk-io", disk_io,
                       "--settings", json.dumps({k: v for k, v in (settings or {}).items()
                                                 if k != "upload_rate_limit"}),
                       "--max-seconds", "150"])
        try:
            leech.until("ready", 60)
            done = leech.until("done", 170)
            scpu = (C.proc_cpu_s(seed.p.pid) or 0.0) - scpu0
        finally:
            leech.stop()
    finally:
        seed.stop()
        shutil.rmtree(cache, ignore_errors=True)
    secs = done["elapsed_s"]
    stalled = [m for m in leech.seen if m["event"] == "stalled"]
    ts = sorted(m["t"] for m in leech.seen if m["event"] == "piece")
    steady = ((len(ts) - 1) * chunk / (ts[-1] - ts[0]) / 1e6) if len(ts) > 2 else None
    return {**({"stalled": stalled[0]} if stalled else {}),"complete": done["complete"], "seconds": round(secs, 2), "adopted": done["adopted"],
            "MBps": round(done["bytes"] / secs / 1e6, 1),
            "steady_MBps": round(steady, 1) if steady else None,
            "leech_cpu_s": round(done["cpu_s"], 2),
            "leech_user_sys_s": [round(done["user_s"], 2), round(done["sys_s"], 2)],
            "of_which_journaling_cpu_s": round(done["adopt_cpu_s"], 2), "seed_cpu_s": round(scpu, 2),
            "cpu_s_per_GB": round((done["cpu_s"] + scpu) / (done["bytes"] / 1e9), 2)}


def exp_swarm(cfg: argparse.Namespace) -> None:
    S = "swarm"
    cs = cfg.chunk
    ident = FileIdentity("s3://models/m/swarm.safetensors", '"etag-5"', cfg.big)
    node = Node(cfg.workdir, "swarm-seed", cs)
    sentry = node.entry(ident)
    sha1s, _ = fill_from_origin(node, sentry, cfg.base)
    node.close()
    tfile = _torrent_file(cfg, torrent_with_libtorrent(ident, cs, sha1s), "swarm")
    print(f"  [{S}] {format_size(cfg.big)} in {format_size(cs)} pieces, seeder and leecher "
          "in two processes, page cache warm at the seeder, leecher journals every piece")
    tuned = {"send_buffer_watermark": 8 * MiB, "send_buffer_low_watermark": 1 * MiB,
             "send_buffer_watermark_factor": 150, "max_queued_disk_bytes": 32 * MiB,
             "max_out_request_queue": 1500, "request_queue_time": 5}
    for disk_io in cfg.backends:
        r = _swarm_once(cfg, sentry, ident, tfile, f"{disk_io}", disk_io)
        note(S, f"{disk_io}_default_settings", r, f"{disk_io} backend, default buffers: {r}")
    r = _swarm_once(cfg, sentry, ident, tfile, "posix-tuned", "posix", tuned)
    note(S, "posix_tuned", r, f"posix backend, bigger send buffers/request queue: {r}")
    # Same file, 4 MiB chunks (the field notes' piece size), same conditions.
    small_cs = 4 * MiB
    ident4 = FileIdentity(ident.uri, ident.etag + "-4m", ident.size)
    node = Node(cfg.workdir, "swarm-seed-4m", small_cs)
    sentry4 = node.entry(ident4)
    sha1s4, _ = fill_from_origin(node, sentry4, cfg.base[:small_cs])
    node.close()
    tfile4 = _torrent_file(cfg, torrent_with_libtorrent(ident4, small_cs, sha1s4), "swarm4")
    r = _swarm_once(cfg, sentry4, ident4, tfile4, "posix-4m", "posix", chunk=small_cs)
    note(S, "posix_4MiB_chunks", r, f"posix backend, 4 MiB chunks: {r}")
    r = _swarm_once(cfg, sentry, ident, tfile, "posix-again", "posix")
    note(S, "posix_default_settings_again", r, f"posix backend, 16 MiB chunks, again (noise check): {r}")
    shutil.rmtree(sentry4.path, ignore_errors=True)
    # Upload caps on a smaller file.
    small = FileIdentity("s3://models/m/capped.safetensors", '"etag-5b"', cfg.cap_size)
    node = Node(cfg.workdir, "swarm-seed-small", cs)
    sentry = node.entry(small)
    sha1s, _ = fill_from_origin(node, sentry, cfg.base)
    node.close()
    tsmall = _torrent_file(cfg, torrent_with_libtorrent(small, cs, sha1s), "capped")
    cap = cfg.cap
    for label, kw in (
            ("session_upload_rate_limit", {"settings": {"upload_rate_limit": cap}}),
            ("session_limit_with_global_peer_class", {"settings": {"upload_rate_limit": cap},
                                                      "global_class": True}),
            ("torrent_set_upload_limit", {"torrent_limit": cap})):
        r = _swarm_once(cfg, sentry, small, tsmall, label, "posix", **kw)
        r["cap_MBps"] = cap / 1e6
        note(S, label, r, f"cap {cap / 1e6:.0f} MB/s via {label}: measured {r['MBps']} MB/s "
             f"overall, {r['steady_MBps']} MB/s first-to-last piece "
             f"({'capped' if r['MBps'] < cap / 1e6 * 1.3 else 'NOT capped'})")


# --- experiment 6: a lying peer -----------------------------------------------------------

def exp_liar(cfg: argparse.Namespace) -> None:
    S = "liar"
    size, cs = cfg.small, cfg.chunk
    ident = FileIdentity("s3://models/m/liar.safetensors", '"etag-6"', size)
    n = ChunkLayout(size, cs).count
    bad = min(3, n - 1)
    good_node = Node(cfg.workdir, "liar-good", cs)
    gentry = good_node.entry(ident)
    sha1s, _ = fill_from_origin(good_node, gentry, cfg.base)
    torrent = torrent_with_libtorrent(ident, cs, sha1s)
    liar_node = Node(cfg.workdir, "liar-bad", cs)
    lentry = liar_node.entry(ident)
    fill_from_origin(liar_node, lentry, cfg.base)
    with open(lentry.chunk_path(bad), "r+b") as f:  # disk rot after the journal line was written
        f.seek(cs // 2)
        b = f.read(1)
        f.seek(cs // 2)
        f.write(bytes([b[0] ^ 0xFF]))

    liar = Agent("liar")
    lh = liar.add(torrent, lentry.path, have=range(n))  # trusts its journal: serves the bad byte
    liar.wait(lambda: lh.status().is_seeding, 20, "liar seeding")
    node = Node(cfg.workdir, "liar-victim", cs)
    entry = node.entry(ident)
    victim = Agent("victim")
    h = victim.add(torrent, entry.path)
    fails: list[int] = []
    finished: list[int] = []

    def on(ev: Ev) -> None:
        if ev.kind == "hash_failed_alert":
            fails.append(ev.piece)
        elif ev.kind == "piece_finished_alert":
            finished.append(ev.piece)
            adopt_chunk(entry, ev.piece)

    connect(h, liar.port)
    victim.wait(lambda: len(finished) >= n - 1 or victim.count("peer_ban_alert") > 0, 60,
                "the bad piece's verdict", on)
    victim.idle(2.0, on)
    liar.pump(10)
    got_from_liar = sorted(finished)
    mark = len(victim.log)
    connect(h, liar.port)  # try the banned peer again
    victim.idle(2.0, on)
    reconnect = {k: victim.count(k, mark) for k in ("peer_blocked_alert", "peer_connect_alert",
                                                     "peer_disconnected_alert")}
    blocked_msg = [e.msg for e in victim.log[mark:] if e.kind == "peer_blocked_alert"][:1]
    peers = [(p.ip, p.flags) for p in h.get_peer_info()]
    on_disk = entry.chunk_path(bad)
    disk_state = {"exists": on_disk.exists(),
                  "size": on_disk.stat().st_size if on_disk.exists() else None,
                  "journaled": bad in entry.present}
    if on_disk.exists():
        disk_state["matches_bad_bytes"] = on_disk.read_bytes() == lentry.chunk_path(bad).read_bytes()
    kinds = {k: victim.count(k) for k in ("hash_failed_alert", "peer_ban_alert",
                                          "peer_disconnected_alert", "peer_blocked_alert",
                                          "peer_error_alert")}
    disc = [e.msg for e in victim.log if e.kind in ("peer_ban_alert", "peer_disconnected_alert")][:2]
    note(S, "victim_view", {"hash_failed_pieces": fails, "alerts": kinds,
                            "pieces_finished_from_liar": got_from_liar,
                            "connected_peers_after": len(peers), "bad_piece_on_disk": disk_state,
                            "have_bad_piece": h.have_piece(bad), "disconnect_msgs": disc,
                            "connect_peer_to_liar_again": reconnect, "blocked_msg": blocked_msg},
         f"liar sends a flipped byte in chunk {bad}: hash_failed_alert for {fails}; alerts {kinds}; "
         f"pieces finished before the ban {got_from_liar} of {n}; peers connected after: {len(peers)}; "
         f"chunk file after the failure: {disk_state}; messages: {disc}; connect_peer to the liar "
         f"again → {reconnect} {blocked_msg}")
    # Fallback: an honest peer (or origin via add_piece) supplies the chunk.
    honest = Agent("honest")
    gh = honest.add(torrent, gentry.path, have=range(n))
    honest.wait(lambda: gh.status().is_seeding, 20, "honest seeding")
    connect(h, honest.port)
    t0 = time.monotonic()
    victim.wait(lambda: len(finished) >= n, 60, "every piece from the honest peer", on)
    ok = entry.chunk_path(bad).read_bytes() == gentry.chunk_path(bad).read_bytes()
    note(S, "recovered_from_honest_peer", {"seconds": round(time.monotonic() - t0, 2),
                                           "bytes_correct": ok,
                                           "liar_reconnect_attempts": victim.count("peer_connect_alert")},
         f"honest peer connected → the rest, chunk {bad} included, in {time.monotonic() - t0:.2f}s, "
         f"bytes correct: {ok}")
    # The liar, had it added its torrent in seed_mode, checks its own chunk before serving it.
    liar.close()
    liar2 = Agent("liar-seed-mode")
    lh2 = liar2.add(torrent, lentry.path, flags=lt.torrent_flags.seed_mode)
    liar2.wait(lambda: lh2.status().is_seeding, 20, "seed mode")
    node3 = Node(cfg.workdir, "liar-victim2", cs)
    e3 = node3.entry(ident)
    v2 = Agent("victim2")
    h3 = v2.add(torrent, e3.path, piece_priorities=[7 if i == bad else 0 for i in range(n)])
    connect(h3, liar2.port)
    v2.idle(4.0)
    liar2.idle(0.5)
    st = lh2.status(lt.torrent_handle.query_pieces)
    note(S, "liar_in_seed_mode_self_check", {
        "victim_hash_failed": v2.count("hash_failed_alert"),
        "liar_hash_failed": liar2.count("hash_failed_alert"),
        "liar_left_seed_mode": not st.seed_mode, "liar_has_bad": bool(st.pieces[bad]),
        "victim_got_bad": h3.have_piece(bad)},
        f"same liar with seed_mode (lazy verify before first upload): liar's own "
        f"hash_failed={liar2.count('hash_failed_alert')}, victim hash_failed="
        f"{v2.count('hash_failed_alert')}, liar left seed mode={not st.seed_mode}, liar now "
        f"has chunk {bad}: {bool(st.pieces[bad])}")
    for x in (v2, liar2, honest, victim):
        x.close()
    for x in (node3, node, liar_node, good_node):
        x.close()


# --- experiment 7: agreeing on the torrent -------------------------------------------------

class TorrentEndpoint(http.server.ThreadingHTTPServer):
    """Sketch of the peer API: GET /v1/torrents/<file-key> → bencoded info dict (or 404)."""

    def __init__(self) -> None:
        self.infos: dict[str, bytes] = {}
        super().__init__(("127.0.0.1", 0), _TorrentHandler)


class _TorrentHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        key = self.path.removeprefix("/v1/torrents/")
        info = self.server.infos.get(key)  # type: ignore[attr-defined]
        if not self.path.startswith("/v1/torrents/") or info is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-bittorrent-info")
        self.send_header("X-Coldbrew-Info-Hash", hashlib.sha1(info).hexdigest())
        self.send_header("Content-Length", str(len(info)))
        self.end_headers()
        self.wfile.write(info)

    def log_message(self, *args: Any) -> None:
        pass


def fetch_info(port: int, ident: FileIdentity, chunk_size: int) -> bytes:
    """Client side: fetch, then check the info dict describes exactly this identity."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/torrents/{ident.key()}", timeout=5) as r:
        info = r.read()
        claimed = r.headers["X-Coldbrew-Info-Hash"]
    if hashlib.sha1(info).hexdigest() != claimed:
        raise ValueError("info dict does not hash to the advertised info-hash")
    d = lt.bdecode(info)
    layout = ChunkLayout(ident.size, chunk_size)
    if (d[b"coldbrew-key"].decode() != ident.key() or d[b"name"] != b"chunks"
            or d[b"piece length"] != chunk_size
            or [f[b"length"] for f in d[b"files"]] != [layout.length(i) for i in range(layout.count)]
            or [f[b"path"] for f in d[b"files"]] != [[chunk_name(i).encode()] for i in range(layout.count)]):
        raise ValueError("info dict is not the one for this (uri, etag, size, chunk size)")
    return info


def exp_metadata(cfg: argparse.Namespace) -> None:
    S = "metadata"
    size, cs = cfg.small, cfg.chunk
    ident = FileIdentity("s3://models/m/meta.safetensors", '"etag-7"', size)
    n = ChunkLayout(size, cs).count
    node = Node(cfg.workdir, "meta-a", cs)
    entry = node.entry(ident)
    sha1s, _ = fill_from_origin(node, entry, cfg.base)
    t1 = torrent_with_libtorrent(ident, cs, sha1s)
    time.sleep(1.1)  # a different creation date
    t2 = torrent_with_libtorrent(ident, cs, sha1s)
    i1, i2 = lt.torrent_info(t1), lt.torrent_info(t2)
    note(S, "deterministic", {"torrent_bytes_equal": t1 == t2,
                              "info_hash_equal": str(i1.info_hashes().v1) == str(i2.info_hashes().v1),
                              "info_section_equal": i1.info_section() == i2.info_section()},
         f"two agents building from the same (identity, chunk size, SHA-1s): .torrent bytes equal "
         f"{t1 == t2} (creation date differs), info dict + info-hash equal "
         f"{i1.info_section() == i2.info_section()}")
    # Same bytes, other identity: without coldbrew-key the two entries would collide.
    other = FileIdentity("s3://models/copy/meta.safetensors", '"etag-7"', size)
    other_dir = cfg.workdir / "other-entry"
    ag = Agent("A")
    keyless = {k: v for k, v in info_dict(ident, cs, sha1s).items() if k != "coldbrew-key"}
    plain = torrent_from_info(bencode(keyless))  # what `other` would build too, byte for byte
    ag.add(plain, entry.path, have=range(n))
    h_other = ag.ses.add_torrent(add_params(lt.torrent_info(plain), other_dir))  # silently the same
    silent = h_other.status().save_path
    err = ""
    try:
        ag.ses.add_torrent(add_params(lt.torrent_info(plain), other_dir,
                                      flags=lt.torrent_flags.duplicate_is_error))
    except RuntimeError as e:
        err = str(e)
    t_other = torrent_with_libtorrent(other, cs, sha1s)
    distinct = str(lt.torrent_info(t_other).info_hashes().v1) != str(i1.info_hashes().v1)
    note(S, "identity_in_info_dict", {"second_add_returns_save_path": silent,
                                      "second_add_is_first_entry": silent == str(entry.path),
                                      "duplicate_is_error": err, "distinct_hash_with_key": distinct},
         f"same bytes under a second URI, info dict without our key: add_torrent silently returns "
         f"the FIRST entry's torrent (save_path is the first entry: {silent == str(entry.path)}); "
         f"with duplicate_is_error: {err!r}; with coldbrew-key in the info dict: distinct "
         f"info-hashes {distinct}")
    ag.close()

    # (a) BEP 9: the fresh agent knows only the info-hash; metadata comes from the peer.
    seeder = Agent("seed")
    sh = seeder.add(t1, entry.path, have=range(n))
    seeder.wait(lambda: sh.status().is_seeding, 20, "seeding")
    for mode in ("default_dont_download", "upload_mode"):
        node2 = Node(cfg.workdir, f"meta-b-{mode}", cs)
        e2 = node2.entry(ident)
        fresh = Agent("fresh")
        atp = lt.add_torrent_params()
        atp.info_hashes = lt.info_hash_t(lt.sha1_hash(bytes.fromhex(str(i1.info_hashes().v1))))
        atp.save_path = str(e2.path)
        atp.flags = (lt.torrent_flags.update_subscribe | getattr(lt.torrent_flags, mode)
                     | lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd
                     | lt.torrent_flags.disable_pex)
        fh = fresh.ses.add_torrent(atp)
        t0 = time.monotonic()
        connect(fh, seeder.port)
        fresh.wait(lambda: fresh.count("metadata_received_alert") > 0, 20, "metadata")
        dt = time.monotonic() - t0
        if mode == "upload_mode":
            # no requests are sent in upload mode: set piece priorities, then leave it
            fh.prioritize_pieces([0] * n)
            fh.unset_flags(lt.torrent_flags.upload_mode)
        fresh.idle(1.0)
        same = fh.torrent_file().info_section() == i1.info_section()
        got_pieces = num_have(fh)
        fh.set_piece_deadline(1, 0)
        fresh.wait(lambda: fh.have_piece(1), 20, "piece 1")
        fresh.idle(0.3)
        in_chunk_file = e2.chunk_path(1).exists() and (
            hashlib.sha1(e2.chunk_path(1).read_bytes()).digest() == sha1s[1])
        parts = [x for x in ls_entry(e2) if x.endswith(".parts")]
        note(S, f"bep9_magnet_{mode}", {"seconds_to_metadata": round(dt, 3), "info_equal": same,
                                        "pieces_before_asking": got_pieces,
                                        "piece_1_in_chunks_00000001": in_chunk_file,
                                        "part_files": parts, "entry_files": ls_entry(e2)},
             f"magnet (info-hash only) + {mode}: metadata in {dt * 1e3:.0f} ms, info dict identical "
             f"{same}, {got_pieces} pieces before asking; piece 1 then landed in chunks/00000001: "
             f"{in_chunk_file}; part files: {parts or 'none'}")
        fresh.close()
        node2.close()

    # (b) HTTP peer endpoint: GET /v1/torrents/<file-key> → info dict, checked, added.
    srv = TorrentEndpoint()
    srv.infos[ident.key()] = i1.info_section()
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        info = fetch_info(srv.server_address[1], ident, cs)
        node3 = Node(cfg.workdir, "meta-c", cs)
        e3 = node3.entry(ident)
        c = Agent("c")
        ch = c.add(torrent_from_info(info), e3.path, piece_priorities=[0] * n)
        connect(ch, seeder.port)
        ch.set_piece_deadline(0, 0)
        c.wait(lambda: ch.have_piece(0), 20, "piece 0")
        note(S, "http_endpoint", {"seconds_to_first_piece": round(time.monotonic() - t0, 3),
                                  "info_hash_equal": str(lt.torrent_info(torrent_from_info(info))
                                                         .info_hashes().v1) == str(i1.info_hashes().v1)},
             f"GET /v1/torrents/<key> → {len(info)} B info dict, validated against the identity, "
             f"torrent added, first chunk from the peer in {time.monotonic() - t0:.2f}s")
        try:
            fetch_info(srv.server_address[1], other, cs)
            missing = "200?!"
        except urllib.error.HTTPError as e:
            missing = str(e.code)
        note(S, "http_endpoint_unknown_key", missing, f"unknown key → HTTP {missing}")
        c.close()
        node3.close()
    finally:
        srv.shutdown()
        srv.server_close()
    seeder.close()
    node.close()


# --- main -----------------------------------------------------------------------------------

EXPERIMENTS = {"layout": exp_layout, "resume": exp_resume, "download": exp_download,
               "priorities": exp_priorities, "swarm": exp_swarm, "liar": exp_liar,
               "metadata": exp_metadata}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_seed", "_leech"):
        p = argparse.ArgumentParser()
        p.add_argument("mode")
        p.add_argument("--entry")
        p.add_argument("--cache")
        p.add_argument("--uri")
        p.add_argument("--etag")
        p.add_argument("--size", type=int)
        p.add_argument("--chunk", type=int)
        p.add_argument("--torrent", required=True)
        p.add_argument("--peer", type=int)
        p.add_argument("--disk-io", default="posix")
        p.add_argument("--settings", default="{}")
        p.add_argument("--global-class", action="store_true")
        p.add_argument("--torrent-upload-limit", type=int, default=0)
        p.add_argument("--max-seconds", type=float, default=120)
        p.add_argument("--stall-seconds", type=float, default=20)
        a = p.parse_args(argv)
        (child_seed if a.mode == "_seed" else child_leech)(a)
        return 0

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="*", default=["all"],
                   help=f"any of {', '.join(EXPERIMENTS)}, or all")
    p.add_argument("--chunk", type=parse_size, default=16 * MiB, help="chunk = piece size (16MiB)")
    p.add_argument("--big", type=parse_size, default=1 << 30, help="file for resume/swarm (1GiB)")
    p.add_argument("--small", type=parse_size, default=128 * MiB, help="file for the rest (128MiB)")
    p.add_argument("--cap", type=parse_size, default=50_000_000, help="upload cap, bytes/s (50MB)")
    p.add_argument("--cap-size", type=parse_size, default=256 * MiB, help="file for the cap test")
    p.add_argument("--backends", default="posix,pread", help="disk backends for swarm")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--json", type=Path, default=None)
    cfg = p.parse_args(argv)
    names = list(EXPERIMENTS) if "all" in cfg.experiments else cfg.experiments
    unknown = [x for x in names if x not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiment(s): {unknown}")
    cfg.backends = [b for b in cfg.backends.split(",") if b]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the work dir is still removed
    own = cfg.workdir is None
    cfg.workdir = Path(tempfile.mkdtemp(prefix="p2p-spike-")) if own else cfg.workdir
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    cfg.base = os.urandom(cfg.chunk)
    print(f"libtorrent {lt.__version__}, chunk {format_size(cfg.chunk)}, big {format_size(cfg.big)}, "
          f"small {format_size(cfg.small)}, workdir {cfg.workdir}, load {os.getloadavg()[0]:.1f}")
    failed = []
    try:
        for name in names:
            print(f"\n== {name} ==", flush=True)
            t0 = time.monotonic()
            try:
                EXPERIMENTS[name](cfg)
            except Exception as e:  # noqa: BLE001  (a spike reports and goes on to the next one)
                failed.append(name)
                note(name, "ERROR", f"{type(e).__name__}: {e}")
                import traceback
                traceback.print_exc()
            print(f"  ({name}: {time.monotonic() - t0:.1f}s)", flush=True)
    finally:
        if own and not cfg.keep:
            shutil.rmtree(cfg.workdir, ignore_errors=True)
    if cfg.json:
        C.write_json(cfg.json, FINDINGS)
    print(f"\nexperiments with errors: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
