"""The cluster identity for P2P: mutual TLS on the peer endpoint and on libtorrent.

One identity per agent, in the shape cert-manager writes a Secret: a directory with
``ca.crt`` (the cluster CA), ``tls.crt`` and ``tls.key`` (this member, signed by it).
A peer is a member exactly when its certificate chains to ``ca.crt``: the HTTP endpoint
requires a client certificate, the HTTP client presents ours and checks the server's, and
every torrent is an SSL torrent (the CA in its info dict, our certificate set on its
handle), so libtorrent talks TLS only, to members only. Peers are reached by pod IP, so no
host name is checked: membership is the CA's signature.

Certificates are re-read when their files change (cert-manager renews them in place; the
kubelet updates the mounted Secret), see :meth:`PeerTLS.reload`.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

FILES = ("ca.crt", "tls.crt", "tls.key")

#: libtorrent requires Diffie-Hellman parameters with every SSL torrent certificate, although
#: the ECDHE suites it negotiates never use them: the RFC 7919 group ffdhe2048, a published
#: constant (``openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048``).
DH_PARAMS = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


@dataclass
class PeerTLS:
    directory: Path
    ca_pem: bytes = b""
    cert_pem: bytes = b""
    key_pem: bytes = b""
    _stamp: tuple[float, ...] = field(default=(), repr=False)
    _contexts: list[ssl.SSLContext] = field(default_factory=list, repr=False)

    @classmethod
    def load(cls, directory: Path) -> PeerTLS:
        tls = cls(directory)
        tls.reload()
        return tls

    def reload(self) -> bool:
        """Read the files again if they changed; True if they did. A bad new set is refused
        (ConfigError) and the old one kept, so a half-written rotation breaks nothing."""
        paths = [self.directory / name for name in FILES]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"p2p_tls_dir: {', '.join(missing)} missing; the directory must hold "
                              "ca.crt, tls.crt and tls.key (a cert-manager Secret)")
        stamp = tuple(p.stat().st_mtime_ns for p in paths)
        if stamp == self._stamp:
            return False
        ca, cert, key = (p.read_bytes() for p in paths)
        _check(self.directory, ca)
        self.ca_pem, self.cert_pem, self.key_pem, self._stamp = ca, cert, key, stamp
        for ctx in self._contexts:  # new handshakes use the new set; the old CA stays trusted
            self._fill(ctx)
        return True

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._fill(ctx)
        self._contexts.append(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # peers are pod IPs; the CA's signature is the identity
        self._fill(ctx)
        self._contexts.append(ctx)
        return ctx

    def _fill(self, ctx: ssl.SSLContext) -> None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self.ca_pem.decode())
        ctx.load_cert_chain(self.directory / "tls.crt", self.directory / "tls.key")


def _check(directory: Path, ca: bytes) -> None:
    """Refuse a set that cannot work: unreadable PEM, or a key that is not the certificate's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_verify_locations(cadata=ca.decode())
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"p2p_tls_dir: {directory / 'ca.crt'} is not a PEM certificate ({e})") from None
    try:
        ctx.load_cert_chain(directory / "tls.crt", directory / "tls.key")
    except ssl.SSLError as e:
        raise ConfigError(f"p2p_tls_dir: {directory / 'tls.crt'} and tls.key do not make a "
                          f"certificate and its key ({e.reason or e})") from None


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def require_secure(address: str, tls: PeerTLS | None, insecure: bool) -> bool:
    """May P2P start on ``address``? True when it runs insecure (warn); ConfigError when refused.

    Without TLS, anyone who reaches the ports reads every cached model and offers chunks,
    so that needs loopback (tests, one node) or an explicit ``p2p_insecure = true``.
    """
    if tls is not None or is_loopback(address):
        return False
    if not insecure:
        raise ConfigError(
            f"P2P on {address} without TLS: anyone who reaches the peer ports could read every "
            "cached model. Set p2p_tls_dir to the cluster identity (ca.crt, tls.crt, tls.key), "
            "bind p2p_address to 127.0.0.1, or set p2p_insecure = true to accept that")
    return True
