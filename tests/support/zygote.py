"""Real agent processes in milliseconds, for kill loops: a process that has imported the agent
forks one per request.

A kill -9 test needs many starts, and an agent's start is mostly imports (~0.8 s here). The
zygote pays them once. Each child is an agent like any other: it runs the CLI's ``main`` with
the given arguments, has its own pid, event loop and cache lock, and dies for real when killed.
It is not a mock of the start: the cache recovery that a start runs is what the kill loop tests.

Protocol on stdin/stdout, one JSON line each way: ``{"argv": [...], "log": path}`` → ``{"pid": N}``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

# The imports a start would pay, paid here once (the agent, its S3 client, its HTTP server).
import aiohttp.web  # noqa: F401
import botocore.session  # noqa: F401

from coldbrew.agent.app import cli, daemon  # noqa: F401
from coldbrew.agent.origin import s3data  # noqa: F401


def serve() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request["argv"], request["log"])
        print(json.dumps({"pid": pid}), flush=True)


def _child(argv: list[str], log: str) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    code = 1
    try:
        code = cli.main(argv)
    finally:
        os._exit(code or 0)


class Zygote:
    """The test's side: ``spawn(argv, log)`` → the new agent's pid."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True)

    def spawn(self, argv: list[str], log: Path) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return int(reply["pid"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


if __name__ == "__main__":
    serve()
