"""Pure units: chunk maths and manifests, the eviction policy, and retry with backoff."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coldbrew.agent.core.eviction import Candidate, capacity_bytes, choose_victims
from coldbrew.agent.core.manifest import (
    ChunkLayout,
    FileIdentity,
    Manifest,
    digest,
    drop_line,
    journal_line,
    parse_journal,
    replay_journal,
)
from coldbrew.agent.errors import (
    AccessDenied,
    ObjectNotFound,
    OriginUnavailable,
    TransientOriginError,
)
from coldbrew.agent.origin import retry as retry_mod
from coldbrew.agent.origin.retry import RetryPolicy, with_retries

FAST = settings(max_examples=200, deadline=None, database=None)
D0, D1, D2 = "0" * 32, "1" * 32, "a" * 32


# --- ChunkLayout ------------------------------------------------------------------------------


@pytest.mark.parametrize("size, chunk, count", [
    (0, 4, 0), (1, 4, 1), (3, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3), (16 << 20, 1 << 20, 16),
])
def test_layout_count(size, chunk, count):
    assert ChunkLayout(size, chunk).count == count


def test_layout_bounds_and_length_with_short_last_chunk():
    layout = ChunkLayout(10, 4)
    assert [layout.bounds(i) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert [layout.length(i) for i in range(3)] == [4, 4, 2]


def test_layout_last_chunk_is_full_on_exact_multiple():
    layout = ChunkLayout(12, 4)
    assert layout.bounds(2) == (8, 12)
    assert layout.length(2) == 4


@pytest.mark.parametrize("index", [-1, 3, 100])
def test_layout_bounds_rejects_indexes_outside_the_file(index):
    with pytest.raises(IndexError, match="outside 0..2"):
        ChunkLayout(10, 4).bounds(index)


def test_empty_file_has_no_chunk_bounds():
    with pytest.raises(IndexError):
        ChunkLayout(0, 4).bounds(0)


@pytest.mark.parametrize("size, chunk", [(-1, 4), (10, 0), (10, -4)])
def test_layout_rejects_bad_sizes(size, chunk):
    with pytest.raises(ValueError, match="bad layout"):
        ChunkLayout(size, chunk)


@pytest.mark.parametrize("offset, length, expected", [
    (0, 10, [0, 1, 2]),     # whole file
    (0, 1, [0]),
    (3, 2, [0, 1]),         # straddles a boundary
    (4, 4, [1]),            # exactly one chunk
    (4, 5, [1, 2]),
    (7, 1, [1]),
    (8, 2, [2]),            # the short last chunk
    (9, 100, [2]),          # past EOF is clipped
    (0, 1000, [0, 1, 2]),
    (10, 5, []),            # starts at EOF
    (50, 5, []),            # starts past EOF
    (5, 0, []),             # empty range
    (0, 0, []),
    (3, -2, []),            # negative length
])
def test_chunks_for(offset, length, expected):
    assert list(ChunkLayout(10, 4).chunks_for(offset, length)) == expected


def test_chunks_for_on_an_empty_file_is_empty():
    assert list(ChunkLayout(0, 4).chunks_for(0, 10)) == []


def test_chunks_for_exact_multiple_does_not_add_a_chunk():
    layout = ChunkLayout(12, 4)
    assert list(layout.chunks_for(0, 12)) == [0, 1, 2]
    assert list(layout.chunks_for(8, 4)) == [2]
    assert list(layout.chunks_for(0, 8)) == [0, 1]


@FAST
@given(size=st.integers(0, 2000), chunk_size=st.integers(1, 300),
       offset=st.integers(0, 2500), length=st.integers(0, 2500))
def test_chunks_for_covers_exactly_the_requested_bytes(size, chunk_size, offset, length):
    layout = ChunkLayout(size, chunk_size)
    indexes = list(layout.chunks_for(offset, length))
    wanted = set(range(offset, min(offset + length, size)))
    covered: set[int] = set()
    for i in indexes:
        start, end = layout.bounds(i)  # every index is a real chunk
        chunk_bytes = set(range(start, end))
        assert chunk_bytes & wanted, f"chunk {i} holds none of the requested bytes"
        covered |= chunk_bytes
    assert wanted <= covered
    assert indexes == sorted(set(indexes))  # ascending, no duplicates


@FAST
@given(chunk_size=st.integers(1, 10**6), count=st.integers(0, 50), tail=st.integers(0, 10**6))
def test_chunks_tile_the_file(chunk_size, count, tail):
    size = count * chunk_size + tail % chunk_size
    layout = ChunkLayout(size, chunk_size)
    assert sum(layout.length(i) for i in range(layout.count)) == size
    if layout.count:
        assert layout.bounds(0)[0] == 0
        assert layout.bounds(layout.count - 1)[1] == size
        assert all(0 < layout.length(i) <= chunk_size for i in (0, layout.count - 1))


# --- FileIdentity, digests ------------------------------------------------------------------------


def test_identity_key_is_stable_and_filesystem_safe():
    ident = FileIdentity("s3://b/model.safetensors", '"abc-3"', 123)
    key = ident.key()
    assert key == FileIdentity("s3://b/model.safetensors", '"abc-3"', 123).key()
    assert len(key) == 32 and all(c in "0123456789abcdef" for c in key)


def test_identity_key_is_pinned():
    # The key names directories on disk: changing it orphans every cache on every node.
    assert FileIdentity("s3://b/k", "e", 1).key() == digest(b"s3://b/k\0e\x001")


@pytest.mark.parametrize("other", [
    FileIdentity("s3://b/other", "etag1", 100),
    FileIdentity("s3://b/k", "etag2", 100),
    FileIdentity("s3://b/k", "etag1", 101),
])
def test_identity_key_changes_with_uri_etag_or_size(other):
    assert FileIdentity("s3://b/k", "etag1", 100).key() != other.key()


def test_identity_key_does_not_confuse_field_boundaries():
    assert FileIdentity("s3://b/k1", "2", 3).key() != FileIdentity("s3://b/k", "12", 3).key()


def test_digest_is_xxh3_128_hex_of_any_buffer():
    data = b"hello coldbrew"
    assert digest(data) == digest(bytearray(data)) == digest(memoryview(data))
    assert len(digest(data)) == 32
    assert digest(data) != digest(data + b"!")


# --- Manifest ------------------------------------------------------------------------------------


def test_new_manifest_has_one_unknown_digest_per_chunk():
    m = Manifest(FileIdentity("s3://b/k", "e", 10), 4)
    assert m.digests == [None, None, None]
    assert not m.complete
    assert m.layout == ChunkLayout(10, 4)


def test_manifest_json_round_trip():
    m = Manifest(FileIdentity("s3://b/k", '"e-2"', 10), 4, [D0, None, D2])
    data = json.loads(m.dumps())
    assert data == {"format": 1, "uri": "s3://b/k", "etag": '"e-2"', "size": 10,
                    "chunk_size": 4, "digests": [D0, None, D2], "sha1": [None, None, None]}
    back = Manifest.from_json(data)
    assert back == m
    assert back.identity == m.identity


def test_manifest_complete_when_every_digest_known():
    assert Manifest(FileIdentity("u", "e", 8), 4, [D0, D1]).complete
    assert Manifest(FileIdentity("u", "e", 0), 4).complete  # an empty file has nothing to fetch


def test_manifest_rejects_wrong_digest_count():
    with pytest.raises(ValueError, match="has 2 digests for 3 chunks"):
        Manifest(FileIdentity("s3://b/k", "e", 10), 4, [D0, D1])


def test_manifest_from_json_rejects_other_formats():
    data = Manifest(FileIdentity("u", "e", 4), 4).to_json()
    for bad in (2, None, "1"):
        with pytest.raises(ValueError, match="unsupported manifest format"):
            Manifest.from_json({**data, "format": bad})


def test_manifest_from_json_rejects_inconsistent_digests():
    data = Manifest(FileIdentity("u", "e", 10), 4).to_json()
    with pytest.raises(ValueError, match="digests"):
        Manifest.from_json({**data, "digests": [D0]})


def test_manifest_from_json_rejects_missing_fields():
    data = Manifest(FileIdentity("u", "e", 10), 4).to_json()
    del data["etag"]
    with pytest.raises(KeyError):
        Manifest.from_json(data)


# --- the digest journal ---------------------------------------------------------------------------


def test_journal_line_format():
    assert journal_line(7, D2) == b"7 " + b"a" * 32 + b"\n"


def test_parse_journal_round_trip():
    lines = [journal_line(0, D0), journal_line(2, D2), journal_line(1, D1)]
    assert parse_journal(lines, 3) == {0: D0, 1: D1, 2: D2}


def test_parse_journal_ignores_a_torn_last_line():
    torn = journal_line(1, D1)[:20]
    assert parse_journal([journal_line(0, D0), torn], 3) == {0: D0}


@pytest.mark.parametrize("garbage", [
    b"", b"\n", b"hello world\n", b"x " + b"a" * 32 + b"\n", b"-1 " + b"a" * 32 + b"\n",
    b"1 " + b"a" * 31 + b"\n", b"1 " + b"a" * 33 + b"\n", b"1 " + b"a" * 32 + b" extra\n",
    b"1\n", b"\xff\xfe " + b"a" * 32 + b"\n",
])
def test_parse_journal_ignores_garbage_lines(garbage):
    assert parse_journal([garbage, journal_line(0, D0)], 3) == {0: D0}


def test_replay_journal_the_last_line_per_chunk_wins():
    lines = [journal_line(0, D0), journal_line(1, D1), drop_line(1), journal_line(2, D2),
             drop_line(2), journal_line(2, D2), drop_line(0)]
    digests, present = replay_journal(lines, 3)
    assert present == {2}
    assert digests == {0: D0, 1: D1, 2: D2}, "a dropped chunk's digest is still known"


@pytest.mark.parametrize("garbage", [b"1 -\n"[:2], b"- 1\n", b"1 --\n", b"9 -\n", b"1 " + b"a" * 31 + b"\n"])
def test_replay_journal_ignores_what_does_not_parse(garbage):
    digests, present = replay_journal([journal_line(1, D1), garbage], 3)
    assert (digests, present) == ({1: D1}, {1})


def test_parse_journal_ignores_out_of_range_indexes():
    lines = [journal_line(0, D0), journal_line(3, D1), journal_line(99, D2)]
    assert parse_journal(lines, 3) == {0: D0}
    assert parse_journal(lines, 0) == {}


def test_parse_journal_reads_a_binary_file_object(tmp_path):
    path = tmp_path / "journal"
    path.write_bytes(journal_line(0, D0) + journal_line(1, D1) + b"2 abc")
    with open(path, "rb") as f:
        assert parse_journal(f, 3) == {0: D0, 1: D1}


# --- eviction policy ------------------------------------------------------------------------------


def test_capacity_is_the_size_limit_when_disk_has_room():
    assert capacity_bytes(size_limit=100, used=10, free_on_disk=1000, reserve=50) == 100


def test_capacity_never_eats_into_the_reserve():
    assert capacity_bytes(size_limit=1000, used=100, free_on_disk=200, reserve=50) == 250


def test_capacity_is_never_negative():
    assert capacity_bytes(size_limit=1000, used=0, free_on_disk=10, reserve=50) == 0


def C(key, nbytes, last_used, pinned=False):
    return Candidate(key, nbytes, last_used, pinned)


def test_victims_are_least_recently_used_first():
    cands = [C("new", 10, 3.0), C("old", 10, 1.0), C("mid", 10, 2.0)]
    assert [c.key for c in choose_victims(cands, 30)] == ["old", "mid", "new"]


def test_victims_stop_once_enough_bytes_are_freed():
    cands = [C("a", 10, 1.0), C("b", 10, 2.0), C("c", 10, 3.0)]
    assert [c.key for c in choose_victims(cands, 15)] == ["a", "b"]
    assert [c.key for c in choose_victims(cands, 10)] == ["a"]


def test_victims_ties_broken_by_key():
    cands = [C("b", 10, 1.0), C("a", 10, 1.0)]
    assert [c.key for c in choose_victims(cands, 10)] == ["a"]


def test_victims_skip_pinned_and_empty_files():
    cands = [C("pinned", 100, 0.0, pinned=True), C("empty", 0, 0.5), C("ok", 10, 1.0)]
    assert [c.key for c in choose_victims(cands, 50)] == ["ok"]


def test_victims_fewer_than_needed_when_pins_block():
    cands = [C("p1", 100, 0.0, True), C("a", 5, 1.0), C("p2", 100, 2.0, True)]
    chosen = choose_victims(cands, 50)
    assert [c.key for c in chosen] == ["a"]
    assert sum(c.bytes for c in chosen) < 50


def test_no_victims_when_nothing_is_needed():
    cands = [C("a", 10, 1.0)]
    assert choose_victims(cands, 0) == []
    assert choose_victims(cands, -5) == []
    assert choose_victims([], 10) == []


candidates_st = st.lists(
    st.builds(Candidate, key=st.text("abcdef", min_size=1, max_size=4),
              bytes=st.integers(0, 100), last_used=st.floats(0, 100), pinned=st.booleans()),
    max_size=12, unique_by=lambda c: c.key)


@FAST
@given(cands=candidates_st, need=st.integers(-10, 700))
def test_victims_property(cands, need):
    chosen = choose_victims(cands, need)
    assert not any(c.pinned for c in chosen)
    assert not any(c.bytes == 0 for c in chosen)
    assert len({c.key for c in chosen}) == len(chosen)
    freed = sum(c.bytes for c in chosen)
    evictable = [c for c in cands if not c.pinned and c.bytes > 0]
    if need <= 0:
        assert chosen == []
    elif freed < need:
        assert sorted(c.key for c in chosen) == sorted(c.key for c in evictable)
    else:  # enough: and no more than needed (dropping the last would not be enough)
        assert freed - chosen[-1].bytes < need
    # LRU: every chosen file was used no later than every evictable file left behind
    left = [c for c in evictable if c not in chosen]
    if chosen and left:
        assert max(c.last_used for c in chosen) <= min(c.last_used for c in left)


# --- retry policy -------------------------------------------------------------------------------


@FAST
@given(n=st.integers(0, 60), seed=st.integers(0, 2**32))
def test_retry_delay_is_between_half_ceiling_and_ceiling(n, seed):
    policy = RetryPolicy(attempts=8, base_delay_s=0.1, max_delay_s=5.0)
    ceiling = min(5.0, 0.1 * 2**n)
    d = policy.delay_s(n, random.Random(seed))
    assert ceiling / 2 <= d <= ceiling
    assert d <= policy.max_delay_s


def test_retry_delay_grows_then_caps():
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=8.0)

    class Top(random.Random):
        def uniform(self, a, b):
            return b

    class Bottom(random.Random):
        def uniform(self, a, b):
            return a

    assert [policy.delay_s(n, Top()) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert [policy.delay_s(n, Bottom()) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_retry_delay_is_jittered():
    policy = RetryPolicy()
    rng = random.Random(1)
    assert len({policy.delay_s(3, rng) for _ in range(20)}) > 1


def test_retry_delay_for_a_very_late_retry_is_capped_not_an_overflow():
    assert RetryPolicy(attempts=5000).delay_s(1100, random.Random(0)) <= 5.0


class Flaky:
    """An async attempt that fails with the given errors, then returns 'ok'."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.fixture
def sleeps(monkeypatch):
    """Record retry pauses instead of sleeping them."""
    recorded: list[float] = []

    async def fake_sleep(s):
        recorded.append(s)

    monkeypatch.setattr(retry_mod.asyncio, "sleep", fake_sleep)
    return recorded


def run(coro):
    return asyncio.run(coro)


def test_with_retries_returns_at_once_on_success(sleeps):
    attempt = Flaky()
    assert run(with_retries(attempt, RetryPolicy(), what="GET x")) == "ok"
    assert attempt.calls == 1
    assert sleeps == []


def test_with_retries_retries_transient_errors_then_succeeds(sleeps):
    attempt = Flaky(TransientOriginError("503", "5xx"), TransientOriginError("slow", "slowdown"))
    seen: list[tuple[str, int, float]] = []
    result = run(with_retries(attempt, RetryPolicy(attempts=5, base_delay_s=0.1), what="GET x",
                              on_retry=lambda e, n, pause: seen.append((e.reason, n, pause)),
                              rng=random.Random(0)))
    assert result == "ok"
    assert attempt.calls == 3
    assert [(r, n) for r, n, _ in seen] == [("5xx", 1), ("slowdown", 2)]
    assert [p for _, _, p in seen] == sleeps  # on_retry is told the pause actually slept
    assert 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2


def test_with_retries_gives_up_after_attempts(sleeps):
    errors = [TransientOriginError(f"boom {i}") for i in range(4)]
    attempt = Flaky(*errors)
    numbers: list[int] = []
    with pytest.raises(OriginUnavailable) as info:
        run(with_retries(attempt, RetryPolicy(attempts=4), what="GET s3://b/k bytes 0-15",
                         on_retry=lambda e, n, p: numbers.append(n)))
    assert attempt.calls == 4
    assert numbers == [1, 2, 3]   # no retry announced after the last attempt
    assert len(sleeps) == 3
    msg = str(info.value)
    assert msg.startswith("GET s3://b/k bytes 0-15: ")
    assert "after 4 attempts" in msg
    assert "last error: boom 3" in msg
    assert info.value.__cause__ is errors[3]


def test_with_retries_single_attempt_means_no_retry(sleeps):
    attempt = Flaky(TransientOriginError("503"))
    with pytest.raises(OriginUnavailable, match="after 1 attempts"):
        run(with_retries(attempt, RetryPolicy(attempts=1), what="GET x"))
    assert attempt.calls == 1
    assert sleeps == []


@pytest.mark.parametrize("error", [ObjectNotFound("no such key"), AccessDenied("403"),
                                   ValueError("a bug")])
def test_with_retries_does_not_retry_permanent_errors(sleeps, error):
    attempt = Flaky(error)
    called: list[int] = []
    with pytest.raises(type(error)) as info:
        run(with_retries(attempt, RetryPolicy(attempts=5), what="GET x",
                         on_retry=lambda e, n, p: called.append(n)))
    assert info.value is error
    assert attempt.calls == 1
    assert called == [] and sleeps == []


def test_with_retries_permanent_error_after_transient_one_propagates(sleeps):
    attempt = Flaky(TransientOriginError("503"), ObjectNotFound("gone"))
    with pytest.raises(ObjectNotFound):
        run(with_retries(attempt, RetryPolicy(attempts=5), what="GET x"))
    assert attempt.calls == 2


def test_with_retries_really_sleeps_with_tiny_delays():
    attempt = Flaky(TransientOriginError("503"), TransientOriginError("503"))
    policy = RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.002)
    assert run(with_retries(attempt, policy, what="GET x")) == "ok"
    assert attempt.calls == 3


def test_object_mtimes_come_from_datetimes_numbers_or_the_headers_own_text():
    """The data plane leaves LastModified as the HTTP header's text (agent/s3data.py)."""
    import datetime

    from coldbrew.agent.origin.origin import _mtime_of

    when = datetime.datetime(2026, 12, 1, 22, 0, 5, tzinfo=datetime.UTC)
    assert _mtime_of({"LastModified": "Tue, 01 Dec 2026 22:00:05 GMT"}) == when.timestamp()
    assert _mtime_of({"LastModified": when}) == when.timestamp()
    assert _mtime_of({"mtime": 12.5}) == 12.5
    assert _mtime_of({"LastModified": "not a date"}) is None and _mtime_of({}) is None
