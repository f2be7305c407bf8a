"""One error hierarchy for all of coldbrew, and the one table that maps it to errno.

Every error a person can see derives from :class:`ColdbrewError` *and* from the
stdlib class a caller would naturally catch (``FileNotFoundError``,
``PermissionError``, ``ValueError``...), so ``except FileNotFoundError`` keeps
working for code that knows nothing about coldbrew. Messages are written for
the person at the terminal: what failed, on which object, and what to do.

The FUSE view answers syscalls with :func:`errno_for`; the CLI prints ``str(e)``
on one line and exits non-zero; the control API sends :attr:`ColdbrewError.kind`
so the client can rebuild the same class on the other side of the socket.
"""

from __future__ import annotations

import errno
import os
import re

#: ``scheme://user:password@host``: the userinfo of any URL in a message.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s\"'<>]+@")
#: Environment variables whose values are secrets wherever they turn up. Not the access key
#: id: it names a key, proves nothing, and a short one ("coldbrew" in the demo) is a common word.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "GOOGLE_OAUTH_ACCESS_TOKEN")


def redact(text: str) -> str:
    """``text`` without URL userinfo or the values of :data:`SECRET_ENV`: applied to every log
    line, error reply and CLI error, so a credential in ``endpoint_url`` or an exception's
    text never leaves the process."""
    text = _USERINFO.sub(r"\1***@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 16:  # real secrets are long; a short test value would blank out words
            text = text.replace(value, "***")
    return text


class ColdbrewError(Exception):
    """Base of every error coldbrew raises on purpose."""

    #: Stable machine-readable name, sent over the control API.
    kind = "error"
    #: What a FUSE syscall returns for this error.
    errno_code = errno.EIO


class ConfigError(ColdbrewError, ValueError):
    """A configuration value is missing or invalid (file, environment or flag)."""

    kind = "config"
    errno_code = errno.EINVAL


class HeaderError(ColdbrewError, ValueError):
    """A safetensors header is malformed, inconsistent or too large (untrusted input)."""

    kind = "bad_header"
    errno_code = errno.EINVAL


class UsageError(ColdbrewError, ValueError):
    """A request is malformed: an unknown URI scheme, a range past the end..."""

    kind = "usage"
    errno_code = errno.EINVAL


class OutsideRoots(ColdbrewError, PermissionError):
    """A control request names a URI outside the agent's origin and allowed roots."""

    kind = "outside_roots"
    errno_code = errno.EACCES


class NotAdmin(ColdbrewError, PermissionError):
    """A destructive call came on the runner socket; it is served on the admin socket only."""

    kind = "not_admin"
    errno_code = errno.EACCES


# --- origin (S3 and other fsspec stores) ------------------------------------


class OriginError(ColdbrewError, OSError):
    """The origin store failed in a way retries did not fix."""

    kind = "origin"
    errno_code = errno.EIO


class ObjectNotFound(OriginError, FileNotFoundError):
    """The object (or the prefix) does not exist at the origin."""

    kind = "not_found"
    errno_code = errno.ENOENT


class BucketNotFound(ObjectNotFound):
    """The bucket itself does not exist."""

    kind = "no_bucket"


class AccessDenied(OriginError, PermissionError):
    """Credentials are missing, wrong, or lack permission for this object."""

    kind = "access_denied"
    errno_code = errno.EACCES


class OriginUnavailable(OriginError, ConnectionError):
    """The origin could not be reached, or kept failing, after every retry."""

    kind = "origin_unavailable"
    errno_code = errno.EIO


class TransientOriginError(OriginError):
    """One attempt failed in a retryable way (5xx, SlowDown, short body, reset).

    Raised inside the retry loop only; callers see :class:`OriginUnavailable`
    once the retry budget is spent. ``reason`` labels the retry metric.
    """

    kind = "transient"

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason


class ObjectChanged(OriginError):
    """The object's ETag changed while we were reading it.

    Bytes of two versions are never mixed: the old version's cache entry is
    abandoned and the read fails; a fresh open sees the new version.
    """

    kind = "object_changed"
    errno_code = errno.ESTALE


class RequestTimeout(ColdbrewError, TimeoutError):
    """A request (e.g. a read through the FUSE view) got no answer within its deadline."""

    kind = "timeout"
    errno_code = errno.EIO


# --- cache and integrity -----------------------------------------------------


class CorruptData(ColdbrewError, OSError):
    """Bytes failed their digest check (from disk or a peer)."""

    kind = "corrupt"
    errno_code = errno.EIO


class ManifestRejected(CorruptData):
    """A peer's manifest, and the bytes it vouched for, did not match the origin's own
    checksum of the object: they were dropped and the file is fetched again."""

    kind = "manifest_rejected"
    errno_code = errno.EIO


class CacheError(ColdbrewError, OSError):
    """The local cache disk failed (full, read-only, I/O error).

    Never fatal to a read: the fetcher logs it, counts it and serves from origin.
    """

    kind = "cache"
    errno_code = errno.EIO


class CacheFull(CacheError):
    """The cache cannot make room: everything left is in use, or the disk is full."""

    kind = "cache_full"
    errno_code = errno.ENOSPC


class FileBusy(ColdbrewError):
    """The file is in use (open, being loaded or fetched) and cannot be evicted now."""

    kind = "busy"
    errno_code = errno.EBUSY


# --- the control API -----------------------------------------------------------


class AgentUnavailable(ColdbrewError, ConnectionError):
    """No agent answers on the control socket."""

    kind = "agent_unavailable"
    errno_code = errno.ECONNREFUSED


class AgentError(ColdbrewError):
    """The agent answered with an error this client has no class for."""

    kind = "agent"


class BadMessage(ColdbrewError, ValueError):
    """A control API message lacks a field or holds one of the wrong type: a bug, or an
    agent and a client too many versions apart (runner pods may lag the agent)."""

    kind = "bad_message"
    errno_code = errno.EPROTO


_BY_KIND: dict[str, type[ColdbrewError]] = {}


def _register(cls: type[ColdbrewError]) -> None:
    _BY_KIND[cls.kind] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(ColdbrewError)


def error_from_kind(kind: str, message: str) -> ColdbrewError:
    """Rebuild an error sent over the control API as ``{"kind", "message"}``."""
    return _BY_KIND.get(kind, AgentError)(message)


def errno_for(exc: BaseException) -> int:
    """The errno a syscall should fail with for ``exc`` (EIO when unknown)."""
    if isinstance(exc, ColdbrewError):
        return exc.errno_code
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
