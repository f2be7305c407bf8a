"""FUSE passthrough: the kernel reads a complete, checked file straight from the cache's data file.

With passthrough (Linux >= 6.9, libfuse >= 3.16) an open file is tied to a *backing file*
and the kernel serves its reads (and mmap) from that file's own page cache: no request
reaches the agent and no second copy of the model sits in the page cache. Measured here
(bench/RESULTS.md) a first read through the mount runs at the speed of reading the data
file itself, against ~0.1-0.2x through ``read_buf``.

How it is asked for from mfusepy's high-level API (the binding has no helper for it):

* at init, ``FUSE_CAP_PASSTHROUGH`` goes into ``conn.want`` and
  ``max_backing_stack_depth = 1`` (the mount sits on one ordinary filesystem);
* at open, ``ioctl(FUSE_DEV_IOC_BACKING_OPEN)`` on the session's ``/dev/fuse``
  descriptor registers the data file (needs CAP_SYS_ADMIN) and returns an id, which goes
  into ``fuse_file_info.backing_id``: libfuse then answers the open with
  ``FOPEN_PASSTHROUGH``. mfusepy does not name that field: it is the 32 bits right after
  ``poll_events`` in libfuse >= 3.16;
* ``keep_cache`` and ``direct_io`` stay 0 (the kernel fails such an open with EIO);
* the id is closed (``FUSE_DEV_IOC_BACKING_CLOSE``) when the last file opened with it is
  released; the kernel keeps its own reference to the backing file while any is open.

The kernel's rules per inode (Linux 6.18, fs/fuse/iomode.c): while an inode is open in
passthrough mode, every open of it must pass through to the same backing file (any other
open, ``direct_io`` included, fails with EIO); and a passthrough open is refused while the
inode is open with the page cache (a cached open, or an mmap of a ``direct_io`` one).
:mod:`.view` keeps to both.

This module does not import mfusepy; :mod:`.mount` hands it the loaded binding.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import struct
import threading
from types import ModuleType
from typing import Any

log = logging.getLogger("coldbrew.fuse")

FUSE_CAP_PASSTHROUGH = 1 << 29
#: libfuse's FUSE_CAP_DIRECT_IO_ALLOW_MMAP (Linux 6.6+): shared mmap of direct_io files.
FUSE_CAP_DIRECT_IO_ALLOW_MMAP = 1 << 28
#: _IOW(229, 1, struct fuse_backing_map {int32 fd; uint32 flags; uint64 padding})
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
#: _IOW(229, 2, uint32 backing_id)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502
#: The first libfuse that knows ``backing_id`` and passes FOPEN_PASSTHROUGH on.
MIN_LIBFUSE = (3, 16)


def supported_by(mfusepy: ModuleType) -> str | None:
    """None if this libfuse can pass files through; else why not (for the log)."""
    version = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)
    if version < MIN_LIBFUSE:
        return (f"libfuse {version[0]}.{version[1]} is older than 3.16 (./dev setup builds 3.17 "
                "into <venv>/libfuse; FUSE_LIBRARY_PATH names another)")
    return None


class Passthrough:
    """Backing files registered with the kernel, from the session's /dev/fuse descriptor."""

    def __init__(self, mfusepy: ModuleType) -> None:
        lib = mfusepy._libfuse
        lib.fuse_get_session.restype = ctypes.c_void_p
        lib.fuse_get_session.argtypes = [ctypes.c_void_p]
        lib.fuse_session_fd.restype = ctypes.c_int
        lib.fuse_session_fd.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._id_at = mfusepy.fuse_file_info.poll_events.offset + 4
        self._session_fd: int | None = None
        self._lock = threading.Lock()
        #: Turned off for good after the kernel refuses (e.g. no CAP_SYS_ADMIN).
        self.enabled = True

    def _fd(self) -> int:
        # Only valid inside a libfuse callback (it reads the calling thread's context).
        if self._session_fd is None:
            with self._lock:
                if self._session_fd is None:
                    fuse = self._lib.fuse_get_context().contents.fuse
                    self._session_fd = self._lib.fuse_session_fd(self._lib.fuse_get_session(fuse))
        return self._session_fd

    def register(self, fd: int) -> int | None:
        """The kernel's id for backing file ``fd``; None (and passthrough off) if it refuses."""
        try:
            arg = bytearray(struct.pack("iIQ", fd, 0, 0))
            return fcntl.ioctl(self._fd(), FUSE_DEV_IOC_BACKING_OPEN, arg, True)
        except Exception as e:
            self.enabled = False
            why = ("the agent lacks CAP_SYS_ADMIN" if getattr(e, "errno", None) == errno.EPERM
                   else f"registering a backing file failed: {e}")
            log.warning("FUSE passthrough off (%s); reads go through the agent", why)
            return None

    def unregister(self, backing_id: int) -> None:
        try:
            fcntl.ioctl(self._fd(), FUSE_DEV_IOC_BACKING_CLOSE, struct.pack("I", backing_id))
        except OSError as e:  # the connection is gone (unmounted): the kernel dropped it already
            log.debug("closing a FUSE backing id failed", extra={"error": str(e)})

    def answer(self, fi: Any, backing_id: int) -> None:
        """Make libfuse answer this open with passthrough to ``backing_id``."""
        fi.keep_cache = 0
        fi.direct_io = 0
        ctypes.c_int32.from_address(ctypes.addressof(fi) + self._id_at).value = backing_id
