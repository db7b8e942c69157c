"""The held-out examples a run is scored on: one definition for the quickstart's before/after
accuracy and the replay's per-version curve, so both score the same reviews with the same
prompt (and neither module imports the other)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import
    from zorba_edge.client.assembly import DataChoice
    from zorba_edge.client.local_task import LocalTask
    from zorba_edge.model.sources import ModelSource
    from zorba_lab.federation import FederationPlan

EVAL_BATCH_SIZE = 32
"""Held-out reviews per forward pass when evaluating (the quickstart and benchmarks/compare.py)."""


def heldout_task(plan: FederationPlan, examples: int) -> tuple[ModelSource, LocalTask]:
    """The run's base model and its held-out examples (at most `examples`), as a task.

    One function for every evaluation of a run (before/after in quickstart.py, per
    version in replay.py), so that all of them score the same reviews with the same prompt.
    """
    from zorba_edge.client import assembly

    choice = _data_choice(plan, examples)
    source = assembly.open_model(plan.model)
    return source, assembly.build_task(assembly.heldout_examples(choice), source, choice)


def fit_task(plan: FederationPlan, source: ModelSource) -> LocalTask:
    """A seeded sample of the run's training examples (all clients' shares together), on
    which the bias floor's label offsets are fitted."""
    from zorba_edge.client import assembly
    from zorba_edge.engine.bias_floor import FIT_EXAMPLES

    choice = _data_choice(plan, FIT_EXAMPLES)
    return assembly.build_task(assembly.training_examples(choice), source, choice)


def _data_choice(plan: FederationPlan, max_examples: int) -> DataChoice:
    """The run's data, split and prompt as its clients see them, at most `max_examples`."""
    from zorba_edge.client import assembly

    template = assembly.make_template(plan.labels, None, None, None)
    return assembly.DataChoice(spec=plan.data, seed=plan.data_seed,
                               heldout_fraction=plan.heldout_fraction, max_examples=max_examples,
                               template=template)
