"""The agent process: wiring, start-up checks, signals and clean shutdown.

Start order matters: the cache is opened (and cleaned of what a crash left)
before anything can read it, the origin is checked before the agent says it is
ready, and the control socket appears last, so a client that can connect gets
a working agent. SIGTERM/SIGINT stop it in reverse order, releasing leases and
removing the socket file.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import secrets
import signal
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from ..cache.store import ChunkStore, Limits
from ..config import AgentConfig
from ..control.scope import Scope
from ..control.server import ControlAPI
from ..errors import ColdbrewError, ConfigError, OriginUnavailable
from ..fetch.fetcher import Fetcher
from ..fetch.jobs import Jobs
from ..fetch.prewarm_list import PrewarmList
from ..fetch.sources import ChunkSource
from ..metrics import AgentMetrics
from ..origin.origin import Origin

log = logging.getLogger("coldbrew.agent")

_LEASE_SWEEP_S = 30.0


def _disk_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


#: Open files the agent asks for: data files the mount keeps open, libtorrent's
#: peers and files, HTTP connections. The soft limit is often 1024; the hard one far higher.
_OPEN_FILES_WANTED = 1 << 16


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards ``_OPEN_FILES_WANTED`` (never above the hard
    limit, never lowered). Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(_OPEN_FILES_WANTED, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return soft, want
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit", extra={"soft": soft, "hard": hard,
                                                                  "error": str(e)})
    return soft, soft


#: How often the P2P identity's files are looked at for a renewal (cert-manager renews well
#: before expiry; the kubelet takes up to a minute to update a mounted Secret anyway).
TLS_RELOAD_S = 30.0


async def _renew_certificates(tls: Any, swarm: Any) -> None:
    while True:
        await asyncio.sleep(TLS_RELOAD_S)
        try:
            if await asyncio.to_thread(tls.reload):
                swarm.renew_certificates()
                log.info("P2P certificates renewed", extra={"dir": str(tls.directory)})
        except ColdbrewError as e:  # a half-written rotation: keep the old set, say so
            log.warning("P2P certificates not renewed", extra={"error": str(e)})


def _claim_socket(path: Path) -> None:
    """Make ``path`` free for our socket, refusing to steal a live agent's."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create socket directory {path.parent}: {e.strerror}") from e
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # left by an agent that died: stale
        return
    finally:
        probe.close()
    raise ConfigError(f"another agent is already listening on {path}; stop it or pass --socket")


class Agent:
    def __init__(self, config: AgentConfig, config_file: Path | None = None) -> None:
        self.config = config
        self.config_file = config_file  # its prewarm list is followed while running
        self.prewarm_list: PrewarmList | None = None
        self.metrics = AgentMetrics()
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self.store: ChunkStore | None = None
        self.origin: Origin | None = None
        self.fetcher: Fetcher | None = None
        self.jobs: Jobs | None = None
        self.api: ControlAPI | None = None
        self.mount: Any = None  # coldbrew.fuse.mount.Mount when --mount is set
        self.sharing: Any = None  # coldbrew.agent.p2p.sharing.Sharing when P2P is on
        self.metrics_address = ""
        #: Names this agent to its peers (and is its BitTorrent peer id): 20 ASCII bytes.
        self.agent_id = "cb" + secrets.token_hex(9)

    async def start(self) -> None:
        cfg = self.config
        before, after = raise_open_file_limit()
        if after != before:
            log.info("open-file limit raised", extra={"from": before, "to": after})
        try:
            cfg.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create cache directory {cfg.cache_dir}: {e.strerror}") from e
        disk = _disk_bytes(cfg.cache_dir)
        limits = Limits(size_bytes=cfg.cache_size.resolve(disk),
                        reserve_bytes=cfg.cache_reserve.resolve(disk))
        self.store = ChunkStore(cfg.cache_dir, cfg.chunk_size, limits, self.metrics,
                                piece_hashes=cfg.p2p_port > 0)
        await asyncio.to_thread(self.store.open)
        self.origin = Origin(cfg.origin_settings, self.metrics)
        if cfg.check_origin:
            await self._check_origin()
        # P2P first: the fetcher is built with its peer source.
        peers = await self._start_p2p() if cfg.p2p_port else None
        self.fetcher = Fetcher(self.origin, self.store, self.metrics, cfg.fetch_concurrency,
                               peers=peers, origin_unreachable=cfg.origin_unreachable)
        await asyncio.to_thread(self.fetcher.slots.preallocate)
        self.jobs = Jobs(self.fetcher, self.metrics)
        if self.config_file is not None:  # a bad list stops the start, like a bad setting
            self.prewarm_list = PrewarmList(self.config_file, self.jobs, self.origin.resolve,
                                            cfg.prewarm_reload_s, self.metrics.registry)
            self.prewarm_list.load()
        scope = Scope.of(cfg.origin, cfg.allowed_roots)
        self.api = ControlAPI(self.fetcher, self.jobs, self.metrics, facts={},
                              p2p_status=self.sharing.status if self.sharing else None,
                              scope=scope)
        await self._serve_metrics()
        if cfg.mount is not None:
            await self._mount()
        await self._serve_control()
        self.api.facts.update({
            "origin": self.origin.root, "cache_dir": str(cfg.cache_dir), "socket": str(cfg.socket),
            "metrics_address": self.metrics_address, "chunk_size": cfg.chunk_size, "pid": os.getpid(),
            "mount": str(cfg.mount) if cfg.mount is not None else None,
            "agent_id": self.agent_id, "p2p_port": cfg.p2p_port or None,
            "roots": list(scope.roots)})
        self._tasks.append(asyncio.create_task(self._sweep_leases()))
        if self.prewarm_list is not None:
            self._tasks.append(asyncio.create_task(self.prewarm_list.run()))
        self.api.ready = True
        self.metrics.ready.set(1)
        log.info("agent ready", extra=self.api.facts)

    async def _check_origin(self) -> None:
        """A missing bucket or refused credentials stop the start (a setup error). An origin
        that cannot be reached does not, under serve-cached and with a warm cache: the node
        must serve it through an outage, and the origin is picked up again when it answers.
        With nothing cached there is nothing to serve, and a wrong endpoint is more likely
        than an outage: the start fails, as it always did."""
        try:
            await self.origin.check()
        except OriginUnavailable as e:
            if self.config.origin_unreachable == "fail" or not self.store.entries():
                raise
            log.warning("origin unreachable at start; serving the cache until it answers",
                        extra={"error": str(e), "cached_files": len(self.store.entries())})

    async def _serve_metrics(self) -> None:
        assert self.api is not None
        runner = web.AppRunner(self.api.metrics_app(), access_log=None)
        await runner.setup()
        host, port = self.config.metrics_address
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on metrics address {host}:{port}: {e.strerror}") from e
        self._runners.append(runner)
        bound = runner.addresses[0]
        self.metrics_address = f"{bound[0]}:{bound[1]}"

    async def _start_p2p(self) -> ChunkSource:
        """libtorrent on p2p_port + 1, the peer endpoint on p2p_port, then discovery.
        Returns the fetcher's peer source."""
        from ..p2p.discovery import PeerDirectory
        from ..p2p.peer_source import PeerSource
        from ..p2p.session import P2PSettings
        from ..p2p.sharing import Sharing
        from ..p2p.swarm import Swarm
        from ..p2p.tls import PeerTLS, require_secure

        cfg = self.config
        assert self.store is not None and self.origin is not None
        tls = PeerTLS.load(cfg.p2p_tls_dir) if cfg.p2p_tls_dir is not None else None
        if require_secure(cfg.p2p_address, tls, cfg.p2p_insecure):
            self.metrics.p2p_insecure.set(1)
            log.warning("P2P runs WITHOUT TLS on a non-loopback address (p2p_insecure = true): "
                        "anyone who reaches the peer ports can read cached models and offer chunks",
                        extra={"address": cfg.p2p_address, "port": cfg.p2p_port})
        swarm = Swarm(P2PSettings(cfg.p2p_address, cfg.p2p_port + 1, cfg.p2p_upload_limit,
                                  cfg.p2p_chunk_timeout_s, tls=tls is not None),
                      self.agent_id, self.store, self.metrics, asyncio.get_running_loop(), tls=tls)
        try:
            await asyncio.to_thread(swarm.start)
        except ColdbrewError as e:
            raise ConfigError(str(e)) from None

        def peers_changed(peers: dict[str, Any]) -> None:
            swarm.set_endpoints({p.agent_id: p.bt_endpoint for p in peers.values()})
            self.metrics.p2p_peers.set(len(peers))

        directory = PeerDirectory(self.agent_id, cfg.peers, cfg.peers_dns, cfg.p2p_port,
                                  cfg.peers_refresh_s, peers_changed, tls=tls)
        self.sharing = Sharing(swarm, directory, self.store, self.origin, self.metrics,
                               cfg.p2p_manifests)
        await self.sharing.start()
        runner = web.AppRunner(self.sharing.peer_app(self.agent_id), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, cfg.p2p_address, cfg.p2p_port,
                              ssl_context=tls.server_context() if tls else None).start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on P2P port {cfg.p2p_address}:{cfg.p2p_port}: "
                              f"{e.strerror}") from e
        self._runners.append(runner)
        self._tasks.append(asyncio.create_task(directory.run()))
        if tls is not None:
            self._tasks.append(asyncio.create_task(_renew_certificates(tls, swarm)))
        return PeerSource(self.sharing)

    async def _mount(self) -> None:
        """Mount the read-only FUSE view (imported here: the agent runs without FUSE otherwise)."""
        from ...fuse.metrics import FuseMetrics
        from ...fuse.mount import Mount
        from ...fuse.view import View, ViewSettings

        cfg = self.config
        assert self.fetcher is not None and cfg.mount is not None
        fuse_metrics = FuseMetrics(self.metrics.registry)
        view = View(self.fetcher, asyncio.get_running_loop(), ViewSettings(
            read_timeout_s=cfg.fuse_read_timeout_s, prefetch=cfg.fuse_prefetch,
            metadata_ttl_s=cfg.fuse_metadata_ttl_s), fuse_metrics)
        self.mount = Mount(view, cfg.mount, fuse_metrics, allow_other=cfg.fuse_allow_other,
                           readahead_bytes=cfg.fuse_readahead, metadata_ttl_s=cfg.fuse_metadata_ttl_s,
                           passthrough=cfg.fuse_passthrough)
        await asyncio.to_thread(self.mount.start)

    async def _serve_control(self) -> None:
        """The admin socket first (owner only, or admin_group), then the runners' socket."""
        cfg = self.config
        admin_group = cfg.admin_group
        await self._serve_socket(cfg.admin_socket_path, admin=True, group=admin_group,
                                 mode=0o660 if admin_group is not None else 0o600, what="admin_group")
        await self._serve_socket(cfg.socket, admin=False, group=cfg.socket_group,
                                 mode=cfg.socket_mode, what="socket_group")

    async def _serve_socket(self, path: Path, *, admin: bool, group: int | None, mode: int,
                            what: str) -> None:
        assert self.api is not None
        _claim_socket(path)
        runner = web.AppRunner(self.api.control_app(admin=admin), access_log=None)
        await runner.setup()
        await web.UnixSite(runner, str(path)).start()
        self._runners.append(runner)
        if group is not None:
            try:
                os.chown(path, -1, group)
            except OSError as e:
                raise ConfigError(f"{what}: cannot give {path} to group {group}: {e.strerror}") from e
        os.chmod(path, mode)

    async def _sweep_leases(self) -> None:
        while True:
            await asyncio.sleep(_LEASE_SWEEP_S)
            if self.api:
                self.api.leases.expire()

    async def stop(self) -> None:
        log.info("agent stopping")
        if self.api:
            self.api.ready = False
        self.metrics.ready.set(0)
        if self.mount is not None:  # first: no new opens; reads in flight still reach the fetcher
            await asyncio.to_thread(self.mount.stop)
        for task in self._tasks:
            task.cancel()
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self.jobs:
            await self.jobs.close()
        if self.fetcher:
            await self.fetcher.close()
        if self.sharing is not None:
            await self.sharing.close()
            await self.sharing.directory.close()
            await asyncio.to_thread(self.sharing.swarm.close)
        if self.api:
            self.api.leases.release_all()
        if self.origin:
            await self.origin.close()
        if self.store:
            self.store.close()
        self.config.socket.unlink(missing_ok=True)
        self.config.admin_socket_path.unlink(missing_ok=True)
        log.info("agent stopped")


async def run_agent(config: AgentConfig, config_file: Path | None = None) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    agent = Agent(config, config_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except ColdbrewError:
        await agent.stop()
        raise
    # What start-up made (~130k objects: botocore, s3fs, libtorrent) lives as long as the
    # agent: take it out of the cyclic GC, whose full passes over it cost ~7 % of the
    # agent's CPU during a prewarm (perf, bench/RESULTS.md).
    gc.collect()
    gc.freeze()
    await stop.wait()
    await agent.stop()
    return 0
