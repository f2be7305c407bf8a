"""Who fetches which chunk from the origin: the striping policy, as pure code.

When several agents want a chunk nobody has, only its stripe owner (:func:`.torrent.stripe_owner`)
fetches it from the origin; the others wait for it to appear in the swarm. Members are this
agent plus connected peers that are still making progress, so an idle or dead peer never
holds a stripe hostage for long. :class:`PeerView` is what one torrent knows of its peers,
refreshed by :meth:`PeerView.observe` from libtorrent's peer list each tick; every decision
here takes the clock as an argument, so the tests drive it without a session.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from .torrent import stripe_owner

#: How often the alert thread refreshes a view (seconds); a view older than two ticks is stale.
TICK_S = 0.1
#: A peer whose piece count has not moved for this long no longer owns stripes. Long
#: enough for a peer's first origin chunks to land on a throttled origin.
ACTIVE_S = 10.0
#: After a torrent is attached, the longest it waits for the peers that already share
#: the file to connect before striping without them. Handshakes take ~1 s when an
#: upload cap is set (libtorrent meters them through the rate limiter), more on a busy node.
JOIN_S = 5.0
#: After attaching a file, an agent waits this long for agents that start loading it at the
#: same moment (a rollout) before striping without them — for files big enough to matter;
#: a small file is cheaper to fetch twice than to wait for.
FIRST_S = 1.0
FIRST_MIN_CHUNKS = 4
#: How long a peer whose connection dropped is waited for (it is reconnected meanwhile).
LOST_S = 1.5
#: How long a peer is connected before its piece count is trusted (its bitfield arrived).
SETTLE_S = 0.3


@dataclass
class PeerView:
    """One torrent's peers as this agent last saw them (peer ids are 20 bytes)."""

    me: bytes
    key: str  # the entry key: stripes differ per file
    attached_at: float
    availability: list[int] = field(default_factory=list)  # connected peers holding each piece
    snapshot_at: float = 0.0  # when availability and members were last refreshed
    expected: set[bytes] | None = None  # peer ids known to share the file too (None: not asked yet)
    members: tuple[bytes, ...] = ()
    #: peer id → (pieces it has, when that last changed, when first seen)
    progress: dict[bytes, tuple[int, float, float]] = field(default_factory=dict)
    settled: set[bytes] = field(default_factory=set)  # peers connected long enough to judge
    lost: dict[bytes, float] = field(default_factory=dict)  # peer id → when its connection went

    def available(self, index: int) -> bool:
        return index < len(self.availability) and self.availability[index] > 0

    def observe(self, peers: Iterable[tuple[bytes, int]], availability: list[int], now: float) -> None:
        """Take a fresh look: ``peers`` are (peer id, pieces it has) of handshaken peers."""
        total = len(availability)
        seen: dict[bytes, tuple[int, float, float]] = {}
        for pid, count in peers:
            before = self.progress.get(pid)
            if before is None:
                seen[pid] = (count, now, now)
            else:
                seen[pid] = (count, now if before[0] != count else before[1], before[2])
        for pid in self.progress.keys() - seen.keys():
            self.lost[pid] = now  # a dropped connection is retried; give it a moment
        self.lost = {pid: when for pid, when in self.lost.items() if now - when < LOST_S}
        self.progress = seen
        # A peer's bitfield follows its handshake: until it has had a moment to arrive,
        # a seed looks like an empty peer that would own stripes.
        self.settled = {pid for pid, (_, _, first) in seen.items() if now - first >= SETTLE_S}
        active = [pid for pid, (count, when, _) in seen.items()
                  if pid in self.settled and count < total and now - when < ACTIVE_S]
        self.members = tuple(sorted({self.me, *active}))
        self.availability = availability
        self.snapshot_at = now

    def should_fetch(self, index: int, known: Collection[bytes], now: float) -> bool:
        """Should this agent fetch chunk ``index`` from the origin itself?

        ``known``: the peer ids of every other agent this one knows of.
        """
        if not known:
            return True  # no other agent to get it from
        if now - self.snapshot_at > TICK_S * 2:
            return False  # a stale view: look again first
        age = now - self.attached_at
        waiting_for = self.expected if self.expected is not None else set(known)
        if age < JOIN_S and not waiting_for <= self.settled:
            return False  # peers are still connecting: one of them may own this chunk
        if any(now - when < LOST_S for pid, when in self.lost.items() if pid not in self.progress):
            return False  # a peer that may hold it just dropped off: it is being reconnected
        if age < FIRST_S and len(self.availability) >= FIRST_MIN_CHUNKS \
                and not set(known) <= self.settled:
            return False  # agents starting this file at the same moment get a moment to join
        return self.owns(index)

    def still_mine(self, index: int) -> bool:
        """Re-check, once an origin slot is free, a decision made while waiting for it:
        peers that joined since may own the chunk now, or already have it."""
        return not self.available(index) and self.owns(index)

    def owns(self, index: int) -> bool:
        """Is this agent chunk ``index``'s stripe owner among the members seen now?"""
        return stripe_owner(index, self.key, self.members or (self.me,)) == self.me


def availability_from(peers: Iterable[tuple[int, list[bool]]], total: int) -> list[int]:
    """How many connected peers have each piece, from their own bitfields.

    ``peers``: (pieces it has, its bitfield). libtorrent's ``piece_availability`` is empty
    while the torrent has no piece picker, which it creates only when it needs one: for a
    torrent that wants nothing yet and whose only peers are seeds, it has none. Without
    this, every chunk would look unavailable and be fetched from the origin although a
    seed is connected.
    """
    counts = [0] * total
    for num_pieces, bitfield in peers:
        if num_pieces >= total:
            counts = [c + 1 for c in counts]
            continue
        for i, has in enumerate(bitfield[:total]):
            if has:
                counts[i] += 1
    return counts
