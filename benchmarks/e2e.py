"""End to end: the quickstart's federation, measured (accuracy, bytes per round, memory).

Runs `zorba_lab` (a zorba-server and four `zorba-edge run` clients as subprocesses
on this machine, SmolLM2-135M-Instruct, movie reviews split non-IID) and prints one JSON
object:

    acc_before, acc_after     held-out movie-review accuracy of the base model and of
                              base + the server's alpha (fp32, same reviews)
    acc_bias_floor            the base model with one offset per label fitted on training
                              reviews, nothing else trained: a gain up to it is calibration
    bytes_up_per_round        HTTP request bodies per client per round (mean over clients),
    bytes_down_per_round      reply bodies likewise; counted by a proxy on each client's
                              wire; registration and the final table fetch excluded
    peak_over_budget          largest (peak memory the client measured in a round) /
                              (its declared budget), over all clients and rounds
    clients                   per-client detail; command: how to reproduce

Targets: peak_over_budget <= 1.0; bytes up and down per client per round <= 2 KB each.
Needs `make models`.

    python benchmarks/e2e.py --json                 # default quickstart (~3 min training)
    python benchmarks/e2e.py --json --rounds 4      # any quickstart flag passes through
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time

from zorba_lab.quickstart import build_parser, print_summary, run_quickstart

TARGET_BYTES = 2048


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "benchmarks/e2e.py"
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (progress goes to stderr)")
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/e2e.py", *(argv if argv is not None else sys.argv[1:])])
    # With --json, stdout carries the JSON object alone: progress lines go to stderr.
    out = sys.stderr if args.json else sys.stdout
    with contextlib.redirect_stdout(out):
        summary = run_quickstart(args, command)
        if not args.json:
            print_summary(summary)
    result = {
        "acc_before": summary["acc_before"],
        "acc_after": summary["acc_after"],
        "acc_bias_floor": summary["acc_bias_floor"],
        "bytes_up_per_round": summary["bytes_up_per_round"],
        "bytes_down_per_round": summary["bytes_down_per_round"],
        "peak_over_budget": summary["peak_over_budget"],
        "targets_met": {
            "peak_over_budget<=1.0": summary["peak_over_budget"] <= 1.0,
            "bytes_up_per_round<=2KB": summary["bytes_up_per_round"] <= TARGET_BYTES,
            "bytes_down_per_round<=2KB": summary["bytes_down_per_round"] <= TARGET_BYTES,
        },
        "rounds_applied": summary["rounds_applied"],
        "train_s": summary["train_s"],
        "wall_s": summary["wall_s"],
        "clients": [{k: c[k] for k in ("name", "budget_bytes", "peak_bytes", "peak_over_budget",
                                       "blocks_per_round", "rounds_reported", "steps",
                                       "bytes_up_per_round", "bytes_down_per_round")}
                    for c in summary["clients"]],
        "summary_file": f"{summary['config']['out_dir']}/summary.json",
        "command": command,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps(result["targets_met"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
