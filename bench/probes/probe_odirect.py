"""Probe: what writing 1 GiB of 16 MiB chunk files costs, through the page cache vs O_DIRECT.

    python bench/probes/probe_odirect.py [DIR]     (default: a temp dir on the same disk as /tmp)

Eight threads write 64 files of 16 MiB (the agent's chunk size and fetch width), twice
each way, and print wall and CPU seconds. Groundwork for the agent's (c)/(b) bar
(bench/RESULTS.md): on these VMs the kernel's copy into fresh page-cache memory, not
the disk, is what a buffered write costs.
"""

from __future__ import annotations

import mmap
import os
import shutil
import sys
import tempfile
import threading
import time

FILES, SIZE, THREADS = 64, 16 << 20, 8


def run(root: str, direct: bool, buffers: list[mmap.mmap]) -> None:
    todo = iter(range(FILES))
    lock = threading.Lock()

    def writer(k: int) -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
            fd = os.open(os.path.join(root, str(i)), flags, 0o644)
            try:
                os.write(fd, buffers[k])  # mmap memory is page-aligned, as O_DIRECT needs
            finally:
                os.close(fd)

    wall, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{'O_DIRECT' if direct else 'buffered':>9}: {time.perf_counter() - wall:.2f} s wall, "
          f"{time.process_time() - cpu:.2f} CPU-s for {FILES * SIZE >> 20} MiB", flush=True)


def main() -> None:
    root = tempfile.mkdtemp(prefix="coldbrew-odirect-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    buffers = [mmap.mmap(-1, SIZE) for _ in range(THREADS)]
    for b in buffers:
        b.write(os.urandom(1 << 20) * (SIZE >> 20))
    try:
        for direct in (False, True, False, True):
            run(root, direct, buffers)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
