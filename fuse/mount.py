"""Mounting the view: libfuse3 through mfusepy in a thread of the agent; stale mounts; read-ahead.

:class:`Mount` runs libfuse's multi-threaded loop (``fuse_main_real``, foreground) in
one daemon thread of the agent process; libfuse's workers call :class:`~.view.View`,
which calls into the agent's event loop. The agent mounts at start, before its
control socket appears, and unmounts first thing on SIGTERM/SIGINT.

* **libfuse3, not 2.** mfusepy picks ``libfuse.so.2`` when both are installed;
  ``FUSE_LIBRARY_NAME=fuse3`` is set before it is imported, and a libfuse 2 is refused
  (128 KiB requests, measured ~2.5x slower; docs/architecture.md, The FUSE view).
* **Read-ahead.** The kernel gives a FUSE mount 128 KiB of read-ahead whatever the
  daemon asks at init; only the mount's backing device info can raise it
  (``/sys/class/bdi/<major:minor>/read_ahead_kb``). With 4 MiB there, sequential
  readers get 1 MiB requests, several in flight.
* **Stale mounts.** An agent killed with SIGKILL leaves its mount behind; the kernel
  has already failed every request on it, so ``statfs`` answers ENOTCONN (``stat``
  may still be answered from attributes the kernel cached). At start such
  a mount is detached (``fusermount3 -u -z``, else ``umount -l``) and counted. A mount
  that still answers belongs to a live agent and is refused.
* **Unmount** is a lazy detach: new opens fail at once; when nothing is open the
  kernel ends the connection and the loop returns. Files still open keep it alive
  until the process exits (the kernel then fails their reads: an error, never a hang);
  where ``/sys/fs/fuse/connections`` exists the connection is aborted instead of waited for.
* **Working directory.** ``fuse_main_real`` changes the process's working directory
  to ``/`` even in the foreground; it is put back once the mount is up, so relative
  paths in the agent's settings keep working.
* **Signals.** libfuse installs its SIGINT/SIGTERM/SIGHUP handlers only where the
  handler is still the default; the agent's asyncio handlers are installed before the
  mount, so SIGTERM still reaches the agent, which unmounts.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from ..agent.errors import ConfigError
from . import bufvec, passthrough
from .metrics import FuseMetrics
from .view import View

log = logging.getLogger("coldbrew.fuse")

SUBTYPE = "coldbrew"
FSTYPE = f"fuse.{SUBTYPE}"
#: Errors ``stat`` gives on a FUSE mount whose daemon is gone.
_DEAD_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED}


def fuse_library() -> str | None:
    """The libfuse mfusepy will load: ``FUSE_LIBRARY_PATH`` if set, else the libfuse 3.17 that
    ``./dev setup`` and the image build into the environment (``<prefix>/libfuse``; passthrough
    needs >= 3.16) where it exists, else None (the system's libfuse3)."""
    built = Path(sys.prefix, "libfuse", "libfuse3.so.4")
    return os.environ.get("FUSE_LIBRARY_PATH") or (str(built) if built.is_file() else None)


def load_mfusepy() -> ModuleType:
    """Import mfusepy bound to libfuse3 (:func:`fuse_library`), or explain what to install."""
    library = fuse_library()
    if library is not None:
        os.environ["FUSE_LIBRARY_PATH"] = library  # read by mfusepy at import
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy
    except ImportError:
        raise ConfigError("mounting needs the FUSE binding: pip install 'coldbrew[fuse]' "
                          "(mfusepy), and libfuse3 (Debian: apt-get install fuse3)") from None
    except OSError as e:
        raise ConfigError(f"mounting needs libfuse3 ({e}); on Debian: apt-get install fuse3") from None
    if mfusepy.fuse_version_major != 3:
        raise ConfigError(f"mfusepy loaded libfuse {mfusepy.fuse_version_major}."
                          f"{mfusepy.fuse_version_minor}; coldbrew needs libfuse3 (unset "
                          "FUSE_LIBRARY_PATH/FUSE_LIBRARY_NAME, or install Debian fuse3)")
    return mfusepy


# --- what is at a mountpoint -----------------------------------------------------------------


def _unescape(field: str) -> str:
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted on top at ``path`` (``fuse.coldbrew``...), or None."""
    target = os.path.realpath(path) if not _is_dead(path) else os.path.abspath(path)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and _unescape(fields[4]) == target:
                    found = right.split()[0] if right else None  # the last one is on top
    except OSError:
        return None
    return found


def _is_dead(path: Path) -> bool:
    # statfs always reaches the daemon (stat may be answered from attributes the kernel cached).
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno in _DEAD_ERRNOS
    return False


def detach(path: Path) -> bool:
    """Lazily unmount whatever is on top at ``path``. True if something was detached."""
    commands = []
    if shutil.which("fusermount3"):
        commands.append(["fusermount3", "-u", "-z", str(path)])
    if shutil.which("umount"):
        commands.append(["umount", "-l", str(path)])
    last = ""
    for cmd in commands:
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            last = str(e)
            continue
        if result.returncode == 0:
            return True
        last = result.stderr.strip()
    log.warning("could not unmount", extra={"mountpoint": str(path), "error": last})
    return False


def prepare_mountpoint(path: Path, metrics: FuseMetrics | None = None) -> None:
    """Make ``path`` ready to mount on: created if missing, a dead mount detached, a live one refused."""
    for _ in range(8):  # mounts can be stacked; peel every dead one
        if not _is_dead(path):
            break
        log.warning("stale FUSE mount found (left by an agent that died); detaching it",
                    extra={"mountpoint": str(path)})
        if not detach(path):
            raise ConfigError(f"{path} holds a dead FUSE mount that could not be unmounted; run "
                              f"`fusermount3 -u -z {path}` (or `umount -l {path}`) as root")
        if metrics is not None:
            metrics.stale_mounts_cleaned.inc()
    if mount_fstype(path) == FSTYPE:
        raise ConfigError(f"{path} is already mounted by a running coldbrew agent; stop it "
                          "first, or pass another --mount")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create mountpoint {path}: {e.strerror}") from e
    if not path.is_dir():
        raise ConfigError(f"mountpoint {path} is not a directory")


def set_readahead(path: Path, nbytes: int) -> int | None:
    """Raise the kernel read-ahead of the filesystem mounted at ``path``. Returns the KiB set."""
    st = os.stat(path)
    bdi = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    kib = max(nbytes // 1024, 4)
    try:
        bdi.write_text(f"{kib}\n")
        return int(bdi.read_text().strip())
    except OSError as e:
        log.warning("cannot raise the mount's read-ahead (needs root); sequential reads will "
                    "use 128 KiB requests", extra={"path": str(bdi), "error": str(e)})
        return None


# --- the mount ---------------------------------------------------------------------------------


class Mount:
    """The view mounted at one path, served by libfuse threads inside the agent."""

    def __init__(self, view: View, mountpoint: Path, metrics: FuseMetrics, *, allow_other: bool = True,
                 readahead_bytes: int = 4 << 20, metadata_ttl_s: float = 10.0,
                 passthrough: bool = True) -> None:
        self.view = view
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self.metrics = metrics
        self.allow_other = allow_other
        self.readahead_bytes = readahead_bytes
        self.metadata_ttl_s = metadata_ttl_s
        self.dev: int | None = None
        self.splice = False  # the kernel takes spliced replies (set at init)
        self.want_passthrough = passthrough
        self.passthrough = False  # complete files are passed through (set at init)
        self._mfusepy: ModuleType | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Mount and return once the kernel talks to us (blocking: call it off the event loop)."""
        mfusepy = self._mfusepy = load_mfusepy()
        prepare_mountpoint(self.mountpoint, self.metrics)
        self.view.on_init = self._on_init
        # The kernel asks again after a second; the view answers from its own cache (metadata_ttl_s).
        ttl = min(self.metadata_ttl_s, 1.0)
        options: dict[str, Any] = {
            "raw_fi": True, "foreground": True, "nothreads": False, "ro": True, "fsname": SUBTYPE,
            "subtype": SUBTYPE, "default_permissions": True, "use_ino": True,
            "allow_other": self.allow_other, "entry_timeout": ttl, "attr_timeout": ttl,
            "negative_timeout": ttl}

        def serve() -> None:
            try:
                mfusepy.FUSE(self.view, str(self.mountpoint), **options)
            except BaseException as e:  # reported by start() or stop()
                self._error = e
            finally:
                self._ready.set()

        cwd = os.getcwd()
        self._thread = threading.Thread(target=serve, name="coldbrew-fuse", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"mounting {self.mountpoint} did not complete within {timeout_s:.0f} s")
        if os.getcwd() != cwd:  # libfuse's fuse_daemonize() chdirs to / even in the foreground
            os.chdir(cwd)
        if self._error is not None or not self._thread.is_alive():
            why = self._error or "libfuse exited; its message is above"
            hint = "" if self.allow_other or os.geteuid() == 0 else "; or set fuse_allow_other = false"
            raise ConfigError(f"cannot mount the FUSE view at {self.mountpoint} ({why}); it needs "
                              "/dev/fuse, fusermount3 and root (or user_allow_other in "
                              f"/etc/fuse.conf){hint}")
        self.dev = os.stat(self.mountpoint).st_dev
        readahead_kib = set_readahead(self.mountpoint, self.readahead_bytes)
        self.metrics.mounted.set(1)
        log.info("FUSE view mounted", extra={"mountpoint": str(self.mountpoint),
                                             "read_ahead_kb": readahead_kib, "splice": self.splice,
                                             "passthrough": self.passthrough})

    def _on_init(self, conn: Any, config: Any) -> None:
        # Replies to reads are file ranges (View.read_buf): let libfuse splice them from the
        # cache files' page cache into the kernel instead of copying them through its buffer.
        if conn is not None and conn.capable & bufvec.FUSE_CAP_SPLICE_WRITE:
            conn.want |= bufvec.FUSE_CAP_SPLICE_WRITE
            self.splice = True
        if conn is not None and self.want_passthrough and self._mfusepy is not None:
            self._enable_passthrough(conn, self._mfusepy)
        self._ready.set()

    def _enable_passthrough(self, conn: Any, mfusepy: ModuleType) -> None:
        # Complete files are then read by the kernel from the cache's data files (see
        # :mod:`.passthrough`); without it every read is a request answered by read_buf.
        why = passthrough.supported_by(mfusepy)
        if why is None and not conn.capable & passthrough.FUSE_CAP_PASSTHROUGH:
            why = "the kernel does not offer it (Linux >= 6.9 has it)"
        if why is not None:
            log.info("FUSE passthrough unavailable: %s; cached files are read through the agent",
                     why)
            return
        conn.want |= passthrough.FUSE_CAP_PASSTHROUGH
        conn.max_backing_stack_depth = 1
        self.view.modes.passthrough = passthrough.Passthrough(mfusepy)
        self.passthrough = True
        if conn.capable & passthrough.FUSE_CAP_DIRECT_IO_ALLOW_MMAP:
            # Opens not passed through can then be direct_io (one copy of a model in page
            # cache, not two) and still be mmapped, as safetensors does.
            conn.want |= passthrough.FUSE_CAP_DIRECT_IO_ALLOW_MMAP
            self.view.modes.direct_mmap = True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, grace_s: float = 2.0) -> None:
        """Detach the mount; stop serving once nothing is open (or at once, where we can abort)."""
        if self._thread is None:
            return
        if self.alive and mount_fstype(self.mountpoint) == FSTYPE:
            detach(self.mountpoint)
        self._thread.join(grace_s)
        if self.alive and self.dev is not None:
            abort = Path(f"/sys/fs/fuse/connections/{self.dev}/abort")
            try:
                abort.write_text("1\n")
                self._thread.join(grace_s)
            except OSError:
                pass  # no fusectl here: open files keep the connection until the process exits
        if self.alive:
            log.info("FUSE view detached; files still open through it fail once the agent exits",
                     extra={"mountpoint": str(self.mountpoint)})
        else:
            log.info("FUSE view unmounted", extra={"mountpoint": str(self.mountpoint)})
        self.metrics.mounted.set(0)
        self.view.close()
