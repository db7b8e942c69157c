"""The names every part of a run agrees on, and the defaults a harness sets apart from the server's.

One owner for what used to be spelled out in each command: the precisions a block can be held
in, the run modes and the estimators (the wire checks them: zorba_common.messages), and, for
each harness that runs with other defaults than `zorba_server.config.RunConfig`'s, the value
and why. A harness (the simulator, the comparison, the quickstart, the Flower app) holds the
server's RunConfig and AggregationConfig and replaces only the fields listed here, besides
what its own deployment fixes (the quickstart's min_clients is its client count, the Flower
app's pyproject its two nodes); every other run default is RunConfig's own. Importable
without torch (`--help` answers at once).
"""

from __future__ import annotations

DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "nf4")
"""Precisions a block can be held in (memory_model.BYTES_PER_PARAM says what each costs)."""

BATCH_SIZE = 8
"""Examples per local step: the run's (RunConfig) and what a client plans for before it has
joined a run (`zorba-edge profile`, MemorySettings)."""
SEQ_LEN = 64
"""Tokens per example, likewise for any task (the movie-review harnesses take REVIEW_SEQ_LEN)."""

# Run modes (issue 5): the system and the baselines it is measured against, as one server and
# client. `zorba`: the scheduler's heterogeneous block activation; `zorba-uniform`: the same
# number of random blocks on every client; `fedzo-full`: zeroth-order on every block, clients
# that cannot hold them all excluded; `fedavg`: first-order AdamW on every block, weights
# exchanged both ways (budgets are reported against, not enforced).
ZORBA, ZORBA_UNIFORM, FEDZO_FULL, FEDAVG = "zorba", "zorba-uniform", "fedzo-full", "fedavg"
RUN_MODES = (ZORBA, ZORBA_UNIFORM, FEDZO_FULL, FEDAVG)
"""The server's run modes (`run.mode`), the default first."""
CENTRAL_MEZO = "central-mezo"
"""The simulator's one mode that is no server's: one client holding all the data trains every
block with the same estimator, the "federation costs nothing" reference."""
ZO_SIM_MODES = (ZORBA, ZORBA_UNIFORM, FEDZO_FULL, CENTRAL_MEZO)
"""The zeroth-order modes the simulator runs (a comparison's default)."""
SIM_MODES = (*ZO_SIM_MODES, FEDAVG)
"""Every mode the simulator runs."""

ANTITHETIC, ONE_SIDED, NORMALISED = "antithetic", "one-sided", "normalised"
ESTIMATORS = (ANTITHETIC, ONE_SIDED, NORMALISED)
"""How a batch's projected gradients are measured (`run.estimator`; docs/learning.md)."""

CPU_FROZEN_DTYPE = "bf16"
"""Frozen blocks on a CPU: bf16 errs by 0.5% on SmolLM2's ZO gradient estimate where nf4 errs
by 31%, for 126 MiB saved (README, "Frozen blocks on CPU"). A client on CPU (`--frozen-dtype
auto`), the quickstart's clients (CPU processes) and every virtual device of the simulator
and the comparison take it."""
CUDA_FROZEN_DTYPE = "nf4"
"""Frozen blocks on CUDA, where bitsandbytes' nf4 runs in its own kernels."""

# The movie-review harnesses (simulator, comparison, quickstart) run one short-text task on a
# shared CPU, where RunConfig's defaults are sized for a real device in a 300 s round.
REVIEW_SEQ_LEN = 48
"""Tokens per example: 48 holds 95% of the movie reviews whole (RunConfig's 64 is for any
task); every token costs CPU time in a harness that computes each step for real."""
SIM_MAX_STEPS = 4
"""zorba-simulate: every virtual device's steps run for real, one after another, in one
process, so the most steps per device and round bounds the wall time of a round."""
COMPARE_MAX_STEPS = 8
"""The comparison: two batches of RunConfig's 4 directions per client and round, over many
modes x seeds."""
QUICKSTART_MAX_STEPS = 12
"""The quickstart's 30 s rounds: the downlink carries one float per (step, trained block), so
12 steps over 30 blocks is 1.5 KB a round."""
HARNESS_ROUND_S = 30.0
"""The comparison's and the quickstart's round (RunConfig's is 300 s): a few minutes of
training holds a few rounds."""
