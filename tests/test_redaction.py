"""Credentials never leave the agent: not in a log line, an error reply, a status or a metric.

A real agent gets recognizable secrets in its endpoint URL's userinfo and in the AWS
environment, is pointed at a port where nothing answers (so requests really fail), and
every output of the failing run is searched for them.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any

from coldbrew.agent.errors import redact

USER, PASSWORD, SECRET = "AKIAREDACTMEUSER", "pw-Redact-Me-9137", "secret-Redact-Me-5521"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redact_removes_userinfo_and_secret_env_values(monkeypatch: Any) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = f"cannot reach http://{USER}:{PASSWORD}@10.0.0.5:9000/b (key {SECRET}); s3://bucket/x ok"
    out = redact(text)
    assert USER not in out and PASSWORD not in out and SECRET not in out
    assert "http://***@10.0.0.5:9000/b" in out and "s3://bucket/x" in out


def test_a_failing_run_leaks_no_credential_anywhere(make_agent: Any, tmp_path: Any) -> None:
    endpoint = f"http://{USER}:{PASSWORD}@127.0.0.1:{_closed_port()}"
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": USER,
           "COLDBREW_RETRY_ATTEMPTS": "1", "COLDBREW_CONNECT_TIMEOUT_S": "1"}
    agent = make_agent("s3://models", endpoint=endpoint, env=env, name="leaky",
                       extra_args=["--check-origin", "false"])
    outputs = []
    for args in (("get", "s3://models/m.bin", str(tmp_path / "out.bin")), ("ls", "s3://models/"),
                 ("prewarm", "s3://models/m.bin", "--wait")):
        result = agent.cli(*args)
        assert result.returncode != 0, f"{args} should have failed: the fault did not fire"
        outputs += [result.stdout, result.stderr]
    assert any("127.0.0.1" in o for o in outputs), outputs  # the failures name the endpoint...
    status = agent.cli("status", "--json", check=True).stdout
    with urllib.request.urlopen(f"http://{agent.metrics_address}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert json.loads(status)
    agent.stop()
    everything = "\n".join([*outputs, status, metrics, agent.log()])
    assert "error" in agent.log().lower()  # ...and the agent logged them
    for secret in (USER, PASSWORD, SECRET):
        assert secret not in everything, f"{secret} leaked"
    # a start that fails at once (check_origin) says so without the credentials either
    failing = make_agent("s3://models", endpoint=endpoint, env=env, name="refused", start=False)
    try:
        failing.start()
        raise AssertionError("the agent started against a closed port")
    except RuntimeError as e:
        message = str(e)
    assert "127.0.0.1" in message
    for secret in (USER, PASSWORD, SECRET):
        assert secret not in message, f"{secret} leaked at start"
