"""Output files of the ``memplan`` command: checked before any planning, written all or nothing.

``check_output_path`` rejects a path that could not be written (missing or unwritable folder, a
folder in its place, a wrong suffix) with the fix; ``write_all`` writes every file to a temporary
name beside its target and renames them only when all succeeded, so a failed plot leaves no plan.

>>> check_output_path("plan.txt", suffixes=(".json",), option="--out")
Traceback (most recent call last):
...
memplan.errors.MemplanError: --out plan.txt: the suffix must be .json (got '.txt'); e.g. --out plan.json
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ..errors import MemplanError

Writer = Callable[[Path], None]


def plot_suffixes() -> tuple[str, ...]:
    """File suffixes matplotlib can save to, the common ones first (.png, .pdf, .svg, ...)."""
    from matplotlib.figure import Figure
    found = {f".{s}" for s in Figure().canvas.get_supported_filetypes()}
    common = [s for s in (".png", ".pdf", ".svg") if s in found]
    return tuple(common + sorted(found - set(common)))


def check_output_path(path: str, *, suffixes: Iterable[str], option: str) -> Path:
    """``path`` as a Path when a file can be written there with one of ``suffixes``; else a MemplanError."""
    suffixes = tuple(suffixes)
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        shown = ", ".join(suffixes) if len(suffixes) <= 4 else ", ".join(suffixes[:4]) + ", ..."
        example = f"{p.stem or 'out'}{suffixes[0] if len(suffixes) == 1 else '.png'}"
        raise MemplanError(f"{option} {path}: the suffix must be {shown} (got {p.suffix or 'none'!r}); "
                           f"e.g. {option} {example}")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise MemplanError(f"{option} {path}: folder {folder} does not exist; create it (mkdir -p {folder}) or "
                           "write elsewhere")
    if p.is_dir():
        raise MemplanError(f"{option} {path} is a folder; name a file in it, e.g. {option} {p / ('out' + p.suffix)}")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        what = f"file {p}" if p.exists() else f"folder {folder}"
        raise MemplanError(f"{option} {path}: {what} is not writable; choose a path you may write")
    return p


def temp_path(target: Path) -> Path:
    """A hidden name beside ``target`` with its suffix (matplotlib picks the format from it)."""
    return target.with_name(f".{target.stem}.memplan-{os.getpid()}.tmp{target.suffix}")


def write_all(writers: Mapping[Path, Writer]) -> None:
    """Run each writer on a temporary file, then rename them all into place; on failure remove them all."""
    temps = {target: temp_path(target) for target in writers}
    try:
        for target, write in writers.items():
            write(temps[target])
        for target, tmp in temps.items():
            os.replace(tmp, target)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
