"""Which blocks each client of the comparison's fleet gets in a first round, per mode and
scheduler objective (no model is loaded: the packaged SmolLM2's parameter counts only).

Prints one line per (mode, objective) to stderr and, with --json, one JSON object on stdout:
    <mode>_<objective>_blocks   blocks per client, in fleet order
    <mode>_<objective>_covered  blocks held by at least one client

    python benchmarks/assignments.py --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from zorba_common.messages import DeviceProfile, MemoryProfile
from zorba_edge.client import assembly
from zorba_lab.compare.simulator import COMPARE_RUN, CompareSetting
from zorba_server.config import ServerConfig
from zorba_server.engine import RoundEngine
from zorba_server.members import Member
from zorba_server.scheduler import OBJECTIVES, SchedulerConfig
from zorba_sim.fleet import load_fleet

FLEET = Path(__file__).with_name("compare_fleet.toml")


def first_round(mode: str, objective: str, fleet_path: Path, frozen_dtype: str) -> list[tuple[int, ...]]:
    """Each device's blocks in the first round the engine plans (fleet order)."""
    source = assembly.open_model(None)
    footprint = assembly.footprint_of(source)
    devices = load_fleet(fleet_path).devices()
    run = dataclasses.replace(COMPARE_RUN, mode=mode, min_clients=len(devices))
    engine = RoundEngine(ServerConfig("assignments-benchmark-secret", run=run,
                                      scheduler=SchedulerConfig(objective=objective)))
    engine.pin(source.fingerprint, footprint)
    for i, (device, _) in enumerate(devices):
        profile = DeviceProfile(f"virtual:{device.name}", device.memory_budget_bytes, 1.0, 100,
                                footprint, source.fingerprint, MemoryProfile(frozen_dtype=frozen_dtype),
                                name=device.name)
        engine.check_registration(profile)
        engine.add_member(Member(f"v{i:06d}", profile, 0.0, 1.0, 0.0, 1.0))
    plan = engine.propose_round(now=0.0)
    if plan is None:
        raise SystemExit(f"benchmarks/assignments.py: {mode} planned no round: {engine.idle_reason}")
    return [plan.clients[f"v{i:06d}"].blocks if f"v{i:06d}" in plan.clients else ()
            for i in range(len(devices))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/assignments.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--fleet", type=Path, default=FLEET)
    p.add_argument("--frozen-dtype", default=CompareSetting().frozen_dtype)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out: dict[str, Any] = {}
    for mode, objective in [("zorba", o) for o in OBJECTIVES] + [("zorba-uniform", "coverage"),
                                                                ("fedzo-full", "coverage")]:
        blocks = first_round(mode, objective, args.fleet, args.frozen_dtype)
        key = f"{mode.replace('-', '_')}_{objective}"
        out[f"{key}_blocks"] = [len(b) for b in blocks]
        out[f"{key}_covered"] = len({b for bs in blocks for b in bs})
        print(f"{mode} ({objective}): blocks per client {out[f'{key}_blocks']}, "
              f"{out[f'{key}_covered']} covered", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
