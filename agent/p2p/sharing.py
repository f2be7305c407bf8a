"""Which files are shared with peers, and where their manifests come from.

A file can only be shared once every chunk's SHA-1 is known (the torrent's info-hash
covers them all). The manifest that carries them is found, in order:

1. beside the entry in the cache (``manifest.json``, kept from an earlier run);
2. beside the object at the origin (``.coldbrew/<name>.manifest.json``, written by
   ``coldbrew publish``) — then every agent joins the swarm from the first byte;
3. from a peer that has it (``GET /v1/peer/manifests/<key>``);
4. built here, when this agent completes the file from the origin (the SHA-1s are
   computed as the chunks are written), and then offered to peers through (3).

Whatever a peer or the origin says is checked against the object's own identity
(URI, ETag, size) and this agent's chunk size before it is used. A manifest from a peer
(3) is more than that: its piece hashes are what the peers' bytes are checked against, so
it is on probation until the file's bytes match what the origin itself vouches for
(:mod:`.trust`), or refused outright under ``p2p_manifests`` (docs/security.md, Manifests).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web

from ... import __version__
from ..cache.store import ChunkStore, Entry
from ..core.manifest import Manifest, sidecar_uri
from ..errors import ColdbrewError, CorruptData, ManifestRejected
from ..fetch.sources import OpenFile
from ..metrics import AgentMetrics
from ..origin.origin import Origin
from .discovery import Peer, PeerDirectory
from .membership import FIRST_S
from .swarm import Swarm, Torrent
from .trust import Probation, settle

log = logging.getLogger("coldbrew.sharing")

#: After a lookup found no manifest, how long before peers are asked again (a peer
#: may complete the file meanwhile). The first lookup of a file is awaited, later
#: ones run in the background.
RELOOK_S = 2.0
#: Sidecars change only when someone publishes: ask the origin less often.
SIDECAR_RELOOK_S = 60.0
#: How often peers are asked whether they share a newly attached file.
EXPECT_EVERY_S = 0.2
#: Longest the first chunk of a file waits for the manifest lookup.
LOOKUP_WAIT_S = 3.0


class Sharing:
    def __init__(self, swarm: Swarm, directory: PeerDirectory, store: ChunkStore, origin: Origin,
                 metrics: AgentMetrics, policy: str = "members") -> None:
        self.swarm = swarm
        self.policy = policy  # p2p_manifests: members, checked or published
        self.directory = directory
        self.store = store
        self.origin = origin
        self.metrics = metrics
        self._lookups: dict[str, asyncio.Task[Torrent | None]] = {}
        self._missed: dict[str, float] = {}
        self._sidecar_missed: dict[str, float] = {}
        self._building: dict[str, asyncio.Task[None]] = {}
        self._warned_chunk_size: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        #: Peers' manifests not yet checked against the origin (entry key → probation).
        self._probation: dict[str, Probation] = {}
        #: Why a shared file's manifest is trusted: kept, published, built, checked, member.
        self.trust: dict[str, str] = {}
        #: How many of a file's peer manifests the origin refuted (entry key → count).
        self.rejections: dict[str, int] = {}
        store.on_change.append(self._entry_changed)

    def _entry_changed(self, entry: Entry) -> None:
        """An entry is leaving the cache or lost a chunk (the store calls this first): stop
        sharing it, as libtorrent would still offer what is gone. The next fetch looks it up
        afresh; an old failed lookup must not send its first chunks to the origin."""
        self.swarm.detach(entry.key)
        self._missed.pop(entry.key, None)

    async def start(self) -> None:
        """Share again what an earlier run shared (entries with a saved manifest)."""
        for entry in self.store.entries():
            manifest = await asyncio.to_thread(self.store.load_manifest, entry)
            if manifest is not None and entry.present:
                self.swarm.attach(entry, manifest)

    # --- finding a torrent -------------------------------------------------------------

    async def torrent_for(self, f: OpenFile) -> Torrent | None:
        key = f.entry.key
        found = self.swarm.torrent(key)
        if found is not None:
            return found
        task = self._lookups.get(key)
        if task is None:
            last = self._missed.get(key)
            if last is not None and time.monotonic() - last < RELOOK_S:
                return None
            task = asyncio.create_task(self._lookup(f))
            self._lookups[key] = task
            if last is not None:
                return None  # looked before: don't hold this chunk up, look in the background
        try:
            return await asyncio.wait_for(asyncio.shield(task), LOOKUP_WAIT_S)
        except TimeoutError:
            return None

    async def _lookup(self, f: OpenFile) -> Torrent | None:
        key = f.entry.key
        try:
            manifest = await self._manifest_for(f)
            if manifest is None:
                self._missed[key] = time.monotonic()
                return None
            self._missed.pop(key, None)
            return self._attach(f.entry, manifest)
        except Exception as e:  # P2P is an optimisation: fall back to origin
            log.warning("manifest lookup failed", extra={"uri": f.info.uri, "error": str(e)})
            self._missed[key] = time.monotonic()
            return None
        finally:
            self._lookups.pop(key, None)

    async def _manifest_for(self, f: OpenFile) -> Manifest | None:
        """The file's manifest, from the first place that has one we may trust."""
        key = f.entry.key
        probation = self._probation.get(key)
        if probation is not None:  # still being checked (a lost chunk detached the torrent)
            return probation.manifest
        manifest = await asyncio.to_thread(self.store.load_manifest, f.entry)
        if manifest is not None:
            self.trust.setdefault(key, "kept")
            return manifest
        manifest = await self._from_sidecar(f)
        if manifest is not None:
            self.trust[key] = "published"
        elif self.policy != "published":
            found = await self._from_peers(f)
            manifest = await self._admit(f, *found) if found is not None else None
            if manifest is None or key in self._probation:
                return manifest  # not kept on disk until the origin confirmed it
        if manifest is not None:
            await asyncio.to_thread(self._save, f.entry, manifest)
        return manifest

    async def _admit(self, f: OpenFile, manifest: Manifest, peer: Peer) -> Manifest | None:
        """A member's manifest: on probation where the origin vouches for the bytes, else
        taken on the member's word (``p2p_manifests = members``) or refused (``checked``)."""
        try:
            vouch = await self.origin.vouch(f.info)
        except ColdbrewError as e:
            log.info("cannot ask the origin for a checksum", extra={"uri": f.info.uri,
                                                                     "error": str(e)})
            vouch = None
        if vouch is None:
            if self.policy == "checked":
                log.info("a peer's manifest is not used: the origin has no checksum to check it "
                         "against (p2p_manifests = checked)", extra={"uri": f.info.uri})
                return None
            self.trust[f.entry.key] = "member"
            return manifest
        await asyncio.to_thread(self.store.set_unchecked, f.entry, True)
        probation = Probation(f.entry, manifest, peer.agent_id, vouch)
        self._probation[f.entry.key] = probation
        task = asyncio.create_task(self._judge(probation))
        self._background = {t for t in self._background if not t.done()} | {task}
        return manifest

    async def _judge(self, p: Probation) -> None:
        """Check ``p``'s file as it fills, then keep its manifest or reject it and its bytes."""
        entry, key = p.entry, p.entry.key

        def alive() -> bool:
            return (self.store.find(key) is entry and self._probation.get(key) is p
                    and not p.refuted)

        try:
            ok = await settle(p, alive)
        except Exception as e:  # the data file unreadable: nothing vouched for, nothing kept
            log.warning("cannot check a peer's manifest; the file is fetched again",
                        extra={"uri": entry.identity.uri, "error": str(e)})
            ok = None
        finally:
            if self._probation.get(key) is p:
                del self._probation[key]
        if p.refuted:
            ok = False
        try:
            if ok:
                await asyncio.to_thread(self.store.set_unchecked, entry, False)
                await asyncio.to_thread(self._save, entry, p.manifest)
                self.trust[key] = "checked"
                self.metrics.p2p_manifest_checks.labels("match").inc()
                log.info("a peer's manifest matches the origin", extra={
                    "uri": entry.identity.uri, "peer": p.member, "check": p.vouch.source})
            elif self.store.find(key) is entry:
                if ok is False:
                    self._reject(p)
                # Unchecked bytes are not kept, and whoever read them hears so (trust()).
                self.rejections[key] = self.rejections.get(key, 0) + 1
                await asyncio.to_thread(self.store.clear, entry)
        finally:
            p.verdict.set_result(bool(ok) if ok is not None else None)

    def _reject(self, p: Probation) -> None:
        self.metrics.p2p_manifest_checks.labels("mismatch").inc()
        self.metrics.p2p_peers_banned.inc()
        self.directory.ban(p.member)
        self.trust.pop(p.entry.key, None)
        log.error("a peer's manifest and bytes do not match the origin: dropped, the peer is "
                  "banned, the file is fetched again from the origin", extra={
                      "uri": p.entry.identity.uri, "peer": p.member, "check": p.vouch.source})

    def refute(self, key: str) -> bool:
        """The origin's bytes of a chunk of ``key`` failed its manifest's piece hash. If that
        manifest is a peer's on probation, it is proven false: True, and it is rejected."""
        p = self._probation.get(key)
        if p is None:
            return False
        p.refuted = True  # the check sees it and rejects it (within trust.POLL_S)
        return True

    def unchecked(self, entry: Entry) -> bool:
        """Is ``entry`` being filled under a peer's manifest the origin has not yet confirmed?"""
        return entry.key in self._probation

    async def verdict(self, f: OpenFile) -> str | None:
        """Why ``f``'s bytes can be trusted (see :attr:`trust`), waiting for its check if one
        is under way (the caller makes the file whole); None if it is not shared. Raises
        :class:`ManifestRejected` when the check found a peer's manifest lying."""
        p = self._probation.get(f.entry.key)
        if p is None:
            return self.trust.get(f.entry.key)
        ok = await asyncio.shield(p.verdict)
        if ok:
            return "checked"
        if ok is False:
            raise ManifestRejected(
                f"{f.info.uri}: the manifest and bytes agent {p.member} sent do not match "
                f"{p.what}; they were dropped, that agent is banned, and the file is fetched "
                "again from the origin: load it again")
        raise CorruptData(f"{f.info.uri} left the cache before its bytes from peers were "
                          "checked against the origin: load it again")

    def _attach(self, entry: Entry, manifest: Manifest) -> Torrent | None:
        if self.store.find(entry.key) is not entry:
            return None  # evicted meanwhile
        try:
            t = self.swarm.attach(entry, manifest)
        except RuntimeError as e:  # libtorrent: e.g. the same torrent still being removed
            log.info("cannot share yet", extra={"uri": entry.identity.uri, "error": str(e)})
            self._missed[entry.key] = time.monotonic()
            return None
        self._missed.pop(entry.key, None)  # shared now, however it got here (a build, a lookup)
        if t.view.expected is None:
            self._background.add(asyncio.create_task(self._expect_peers(t)))
            self._background = {task for task in self._background if not task.done()}
        return t

    def prepare(self, f: OpenFile) -> None:
        """Start finding ``f``'s manifest now (at open), so peers connect before reads need them."""
        key = f.entry.key
        if self.swarm.torrent(key) is None and key not in self._lookups and key not in self._missed:
            self._lookups[key] = asyncio.create_task(self._lookup(f))

    def _save(self, entry: Entry, manifest: Manifest) -> None:
        try:
            self.store.save_manifest(entry, manifest)
        except Exception as e:  # only a restart's head start is lost
            log.info("cannot keep manifest in the cache", extra={"uri": entry.identity.uri,
                                                                 "error": str(e)})

    def _usable(self, manifest: Manifest, f: OpenFile, where: str) -> bool:
        if manifest.identity != f.info.identity:
            log.info("manifest is for another version; ignored", extra={
                "uri": f.info.uri, "from": where, "etag": manifest.identity.etag,
                "current_etag": f.info.etag})
            return False
        if manifest.chunk_size != self.store.chunk_size:
            if f.info.uri not in self._warned_chunk_size:
                self._warned_chunk_size.add(f.info.uri)
                log.warning(f"the manifest of {f.info.uri} from {where} uses chunk size "
                            f"{manifest.chunk_size}, this agent {self.store.chunk_size}; publish "
                            f"again with --chunk-size {self.store.chunk_size} to share this file",
                            extra={"uri": f.info.uri})
            return False
        return manifest.shareable

    async def _from_sidecar(self, f: OpenFile) -> Manifest | None:
        key = f.entry.key
        last = self._sidecar_missed.get(key)
        if last is not None and time.monotonic() - last < SIDECAR_RELOOK_S:
            return None
        uri = sidecar_uri(f.info.uri)
        try:
            raw = await self.origin.read_small(uri)
            manifest = Manifest.from_json(_loads(raw)) if raw is not None else None
        except Exception as e:  # a broken sidecar must not break reads
            log.warning("unreadable manifest sidecar; ignored", extra={"uri": uri, "error": str(e)})
            manifest = None
        if manifest is None or not self._usable(manifest, f, uri):
            self._sidecar_missed[key] = time.monotonic()
            return None
        self.metrics.p2p_manifests.labels("sidecar").inc()
        return manifest

    async def _from_peers(self, f: OpenFile) -> tuple[Manifest, Peer] | None:
        for peer, body in await self.directory.fetch_json(f"/v1/peer/manifests/{f.entry.key}"):
            try:
                manifest = Manifest.from_json(body)
            except (ValueError, KeyError, TypeError):
                continue  # one malformed answer: ask the next peer
            if self._usable(manifest, f, "a peer"):
                self.metrics.p2p_manifests.labels("peer").inc()
                return manifest, peer
        return None

    async def _expect_peers(self, t: Torrent) -> None:
        """Tell the swarm which peers already share this file, so it waits for them to connect
        before fetching chunks they may own — and not a moment longer when there are none."""
        # Asked a few times while the file is new here: in a rollout, the others attach it
        # within moments of each other.
        for _ in range(int(FIRST_S / EXPECT_EVERY_S) + 1):
            try:
                answers = await self.directory.fetch_json(f"/v1/peer/manifests/{t.key}")
            except Exception:  # then the swarm waits its full join time
                return
            self.swarm.expect(t, {peer.agent_id for peer, _ in answers})
            await asyncio.sleep(EXPECT_EVERY_S)

    # --- building a manifest ------------------------------------------------------------

    def completed(self, f: OpenFile) -> None:
        """``f`` is now whole in the cache: build its manifest and share it (in the background)."""
        key = f.entry.key
        if self.swarm.torrent(key) is not None or key in self._building or f.info.size == 0:
            return
        self._building[key] = asyncio.create_task(self._build(f))

    async def _build(self, f: OpenFile) -> None:
        try:
            manifest = await asyncio.to_thread(self._hash_all, f.entry)
            if manifest is not None and self.swarm.torrent(f.entry.key) is None:
                await asyncio.to_thread(self._save, f.entry, manifest)
                if self._attach(f.entry, manifest) is not None:
                    self.trust[f.entry.key] = "built"
                    self.metrics.p2p_manifests.labels("built").inc()
        except Exception as e:  # sharing is optional; reads go on
            log.warning("cannot share a completed file", extra={"uri": f.info.uri, "error": str(e)})
        finally:
            self._building.pop(f.entry.key, None)

    def _hash_all(self, entry: Entry) -> Manifest | None:
        for i in range(entry.layout.count):
            if not self.store.has(entry, i):
                return None  # evicted or dropped meanwhile
            self.store.piece_hash(entry, i)  # computed as chunks were written; here if not
        return entry.manifest()

    # --- the peer endpoint ----------------------------------------------------------------

    def peer_app(self, agent_id: str) -> web.Application:
        """What other agents may ask: who we are, and the manifests of files we share."""

        async def hello(_: web.Request) -> web.Response:
            return web.json_response({"agent_id": agent_id, "bt_port": self.swarm.bt_port,
                                      "version": __version__})

        async def manifest(request: web.Request) -> web.Response:
            key = request.match_info["key"]
            found = self.swarm.manifests().get(key)
            if found is None or key in self._probation:  # unchecked: not ours to vouch for
                return web.json_response({"error": "not shared here"}, status=404)
            return web.json_response(found.to_json())

        app = web.Application()
        app.router.add_get("/v1/peer/hello", hello)
        app.router.add_get("/v1/peer/manifests/{key}", manifest)
        return app

    def status(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "peers": sorted(p.base_url for p in self.directory.peers.values()),
            "unreachable": self.directory.unreachable,
            **self.swarm.stats(),
            "bytes_from_peers": int(m.value("coldbrew_p2p_received_bytes_total")),
            "bytes_to_peers": int(m.value("coldbrew_p2p_sent_bytes_total")),
            "peers_banned": int(m.value("coldbrew_p2p_peers_banned_total")),
            "origin_egress_saved_bytes": int(m.value("coldbrew_p2p_received_bytes_total")),
        }

    async def close(self) -> None:
        for task in [*self._lookups.values(), *self._building.values(), *self._background]:
            task.cancel()


def _loads(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data
