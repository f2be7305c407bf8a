"""coldbrew.loader: stream safetensors files into CPU or GPU memory as the bytes arrive.

    from coldbrew.loader import load_file, load_dir, iter_tensors
    sd = load_file("s3://bucket/llama/model-00001-of-00004.safetensors", device="cuda:0")
    sd = load_dir("s3://bucket/llama/", device="cuda:0")
    for name, tensor in iter_tensors("s3://bucket/llama/", device="cuda:0"): ...

Through the node agent when one answers on its socket, else straight from the
origin with a write-through cache on local disk. Imports neither libtorrent nor
the FUSE binding; torch only when the API is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coldbrew.loader.api import StateDict, iter_tensors, load_dir, load_file
    from coldbrew.loader.runtime import wait_writeback

__all__ = ["StateDict", "iter_tensors", "load_dir", "load_file", "wait_writeback"]
_HOMES = {"StateDict": "api", "iter_tensors": "api", "load_dir": "api", "load_file": "api",
          "wait_writeback": "runtime"}


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): the pure modules (header, plan) import without torch.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"coldbrew.loader.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'coldbrew.loader' has no attribute {name!r}")
