"""coldbrew.fuse: the read-only POSIX view of the origin, mounted by the agent (``--mount``).

:mod:`.view` answers the FUSE operations and delegates: :mod:`.namespace` (inodes and
listings), :mod:`.attrs` (stat), :mod:`.handles` (open files and their pins), :mod:`.modes`
(passthrough, cached or direct_io per path), :mod:`.reads` (the read path and read-ahead),
:mod:`.datafiles` (checked data files), :mod:`.bridge` (calls into the agent's loop);
:mod:`.mount` mounts it with libfuse3 (mfusepy), tunes read-ahead and cleans stale
mounts; :mod:`.metrics` holds its Prometheus metrics. May import the agent's fetch, cache,
origin, core and shared modules (tests/test_layering.py). Nothing here is imported unless
a mount is configured, so the agent and the loader run without mfusepy or libfuse.
"""
