"""A fault-injecting HTTP/1.1 reverse proxy for testing coldbrew against S3.

Tests of the agent put :class:`FaultProxy` between an S3 client (botocore,
aiohttp/s3fs: keep-alive connections) and a real S3-compatible server on
loopback, then tell it, at runtime, to misbehave: answer ``503 SlowDown``,
stall, cut a body short, flip a byte, reset the connection, or cap bandwidth.
It counts every request and every fault it fired, so a fault test can prove
that its fault actually happened instead of passing vacuously::

    with FaultProxy("127.0.0.1", s3_port) as p:
        p.add_fault(Fault.status(503, "SlowDown"), method="GET", ranged_only=True, count=3)
        p.add_fault(Fault.truncate(1000), path=r"/bucket/model\\.bin", count=1)
        ...  # point the client at p.url
        assert p.counts["fired"]["status"] == 3

Design: one asyncio loop in a daemon thread; each client connection gets its
own upstream connection (opened lazily, reused while both sides keep alive).
Only the request/response heads are parsed; bodies are forwarded as raw
pieces of up to 1 MiB, so multi-GiB objects stream through in bounded memory.
Headers, including ``Host``, are forwarded untouched so SigV4 signatures stay
valid; only ``Expect: 100-continue`` is answered by the proxy itself.
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import http
import logging
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from re import Pattern

__all__ = ["Fault", "FaultProxy", "Rule"]

log = logging.getLogger(__name__)

#: Largest body piece read and written in one go.
PIECE = 1 << 20
#: StreamReader limit: caps one header block, and (x2) how much a reader buffers
#: before it stops reading the socket, which is what bounds memory per connection.
_READ_LIMIT = 256 << 10
#: Write-buffer high-water mark per transport; drain() waits above it.
_WRITE_HIGH = 1 << 20

_ACTIONS = ("status", "delay", "truncate", "corrupt", "reset")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Plausible S3 error codes and messages for Fault.status() when none is given.
_S3_ERRORS = {
    400: ("BadRequest", "Bad Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    416: ("InvalidRange", "The requested range is not satisfiable"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """What to do to a matching request. Build one with the class methods."""

    action: str
    code: int = 0
    s3_code: str = ""
    message: str = ""
    seconds: float = 0.0
    after_bytes: int | None = None
    offset: int = 0

    @classmethod
    def status(cls, code: int, s3_code: str | None = None, message: str | None = None) -> Fault:
        """Answer ``code`` with an S3 XML error body, without contacting upstream."""
        default_code, default_msg = _S3_ERRORS.get(code, (_phrase(code).replace(" ", ""), _phrase(code)))
        return cls("status", code=code, s3_code=s3_code or default_code, message=message or default_msg)

    @classmethod
    def delay(cls, seconds: float, after_bytes: int | None = None) -> Fault:
        """Wait ``seconds`` before forwarding the request; with ``after_bytes``,
        forward the response head and that many body bytes first, then stall
        mid-body (for read-timeout tests)."""
        return cls("delay", seconds=float(seconds), after_bytes=after_bytes)

    @classmethod
    def truncate(cls, after_bytes: int) -> Fault:
        """Forward the response head unchanged, then close after ``after_bytes`` body bytes."""
        return cls("truncate", after_bytes=int(after_bytes))

    @classmethod
    def corrupt(cls, offset: int = 0) -> Fault:
        """Flip (XOR 0xFF) the response body byte at ``offset``; the length stays right."""
        return cls("corrupt", offset=int(offset))

    @classmethod
    def reset(cls) -> Fault:
        """Abort the client connection with a TCP RST, without answering."""
        return cls("reset")


class Rule:
    """A fault plus the requests it applies to; returned by :meth:`FaultProxy.add_fault`.

    ``remaining`` is how many more requests it will take (None: unlimited);
    ``applied`` how many it took so far. Both are only changed under the
    proxy's lock; reading them from another thread is fine.
    """

    def __init__(self, fault: Fault, method: str | None, path: str | Pattern | None,
                 ranged_only: bool, count: int | None, probability: float, seed: int | None):
        if count is not None and count < 1:
            raise ValueError("count must be >= 1, or None for unlimited")
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        self.fault = fault
        self.method = method.upper() if method else None
        self.path = re.compile(path) if isinstance(path, str) else path
        self.ranged_only = ranged_only
        self.remaining = count
        self.probability = probability
        self._rng = random.Random(seed)
        self.applied = 0

    def matches(self, method: str, target: str, ranged: bool) -> bool:
        if self.remaining == 0:
            return False
        if self.method is not None and method != self.method:
            return False
        if self.ranged_only and not ranged:
            return False
        return self.path is None or self.path.search(target) is not None

    def take(self) -> bool:
        """Roll the dice and consume one count; caller holds the proxy lock."""
        if self.probability < 1.0 and self._rng.random() >= self.probability:
            return False
        if self.remaining is not None:
            self.remaining -= 1
        self.applied += 1
        return True

    def __repr__(self) -> str:
        return (f"Rule({self.fault!r}, method={self.method}, path={self.path and self.path.pattern!r}, "
                f"ranged_only={self.ranged_only}, remaining={self.remaining}, applied={self.applied})")


# --------------------------------------------------------------------------- HTTP heads


class _Head:
    """A parsed request or response head; ``raw`` is kept to forward as-is."""

    __slots__ = ("raw", "start", "headers")

    def __init__(self, raw: bytes):
        lines = raw.decode("latin-1").split("\r\n")
        self.raw = raw
        self.start = lines[0].split(" ", 2)
        if len(self.start) < 2:
            raise ValueError(f"malformed start line {lines[0]!r}")
        self.headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()

    def get(self, name: str) -> str:
        return self.headers.get(name, "")

    def framing(self) -> tuple[str, int]:
        """("chunked", 0), ("length", n) or ("none", 0)."""
        if "chunked" in self.get("transfer-encoding").lower():
            return "chunked", 0
        length = self.get("content-length")
        return ("length", int(length)) if length else ("none", 0)

    def keep_alive(self, version: str) -> bool:
        conn = self.get("connection").lower()
        if version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """One header block, or None on a clean EOF between messages."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        raise ConnectionError("peer closed inside a header block") from e
    except asyncio.LimitOverrunError as e:
        raise ConnectionError("header block too large") from e


def _strip_expect(raw: bytes) -> bytes:
    # The proxy answers 100-continue itself, so upstream must not send its own.
    return b"\r\n".join(line for line in raw.split(b"\r\n") if not line.lower().startswith(b"expect:"))


def _phrase(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def _error_response(fault: Fault, resource: str, request_id: int, head_only: bool, keep: bool) -> bytes:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{_xml(fault.s3_code)}</Code><Message>{_xml(fault.message)}</Message>"
        f"<Resource>{_xml(resource)}</Resource><RequestId>faultproxy-{request_id}</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {fault.code} {_phrase(fault.code)}\r\n"
        f"Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: faultproxy-{request_id}\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"Server: faultproxy\r\n"
        f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
    ).encode()
    return head if head_only else head + body


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: SO_LINGER with a zero timeout."""
    sock = writer.get_extra_info("socket")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError):
        pass
    writer.transport.abort()


async def _copy_exact(src: asyncio.StreamReader, dst: asyncio.StreamWriter, n: int) -> int:
    """Forward exactly n bytes; returns n."""
    total = n
    while n > 0:
        data = await src.read(min(n, PIECE))
        if not data:
            raise ConnectionError("peer closed inside a body")
        dst.write(data)
        await dst.drain()
        n -= len(data)
    return total


async def _copy_chunked(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                        copy_data: Callable[[int], Awaitable[bool]]) -> bool:
    """Forward a chunked body with its framing; ``copy_data(n)`` moves each chunk's
    payload and returns False to stop (truncation). True when the body is complete."""
    while True:
        line = await src.readuntil(b"\r\n")
        dst.write(line)
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                line = await src.readuntil(b"\r\n")
                dst.write(line)
                if line == b"\r\n":
                    return True
        if not await copy_data(size):
            return False
        dst.write(await src.readexactly(2))


class _Effects:
    """Per-response body state for truncate / corrupt / mid-body delay / its own pace."""

    __slots__ = ("pos", "paced_until", "cut_at", "flip_at", "stall_at", "stall_s")

    def __init__(self, fault: Fault | None):
        self.pos = 0
        self.paced_until = 0.0
        self.cut_at = self.flip_at = self.stall_at = None
        self.stall_s = 0.0
        if fault is None:
            return
        if fault.action == "truncate":
            self.cut_at = fault.after_bytes
        elif fault.action == "corrupt":
            self.flip_at = fault.offset
        elif fault.action == "delay" and fault.after_bytes is not None:
            self.stall_at, self.stall_s = fault.after_bytes, fault.seconds


class _Upstream:
    """The upstream connection paired with one client connection."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def ensure(self) -> bool:
        """Connect unless a live connection exists; True if it is a new one."""
        if self.writer is not None and not self.writer.is_closing() and not self.reader.at_eof():
            return False
        self.close()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=_READ_LIMIT)
        self.writer.transport.set_write_buffer_limits(high=_WRITE_HIGH)
        return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class _UpstreamDown(Exception):
    """Upstream refused the connection: answer 502."""


# --------------------------------------------------------------------------- proxy


@dataclass(frozen=True)
class Served:
    """One request as the proxy saw it: when it came and when its answer was sent."""

    method: str
    target: str
    range: str  # the Range header, "" without one
    began: float  # time.monotonic()
    ended: float


def _zero_counts() -> dict:
    return {
        "requests": 0,             # client requests seen (faulted or not)
        "by_method": {},           # "GET" -> n
        "ranged_gets": 0,          # GETs carrying a Range header
        "forwarded": 0,            # requests answered by upstream
        "connections": 0,          # client connections accepted
        "status_codes": {},        # status code sent to clients -> n (synthetic ones too)
        "response_body_bytes": 0,  # upstream response body bytes forwarded to clients
        "request_body_bytes": 0,   # client request body bytes forwarded upstream
        "fired": {a: 0 for a in _ACTIONS},
    }


class FaultProxy:
    """HTTP/1.1 reverse proxy on 127.0.0.1 that injects faults on command.

    Thread-safe from the test thread: :meth:`add_fault`, :meth:`clear_faults`,
    :attr:`counts`, :meth:`reset_counts`, :attr:`bandwidth`.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, bandwidth: float | None = None):
        self.upstream_host = upstream_host
        self.upstream_port = int(upstream_port)
        self.port: int | None = None
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._counts = _zero_counts()
        self._timeline: list[Served] = []
        self._bandwidth = bandwidth
        self._bw_next = 0.0  # token bucket as a virtual clock: when the link is next free
        #: Cap on each response body's own rate, bytes/s (None: none): one TCP connection of
        #: a long-haul link, whose window bounds it whatever the others do.
        self.connection_bandwidth: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("FaultProxy did not start within 10 s")
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error
        return self

    def stop(self) -> None:
        """Stop listening, drop every connection, join the thread. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(asyncio.start_server(
                self._on_client, "127.0.0.1", 0, limit=_READ_LIMIT, backlog=512))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:  # surfaced to start()'s caller
            self._start_error = e
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    # ------------------------------------------------------------------ control

    def add_fault(self, fault: Fault, *, method: str | None = None, path: str | Pattern | None = None,
                  ranged_only: bool = False, count: int | None = None,
                  probability: float = 1.0, seed: int | None = None) -> Rule:
        """Apply ``fault`` to matching requests; rules are tried in the order added
        and the first that matches (and wins its probability roll) applies.

        ``path`` is a regex searched in the request target (path + query string);
        ``count`` None means unlimited; ``seed`` seeds this rule's own RNG.
        """
        rule = Rule(fault, method, path, ranged_only, count, probability, seed)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_faults(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def counts(self) -> dict:
        """A snapshot (deep copy) of the counters; see :func:`_zero_counts` for keys."""
        with self._lock:
            return copy.deepcopy(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts = _zero_counts()
            self._timeline = []

    @property
    def timeline(self) -> list[Served]:
        """Every request served since the last :meth:`reset_counts`, in the order they ended."""
        with self._lock:
            return list(self._timeline)

    @property
    def bandwidth(self) -> float | None:
        return self._bandwidth

    @bandwidth.setter
    def bandwidth(self, bytes_per_s: float | None) -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("bandwidth must be > 0, or None for unlimited")
        self._bandwidth = bytes_per_s  # a plain store: atomic, read by the loop per piece

    def set_bandwidth(self, bytes_per_s: float | None) -> None:
        """Cap the total response-body throughput over all connections (None: unlimited)."""
        self.bandwidth = bytes_per_s

    # ------------------------------------------------------------------ bookkeeping

    def _select(self, req: _Head) -> tuple[Fault | None, int]:
        """Count the request and pick the fault for it; returns (fault, request number)."""
        method, target = req.start[0].upper(), req.start[1]
        ranged = "range" in req.headers
        with self._lock:
            c = self._counts
            c["requests"] += 1
            c["by_method"][method] = c["by_method"].get(method, 0) + 1
            if ranged and method == "GET":
                c["ranged_gets"] += 1
            number = c["requests"]
            for rule in self._rules:
                if rule.matches(method, target, ranged) and rule.take():
                    return rule.fault, number
        return None, number

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _fire(self, action: str) -> None:
        with self._lock:
            self._counts["fired"][action] += 1

    def _note_status(self, code: int) -> None:
        with self._lock:
            codes = self._counts["status_codes"]
            codes[code] = codes.get(code, 0) + 1

    # ------------------------------------------------------------------ serving

    async def _on_client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._count("connections")
        cwriter.transport.set_write_buffer_limits(high=_WRITE_HIGH)
        up = _Upstream(self.upstream_host, self.upstream_port)
        try:
            while True:
                raw = await _read_head(creader)
                if raw is None:
                    return
                req = _Head(raw)
                fault, number = self._select(req)
                began = time.monotonic()
                keep = await self._handle(req, fault, number, creader, cwriter, up)
                with self._lock:
                    self._timeline.append(Served(req.start[0].upper(), req.start[1],
                                                 req.get("range"), began, time.monotonic()))
                if not keep:
                    return
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a peer went away or spoke nonsense: drop the connection, as a server would
        except asyncio.CancelledError:
            # Only stop() cancels these tasks; ending normally keeps asyncio's stream
            # callback from logging the cancellation as an error.
            pass
        except Exception:
            log.exception("faultproxy: unexpected error")
        finally:
            up.close()
            cwriter.close()
            self._tasks.discard(task)

    async def _handle(self, req: _Head, fault: Fault | None, number: int,
                      creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter, up: _Upstream) -> bool:
        """Serve one request; True to keep the client connection."""
        action = fault.action if fault else None
        if action == "reset":
            self._fire("reset")
            _abort(cwriter)
            return False
        if action == "status":
            self._fire("status")
            return await self._answer_status(req, fault, number, creader, cwriter)
        if action == "delay" and fault.after_bytes is None:
            self._fire("delay")
            await asyncio.sleep(fault.seconds)
        try:
            return await self._forward(req, fault, creader, cwriter, up)
        except _UpstreamDown:
            bad_gateway = Fault.status(502, "BadGateway", "faultproxy could not reach upstream")
            cwriter.write(_error_response(bad_gateway, req.start[1], number, req.start[0] == "HEAD", False))
            self._note_status(502)
            await cwriter.drain()
            return False

    async def _answer_status(self, req: _Head, fault: Fault, number: int,
                             creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> bool:
        version = req.start[2] if len(req.start) > 2 else "HTTP/1.1"
        expect = req.get("expect").lower() == "100-continue"
        # A client waiting for 100-continue will not send its body after an error,
        # so the stream's framing is unknown: answer, then close. Otherwise drain the
        # body so the connection can stay alive, as S3 does.
        keep = req.keep_alive(version) and not expect
        if not expect:
            await self._discard_body(req, creader)
        self._note_status(fault.code)
        cwriter.write(_error_response(fault, req.start[1], number, req.start[0] == "HEAD", keep))
        await cwriter.drain()
        if not keep and expect:
            await self._linger(creader, cwriter)
        return keep

    async def _discard_body(self, req: _Head, creader: asyncio.StreamReader) -> None:
        kind, length = req.framing()

        async def skip(n: int) -> bool:
            while n > 0:
                data = await creader.read(min(n, PIECE))
                if not data:
                    raise ConnectionError("client closed inside a body")
                n -= len(data)
            return True

        if kind == "chunked":
            await _copy_chunked(creader, _NullWriter(), skip)
        elif length:
            await skip(length)

    @staticmethod
    async def _linger(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        # Half-close and read until the client closes: closing with unread input
        # would send RST, which can destroy the error response before it is read.
        try:
            cwriter.write_eof()
            async with asyncio.timeout(2.0):
                while await creader.read(PIECE):
                    pass
        except (TimeoutError, ConnectionError, OSError):
            pass

    async def _forward(self, req: _Head, fault: Fault | None,
                       creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter, up: _Upstream) -> bool:
        version = req.start[2] if len(req.start) > 2 else "HTTP/1.1"
        resp = await self._exchange(req, creader, cwriter, up)
        code = int(resp.start[1])
        self._note_status(code)
        cwriter.write(resp.raw)
        complete = await self._forward_body(req, resp, code, fault, cwriter, up)
        await cwriter.drain()
        if not complete:
            return False  # truncated or read-to-EOF: the caller closes both sides
        resp_keep = resp.keep_alive(resp.start[0])
        if not resp_keep:
            up.close()
        return req.keep_alive(version) and resp_keep

    async def _exchange(self, req: _Head, creader: asyncio.StreamReader,
                        cwriter: asyncio.StreamWriter, up: _Upstream) -> _Head:
        """Send the request upstream and return the final response head."""
        expect = req.get("expect").lower() == "100-continue"
        head = _strip_expect(req.raw) if expect else req.raw
        kind, length = req.framing()
        has_body = kind == "chunked" or length > 0
        for attempt in (0, 1):
            try:
                fresh = await up.ensure()
            except OSError as e:
                raise _UpstreamDown() from e
            try:
                up.writer.write(head)
                if expect and attempt == 0:
                    cwriter.write(_CONTINUE)
                if kind == "chunked":
                    await _copy_chunked(creader, up.writer, self._request_piece(creader, up.writer))
                elif length:
                    self._count("request_body_bytes", await _copy_exact(creader, up.writer, length))
                await up.writer.drain()
                resp = await self._response_head(up.reader)
                self._count("forwarded")  # once per request, even if a stale connection was retried
                return resp
            except (ConnectionError, asyncio.IncompleteReadError):
                up.close()
                # A reused keep-alive connection the server had already closed:
                # retry once, but only when no body was consumed from the client.
                if fresh or has_body or attempt:
                    raise
        raise AssertionError("unreachable")

    def _request_piece(self, creader, uwriter) -> Callable[[int], Awaitable[bool]]:
        async def copy_data(n: int) -> bool:
            self._count("request_body_bytes", await _copy_exact(creader, uwriter, n))
            return True
        return copy_data

    @staticmethod
    async def _response_head(ureader: asyncio.StreamReader) -> _Head:
        while True:
            raw = await _read_head(ureader)
            if raw is None:
                raise ConnectionError("upstream closed before responding")
            resp = _Head(raw)
            code = int(resp.start[1])
            if code >= 200 or code == 101:
                return resp
            # Interim 1xx: the proxy already sent the client its own 100 Continue.

    async def _forward_body(self, req: _Head, resp: _Head, code: int, fault: Fault | None,
                            cwriter: asyncio.StreamWriter, up: _Upstream) -> bool:
        """Stream the response body; False if cut short or delimited by EOF."""
        if req.start[0].upper() == "HEAD" or code in (204, 304) or code < 200:
            return True
        fx = _Effects(fault)
        kind, length = resp.framing()
        if kind == "chunked":
            return await _copy_chunked(up.reader, cwriter, lambda n: self._pump(up.reader, cwriter, n, fx))
        if kind == "length":
            return await self._pump(up.reader, cwriter, length, fx)
        await self._pump(up.reader, cwriter, None, fx)
        return False

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    n: int | None, fx: _Effects) -> bool:
        """Forward n response-body bytes (None: until EOF), applying fx.
        False when a truncate fault cut the body."""
        while n is None or n > 0:
            want = self._piece() if n is None else min(n, self._piece())
            if fx.stall_at is not None and fx.pos >= fx.stall_at:
                self._fire("delay")
                fx.stall_at = None
                await asyncio.sleep(fx.stall_s)
            if fx.cut_at is not None:
                if fx.pos >= fx.cut_at:
                    self._fire("truncate")
                    return False
                want = min(want, fx.cut_at - fx.pos)
            if fx.stall_at is not None:
                want = min(want, fx.stall_at - fx.pos)
            data = await src.read(want)
            if not data:
                if n is None:
                    return True
                raise ConnectionError("upstream closed inside a response body")
            if fx.flip_at is not None and fx.pos <= fx.flip_at < fx.pos + len(data):
                data = bytearray(data)
                data[fx.flip_at - fx.pos] ^= 0xFF
                fx.flip_at = None
                self._fire("corrupt")
            await self._throttle(fx, len(data))
            self._count("response_body_bytes", len(data))
            dst.write(data)
            await dst.drain()
            fx.pos += len(data)
            if n is not None:
                n -= len(data)
        return True

    def _piece(self) -> int:
        # Under a bandwidth cap, smaller pieces keep the pacing smooth (~16 per second).
        rates = [r for r in (self._bandwidth, self.connection_bandwidth) if r is not None]
        if not rates:
            return PIECE
        return max(16 << 10, min(PIECE, int(min(rates) / 16)))

    async def _throttle(self, fx: _Effects, n: int) -> None:
        """Both caps as virtual clocks: each piece reserves n/rate seconds of the shared link
        (:attr:`bandwidth`) and of its own connection (:attr:`connection_bandwidth`), and
        waits until its reservations are over."""
        if self._bandwidth is not None:
            self._bw_next, wait = _reserve(self._bw_next, n, self._bandwidth)
            await asyncio.sleep(wait)
        if self.connection_bandwidth is not None:
            fx.paced_until, wait = _reserve(fx.paced_until, n, self.connection_bandwidth)
            await asyncio.sleep(wait)


def _reserve(clock: float, n: int, rate: float) -> tuple[float, float]:
    """A link of ``rate`` bytes/s free from ``clock`` (loop time) takes ``n`` bytes: when it is
    free again, and how long to wait for that. Reserved before the wait, so pieces waiting at
    once queue behind each other."""
    now = asyncio.get_running_loop().time()
    free = max(now, clock) + n / rate
    return free, free - now


class _NullWriter:
    """Write sink for discarding a chunked body."""

    def write(self, data: bytes) -> None:
        pass
