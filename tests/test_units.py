import pytest

from memplan import MemplanError, format_bytes, parse_bytes


@pytest.mark.parametrize("text, expected", [
    ("12GB", 12 * 10**9), ("12 gb", 12 * 10**9), ("8GiB", 8 * 2**30), ("8 gib", 8 * 2**30),
    ("1.5KiB", 1536), ("512MiB", 512 * 2**20), ("3TB", 3 * 10**12), ("2TiB", 2 * 2**40),
    ("100", 100), ("100B", 100), ("7 b", 7), ("0.5MB", 500_000), (42, 42),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "12XB", "GB", "12 G B", "-5GB", "1e9", "twelve", "12GBs"])
def test_parse_bytes_rejects_with_a_fix(bad):
    with pytest.raises(MemplanError, match="e.g. '12GB'"):
        parse_bytes(bad)


def test_parse_bytes_rejects_other_types():
    with pytest.raises(MemplanError, match="got float"):
        parse_bytes(1.5)
    with pytest.raises(MemplanError, match=">= 0"):
        parse_bytes(-1)


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1024) == "1.00 KiB"
    assert format_bytes(7.91e9, binary=False) == "7.91 GB"
    assert format_bytes(3 * 2**30 + 2**29) == "3.50 GiB"
    assert parse_bytes(format_bytes(5 * 2**20).replace(" ", "")) == 5 * 2**20
