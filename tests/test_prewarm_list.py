"""The config file's prewarm list: parsing, diffs, retry backoff (pure), and a real agent that
follows the file while it runs (the reload a ConfigMap edit causes in Kubernetes)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from coldbrew.agent.errors import ConfigError, UsageError
from coldbrew.agent.fetch.prewarm_list import (
    MAX_RETRY_S,
    changed_settings,
    diff_lists,
    parse_file,
    retry_delay_s,
    setting_problems,
)


def resolve(entry: str) -> str:
    """What Origin.resolve does for an s3://models origin."""
    text = entry.strip()
    if "://" in text:
        if not text.startswith("s3://"):
            raise UsageError(f"{text}: this agent's origin is s3://models; it can only read s3:// URIs")
        return text.rstrip("/")
    return f"s3://models/{text.lstrip('/')}".rstrip("/")


def parse(text: str):
    return parse_file(text, "config file x.toml", resolve)


# --- parsing ---------------------------------------------------------------------------------


def test_list_beside_settings_resolves_relative_entries_and_drops_duplicates():
    got = parse('origin = "s3://models"\ncache_size = "80%"\n'
                'prewarm = ["llama/", "s3://models/mistral/m.safetensors", "/llama"]\n')
    assert got.prewarm == ("s3://models/llama", "s3://models/mistral/m.safetensors")
    assert got.settings == {"origin": "s3://models", "cache_size": "80%"}


def test_list_beside_an_agent_table_and_the_table_form():
    got = parse('prewarm = ["a/"]\n[agent]\norigin = "s3://models"\n')
    assert got.prewarm == ("s3://models/a",) and got.settings == {"origin": "s3://models"}
    got = parse('[agent]\norigin = "s3://models"\n[prewarm]\nuris = ["b"]\n')
    assert got.prewarm == ("s3://models/b",)


def test_no_list_is_an_empty_list():
    assert parse('origin = "s3://models"\n').prewarm == ()


@pytest.mark.parametrize("text, message", [
    ('prewarm = "llama/"', 'prewarm must be a list of URIs, e.g. prewarm = ["llama-3-8b/"'),
    ('prewarm = ["a", 42]', "prewarm entry 2 is int 42, not a URI string"),
    ('prewarm = ["  "]', "prewarm entry 1 is '  '; name a file or a prefix under the origin"),
    ('prewarm = ["/"]', "prewarm entry 1 is '/'"),
    ('prewarm = ["gs://other/x"]', ("prewarm entry 1 ('gs://other/x'): gs://other/x: this "
                                    "agent's origin is s3://models")),
    ('[prewarm]\nurls = ["a"]', "[prewarm] takes only `uris = [...]`, not urls"),
    ('prewarm = ["a"\n', "config file x.toml is not valid TOML"),
    ('prewarm = ["a"]\n[agent]\nprewarm = ["b"]\n', "the prewarm list is given twice"),
])
def test_bad_lists_are_named_with_the_file_and_the_entry(text, message):
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert message in str(e.value)
    assert str(e.value).startswith("config file x.toml")


# --- diffs -----------------------------------------------------------------------------------


def test_diff_keeps_list_order():
    assert diff_lists(("a", "b", "c"), ("c", "d", "a", "e")) == (["d", "e"], ["b"])
    assert diff_lists(("a",), ("a",)) == ([], [])


def test_changed_settings_names_added_removed_and_changed_keys():
    running = {"origin": "s3://m", "cache_size": "80%", "fetch_concurrency": 8}
    now = {"origin": "s3://m", "cache_size": "70%", "log_level": "DEBUG"}
    assert changed_settings(running, now) == ["cache_size", "fetch_concurrency", "log_level"]
    assert changed_settings(running, dict(running)) == []


def test_setting_problems_use_the_agents_own_parsers():
    assert setting_problems({"cache_size": "80%", "chunk_size": "16MiB"}) == []
    problems = setting_problems({"cache_size": "12 parsecs", "cache_sise": "1GiB"})
    assert problems[0] == "unknown key cache_sise"
    assert problems[1].startswith("cache_size: '12 parsecs' is not a size")


def test_retry_backoff_doubles_from_the_reload_interval_and_is_capped():
    assert [retry_delay_s(n, 30) for n in (1, 2, 3)] == [30, 60, 120]
    assert retry_delay_s(50, 30) == MAX_RETRY_S
    assert retry_delay_s(1, 0.2) == 1.0  # never hammers the origin, however short the interval


# --- a real agent following its config file -----------------------------------------------------


class ConfigMapDir:
    """A config directory laid out the way kubelet lays out a mounted ConfigMap: the file is a
    symlink through ``..data``, and an update swaps ``..data`` atomically to a new directory."""

    def __init__(self, root: Path, name: str = "coldbrew.toml") -> None:
        self.root, self.name, self.version = root, name, 0
        root.mkdir()
        (root / name).symlink_to(f"..data/{name}")

    @property
    def path(self) -> Path:
        return self.root / self.name

    def write(self, text: str) -> None:
        self.version += 1
        data = self.root / f"..2026_{self.version:04d}"
        data.mkdir()
        (data / self.name).write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(data.name)
        os.replace(tmp, self.root / "..data")


def cached_bytes(agent, uri: str) -> int:
    return sum(f["cached_bytes"] for f in agent.client.status(uri)["files"])


def wait_until(what: str, check, agent, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}:\n{agent.log()}")


def log_records(agent) -> list[dict]:
    return [json.loads(line) for line in agent.log_path.read_text().splitlines()
            if line.startswith("{")]


def test_agent_follows_the_prewarm_list_without_a_restart(tmp_path, s3_client, bucket, make_agent):
    models = {"llama/w.bin": os.urandom(3 << 20), "mistral/w.bin": os.urandom(2 << 20),
              "qwen/w.bin": os.urandom(1 << 20)}
    for key, body in models.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    origin = f"s3://{bucket}"
    settings = f'origin = "{origin}"\nchunk_size = "1MiB"\nprewarm_reload_s = 0.2\n'
    conf = ConfigMapDir(tmp_path / "config")
    conf.write(settings + 'prewarm = ["llama/"]\n')
    agent = make_agent(origin, extra_args=["--config", str(conf.path)])
    pid = agent.proc.pid

    wait_until("llama is prewarmed at start", lambda: cached_bytes(agent, "llama/") == 3 << 20, agent)
    assert cached_bytes(agent, "mistral/") == 0
    assert agent.metric("coldbrew_prewarm_list_entries") == 1

    # An edit, delivered as kubelet delivers it: a symlink swap.
    conf.write(settings + 'prewarm = ["llama/", "mistral/w.bin"]\n')
    wait_until("mistral is prewarmed after the edit",
               lambda: cached_bytes(agent, "mistral/") == 2 << 20, agent)
    assert agent.metric("coldbrew_prewarm_list_entries") == 2
    assert agent.metric("coldbrew_prewarm_list_reloads_total", outcome="applied") == 1
    changed = [r for r in log_records(agent) if r["msg"] == "prewarm list changed"]
    assert changed[-1]["added"] == [f"{origin}/mistral/w.bin"] and changed[-1]["removed"] == []

    # A bad entry: logged with the file and the entry, the previous list stays, the agent lives.
    conf.write(settings + 'prewarm = ["llama/", 42]\n')
    wait_until("the bad list is reported",
               lambda: agent.metric("coldbrew_prewarm_list_reloads_total", outcome="invalid") == 1,
               agent)
    errors = [r for r in log_records(agent) if r["level"] == "error"]
    assert "prewarm entry 2 is int 42, not a URI string" in errors[-1]["msg"]
    assert "the previous prewarm list stays in force" in errors[-1]["msg"]
    assert agent.metric("coldbrew_prewarm_list_entries") == 2

    # A fixed file with a new model and a changed setting: the model comes, the setting waits.
    conf.write(settings.replace('"1MiB"', '"2MiB"') + 'prewarm = ["qwen/"]\n')
    wait_until("qwen is prewarmed after the fix", lambda: cached_bytes(agent, "qwen/") == 1 << 20, agent)
    assert agent.metric("coldbrew_prewarm_list_restart_pending") == 1
    warnings = [r for r in log_records(agent) if r["level"] == "warning"]
    assert any("changed setting(s) chunk_size" in r["msg"] and "next restart" in r["msg"]
               for r in warnings)
    assert cached_bytes(agent, "llama/") == 3 << 20  # a removed entry stays cached

    assert agent.proc.poll() is None and agent.proc.pid == pid  # never restarted
    assert agent.client.health()["chunk_size"] == 1 << 20       # the setting did not change live
    assert agent.stop() == 0


def test_a_listed_model_that_appears_later_is_retried(tmp_path, s3_client, bucket, make_agent):
    origin = f"s3://{bucket}"
    s3_client.put_object(Bucket=bucket, Key="keep/x", Body=b"x")  # the origin check wants a bucket
    conf = tmp_path / "agent.toml"
    conf.write_text(f'origin = "{origin}"\nprewarm_reload_s = 0.2\nprewarm = ["late/w.bin"]\n')
    agent = make_agent(origin, extra_args=["--config", str(conf)])
    wait_until("the missing model is reported",
               lambda: agent.metric("coldbrew_prewarm_list_failed_entries") == 1, agent)
    failed = [r for r in log_records(agent) if r["msg"].startswith("prewarm list entry failed")]
    assert f"{origin}/late/w.bin" in failed[0]["msg"] or failed[0]["uri"] == f"{origin}/late/w.bin"

    s3_client.put_object(Bucket=bucket, Key="late/w.bin", Body=b"y" * 1000)
    wait_until("the model is cached once it exists",
               lambda: cached_bytes(agent, "late/w.bin") == 1000, agent, timeout_s=20)
    wait_until("no entry is failed", lambda: agent.metric("coldbrew_prewarm_list_failed_entries") == 0,
               agent)


def test_a_bad_list_at_start_stops_the_agent_with_a_config_error(tmp_path, bucket, make_agent):
    conf = tmp_path / "agent.toml"
    conf.write_text(f'origin = "s3://{bucket}"\nprewarm = "llama/"\n')
    agent = make_agent(f"s3://{bucket}", start=False, extra_args=["--config", str(conf)])
    with pytest.raises(RuntimeError, match="exited at start with 2") as e:
        agent.start()
    assert f"config file {conf}: prewarm must be a list of URIs" in str(e.value)
