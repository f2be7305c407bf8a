"""P2P with the cluster identity (mTLS): real agents, real libtorrent, real S3 on 127.0.0.1.

Members hold a certificate signed by the cluster CA (made here with ``cryptography``, as
cert-manager would); an outsider is a real process with none, or with one from another CA.
Each attack test shows the attack failing and that it was really tried (the agents count
refused TLS handshakes).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import libtorrent as lt
import pytest
from support.data import put_random
from test_p2p import CHUNK, CHUNK_ARG, assert_exact, wait_for_peers, wait_shared

from coldbrew.agent.core.manifest import FileIdentity, Manifest, digest
from coldbrew.agent.devtools.certs import ClusterCA
from coldbrew.agent.devtools.locals3 import free_port_pair
from coldbrew.agent.errors import ConfigError
from coldbrew.agent.p2p.tls import DH_PARAMS, PeerTLS, require_secure
from coldbrew.agent.p2p.torrent import torrent_bytes

pytestmark = pytest.mark.p2p


@pytest.fixture
def ca() -> ClusterCA:
    return ClusterCA.create()


@pytest.fixture
def members(make_agent: Any, proxy: Any, bucket: str, ca: ClusterCA, tmp_path: Path) -> Any:
    """``members(n)``: n agents with member certificates, each listing the others."""

    def make(n: int, **kw: Any) -> list[Any]:
        ports = [free_port_pair() for _ in range(n)]
        agents = []
        for i, port in enumerate(ports):
            tls_dir = ca.issue(tmp_path / f"tls{i}", f"member{i}")
            others = ",".join(f"127.0.0.1:{p}" for p in ports if p != port)
            args = ["--chunk-size", CHUNK_ARG, "--p2p-port", str(port), "--p2p-address", "127.0.0.1",
                    "--peers-refresh-s", "0.5", "--p2p-chunk-timeout-s", "5",
                    "--p2p-tls-dir", str(tls_dir)] + (["--peers", others] if others else [])
            agents.append(make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=args,
                                     name=f"member{i}", **kw))
        wait_for_peers(agents, n - 1)
        return agents

    return make


def _ports(agent: Any) -> tuple[int, int]:
    i = agent.extra_args.index("--p2p-port")
    http = int(agent.extra_args[i + 1])
    return http, http + 1


def _context(tls_dir: Path | None, ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca_pem.decode())
    if tls_dir is not None:
        ctx.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
    return ctx


def _fetch_manifest(port: int, key: str, ctx: ssl.SSLContext | None, scheme: str = "https") -> Any:
    async def go() -> Any:
        connector = aiohttp.TCPConnector(ssl=ctx) if ctx is not None else None
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.get(f"{scheme}://127.0.0.1:{port}/v1/peer/manifests/{key}") as r:
                return r.status, await r.json()

    try:
        return asyncio.run(go())
    except (aiohttp.ClientError, ssl.SSLError, OSError) as e:
        return e


class Outsider:
    """A stock libtorrent session: the attacker's tool of choice."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.session = lt.session({
            "listen_interfaces": f"127.0.0.1:{port}s", "enable_dht": False, "enable_lsd": False,
            "enable_upnp": False, "enable_natpmp": False, "enable_incoming_utp": False,
            "enable_outgoing_utp": False, "allow_multiple_connections_per_ip": True})

    def add(self, torrent: bytes, *, cert_dir: Path | None, seed_data: bytes | None = None) -> Any:
        self.workdir.mkdir(parents=True, exist_ok=True)
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(torrent)
        atp.save_path = str(self.workdir)
        atp.flags = lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd | lt.torrent_flags.disable_pex
        if seed_data is not None:
            (self.workdir / "data").write_bytes(seed_data)
            atp.have_pieces = [True] * atp.ti.num_pieces()
        handle = self.session.add_torrent(atp)
        if cert_dir is not None:
            handle.set_ssl_certificate_buffer((cert_dir / "tls.crt").read_text(),
                                              (cert_dir / "tls.key").read_text(), DH_PARAMS)
        return handle


def _received(handle: Any, port: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        handle.connect_peer(("127.0.0.1", port))
        time.sleep(0.5)
    return int(handle.status().total_payload_download)


def test_members_share_over_tls_and_an_outsider_can_neither_read_nor_offer(
        members: Any, s3_client: Any, bucket: str, proxy: Any, ca: ClusterCA, tmp_path: Path) -> None:
    data = put_random(s3_client, bucket, "m/model.bin", 8 * CHUNK + 77, seed=5)
    seed, member = members(2)
    seed.cli("prewarm", "m/model.bin", "--wait", "--quiet", check=True)
    wait_shared(seed, 1)
    proxy.reset_counts()
    member.cli("prewarm", "m/model.bin", "--wait", "--quiet", check=True)
    assert member.metric("coldbrew_p2p_received_bytes_total") == len(data), member.log()
    assert member.metric("coldbrew_origin_bytes_total") == 0
    assert_exact(member, f"s3://{bucket}/m/model.bin", data, tmp_path)

    http, bt = _ports(seed)
    key = _identity(s3_client, bucket, "m/model.bin").key()
    # A member's certificate opens the endpoint: the refusals below are about the certificate.
    status, body = _fetch_manifest(http, key, _context(tmp_path / "tls1", ca.cert_pem))
    assert status == 200
    manifest = Manifest.from_json(body)
    stranger = ClusterCA.create().issue(tmp_path / "stranger", "stranger")
    for ctx, scheme in ((_context(None, ca.cert_pem), "https"), (_context(stranger, ca.cert_pem), "https"),
                        (None, "http")):
        got = _fetch_manifest(http, key, ctx, scheme)
        assert isinstance(got, Exception), f"an outsider fetched the manifest: {got}"

    # libtorrent: the SSL torrent (the CA certificate is no secret) with a stranger's
    # certificate, or none, and the plaintext torrent of the same file: 0 bytes each.
    refused_before = seed.metric("coldbrew_p2p_refused_total", reason="tls")
    outsider = Outsider(tmp_path / "outsider", free_port_pair())
    ssl_torrent = torrent_bytes(manifest, ca.cert_pem)
    attempts = [outsider.add(ssl_torrent, cert_dir=stranger)]
    plain = Outsider(tmp_path / "plain", free_port_pair())
    plain.session.apply_settings({"listen_interfaces": f"127.0.0.1:{free_port_pair()}"})
    attempts.append(plain.add(torrent_bytes(manifest), cert_dir=None))
    for handle in attempts:
        assert _received(handle, bt, 3.0) == 0
    assert seed.metric("coldbrew_p2p_refused_total", reason="tls") > refused_before, \
        "the outsider's connections never reached the seed"
    shutil.rmtree(tmp_path / "outsider")
    shutil.rmtree(tmp_path / "plain")


def _identity(s3_client: Any, bucket: str, key: str) -> FileIdentity:
    head = s3_client.head_object(Bucket=bucket, Key=key)
    return FileIdentity(f"s3://{bucket}/{key}", head["ETag"], int(head["ContentLength"]))


def _manifest(identity: FileIdentity, data: bytes) -> Manifest:
    pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    return Manifest(identity, CHUNK, [digest(p) for p in pieces],
                    [hashlib.sha1(p).hexdigest() for p in pieces])


def test_pieces_an_outsider_offers_are_never_taken(
        members: Any, s3_client: Any, bucket: str, proxy: Any, ca: ClusterCA, tmp_path: Path) -> None:
    data = put_random(s3_client, bucket, "o/model.bin", 6 * CHUNK + 5, seed=6)
    (victim,) = members(1)
    _, bt = _ports(victim)
    # The outsider seeds the file's SSL torrent (the right bytes even: it only wants in).
    manifest = _manifest(_identity(s3_client, bucket, "o/model.bin"), data)
    stranger = ClusterCA.create().issue(tmp_path / "stranger", "stranger")
    outsider = Outsider(tmp_path / "outsider", free_port_pair())
    handle = outsider.add(torrent_bytes(manifest, ca.cert_pem), cert_dir=stranger, seed_data=data)
    refused_before = victim.metric("coldbrew_p2p_refused_total", reason="tls")
    for _ in range(6):
        handle.connect_peer(("127.0.0.1", bt))
        time.sleep(0.2)
    proxy.reset_counts()
    victim.cli("prewarm", "o/model.bin", "--wait", "--quiet", check=True)
    assert victim.metric("coldbrew_p2p_received_bytes_total") == 0
    assert victim.metric("coldbrew_origin_bytes_total") == len(data)
    assert victim.metric("coldbrew_p2p_refused_total", reason="tls") > refused_before
    assert int(handle.status().total_payload_upload) == 0
    shutil.rmtree(tmp_path / "outsider")


def test_idle_connections_from_an_outsider_cost_the_members_nothing_measurable(
        members: Any, s3_client: Any, bucket: str, proxy: Any) -> None:
    """A slow-announce stall: many connections opened to both peer ports that never finish
    a TLS handshake, held while a member pulls a file, against the same pull without them."""
    files = {name: put_random(s3_client, bucket, f"s/{name}", 16 * CHUNK, seed=20 + i)
             for i, name in enumerate(("calm.bin", "stalled.bin"))}
    seed, member = members(2)
    for name in files:
        seed.cli("prewarm", f"s/{name}", "--wait", "--quiet", check=True)
    wait_shared(seed, 2)

    def pull(name: str) -> float:
        t0 = time.monotonic()
        member.cli("prewarm", f"s/{name}", "--wait", "--quiet", check=True)
        return time.monotonic() - t0

    calm = pull("calm.bin")
    held = []
    for port in _ports(seed):
        for _ in range(64):
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
            held.append(s)
    try:
        stalled = pull("stalled.bin")
    finally:
        for s in held:
            s.close()
    got = member.metric("coldbrew_p2p_received_bytes_total")
    assert got == sum(len(d) for d in files.values()), "the stall pushed chunks to the origin"
    assert member.metric("coldbrew_origin_bytes_total") == 0
    assert stalled <= 2 * calm + 1.0, f"stalled pull {stalled:.2f} s against {calm:.2f} s"


def test_p2p_on_a_public_address_needs_tls_or_an_explicit_insecure(make_agent: Any, bucket: str,
                                                                    proxy: Any) -> None:
    port = free_port_pair()
    args = ["--p2p-port", str(port), "--p2p-address", "0.0.0.0"]
    refused = make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=args, start=False, name="open")
    with pytest.raises(RuntimeError) as e:
        refused.start()
    assert "without TLS" in str(e.value) and "p2p_insecure" in str(e.value)
    insecure = make_agent(f"s3://{bucket}", endpoint=proxy.url, name="insecure",
                          extra_args=[*args, "--p2p-insecure", "true"])
    assert insecure.metric("coldbrew_p2p_insecure") == 1
    assert "WITHOUT TLS" in insecure.log()


def test_a_broken_identity_stops_the_agent_with_the_file_named(
        make_agent: Any, bucket: str, proxy: Any, ca: ClusterCA, tmp_path: Path) -> None:
    ok = ca.issue(tmp_path / "ok", "ok")
    other = ca.issue(tmp_path / "other", "other")
    (tmp_path / "nokey").mkdir()
    for name in ("ca.crt", "tls.crt"):
        shutil.copy(ok / name, tmp_path / "nokey" / name)
    mixed = tmp_path / "mixed"
    shutil.copytree(ok, mixed)
    shutil.copy(other / "tls.key", mixed / "tls.key")
    for tls_dir, words in ((tmp_path / "nokey", "tls.key missing"), (mixed, "do not make a certificate")):
        agent = make_agent(f"s3://{bucket}", endpoint=proxy.url, start=False, name=tls_dir.name,
                           extra_args=["--p2p-port", str(free_port_pair()), "--p2p-address", "127.0.0.1",
                                       "--p2p-tls-dir", str(tls_dir)])
        with pytest.raises(RuntimeError) as e:
            agent.start()
        assert words in str(e.value)


def test_require_secure_is_the_rule_the_docs_state(tmp_path: Path, ca: ClusterCA) -> None:
    tls = PeerTLS.load(ca.issue(tmp_path / "m", "m"))
    assert require_secure("127.0.0.1", None, insecure=False) is False
    assert require_secure("::1", None, insecure=False) is False
    assert require_secure("10.0.0.5", tls, insecure=False) is False
    assert require_secure("10.0.0.5", None, insecure=True) is True
    with pytest.raises(ConfigError, match="without TLS"):
        require_secure("0.0.0.0", None, insecure=False)
    # a renewal is picked up, and a half-written one refused while the old set stays
    assert tls.reload() is False
    before = tls.cert_pem
    time.sleep(0.01)
    ca.issue(tmp_path / "m", "m")
    assert tls.reload() is True and tls.cert_pem != before
    renewed = tls.cert_pem
    (tmp_path / "m" / "tls.key").write_text("garbage")
    with pytest.raises(ConfigError):
        tls.reload()
    assert tls.cert_pem == renewed  # the renewed set is still in place
