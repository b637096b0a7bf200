from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds01.core.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("32g", 32 * 1024**3),
        ("16G", 16 * 1024**3),
        ("512m", 512 * 1024**2),
        ("1.5g", 1536 * 1024**2),
        ("4096", 4096),
        ("64gb", 64 * 1024**3),
        ("2GiB", 2 * 1024**3),
        (1024, 1024),
    ],
)
def test_sizes_parse_as_docker_reads_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1g", "16x", "g", -5])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("72h", 259200), ("30m", 1800), ("90s", 90), ("1d", 86400), ("1h30m", 5400), ("45", 45)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5x", "h1", "-3h"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=2**50))
def test_sizes_round_trip(size):
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=0, max_value=10**7))
def test_durations_round_trip(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


def test_seed_spellings_are_kept():
    assert format_size(32 * 1024**3) == "32g"
    assert format_duration(72 * 3600) == "72h"
