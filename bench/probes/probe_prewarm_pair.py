"""Two trees' agents, prewarm by prewarm, interleaved: the side-by-side check that a change
costs the prewarm nothing.

``./dev bench agent`` run once per tree takes minutes per set, and this machine's sets drift
more than the effects asked about (the agent's CPU for the same prewarm moved between 0.6 and
2.3 CPU-s per GiB within one tree: bench/RESULTS.md, Agent). Here the two trees alternate
round by round against one S3 server and one object: A, B, B, A, A, B... each round on a fresh
cache with the page cache dropped and the object's server files read back, so drift lands on
both alike. Per round: the job's ``elapsed_s`` and the agent process's CPU seconds.

    python bench/probes/probe_prewarm_pair.py --tree /work/prev --tree /work/cur --rounds 6

Each tree is a checkout with a ``.venv/bin/coldbrew`` (a shim that imports that tree).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as C

BUCKET = "probe-pair"


def prewarm(tree: Path, workdir: Path, env: dict[str, str], s3_dir: Path, name: str,
            uri: str) -> tuple[float, float]:
    """One cold prewarm by ``tree``'s agent: (job elapsed_s, agent CPU-s)."""
    cli = [str(tree / ".venv/bin/coldbrew")]
    agent = C.AgentProc(workdir, f"s3://{BUCKET}", {**env, "PYTHONPATH": str(tree)}, name)
    agent.command = lambda: [*cli, "agent", "--origin", agent.origin,  # type: ignore[method-assign]
                             "--cache-dir", str(agent.cache_dir), "--socket", str(agent.socket),
                             "--metrics-address", "127.0.0.1:0", "--log-format", "json"]
    try:
        agent.start()
        C.drop_caches()
        C.read_files(C.files_under(s3_dir))
        before = C.proc_cpu_s(agent.pid) or 0.0
        _, result = C.timed_run([*cli, "prewarm", uri, "--wait", "--json"], env=agent.cli_env())
        cpu = (C.proc_cpu_s(agent.pid) or 0.0) - before
        return float(json.loads(result.stdout)["elapsed_s"]), cpu
    finally:
        agent.stop()
        agent.remove_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", type=Path, required=True, help="twice")
    ap.add_argument("--size", type=C.size_arg, default=1 << 30)
    ap.add_argument("--rounds", type=int, default=6, help="prewarms per tree")
    args = ap.parse_args()
    a, b = args.tree
    from coldbrew.agent.devtools.locals3 import LocalS3

    workdir = Path(tempfile.mkdtemp(prefix="coldbrew-pair-"))
    try:
        with LocalS3(workdir / "s3") as s3:
            client = s3.client()
            client.create_bucket(Bucket=BUCKET)
            C.upload_random(client, BUCKET, "model.bin", args.size)
            uri = f"s3://{BUCKET}/model.bin"
            results: dict[Path, list[tuple[float, float]]] = {a: [], b: []}
            order = [a, b, b, a] * ((args.rounds + 1) // 2)
            for i, tree in enumerate(order[:2 * args.rounds]):
                got = prewarm(tree, workdir, s3.env(), workdir / "s3", f"r{i}", uri)
                results[tree].append(got)
                C.log(f"round {i + 1}: {tree.name} {got[0]:.3f} s, agent {got[1]:.2f} CPU-s")
        print(f"\n{C.format_size(args.size)}, {args.rounds} cold prewarms per tree, interleaved")
        print(f"{'tree':<12} {'median s':>9} {'agent CPU-s':>12}   runs (s)")
        for tree, rows in results.items():
            secs, cpus = [r[0] for r in rows], [r[1] for r in rows]
            print(f"{tree.name:<12} {C.median(secs):9.3f} {C.median(cpus):12.2f}   "
                  + " ".join(f"{s:.2f}" for s in secs))
        ma, mb = (C.median([r[0] for r in results[t]]) for t in (a, b))
        print(f"\n{b.name} / {a.name} prewarm time: {mb / ma:.3f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
