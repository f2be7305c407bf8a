"""coldbrew: a cold-start accelerator for AI model serving.

Subpackages: :mod:`coldbrew.agent` (node daemon, cache, fetcher, control API),
:mod:`coldbrew.fuse` (read-only POSIX view), :mod:`coldbrew.loader` (safetensors
straight into device memory).
"""

__version__ = "0.1.0"
