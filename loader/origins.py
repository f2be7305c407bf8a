"""The origins a load reads remote files from when it goes without the agent, and who owns them.

An :class:`~coldbrew.agent.origin.origin.Origin` is bound to the event loop it was made on
(its S3 client's connections are), and setting one up costs most of a second. So a load on
the loader's own loop shares one per settings for the life of the process
(:class:`SharedOrigins`), while work on a loop of its own makes private ones and closes them
when done (:class:`OwnOrigins`). Either is asked for the origin of a URI with ``get(uri)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coldbrew.loader.runtime import runtime
from coldbrew.loader.sources import origin_root

if TYPE_CHECKING:
    from coldbrew.agent.config import OriginSettings
    from coldbrew.agent.origin.origin import Origin


def origin_settings(uri: str, concurrency: int | None, endpoint_url: str | None) -> OriginSettings:
    """The origin settings for ``uri``: the environment's, with the load's GETs in flight and
    its S3 endpoint (when given) on top."""
    from coldbrew.agent.config import OriginSettings

    overrides: dict[str, Any] = {"fetch_concurrency": concurrency}
    if endpoint_url:
        overrides["endpoint_url"] = endpoint_url
    return OriginSettings.from_env(origin_root(uri), **overrides)


class Origins:
    """Where a load gets the origin of a URI."""

    def __init__(self, concurrency: int | None, endpoint_url: str | None) -> None:
        self.concurrency = concurrency
        self.endpoint_url = endpoint_url

    def settings(self, uri: str) -> OriginSettings:
        return origin_settings(uri, self.concurrency, self.endpoint_url)

    async def get(self, uri: str) -> Origin:
        raise NotImplementedError


class SharedOrigins(Origins):
    """One origin per settings on the loader's loop, shared by every load of the process."""

    async def get(self, uri: str) -> Origin:
        from coldbrew.agent.origin.origin import Origin

        settings = self.settings(uri)

        async def make() -> Origin:
            return Origin(settings)

        return await runtime().bound(("origin", settings), make)


class OwnOrigins(Origins):
    """Origins private to the loop they are used on; :meth:`close` them before it ends."""

    def __init__(self, concurrency: int | None, endpoint_url: str | None) -> None:
        super().__init__(concurrency, endpoint_url)
        self._made: dict[OriginSettings, Origin] = {}

    async def get(self, uri: str) -> Origin:
        from coldbrew.agent.origin.origin import Origin

        settings = self.settings(uri)
        if settings not in self._made:
            self._made[settings] = Origin(settings)
        return self._made[settings]

    async def close(self) -> None:
        for origin in self._made.values():
            await origin.close()
        self._made.clear()
