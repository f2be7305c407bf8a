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
import os
import sys
import time

from ... import __version__
from ..control.client import AgentClient, default_socket
from ..errors import AgentUnavailable, ColdbrewError, ConfigError, NotAdmin, UsageError, redact
from ..units import format_size

# Every `coldbrew get/status/prewarm` is a fresh process, and its start is part of what the
# user waits for: no pathlib, typing or dataclasses here (measured: ~10 ms of imports), and
# argparse builds only the named command (bench/RESULTS.md, "Finding: the CLI's start").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own, told the terminal's width: left to itself it imports shutil for that
    (with bz2, lzma and zlib: ~3 ms of every command's start) each time it is made."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)  # - 2: as argparse does


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() tells it: $COLUMNS, else stdout's."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def _add_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=None,
                   help=f"agent control socket (default: $COLDBREW_SOCKET or {default_socket()})")


def _agent_args(p: argparse.ArgumentParser) -> None:
    from ..config import SETTINGS

    p.add_argument("--config", default=None, help="TOML config file ($COLDBREW_CONFIG)")
    for s in SETTINGS:
        p.add_argument(s.flag, dest=s.name, default=None, metavar=s.name.split("_")[-1].upper(),
                       help=f"{s.help} [env {s.env}]")


def _prewarm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uris", nargs="+", metavar="URI", help="s3://bucket/key, a prefix, or a path under the origin")
    p.add_argument("--wait", action="store_true", help="show progress and exit 0 only when every byte is cached")
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_socket(p)


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", nargs="?", default=None, help="a file or prefix (default: everything cached)")
    p.add_argument("--json", action="store_true")
    _add_socket(p)


def _ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", nargs="?", default="", help="prefix to list (default: the origin root)")
    p.add_argument("--json", action="store_true")
    _add_socket(p)


def _evict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri")
    p.add_argument("--json", action="store_true")
    _add_socket(p)
    p.add_argument("--admin-socket", default=None,
                   help="the agent's admin socket, where evict is served (default: $COLDBREW_ADMIN_SOCKET, "
                        "else beside --socket: <name>-admin.sock)")


def _get_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri")
    p.add_argument("dest", help="destination file, a directory to copy into, or - for standard output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_socket(p)


def _publish_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uris", nargs="+", metavar="URI", help="s3://bucket/key or s3://bucket/prefix/")
    p.add_argument("--chunk-size", default="16MiB", help="must equal the agents' chunk_size (default 16MiB)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint ($AWS_ENDPOINT_URL)")
    p.add_argument("--force", action="store_true", help="rewrite manifests that are up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-size", default="1GiB", help="size of the generated model (default 1GiB)")
    p.add_argument("--workdir", default=None, help="where to keep S3 data and the cache (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory afterwards")


#: name → (help, description or None, its arguments).
_PARSERS: dict[str, tuple[str, str | None, Callable[[argparse.ArgumentParser], None]]] = {
    "agent": ("run the node agent in the foreground",
              "Run the node agent. Settings come from --config FILE (TOML), then COLDBREW_* "
              "environment variables, then these flags.", _agent_args),
    "prewarm": ("pull files or prefixes into the node cache", None, _prewarm_args),
    "status": ("how much of each file is cached", None, _status_args),
    "ls": ("list the origin with cached bytes", None, _ls_args),
    "evict": ("drop a file or prefix from the node cache", None, _evict_args),
    "get": ("copy a file out through the node cache", None, _get_args),
    "publish": ("write P2P manifests beside model files at the origin",
                "Read each file once and write its manifest (chunk digests and BitTorrent piece "
                "hashes) to a .coldbrew/ folder beside it, so agents share it with each other "
                "from the first byte. Needs write access to the bucket; endpoint and credentials "
                "come from the usual AWS variables.", _publish_args),
    "demo": ("run everything end to end on a local S3 server", None, _demo_args),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line. ``only``: just that command (a command line that names one starts
    faster: argparse looks up message translations on disk for every parser it makes, and
    the agent's flags need the whole settings table)."""
    parser = argparse.ArgumentParser(prog="coldbrew", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"coldbrew {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, description, add_args) in _PARSERS.items():
        if only in (None, name):
            add_args(sub.add_parser(name, help=help_, description=description or help_,
                                    formatter_class=_HelpFormatter))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    named = argv[0] if argv and argv[0] in _PARSERS else None
    args = build_parser(only=named).parse_args(argv)
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
    print(f"coldbrew: error: {redact(str(e))}", file=sys.stderr)


# --- commands -----------------------------------------------------------------------------


def cmd_agent(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from ..config import SETTINGS, load_config
    from ..logs import setup_logging
    from .daemon import run_agent

    config_path = args.config or os.environ.get("COLDBREW_CONFIG")
    config_file = Path(config_path) if config_path else None
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
    if agent.get("origin_concurrency") is not None:
        how = "auto" if agent.get("origin_concurrency_auto") else "fixed"
        rate = agent.get("origin_throughput") or 0
        print(f"origin: {agent['origin_concurrency']} GETs in flight ({how})"
              + (f", {format_size(int(rate))}/s last measured" if rate else ""))
    if agent.get("origin_reachable") is False:
        print(f"origin: unreachable, serving cache ({agent.get('origin_error') or 'no answer'})")
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
    import pathlib

    from ..config import admin_socket_for

    admin = args.admin_socket or os.environ.get("COLDBREW_ADMIN_SOCKET") or str(
        admin_socket_for(pathlib.Path(args.socket or default_socket())))
    try:
        result = AgentClient(admin).evict(args.uri)
    except AgentUnavailable as e:
        if "ermission denied" in str(e):
            raise NotAdmin(f"cannot use the admin socket {admin}: permission denied; evict needs the "
                           "agent's admin_group or its user") from None
        raise
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"evicted {len(result['evicted'])} file(s), {format_size(result['bytes'])}")
        for uri in result["busy"]:
            print(f"coldbrew: {uri} is in use; not evicted", file=sys.stderr)
    return 0 if not result["busy"] else 1


def cmd_get(args: argparse.Namespace) -> int:
    dest: str = args.dest
    if dest == "-":
        return _get_to_stdout(args)
    if os.path.isdir(dest):
        dest = os.path.join(dest, args.uri.rstrip("/").rsplit("/", 1)[-1])
    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(dest),
                   file=sys.stderr)

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


def _get_to_stdout(args: argparse.Namespace) -> int:
    """``coldbrew get URI -``: the bytes to standard output, in order (a pipe cannot seek)."""
    started = time.perf_counter()
    out = sys.stdout.buffer
    try:
        result = AgentClient(args.socket).stream(args.uri, out)
        out.flush()
    except BrokenPipeError:  # `coldbrew get URI - | head -c 10`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if not args.quiet:
        seconds = time.perf_counter() - started
        print(f"{result.uri} → standard output: {format_size(result.bytes)} in {seconds:.2f} s",
              file=sys.stderr)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    import asyncio

    from ..config import OriginSettings, parse_chunk_size
    from ..p2p.publish import publish

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
    from ..devtools.demo import run_demo

    return run_demo(args)


COMMANDS = {"agent": cmd_agent, "prewarm": cmd_prewarm, "status": cmd_status, "ls": cmd_ls,
            "evict": cmd_evict, "get": cmd_get, "publish": cmd_publish, "demo": cmd_demo}


if __name__ == "__main__":
    sys.exit(main())
