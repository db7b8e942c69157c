"""The run's step from the clients' start-up probes of the task loss (pure).

Each client measures, around the base model and on two of its own training batches
(zorba_edge/engine/step_probe.py, `DeviceProfile.task_probe`): E[g^2], the signal
S = E[g_A g_B] = |grad L|^2 and the curvature C = E[z^T H z] along random directions, at a
move of the trust region's length. A batch's step over n directions is -lr sum_i g_i z_i (lr
per reported scalar: what the server adds), and changes the loss in expectation by

    E[dL] ~ -n lr S + (n lr^2 / 2) E[g^2] C          (the second-order, one-step bound)

(the cross terms of distinct directions, n^2 lr^2 G^T H G, are smaller by the parameter
count). It is least at lr* = S / (E[g^2] C), whatever n, where it removes n S^2 / (2 E[g^2] C).
The run's batch size B may differ from the probe's b: the signal does not depend on it, the
noise part of E[g^2] falls as 1 / B, so E[g^2] at B is S + (E[g^2] - S) b / B. The rule is

    lr = STEP_SAFETY x S / (E[g^2]_B C)                                   (C > 0)
    lr = L / sqrt(n E[g^2]_B)                                             (C <= 0)

The second line: where the loss does not curve up along random directions over the trust
region's length (Gemma 3 on a task whose base loss stands above chance: a random move flattens
the label scores and lowers it), the bound sets no step within the region, and the step is the
region's: the lr at which a typical batch's step, of RMS lr sqrt(n E[g^2]) per parameter,
reaches the region's length L = run.trust_radius x the clients' weights' RMS.

Each client's value is divided by the step scale a client perturbing every block gets under
run.lr_scaling (the probe moves every block; StepSize.client_scale); the run takes the median
over the clients whose probe has S > 0 (of an even count the smaller middle one: the shorter
step). None where no client's probe is usable (older clients, a signal lost in noise, or C <= 0
with the trust region off): the run keeps run.lr.

Why STEP_SAFETY = 1/2: at c x lr* the bound's decrease is (2c - c^2) of the best, so half the
step keeps 3/4 of the best progress, and stays in the region where the step helps (c < 2) even
if the probe under-reads the curvature, or over-reads the signal, by a factor 2 (a few
directions on two batches measure the signal to tens of percent; the loss beyond the probe's
move is not the quadratic it measures). It also halves the random part of every step, which
is what the drift budget spends. It is derived from the bound, not fitted to a model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from zorba_common.messages import TaskProbe

STEP_SAFETY = 0.5
"""The fraction of the one-step bound's best lr the run takes (see the module docstring)."""
STEP_RULES = ("constant", "probe")
"""run.step_rule's choices: `constant` run.lr; `probe` the lr from the clients' probes (run.lr
where none sent a usable one)."""


def best_lr(probe: TaskProbe, directions: int, batch_size: int, trust_radius: float) -> float | None:
    """The lr one client's probe gives batches of `batch_size` examples and `directions`
    directions each, under `trust_radius` (None: no usable signal, or a loss that does not
    curve up with no trust region to bound the step)."""
    if probe.signal <= 0 or probe.e_g2 <= 0:
        return None
    noise = max(0.0, probe.e_g2 - probe.signal) * probe.batch_size / batch_size
    e_g2 = probe.signal + noise
    if probe.curvature > 0:
        return STEP_SAFETY * probe.signal / (e_g2 * probe.curvature)
    if trust_radius <= 0:
        return None
    return trust_radius * probe.weight_rms / math.sqrt(directions * e_g2)


@dataclass(frozen=True)
class ProbedStep:
    lr: float | None
    """The median of the clients' usable values (None: none usable)."""
    used: tuple[str, ...] = ()
    """Clients whose probe entered it, in the order given."""


def probed_lr(sent: Sequence[tuple[str, TaskProbe]], directions: int, batch_size: int,
              trust_radius: float, all_blocks_scale: float = 1.0) -> ProbedStep:
    """The run's lr from `sent` ((client, probe)): each client's `best_lr`, over
    `all_blocks_scale` (the step scale run.lr_scaling gives a client of every block), their
    median (the smaller middle value of an even count)."""
    values = [(cid, best_lr(p, directions, batch_size, trust_radius)) for cid, p in sent]
    usable = [(cid, v / all_blocks_scale) for cid, v in values if v is not None]
    if not usable:
        return ProbedStep(None)
    return ProbedStep(statistics.median_low([v for _, v in usable]), tuple(cid for cid, _ in usable))
