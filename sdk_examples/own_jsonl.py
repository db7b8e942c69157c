"""Fine-tune on your own JSONL file: a short federation of two clients on it.

    python sdk_examples/own_jsonl.py --help
    python sdk_examples/own_jsonl.py                      # writes a tiny example file first
    python sdk_examples/own_jsonl.py --data my.jsonl --labels neg,pos --rounds 3

A classification file has one `{"text": ..., "label": ...}` object per line; --labels names
the labels as the file spells them (default negative,positive), each scored by one label word
after the prompt (" terrible" / " great"). The file is split across the clients (Dirichlet
over labels). The whole file is also the evaluation set, so the accuracy printed here is on
the training data: evaluate on a separate file with `zorba-edge eval --data held_out.jsonl
--server URL` for an honest figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from zorba_lab.quickstart import build_parser, print_summary, run_quickstart

EXAMPLES = [
    ("A warm, funny and beautifully acted film.", "positive"),
    ("The best thing I have seen this year.", "positive"),
    ("Sharp writing and a great cast.", "positive"),
    ("I loved every minute of it.", "positive"),
    ("A delight from start to finish.", "positive"),
    ("Moving, clever and never dull.", "positive"),
    ("A tedious mess with no reason to exist.", "negative"),
    ("Flat, boring and far too long.", "negative"),
    ("The plot makes no sense and the jokes fall flat.", "negative"),
    ("I wanted my two hours back.", "negative"),
    ("Clumsy direction and wooden acting.", "negative"),
    ("A dull, lifeless sequel.", "negative"),
]


def write_example(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text, label in EXAMPLES:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "own_jsonl.py"
    parser.description = ("Fine-tune on your own JSONL file of {text, label} lines: a short "
                          "federation of two clients on this machine (without --data, a tiny "
                          "example file is written and used).")
    parser.set_defaults(data=None, budgets="1.0GiB,1.6GiB", rounds=2, eval_examples=64,
                        max_steps=4, round_duration=60.0, out=Path("runs/own-jsonl"))
    args = parser.parse_args(argv)
    if args.data is None:
        args.data = str(write_example(args.out.resolve() / "example.jsonl"))
    args.data = str(Path(args.data).resolve())
    command = " ".join(["python sdk_examples/own_jsonl.py", *(argv if argv is not None else sys.argv[1:])])
    print_summary(run_quickstart(args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
