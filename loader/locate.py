"""Where a load's files are: a location resolved to the safetensors files it names.

A location is a local path (or ``file://``; a path under the agent's FUSE mount is one), or a
remote URI (``s3://``, any fsspec URL). It names one file, or a model directory: the shards
its ``model.safetensors.index.json`` lists (only those holding wanted tensors, when the caller
names some), else every ``*.safetensors`` file directly in it. A remote location is looked
at through the node agent when one answers, else through the origin.

What each file's bytes are then read from is :mod:`coldbrew.loader.selection`'s business.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coldbrew.agent.errors import HeaderError, ObjectNotFound, OriginUnavailable
from coldbrew.loader.plan import NameFilter

if TYPE_CHECKING:
    from coldbrew.agent.control.client import AgentClient
    from coldbrew.loader.origins import Origins

INDEX_NAME = "model.safetensors.index.json"
_INDEX_MAX_BYTES = 64 << 20


@dataclass
class Target:
    """What a public call was asked to load."""

    location: str
    is_dir: bool | None  # None: find out


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def join(location: str, name: str) -> str:
    if is_remote(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(local_path(location), name)


class Locator:
    """Resolves locations, looking at remote ones through ``agent`` (when not None) or
    ``origins``."""

    def __init__(self, agent: AgentClient | None, origins: Origins) -> None:
        self.agent = agent
        self.origins = origins

    async def files(self, target: Target, names: NameFilter) -> tuple[list[str], list[NameFilter]]:
        """The files to read, in order, and the tensor names wanted from each."""
        location = target.location
        is_dir = target.is_dir
        if is_dir is None:
            is_dir = await self._looks_like_dir(location)
        if not is_dir:
            return [local_path(location) if not is_remote(location) else location], [names]
        index = await self._read_index(location)
        if index is not None:
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise HeaderError(f"{join(location, INDEX_NAME)}: no valid weight_map")
            return files_from_index(location, weight_map, names)
        found = await self._list_safetensors(location)
        if not found:
            raise ObjectNotFound(f"{location}: no {INDEX_NAME} and no *.safetensors files")
        return found, [names] * len(found)

    async def _looks_like_dir(self, location: str) -> bool:
        if location.endswith("/"):
            return True
        if not is_remote(location):
            return os.path.isdir(local_path(location))
        try:
            agent = self.agent
            if agent is not None:
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: agent.ensure_range(location, 0, 0))
            else:
                await (await self.origins.get(location)).stat(location, quick=True)
            return False
        except ObjectNotFound:
            return True
        except OriginUnavailable:
            # Cannot tell: take it for a file. Its source then serves a cached copy, or fails
            # with the origin's error (stale-if-error, selection.py).
            return False

    async def _read_index(self, location: str) -> dict[str, Any] | None:
        uri = join(location, INDEX_NAME)
        try:
            data = await self._index_bytes(location, uri)
        except ObjectNotFound:
            return None
        if data is None:
            return None
        try:
            index = json.loads(data)
        except ValueError as e:
            raise HeaderError(f"{uri}: not valid JSON ({e})") from None
        if not isinstance(index, dict):
            raise HeaderError(f"{uri}: expected a JSON object")
        return index

    async def _index_bytes(self, location: str, uri: str) -> bytes | None:
        """The index file's bytes; None when a local directory has none (remote: ObjectNotFound)."""
        loop = asyncio.get_running_loop()
        if not is_remote(location):
            path = local_path(uri)
            if not os.path.exists(path):
                return None
            return await loop.run_in_executor(None, Path(path).read_bytes)
        agent = self.agent
        if agent is not None:
            return await loop.run_in_executor(None, lambda: b"".join(agent.read(uri)))
        origin = await self.origins.get(uri)
        info = await origin.stat(uri)
        if info.size > _INDEX_MAX_BYTES:
            raise HeaderError(f"{uri}: {info.size} bytes is too large for an index")
        buf = bytearray(info.size)
        await origin.read_into(info, 0, memoryview(buf))
        return bytes(buf)

    async def _list_safetensors(self, location: str) -> list[str]:
        if not is_remote(location):
            root = local_path(location)
            return sorted(os.path.join(root, n) for n in os.listdir(root)
                          if n.endswith(".safetensors") and os.path.isfile(os.path.join(root, n)))
        prefix = location.rstrip("/")
        if self.agent is not None:
            listing = await asyncio.get_running_loop().run_in_executor(None, self.agent.listing, prefix)
            entries = [(e.uri, e.name, e.type) for e in listing.entries]
        else:
            found = await (await self.origins.get(location)).list_dir(prefix)
            entries = [(e["uri"], e["name"], e["type"]) for e in found]
        return sorted(uri for uri, name, kind in entries
                      if kind == "file" and name.endswith(".safetensors"))


def files_from_index(location: str, weight_map: dict[str, str], names: NameFilter
                     ) -> tuple[list[str], list[NameFilter]]:
    """The shards of an index's ``weight_map`` that hold wanted tensors, and the names wanted
    from each (all of them for no filter or a predicate; those asked for otherwise)."""
    files: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        if "/" in fname or fname in ("", ".", ".."):
            raise HeaderError(f"{join(location, INDEX_NAME)}: shard name {fname!r} is not a "
                              "file in the directory")
        files.setdefault(fname, []).append(name)
    ordered = sorted(files)
    if names is None:
        return [join(location, f) for f in ordered], [None] * len(ordered)
    if callable(names):
        keep = [f for f in ordered if any(names(n) for n in files[f])]
        return [join(location, f) for f in keep], [names] * len(keep)
    if isinstance(names, str):
        raise TypeError("names must be a collection of names, not a single str")
    wanted = set(names)
    missing = wanted.difference(weight_map)
    if missing:
        raise KeyError(f"{location}: no tensors named {sorted(missing)!r} in {INDEX_NAME}")
    keep = [f for f in ordered if wanted.intersection(files[f])]
    return ([join(location, f) for f in keep],
            [sorted(wanted.intersection(files[f])) for f in keep])
