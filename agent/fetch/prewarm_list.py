"""The prewarm list: models every node should hold, named in the agent's config file and
followed while the agent runs.

The list sits beside the settings in the TOML config file (in Kubernetes: the
DaemonSet's ConfigMap)::

    origin = "s3://my-models/"
    prewarm = ["llama-3-8b/", "s3://my-models/mistral-7b/model.safetensors"]

Entries are files or prefixes, full URIs or paths under the origin. The agent
prewarms the whole list at start, then reads the file again every
``prewarm_reload_s`` seconds and prewarms entries that are new. It compares the
file's *content*, never its inode or mtime: kubelet updates a mounted ConfigMap by
swapping a symlink, which inotify on the file would miss.

What a reload does, and does not do:

* A new entry gets its own prewarm job (:class:`~.jobs.Jobs`). An entry whose job
  failed (not uploaded yet, access denied, cache full) is tried again later, backing
  off from ``prewarm_reload_s`` to :data:`MAX_RETRY_S`.
* A removed entry is only forgotten: its bytes stay cached until LRU eviction needs
  the room, so a runner still reading it is never hurt.
* A file that does not parse, or a list with a bad entry, is logged as an error
  naming the problem; the previous list stays in force and the agent keeps running.
  (At start there is no previous list, so the same mistakes stop the agent with a
  config error, like any bad setting.)
* Settings changed in the file are *not* applied: the agent logs which ones changed
  and that they need a restart, and sets ``coldbrew_prewarm_list_restart_pending``.

The parsing and the diffs are pure functions; :class:`PrewarmList` is the I/O around them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..config import SETTINGS
from ..errors import ColdbrewError, ConfigError
from .jobs import Jobs, PrewarmJob

log = logging.getLogger("coldbrew.prewarm_list")

KEY = "prewarm"
#: The longest wait before a failed entry is tried again.
MAX_RETRY_S = 900.0

_SETTINGS = {s.name: s for s in SETTINGS}


# --- pure: parsing and diffs ----------------------------------------------------------------


@dataclass(frozen=True)
class FileContents:
    """What one version of the config file says: the prewarm list (resolved URIs, in order,
    without duplicates) and the settings beside it (raw values, as written)."""

    prewarm: tuple[str, ...]
    settings: Mapping[str, Any]


def parse_file(text: str, source: str, resolve: Callable[[str], str]) -> FileContents:
    """Parse a config file's text. Raises ConfigError naming the file and the problem.

    ``resolve`` turns an entry into a full URI (the origin's ``resolve``: relative paths
    are taken under the origin root) and raises for an entry the origin cannot read.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from None
    table = data.get("agent", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [agent] must be a table of settings")
    if KEY in data and "agent" in data and KEY in table:
        raise ConfigError(f"{source}: the prewarm list is given twice (top level and in [agent]); "
                          "keep one")
    raw = data[KEY] if KEY in data else table.get(KEY, [])
    settings = {k: v for k, v in table.items() if k not in ("agent", KEY)}
    return FileContents(parse_prewarm(raw, source, resolve), settings)


def parse_prewarm(raw: Any, source: str, resolve: Callable[[str], str]) -> tuple[str, ...]:
    """``["llama/", "s3://b/x.safetensors"]`` (or a ``[prewarm]`` table with ``uris``) →
    resolved URIs in order, duplicates dropped."""
    if isinstance(raw, dict):
        extra = sorted(set(raw) - {"uris"})
        if extra:
            raise ConfigError(f"{source}: [prewarm] takes only `uris = [...]`, not "
                              f"{', '.join(extra)}")
        raw = raw.get("uris", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: prewarm must be a list of URIs, e.g. "
                          f'prewarm = ["llama-3-8b/", "s3://bucket/model.safetensors"]; '
                          f"got {type(raw).__name__} {raw!r}")
    out: list[str] = []
    for n, item in enumerate(raw):
        where = f"{source}: prewarm entry {n + 1}"
        if not isinstance(item, str):
            raise ConfigError(f"{where} is {type(item).__name__} {item!r}, not a URI string "
                              '(quote it: "llama-3-8b/")')
        if not item.strip() or item.strip() in ("/", "."):
            raise ConfigError(f"{where} is {item!r}; name a file or a prefix under the origin "
                              "(the whole origin is not prewarmed by accident)")
        try:
            uri = resolve(item)
        except (ColdbrewError, ValueError) as e:
            raise ConfigError(f"{where} ({item!r}): {e}") from None
        if uri not in out:
            out.append(uri)
    return tuple(out)


def diff_lists(old: tuple[str, ...], new: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(added, removed), each in list order."""
    return [u for u in new if u not in old], [u for u in old if u not in new]


def changed_settings(running: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Names of settings whose value in the file differs from the one the agent started with."""
    return sorted(k for k in set(running) | set(now) if running.get(k) != now.get(k))


def setting_problems(settings: Mapping[str, Any]) -> list[str]:
    """What would stop the agent at its next start with these file settings (unknown keys,
    values that do not parse). Values only; precedence with env and flags is not modelled."""
    problems = []
    for name, value in sorted(settings.items()):
        setting = _SETTINGS.get(name)
        if setting is None:
            problems.append(f"unknown key {name}")
            continue
        try:
            setting.parse(value)
        except (ValueError, TypeError) as e:
            problems.append(f"{name}: {e}")
    return problems


def retry_delay_s(failures: int, base_s: float) -> float:
    """Wait before trying a failed entry again: base, 2×base, 4×base… capped at MAX_RETRY_S."""
    return min(MAX_RETRY_S, max(base_s, 1.0) * 2 ** max(0, failures - 1))


# --- metrics --------------------------------------------------------------------------------


class PrewarmListMetrics:
    """Registered on the agent's own registry, so they appear on its ``/metrics``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.entries = Gauge(
            "coldbrew_prewarm_list_entries", "Entries in the config file's prewarm list now in force",
            registry=r)
        self.failed_entries = Gauge(
            "coldbrew_prewarm_list_failed_entries",
            "Prewarm list entries whose last prewarm failed (retried with backoff)", registry=r)
        self.reloads = Counter(
            "coldbrew_prewarm_list_reloads",
            "Changes to the config file seen while running, by outcome (applied, or invalid: "
            "the previous list stays in force)", ["outcome"], registry=r)
        self.restart_pending = Gauge(
            "coldbrew_prewarm_list_restart_pending",
            "1 when the config file's settings differ from the ones the agent runs with "
            "(they apply at the next restart)", registry=r)
        for outcome in ("applied", "invalid"):
            self.reloads.labels(outcome)


# --- I/O: the watcher -----------------------------------------------------------------------


@dataclass
class _Entry:
    uri: str
    job: PrewarmJob | None = None
    failures: int = 0
    retry_at: float = 0.0
    reported: bool = field(default=False)  # this job's outcome has been logged


class PrewarmList:
    """Follows the config file's prewarm list and keeps a prewarm job going for each entry."""

    def __init__(self, path: Path, jobs: Jobs, resolve: Callable[[str], str], reload_s: float,
                 registry: CollectorRegistry) -> None:
        self.path = Path(path)
        self.jobs = jobs
        self.resolve = resolve
        self.reload_s = reload_s
        self.metrics = PrewarmListMetrics(registry)
        self._text: str | None = None
        self._running_settings: Mapping[str, Any] = {}
        self._pending_logged: list[str] = []
        self._entries: dict[str, _Entry] = {}

    @property
    def uris(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def load(self) -> FileContents:
        """Read the list at start. Raises ConfigError: at start there is no list to fall back on."""
        text = self._read()
        contents = parse_file(text, f"config file {self.path}", self.resolve)
        self._text = text
        self._running_settings = contents.settings
        self._entries = {u: _Entry(u) for u in contents.prewarm}
        self.metrics.entries.set(len(self._entries))
        return contents

    def _read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {self.path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {self.path}: {e}") from None

    async def run(self) -> None:
        """Prewarm the list, then (if ``reload_s`` > 0) follow the file until cancelled."""
        if self._entries:
            log.info("prewarming the config file's list", extra={
                "config": str(self.path), "uris": list(self._entries)})
        self.tick()
        if self.reload_s <= 0:
            return
        while True:
            await asyncio.sleep(self.reload_s)
            try:
                self.reload()
                self.tick()
            except Exception:  # a watcher bug must not take the agent down
                log.exception("prewarm list reload failed; the previous list stays in force")

    def reload(self) -> bool:
        """Read the file again and apply a changed list. True if the list changed."""
        try:
            text = self._read()
        except ConfigError as e:
            if self._text is not None:  # report once, not every interval
                log.error(f"{e}; the previous prewarm list stays in force")
                self._text = None
                self.metrics.reloads.labels("invalid").inc()
            return False
        if text == self._text:
            return False
        self._text = text
        try:
            contents = parse_file(text, f"config file {self.path}", self.resolve)
        except ConfigError as e:
            self.metrics.reloads.labels("invalid").inc()
            log.error(f"{e}; the previous prewarm list stays in force (fix the file; it is read "
                      f"again every {self.reload_s:g} s)", extra={"config": str(self.path)})
            return False
        self.metrics.reloads.labels("applied").inc()
        self._report_settings(contents.settings)
        added, removed = diff_lists(self.uris, contents.prewarm)
        if not added and not removed:
            return False
        old = self._entries
        self._entries = {u: old.get(u) or _Entry(u) for u in contents.prewarm}
        self.metrics.entries.set(len(self._entries))
        log.info("prewarm list changed", extra={
            "config": str(self.path), "added": added, "removed": removed,
            "note": "removed entries stay cached until evicted" if removed else ""})
        return True

    def _report_settings(self, settings: Mapping[str, Any]) -> None:
        changed = changed_settings(self._running_settings, settings)
        self.metrics.restart_pending.set(1 if changed else 0)
        if changed == self._pending_logged:
            return
        self._pending_logged = changed
        if not changed:
            log.info("config file settings are back to the ones the agent runs with",
                     extra={"config": str(self.path)})
            return
        problems = setting_problems(settings)
        log.warning(
            f"config file changed setting(s) {', '.join(changed)}; settings apply only at the "
            "next restart (in Kubernetes: kubectl -n coldbrew-system rollout restart "
            "daemonset/coldbrew-agent); only the prewarm list is applied while running"
            + (f". The agent would NOT start with this file: {'; '.join(problems)}"
               if problems else ""),
            extra={"config": str(self.path), "changed": changed})

    def tick(self, now: float | None = None) -> None:
        """Start a job for every entry without one, and again for failed ones whose wait is over."""
        now = time.monotonic() if now is None else now
        failed = 0
        for entry in self._entries.values():
            job = entry.job
            if job is not None and job.finished is not None and not entry.reported:
                entry.reported = True
                if job.state == "done":
                    entry.failures = 0
                    log.info("prewarm list entry cached", extra={
                        "uri": entry.uri, "job": job.id, "bytes": job.bytes_done})
                else:
                    entry.failures += 1
                    wait = retry_delay_s(entry.failures, self.reload_s)
                    entry.retry_at = now + wait
                    log.error("prewarm list entry failed; trying again in %.0f s: %s", wait,
                              "; ".join(job.errors), extra={"uri": entry.uri, "job": job.id})
            if job is not None and job.state == "failed":
                failed += 1
            due = job is None or (job.state == "failed" and entry.reported
                                  and self.reload_s > 0 and now >= entry.retry_at)
            if due:
                entry.job = self.jobs.start([entry.uri])
                entry.reported = False
        self.metrics.failed_entries.set(failed)
