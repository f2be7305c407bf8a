"""The libtorrent session: its settings, each one the reason it is set, and starting to listen.

Kept apart from :mod:`.swarm` (what the torrents do) because this is where the network
policy lives: which interfaces, which protocols, which socket sizes, which peer classes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..errors import CacheError


@dataclass(frozen=True)
class P2PSettings:
    address: str
    bt_port: int
    upload_limit: int  # bytes/s, 0 = no cap
    chunk_timeout_s: float
    tls: bool = False  # libtorrent listens for SSL torrents only (:mod:`.tls`)

    @property
    def listen(self) -> str:
        # The "s" suffix makes it an SSL listen socket: the only one, so no plaintext peer
        # reaches libtorrent at all when TLS is on.
        return f"{self.address}:{self.bt_port}" + ("s" if self.tls else "")


def make_session(lt: Any, s: P2PSettings, pid: bytes) -> Any:
    """A libtorrent session for agent ``pid`` (its 20-byte peer id)."""
    pack = {
        "listen_interfaces": s.listen,
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        # TCP only: one port to open in a firewall or NetworkPolicy.
        "enable_incoming_utp": False, "enable_outgoing_utp": False,
        "allow_multiple_connections_per_ip": True,  # several agents per host in tests
        # No BitTorrent protocol encryption: it is RC4, authenticates nobody, and would only
        # cost CPU and handshake round trips. Confidentiality and membership come from TLS.
        "out_enc_policy": int(lt.enc_policy.pe_disabled),
        "in_enc_policy": int(lt.enc_policy.pe_disabled),
        "tick_interval": 100,  # ms; the rate limiter and handshakes react faster
        # Fewer, larger socket writes per 16 MiB piece (LAN and loopback peers are fast).
        "send_buffer_watermark": 8 << 20, "send_buffer_low_watermark": 1 << 20,
        # Fixed 4 MiB kernel socket buffers instead of autotuning: in 4 paired runs of the
        # P2P bench, 9 % less time and 12 % less agent CPU (bench/RESULTS.md). The kernel
        # caps them at net.core.[rw]mem_max, still above a datacenter link's BDP.
        "send_socket_buffer_size": 4 << 20, "recv_socket_buffer_size": 4 << 20,
        "close_redundant_connections": False,  # a finished peer must stay connected to serve
        "peer_fingerprint": pid.decode("ascii", "replace"),
        "upload_rate_limit": s.upload_limit,
        "alert_mask": int(lt.alert_category.error | lt.alert_category.status
                          | lt.alert_category.peer | lt.alert_category.piece_progress
                          | lt.alert_category.storage),
        "alert_queue_size": 100_000,
        "user_agent": "coldbrew",
    }
    params = lt.session_params(pack)
    # pread/pwrite with a pool of open files. The posix backend opens, stats, seeks and
    # closes the file for every 16 KiB block: ~25 % more agent CPU and ~20 % more time in
    # the P2P bench (bench/RESULTS.md). This one hashes a piece from its write cache, so a
    # piece can finish before its bytes are in the file: see Swarm._on_piece_finished.
    params.disk_io_constructor = "pread_disk_io_constructor"
    session = lt.session(params)
    # Peers on the LAN or loopback land in libtorrent's "local" class, which has no
    # rate limit; put every address in the global class so the upload cap holds.
    f = lt.ip_filter()
    f.add_rule("0.0.0.0", "255.255.255.255", 1 << session.global_peer_class_id)
    f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1 << session.global_peer_class_id)
    session.set_peer_class_filter(f)
    return session


def listen_port(session: Any, s: P2PSettings) -> int:
    return int(session.ssl_listen_port() if s.tls else session.listen_port())


def wait_listening(lt: Any, session: Any, s: P2PSettings, timeout_s: float = 10.0) -> None:
    """Block until ``session`` listens; a :class:`CacheError` naming the address if it cannot."""
    deadline = time.monotonic() + timeout_s
    while listen_port(session, s) == 0 and time.monotonic() < deadline:
        for a in session.pop_alerts():
            if isinstance(a, lt.listen_failed_alert):
                raise CacheError(f"P2P: cannot listen on {s.address}:{s.bt_port}: {a.message()}")
        session.wait_for_alert(100)
    if listen_port(session, s) == 0:
        raise CacheError(f"P2P: libtorrent did not start listening on {s.address}:{s.bt_port}")
