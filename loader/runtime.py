"""The loader's one event-loop thread, and the sync bridge callers use to reach it.

The loader's I/O is asynchronous (s3fs ranged GETs, aiofiles write-through,
blocking work such as ``preadv`` or agent calls in worker threads), but its API
is synchronous: ``load_file`` is called from plain user code, often from
several threads at once. Like fsspec's ``asyn.py``, one daemon thread runs one
event loop for the whole process; callers submit coroutines and wait on the
result. Long-lived clients bound to that loop (an :class:`Origin` per S3 root)
live here too, so connections are reused from one load to the next.

After ``fork`` the child starts with no loop thread; the first load in the
child makes a fresh one (a forked loop would be a copy with no thread).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import concurrent.futures.thread  # registers its exit hook now, before ours (_register_at_exit)
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("coldbrew.loader")

T = TypeVar("T")

#: Worker threads for blocking work (preadv, agent calls, aiofiles, digests).
WORKER_THREADS = 16
#: At interpreter exit, wait this long for write-through entries to finish.
EXIT_WAIT_S = 120.0


class Runtime:
    """One event loop in a daemon thread, plus objects bound to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="coldbrew-io"))
        self._thread = threading.Thread(target=self._main, name="coldbrew-loader", daemon=True)
        self._thread.start()
        self.pid = os.getpid()
        #: Background jobs (write-through) that should finish before exit.
        self.background: set[asyncio.Future[Any]] = set()
        self._bound: dict[Any, Any] = {}

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it; Ctrl-C cancels it."""
        if self.in_loop():
            raise RuntimeError("coldbrew.loader's sync API was called from its own event loop")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    async def bound(self, key: Any, make: Callable[[], Awaitable[T]]) -> T:
        """An object made once per ``key`` on this loop (e.g. an Origin per S3 root)."""
        if key not in self._bound:
            self._bound[key] = asyncio.ensure_future(make())
        try:
            return await asyncio.shield(self._bound[key])
        except BaseException:
            if self._bound.get(key) is not None and self._bound[key].done():
                self._bound.pop(key, None)  # failed to make: try again next time
            raise

    def track(self, future: asyncio.Future[Any]) -> None:
        """Keep a background job (on the loop) alive and waited for at exit."""
        self.background.add(future)
        future.add_done_callback(self.background.discard)

    def wait_background(self, timeout_s: float | None = None) -> bool:
        """Wait until background jobs are done; True if none is left."""
        if self.in_loop():
            raise RuntimeError("wait_background() called from the loader's own loop")

        async def drain() -> None:
            while self.background:
                await asyncio.wait(list(self.background))

        future = asyncio.run_coroutine_threadsafe(drain(), self.loop)
        try:
            future.result(timeout_s)
            return True
        except concurrent.futures.TimeoutError:
            future.cancel()
            return False


_runtime: Runtime | None = None
_lock = threading.Lock()


def runtime() -> Runtime:
    global _runtime
    rt = _runtime
    if rt is None or rt.pid != os.getpid():
        with _lock:
            if _runtime is None or _runtime.pid != os.getpid():
                _runtime = Runtime()
            rt = _runtime
    return rt


def wait_writeback(timeout_s: float | None = None) -> bool:
    """Wait for this process's write-through cache entries to be finished.

    Loads return as soon as their tensors are complete; the same bytes are
    still being written to the local cache in the background. Returns True
    when nothing is left to write. Also called at interpreter exit.
    """
    rt = _runtime
    if rt is None or rt.pid != os.getpid():
        return True
    return rt.wait_background(timeout_s)


def _at_exit() -> None:
    try:
        if not wait_writeback(EXIT_WAIT_S):
            log.warning("coldbrew.loader: write-through still running at exit; the cache entry "
                        "is abandoned (a later load fetches the file again)")
    except Exception:
        pass


def _after_fork_in_child() -> None:
    global _runtime
    _runtime = None


def _register_at_exit() -> None:
    """Run :func:`_at_exit` before ``concurrent.futures`` refuses new work at shutdown.

    ``threading._shutdown`` runs its own exit hooks, newest first, before the ``atexit`` ones,
    and one of them (``concurrent.futures``, imported above) stops every thread pool from taking
    new work. The write-behind needs those pools (the loop's default executor). A plain
    ``atexit`` hook therefore ran too late: the writes died with a traceback, left their
    ``.part`` file and committed nothing. Registered after that hook, ours runs first.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # not CPython 3.9+: the best that is left
        atexit.register(_at_exit)
        return
    register(_at_exit)


_register_at_exit()
os.register_at_fork(after_in_child=_after_fork_in_child)
