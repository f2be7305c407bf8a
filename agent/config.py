"""Typed agent configuration from a TOML file, the environment and flags.

Precedence, lowest to highest: built-in defaults < config file < ``COLDBREW_*``
environment variables < command-line flags. Every setting is declared once in
:data:`SETTINGS` (name, parser, default, help); the file key, the environment
variable and the flag are all derived from that name, so the three can never
drift apart. Values are validated when the config is built, and each bad value
gets a message naming where it came from::

    cache_size: '12 parsecs' is not a size (from COLDBREW_CACHE_SIZE); use e.g. 500GiB or 80%
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .units import GiB, KiB, MiB, format_size, parse_size

#: Each origin GET holds one chunk buffer and one task; beyond this, S3 throttles anyway.
MAX_FETCH_CONCURRENCY = 256


@dataclass(frozen=True)
class SizeOrPercent:
    """A byte count, or a percentage of the cache filesystem's size."""

    bytes: int | None = None
    percent: float | None = None

    def resolve(self, filesystem_bytes: int) -> int:
        if self.percent is not None:
            return int(filesystem_bytes * self.percent / 100)
        return self.bytes or 0


def parse_size_or_percent(text: str | int) -> SizeOrPercent:
    if isinstance(text, str) and text.strip().endswith("%"):
        pct = float(text.strip()[:-1])
        if not 0 <= pct <= 100:
            raise ValueError(f"{text!r} is not a percentage between 0% and 100%")
        return SizeOrPercent(percent=pct)
    return SizeOrPercent(bytes=parse_size(text))


def parse_chunk_size(text: str | int) -> int:
    n = parse_size(text)
    if n < 64 * KiB or n > 1 * GiB or n & (n - 1):
        raise ValueError(f"{text!r} must be a power of two between 64KiB and 1GiB (default 16MiB)")
    return n


def parse_address(text: str) -> tuple[str, int]:
    """``'0.0.0.0:9400'`` → ('0.0.0.0', 9400); ``':9400'`` binds all interfaces."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port (e.g. 0.0.0.0:9400)")
    return (host.strip("[]") or "0.0.0.0", int(port))


def parse_peers(text: str | list[str] | tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """``'10.0.0.5:7881,node-b:7881'`` → (('10.0.0.5', 7881), ('node-b', 7881)); ``''`` → ()."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    peers = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        host, port = parse_address(item)
        if not item.rpartition(":")[0].strip("[]") or port == 0:
            raise ValueError(f"peer {item!r} needs a host and a port (e.g. 10.0.0.5:7881)")
        peers.append((host, port))
    return tuple(peers)


def parse_port(text: str | int) -> int:
    if not str(text).strip().isdigit() or not 0 <= int(text) <= 65534:
        raise ValueError(f"{text!r} is not a port (0 turns P2P off; the agent also uses port + 1)")
    return int(text)


def parse_mode(text: str | int) -> int:
    """``'0660'`` → 0o660: permission bits, written in octal as for chmod."""
    try:
        mode = text if isinstance(text, int) else int(str(text).strip(), 8)
    except ValueError:
        raise ValueError(f"{text!r} is not an octal file mode (e.g. 0660)") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{text!r} is not a file mode between 0000 and 0777")
    return mode


def parse_group(text: str | int | None) -> int | None:
    """A group name or numeric gid → gid; empty → None (the agent's own group)."""
    if text is None or str(text).strip() == "":
        return None
    value = str(text).strip()
    if value.isdigit():
        return int(value)
    import grp

    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"no group named {value!r} on this node (give a name or a numeric gid)"
                         ) from None


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def _positive(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(text: Any) -> Any:
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{text!r} must be greater than 0")
        return value

    return parse


def _at_most(kind: Callable[[Any], Any], maximum: int, why: str) -> Callable[[Any], Any]:
    """``kind`` > 0 and <= ``maximum``: a setting that allocates per unit (buffers, tasks)."""
    positive = _positive(kind)

    def parse(text: Any) -> Any:
        value = positive(text)
        if value > maximum:
            raise ValueError(f"{text!r} is above the limit of {maximum} ({why})")
        return value

    return parse


def parse_concurrency(text: Any) -> int | None:
    """``auto`` (None: the origin's GETs in flight adapt, :mod:`.origin.adaptive`) or a fixed
    number of them."""
    if text is None or str(text).strip().lower() == "auto":
        return None
    return _at_most(int, MAX_FETCH_CONCURRENCY, "each GET holds a chunk buffer")(text)


def parse_cache_size(text: str | int) -> SizeOrPercent:
    value = parse_size_or_percent(text)
    if not (value.bytes or value.percent):
        raise ValueError(f"{text!r} leaves the cache no room; give a size (500GiB) or a share (80%)")
    return value


def _non_negative_seconds(text: Any) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} must be 0 (off) or a number of seconds greater than 0")
    return value


def parse_origin(text: str) -> str:
    text = str(text).strip()
    if "://" not in text:
        if text.startswith("/"):
            return "file://" + text
        raise ValueError(f"{text!r} is not a URL; use s3://bucket/prefix or file:///path")
    scheme, _, rest = text.partition("://")
    if scheme == "s3" and not rest.strip("/"):
        raise ValueError(f"{text!r} names no bucket; use s3://bucket or s3://bucket/prefix")
    return text


def parse_roots(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``'s3://a/models/,s3://b'`` → ('s3://a/models/', 's3://b'); each a URL as for ``origin``."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    return tuple(parse_origin(i) for i in (str(i).strip() for i in items) if i)


def admin_socket_for(socket: Path) -> Path:
    """The admin socket beside a control socket: ``agent.sock`` → ``agent-admin.sock``."""
    return socket.with_name(f"{socket.stem}-admin{socket.suffix}")


def _optional_str(text: Any) -> str | None:
    return str(text) if text not in (None, "") else None


def _optional_path(text: Any) -> Path | None:
    return Path(str(text)) if text not in (None, "") else None


def parse_globs(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``'*.safetensors,*.bin'`` → ('*.safetensors', '*.bin'); ``''`` or ``'none'`` → ()."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    globs = tuple(str(g).strip() for g in items if str(g).strip())
    return () if globs in ((), ("none",)) else globs


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    #: Extra environment variables read when COLDBREW_<NAME> is unset (e.g. AWS ones).
    env_aliases: tuple[str, ...] = ()
    required: bool = False

    @property
    def env(self) -> str:
        return "COLDBREW_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


#: The ``p2p_manifests`` choices, most trusting first (docs/security.md, Manifests).
MANIFEST_POLICIES = ("members", "checked", "published")
#: What a read of a cached file does when the origin cannot confirm its version.
UNREACHABLE_POLICIES = ("serve-cached", "fail")

SETTINGS: tuple[Setting, ...] = (
    Setting("origin", parse_origin, None,
            "where models live: s3://bucket/prefix or any fsspec URL (required)", required=True),
    Setting("endpoint_url", _optional_str, None,
            "S3 endpoint URL for S3-compatible stores", env_aliases=("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
    Setting("region", _optional_str, None, "S3 region",
            env_aliases=("AWS_REGION", "AWS_DEFAULT_REGION")),
    Setting("anonymous", parse_bool, False, "read public buckets without credentials"),
    Setting("cache_dir", Path, Path("/var/lib/coldbrew/cache"), "node-local cache directory (NVMe)"),
    Setting("cache_size", parse_cache_size, SizeOrPercent(percent=90.0),
            "most bytes the cache may hold: a size (500GiB) or a share of the disk (90%%)"),
    Setting("cache_reserve", parse_size_or_percent, SizeOrPercent(bytes=1 * GiB),
            "free space always left on the cache disk (size or %%)"),
    Setting("chunk_size", parse_chunk_size, 16 * MiB,
            "unit of fetch, cache and integrity; power of two"),
    Setting("socket", Path, Path("/run/coldbrew/agent.sock"), "control API unix socket path"),
    Setting("socket_mode", parse_mode, 0o660,
            "permissions of the control socket, octal (prefer socket_group to opening it wider)"),
    Setting("socket_group", parse_group, None,
            "group owning the control socket (name or gid), so non-root runners in it can connect"),
    Setting("admin_socket", _optional_path, None,
            "control socket for destructive calls (evict); owner-only unless admin_group is set "
            "(default: beside socket, <name>-admin.sock)"),
    Setting("admin_group", parse_group, None,
            "group that may use the admin socket (name or gid); unset: only the agent's user"),
    Setting("allowed_roots", parse_roots, (),
            "URL prefixes the control API serves besides the origin, comma-separated "
            "(e.g. s3://other-models/); every other URI is refused"),
    Setting("memory_budget", parse_size, 2 * GiB,
            "most memory the agent's chunks in flight may take: fetch_concurrency x chunk_size "
            "must fit in it"),
    Setting("metrics_address", parse_address, ("0.0.0.0", 9400),
            "host:port for /metrics, /healthz, /readyz (port 0 picks a free one)"),
    Setting("fetch_concurrency", parse_concurrency, None,
            "parallel ranged GETs to the origin: auto (default: grows while it adds throughput, "
            "shrinks when requests queue or the origin throttles) or a fixed number (at most "
            "256; x chunk_size must fit memory_budget)"),
    Setting("fetch_concurrency_max", _at_most(int, MAX_FETCH_CONCURRENCY,
                                              "each GET holds a chunk buffer"), 64,
            "most GETs in flight an automatic fetch_concurrency goes to (also at most "
            "memory_budget / chunk_size)"),
    Setting("retry_attempts", _at_most(int, 100, "a request retried longer is better failed"), 8,
            "attempts per origin request before giving up (at most 100)"),
    Setting("retry_base_delay_s", _positive(float), 0.1, "first retry backoff, doubles each time"),
    Setting("retry_max_delay_s", _positive(float), 5.0, "cap on one retry backoff"),
    Setting("connect_timeout_s", _positive(float), 5.0, "origin connect timeout"),
    Setting("read_timeout_s", _positive(float), 30.0, "origin read timeout (no byte for this long)"),
    Setting("version_timeout_s", _at_most(float, 300, "a reader waits on it"), 5.0,
            "most seconds a version check (the HEAD before a cached file is served) may take "
            "before the origin counts as unreachable"),
    Setting("origin_unreachable", lambda s: _choice(s, UNREACHABLE_POLICIES), "serve-cached",
            "when the origin cannot be reached: serve-cached (serve the cached version, log "
            "once per file, count coldbrew_stale_serves_total) or fail"),
    Setting("check_origin", parse_bool, True,
            "at start, fail fast if the origin bucket is missing or credentials are refused "
            "(an unreachable origin does not stop the start under serve-cached)"),
    Setting("prewarm_reload_s", _non_negative_seconds, 30.0,
            "how often the config file's prewarm list is read again; new entries are prewarmed "
            "without a restart (0: read it only at start)"),
    Setting("mount", _optional_path, None,
            "mount a read-only FUSE view of the origin at this directory (unset: no mount)"),
    Setting("fuse_read_timeout_s", _positive(float), 60.0,
            "longest a read through the mount waits for its bytes before failing with EIO"),
    Setting("fuse_prefetch", parse_globs, ("*.safetensors", "*.bin"),
            "file name patterns fetched whole, in order, ahead of the reader when opened through "
            "the mount (comma-separated globs; 'none' for none)"),
    Setting("fuse_metadata_ttl_s", _positive(float), 10.0,
            "how long the mount trusts a directory listing or a file's size and ETag before asking "
            "the origin again (an open file stays pinned to its ETag regardless)"),
    Setting("fuse_allow_other", parse_bool, True,
            "let users other than the agent's read the mount (needs root or user_allow_other)"),
    Setting("fuse_readahead", parse_size, 4 * MiB,
            "kernel read-ahead for the mount (1 MiB FUSE requests need >= 1MiB)"),
    Setting("fuse_passthrough", parse_bool, True,
            "let the kernel read wholly cached, checked files straight from the cache (FUSE "
            "passthrough; needs Linux >= 6.9, libfuse >= 3.16 and CAP_SYS_ADMIN, else unused)"),
    Setting("p2p_port", parse_port, 0,
            "share chunks with other agents: their peer endpoint (HTTP) listens on this TCP port "
            "and libtorrent on the next one; 0 turns P2P off"),
    Setting("p2p_address", str, "0.0.0.0", "address the P2P ports bind to"),
    Setting("peers", parse_peers, (),
            "other agents, host:port,... (port = their p2p_port)"),
    Setting("peers_dns", _optional_str, None,
            "a DNS name that resolves to every agent (a headless Service); peers use our p2p_port"),
    Setting("peers_refresh_s", _positive(float), 30.0, "how often peers_dns is resolved again"),
    # No cap by default: libtorrent's rate limiter also slows the start of every transfer
    # (a peer's sending ramps up over ~1 s). Measured with bench/probes/probe_peer.py, 1 GiB from one
    # peer: 4.0-4.9 s under a 1 GiB/s cap, 2.4-2.9 s with none or 10 GiB/s (bench/RESULTS.md).
    Setting("p2p_upload_limit", parse_size, 0,
            "most bytes per second served to peers, so they cannot starve this node's own loads "
            "(0: no cap; a cap also slows the start of each transfer to a peer)"),
    Setting("p2p_chunk_timeout_s", _positive(float), 10.0,
            "longest a chunk may take to arrive from peers before it is fetched from the origin"),
    Setting("p2p_tls_dir", _optional_path, None,
            "the cluster identity for P2P (mTLS): a directory with ca.crt, tls.crt and tls.key, "
            "as cert-manager writes a Secret; peers must present a certificate signed by ca.crt"),
    Setting("p2p_insecure", parse_bool, False,
            "allow P2P without TLS on a non-loopback address (anyone who reaches the ports can "
            "read and offer chunks); warned at start and in coldbrew_p2p_insecure"),
    Setting("p2p_manifests", lambda s: _choice(s, MANIFEST_POLICIES), "members",
            "which manifests of other agents to use: members (any cluster member's, checked "
            "against the origin's checksum where it has one), checked (only those the origin can "
            "check), published (none: only `coldbrew publish` sidecars and our own)"),
    Setting("log_format", lambda s: _choice(s, ("json", "text")), "json", "json or text"),
    Setting("log_level", lambda s: _choice(str(s).upper(), ("DEBUG", "INFO", "WARNING", "ERROR")),
            "INFO", "DEBUG, INFO, WARNING or ERROR"),
)
_BY_NAME = {s.name: s for s in SETTINGS}


def _choice(text: Any, options: tuple[str, ...]) -> str:
    if text not in options:
        raise ValueError(f"{text!r} is not one of {', '.join(options)}")
    return str(text)


@dataclass(frozen=True)
class AgentConfig:
    """The agent's settings, validated. Units are in the names."""

    origin: str
    endpoint_url: str | None
    region: str | None
    anonymous: bool
    cache_dir: Path
    cache_size: SizeOrPercent
    cache_reserve: SizeOrPercent
    chunk_size: int
    socket: Path
    socket_mode: int
    socket_group: int | None
    admin_socket: Path | None
    admin_group: int | None
    allowed_roots: tuple[str, ...]
    memory_budget: int
    metrics_address: tuple[str, int]
    fetch_concurrency: int | None
    fetch_concurrency_max: int
    retry_attempts: int
    retry_base_delay_s: float
    retry_max_delay_s: float
    connect_timeout_s: float
    read_timeout_s: float
    version_timeout_s: float
    origin_unreachable: str
    check_origin: bool
    prewarm_reload_s: float
    mount: Path | None
    fuse_read_timeout_s: float
    fuse_prefetch: tuple[str, ...]
    fuse_metadata_ttl_s: float
    fuse_allow_other: bool
    fuse_readahead: int
    fuse_passthrough: bool
    p2p_port: int
    p2p_address: str
    peers: tuple[tuple[str, int], ...]
    peers_dns: str | None
    peers_refresh_s: float
    p2p_upload_limit: int
    p2p_chunk_timeout_s: float
    p2p_tls_dir: Path | None
    p2p_insecure: bool
    p2p_manifests: str
    log_format: str
    log_level: str


    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or admin_socket_for(self.socket)

    @property
    def origin_settings(self) -> OriginSettings:
        return OriginSettings(
            url=self.origin, endpoint_url=self.endpoint_url, region=self.region,
            anonymous=self.anonymous, fetch_concurrency=self.fetch_concurrency,
            fetch_concurrency_max=max(1, min(self.fetch_concurrency_max,
                                             self.memory_budget // self.chunk_size)),
            retry_attempts=self.retry_attempts, retry_base_delay_s=self.retry_base_delay_s,
            retry_max_delay_s=self.retry_max_delay_s, connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s, version_timeout_s=self.version_timeout_s,
            origin_unreachable=self.origin_unreachable)


assert {f.name for f in fields(AgentConfig)} == set(_BY_NAME), "SETTINGS and AgentConfig differ"


@dataclass(frozen=True)
class OriginSettings:
    """What an origin client needs. The agent derives it from its config; the loader,
    running without an agent, from its arguments and the usual AWS environment."""

    url: str
    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    #: GETs in flight: None adapts them (up to ``fetch_concurrency_max``), a number fixes them.
    fetch_concurrency: int | None = None
    fetch_concurrency_max: int = 64
    retry_attempts: int = 8
    retry_base_delay_s: float = 0.1
    retry_max_delay_s: float = 5.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    version_timeout_s: float = 5.0
    origin_unreachable: str = "serve-cached"

    @property
    def max_in_flight(self) -> int:
        """The most GETs this origin may have in flight (thread and connection pools)."""
        return self.fetch_concurrency or self.fetch_concurrency_max

    @classmethod
    def from_env(cls, url: str, env: Mapping[str, str] | None = None, **overrides: Any
                 ) -> OriginSettings:
        """Settings for ``url`` with endpoint and region from COLDBREW_*/AWS_* variables."""
        env = os.environ if env is None else env
        found: dict[str, Any] = {}
        for name in ("endpoint_url", "region"):
            setting = _BY_NAME[name]
            for var in (setting.env, *setting.env_aliases):
                if env.get(var):
                    found[name] = env[var]
                    break
        for name in ("version_timeout_s", "origin_unreachable"):  # stale-if-error, as the agent's
            setting = _BY_NAME[name]
            if env.get(setting.env):
                try:
                    found[name] = setting.parse(env[setting.env])
                except ValueError as e:
                    raise ConfigError(f"{name}: {e} (from {setting.env})") from None
        return cls(url=parse_origin(url), **{**found, **overrides})


def read_config_file(path: Path) -> dict[str, Any]:
    """Load a TOML config file; keys are setting names (``cache_size = "500GiB"``)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    agent = data.get("agent", data)  # a top-level [agent] table is optional
    if "agent" in data:
        stray = sorted(set(data) - {"agent", "prewarm"})
        if stray:
            raise ConfigError(f"config file {path}: key(s) {', '.join(stray)} sit outside the "
                              "[agent] table; put every setting inside it (or drop the table)")
    unknown = sorted(set(agent) - set(_BY_NAME) - {"agent", "prewarm"})
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}; "
                          f"known keys: {', '.join(_BY_NAME)}")
    return {k: v for k, v in agent.items() if k in _BY_NAME}


def load_config(
    *,
    file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the config from its three sources; flags win over env over file.

    ``flags`` maps setting names to raw values (None = not given).
    """
    env = os.environ if env is None else env
    raw: dict[str, tuple[Any, str]] = {}
    if file is not None:
        for k, v in read_config_file(file).items():
            raw[k] = (v, f"config file {file}")
    for s in SETTINGS:
        for var in (s.env, *s.env_aliases):
            if env.get(var, "") != "":
                raw[s.name] = (env[var], var)
                break
    for k, v in (flags or {}).items():
        if v is not None:
            raw[k] = (v, _BY_NAME[k].flag)
    values = {s.name: _parse_one(s, raw.get(s.name)) for s in SETTINGS}
    _check_memory(values, raw)
    return AgentConfig(**values)


def _check_memory(values: dict[str, Any], raw: dict[str, tuple[Any, str]]) -> None:
    """Origin fetches each hold one chunk-size buffer: their product must fit the budget. An
    automatic fetch_concurrency stays within it by itself (AgentConfig.origin_settings), as
    long as one chunk fits."""
    count = values["fetch_concurrency"] or 1
    need = count * values["chunk_size"]
    if need > values["memory_budget"]:
        def where(name: str) -> str:
            return raw[name][1] if name in raw else "default"

        raise ConfigError(
            f"fetch_concurrency x chunk_size = {count} x {format_size(values['chunk_size'])}"
            f" = {format_size(need)} exceeds memory_budget {format_size(values['memory_budget'])} "
            f"(from {where('fetch_concurrency')}, {where('chunk_size')}, {where('memory_budget')}); "
            "lower one of the first two or raise the budget")


def _parse_one(setting: Setting, given: tuple[Any, str] | None) -> Any:
    if given is None:
        if setting.required:
            raise ConfigError(f"{setting.name} is required: pass {setting.flag}, set {setting.env} "
                              f"or put `{setting.name} = ...` in the config file")
        return setting.default
    value, source = given
    try:
        return setting.parse(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{setting.name}: {e} (from {source})") from None
