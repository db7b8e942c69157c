"""What each `zorba-edge` command does (the parser is in cli.py, which imports this lazily so
that `--help` answers without loading torch)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zorba_common.messages import RegisterRequest, RunInfo
from zorba_edge.client import assembly
from zorba_edge.client.admission import AssignmentCheck
from zorba_edge.client.assembly import DataChoice, DeviceReport
from zorba_edge.client.backoff import Backoff
from zorba_edge.client.byte_sizes import format_size
from zorba_edge.client.daemon import (
    CheckMemory,
    CheckRun,
    ClientDaemon,
    DaemonResult,
    DaemonSettings,
    Listener,
    MakeRegistration,
    MakeTrainer,
    RoundSummary,
    Trainer,
    describe_summary,
)
from zorba_edge.client.daemonize import claim_pid_file, detach
from zorba_edge.client.errors import UsageError
from zorba_edge.client.evaluation import evaluate, fetch_remote_table
from zorba_edge.client.modes import CLIENT_MODES
from zorba_edge.client.profiling import (
    StepTiming,
    compute_budget,
    process_rss,
    resolve_device,
    survey,
)
from zorba_edge.client.progress import ProgressReporter
from zorba_edge.client.state import StateStore, default_state_path
from zorba_edge.client.transport import ServerClient, normalize_url
from zorba_edge.data.splits import small_share_warning
from zorba_edge.data.templates import PromptTemplate, label_token_ids
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.model.base_rms import BlockRMS, read_base_rms
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.progress import Progress
from zorba_edge.model.quantize import require_bitsandbytes
from zorba_edge.model.sources import ModelSource

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("zorba_edge.client")

EXIT_OK = 0


# ------------------------------------------------------------------------------ shared pieces


def _load_config(args: argparse.Namespace) -> LoadConfig:
    device = resolve_device(args.device)
    frozen = args.frozen_dtype
    if frozen == "auto":
        frozen = assembly.default_frozen_dtype(device)
    config = LoadConfig(train_dtype=args.train_dtype, frozen_dtype=frozen, device=device,
                        embed_dtype=args.embedding_dtype)
    # Fail now, not at the first round, when nf4/int8 cannot be used here.
    require_bitsandbytes(config.frozen_dtype)
    return config


def _data_choice(args: argparse.Namespace) -> DataChoice:
    words = [f" {w}" for w in args.label_words] if args.label_words else None
    template = assembly.make_template(args.labels, words, args.prompt_suffix, None)
    return DataChoice(spec=args.data, num_clients=args.num_clients, client_index=args.client_index,
                      dirichlet_alpha=args.dirichlet_alpha, seed=args.data_seed,
                      heldout_fraction=args.heldout_fraction, max_examples=args.max_examples,
                      template=template)


def _state_path(args: argparse.Namespace) -> Path:
    return (args.state or default_state_path()).expanduser().resolve()


def _measure(args: argparse.Namespace, source: ModelSource, load_config: LoadConfig,
             step_time_s: float | None, batch_size: int, seq_len: int, *,
             refuse: bool = True) -> DeviceReport:
    found = survey(load_config.device)
    reading = found.reading_for(load_config.device)
    margin_bytes, margin_fraction = args.safety_margin or (None, None)
    budget = compute_budget(reading.available_bytes, margin_bytes=margin_bytes,
                            margin_fraction=margin_fraction, cap_bytes=args.memory_budget)
    on_cpu = torch.device(load_config.device).type == "cpu"
    memory = assembly.memory_profile(load_config, process_rss() if on_cpu else None)
    return assembly.device_report(source, load_config, found, budget, memory,
                                  step_time_s=step_time_s, batch_size=batch_size, seq_len=seq_len,
                                  refuse=refuse)


def _setup_logging(level: str, *, to_file: bool) -> None:
    """Our log lines on stderr (rich on a terminal); other libraries' at WARNING only."""
    root = logging.getLogger()
    # Replace only a handler we installed earlier, so an embedding program keeps its own.
    for old in [h for h in root.handlers if getattr(h, "zorba_edge", False)]:
        root.removeHandler(old)
    if not to_file and sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.zorba_edge = True  # type: ignore[attr-defined]
    handler.setLevel(logging.DEBUG)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("zorba_edge").setLevel(level)


# ------------------------------------------------------------------------------ profile


def cmd_profile(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, to_file=False)
    load_config = _load_config(args)
    source = assembly.open_model(args.model, args.tokenizer)
    report = _measure(args, source, load_config, None, args.batch_size, args.seq_len)
    timing: StepTiming | None = None
    if not args.no_probe:
        with ProgressReporter("timing probe (loading, then forward passes)") as progress:
            probe = assembly.probe_step_time(source, load_config, progress=progress)
        timing = probe.timing
        # The runtime measured with the model loaded, as `run` registers it.
        memory = assembly.measured_memory(report.memory, report.footprint, probe)
        report = assembly.device_report(source, load_config, report.survey, report.budget, memory,
                                        step_time_s=None, batch_size=args.batch_size,
                                        seq_len=args.seq_len)
    if args.json:
        print(json.dumps(_profile_json(report, load_config, timing, args), indent=2))
    else:
        _print_profile(report, load_config, timing, args)
    return EXIT_OK


def _profile_json(report: DeviceReport, load_config: LoadConfig, timing: StepTiming | None,
                  args: argparse.Namespace) -> dict[str, Any]:
    admission = report.admission
    assert admission is not None  # profile measures with refuse=True
    return {
        "device": load_config.device,
        "host": asdict(report.survey.host),
        "accelerator": asdict(report.survey.accelerator) if report.survey.accelerator else None,
        "notes": list(report.survey.notes),
        "budget": asdict(report.budget) | {"limited_by": report.budget.limited_by},
        "memory": asdict(report.memory),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "num_blocks": admission.num_blocks,
        "fixed_bytes": admission.fixed_bytes,
        "block_bytes": list(admission.block_bytes),
        "max_blocks": admission.max_blocks,
        "model_fingerprint": report.fingerprint,
        "forward_s": timing.forward_s if timing else None,
        "step_time_s": timing.step_time_s if timing else None,
    }


def _print_profile(report: DeviceReport, load_config: LoadConfig, timing: StepTiming | None,
                   args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for reading in (report.survey.host, report.survey.accelerator):
        if reading is not None:
            table.add_row(reading.device, f"{format_size(reading.available_bytes)} available for "
                          f"this process, of {format_size(reading.total_bytes)} ({reading.source})")
    for note in report.survey.notes:
        table.add_row("note", note)
    table.add_row("budget", report.budget.describe())
    m = report.memory
    table.add_row("holding", f"trained blocks {m.train_dtype}, frozen blocks {m.frozen_dtype}, "
                  f"embeddings {m.embed_dtype}, "
                  f"snapshot {m.snapshot_dtype or 'on disk'}, runtime "
                  f"{format_size(m.runtime_bytes)}")
    a = report.admission
    assert a is not None  # profile measures with refuse=True
    table.add_row("fixed", f"{format_size(a.fixed_bytes)} (every block frozen, batch "
                  f"{args.batch_size} x {args.seq_len} tokens)")
    low, high = min(a.block_bytes), max(a.block_bytes)
    per_block = format_size(low) if low == high else f"{format_size(low)} to {format_size(high)}"
    table.add_row("per block", f"{per_block} more to train a block")
    table.add_row("max blocks", f"{a.max_blocks} of {a.num_blocks} trainable at once")
    if timing is not None:
        table.add_row("step time", f"{timing.step_time_s:.3f} s (2 x forward "
                      f"{timing.forward_s:.3f} s, median of {timing.repeats})")
    table.add_row("model", f"fingerprint {report.fingerprint[:16]}")
    Console().print(table)


# ------------------------------------------------------------------------------ run


class ConsoleListener(Listener):
    """A spinner with the daemon's status on a terminal; log lines otherwise. A slow step's
    progress shows in the spinner's text (rich has one live display at a time, so no bar
    beside it), or as ProgressReporter's line every few seconds."""

    def __init__(self, interactive: bool, console: Console | None = None) -> None:
        from rich.console import Console

        self.console = console or Console()
        self._status = self.console.status("starting") if interactive else None
        self._last = ""
        if self._status is not None:
            self._status.start()

    def on_status(self, text: str) -> None:
        if self._status is not None:
            self._status.update(text)
        elif text != self._last:
            log.info("%s", text)
        self._last = text

    def on_round(self, summary: RoundSummary) -> None:
        line = describe_summary(summary)
        if self._status is not None:
            self.console.print(line)
        else:
            print(line, flush=True)

    def progress(self, what: str) -> Progress:
        status = self._status
        if status is None:
            return ProgressReporter(what, interactive=False)
        return lambda done, total: status.update(f"{what}: {done}/{total}")

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()


class StoppedEarly(Exception):
    """SIGTERM/SIGINT before the daemon's own handlers are in place: nothing to save yet."""


def _stop_early(signum: int, frame: object) -> None:
    raise StoppedEarly(signal.Signals(signum).name)


def cmd_run(args: argparse.Namespace) -> int:
    previous = {signum: signal.signal(signum, _stop_early)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(args)
    except StoppedEarly as exc:
        print(f"zorba-edge: stopped by {exc} before joining the run; nothing to save", flush=True)
        return EXIT_OK
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(args: argparse.Namespace) -> int:
    url = normalize_url(args.server)
    state_path = _state_path(args)
    store = StateStore(state_path)
    store.claim()  # before the slow model load: a second client on this file stops at once
    data_choice = _data_choice(args)
    secret = None if store.exists() else assembly.read_secret(args.enrolment_secret_file)
    if args.daemon:
        log_file = (args.log_file or state_path.with_name("zorba-edge.log")).resolve()
        pid_file = (args.pid_file or state_path.with_name("zorba-edge.pid")).resolve()
        if not detach(log_file, pid_file):
            return EXIT_OK
        store.claim()  # the detached process holds the inherited lock now: record its pid
        _setup_logging(args.log_level, to_file=True)
    else:
        if args.pid_file is not None:
            claim_pid_file(args.pid_file.resolve())
        _setup_logging(args.log_level, to_file=False)
    load_config = _load_config(args)
    source = assembly.open_model(args.model, args.tokenizer)
    examples = assembly.training_examples(data_choice)
    task = assembly.build_task(examples, source, data_choice)
    # Labels, template and data with the tokenizer alone, before any weights load.
    task.check(assembly.PROBE_SEQ_LEN)
    # The run's batch shape is known only once registered: check_run admits at the run's own
    # batch_size and seq_len then, so a device that fits the run is never refused for not
    # fitting the probe's default shape.
    report = _measure(args, source, load_config, args.step_time, assembly.PROBE_BATCH_SIZE,
                      assembly.PROBE_SEQ_LEN, refuse=False)
    if report.admission is None:
        log.warning("memory budget %s: at batch %d x %d tokens no block fits; the run's own "
                    "batch size and sequence length decide after registering",
                    report.budget.describe(), assembly.PROBE_BATCH_SIZE, assembly.PROBE_SEQ_LEN)
    else:
        log.info("memory budget %s; %d of %d blocks fit at once (at batch %d x %d tokens)",
                 report.budget.describe(), report.admission.max_blocks,
                 report.admission.num_blocks, assembly.PROBE_BATCH_SIZE, assembly.PROBE_SEQ_LEN)
    log.info("local data: %d %s examples from %s", len(examples), task.kind, data_choice.spec)
    if data_choice.num_clients > 1:
        total = len(assembly.training_examples(replace(data_choice, num_clients=1, client_index=0)))
        few = small_share_warning(len(examples), total, data_choice.num_clients,
                                  assembly.PROBE_BATCH_SIZE)
        if few is not None:
            log.warning("%s", few)
    budget_bytes = report.budget.budget_bytes
    # The memory profile registered and checked: the runtime as read before the model loaded,
    # until the timing probe measures it with the model loaded.
    memory = report.memory

    def make_registration(progress: Progress | None) -> RegisterRequest:
        nonlocal memory
        step_time = args.step_time
        rms = BlockRMS()
        if step_time is None:
            probe = assembly.probe_step_time(source, load_config, progress=progress, rms=rms)
            step_time = probe.timing.step_time_s
            memory = assembly.measured_memory(report.memory, report.footprint, probe)
            log.info("timing probe: %.3f s per step (2 x forward %.3f s); runtime %s with the "
                     "model loaded (%s before)", step_time, probe.timing.forward_s,
                     format_size(memory.runtime_bytes), format_size(report.memory.runtime_bytes))
        # The drift bound's reference: read off the probe's load, else one pass over the blocks.
        base_rms = rms.values(report.footprint.num_blocks) or read_base_rms(source)
        # How far the run may move the model before its generation suffers (the drift budget).
        # Kept in the state file: a restart or re-registration with the same model reuses it.
        drift = assembly.cached_drift_tolerance(source, load_config, store,
                                                budget_bytes=budget_bytes)
        if drift is not None:
            log.info("drift probe: generic-text loss %.3f, +%.1f%% at a random move of %.2g per "
                     "parameter: fluency curvature %.4g", drift.base_loss,
                     100 * sum(drift.rises) / len(drift.rises), drift.move, drift.curvature)
        # How far a step should go: the task loss's gradient and curvature (run.step_rule),
        # asked for: 34 forwards a default run (run.step_rule = constant) would not use.
        step = (assembly.probe_task_step(source, load_config, task, budget_bytes=budget_bytes)
                if args.task_probe else None)
        if step is not None:
            log.info("task probe: E[g^2] %.4g, signal %.4g, curvature %.4g at a move of %.2g per "
                     "parameter (%d forwards)", step.measured.e_g2, step.measured.signal,
                     step.measured.curvature, step.move, step.forwards)
        measured = DeviceReport(report.survey, report.budget, report.admission, memory,
                                report.footprint, report.fingerprint, step_time)
        if secret is None:
            raise UsageError("this client must register again but was started with a state "
                             "file and no enrolment secret: pass --enrolment-secret-file")
        return assembly.registration(measured, device_type=torch.device(load_config.device).type,
                                     num_samples=len(examples), secret=secret, name=args.name,
                                     base_rms=base_rms,
                                     fluency_curvature=None if drift is None else drift.curvature,
                                     task_probe=None if step is None else step.measured)

    def make_trainer(run: RunInfo, table: CoefficientTable | None,
                     progress: Progress | None) -> Trainer:
        return CLIENT_MODES[run.mode].make_trainer(source, load_config, run, task, table,
                                                   progress)

    def check_run(run: RunInfo) -> None:
        if not CLIENT_MODES[run.mode].keeps_budget:
            log.warning("this run is the %s baseline: every block trains, and the memory budget "
                        "of %s is reported against, not kept", run.mode, format_size(budget_bytes))
            assembly.check_model(run, source)
            return
        assembly.check_run(run, source, memory, budget_bytes)

    def check_memory(run: RunInfo) -> AssignmentCheck | None:
        # The profile as registered (or, resumed, as read at this start-up), as check_run.
        if not CLIENT_MODES[run.mode].keeps_budget:
            return None
        return AssignmentCheck(report.footprint, memory, budget_bytes)

    listener = ConsoleListener(interactive=not args.daemon and sys.stdout.isatty())
    settings = DaemonSettings(budget_bytes=budget_bytes, stop_after_rounds=args.rounds)
    try:
        result = asyncio.run(_run_daemon(url, args, store, settings, listener, make_registration,
                                         make_trainer, check_run, check_memory))
    finally:
        listener.close()
    print(f"zorba-edge: {result.reason}: {result.rounds_reported} round(s) reported, alpha "
          f"version {result.version}; state in {state_path}", flush=True)
    return EXIT_OK


async def _run_daemon(url: str, args: argparse.Namespace, store: StateStore,
                      settings: DaemonSettings, listener: Listener,
                      make_registration: MakeRegistration, make_trainer: MakeTrainer,
                      check_run: CheckRun, check_memory: CheckMemory) -> DaemonResult:
    backoff = Backoff(give_up_after_s=args.give_up_after)
    async with ServerClient(url, ca_cert=args.ca_cert, backoff=backoff) as client:
        daemon = ClientDaemon(client, store, make_registration=make_registration,
                              make_trainer=make_trainer, check_run=check_run, settings=settings,
                              listener=listener, check_memory=check_memory)
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                # The state file is written atomically, so even this cannot leave it torn.
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(130)
            log.info("%s: stopping cleanly (a round in progress is abandoned, not reported)",
                     signal.Signals(signum).name)
            daemon.request_stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await daemon.run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)


# ------------------------------------------------------------------------------ export / eval


def _write_model(args: argparse.Namespace, source: ModelSource, table: CoefficientTable,
                 seed: int, template: PromptTemplate) -> Path:
    """base + alpha to args.out as args.format (checkpoint or gguf); a run with a label readout
    gets an untied head with the rows of `template`'s label words."""
    from zorba_edge.model.quantize import torch_dtype

    tokens = None
    if table.num_blocks > getattr(source.config, "num_hidden_layers", table.num_blocks):
        tokens = sorted({t for word in label_token_ids(source.tokenizer(), template) for t in word})
    with ProgressReporter("exporting blocks") as progress:
        if args.format == "gguf":
            from zorba_edge.model.gguf_export import export_gguf

            return export_gguf(source, table, seed, args.out, gguf_type=args.gguf_type,
                               progress=progress, readout_tokens=tokens)
        from zorba_edge.model.export import export_checkpoint

        return export_checkpoint(source, table, seed, args.out, dtype=torch_dtype(args.dtype),
                                 progress=progress, readout_tokens=tokens)


def cmd_export(args: argparse.Namespace) -> int:
    from zorba_edge.client.run_file import RunFile, write_run_file

    _setup_logging(args.log_level, to_file=False)
    url = normalize_url(args.server)
    source = assembly.open_model(args.model, args.tokenizer)
    store = StateStore(_state_path(args))
    remote = asyncio.run(fetch_remote_table(url, store=store, ca_cert=args.ca_cert))
    state = store.load()
    if state is not None and state.run.run_id == remote.run_id:
        # The check `run` makes at registration: another base would give another model.
        assembly.check_model(state.run, source)
    log.info("run %s at alpha version %d", remote.run_id, remote.table.version)
    words = [f" {w}" for w in args.label_words] if args.label_words else None
    template = assembly.make_template(args.labels, words, args.prompt_suffix, None)
    if args.format == "run":
        out = write_run_file(RunFile(remote.run_id, source.fingerprint, remote.seed, remote.table,
                                     template, base_name=source.path.name), args.out)
    else:
        out = _write_model(args, source, remote.table, remote.seed, template)
    print(f"exported run {remote.run_id} at alpha version {remote.table.version} to {out}")
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    from zorba_edge.client.run_file import read_run_file

    _setup_logging(args.log_level, to_file=False)
    run = read_run_file(args.run_file)
    source = assembly.open_model(args.model, args.tokenizer)
    run.check_base(source.fingerprint, args.model or "the packaged model")
    out = _write_model(args, source, run.table, run.seed, run.template)
    template = run.template
    print(f"applied run {run.run_id} at alpha version {run.table.version} to {out}\n"
          f"its task: prompt {template.prefix!r} + text + {template.suffix!r}, then the label words "
          + ", ".join(f"{w!r} ({n})" for n, w in zip(template.label_names, template.label_words,
                                                    strict=True)))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, to_file=False)
    load_config = _load_config(args)
    choice = _data_choice(args)
    source = assembly.open_model(args.model, args.tokenizer)
    task = assembly.build_task(assembly.heldout_examples(choice), source, choice)
    task.check(args.seq_len)  # minutes before the model would have loaded
    remote = None
    if args.server:
        remote = asyncio.run(fetch_remote_table(normalize_url(args.server),
                                                store=StateStore(_state_path(args)),
                                                ca_cert=args.ca_cert))
    with ProgressReporter("loading the model") as on_load, \
            ProgressReporter(f"evaluating {len(task.examples)} examples") as on_batch:
        result = evaluate(source, load_config, task, remote=remote, batch_size=args.batch_size,
                          seq_len=args.seq_len, on_load=on_load, on_batch=on_batch)
    what = ("base model" if remote is None
            else f"base + alpha v{result.version} (run {remote.run_id})")
    if args.json:
        print(json.dumps(asdict(result) | {"model": what}))
    else:
        acc = "" if result.accuracy is None else f"accuracy {result.accuracy:.4f}, "
        ppl = "" if result.perplexity is None else f", perplexity {result.perplexity:.2f}"
        print(f"{what}: {acc}loss {result.loss:.4f}{ppl} on {result.examples} held-out examples")
    return EXIT_OK
