"""The README's first command works: `coldbrew demo` end to end on a small model."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "coldbrew.agent", "demo", "--model-size", "300MiB",
         "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "COLDBREW_"))})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ("prewarm, cold from S3", "read back through the node cache",
                 "loader: load_dir via the agent", "loader: load_dir cold from S3, no agent",
                 "FUSE: sha256 of every file through the mount", "demo ok"):
        assert step in out, f"missing step {step!r}:\n{out}"
    assert not list((tmp_path / "demo").glob("models/*")), "the mount is gone after the demo"
