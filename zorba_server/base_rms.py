"""Which base-weight RMS the drift bound uses, from what the clients sent (pure).

The drift bound (zorba_server/drift.py) measures each block's distance from its base weights
relative to their RMS, which only a holder of the weights can compute: every client sends it in
its profile (`DeviceProfile.base_rms`, one value per block). Honest clients of one run load the
same base model (the fingerprint says so), so their values agree to rounding; a client that
sends other values (another model behind a copied fingerprint, a bug, a lie) would loosen or
tighten the bound for everyone. The run keeps the values most clients agree with, the earliest
of them on a tie (so one honest client's first value stands until others outvote it), and
ignores the clients that disagree with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

RMS_AGREEMENT = 0.05
"""Two clients' values agree when every block's differ by less than this fraction: the same
weights read in fp32 agree to ~1e-7; bf16 rounding moves an RMS by well under 1%."""


@dataclass(frozen=True)
class AgreedRMS:
    rms: tuple[float, ...] | None
    """Per block, the values the run uses (None: no client sent any)."""
    source: str | None
    """The client whose values they are."""
    ignored: tuple[str, ...] = ()
    """Clients whose values stood apart from them, in registration order."""


def _agree(a: Sequence[float], b: Sequence[float]) -> bool:
    bound = math.log1p(RMS_AGREEMENT)
    return len(a) == len(b) and all(abs(math.log(x / y)) <= bound for x, y in zip(a, b, strict=True))


def agreed(sent: Sequence[tuple[str, tuple[float, ...]]]) -> AgreedRMS:
    """The values of `sent` ((client, per-block RMS) in registration order) most clients agree
    with, and the clients that disagree with them."""
    if not sent:
        return AgreedRMS(None, None)
    support = [sum(_agree(values, other) for _, other in sent) for _, values in sent]
    best = support.index(max(support))  # the earliest of the most supported
    cid, rms = sent[best]
    return AgreedRMS(rms, cid, tuple(c for c, values in sent if not _agree(rms, values)))
