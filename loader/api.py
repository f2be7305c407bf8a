"""The loader's public API: ``load_file``, ``load_dir``, ``iter_tensors``.

Each call picks where bytes come from, once:

* a local path (or ``file://``; a path under the agent's FUSE mount is one):
  read in place;
* a remote URI (``s3://``, any fsspec URL) with the node agent reachable on its
  socket: through the agent's verified chunk cache;
* a remote URI without an agent: from the write-through cache in ``cache_dir``
  when it holds this exact version (URI, ETag, size), else from the origin with
  parallel ranged GETs, writing the same bytes to ``cache_dir`` behind the load.

Results equal ``safetensors.torch.load_file`` for the same file: names, dtypes,
shapes, bytes; ``StateDict.metadata`` is the header's ``__metadata__``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coldbrew.agent.errors import AgentUnavailable, HeaderError, ObjectNotFound, UsageError
from coldbrew.loader.device import DEFAULT_BUFFER_BYTES, CpuSink, CudaSink, Slot
from coldbrew.loader.engine import Budget, FileLoad, Progress, planned_bytes
from coldbrew.loader.plan import NameFilter
from coldbrew.loader.runtime import runtime
from coldbrew.loader.sources import (
    DEFAULT_SPAN_BYTES,
    AgentSource,
    CacheFileSource,
    LocalFileSource,
    OriginSource,
    Source,
    origin_root,
)
from coldbrew.loader.writeback import WriteThroughCache, default_cache_dir

log = logging.getLogger("coldbrew.loader")

INDEX_NAME = "model.safetensors.index.json"
#: Streaming mode (iter_tensors): bytes of finished tensors that may wait for the caller.
DEFAULT_STREAM_BUDGET_BYTES = 1 << 30
_INDEX_MAX_BYTES = 64 << 20


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
    concurrency: int = 8
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
    if kw["concurrency"] < 1:
        raise UsageError(f"concurrency must be at least 1, got {kw['concurrency']}")
    return Options(device=dev, cache_dir=Path(cache_dir) if cache_dir else None, **kw)


# --- public API --------------------------------------------------------------------------


def load_file(path_or_uri: str | os.PathLike[str], device: Any = "cpu", *,
              dtype: torch.dtype | None = None, names: NameFilter = None, concurrency: int = 8,
              buffer_bytes: int = DEFAULT_BUFFER_BYTES, cache_dir: Path | str | bool | None = None,
              socket: str | os.PathLike[str] | None = None, agent: bool | None = None,
              endpoint_url: str | None = None, progress: Callable[[int, int], Any] | None = None,
              tqdm: bool = False) -> StateDict:
    """Load one safetensors file: what ``safetensors.torch.load_file`` returns, faster.

    ``path_or_uri``: a local path, ``file://``, ``s3://bucket/key`` or any fsspec
    URL. ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``. ``dtype``: cast
    floating-point tensors (f16/bf16/f32/f64) to this dtype. ``names``: only
    these tensors (a collection of names, or a predicate on the name).
    ``concurrency``: reads in flight. ``buffer_bytes``: pinned host memory for a
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
    return _collect(_Target(str(os.fspath(path_or_uri)), is_dir=False), opts)


def load_dir(path_or_uri: str | os.PathLike[str], device: Any = "cpu", *,
             dtype: torch.dtype | None = None, names: NameFilter = None, concurrency: int = 8,
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
    return _collect(_Target(str(os.fspath(path_or_uri)), is_dir=True), opts)


def iter_tensors(path_or_uri: str | os.PathLike[str], device: Any = "cpu", *,
                 dtype: torch.dtype | None = None, names: NameFilter = None, concurrency: int = 8,
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
    return _stream(_Target(target, is_dir=None), opts)


# --- sync bridge ---------------------------------------------------------------------------


@dataclass
class _Target:
    location: str
    is_dir: bool | None  # None: find out


def _collect(target: _Target, opts: Options) -> StateDict:
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


def _stream(target: _Target, opts: Options) -> Iterator[tuple[str, torch.Tensor]]:
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
            except BaseException:  # noqa: BLE001 - cancelled on purpose
                pass


# --- one load call ----------------------------------------------------------------------


class _Load:
    """Everything one public call does, on the loader's loop."""

    def __init__(self, target: _Target, opts: Options, emit: Callable[[str, Slot], None],
                 out: StateDict, budget_box: list[Budget] | None = None) -> None:
        self.target = target
        self.opts = opts
        self.emit = emit
        self.out = out
        self.budget_box = budget_box if budget_box is not None else []
        self.agent: Any = None
        self.cache = WriteThroughCache(opts.cache_dir) if opts.cache_dir else None

    async def run(self, sink_box: list[Any]) -> None:
        started = time.perf_counter()
        opts = self.opts
        loop = asyncio.get_running_loop()
        remote = _is_remote(self.target.location)
        if remote:
            self.agent = await self._find_agent()
        files, names_by_file = await self._files()
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
        by_kind: dict[str, int] = {}
        writebacks: list[Any] = []
        loaded = 0
        tensors = 0
        try:
            sources = await self._open_all(files, names_by_file)
            fulls = []
            for source, names in zip(sources, names_by_file):
                planned = planned_bytes(source, names)
                fulls.append(planned == source.header.data_end - source.header.data_start)
                progress.plan(planned)
            for i, (source, names) in enumerate(zip(sources, names_by_file)):
                writeback = None
                if (fulls[i] and self.cache is not None and isinstance(source, OriginSource)):
                    # CPU: the bytes sit in the caller's tensors; write them once the
                    # call is done. CUDA (the ring buffers wait for their writes) and
                    # streaming (memory must not hold the whole model): as they come.
                    defer = opts.device.type == "cpu" and opts.stream_budget_bytes is None
                    writeback = self.cache.begin(source.identity, source.header_bytes,
                                                 source.span_bytes, defer=defer)
                    if not await writeback.open():
                        writeback = None
                    else:
                        writebacks.append(writeback)
                await source.start(fulls[i])
                file_load = FileLoad(source, names, sink, emit=self._emitter(),
                                     concurrency=self._concurrency(source), budget=budget,
                                     progress=progress, writeback=writeback)
                await file_load.run()
                sources[i] = None  # type: ignore[call-overload]
                self._merge_metadata(source)
                self.out.files.append(source.name)
                loaded += file_load.bytes
                tensors += len(file_load.order)
                for kind, n in source.stats.by_kind.items():
                    by_kind[kind] = by_kind.get(kind, 0) + n
            if opts.device.type == "cuda":
                await loop.run_in_executor(None, sink.synchronize)
        except BaseException:
            for source in locals().get("sources") or []:
                if source is not None:
                    await source.close()
            for wb in writebacks:
                await wb.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        for wb in writebacks:  # finished in the background: the caller has its tensors
            runtime().track(asyncio.ensure_future(wb.commit()))
        seconds = time.perf_counter() - started
        self.out.stats.update({"bytes": loaded, "tensors": tensors, "seconds": seconds,
                               "bytes_by_source": by_kind, "files": len(files)})
        log.info("coldbrew.loader: loaded %s: %d tensors, %d file(s), %s in %.2f s (%.2f GB/s) "
                 "to %s; bytes from %s", self.target.location, tensors, len(files), _size(loaded),
                 seconds, loaded / seconds / 1e9 if seconds else 0.0, opts.device,
                 ", ".join(f"{k} {_size(v)}" for k, v in sorted(by_kind.items())) or "nowhere")

    def _emitter(self) -> Callable[[Slot], None]:
        return lambda slot: self.emit(slot.entry.name, slot)

    def _concurrency(self, source: Source) -> int:
        if isinstance(source, OriginSource):
            # GETs are capped at `concurrency` by the source; a few more spans keep them busy.
            return self.opts.concurrency + 2
        return self.opts.concurrency

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

    # --- finding the agent, the files, the sources ---------------------------------------

    async def _find_agent(self) -> Any:
        if self.opts.agent is False:
            return None
        from coldbrew.agent.client import AgentClient

        client = AgentClient(self.opts.socket, timeout_s=10.0)
        try:
            await asyncio.get_running_loop().run_in_executor(None, client.health)
            return client
        except (AgentUnavailable, OSError) as e:
            if self.opts.agent:
                raise AgentUnavailable(f"agent=True but {e}") from None
            log.debug("coldbrew.loader: no agent (%s); reading from the origin", e)
            return None

    async def _files(self) -> tuple[list[str], list[NameFilter]]:
        location = self.target.location
        names = self.opts.names
        is_dir = self.target.is_dir
        if is_dir is None:
            is_dir = await self._looks_like_dir(location)
        if not is_dir:
            return [_local_path(location) if not _is_remote(location) else location], [names]
        index = await self._read_index(location)
        if index is not None:
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise HeaderError(f"{_join(location, INDEX_NAME)}: no valid weight_map")
            return self._files_from_index(location, weight_map, names)
        found = await self._list_safetensors(location)
        if not found:
            raise ObjectNotFound(f"{location}: no {INDEX_NAME} and no *.safetensors files")
        return found, [names] * len(found)

    def _files_from_index(self, location: str, weight_map: dict[str, str], names: NameFilter
                          ) -> tuple[list[str], list[NameFilter]]:
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            if "/" in fname or fname in ("", ".", ".."):
                raise HeaderError(f"{_join(location, INDEX_NAME)}: shard name {fname!r} is not a "
                                  "file in the directory")
            files.setdefault(fname, []).append(name)
        ordered = sorted(files)
        if names is None:
            return [_join(location, f) for f in ordered], [None] * len(ordered)
        if callable(names):
            keep = [f for f in ordered if any(names(n) for n in files[f])]
            return [_join(location, f) for f in keep], [names] * len(keep)
        if isinstance(names, str):
            raise TypeError("names must be a collection of names, not a single str")
        wanted = set(names)
        missing = wanted.difference(weight_map)
        if missing:
            raise KeyError(f"{location}: no tensors named {sorted(missing)!r} in {INDEX_NAME}")
        keep = [f for f in ordered if wanted.intersection(files[f])]
        return ([_join(location, f) for f in keep],
                [sorted(wanted.intersection(files[f])) for f in keep])

    async def _looks_like_dir(self, location: str) -> bool:
        if location.endswith("/"):
            return True
        if not _is_remote(location):
            return os.path.isdir(_local_path(location))
        try:
            if self.agent is not None:
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: self.agent.ensure(location, 0, 0))
            else:
                await (await self._origin(location)).stat(location)
            return False
        except ObjectNotFound:
            return True

    async def _read_index(self, location: str) -> dict[str, Any] | None:
        uri = _join(location, INDEX_NAME)
        loop = asyncio.get_running_loop()
        try:
            if not _is_remote(location):
                path = _local_path(uri)
                if not os.path.exists(path):
                    return None
                data = await loop.run_in_executor(None, Path(path).read_bytes)
            elif self.agent is not None:
                data = await loop.run_in_executor(
                    None, lambda: b"".join(self.agent.read(uri)))
            else:
                origin = await self._origin(uri)
                info = await origin.stat(uri)
                if info.size > _INDEX_MAX_BYTES:
                    raise HeaderError(f"{uri}: {info.size} bytes is too large for an index")
                buf = bytearray(info.size)
                await origin.read_into(info, 0, memoryview(buf))
                data = bytes(buf)
        except ObjectNotFound:
            return None
        try:
            index = json.loads(data)
        except ValueError as e:
            raise HeaderError(f"{uri}: not valid JSON ({e})") from None
        if not isinstance(index, dict):
            raise HeaderError(f"{uri}: expected a JSON object")
        return index

    async def _list_safetensors(self, location: str) -> list[str]:
        if not _is_remote(location):
            root = _local_path(location)
            return sorted(os.path.join(root, n) for n in os.listdir(root)
                          if n.endswith(".safetensors") and os.path.isfile(os.path.join(root, n)))
        loop = asyncio.get_running_loop()
        if self.agent is not None:
            listing = await loop.run_in_executor(None, self.agent.ls, location.rstrip("/"))
            entries = listing["entries"]
        else:
            entries = await (await self._origin(location)).list_dir(location.rstrip("/"))
        return sorted(e["uri"] for e in entries
                      if e["type"] == "file" and e["name"].endswith(".safetensors"))

    async def _origin(self, uri: str) -> Any:
        from coldbrew.agent.config import OriginSettings
        from coldbrew.agent.origin import Origin

        root = origin_root(uri)
        overrides: dict[str, Any] = {"fetch_concurrency": self.opts.concurrency}
        if self.opts.endpoint_url:
            overrides["endpoint_url"] = self.opts.endpoint_url
        settings = OriginSettings.from_env(root, **overrides)

        async def make() -> Any:
            return Origin(settings)

        return await runtime().bound(("origin", settings), make)

    async def _open_all(self, files: list[str], names: list[NameFilter]) -> list[Source]:
        gate = asyncio.Semaphore(8)

        async def one(location: str) -> Source:
            async with gate:
                return await self._open(location)

        tasks = [asyncio.ensure_future(one(f)) for f in files]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            opened = await asyncio.gather(*tasks, return_exceptions=True)
            for s in opened:
                if isinstance(s, Source):
                    await s.close()
            raise

    async def _open(self, location: str) -> Source:
        if not _is_remote(location):
            return await LocalFileSource.open(_local_path(location))
        if self.agent is not None:
            return await AgentSource.open(self.agent, location, prefetch=False)
        origin = await self._origin(location)
        info = await origin.stat(location)
        if self.cache is not None:
            entry = await asyncio.get_running_loop().run_in_executor(
                None, self.cache.lookup, info.identity)
            if entry is not None:
                fallback = OriginSource(origin, info, self.opts.concurrency)
                try:
                    return await CacheFileSource.open_entry(entry, self.cache, fallback, location)
                except (OSError, HeaderError) as e:
                    log.warning("coldbrew.loader: cache entry for %s unusable (%s); reading the "
                                "origin", location, e)
                    self.cache.discard(entry)
        return await OriginSource.open(origin, info, self.opts.concurrency)


# --- helpers -------------------------------------------------------------------------------


def _is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _local_path(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def _join(location: str, name: str) -> str:
    if _is_remote(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(_local_path(location), name)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
