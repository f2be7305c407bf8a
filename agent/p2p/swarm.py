"""Chunks from other agents: one libtorrent session, one torrent per shared cache entry.

How a chunk moves (docs/architecture.md, Peers (P2P)):

* The torrent's one file is the entry's data file (:mod:`.torrent`), one piece per
  chunk, so libtorrent serves and writes the cache's own bytes — never a second copy.
  It verifies every piece against its SHA-1 before we hear of it; a peer that sent bad
  bytes is banned.
* Every piece starts at priority 0: libtorrent fetches nothing on its own. The
  fetcher asks for one chunk at a time (:meth:`Swarm.from_peers`, a piece deadline),
  in the order readers need them, and gives up on peers after ``p2p_chunk_timeout_s``
  — then the chunk comes from the origin. Never a stall.
* Once a torrent is attached, libtorrent owns the entry's data file: origin bytes
  go in through ``add_piece`` (:meth:`Swarm.put_piece`), so its write cache and the
  store never write the file at once. A finished piece is adopted into the store
  (xxh3 digest + journal) once libtorrent has written it: its disk backend hashes a piece from its write
  cache and may say so before the bytes reach the file, so adoption waits for a
  flush of the torrent's cache (``flush_cache`` → ``cache_flushed_alert``).
* When several agents want a chunk nobody has, only its stripe owner fetches it from
  the origin (:mod:`.membership`, the policy as pure code); the others wait for it.
* The session's settings live in :mod:`.session`.

libtorrent runs its own threads; this module adds one more that waits for alerts
and, every tick, snapshots piece availability and members for the asyncio side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..cache.store import ChunkStore, Entry
from ..core.manifest import Manifest
from ..errors import CacheError, CorruptData, ObjectChanged
from ..fetch.sources import Outcome
from ..metrics import AgentMetrics
from .membership import TICK_S, PeerView, availability_from
from .session import P2PSettings, listen_port, make_session, wait_listening
from .tls import DH_PARAMS, PeerTLS
from .torrent import torrent_bytes

log = logging.getLogger("coldbrew.peers")

#: How often a torrent that someone waits on retries connecting to missing peers.
RECONNECT_S = 0.5
#: Most chunks asked of peers at once (per agent).
PEER_WINDOW = 4
#: A chunk nobody has is waited for at most this many chunk timeouts (its owner is alive).
UNAVAILABLE_TIMEOUTS = 6
#: Longest libtorrent may take to write and hash one origin chunk handed to it.
PUT_TIMEOUT_S = 60.0


@dataclass
class Torrent:
    entry: Entry
    manifest: Manifest
    handle: Any  # lt.torrent_handle
    view: PeerView  # its peers, refreshed each tick by the alert thread
    reconnected_at: float = 0.0
    connected: int = 0
    waiters: dict[int, asyncio.Future[str]] = field(default_factory=dict)
    from_origin: set[int] = field(default_factory=set)
    #: Pieces finished but maybe still in libtorrent's write cache: those the flush asked
    #: for now will cover, and those that finished after it was asked (the next flush).
    flushing: set[int] = field(default_factory=set)
    unflushed: set[int] = field(default_factory=set)
    flush_asked: bool = False
    tick: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> str:
        return self.entry.key


class Swarm:
    def __init__(self, settings: P2PSettings, agent_id: str, store: ChunkStore,
                 metrics: AgentMetrics, loop: asyncio.AbstractEventLoop,
                 tls: PeerTLS | None = None) -> None:
        import libtorrent as lt

        self.lt = lt
        self.settings = settings
        self.tls = tls
        self.pid = _pid(agent_id)
        self.store = store
        self.metrics = metrics
        self.loop = loop
        self._lock = threading.Lock()
        self._torrents: dict[str, Torrent] = {}
        self._by_hash: dict[str, str] = {}  # info-hash → entry key
        self._endpoints: dict[bytes, tuple[str, int]] = {}  # peer id → libtorrent address
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_stats = 0.0
        self._sent = 0
        self._asked = 0  # pieces requested from peers now, over all torrents (event loop only)
        self.session = make_session(lt, settings, self.pid)

    # --- session ---------------------------------------------------------------------

    def start(self) -> None:
        wait_listening(self.lt, self.session, self.settings)
        self._thread = threading.Thread(target=self._alert_loop, name="p2p-alerts", daemon=True)
        self._thread.start()
        log.info("p2p session listening", extra={"port": self.bt_port, "tls": self.tls is not None})

    @property
    def bt_port(self) -> int:
        return listen_port(self.session, self.settings)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for t in self._torrents.values():
                self.session.remove_torrent(t.handle)
            self._torrents.clear()

    # --- peers ----------------------------------------------------------------------

    def set_endpoints(self, endpoints: dict[str, tuple[str, int]]) -> None:
        """The other agents (agent id → libtorrent address); every torrent connects to them all."""
        self._endpoints = {_pid(agent_id): ep for agent_id, ep in endpoints.items()}
        with self._lock:
            torrents = list(self._torrents.values())
        for t in torrents:
            self._connect(t)

    def _connect(self, t: Torrent, skip: set[bytes] | frozenset[bytes] = frozenset()) -> None:
        for pid, ep in list(self._endpoints.items()):
            if pid not in skip:
                t.handle.connect_peer(ep)

    # --- torrents ---------------------------------------------------------------------

    def torrent(self, key: str) -> Torrent | None:
        with self._lock:
            return self._torrents.get(key)

    def manifests(self) -> dict[str, Manifest]:
        with self._lock:
            return {k: t.manifest for k, t in self._torrents.items()}

    def attach(self, entry: Entry, manifest: Manifest) -> Torrent:
        """Offer ``entry`` to peers (its present chunks) and make its missing ones fetchable."""
        lt = self.lt
        with self._lock:
            found = self._torrents.get(entry.key)
            if found is not None:
                return found
            info = lt.torrent_info(torrent_bytes(manifest, self.tls.ca_pem if self.tls else None))
            n = info.num_pieces()
            atp = lt.add_torrent_params()
            atp.ti = info
            atp.save_path = str(entry.path)
            # Not auto-managed: the queue must never pause a torrent a reader waits on.
            atp.flags = (lt.torrent_flags.update_subscribe | lt.torrent_flags.apply_ip_filter
                         | lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd
                         | lt.torrent_flags.disable_pex)
            present = set(entry.present)
            atp.have_pieces = [i in present for i in range(n)]  # trust the journal: no recheck
            atp.piece_priorities = [0] * n  # nothing is fetched unless the fetcher asks
            handle = self.session.add_torrent(atp)
            self._certify(handle)
            view = PeerView(self.pid, entry.key, time.monotonic(), availability=[0] * n)
            t = Torrent(entry, manifest, handle, view)
            self._torrents[entry.key] = t
            self._by_hash[str(info.info_hashes().v1)] = entry.key
        self._connect(t)
        self.metrics.p2p_torrents.set(len(self._torrents))
        log.info("sharing with peers", extra={"uri": entry.identity.uri, "chunks": n,
                                              "present": len(present)})
        return t

    def _certify(self, handle: Any) -> None:
        if self.tls is not None:
            handle.set_ssl_certificate_buffer(self.tls.cert_pem.decode(), self.tls.key_pem.decode(),
                                              DH_PARAMS)

    def renew_certificates(self) -> None:
        """The identity's files changed (a renewal): present the new certificate from now on."""
        with self._lock:
            torrents = list(self._torrents.values())
        for t in torrents:
            with contextlib.suppress(RuntimeError):  # removed meanwhile
                self._certify(t.handle)

    def expect(self, t: Torrent, agent_ids: set[str]) -> None:
        """These agents share ``t``'s file too: wait for them to connect before striping."""
        t.view.expected = (t.view.expected or set()) | {_pid(a) for a in agent_ids}

    def detach(self, key: str) -> None:
        """Stop sharing an entry (before its files go). Waiters fall back to the origin."""
        with self._lock:
            t = self._torrents.pop(key, None)
            if t is None:
                return
            self._by_hash = {h: k for h, k in self._by_hash.items() if k != key}
        self.session.remove_torrent(t.handle)
        self.metrics.p2p_torrents.set(len(self._torrents))
        for fut in list(t.waiters.values()):
            self.loop.call_soon_threadsafe(_settle, fut, "gone")

    # --- fetching -----------------------------------------------------------------------

    async def from_peers(self, t: Torrent, index: int) -> Outcome:
        """Try to get chunk ``index`` from peers into the cache.

        ``PRESENT``: it is cached. ``PASS``: nobody has it and this agent is the one to
        fetch it from the origin. ``GAVE_UP``: peers were too slow or left; use the origin.
        """
        if self.store.has(t.entry, index):
            return Outcome.PRESENT
        fut: asyncio.Future[str] = self.loop.create_future()
        t.waiters[index] = fut
        requested_at: float | None = None
        started = time.monotonic()
        # A chunk asked of a peer must come within chunk_timeout_s. One nobody has yet is
        # waited for as long as its owner is an active member (an owner that stops making
        # progress or leaves loses its stripes), with a generous cap so nothing waits forever.
        give_up_at = started + self.settings.chunk_timeout_s * UNAVAILABLE_TIMEOUTS
        try:
            while not fut.done():
                if self.store.has(t.entry, index):
                    return Outcome.PRESENT  # it finished between two looks (or another path brought it)
                now = time.monotonic()
                available = t.view.available(index)
                if available and requested_at is None and self._asked < PEER_WINDOW:
                    # A few pieces at a time, each at full speed, rather than many that all
                    # crawl (and would all miss their timeout on a busy node).
                    if not _call(t.handle.set_piece_deadline, index, 0):
                        return Outcome.GAVE_UP  # detached meanwhile
                    requested_at = now
                    self._asked += 1
                elif not available and requested_at is not None:
                    # The peers that had it left: stop asking, decide again.
                    self._cancel(t, index)
                    requested_at = None
                    self._asked -= 1
                if requested_at is None and not available \
                        and t.view.should_fetch(index, self._endpoints.keys(), now):
                    log.debug("fetching our stripe from the origin", extra={
                        "uri": t.entry.identity.uri, "chunk": index, "members": len(t.view.members)})
                    return Outcome.PASS
                slow = requested_at is not None and now - requested_at > self.settings.chunk_timeout_s
                if slow or now >= give_up_at:
                    log.info("peers too slow for a chunk; using the origin", extra={
                        "uri": t.entry.identity.uri, "chunk": index,
                        "waited_s": round(now - started, 1), "requested": requested_at is not None})
                    return Outcome.GAVE_UP
                t.tick.clear()
                tick = asyncio.ensure_future(t.tick.wait())
                try:
                    await asyncio.wait([tick, fut], timeout=TICK_S * 3,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    tick.cancel()
            if fut.result() == "ok":
                self.metrics.chunk_seconds.labels("peer").observe(time.monotonic() - started)
                return Outcome.PRESENT
            return Outcome.GAVE_UP
        finally:
            t.waiters.pop(index, None)
            if requested_at is not None:
                self._asked -= 1
                if not (fut.done() and fut.result() == "ok"):
                    self._cancel(t, index)

    def still_mine(self, t: Torrent, index: int) -> bool:
        """Re-check, once an origin slot is free, a decision made while waiting for it:
        peers that joined since may own the chunk now, or already have it."""
        return t.view.still_mine(index)

    def _cancel(self, t: Torrent, index: int) -> None:
        _call(t.handle.reset_piece_deadline, index)
        _call(t.handle.piece_priority, index, 0)

    async def put_piece(self, t: Torrent, index: int, piece: bytes) -> None:
        """Hand origin bytes of chunk ``index`` to libtorrent, which writes and checks them.

        Raises :class:`ObjectChanged` if they fail the manifest's piece hash, and
        :class:`CacheError` if they could not be cached (the caller serves them from memory).
        """
        fut: asyncio.Future[str] = self.loop.create_future()
        t.waiters[index] = fut
        t.from_origin.add(index)
        try:
            if self.store.has(t.entry, index):
                return  # a peer's copy landed meanwhile; libtorrent would ignore ours
            if not _call(t.handle.add_piece, index, piece,
                         self.lt.add_piece_flags_t.overwrite_existing):
                raise CacheError(f"{t.entry.identity.uri}: no longer shared; chunk {index} "
                                 "served from memory")
            outcome = await self._outcome(t, index, fut)
            if outcome == "bad":
                raise ObjectChanged(f"{t.entry.identity.uri}: chunk {index} from the origin does not "
                                    "match the file's published manifest (a stale manifest, or the "
                                    "object changed under the same ETag); publish it again")
            if outcome != "ok":
                raise CacheError(f"{t.entry.identity.uri}: chunk {index} not cached ({outcome})")
        finally:
            t.waiters.pop(index, None)
            t.from_origin.discard(index)

    async def _outcome(self, t: Torrent, index: int, fut: asyncio.Future[str]) -> str:
        """Wait for libtorrent's verdict on a piece we handed it, or see it land another way."""
        deadline = time.monotonic() + PUT_TIMEOUT_S
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout=TICK_S * 5)
            except TimeoutError:
                if self.store.has(t.entry, index):
                    return "ok"
                if time.monotonic() >= deadline:
                    return "timed out"

    # --- the alert thread -----------------------------------------------------------------

    def _alert_loop(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            self.session.wait_for_alert(int(TICK_S * 1000))
            for alert in self.session.pop_alerts():
                try:
                    self._on_alert(alert)
                except Exception as e:  # the loop must survive any one alert
                    log.warning("p2p alert handling failed", extra={"error": repr(e)})
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                self._tick()

    def _find(self, alert: Any) -> Torrent | None:
        try:
            key = self._by_hash.get(str(alert.handle.info_hashes().v1))
        except Exception:  # a handle of a torrent already removed
            return None
        return self.torrent(key) if key else None

    def _on_alert(self, alert: Any) -> None:
        lt = self.lt
        if isinstance(alert, lt.session_stats_alert):
            self._on_stats(alert)
        elif isinstance(alert, lt.piece_finished_alert):
            t = self._find(alert)
            if t is not None:
                self._on_piece_finished(t, int(alert.piece_index))
        elif isinstance(alert, lt.cache_flushed_alert):
            t = self._find(alert)
            if t is not None:
                self._on_flushed(t)
        elif isinstance(alert, lt.hash_failed_alert):
            t = self._find(alert)
            index = int(alert.piece_index)
            if t is not None and index in t.from_origin:
                fut = t.waiters.get(index)
                if fut is not None:
                    self.loop.call_soon_threadsafe(_settle, fut, "bad")
            else:
                self.metrics.corrupt_chunks.labels("peer").inc()
                log.warning("a peer sent a bad chunk; it will be banned and the chunk fetched "
                            "again", extra={"chunk": index,
                                            "uri": t.entry.identity.uri if t else None})
        elif isinstance(alert, lt.peer_error_alert) and "ssl" in alert.message().lower():
            # a process without a member certificate (or a plaintext one) tried to talk to us
            self.metrics.p2p_refused.labels("tls").inc()
            log.info("peer refused: TLS handshake failed", extra={"peer": str(alert.endpoint),
                                                                  "error": alert.message()})
        elif isinstance(alert, lt.peer_ban_alert):
            self.metrics.p2p_peers_banned.inc()
            log.warning("peer banned for sending bad data", extra={"peer": str(alert.endpoint)})
        elif isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)):
            t = self._find(alert)
            log.warning("p2p storage error; sharing stops for this file", extra={
                "uri": t.entry.identity.uri if t else None, "error": alert.message()})
            if t is not None:
                self.detach(t.key)

    def _on_piece_finished(self, t: Torrent, index: int) -> None:
        """libtorrent checked piece ``index``; adopt it once a flush has put it in its file."""
        if t.waiters.get(index) is None and self.store.has(t.entry, index):
            return  # libtorrent reporting a piece we gave it at attach: nothing new
        if t.flush_asked:
            t.unflushed.add(index)  # the flush under way may not cover it: the next one will
            return
        t.flushing.add(index)
        self._flush(t)

    def _flush(self, t: Torrent) -> None:
        t.flush_asked = _call(t.handle.flush_cache)  # False: removed (waiters fall back)

    def _on_flushed(self, t: Torrent) -> None:
        done, t.flushing = t.flushing, t.unflushed
        t.unflushed = set()
        t.flush_asked = False
        if t.flushing:
            self._flush(t)
        for index in sorted(done):
            self._adopt(t, index)

    def _adopt(self, t: Torrent, index: int) -> None:
        fut = t.waiters.get(index)
        if fut is None and self.store.has(t.entry, index):
            return  # it came in another way meanwhile
        from_origin = index in t.from_origin
        sha1 = t.manifest.sha1s[index]
        assert sha1 is not None
        expected = t.manifest.digests[index] if index < len(t.manifest.digests) else None
        try:
            self.store.adopt_chunk(t.entry, index, sha1, expected)
            outcome = "ok"
        except (CacheError, CorruptData) as e:
            log.warning("chunk not taken into the cache", extra={
                "uri": t.entry.identity.uri, "chunk": index, "error": str(e)})
            outcome = "uncached"
        if outcome == "ok" and not from_origin:
            self.metrics.p2p_received_bytes.inc(t.entry.layout.length(index))
        if fut is not None:
            self.loop.call_soon_threadsafe(_settle, fut, outcome)

    def _tick(self) -> None:
        now = time.monotonic()
        connected = 0
        with self._lock:
            torrents = list(self._torrents.values())
        for t in torrents:
            if not t.waiters and now - t.view.snapshot_at < 1.0:
                connected += t.connected
                continue  # nobody waits on it: a slower refresh is enough
            try:
                peers = t.handle.get_peer_info()
                availability = list(t.handle.piece_availability())
            except Exception:  # removed under us
                continue
            connected += len(peers)
            total = t.entry.layout.count
            if len(availability) != total:
                availability = availability_from(((int(p.num_pieces), p.pieces) for p in peers), total)
            # Peers still connecting have no handshake yet, so no peer id.
            seen = [(pid, int(p.num_pieces)) for p in peers if (pid := p.pid.to_bytes()) != _NO_PID]
            t.view.observe(seen, availability, now)
            t.connected = len(peers)
            if t.waiters and now - t.reconnected_at > RECONNECT_S:
                # libtorrent waits long before retrying a failed peer (min_reconnect_time);
                # a peer that attached this file after we first tried it must not wait that long.
                t.reconnected_at = now
                self._connect(t, skip=set(t.view.progress))
            self.loop.call_soon_threadsafe(t.tick.set)
        self.metrics.p2p_connections.set(connected)
        if now - self._last_stats > 1.0:
            self._last_stats = now
            self.session.post_session_stats()  # answered by a session_stats_alert

    def _on_stats(self, alert: Any) -> None:
        sent = int(alert.values.get("net.sent_payload_bytes", 0))
        self.metrics.p2p_sent_bytes.inc(max(0, sent - self._sent))
        self._sent = sent

    def stats(self) -> dict[str, Any]:
        with self._lock:
            torrents = list(self._torrents.values())
        return {"listen_port": self.bt_port, "torrents": len(torrents),
                "connections": sum(t.connected for t in torrents)}


_NO_PID = bytes(20)


def _pid(agent_id: str) -> bytes:
    """An agent's BitTorrent peer id: its id, 20 ASCII bytes (set as the session's fingerprint)."""
    return agent_id.encode()[:20].ljust(20, b"-")


def _call(method: Any, *args: Any) -> bool:
    """A torrent_handle call; False if the torrent was removed meanwhile (invalid handle)."""
    try:
        method(*args)
        return True
    except RuntimeError:
        return False


def _settle(fut: asyncio.Future[str], outcome: str) -> None:
    if not fut.done():
        fut.set_result(outcome)

