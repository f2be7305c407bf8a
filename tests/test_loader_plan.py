"""coldbrew.loader.plan: the read plan covers exactly the wanted tensors.

Property tests check every rule of the plan (grid, coalescing, gaps, pieces,
completion order) on random layouts with small spans, so a few hundred bytes
exercise the same arithmetic a model with 16 MiB spans does; a few examples
pin concrete plans.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coldbrew.loader.header import HEADER_PREFIX_BYTES, SafetensorsHeader, TensorEntry, parse_header
from coldbrew.loader.plan import (
    DEFAULT_MAX_GAP_BYTES,
    DEFAULT_SPAN_BYTES,
    MiB,
    NameFilter,
    ReadSpan,
    TensorPiece,
    plan_reads,
    select_tensors,
)


def make_header(sizes: list[int], data_start: int = 1024) -> SafetensorsHeader:
    """A real, validated header whose U8 tensors t0, t1... have ``sizes`` bytes, in order."""
    entries, offset = {}, 0
    for i, size in enumerate(sizes):
        entries[f"t{i}"] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries).encode()
    pad = data_start - HEADER_PREFIX_BYTES - len(text)
    assert pad >= 0, f"data_start {data_start} is too small for {len(sizes)} tensors"
    text += b" " * pad  # safetensors pads with spaces too
    header_size = HEADER_PREFIX_BYTES + len(text)
    return parse_header(text, file_size=header_size + offset, source="test.safetensors")


# --- the properties ----------------------------------------------------------------


def check_plan(
    header: SafetensorsHeader, wanted: list[TensorEntry], spans: list[ReadSpan], span_bytes: int, max_gap: int
) -> None:
    """Every rule the module docstring promises."""
    if not wanted:
        assert spans == []
        return
    if all(t.nbytes == 0 for t in wanted):  # nothing to read: one empty span
        assert len(spans) == 1 and spans[0].nbytes == 0 and spans[0].pieces == ()
        assert list(spans[0].tensors) == wanted
        return
    for span in spans:
        check_span(span, span_bytes, max_gap)
    for left, right in zip(spans, spans[1:]):
        assert left.end <= right.begin, "spans overlap or are out of order"
        same_cell = left.begin // span_bytes == right.begin // span_bytes
        assert not same_cell or right.begin - left.end > max_gap, "two spans should have been one"
    check_pieces_cover(wanted, spans)
    check_completion(wanted, spans)


def check_span(span: ReadSpan, span_bytes: int, max_gap: int) -> None:
    assert span.pieces, "a span with nothing to read"
    assert 0 < span.nbytes <= span_bytes
    assert span.begin // span_bytes == (span.end - 1) // span_bytes, "span crosses a grid line"
    assert (span.begin, span.end) == (span.pieces[0].begin, span.pieces[-1].end), "span not trimmed"
    for piece in span.pieces:
        assert span.begin <= piece.begin < piece.end <= span.end
        assert piece.tensor.begin <= piece.begin and piece.end <= piece.tensor.end
        assert piece.tensor_offset == piece.begin - piece.tensor.begin
    for a, b in zip(span.pieces, span.pieces[1:]):
        assert 0 <= b.begin - a.end <= max_gap, "pieces out of order, or a gap too wide to read through"


def check_pieces_cover(wanted: list[TensorEntry], spans: list[ReadSpan]) -> None:
    """Pieces tile each wanted tensor exactly, and touch nothing else."""
    pieces: dict[str, list[TensorPiece]] = {}
    for span in spans:
        for piece in span.pieces:
            pieces.setdefault(piece.tensor.name, []).append(piece)
    assert set(pieces) == {t.name for t in wanted if t.nbytes}
    for t in wanted:
        if t.nbytes:
            ranges = [(p.begin, p.end) for p in pieces[t.name]]
            assert ranges[0][0] == t.begin and ranges[-1][1] == t.end
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), "pieces leave a hole"


def check_completion(wanted: list[TensorEntry], spans: list[ReadSpan]) -> None:
    """Each tensor is listed once, in file order, in the span holding its last byte."""
    listed = [t for span in spans for t in span.tensors]
    assert listed == wanted
    for k, span in enumerate(spans):
        for t in span.tensors:
            later = [p for s in spans[k + 1 :] for p in s.pieces if p.tensor == t]
            assert not later, f"{t.name} listed complete in span {k} but has bytes after it"
            if t.nbytes:
                assert span.pieces and any(p.tensor == t and p.end == t.end for p in span.pieces)


# Few distinct sizes, so gaps often equal max_gap exactly: the boundary case.
LAYOUTS = st.lists(st.sampled_from([0, 1, 2, 3, 5, 8, 16, 40, 200]) | st.integers(0, 300), max_size=12)
SPAN_BYTES = st.sampled_from([1, 2, 8, 16, 64, 4096]) | st.integers(1, 128)
MAX_GAPS = st.sampled_from([0, 1, 2, 8, 16]) | st.integers(0, 64)


@settings(max_examples=300, deadline=None, database=None)
@given(
    sizes=LAYOUTS,
    data_start=st.integers(1024, 1200),
    span_bytes=SPAN_BYTES,
    max_gap=MAX_GAPS,
    picks=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_plan_properties(
    sizes: list[int], data_start: int, span_bytes: int, max_gap: int, picks: list[bool]
) -> None:
    header = make_header(sizes, data_start)
    wanted = [t for t, pick in zip(header.tensors, picks) if pick]
    spans = plan_reads(header, {t.name for t in wanted}, span_bytes=span_bytes, max_gap_bytes=max_gap)
    check_plan(header, wanted, spans, span_bytes, max_gap)


# --- examples ----------------------------------------------------------------------


def test_a_whole_file_is_cut_at_the_grid() -> None:
    header = make_header([40, 100, 30], data_start=300)  # t0 [300, 340) t1 [340, 440) t2 [440, 470)
    spans = plan_reads(header, span_bytes=64)
    assert [(s.begin, s.end) for s in spans] == [(300, 320), (320, 384), (384, 448), (448, 470)]
    assert [[t.name for t in s.tensors] for s in spans] == [[], ["t0"], ["t1"], ["t2"]]
    pieces = [[(p.tensor.name, p.tensor_offset, p.nbytes) for p in s.pieces] for s in spans]
    assert pieces == [
        [("t0", 0, 20)],
        [("t0", 20, 20), ("t1", 0, 44)],
        [("t1", 44, 56), ("t2", 0, 8)],
        [("t2", 8, 22)],
    ]


def test_a_large_tensor_is_split_into_grid_sized_pieces() -> None:
    header = make_header([10 * MiB + 5], data_start=4096)
    spans = plan_reads(header, span_bytes=4 * MiB)
    assert [s.nbytes for s in spans] == [4 * MiB - 4096, 4 * MiB, 2 * MiB + 4096 + 5]
    assert [p.tensor_offset for s in spans for p in s.pieces] == [0, 4 * MiB - 4096, 8 * MiB - 4096]
    assert [len(s.tensors) for s in spans] == [0, 0, 1]


@pytest.mark.parametrize(("gap", "spans_expected"), [(0, 1), (7, 1), (8, 1), (9, 2)])
def test_small_gaps_are_read_through_and_large_ones_split(gap: int, spans_expected: int) -> None:
    header = make_header([10, gap, 10], data_start=512)
    spans = plan_reads(header, {"t0", "t2"}, span_bytes=1024, max_gap_bytes=8)
    assert len(spans) == spans_expected
    assert [t.name for s in spans for t in s.tensors] == ["t0", "t2"]
    if spans_expected == 1:
        assert spans[0].nbytes == 20 + gap  # the gap is read and dropped


def test_default_sizes() -> None:
    assert DEFAULT_SPAN_BYTES == 16 * MiB and DEFAULT_MAX_GAP_BYTES == 1 * MiB
    header = make_header([3 * MiB, 2 * MiB, 1 * MiB, 20 * MiB])
    spans = plan_reads(header, lambda name: name != "t1")  # skips a 2 MiB gap
    assert [(s.begin - header.data_start, s.end - header.data_start) for s in spans][:2] == [
        (0, 3 * MiB), (5 * MiB, 16 * MiB - header.data_start)
    ]
    assert all(s.nbytes <= 16 * MiB for s in spans)


def test_empty_tensors_ride_on_the_span_at_or_after_them() -> None:
    header = make_header([0, 10, 0, 10, 0], data_start=512)  # t0 @512, t2 @522, t4 @532
    spans = plan_reads(header, {"t0", "t2", "t3", "t4"}, span_bytes=1024, max_gap_bytes=0)
    assert [(s.begin, s.end) for s in spans] == [(522, 532)]
    assert [t.name for t in spans[0].tensors] == ["t0", "t2", "t3", "t4"]


def test_only_empty_tensors_give_one_span_with_nothing_to_read() -> None:
    header = make_header([5, 0, 0], data_start=512)
    spans = plan_reads(header, {"t1", "t2"})
    assert spans == [ReadSpan(517, 517, (header.by_name["t1"], header.by_name["t2"]), ())]


def test_nothing_wanted_or_no_tensors_plan_nothing() -> None:
    assert plan_reads(make_header([]), None) == []
    assert plan_reads(make_header([5, 6]), set()) == []
    assert plan_reads(make_header([5, 6]), lambda name: False) == []


@pytest.mark.parametrize(
    ("wanted", "names"),
    [(None, ["t0", "t1", "t2"]), ({"t2", "t0"}, ["t0", "t2"]), (["t1"], ["t1"]), (lambda n: n.endswith("1"), ["t1"])],
)
def test_select_tensors_keeps_file_order(wanted: NameFilter, names: list[str]) -> None:
    assert [t.name for t in select_tensors(make_header([1, 2, 3]), wanted)] == names


def test_select_tensors_refuses_unknown_names_and_bare_strings() -> None:
    header = make_header([1, 2])
    with pytest.raises(KeyError, match=r"test\.safetensors.*'nope'"):
        select_tensors(header, {"t0", "nope"})
    with pytest.raises(TypeError, match="not a single str"):
        select_tensors(header, "t0")


@pytest.mark.parametrize(("span_bytes", "max_gap"), [(0, 0), (-1, 0), (16, -1)])
def test_plan_refuses_nonsense_sizes(span_bytes: int, max_gap: int) -> None:
    with pytest.raises(ValueError):
        plan_reads(make_header([4]), span_bytes=span_bytes, max_gap_bytes=max_gap)

