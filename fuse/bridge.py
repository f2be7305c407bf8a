"""The bridge from libfuse's worker threads to the agent's event loop, with a deadline.

Anything the view needs from the agent (a listing, a stat, opening a file, making a chunk
present) is a coroutine run on the agent's loop; past ``read_timeout_s`` the syscall fails
with EIO — a reader never hangs on a dead origin. The fetch itself is shielded in the
fetcher and goes on for whoever waits next.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..agent.errors import RequestTimeout
from .metrics import FuseMetrics

T = TypeVar("T")


class LoopBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float, metrics: FuseMetrics) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.metrics = metrics

    def call(self, op: str, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the agent's loop; EIO if it has not finished within the deadline."""
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed: the agent is shutting down
            coro.close()
            raise OSError(errno.EIO, "the agent is shutting down") from None
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            if future.done():
                raise  # the coroutine's own TimeoutError
            future.cancel()  # the fetch itself is shielded and goes on for whoever waits next
            self.metrics.timeouts.labels(op).inc()
            raise RequestTimeout(f"{op}: no answer within fuse_read_timeout_s="
                                 f"{self.timeout_s:g} s") from None

    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on the agent's loop, not waiting for it."""
        self.loop.call_soon_threadsafe(fn, *args)
