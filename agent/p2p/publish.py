"""``coldbrew publish``: put each model file's manifest beside it at the origin.

With a published manifest (chunk digests and SHA-1 piece hashes), every agent can
join the file's swarm from its first byte, so N nodes starting at once pull each
chunk from the origin about once. Without one, the first agent that completes the
file builds the manifest and offers it to its peers — fine for a rolling start,
not for a simultaneous one.

Runs where the models are uploaded (it needs write access to the bucket); reads each
object once with parallel ranged GETs. No agent is needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..config import OriginSettings
from ..core.manifest import Manifest, digest, sidecar_uri
from ..origin.origin import ObjectInfo, Origin

log = logging.getLogger("coldbrew.publish")


@dataclass(frozen=True)
class Published:
    uri: str
    sidecar: str
    chunks: int
    skipped: bool  # an up-to-date manifest was already there


async def publish(uri: str, chunk_size: int, settings: OriginSettings, *, force: bool = False,
                  on_bytes: Callable[[int], None] | None = None,
                  on_files: Callable[[list[ObjectInfo]], None] | None = None) -> list[Published]:
    origin = Origin(settings)
    try:
        infos = await origin.expand(origin.resolve(uri))
        if on_files:
            on_files(infos)
        out = []
        for info in infos:
            out.append(await _publish_one(origin, info, chunk_size, origin.flow.allowed,
                                          force, on_bytes))
        return out
    finally:
        await origin.close()


async def _publish_one(origin: Origin, info: ObjectInfo, chunk_size: int, concurrency: int,
                       force: bool, on_bytes: Callable[[int], None] | None) -> Published:
    target = sidecar_uri(info.uri)
    manifest = Manifest(info.identity, chunk_size)
    layout = manifest.layout
    if not force and await _up_to_date(origin, target, info, chunk_size):
        if on_bytes:
            on_bytes(info.size)
        return Published(info.uri, target, layout.count, skipped=True)
    pending = iter(range(layout.count))

    async def worker() -> None:
        buf = bytearray(chunk_size)  # one reused buffer per worker
        for index in pending:
            start, end = layout.bounds(index)
            view = memoryview(buf)[: end - start]
            await origin.read_into(info, start, view)
            manifest.digests[index], manifest.sha1s[index] = await asyncio.to_thread(_hashes, view)
            if on_bytes:
                on_bytes(end - start)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, layout.count)))))
    await origin.write_small(target, manifest.dumps())
    log.info("published", extra={"uri": info.uri, "sidecar": target, "chunks": layout.count})
    return Published(info.uri, target, layout.count, skipped=False)


def _hashes(data: memoryview) -> tuple[str, str]:
    return digest(data), hashlib.sha1(data).hexdigest()


async def _up_to_date(origin: Origin, target: str, info: ObjectInfo, chunk_size: int) -> bool:
    raw = await origin.read_small(target)
    if raw is None:
        return False
    try:
        found = Manifest.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return False
    return (found.identity == info.identity and found.chunk_size == chunk_size
            and found.complete and found.shareable)
