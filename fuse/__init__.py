"""coldbrew.fuse: the read-only POSIX view of the origin, mounted by the agent (``--mount``).

:mod:`.view` answers the FUSE operations from the agent's fetcher and node cache;
:mod:`.mount` mounts it with libfuse3 (mfusepy), tunes read-ahead and cleans stale
mounts; :mod:`.metrics` holds its Prometheus metrics. Nothing here is imported unless
a mount is configured, so the agent and the loader run without mfusepy or libfuse.
"""
