"""A cluster member that forges a manifest and its pieces: real agents, real libtorrent, real
S3 on 127.0.0.1. The attacker is a real agent whose cache was altered while it was stopped:
4 KiB of one chunk changed, and its saved manifest rewritten to vouch for them, so it serves
the forged manifest and the forged pieces to its peers as if they were the object's.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from test_p2p import CHUNK, wait_for_peers, wait_shared
from test_p2p_tls import _context, _fetch_manifest, _ports

from coldbrew.agent.core.manifest import Manifest, digest
from coldbrew.agent.core.vouch import FileCheck, from_s3_head
from coldbrew.agent.devtools.certs import ClusterCA
from coldbrew.agent.errors import ManifestRejected
from coldbrew.loader import load_file

pytestmark = pytest.mark.p2p

FORGED_CHUNK = 3


def _model(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layer{i}.weight": torch.randn(512, 512, generator=g) for i in range(10)}
    return st_save(tensors)  # ~10 MiB: 10 chunks


def _upload(s3_client: Any, bucket: str, key: str, data: bytes, multipart: bool) -> None:
    if not multipart:
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)
        return
    part = 5 << 20
    upload = s3_client.create_multipart_upload(Bucket=bucket, Key=key)
    parts = []
    for number, start in enumerate(range(0, len(data), part), 1):
        r = s3_client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                  PartNumber=number, Body=data[start:start + part])
        parts.append({"ETag": r["ETag"], "PartNumber": number})
    s3_client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                        MultipartUpload={"Parts": parts})


def _forge(agent: Any) -> Manifest:
    """Alter 4 KiB of one chunk in the stopped agent's cache and make its manifest agree."""
    (entry,) = [p.parent for p in agent.cache_dir.glob("coldbrew-v2/files/*/*/manifest.json")]
    with open(entry / "data", "r+b") as f:
        f.seek(FORGED_CHUNK * CHUNK + 100)
        f.write(b"\x7f" * 4096)
        f.seek(FORGED_CHUNK * CHUNK)
        forged = f.read(CHUNK)
    manifest = Manifest.from_json(json.loads((entry / "manifest.json").read_bytes()))
    manifest.digests[FORGED_CHUNK] = digest(forged)
    manifest.sha1s[FORGED_CHUNK] = hashlib.sha1(forged).hexdigest()
    (entry / "manifest.json").write_bytes(manifest.dumps())
    return manifest


@pytest.fixture
def pair(make_agent: Any, proxy: Any, bucket: str, tmp_path: Path) -> Any:
    from coldbrew.agent.devtools.locals3 import free_port_pair
    ca = ClusterCA.create()
    ports = [free_port_pair() for _ in range(2)]
    agents = []
    for i, port in enumerate(ports):
        tls_dir = ca.issue(tmp_path / f"tls{i}", f"member{i}")
        other = ports[1 - i]
        args = ["--chunk-size", "1MiB", "--p2p-port", str(port), "--p2p-address", "127.0.0.1",
                "--peers-refresh-s", "0.5", "--p2p-chunk-timeout-s", "5",
                "--p2p-tls-dir", str(tls_dir), "--peers", f"127.0.0.1:{other}"]
        agents.append(make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=args,
                                 name=("attacker", "victim")[i], start=False))
    return agents, ca


@pytest.mark.parametrize("multipart", [False, True], ids=["single-part", "multipart"])
def test_a_member_that_forges_a_manifest_is_caught_banned_and_the_file_refetched(
        pair: Any, s3_client: Any, bucket: str, proxy: Any, tmp_path: Path,
        multipart: bool) -> None:
    (attacker, victim), ca = pair
    data = _model(seed=7 + multipart)
    _upload(s3_client, bucket, "f/model.safetensors", data, multipart)
    uri = f"s3://{bucket}/f/model.safetensors"
    head = s3_client.head_object(Bucket=bucket, Key="f/model.safetensors")
    assert ("-" in head["ETag"]) == multipart
    attacker.start()
    attacker.cli("prewarm", "f/model.safetensors", "--wait", "--quiet", check=True)
    wait_shared(attacker, 1)
    attacker.stop()
    forged = _forge(attacker)
    attacker.start()
    victim.start()
    wait_for_peers([attacker, victim], 1)
    wait_shared(attacker, 1)

    with pytest.raises(ManifestRejected, match="do not match|found false"):
        load_file(uri, socket=victim.socket, agent=True)
    # The attack fired: the forged pieces came in from the peer, and were caught.
    assert victim.metric("coldbrew_p2p_received_bytes_total") > 0, victim.log()
    assert victim.metric("coldbrew_p2p_manifest_checks_total", result="mismatch") == 1
    assert victim.metric("coldbrew_p2p_peers_banned_total") >= 1
    assert victim.metric("coldbrew_p2p_peers") == 0  # the liar is no peer any more
    # The forged manifest is gone from the victim's cache and never offered to others.
    for saved in victim.cache_dir.glob("coldbrew-v2/files/*/*/manifest.json"):
        assert Manifest.from_json(json.loads(saved.read_bytes())).sha1s != forged.sha1s
    key = forged.identity.key()
    answer = _fetch_manifest(_ports(victim)[0], key, _context(tmp_path / "tls0", ca.cert_pem))
    assert not isinstance(answer, Exception)
    assert answer[0] == 404 or Manifest.from_json(answer[1]).sha1s != forged.sha1s

    # Loaded again: from the origin, byte-exact, and the tensors are the object's.
    proxy.reset_counts()
    tensors = load_file(uri, socket=victim.socket, agent=True)
    expected = st_load(data)
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert victim.metric("coldbrew_origin_bytes_total") >= len(data)
    dest = tmp_path / "copy"
    victim.cli("get", uri, str(dest), "--quiet", check=True)
    assert dest.read_bytes() == data


def test_an_honest_members_manifest_is_checked_and_then_shared(
        pair: Any, s3_client: Any, bucket: str, proxy: Any) -> None:
    (seed, member), _ = pair
    data = _model(seed=3)
    _upload(s3_client, bucket, "h/model.safetensors", data, multipart=True)
    seed.start()
    member.start()
    wait_for_peers([seed, member], 1)
    seed.cli("prewarm", "h/model.safetensors", "--wait", "--quiet", check=True)
    wait_shared(seed, 1)
    proxy.reset_counts()
    tensors = load_file(f"s3://{bucket}/h/model.safetensors", socket=member.socket, agent=True)
    assert all(torch.equal(tensors[k], v) for k, v in st_load(data).items())
    assert member.metric("coldbrew_p2p_manifest_checks_total", result="match") == 1
    assert member.metric("coldbrew_p2p_received_bytes_total") == len(data)
    assert member.metric("coldbrew_origin_bytes_total") == 0
    assert list(member.cache_dir.glob("coldbrew-v2/files/*/*/manifest.json"))  # kept now
    status = json.loads(member.cli("status", "h/model.safetensors", "--json", check=True).stdout)
    assert status["files"][0]["complete"] is True


def test_the_check_is_the_one_s3_defines() -> None:
    """The ETag arithmetic, against hashlib by hand (single part, multipart, and refusals)."""
    data = bytes(range(256)) * 50_000
    parts = [len(data) // 3, len(data) // 3, len(data) - 2 * (len(data) // 3)]
    single = from_s3_head(len(data), f'"{hashlib.md5(data).hexdigest()}"')
    bounds = [sum(parts[:i]) for i in range(4)]
    etag = hashlib.md5(b"".join(hashlib.md5(data[bounds[i]:bounds[i + 1]]).digest()
                                for i in range(3))).hexdigest() + "-3"
    multi = from_s3_head(len(data), etag, part_sizes=parts)
    for vouch in (single, multi):
        assert vouch is not None
        for altered in (False, True):
            check = FileCheck(vouch)
            body = io.BytesIO(data[:-1] + (b"\0" if altered else data[-1:]))
            while chunk := body.read(65_537):
                check.feed(chunk)
            assert check.matches() is (not altered)
    assert from_s3_head(len(data), etag) is None  # no part sizes: no check, never a false alarm
    assert from_s3_head(len(data), etag, part_sizes=[1, 2, 3]) is None
    assert from_s3_head(len(data), "not-an-md5") is None
