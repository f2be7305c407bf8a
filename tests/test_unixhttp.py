"""The CLI's small HTTP client: heads, bodies, and answers cut short (real socket pairs)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from coldbrew.agent.control import unixhttp
from coldbrew.agent.control.unixhttp import ProtocolError, Response, parse_head, request_bytes


def test_parse_head_reads_status_and_lowercases_names():
    status, headers = parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 12\r\nX-Coldbrew-ETag: \"e\"")
    assert status == 404
    assert headers == {"content-length": "12", "x-coldbrew-etag": '"e"'}


@pytest.mark.parametrize("head", [b"SSH-2.0-OpenSSH", b"HTTP/1.1 abc OK", b"HTTP/1.1 200 OK\r\nno colon"])
def test_parse_head_refuses_what_is_not_http(head):
    with pytest.raises(ProtocolError):
        parse_head(head)


def test_request_is_http_1_0_with_a_length_for_bodies():
    raw = request_bytes("POST", "/v1/prewarm", b'{"uris": []}', "application/json")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"POST /v1/prewarm HTTP/1.0"
    assert b"Content-Length: 12" in head and body == b'{"uris": []}'


def answer(raw: bytes) -> Response:
    """A Response read from a real socket whose peer sends ``raw`` and hangs up."""
    ours, theirs = socket.socketpair()

    def send() -> None:
        with theirs:
            theirs.sendall(raw)

    t = threading.Thread(target=send)
    t.start()
    response = Response(ours)
    t.join(10)
    return response


def test_body_ends_at_content_length_even_if_more_follows():
    with answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello, and more") as r:
        assert r.status == 200 and r.read_all() == b"hello"


def test_body_without_length_runs_to_close_and_reads_in_pieces():
    body = bytes(range(256)) * 1000
    with answer(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + body) as r:
        pieces = []
        while piece := r.read(4096):
            assert len(piece) <= 4096
            pieces.append(piece)
        assert b"".join(pieces) == body


def test_an_answer_cut_short_is_an_error_for_read_all_and_visible_to_read():
    with answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly forty bytes of the hundred promised") as r:
        with pytest.raises(ProtocolError, match="hung up 60 bytes before the end"):
            r.read_all()
    with answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 40) as r:
        got = b""
        while piece := r.read(64):
            got += piece
        assert got == b"x" * 40 and r.remaining == 60


def test_hang_up_before_the_head_and_oversized_heads_are_errors():
    with pytest.raises(ProtocolError, match="before answering"):
        answer(b"HTTP/1.1 200 OK\r\nContent-Le")
    with pytest.raises(ProtocolError, match="larger than 64 KiB"):
        answer(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * (unixhttp.MAX_HEAD_BYTES + 10))


def test_no_socket_is_an_os_error_the_client_turns_into_advice(tmp_path):
    from coldbrew.agent.control.client import AgentClient
    from coldbrew.agent.errors import AgentUnavailable

    with pytest.raises(FileNotFoundError):
        unixhttp.exchange(str(tmp_path / "none.sock"), "GET", "/v1/health")
    with pytest.raises(AgentUnavailable, match="no coldbrew agent is listening .* start one"):
        AgentClient(tmp_path / "none.sock").health()


# What a small CLI command imports on top of the interpreter's own start-up: each of these
# costs every `coldbrew get/status/prewarm` milliseconds (bench/RESULTS.md, "Finding: the CLI's start").
_HEAVY = ("pathlib", "typing", "urllib.parse", "dataclasses", "concurrent.futures", "logging",
          "asyncio", "http.client", "email", "ssl", "shutil", "coldbrew.agent.config")


@pytest.mark.parametrize("argv", [["status"], ["get", "s3://b/k", "/tmp/x"],
                                  ["prewarm", "s3://b/k", "--wait"]])
def test_small_cli_commands_import_nothing_heavy(tmp_path, argv):
    code = ("import sys\n"
            "before = set(sys.modules)\n"
            "from coldbrew.agent.app import cli\n"
            f"rc = cli.main({argv!r} + ['--socket', {str(tmp_path / 'none.sock')!r}])\n"
            "print(rc, ' '.join(sorted(set(sys.modules) - before)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    rc, _, loaded = out.stdout.strip().partition(" ")
    assert rc == "3", out  # no agent: it got as far as connecting
    assert "coldbrew.agent.control.client" in loaded.split()
    assert not set(loaded.split()) & set(_HEAVY), loaded


def test_help_lists_every_command_and_each_command_has_its_own(tmp_path):
    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "coldbrew.agent", *args], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out
        return out.stdout

    top = cli("--help")
    for command in ("agent", "prewarm", "status", "ls", "evict", "get", "publish", "demo"):
        assert f"    {command} " in top
    assert "usage: coldbrew get [-h] [--quiet] [--socket SOCKET] uri dest" in cli("get", "--help")
    assert "--cache-dir" in cli("agent", "--help")
