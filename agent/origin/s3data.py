"""The S3 data plane: ranged GETs in worker threads, read straight into the caller's buffer
or streamed piece by piece into the cache's data file.

Measured here (1 GiB, 8 × 16 MiB ranges, loopback): botocore in threads reading
with ``readinto`` moves bytes socket → our reused chunk buffer with no
intermediate copy and the GIL released while it waits, at ~0.8 CPU-s/GiB;
the same GETs through s3fs/aiobotocore cost ~1.5 CPU-s/GiB in the agent (aiohttp
hands over ``bytes`` pieces that must then be copied into the buffer, all on the
one event-loop thread). On a 2-core node shared with the S3 server that CPU is
the throughput. So object *bytes* come through here, while metadata (HEAD,
LIST) stays on s3fs (:mod:`coldbrew.agent.origin.origin`), which owns error
translation and retries for both.

A chunk bound for the cache is not read whole and then written (:meth:`S3RangeReader.land`):
each 1 MiB piece is handed on to be written while it is still in the CPU's cache. Measured
here, one 16 MiB ``pwrite`` per chunk cost up to 3-4x the CPU of the same bytes in pieces
(``bench/probes/probe_landing.py``; bench/RESULTS.md, "Finding: chunks land in the data file").
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..config import OriginSettings
from ..core.vouch import etag_text


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
            max_pool_connections=max(16, 2 * settings.max_in_flight),
            signature_version=UNSIGNED if settings.anonymous else None,
        )
        session = botocore.session.get_session()
        # Timestamps (LastModified) stay the header's text: botocore parses each with dateutil,
        # ~0.4 ms of CPU per GET measured here, and a GET's is never read (a HEAD's is, by
        # the origin's _mtime_of). The AWS CLI sets the same hook for the same reason.
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
        self._client = session.create_client("s3", endpoint_url=settings.endpoint_url,
                                             region_name=settings.region, config=config)
        self._lock = threading.Lock()

    def read_into(self, bucket: str, key: str, start: int, buf: memoryview | Sequence[memoryview],
                  etag: str) -> tuple[int, str]:
        """Fill ``buf`` from offset ``start``; returns (bytes read, ETag answered).

        ``buf`` may be several buffers, filled one after another by the one GET (a scatter
        read: a load's span lands in its tensors' memory, the bytes between them in scratch).
        Fewer bytes than their total means the body was cut short; the caller decides.
        """
        parts = [buf] if isinstance(buf, memoryview) else list(buf)
        total = sum(len(p) for p in parts)
        resp: dict[str, Any] = self._client.get_object(
            Bucket=bucket, Key=key, Range=f"bytes={start}-{start + total - 1}", IfMatch=etag)
        raw = resp["Body"]._raw_stream  # the urllib3 response
        filled = 0
        try:
            for part in parts:
                n = _fill(raw, part)
                filled += n
                if n < len(part):
                    break  # cut short
        finally:
            _finish(resp, raw, filled == total)
        return filled, resp.get("ETag", etag)

    def land(self, bucket: str, key: str, start: int, buf: memoryview, etag: str,
             write: Callable[[int, memoryview], None]) -> tuple[int, str]:
        """As :meth:`read_into`, but each piece of the body goes to ``write(pos, piece)`` as
        it arrives (``pos`` from 0 in the range; ``buf`` only holds the piece in between).

        Whatever ``write`` raises ends the GET (its connection is dropped) and goes up as is.
        """
        resp: dict[str, Any] = self._client.get_object(
            Bucket=bucket, Key=key, Range=f"bytes={start}-{start + len(buf) - 1}", IfMatch=etag)
        raw = resp["Body"]._raw_stream
        wakeups = BatchedWakeups(raw)
        filled = 0
        try:
            piece = buf[:min(_PIECE, len(buf))]
            while filled < len(buf):
                want = min(len(piece), len(buf) - filled)
                wakeups.batch(len(buf) - filled - want)
                n = _fill(raw, piece[:want])
                write(filled, piece[:n])
                filled += n
                if n < want:
                    break  # cut short
        finally:
            wakeups.batch(0)
            _finish(resp, raw, filled == len(buf) and wakeups.down)
        return filled, resp.get("ETag", etag)

    def head(self, bucket: str, key: str, checksums: bool = False) -> dict[str, Any]:
        """HEAD one object: ``ContentLength``, ``ETag``, ``LastModified``... and with
        ``checksums`` the content checksums the upload stored (``ChecksumSHA256``...)."""
        if checksums:
            return self._client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        return self._client.head_object(Bucket=bucket, Key=key)

    def part_sizes(self, bucket: str, key: str, etag: str) -> list[int]:
        """The sizes of a multipart object's parts, in order (``GetObjectAttributes``)."""
        sizes: list[int] = []
        marker = 0
        while True:
            resp = self._client.get_object_attributes(
                Bucket=bucket, Key=key, ObjectAttributes=["ObjectParts"], MaxParts=1000,
                PartNumberMarker=marker)
            if etag_text(resp.get("ETag", etag)) != etag_text(etag):
                return []  # replaced meanwhile: no check rather than a false one
            parts = resp.get("ObjectParts") or {}
            sizes += [int(part["Size"]) for part in parts.get("Parts") or []]
            if not parts.get("IsTruncated") or len(sizes) >= 10_000:
                return sizes
            marker = int(parts.get("NextPartNumberMarker") or 0)

    def close(self) -> None:
        self._client.close()


#: Most bytes asked of urllib3's own ``readinto`` at once (see :func:`_fill`).
_URLLIB3_PIECE = 1 << 20
#: The piece :meth:`S3RangeReader.land` hands on: small enough to stay in the CPU's cache.
_PIECE = 1 << 20


class BatchedWakeups:
    """SO_RCVLOWAT on a body's socket: its reader is woken once 256 KiB have arrived, not
    for every few KiB. Measured here (bench/probes/probe_landing.py ``lowat``): 0.08-0.12 CPU-s
    less per GiB, in a reader of 0.5-0.8.

    The kernel wakes a sleeping reader once ``lowat`` bytes are queued, whatever it asked
    for (a read of 8 KiB with 100 KiB queued sleeps on). So the mark is only up while at
    least :data:`TAIL_BYTES` (``lowat`` and some) of the body is still to come after the
    piece being read, and it is down again before the connection goes back to the pool
    (the next response's head would wait for bytes that never come). A body trickling in
    slower than 256 KiB per ``read_timeout_s`` times out (and is retried) where it would
    have been read.
    """

    LOWAT = 256 << 10

    def __init__(self, raw: Any) -> None:
        # urllib3 response -> http.client response -> buffered reader -> SocketIO -> socket;
        # where any of it is missing, reads just wake as they always did.
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        self._sock = getattr(getattr(fp, "raw", None), "_sock", None)
        self._mark = 1

    def batch(self, after_this_piece: int) -> None:
        """Set the mark for reading a piece with ``after_this_piece`` body bytes behind it."""
        mark = self.LOWAT if after_this_piece >= TAIL_BYTES else 1
        if mark != self._mark and self._sock is not None:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
                self._mark = mark
            except OSError:
                self._sock = None  # not a socket as we know it: leave it alone from now on

    @property
    def down(self) -> bool:
        """Whether the socket is as it was (if not, its connection must not be reused)."""
        return self._mark == 1


#: Body bytes that must still follow a piece for the low-water mark to be up: the mark, and
#: http.client's 8 KiB of read-ahead with room to spare.
TAIL_BYTES = BatchedWakeups.LOWAT + (64 << 10)


def _finish(resp: dict[str, Any], raw: Any, whole: bool) -> None:
    fp = getattr(raw, "_fp", None)
    if whole and fp is not None and fp.isclosed():
        raw.release_conn()  # the whole body and nothing more: back to the pool
    else:
        resp["Body"].close()  # cut short, failed or more to come: never reuse it


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
