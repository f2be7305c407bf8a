"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.data import put_random


def run(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "coldbrew.agent", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def last_line(result) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    return lines[-1] if lines else ""


def agent_args(tmp_path, origin):
    return ["agent", "--origin", origin, "--cache-dir", str(tmp_path / "cache"),
            "--socket", str(tmp_path / "a.sock"), "--metrics-address", "127.0.0.1:0",
            "--retry-base-delay-s", "0.01", "--log-format", "text"]


def test_missing_bucket_fails_agent_start(tmp_path, agent_env):
    r = run(*agent_args(tmp_path, "s3://no-such-bucket-here/models"), env=agent_env)
    assert r.returncode == 1
    line = last_line(r)
    assert line.startswith("coldbrew: error:") and "'no-such-bucket-here' does not exist" in line


def test_bad_credentials_fail_agent_start(tmp_path, agent_env, bucket):
    env = {**agent_env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    r = run(*agent_args(tmp_path, f"s3://{bucket}"), env=env)
    assert r.returncode == 1
    line = last_line(r)
    assert "access denied" in line and "credentials" in line


def test_bad_endpoint_fails_agent_start(tmp_path, agent_env):
    env = {**agent_env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # discard port: refused
    r = run(*agent_args(tmp_path, "s3://models"), env=env)
    assert r.returncode == 1
    line = last_line(r)
    assert "http://127.0.0.1:9" in line and "still failing after" in line


@pytest.mark.parametrize("flag,value,expect", [
    ("--cache-size", "12parsecs", "cache_size: '12parsecs' is not a size"),
    ("--chunk-size", "3MiB", "chunk_size: '3MiB' must be a power of two"),
    ("--metrics-address", "nowhere", "metrics_address: 'nowhere' is not host:port"),
    ("--fetch-concurrency", "0", "fetch_concurrency: '0' must be greater than 0"),
    ("--log-format", "xml", "log_format: 'xml' is not one of json, text"),
])
def test_bad_config_values(tmp_path, flag, value, expect):
    r = run(*agent_args(tmp_path, "s3://models"), flag, value)
    assert r.returncode == 2
    line = last_line(r)
    assert line.startswith("coldbrew: error:") and expect in line and f"(from {flag})" in line


def test_bad_config_from_env_and_file(tmp_path):
    r = run("agent", "--cache-dir", str(tmp_path), env={"COLDBREW_ORIGIN": "s3://m",
                                                         "COLDBREW_CACHE_RESERVE": "lots"})
    assert r.returncode == 2 and "(from COLDBREW_CACHE_RESERVE)" in last_line(r)
    cfg = tmp_path / "agent.toml"
    cfg.write_text('origin = "s3://m"\ncache_sise = "1GiB"\n')
    r = run("agent", "--config", str(cfg))
    assert r.returncode == 2 and "unknown key(s) cache_sise" in last_line(r)
    r = run("agent", "--cache-dir", str(tmp_path), env={"COLDBREW_ORIGIN": ""})
    assert r.returncode == 2 and "origin is required" in last_line(r)


@pytest.mark.parametrize("command", [["status"], ["ls"], ["prewarm", "s3://b/k"], ["evict", "s3://b/k"],
                                     ["get", "s3://b/k", "/tmp/x"]])
def test_no_agent_running(tmp_path, command):
    r = run(*command, "--socket", str(tmp_path / "nobody.sock"))
    assert r.returncode == 3
    line = last_line(r)
    assert line.startswith("coldbrew: error: no coldbrew agent is listening on")
    assert "nobody" in line and "coldbrew agent" in line  # evict names the admin socket beside it


def test_missing_key_and_bucket_through_a_running_agent(bucket, s3_client, make_agent, tmp_path):
    put_random(s3_client, bucket, "m/there.bin", 1000, 1)
    agent = make_agent(f"s3://{bucket}")
    r = agent.cli("prewarm", f"s3://{bucket}/m/absent.bin", "--wait", "--quiet")
    assert r.returncode == 1 and f"s3://{bucket}/m/absent.bin not found" in last_line(r)
    r = agent.cli("get", f"s3://{bucket}/m/absent.bin", str(tmp_path / "x"))
    assert r.returncode == 1 and "not found" in last_line(r)
    assert not (tmp_path / "x").exists()
    r = agent.cli("get", "s3://other-missing-bucket/k", str(tmp_path / "y"))
    # another bucket is outside this agent's origin: refused before the origin is asked
    assert r.returncode == 1 and "outside what this agent serves" in last_line(r)
    r = agent.cli("status", "m/absent/")
    assert r.returncode == 1 and "not found" in last_line(r)
    r = agent.cli("get", "gs://elsewhere/k", str(tmp_path / "z"))
    assert r.returncode == 2 and "can only read s3:// URIs" in last_line(r)
    # a partly bad prewarm still caches the good part, and says what failed
    r = agent.cli("prewarm", "m/there.bin", "m/absent.bin", "--wait", "--quiet")
    assert r.returncode == 1 and "1/1 files" in r.stdout and "absent.bin not found" in r.stderr


def test_second_agent_on_same_socket_or_cache_is_refused(bucket, make_agent, tmp_path, agent_env):
    first = make_agent(f"s3://{bucket}")
    r = run("agent", "--origin", f"s3://{bucket}", "--cache-dir", str(tmp_path / "other"),
            "--socket", str(first.socket), "--metrics-address", "127.0.0.1:0", env=agent_env)
    assert r.returncode == 2 and "already listening" in last_line(r)
    r = run("agent", "--origin", f"s3://{bucket}", "--cache-dir", str(first.cache_dir),
            "--socket", str(tmp_path / "b.sock"), "--metrics-address", "127.0.0.1:0", env=agent_env)
    assert r.returncode == 1 and "in use by another agent" in last_line(r)


def test_empty_origin_prefix_is_fine_at_start(bucket, make_agent):
    """A fresh deployment: the bucket exists, nothing is under the prefix yet."""
    agent = make_agent(f"s3://{bucket}/models-to-come")
    assert agent.client.health()["ready"] is True
    assert "nothing under the origin prefix yet" in agent.log()
