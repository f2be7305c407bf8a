"""The loader's public API: ``load_file``, ``load_dir``, ``iter_tensors``.

Each call picks where bytes come from, once:

* a local path (or ``file://``; a path under the agent's FUSE mount is one):
  read in place;
* a remote URI (``s3://``, any fsspec URL) with the node agent reachable on its
  socket: through the agent's verified chunk cache;
* a remote URI without an agent: from the write-through cache in ``cache_dir``
  when it holds this exact version (URI, ETag, size), else from the origin with
  parallel ranged GETs, writing the same bytes to ``cache_dir`` behind the load.

This module is the orchestration: the files a location names are found by
:mod:`~coldbrew.loader.locate`, each file's source chosen by
:mod:`~coldbrew.loader.selection`, warm starts recalled and checked by
:mod:`~coldbrew.loader.recall`; the engine reads each file into the sink.

Results equal ``safetensors.torch.load_file`` for the same file: names, dtypes,
shapes, bytes; ``StateDict.metadata`` is the header's ``__metadata__``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from coldbrew.agent.config import OriginSettings
from coldbrew.agent.core.manifest import FileIdentity
from coldbrew.agent.errors import ColdbrewError, HeaderError, OriginUnavailable, UsageError
from coldbrew.loader.device import DEFAULT_BUFFER_BYTES, CpuSink, CudaSink, Slot
from coldbrew.loader.engine import Budget, FileLoad, Pipeline, Progress, first_error, planned_bytes
from coldbrew.loader.locate import Locator, Target, is_remote
from coldbrew.loader.origins import SharedOrigins
from coldbrew.loader.plan import NameFilter
from coldbrew.loader.recall import Recall, commit
from coldbrew.loader.runtime import runtime
from coldbrew.loader.selection import SourceOpener, find_agent
from coldbrew.loader.sources import DEFAULT_SPAN_BYTES, CacheFileSource, OriginSource, Source
from coldbrew.loader.writeback import WriteThroughCache, default_cache_dir

if TYPE_CHECKING:
    from coldbrew.agent.control.client import AgentClient
    from coldbrew.loader.writeback import CacheEntry

log = logging.getLogger("coldbrew.loader")

#: Reads in flight through the agent or from local files when ``concurrency`` is not given.
DEFAULT_READS = 8
#: Streaming mode (iter_tensors): bytes of finished tensors that may wait for the caller.
DEFAULT_STREAM_BUDGET_BYTES = 1 << 30


class StateDict(dict):
    """``{name: tensor}`` plus what the files said about themselves.

    ``metadata``: the header's ``__metadata__`` (for a directory, the shards'
    merged); ``files``: what was read; ``stats``: bytes by source, seconds.
    """

    metadata: dict[str, str] | None
    files: list[str]
    stats: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.metadata = None
        self.files = []
        self.stats = {}


@dataclass(frozen=True)
class Options:
    device: torch.device
    dtype: torch.dtype | None = None
    names: NameFilter = None
    concurrency: int | None = None
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    cache_dir: Path | None = None
    socket: str | None = None
    agent: bool | None = None
    endpoint_url: str | None = None
    progress: Callable[[int, int], Any] | None = None
    tqdm: bool = False
    stream_budget_bytes: int | None = None


def _options(device: Any, **kw: Any) -> Options:
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r}: the loader loads to cpu or cuda[:N]")
    cache_dir = kw.pop("cache_dir")
    if cache_dir is None:
        cache_dir = default_cache_dir()
    elif cache_dir is False:
        cache_dir = None
    if kw["concurrency"] is not None and kw["concurrency"] < 1:
        raise UsageError(f"concurrency must be at least 1 (or None: adapt), got {kw['concurrency']}")
    return Options(device=dev, cache_dir=Path(cache_dir) if cache_dir else None, **kw)


# --- public API --------------------------------------------------------------------------


def load_file(path_or_uri: str | os.PathLike[str], device: Any = "cpu", *,
              dtype: torch.dtype | None = None, names: NameFilter = None, concurrency: int | None = None,
              buffer_bytes: int = DEFAULT_BUFFER_BYTES, cache_dir: Path | str | bool | None = None,
              socket: str | os.PathLike[str] | None = None, agent: bool | None = None,
              endpoint_url: str | None = None, progress: Callable[[int, int], Any] | None = None,
              tqdm: bool = False) -> StateDict:
    """Load one safetensors file: what ``safetensors.torch.load_file`` returns, faster.

    ``path_or_uri``: a local path, ``file://``, ``s3://bucket/key`` or any fsspec
    URL. ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``. ``dtype``: cast
    floating-point tensors (f16/bf16/f32/f64) to this dtype. ``names``: only
    these tensors (a collection of names, or a predicate on the name).
    ``concurrency``: reads in flight (None, the default: from the origin, as many as add
    throughput, adapted while loading; through the agent or from disk, 8). ``buffer_bytes``: pinned host memory for a
    CUDA load. ``cache_dir``: write-through cache when no agent is used (default
    ``$COLDBREW_LOADER_CACHE`` or ``~/.cache/coldbrew/loader``; False: none).
    ``socket``: the agent's socket (default ``$COLDBREW_SOCKET``); ``agent``:
    None uses it when it answers, True requires it, False never uses it.
    ``endpoint_url``: S3 endpoint (default ``$AWS_ENDPOINT_URL``).
    ``progress(done_bytes, total_bytes)`` is called from the loader's thread;
    ``tqdm=True`` shows a bar.
    """
    opts = _options(device, dtype=dtype, names=names, concurrency=concurrency,
                    buffer_bytes=buffer_bytes, cache_dir=cache_dir,
                    socket=str(socket) if socket else None, agent=agent, endpoint_url=endpoint_url,
                    progress=progress, tqdm=tqdm)
    return _collect(Target(str(os.fspath(path_or_uri)), is_dir=False), opts)


def load_dir(path_or_uri: str | os.PathLike[str], device: Any = "cpu", *,
             dtype: torch.dtype | None = None, names: NameFilter = None, concurrency: int | None = None,
             buffer_bytes: int = DEFAULT_BUFFER_BYTES, cache_dir: Path | str | bool | None = None,
             socket: str | os.PathLike[str] | None = None, agent: bool | None = None,
             endpoint_url: str | None = None, progress: Callable[[int, int], Any] | None = None,
             tqdm: bool = False) -> StateDict:
    """Load every tensor of a (sharded) model directory into one dict.

    The shards are those named by ``model.safetensors.index.json`` when the
    directory has one, else every ``*.safetensors`` file directly in it. With
    ``names``, only shards holding wanted tensors are read. Options as in
    :func:`load_file`.
    """
    opts = _options(device, dtype=dtype, names=names, concurrency=concurrency,
                    buffer_bytes=buffer_bytes, cache_dir=cache_dir,
                    socket=str(socket) if socket else None, agent=agent, endpoint_url=endpoint_url,
                    progress=progress, tqdm=tqdm)
    return _collect(Target(str(os.fspath(path_or_uri)), is_dir=True), opts)


def iter_tensors(path_or_uri: str | os.PathLike[str], device: Any = "cpu", *,
                 dtype: torch.dtype | None = None, names: NameFilter = None, concurrency: int | None = None,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, cache_dir: Path | str | bool | None = None,
                 socket: str | os.PathLike[str] | None = None, agent: bool | None = None,
                 endpoint_url: str | None = None, progress: Callable[[int, int], Any] | None = None,
                 tqdm: bool = False, budget_bytes: int = DEFAULT_STREAM_BUDGET_BYTES,
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in file order as each tensor is complete (vLLM-style).

    A file or a directory (a path ending in ``/``, or a local directory, or a
    remote prefix with no object of that name). Memory is bounded: tensors
    finished but not yet taken by the caller hold back new reads beyond
    ``budget_bytes``. Other options as in :func:`load_file`.
    """
    opts = _options(device, dtype=dtype, names=names, concurrency=concurrency,
                    buffer_bytes=buffer_bytes, cache_dir=cache_dir,
                    socket=str(socket) if socket else None, agent=agent, endpoint_url=endpoint_url,
                    progress=progress, tqdm=tqdm, stream_budget_bytes=budget_bytes)
    target = str(os.fspath(path_or_uri))
    return _stream(Target(target, is_dir=None), opts)


# --- sync bridge ---------------------------------------------------------------------------


def _collect(target: Target, opts: Options) -> StateDict:
    out = StateDict()
    rt = runtime()
    sink_box: list[Any] = []

    def emit(name: str, slot: Slot) -> None:
        if name in out:
            raise HeaderError(f"tensor {name!r} appears in more than one file of {target.location}")
        out[name] = slot.result

    load = _Load(target, opts, emit, out)
    rt.run(load.run(sink_box))
    return out


def _stream(target: Target, opts: Options) -> Iterator[tuple[str, torch.Tensor]]:
    rt = runtime()
    items: queue.Queue[Any] = queue.Queue()
    done = object()
    seen: set[str] = set()
    sink_box: list[Any] = []
    budget_box: list[Budget] = []

    def emit(name: str, slot: Slot) -> None:
        items.put((name, slot))

    load = _Load(target, opts, emit, StateDict(), budget_box=budget_box)

    async def produce() -> None:
        try:
            await load.run(sink_box)
            items.put(done)
        except BaseException as e:
            items.put(e)
            raise

    future = rt.submit(produce())
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            name, slot = item
            if name in seen:
                raise HeaderError(f"tensor {name!r} appears in more than one file of {target.location}")
            seen.add(name)
            tensor = sink_box[0].hand_over(slot)
            slot.result = None
            rt.call(budget_box[0].give, slot.nbytes)
            yield name, tensor
    finally:
        if not future.done():
            future.cancel()
            try:
                future.result(timeout=30)
            except BaseException:
                pass


# --- one load call ----------------------------------------------------------------------


class _Load:
    """Everything one public call does, on the loader's loop."""

    def __init__(self, target: Target, opts: Options, emit: Callable[[str, Slot], None],
                 out: StateDict, budget_box: list[Budget] | None = None) -> None:
        self.target = target
        self.opts = opts
        self.emit = emit
        self.out = out
        self.budget_box = budget_box if budget_box is not None else []
        self.agent: AgentClient | None = None
        self.cache = WriteThroughCache(opts.cache_dir) if opts.cache_dir else None
        self.origins = SharedOrigins(opts.concurrency, opts.endpoint_url)
        self.recall: Recall | None = None

    async def run(self, sink_box: list[Any]) -> None:
        started = time.perf_counter()
        opts = self.opts
        if is_remote(self.target.location):
            self.agent = await find_agent(opts.socket, opts.agent, self.target.location)
        self.recall = Recall.for_load(self.target, cache=self.cache, agent=self.agent,
                                      names=opts.names, streaming=opts.stream_budget_bytes is not None,
                                      concurrency=opts.concurrency, endpoint_url=opts.endpoint_url)
        recalled = await self.recall.entries() if self.recall is not None else None
        if recalled is not None and await self._run_recalled(recalled, sink_box, started):
            return
        files, names_by_file = await Locator(self.agent, self.origins).files(self.target, opts.names)
        opener = SourceOpener(self.agent, self.origins, self.cache,
                              agent_required=opts.agent is True)
        sources = await opener.open_all(files)
        identities = [s.identity for s in sources]
        kinds = {type(s) for s in sources}
        writebacks = await self._run_sources(sources, names_by_file, sink_box, started)
        self._log_summary()
        remember = self.recall is not None and kinds <= {OriginSource, CacheFileSource}
        # Finished in the background: the caller has its tensors.
        runtime().track(asyncio.ensure_future(
            commit(writebacks, self.recall if remember else None, identities)))

    async def _run_sources(self, sources: list[Source], names_by_file: list[NameFilter],
                           sink_box: list[Any], started: float) -> list[Any]:
        """Load opened sources in order; returns the write-throughs left committing."""
        opts = self.opts
        loop = asyncio.get_running_loop()
        budget = Budget(opts.stream_budget_bytes)
        self.budget_box.append(budget)
        bar = None
        if opts.tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=os.path.basename(self.target.location.rstrip("/")) or "load")
        progress = Progress(opts.progress, bar)
        sink = self._sink()
        sink_box.append(sink)
        writebacks: list[Any] = []
        try:
            fulls = []
            for source, names in zip(sources, names_by_file):
                planned = planned_bytes(source, names)
                fulls.append(planned == source.header.data_end - source.header.data_start)
                progress.plan(planned)
            loads = await self._pipelined(sources, names_by_file, fulls, sink, budget, progress,
                                          writebacks)
            if opts.device.type == "cuda":
                await loop.run_in_executor(None, sink.synchronize)
        except BaseException:
            for source in sources:
                if source is not None:
                    await source.close()
            for wb in writebacks:
                await wb.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        self._tally(loads, started)
        return writebacks

    async def _pipelined(self, sources: list[Source], names_by_file: list[NameFilter],
                         fulls: list[bool], sink: Any, budget: Budget, progress: Progress,
                         writebacks: list[Any]) -> list[FileLoad]:
        """Every file through one :class:`Pipeline`: each starts once the one before has
        admitted its last span. A finished file's slot in ``sources`` is set to None (the
        caller closes the rest if this raises)."""
        pipeline = Pipeline(len(sources), self._emitter(),
                            max((self._concurrency(s) for s in sources), default=1))
        admitted = [asyncio.Event() for _ in sources]
        loads: list[FileLoad] = []

        async def one(i: int) -> None:
            if i:
                await admitted[i - 1].wait()
            pipeline.starting(i)
            source = sources[i]
            writeback = await self._writeback(source, fulls[i], writebacks)
            await source.start(fulls[i])
            file_load = FileLoad(source, names_by_file[i], sink, emit=pipeline.emitter(i),
                                 concurrency=self._concurrency(source), budget=budget,
                                 progress=progress, writeback=writeback,
                                 window=pipeline.window, admitted=admitted[i])
            loads.append(file_load)
            await file_load.run()
            sources[i] = None  # type: ignore[call-overload]
            pipeline.finished(i)

        try:
            async with asyncio.TaskGroup() as group:
                for i in range(len(sources)):
                    group.create_task(one(i))
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        self.out.stats["files_overlapped"] = pipeline.overlapped
        return loads

    def _tally(self, loads: list[FileLoad], started: float) -> None:
        """The call's result and stats, in file order."""
        by_kind: dict[str, int] = {}
        for file_load in loads:
            self._merge_metadata(file_load.source)
            self.out.files.append(file_load.source.name)
            for kind, n in file_load.source.stats.by_kind.items():
                by_kind[kind] = by_kind.get(kind, 0) + n
        self.out.stats.update({"bytes": sum(f.bytes for f in loads),
                               "tensors": sum(len(f.order) for f in loads),
                               "seconds": time.perf_counter() - started,
                               "bytes_by_source": by_kind, "files": len(loads)})
        flows = [f.source.origin.flow for f in loads if isinstance(f.source, OriginSource)]
        if flows:  # what the origin's limit came to (adapted to the link, unless fixed)
            self.out.stats["origin_concurrency"] = max(flow.allowed for flow in flows)

    async def _writeback(self, source: Source, full: bool, writebacks: list[Any]) -> Any:
        """The write-through of a whole file read from the origin, open; else None."""
        if not (full and self.cache is not None and isinstance(source, OriginSource)):
            return None
        # CPU: the bytes sit in the caller's tensors; write them once the call is done.
        # CUDA (the ring buffers wait for their writes) and streaming (memory must not hold
        # the whole model): as they come.
        defer = self.opts.device.type == "cpu" and self.opts.stream_budget_bytes is None
        writeback = self.cache.begin(source.identity, source.header_bytes, source.span_bytes,
                                     defer=defer)
        # Kept even if it failed to open (a full disk): its commit then cleans up and says
        # False, so no location is recorded without this file.
        writebacks.append(writeback)
        return writeback if await writeback.open() else None

    def _log_summary(self) -> None:
        st = self.out.stats
        seconds, loaded = st["seconds"], st["bytes"]
        log.info("coldbrew.loader: loaded %s: %d tensors, %d file(s), %s in %.2f s (%.2f GB/s) "
                 "to %s; bytes from %s", self.target.location, st["tensors"], st["files"],
                 _size(loaded), seconds, loaded / seconds / 1e9 if seconds else 0.0,
                 self.opts.device, ", ".join(f"{k} {_size(v)}" for k, v in
                                             sorted(st["bytes_by_source"].items())) or "nowhere")

    # --- warm starts from the write-through cache ------------------------------------------

    async def _run_recalled(self, entries: list[CacheEntry], sink_box: list[Any],
                            started: float) -> bool:
        """Load the cached copies while the origin confirms they are current, in parallel.

        A warm start should not wait for S3 (client set-up, listing, a HEAD per
        file: most of a second) before reading local bytes. The tensors are only
        handed over once the origin's files and versions equal the recalled
        ones; otherwise (or if a cached copy fails its checks) the result is
        dropped and the caller's load runs the normal way. Errors from the origin
        (a missing bucket, bad credentials) are raised as they would be then.
        """
        assert self.recall is not None
        expected = [e.identity for e in entries]
        check = asyncio.ensure_future(self.recall.current())
        try:
            loaded = True
            try:
                sources: list[Source] = []
                for entry in entries:
                    sources.append(await CacheFileSource.open_entry(
                        entry, self.cache, None, entry.identity.uri))
                await self._run_sources(sources, [None] * len(sources), sink_box, started)
            except (ColdbrewError, OSError) as e:
                for source in sources:
                    if source is not None:
                        await source.close()
                log.info("coldbrew.loader: the cached copy of %s could not be used (%s); "
                         "loading again", self.target.location, e)
                loaded = False
            current = await self._current(check, loaded)
        finally:
            check.cancel()
        if current is None:  # the origin cannot say; the cached copies were loaded and checked
            self.out.stats["stale"] = True
            self._log_summary()
            return True
        if loaded and current == expected:
            self.out.stats["checked_while_loading"] = True
            self._log_summary()
            return True
        if loaded:
            log.info("coldbrew.loader: %s changed at the origin since it was cached; loading "
                     "the current version", self.target.location)
        self._reset(sink_box)
        return False

    async def _current(self, check: asyncio.Future[list[FileIdentity]], loaded: bool
                       ) -> list[FileIdentity] | None:
        """What the origin says the location holds now; None if it cannot be reached within
        ``version_timeout_s`` after the cached copies were loaded and ``origin_unreachable``
        is serve-cached (stale-if-error: a warm start must not fail in an S3 outage)."""
        settings = OriginSettings.from_env(self.target.location)
        try:
            return await asyncio.wait_for(asyncio.shield(check), settings.version_timeout_s)
        except (OriginUnavailable, TimeoutError) as e:
            if not loaded or settings.origin_unreachable == "fail":
                if isinstance(e, TimeoutError):
                    raise OriginUnavailable(
                        f"{self.target.location}: the origin did not answer within "
                        f"{settings.version_timeout_s:g} s (version_timeout_s)") from None
                raise
            log.warning("coldbrew.loader: the origin is unreachable (%s); serving the cached "
                        "copy of %s without checking its version", e, self.target.location)
            return None

    def _reset(self, sink_box: list[Any]) -> None:
        """Forget a result that will not be handed over."""
        self.out.clear()
        self.out.files.clear()
        self.out.metadata = None
        self.out.stats.clear()
        sink_box.clear()
        self.budget_box.clear()

    def _emitter(self) -> Callable[[Slot], None]:
        return lambda slot: self.emit(slot.entry.name, slot)

    def _concurrency(self, source: Source) -> int:
        if isinstance(source, OriginSource):
            # GETs are capped by the origin's limit (fixed, or adapting up to its maximum); a
            # few more spans than it may allow keep them busy.
            return source.origin.max_in_flight + 2
        return self.opts.concurrency or DEFAULT_READS

    def _sink(self) -> Any:
        opts = self.opts
        if opts.device.type == "cuda":
            return CudaSink(opts.device, DEFAULT_SPAN_BYTES, opts.buffer_bytes, opts.dtype)
        return CpuSink(opts.dtype)

    def _merge_metadata(self, source: Source) -> None:
        meta = source.header.metadata
        if meta is None:
            return
        if self.out.metadata is None:
            self.out.metadata = {}
        for k, v in meta.items():
            self.out.metadata.setdefault(k, v)


# --- helpers -------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
