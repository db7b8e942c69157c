"""The wire protocol's limits: the largest body, string, list and value a peer may send.

The codec applies the string and list defaults; the messages name the rest on their fields
(`codec.wire(le=...)`), and docs/protocol.md is generated from them.
"""

from __future__ import annotations

# Byte limits per body. A report carries two numbers per local step, so its limit follows
# from MAX_STEPS_PER_REPORT (about 13 bytes a step in msgpack) with room to spare.
MAX_REGISTER_BYTES = 64 * 1024
MAX_STEPS_PER_REPORT = 65_536
MAX_REPORT_BYTES = 2 * 1024 * 1024
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
"""What a client accepts back: /v1/state is K x B float64, 8 MiB at K=4096, B=256."""
MAX_WEIGHTS_BYTES = 8 * 1024**3
"""Largest fedavg weight upload or download (an 8 GiB fp32 checkpoint: ~2B parameters)."""

MAX_STR_LEN = 256
"""Default limit for a string field (ids, names, dtype labels)."""
MAX_SEQUENCE_LEN = 65_536
"""Default limit for a list field (blocks, pool indices, steps)."""

# Plausibility bounds: a value outside them is not a measurement but a bug or an attack, and
# letting it through poisons arithmetic downstream (a loss of 1e308 overflows the round's
# mean to inf; a peak of 2**63-1 pins a client's calibration at its clamp for good).
MAX_COUNTER = 2**53 - 1
"""Largest round number or alpha version: the largest integer every JSON reader holds exactly."""
MAX_MEMORY_BYTES = 2**50
"""1 PiB: no device budget, peak or runtime overhead is larger."""
MAX_LOSS = 1e6
"""Mean cross-entropy in nats; ln(vocabulary) is about 12 for a random model."""
MAX_STEP_TIME_S = 86_400.0
"""One local step (two forward passes) taking over a day is not a working device."""
MAX_SAMPLES = 2**40
MAX_BLOCKS = 4096
"""Transformer blocks of a model (the largest models today have about 130)."""
MAX_MODEL_PARAMS = 10**13
"""Parameters of a whole model, and so of any one block (10 trillion)."""
MAX_DIMENSION = 2**24
"""Hidden, intermediate and vocabulary sizes."""
