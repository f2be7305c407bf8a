"""Parse and validate a safetensors header: pure code, untrusted input, no I/O.

A safetensors file is an 8-byte little-endian length ``N``, then ``N`` bytes of
UTF-8 JSON, then the tensor bytes. The JSON maps each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
first byte after the header) and may hold ``"__metadata__": {str: str}``.

The loader reads this header before anything else and plans every allocation
and every ranged read from it, so it is checked here as hostile input: nothing
in it is trusted until it passes, and every rejection is a :class:`HeaderError`
naming the file and the tensor. The goal is to accept exactly the files that
``safetensors`` (the version installed beside us, 0.8) accepts, checked
differentially in ``tests/test_loader_header.py``. Deliberate differences, all
stricter, all for shapes no writer produces:

* A duplicate key anywhere in the JSON is rejected. safetensors keeps the last
  duplicate tensor name or ``__metadata__`` key and ignores duplicates inside
  unknown fields, so what it loads depends on which copy came last.
* A tensor entry must be a JSON object and its dtype a JSON string. serde (the
  Rust decoder behind safetensors) also takes the positional form
  ``["F32", [2], [0, 8]]`` and the enum form ``{"F32": null}``.

Dimensions up to 2**64-1 and dtypes torch cannot represent (``F6_*``) pass
here, as in safetensors: they are a torch limit, checked by
:func:`torch_dtype_and_shape` where the loader builds tensors. One corner is
left open: a number in an unknown field within a rounding step of the largest
f64 may be judged in range by one parser and out of range by the other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from coldbrew.agent.errors import HeaderError

if TYPE_CHECKING:  # torch stays out of this module at run time
    import torch

HEADER_PREFIX_BYTES = 8
#: safetensors' own cap (``MAX_HEADER_SIZE``): 100 MB in decimal, not MiB, so
#: we refuse exactly the headers it refuses.
HEADER_MAX_BYTES = 100_000_000

_U64_MAX = 2**64 - 1
_I64_MAX = 2**63 - 1
#: serde_json refuses JSON nested deeper than this many arrays/objects.
_JSON_MAX_DEPTH = 127
#: A tensor entry sits at depth 2 (top-level object, entry object).
_ENTRY_DEPTH = 2
_METADATA_KEY = "__metadata__"
_REQUIRED_FIELDS = ("dtype", "shape", "data_offsets")


#: safetensors dtype -> (bits per element, name of the torch dtype or None).
#: F4 is stored two per byte; torch holds it as ``float4_e2m1fn_x2``, one torch
#: element per byte (see :func:`torch_dtype_and_shape`). F6 has no torch dtype.
DTYPES: Mapping[str, tuple[int, str | None]] = MappingProxyType(
    {
        "BOOL": (8, "bool"),
        "F4": (4, "float4_e2m1fn_x2"),
        "F6_E2M3": (6, None),
        "F6_E3M2": (6, None),
        "U8": (8, "uint8"),
        "I8": (8, "int8"),
        "F8_E5M2": (8, "float8_e5m2"),
        "F8_E4M3": (8, "float8_e4m3fn"),
        "F8_E8M0": (8, "float8_e8m0fnu"),
        "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"),
        "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
        "I16": (16, "int16"),
        "U16": (16, "uint16"),
        "F16": (16, "float16"),
        "BF16": (16, "bfloat16"),
        "I32": (32, "int32"),
        "U32": (32, "uint32"),
        "F32": (32, "float32"),
        "C64": (64, "complex64"),
        "F64": (64, "float64"),
        "I64": (64, "int64"),
        "U64": (64, "uint64"),
    }
)
#: Sub-byte dtypes torch packs several to one element: safetensors' last
#: dimension is divided by this to get torch's.
_TORCH_PACKING = MappingProxyType({"F4": 2})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header. ``tensors`` are in file order (by data offset).

    ``header_size`` counts the 8-byte prefix, so it equals ``data_start``, the
    file offset of the first tensor byte; ``data_end`` is one past the last.
    """

    source: str
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] | None = field(hash=False)
    header_size: int
    data_start: int
    data_end: int

    @cached_property
    def by_name(self) -> Mapping[str, TensorEntry]:
        return MappingProxyType({t.name: t for t in self.tensors})


def header_length(prefix: bytes, *, source: str = "<bytes>") -> int:
    """The JSON length ``N`` from a file's first 8 bytes (more are ignored)."""
    if len(prefix) < HEADER_PREFIX_BYTES:
        raise HeaderError(
            f"{source}: not a safetensors file: {len(prefix)} bytes, "
            f"need at least {HEADER_PREFIX_BYTES} for the header length"
        )
    n = int.from_bytes(prefix[:HEADER_PREFIX_BYTES], "little")
    if n > HEADER_MAX_BYTES:
        raise HeaderError(
            f"{source}: header length {n} exceeds the {HEADER_MAX_BYTES}-byte limit "
            "(safetensors' own); the file is corrupt or not safetensors"
        )
    return n


def parse_prefix(data: bytes, *, file_size: int | None, source: str) -> SafetensorsHeader:
    """Parse a header from ``data``, the start of a file (at least ``8 + N`` bytes)."""
    n = header_length(data, source=source)
    stop = HEADER_PREFIX_BYTES + n
    if len(data) < stop:
        raise HeaderError(
            f"{source}: header claims {n} bytes but only "
            f"{len(data) - HEADER_PREFIX_BYTES} follow the length prefix"
        )
    return parse_header(data[HEADER_PREFIX_BYTES:stop], file_size=file_size, source=source)


def parse_header(
    header_json: bytes, *, file_size: int | None, source: str
) -> SafetensorsHeader:
    """Validate the ``N`` JSON bytes of a header; ``file_size`` when known.

    Without ``file_size`` the offsets cannot be checked against the file, so
    ``data_end`` is only what the header claims: pass it whenever you can.
    """
    header_size = HEADER_PREFIX_BYTES + len(header_json)
    if len(header_json) > HEADER_MAX_BYTES:
        raise HeaderError(f"{source}: header of {len(header_json)} bytes exceeds the limit")
    if file_size is not None and header_size > file_size:
        raise HeaderError(
            f"{source}: header ends at byte {header_size} but the file has {file_size}"
        )
    doc = _decode_json(header_json, source)
    if type(doc) is not dict:
        raise HeaderError(f"{source}: header JSON is {_json_type(doc)}, expected an object")
    metadata = _parse_metadata(doc.pop(_METADATA_KEY, None), source)
    tensors = sorted(
        (_parse_entry(name, value, header_size, source) for name, value in doc.items()),
        # Ties are only possible between empty tensors; the name makes the order stable.
        key=lambda t: (t.begin, t.end, t.name),
    )
    data_end = _check_layout(tensors, header_size, source)
    if file_size is not None and data_end != file_size:
        raise HeaderError(
            f"{source}: tensors end at byte {data_end} but the file has {file_size} "
            "(safetensors requires the data to fill the file exactly)"
        )
    return SafetensorsHeader(
        source=source,
        tensors=tuple(tensors),
        metadata=metadata,
        header_size=header_size,
        data_start=header_size,
        data_end=data_end,
    )


def torch_dtype_and_shape(
    entry: TensorEntry, *, source: str
) -> tuple[torch.dtype, tuple[int, ...]]:
    """The torch dtype and shape ``safetensors.torch.load_file`` gives ``entry``.

    Imports torch lazily. Raises :class:`HeaderError` where load_file fails
    too: F6 dtypes, F4 with an odd last dimension, dimensions past int64.
    """
    import torch

    torch_name = DTYPES[entry.dtype][1]
    dtype = getattr(torch, torch_name, None) if torch_name else None
    if dtype is None:
        raise _tensor_error(
            source, entry.name, f"dtype {entry.dtype} has no torch equivalent in torch {torch.__version__}"
        )
    shape = _torch_shape(entry, source)
    return dtype, shape


def _torch_shape(entry: TensorEntry, source: str) -> tuple[int, ...]:
    shape = entry.shape
    pack = _TORCH_PACKING.get(entry.dtype, 1)
    if pack > 1:
        if not shape or shape[-1] % pack:
            raise _tensor_error(
                source, entry.name,
                f"{entry.dtype} needs a last dimension divisible by {pack} in torch, got {list(shape)}",
            )
        shape = (*shape[:-1], shape[-1] // pack)
    if any(d > _I64_MAX for d in shape):
        raise _tensor_error(source, entry.name, f"shape {list(shape)} does not fit torch's int64 sizes")
    return shape


# --- JSON decoding -------------------------------------------------------------
# Python's json module is laxer than serde_json in a few ways (NaN, lone
# surrogates, huge numbers, duplicate keys, unbounded nesting); the hooks below
# close each gap so the two agree on what a valid header is.


#: A lone surrogate can only come from a \uD800-\uDFFF escape (the text is
#: valid UTF-8), so headers without one skip the per-string check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _Rejected(ValueError):
    """Raised inside json hooks; turned into a HeaderError with the source."""


def _decode_json(header_json: bytes, source: str) -> Any:
    try:
        text = str(header_json, "utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"{source}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    # Strings in arrays are checked by _check_ignored: only unknown fields can hold them.
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    try:
        return json.loads(
            text,
            object_pairs_hook=_object_without_surrogates if surrogates else _object_without_duplicates,
            parse_int=_parse_json_int,
            parse_float=_parse_json_float,
            parse_constant=_reject_json_constant,
        )
    except _Rejected as e:
        raise HeaderError(f"{source}: invalid header JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise HeaderError(f"{source}: header is not valid JSON: {e}") from None
    except RecursionError:
        raise HeaderError(f"{source}: header JSON is nested too deeply") from None


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Rejected(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def _object_without_surrogates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    for key, value in pairs:
        _check_string(key)
        if type(value) is str:
            _check_string(value)
    return _object_without_duplicates(pairs)


def _check_string(s: str) -> None:
    # Python decodes "\ud800" to a lone surrogate; serde_json (and UTF-8) refuse it.
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _Rejected(f"string {s!r} holds a lone UTF-16 surrogate") from None


def _parse_json_int(text: str) -> int | float:
    # serde_json reads an integer outside u64/i64 as a float (so never as a
    # size), fails on one too big for f64, and reads "-0" as the float -0.0.
    if len(text) > 20:  # past u64 for sure; also spares int() its digit limit
        return _parse_json_float(text)
    value = int(text)
    if value > _U64_MAX or value < -(2**63):
        return _parse_json_float(text)
    if value == 0 and text.startswith("-"):
        return -0.0
    return value


def _parse_json_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Rejected(f"number out of range: {text[:40]}")
    return value


def _reject_json_constant(name: str) -> Any:
    raise _Rejected(f"{name} is not JSON")


def _json_type(value: Any) -> str:
    """What a JSON value is, for messages: "an array", "null"..."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _check_ignored(value: Any, depth: int, where: str) -> None:
    """An unknown field is ignored, but must still be JSON serde accepts.

    Iterative on purpose: the depth limit has to be checked before Python's own
    recursion limit could ever matter.
    """
    stack = [(value, depth)]
    while stack:
        item, d = stack.pop()
        if type(item) is str:
            _check_string(item)
            continue
        if type(item) not in (dict, list):
            continue
        if d + 1 > _JSON_MAX_DEPTH:
            raise _Rejected(f"{where}: nested more than {_JSON_MAX_DEPTH} levels")
        children = item.values() if type(item) is dict else item
        stack.extend((child, d + 1) for child in children)


# --- validation ----------------------------------------------------------------


def _tensor_error(source: str, name: str, problem: str) -> HeaderError:
    return HeaderError(f"{source}: tensor {name!r}: {problem}")


def _parse_metadata(value: Any, source: str) -> dict[str, str] | None:
    if value is None:  # absent, or an explicit null: safetensors allows both
        return None
    if type(value) is not dict:
        raise HeaderError(f"{source}: __metadata__ is {_json_type(value)}, expected an object")
    for key, item in value.items():
        if type(item) is not str:
            raise HeaderError(
                f"{source}: __metadata__[{key!r}] is {_json_type(item)}, expected a string"
            )
    return value


def _parse_entry(name: str, value: Any, header_size: int, source: str) -> TensorEntry:
    if type(value) is not dict:
        raise _tensor_error(source, name, f"entry is {_json_type(value)}, expected an object")
    missing = [f for f in _REQUIRED_FIELDS if f not in value]
    if missing:
        raise _tensor_error(source, name, f"missing {', '.join(missing)}")
    for key, extra in value.items():
        if key not in _REQUIRED_FIELDS:
            try:
                _check_ignored(extra, _ENTRY_DEPTH, f"field {key!r}")
            except _Rejected as e:
                raise _tensor_error(source, name, str(e)) from None
    dtype = _parse_dtype(value["dtype"], name, source)
    shape = _parse_u64_list(value["shape"], "shape", name, source)
    offsets = _parse_u64_list(value["data_offsets"], "data_offsets", name, source)
    if len(offsets) != 2:
        raise _tensor_error(source, name, f"data_offsets has {len(offsets)} items, expected 2")
    begin, end = offsets
    if end < begin:
        raise _tensor_error(source, name, f"data_offsets [{begin}, {end}] end before they begin")
    expected = _byte_size(dtype, shape, name, source)
    if end - begin != expected:
        raise _tensor_error(
            source, name,
            f"data_offsets [{begin}, {end}] hold {end - begin} bytes but "
            f"{dtype} {list(shape)} needs {expected}",
        )
    return TensorEntry(name, dtype, shape, header_size + begin, header_size + end)


def _parse_dtype(value: Any, name: str, source: str) -> str:
    if type(value) is not str:
        raise _tensor_error(source, name, f"dtype is {_json_type(value)}, expected a string")
    if value not in DTYPES:
        raise _tensor_error(source, name, f"unknown dtype {value!r}")
    return value


def _parse_u64_list(value: Any, what: str, name: str, source: str) -> tuple[int, ...]:
    if type(value) is not list:
        raise _tensor_error(source, name, f"{what} is {_json_type(value)}, expected an array")
    for item in value:
        # type() not isinstance(): JSON true/false are Python bools, which are ints.
        if type(item) is not int or not 0 <= item <= _U64_MAX:
            raise _tensor_error(
                source, name, f"{what} holds {item!r}, expected integers in [0, 2**64)"
            )
    return tuple(value)


def _byte_size(dtype: str, shape: tuple[int, ...], name: str, source: str) -> int:
    """Bytes ``shape`` of ``dtype`` occupy, with safetensors' u64 overflow rule.

    safetensors multiplies the dimensions left to right and fails as soon as a
    partial product overflows u64 (so [2**63, 4, 0] fails but [0, 2**63, 4]
    passes), then multiplies by the bits per element.
    """
    count = 1
    for dim in shape:
        count *= dim
        if count > _U64_MAX:
            raise _tensor_error(source, name, f"shape {list(shape)} overflows 64 bits")
    bits = count * DTYPES[dtype][0]
    if bits > _U64_MAX:
        raise _tensor_error(source, name, f"{dtype} {list(shape)} overflows 64 bits")
    if bits % 8:
        raise _tensor_error(
            source, name, f"{count} elements of {dtype} do not fill a whole number of bytes"
        )
    return bits // 8


def _check_layout(tensors: list[TensorEntry], header_size: int, source: str) -> int:
    """Tensors must tile the data region from its first byte, without gaps or overlaps.

    Returns the file offset where the data ends. Messages use data offsets,
    the numbers a person finds in the header.
    """
    cursor = 0
    previous = None
    for t in tensors:
        begin, end = t.begin - header_size, t.end - header_size
        if begin < cursor:
            raise _tensor_error(
                source, t.name,
                f"data_offsets [{begin}, {end}] overlap tensor {previous!r}, which ends at {cursor}",
            )
        if begin > cursor:
            raise _tensor_error(
                source, t.name,
                f"data_offsets start at {begin}, leaving data bytes [{cursor}, {begin}) "
                "unclaimed (safetensors requires the tensors to cover the data without holes)",
            )
        cursor, previous = end, t.name
    return header_size + cursor
