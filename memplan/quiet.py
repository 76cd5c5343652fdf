"""Hide the lines native code writes straight to stderr (fd 2) that no Python setting silences.

torch.profiler's kineto prints ``USDT: ... profiler_start`` / ``profiler_stop`` on every profiled
step; ``memplan measure --real`` and the benchmarks would drown their own output in them.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

NATIVE_NOISE = ("USDT:",)


@contextlib.contextmanager
def drop_native_lines(prefixes: tuple[str, ...] = NATIVE_NOISE) -> Iterator[None]:
    """Collect fd 2 while inside, then write it back to stderr without the lines starting with ``prefixes``.

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
            sys.stderr.write("".join(line for line in lines if not line.startswith(prefixes)))
            sys.stderr.flush()
