"""A real ``coldbrew agent`` process for tests: start, wait until it answers, stop or kill.

Tests talk to it exactly as users do: the control socket (AgentClient), the
``coldbrew`` CLI, and the metrics listener (parsed Prometheus text).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from coldbrew.agent.control.client import AgentClient
from coldbrew.agent.errors import AgentUnavailable


class AgentProcess:
    def __init__(self, workdir: Path, origin: str, env: Mapping[str, str], *,
                 cache_dir: Path | None = None, extra_args: list[str] | None = None,
                 name: str = "agent") -> None:
        self.workdir = Path(workdir)
        self.origin = origin
        self.env = dict(env)
        self.cache_dir = Path(cache_dir) if cache_dir else self.workdir / f"{name}-cache"
        self.socket = self.workdir / f"{name}.sock"
        self.log_path = self.workdir / f"{name}.log"
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_address = ""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "coldbrew.agent", "agent", "--origin", self.origin,
                "--cache-dir", str(self.cache_dir), "--socket", str(self.socket),
                "--metrics-address", "127.0.0.1:0", "--log-format", "json", *self.extra_args]

    def start(self, timeout_s: float = 30.0) -> AgentProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env})
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited at start with {self.proc.returncode}:\n{self.log()}")
            try:
                facts = self.client.health()
                self.metrics_address = facts["metrics_address"]
                return self
            except AgentUnavailable:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"agent did not come up in {timeout_s} s:\n{self.log()}")

    @property
    def client(self) -> AgentClient:
        return AgentClient(self.socket)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except FileNotFoundError:
            return ""

    def cli(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the ``coldbrew`` CLI against this agent."""
        result = subprocess.run([sys.executable, "-m", "coldbrew.agent", *args],
                                env={**os.environ, **self.env, "COLDBREW_SOCKET": str(self.socket)},
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"coldbrew {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample on /metrics, keyed by (name, sorted labels)."""
        text = urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=5).read().decode()
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"agent ignored SIGTERM for {timeout_s} s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.kill() if exc[0] else self.stop()
