"""Seeded splits: train / held-out, and a non-IID Dirichlet-over-labels split across clients.

Every function takes an explicit seed and draws from its own numpy Generator, so a split is a
function of (data, arguments, seed) and nothing else in the process can shift it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def train_heldout_split(
    num_examples: int, heldout_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, held-out) index arrays covering range(num_examples), each sorted."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    heldout = round(num_examples * heldout_fraction)
    if heldout < 1 or heldout >= num_examples:
        raise ValueError(
            f"a held-out fraction of {heldout_fraction} of {num_examples} examples leaves an "
            "empty train or held-out set; use more examples or another fraction"
        )
    order = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(order[heldout:]), np.sort(order[:heldout])


def dirichlet_label_split(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_per_client: int = 2,
) -> list[np.ndarray]:
    """Indices for each client, with label proportions drawn from Dirichlet(alpha).

    Each label's examples are dealt to clients in proportions drawn from a symmetric
    Dirichlet(alpha) (Hsu et al., 2019): small alpha gives each client a few dominant
    labels, large alpha approaches an IID split. Clients left with fewer than
    `min_per_client` examples are topped up with random examples taken from the largest
    clients, so that every client can train. The parts are disjoint and cover every index.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if min_per_client < 1:
        raise ValueError(f"min_per_client must be at least 1, got {min_per_client}")
    if num_clients * min_per_client > len(labels):
        raise ValueError(
            f"{len(labels)} examples cannot give {num_clients} clients {min_per_client} each; "
            "use fewer clients or a smaller min_per_client"
        )
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    _top_up(parts, min_per_client, rng)
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def _top_up(parts: list[list[int]], minimum: int, rng: np.random.Generator) -> None:
    """Move random examples from the largest client to each client below `minimum`."""
    for client in range(len(parts)):
        while len(parts[client]) < minimum:
            donor = max(range(len(parts)), key=lambda c: len(parts[c]))
            taken = parts[donor].pop(int(rng.integers(len(parts[donor]))))
            parts[client].append(taken)


def small_share_warning(share: int, total: int, num_clients: int, batch_size: int) -> str | None:
    """A sentence for the start of a run when this client's share of a split is a handful.

    A share of fewer than two batches means every local step revisits the same few examples
    (a Dirichlet split with a small alpha gives some clients that); None when it is fine.
    """
    if num_clients < 2 or share >= 2 * batch_size:
        return None
    return (f"this client's share of the split is {share} of {total} examples (an even share "
            f"would be {total // num_clients}), under two batches of {batch_size}: its steps "
            "will revisit the same few examples. Raise --dirichlet-alpha for a more even split, "
            "or use fewer clients or more data")
