"""Prewarm jobs: pull files or whole prefixes into the node cache, with progress.

A job expands its URIs at the origin, then makes every chunk of every file
present *and verified*: chunks already cached are re-checked against their
digest (mmap, no copy) and refetched if bad, missing ones are fetched at
prewarm priority so readers always go first. A job is ``done`` only when every
byte is cached and verified; anything less is ``failed`` with one error line
per problem (missing key, access denied, cache full...).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ColdbrewError
from ..metrics import AgentMetrics
from .fetcher import Fetcher, OpenFile, Priority

log = logging.getLogger("coldbrew.jobs")

_KEEP_FINISHED = 100


@dataclass
class FileProgress:
    uri: str
    size: int
    done_bytes: int = 0
    uncached_chunks: int = 0


@dataclass
class PrewarmJob:
    id: str
    uris: list[str]
    state: str = "expanding"  # expanding → running → done | failed
    files: list[FileProgress] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def bytes_done(self) -> int:
        return sum(f.done_bytes for f in self.files)

    def to_json(self) -> dict[str, Any]:
        elapsed = (self.finished or time.time()) - self.created
        return {
            "id": self.id,
            "uris": self.uris,
            "state": self.state,
            "files": len(self.files),
            "files_done": sum(1 for f in self.files if f.done_bytes == f.size and not f.uncached_chunks),
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "elapsed_s": round(elapsed, 3),
            "errors": self.errors,
        }


class Jobs:
    def __init__(self, fetcher: Fetcher, metrics: AgentMetrics) -> None:
        self.fetcher = fetcher
        self.metrics = metrics
        self._jobs: dict[str, PrewarmJob] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ids = itertools.count(1)

    def start(self, uris: list[str]) -> PrewarmJob:
        job = PrewarmJob(id=f"pw-{next(self._ids)}", uris=list(uris))
        self._jobs[job.id] = job
        self._tasks[job.id] = asyncio.create_task(self._run(job))
        self._trim()
        return job

    def get(self, job_id: str) -> PrewarmJob | None:
        return self._jobs.get(job_id)

    def all(self) -> list[PrewarmJob]:
        return list(self._jobs.values())

    async def wait(self, job: PrewarmJob) -> None:
        task = self._tasks.get(job.id)
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished is not None]
        for job in finished[: max(0, len(finished) - _KEEP_FINISHED)]:
            self._jobs.pop(job.id, None)
            self._tasks.pop(job.id, None)

    async def _run(self, job: PrewarmJob) -> None:
        opened: list[OpenFile] = []
        try:
            opened = await self._expand(job)
            job.state = "running"
            self._publish()
            await self._fill(job, opened)
        except Exception as e:  # recorded on the job, which is what callers read
            job.errors.append(str(e) if isinstance(e, ColdbrewError) else f"{type(e).__name__}: {e}")
            log.exception("prewarm job crashed", extra={"job": job.id})
        finally:
            for f in opened:
                self.fetcher.store.unpin(f.entry)
            job.state = "failed" if job.errors else "done"
            job.finished = time.time()
            self._publish()
            log.info("prewarm finished", extra={
                "job": job.id, "state": job.state, "files": len(job.files),
                "bytes": job.bytes_done, "seconds": round(job.finished - job.created, 3),
                "errors": job.errors})

    async def _expand(self, job: PrewarmJob) -> list[OpenFile]:
        opened: list[OpenFile] = []
        seen: set[str] = set()
        for uri in job.uris:
            try:
                infos = await self.fetcher.versions.expand(uri)
            except ColdbrewError as e:
                job.errors.append(str(e))
                continue
            for info in infos:
                if info.uri in seen:
                    continue
                seen.add(info.uri)
                f = self.fetcher.open_info(info)
                self.fetcher.store.pin(f.entry)  # a file being prewarmed is never evicted
                opened.append(f)
                job.files.append(FileProgress(info.uri, info.size))
        return opened

    async def _fill(self, job: PrewarmJob, opened: list[OpenFile]) -> None:
        work = iter([(n, i) for n, f in enumerate(opened) for i in range(f.entry.layout.count)])
        failed: set[int] = set()

        async def worker() -> None:
            for n, index in work:
                if n in failed:
                    continue
                f, progress = opened[n], job.files[n]
                try:
                    cached = await self._one_chunk(f, index)
                except ColdbrewError as e:
                    failed.add(n)
                    job.errors.append(str(e))
                    continue
                progress.done_bytes += f.entry.layout.length(index)
                if not cached:
                    progress.uncached_chunks += 1
                self._publish()

        # Enough workers to keep every origin slot busy and a few chunk checks going.
        workers = [asyncio.create_task(worker()) for _ in range(self.fetcher.concurrency + 2)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        for progress in job.files:
            if progress.uncached_chunks:
                job.errors.append(
                    f"{progress.uri}: {progress.uncached_chunks} chunk(s) could not be cached "
                    "(cache full or disk failing; see coldbrew_cache_write_errors_total)")

    async def _one_chunk(self, f: OpenFile, index: int) -> bool:
        """Make one chunk present and verified. Returns False if it could not be cached."""
        if self.fetcher.store.has(f.entry, index) and await self.fetcher.verify(f, index):
            self.metrics.cache_hits.inc()
            return True
        return await self.fetcher.ensure(f, index, Priority.PREWARM) is None

    def _publish(self) -> None:
        running = [j for j in self._jobs.values() if j.finished is None]
        self.metrics.prewarm_bytes_total.set(sum(j.bytes_total for j in running))
        self.metrics.prewarm_bytes_done.set(sum(j.bytes_done for j in running))
