"""The control API's messages: every request body and reply the agent's unix socket carries.

An agent and the runner pods that talk to it may run different versions of coldbrew, so each
message is a frozen dataclass that checks what it reads. ``from_json`` ignores a field it does
not know (a newer peer's addition) and raises :class:`~coldbrew.agent.errors.BadMessage`,
naming the message and the field, when one it needs is missing or holds the wrong type.
``to_json`` writes the JSON the agent has always sent, key for key, so older clients and
agents keep understanding it.

One generic reader serves every message: it walks :func:`dataclasses.fields` and checks each
value against the field's annotation. The annotations are therefore real types, evaluated at
class creation (``int``, ``str | None``, ``tuple[Chunk, ...]``), and this module does without
``from __future__ import annotations``. A JSON array is a tuple here, so a message is
immutable down to its few open maps (``served_bytes``, ``p2p``), which stay dicts.

Stdlib only, and not ``typing`` at run time: the agent, runner pods (the loader) and
``coldbrew get`` import this. Not the CLI's small commands (``status``, ``prewarm``, ``ls``):
importing this module took 38 ms (median of 15 ``python -X importtime`` runs on the
2-core dev VM, 15 ms of it ``dataclasses`` and most of the rest the generated methods of
its classes), against a whole ``coldbrew status`` start of about 44 ms of CPU
(bench/RESULTS.md, "Finding: the CLI's start"). The client hands those commands the JSON
as it came.
"""

import types
from dataclasses import MISSING, dataclass, fields

from ..errors import BadMessage, ColdbrewError, error_from_kind, redact

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Self

_NONE = type(None)


# --- the generic reader and writer -------------------------------------------------------


class Message:
    """Base of every message: JSON out and in, through the dataclass's fields."""

    def to_json(self) -> dict[str, object]:
        return {f.name: _write(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, data: object) -> "Self":
        """Read a message from decoded JSON; raises BadMessage naming what is wrong."""
        return cls._read(data, cls.__name__)

    @classmethod
    def _read(cls, data: object, where: str) -> "Self":
        if not isinstance(data, dict):
            raise _wrong_type(where, "a JSON object", data)
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                values[f.name] = _read(f.type, data[f.name], f"{where}.{f.name}")
            elif f.default is MISSING and f.default_factory is MISSING:
                raise BadMessage(f"control API message {where} lacks the field {f.name!r} "
                                 "(are the agent and this client of different versions?)")
        return cls(**values)


def _read(annotation: object, value: object, where: str) -> object:
    """``value`` checked against ``annotation``: a message, ``X | None``, ``tuple[X, ...]``,
    ``dict[str, X]``, a JSON scalar type, or ``object`` (anything)."""
    if isinstance(annotation, type) and issubclass(annotation, Message):
        return annotation._read(value, where)
    if isinstance(annotation, types.UnionType):
        if value is None and _NONE in annotation.__args__:
            return None
        (inner,) = (a for a in annotation.__args__ if a is not _NONE)
        return _read(inner, value, where)
    if isinstance(annotation, types.GenericAlias):
        return _read_container(annotation, value, where)
    if annotation is object:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # JSON writes 2.0 as 2 in some encoders
    # bool is an int in Python, never in JSON: True is not a size.
    if isinstance(annotation, type) and isinstance(value, annotation) and not (
            isinstance(value, bool) and annotation is not bool):
        return value
    raise _wrong_type(where, getattr(annotation, "__name__", str(annotation)), value)


def _read_container(annotation: types.GenericAlias, value: object, where: str) -> object:
    origin, args = annotation.__origin__, annotation.__args__
    if origin is tuple:
        if not isinstance(value, list):
            raise _wrong_type(where, "a JSON array", value)
        return tuple(_read(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong_type(where, "a JSON object", value)
        return {k: _read(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where}: the protocol has no reader for {annotation}")  # a bug here


def _write(value: object) -> object:
    if isinstance(value, Message):
        return value.to_json()
    if isinstance(value, tuple | list):
        return [_write(v) for v in value]
    if isinstance(value, dict):
        return {k: _write(v) for k, v in value.items()}
    return value


def _wrong_type(where: str, expected: str, value: object) -> BadMessage:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return BadMessage(f"control API message {where} should be {expected}, not "
                      f"{type(value).__name__} {shown}")


# --- errors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorDetail(Message):
    #: :attr:`ColdbrewError.kind`: the client rebuilds the same class from it.
    kind: str
    message: str

    def exception(self) -> ColdbrewError:
        return error_from_kind(self.kind, self.message)


@dataclass(frozen=True)
class ErrorReply(Message):
    """Any failed request: ``{"error": {"kind", "message"}}``, with a matching HTTP status."""

    error: ErrorDetail

    @classmethod
    def of(cls, exc: ColdbrewError) -> "ErrorReply":
        return cls(ErrorDetail(exc.kind, redact(str(exc))))


# --- health -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Health(Message):
    """``GET /v1/health``: what the agent is and how it is set up (facts are null until the
    agent knows them)."""

    version: str
    ready: bool
    origin: str | None = None
    cache_dir: str | None = None
    socket: str | None = None
    metrics_address: str | None = None
    chunk_size: int | None = None
    pid: int | None = None
    #: The FUSE view's mount point; null when the agent mounts none.
    mount: str | None = None
    agent_id: str | None = None
    #: Null when P2P sharing is off.
    p2p_port: int | None = None
    #: The URI roots this agent serves (its origin, then ``allowed_roots``): a reader asks
    #: here before it sends a URI the agent would refuse. Null from agents before this field.
    roots: tuple[str, ...] | None = None


# --- prewarm jobs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PrewarmRequest(Message):
    """``POST /v1/prewarm``."""

    uris: tuple[str, ...]


@dataclass(frozen=True)
class Job(Message):
    """A prewarm job's progress: the reply to a prewarm and to ``GET /v1/jobs/{id}``."""

    id: str
    uris: tuple[str, ...]
    #: expanding, running, done or failed.
    state: str
    files: int
    files_done: int
    bytes_total: int
    bytes_done: int
    elapsed_s: float
    errors: tuple[str, ...]


@dataclass(frozen=True)
class JobList(Message):
    """``GET /v1/jobs``."""

    jobs: tuple[Job, ...]


# --- status, ls, evict ---------------------------------------------------------------------


@dataclass(frozen=True)
class FileStatus(Message):
    """One file version and how much of it the node cache holds."""

    uri: str
    etag: str
    size: int
    cached_bytes: int
    #: Null for a file the cache has never seen (its chunk size is not known yet).
    chunks: int | None
    chunks_cached: int
    complete: bool


@dataclass(frozen=True)
class AgentTotals(Message):
    """The agent's cache and traffic, as ``coldbrew status`` shows them."""

    origin: str
    cache_dir: str
    cache_bytes: int
    cache_capacity_bytes: int
    #: Bytes handed to readers, by where they came from (cache, peer, origin).
    served_bytes: dict[str, int]
    origin_bytes: int
    corrupt_chunks: int
    jobs_running: int
    #: The P2P layer's own counters, passed through as it reports them; null when P2P is off.
    p2p: dict[str, object] | None
    #: False while the origin cannot be reached (cached versions are served, or refused under
    #: origin_unreachable = fail); ``origin_error`` says what failed. Null from older agents.
    origin_reachable: bool | None = None
    origin_error: str | None = None
    #: Origin GETs allowed in flight now, whether that number adapts (fetch_concurrency =
    #: auto), and the throughput its last round measured (bytes/s). Null from older agents.
    origin_concurrency: int | None = None
    origin_concurrency_auto: bool | None = None
    origin_throughput: float | None = None


@dataclass(frozen=True)
class StatusReply(Message):
    """``GET /v1/status``."""

    files: tuple[FileStatus, ...]
    agent: AgentTotals


#: The keys only a file's entry in a listing has (a directory has no version, no bytes cached).
_FILE_ONLY = ("etag", "mtime", "cached_bytes")


@dataclass(frozen=True)
class LsEntry(Message):
    """One name in a listing: a ``directory`` (a prefix) or a ``file`` (an object)."""

    uri: str
    name: str
    type: str
    size: int
    etag: str | None = None
    mtime: float | None = None
    cached_bytes: int | None = None

    def to_json(self) -> dict[str, object]:
        out = super().to_json()
        if self.type == "directory":
            for key in _FILE_ONLY:
                del out[key]
        return out


@dataclass(frozen=True)
class LsReply(Message):
    """``GET /v1/ls``: one level of the origin."""

    uri: str
    entries: tuple[LsEntry, ...]


@dataclass(frozen=True)
class EvictRequest(Message):
    """``POST /v1/evict``: a file, or every file under a prefix."""

    uri: str


@dataclass(frozen=True)
class EvictReply(Message):
    evicted: tuple[str, ...]
    #: Bytes freed.
    bytes: int
    #: Files in use (leased, open, being fetched): left in the cache.
    busy: tuple[str, ...]


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnsureRequest(Message):
    """``POST /v1/ensure``: make bytes ``[offset, offset+length)`` present; ``length`` null: to
    the end. Names the file by ``uri`` (a new lease) or by a ``lease`` it holds."""

    uri: str | None = None
    offset: int = 0
    length: int | None = None
    lease: str | None = None
    #: Also start reading the rest of the file ahead, in order.
    prefetch: bool = False


@dataclass(frozen=True)
class Chunk(Message):
    """Where one chunk of an ensured range lies: at its own ``offset`` of the data file at
    ``path`` (same node), to be checked against ``digest`` before use."""

    index: int
    offset: int
    length: int
    #: False: the cache could not keep it (full, failing); read it with ``GET /v1/read``.
    cached: bool
    path: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class EnsureReply(Message):
    """The file version the lease pins, and the chunks of the range asked for."""

    uri: str
    etag: str
    size: int
    chunk_size: int
    lease: str
    cached_bytes: int
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class ReleaseReply(Message):
    """``POST /v1/leases/{id}/release``."""

    released: bool


@dataclass(frozen=True)
class CorruptRequest(Message):
    """``POST /v1/corrupt``: chunk ``index`` of the leased file failed its digest here."""

    lease: str
    index: int


@dataclass(frozen=True)
class VerifyRequest(Message):
    """``POST /v1/verify``: wait until every check the agent owes the leased file's bytes
    is done (a peer's manifest on probation: the whole file fetched and checked against the
    origin). An error reply (``manifest_rejected``) means the bytes read were not the
    object's."""

    lease: str


@dataclass(frozen=True)
class VerifyReply(Message):
    uri: str
    #: Why the cached bytes can be trusted: origin (digests made here from origin bytes),
    #: kept, published, built, checked (a peer's manifest the origin confirmed) or member.
    trust: str


@dataclass(frozen=True)
class CorruptReply(Message):
    index: int
    #: Whether the agent saw the corruption too (then it dropped and fetched the chunk again).
    was_corrupt: bool
