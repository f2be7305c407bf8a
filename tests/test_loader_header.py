"""coldbrew.loader.header against the real safetensors library.

The contract: we accept exactly the files safetensors accepts and read the
same tensors from them, except the documented differences (duplicate keys,
serde's positional entries and enum-form dtypes), which we reject. Three kinds
of test hold it: round trips of files written by ``safetensors.torch.save``,
one case per rejection rule, and a hypothesis fuzzer that mutates headers and
compares both parsers on every result.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save

from coldbrew.agent.errors import ColdbrewError
from coldbrew.loader.header import (
    DTYPES,
    HEADER_MAX_BYTES,
    HEADER_PREFIX_BYTES,
    HeaderError,
    SafetensorsHeader,
    header_length,
    parse_header,
    parse_prefix,
    torch_dtype_and_shape,
)

SOURCE = "s3://bucket/model.safetensors"


# --- the two parsers, side by side ------------------------------------------------


def ours(buf: bytes) -> SafetensorsHeader:
    return parse_prefix(buf, file_size=len(buf), source=SOURCE)


@dataclass(frozen=True)
class Theirs:
    """What safetensors reads from a buffer: tensors, metadata, offset order."""

    tensors: dict[str, tuple[str, tuple[int, ...], bytes]]
    metadata: dict[str, str] | None
    offset_order: list[str]


def theirs(buf: bytes, path: Path) -> Theirs:
    """Raises safetensors' error if it rejects ``buf``."""
    path.write_bytes(buf)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata, order = f.metadata(), list(f.offset_keys())
    views = safetensors.deserialize(buf)  # the same parser; gives the bytes too
    tensors = {n: (v["dtype"], tuple(v["shape"]), bytes(v["data"])) for n, v in views}
    return Theirs(tensors, metadata, order)


def assert_same(header: SafetensorsHeader, buf: bytes, ref: Theirs) -> None:
    got = {t.name: (t.dtype, t.shape, buf[t.begin : t.end]) for t in header.tensors}
    assert got == ref.tensors
    assert header.metadata == ref.metadata
    # Empty tensors may tie on offsets, where safetensors' order is a hash order.
    ours_nonempty = [t.name for t in header.tensors if t.nbytes]
    assert ours_nonempty == [n for n in ref.offset_order if ref.tensors[n][2]]
    assert header.data_end == len(buf)
    assert header.data_start == header.header_size == HEADER_PREFIX_BYTES + header_length(buf)


def accepts(buf: bytes, path: Path) -> bool:
    try:
        theirs(buf, path)
    except safetensors.SafetensorError:
        return False
    return True


def rejects_ours(buf: bytes) -> HeaderError:
    with pytest.raises(HeaderError) as info:
        ours(buf)
    return info.value


def frame(header: Any, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    return tmp_path / "f.safetensors"


@pytest.fixture(scope="module")
def module_scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("header") / "f.safetensors"


# --- round trips of files written by safetensors itself ---------------------------

# Every dtype torch can hand to safetensors.torch.save.
TORCH_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32,
    torch.uint32, torch.int64, torch.uint64, torch.float16, torch.bfloat16,
    torch.float32, torch.float64, torch.complex64, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu, torch.float4_e2m1fn_x2,
]
NAMES = st.text(max_size=12).filter(lambda s: s != "__metadata__")


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    count = 1
    for d in shape:
        count *= d
    nbytes = count * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:  # frombuffer refuses empty buffers
        return torch.empty(shape, dtype=dtype)
    raw = random.Random(seed).randbytes(nbytes)
    if dtype is torch.bool:  # only 0 and 1 are bools
        raw = bytes(b & 1 for b in raw)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


TensorSpecs = dict[str, tuple[str, tuple[int, ...]]]
# Specs, not tensors, so hypothesis can print a failing case (float4 has no repr).
TENSOR_SPECS = st.dictionaries(
    NAMES,
    st.tuples(
        st.sampled_from([str(d).removeprefix("torch.") for d in TORCH_DTYPES]),
        st.lists(st.integers(0, 4), max_size=3).map(tuple),  # () is 0-d
    ),
    max_size=6,
).filter(  # safetensors cannot save a 0-d float4 (half a byte in its terms)
    lambda specs: ("float4_e2m1fn_x2", ()) not in specs.values()
)


def build(specs: TensorSpecs) -> dict[str, torch.Tensor]:
    return {
        name: random_tensor(getattr(torch, dtype), shape, seed=i)
        for i, (name, (dtype, shape)) in enumerate(specs.items())
    }


@settings(max_examples=60, deadline=None, database=None)
@given(specs=TENSOR_SPECS, metadata=st.none() | st.dictionaries(NAMES, st.text(max_size=8), max_size=3))
def test_agrees_with_safetensors_on_files_it_writes(
    specs: TensorSpecs, metadata: dict[str, str] | None, module_scratch: Path
) -> None:
    if not specs and metadata == {}:  # see test_safetensors_own_broken_output
        return
    buf = save(build(specs), metadata=metadata)
    header = ours(buf)
    assert_same(header, buf, theirs(buf, module_scratch))
    # What the loader will build equals what load_file builds.
    loaded = load_file(str(module_scratch))
    for t in header.tensors:
        dtype, shape = torch_dtype_and_shape(t, source=SOURCE)
        assert (dtype, shape) == (loaded[t.name].dtype, tuple(loaded[t.name].shape))
        assert t.nbytes == loaded[t.name].numel() * loaded[t.name].element_size()


def test_safetensors_own_broken_output(scratch: Path) -> None:
    # safetensors 0.8 writes no tensors plus empty metadata as invalid JSON
    # and cannot read it back; we refuse it too.
    buf = save({}, metadata={})
    assert buf[8:].startswith(b'{},"__metadata__"')
    assert not accepts(buf, scratch)
    rejects_ours(buf)


def test_every_safetensors_dtype_is_in_the_table(scratch: Path) -> None:
    # serde lists the dtypes it knows when it meets one it does not.
    buf = frame({"a": entry("NOT_A_DTYPE", [0], 0, 0)})
    with pytest.raises(safetensors.SafetensorError) as info:
        theirs(buf, scratch)
    known = set(str(info.value).split("expected one of ")[1].split(" at line")[0].replace("`", "").split(", "))
    assert known == set(DTYPES)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_each_dtype_has_the_size_safetensors_gives_it(dtype: str, scratch: Path) -> None:
    bits = DTYPES[dtype][0]
    count = 8  # a whole number of bytes for every width
    buf = frame({"t": entry(dtype, [2, count // 2], 0, count * bits // 8)}, bytes(count * bits // 8))
    assert_same(ours(buf), buf, theirs(buf, scratch))


def test_a_file_with_no_tensors(scratch: Path) -> None:
    buf = frame(b"{}      ")
    header = ours(buf)
    assert header.tensors == () and header.metadata is None
    assert header.data_start == header.data_end == 16
    assert_same(header, buf, theirs(buf, scratch))


def test_empty_tensors_tie_on_offsets_and_sort_by_name(scratch: Path) -> None:
    buf = frame(
        {"b": entry("F32", [0], 4, 4), "z": entry("U8", [4], 0, 4), "a": entry("F32", [0, 3], 4, 4),
         "m": entry("U8", [0], 0, 0)},
        bytes(4),
    )
    header = ours(buf)
    assert [t.name for t in header.tensors] == ["m", "z", "a", "b"]
    assert_same(header, buf, theirs(buf, scratch))
    assert header.by_name["z"].begin == header.data_start


def test_header_length_reads_the_little_endian_prefix() -> None:
    assert header_length(struct.pack("<Q", 1234) + b"ignored") == 1234
    assert header_length(struct.pack("<Q", HEADER_MAX_BYTES)) == HEADER_MAX_BYTES


@pytest.mark.parametrize("prefix", [b"", b"\x01", b"1234567"])
def test_header_length_rejects_short_input(prefix: bytes) -> None:
    with pytest.raises(HeaderError, match=r"model\.safetensors.*need at least 8"):
        header_length(prefix, source=SOURCE)


@pytest.mark.parametrize("n", [HEADER_MAX_BYTES + 1, 2**63, 2**64 - 1])
def test_header_length_rejects_oversized_headers(n: int, scratch: Path) -> None:
    buf = struct.pack("<Q", n) + b"{}"
    with pytest.raises(HeaderError, match="exceeds"):
        header_length(buf, source=SOURCE)
    assert not accepts(buf, scratch)


def test_header_error_joins_the_hierarchy() -> None:
    assert issubclass(HeaderError, ColdbrewError) and issubclass(HeaderError, ValueError)


def test_header_module_does_not_import_torch() -> None:
    code = "import sys, coldbrew.loader.header, coldbrew.loader.plan; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- one case per rejection rule ----------------------------------------------------

U8 = entry("U8", [1], 0, 1)
LONG = "9" * 300  # overflows u64 and i64, still a finite f64


def w(fields: bytes, data: bytes = b"\0") -> bytes:
    """A file with one tensor "w" written from raw JSON ``fields``."""
    return frame(b'{"w": {' + fields + b"}}", data)


def w_extra(value: bytes) -> bytes:
    """A valid one-byte tensor "w" with an unknown field "x" holding raw JSON ``value``."""
    return w(b'"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": ' + value)


def one(dtype: Any, shape: Any, begin: Any, end: Any, data: bytes = b"") -> bytes:
    """A file with one tensor "w" from Python values."""
    return frame({"w": entry(dtype, shape, begin, end)}, data)


# (label, file bytes, text the message must hold). safetensors rejects all of them.
REJECTED = [
    ("too short", b"\x02\x00\x00", "need at least 8"),
    ("header past eof", struct.pack("<Q", 10) + b"{}", "claims 10 bytes"),
    ("empty header", frame(b""), "not valid JSON"),
    ("not utf-8", frame(b'{"\xff": 1}'), "not valid UTF-8"),
    ("bom", frame(b"\xef\xbb\xbf{}"), "not valid JSON"),
    ("bad json", frame(b'{"a": '), "not valid JSON"),
    ("trailing nul", frame(b"{}\x00"), "not valid JSON"),
    ("trailing formfeed", frame(b"{}\x0c"), "not valid JSON"),
    ("array", frame([]), "is an array, expected an object"),
    ("number", frame(b"1"), "is a number, expected an object"),
    ("NaN", frame(b'{"__metadata__": {"a": NaN}}'), "NaN"),
    ("lone surrogate name", frame(b'{"\\ud800": {}}'), "surrogate"),
    ("reversed surrogates", frame(b'{"__metadata__": {"a": "\\ude00\\ud83d"}}'), "surrogate"),
    ("control char", frame(b'{"a\x01": {}}'), "not valid JSON"),
    ("leading zero", w(b'"dtype": "U8", "shape": [01], "data_offsets": [0, 1]'), "not valid JSON"),
    ("metadata string", frame({"__metadata__": "x"}), "__metadata__ is a string"),
    ("metadata array", frame({"__metadata__": []}), "__metadata__ is an array"),
    ("metadata int value", frame({"__metadata__": {"k": 1}}), "__metadata__['k'] is a number"),
    ("metadata nested", frame({"__metadata__": {"k": {"a": "b"}}}), "expected a string"),
    ("entry null", frame({"w": None}), "'w': entry is null"),
    ("entry int", frame({"w": 1}), "'w': entry is a number"),
    ("missing shape", w(b'"dtype": "U8", "data_offsets": [0, 1]'), "'w': missing shape"),
    ("unknown dtype", one("C128", [1], 0, 16, bytes(16)), "'w': unknown dtype 'C128'"),
    ("lowercase dtype", one("u8", [1], 0, 1, b"\0"), "unknown dtype"),
    ("dtype int", one(1, [1], 0, 1, b"\0"), "dtype is a number"),
    ("shape string", one("U8", "1", 0, 1, b"\0"), "shape is a string"),
    ("shape int", w(b'"dtype": "U8", "shape": 1, "data_offsets": [0, 1]'), "shape is a number"),
    ("negative dim", one("U8", [-1], 0, 1, b"\0"), "'w': shape holds -1"),
    ("minus zero dim", w(b'"dtype": "U8", "shape": [-0], "data_offsets": [0, 0]', b""), "shape holds -0.0"),
    ("float dim", one("U8", [1.0], 0, 1, b"\0"), "shape holds 1.0"),
    ("exponent dim", w(b'"dtype": "U8", "shape": [1e0], "data_offsets": [0, 1]'), "shape holds 1.0"),
    ("bool dim", one("U8", [True], 0, 1, b"\0"), "shape holds True"),
    ("null dim", one("U8", [None], 0, 1, b"\0"), "shape holds None"),
    ("nested dim", one("U8", [[1]], 0, 1, b"\0"), "shape holds [1]"),
    ("dim 2**64", one("U8", [0, 2**64], 0, 0), "shape holds 1.8"),
    ("dim of 5000 digits", w(b'"dtype": "U8", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 0]', b""),
     "out of range"),
    ("one offset", w(b'"dtype": "U8", "shape": [1], "data_offsets": [0]'), "has 1 items"),
    ("three offsets", w(b'"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 1]'), "has 3 items"),
    ("offsets object", w(b'"dtype": "U8", "shape": [1], "data_offsets": {"0": 0}'), "data_offsets is an object"),
    ("negative offset", one("U8", [0], -1, -1), "data_offsets holds -1"),
    ("float offset", one("U8", [1], 0, 1.0, b"\0"), "data_offsets holds 1.0"),
    ("end before begin", one("U8", [0], 1, 0, b"\0"), "'w': data_offsets [1, 0] end before"),
    ("too few bytes for shape", one("F32", [2], 0, 4, bytes(4)),
     "'w': data_offsets [0, 4] hold 4 bytes but F32 [2] needs 8"),
    ("0-d with no bytes", one("F32", [], 0, 0), "needs 4"),
    ("half a byte of F4", one("F4", [3], 0, 2, bytes(2)), "whole number of bytes"),
    ("F6 misaligned", one("F6_E2M3", [2], 0, 2, bytes(2)), "whole number of bytes"),
    ("F6 wrong size", one("F6_E3M2", [8], 0, 8, bytes(8)), "needs 6"),
    ("dims overflow u64", one("U8", [2**32, 2**32], 0, 0), "'w': shape [4294967296, 4294967296] overflows"),
    ("overflow before a zero", one("U8", [2**63, 4, 0], 0, 0), "overflows 64 bits"),
    ("bits overflow u64", one("U8", [2**62], 0, 2**62), "U8 [4611686018427387904] overflows"),
    ("F64 overflow", one("F64", [2**61], 0, 2**64 - 8), "overflows"),
    ("gap at start", one("U8", [1], 1, 2, bytes(2)),
     "'w': data_offsets start at 1, leaving data bytes [0, 1) unclaimed"),
    ("gap between", frame({"a": U8, "w": entry("U8", [1], 2, 3)}, bytes(3)), "'w': data_offsets start at 2"),
    ("overlap", frame({"a": entry("U8", [2], 0, 2), "w": entry("U8", [2], 1, 3)}, bytes(3)),
     "'w': data_offsets [1, 3] overlap tensor 'a', which ends at 2"),
    ("same offsets", frame({"a": U8, "w": U8}, b"\0"), "overlap"),
    ("empty tensor inside another", frame({"a": entry("U8", [2], 0, 2), "w": entry("U8", [0], 1, 1)}, bytes(2)), "'w'"),
    ("empty tensor past the end", frame({"a": U8, "w": entry("U8", [0], 2, 2)}, b"\0"), "'w': data_offsets start at 2"),
    ("trailing bytes", frame({"a": U8}, bytes(2)), "file has"),
    ("truncated data", frame({"a": entry("U8", [4], 0, 4)}, bytes(3)), "file has"),
    ("data but no tensors", frame({}, b"\0"), "file has"),
    ("unknown field nested too deep", w_extra(b"[" * 126 + b"]" * 126), "'w': field 'x': nested more than 127"),
    ("deep nesting", frame(b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    ("unknown field lone surrogate", w_extra(b'["\\udc00"]'), "'w': string"),
    ("unknown field 1e400", w_extra(b"1e400"), "out of range"),
    ("unknown field -9...9 (400 digits)", w_extra(b"-" + b"9" * 400), "out of range"),
]


@pytest.mark.parametrize(("label", "buf", "message"), REJECTED, ids=[c[0] for c in REJECTED])
def test_rejects_what_safetensors_rejects(label: str, buf: bytes, message: str, scratch: Path) -> None:
    assert not accepts(buf, scratch), f"safetensors now accepts {label!r}: revisit the rule"
    error = rejects_ours(buf)
    assert SOURCE in str(error)
    assert message in str(error)


# Inputs that look odd but are valid; safetensors accepts all of them.
ACCEPTED = [
    ("whitespace around", frame(b' \t\r\n{"__metadata__": {"k": "v"}} \n\t')),
    ("metadata null", frame({"__metadata__": None})),
    ("metadata empty", frame({"__metadata__": {}})),
    ("escaped keys and values", frame(
        b'{"\\u005f_metadata__": {"\\u0061": "\\ud83d\\ude00"},'
        b' "\\u00e9": {"dtype": "\\u0055\\u0038", "shape": [1], "data_offsets": [0, 1]}}', b"\7")),
    ("unicode names", frame({"é∂😀": U8, "": entry("U8", [1], 1, 2)}, b"\1\2")),
    ("unknown fields ignored", frame({"w": {**U8, "x": [None, {"k": [1.5, -2, "s"]}], "__metadata__": 3}}, b"\0")),
    ("unknown field of 300 digits", w_extra(LONG.encode())),
    ("unknown field nested to the limit", w_extra(b"[" * 125 + b"]" * 125)),
    ("tiny float in unknown field", w_extra(b"1e-400")),
    ("0-d", one("F64", [], 0, 8, bytes(8))),
    ("zero dim times u64 max", one("U8", [0, 2**64 - 1], 0, 0)),
    ("zero before an overflow", one("U8", [0, 2**63, 4], 0, 0)),
    ("F4 pairs", one("F4", [3, 2], 0, 3, bytes(3))),
    ("F4 odd last dim", one("F4", [2, 3], 0, 3, bytes(3))),
    ("F6 four to three bytes", one("F6_E2M3", [4], 0, 3, bytes(3))),
    ("name __metadata__ lookalike", frame({"__metadata": U8}, b"\0")),
]


@pytest.mark.parametrize(("label", "buf"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_accepts_what_safetensors_accepts(label: str, buf: bytes, scratch: Path) -> None:
    assert_same(ours(buf), buf, theirs(buf, scratch))


U8_JSON = json.dumps(U8).encode()
# The documented differences: safetensors accepts these, we refuse them.
DIFFERENT = [
    ("duplicate tensor", frame(b'{"a": ' + U8_JSON + b', "a": ' + U8_JSON + b"}", b"\0"), "duplicate key 'a'"),
    ("duplicate tensor, last wins",
     frame(b'{"a": ' + U8_JSON + b', "a": ' + json.dumps(entry("U8", [2], 0, 2)).encode() + b"}", b"\0\0"),
     "duplicate key 'a'"),
    ("duplicate metadata key", frame(b'{"__metadata__": {"k": "1", "k": "2"}}'), "duplicate key 'k'"),
    ("duplicate key in unknown field", w_extra(b'{"k": 1, "k": 2}'), "duplicate key 'k'"),
    ("positional entry", frame(b'{"w": ["U8", [1], [0, 1]]}', b"\0"), "'w': entry is an array"),
    ("enum-form dtype", frame({"w": {**U8, "dtype": {"U8": None}}}, b"\0"), "'w': dtype is an object"),
]


@pytest.mark.parametrize(("label", "buf", "message"), DIFFERENT, ids=[c[0] for c in DIFFERENT])
def test_documented_differences_from_safetensors(label: str, buf: bytes, message: str, scratch: Path) -> None:
    assert accepts(buf, scratch), f"safetensors now rejects {label!r}: drop it from the docstring"
    error = rejects_ours(buf)
    assert SOURCE in str(error) and message in str(error)


def test_header_longer_than_the_file() -> None:
    with pytest.raises(HeaderError, match="header ends at byte 10 but the file has 9"):
        parse_header(b"{}", file_size=9, source=SOURCE)


def test_without_file_size_the_data_end_is_the_headers_claim() -> None:
    header = parse_header(json.dumps({"w": entry("U8", [2**40], 0, 2**40)}).encode(), file_size=None, source=SOURCE)
    assert header.data_end == header.data_start + 2**40


def test_hostile_sizes_fail_cleanly_without_allocating() -> None:
    # Each of these would be a MemoryError or OverflowError if trusted.
    for shape in ([2**64 - 1, 2**64 - 1], [2**63] * 50, [2**64 - 1] * 1000):
        with pytest.raises(HeaderError, match="overflows"):
            parse_header(json.dumps({"w": entry("U8", shape, 0, 0)}).encode(), file_size=None, source=SOURCE)


# --- the torch side ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "header", "message"),
    [
        ("F6 has no torch dtype", {"w": entry("F6_E2M3", [4], 0, 3)}, "F6_E2M3 has no torch equivalent"),
        ("F4 odd last dim", {"w": entry("F4", [2, 3], 0, 3)}, "divisible by 2"),
        ("F4 zero rows, odd last dim", {"w": entry("F4", [0, 3], 0, 0)}, "divisible by 2"),
        ("dim past int64", {"w": entry("U8", [0, 2**63], 0, 0)}, "int64"),
    ],
)
def test_torch_rejects_what_load_file_rejects(label: str, header: dict[str, Any], message: str, scratch: Path) -> None:
    buf = frame(header, bytes(header["w"]["data_offsets"][1]))
    entry_ = ours(buf).tensors[0]
    with pytest.raises(HeaderError, match=message) as info:
        torch_dtype_and_shape(entry_, source=SOURCE)
    assert SOURCE in str(info.value) and "'w'" in str(info.value)
    scratch.write_bytes(buf)
    with pytest.raises(Exception):  # noqa: B017 - safetensors or torch, depending on the rule
        load_file(str(scratch))


def test_torch_shape_of_empty_f4_and_huge_zero_dims(scratch: Path) -> None:
    buf = frame({"a": entry("F4", [3, 0], 0, 0), "b": entry("U8", [0, 2**63 - 1], 0, 0)})
    scratch.write_bytes(buf)
    loaded = load_file(str(scratch))
    for t in ours(buf).tensors:
        assert torch_dtype_and_shape(t, source=SOURCE) == (loaded[t.name].dtype, tuple(loaded[t.name].shape))


# --- the fuzzer ---------------------------------------------------------------------
# A valid header is built as a tree whose objects are lists of pairs (so keys
# can repeat), usually given one corruption from a flat list, written out by
# hand, and handed to both parsers. One corruption at a time keeps each rule
# the deciding one often enough to be tested (checked by breaking rules in
# header.py one by one: the fuzzer must fail).


@dataclass(frozen=True)
class Obj:
    pairs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True, repr=False)
class Raw:
    """JSON text written verbatim: numbers Python would never print."""

    text: str

    def __repr__(self) -> str:  # some are kilobytes long
        return f"Raw({self.text[:12]!r}{'...' if len(self.text) > 12 else ''} {len(self.text)} chars)"


def dump(value: Any, ascii_only: bool) -> str:
    if isinstance(value, Obj):
        return "{" + ",".join(f"{dump(k, ascii_only)}:{dump(v, ascii_only)}" for k, v in value.pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"
    if isinstance(value, Raw):
        return value.text
    return json.dumps(value, ensure_ascii=ascii_only)


def has_known_difference(value: Any, depth: int = 0) -> bool:
    """Duplicate keys anywhere, or serde's positional entries / enum dtypes."""
    if isinstance(value, list):
        return any(has_known_difference(v, depth + 1) for v in value)
    if not isinstance(value, Obj):
        return False
    keys = [k for k, _ in value.pairs]
    if len(set(keys)) != len(keys):
        return True
    if depth == 0:
        for key, item in value.pairs:
            if key == "__metadata__":
                continue
            if isinstance(item, list):
                return True
            if isinstance(item, Obj) and any(k == "dtype" and isinstance(v, Obj) for k, v in item.pairs):
                return True
    return any(has_known_difference(v, depth + 1) for _, v in value.pairs)


def obj(d: dict[str, Any]) -> Obj:
    return Obj(tuple(d.items()))


FUZZ_NAMES = st.one_of(st.text(max_size=6), st.sampled_from(["w", "x.y", "é"]))
ODD_NUMBERS = [
    -1, 2**63, 2**64 - 1, 2**64, 1.0, 0.5, True, None, "1", [], Raw("-0"), Raw("1e0"), Raw("1E400"), Raw("9" * 30)
]
# Values serde and Python's json disagree on unless header.py closes the gap.
EDGE_VALUES = [
    Raw("1e400"), Raw("-" + "9" * 400), Raw("9" * 300), Raw("1e-400"), Raw("-0"), Raw("NaN"), Raw("Infinity"),
    "\udc00", "a\ud800b", "\ud83d\ude00", *(Raw("[" * k + "]" * k) for k in (124, 125, 126, 127, 2000)),
]
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=4), st.sampled_from(EDGE_VALUES),
    ),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["k", "j", "dtype"]), inner, max_size=3).map(obj),
    max_leaves=6,
)
BAD_DTYPES = ["u8", "C128", "F8_E4M3FN", "I4", "", 1, None, [], *(Obj(((d, None),)) for d in ("U8", "F32"))]


Pair = tuple[str, Any]


@dataclass
class Draft:
    """A file being built: header pairs, data length, then raw-byte edits."""

    pairs: list[tuple[str, Any]]
    data_len: int
    root: Any = None  # replaces the whole JSON value when set
    prefix_delta: int = 0
    junk: bytes = b""
    truncate: bool = False


@st.composite
def valid_drafts(draw: st.DrawFn) -> Draft:
    """Tensors laid out in a random order, and maybe metadata."""
    names = draw(st.lists(FUZZ_NAMES, max_size=5, unique=True))
    dims = st.sampled_from([1, 2, 3, 0])  # mostly non-empty tensors
    infos = []
    for n in names:
        dtype, shape = draw(st.sampled_from(sorted(DTYPES))), draw(st.lists(dims, max_size=3))
        if DTYPES[dtype][0] < 8:  # whole bytes; "odd dim" breaks that sometimes
            shape.append(8)
        infos.append((n, dtype, shape))
    offset, offsets = 0, {}
    for i in draw(st.permutations(range(len(infos)))):
        _, dtype, shape = infos[i]
        count = 1
        for d in shape:
            count *= d
        offsets[i] = [offset, offset + count * DTYPES[dtype][0] // 8]
        offset = offsets[i][1]
    pairs: list[tuple[str, Any]] = [
        (n, obj({"dtype": dtype, "shape": shape, "data_offsets": offsets[i]}))
        for i, (n, dtype, shape) in enumerate(infos)
    ]
    metadata = draw(st.sampled_from(["absent", "null", "dict"]))
    if metadata != "absent":
        strings = st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3)
        value = None if metadata == "null" else obj(draw(strings))
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", value))
    return Draft(pairs, offset)


def corrupt(draw: st.DrawFn, draft: Draft) -> None:
    """Apply one corruption, picked from a flat list so each is common.

    A tensor corruption edits one entry's fields in place, or returns the
    (name, value) pair that replaces the entry; the others edit the draft.
    """
    kind = draw(st.sampled_from(sorted(TENSOR_CORRUPTIONS) + sorted(FILE_CORRUPTIONS)))
    tensors = [i for i, (k, v) in enumerate(draft.pairs) if k != "__metadata__" and isinstance(v, Obj)]
    if kind in FILE_CORRUPTIONS or not tensors:
        FILE_CORRUPTIONS.get(kind, _data_length)(draw, draft)
        return
    i = draw(st.sampled_from(tensors))
    name, value = draft.pairs[i]
    fields = dict(value.pairs)
    draft.pairs[i] = TENSOR_CORRUPTIONS[kind](draw, draft, name, fields) or (name, obj(fields))


def _offsets_are_ints(fields: dict[str, Any]) -> bool:
    offsets = fields.get("data_offsets")
    return isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)


def _odd_dim(draw: st.DrawFn, draft: Draft, name: str, fields: dict[str, Any]) -> Pair | None:
    shape = list(fields["shape"]) if isinstance(fields.get("shape"), list) else []
    shape = shape or [1]
    shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from(ODD_NUMBERS))
    fields["shape"] = shape


def _move_later_tensors(draft: Draft, after: int, delta: int) -> None:
    """Shift the tensors that begin at or after ``after`` and grow the file to match."""
    for k, (name, value) in enumerate(draft.pairs):
        fields = dict(value.pairs) if isinstance(value, Obj) else {}
        if name != "__metadata__" and _offsets_are_ints(fields) and fields["data_offsets"][0] >= after:
            fields["data_offsets"] = [o + delta for o in fields["data_offsets"]]
            draft.pairs[k] = (name, obj(fields))
    draft.data_len += delta


def _extreme_shape(draw: st.DrawFn, draft: Draft, name: str, fields: dict[str, Any]) -> Pair | None:
    # Shapes at the u64 overflow rule's edges, with the file resized to fit
    # when it can be, so the shape rule is the one that decides.
    shape = draw(st.sampled_from([[2**63, 4, 0], [0, 2**63, 4], [0, 2**64 - 1], [2**32, 2**32, 0], [-1, -1], [2**62]]))
    fields["shape"] = shape
    count = 1
    for d in shape:
        count *= d
    if _offsets_are_ints(fields) and fields.get("dtype") in DTYPES and 0 <= count < 2**20:
        begin, end = fields["data_offsets"]
        delta = count * DTYPES[fields["dtype"]][0] // 8 - (end - begin)
        _move_later_tensors(draft, end, delta)
        fields["data_offsets"] = [begin, end + delta]
    return None


def _odd_offset(draw: st.DrawFn, draft: Draft, name: str, fields: dict[str, Any]) -> Pair | None:
    offsets = list(fields["data_offsets"]) if _offsets_are_ints(fields) else [0, 0]
    j = draw(st.integers(0, 1))
    nudged = [offsets[j] + d for d in (-4, -1, 1, 4)]
    offsets[j] = draw(st.sampled_from(nudged + ODD_NUMBERS))
    fields["data_offsets"] = draw(st.sampled_from([offsets, offsets[:1], offsets + [0]]))


def _shift(draw: st.DrawFn, draft: Draft, name: str, fields: dict[str, Any]) -> Pair | None:
    # Moves a tensor, or it and all after it with the file resized to match:
    # either way a gap or an overlap, in the second case the only fault.
    delta = draw(st.sampled_from([-1, -2, 1, 2, 8]))
    if not _offsets_are_ints(fields):
        return None
    begin = fields["data_offsets"][0]
    if draw(st.sampled_from([True, True, False])):
        _move_later_tensors(draft, begin + 1, delta)
    fields["data_offsets"] = [o + delta for o in fields["data_offsets"]]
    return None


def _minus_zero(draw: st.DrawFn, draft: Draft) -> None:
    # "-0" is a float to serde, 0 to Python; applied to every tensor, since the
    # first one always begins at 0.
    for k, (name, value) in enumerate(draft.pairs):
        if name != "__metadata__" and isinstance(value, Obj):
            entry_ = dict(value.pairs)
            for key in ("shape", "data_offsets"):
                if isinstance(entry_.get(key), list):
                    entry_[key] = [Raw("-0") if type(v) is int and v == 0 else v for v in entry_[key]]
            draft.pairs[k] = (name, obj(entry_))


def _bad_dtype(draw: st.DrawFn, draft: Draft, name: str, fields: dict[str, Any]) -> Pair | None:
    fields["dtype"] = draw(st.sampled_from(BAD_DTYPES + sorted(DTYPES)))


def _drop_field(draw: st.DrawFn, draft: Draft, name: str, fields: dict[str, Any]) -> Pair | None:
    if fields:
        fields.pop(draw(st.sampled_from(sorted(fields))))


def _extra_field(draw: st.DrawFn, draft: Draft, name: str, fields: dict[str, Any]) -> Pair | None:
    edge = st.sampled_from(EDGE_VALUES)
    value = draw(st.one_of(edge, edge.map(lambda v: [v]), edge.map(lambda v: obj({"k": v})), JSON_VALUES))
    fields[draw(st.sampled_from(["x", "__metadata__", "dtypes"]))] = value


def _entry_form(draw: st.DrawFn, draft: Draft, name: str, fields: dict[str, Any]) -> Pair | None:
    positional = [fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")]
    return name, draw(st.sampled_from([positional, positional[:2], None, 3, "x"]))


def _rename(draw: st.DrawFn, draft: Draft, name: str, fields: dict[str, Any]) -> Pair | None:
    return draw(st.sampled_from(["__metadata__", "\ud800", "a\udc00", "\udc00\ud800"])), obj(fields)


def _duplicate(draw: st.DrawFn, draft: Draft, name: str, fields: dict[str, Any]) -> Pair | None:
    draft.pairs.append((name, draw(st.sampled_from([obj(fields), obj({**fields, "shape": [1]})]))))


def _bad_metadata(draw: st.DrawFn, draft: Draft) -> None:
    draft.pairs = [(k, v) for k, v in draft.pairs if k != "__metadata__"]
    falsy = st.sampled_from([[], 0, False, "", Raw("0.0"), Raw("-0")])
    objects = st.dictionaries(st.text(max_size=2), JSON_VALUES, min_size=1, max_size=2).map(obj)
    value = draw(falsy | JSON_VALUES | objects)
    draft.pairs.insert(draw(st.integers(0, len(draft.pairs))), ("__metadata__", value))


def _data_length(draw: st.DrawFn, draft: Draft) -> None:
    draft.data_len += draw(st.sampled_from([-8, -1, 1, 8]))


def _root(draw: st.DrawFn, draft: Draft) -> None:
    draft.root = draw(st.sampled_from([[], 1, "x", None, Raw("{}{}"), Raw(""), Raw("{")]))


def _prefix(draw: st.DrawFn, draft: Draft) -> None:
    draft.prefix_delta = draw(st.sampled_from([-1, 1, 2**40, HEADER_MAX_BYTES]))


def _junk(draw: st.DrawFn, draft: Draft) -> None:
    draft.junk = draw(st.sampled_from([b"\x00", b"\x0c", b"\xc2\xa0", b"\xff", b",", b"}"]))


def _truncate(draw: st.DrawFn, draft: Draft) -> None:
    draft.truncate = True


TENSOR_CORRUPTIONS = {
    "odd dim": _odd_dim, "extreme shape": _extreme_shape, "odd offset": _odd_offset,
    "shift": _shift, "dtype": _bad_dtype, "drop field": _drop_field, "extra field": _extra_field,
    "entry form": _entry_form, "rename": _rename, "duplicate": _duplicate,
}
FILE_CORRUPTIONS = {
    "minus zero": _minus_zero, "metadata": _bad_metadata, "data length": _data_length, "root": _root,
    "prefix": _prefix, "junk": _junk, "truncate": _truncate,
}


@st.composite
def fuzz_files(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A file, often broken, and whether it hits a known difference."""
    draft = draw(valid_drafts())
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
        corrupt(draw, draft)
    root = draft.root if draft.root is not None else Obj(tuple(draft.pairs))
    text = dump(root, ascii_only=draw(st.booleans())).encode("utf-8", "surrogatepass")
    text = draw(st.sampled_from([b"", b" ", b"\n\t"])) + text + draw(st.sampled_from([b"", b"  "])) + draft.junk
    data = random.Random(draft.data_len).randbytes(max(draft.data_len, 0))
    buf = struct.pack("<Q", len(text) + draft.prefix_delta) + text + data
    if draft.truncate:
        buf = buf[: draw(st.integers(0, len(buf) - 1))]
    return buf, has_known_difference(root)


@settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_files())
def test_fuzz_agrees_with_safetensors(case: tuple[bytes, bool], module_scratch: Path) -> None:
    buf, known_difference = case
    try:
        ref: Theirs | None = theirs(buf, module_scratch)
    except safetensors.SafetensorError:
        ref = None
    try:
        header: SafetensorsHeader | None = ours(buf)
    except HeaderError as e:
        assert SOURCE in str(e)
        header = None
    event("safetensors " + ("accepts" if ref else "rejects") + (", known difference" if known_difference else ""))
    if known_difference:
        assert header is None
    elif ref is None:
        assert header is None, "we accept a file safetensors rejects"
    else:
        assert header is not None, "we reject a file safetensors accepts"
        assert_same(header, buf, ref)
