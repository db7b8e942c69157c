"""What the run's step and pool settings mean, as every command that takes their flags explains
them (the server, the simulator, the quickstart, compare.py): one text per setting."""

from __future__ import annotations

LR_SCALING_HELP = ("none: one lr for every client; dimension: lr x mean block size / the "
                   "parameters a client perturbs; energy: lr x the measured E[g^2] of all blocks "
                   "/ that of the client's blocks (docs/learning.md)")
"""run.lr_scaling's meaning, as every command that takes --lr-scaling explains it."""
TRUST_RADIUS_HELP = ("the trust region: the longest RMS move per perturbed parameter of one "
                     "batch's step, as a fraction of the perturbed weights' RMS; longer steps "
                     "are scaled down to it; 0: off")
"""run.trust_radius's meaning, as every command that takes --trust-radius explains it."""
PLATEAU_ROUNDS_HELP = ("rounds in a row whose clients' check losses do not improve on the "
                       "best version's before the step is halved; 0: never")
"""run.plateau_rounds's meaning, as every command that takes --plateau-rounds explains it."""
POOL_SLICES_HELP = ("shared: every client of a round takes the round's first pool indices, so "
                    "the holders of a block measure the same directions; disjoint: each client "
                    "its own indices, so a block moves along the directions of all its holders "
                    "(more rows in each round's published increments)")
"""run.pool_slices's meaning, as every command that takes --pool-slices explains it."""
