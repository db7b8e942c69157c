"""Local steps per second of the simulator over a model of SmolLM2-135M's shape.

The weights are random (built in code: SmolLM2's config, 30 blocks, 576 wide, 49,152-token
vocabulary) and the data the tests' synthetic reviews, so the figure is about speed only; it
needs no packaged model, which is what lets it run on a machine the model cannot be copied to.
8 virtual devices (4 laptop, 4 Jetson class), 4 rounds of up to 16 steps, batch 8 x 48 tokens.

    python benchmarks/sim_speed.py --device cuda --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from client_support import signal_examples  # noqa: E402
from fixtures_text import make_tokenizer  # noqa: E402

from zorba_edge.model.sources import RandomInitSource  # noqa: E402
from zorba_server.config import config_from_dict  # noqa: E402
from zorba_sim.fleet import fleet_from_counts  # noqa: E402
from zorba_sim.simulation import Simulation, SimulationConfig  # noqa: E402

SMOLLM2_SHAPE = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                 "max_position_embeddings": 2048, "tie_word_embeddings": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    source = RandomInitSource(LlamaConfig(**SMOLLM2_SHAPE), seed=0, tokenizer=make_tokenizer())
    server = config_from_dict({"enrolment_secret": "benchmark-secret", "run": {
        "pool_size": 1024, "lr": 1e-4, "mu": 1e-3, "batch_size": 8, "seq_len": 48,
        "round_duration_s": 60, "max_steps": 16, "seed": 0}})
    started = time.time()
    sim = Simulation.build(SimulationConfig(server, rounds=args.rounds, device=args.device), source,
                           fleet_from_counts("laptop-16gb=4,jetson-orin-nano-8gb=4"),
                           signal_examples(2000), signal_examples(200, seed=1))
    build_s = time.time() - started
    started = time.time()
    sim.run()
    run_s = time.time() - started
    steps = sim.forwards // 2  # antithetic: two forward passes a step
    assert sim.engine.last_plan is not None
    result = {"device": args.device, "build_s": build_s, "run_s": run_s, "steps": steps,
              "steps_per_s": steps / run_s, "reference_step_s": sim.reference_step_s,
              "blocks": {cid: len(p.blocks) for cid, p in sim.engine.last_plan.clients.items()}}
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
