"""Virtual devices: a small catalogue of device classes and fleet files that use them.

A device is what the simulator needs to stand in for a real one: a declared memory budget
(checked against the memory model, since every virtual device shares one process), a speed
relative to the machine running the simulation, link bandwidths, and how reliably it takes
part. The catalogue's figures are order-of-magnitude assumptions for each class, not
measurements (docs/simulator.md says where each comes from); a fleet file overrides any.

Fleet file (TOML): one `[[device]]` table per kind of device,

    [[device]]
    class = "pi4-4gb"          # a catalogue class (optional when every field is given)
    count = 10
    memory_budget = "2.5GiB"   # any field of the class may be overridden
    speed = 0.1                # 1.0 = this machine; step time = measured step / speed
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zorba_common.errors import ZorbaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GIB = 2**30


class FleetError(ZorbaError):
    """A fleet description that cannot be simulated; the message names where and what to do."""


@dataclass(frozen=True)
class DeviceClass:
    name: str
    memory_budget_bytes: int
    """Memory the device gives the client (the budget a real one would pass --memory-budget)."""
    speed: float
    """Compute speed relative to the simulating machine: a step takes measured / speed."""
    upload_mbps: float
    download_mbps: float
    availability: float = 1.0
    """Probability that the device is online for a round."""
    dropout: float = 0.0
    """Probability that it drops out mid-round (its work is lost, as a crashed client's)."""
    source: str = ""
    """Where the figures come from."""

    def __post_init__(self) -> None:
        checks = [
            (self.memory_budget_bytes > 0, "memory_budget must be positive"),
            (math.isfinite(self.speed) and self.speed > 0, "speed must be a positive number"),
            (self.upload_mbps > 0 and self.download_mbps > 0, "bandwidths must be positive"),
            (0.0 < self.availability <= 1.0, "availability must be in (0, 1]"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
        ]
        for ok, why in checks:
            if not ok:
                raise FleetError(f"device class {self.name!r}: {why}")


CATALOGUE: Mapping[str, DeviceClass] = {c.name: c for c in (
    DeviceClass("pi4-4gb", int(2.5 * GIB), speed=0.1, upload_mbps=20, download_mbps=50,
                availability=0.9, dropout=0.05,
                source="Raspberry Pi 4 Model B 4 GB: ~2.5 GiB left after the OS; four Cortex-A72 "
                       "cores, assumed ~10x slower than one x86 laptop core pair; home Wi-Fi"),
    DeviceClass("jetson-orin-nano-8gb", 5 * GIB, speed=2.0, upload_mbps=50, download_mbps=100,
                availability=0.95, dropout=0.02,
                source="NVIDIA Jetson Orin Nano 8 GB (memory shared by CPU and GPU, ~5 GiB for "
                       "the client); its GPU assumed ~2x a 2-core x86 CPU for batch-8 forwards"),
    DeviceClass("laptop-16gb", 6 * GIB, speed=1.0, upload_mbps=20, download_mbps=100,
                availability=0.8, dropout=0.05,
                source="a 16 GB laptop sharing memory with its user (~6 GiB for the client); "
                       "the simulating 2-core x86 machine's speed"),
    DeviceClass("phone-6gb", int(1.5 * GIB), speed=0.25, upload_mbps=10, download_mbps=40,
                availability=0.5, dropout=0.15,
                source="a 6 GB phone: mobile OSes let one app use ~1.5 GiB; a big.LITTLE CPU "
                       "assumed ~4x slower; cellular links; often offline or interrupted"),
)}


@dataclass(frozen=True)
class DeviceGroup:
    device: DeviceClass
    count: int
    line: int
    """Line of the fleet file where the group's table starts (0: not from a file)."""


@dataclass(frozen=True)
class Fleet:
    groups: tuple[DeviceGroup, ...]
    origin: str = "counts"

    @property
    def size(self) -> int:
        return sum(g.count for g in self.groups)

    def devices(self) -> list[tuple[DeviceClass, str]]:
        """Every virtual device, in order, with where it was declared."""
        return [(g.device, self.where(g)) for g in self.groups for _ in range(g.count)]

    def where(self, group: DeviceGroup) -> str:
        return f"{self.origin} line {group.line}" if group.line else f"{self.origin} ({group.device.name})"


def parse_size(text: str | int | float, where: str) -> int:
    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise FleetError(f"{where}: memory_budget {text!r} is not a size: write e.g. \"2.5GiB\"")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    return int(float(match.group(1)) * units[(match.group(2) or "B").lower()])


def fleet_from_counts(counts: str | Mapping[str, int]) -> Fleet:
    """`"pi4-4gb=10,laptop-16gb=2"` (or a mapping) -> a fleet of catalogue devices."""
    if isinstance(counts, str):
        pairs: list[tuple[str, str]] = []
        for part in filter(None, (p.strip() for p in counts.split(","))):
            name, sep, n = part.partition("=")
            if not sep:
                raise FleetError(f"fleet {part!r}: write CLASS=COUNT, e.g. laptop-16gb=4")
            pairs.append((name.strip(), n.strip()))
    else:
        pairs = [(k, str(v)) for k, v in counts.items()]
    groups = []
    for name, n in pairs:
        device = _catalogue_class(name, f"fleet {name}={n}")
        if not n.isdigit() or int(n) < 1:
            raise FleetError(f"fleet {name}={n}: the count must be a whole number >= 1")
        groups.append(DeviceGroup(device, int(n), 0))
    return _check_nonempty(Fleet(tuple(groups)), "the fleet")


def load_fleet(path: str | Path) -> Fleet:
    """A fleet from a TOML file; errors name the line of the offending `[[device]]` table."""
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except OSError as exc:
        raise FleetError(f"cannot read the fleet file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetError(f"{path}: not valid TOML: {exc}") from None
    tables = data.get("device")
    unknown = sorted(set(data) - {"device"})
    if unknown:
        raise FleetError(f"{path}: unknown top-level keys {unknown}: a fleet file holds "
                         "[[device]] tables only")
    if not isinstance(tables, list) or not tables:
        raise FleetError(f"{path}: no [[device]] table: add one per kind of device (see "
                         "`zorba-simulate --help`)")
    lines = [i + 1 for i, line in enumerate(text.splitlines())
             if re.match(r"\s*\[\[\s*device\s*\]\]", line)]
    groups = []
    for i, table in enumerate(tables):
        line = lines[i] if i < len(lines) else 0
        groups.append(_group(table, f"{path} line {line}", line))
    return _check_nonempty(Fleet(tuple(groups), origin=str(path)), str(path))


_FIELDS = {"class", "count", "memory_budget", "speed", "upload_mbps", "download_mbps",
           "availability", "dropout", "name"}


def _group(table: Mapping[str, Any], where: str, line: int) -> DeviceGroup:
    extra = sorted(set(table) - _FIELDS)
    if extra:
        raise FleetError(f"{where}: unknown keys {extra}; a [[device]] table takes "
                         f"{', '.join(sorted(_FIELDS))}")
    count = table.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise FleetError(f"{where}: count = {count!r}: give a whole number >= 1 (a device kind "
                         "with no devices is left out, not written with count 0)")
    fields: dict[str, Any] = {}
    if "class" in table:
        fields = dataclasses.asdict(_catalogue_class(str(table["class"]), where))
    else:
        missing = sorted({"memory_budget", "speed", "upload_mbps", "download_mbps"} - set(table))
        if missing:
            raise FleetError(f"{where}: without a `class` the table must give {missing} "
                             f"(or name one of {', '.join(CATALOGUE)})")
        fields = {"name": table.get("name", f"custom@{line}"), "source": "the fleet file"}
    if "memory_budget" in table:
        budget = parse_size(table["memory_budget"], where)
        if budget <= 0:
            raise FleetError(f"{where}: memory_budget {table['memory_budget']!r} must be positive")
        fields["memory_budget_bytes"] = budget
    for key in ("speed", "upload_mbps", "download_mbps", "availability", "dropout"):
        if key in table:
            value = table[key]
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise FleetError(f"{where}: {key} = {value!r} must be a number")
            fields[key] = float(value)
    if "name" in table:
        fields["name"] = str(table["name"])
    try:
        return DeviceGroup(DeviceClass(**fields), count, line)
    except FleetError as exc:
        raise FleetError(f"{where}: {exc}") from None


def _catalogue_class(name: str, where: str) -> DeviceClass:
    if name not in CATALOGUE:
        raise FleetError(f"{where}: unknown device class {name!r}; the catalogue has "
                         f"{', '.join(CATALOGUE)} (or give every field in a fleet file)")
    return CATALOGUE[name]


def _check_nonempty(fleet: Fleet, what: str) -> Fleet:
    if fleet.size < 1:
        raise FleetError(f"{what} has no devices: give at least one")
    return fleet


def describe(devices: Sequence[DeviceClass]) -> str:
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.name] = counts.get(d.name, 0) + 1
    return ", ".join(f"{n} x {name}" for name, n in counts.items())
