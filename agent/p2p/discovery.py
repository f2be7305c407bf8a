"""Finding the other agents: a static list and/or a DNS name, checked with a hello.

Every agent serves a small HTTP peer endpoint on its ``p2p_port`` (see
:meth:`ControlAPI.peer_app`). A candidate address — from ``peers`` or from the
A records of ``peers_dns`` (the DaemonSet's headless Service) — becomes a peer
once its ``GET /v1/peer/hello`` answers; the answer names the agent (so an agent
never counts itself, whatever address it was listed under) and its libtorrent
port. Candidates are resolved and greeted again every ``peers_refresh_s``: nodes
come and go, and a peer that stops answering is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from .tls import PeerTLS

log = logging.getLogger("coldbrew.discovery")

HELLO_TIMEOUT_S = 2.0
#: Largest peer answer read: a manifest of 100 GB in 1 MiB chunks is ~8 MB of JSON.
MAX_ANSWER_BYTES = 32 << 20


@dataclass(frozen=True)
class Peer:
    agent_id: str
    base_url: str  # its peer endpoint, http://ip:port
    bt_endpoint: tuple[str, int]  # where its libtorrent listens


class PeerDirectory:
    def __init__(self, own_id: str, static: tuple[tuple[str, int], ...], dns: str | None,
                 dns_port: int, refresh_s: float,
                 on_change: Callable[[dict[str, Peer]], None], tls: PeerTLS | None = None) -> None:
        self.own_id = own_id
        self.tls = tls  # present our member certificate, accept only members' (:mod:`.tls`)
        self.scheme = "https" if tls is not None else "http"
        self.static = static
        self.dns = dns
        self.dns_port = dns_port
        self.refresh_s = refresh_s
        self.on_change = on_change
        self.peers: dict[str, Peer] = {}
        self.banned: set[str] = set()
        self.unreachable: list[str] = []
        self._http: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            connector = aiohttp.TCPConnector(ssl=self.tls.client_context()) if self.tls else None
            self._http = aiohttp.ClientSession(connector=connector,
                                               timeout=aiohttp.ClientTimeout(total=HELLO_TIMEOUT_S))
        return self._http

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:
                log.warning("peer discovery failed", extra={"error": str(e)})
            await asyncio.sleep(self.refresh_s)

    async def refresh(self) -> None:
        candidates = await self._candidates()
        answers = await asyncio.gather(*(self._hello(h, p) for h, p in candidates))
        found = {peer.agent_id: peer for peer in answers
                 if peer is not None and peer.agent_id not in self.banned}
        self.unreachable = [f"{h}:{p}" for (h, p), a in zip(candidates, answers) if a is None]
        if found.keys() != self.peers.keys():
            gone, new = self.peers.keys() - found.keys(), found.keys() - self.peers.keys()
            log.info("peers changed", extra={"peers": len(found), "joined": len(new), "left": len(gone)})
        changed = found != self.peers
        self.peers = found
        if changed:
            self.on_change(found)

    async def _candidates(self) -> list[tuple[str, int]]:
        out: set[tuple[str, int]] = set()
        named = [(h, p) for h, p in self.static]
        if self.dns:
            named.append((self.dns, self.dns_port))
        for host, port in named:
            for ip in await _resolve(host):
                out.add((ip, port))
        return sorted(out)

    async def _hello(self, ip: str, port: int) -> Peer | None:
        base = f"{self.scheme}://{_bracket(ip)}:{port}"
        try:
            async with self.http.get(f"{base}/v1/peer/hello") as resp:
                if resp.status != 200:
                    return None
                body: dict[str, Any] = await resp.json()
            agent_id, bt_port = str(body["agent_id"]), int(body["bt_port"])
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, TypeError):
            return None
        if agent_id == self.own_id:
            return None
        return Peer(agent_id, base, (ip, bt_port))

    def ban(self, agent_id: str) -> None:
        """Never ask ``agent_id`` anything again, nor count it as a peer (it lied to us)."""
        self.banned.add(agent_id)
        if self.peers.pop(agent_id, None) is not None:
            self.on_change(dict(self.peers))

    async def fetch_json(self, path: str) -> list[tuple[Peer, dict[str, Any]]]:
        """``GET path`` from every peer at once; (peer, JSON object) of those answering 200
        with one of at most :data:`MAX_ANSWER_BYTES`. Any other answer counts as none."""
        async def one(peer: Peer) -> dict[str, Any] | None:
            try:
                async with self.http.get(peer.base_url + path) as resp:
                    if resp.status != 200 or (resp.content_length or 0) > MAX_ANSWER_BYTES:
                        return None
                    raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
                    if len(raw) > MAX_ANSWER_BYTES:
                        log.warning("peer answer too large; ignored",
                                    extra={"peer": peer.agent_id, "path": path})
                        return None
                body = json.loads(raw)
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                return None
            return body if isinstance(body, dict) else None

        peers = list(self.peers.values())
        answers = await asyncio.gather(*(one(p) for p in peers))
        return [(p, a) for p, a in zip(peers, answers) if a is not None]

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


async def _resolve(host: str) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        log.info("peer name does not resolve", extra={"host": host, "error": str(e)})
        return []
    return sorted({str(info[4][0]) for info in infos})


def _bracket(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
