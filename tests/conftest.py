"""Shared fixtures: one real S3-compatible server per test session, a fresh bucket per test.

Everything runs on 127.0.0.1: the SeaweedFS server (``coldbrew.agent.devtools.locals3``),
the fault proxy in front of it, and real agent processes.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.agentproc import AgentProcess
from support.faultproxy import FaultProxy

from coldbrew.agent.devtools.locals3 import LocalS3

_bucket_ids = itertools.count()

# --- test kinds -------------------------------------------------------------------------------
# Every test gets one or more kinds, so `./dev test -m unit` is a fast inner loop and
# `-m "not slow"` a quick full pass. Kinds come from what a test uses: a fixture that starts
# the S3 server or needs root implies its kind; whole files that mount FUSE, run libtorrent or
# need CUDA say so here. A test with none of them is a unit test (no servers, no mounts).
KINDS = ("unit", "s3", "fuse", "p2p", "root", "cuda", "slow")
_KIND_OF_FIXTURE = {"s3": "s3", "make_tmpfs": "root", "make_ext2": "root"}
_KINDS_OF_FILE = {
    "test_fuse.py": ("fuse", "root"), "test_fuse_view.py": ("fuse", "root"),
    "test_loader_differential.py": ("fuse",), "test_p2p.py": ("p2p",), "test_p2p_units.py": ("p2p",),
    "test_loader_cuda.py": ("cuda",), "test_demo.py": ("slow", "s3", "fuse", "p2p"),
    "test_daemonset.py": ("fuse",),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        kinds = {_KIND_OF_FIXTURE[f] for f in getattr(item, "fixturenames", ()) if f in _KIND_OF_FIXTURE}
        kinds.update(_KINDS_OF_FILE.get(item.path.name, ()))
        kinds.update(m.name for m in item.iter_markers() if m.name in KINDS)
        if not kinds - {"unit"}:
            kinds.add("unit")
        for kind in kinds:
            item.add_marker(kind)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    server = LocalS3(tmp_path_factory.mktemp("s3"))
    with server:
        yield server


@pytest.fixture
def s3_client(s3: LocalS3) -> Any:
    return s3.client()


@pytest.fixture
def bucket(s3: LocalS3, s3_client: Any) -> str:
    """A fresh, empty bucket for this test."""
    name = f"t{os.getpid()}-{next(_bucket_ids)}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(s3: LocalS3) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the S3 server; point agents at ``proxy.url``."""
    with FaultProxy("127.0.0.1", s3.port) as p:
        yield p


@pytest.fixture
def make_tmpfs(tmp_path: Path) -> Iterator[Any]:
    """``make_tmpfs("6m")`` mounts a tiny tmpfs (a disk that fills up); unmounted after the test."""
    mounts: list[Path] = []

    def make(size: str) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounts)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        mounts.append(mnt)
        return mnt

    yield make
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def make_ext2(tmp_path: Path) -> Iterator[Any]:
    """``make_ext2("2m")`` mounts a tiny ext2 image through a loop device: a disk that fills
    up and, unlike tmpfs, cannot allocate ahead (fallocate: EOPNOTSUPP), so writes fail part-way."""
    mounts: list[Path] = []

    def make(size: str) -> Path:
        image, mnt = tmp_path / f"ext2-{len(mounts)}.img", tmp_path / f"ext2-{len(mounts)}"
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        subprocess.run(["mkfs.ext2", "-q", "-F", str(image)], check=True)
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        mounts.append(mnt)
        return mnt

    yield make
    for mnt in mounts:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def agent_env(s3: LocalS3) -> dict[str, str]:
    return s3.env()


@pytest.fixture
def loader_env(s3: LocalS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The loader in this process as a user without an agent would run it: the S3 server's
    credentials and endpoint in the environment, no agent on the socket, its write-through
    cache under the test's tmp_path (never the user's ~/.cache)."""
    env = {**s3.env(), "COLDBREW_SOCKET": str(tmp_path / "no-agent.sock"),
           "COLDBREW_LOADER_CACHE": str(tmp_path / "loader-cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def make_agent(tmp_path: Path, agent_env: dict[str, str]) -> Iterator[Any]:
    """``make_agent(origin, endpoint=None, **kw)`` starts a real agent; all are stopped after the test."""
    agents: list[AgentProcess] = []

    def make(origin: str, *, endpoint: str | None = None, start: bool = True,
             env: dict[str, str] | None = None, **kw: Any) -> AgentProcess:
        merged = {**agent_env, **(env or {})}
        if endpoint:
            merged["AWS_ENDPOINT_URL"] = endpoint
        a = AgentProcess(tmp_path, origin, merged, name=kw.pop("name", f"agent{len(agents)}"), **kw)
        agents.append(a)
        return a.start() if start else a

    yield make
    for a in agents:
        a.kill()
