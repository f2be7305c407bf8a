"""The control API serves only what this agent is for, and evicts only on its admin socket.

The agent reads S3 through a counting proxy; a rule on the proxy matches every request for the
other bucket, so "0 fired" proves the agent never asked the origin for it, while the same rule
shape on the allowed bucket fires (the proxy sees the traffic).
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
from support.data import put_random
from support.faultproxy import Fault

from coldbrew.agent.control.client import AgentClient
from coldbrew.agent.control.scope import Scope, normalize
from coldbrew.agent.errors import NotAdmin, OutsideRoots


@pytest.mark.parametrize(("uri", "allowed"), [
    ("s3://models/llama/model.safetensors", True),
    ("s3://models", True),
    ("s3://models//llama//x", True),
    ("S3://models/x", True),
    ("s3://models-secret/x", False),
    ("s3://model", False),
    ("s3://models/../hr/salaries.csv", False),
    ("s3://models/a/./b", False),
    ("s3://hr/salaries.csv", False),
    ("gs://models/x", False),
    ("s3://extra/ok/x", True),
    ("s3://extra/okay/x", False),
])
def test_scope_matches_at_segment_boundaries_and_refuses_dot_segments(uri: str, allowed: bool) -> None:
    scope = Scope.of("s3://models/", ("s3://extra/ok",))
    assert scope.allows(uri) is allowed
    if not allowed:
        with pytest.raises(OutsideRoots, match=r"s3://models, s3://extra/ok|are not allowed"):
            scope.check(uri)


def test_normalize() -> None:
    assert normalize("s3://b//k/") == "s3://b/k"
    assert normalize("file:///data//m") == "file:///data/m"


def test_a_client_cannot_reach_outside_the_origin(make_agent: Any, proxy: Any, s3_client: Any,
                                                  bucket: str, tmp_path: Any) -> None:
    other = f"{bucket}-hr"
    s3_client.create_bucket(Bucket=other)
    put_random(s3_client, other, "salaries.csv", 5000, seed=1)
    data = put_random(s3_client, bucket, "m/model.bin", 300_000, seed=2)
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url)
    outside = proxy.add_fault(Fault.status(500), path=re.compile(rf"/{re.escape(other)}\b"))
    refused_uri = f"s3://{other}/salaries.csv"
    for args in (("get", refused_uri, str(tmp_path / "x")), ("ls", f"s3://{other}/"),
                 ("prewarm", refused_uri, "--wait"), ("status", refused_uri),
                 ("get", f"s3://{bucket}/../{other}/salaries.csv", str(tmp_path / "y"))):
        r = agent.cli(*args)
        assert r.returncode != 0, args
        assert "outside what this agent serves" in r.stderr or "not allowed" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
    assert outside.take is not None and proxy.counts["fired"]["status"] == 0, \
        "the agent asked the origin for the other bucket"
    assert agent.metric("coldbrew_control_refused_total", reason="outside_roots") >= 4
    # the same proxy sees the allowed traffic: the refusals above are the scope, not a dead link
    before = proxy.counts["requests"]
    agent.cli("get", f"s3://{bucket}/m/model.bin", str(tmp_path / "ok"), check=True)
    assert (tmp_path / "ok").read_bytes() == data and proxy.counts["requests"] > before


def test_allowed_roots_extend_the_scope(make_agent: Any, proxy: Any, s3_client: Any, bucket: str,
                                        tmp_path: Any) -> None:
    other = f"{bucket}-more"
    s3_client.create_bucket(Bucket=other)
    data = put_random(s3_client, other, "shared/m.bin", 4000, seed=3)
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url,
                       extra_args=["--allowed-roots", f"s3://{other}/shared/"])
    agent.cli("get", f"s3://{other}/shared/m.bin", str(tmp_path / "m"), check=True)
    assert (tmp_path / "m").read_bytes() == data
    assert agent.cli("ls", f"s3://{other}/").returncode != 0  # the bucket root is not under it


def test_evict_is_served_on_the_admin_socket_only(make_agent: Any, proxy: Any, s3_client: Any,
                                                  bucket: str) -> None:
    put_random(s3_client, bucket, "m/model.bin", 200_000, seed=4)
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url)
    agent.cli("prewarm", "m/model.bin", "--wait", "--quiet", check=True)
    with pytest.raises(NotAdmin, match="admin socket"):
        AgentClient(agent.socket).evict(f"s3://{bucket}/m/model.bin")
    assert agent.metric("coldbrew_control_refused_total", reason="not_admin") == 1
    cached = {f["uri"]: f["cached_bytes"] for f in agent.client.status()["files"]}
    assert cached[f"s3://{bucket}/m/model.bin"] == 200_000  # nothing was dropped
    admin = agent.socket.with_name(f"{agent.socket.stem}-admin.sock")
    assert oct(admin.stat().st_mode & 0o777) == "0o600"
    out = json.loads(agent.cli("evict", "m/model.bin", "--json", check=True).stdout)
    assert out["evicted"] == [f"s3://{bucket}/m/model.bin"]
    # a user other than the agent's cannot open the admin socket (mode 0600)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "python3", "-c",
                        f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(admin)!r})"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "Permission denied" in r.stderr
