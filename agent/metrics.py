"""Every Prometheus metric the agent exports, defined once.

Each behaviour a test must observe is also a metric (origin GETs, retries by
reason, corrupt chunks, single-flight joins, cache write failures), so the same
numbers serve the tests, ``coldbrew status --json`` and the cluster's dashboards.
Metrics live in a per-agent registry rather than the process-global one, so
several agents can run in one process (tests) without clashing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Chunk fetches take ~10 ms (cache) to seconds (origin under load).
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

SOURCES = ("cache", "peer", "origin")


class AgentMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.bytes_served = Counter(
            "coldbrew_bytes_served", "Bytes handed to readers, by where they came from",
            ["source"], registry=r)
        self.chunk_seconds = Histogram(
            "coldbrew_chunk_fetch_seconds", "Time to make one chunk present, by source",
            ["source"], buckets=_LATENCY_BUCKETS, registry=r)
        self.origin_requests = Counter(
            "coldbrew_origin_requests", "Requests sent to the origin, by operation and outcome",
            ["op", "outcome"], registry=r)
        self.origin_bytes = Counter(
            "coldbrew_origin_bytes", "Bytes received from the origin", registry=r)
        self.origin_retries = Counter(
            "coldbrew_origin_retries", "Origin attempts retried, by reason", ["reason"], registry=r)
        self.origin_reachable = Gauge(
            "coldbrew_origin_reachable",
            "0 while the origin cannot be reached (the cache is served: origin_unreachable)",
            registry=r)
        self.origin_reachable.set(1)
        self.origin_concurrency = Gauge(
            "coldbrew_origin_concurrency",
            "GETs the origin may have in flight now (fetch_concurrency, or what auto chose)",
            registry=r)
        self.origin_throughput = Gauge(
            "coldbrew_origin_throughput_bytes_per_second",
            "Origin throughput the last round of the automatic fetch_concurrency measured",
            registry=r)
        self.stale_serves = Counter(
            "coldbrew_stale_serves",
            "Cached versions served without the origin confirming them (it was unreachable), "
            "by what asked: stat (an open), list or expand", ["what"], registry=r)
        self.singleflight_joins = Counter(
            "coldbrew_singleflight_joins",
            "Chunk requests that joined a fetch already in flight instead of starting one",
            registry=r)
        self.inflight_fetches = Gauge(
            "coldbrew_inflight_fetches", "Chunk fetches in progress (the concurrency signal)",
            registry=r)
        self.inflight_requests = Gauge(
            "coldbrew_inflight_requests", "Control API requests in progress", registry=r)
        self.cache_hits = Counter("coldbrew_cache_hits", "Chunk lookups found on disk", registry=r)
        self.cache_misses = Counter("coldbrew_cache_misses", "Chunk lookups not on disk", registry=r)
        self.cache_bytes = Gauge("coldbrew_cache_bytes", "Bytes held in the node cache", registry=r)
        self.cache_capacity = Gauge(
            "coldbrew_cache_capacity_bytes", "Most bytes the cache may hold now", registry=r)
        self.cache_files = Gauge("coldbrew_cache_files", "Files with bytes in the cache", registry=r)
        self.cache_evictions = Counter(
            "coldbrew_cache_evictions", "Files evicted to make room", registry=r)
        self.cache_evicted_bytes = Counter(
            "coldbrew_cache_evicted_bytes", "Bytes evicted to make room", registry=r)
        self.cache_write_errors = Counter(
            "coldbrew_cache_write_errors",
            "Chunks that could not be written to the cache disk (served from memory instead)",
            ["reason"], registry=r)
        self.corrupt_chunks = Counter(
            "coldbrew_corrupt_chunks", "Chunks that failed their digest check, by where",
            ["source"], registry=r)
        self.prewarm_bytes_total = Gauge(
            "coldbrew_prewarm_bytes", "Bytes requested by prewarm jobs not yet finished", registry=r)
        self.prewarm_bytes_done = Gauge(
            "coldbrew_prewarm_bytes_done", "Bytes of unfinished prewarm jobs already cached",
            registry=r)
        self.ready = Gauge("coldbrew_ready", "1 when the agent is ready to serve", registry=r)
        self.p2p_peers = Gauge(
            "coldbrew_p2p_peers", "Other agents found (static list and DNS) that answer", registry=r)
        self.p2p_connections = Gauge(
            "coldbrew_p2p_connections", "BitTorrent connections to peers, over all files", registry=r)
        self.p2p_torrents = Gauge(
            "coldbrew_p2p_torrents", "Files offered to and fetched from peers", registry=r)
        self.p2p_received_bytes = Counter(
            "coldbrew_p2p_received_bytes",
            "Chunk bytes received from peers and verified (origin egress saved)", registry=r)
        self.p2p_sent_bytes = Counter(
            "coldbrew_p2p_sent_bytes", "Chunk bytes served to peers", registry=r)
        self.p2p_peers_banned = Counter(
            "coldbrew_p2p_peers_banned", "Peers banned for sending bytes that failed verification",
            registry=r)
        self.p2p_manifests = Counter(
            "coldbrew_p2p_manifests", "File manifests found, by where (sidecar, peer, built)",
            ["source"], registry=r)
        self.p2p_manifest_checks = Counter(
            "coldbrew_p2p_manifest_checks",
            "Peers' manifests checked end to end against the origin's own checksum, by result "
            "(match, mismatch)", ["result"], registry=r)
        self.p2p_insecure = Gauge(
            "coldbrew_p2p_insecure",
            "1 when P2P runs without TLS on a non-loopback address (p2p_insecure = true)", registry=r)
        self.p2p_refused = Counter(
            "coldbrew_p2p_refused", "Peer connections or requests refused, by why", ["reason"],
            registry=r)
        self.control_refused = Counter(
            "coldbrew_control_refused",
            "Control API requests refused, by why (outside the allowed roots, not an admin)",
            ["reason"], registry=r)
        for source in SOURCES:
            self.bytes_served.labels(source)
            self.corrupt_chunks.labels(source)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample, e.g. ``value('coldbrew_origin_requests_total', op='get', outcome='ok')``."""
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else v
