"""Sizes as people write them (500MB, 40GB, 1.5TB) and as they read them back."""

from __future__ import annotations


def human(size: float) -> str:
    """Bytes as the user would write them for data.cache_limit."""
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def parse_size(text: str) -> int:
    """'500MB', '40GB', '1.5TB', '123' (bytes) -> bytes (decimal units, as disks are sold; KiB/MiB/GiB too)."""
    units = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
        "k": 10**3,
        "m": 10**6,
        "g": 10**9,
        "t": 10**12,
    }
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ValueError(f"{text!r} is not a size — write it like 500MB, 40GB or 1.5TB")
    return int(value * units[unit])
