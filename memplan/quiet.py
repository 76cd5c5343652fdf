"""Hide the lines native code writes straight to stderr (fd 2) that no Python setting silences.

torch.profiler's kineto prints ``USDT: ... profiler_start`` / ``profiler_stop`` on every profiled
step, and c10's CPU allocator warns once about blocks allocated before profiling started;
``memplan measure --real`` and the benchmarks would drown their own output in them.

>>> [bool(NATIVE_NOISE.search(line)) for line in ("USDT:2026-12-02 12:00 profiler_start", "hello",
...  "[W1202 06:08:49.5 CPUAllocator.cpp:245] Memory block of unknown size was allocated before the profiling started")]
[True, False, True]
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

NATIVE_NOISE = re.compile(r"^USDT:|CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated before the "
                          r"profiling started")


@contextlib.contextmanager
def drop_native_lines(noise: re.Pattern = NATIVE_NOISE) -> Iterator[None]:
    """Collect fd 2 while inside, then write it back to stderr without the lines ``noise`` matches.

    Output meant to show while inside (a progress bar) must go to a duplicate of fd 2 made before.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not noise.search(line)))
            sys.stderr.flush()
