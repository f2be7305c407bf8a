"""Bounds on the settings that allocate: each refused with the limit named, and an agent
given one does not start (before it touches the cache or the network)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coldbrew.agent.config import load_config
from coldbrew.agent.errors import ConfigError

BASE = {"COLDBREW_ORIGIN": "s3://models/"}

REFUSED = [
    ({"COLDBREW_FETCH_CONCURRENCY": "100000"}, "above the limit of 256"),
    ({"COLDBREW_RETRY_ATTEMPTS": "1000"}, "above the limit of 100"),
    ({"COLDBREW_CACHE_SIZE": "0"}, "leaves the cache no room"),
    ({"COLDBREW_CACHE_SIZE": "0%"}, "leaves the cache no room"),
    ({"COLDBREW_FETCH_CONCURRENCY": "200"}, "exceeds memory_budget 2.0 GiB"),
    ({"COLDBREW_CHUNK_SIZE": "1GiB", "COLDBREW_FETCH_CONCURRENCY": "4", "COLDBREW_MEMORY_BUDGET": "3GiB"},
     "4 x 1.0 GiB = 4.0 GiB exceeds memory_budget 3.0 GiB"),
]


@pytest.mark.parametrize(("env", "words"), REFUSED)
def test_each_bound_is_refused_with_its_limit_named(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(env={**BASE, **env})


def test_the_budget_admits_what_fits() -> None:
    cfg = load_config(env={**BASE, "COLDBREW_FETCH_CONCURRENCY": "200", "COLDBREW_MEMORY_BUDGET": "4GiB"})
    assert cfg.fetch_concurrency * cfg.chunk_size <= cfg.memory_budget
    auto = load_config(env=BASE)
    assert auto.fetch_concurrency is None  # the default adapts, within the default budget
    assert auto.origin_settings.max_in_flight * auto.chunk_size <= auto.memory_budget


def test_auto_concurrency_keeps_within_the_budget_by_itself() -> None:
    """A budget too small for fetch_concurrency_max chunks lowers auto's maximum instead of
    refusing to start; a fixed number that does not fit is still refused."""
    cfg = load_config(env={**BASE, "COLDBREW_MEMORY_BUDGET": "256MiB", "COLDBREW_CHUNK_SIZE": "32MiB"})
    assert cfg.origin_settings.max_in_flight == 8
    assert load_config(env={**BASE, "COLDBREW_FETCH_CONCURRENCY": "auto"}).fetch_concurrency is None
    with pytest.raises(ConfigError, match="exceeds memory_budget"):
        load_config(env={**BASE, "COLDBREW_FETCH_CONCURRENCY": "9", "COLDBREW_MEMORY_BUDGET": "256MiB",
                         "COLDBREW_CHUNK_SIZE": "32MiB"})
    with pytest.raises(ConfigError, match="above the limit of 256"):
        load_config(env={**BASE, "COLDBREW_FETCH_CONCURRENCY_MAX": "1000"})


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--fetch-concurrency", "100000", "above the limit of 256"),
    ("--cache-size", "0", "leaves the cache no room"),
])
def test_an_agent_with_an_unbounded_setting_does_not_start(tmp_path: Path, flag: str, value: str,
                                                           words: str) -> None:
    cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "coldbrew.agent", "agent", "--origin", "file:///nonexistent",
         "--cache-dir", str(cache), "--socket", str(tmp_path / "a.sock"), flag, value],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert words in result.stderr
    assert not cache.exists() and not (tmp_path / "a.sock").exists()
