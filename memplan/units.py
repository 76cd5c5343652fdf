"""Byte quantities: parse "12GB" / "8 GiB" / "1024" and format bytes for people."""
from __future__ import annotations

import re

from .errors import MemplanError

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """Parse a byte quantity; KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2.

    >>> parse_bytes("12GB"), parse_bytes("1.5 kib"), parse_bytes("300"), parse_bytes(7)
    (12000000000, 1536, 300, 7)
    """
    if isinstance(text, bool):
        raise MemplanError(f"byte quantity must be a number or a string like '12GB', got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise MemplanError(f"byte quantity must be >= 0, got {text} B")
        return text
    if not isinstance(text, str):
        raise MemplanError(
            f"byte quantity must be an int or a string like '12GB', got {type(text).__name__} {text!r}")
    match = _PATTERN.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or (unit and unit not in _UNITS):
        raise MemplanError(
            f"cannot parse byte quantity {text!r}: write a number and an optional unit, "
            "e.g. '12GB', '8 GiB', '512MiB' or '1000000' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    value = float(match.group(1)) * _UNITS[unit or "b"]
    return int(round(value))


def format_bytes(n: int | float, *, binary: bool = True) -> str:
    """Format bytes with a binary (GiB) or decimal (GB) unit and three significant digits.

    >>> format_bytes(3 * 2**30), format_bytes(1536), format_bytes(12e9, binary=False), format_bytes(12)
    ('3.00 GiB', '1.50 KiB', '12.0 GB', '12 B')
    """
    n = float(n)
    base, names = (1024.0, ["B", "KiB", "MiB", "GiB", "TiB"]) if binary else (1000.0, ["B", "KB", "MB", "GB", "TB"])
    sign = "-" if n < 0 else ""
    n = abs(n)
    for i, name in enumerate(names):
        if n < base or i == len(names) - 1:
            if i == 0:
                return f"{sign}{int(n)} B"
            digits = 2 if n < 10 else 1 if n < 100 else 0
            return f"{sign}{n:.{digits}f} {name}"
        n /= base
    raise AssertionError("unreachable")
