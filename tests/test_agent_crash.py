"""kill -9 of the agent during prewarm, at random points: nothing half-written is ever served."""

from __future__ import annotations

import json
import random
import time

from support.data import put_random

from coldbrew.agent.core.manifest import digest, replay_journal

MiB = 1 << 20


def _chunks_on_disk_are_whole_and_journaled(cache_dir) -> int:
    """Every chunk the journal says is present matches its digest in the data file (none
    is torn); returns how many there are."""
    count = 0
    for entry in (cache_dir / "coldbrew-v2" / "files").glob("*/*"):
        meta = json.loads((entry / "meta.json").read_bytes())
        chunk = meta["chunk_size"]
        digests, present = replay_journal((entry / "journal").read_bytes().splitlines(), 1 << 30)
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
