"""The run file: a run's result in a few KB (base fingerprint, seed, alpha, task) that
`zorba-edge apply` turns back into the exported model on a machine holding the base."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from client_support import TinyWorld, make_world
from test_export import trained_table
from transformers import AutoModelForCausalLM

from zorba_edge.client import cli
from zorba_edge.client.run_file import RunFile, read_run_file, write_run_file
from zorba_edge.data.templates import PromptTemplate
from zorba_edge.engine.coefficients import block_materializer
from zorba_edge.model.sources import open_source

SEED = 23
TEMPLATE = PromptTemplate(("bad", "good"), (" awful", " fine"), suffix=" Verdict:", prefix="Review: ")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return make_world(tmp_path_factory.mktemp("world"))


def _run_file(world: TinyWorld, path: Path) -> RunFile:
    source = open_source(world.model_dir)
    run = RunFile("run-1", source.fingerprint, SEED, trained_table(source.config.num_hidden_layers),
                  TEMPLATE, base_name=world.model_dir.name)
    write_run_file(run, path)
    return run


def test_a_run_file_reads_back_exactly(world: TinyWorld, tmp_path: Path) -> None:
    run = _run_file(world, tmp_path / "run.json")
    again = read_run_file(tmp_path / "run.json")
    assert (again.table.values == run.table.values).all() and again.table.version == run.table.version
    assert again.template == TEMPLATE and again.seed == SEED
    assert again.base_fingerprint == run.base_fingerprint
    assert (tmp_path / "run.json").stat().st_size < 8192


def test_apply_rebuilds_base_plus_alpha_as_a_checkpoint_and_as_gguf(
        world: TinyWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_file(world, tmp_path / "run.json")
    out = tmp_path / "checkpoint"
    assert cli.main(["apply", str(tmp_path / "run.json"), "--model", str(world.model_dir),
                     "--out", str(out)]) == 0
    assert "'Review: ' + text + ' Verdict:'" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    materialize = block_materializer(open_source(world.model_dir).block_state_dict, run.table, SEED)
    for block, layer in enumerate(model.model.layers):
        expected = materialize(block)
        for name, tensor in layer.state_dict().items():
            assert torch.equal(tensor, expected[name]), name

    gguf_out = tmp_path / "model.gguf"
    assert cli.main(["apply", str(tmp_path / "run.json"), "--model", str(world.model_dir),
                     "--out", str(gguf_out), "--format", "gguf", "--gguf-type", "q8_0"]) == 0
    assert len(gguf.GGUFReader(gguf_out).tensors) == len(list(model.parameters()))


def test_apply_refuses_another_base_model_and_a_damaged_file(
        world: TinyWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run_file(world, tmp_path / "run.json")
    data = json.loads((tmp_path / "run.json").read_text())
    data["base_model"]["fingerprint"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(data))
    assert cli.main(["apply", str(tmp_path / "other.json"), "--model", str(world.model_dir),
                     "--out", str(tmp_path / "x")]) == 1
    assert "not this run's base model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    (tmp_path / "damaged.json").write_text(json.dumps({"format": "zorba-run/1", "seed": 1}))
    assert cli.main(["apply", str(tmp_path / "damaged.json"), "--out", str(tmp_path / "y")]) == 2
    assert "damaged" in capsys.readouterr().err
