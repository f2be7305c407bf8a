"""Tests of the fault-injecting proxy used by the agent's S3 fault tests.

A fault test is only worth something if its fault fired and did what it says,
so each action is checked here for its effect on the wire *and* its counter.
The upstream is a tiny stdlib HTTP/1.1 server over an in-memory 8 MiB blob.
"""

from __future__ import annotations

import hashlib
import http.client
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

try:
    from tests.support.faultproxy import Fault, FaultProxy
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from support.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
BLOB = random.Random(1234).randbytes(8 * MiB)
CHUNKED_LEN = MiB + 12345  # /chunked serves BLOB[:CHUNKED_LEN] with chunked encoding


# --------------------------------------------------------------------------- upstream


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # else header and body writes wait on delayed ACKs
    store: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._get(send_body=True)

    def do_HEAD(self) -> None:
        self._get(send_body=False)

    def _get(self, send_body: bool) -> None:
        if self.path == "/bye":  # answers as if keep-alive, then hangs up (an idle timeout)
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"bye")
            return
        if self.path == "/chunked":
            return self._chunked(BLOB[:CHUNKED_LEN])
        data = BLOB if self.path == "/blob" else self.store.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        code, start, end = 200, 0, len(data) - 1
        if "Range" in self.headers:
            code, (start, end) = 206, _parse_range(self.headers["Range"], len(data))
        self.send_response(code)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if send_body:
            self.wfile.write(memoryview(data)[start:end + 1])

    def _chunked(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(data), 100_000):
            piece = data[i:i + 100_000]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def do_PUT(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            data = self._read_chunked()
        else:
            data = self.rfile.read(int(self.headers["Content-Length"]))
        self.store[self.path] = data
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.read(2)


def _parse_range(value: str, size: int) -> tuple[int, int]:
    first, last = value.split("=", 1)[1].split("-")
    if not first:
        return size - int(last), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 64 parallel connections arrive at once

    def handle_error(self, request, client_address) -> None:
        pass  # truncate/reset faults make the proxy hang up on us mid-body: expected


@pytest.fixture(scope="module")
def upstream():
    server = _QuietServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(upstream):
    with FaultProxy("127.0.0.1", upstream) as p:
        yield p


# --------------------------------------------------------------------------- helpers


def _conn(proxy: FaultProxy) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)


def _get(conn, path="/blob", rng=None, method="GET"):
    conn.request(method, path, headers={"Range": f"bytes={rng[0]}-{rng[1]}"} if rng else {})
    resp = conn.getresponse()
    return resp, resp.read()


def _raw_head(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    """Read one header block from a raw socket; returns (head, bytes after it)."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"closed before a full head: {buf!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _diff_positions(a: bytes, b: bytes, block: int = 1 << 16) -> list[int]:
    """Offsets where equal-length a and b differ (block compare first: fast)."""
    out = []
    for start in range(0, len(a), block):
        if a[start:start + block] != b[start:start + block]:
            out += [i for i in range(start, min(start + block, len(a))) if a[i] != b[i]]
    return out


# --------------------------------------------------------------------------- pass-through


def test_passthrough_is_byte_exact_on_one_keepalive_connection(proxy):
    assert proxy.url == f"http://127.0.0.1:{proxy.port}"
    conn = _conn(proxy)
    resp, body = _get(conn)
    assert resp.status == 200 and body == BLOB
    resp, body = _get(conn, rng=(100, 1099))
    assert resp.status == 206 and body == BLOB[100:1100]
    payload = random.Random(5).randbytes(3 * MiB + 7)
    conn.request("PUT", "/obj/put", body=payload)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200 and resp.getheader("ETag") == f'"{hashlib.md5(payload).hexdigest()}"'
    resp, body = _get(conn, "/obj/put")
    assert body == payload
    resp, body = _get(conn, "/obj/put", method="HEAD")
    assert body == b"" and resp.getheader("Content-Length") == str(len(payload))
    conn.close()

    c = proxy.counts
    assert c["requests"] == 5 and c["forwarded"] == 5
    assert c["by_method"] == {"GET": 3, "PUT": 1, "HEAD": 1}
    assert c["ranged_gets"] == 1
    assert c["connections"] == 1
    assert c["response_body_bytes"] == len(BLOB) + 1000 + len(payload)
    assert c["request_body_bytes"] == len(payload)
    assert c["status_codes"] == {200: 4, 206: 1}
    assert set(c["fired"].values()) == {0}

    proxy.reset_counts()
    assert proxy.counts["requests"] == 0


def test_chunked_request_and_response_bodies_pass_through(proxy):
    conn = _conn(proxy)
    payload = random.Random(6).randbytes(MiB + 3)
    pieces = (payload[i:i + 70_000] for i in range(0, len(payload), 70_000))
    conn.request("PUT", "/obj/chunked-put", body=pieces, encode_chunked=True)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    assert _get(conn, "/obj/chunked-put")[1] == payload
    resp, body = _get(conn, "/chunked")
    assert resp.getheader("Transfer-Encoding") == "chunked" and body == BLOB[:CHUNKED_LEN]
    assert proxy.counts["connections"] == 1


def test_expect_100_continue_is_answered_by_the_proxy(proxy):
    payload = b"x" * 5000
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"PUT /obj/expect HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        head, rest = _raw_head(s)
        assert head.startswith(b"HTTP/1.1 100")
        s.sendall(payload)
        head, rest = _raw_head(s, rest)
        assert head.startswith(b"HTTP/1.1 200")
    assert _Upstream.store["/obj/expect"] == payload


def test_status_fault_with_expect_answers_without_the_body_and_closes(proxy):
    proxy.add_fault(Fault.status(403), method="PUT")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"PUT /obj/denied HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        head, rest = _raw_head(s)
        assert head.startswith(b"HTTP/1.1 403") and b"Connection: close" in head
        while b"</Error>" not in rest:
            rest += s.recv(65536)
        assert b"<Code>AccessDenied</Code>" in rest
        s.shutdown(socket.SHUT_WR)
        assert s.recv(65536) == b""  # the proxy closes after the error
    assert proxy.counts["fired"]["status"] == 1 and proxy.counts["forwarded"] == 0


def test_upstream_hangup_between_requests_is_invisible_to_the_client(proxy):
    conn = _conn(proxy)
    for _ in range(3):
        assert _get(conn, "/bye")[1] == b"bye"
    assert _get(conn, rng=(0, 9))[1] == BLOB[:10]
    assert proxy.counts["connections"] == 1 and proxy.counts["forwarded"] == 4


def test_unreachable_upstream_gives_502():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with FaultProxy("127.0.0.1", dead) as p:
        resp, body = _get(_conn(p))
    assert resp.status == 502 and b"<Code>BadGateway</Code>" in body


# --------------------------------------------------------------------------- faults


def test_status_fault_answers_s3_xml_keeps_alive_and_stops_after_count(proxy):
    rule = proxy.add_fault(Fault.status(503, "SlowDown"), method="GET", path=r"^/blob$",
                           ranged_only=True, count=2)
    conn = _conn(proxy)
    resp, body = _get(conn)  # not ranged: not matched
    assert resp.status == 200 and body == BLOB
    for _ in range(2):
        resp, body = _get(conn, rng=(0, 99))
        assert resp.status == 503
        assert resp.getheader("Content-Type") == "application/xml"
        assert int(resp.getheader("Content-Length")) == len(body)
        assert b"<Code>SlowDown</Code>" in body and b"<Resource>/blob</Resource>" in body
    resp, body = _get(conn, rng=(0, 99))
    assert resp.status == 206 and body == BLOB[:100]

    c = proxy.counts
    assert c["fired"]["status"] == 2 and rule.applied == 2 and rule.remaining == 0
    assert c["requests"] == 4 and c["forwarded"] == 2 and c["ranged_gets"] == 3
    assert c["connections"] == 1  # the 503s kept the connection alive
    assert c["status_codes"] == {200: 1, 503: 2, 206: 1}


def test_status_fault_default_codes_head_and_put(proxy):
    proxy.add_fault(Fault.status(500), method="HEAD", count=1)
    proxy.add_fault(Fault.status(500), method="PUT", count=1)
    conn = _conn(proxy)
    resp, body = _get(conn, method="HEAD")
    assert resp.status == 500 and body == b""
    conn.request("PUT", "/obj/fail", body=b"y" * 100_000)  # body is drained, connection kept
    resp = conn.getresponse()
    assert resp.status == 500 and b"<Code>InternalError</Code>" in resp.read()
    conn.request("PUT", "/obj/fail", body=b"z" * 10)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200 and _Upstream.store["/obj/fail"] == b"z" * 10
    assert proxy.counts["fired"]["status"] == 2 and proxy.counts["connections"] == 1


def test_rules_match_by_method_and_path_first_match_wins(proxy):
    proxy.add_fault(Fault.status(404), method="PUT")
    proxy.add_fault(Fault.status(403), path=r"/obj/")
    proxy.add_fault(Fault.status(500), path="/blob")
    conn = _conn(proxy)
    assert _get(conn, "/obj/anything")[0].status == 403
    assert _get(conn, "/blob", rng=(0, 0))[0].status == 500
    proxy.clear_faults()
    assert _get(conn, "/blob", rng=(0, 0))[0].status == 206
    assert proxy.counts["fired"]["status"] == 2


def test_truncate_sends_original_length_then_closes_short(proxy):
    proxy.add_fault(Fault.truncate(1000), count=1)
    conn = _conn(proxy)
    conn.request("GET", "/blob")
    resp = conn.getresponse()
    assert resp.getheader("Content-Length") == str(len(BLOB))
    with pytest.raises(http.client.IncompleteRead) as err:
        resp.read()
    assert err.value.partial == BLOB[:1000]
    assert proxy.counts["fired"]["truncate"] == 1

    resp, body = _get(_conn(proxy))  # count exhausted: whole body again
    assert body == BLOB
    c = proxy.counts
    assert c["fired"]["truncate"] == 1 and c["response_body_bytes"] == 1000 + len(BLOB)


def test_truncate_chunked_response_and_no_fire_when_body_is_short(proxy):
    proxy.add_fault(Fault.truncate(500_000), path="/chunked", count=1)
    proxy.add_fault(Fault.truncate(1000), path="/blob", count=1)
    conn = _conn(proxy)
    conn.request("GET", "/chunked")
    with pytest.raises(http.client.IncompleteRead):
        conn.getresponse().read()
    resp, body = _get(_conn(proxy), rng=(0, 999))  # exactly 1000 bytes: nothing to cut
    assert body == BLOB[:1000]
    assert proxy.counts["fired"]["truncate"] == 1


def test_corrupt_flips_exactly_one_byte(proxy):
    proxy.add_fault(Fault.corrupt(5), count=1)
    proxy.add_fault(Fault.corrupt(3 * MiB + 17), path="/blob$", count=1)  # lands in a later piece
    conn = _conn(proxy)
    resp, body = _get(conn, rng=(1000, 1999))
    expected = bytearray(BLOB[1000:2000])
    expected[5] ^= 0xFF
    assert resp.status == 206 and body == bytes(expected)
    resp, body = _get(conn)
    assert len(body) == len(BLOB) and _diff_positions(body, BLOB) == [3 * MiB + 17]
    assert proxy.counts["fired"]["corrupt"] == 2


def test_corrupt_past_the_end_does_not_fire(proxy):
    proxy.add_fault(Fault.corrupt(10_000), count=1)
    assert _get(_conn(proxy), rng=(0, 99))[1] == BLOB[:100]
    assert proxy.counts["fired"]["corrupt"] == 0


def test_delay_before_request_and_mid_body(proxy):
    proxy.add_fault(Fault.delay(0.3), count=1)
    conn = _conn(proxy)
    t0 = time.monotonic()
    assert _get(conn, rng=(0, 99))[1] == BLOB[:100]
    assert time.monotonic() - t0 >= 0.29
    proxy.add_fault(Fault.delay(0.3, after_bytes=5000), count=1)
    t0 = time.monotonic()
    conn.request("GET", "/blob", headers={"Range": "bytes=0-99999"})
    resp = conn.getresponse()
    assert resp.read(5000) == BLOB[:5000]
    assert resp.read() == BLOB[5000:100000]
    assert time.monotonic() - t0 >= 0.29
    assert proxy.counts["fired"]["delay"] == 2


def test_reset_gives_a_connection_error_without_contacting_upstream(proxy):
    proxy.add_fault(Fault.reset(), count=1)
    conn = _conn(proxy)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        _get(conn, rng=(0, 9))
    assert _get(_conn(proxy), rng=(0, 9))[1] == BLOB[:10]
    c = proxy.counts
    assert c["fired"]["reset"] == 1 and c["requests"] == 2 and c["forwarded"] == 1


def _fault_pattern(upstream: int, n: int) -> list[bool]:
    with FaultProxy("127.0.0.1", upstream) as p:
        p.add_fault(Fault.status(503), probability=0.5, seed=7)
        conn = _conn(p)
        return [_get(conn, rng=(0, 0))[0].status == 503 for _ in range(n)]


def test_probability_is_seeded_and_deterministic(upstream):
    first = _fault_pattern(upstream, 30)
    assert 0 < sum(first) < 30
    assert _fault_pattern(upstream, 30) == first


# --------------------------------------------------------------------------- load


def test_64_parallel_ranged_gets_are_byte_exact(proxy):
    def worker(i: int) -> bool:
        rnd = random.Random(i)
        conn = _conn(proxy)
        try:
            for _ in range(2):
                start = rnd.randrange(len(BLOB) - 1)
                end = min(len(BLOB) - 1, start + rnd.randrange(256 << 10))
                resp, body = _get(conn, rng=(start, end))
                if resp.status != 206 or body != BLOB[start:end + 1]:
                    return False
            return True
        finally:
            conn.close()

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(worker, range(64)))
    assert all(results)
    c = proxy.counts
    assert c["requests"] == 128 and c["ranged_gets"] == 128 and c["connections"] == 64


def test_bandwidth_cap_slows_transfers(proxy):
    proxy.set_bandwidth(8 * MiB)
    t0 = time.monotonic()
    resp, body = _get(_conn(proxy), rng=(0, 4 * MiB - 1))
    elapsed = time.monotonic() - t0
    assert body == BLOB[:4 * MiB]
    assert elapsed >= 0.4  # lower bound only: a loaded machine may be slower
    proxy.bandwidth = None
    assert proxy.bandwidth is None


# --------------------------------------------------------------------------- botocore


def test_botocore_retries_503_and_sees_truncation(proxy):
    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config
    from botocore.exceptions import ResponseStreamingError

    s3 = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                      aws_access_key_id="k", aws_secret_access_key="s",
                      config=Config(retries={"mode": "standard", "max_attempts": 3},
                                    s3={"addressing_style": "path"}))
    proxy.add_fault(Fault.status(503, "SlowDown"), count=1)
    _Upstream.store["/bucket/key"] = BLOB[:100_000]
    body = s3.get_object(Bucket="bucket", Key="key")["Body"].read()
    assert body == BLOB[:100_000]
    assert proxy.counts["fired"]["status"] == 1 and proxy.counts["requests"] == 2

    proxy.add_fault(Fault.truncate(1000), count=1)
    resp = s3.get_object(Bucket="bucket", Key="key")
    with pytest.raises(ResponseStreamingError):
        resp["Body"].read()
    assert proxy.counts["fired"]["truncate"] == 1
