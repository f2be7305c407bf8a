"""libfuse's ``struct fuse_bufvec``, built in C memory for the ``read_buf`` operation.

Why. With ``read`` the bytes cross Python: libfuse hands a buffer, we copy the chunk into
it, libfuse writes it to ``/dev/fuse`` (a second copy, into the kernel). With
``read_buf`` we answer with *where* the bytes are — a file descriptor and an offset —
and libfuse moves them itself: with ``FUSE_CAP_SPLICE_WRITE`` the kernel splices the
cache file's page-cache pages into the FUSE reply without a user-space copy at all;
without it libfuse ``pread``\\ s once into its own buffer. Either way no Python code
touches the bytes of a cached chunk.

Ownership. libfuse frees the vector with ``free()`` after replying, and also frees
the ``mem`` of every piece that is not a file descriptor, so both are ``malloc``'d here.
It never closes a descriptor: the caller keeps each one open until libfuse is done
with it (see ``View`` for how).

Only single-piece vectors are built: ``struct fuse_buf`` grew a field in later libfuse
releases, which changes the stride of the array but not the first element's layout.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

#: enum fuse_buf_flags (fuse_common.h)
FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2
FUSE_BUF_FD_RETRY = 1 << 3
#: fuse_conn_info capability bits (fuse_common.h, libfuse 3)
FUSE_CAP_SPLICE_WRITE = 1 << 7

_libc = ctypes.CDLL(None, use_errno=True)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.restype = None
_libc.free.argtypes = [ctypes.c_void_p]


class FuseBuf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class FuseBufVec(ctypes.Structure):
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", FuseBuf * 1)]


#: Spare room after the vector, in case a libfuse reads fields a newer fuse_buf has.
_SLACK = 64

#: One piece of a reply: (fd, offset in that file, length).
FilePiece = tuple[int, int, int]


def _malloc(n: int) -> int:
    addr = _libc.malloc(n)
    if not addr:
        raise MemoryError(f"malloc({n}) failed")
    ctypes.memset(addr, 0, n)
    return addr


def _vector(buf: FuseBuf) -> int:
    addr = _malloc(ctypes.sizeof(FuseBufVec) + _SLACK)
    vec = FuseBufVec.from_address(addr)
    vec.count, vec.idx, vec.off = 1, 0, 0
    vec.buf[0] = buf
    return addr


def from_file(fd: int, pos: int, size: int) -> int:
    """A vector whose one piece is ``size`` bytes of ``fd`` at ``pos`` (libfuse reads them
    with pread or splice at ``pos``, never the shared file position, and retries a short read
    rather than hand the kernel fewer bytes than the file has)."""
    flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY
    return _vector(FuseBuf(size=size, flags=flags, mem=None, fd=fd, pos=pos))


def from_pieces(pieces: Sequence[FilePiece | bytes | bytearray | memoryview]) -> int:
    """A vector whose one piece is a malloc'd copy of ``pieces`` joined (file ranges are pread)."""
    total = sum(p[2] if isinstance(p, tuple) else len(p) for p in pieces)
    mem = _malloc(max(total, 1))
    try:
        out = (ctypes.c_char * total).from_address(mem)
        view = memoryview(out).cast("B")
        pos = 0
        for piece in pieces:
            if isinstance(piece, tuple):
                fd, at, n = piece
                got = os.preadv(fd, [view[pos:pos + n]], at)
                if got != n:
                    raise OSError(f"short read of a cache file: {got} of {n} bytes at {at}")
            else:
                n = len(piece)
                view[pos:pos + n] = piece
            pos += n
        return _vector(FuseBuf(size=total, flags=0, mem=mem, fd=-1, pos=0))
    except BaseException:
        _libc.free(mem)
        raise


def hand_over(bufpp: object, addr: int) -> None:
    """Store the vector at ``addr`` into libfuse's ``struct fuse_bufvec **``."""
    ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = addr


def read_back(addr: int) -> bytes:
    """The bytes a vector stands for (tests and diagnostics; libfuse does this itself)."""
    buf = FuseBufVec.from_address(addr).buf[0]
    if buf.flags & FUSE_BUF_IS_FD:
        return os.pread(buf.fd, buf.size, buf.pos)
    return ctypes.string_at(buf.mem, buf.size)


def release(addr: int) -> None:
    """Free a vector as libfuse would (its memory piece too; never a descriptor)."""
    buf = FuseBufVec.from_address(addr).buf[0]
    if not buf.flags & FUSE_BUF_IS_FD and buf.mem:
        _libc.free(buf.mem)
    _libc.free(addr)
