"""Just enough HTTP to talk to the agent over its unix socket.

Every ``coldbrew get``/``status``/``prewarm`` is a fresh process whose start-up
is part of what the user waits for: ``http.client`` pulls in the ``email``
package and ``ssl`` (~40 ms of a ~150 ms start on a small node), for a peer
that is always our own agent on a local socket. So this speaks the small
subset that conversation needs, and no more:

* HTTP/1.0 requests, one per connection: the server then never uses chunked
  transfer-encoding, and the body ends at ``Content-Length`` or at close;
* a response head of at most 64 KiB, parsed by :func:`parse_head` (pure);
* bodies read whole (:meth:`Response.read_all`) or in pieces
  (:meth:`Response.read`), a body cut short is visible to the caller.
"""

from __future__ import annotations

import socket

MAX_HEAD_BYTES = 64 << 10


class ProtocolError(ConnectionError):
    """The peer did not answer with well-formed HTTP, or hung up mid-answer."""


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """``HTTP/1.1 200 OK\\r\\nName: value…`` → (200, {"name": "value"}). Names lower-cased."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def request_bytes(method: str, target: str, body: bytes | None, content_type: str | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.0", "Host: coldbrew-agent"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
        if content_type:
            lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class Response:
    """One answer on its own connection; close it when done (or use ``with``)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        buf = b""
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD_BYTES:
                raise ProtocolError("the response head is larger than 64 KiB")
            piece = sock.recv(65536)
            if not piece:
                raise ProtocolError("the agent closed the connection before answering")
            buf += piece
        head, _, self._pending = buf.partition(b"\r\n\r\n")
        self.status, self.headers = parse_head(head)
        length = self.headers.get("content-length")
        #: Body bytes still to come; None: until the server closes.
        self.remaining: int | None = int(length) if length is not None else None
        if self.remaining is not None:
            self._pending = self._pending[:self.remaining]

    def read(self, n: int) -> bytes:
        """Up to ``n`` body bytes; ``b""`` at the end, or where the server hung up early."""
        if self._pending:
            piece, self._pending = self._pending[:n], self._pending[n:]
        elif self.remaining == 0:
            return b""
        else:
            want = n if self.remaining is None else min(n, self.remaining)
            piece = self._sock.recv(want)
            if not piece:
                return b""
        if self.remaining is not None:
            self.remaining -= len(piece)
        return piece

    def read_all(self) -> bytes:
        """The whole body; ProtocolError if the connection ends before Content-Length."""
        pieces = []
        while piece := self.read(1 << 20):
            pieces.append(piece)
        if self.remaining:
            raise ProtocolError(f"the agent hung up {self.remaining} bytes before the end of its answer")
        return b"".join(pieces)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exchange(path: str, method: str, target: str, body: bytes | None = None, *,
             content_type: str | None = None, timeout: float | None = None) -> Response:
    """Connect to the socket at ``path``, send one request, return the response (head read).

    Connection errors (no socket, refused, permission) propagate as ``OSError``.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request_bytes(method, target, body, content_type))
        return Response(sock)
    except BaseException:
        sock.close()
        raise
