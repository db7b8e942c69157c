"""How far may a run move this model? The client's drift probe, on a real model.

Runs what a client runs at start-up (zorba_edge.client.assembly.probe_drift_tolerance: every
block at the training precision, the packaged generic text in rows of 64 tokens, antithetic
pairs of random moves of every parameter) and prints one JSON object:

    base_loss          the generic-text loss of the base model
    move, rises        the RMS move per parameter measured at and each direction's relative rise
    curvature          kappa: the relative rise per squared move (DeviceProfile.fluency_curvature)
    max_move           s* at the defaults (run.drift_budget x run.fluency_tolerance), what the
                       server bounds every block's move per parameter by
    block_rms_min/max  the blocks' base RMS (run.max_drift's unit), and `max_move_relative`:
                       s* / each block's RMS at its smallest and largest
    seconds            the probe's wall time (this machine's load included)

    python benchmarks/drift_probe.py --json --threads 1
    python benchmarks/drift_probe.py --json --threads 1 --model <gemma-3-270m-q4_k_m.gguf>
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zorba_common.fluency import FLUENCY_TOLERANCE
from zorba_edge.client.assembly import probe_drift_tolerance
from zorba_edge.model.base_rms import read_base_rms
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.pretrained import packaged_model_path
from zorba_edge.model.sources import open_source
from zorba_server.drift_budget import DRIFT_BUDGET, max_move


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--model", default=None, help="model path (default: the packaged SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.model or str(packaged_model_path())
    source = open_source(path)
    start = time.monotonic()
    probe = probe_drift_tolerance(source, LoadConfig())
    seconds = time.monotonic() - start
    assert probe is not None  # no budget given: the probe always runs
    rms = read_base_rms(source)
    bound = max_move(probe.curvature, FLUENCY_TOLERANCE, DRIFT_BUDGET)
    out = {"model": path, "base_loss": probe.base_loss, "move": probe.move, "rises": probe.rises,
           "curvature": probe.curvature, "max_move": bound, "drift_budget": DRIFT_BUDGET,
           "fluency_tolerance": FLUENCY_TOLERANCE, "block_rms_min": min(rms),
           "block_rms_max": max(rms),
           "max_move_relative": [bound / max(rms), bound / min(rms)],
           "seconds": round(seconds, 1), "threads": args.threads}
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
