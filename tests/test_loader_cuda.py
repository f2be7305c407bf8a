"""The CUDA path: pinned ring + side stream. Skipped only where torch has no CUDA device.

Results must equal ``safetensors.torch.load_file`` (compared on the host), from a
local file, from S3 with write-through (ring buffers are held until their bytes
are on disk), and streamed; host memory stays at the ring's size, not the model's.
"""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest
import torch
from test_loader_files import assert_same, cast_like_the_loader, make_file, reference, write_shards

import coldbrew.loader.sources as sources
from coldbrew.loader import iter_tensors, load_dir, load_file, wait_writeback

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def small_spans(monkeypatch):
    monkeypatch.setattr(sources.Source, "span_bytes", 64 * KiB)


def on_cuda(sd):
    assert all(t.device.type == "cuda" for t in sd.values())


@needs_cuda
@pytest.mark.parametrize("seed", range(12))
def test_local_file_to_cuda(tmp_path, small_spans, seed):
    path = tmp_path / "f.safetensors"
    path.write_bytes(make_file(seed, big=True))
    ref, meta = reference(path)
    got = load_file(path, device="cuda", cache_dir=False, buffer_bytes=128 * KiB)
    on_cuda(got)
    assert_same(got, ref)
    assert got.metadata == meta


@needs_cuda
def test_sharded_dir_streamed_to_cuda_with_cast(tmp_path, small_spans):
    write_shards(tmp_path / "m", 3, 3, index=True)
    ref = {}
    for shard in sorted((tmp_path / "m").glob("*.safetensors")):
        ref.update(reference(shard)[0])
    got = {}
    for name, t in iter_tensors(tmp_path / "m", device="cuda:0", cache_dir=False, budget_bytes=1,
                                buffer_bytes=128 * KiB):
        got[name] = t  # usable at once on the current stream
        assert t.device == torch.device("cuda", 0)
    assert_same(got, ref)
    cast = load_dir(tmp_path / "m", device="cuda", dtype=torch.float16, cache_dir=False)
    assert_same(cast, cast_like_the_loader(ref, torch.float16))


@needs_cuda
def test_s3_to_cuda_with_write_through(loader_env, s3, bucket, s3_client, monkeypatch, tmp_path, small_spans):
    data = make_file(5, count=12, big=True)
    s3_client.put_object(Bucket=bucket, Key="m.safetensors", Body=data)
    (tmp_path / "m.safetensors").write_bytes(data)
    ref, _ = reference(tmp_path / "m.safetensors")
    uri = f"s3://{bucket}/m.safetensors"
    cold = load_file(uri, device="cuda", cache_dir=tmp_path / "c", buffer_bytes=128 * KiB)
    assert_same(cold, ref)
    assert wait_writeback(30)
    warm = load_file(uri, device="cuda", cache_dir=tmp_path / "c", buffer_bytes=128 * KiB)
    assert_same(warm, ref)
    assert set(warm.stats["bytes_by_source"]) == {"cache"}


@needs_cuda
def test_host_memory_stays_at_the_ring_size(tmp_path):
    # 512 MiB of weights through a 64 MiB ring: host RSS must not grow by the model's size.
    # Written by another process, so this one's peak RSS starts small.
    path = tmp_path / "big.safetensors"
    subprocess.run([sys.executable, "-c", (
        "import sys, torch; from safetensors.torch import save_file; "
        "save_file({f'w{i}': torch.full((32 << 20,), i, dtype=torch.bfloat16) for i in range(8)}, "
        "sys.argv[1])"), str(path)], check=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB
    total = 0
    for name, t in iter_tensors(path, device="cuda", cache_dir=False, buffer_bytes=64 * MiB):
        assert t[0].item() == int(name[1:])
        total += t.numel() * 2
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB - before
    assert total == 512 * MiB
    assert grew < 200 * MiB, f"host RSS grew by {grew / MiB:.0f} MiB"


# --- the ring's logic on any machine: a CPU stand-in for the CUDA calls ---------------------


class FakeEvent:
    """Completes a moment after it is recorded; counts waits, like a real event would need."""

    def __init__(self) -> None:
        self.at = None

    def record(self, stream) -> None:
        import time

        self.at = time.monotonic() + 0.002

    def query(self) -> bool:
        import time

        return self.at is not None and time.monotonic() >= self.at

    def synchronize(self) -> None:
        import time

        while not self.query():
            time.sleep(0.0005)


class FakeStream:
    def synchronize(self) -> None:
        pass

    def wait_event(self, event) -> None:
        assert event.at is not None, "waited on an event never recorded"


class FakeCuda:
    """The CUDA calls of CudaSink, on the CPU: tensors are host tensors, pinning is plain."""

    pinned_made = 0

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def stream(device):
        return FakeStream()

    @staticmethod
    def using(stream):
        import contextlib

        return contextlib.nullcontext()

    @staticmethod
    def event():
        return FakeEvent()

    @staticmethod
    def current_stream(device):
        return FakeStream()

    @classmethod
    def pinned(cls, nbytes):
        cls.pinned_made += 1
        return torch.empty(nbytes, dtype=torch.uint8)

    @staticmethod
    def empty(shape, dtype, device):
        return torch.empty(shape, dtype=dtype)

    @staticmethod
    def record_stream(t, stream) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    import coldbrew.loader.device as device

    FakeCuda.pinned_made = 0
    monkeypatch.setattr(device, "TorchCuda", FakeCuda)
    return FakeCuda


@pytest.mark.parametrize("seed", range(8))
def test_ring_logic_with_a_cpu_stand_in(tmp_path, small_spans, fake_cuda, seed):
    path = tmp_path / "f.safetensors"
    path.write_bytes(make_file(seed, big=True))
    ref, _ = reference(path)
    got = load_file(path, device="cuda", cache_dir=False, buffer_bytes=192 * KiB)
    assert_same(got, ref)
    assert fake_cuda.pinned_made <= 3  # 192 KiB / 64 KiB spans
    streamed = dict(iter_tensors(path, device="cuda:0", cache_dir=False, budget_bytes=1,
                                 buffer_bytes=128 * KiB, dtype=torch.float16))
    assert_same(streamed, cast_like_the_loader(ref, torch.float16))


def test_ring_waits_for_write_through_with_a_cpu_stand_in(loader_env, s3, bucket, s3_client, monkeypatch,
                                                          tmp_path, small_spans, fake_cuda):
    data = make_file(5, count=12, big=True)
    s3_client.put_object(Bucket=bucket, Key="m.safetensors", Body=data)
    (tmp_path / "m.safetensors").write_bytes(data)
    ref, _ = reference(tmp_path / "m.safetensors")
    uri = f"s3://{bucket}/m.safetensors"
    assert_same(load_file(uri, device="cuda", cache_dir=tmp_path / "c", buffer_bytes=128 * KiB), ref)
    assert wait_writeback(30)
    warm = load_file(uri, device="cuda", cache_dir=tmp_path / "c", buffer_bytes=128 * KiB)
    assert_same(warm, ref)
    assert set(warm.stats["bytes_by_source"]) == {"cache"}
    assert fake_cuda.pinned_made <= 4
