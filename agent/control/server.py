"""The agent's HTTP surfaces: the control API (unix socket) and /metrics (TCP).

Control API, JSON over HTTP on a unix socket (``coldbrew`` CLI and the loader
use :mod:`coldbrew.agent.control.client`):

    GET  /v1/health                       agent facts (version, origin, metrics address)
    POST /v1/prewarm   {uris}             start a prewarm job → job
    GET  /v1/jobs, /v1/jobs/{id}          job progress
    GET  /v1/status?uri=                  cached bytes per file (+ agent totals)
    GET  /v1/ls?uri=                      one level of the origin, with cached bytes
    POST /v1/evict     {uri}              drop files (or a prefix) from the cache
    POST /v1/ensure    {uri, offset, length, lease?, prefetch?}
                                          make a byte range present; returns the
                                          where the chunks lie on disk (same node) + a lease
    POST /v1/leases/{id}/release          the reader is done: the file may be evicted
    POST /v1/corrupt   {lease, index}     a reader found a chunk failing its digest
    GET  /v1/read?uri=&offset=&length=    the bytes themselves, streamed (any reader)

Every body and reply is a message of :mod:`coldbrew.agent.control.protocol`, built
here as a dataclass and sent with ``to_json()``. Errors are ``{"error": {"kind",
"message"}}`` with a matching HTTP status; the client rebuilds the same exception
class from ``kind``. Leases live in :mod:`coldbrew.agent.control.leases`.

The metrics listener (``--metrics-address``) serves ``/metrics``, ``/healthz``
and ``/readyz`` for Prometheus and the kubelet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from ... import __version__
from ..core.manifest import FileIdentity
from ..errors import (
    AccessDenied,
    BadMessage,
    ColdbrewError,
    FileBusy,
    NotAdmin,
    ObjectChanged,
    ObjectNotFound,
    OriginUnavailable,
    OutsideRoots,
    UsageError,
)
from ..fetch.fetcher import Fetcher, Priority
from ..fetch.jobs import Jobs, PrewarmJob
from ..metrics import SOURCES, AgentMetrics
from . import protocol as p
from .leases import Lease, Leases
from .scope import Scope

log = logging.getLogger("coldbrew.api")

_STATUS_FOR = [
    # A reply the agent built that its own protocol refuses is the agent's bug, not the caller's.
    (BadMessage, 500), (OutsideRoots, 403), (NotAdmin, 403),
    (UsageError, 400), (ValueError, 400), (AccessDenied, 403), (ObjectNotFound, 404),
    (FileBusy, 409), (ObjectChanged, 412), (OriginUnavailable, 502),
]


def _status_for(exc: BaseException) -> int:
    for cls, status in _STATUS_FOR:
        if isinstance(exc, cls):
            return status
    return 500


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=p.Message)


class ControlAPI:
    def __init__(self, fetcher: Fetcher, jobs: Jobs, metrics: AgentMetrics,
                 facts: dict[str, Any],
                 p2p_status: Callable[[], dict[str, Any]] | None = None,
                 scope: Scope | None = None) -> None:
        self.fetcher = fetcher
        # None: every URI of the origin's scheme (tests that build the API by hand)
        self.scope = scope
        self.p2p_status = p2p_status  # the status's "p2p" part; None: P2P is off
        self.jobs = jobs
        self.metrics = metrics
        self.facts = facts
        self.leases = Leases(fetcher)
        self.ready = False

    # --- apps -------------------------------------------------------------------------

    def _resolve(self, uri: str) -> str:
        """A request's URI, full, and within this agent's scope (else :class:`OutsideRoots`)."""
        resolved = self.fetcher.origin.resolve(uri)
        if self.scope is not None:
            try:
                self.scope.check(resolved)
            except OutsideRoots:
                self.metrics.control_refused.labels("outside_roots").inc()
                raise
        return resolved

    async def not_admin(self, request: web.Request) -> web.Response:
        self.metrics.control_refused.labels("not_admin").inc()
        raise NotAdmin(f"{request.path} drops cached files: it is served on the admin socket only "
                       "(coldbrew evict uses it; you need its group, admin_group, or the agent's user)")

    def control_app(self, admin: bool = False) -> web.Application:
        """The control API; destructive routes only with ``admin`` (the admin socket)."""
        app = web.Application(middlewares=[self._errors], client_max_size=1 << 20)
        r = app.router
        r.add_get("/v1/health", self.health)
        r.add_post("/v1/prewarm", self.prewarm)
        r.add_get("/v1/jobs", self.list_jobs)
        r.add_get("/v1/jobs/{id}", self.get_job)
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/ls", self.ls)
        r.add_post("/v1/evict", self.evict if admin else self.not_admin)
        r.add_post("/v1/ensure", self.ensure)
        r.add_post("/v1/leases/{id}/release", self.release)
        r.add_post("/v1/corrupt", self.corrupt)
        r.add_post("/v1/verify", self.verify)
        r.add_get("/v1/read", self.read)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics_endpoint)
        return app

    def metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.metrics.inflight_requests.inc()
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except ColdbrewError as e:
            return _error(e, _status_for(e))
        except (ValueError, KeyError, TypeError) as e:
            return _error(UsageError(f"bad request to {request.path}: {e}"), 400)
        except Exception as e:
            log.exception("control API handler crashed", extra={"path": request.path})
            return _error(ColdbrewError(f"internal error in agent: {type(e).__name__}: {e}"), 500)
        finally:
            self.metrics.inflight_requests.dec()

    # --- health and metrics -------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready:
            if not self.fetcher.origin.health.reachable:  # ready: the cache still serves
                return web.Response(text="ready (origin unreachable, serving cache)\n")
            return web.Response(text="ready\n")
        return web.Response(status=503, text="starting\n")

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            content_type="text/plain", charset="utf-8")

    async def health(self, request: web.Request) -> web.Response:
        return _reply(health_reply(self.facts, self.ready))

    # --- prewarm --------------------------------------------------------------------------

    async def prewarm(self, request: web.Request) -> web.Response:
        try:
            uris = (await _body(request, p.PrewarmRequest)).uris
        except UsageError:
            uris = ()
        if not uris:
            raise UsageError("prewarm needs {\"uris\": [\"s3://bucket/key\", ...]}")
        resolved = [self._resolve(u) for u in uris]
        job = self.jobs.start(resolved)
        return _reply(job_reply(job), status=202)

    async def list_jobs(self, request: web.Request) -> web.Response:
        return _reply(p.JobList(tuple(job_reply(j) for j in self.jobs.all())))

    async def get_job(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            raise ObjectNotFound(f"no prewarm job {request.match_info['id']!r} (finished jobs "
                                 "are kept for a while, then forgotten)")
        wait_s = min(float(request.query.get("wait_s", 0)), 30.0)
        if wait_s > 0 and job.finished is None:
            # Long poll: answer at once when the job ends, else after wait_s with progress.
            try:
                await asyncio.wait_for(self.jobs.wait(job), wait_s)
            except TimeoutError:
                pass
        return _reply(job_reply(job))

    # --- status, ls, evict --------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        uri = request.query.get("uri")
        store = self.fetcher.store
        if uri:
            infos = await self.fetcher.versions.expand(self._resolve(uri))
            found = [(info, store.find(info.identity.key())) for info in infos]
            files = [file_status(info.uri, info.etag, info.size, e,
                                 e is not None and self.fetcher.unchecked(e)) for info, e in found]
        else:
            files = [file_status(e.identity.uri, e.identity.etag, e.identity.size, e,
                                 self.fetcher.unchecked(e))
                     for e in sorted(store.entries(), key=lambda e: e.identity.uri)]
        return _reply(p.StatusReply(tuple(files), self._agent_totals()))

    def _agent_totals(self) -> p.AgentTotals:
        m, store = self.metrics, self.fetcher.store
        return p.AgentTotals(
            origin=self.fetcher.origin.root,
            cache_dir=str(store.root.parent),
            cache_bytes=store.used_bytes,
            cache_capacity_bytes=store.capacity(),
            served_bytes={s: int(m.value("coldbrew_bytes_served_total", source=s))
                          for s in SOURCES},
            origin_bytes=int(m.value("coldbrew_origin_bytes_total")),
            corrupt_chunks=int(sum(m.value("coldbrew_corrupt_chunks_total", source=s)
                                   for s in SOURCES)),
            jobs_running=sum(1 for j in self.jobs.all() if j.finished is None),
            p2p=self.p2p_status() if self.p2p_status else None,
            origin_reachable=self.fetcher.origin.health.reachable,
            origin_error=self.fetcher.origin.health.error or None,
            origin_concurrency=self.fetcher.origin.flow.allowed,
            origin_concurrency_auto=self.fetcher.origin.flow.limit.adaptive,
            origin_throughput=round(self.fetcher.origin.flow.limit.throughput, 1),
        )

    async def ls(self, request: web.Request) -> web.Response:
        uri = self._resolve(request.query.get("uri", ""))
        listing = await self.fetcher.versions.list_dir(uri)
        store = self.fetcher.store
        entries = []
        for item in listing:
            cached = None
            if item["type"] == "file":
                entry = store.find(FileIdentity(item["uri"], item["etag"], item["size"]).key())
                cached = entry.cached_bytes if entry else 0
            entries.append(p.LsEntry(uri=item["uri"], name=item["name"], type=item["type"],
                                     size=item["size"], etag=item.get("etag"),
                                     mtime=item.get("mtime"), cached_bytes=cached))
        return _reply(p.LsReply(uri, tuple(entries)))

    async def evict(self, request: web.Request) -> web.Response:
        body = await _body(request, p.EvictRequest)
        uri = self._resolve(body.uri)
        store = self.fetcher.store
        prefix = uri.rstrip("/") + "/"
        evicted, freed, busy = [], 0, []
        for entry in store.entries():
            if entry.identity.uri == uri or entry.identity.uri.startswith(prefix):
                try:
                    freed += store.evict(entry)
                    evicted.append(entry.identity.uri)
                except FileBusy:
                    busy.append(entry.identity.uri)
        return _reply(p.EvictReply(tuple(evicted), freed, tuple(busy)))

    # --- reading ------------------------------------------------------------------------------

    async def ensure(self, request: web.Request) -> web.Response:
        body = await _body(request, p.EnsureRequest)
        if body.lease:
            lease = self.leases.get(body.lease)
        elif body.uri is None:
            raise UsageError("ensure needs a uri, or the lease of an earlier ensure")
        else:
            f = await self.fetcher.open(self._resolve(body.uri))
            lease = self.leases.create(f)
        f = lease.file
        size = f.info.size
        offset = body.offset
        length = size - offset if body.length is None else body.length
        if offset < 0 or length < 0 or offset + length > size:
            raise UsageError(f"range {offset}+{length} is outside {f.info.uri} ({size} bytes)")
        indexes = list(f.entry.layout.chunks_for(offset, length))
        if body.prefetch:
            self.fetcher.prefetch(f, indexes[-1] + 1 if indexes else 0, keep=lease.keep_uncached)
        try:
            results = await asyncio.gather(*(self._ensure_chunk(lease, i) for i in indexes))
        except BaseException:
            if not body.lease:
                self.leases.release(lease.id)
            raise
        chunks = []
        for index, uncached in zip(indexes, results):
            if uncached is not None:
                lease.keep_uncached(index, uncached)
            start, end = f.entry.layout.bounds(index)
            self.metrics.bytes_served.labels(self.fetcher.served_from(f, index)).inc(end - start)
            chunks.append(p.Chunk(index=index, offset=start, length=end - start,
                                  cached=uncached is None,
                                  path=str(f.entry.data_path) if uncached is None else None,
                                  digest=f.entry.digests.get(index)))
        self.leases.expire()
        return _reply(p.EnsureReply(uri=f.info.uri, etag=f.info.etag, size=size,
                                    chunk_size=f.entry.chunk_size, lease=lease.id,
                                    cached_bytes=f.entry.cached_bytes, chunks=tuple(chunks)))

    async def _ensure_chunk(self, lease: Lease, index: int) -> bytes | None:
        """Chunk ``index`` present (None), or its bytes: kept by the lease (its read-ahead
        fetched them but the cache could not keep them), or fetched now and not cached."""
        kept = lease.uncached.get(index)
        return kept if kept is not None else await self.fetcher.ensure(lease.file, index, Priority.READ)

    async def release(self, request: web.Request) -> web.Response:
        self.leases.release(request.match_info["id"])
        return _reply(p.ReleaseReply(released=True))

    async def corrupt(self, request: web.Request) -> web.Response:
        body = await _body(request, p.CorruptRequest)
        lease = self.leases.get(body.lease)
        f = lease.file
        # Trust, but check: only drop the chunk if the agent sees the corruption too.
        intact = await self.fetcher.verify(f, body.index)
        if not intact:
            await self.fetcher.ensure(f, body.index, Priority.READ)
        return _reply(p.CorruptReply(index=body.index, was_corrupt=not intact))

    async def verify(self, request: web.Request) -> web.Response:
        body = await _body(request, p.VerifyRequest)
        lease = self.leases.get(body.lease)
        trust = await self.fetcher.trust(lease.file, since=lease.rejections)
        return _reply(p.VerifyReply(uri=lease.file.info.uri, trust=trust))

    async def read(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        lease: Lease | None = None
        if q.get("lease"):
            lease = self.leases.get(q["lease"])
            f = lease.file
        else:
            f = await self.fetcher.open(self._resolve(q["uri"]))
        offset = int(q.get("offset", 0))
        length = int(q["length"]) if "length" in q else f.info.size - offset
        if offset < 0 or length < 0 or offset + length > f.info.size:
            raise UsageError(f"range {offset}+{length} is outside {f.info.uri} ({f.info.size} bytes)")
        layout = f.entry.layout
        indexes = layout.chunks_for(offset, length)
        self.fetcher.store.pin(f.entry)
        try:
            if len(indexes) > 1:
                self.fetcher.prefetch(f, indexes[0])

            async def chunk_bytes(index: int) -> bytes:
                kept = lease.uncached.pop(index, None) if lease is not None else None
                return kept if kept is not None else await self.fetcher.chunk_bytes(f, index)

            # Fetch the first chunk before answering, so a 404 or 403 is a clean error.
            first = await chunk_bytes(indexes[0]) if indexes else b""
            response = web.StreamResponse(headers={
                "Content-Length": str(length), "Content-Type": "application/octet-stream",
                "X-Coldbrew-ETag": f.info.etag, "X-Coldbrew-Size": str(f.info.size)})
            await response.prepare(request)
            try:
                for n, index in enumerate(indexes):
                    chunk = first if n == 0 else await chunk_bytes(index)
                    start, _ = layout.bounds(index)
                    lo = max(offset - start, 0)
                    hi = min(offset + length - start, len(chunk))
                    await response.write(memoryview(chunk)[lo:hi])
            except ColdbrewError as e:
                # The status line is gone already: cut the stream short. The client sees
                # fewer bytes than Content-Length and asks again from where it stopped,
                # which turns this error into a proper one (or succeeds after a blip).
                log.info("read aborted mid-stream", extra={"uri": f.info.uri, "error": str(e)})
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response
        finally:
            self.fetcher.store.unpin(f.entry)


# --- replies, built from the agent's own objects --------------------------------------------


def health_reply(facts: dict[str, Any], ready: bool) -> p.Health:
    """The agent's facts (set by the daemon once it serves) read through the protocol, so a
    fact of the wrong type fails here, in the agent, not in every client."""
    return p.Health.from_json({**facts, "version": __version__, "ready": ready})


def job_reply(job: PrewarmJob) -> p.Job:
    """A job's progress. The fetch layer summarises its own jobs (it may not import the
    protocol); reading that summary through the protocol checks the two agree."""
    return p.Job.from_json(job.to_json())


def file_status(uri: str, etag: str, size: int, entry: Any, unchecked: bool = False
                ) -> p.FileStatus:
    """One file version and the cache ``entry`` holding it (None: not cached); ``unchecked``:
    its bytes still owe a check (a peer's manifest on probation), so it is not complete yet."""
    cached = entry.cached_bytes if entry else 0
    return p.FileStatus(uri=uri, etag=etag, size=size, cached_bytes=cached,
                        chunks=entry.layout.count if entry else None,
                        chunks_cached=len(entry.present) if entry else 0,
                        complete=cached == size and not unchecked)


async def _body(request: web.Request, message: type[M]) -> M:
    """The request's JSON body as ``message``; a malformed one is the caller's usage error."""
    try:
        return message.from_json(await request.json())
    except BadMessage as e:
        raise UsageError(f"bad request to {request.path}: {e}") from None


def _reply(message: p.Message, status: int = 200) -> web.Response:
    return web.json_response(message.to_json(), status=status)


def _error(exc: ColdbrewError, status: int) -> web.Response:
    return _reply(p.ErrorReply.of(exc), status=status)
