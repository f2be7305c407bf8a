"""Plan the byte ranges a load reads, in tensor order: pure code, no I/O.

Given a validated :class:`~coldbrew.loader.header.SafetensorsHeader`, the
planner turns "these tensors" into a list of :class:`ReadSpan` in file order,
each one ranged read. The rules, and why:

* **Spans sit on a grid.** No span crosses a multiple of ``span_bytes`` (in
  absolute file offsets), so no span is longer than ``span_bytes``: the loader
  reads into a bounded set of reused ``span_bytes`` buffers whatever the
  tensor sizes. With ``span_bytes`` equal to (or dividing) the agent's chunk
  size, each span also lies in exactly one cache chunk.
* **Large tensors are split.** A tensor crossing grid lines is cut into
  :class:`TensorPiece` s in consecutive spans; each span lists the pieces it
  carries (copy them to ``piece.tensor_offset`` in the destination) and, in
  ``tensors``, the tensors whose last byte it carries: once span ``k`` and the
  spans before it are read, every tensor in ``spans[k].tensors`` is complete.
* **Small gaps are read through.** Unneeded bytes between two needed tensors
  in the same grid cell are read and dropped when the gap is at most
  ``max_gap_bytes``: one GET is cheaper than two. Larger gaps split the span.
  Spans are trimmed to needed bytes, never padded.
* **Empty tensors need no bytes.** They ride on the span at (or after) their
  offset; if no needed tensor has bytes, the plan is one zero-length span
  carrying them, which the reader must not fetch.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

from coldbrew.loader.header import SafetensorsHeader, TensorEntry

MiB = 1 << 20
DEFAULT_SPAN_BYTES = 16 * MiB
DEFAULT_MAX_GAP_BYTES = 1 * MiB

#: Which tensors to load: all (None), a collection of names, or a predicate.
NameFilter = Callable[[str], bool] | Collection[str] | None


class ByteRange(Protocol):
    """Anything with absolute ``begin``/``end`` file offsets (end exclusive)."""

    @property
    def begin(self) -> int: ...

    @property
    def end(self) -> int: ...


@dataclass(frozen=True)
class TensorPiece:
    """The part ``[begin, end)`` (file offsets) of ``tensor`` carried by one span."""

    tensor: TensorEntry
    begin: int
    end: int

    @property
    def tensor_offset(self) -> int:
        """Where these bytes go inside the tensor's own bytes."""
        return self.begin - self.tensor.begin

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ReadSpan:
    """One ranged read ``[begin, end)`` of the file.

    ``tensors``: complete once this span and the ones before it are read.
    ``pieces``: the needed bytes inside the span, in file order; bytes of the
    span outside every piece belong to unneeded tensors and are dropped.
    """

    begin: int
    end: int
    tensors: tuple[TensorEntry, ...]
    pieces: tuple[TensorPiece, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def select_tensors(header: SafetensorsHeader, wanted: NameFilter = None) -> list[TensorEntry]:
    """The tensors ``wanted`` picks, in file order; unknown names are a KeyError."""
    if wanted is None:
        return list(header.tensors)
    if callable(wanted):
        return [t for t in header.tensors if wanted(t.name)]
    if isinstance(wanted, str):  # a str is a Collection[str] of its characters
        raise TypeError("wanted must be a collection of names, not a single str")
    names = set(wanted)
    missing = names.difference(header.by_name)
    if missing:
        raise KeyError(f"{header.source}: no tensors named {sorted(missing)!r}")
    return [t for t in header.tensors if t.name in names]


def plan_reads(
    header: SafetensorsHeader,
    wanted: NameFilter = None,
    *,
    span_bytes: int = DEFAULT_SPAN_BYTES,
    max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES,
) -> list[ReadSpan]:
    """The reads that fetch the ``wanted`` tensors, in file order (rules above).

    Plan only from a header parsed with its ``file_size``: sizes are trusted.
    """
    if span_bytes < 1:
        raise ValueError(f"span_bytes must be positive, got {span_bytes}")
    if max_gap_bytes < 0:
        raise ValueError(f"max_gap_bytes must be >= 0, got {max_gap_bytes}")
    tensors = select_tensors(header, wanted)
    pieces = [p for t in tensors for p in _cut(t, span_bytes)]
    spans = [_span(group) for group in _group(pieces, span_bytes, max_gap_bytes)]
    empty = [t for t in tensors if t.nbytes == 0]
    return _attach_empty(spans, empty) if empty else spans


def _cut(tensor: TensorEntry, span_bytes: int) -> Iterable[TensorPiece]:
    """Split a tensor's bytes at the grid lines (multiples of ``span_bytes``)."""
    begin = tensor.begin
    while begin < tensor.end:
        line = (begin // span_bytes + 1) * span_bytes
        end = min(line, tensor.end)
        yield TensorPiece(tensor, begin, end)
        begin = end


def _group(
    pieces: list[TensorPiece], span_bytes: int, max_gap_bytes: int
) -> Iterable[list[TensorPiece]]:
    """Runs of pieces in one grid cell with no gap wider than ``max_gap_bytes``."""
    group: list[TensorPiece] = []
    for piece in pieces:
        if group and (
            piece.begin // span_bytes != group[-1].begin // span_bytes
            or piece.begin - group[-1].end > max_gap_bytes
        ):
            yield group
            group = []
        group.append(piece)
    if group:
        yield group


def _span(pieces: list[TensorPiece]) -> ReadSpan:
    done = tuple(p.tensor for p in pieces if p.end == p.tensor.end)
    return ReadSpan(pieces[0].begin, pieces[-1].end, done, tuple(pieces))


def _attach_empty(spans: list[ReadSpan], empty: list[TensorEntry]) -> list[ReadSpan]:
    """Give each empty tensor to the first span ending at or after its offset.

    Keeps every span's ``tensors`` in file order, so a loader that emits
    tensors span by span emits them in the header's order.
    """
    if not spans:
        return [ReadSpan(empty[0].begin, empty[0].begin, tuple(empty), ())]
    ends = [s.end for s in spans]
    extra: list[list[TensorEntry]] = [[] for _ in spans]
    for t in empty:
        k = min(bisect.bisect_left(ends, t.begin), len(spans) - 1)
        extra[k].append(t)
    return [
        _with_tensors(span, more) if more else span for span, more in zip(spans, extra)
    ]


def _with_tensors(span: ReadSpan, more: list[TensorEntry]) -> ReadSpan:
    merged = sorted((*span.tensors, *more), key=lambda t: (t.begin, t.end, t.name))
    return ReadSpan(span.begin, span.end, tuple(merged), span.pieces)
