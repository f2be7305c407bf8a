"""The S3 data plane: ranged GETs in worker threads, read straight into the caller's buffer
or landed straight in the cache's data file.

Measured here (1 GiB, 8 × 16 MiB ranges, loopback): botocore in threads reading
with ``readinto`` moves bytes socket → our reused chunk buffer with no
intermediate copy and the GIL released while it waits, at ~0.8 CPU-s/GiB;
the same GETs through s3fs/aiobotocore cost ~1.5 CPU-s/GiB in the agent (aiohttp
hands over ``bytes`` pieces that must then be copied into the buffer, all on the
one event-loop thread). On a 2-core node shared with the S3 server that CPU is
the throughput. So object *bytes* come through here, while metadata (HEAD,
LIST) stays on s3fs (:mod:`coldbrew.agent.origin`), which owns error
translation and retries for both.

A chunk bound for the cache need not pass through a buffer at all: over plain HTTP (an
in-cluster MinIO, SeaweedFS or Ceph RGW; the demo) :meth:`S3RangeReader.land` splices the
body from the socket into the data file, and the kernel copies each byte once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from .config import OriginSettings
from .errors import CacheError

log = logging.getLogger("coldbrew.s3data")


@dataclass
class _Body:
    """One GET's body: the urllib3 response, http.client's under it, what was read of it."""

    raw: Any
    fp: Any
    etag: str
    filled: int = 0


class _SpliceRefused(CacheError):
    """splice(2) into the cache's data file is not supported there (not a full or bad disk)."""


class S3RangeReader:
    """Blocking ``GET bucket/key Range`` into a memoryview. Thread-safe (one client, pooled)."""

    def __init__(self, settings: OriginSettings) -> None:
        import botocore.session
        from botocore import UNSIGNED
        from botocore.config import Config

        config = Config(
            # Retries are the origin's (counted, jittered, If-Match aware): none in here.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            max_pool_connections=max(16, 2 * settings.fetch_concurrency),
            signature_version=UNSIGNED if settings.anonymous else None,
        )
        session = botocore.session.get_session()
        self._client = session.create_client("s3", endpoint_url=settings.endpoint_url,
                                             region_name=settings.region, config=config)
        self._local = threading.local()  # each worker thread's splice pipe
        self._splice_files = True  # until the cache's filesystem refuses it

    def read_into(self, bucket: str, key: str, start: int, buf: memoryview, etag: str) -> tuple[int, str]:
        """Fill ``buf`` from offset ``start``; returns (bytes read, ETag answered).

        Fewer bytes than ``len(buf)`` means the body was cut short; the caller decides.
        """
        with self._get(bucket, key, start, len(buf), etag) as body:
            body.filled = _fill(body.raw, buf)
        return body.filled, body.etag

    def land(self, bucket: str, key: str, start: int, buf: memoryview, etag: str,
             fd: int, offset: int) -> tuple[int, str]:
        """As :meth:`read_into`, but the body lands in file ``fd`` at ``offset``.

        Over plain TCP the socket's bytes are spliced into the file (:func:`_splice_body`);
        over TLS they can only come through user memory: read into ``buf``, then written.
        A failure to write the file raises :class:`CacheError`; the connection is then
        dropped, and the caller decides whether to fetch again into memory.
        """
        with self._get(bucket, key, start, len(buf), etag) as body:
            sock = _plain_socket(body.fp, len(buf)) if self._splice_files else None
            try:
                if sock is not None:
                    body.filled = _splice_body(body.fp, sock, fd, offset, len(buf), self._pipe())
                else:
                    body.filled = _fill(body.raw, buf)
                    _pwrite_all(fd, buf[:body.filled], offset)
            except BaseException as e:
                self._drop_pipe()  # it may hold bytes of a body that is not ours any more
                if isinstance(e, _SpliceRefused):
                    self._splice_files = False
                    log.warning("the cache's filesystem does not take splice(2); chunks go "
                                "through memory from now on", extra={"error": str(e)})
                raise
        return body.filled, body.etag

    @contextlib.contextmanager
    def _get(self, bucket: str, key: str, start: int, length: int, etag: str) -> Iterator[_Body]:
        """GET one range; on leaving, its connection goes back to the pool only if the body
        was read whole (a body cut short, failed or unread must never meet the next GET)."""
        resp: dict[str, Any] = self._client.get_object(
            Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}", IfMatch=etag)
        raw = resp["Body"]._raw_stream  # the urllib3 response
        body = _Body(raw, getattr(raw, "_fp", None), resp.get("ETag", etag))
        try:
            yield body
        finally:
            if body.filled == length and body.fp is not None and body.fp.isclosed():
                raw.release_conn()
            else:
                resp["Body"].close()

    def _pipe(self) -> tuple[int, int]:
        pipe = getattr(self._local, "pipe", None)
        if pipe is None:
            pipe = self._local.pipe = os.pipe()
            try:  # fewer, larger moves; the default 64 KiB still works, just slower
                fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass
        return pipe

    def _drop_pipe(self) -> None:
        pipe = getattr(self._local, "pipe", None)
        if pipe is not None:
            self._local.pipe = None
            for end in pipe:
                os.close(end)

    def head(self, bucket: str, key: str) -> dict[str, Any]:
        """HEAD one object: ``ContentLength``, ``ETag``, ``LastModified``..."""
        return self._client.head_object(Bucket=bucket, Key=key)

    def close(self) -> None:
        self._client.close()


#: Most bytes asked of urllib3's own ``readinto`` at once (see :func:`_fill`).
_URLLIB3_PIECE = 1 << 20


def _fill(raw: Any, buf: memoryview) -> int:
    """Read the body into ``buf``; returns how many bytes came (fewer: cut short).

    http.client's ``readinto`` (the ``_fp`` under urllib3's response) lands socket bytes
    straight in ``buf``. urllib3 2.x's own ``readinto`` reads into a new ``bytes`` of the
    size asked and copies it over: measured here (perf), that was a 16 MiB allocation of
    fresh memory plus a copy per chunk, ~10 % of the agent's CPU in a prewarm. It is the
    fallback, in 1 MiB pieces, where ``_fp`` is not there.
    """
    fp = getattr(raw, "_fp", None)
    direct = getattr(fp, "readinto", None)
    filled = 0
    while filled < len(buf):
        if direct is not None:
            n = direct(buf[filled:])
        else:
            n = raw.readinto(buf[filled:filled + _URLLIB3_PIECE])
        if not n:
            break
        filled += n
    return filled


#: The pipe a worker thread splices through: bytes move socket -> pipe -> file.
_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named only from Python 3.10 on Linux
#: What splice(2) into a file fails with where the file or its filesystem cannot take it
#: (EINVAL is also an O_APPEND file).
_NO_SPLICE_ERRNOS = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def _plain_socket(fp: Any, want: int) -> Any:
    """The socket under http.client's response ``fp`` if its body can be spliced, else None.

    Only a plain-TCP body of exactly ``want`` bytes (Content-Length, not chunked) can: TLS
    bytes must be decrypted in user memory, and a chunked body has framing in it.
    """
    import ssl

    buffered = getattr(fp, "fp", None)
    sock = getattr(getattr(buffered, "raw", None), "_sock", None)
    if sock is None or isinstance(sock, ssl.SSLSocket):
        return None
    if getattr(fp, "chunked", True) or getattr(fp, "length", None) != want:
        return None
    return sock


def _splice_body(fp: Any, sock: Any, fd: int, offset: int, want: int,
                 pipe: tuple[int, int]) -> int:
    """Move the body from the socket into ``fd`` at ``offset``; returns bytes moved.

    Measured here (``bench/probe_landing.py``, 1 GiB): socket -> pipe -> page cache costs
    the client ~0.8 CPU-s against ~1.0-1.3 for ``recv_into`` a buffer and ``pwrite`` it,
    because the bytes are copied once (in the kernel, from the socket's pages to the
    file's) instead of twice through a buffer that no cache holds.
    """
    buffered = fp.fp
    head = buffered.read(len(buffered.peek(1)[:want]))  # what http.client read ahead
    _pwrite_all(fd, memoryview(head), offset)
    got, sock_fd, timeout = len(head), sock.fileno(), sock.gettimeout()
    while got < want:
        try:
            n = os.splice(sock_fd, pipe[1], min(_PIPE_BYTES, want - got))
        except BlockingIOError:  # a socket with a timeout is non-blocking underneath
            if not select.select([sock_fd], [], [], timeout)[0]:
                raise TimeoutError(f"no body bytes for {timeout} s") from None
            continue
        if not n:
            break  # the server closed early: a short body, the caller's to judge
        _drain(pipe[0], fd, offset + got, n)
        got += n
    if got == want:
        fp.length = 0
        fp.read()  # nothing left: http.client closes its side, so the connection is reusable
    return got


def _drain(pipe_r: int, fd: int, offset: int, n: int) -> None:
    moved = 0
    while moved < n:
        try:
            step = os.splice(pipe_r, fd, n - moved, offset_dst=offset + moved)
        except OSError as e:
            kind = _SpliceRefused if e.errno in _NO_SPLICE_ERRNOS else CacheError
            raise kind(f"cannot write to the cache disk: {e.strerror or e}") from e
        if not step:  # cannot happen with the bytes in the pipe; never spin on it
            raise CacheError(f"the cache disk took no bytes at offset {offset + moved}")
        moved += step


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as e:
        raise CacheError(f"cannot write to the cache disk: {e.strerror or e}") from e
