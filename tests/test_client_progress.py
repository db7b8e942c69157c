"""Progress on the slow steps: loading, the timing probe, evaluation, export and a running
client's model load and catch-up report each unit of work, and the reporter shows it as a bar
on a terminal or a line every few seconds."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from client_support import TinyWorld, make_world
from rich.console import Console
from test_trainer import delta, make_trainer

from zorba_common.messages import AlphaState
from zorba_edge.client import cli
from zorba_edge.client.assembly import DataChoice, build_task, heldout_examples, probe_step_time
from zorba_edge.client.command_handlers import ConsoleListener
from zorba_edge.client.evaluation import evaluate
from zorba_edge.client.progress import ProgressReporter
from zorba_edge.model.loading import LoadConfig, load_model
from zorba_edge.model.progress import tracked
from zorba_edge.model.sources import open_source


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return make_world(tmp_path_factory.mktemp("world"))


def recorder() -> tuple[list[tuple[int, int]], object]:
    seen: list[tuple[int, int]] = []
    return seen, lambda done, total: seen.append((done, total))


def test_loading_reports_the_non_block_weights_then_each_block(world: TinyWorld) -> None:
    seen, progress = recorder()
    source = open_source(world.model_dir)
    load_model(source, [0], LoadConfig(frozen_dtype="fp32"), progress=progress)
    blocks = source.config.num_hidden_layers
    assert seen == [(done, blocks + 1) for done in range(1, blocks + 2)]


def test_the_timing_probe_reports_loading_then_every_forward_pass(world: TinyWorld) -> None:
    seen, progress = recorder()
    source = open_source(world.model_dir)
    probe_step_time(source, LoadConfig(frozen_dtype="fp32"), repeats=2, batch_size=2, seq_len=8,
                    progress=progress)
    total = source.config.num_hidden_layers + 1 + 3  # parts loaded, one warm-up, two timed
    assert seen == [(done, total) for done in range(1, total + 1)]


def test_evaluation_reports_loading_and_each_batch(world: TinyWorld) -> None:
    loads, on_load = recorder()
    batches, on_batch = recorder()
    source = open_source(world.model_dir)
    choice = DataChoice(spec=str(world.data))
    task = build_task(heldout_examples(choice), source, choice)
    result = evaluate(source, LoadConfig(frozen_dtype="fp32"), task, batch_size=10, seq_len=16,
                      on_load=on_load, on_batch=on_batch)
    count = -(-result.examples // 10)
    assert count > 1 and batches == [(done, count) for done in range(1, count + 1)]
    assert loads[-1] == (source.config.num_hidden_layers + 1,) * 2


def test_tracked_reports_an_item_once_the_consumer_is_done_with_it() -> None:
    seen, progress = recorder()
    for item in tracked(iter("abc"), 3, progress):
        assert len(seen) == "abc".index(item)
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_off_a_terminal_a_line_every_interval_and_one_at_the_end(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    logger = logging.getLogger("test_progress")
    with caplog.at_level(logging.INFO, logger="test_progress"), ProgressReporter(
            "loading", interactive=False, interval_s=10, clock=lambda: now[0],
            logger=logger) as progress:
        for done, at in ((1, 2.0), (2, 9.0), (3, 11.0), (4, 15.0), (5, 22.0), (6, 23.0)):
            now[0] = at
            progress(done, 6)
    assert [r.getMessage() for r in caplog.records] == [
        "loading: 3/6 (11 s)", "loading: 5/6 (22 s)", "loading: 6/6, done in 23 s"]


def test_on_a_terminal_successive_bars_take_turns(capsys: pytest.CaptureFixture[str]) -> None:
    # Entered together as `eval` does: rich refuses a second live display while one runs,
    # so each bar must stop once its step is done.
    with ProgressReporter("first", interactive=True) as first, \
            ProgressReporter("second", interactive=True) as second:
        for done in range(1, 4):
            first(done, 3)
        for done in range(1, 3):
            second(done, 2)
    err = capsys.readouterr().err
    assert "first" in err and "second" in err


def test_eval_logs_its_progress_when_not_on_a_terminal(
        world: TinyWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["eval", "--data", str(world.data), "--model", str(world.model_dir),
                     "--frozen-dtype", "fp32", "--seq-len", "16", "--batch-size", "16", "--json"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"opening the model at {world.model_dir}" in err  # the GGUF metadata's silent wait
    assert "loading the model: 3/3, done in" in err
    assert "evaluating 64 examples: 4/4, done in" in err


def test_a_trainer_reports_its_first_load_each_synced_round_and_each_rebuilt_block() -> None:
    trainer = make_trainer(num_blocks=3)
    loads, on_load = recorder()
    trainer.hold((), on_load)
    assert loads == [(done, 4) for done in range(1, 5)]  # non-block weights, then 3 blocks
    synced, on_sync = recorder()
    trainer.apply_deltas([delta(2, (3, 4), (0, 2), seed=2), delta(1, (1,), (1,), seed=1)],
                         on_sync)
    assert synced == [(1, 2), (2, 2)] and trainer.table.version == 2
    rebuilt, on_rebuild = recorder()
    alpha = np.zeros((trainer.run.pool_size, 3))
    alpha[5, 1] = 1e-3
    trainer.replace_table(AlphaState("r", 7, trainer.run.pool_size, 3, alpha.tobytes()),
                          on_rebuild)
    assert rebuilt == [(1, 3), (2, 3), (3, 3)] and trainer.table.version == 7


def test_the_run_command_logs_progress_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    listener = ConsoleListener(interactive=False)
    with caplog.at_level(logging.INFO, logger="zorba_edge.client"):
        progress = listener.progress("loading the model")
        for done in range(1, 4):
            progress(done, 3)
    assert [r.getMessage() for r in caplog.records][-1].startswith(
        "loading the model: 3/3, done in")


def test_the_run_command_shows_progress_in_its_status_line_on_a_terminal() -> None:
    # The status spinner is rich's one live display: progress becomes its text.
    out = io.StringIO()
    listener = ConsoleListener(interactive=True,
                               console=Console(file=out, force_terminal=True, width=80))
    progress = listener.progress("loading the model")
    progress(1, 3)
    progress(2, 3)
    listener.close()
    assert "loading the model: 2/3" in out.getvalue()
