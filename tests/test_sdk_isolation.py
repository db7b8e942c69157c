"""The client SDK never imports the server: a device installs `zorba_edge` without it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_no_zorba_edge_module_loads_zorba_server() -> None:
    # In a fresh interpreter: this test process has imported the server already.
    script = """
import importlib, json, pkgutil, sys
import zorba_edge
names = [m.name for m in pkgutil.walk_packages(zorba_edge.__path__, "zorba_edge.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names,
                  "server": sorted(m for m in sys.modules if m.startswith("zorba_server"))}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found["imported"]) > 30  # the walk really saw the package
    assert "zorba_edge.client.daemon" in found["imported"]
    assert found["server"] == [], f"zorba_edge loaded {found['server']}"
