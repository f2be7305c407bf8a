"""The ``coldbrew`` command: the agent daemon and the tools that talk to it.

    coldbrew agent   [--config FILE] [--origin URL] [--cache-dir DIR] ...   run the node agent
    coldbrew prewarm URI... [--wait]      pull files or prefixes into the node cache
    coldbrew status  [URI] [--json]       how much is cached, per file
    coldbrew ls      [URI] [--json]       list the origin, with cached bytes
    coldbrew evict   URI                  drop a file or prefix from the cache
    coldbrew get     URI DEST             copy a file out through the node cache
    coldbrew publish URI...               put manifests beside the models, for P2P from byte one
    coldbrew demo                         the whole thing end to end on a local S3

Every error is one line on stderr and a non-zero exit: 2 for bad usage or
config, 3 when no agent is running, 1 for everything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .. import __version__
from .client import AgentClient, default_socket
from .errors import AgentUnavailable, ColdbrewError, ConfigError, UsageError
from .units import format_size


def _add_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, default=None,
                   help=f"agent control socket (default: $COLDBREW_SOCKET or {default_socket()})")


def _settings() -> Sequence[Any]:
    from .config import SETTINGS

    return SETTINGS


def build_parser(agent_flags: bool = True) -> argparse.ArgumentParser:
    """The whole command line. ``agent_flags=False`` leaves out the agent's settings
    flags, which need the settings table: the small commands start faster without it."""
    parser = argparse.ArgumentParser(prog="coldbrew", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"coldbrew {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser("agent", help="run the node agent in the foreground",
                           description="Run the node agent. Settings come from --config FILE "
                           "(TOML), then COLDBREW_* environment variables, then these flags.")
    agent.add_argument("--config", type=Path, default=None, help="TOML config file ($COLDBREW_CONFIG)")
    for s in _settings() if agent_flags else ():
        agent.add_argument(s.flag, dest=s.name, default=None, metavar=s.name.split("_")[-1].upper(),
                           help=f"{s.help} [env {s.env}]")

    pw = sub.add_parser("prewarm", help="pull files or prefixes into the node cache")
    pw.add_argument("uris", nargs="+", metavar="URI", help="s3://bucket/key, a prefix, or a path under the origin")
    pw.add_argument("--wait", action="store_true", help="show progress and exit 0 only when every byte is cached")
    pw.add_argument("--json", action="store_true", help="print the job as JSON")
    pw.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_socket(pw)

    st = sub.add_parser("status", help="how much of each file is cached")
    st.add_argument("uri", nargs="?", default=None, help="a file or prefix (default: everything cached)")
    st.add_argument("--json", action="store_true")
    _add_socket(st)

    ls = sub.add_parser("ls", help="list the origin with cached bytes")
    ls.add_argument("uri", nargs="?", default="", help="prefix to list (default: the origin root)")
    ls.add_argument("--json", action="store_true")
    _add_socket(ls)

    ev = sub.add_parser("evict", help="drop a file or prefix from the node cache")
    ev.add_argument("uri")
    ev.add_argument("--json", action="store_true")
    _add_socket(ev)

    get = sub.add_parser("get", help="copy a file out through the node cache")
    get.add_argument("uri")
    get.add_argument("dest", type=Path, help="destination file, or a directory to copy into")
    get.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_socket(get)

    pub = sub.add_parser("publish", help="write P2P manifests beside model files at the origin",
                         description="Read each file once and write its manifest (chunk digests "
                         "and BitTorrent piece hashes) to a .coldbrew/ folder beside it, so agents "
                         "share it with each other from the first byte. Needs write access to the "
                         "bucket; endpoint and credentials come from the usual AWS variables.")
    pub.add_argument("uris", nargs="+", metavar="URI", help="s3://bucket/key or s3://bucket/prefix/")
    pub.add_argument("--chunk-size", default="16MiB",
                     help="must equal the agents' chunk_size (default 16MiB)")
    pub.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint ($AWS_ENDPOINT_URL)")
    pub.add_argument("--force", action="store_true", help="rewrite manifests that are up to date")
    pub.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="run everything end to end on a local S3 server")
    demo.add_argument("--model-size", default="1GiB", help="size of the generated model (default 1GiB)")
    demo.add_argument("--workdir", type=Path, default=None, help="where to keep S3 data and the cache (default: a temp dir)")
    demo.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(agent_flags="agent" in argv).parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError) as e:
        _fail(e)
        return 2
    except AgentUnavailable as e:
        _fail(e)
        return 3
    except ColdbrewError as e:
        _fail(e)
        return 1
    except KeyboardInterrupt:
        print("coldbrew: interrupted", file=sys.stderr)
        return 130


def _fail(e: BaseException) -> None:
    print(f"coldbrew: error: {e}", file=sys.stderr)


# --- commands -----------------------------------------------------------------------------


def cmd_agent(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from .config import SETTINGS, load_config
    from .daemon import run_agent
    from .logs import setup_logging

    config_file = args.config or (Path(os.environ["COLDBREW_CONFIG"])
                                  if os.environ.get("COLDBREW_CONFIG") else None)
    config = load_config(file=config_file, flags={s.name: getattr(args, s.name) for s in SETTINGS})
    setup_logging(config.log_format, config.log_level)
    return asyncio.run(run_agent(config, config_file))


def cmd_prewarm(args: argparse.Namespace) -> int:
    client = AgentClient(args.socket)
    job = client.prewarm(args.uris)
    if not args.wait:
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            print(f"prewarm job {job['id']} started for {', '.join(args.uris)}; "
                  f"follow it with `coldbrew status`, or pass --wait")
        return 0
    job = _follow(client, job, show_bar=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        rate = job["bytes_done"] / job["elapsed_s"] if job["elapsed_s"] else 0
        print(f"prewarm {job['state']}: {job['files_done']}/{job['files']} files, "
              f"{format_size(job['bytes_done'])} of {format_size(job['bytes_total'])} "
              f"in {job['elapsed_s']:.1f} s ({rate / 1e6:.0f} MB/s)")
    for err in job["errors"]:
        print(f"coldbrew: error: {err}", file=sys.stderr)
    return 0 if job["state"] == "done" else 1


def _follow(client: AgentClient, job: dict[str, Any], show_bar: bool) -> dict[str, Any]:
    """Poll a job until it finishes, drawing a bytes/rate/ETA bar on stderr."""
    bar = None
    try:
        while job["state"] in ("expanding", "running"):
            if show_bar and bar is None and job["state"] == "running":
                from tqdm import tqdm

                bar = tqdm(total=job["bytes_total"], unit="B", unit_scale=True, unit_divisor=1024,
                           desc=f"prewarm {job['files']} file(s)", file=sys.stderr, dynamic_ncols=True)
            if bar is not None:
                bar.update(job["bytes_done"] - bar.n)
            job = client.job(job["id"], wait_s=0.25)
        if bar is not None:
            bar.update(job["bytes_done"] - bar.n)
    finally:
        if bar is not None:
            bar.close()
    return job


def cmd_status(args: argparse.Namespace) -> int:
    status = AgentClient(args.socket).status(args.uri)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    files = status["files"]
    print(f"{'CACHED':>11} {'SIZE':>11} {'':>5}  URI")
    for f in files:
        pct = 100 * f["cached_bytes"] / f["size"] if f["size"] else 100
        print(f"{format_size(f['cached_bytes']):>11} {format_size(f['size']):>11} {pct:>4.0f}%  {f['uri']}")
    cached, total = sum(f["cached_bytes"] for f in files), sum(f["size"] for f in files)
    agent = status["agent"]
    served = agent["served_bytes"]
    print(f"total: {len(files)} file(s), {format_size(cached)} of {format_size(total)} cached")
    print(f"agent: cache {format_size(agent['cache_bytes'])} of {format_size(agent['cache_capacity_bytes'])}"
          f" · served from cache {format_size(served['cache'])}, peers {format_size(served['peer'])},"
          f" origin {format_size(served['origin'])}")
    p2p = agent.get("p2p")
    if p2p:
        print(f"p2p: {len(p2p['peers'])} peer(s), {p2p['connections']} connection(s), "
              f"{p2p['torrents']} file(s) shared · from peers {format_size(p2p['bytes_from_peers'])}"
              f", to peers {format_size(p2p['bytes_to_peers'])}, {p2p['peers_banned']} banned"
              + (f" · unreachable: {', '.join(p2p['unreachable'])}" if p2p["unreachable"] else ""))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    listing = AgentClient(args.socket).ls(args.uri)
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for e in listing["entries"]:
        if e["type"] == "directory":
            print(f"{'PRE':>11} {'':>11}  {e['name']}/")
        else:
            print(f"{format_size(e['size']):>11} {format_size(e['cached_bytes']):>11}  {e['name']}")
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    result = AgentClient(args.socket).evict(args.uri)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"evicted {len(result['evicted'])} file(s), {format_size(result['bytes'])}")
        for uri in result["busy"]:
            print(f"coldbrew: {uri} is in use; not evicted", file=sys.stderr)
    return 0 if not result["busy"] else 1


def cmd_get(args: argparse.Namespace) -> int:
    dest: Path = args.dest
    if dest.is_dir():
        dest = dest / args.uri.rstrip("/").rsplit("/", 1)[-1]
    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    started = time.perf_counter()
    try:
        result = AgentClient(args.socket).get(args.uri, dest, progress)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    if not args.quiet:
        print(f"{result.uri} → {dest}: {format_size(result.bytes)} in {seconds:.2f} s "
              f"({result.bytes / max(seconds, 1e-9) / 1e6:.0f} MB/s)", file=sys.stderr)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    import asyncio

    from .config import OriginSettings, parse_chunk_size
    from .publish import publish

    try:
        chunk_size = parse_chunk_size(args.chunk_size)
    except ValueError as e:
        raise UsageError(f"--chunk-size: {e}") from None
    overrides = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
    bar: Any = None
    show = not args.quiet and sys.stderr.isatty()

    def on_files(infos: list[Any]) -> None:
        nonlocal bar
        if show:
            from tqdm import tqdm

            bar = tqdm(total=sum(i.size for i in infos), unit="B", unit_scale=True,
                       unit_divisor=1024, desc=f"publish {len(infos)} file(s)", file=sys.stderr)

    def on_bytes(n: int) -> None:
        if bar is not None:
            bar.update(n)

    for uri in args.uris:
        try:
            results = asyncio.run(publish(uri, chunk_size, OriginSettings.from_env(uri, **overrides),
                                          force=args.force, on_bytes=on_bytes, on_files=on_files))
        except ValueError as e:
            raise UsageError(str(e)) from None
        finally:
            if bar is not None:
                bar.close()
        for r in results:
            state = "up to date" if r.skipped else "published"
            print(f"{state}: {r.uri} ({r.chunks} chunks) → {r.sidecar}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


COMMANDS = {"agent": cmd_agent, "prewarm": cmd_prewarm, "status": cmd_status, "ls": cmd_ls,
            "evict": cmd_evict, "get": cmd_get, "publish": cmd_publish, "demo": cmd_demo}


if __name__ == "__main__":
    sys.exit(main())
