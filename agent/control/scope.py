"""What the control API may serve: URIs under the agent's origin and its allowed roots. Pure.

The agent holds the node's object-store credentials; without this, any client of the socket
could read, list or prewarm any bucket those credentials reach (a confused deputy). A URI is in
scope when it equals a root or lies under it at a path-segment boundary (``s3://models`` does
not cover ``s3://models-secret``), after its path is normalized; ``..`` segments are refused
outright rather than resolved, since stores treat them as literal key text.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OutsideRoots


def normalize(uri: str) -> str:
    """``scheme://a//b/`` → ``scheme://a/b``; a ``.`` or ``..`` segment is an error."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise OutsideRoots(f"{uri!r} is not a URL")
    parts = [p for p in rest.split("/") if p != ""]
    if any(p in (".", "..") for p in parts):
        raise OutsideRoots(f"{uri}: '.' and '..' path segments are not allowed")
    lead = "/" if scheme == "file" else ""
    return f"{scheme.lower()}://{lead}{'/'.join(parts)}"


@dataclass(frozen=True)
class Scope:
    roots: tuple[str, ...]

    @classmethod
    def of(cls, origin: str, extra: tuple[str, ...] = ()) -> Scope:
        return cls(tuple(dict.fromkeys(normalize(r) for r in (origin, *extra))))

    def allows(self, uri: str) -> bool:
        try:
            target = normalize(uri)
        except OutsideRoots:
            return False
        return any(target == r or target.startswith(r.rstrip("/") + "/") for r in self.roots)

    def check(self, uri: str) -> str:
        """``uri`` normalized, or :class:`OutsideRoots` naming what this agent serves."""
        target = normalize(uri)
        if not self.allows(target):
            raise OutsideRoots(f"{uri} is outside what this agent serves ({', '.join(self.roots)}); "
                               "add its prefix to allowed_roots to serve it")
        return target
