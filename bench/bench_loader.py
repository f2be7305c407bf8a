#!/usr/bin/env python3
"""Benchmark: coldbrew.loader against the usual ways to load a model, side by side, in one run.

One local S3 server (SeaweedFS on 127.0.0.1) holds one generated model: ``--size``
bytes of bf16 weights with Llama-7B-like tensor shapes, in ``--shards`` safetensors
shards with a ``model.safetensors.index.json``. Every contender runs in a fresh
process and is timed to the moment every byte of every tensor has been read: the
clock stops after the same checksum (xxh3 over each tensor's bytes) for all.

Cold, from S3, no agent:
  download      boto3, ``--concurrency`` threads of 16 MiB ranged GETs into one
                model-sized buffer per file (the transport ceiling "into memory")
  s3fs+load     ``s3fs`` download of the shards to local disk, then
                ``safetensors.torch.load_file`` on each
  runai         runai-model-streamer (+ -s3) ``SafetensorsStreamer`` on the same objects
  coldbrew      ``load_dir("s3://…/", device="cpu")`` with a fresh write-through cache
                dir (the time to the caller's tensors; the write-through finishing is
                reported too, as "cache done")
  coldbrew stream ``iter_tensors("s3://…/")`` without a write-through: the time to the
                first tensor in the caller's hands, and to the last

Warm, cached on the node (the page cache holds the files; both read once before):
  st.load_file  ``safetensors.torch.load_file`` of the local shards (mmap; the checksum
                reads every page), and with ``backend="pread"`` (owned memory)
  coldbrew warm ``load_dir("s3://…/")`` again: served from the write-through cache
                (one HEAD per file to check the ETag), every block verified
  coldbrew local ``load_dir(local_dir)``: the same local shards as st.load_file

Every clock starts after the imports and before any client is made (boto3 client,
s3fs filesystem, Run:ai streamer, coldbrew's origin client): a cold start pays for
its client. ``st.load_file`` (mmap) hands back tensors over a private file mapping
(copy-on-write pages of the page cache, filled as the checksum touches them);
``backend="pread"`` copies into memory the caller owns, as coldbrew does.

Memory mode (the VMs hand freed memory back to the host, and the first write to
such memory is slow): with ``--prefault`` (default) every contender's process first
writes and frees model-sized anonymous memory and writes and deletes a model-sized
file beside its cache/download dir, then resets its peak-RSS mark, then starts
its clock. ``--no-prefault`` runs all of them without.

Bars (PASS/FAIL; exit status 0 regardless):
  1. cold coldbrew <= 1.15 x download, and faster than s3fs+load and runai
  2. warm coldbrew >= 1.0 x st.load_file into owned memory (backend="pread"; the mmap
     figure is shown for reference)
  3. peak RSS of cold coldbrew <= 1.1 x model size + 300 MiB

    python bench/bench_loader.py                       # 2 GiB, 2 shards, 3 runs
    python bench/bench_loader.py --size 512MiB --runs 1
    python bench/bench_loader.py --size 1GiB --runs 3 --link rtt=20ms,conn=25MB/s  # bench/link.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import link

BUCKET = "coldbrew-bench-loader"
PREFIX = "model"
HIDDEN, INTER, VOCAB = 4096, 11008, 32000

# ======================================================================================
# The model: Llama-like bf16 tensors, written shard by shard without holding them.
# ======================================================================================


def model_tensors(size: int) -> list[tuple[str, list[int]]]:
    """Names and shapes (bf16) adding up to about ``size`` bytes."""
    out: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    layer = [("self_attn.q_proj.weight", [HIDDEN, HIDDEN]), ("self_attn.k_proj.weight", [HIDDEN, HIDDEN]),
             ("self_attn.v_proj.weight", [HIDDEN, HIDDEN]), ("self_attn.o_proj.weight", [HIDDEN, HIDDEN]),
             ("mlp.gate_proj.weight", [INTER, HIDDEN]), ("mlp.up_proj.weight", [INTER, HIDDEN]),
             ("mlp.down_proj.weight", [HIDDEN, INTER]), ("input_layernorm.weight", [HIDDEN]),
             ("post_attention_layernorm.weight", [HIDDEN])]
    total = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    i = 0
    while True:
        for name, shape in layer:
            n = 2 * _numel(shape)
            if total + n > size and i > 0:
                out += [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]
                return out
            out.append((f"model.layers.{i}.{name}", shape))
            total += n
        i += 1


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_model(root: Path, size: int, shards: int) -> list[Path]:
    import numpy as np

    tensors = model_tensors(size)
    total = sum(2 * _numel(s) for _, s in tensors)
    per_shard = total / shards
    groups: list[list[tuple[str, list[int]]]] = [[] for _ in range(shards)]
    acc = 0
    for name, shape in tensors:
        groups[min(int(acc // per_shard), shards - 1)].append((name, shape))
        acc += 2 * _numel(shape)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 2**16, size=32 << 20, dtype=np.uint16)
    block &= 0xBFFF  # finite bf16 values
    weight_map = {}
    paths = []
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in group:
            n = 2 * _numel(shape)
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path = root / fname
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for j, (_name, shape) in enumerate(group):
                left = 2 * _numel(shape)
                rolled = np.roll(block, j * 7919 + k)  # different bytes per tensor
                data = rolled.tobytes()
                while left:
                    n = min(left, len(data))
                    f.write(data[:n])
                    left -= n
        paths.append(path)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return paths


# ======================================================================================
# Worker side: one contender per fresh process; the clock is taken in there.
# ======================================================================================


def _checksum(tensors: dict[str, Any]) -> str:
    import torch
    import xxhash

    from coldbrew.loader.device import byte_view

    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(byte_view(t.contiguous().reshape(-1).view(torch.uint8)))
    return h.hexdigest()


def _checksum_files(buffers: dict[str, bytearray], headers: dict[str, Any]) -> str:
    """The same checksum as :func:`_checksum`, over downloaded file buffers."""
    import xxhash

    by_name = {}
    for fname, buf in buffers.items():
        view = memoryview(buf)
        for t in headers[fname].tensors:
            by_name[t.name] = view[t.begin:t.end]
    h = xxhash.xxh3_128()
    for name in sorted(by_name):
        h.update(name.encode())
        h.update(by_name[name])
    return h.hexdigest()


def _prefault(spec: dict[str, Any]) -> float:
    if not spec["prefault"]:
        return 0.0
    started = time.perf_counter()
    buf = bytearray(spec["size"])  # calloc'd, then every page written below
    view = memoryview(buf)
    step = 1 << 20
    ones = bytes([1]) * step
    for i in range(0, len(buf), step):
        view[i:i + step] = ones[:len(view[i:i + step])]
    del view, buf
    C.prefault_page_cache(Path(spec["scratch"]), spec["size"])
    return time.perf_counter() - started


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    return (C.proc_status_kib(os.getpid(), "VmHWM") or 0) * 1024


def run_download(spec: dict[str, Any]) -> dict[str, Any]:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from botocore.config import Config

    from coldbrew.loader.header import parse_prefix

    conc, chunk = spec["concurrency"], 16 << 20
    pool = ThreadPoolExecutor(conc)
    yield_ready()
    t0 = time.perf_counter()  # client creation is inside every contender's clock
    s3 = boto3.client("s3", config=Config(max_pool_connections=2 * conc,
                                          response_checksum_validation="when_required"))
    keys = spec["keys"]
    sizes = {k: s3.head_object(Bucket=BUCKET, Key=k)["ContentLength"] for k in keys}
    buffers = {k: bytearray(sizes[k]) for k in keys}
    work = [(k, s, min(s + chunk, sizes[k])) for k in keys for s in range(0, sizes[k], chunk)]
    lock = threading.Lock()
    pending = iter(work)

    def worker(_: int) -> int:
        total = 0
        while True:
            with lock:
                item = next(pending, None)
            if item is None:
                return total
            key, start, end = item
            resp = s3.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end - 1}")
            raw = resp["Body"]._raw_stream
            view = memoryview(buffers[key])[start:end]
            got = 0
            while got < end - start:  # socket bytes straight into the buffer (recv_into)
                n = raw._fp.readinto(view[got:])
                if not n:
                    raise RuntimeError(f"short body {key} at {start}")
                got += n
            raw.release_conn()
            total += got

    total = sum(pool.map(worker, range(conc)))
    headers = {k: parse_prefix(bytes(buffers[k][:8 + int.from_bytes(buffers[k][:8], "little")]),
                               file_size=sizes[k], source=k) for k in keys}
    checksum = _checksum_files(buffers, headers)
    return {"seconds": time.perf_counter() - t0, "bytes": total, "checksum": checksum}


def run_s3fs_load(spec: dict[str, Any]) -> dict[str, Any]:
    import s3fs
    import safetensors.torch

    dest = Path(spec["scratch"]) / "download"
    dest.mkdir(parents=True, exist_ok=True)
    yield_ready()
    t0 = time.perf_counter()
    fs = s3fs.S3FileSystem()
    fs.get([f"{BUCKET}/{k}" for k in spec["keys"]], [str(dest / Path(k).name) for k in spec["keys"]])
    tensors = {}
    for k in spec["keys"]:
        tensors.update(safetensors.torch.load_file(str(dest / Path(k).name)))
    checksum = _checksum(tensors)
    return {"seconds": time.perf_counter() - t0, "checksum": checksum}


def run_runai(spec: dict[str, Any]) -> dict[str, Any]:
    from runai_model_streamer import SafetensorsStreamer

    yield_ready()
    t0 = time.perf_counter()
    tensors = {}
    first = None
    with SafetensorsStreamer() as streamer:
        for k in spec["keys"]:
            streamer.stream_file(f"s3://{BUCKET}/{k}")
            for name, t in streamer.get_tensors():
                first = first or time.perf_counter() - t0
                tensors[name] = t
    checksum = _checksum(tensors)
    return {"seconds": time.perf_counter() - t0, "checksum": checksum, "first_s": first}


def run_coldbrew(spec: dict[str, Any]) -> dict[str, Any]:
    import logging

    from coldbrew.loader import load_dir, wait_writeback

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    yield_ready()
    t0 = time.perf_counter()
    sd = load_dir(spec["location"], cache_dir=spec.get("cache_dir") or False,
                  concurrency=spec.get("loader_concurrency"))
    loaded = time.perf_counter() - t0
    checksum = _checksum(sd)
    seconds = time.perf_counter() - t0
    wait_writeback(300)
    return {"seconds": seconds, "load_s": loaded, "checksum": checksum,
            "cache_done_s": time.perf_counter() - t0, "sources": sd.stats["bytes_by_source"]}


def run_coldbrew_stream(spec: dict[str, Any]) -> dict[str, Any]:
    """iter_tensors, no write-through: when the first tensor is the caller's, and the whole."""
    from coldbrew.loader import iter_tensors

    yield_ready()
    t0 = time.perf_counter()
    tensors, first = {}, None
    for name, t in iter_tensors(spec["location"], cache_dir=False,
                                concurrency=spec.get("loader_concurrency")):
        first = first or time.perf_counter() - t0
        tensors[name] = t
    checksum = _checksum(tensors)
    return {"seconds": time.perf_counter() - t0, "checksum": checksum, "first_s": first}


def run_st_local(spec: dict[str, Any]) -> dict[str, Any]:
    import safetensors.torch

    yield_ready()
    t0 = time.perf_counter()
    tensors = {}
    for p in spec["paths"]:
        tensors.update(safetensors.torch.load_file(p, backend=spec.get("backend", "mmap")))
    checksum = _checksum(tensors)
    return {"seconds": time.perf_counter() - t0, "checksum": checksum}


WORKERS = {"download": run_download, "s3fs+load": run_s3fs_load, "runai": run_runai,
           "coldbrew": run_coldbrew, "coldbrew stream": run_coldbrew_stream,
           "st.load_file": run_st_local,
           "st.load_file pread": run_st_local, "coldbrew warm": run_coldbrew,
           "coldbrew local": run_coldbrew}

_SPEC: dict[str, Any] = {}


def yield_ready() -> None:
    """Everything before the clock: imports done, clients made; now prefault."""
    _SPEC["prefault_s"] = _prefault(_SPEC)
    _SPEC["hwm_reset"] = _reset_peak_rss()


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    _SPEC.update(spec)
    result = WORKERS[spec["contender"]](spec)
    result.update(peak_rss=_peak_rss(), prefault_s=_SPEC.get("prefault_s"),
                  hwm_reset=_SPEC.get("hwm_reset"))
    print("RESULT " + json.dumps(result), flush=True)


# ======================================================================================
# Driver
# ======================================================================================


def run_contender(name: str, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    spec = {**spec, "contender": name}
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GiB", help="model size (default 2GiB)")
    ap.add_argument("--shards", type=int, default=2, help="safetensors shards (default 2)")
    ap.add_argument("--runs", type=int, default=3, help="runs per contender; medians reported")
    ap.add_argument("--concurrency", type=int, default=8, help="parallel GETs of download (default 8)")
    ap.add_argument("--loader-concurrency", type=int, default=None,
                    help="the loader's concurrency (default: its own, adapting; a number fixes it)")
    ap.add_argument("--prefault", action=argparse.BooleanOptionalAction, default=True,
                    help="prefault memory before each clock (default on)")
    ap.add_argument("--skip", default="", help="comma-separated contenders to skip")
    ap.add_argument("--workdir", default=None, help="where the server, model and caches live")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--link", default=None,
                    help="run on an emulated S3 link, e.g. rtt=20ms,conn=25MB/s (bench/link.py; root)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    spec = link.enter(args.link)

    from coldbrew.agent.devtools.locals3 import LocalS3
    from coldbrew.agent.units import parse_size

    size_target = parse_size(args.size)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="coldbrew-bench-loader-"))
    work.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    try:
        with LocalS3(work / "s3") as s3, contextlib.ExitStack() as linked:
            env = {**os.environ, **s3.env(), "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
                   "COLDBREW_SOCKET": str(work / "no-agent.sock")}
            model_dir = work / "model"
            model_dir.mkdir(exist_ok=True)
            t = time.perf_counter()
            paths = write_model(model_dir, size_target, args.shards)
            size = sum(p.stat().st_size for p in paths)
            client = s3.client()
            client.create_bucket(Bucket=BUCKET)
            for p in [*paths, model_dir / "model.safetensors.index.json"]:
                client.upload_file(str(p), BUCKET, f"{PREFIX}/{p.name}")
            print(f"model: {C.format_size(size)} in {len(paths)} shards, bf16, generated and uploaded "
                  f"in {time.perf_counter() - t:.0f} s; prefault={'on' if args.prefault else 'off'}; "
                  f"runs={args.runs}; {os.cpu_count()} CPUs", flush=True)
            keys = [f"{PREFIX}/{p.name}" for p in paths]
            if spec is not None:  # uploaded at full speed; from here on, the link
                linked.enter_context(link.delaying(spec, s3.port, work))
                print(f"link: {spec}; " + link.verify(client, BUCKET, keys[0], 64 << 20), flush=True)
            scratch = work / "scratch"
            base = {"size": size, "prefault": args.prefault, "scratch": str(scratch),
                    "concurrency": args.concurrency, "loader_concurrency": args.loader_concurrency,
                    "keys": keys}
            cache = work / "loader-cache"
            plans: dict[str, dict[str, Any]] = {
                "download": {},
                "s3fs+load": {},
                "runai": {},
                "coldbrew": {"location": f"s3://{BUCKET}/{PREFIX}/", "cache_dir": str(cache)},
                "coldbrew stream": {"location": f"s3://{BUCKET}/{PREFIX}/"},
                "st.load_file": {"paths": [str(p) for p in paths]},
                "st.load_file pread": {"paths": [str(p) for p in paths], "backend": "pread"},
                "coldbrew warm": {"location": f"s3://{BUCKET}/{PREFIX}/", "cache_dir": str(cache)},
                "coldbrew local": {"location": str(model_dir)},
            }
            results: dict[str, list[dict[str, Any]]] = {n: [] for n in plans if n not in skip}
            for run in range(args.runs):
                for name in results:
                    shutil.rmtree(scratch, ignore_errors=True)
                    scratch.mkdir(parents=True)
                    if name == "coldbrew":
                        shutil.rmtree(cache, ignore_errors=True)
                    if name in ("st.load_file", "st.load_file pread", "coldbrew local"):
                        C.read_files(paths)
                    if name == "coldbrew warm":
                        C.read_files(C.files_under(cache))
                    try:
                        r = run_contender(name, {**base, **plans[name]}, env)
                    except Exception as e:
                        print(f"  {name}: FAILED: {str(e)[-1500:]}", flush=True)
                        continue
                    results[name].append(r)
                    print(f"  run {run + 1} {name:<20} {r['seconds']:6.2f} s  "
                          f"peak RSS {C.format_size(r['peak_rss'])}"
                          + (f"  (load {r['load_s']:.2f} s, cache done {r['cache_done_s']:.2f} s, "
                             f"from {r['sources']})" if 'load_s' in r else ""), flush=True)
            report(results, size, args)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, list[dict[str, Any]]], size: int, args: argparse.Namespace) -> None:
    med = {n: C.median([r["seconds"] for r in rs]) for n, rs in results.items() if rs}
    sums = {n: {r["checksum"] for r in rs} for n, rs in results.items() if rs}
    all_sums = set().union(*sums.values()) if sums else set()
    print(f"\n{'contender':<22}{'median s':>10}{'GB/s':>8}{'peak RSS':>12}{'first s':>9}  runs")
    for n, rs in results.items():
        if not rs:
            continue
        rss = max(r["peak_rss"] for r in rs)
        # Time to the first tensor in the caller's hands: all of it for those that hand
        # everything over at once.
        first = C.median([r.get("first_s") or r["seconds"] for r in rs])
        print(f"{n:<22}{med[n]:>10.2f}{C.mbps(size, med[n]) / 1000:>8.2f}{C.format_size(rss):>12}"
              f"{first:>9.2f}  " + " ".join(f"{r['seconds']:.2f}" for r in rs))
    print(f"checksums agree across contenders: {'yes' if len(all_sums) == 1 else 'NO: ' + str(sums)}")
    bars = []

    def bar(text: str, ok: bool | None) -> None:
        bars.append((text, ok))

    cb = med.get("coldbrew")
    if cb and med.get("download"):
        ratio = cb / med["download"]
        bar(f"1a cold coldbrew / download = {ratio:.2f} (<= 1.15)", ratio <= 1.15)
    for other in ("s3fs+load", "runai"):
        if cb and med.get(other):
            bar(f"1b cold coldbrew {cb:.2f} s faster than {other} {med[other]:.2f} s", cb < med[other])
    # Memory the caller owns: the pread backend (mmap tensors are page-cache mappings).
    st_owned = med.get("st.load_file pread")
    for warm in ("coldbrew warm", "coldbrew local"):
        if med.get(warm) and st_owned:
            speed = st_owned / med[warm]
            bar(f"2  {warm}: speed vs st.load_file(pread) = {speed:.2f}x (>= 1.0)", speed >= 1.0)
    if results.get("coldbrew"):
        rss = max(r["peak_rss"] for r in results["coldbrew"])
        limit = 1.1 * size + 300 * C.MiB
        bar(f"3  cold coldbrew peak RSS {C.format_size(rss)} <= {C.format_size(int(limit))}",
            rss <= limit if all(r["hwm_reset"] for r in results["coldbrew"]) else None)
    print()
    for text, ok in bars:
        print(f"{'PASS' if ok else 'FAIL' if ok is False else 'n/a '}  {text}")
    if args.json:
        C.write_json(Path(args.json), {"size": size, "results": results, "medians": med,
                                       "bars": [{"bar": t, "pass": ok} for t, ok in bars]})


if __name__ == "__main__":
    main()
