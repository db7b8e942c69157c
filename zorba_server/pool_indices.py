"""Which seed-pool indices a round uses: a pure function of (run seed, round, step).

Every client of round r gets a prefix of the same list k_0, k_1, ... (as many entries as
its local steps), which keeps the downlink to one short list and lets the round's
increments share a few rows of alpha. A restarted server, or anyone auditing the run,
recomputes the same list from the seed: it is never stored as state.
"""

from __future__ import annotations

import hashlib


def round_pool_indices(seed: int, round_: int, count: int, pool_size: int) -> tuple[int, ...]:
    """k_t for t < count, each uniform over [0, pool_size).

    blake2b of the decimal triple, so any seed size works and nothing depends on a
    library's random-number stream; the modulo bias of a 64-bit draw is below 2**-40.
    """
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    out = []
    for t in range(count):
        digest = hashlib.blake2b(f"zorba-pool:{seed}:{round_}:{t}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") % pool_size)
    return tuple(out)


def round_readout_indices(seed: int, round_: int, count: int, pool_size: int) -> tuple[int, ...]:
    """The label readout's pool indices of round `round_`: the first `count` (at most
    `pool_size`) of a permutation of the pool that is a pure function of (seed, round), so
    every entry is distinct. Each client of the round measures its own slice of it
    (`ClientPlan.readout_steps`): the readout's directions cost no forward, so a round moves
    the label rows along every client's directions, none measured twice (docs/learning.md,
    "The readout's own directions"). Its own hash tag keeps it independent of the body's list.
    """
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    count = min(count, pool_size)
    if count <= 0:
        return ()

    def key(k: int) -> bytes:
        return hashlib.blake2b(f"zorba-readout:{seed}:{round_}:{k}".encode(), digest_size=8).digest()

    return tuple(sorted(range(pool_size), key=key)[:count])
