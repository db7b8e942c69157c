"""Held-out evaluation of the base model or of base + the server's alpha, and the table fetch
that `eval` and `export` share.

The fine-tuned model is loaded block by block from base + alpha (every block frozen, as a
client holds it), so evaluating needs the same memory as training, not a full fp32 copy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zorba_edge.client.errors import UsageError
from zorba_edge.client.local_task import CLASSIFICATION, LocalTask
from zorba_edge.client.readout_setup import table_readout
from zorba_edge.client.state import StateStore
from zorba_edge.client.transport import TOKEN_ENV, ServerClient
from zorba_edge.engine.bias_floor import bias_floor_accuracy, score_examples
from zorba_edge.engine.coefficients import CoefficientTable, block_materializer
from zorba_edge.engine.losses import evaluate_classification, lm_loss
from zorba_edge.model.loading import LoadConfig, load_model
from zorba_edge.model.progress import Progress, tracked
from zorba_edge.model.sources import ModelSource


@dataclass(frozen=True)
class EvalResult:
    examples: int
    loss: float
    """Mean cross-entropy per example (label words, or completion tokens)."""
    accuracy: float | None
    """Classification only."""
    version: int | None
    """The alpha version evaluated; None for the base model."""
    perplexity: float | None = None
    """Generation only: exp(loss), the perplexity of the completions with each example
    weighing the same (the loss is a mean of per-example means, as training minimises)."""
    acc_bias_floor: float | None = None
    """Classification with a `fit` task only: the accuracy of the same model with one offset
    per label fitted on `fit` and nothing else trained (engine/bias_floor.py)."""


@dataclass(frozen=True)
class RemoteTable:
    table: CoefficientTable
    seed: int
    run_id: str


def evaluate(source: ModelSource, load_config: LoadConfig, task: LocalTask, *,
             remote: RemoteTable | None = None, batch_size: int = 16,
             seq_len: int = 64, on_load: Progress | None = None,
             on_batch: Progress | None = None, fit: LocalTask | None = None) -> EvalResult:
    """Loss (and accuracy) of the base model or base + alpha over every example of `task`.

    With `fit` (training examples of a classification task), also the bias floor: the
    accuracy once label offsets fitted on `fit` shift the scores (its examples are scored
    too, which costs their forward passes). `on_load` counts the loaded parts (blocks + 1),
    `on_batch` the evaluated batches."""
    materialize = None
    if remote is not None:
        materialize = block_materializer(source.block_state_dict, remote.table, remote.seed)
    loaded = load_model(source, (), load_config, materialize=materialize, progress=on_load)
    if remote is not None:  # a run with a label readout: its rows, as the clients hold them
        table_readout(loaded.model, task, remote.table, remote.seed, loaded.num_blocks)
    device = load_config.device
    count = -(-len(task.examples) // batch_size)
    batches = (batch.to(device)
               for batch in tracked(task.batches(batch_size, seq_len), count, on_batch))
    version = remote.table.version if remote is not None else None
    if task.kind == CLASSIFICATION and fit is not None:
        heldout = score_examples(loaded.model, batches)
        fitted = score_examples(loaded.model, (b.to(device) for b in fit.batches(batch_size, seq_len)))
        loss = float(F.cross_entropy(heldout.scores, heldout.labels))
        return EvalResult(len(heldout.labels), loss, heldout.accuracy(), version,
                          acc_bias_floor=bias_floor_accuracy(fitted, heldout))
    if task.kind == CLASSIFICATION:
        result = evaluate_classification(loaded.model, batches)
        return EvalResult(result.examples, result.loss, result.accuracy, version)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            total += float(lm_loss(loaded.model, batch)) * len(batch)
            count += len(batch)
    loss = total / count
    return EvalResult(count, loss, None, version, perplexity=math.exp(min(loss, 700.0)))


async def fetch_remote_table(
    server_url: str, *, store: StateStore | None, ca_cert: str | None,
    on_retry: Callable[..., None] | None = None,
    client_factory: Callable[..., ServerClient] = ServerClient,
) -> RemoteTable:
    """The server's whole alpha table and the run seed that gives it meaning.

    GET /v1/state needs a client's token: the one in the client's state file, or
    ZORBA_CLIENT_TOKEN. The seed comes from the state file's run, or else from /v1/status.
    """
    state = store.load() if store is not None else None
    token = os.environ.get(TOKEN_ENV) or (state.token if state is not None else None)
    if token is None:
        where = f"{store.path} has no client state and " if store is not None else ""
        raise UsageError(
            f"reading the server's table needs a client's token: {where}{TOKEN_ENV} is not set. "
            "Run this on a device that joined the run (or pass its --state file)")
    client = client_factory(server_url, token=token, ca_cert=ca_cert, on_retry=on_retry)
    async with client:
        alpha = await client.state()
        if state is not None and state.run.run_id == alpha.run_id:
            seed = state.run.seed
        else:
            status = await client.status()
            if status.get("run_id") != alpha.run_id or not isinstance(status.get("seed"), int):
                raise UsageError(
                    f"cannot tell run {alpha.run_id}'s seed: /v1/status does not name it; pass "
                    "the --state file of a client of this run")
            seed = int(status["seed"])
    table = CoefficientTable(alpha.pool_size, alpha.num_blocks, alpha.matrix(), alpha.version)
    return RemoteTable(table, seed, alpha.run_id)
