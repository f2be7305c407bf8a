"""The FUSE view's Prometheus metrics: operations by outcome, their latency, bytes read.

Defined once, here, and registered on the agent's own registry (``AgentMetrics.registry``),
so they appear on the same ``/metrics`` as everything else the agent exports. Bytes
and chunk sources (cache, origin) are already counted by the fetcher and the store;
these add what only the mount sees: what programs asked for and how long they waited.
"""

from __future__ import annotations

import errno
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A FUSE op takes ~20 µs (attributes from memory) to a minute (a cold chunk under faults).
_OP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
               0.5, 1, 2.5, 5, 10, 30, 60)


def outcome_of(code: int | None) -> str:
    """``None`` → ``ok``; an errno → its name (``ENOENT``), the label on ``coldbrew_fuse_ops_total``."""
    if not code:
        return "ok"
    return errno.errorcode.get(code, "EIO")


class FuseMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.ops = Counter(
            "coldbrew_fuse_ops", "FUSE operations answered, by operation and outcome (ok or errno name)",
            ["op", "outcome"], registry=r)
        self.op_seconds = Histogram(
            "coldbrew_fuse_op_seconds", "Time to answer one FUSE operation, by operation",
            ["op"], buckets=_OP_BUCKETS, registry=r)
        self.read_bytes = Counter(
            "coldbrew_fuse_read_bytes", "Bytes returned to programs reading through the mount",
            registry=r)
        self.timeouts = Counter(
            "coldbrew_fuse_timeouts",
            "FUSE operations that gave up after fuse_read_timeout_s and failed with EIO",
            ["op"], registry=r)
        self.opens = Counter(
            "coldbrew_fuse_opens",
            "Files opened through the mount, by mode: passthrough (the kernel reads the cache's "
            "data file itself; those reads are not in coldbrew_fuse_read_bytes_total), cached "
            "(reads through the agent, kept in the page cache) or direct (direct_io)",
            ["mode"], registry=r)
        self.open_files = Gauge(
            "coldbrew_fuse_open_files", "Files open through the mount now", registry=r)
        self.mounted = Gauge("coldbrew_fuse_mounted", "1 while the view is mounted", registry=r)
        self.stale_mounts_cleaned = Counter(
            "coldbrew_fuse_stale_mounts_cleaned",
            "Dead mounts (left by a crashed agent) detached at start", registry=r)
        # labels() takes a lock and a dict lookup; the hot path reuses the children.
        self._ops: dict[tuple[str, str], Any] = {}
        self._seconds: dict[str, Any] = {}

    def observe(self, op: str, code: int | None, seconds: float) -> None:
        key = (op, outcome_of(code))
        counter = self._ops.get(key)
        if counter is None:
            counter = self._ops[key] = self.ops.labels(*key)
        counter.inc()
        hist = self._seconds.get(op)
        if hist is None:
            hist = self._seconds[op] = self.op_seconds.labels(op)
        hist.observe(seconds)
