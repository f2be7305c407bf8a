"""kill -9 of the agent at random points of prewarm, eviction and P2P adoption: nothing
half-written is ever served."""

from __future__ import annotations

import json
import random
import time

from support.data import put_random

from coldbrew.agent.core.manifest import digest, replay_journal

MiB = 1 << 20


def _entries(cache_dir) -> list:
    """Entry directories holding chunks. One killed mid-eviction may have lost its data file
    already (the agent's start then counts none of its chunks); it has nothing to check."""
    return [e for e in (cache_dir / "coldbrew-v2" / "files").glob("*/*")
            if (e / "meta.json").exists() and (e / "data").exists()]


def _journal(entry) -> list[bytes]:
    """An entry's journal lines; none yet if no chunk has landed (a valid state to die in)."""
    path = entry / "journal"
    return path.read_bytes().splitlines() if path.exists() else []


def _chunks_on_disk_are_whole_and_journaled(cache_dir) -> int:
    """Every chunk the journal says is present matches its digest in the data file (none
    is torn); returns how many there are."""
    count = 0
    for entry in _entries(cache_dir):
        meta = json.loads((entry / "meta.json").read_bytes())
        chunk = meta["chunk_size"]
        digests, present = replay_journal(_journal(entry), 1 << 30)
        data = (entry / "data").read_bytes()
        assert len(data) == meta["size"], "the data file has the object's size"
        for index in present:
            piece = data[index * chunk:(index + 1) * chunk]
            assert digest(piece) == digests[index], f"chunk {index} of {entry} is torn"
            count += 1
    return count


def test_kill9_during_prewarm_then_restart(bucket, s3_client, make_agent, proxy, tmp_path):
    size = 48 * MiB + 17
    data = put_random(s3_client, bucket, "m/crash.bin", size, 77)
    uri = f"s3://{bucket}/m/crash.bin"
    proxy.bandwidth = 40 * MiB  # ~1.2 s per full prewarm: room to kill it midway
    agent = make_agent(uri.rsplit("/", 2)[0], endpoint=proxy.url, start=False,
                       extra_args=["--chunk-size", "1MiB"])
    rng = random.Random(1234)
    cached_before = []
    for round_no in range(4):
        agent.start()
        tmp_dir = agent.cache_dir / "coldbrew-v2" / "tmp"
        assert not any(tmp_dir.iterdir()), "leftover temp files are cleaned at start"
        cached_before.append(_chunks_on_disk_are_whole_and_journaled(agent.cache_dir))
        # Whatever survived is served byte-exact, and is never re-fetched.
        status = agent.client.status(uri)["files"][0]
        agent.client.prewarm([uri])
        time.sleep(rng.uniform(0.1, 0.6))
        agent.kill()  # SIGKILL: no cleanup of any kind
        # Plant the debris a crash can leave, to prove start-up deals with it too.
        (tmp_dir / f"{round_no}.partial").write_bytes(b"half a chunk")
        assert status["cached_bytes"] <= size

    agent.start()
    assert not any((agent.cache_dir / "coldbrew-v2" / "tmp").iterdir())
    survived = _chunks_on_disk_are_whole_and_journaled(agent.cache_dir)
    assert survived > 0 and cached_before[-1] > 0, "the kills landed after some chunks were cached"
    proxy.reset_counts()
    done = agent.cli("prewarm", uri, "--wait", "--quiet", check=True)
    assert "prewarm done" in done.stdout
    # The rest completed without refetching what had survived.
    assert proxy.counts["response_body_bytes"] <= size - survived * MiB + MiB
    dest = tmp_path / "crash.bin"
    agent.cli("get", uri, str(dest), "--quiet", check=True)
    assert dest.read_bytes() == data
    assert agent.metric("coldbrew_corrupt_chunks_total", source="cache") == 0


def _present_runs(cache_dir) -> list[tuple[int, int]]:
    """(offset, length) runs of the chunks the journal says are present."""
    runs: list[tuple[int, int]] = []
    for entry in _entries(cache_dir):
        meta = json.loads((entry / "meta.json").read_bytes())
        chunk, size = meta["chunk_size"], meta["size"]
        _, present = replay_journal(_journal(entry), 1 << 30)
        for index in sorted(present):
            begin, end = index * chunk, min((index + 1) * chunk, size)
            if runs and runs[-1][0] + runs[-1][1] == begin:
                runs[-1] = (runs[-1][0], runs[-1][1] + end - begin)
            else:
                runs.append((begin, end - begin))
    return runs


def _full_check(cache_dir, client, uri: str, data: bytes, round_no: int) -> int:
    """The check after a crash, on disk and as served: every chunk the journal says is present
    is whole, and the agent serves exactly those bytes. Returns how many chunks there are."""
    count = _chunks_on_disk_are_whole_and_journaled(cache_dir)
    for offset, length in _present_runs(cache_dir):
        got = b"".join(client.read(uri, offset, length))
        assert got == data[offset:offset + length], f"round {round_no}: bad bytes served"
    return count


def _wait_healthy(client, log, timeout_s: float = 20.0) -> None:
    from coldbrew.agent.errors import ColdbrewError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.health()
            return
        except ColdbrewError:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)


def _gone(pid: int, timeout_s: float = 10.0) -> None:
    import os

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.005)
    raise AssertionError(f"agent {pid} did not die")


KILLS = 100


def test_kill9_at_a_hundred_random_points(bucket, s3_client, agent_env, proxy, tmp_path):
    """kill -9 at KILLS random points of prewarm (chunks landing in the data file) and of
    eviction; after each, a restart and a full check: every chunk the journal says is present
    is whole on disk, and the agent serves those bytes exactly. Agents come from a zygote
    (tests/support/zygote.py) so the loop is fast, not small."""
    import os
    import signal
    import threading

    from support.zygote import Zygote

    from coldbrew.agent.config import admin_socket_for
    from coldbrew.agent.control.client import AgentClient

    size = 6 * MiB + 321
    data = put_random(s3_client, bucket, "k/model.bin", size, 5)
    uri = f"s3://{bucket}/k/model.bin"
    proxy.bandwidth = 24 * MiB  # a full prewarm takes ~0.25 s: kills land all along it
    sock, cache_dir = tmp_path / "a.sock", tmp_path / "cache"
    argv = ["agent", "--origin", f"s3://{bucket}", "--cache-dir", str(cache_dir), "--socket",
            str(sock), "--metrics-address", "127.0.0.1:0", "--log-format", "json",
            "--chunk-size", "64KiB", "--retry-base-delay-s", "0.01"]
    zygote = Zygote({**os.environ, **agent_env, "AWS_ENDPOINT_URL": proxy.url})
    client, admin = AgentClient(sock, timeout_s=10), AgentClient(admin_socket_for(sock), timeout_s=10)
    rng = random.Random(99)
    seen, evicted_rounds, pid = set(), 0, 0
    try:
        for round_no in range(KILLS + 1):
            pid = zygote.spawn(argv, tmp_path / "agent.log")
            _wait_healthy(client, tmp_path / "agent.log")
            seen.add(_full_check(cache_dir, client, uri, data, round_no))
            if round_no == KILLS:
                break
            client.prewarm([uri])
            time.sleep(rng.uniform(0.0, 0.3))
            if rng.random() < 0.3:  # and kill it while it evicts
                evicted_rounds += 1
                threading.Thread(target=_quietly, args=(admin.evict, uri), daemon=True).start()
                time.sleep(rng.uniform(0.0, 0.01))
            os.kill(pid, signal.SIGKILL)
            _gone(pid)
        _served_whole(client, AgentClient(sock), uri, data, tmp_path / "whole.bin")
    finally:
        _end(zygote, pid)
    # The kills landed at many different points: before, during and after the landings.
    assert len(seen) >= 10 and 0 in seen and evicted_rounds >= 10, (sorted(seen), evicted_rounds)


def _served_whole(client, getter, uri: str, data: bytes, dest) -> None:
    """After the last restart: a prewarm completes the file, and it is served byte-exact."""
    client.prewarm([uri])
    getter.get(uri, dest)
    assert dest.read_bytes() == data


def _end(zygote, pid: int) -> None:
    """The last agent killed (if it still runs), and the zygote gone."""
    import os
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    zygote.close()


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        pass  # the agent was killed under it: that is the point


P2P_KILLS = 25


def test_kill9_during_p2p_adoption(bucket, s3_client, make_agent, agent_env, proxy, tmp_path):
    """kill -9 of an agent at P2P_KILLS random points while it takes a file from a peer:
    libtorrent writes pieces straight into the cache's data file and the agent adopts each one
    (reads it back, checks its hash, journals it). After each kill, a restart and the full
    check: a piece libtorrent wrote but the agent had not journaled is never served."""
    import os
    import shutil
    import signal

    from support.zygote import Zygote

    from coldbrew.agent.control.client import AgentClient
    from coldbrew.agent.devtools.locals3 import free_port_pair

    size = 6 * MiB + 555
    data = put_random(s3_client, bucket, "p/model.bin", size, 8)
    uri = f"s3://{bucket}/p/model.bin"
    seed_port, port = free_port_pair(), free_port_pair()
    common = ["--chunk-size", "64KiB", "--p2p-address", "127.0.0.1", "--peers-refresh-s", "0.2"]
    # The seed reads S3 directly.
    seed = make_agent(f"s3://{bucket}", extra_args=[*common, "--p2p-port", str(seed_port),
                      "--peers", f"127.0.0.1:{port}"], name="seed")
    seed.cli("publish", uri, "--chunk-size", "64KiB", "--quiet", check=True)
    seed.cli("prewarm", uri, "--wait", "--quiet", check=True)
    sock, cache_dir = tmp_path / "leech.sock", tmp_path / "leech-cache"
    argv = ["agent", "--origin", f"s3://{bucket}", "--cache-dir", str(cache_dir), "--socket",
            str(sock), "--metrics-address", "127.0.0.1:0", "--log-format", "json", *common,
            "--p2p-port", str(port), "--peers", f"127.0.0.1:{seed_port}"]
    # The leech reaches S3 only through the counting proxy: the proof its bytes came from the seed.
    zygote = Zygote({**os.environ, **agent_env, "AWS_ENDPOINT_URL": proxy.url})
    client = AgentClient(sock, timeout_s=10)
    log = tmp_path / "leech.log"
    rng = random.Random(7)
    seen, pid = set(), 0
    try:
        proxy.reset_counts()
        for round_no in range(P2P_KILLS + 1):
            pid = zygote.spawn(argv, log)
            _wait_healthy(client, log)
            seen.add(_full_check(cache_dir, client, uri, data, round_no))
            if round_no == P2P_KILLS:
                break
            _wait_for_peer(client, log)
            client.prewarm([uri])
            # Kill at a random point of the transfer, by its progress rather than the clock
            # (a transfer took 0.3 s in one run of this test and 2.5 s in another).
            _until_cached(client, uri, 0 if rng.random() < 0.1 else rng.randrange(size))
            os.kill(pid, signal.SIGKILL)
            _gone(pid)
            if rng.random() < 0.7:  # most rounds adopt from the start (a new node); the rest resume
                shutil.rmtree(cache_dir)
        origin_bytes = proxy.counts["response_body_bytes"]
        _served_whole(client, client, uri, data, tmp_path / "whole.bin")
    finally:
        _end(zygote, pid)
    # The kills landed before, during and after adoption, and the bytes were the seed's.
    assert len(seen) >= 4 and 0 in seen and max(seen) > size // (64 << 10) // 2, sorted(seen)
    assert origin_bytes < size // 2, origin_bytes  # manifests and HEADs: the data was the seed's


def _until_cached(client, uri: str, target: int, timeout_s: float = 10.0) -> None:
    """Until at least ``target`` bytes of ``uri`` are cached (0: at once)."""
    deadline = time.monotonic() + timeout_s
    while target and time.monotonic() < deadline:
        if client.status(uri)["files"][0]["cached_bytes"] >= target:
            return
        time.sleep(0.005)


def _wait_for_peer(client, log, timeout_s: float = 20.0) -> None:
    """Until the agent knows its peer, so the prewarm asks the peer first."""
    deadline = time.monotonic() + timeout_s
    while not client.status()["agent"]["p2p"]["peers"]:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
