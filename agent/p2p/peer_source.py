"""The fetcher's peer source: chunks of shared files from other agents, through the swarm.

It sits between the cache and the origin (:mod:`coldbrew.agent.fetch.sources`). The first
time a fetch asks it, it finds the file's torrent (:meth:`Sharing.torrent_for`); a file
that is not shared is passed on to the origin. For a shared one it waits on peers
(:meth:`Swarm.from_peers`) and marks the request as shared (:class:`TorrentChunk`), so the
origin step re-checks stripe ownership once a slot is free and hands its bytes to
libtorrent rather than the store. The same torrent serves every round of one fetch.
"""

from __future__ import annotations

from ..fetch.sources import Answer, ChunkRequest, ChunkSource, OpenFile, Outcome
from .sharing import Sharing
from .swarm import Swarm, Torrent


class TorrentChunk:
    """Chunk ``index`` of a torrent, as the origin step sees it (a ``SharedChunk``)."""

    def __init__(self, swarm: Swarm, torrent: Torrent, index: int) -> None:
        self.swarm = swarm
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
        await self.swarm.put_piece(self.torrent, self.index, piece)


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
            chunk = request.shared = TorrentChunk(self.sharing.swarm, torrent, request.index)
        return await chunk.from_peers()

    def prepare(self, f: OpenFile) -> None:
        self.sharing.prepare(f)

    def completed(self, f: OpenFile) -> None:
        self.sharing.completed(f)

