"""The fetcher's peer source: chunks of shared files from other agents, through the swarm.

It sits between the cache and the origin (:mod:`coldbrew.agent.fetch.sources`). The first
time a fetch asks it, it finds the file's torrent (:meth:`Sharing.torrent_for`); a file
that is not shared is passed on to the origin. For a shared one it waits on peers
(:meth:`Swarm.from_peers`) and marks the request as shared (:class:`TorrentChunk`), so the
origin step re-checks stripe ownership once a slot is free and hands its bytes to
libtorrent rather than the store. The same torrent serves every round of one fetch.
"""

from __future__ import annotations

from ..cache.entry import Entry
from ..errors import CacheError, ObjectChanged
from ..fetch.sources import Answer, ChunkRequest, ChunkSource, OpenFile, Outcome
from .sharing import Sharing
from .swarm import Torrent


class TorrentChunk:
    """Chunk ``index`` of a torrent, as the origin step sees it (a ``SharedChunk``)."""

    def __init__(self, sharing: Sharing, torrent: Torrent, index: int) -> None:
        self.sharing = sharing
        self.swarm = sharing.swarm
        self.torrent = torrent
        self.index = index

    async def from_peers(self) -> Outcome:
        return await self.swarm.from_peers(self.torrent, self.index)

    def still_mine(self) -> bool:
        return self.swarm.still_mine(self.torrent, self.index)

    def still_shared(self) -> bool:
        # Detached while the origin read ran: the store owns the data file again.
        return self.swarm.torrent(self.torrent.key) is self.torrent

    async def put(self, piece: bytes) -> None:
        # libtorrent owns a shared entry's data file: the bytes go in through it.
        try:
            await self.swarm.put_piece(self.torrent, self.index, piece)
        except ObjectChanged:
            if not self.sharing.refute(self.torrent.key):
                raise
            # The origin's bytes are right by definition: the peer's manifest lied.
            raise CacheError(f"{self.torrent.entry.identity.uri}: chunk {self.index} from the "
                             "origin fails the piece hash a peer's manifest gave; that manifest "
                             "is rejected, the chunk served from memory") from None


class PeerSource(ChunkSource):
    name = "peers"

    def __init__(self, sharing: Sharing) -> None:
        self.sharing = sharing

    async def get(self, request: ChunkRequest) -> Answer:
        chunk = request.shared
        if not isinstance(chunk, TorrentChunk):
            torrent = await self.sharing.torrent_for(request.file)
            if torrent is None:
                return Outcome.PASS  # not shared (yet): the origin it is
            chunk = request.shared = TorrentChunk(self.sharing, torrent, request.index)
        return await chunk.from_peers()

    def prepare(self, f: OpenFile) -> None:
        self.sharing.prepare(f)

    def completed(self, f: OpenFile) -> None:
        self.sharing.completed(f)

    def unchecked(self, entry: Entry) -> bool:
        return self.sharing.unchecked(entry)

    def rejections(self, entry: Entry) -> int:
        return self.sharing.rejections.get(entry.key, 0)

    async def verdict(self, f: OpenFile) -> str | None:
        return await self.sharing.verdict(f)

