"""The origin store: object metadata and ranged reads through fsspec, with retries.

S3 (``s3://``) goes through s3fs's async client for listings, and through one
botocore client in worker threads for object bytes and the HEAD of a known key
(:mod:`.s3data`); any other fsspec protocol
(``file://``, ``memory://``, ``gs://``...) works through fsspec's generic API in
a worker thread. Either way the rest of the agent sees three operations —
:meth:`Origin.stat`, :meth:`Origin.expand` and :meth:`Origin.read_into` — and
one error hierarchy: this module is the only place that knows what a botocore
exception or an HTTP status means (:func:`translate`).

Ranged reads are pinned to the ETag seen at ``stat`` time (``If-Match`` on S3,
a re-stat elsewhere): a changed object raises :class:`ObjectChanged`, never a
mix of two versions.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec

from ..config import OriginSettings
from ..core.manifest import SIDECAR_DIR, FileIdentity, is_sidecar
from ..core.vouch import Vouch, from_s3_head, multipart_count
from ..errors import (
    AccessDenied,
    BucketNotFound,
    ColdbrewError,
    ObjectChanged,
    ObjectNotFound,
    OriginError,
    OriginUnavailable,
    TransientOriginError,
    UsageError,
    redact,
)
from ..metrics import AgentMetrics
from .flow import Flow
from .health import QUICK, OriginHealth
from .retry import RetryPolicy, with_retries

log = logging.getLogger("coldbrew.origin")

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    etag: str
    mtime: float | None = None

    @property
    def identity(self) -> FileIdentity:
        return FileIdentity(self.uri, self.etag, self.size)


#: Retry reasons that mean "ask less at once" (TransientOriginError.reason).
THROTTLED = frozenset({"slowdown", "503", "throttling", "throttlingexception",
                       "serviceunavailable", "requestlimitexceeded"})
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchVersion"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "ExpiredToken", "InvalidToken", "AllAccessDisabled", "AccountProblem"}
_RETRY_CODES = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError",
                "ServiceUnavailable", "RequestTimeTooSkewed", "503", "500", "502", "504"}


def _s3_error(exc: BaseException) -> tuple[str | None, int | None]:
    """(error code, HTTP status) from a botocore ClientError anywhere in the cause chain."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return response["Error"].get("Code"), status
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None, None


def _aiohttp_errors(*names: str) -> tuple[type[BaseException], ...]:
    """aiohttp's exception classes, if it is loaded: if not, none of them can be raised
    (and a loader that never needed s3fs must not pay its import to classify an error)."""
    aiohttp = sys.modules.get("aiohttp")
    return tuple(getattr(aiohttp, n) for n in names) if aiohttp is not None else ()


def _is_short_body(exc: BaseException) -> bool:
    """The server promised more bytes than it sent (connection cut mid-body)."""
    import http.client

    import botocore.exceptions as bex
    import urllib3.exceptions as u3

    short = (*_aiohttp_errors("ClientPayloadError"), bex.IncompleteReadError,
             bex.ResponseStreamingError, u3.ProtocolError, u3.IncompleteRead,
             http.client.IncompleteRead)
    while exc is not None:
        if isinstance(exc, short):
            return True
        exc = exc.__cause__
    return False


def _is_network_error(exc: BaseException) -> bool:
    import http.client

    import botocore.exceptions as bex
    import urllib3.exceptions as u3

    network = (ConnectionError, TimeoutError, asyncio.TimeoutError, *_aiohttp_errors("ClientError"),
               u3.HTTPError, http.client.HTTPException,
               bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ReadTimeoutError,
               bex.ConnectTimeoutError, bex.ResponseStreamingError, bex.IncompleteReadError,
               bex.HTTPClientError)
    while exc is not None:
        if isinstance(exc, network):
            return True
        exc = exc.__cause__
    return False


def translate(exc: BaseException, uri: str, endpoint: str | None = None) -> ColdbrewError:
    """Map any origin failure to the coldbrew error a person can act on."""
    if isinstance(exc, ColdbrewError):
        return exc
    code, status = _s3_error(exc)
    if code == "NoSuchBucket":
        return BucketNotFound(f"bucket {_bucket_of(uri)!r} does not exist (reading {uri}); "
                              "check the origin URL and the endpoint/region")
    if code in _NOT_FOUND_CODES or status == 404:
        return ObjectNotFound(f"{uri} not found at the origin (no such key)")
    if code in _DENIED_CODES or status == 403:
        return AccessDenied(f"access denied reading {uri} ({code or status}); check the AWS "
                            "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile or role) "
                            "and the bucket policy")
    if code == "PreconditionFailed" or status == 412:
        return ObjectChanged(f"{uri} changed at the origin while it was being read (ETag no "
                             "longer matches); open it again to read the new version")
    if code in _RETRY_CODES or (status is not None and (status >= 500 or status == 429)):
        return TransientOriginError(f"{uri}: {status} {code}", reason=str(code or status).lower())
    if _is_short_body(exc):
        return TransientOriginError(f"{uri}: short body from the origin ({exc})", reason="short_body")
    if _is_network_error(exc):
        where = f" at {redact(endpoint)}" if endpoint else ""
        return TransientOriginError(f"cannot read {uri}{where}: {type(exc).__name__}: {exc}",
                                    reason="network")
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFound(f"{uri} not found at the origin")
    if isinstance(exc, PermissionError):
        return AccessDenied(f"access denied reading {uri}: {exc}")
    return OriginError(f"{uri}: {type(exc).__name__}: {exc}")


async def finish_in_thread(future: asyncio.Future[Any]) -> Any:
    """Await a worker thread's result; if cancelled, still wait for the thread to stop.

    The thread writes into (or reads from) a buffer that goes back to the pool
    as soon as we return: letting it run on would scribble over the next chunk.
    """
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def _bucket_of(uri: str) -> str:
    return uri.split("://", 1)[-1].split("/", 1)[0]


def _etag_of(info: dict[str, Any]) -> str:
    """The version token: S3's ETag, or size+mtime for stores without one."""
    for key in ("ETag", "etag", "md5", "generation"):
        if info.get(key):
            return str(info[key])
    return f"{info.get('size')}-{info.get('mtime') or info.get('LastModified') or info.get('created')}"


def _mtime_of(info: dict[str, Any]) -> float | None:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        pass
    try:  # the header's own text (the data plane leaves timestamps unparsed: agent/s3data.py)
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


class Origin:
    """Reads objects under one root URL (``s3://bucket/prefix``) with retries.

    Must be used on one running event loop (s3fs's async client, made on first
    use, is bound to the loop it was made on).
    """

    def __init__(self, config: OriginSettings, metrics: AgentMetrics | None = None) -> None:
        self.root = config.url.rstrip("/")
        self.protocol = self.root.split("://", 1)[0]
        self.endpoint = config.endpoint_url
        self.policy = RetryPolicy(config.retry_attempts, config.retry_base_delay_s,
                                  config.retry_max_delay_s)
        self.metrics = metrics
        self.is_s3 = self.protocol in ("s3", "s3a")
        self._config = config
        self.version_timeout_s = config.version_timeout_s
        #: serve-cached or fail: what a reader with a cached copy does when this origin is
        #: unreachable (the agent's Versions, and the loader without an agent, read it).
        self.unreachable_policy = config.origin_unreachable
        #: Whether the origin answers (see :mod:`.health`); every operation updates it.
        self.health = OriginHealth()
        #: Data GETs in flight: their limit (adaptive unless fetch_concurrency fixes it).
        self.flow = Flow.for_settings(config)
        self.max_in_flight = config.max_in_flight
        if metrics:
            metrics.origin_concurrency.set(self.flow.allowed)
        self._fs: fsspec.AbstractFileSystem | None = None if self.is_s3 else self._make_fs(config)
        if self.is_s3:
            from .s3data import S3RangeReader

            self._data = S3RangeReader(config)
            # One thread per GET in flight; the default executor (cores + 4) would cap them.
            self._data_pool = ThreadPoolExecutor(max(4, config.max_in_flight * 2),
                                                 thread_name_prefix="s3-get")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem. For S3 it is made on first use (on the running loop):
        s3fs brings aiobotocore and aiohttp (~0.5 s to import on a small node), and a
        loader that only HEADs and GETs objects (botocore, :mod:`.s3data`) never needs it."""
        if self._fs is None:
            self._fs = self._make_fs(self._config)
        return self._fs

    def _make_fs(self, config: OriginSettings) -> fsspec.AbstractFileSystem:
        if self.protocol not in ("s3", "s3a"):
            return fsspec.filesystem(self.protocol, skip_instance_cache=True)
        import s3fs

        client_kwargs = {"region_name": config.region} if config.region else {}
        fs = s3fs.S3FileSystem(
            anon=config.anonymous,
            endpoint_url=config.endpoint_url,
            client_kwargs=client_kwargs,
            config_kwargs={
                "retries": {"total_max_attempts": 1, "mode": "standard"},
                "connect_timeout": config.connect_timeout_s,
                "read_timeout": config.read_timeout_s,
                "max_pool_connections": max(16, 2 * config.max_in_flight),
            },
            asynchronous=True,
            loop=asyncio.get_running_loop(),
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        # Retries are ours (counted, jittered, If-Match aware): none below us.
        fs.retries = 1
        return fs

    async def close(self) -> None:
        if self.is_s3:
            self._data_pool.shutdown(wait=False, cancel_futures=True)
            self._data.close()
        if self.is_s3 and getattr(self._fs, "_s3", None) is not None:
            await self._fs._s3.close()  # type: ignore[union-attr]

    # --- naming ---------------------------------------------------------------

    def resolve(self, uri_or_path: str) -> str:
        """A full URI for ``uri_or_path``; relative paths are taken under the origin root."""
        text = uri_or_path.strip()
        if "://" in text:
            if text.split("://", 1)[0] != self.protocol:
                raise UsageError(f"{text}: this agent's origin is {self.root}; it can only "
                                 f"read {self.protocol}:// URIs")
            return text.rstrip("/") if not text.endswith("://") else text
        return f"{self.root}/{text.lstrip('/')}".rstrip("/")

    def _path(self, uri: str) -> str:
        return uri.split("://", 1)[1] if self.protocol != "file" else "/" + uri.split("://", 1)[1].lstrip("/")

    def _uri(self, path: str) -> str:
        return f"{self.protocol}://{path.lstrip('/')}" if self.protocol != "file" else f"file://{path}"

    # --- metadata -------------------------------------------------------------

    async def stat(self, uri: str, *, quick: bool = False) -> ObjectInfo:
        """Size and ETag of one object. Raises ObjectNotFound/BucketNotFound/AccessDenied, and
        OriginUnavailable when the origin cannot answer.

        ``quick``: a version check that a cached version can stand in for: brief retries
        (:data:`~.health.QUICK`), and no more than ``version_timeout_s`` in all, so a HEAD
        that hangs costs seconds rather than every retry's read timeout.
        """
        if not quick:
            return await self._stat(uri)
        return await self._quickly(f"HEAD {uri}", self._stat(uri, QUICK))

    async def _quickly(self, what: str, work: Awaitable[T]) -> T:
        """``work`` within ``version_timeout_s``; past it, the origin counts as unreachable."""
        try:
            return await asyncio.wait_for(work, self.version_timeout_s)
        except TimeoutError:
            message = (f"{what}: the origin did not answer within {self.version_timeout_s:g} s "
                       "(version_timeout_s)")
            self._unreachable(message)
            raise OriginUnavailable(message) from None

    async def _stat(self, uri: str, policy: RetryPolicy | None = None) -> ObjectInfo:
        if self.is_s3 and "/" in self._path(uri).strip("/"):
            try:  # a plain HEAD, on the data plane's botocore client
                head = await self._call("head", uri, self._head_s3, uri, policy=policy)
                return ObjectInfo(uri, int(head["ContentLength"]), _etag_of(head), _mtime_of(head))
            except ObjectNotFound:
                pass  # a prefix, or no such bucket: the fsspec path below tells which
        info = await self._call("head", uri, self._info, uri, policy=policy)
        if info.get("type") == "directory":
            raise ObjectNotFound(f"{uri} is a prefix (a directory), not an object")
        return ObjectInfo(uri, int(info["size"]), _etag_of(info), _mtime_of(info))

    async def expand(self, uri: str, *, quick: bool = False) -> list[ObjectInfo]:
        """The objects a URI names: itself if it is an object, else everything under the prefix.
        ``quick``: bounded, as for :meth:`stat` (the cache can answer instead)."""
        if quick:
            return await self._quickly(f"LIST {uri}", self._expand(uri, QUICK))
        return await self._expand(uri)

    async def _expand(self, uri: str, policy: RetryPolicy | None = None) -> list[ObjectInfo]:
        info = await self._call("head", uri, self._info, uri, policy=policy)
        if info.get("type") != "directory":
            return [ObjectInfo(uri, int(info["size"]), _etag_of(info), _mtime_of(info))]
        found = await self._call("list", uri, self._find, uri, policy=policy)
        out = [ObjectInfo(self._uri(path), int(i["size"]), _etag_of(i), _mtime_of(i))
               for path, i in sorted(found.items())
               if i.get("type", "file") == "file" and not is_sidecar(path)]
        if not out:
            raise ObjectNotFound(f"{uri}: no objects under this prefix")
        return out

    async def list_dir(self, uri: str, *, quick: bool = False) -> list[dict[str, Any]]:
        """One level under ``uri``: sub-prefixes and objects, like ``aws s3 ls``. ``quick``:
        bounded, as for :meth:`stat`."""
        if quick:
            return await self._quickly(f"LIST {uri}", self._list_dir(uri, QUICK))
        return await self._list_dir(uri)

    async def _list_dir(self, uri: str, policy: RetryPolicy | None = None) -> list[dict[str, Any]]:
        items = await self._call("list", uri, self._ls, uri, policy=policy)
        out = []
        for item in sorted(items, key=lambda i: i["name"]):
            is_dir = item.get("type") == "directory"
            name = item["name"].rstrip("/").rsplit("/", 1)[-1]
            if name == SIDECAR_DIR:  # coldbrew's own manifests, not part of the models
                continue
            entry = {"uri": self._uri(item["name"]), "name": name,
                     "type": "directory" if is_dir else "file", "size": int(item.get("size") or 0)}
            if not is_dir:
                entry["etag"] = _etag_of(item)
                entry["mtime"] = _mtime_of(item)
            out.append(entry)
        if not out and self._path(uri).strip("/").count("/") > 0:
            raise ObjectNotFound(f"{uri}: nothing at the origin under this path")
        return out

    async def _ls(self, uri: str) -> list[dict[str, Any]]:
        if self.is_s3:
            return await self.fs._ls(self._path(uri), detail=True, refresh=True)
        return await asyncio.to_thread(self.fs.ls, self._path(uri), detail=True)

    async def check(self) -> None:
        """Fail fast at start if the root's bucket is missing or credentials are refused."""
        quick = RetryPolicy(attempts=min(3, self.policy.attempts),
                            base_delay_s=self.policy.base_delay_s, max_delay_s=1.0)
        try:
            await self._call("check", self.root, self._info, self.root, policy=quick)
        except BucketNotFound:
            raise
        except ObjectNotFound:
            # The bucket is there, the prefix is empty: fine for a fresh deployment.
            log.warning("nothing under the origin prefix yet", extra={"origin": self.root})

    async def _info(self, uri: str) -> dict[str, Any]:
        if self.is_s3:
            bucket_only = "/" not in self._path(uri).strip("/")
            try:
                return await self.fs._info(self._path(uri), refresh=True)
            except FileNotFoundError:
                if not bucket_only:
                    await self._raise_if_bucket_missing(uri)
                raise
        return await asyncio.to_thread(self.fs.info, self._path(uri))

    async def _head_s3(self, uri: str) -> dict[str, Any]:
        bucket, key = self._bucket_key(uri)
        return await asyncio.get_running_loop().run_in_executor(
            self._data_pool, self._data.head, bucket, key)

    def _bucket_key(self, uri: str) -> tuple[str, str]:
        bucket, _, key = self._path(uri).partition("/")
        return bucket, key

    async def _raise_if_bucket_missing(self, uri: str) -> None:
        # HEAD on a key answers a bare 404 whether the key or the bucket is missing;
        # ask about the bucket so the message says which.
        try:
            await self.fs._call_s3("head_bucket", Bucket=_bucket_of(uri))
        except Exception as e:
            code, status = _s3_error(e)
            if status == 404 or code in ("NoSuchBucket", "404") or isinstance(e, FileNotFoundError):
                raise BucketNotFound(
                    f"bucket {_bucket_of(uri)!r} does not exist (reading {uri}); check the "
                    "origin URL and the endpoint/region") from None

    async def _find(self, uri: str) -> dict[str, dict[str, Any]]:
        if self.is_s3:
            return await self.fs._find(self._path(uri), detail=True)
        return await asyncio.to_thread(self.fs.find, self._path(uri), detail=True)

    # --- small objects (manifest sidecars) ----------------------------------------

    async def read_small(self, uri: str) -> bytes | None:
        """A whole small object, or None if it does not exist."""
        async def cat() -> bytes:
            if self.is_s3:
                return await self.fs._cat_file(self._path(uri))
            return await asyncio.to_thread(self.fs.cat_file, self._path(uri))

        try:
            return await self._call("get", uri, cat)
        except ObjectNotFound:
            return None

    async def write_small(self, uri: str, data: bytes) -> None:
        async def pipe() -> None:
            if self.is_s3:
                await self.fs._pipe_file(self._path(uri), data)
            else:
                await asyncio.to_thread(self.fs.pipe_file, self._path(uri), data)

        await self._call("put", uri, pipe)

    # --- data -----------------------------------------------------------------

    async def vouch(self, obj: ObjectInfo) -> Vouch | None:
        """What the origin vouches for about ``obj``'s bytes (a digest of them), or None where
        it says nothing checkable: another protocol, an SSE-KMS ETag, a multipart object whose
        part sizes cannot be read, or the object replaced since ``obj`` was seen."""
        if not self.is_s3:
            return None
        bucket, key = self._bucket_key(obj.uri)
        loop = asyncio.get_running_loop()
        head = await self._call("head", obj.uri, lambda: loop.run_in_executor(
            self._data_pool, functools.partial(self._data.head, bucket, key, checksums=True)))
        if _etag_of(head) != obj.etag or int(head["ContentLength"]) != obj.size:
            return None
        sizes: list[int] | None = None
        if multipart_count(obj.etag):
            try:
                sizes = await self._call("head", obj.uri, lambda: loop.run_in_executor(
                    self._data_pool, self._data.part_sizes, bucket, key, obj.etag))
            except ColdbrewError as e:  # not every S3 implements GetObjectAttributes
                log.info("no part sizes for a multipart ETag check",
                         extra={"uri": obj.uri, "error": str(e)})
        return from_s3_head(obj.size, obj.etag, head.get("ChecksumSHA256"),
                            head.get("ChecksumType"), sizes)

    async def read_into(self, obj: ObjectInfo, start: int, buf: memoryview | Sequence[memoryview]
                        ) -> None:
        """Fill ``buf`` with bytes [start, start+len(buf)) of ``obj``, retrying transient faults.

        ``buf`` may be a list of buffers: one ranged GET fills them in order (a scatter read)."""
        await self._get(obj, start, buf, self._read_s3 if self.is_s3 else self._read_generic)

    @property
    def can_land(self) -> bool:
        """Whether :meth:`land` works here (the S3 data plane; other origins read into memory)."""
        return self.is_s3

    async def land(self, obj: ObjectInfo, start: int, buf: memoryview,
                   write: Callable[[int, memoryview], None]) -> None:
        """Bytes [start, start+len(buf)) of ``obj``, handed to ``write(pos, piece)`` piece by
        piece as they arrive (``buf`` holds each piece in between), retrying transient faults;
        a retry starts again at ``pos`` 0. What ``write`` raises is not retried.
        """
        if not self.is_s3:
            raise UsageError(f"{obj.uri}: landing needs an S3 origin")
        await self._get(obj, start, buf, functools.partial(self._read_s3, write=write))

    async def _get(self, obj: ObjectInfo, start: int, buf: memoryview | Sequence[memoryview],
                   reader: Callable[..., Awaitable[None]]) -> None:
        """One ranged read through ``reader``: checked, retried, counted."""
        length = _length(buf)
        end = start + length
        if not 0 <= start <= end <= obj.size:
            raise UsageError(f"{obj.uri}: range {start}-{end} outside 0-{obj.size}")
        started = self.flow.began()
        done = 0
        try:
            await self._call("get", obj.uri, reader, obj, start, buf,
                             what=f"GET {obj.uri} bytes {start}-{end - 1}")
            done = length
        finally:
            self.flow.ended(done, started)
        if self.metrics:
            self.metrics.origin_bytes.inc(length)
            self.metrics.origin_concurrency.set(self.flow.allowed)
            self.metrics.origin_throughput.set(self.flow.limit.throughput)

    async def _read_s3(self, obj: ObjectInfo, start: int, buf: memoryview | Sequence[memoryview],
                       write: Callable[[int, memoryview], None] | None = None) -> None:
        bucket, key = self._bucket_key(obj.uri)
        loop = asyncio.get_running_loop()
        if write is None:
            call = functools.partial(self._data.read_into, bucket, key, start, buf, obj.etag)
        else:
            call = functools.partial(self._data.land, bucket, key, start, buf, obj.etag, write)
        filled, etag = await finish_in_thread(loop.run_in_executor(self._data_pool, call))
        if etag != obj.etag:
            raise ObjectChanged(f"{obj.uri} changed at the origin (ETag {obj.etag} → "
                                f"{etag}); open it again to read the new version")
        if filled < _length(buf):
            raise TransientOriginError(f"{obj.uri}: short body, {filled} of {_length(buf)} bytes "
                                       f"from offset {start}", reason="short_body")

    async def _read_generic(self, obj: ObjectInfo, start: int,
                            buf: memoryview | Sequence[memoryview]) -> None:
        path = self._path(obj.uri)
        length = _length(buf)
        data = await asyncio.to_thread(self.fs.cat_file, path, start, start + length)
        info = await asyncio.to_thread(self.fs.info, path)
        if _etag_of(info) != obj.etag or int(info["size"]) != obj.size:
            raise ObjectChanged(f"{obj.uri} changed at the origin while it was being read; "
                                "open it again to read the new version")
        if len(data) < length:
            raise TransientOriginError(f"{obj.uri}: short read, {len(data)} of {length} bytes",
                                       reason="short_body")
        pos, got = 0, memoryview(data)
        for part in [buf] if isinstance(buf, memoryview) else buf:
            part[:] = got[pos:pos + len(part)]
            pos += len(part)

    async def _call(self, op: str, uri: str, fn: Any, *args: Any, what: str | None = None,
                    policy: RetryPolicy | None = None) -> Any:
        """One origin operation: translated errors, retries, and request metrics. Whether it
        reached the origin updates :attr:`health`; while the origin is unreachable, every
        operation retries only briefly (:mod:`.health`)."""

        async def attempt() -> Any:
            try:
                result = await fn(*args)
            except BaseException as e:
                if isinstance(e, asyncio.CancelledError):
                    raise
                err = translate(e, uri, self.endpoint)
                self._count(op, type(err).__name__)
                if not isinstance(err, TransientOriginError):
                    self._answered()  # a 404 or a 403 is an answer
                if err is e:
                    raise
                raise err from e
            self._count(op, "ok")
            self._answered()
            return result

        def on_retry(e: TransientOriginError, number: int, pause: float) -> None:
            if e.reason in THROTTLED:
                self.flow.throttled()
            if self.metrics:
                self.metrics.origin_retries.labels(e.reason).inc()
            log.info("origin retry", extra={"op": op, "uri": uri, "attempt": number,
                                            "pause_s": round(pause, 3), "error": str(e)})

        try:
            return await with_retries(attempt, self.health.policy(policy or self.policy),
                                      what=what or f"{op} {uri}", on_retry=on_retry)
        except OriginUnavailable as e:
            self._unreachable(str(e))
            raise OriginUnavailable(f"the origin is unreachable: {e}") from e

    def _unreachable(self, error: str) -> None:
        if self.health.failed(error, time.monotonic()):
            log.warning("origin unreachable; serving what is cached (origin_unreachable)",
                        extra={"origin": redact(self.root), "error": error})
            if self.metrics:
                self.metrics.origin_reachable.set(0)

    def _answered(self) -> None:
        if self.health.answered(time.monotonic()):
            log.warning("origin reachable again", extra={"origin": redact(self.root)})
            if self.metrics:
                self.metrics.origin_reachable.set(1)

    def _count(self, op: str, outcome: str) -> None:
        if self.metrics:
            self.metrics.origin_requests.labels(op, outcome).inc()


def _length(buf: memoryview | Sequence[memoryview]) -> int:
    """Bytes a read fills: one buffer's length, or a scatter read's total."""
    return len(buf) if isinstance(buf, memoryview) else sum(len(p) for p in buf)
