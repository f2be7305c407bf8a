"""Generated safetensors files for the loader's tests, and the comparison they use.

:func:`make_file` writes the bytes by hand rather than through
``safetensors.torch.save``, to reach what a writer may legally produce but the
library never does: tensors at odd offsets (no alignment padding), data order
unlike name order, every dtype torch has (fp8, fp4, bool, complex, unsigned),
0-d and empty tensors, unicode names, metadata or none, trailing header
whitespace. :func:`assert_same` is the contract: equal names, dtypes, shapes
and bytes to what ``safetensors.torch.load_file`` returns. The tests at the end
check the generator against safetensors itself.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from coldbrew.loader.header import DTYPES, parse_prefix

#: dtypes torch can hold (the F6 ones it cannot are left to the header tests).
TORCH_DTYPES = sorted(d for d, (_, name) in DTYPES.items() if name and hasattr(torch, name))
NAMES = ["model.embed_tokens.weight", "layers.0.attn.q_proj.weight", "ünïcödé.weight",
         "层.0.权重", "emoji.🙂.bias", "a", "b.c", "x" * 200, "with space", "lm_head.weight"]


def _shape(rng: random.Random, dtype: str, big: bool) -> list[int]:
    kind = rng.random()
    if kind < 0.1:
        shape: list[int] = []  # 0-d
    elif kind < 0.2:
        shape = [rng.randint(0, 3), 0, rng.randint(1, 3)]  # empty
    elif big and kind < 0.5:
        shape = [rng.randint(50, 300), rng.randint(100, 700)]
    else:
        shape = [rng.randint(1, 40) for _ in range(rng.randint(1, 3))]
    if dtype == "F4":  # two per byte: torch needs an even last dimension
        if not shape:
            shape = [2]
        elif shape[-1] % 2:
            shape[-1] *= 2
    return shape


def _nbytes(dtype: str, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * DTYPES[dtype][0] // 8


def make_file(seed: int, *, count: int | None = None, big: bool = False,
              names: list[str] | None = None) -> bytes:
    """A valid safetensors file from ``seed`` (deterministic)."""
    rng = random.Random(seed)
    count = rng.randint(0, 9) if count is None else count
    pool = list(names) if names else [*NAMES, *(f"t{seed}.{i}" for i in range(count))]
    chosen = rng.sample(pool, count) if count <= len(pool) else [f"t{i}" for i in range(count)]
    specs = []
    for name in chosen:
        dtype = rng.choice(TORCH_DTYPES)
        shape = _shape(rng, dtype, big)
        specs.append((name, dtype, shape, _nbytes(dtype, shape)))
    rng.shuffle(specs)  # data order unlike name order
    header: dict[str, Any] = {}
    if rng.random() < 0.6:
        header["__metadata__"] = {"format": "pt", "seed": str(seed), "ключ": "значение"}
    offset = 0
    for name, dtype, shape, n in specs:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, ensure_ascii=rng.random() < 0.5).encode()
    text += b" " * rng.randint(0, 7)  # odd or padded alignment of the data
    data = rng.randbytes(offset)
    return struct.pack("<Q", len(text)) + text + data


def write_shards(root: Path, seed: int, shards: int, *, index: bool, big: bool = True
                 ) -> dict[str, Path]:
    """A sharded model dir: ``shards`` files (+ ``model.safetensors.index.json``)."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    weight_map: dict[str, str] = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        names = [f"layers.{i}.{j}.weight" for j in range(6)] + [f"layers.{i}.ünï.{j}" for j in range(2)]
        data = make_file(seed * 100 + i, count=len(names), big=big, names=names)
        (root / fname).write_bytes(data)
        files[fname] = root / fname
        for name in safetensors.torch.load_file(str(root / fname)):
            weight_map[name] = fname
    if index:
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return files


def tensor_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_same(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], where: str = "") -> None:
    assert set(got) == set(ref), f"{where}: names differ: {set(got) ^ set(ref)}"
    for name, want in ref.items():
        t = got[name]
        assert t.dtype == want.dtype, f"{where}: {name}: dtype {t.dtype} != {want.dtype}"
        assert t.shape == want.shape, f"{where}: {name}: shape {t.shape} != {want.shape}"
        assert tensor_bytes(t) == tensor_bytes(want), f"{where}: {name}: bytes differ"


def cast_like_the_loader(ref: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What ``dtype=`` should give: f16/bf16/f32/f64 cast, everything else (fp8, ints) kept."""
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return {n: t.to(dtype) if t.dtype in floats else t for n, t in ref.items()}


def reference(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    ref = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        return ref, f.metadata()


# --- the generator against safetensors ------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_generated_files_are_valid_safetensors(seed, tmp_path):
    data = make_file(seed, big=seed % 4 == 0)
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    ref, _ = reference(path)
    assert set(ref) == {t.name for t in parse_prefix(data, file_size=len(data), source="f").tensors}


def test_generator_reaches_the_corners(tmp_path):
    seen_dtypes, zero_d, empty, odd = set(), 0, 0, 0
    path = tmp_path / "f.safetensors"
    for seed in range(200):
        data = make_file(seed)
        n = struct.unpack("<Q", data[:8])[0]
        odd += (8 + n) % 8 != 0
        path.write_bytes(data)
        for t in safetensors.torch.load_file(str(path)).values():
            seen_dtypes.add(t.dtype)
            zero_d += t.dim() == 0
            empty += t.numel() == 0
    assert len(seen_dtypes) == len(TORCH_DTYPES)
    assert zero_d and empty and odd
