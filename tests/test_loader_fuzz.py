"""Hostile files: the loader fails cleanly, names the file (and tensor), never over-allocates.

Mutations of valid files — truncated anywhere, header length lying, bytes of the
header flipped, offsets overlapping or holding the wrong length — are loaded from
a local path (many, hypothesis-driven) and from S3. Every outcome must be one of:
the same tensors safetensors reads (a mutation that stays valid), or a
:class:`ColdbrewError` naming the file. Memory stays bounded: nothing is
allocated from a header before it passed validation.
"""

from __future__ import annotations

import json
import resource
import struct

import pytest
import safetensors.torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_loader_files import assert_same, make_file

from coldbrew.agent.errors import ColdbrewError, HeaderError, ObjectChanged
from coldbrew.loader import iter_tensors, load_file

SEEDS = [0, 3, 6, 9, 12]
BASES = {seed: make_file(seed, count=5, big=True) for seed in SEEDS}


def frame(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def theirs(path):
    try:
        return safetensors.torch.load_file(str(path)), None
    except Exception as e:
        return None, e


def load_both(path):
    ref, their_error = theirs(path)
    try:
        got = load_file(path, cache_dir=False)
    except ColdbrewError as e:
        assert str(path) in str(e), f"error does not name the file: {e}"
        return None, e, ref, their_error
    return got, None, ref, their_error


def check(path):
    got, ours_error, ref, their_error = load_both(path)
    if ours_error is None:
        assert their_error is None, f"we accepted what safetensors rejects ({their_error})"
        assert_same(got, ref)
    return ours_error


MUTATIONS = st.sampled_from(["truncate", "flip_header", "length", "flip_data", "append"])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(SEEDS), kind=MUTATIONS, where=st.integers(0, 2**32), value=st.integers(0, 255))
def test_mutated_files_fail_cleanly_or_match(tmp_path, seed, kind, where, value):
    data = bytearray(BASES[seed])
    n = struct.unpack("<Q", data[:8])[0]
    if kind == "truncate":
        data = data[: where % len(data)]
    elif kind == "flip_header":
        data[8 + where % n] = value
    elif kind == "length":
        data[:8] = struct.pack("<Q", [where, n + 1 + where % 64, n - 1 - where % max(1, n - 1),
                                      2**63 + where, 100_000_000][value % 5])
    elif kind == "flip_data":
        if len(data) > 8 + n:
            data[8 + n + where % (len(data) - 8 - n)] ^= 0xFF
    else:
        data += bytes([value]) * (1 + where % 100)
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(data))
    error = check(path)
    if kind in ("truncate", "append") and len(data) != len(BASES[seed]):
        assert isinstance(error, HeaderError)


BAD_HEADERS = {
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlap"),
    "wrong_length": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12"),
    "offset_past_end": ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, 2, "truncated"),
    "gap": ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, 8, "unclaimed"),
    "huge_shape": ({"a": {"dtype": "F32", "shape": [2**30, 2**20], "data_offsets": [0, 2**52]}},
                   16, "truncated"),
    "overflow": ({"a": {"dtype": "F64", "shape": [2**63, 4], "data_offsets": [0, 8]}}, 8, "overflows"),
    "bad_dtype": ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, 1, "unknown dtype"),
    "f6": ({"a": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, 3, "no torch"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_headers_name_file_and_tensor(tmp_path, case):
    header, data_len, message = BAD_HEADERS[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(frame(header, bytes(data_len)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(HeaderError, match=message) as info:
        load_file(path, cache_dir=False)
    assert str(path) in str(info.value)
    assert "'a'" in str(info.value) or "'b'" in str(info.value)
    assert theirs(path)[1] is not None
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB


def test_truncated_file_names_the_cut_tensor(tmp_path):
    data = frame({"first": {"dtype": "U8", "shape": [10], "data_offsets": [0, 10]},
                  "second": {"dtype": "F32", "shape": [4], "data_offsets": [10, 26]}}, bytes(26))
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-5])
    with pytest.raises(HeaderError, match=r"cut.safetensors: truncated: tensor 'second'"):
        load_file(path, cache_dir=False)


def test_header_length_far_past_the_file(tmp_path):
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", 99_000_000) + b"{}")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(HeaderError, match="liar.safetensors"):
        load_file(path, cache_dir=False)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 << 10
    with pytest.raises(HeaderError, match="exceeds"):
        (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
        load_file(tmp_path / "huge.safetensors", cache_dir=False)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(HeaderError, match="short.safetensors: not a safetensors file"):
        load_file(tmp_path / "short.safetensors", cache_dir=False)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_file(tmp_path / "nothing-here.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json"):
        from coldbrew.loader import load_dir
        load_dir(tmp_path)


def test_local_file_changed_mid_load_raises(tmp_path, monkeypatch):
    import coldbrew.loader.sources as sources

    monkeypatch.setattr(sources.Source, "span_bytes", 64 << 10)
    data = make_file(0, count=8, big=True)
    path = tmp_path / "moving.safetensors"
    path.write_bytes(data)
    with pytest.raises(ObjectChanged, match="moving.safetensors"):
        for i, _ in enumerate(iter_tensors(path, cache_dir=False, concurrency=1, budget_bytes=1)):
            if i == 0:
                with open(path, "r+b") as f:  # rewritten in place, shorter
                    f.truncate(len(data) // 2)


# --- the same from S3 ------------------------------------------------------------------------


def test_remote_corrupt_and_truncated_objects(loader_env, s3, bucket, s3_client, monkeypatch, tmp_path):
    good = BASES[0]
    cases = {
        "cut.safetensors": (good[: len(good) - 100], "truncated: tensor"),
        "liar.safetensors": (struct.pack("<Q", 99_000_000) + b"{}", "claims"),
        "tiny.safetensors": (b"\x00", "not a safetensors file"),
        "json.safetensors": (struct.pack("<Q", 5) + b"{oops", "not valid JSON"),
    }
    for key, (body, message) in cases.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
        with pytest.raises(HeaderError, match=message) as info:
            load_file(f"s3://{bucket}/{key}", cache_dir=tmp_path / "c")
        assert f"s3://{bucket}/{key}" in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_file(f"s3://{bucket}/missing.safetensors", cache_dir=False)
    assert not list((tmp_path / "c").rglob("*.json"))
