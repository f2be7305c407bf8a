"""What a failing cache disk means to the store's callers, decided in one place.

Any OSError from writing the cache becomes :class:`CacheFull` (the disk or quota is
full) or :class:`CacheError`, counted by reason; callers treat both as "serve from
origin, uncached": a broken cache costs speed, never correctness.
"""

from __future__ import annotations

import errno
from pathlib import Path

from ..errors import CacheError, CacheFull
from ..metrics import AgentMetrics

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def count_write_error(metrics: AgentMetrics | None, e: OSError) -> None:
    if metrics:
        reason = "full" if e.errno in FULL_ERRNOS else errno.errorcode.get(e.errno or 0, "other")
        metrics.cache_write_errors.labels(reason.lower()).inc()


def write_error(e: OSError, cache_dir: Path, uri: str, metrics: AgentMetrics | None) -> CacheError:
    """The error to raise for ``e``, met writing ``uri`` into the cache at ``cache_dir``
    (counted)."""
    count_write_error(metrics, e)
    if e.errno in FULL_ERRNOS:
        return CacheFull(f"cache disk {cache_dir} is full; serving {uri} from origin without "
                         "caching")
    return CacheError(f"cannot write to cache disk {cache_dir}: {e.strerror or e}")
