"""A file's disk blocks, asked for ahead of its bytes or given back (``fallocate(2)``).

Used by the node cache's data files and the loader's write-through files: both write a
file's bytes at their own offsets, in pieces, from many threads.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Callable

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int]:
    # glibc's fallocate(), not os.posix_fallocate: that one writes zeros over the range
    # where the filesystem cannot allocate, which is the cost this is meant to save.
    fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return fallocate


def allocate(fd: int, offset: int, length: int) -> None:
    """Give ``[offset, offset+length)`` its disk blocks now, before its bytes are written.

    A full disk then fails here (OSError, ENOSPC) before any byte is fetched or written,
    rather than part-way through; the range also gets its blocks in one extent, and the
    writes that follow skip the filesystem's per-block delayed allocation (measured here:
    a 1 GiB prewarm 1.20 vs 1.34 s, agent 0.88 vs 0.99 CPU-s; bench/RESULTS.md, "Finding: blocks allocated ahead").
    A filesystem that cannot allocate ahead (ext2/3-style files, some network and FUSE
    filesystems: EOPNOTSUPP) is left to allocate as the bytes are written.
    """
    if length and _fallocate()(fd, 0, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give the disk blocks of ``[offset, offset+length)`` back, keeping the file's size.

    False where the filesystem cannot (the bytes then stay until the range is rewritten or
    the file removed: only space is lost).
    """
    return _fallocate()(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) == 0
