"""What the ``memplan`` command says on stderr while it works: progress and notes.

On a terminal each stage is a spinner; otherwise (CI logs, pipes) a plain line when it starts and
one with its duration when it ends, so a long run is never silent.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator

from rich.console import Console


class Progress:
    """Stage messages on ``console`` (stderr): a spinner when ``live``, else timed plain lines."""

    def __init__(self, console: Console, *, live: bool, quiet: bool = False):
        self.console, self.live, self.quiet = console, live, quiet

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[Callable[[str], None]]:
        """Run a stage called ``text``; yields ``update(text)`` for the spinner (a no-op in plain mode)."""
        if self.quiet:
            yield lambda _text: None
        elif self.live:
            with self.console.status(text, spinner="dots") as status:
                yield status.update
        else:
            self.line(f"{text} ...")
            t0 = time.perf_counter()
            yield lambda _text: None
            self.line(f"{text}: done in {time.perf_counter() - t0:.1f} s")

    def line(self, text: str) -> None:
        """One plain progress line (dropped under ``--quiet``)."""
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def notes_to(console: Console) -> Iterator[None]:
    """Python warnings raised inside become one-line notes on ``console`` (each text once)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen = set()
    for w in caught:
        text = str(w.message).strip().splitlines()[0]
        if text not in seen:
            seen.add(text)
            console.print(f"[yellow]note:[/] {text}", markup=True, soft_wrap=True)
