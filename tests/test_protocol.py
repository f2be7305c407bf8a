"""The control API's messages: round trips, what an older or newer peer may send, the exact
wire, and the agent's replies read by the client (over a real unix socket)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from coldbrew.agent.cache.store import ChunkStore, Limits
from coldbrew.agent.control import protocol as p
from coldbrew.agent.control import server
from coldbrew.agent.control.client import _UNREADABLE, AgentClient, _decode, _open_verified
from coldbrew.agent.core.manifest import FileIdentity, digest
from coldbrew.agent.errors import BadMessage, ObjectChanged, ObjectNotFound, UsageError
from coldbrew.agent.fetch.jobs import FileProgress, PrewarmJob
from coldbrew.loader import sources

pytestmark = pytest.mark.unit

CHUNK = p.Chunk(index=1, offset=1 << 20, length=77, cached=True, path="/cache/data/ab", digest="0f" * 16)
ENSURE = p.EnsureReply(uri="s3://b/m/w.bin", etag='"e1"', size=(1 << 20) + 77, chunk_size=1 << 20,
                       lease="c0ffee", cached_bytes=77,
                       chunks=(CHUNK, p.Chunk(index=2, offset=2 << 20, length=5, cached=False)))
JOB = p.Job(id="pw-1", uris=("s3://b/m/",), state="running", files=2, files_done=1,
            bytes_total=300, bytes_done=100, elapsed_s=0.25, errors=("s3://b/m/x: gone",))
SAMPLES: list[p.Message] = [
    p.ErrorReply(p.ErrorDetail("not_found", "s3://b/k: no such object")),
    p.ErrorDetail("usage", "bad"),
    p.Health(version="0.1.0", ready=True, origin="s3://b", cache_dir="/var/cache/coldbrew",
             socket="/run/coldbrew/agent.sock", metrics_address="127.0.0.1:9400", chunk_size=1 << 24,
             pid=42, mount=None, agent_id="cb01", p2p_port=None,
             roots=("s3://b", "s3://shared/models")),
    p.PrewarmRequest(("s3://b/m/", "s3://b/n.bin")),
    JOB,
    p.JobList((JOB, dataclasses.replace(JOB, id="pw-2", state="done", errors=()))),
    p.FileStatus(uri="s3://b/m/w.bin", etag='"e1"', size=300, cached_bytes=0, chunks=None,
                 chunks_cached=0, complete=False),
    p.AgentTotals(origin="s3://b", cache_dir="/c", cache_bytes=5, cache_capacity_bytes=10,
                  served_bytes={"cache": 1, "peer": 0, "origin": 4}, origin_bytes=4, corrupt_chunks=0,
                  jobs_running=1, p2p={"peers": ["http://10.0.0.2:9401"], "connections": 1}),
    p.StatusReply(files=(), agent=p.AgentTotals(
        origin="s3://b", cache_dir="/c", cache_bytes=0, cache_capacity_bytes=10,
        served_bytes={}, origin_bytes=0, corrupt_chunks=0, jobs_running=0, p2p=None)),
    p.LsEntry(uri="s3://b/m", name="m", type="directory", size=0),
    p.LsReply(uri="s3://b/", entries=(
        p.LsEntry(uri="s3://b/m", name="m", type="directory", size=0),
        p.LsEntry(uri="s3://b/w.bin", name="w.bin", type="file", size=9, etag='"e"', mtime=1.5e9,
                  cached_bytes=9))),
    p.EvictRequest("s3://b/m"),
    p.EvictReply(evicted=("s3://b/m/w.bin",), bytes=300, busy=("s3://b/m/x.bin",)),
    p.EnsureRequest(uri="s3://b/m/w.bin", offset=5, length=None, lease=None, prefetch=True),
    CHUNK,
    ENSURE,
    p.ReleaseReply(released=True),
    p.CorruptRequest(lease="c0ffee", index=3),
    p.CorruptReply(index=3, was_corrupt=False),
    p.VerifyRequest(lease="c0ffee"),
    p.VerifyReply(uri="s3://models/a.safetensors", trust="checked"),
]


def every_message_type() -> set[type]:
    found, todo = set(), [p.Message]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.add(sub)
            todo.append(sub)
    return found


def over_the_wire(message: p.Message) -> object:
    return json.loads(json.dumps(message.to_json()))


def test_the_samples_cover_every_message_type():
    assert every_message_type() - {type(m) for m in SAMPLES} == set()


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    again = type(message).from_json(over_the_wire(message))
    assert again == message
    assert again.to_json() == message.to_json()


def test_json_arrays_read_as_tuples_so_a_message_is_immutable():
    reply = p.EnsureReply.from_json(over_the_wire(ENSURE))
    assert isinstance(reply.chunks, tuple) and isinstance(reply.chunks[0], p.Chunk)
    with pytest.raises(dataclasses.FrozenInstanceError):
        reply.chunks[0].digest = "forged"  # type: ignore[misc]


def test_unknown_fields_of_a_newer_peer_are_ignored_at_every_level():
    data = over_the_wire(ENSURE)
    data["replica_of"] = "cb02"
    data["chunks"][0]["compressed"] = True
    assert p.EnsureReply.from_json(data) == ENSURE


def test_a_missing_optional_field_takes_its_default():
    data = over_the_wire(ENSURE)
    del data["chunks"][1]["path"], data["chunks"][1]["digest"]
    assert p.EnsureReply.from_json(data).chunks[1] == p.Chunk(index=2, offset=2 << 20, length=5, cached=False)
    assert p.EnsureRequest.from_json({"lease": "c0ffee"}) == p.EnsureRequest(lease="c0ffee")


def test_a_missing_required_field_names_the_message_and_the_field():
    data = over_the_wire(ENSURE)
    del data["etag"]
    with pytest.raises(BadMessage, match=r"EnsureReply lacks the field 'etag'"):
        p.EnsureReply.from_json(data)
    data = over_the_wire(ENSURE)
    del data["chunks"][1]["index"]
    with pytest.raises(BadMessage, match=r"EnsureReply\.chunks\[1\] lacks the field 'index'"):
        p.EnsureReply.from_json(data)


@pytest.mark.parametrize("path, value, expected", [
    (("size",), "300", "int"),
    (("size",), True, "int"),  # a JSON bool is no size, although Python's bool is an int
    (("size",), None, "int"),  # null only where the field says so
    (("lease",), 7, "str"),
    (("chunks",), {"0": {}}, "a JSON array"),
    (("chunks", 0, "cached"), 1, "bool"),
    (("chunks", 0), "chunk", "a JSON object"),
    (("chunks", 0, "digest"), ["0f"], "str"),
])
def test_a_wrong_type_is_an_error_naming_the_field(path, value, expected):
    data = over_the_wire(ENSURE)
    holder = data
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    where = "EnsureReply" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path)
    with pytest.raises(BadMessage, match=re.escape(f"{where} should be {expected}")):
        p.EnsureReply.from_json(data)


def test_wrong_types_in_containers_and_at_the_top():
    with pytest.raises(BadMessage, match=r"AgentTotals\.served_bytes\['cache'\] should be int"):
        p.AgentTotals.from_json({**over_the_wire(SAMPLES[7]), "served_bytes": {"cache": 1.5}})
    with pytest.raises(BadMessage, match="Health should be a JSON object, not list"):
        p.Health.from_json(["0.1.0", True])
    assert p.Job.from_json({**over_the_wire(JOB), "elapsed_s": 2}).elapsed_s == 2.0  # an int is a float


def test_the_wire_is_the_json_the_agent_always_sent():
    assert ENSURE.to_json()["chunks"][1] == {"index": 2, "offset": 2 << 20, "length": 5, "cached": False,
                                             "path": None, "digest": None}
    assert p.EnsureRequest(lease="c0ffee", offset=4, length=8).to_json() == {
        "uri": None, "offset": 4, "length": 8, "lease": "c0ffee", "prefetch": False}
    assert p.ErrorReply.of(ObjectNotFound("s3://b/k: gone")).to_json() == {
        "error": {"kind": "not_found", "message": "s3://b/k: gone"}}
    # A directory's entry has no version and no bytes cached; a file's has all three, null or not.
    listing = over_the_wire(SAMPLES[10])
    assert listing["entries"][0] == {"uri": "s3://b/m", "name": "m", "type": "directory", "size": 0}
    file_entry = p.LsEntry(uri="file:///m/w", name="w", type="file", size=1, etag="1-2", cached_bytes=0)
    assert file_entry.to_json() == {"uri": "file:///m/w", "name": "w", "type": "file", "size": 1,
                                    "etag": "1-2", "mtime": None, "cached_bytes": 0}


def test_an_error_reply_is_rebuilt_as_its_class_by_the_client():
    reply = server._error(ObjectChanged("s3://b/k changed"), 412)
    assert reply.status == 412
    with pytest.raises(ObjectChanged, match="s3://b/k changed"):
        _decode(reply.status, reply.body)
    detail = p.ErrorReply.from_json(json.loads(reply.body)).error
    assert isinstance(detail.exception(), ObjectChanged)


# --- the agent's own reply builders, read on the client side ------------------------------


def test_the_servers_replies_parse_as_the_protocol(tmp_path):
    facts = {"origin": "s3://b", "cache_dir": str(tmp_path), "socket": str(tmp_path / "s"),
             "metrics_address": "127.0.0.1:9400", "chunk_size": 1024, "pid": 7, "mount": None,
             "agent_id": "cb01", "p2p_port": None}
    health = p.Health.from_json(over_the_wire(server.health_reply(facts, ready=True)))
    assert health.ready and health.chunk_size == 1024 and health.mount is None and health.version

    job = PrewarmJob(id="pw-1", uris=["s3://b/m/"], state="running",
                     files=[FileProgress("s3://b/m/a", 10, done_bytes=10), FileProgress("s3://b/m/b", 5)])
    read = p.Job.from_json(over_the_wire(server.job_reply(job)))
    assert (read.files, read.files_done, read.bytes_total, read.bytes_done) == (2, 1, 15, 10)

    store = ChunkStore(tmp_path / "cache", 1024, Limits(None, 0))
    store.open()
    try:
        identity = FileIdentity("s3://b/m/a", '"e"', 1500)
        entry = store.entry(identity)
        store.write_chunk(entry, 0, memoryview(b"x" * 1024))
        cached = p.FileStatus.from_json(over_the_wire(server.file_status(identity.uri, identity.etag,
                                                                         identity.size, entry)))
        assert (cached.chunks, cached.chunks_cached, cached.cached_bytes, cached.complete) == (2, 1, 1024, False)
    finally:
        store.close()
    unseen = p.FileStatus.from_json(over_the_wire(server.file_status("s3://b/x", '"f"', 3, None)))
    assert unseen.chunks is None and unseen.cached_bytes == 0


def test_a_fact_of_the_wrong_type_fails_in_the_agent_not_in_its_clients():
    with pytest.raises(BadMessage, match=r"Health\.chunk_size should be int"):
        server.health_reply({"chunk_size": "16MiB"}, ready=True)
    assert server._status_for(BadMessage("x")) == 500  # the agent's bug, not the caller's


# --- the client's requests and typed replies, over a real socket --------------------------


class StubAgent:
    """Answers each request on a unix socket with the next canned reply; records requests."""

    def __init__(self, path: Path, replies: list[tuple[int, bytes]]) -> None:
        self.requests: list[tuple[str, str, object]] = []
        self._replies = replies
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        for status, body in self._replies:
            conn, _ = self._sock.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = next((int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length")), 0)
                while len(rest) < length:
                    rest += conn.recv(65536)
                method, target, _ = lines[0].split(" ")
                self.requests.append((method, target, json.loads(rest) if rest else None))
                conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    def close(self) -> None:
        self._thread.join(10)
        self._sock.close()


def reply(message: p.Message, status: int = 200) -> tuple[int, bytes]:
    return status, json.dumps(message.to_json()).encode()


def test_the_clients_requests_are_the_protocols_and_its_replies_come_back_typed(tmp_path):
    agent = StubAgent(tmp_path / "a.sock", [
        reply(ENSURE), reply(p.CorruptReply(index=1, was_corrupt=True)),
        reply(SAMPLES[10]), reply(p.ReleaseReply(True)), reply(ENSURE),
    ])
    client = AgentClient(tmp_path / "a.sock")
    try:
        assert client.ensure_range("s3://b/m/w.bin", 0, 0, prefetch=True) == ENSURE
        assert client.report_corrupt("c0ffee", 1) == p.CorruptReply(index=1, was_corrupt=True)
        assert client.listing("s3://b/") == SAMPLES[10]
        client.release("c0ffee")
        assert client.ensure(lease="c0ffee", offset=7, length=9) == ENSURE.to_json()  # the document
    finally:
        agent.close()
    (m1, t1, ensure), (m2, t2, corrupt), (m3, t3, _), (m4, t4, _), (_, _, again) = agent.requests
    assert (m1, t1) == ("POST", "/v1/ensure")
    assert p.EnsureRequest.from_json(ensure) == p.EnsureRequest("s3://b/m/w.bin", 0, 0, None, True)
    assert p.EnsureRequest.from_json(ensure).to_json() == ensure  # every key the agent reads, as sent
    assert p.EnsureRequest.from_json(again) == p.EnsureRequest(None, 7, 9, "c0ffee", False)
    assert (m2, t2) == ("POST", "/v1/corrupt")
    assert p.CorruptRequest.from_json(corrupt) == p.CorruptRequest("c0ffee", 1)
    assert (m3, t3) == ("GET", "/v1/ls?uri=s3%3A%2F%2Fb%2F")
    assert (m4, t4) == ("POST", "/v1/leases/c0ffee/release")


def test_the_json_documents_carry_the_protocols_request_bodies(tmp_path):
    agent = StubAgent(tmp_path / "a.sock", [reply(JOB, 202), reply(SAMPLES[13])])
    client = AgentClient(tmp_path / "a.sock")
    try:
        assert p.Job.from_json(client.prewarm(["s3://b/m/"])) == JOB
        assert client.evict("s3://b/m") == SAMPLES[13].to_json()
    finally:
        agent.close()
    (_, _, prewarm), (_, _, evict) = agent.requests
    assert p.PrewarmRequest.from_json(prewarm) == p.PrewarmRequest(("s3://b/m/",))
    assert p.EvictRequest.from_json(evict) == p.EvictRequest("s3://b/m")


def test_an_agent_reply_missing_a_field_is_a_clear_error_for_typed_callers(tmp_path):
    old = ENSURE.to_json()
    del old["chunk_size"]
    agent = StubAgent(tmp_path / "a.sock", [(200, json.dumps(old).encode())])
    try:
        with pytest.raises(BadMessage, match="EnsureReply lacks the field 'chunk_size'"):
            AgentClient(tmp_path / "a.sock").ensure_range("s3://b/m/w.bin")
    finally:
        agent.close()


def test_a_malformed_request_body_is_the_callers_usage_error():
    class Request:  # what aiohttp hands a handler, as far as _body reads it
        path = "/v1/corrupt"

        async def json(self) -> object:
            return {"lease": "c0ffee", "index": "3"}

    with pytest.raises(UsageError, match=r"bad request to /v1/corrupt: .*CorruptRequest\.index should be int"):
        asyncio.run(server._body(Request(), p.CorruptRequest))  # type: ignore[arg-type]


def test_the_protocol_imports_no_typing_and_nothing_of_the_daemon():
    code = ("import sys\nbefore = set(sys.modules)\nimport coldbrew.agent.control.protocol\n"
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    loaded = set(out.stdout.split())
    assert "coldbrew.agent.control.protocol" in loaded, out
    assert not loaded & {"typing", "aiohttp", "xxhash", "coldbrew.agent.core.manifest"}, loaded


def test_open_verified_checks_the_chunk_at_its_offset(tmp_path):
    data = random.Random(5).randbytes(16384)  # two 8 KiB chunks, different bytes
    path = tmp_path / "data"
    path.write_bytes(data)
    good = p.Chunk(index=1, offset=8192, length=8192, cached=True, path=str(path), digest=digest(data[8192:]))
    fd = _open_verified(good)
    assert fd is not None and fd >= 0
    os.close(fd)
    assert _open_verified(dataclasses.replace(good, digest=digest(data[:8192]))) is None
    assert _open_verified(dataclasses.replace(good, digest=None)) is None  # never verified: not intact
    assert _open_verified(dataclasses.replace(good, length=16384)) is None  # past the end of the file
    assert _open_verified(dataclasses.replace(good, path=str(tmp_path / "gone"))) == _UNREADABLE


def test_the_loader_checks_an_agent_chunk_as_the_client_does(tmp_path):
    data = random.Random(6).randbytes(16384)
    path = tmp_path / "data"
    path.write_bytes(data)
    good = p.Chunk(index=1, offset=8192, length=8192, cached=True, path=str(path), digest=digest(data[8192:]))
    wanted = bytearray(100)
    # Only 100 bytes are wanted; the rest of the chunk is read into scratch so all of it is checked.
    assert sources._read_chunk(good, [(8192 + 50, memoryview(wanted))]) is sources._Read.OK
    assert wanted == data[8192 + 50:8192 + 150]
    for bad in (dataclasses.replace(good, digest=digest(data[:8192])), dataclasses.replace(good, digest=None),
                dataclasses.replace(good, path=None)):
        assert sources._read_chunk(bad, [(8192, memoryview(bytearray(8192)))]) is sources._Read.CORRUPT, bad
    # A file this process cannot open is no verdict on the bytes: the reader streams instead.
    gone = dataclasses.replace(good, path=str(tmp_path / "gone"))
    assert sources._read_chunk(gone, [(8192, memoryview(bytearray(8192)))]) is sources._Read.UNREADABLE
