"""The layering rule of docs/architecture.md, checked: nothing imports upward.

Every ``import`` in the product tree counts — at module level, inside functions and under
``TYPE_CHECKING`` — because a lazy or type-only import is still a dependency a reader has to
hold in mind, and the next refactor turns it into a real one. Pure ``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
#: Installed name -> folder in the checkout (pyproject.toml's package-dir).
TREES = {"coldbrew.agent": ROOT / "agent", "coldbrew.fuse": ROOT / "fuse",
         "coldbrew.loader": ROOT / "loader", "coldbrew": ROOT / "coldbrew"}
#: The agent's top-level modules: shared by every subpackage, importing none of them.
SHARED = ("errors", "units", "metrics", "logs", "config")

CORE = {"agent.core", "agent.shared"}
DATA = CORE | {"agent.cache", "agent.origin"}
#: Layer -> the layers it may import (its own is always allowed). "coldbrew" is the top
#: package (``__version__``).
ALLOWED: dict[str, set[str]] = {
    "coldbrew": set(),
    "agent.shared": set(),
    "agent.core": {"agent.shared"},
    "agent.cache": CORE | {"agent.cache.verify"},
    "agent.cache.verify": CORE,
    "agent.origin": CORE,
    "agent.fetch": DATA,
    "agent.p2p": DATA | {"agent.fetch", "coldbrew"},
    # The client side of the control API is what runner pods import: the wire, the protocol
    # and the one integrity check, nothing that pulls in the daemon.
    "agent.control": CORE | {"agent.cache.verify"},
    "agent.control.server": DATA | {"agent.fetch", "agent.control", "coldbrew"},
    "fuse": DATA | {"agent.fetch"},
    "loader": DATA | {"agent.control"},
    "agent.devtools": DATA | {"agent.control", "loader", "coldbrew"},
    "agent.app": DATA | {"agent.fetch", "agent.p2p", "agent.control", "agent.control.server",
                         "agent.devtools", "fuse", "coldbrew"},
    "agent.main": {"agent.app"},
}
#: Single modules that are a layer of their own (finer than their package).
MODULE_LAYERS = {"coldbrew.agent.control.server": "agent.control.server",
                 "coldbrew.agent.control.leases": "agent.control.server",
                 "coldbrew.agent.cache.verify": "agent.cache.verify",
                 "coldbrew.agent.__main__": "agent.main"}


def layer_of(module: str) -> str | None:
    """The layer a ``coldbrew...`` module belongs to; None for anything outside coldbrew."""
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    parts = module.split(".")
    if parts[0] != "coldbrew":
        return None
    if len(parts) == 1:
        return "coldbrew"
    if parts[1] in ("fuse", "loader"):
        return parts[1]
    if parts[1] != "agent":
        return "coldbrew"
    if len(parts) == 2 or parts[2] in SHARED or parts[2] == "__init__":
        return "agent.shared"
    return "agent." + parts[2]


def may_import(importer: str, imported: str) -> bool:
    a, b = layer_of(importer), layer_of(imported)
    if b is None or a == b:
        return True
    assert a is not None, importer
    allowed = ALLOWED[a]
    # A layer that may import a package layer may import its finer module layers too
    # ("agent.cache" covers "agent.cache.verify"), except the control server, which is
    # the one module of its package that the client side must not reach.
    return b in allowed or (b != "agent.control.server" and b.rsplit(".", 1)[0] in allowed)


def is_module(name: str) -> bool:
    for prefix in sorted(TREES, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            rest = name[len(prefix):].lstrip(".").split(".") if name != prefix else []
            base = TREES[prefix].joinpath(*rest)
            return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return False


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every coldbrew module ``source`` (the text of ``module``) imports, with its line."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from ..core import eviction`` imports the module coldbrew.agent.core.eviction.
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names
                      if is_module(f"{target}.{a.name}")]
    return [(line, name) for line, name in found if name.split(".")[0] == "coldbrew"]


def product_modules() -> list[tuple[str, Path]]:
    out = []
    for prefix, folder in TREES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if prefix == "coldbrew" and parts:  # coldbrew/agent etc. are links to the trees
                continue
            out.append((".".join([prefix, *parts]), path))
    return out


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    return [f"{module}:{line} imports {name} ({layer_of(module)} -> {layer_of(name)})"
            for line, name in imports_of(source, module, is_package)
            if not may_import(module, name)]


def test_nothing_imports_upward():
    modules = product_modules()
    assert len(modules) > 50, "the walk found too few modules: is TREES right?"
    bad = [v for module, path in modules
           for v in violations(module, path.read_text(), path.name == "__init__.py")]
    assert not bad, "imports outside the allowed graph (docs/architecture.md):\n" + "\n".join(bad)


def test_every_layer_is_known():
    unknown = {layer_of(m) for m, _ in product_modules()} - set(ALLOWED)
    assert not unknown, f"modules in layers the rule does not name: {unknown}"


@pytest.mark.parametrize("module, source", [
    # the cache reaching up into the fetcher, only for a type hint
    ("coldbrew.agent.cache.store",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..fetch.fetcher import Fetcher\n"),
    # the agent importing the FUSE view lazily, inside a function
    ("coldbrew.agent.fetch.fetcher", "def f():\n    from ...fuse.view import View\n"),
    # the loader pulling in the daemon's control server
    ("coldbrew.loader.sources", "import coldbrew.agent.control.server\n"),
    # the client side of the control API importing the fetcher through `from package import`
    ("coldbrew.agent.control.client", "from ..fetch import fetcher\n"),
    # core doing what only the shared modules below it may
    ("coldbrew.agent.core.manifest", "from ..cache import blocks\n"),
])
def test_an_upward_import_is_caught(module, source):
    assert violations(module, source), f"{module} importing upward went unnoticed"


def test_allowed_imports_pass():
    assert not violations("coldbrew.agent.fetch.fetcher", "from ..cache.store import ChunkStore\n")
    assert not violations("coldbrew.loader.api", "from coldbrew.agent.control.client import AgentClient\n")


def test_loader_imports_without_the_daemon_side():
    """A runner pod has torch and the loader, not libtorrent, mfusepy or aiohttp's server."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        BLOCKED = ("libtorrent", "mfusepy", "aiohttp.web")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith(BLOCKED):
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import coldbrew.loader, coldbrew.loader.api, coldbrew.loader.sources, coldbrew.loader.engine
        import coldbrew.agent.control.client
        print(sorted(m for m in sys.modules if m.startswith(BLOCKED)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
