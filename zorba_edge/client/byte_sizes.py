"""Byte sizes as people write them (`1.5GiB`, `800MB`, `10%`) and as the client prints them."""

from __future__ import annotations

import math
import re

from zorba_edge.client.errors import DeviceError

# Bare K/M/G/T are binary, as in `free -h` and container runtimes; KB/MB/GB are decimal.
_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in `text`: `1.5GiB`, `1536MiB`, `2G`, `800MB`, `123456` (bytes)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise DeviceError(
            f"{text!r} is not a size: write a number with an optional unit, e.g. 1.5GiB, "
            "800MiB, 2G or 2000000000 (units: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise DeviceError(f"{text!r}: a size must be positive")
    return int(value)


def parse_margin(text: str) -> tuple[int, float]:
    """A safety margin: `(bytes, 0.0)` for a size or `(0, fraction)` for a percentage."""
    stripped = text.strip()
    if stripped.endswith("%"):
        try:
            percent = float(stripped[:-1])
        except ValueError:
            percent = -1.0
        if not 0 <= percent < 100:
            raise DeviceError(f"{text!r}: a percentage margin must be in [0, 100)")
        return 0, percent / 100
    if stripped in ("0", "0B"):
        return 0, 0.0
    return parse_size(stripped), 0.0


def format_size(num_bytes: float) -> str:
    """`1.50 GiB`, `812.3 MiB`, `64.0 KiB`, `512 B`."""
    value = float(num_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            digits = 2 if unit in ("TiB", "GiB") else 1
            return f"{sign}{value / scale:.{digits}f} {unit}"
    return f"{sign}{value:.0f} B"
