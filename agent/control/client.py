"""Client of the agent's control API (HTTP over its unix socket).

Used by the CLI and by the loader inside model runners, so it must stay light:
no aiohttp, no torch, no s3fs: the stdlib, the protocol and the one integrity check
(:mod:`coldbrew.agent.cache.verify`, xxhash). Errors sent by the agent come back as the same
coldbrew exception classes (``ObjectNotFound``, ``AccessDenied``...); an agent
that is not running is :class:`AgentUnavailable` with a message that says how
to fix it.

Two shapes of answer, each message of :mod:`coldbrew.agent.control.protocol`:

* typed — :meth:`AgentClient.ensure_range`, :meth:`~AgentClient.listing` and
  :meth:`~AgentClient.report_corrupt` read the reply through the protocol, so an agent
  of another version that left out a field, or changed its type, is a
  :class:`~coldbrew.agent.errors.BadMessage` naming it, not a ``KeyError`` later. Code
  (the loader, :meth:`~AgentClient.get`) uses these;
* the JSON document as the agent sent it — :meth:`~AgentClient.health`,
  :meth:`~AgentClient.status`, :meth:`~AgentClient.ls`, :meth:`~AgentClient.ensure`... —
  what the CLI shows and ``coldbrew ... --json`` prints, a newer agent's fields included.

:meth:`AgentClient.get` copies a file out through the node cache: the agent
makes each window of chunks present (prefetching ahead), and the client
verifies every chunk against its digest and copies it kernel-side
(``copy_file_range``) from the cache file to the destination.
"""

from __future__ import annotations

import collections
import json
import os
import threading

from ..errors import AgentUnavailable, ObjectChanged, error_from_kind
from . import unixhttp

# No pathlib, typing, urllib.parse or dataclasses at import: every CLI command pays for
# them at start (~10 ms together, measured; bench/RESULTS.md, "Finding: the CLI's start").
# So the protocol (dataclasses) and the integrity check (the digest, and typing) are imported
# where a typed reply is read or a chunk checked, never by `coldbrew status` or `prewarm`.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

    from .protocol import Chunk, CorruptReply, EnsureReply, LsReply, VerifyReply

DEFAULT_SOCKET = "/run/coldbrew/agent.sock"
_WINDOW_BYTES = 64 << 20  # ask for this much per ensure: few round trips, early start


def default_socket() -> str:
    return os.environ.get("COLDBREW_SOCKET") or DEFAULT_SOCKET


#: What :meth:`AgentClient.get` copied, and from where (a plain namedtuple: typing's
#: NamedTuple would import typing at every CLI start, see above).
GetResult = collections.namedtuple(
    "GetResult", ["uri", "etag", "bytes", "chunks_from_cache_file", "chunks_streamed"])


def _urlencode(query: dict[str, Any]) -> str:
    """``a=1&b=x%2Fy``, leaving out None values. Numbers need no quoting, and a progress poll
    or a plain ``status`` sends nothing else: urllib.parse is imported only for strings."""
    fields = {k: v for k, v in query.items() if v is not None}
    if all(isinstance(v, (int, float)) for v in fields.values()):
        return "&".join(f"{k}={v}" for k, v in fields.items())
    from urllib.parse import urlencode

    return urlencode(fields)


class AgentClient:
    def __init__(self, socket_path: str | os.PathLike[str] | None = None, timeout_s: float = 30.0) -> None:
        self.socket_path = os.fspath(socket_path) if socket_path else default_socket()
        self.timeout_s = timeout_s

    # --- transport ------------------------------------------------------------------

    def _open(self, method: str, target: str, body: bytes | None = None,
              timeout: float | None = None) -> unixhttp.Response:
        try:
            return unixhttp.exchange(self.socket_path, method, target, body,
                                     content_type="application/json" if body is not None else None,
                                     timeout=timeout)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as e:
            raise self._unavailable(e) from None
        except unixhttp.ProtocolError as e:
            raise AgentUnavailable(f"the agent on {self.socket_path} did not answer properly: {e}") from None
        except (ConnectionResetError, BrokenPipeError) as e:
            raise self._gone(e) from None

    def _gone(self, e: OSError) -> AgentUnavailable:
        return AgentUnavailable(f"the agent on {self.socket_path} closed the connection "
                                f"({e.strerror or e}): it stopped or is restarting")

    def _unavailable(self, e: OSError) -> AgentUnavailable:
        return AgentUnavailable(
            f"no coldbrew agent is listening on {self.socket_path} ({e.strerror or e}); start one "
            "with `coldbrew agent`, or point --socket / COLDBREW_SOCKET at its socket")

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                query: dict[str, Any] | None = None, timeout: float | None = -1.0) -> Any:
        """One JSON request; raises the agent's error as a coldbrew exception."""
        encoded = _urlencode(query) if query else ""
        if encoded:
            path += "?" + encoded
        payload = json.dumps(body).encode() if body is not None else None
        with self._open(method, path, payload, self.timeout_s if timeout == -1.0 else timeout) as response:
            try:
                data = response.read_all()
            except unixhttp.ProtocolError as e:
                raise AgentUnavailable(f"the agent on {self.socket_path}: {e}") from None
            except (ConnectionResetError, BrokenPipeError) as e:
                raise self._gone(e) from None
        return _decode(response.status, data)

    # --- API: typed replies (the loader, `coldbrew get`) -----------------------------------
    # Each reads its answer through the protocol, imported once an answer has come: a command
    # that finds no agent does not pay for it. The request bodies are the protocol's request
    # messages written out by hand for the same reason (tests/test_protocol.py checks that
    # they read as those messages).

    def ensure_range(self, uri: str | None = None, offset: int = 0, length: int | None = None, *,
                     lease: str | None = None, prefetch: bool = False) -> EnsureReply:
        """Make bytes present in the node cache; blocks until they are (no timeout).

        ``uri`` opens a new lease on the file's current version; ``lease`` reads on in the
        version an earlier ensure pinned. ``length`` None: to the end of the file.
        """
        data = self.ensure(uri, offset, length, lease=lease, prefetch=prefetch)
        from .protocol import EnsureReply

        return EnsureReply.from_json(data)

    def listing(self, uri: str = "") -> LsReply:
        """One level of the origin under ``uri``, with the bytes cached of each file."""
        data = self.ls(uri)
        from .protocol import LsReply

        return LsReply.from_json(data)

    def report_corrupt(self, lease: str, index: int) -> CorruptReply:
        """Chunk ``index`` failed its digest here: the agent checks, drops and refetches it."""
        data = self.request("POST", "/v1/corrupt", {"lease": lease, "index": index}, timeout=None)
        from .protocol import CorruptReply

        return CorruptReply.from_json(data)

    def verify(self, lease: str) -> VerifyReply:
        """Wait for the agent's last checks of the leased file (see :class:`VerifyRequest`);
        raises :class:`~coldbrew.agent.errors.ManifestRejected` if its bytes were false."""
        data = self.request("POST", "/v1/verify", {"lease": lease}, timeout=None)
        from .protocol import VerifyReply

        return VerifyReply.from_json(data)

    def release(self, lease: str) -> None:
        self.request("POST", f"/v1/leases/{lease}/release")

    # --- API: the JSON documents as the agent sent them (what `coldbrew ... --json` prints) ---
    # Not read through the protocol: for `coldbrew status`, `prewarm`, `ls`... importing it
    # would cost about as much as the rest of the command's start (the numbers are in
    # agent/control/protocol.py's docstring).

    def health(self) -> dict[str, Any]:
        """A :class:`~.protocol.Health`."""
        return self.request("GET", "/v1/health")

    def prewarm(self, uris: list[str]) -> dict[str, Any]:
        """Start a prewarm job; the reply is the :class:`~.protocol.Job`."""
        return self.request("POST", "/v1/prewarm", {"uris": uris})

    def job(self, job_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        """A prewarm job's progress (a :class:`~.protocol.Job`); with ``wait_s``, answered
        early when the job ends."""
        return self.request("GET", f"/v1/jobs/{job_id}", query={"wait_s": wait_s or None},
                            timeout=self.timeout_s + wait_s)

    def status(self, uri: str | None = None) -> dict[str, Any]:
        """A :class:`~.protocol.StatusReply`."""
        return self.request("GET", "/v1/status", query={"uri": uri}, timeout=None)

    def ls(self, uri: str = "") -> dict[str, Any]:
        """:meth:`listing` as the JSON document (an :class:`~.protocol.LsReply`)."""
        return self.request("GET", "/v1/ls", query={"uri": uri}, timeout=None)

    def evict(self, uri: str) -> dict[str, Any]:
        """An :class:`~.protocol.EvictReply`."""
        return self.request("POST", "/v1/evict", {"uri": uri})

    def ensure(self, uri: str | None = None, offset: int = 0, length: int | None = None, *,
               lease: str | None = None, prefetch: bool = False) -> dict[str, Any]:
        """:meth:`ensure_range` as the JSON document (an :class:`~.protocol.EnsureReply`)."""
        body = {"uri": uri, "offset": offset, "length": length, "lease": lease, "prefetch": prefetch}
        return self.request("POST", "/v1/ensure", body, timeout=None)

    # --- streaming ------------------------------------------------------------------------

    def read(self, uri: str | None = None, offset: int = 0, length: int | None = None, *,
             lease: str | None = None, piece_bytes: int = 1 << 20) -> Iterator[bytes]:
        """Stream bytes through the agent (for readers that cannot see the cache dir).

        A stream cut short is resumed from where it stopped; the agent answers the
        resumed request with the real error if there is one (e.g. ObjectChanged).
        """
        own_lease = None
        if length is None:  # to the end: pin the version whose size we learn
            opened = self.ensure_range(uri, offset, 0, lease=lease)
            own_lease = None if lease else opened.lease
            lease, length = opened.lease, opened.size - offset
        try:
            yield from self._read_resuming(uri, offset, length, lease, piece_bytes)
        finally:
            if own_lease:
                self.release(own_lease)

    def _read_resuming(self, uri: str | None, offset: int, length: int, lease: str | None,
                       piece_bytes: int) -> Iterator[bytes]:
        stalls = 0
        while length > 0:
            got = 0
            for piece in self._read_once(uri, offset, length, lease, piece_bytes):
                got += len(piece)
                yield piece
            offset, length = offset + got, length - got
            stalls = 0 if got else stalls + 1
            if length and stalls >= 3:
                raise AgentUnavailable(f"agent stream keeps ending early at offset {offset}")

    def _read_once(self, uri: str | None, offset: int, length: int, lease: str | None,
                   piece_bytes: int) -> Iterator[bytes]:
        query = _urlencode({"uri": uri, "offset": offset, "length": length, "lease": lease})
        with self._open("GET", "/v1/read?" + query) as response:
            if response.status != 200:
                _decode(response.status, response.read_all())
            while True:
                try:
                    piece = response.read(piece_bytes)
                except OSError:  # a stream cut short: the caller resumes from here
                    return
                if not piece:
                    return
                yield piece

    # --- get: copy a file out through the node cache --------------------------------------

    def get(self, uri: str, dest: str | os.PathLike[str],
            progress: Callable[[int, int], None] | None = None) -> GetResult:
        """Copy ``uri`` to ``dest`` through the cache; atomic (temp file + rename)."""
        folder, name = os.path.split(os.fspath(dest))
        tmp = os.path.join(folder, f".{name}.coldbrew-{os.getpid()}.tmp")
        first = self.ensure_range(uri, 0, 0, prefetch=True)  # open, lease, start read-ahead
        lease, size = first.lease, first.size
        copier = _Copier(self, lease, first.etag)
        try:
            with open(tmp, "wb") as out:
                done = 0
                # All cached already: one round trip. Else windows, so copying starts early.
                step = size if first.cached_bytes == size else _WINDOW_BYTES
                while done < size:
                    window = self.ensure_range(lease=lease, offset=done, length=min(step, size - done))
                    copier.check_version(window)
                    for chunk in copier.copy_window(window.chunks, out):
                        done = chunk.offset + chunk.length
                        if progress:
                            progress(done, size)
            os.replace(tmp, dest)
        except BaseException:
            _remove_quietly(tmp)
            raise
        finally:
            try:
                self.release(lease)
            except AgentUnavailable:
                pass
        return GetResult(first.uri, first.etag, size, copier.from_file, copier.streamed)


    def stream(self, uri: str, out: Any) -> GetResult:
        """Write ``uri``'s bytes to ``out`` (a binary stream that need not seek: standard
        output), in order, each chunk verified by the agent."""
        first = self.ensure_range(uri, 0, 0, prefetch=True)
        lease, size = first.lease, first.size
        try:
            done = 0
            while done < size:
                length = min(_WINDOW_BYTES, size - done)
                for piece in self.read(lease=lease, offset=done, length=length):
                    out.write(piece)
                done += length
        finally:
            try:
                self.release(lease)
            except AgentUnavailable:
                pass
        return GetResult(first.uri, first.etag, size, 0, -(-size // first.chunk_size))


class _Copier:
    """Copies verified chunks into the destination file."""

    def __init__(self, client: AgentClient, lease: str, etag: str) -> None:
        self.client = client
        self.lease = lease
        self.etag = etag
        self.from_file = 0
        self.streamed = 0

    def check_version(self, window: EnsureReply) -> None:
        if window.etag != self.etag:
            raise ObjectChanged(f"{window.uri} changed at the origin during the copy "
                                f"(ETag {self.etag} → {window.etag}); run it again")

    def copy_window(self, chunks: tuple[Chunk, ...], out: Any) -> Iterator[Chunk]:
        """Copy a window of chunks in order, yielding each once it is in ``out``.

        Digest checks run one chunk ahead in a worker thread while the kernel
        copies the previous chunk (copy_file_range releases the GIL): the check
        costs ~0.1 s/GiB, which would otherwise sit on the copy's critical path.
        """
        ahead = _Verifier(chunks)
        taken = 0
        try:
            for i, chunk in enumerate(chunks):
                taken += 1
                fd = ahead.fd(i)
                if fd == _UNREADABLE:  # this process cannot see the cache dir: stream it
                    self._stream(chunk, out)
                elif fd is None:
                    self._repair_or_stream(chunk, out)
                else:
                    try:
                        _copy_range(fd, out.fileno(), chunk.length, chunk.offset, chunk.offset)
                    finally:
                        os.close(fd)
                    self.from_file += 1
                yield chunk
        finally:
            ahead.close(taken)

    def _repair_or_stream(self, chunk: Chunk, out: Any) -> None:
        if chunk.cached:
            # Failed its digest here: the agent re-checks, drops and refetches it.
            self.client.report_corrupt(self.lease, chunk.index)
            chunk = self.client.ensure_range(lease=self.lease, offset=chunk.offset,
                                             length=chunk.length).chunks[0]
            fd = _open_verified(chunk) if chunk.cached else None
            if fd is not None and fd >= 0:
                try:
                    _copy_range(fd, out.fileno(), chunk.length, chunk.offset, chunk.offset)
                finally:
                    os.close(fd)
                self.from_file += 1
                return
        self._stream(chunk, out)  # uncached (cache full) or still bad: the agent verifies

    def _stream(self, chunk: Chunk, out: Any) -> None:
        out.seek(chunk.offset)
        for piece in self.client.read(lease=self.lease, offset=chunk.offset, length=chunk.length):
            out.write(piece)
        self.streamed += 1


class _Verifier:
    """Opens and checks a window's chunks in order, in one thread, ahead of the copy.

    A bare thread rather than ``concurrent.futures``, whose import (it brings
    ``logging``) costs every CLI start ~13 ms.
    """

    def __init__(self, chunks: tuple[Chunk, ...]) -> None:
        self._chunks = chunks
        self._fds: list[int | None] = [None] * len(chunks)
        self._error: BaseException | None = None
        self._done = [threading.Event() for _ in chunks]
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="coldbrew-verify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i, chunk in enumerate(self._chunks):
            if self._stop:
                return
            try:
                self._fds[i] = _open_verified(chunk) if chunk.cached else None
            except BaseException as e:
                self._error = e
                self._stop = True
            finally:
                self._done[i].set()

    def fd(self, i: int) -> int | None:
        """Chunk ``i``'s checked fd (None: bad or not cached; ``_UNREADABLE``); waits for it."""
        self._done[i].wait()
        if self._error is not None:
            raise self._error
        return self._fds[i]

    def close(self, taken: int) -> None:
        """Stop; close the fds opened ahead for chunks from ``taken`` on."""
        self._stop = True
        self._thread.join()
        for fd in self._fds[taken:]:
            if fd is not None and fd >= 0:
                _close_quietly(fd)


_UNREADABLE = -1


def _open_verified(chunk: Chunk) -> int | None:
    """An open fd on the cache's data file if the chunk's bytes in it match its digest.

    The chunk lies at ``chunk.offset`` of ``chunk.path`` (the file's bytes at their own
    offsets). None: its bytes there are wrong (corrupt, or replaced); ``_UNREADABLE``: this
    process cannot open it (another mount namespace, or evicted).

    The fd stays open so the copy reads the very inode that was checked, even if the file is
    replaced meanwhile.
    """
    from ..cache.verify import intact_at

    if chunk.path is None:
        return _UNREADABLE
    try:
        fd = os.open(chunk.path, os.O_RDONLY)
    except OSError:
        return _UNREADABLE
    if not intact_at(fd, chunk.offset, chunk.length, chunk.digest):
        os.close(fd)
        return None
    return fd


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _copy_range(src_fd: int, dst_fd: int, length: int, src_offset: int, dst_offset: int) -> None:
    copied = 0
    try:
        while copied < length:
            n = os.copy_file_range(src_fd, dst_fd, length - copied, src_offset + copied,
                                   dst_offset + copied)
            if n == 0:
                raise OSError("copy_file_range copied nothing")
            copied += n
        return
    except OSError:
        pass  # old kernel or cross-device quirk: fall back to a plain copy
    buf = bytearray(min(length, 8 << 20))
    view = memoryview(buf)
    while copied < length:
        n = os.preadv(src_fd, [view[: min(len(buf), length - copied)]], src_offset + copied)
        os.pwrite(dst_fd, view[:n], dst_offset + copied)
        copied += n


def _decode(status: int, data: bytes) -> Any:
    """The answer's JSON; an error reply (a :class:`~.protocol.ErrorReply`) raised as the
    coldbrew exception it names. Read leniently, by hand: an error may come from something
    that is not our agent, and formatting one is no reason to load the protocol."""
    try:
        payload = json.loads(data) if data else {}
    except json.JSONDecodeError:
        payload = {"error": {"kind": "agent", "message": data[:200].decode(errors="replace")}}
    if status >= 400 or (isinstance(payload, dict) and "error" in payload):
        err = payload.get("error", {}) if isinstance(payload, dict) else {}
        raise error_from_kind(err.get("kind", "agent"), err.get("message", f"HTTP {status}"))
    return payload
