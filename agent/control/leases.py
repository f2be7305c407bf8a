"""Readers' leases on files: while a reader holds one, the file version it reads stays pinned.

An ``ensure`` opens a lease on the file version it resolved; the reader names that lease on
every later request, so all of its reads are of one version, and the file cannot be evicted
from under it. A lease ends when the reader releases it, or when it goes unused for
:data:`LEASE_TTL_S` (a reader that died cannot pin a file for ever).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import UsageError
from ..fetch.fetcher import Fetcher, OpenFile

LEASE_TTL_S = 120.0
#: Uncached chunks a lease keeps: an ensure window of `coldbrew get` (64 MiB) at 16 MiB chunks.
_UNCACHED_PER_LEASE = 4


@dataclass
class Lease:
    id: str
    file: OpenFile
    expires: float
    #: The file's rejections when the lease began (:meth:`Fetcher.rejections`): one more by
    #: the end means bytes read under it may have been false.
    rejections: int = 0
    #: Chunks an ensure fetched but the cache could not store (disk full or failing), kept
    #: for this lease's next read of them, which would otherwise fetch them again.
    uncached: OrderedDict[int, bytes] = field(default_factory=OrderedDict)

    def keep_uncached(self, index: int, data: bytes) -> None:
        self.uncached[index] = data
        self.uncached.move_to_end(index)
        while len(self.uncached) > _UNCACHED_PER_LEASE:
            self.uncached.popitem(last=False)


class Leases:
    """Readers' claims on files: a leased file is pinned (never evicted) until released or expired."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self._leases: dict[str, Lease] = {}

    def create(self, f: OpenFile) -> Lease:
        lease = Lease(secrets.token_hex(8), f, time.monotonic() + LEASE_TTL_S,
                      self.fetcher.rejections(f.entry))
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
