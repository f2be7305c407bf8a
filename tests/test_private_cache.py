"""The agent's cache is private to it; other users read through the socket, and only what the
agent serves.

Real agent, real S3 on 127.0.0.1, a real second user (uid 65534, as a runner container's user
would be): it may not open a cached file, and its load through the agent still returns the
object's tensors, streamed over the socket. A load of a URI outside the agent's roots never
asks the agent at all: the loader reads it with its own credentials, or refuses with
``agent=True``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from coldbrew.agent.errors import OutsideRoots
from coldbrew.loader import load_file

NOBODY = 65534  # the child script's setuid says it too

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


def _model(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return st_save({f"w{i}": torch.randn(256, 256, generator=g) for i in range(6)})


def _digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in tensors.items()}


#: Loads once as root (which also imports all it needs: the interpreter itself lies under root's
#: home here), then becomes uid 65534, tries the cache file directly, and loads again.
_AS_RUNNER = """
import errno, hashlib, json, os, sys, torch
from coldbrew.loader import load_file
data_file, socket, uri = sys.argv[1:4]
as_root = load_file(uri, socket=socket, agent=True, cache_dir=False).stats["bytes_by_source"]
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
try:
    os.open(data_file, os.O_RDONLY)
    direct = 0
except OSError as e:
    direct = e.errno
sd = load_file(uri, socket=socket, agent=True, cache_dir=False)
print(json.dumps({"uid": os.getuid(), "direct": direct, "as_root": as_root,
    "sources": sd.stats["bytes_by_source"],
    "digests": {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                for k, v in sd.items()}}))
"""


@pytest.fixture
def shared_dir() -> Any:
    """A directory any user may reach, as /run/coldbrew is (pytest's tmp_path is root's)."""
    d = Path(tempfile.mkdtemp(prefix="coldbrew-private-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_the_cache_is_private_and_another_user_loads_through_the_socket(
        make_agent: Any, s3_client: Any, bucket: str, shared_dir: Path) -> None:
    data = _model(1)
    s3_client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=data)
    uri = f"s3://{bucket}/m/model.safetensors"
    agent = make_agent(f"s3://{bucket}", start=False,
                       extra_args=["--chunk-size", "64KiB", "--socket-group", str(NOBODY)])
    agent.socket = shared_dir / "agent.sock"
    # A cache an earlier release left open to everyone is tightened at start.
    (agent.cache_dir / "coldbrew-v2").mkdir(parents=True)
    (agent.cache_dir / "coldbrew-v2").chmod(0o755)
    agent.start()
    agent.cli("prewarm", uri, "--wait", check=True)

    root = agent.cache_dir / "coldbrew-v2"
    modes = {p.relative_to(root): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
    (data_file,) = root.glob("files/*/*/data")
    assert len(modes) > 8 and data_file.relative_to(root) in modes
    wide = {str(p): oct(m) for p, m in modes.items()
            if m != (0o700 if (root / p).is_dir() else 0o600)}
    assert not wide, f"cache paths not private to the agent: {wide}"

    out = subprocess.run([sys.executable, "-c", _AS_RUNNER, str(data_file), str(agent.socket), uri],
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, cwd=shared_dir,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert set(got["as_root"]) == {"agent"}  # the agent's own user reads its files in place
    assert got["uid"] == NOBODY and got["direct"] == errno.EACCES  # another user may not
    assert set(got["sources"]) == {"agent-stream"}, got["sources"]  # so every byte streamed
    assert got["digests"] == _digests(st_load(data))


def test_a_uri_outside_the_agents_roots_is_read_by_the_loader_itself(
        make_agent: Any, s3_client: Any, bucket: str, s3: Any, monkeypatch: Any,
        tmp_path: Path) -> None:
    data = _model(2)
    s3_client.put_object(Bucket=bucket, Key="elsewhere/model.safetensors", Body=data)
    uri = f"s3://{bucket}/elsewhere/model.safetensors"
    agent = make_agent(f"s3://{bucket}/models")
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    assert agent.client.health()["roots"] == [f"s3://{bucket}/models"]

    with pytest.raises(OutsideRoots, match=rf"agent=True but {uri} is outside what this agent "
                                           rf"serves \(s3://{bucket}/models\)"):
        load_file(uri, socket=agent.socket, agent=True, cache_dir=False)
    sd = load_file(uri, socket=agent.socket, agent=None, cache_dir=False)
    assert _digests(dict(sd)) == _digests(st_load(data))
    assert set(sd.stats["bytes_by_source"]) == {"origin"}
    # Neither load asked the agent for the URI (so it refused nothing) nor the origin for it.
    assert agent.metric("coldbrew_control_refused_total", reason="outside_roots") == 0
    assert agent.metric("coldbrew_origin_requests_total", op="get", outcome="ok") == 0
