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

Errors are ``{"error": {"kind", "message"}}`` with a matching HTTP status; the
client rebuilds the same exception class from ``kind``.

The metrics listener (``--metrics-address``) serves ``/metrics``, ``/healthz``
and ``/readyz`` for Prometheus and the kubelet.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from ... import __version__
from ..errors import (
    AccessDenied,
    ColdbrewError,
    FileBusy,
    ObjectChanged,
    ObjectNotFound,
    OriginUnavailable,
    UsageError,
)
from ..fetch.fetcher import Fetcher, OpenFile, Priority
from ..fetch.jobs import Jobs
from ..metrics import SOURCES, AgentMetrics

log = logging.getLogger("coldbrew.api")

LEASE_TTL_S = 120.0

_STATUS_FOR = [
    (UsageError, 400), (ValueError, 400), (AccessDenied, 403), (ObjectNotFound, 404),
    (FileBusy, 409), (ObjectChanged, 412), (OriginUnavailable, 502),
]


def _status_for(exc: BaseException) -> int:
    for cls, status in _STATUS_FOR:
        if isinstance(exc, cls):
            return status
    return 500


@dataclass
class Lease:
    id: str
    file: OpenFile
    expires: float
    #: Chunks an ensure fetched but the cache could not store (disk full or failing), kept
    #: for this lease's next read of them, which would otherwise fetch them again.
    uncached: OrderedDict[int, bytes] = field(default_factory=OrderedDict)

    def keep_uncached(self, index: int, data: bytes) -> None:
        self.uncached[index] = data
        self.uncached.move_to_end(index)
        while len(self.uncached) > _UNCACHED_PER_LEASE:
            self.uncached.popitem(last=False)


#: Uncached chunks a lease keeps: an ensure window of `coldbrew get` (64 MiB) at 16 MiB chunks.
_UNCACHED_PER_LEASE = 4


class Leases:
    """Readers' claims on files: a leased file is pinned (never evicted) until released or expired."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self._leases: dict[str, Lease] = {}

    def create(self, f: OpenFile) -> Lease:
        lease = Lease(secrets.token_hex(8), f, time.monotonic() + LEASE_TTL_S)
        self.fetcher.store.pin(f.entry)
        self._leases[lease.id] = lease
        return lease

    def get(self, lease_id: str) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise UsageError(f"lease {lease_id} is unknown or expired; ensure the file again")
        lease.expires = time.monotonic() + LEASE_TTL_S
        return lease

    def release(self, lease_id: str) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            self.fetcher.store.unpin(lease.file.entry)

    def expire(self) -> None:
        now = time.monotonic()
        for lease in [x for x in self._leases.values() if x.expires < now]:
            self.release(lease.id)

    def release_all(self) -> None:
        for lease_id in list(self._leases):
            self.release(lease_id)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlAPI:
    def __init__(self, fetcher: Fetcher, jobs: Jobs, metrics: AgentMetrics,
                 facts: dict[str, Any]) -> None:
        self.fetcher = fetcher
        self.jobs = jobs
        self.metrics = metrics
        self.facts = facts
        self.leases = Leases(fetcher)
        self.ready = False

    # --- apps -------------------------------------------------------------------------

    def control_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=1 << 20)
        r = app.router
        r.add_get("/v1/health", self.health)
        r.add_post("/v1/prewarm", self.prewarm)
        r.add_get("/v1/jobs", self.list_jobs)
        r.add_get("/v1/jobs/{id}", self.get_job)
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/ls", self.ls)
        r.add_post("/v1/evict", self.evict)
        r.add_post("/v1/ensure", self.ensure)
        r.add_post("/v1/leases/{id}/release", self.release)
        r.add_post("/v1/corrupt", self.corrupt)
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
        except Exception as e:  # noqa: BLE001 - one bad request must not take the agent down
            log.exception("control API handler crashed", extra={"path": request.path})
            return _error(ColdbrewError(f"internal error in agent: {type(e).__name__}: {e}"), 500)
        finally:
            self.metrics.inflight_requests.dec()

    # --- health and metrics -------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="starting\n")

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            content_type="text/plain", charset="utf-8")

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({**self.facts, "version": __version__, "ready": self.ready})

    # --- prewarm --------------------------------------------------------------------------

    async def prewarm(self, request: web.Request) -> web.Response:
        body = await request.json()
        uris = body.get("uris")
        if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
            raise UsageError("prewarm needs {\"uris\": [\"s3://bucket/key\", ...]}")
        resolved = [self.fetcher.origin.resolve(u) for u in uris]
        job = self.jobs.start(resolved)
        return web.json_response(job.to_json(), status=202)

    async def list_jobs(self, request: web.Request) -> web.Response:
        return web.json_response({"jobs": [j.to_json() for j in self.jobs.all()]})

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
            except asyncio.TimeoutError:
                pass
        return web.json_response(job.to_json())

    # --- status, ls, evict --------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        uri = request.query.get("uri")
        store = self.fetcher.store
        if uri:
            infos = await self.fetcher.origin.expand(self.fetcher.origin.resolve(uri))
            files = []
            for info in infos:
                entry = store.find(info.identity.key())
                files.append(_file_json(info.uri, info.etag, info.size, entry))
        else:
            files = [_file_json(e.identity.uri, e.identity.etag, e.identity.size, e)
                     for e in sorted(store.entries(), key=lambda e: e.identity.uri)]
        return web.json_response({"files": files, "agent": self._agent_totals()})

    def _agent_totals(self) -> dict[str, Any]:
        m, store = self.metrics, self.fetcher.store
        return {
            "origin": self.fetcher.origin.root,
            "cache_dir": str(store.root.parent),
            "cache_bytes": store.used_bytes,
            "cache_capacity_bytes": store.capacity(),
            "served_bytes": {s: int(m.value("coldbrew_bytes_served_total", source=s))
                             for s in SOURCES},
            "origin_bytes": int(m.value("coldbrew_origin_bytes_total")),
            "corrupt_chunks": int(sum(m.value("coldbrew_corrupt_chunks_total", source=s)
                                      for s in SOURCES)),
            "jobs_running": sum(1 for j in self.jobs.all() if j.finished is None),
            "p2p": self.fetcher.sharing.status() if self.fetcher.sharing else None,
        }

    async def ls(self, request: web.Request) -> web.Response:
        origin = self.fetcher.origin
        uri = origin.resolve(request.query.get("uri", ""))
        listing = await origin.list_dir(uri)
        store = self.fetcher.store
        for item in listing:
            if item["type"] == "file":
                entry = store.find(_key(item))
                item["cached_bytes"] = entry.cached_bytes if entry else 0
        return web.json_response({"uri": uri, "entries": listing})

    async def evict(self, request: web.Request) -> web.Response:
        body = await request.json()
        uri = self.fetcher.origin.resolve(str(body["uri"]))
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
        return web.json_response({"evicted": evicted, "bytes": freed, "busy": busy})

    # --- reading ------------------------------------------------------------------------------

    async def ensure(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("lease"):
            lease = self.leases.get(str(body["lease"]))
        else:
            f = await self.fetcher.open(self.fetcher.origin.resolve(str(body["uri"])))
            lease = self.leases.create(f)
        f = lease.file
        size = f.info.size
        offset = int(body.get("offset", 0))
        length = body.get("length")
        length = size - offset if length is None else int(length)
        if offset < 0 or length < 0 or offset + length > size:
            raise UsageError(f"range {offset}+{length} is outside {f.info.uri} ({size} bytes)")
        indexes = list(f.entry.layout.chunks_for(offset, length))
        if body.get("prefetch"):
            self.fetcher.prefetch(f, indexes[-1] + 1 if indexes else 0)
        present = {i for i in indexes if self.fetcher.store.has(f.entry, i)}
        try:
            results = await asyncio.gather(*(self.fetcher.ensure(f, i, Priority.READ)
                                             for i in indexes))
        except BaseException:
            if not body.get("lease"):
                self.leases.release(lease.id)
            raise
        chunks = []
        for index, uncached in zip(indexes, results):
            if uncached is not None:
                lease.keep_uncached(index, uncached)
            start, end = f.entry.layout.bounds(index)
            self.metrics.bytes_served.labels("cache" if index in present else "origin").inc(
                end - start)
            chunks.append({"index": index, "offset": start, "length": end - start,
                           "cached": uncached is None,
                           "path": str(f.entry.data_path) if uncached is None else None,
                           "digest": f.entry.digests.get(index)})
        self.leases.expire()
        return web.json_response({"uri": f.info.uri, "etag": f.info.etag, "size": size,
                                  "chunk_size": f.entry.chunk_size, "lease": lease.id,
                                  "cached_bytes": f.entry.cached_bytes,
                                  "chunks": chunks})

    async def release(self, request: web.Request) -> web.Response:
        self.leases.release(request.match_info["id"])
        return web.json_response({"released": True})

    async def corrupt(self, request: web.Request) -> web.Response:
        body = await request.json()
        lease = self.leases.get(str(body["lease"]))
        index = int(body["index"])
        f = lease.file
        # Trust, but check: only drop the chunk if the agent sees the corruption too.
        intact = await self.fetcher.verify(f, index)
        if not intact:
            await self.fetcher.ensure(f, index, Priority.READ)
        return web.json_response({"index": index, "was_corrupt": not intact})

    async def read(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        lease: Lease | None = None
        if q.get("lease"):
            lease = self.leases.get(q["lease"])
            f = lease.file
        else:
            f = await self.fetcher.open(self.fetcher.origin.resolve(q["uri"]))
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


def _key(item: dict[str, Any]) -> str:
    from ..core.manifest import FileIdentity

    return FileIdentity(item["uri"], item["etag"], item["size"]).key()


def _file_json(uri: str, etag: str, size: int, entry: Any) -> dict[str, Any]:
    cached = entry.cached_bytes if entry else 0
    count = entry.layout.count if entry else None
    return {"uri": uri, "etag": etag, "size": size, "cached_bytes": cached,
            "chunks": count, "chunks_cached": len(entry.present) if entry else 0,
            "complete": cached == size}


def _error(exc: ColdbrewError, status: int) -> web.Response:
    return web.json_response({"error": {"kind": exc.kind, "message": str(exc)}}, status=status)
