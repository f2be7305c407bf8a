"""Where tensors land: CPU memory directly, or a CUDA device through a pinned ring.

A *sink* turns the engine's plan into destination memory and finished tensors:

* :class:`CpuSink` hands the sources views of the destination tensors' own
  bytes, so every byte is copied once, from the socket / page cache / chunk
  file into the tensor the caller gets (no staging buffer). Tensors are
  allocated lazily, when the first read that touches them starts.
* :class:`CudaSink` reads each span into one of a bounded set of reused pinned
  host buffers (the ring: ``buffer_bytes`` in all), then copies the span's
  pieces to their device tensors on a side stream and records an event; a
  buffer returns to the ring once its copies have run (and its bytes are on
  disk, when write-through needs them). Host memory stays at the ring's size
  whatever the model's size, and the copies of one span overlap the fetch of
  the next. Callers' streams wait on the side stream's events before they use
  a tensor (:meth:`CudaSink.hand_over`).

Both cast floating-point tensors to ``dtype`` when asked (fp8 / fp4 stay as
they are: those are quantized formats, not precisions to convert).
"""

from __future__ import annotations

import asyncio
import ctypes
from dataclasses import dataclass, field
from typing import Any

import torch

from coldbrew.loader.header import TensorEntry
from coldbrew.loader.plan import ReadSpan

#: dtypes a ``dtype=`` cast applies to.
CASTABLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
DEFAULT_BUFFER_BYTES = 256 << 20


def byte_view(flat_u8: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU uint8 tensor (no copy).

    The view does not keep the tensor alive: whoever holds the view holds the
    tensor too (the engine keeps both in one :class:`Slot`).
    """
    n = flat_u8.numel()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * n).from_address(flat_u8.data_ptr())).cast("B")


@dataclass(eq=False)
class Slot:
    """One tensor being loaded."""

    entry: TensorEntry
    dtype: torch.dtype
    shape: tuple[int, ...]
    remaining: int  # pieces still to arrive
    tensor: torch.Tensor | None = None
    flat: torch.Tensor | None = None  # the tensor's bytes, uint8, 1-d
    view: memoryview | None = None  # CPU only
    result: torch.Tensor | None = None
    event: Any = None  # CUDA: recorded after the last copy/cast of this tensor
    ready: bool = False

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or t.dtype == dtype or t.dtype not in CASTABLE:
        return t
    return t.to(dtype)


class CpuSink:
    device = torch.device("cpu")

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype

    def begin_file(self, span_bytes: int) -> None:
        return None

    def allocate(self, slot: Slot) -> None:
        slot.tensor = torch.empty(slot.shape, dtype=slot.dtype)
        slot.flat = slot.tensor.reshape(-1).view(torch.uint8)
        slot.view = byte_view(slot.flat)

    async def acquire(self, span: ReadSpan) -> Any:
        return None

    def views(self, span: ReadSpan, slots: dict[str, Slot], buffer: Any) -> list[tuple[int, memoryview]]:
        out = []
        for p in span.pieces:
            view = slots[p.tensor.name].view
            assert view is not None
            out.append((p.begin, view[p.tensor_offset:p.tensor_offset + p.nbytes]))
        return out

    def keep(self, span: ReadSpan, slots: dict[str, Slot]) -> Any:
        """What must stay alive while the span's views are in use elsewhere (write-through)."""
        return [slots[p.tensor.name].flat for p in span.pieces]

    async def after_fill(self, span: ReadSpan, slots: dict[str, Slot], buffer: Any,
                         written: asyncio.Future[None] | None) -> None:
        return None

    async def release(self, buffer: Any) -> None:
        return None

    def finish(self, slot: Slot) -> None:
        assert slot.tensor is not None
        slot.result = _cast(slot.tensor, self.dtype)
        slot.tensor = slot.flat = slot.view = None  # type: ignore[assignment]

    def hand_over(self, slot: Slot) -> torch.Tensor:
        assert slot.result is not None
        return slot.result

    def synchronize(self) -> None:
        return None


@dataclass(eq=False)
class PinnedBuffer:
    tensor: torch.Tensor
    view: memoryview
    pending: list[Any] = field(default_factory=list)


class TorchCuda:
    """The few CUDA calls the sink makes, in one place (tests stand in a CPU fake)."""

    is_available = staticmethod(torch.cuda.is_available)
    current_device = staticmethod(torch.cuda.current_device)

    @staticmethod
    def stream(device: torch.device) -> Any:
        return torch.cuda.Stream(device)

    @staticmethod
    def using(stream: Any) -> Any:
        return torch.cuda.stream(stream)

    @staticmethod
    def event() -> Any:
        return torch.cuda.Event()

    @staticmethod
    def current_stream(device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    @staticmethod
    def pinned(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    @staticmethod
    def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        with torch.cuda.device(device):
            return torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def record_stream(t: torch.Tensor, stream: Any) -> None:
        t.record_stream(stream)


class PinnedRing:
    """Reused pinned host buffers of ``buffer_size`` bytes, at most ``count`` of them."""

    def __init__(self, buffer_size: int, count: int, cuda: Any) -> None:
        self.buffer_size = buffer_size
        self.count = count
        self.cuda = cuda
        self.made = 0
        self._free: asyncio.Queue[PinnedBuffer] = asyncio.Queue()

    async def get(self) -> PinnedBuffer:
        if self._free.empty() and self.made < self.count:
            self.made += 1
            t = self.cuda.pinned(self.buffer_size)
            return PinnedBuffer(t, byte_view(t))
        return await self._free.get()

    def put(self, buffer: PinnedBuffer) -> None:
        self._free.put_nowait(buffer)


class CudaSink:
    """Pinned ring + side stream. All methods but :meth:`hand_over` run on the loader's loop."""

    def __init__(self, device: torch.device, span_bytes: int, buffer_bytes: int,
                 dtype: torch.dtype | None = None, cuda: Any = None) -> None:
        self.cuda = cuda = cuda or TorchCuda
        if not cuda.is_available():
            raise RuntimeError(f"device {device} asked for, but torch.cuda is not available")
        self.device = device if device.index is not None else torch.device("cuda", cuda.current_device())
        self.dtype = dtype
        self.stream = cuda.stream(self.device)
        self.buffer_bytes = buffer_bytes
        self.rings: dict[int, PinnedRing] = {}
        self.ring = self._ring(span_bytes)

    def _ring(self, span_bytes: int) -> PinnedRing:
        if span_bytes not in self.rings:
            self.rings[span_bytes] = PinnedRing(span_bytes, max(2, self.buffer_bytes // span_bytes),
                                                self.cuda)
        return self.rings[span_bytes]

    def begin_file(self, span_bytes: int) -> None:
        """Reads of the next file are planned on ``span_bytes``: one ring buffer each."""
        self.ring = self._ring(span_bytes)

    def allocate(self, slot: Slot) -> None:
        slot.tensor = self.cuda.empty(slot.shape, slot.dtype, self.device)
        # Written on the side stream: the allocator must not reuse it before those copies ran.
        self.cuda.record_stream(slot.tensor, self.stream)
        slot.flat = slot.tensor.reshape(-1).view(torch.uint8)

    async def acquire(self, span: ReadSpan) -> PinnedBuffer | None:
        return await self.ring.get() if span.nbytes else None

    def views(self, span: ReadSpan, slots: dict[str, Slot], buffer: PinnedBuffer | None
              ) -> list[tuple[int, memoryview]]:
        if buffer is None:
            return []
        return [(span.begin, buffer.view[:span.nbytes])]

    def keep(self, span: ReadSpan, slots: dict[str, Slot]) -> Any:
        return None  # the ring buffer is held until written (after_fill)

    async def after_fill(self, span: ReadSpan, slots: dict[str, Slot], buffer: PinnedBuffer | None,
                         written: asyncio.Future[None] | None) -> None:
        if buffer is None:
            return
        with self.cuda.using(self.stream):
            for p in span.pieces:
                slot = slots[p.tensor.name]
                assert slot.flat is not None
                start = p.begin - span.begin
                slot.flat[p.tensor_offset:p.tensor_offset + p.nbytes].copy_(
                    buffer.tensor[start:start + p.nbytes], non_blocking=True)
            event = self.cuda.event()
            event.record(self.stream)
        for p in span.pieces:
            slots[p.tensor.name].event = event
        # The ring of this buffer's size, not self.ring: the next file of a load may have
        # begun (on another span size) while this one's last spans are still being read.
        buffer.pending = [event, written, self.rings[buffer.tensor.numel()]]
        asyncio.get_running_loop().create_task(self._recycle(buffer))

    async def _recycle(self, buffer: PinnedBuffer) -> None:
        event, written, ring = buffer.pending
        loop = asyncio.get_running_loop()
        if not event.query():
            await loop.run_in_executor(None, event.synchronize)
        if written is not None:
            await written
        buffer.pending = []
        ring.put(buffer)

    async def release(self, buffer: PinnedBuffer | None) -> None:
        """A span failed before its copies were issued: the buffer goes straight back."""
        if buffer is not None and not buffer.pending:
            self.rings[buffer.tensor.numel()].put(buffer)

    def finish(self, slot: Slot) -> None:
        assert slot.tensor is not None
        if self.dtype is not None and slot.tensor.dtype in CASTABLE and slot.tensor.dtype != self.dtype:
            with self.cuda.using(self.stream):
                slot.result = slot.tensor.to(self.dtype)
                self.cuda.record_stream(slot.result, self.stream)
                slot.event = self.cuda.event()
                slot.event.record(self.stream)
        else:
            slot.result = slot.tensor
        slot.tensor = slot.flat = None

    def hand_over(self, slot: Slot) -> torch.Tensor:
        """Called in the consumer's thread: its current stream waits for the tensor's copies."""
        assert slot.result is not None
        if slot.event is not None:
            self.cuda.current_stream(self.device).wait_event(slot.event)
        return slot.result

    def synchronize(self) -> None:
        self.stream.synchronize()
