"""The label readout's place in the coefficient table: one column after the body's blocks.

A classification run's loss sees the LM head only through the label tokens' rows, a tiny set
of parameters where zeroth-order steps learn past the bias floor (docs/learning.md, "The label
readout"). With `readout_directions` > 0 those rows are one more block of the run, R =
num_blocks (the body's transformer blocks are 0..B-1): the table is K x (B + 1), column R moves
the rows as every column moves its block. The scheduler never assigns R (it costs a few KB,
no memory decision); every client of a classification run holds it besides its blocks. Where
the code means transformer blocks (scheduler, footprint, drift, base RMS, block signal) it
keeps B; these two functions name the extra column.
"""

from __future__ import annotations

MAX_READOUT_DIRECTIONS = 64
"""Most readout directions a batch may measure (as run.directions)."""
MAX_READOUT_INDICES_PER_ROUND = 256
"""Most label-readout pool indices one round hands out, all clients together (each client an
equal share, in whole batches). The byte budget (<= 2 KB a client and round each way): the
published delta carries each as 4 bytes (float32) after a bitmap of the pool (128 bytes for
1,024), so at most 1,152 bytes a round; a client reports each as a (k, g) pair, ~13 bytes of
msgpack, and 4 clients' shares of 64 are ~830 bytes up each."""
READOUT_LR = 1e-2
"""The readout's step per scalar (run.readout_lr): benchmarks/readout_potential.py measured
1e-2 best of 1e-3 and 1e-2 at the run's trust radius 0.03, which bounds the step in nearly
every batch (docs/learning.md, "The label readout")."""

READOUT_TRUST_RADIUS = 0.01
"""The readout's own trust radius (run.readout_trust_radius): its step moves the rows by at most
this fraction of their RMS. On the simulator every readout batch was trust-bound, so this, not
readout_lr, is the readout's step size; at the body's 0.03 the readout lowered accuracy and at
0.01 it raised it (docs/learning.md, "The label readout in the run")."""

READOUT_DIRECTIONS_HELP = ("the label readout as a block of the run: directions per batch on the LM "
                           "head's rows of the label tokens (one more column of alpha, held by every "
                           "client of a classification run), scored from the batch's first forward "
                           "at no forward of their own; 0: off (1..64)")
"""run.readout_directions's meaning, as every command that takes --readout-directions explains it."""
READOUT_LR_HELP = ("the label readout's step: alpha[k, R] += readout_lr x g per readout scalar "
                   "(run.readout_trust_radius bounds it relative to the rows' RMS)")
"""run.readout_lr's meaning, as every command that takes --readout-lr explains it."""
READOUT_TRUST_RADIUS_HELP = ("the label readout's own trust region: the longest RMS move of the label "
                             "rows in one batch's step, as a fraction of their RMS, cut with the "
                             "step by the loss guard and the plateau rule; 0: off")
"""run.readout_trust_radius's meaning, as every command that takes --readout-trust-radius explains it."""


def readout_block(num_blocks: int) -> int:
    """The readout's column: the one after the body's `num_blocks` blocks."""
    return num_blocks


def table_columns(num_blocks: int, readout_directions: int) -> int:
    """Columns of the coefficient table: the body's blocks, plus the readout's when it is on."""
    return num_blocks + (1 if readout_directions > 0 else 0)
