"""The wire messages of protocol v1 (docs/design.md §6), shared by the client daemon and the server.

Every body is one msgpack map whose keys are the fields of a dataclass below, each field's
meaning and limits declared with it (`wire()`); zorba_common.codec encodes and strictly
decodes them. Both sides validate: the server what it receives, the client what it receives
back.

`docs/protocol.md` describes the endpoints that carry these messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from zorba_common.codec import SchemaError, wire
from zorba_common.limits import (
    MAX_BLOCKS,
    MAX_COUNTER,
    MAX_LOSS,
    MAX_MEMORY_BYTES,
    MAX_MODEL_PARAMS,
    MAX_RESPONSE_BYTES,
    MAX_SAMPLES,
    MAX_SEQUENCE_LEN,
    MAX_STEP_TIME_S,
    MAX_STEPS_PER_REPORT,
)
from zorba_common.memory_model import MemorySettings, ModelFootprint
from zorba_common.readout import MAX_READOUT_DIRECTIONS, READOUT_LR, READOUT_TRUST_RADIUS
from zorba_common.run_defaults import ANTITHETIC, DTYPES, ESTIMATORS, RUN_MODES, ZORBA

PROTOCOL_VERSION = 1




def check_footprint(footprint: ModelFootprint) -> None:
    """The cross-field rules of a footprint (each field's own bounds are on its field)."""
    over = [(b, q, p) for b, (q, p) in enumerate(
        zip(footprint.quantizable_block_params, footprint.block_params, strict=True)) if q > p]
    if over:
        b, q, p = over[0]
        raise SchemaError(f"footprint.quantizable_block_params[{b}]: {q} exceeds the block's "
                          f"{p} parameters; send the loader's footprint unchanged")
    total = sum(footprint.block_params) + footprint.embed_head_params
    if total > MAX_MODEL_PARAMS:
        raise SchemaError(f"footprint: {total} parameters in all exceed the limit of "
                          f"{MAX_MODEL_PARAMS}")




@dataclass(frozen=True)
class ErrorBody:
    """Body of every 4xx/5xx answer."""

    error: str = field(metadata=wire(
        "Stable machine-readable code, e.g. `round_closed`, `invalid_scalar` (see Errors)."))
    message: str = field(metadata=wire("What was wrong and what to do, for people.",
                                       max_len=4096))


@dataclass(frozen=True)
class MemoryProfile:
    """How the device holds the model: the device-side half of `MemorySettings`.

    The run fixes batch size and sequence length and the server learns the calibration
    from measured peaks, so those are not the client's to send.
    """

    train_dtype: str = field(default="fp32", metadata=wire(
        "Precision of an activated (trainable) block.", choices=DTYPES))
    frozen_dtype: str = field(default="nf4", metadata=wire(
        "Precision of a frozen block's Linear weights.", choices=DTYPES))
    frozen_other_dtype: str = field(default="fp32", metadata=wire(
        "Precision of a frozen block's other parameters (norms, biases).", choices=DTYPES))
    embed_dtype: str = field(default="fp32", metadata=wire(
        "Precision of the embeddings and LM head.", choices=DTYPES))
    snapshot_dtype: str | None = field(default=None, metadata=wire(
        "Host copy of each trainable block for the exact round-end revert, counted against "
        "the budget (nil: none in memory; the client spills it to disk).", choices=DTYPES))
    runtime_bytes: int = field(default=350 * 2**20, metadata=wire(
        "Interpreter, framework and allocator overhead.", unit="bytes", ge=0,
        le=MAX_MEMORY_BYTES))

    def __post_init__(self) -> None:
        self.settings(batch_size=1, seq_len=1)  # MemorySettings checks the dtype names

    def settings(self, batch_size: int, seq_len: int, calibration: float = 1.0) -> MemorySettings:
        return MemorySettings(
            train_dtype=self.train_dtype,
            frozen_dtype=self.frozen_dtype,
            frozen_other_dtype=self.frozen_other_dtype,
            embed_dtype=self.embed_dtype,
            snapshot_dtype=self.snapshot_dtype,
            batch_size=batch_size,
            seq_len=seq_len,
            runtime_bytes=self.runtime_bytes,
            calibration=calibration,
        )


@dataclass(frozen=True)
class TaskProbe:
    """A client's start-up probe of its task loss around the base model (zorba_edge/engine/
    step_probe.py), from which the server may set the run's step (run.step_rule)."""

    e_g2: float = field(metadata=wire(
        "E[g^2]: the mean squared projected gradient over the probe's directions and batches.",
        unit="loss^2 / weight units^2", ge=0))
    signal: float = field(metadata=wire(
        "E[g_A g_B]: the mean product of one direction's projected gradients on two "
        "independent batches (the task's |gradient|^2; may come out below 0 by noise).",
        unit="loss^2 / weight units^2"))
    curvature: float = field(metadata=wire(
        "E[z^T H z]: the mean second difference of the loss along the probe's directions.",
        unit="loss / weight units^2"))
    batch_size: int = field(metadata=wire(
        "Examples in each of the probe's batches.", unit="examples", gt=0, le=MAX_SAMPLES))
    weight_rms: float = field(metadata=wire(
        "RMS of the blocks' weight matrices, what the trust region is relative to (the probe "
        "moved 0.03 of it per parameter).", unit="weight units", gt=0))


@dataclass(frozen=True)
class DeviceProfile:
    """What a device tells the server when it registers."""

    device_type: str = field(metadata=wire("`cpu`, `cuda`, `mps`, ...: for people and metrics."))
    memory_budget_bytes: int = field(metadata=wire(
        "Free memory measured at start-up, less the client's safety margin.", unit="bytes",
        gt=0, le=MAX_MEMORY_BYTES))
    step_time_s: float = field(metadata=wire(
        "Measured time of one local step (two forward passes) on this device.", unit="seconds",
        gt=0, le=MAX_STEP_TIME_S))
    num_samples: int = field(metadata=wire(
        "Local training examples: the client's aggregation and coverage weight w_n.",
        unit="examples", gt=0, le=MAX_SAMPLES))
    footprint: ModelFootprint = field(metadata=wire(
        "Sizes of the model, as the loader reports them."))
    model_fingerprint: str = field(metadata=wire(
        "Identifies the base model (weights and tokenizer); every client of a run must match.",
        min_len=1))
    memory: MemoryProfile = field(default=MemoryProfile(), metadata=wire(
        "The device's precisions and runtime overhead."))
    name: str = field(default="", metadata=wire("Optional label for the status page."))
    base_rms: tuple[float, ...] | None = field(default=None, metadata=wire(
        "RMS of each block's base weights (every parameter a direction perturbs, as the model "
        "source gives them in fp32), one per block in block order: what the server's drift "
        "bound (run.max_drift) is relative to. The server keeps the value most clients agree "
        "on and ignores a client whose values stand apart. Left out while nil (not measured: "
        "an older client), so an older server keeps accepting the profile of a client that "
        "has none.", unit="weight units", max_len=MAX_BLOCKS, item=wire(gt=0),
        omit_default=True))
    fluency_curvature: float | None = field(default=None, metadata=wire(
        "The model's fluency curvature kappa: the relative rise of its next-token loss on the "
        "packaged generic text per squared RMS move per parameter, when every block moves at "
        "once along random directions (measured at start-up, zorba_edge/engine/"
        "drift_tolerance.py). The server turns the clients' median into the largest move any "
        "block may make (run.drift_budget). Left out while nil (not measured: an older client, "
        "or one that could not hold every block at the training precision).",
        unit="1 / weight units^2", ge=0, omit_default=True))
    task_probe: TaskProbe | None = field(default=None, metadata=wire(
        "The task loss's gradient and curvature around the base model, measured at start-up "
        "on the client's own training batches (zorba_edge/engine/step_probe.py). With "
        "run.step_rule = probe the server sets the step from the clients' values. Left out "
        "while nil (not measured: an older client, or one that could not hold every block at "
        "the training precision).", omit_default=True))

    def __post_init__(self) -> None:
        check_footprint(self.footprint)
        if self.base_rms is not None and len(self.base_rms) != self.footprint.num_blocks:
            raise SchemaError(f"base_rms: {len(self.base_rms)} values for a model of "
                              f"{self.footprint.num_blocks} blocks; send one per block")


@dataclass(frozen=True)
class RegisterRequest:
    """POST /v1/clients."""

    enrolment_secret: str = field(metadata=wire("The run's enrolment secret."))
    profile: DeviceProfile = field(metadata=wire("The device and its model."))
    protocol: int = field(default=PROTOCOL_VERSION, metadata=wire(
        f"Protocol version the client speaks ({PROTOCOL_VERSION})."))


@dataclass(frozen=True)
class HyperParams:
    """The run's hyper-parameters of local training."""

    lr: float = field(metadata=wire("Learning rate of the ZO steps.", gt=0))
    mu: float = field(metadata=wire("Perturbation scale.", gt=0))
    batch_size: int = field(metadata=wire("Examples per local step.", unit="examples", ge=1))
    seq_len: int = field(metadata=wire("Tokens per example.", unit="tokens", ge=1))
    estimator: str = field(default=ANTITHETIC, metadata=wire(
        "How a batch's projected gradients are measured: `antithetic` (two forwards per "
        "direction), `one-sided` (n directions share one unperturbed forward: n + 1) or "
        "`normalised` (one-sided, each loss difference divided by the standard deviation of "
        "the batch's n differences instead of by mu: a step of one size whatever the model's "
        "gradient scale; n >= 2).",
        choices=ESTIMATORS))
    directions: int = field(default=1, metadata=wire(
        "Directions (pool indices) measured on each batch; each reports its own (k, g) and "
        "moves theta by lr * g * z.", ge=1, le=64))
    trust_radius: float = field(default=0.0, metadata=wire(
        "The trust region: the longest RMS move per perturbed parameter one batch's step may "
        "make, as a fraction of the RMS of the client's perturbed weight matrices; a longer "
        "step is scaled down to it, its reported scalars with it (0: no limit; a client of an "
        "older server, which sends no field, takes no limit).", ge=0))
    readout_directions: int = field(default=0, metadata=wire(
        "Directions measured on the label readout (the LM head's rows of the label tokens, "
        "column R = num_blocks of alpha) per batch, every client of a classification run "
        "holding it besides its blocks; all scored from the batch's first forward's head "
        "inputs, no forward of their own (0: the readout is off and alpha has num_blocks "
        "columns; left out while 0).", ge=0, le=MAX_READOUT_DIRECTIONS, omit_default=True))
    readout_lr: float = field(default=READOUT_LR, metadata=wire(
        "Step of the readout: alpha[k, R] gains readout_lr x g per readout scalar, and the "
        "client's rows move by readout_lr x sum g z (at most readout_trust_radius x the rows' "
        "RMS). Left out while at its default.", gt=0, omit_default=True))
    readout_trust_radius: float = field(default=READOUT_TRUST_RADIUS, metadata=wire(
        "The readout's own trust region: the longest RMS move of the label rows one batch's "
        "readout step may make, as a fraction of the rows' RMS; a longer step is scaled down "
        "to it, its reported scalars with it (0: no limit). The server cuts it with the step "
        "(the loss guard's halving, the plateau cut). Left out while at its default.", ge=0,
        omit_default=True))


@dataclass(frozen=True)
class RunInfo:
    """The run a client joined: what it needs to build the same directions and model."""

    run_id: str = field(metadata=wire("Identifies the run (and its database)."))
    seed: int = field(metadata=wire(
        "Run seed of the noise z[k, b] (zorba_common.noise).", ge=0))
    pool_size: int = field(metadata=wire("K, seeds in the pool.", ge=1))
    num_blocks: int = field(metadata=wire("B, blocks of the model.", ge=1, le=MAX_BLOCKS))
    model_fingerprint: str = field(metadata=wire("The run's base model."))
    hyper: HyperParams = field(metadata=wire("Hyper-parameters of local training."))
    round_duration_s: float = field(metadata=wire(
        "From a round's opening to its deadline.", unit="seconds", gt=0))
    poll_timeout_s: float = field(metadata=wire(
        "Longest wait of a long poll.", unit="seconds", gt=0))
    max_abs_scalar: float = field(metadata=wire(
        "Reports with a projected gradient beyond this magnitude are refused.", gt=0))
    mode: str = field(default=ZORBA, metadata=wire(
        "The run mode (see Run modes); a client of an older server (no field) runs `zorba`.",
        choices=RUN_MODES))


@dataclass(frozen=True)
class RegisterResponse:
    """201 answer to POST /v1/clients."""

    client_id: str = field(metadata=wire("The client's id, kept in its state file."))
    token: str = field(metadata=wire(
        "Bearer token for every later request; the server keeps only its hash."))
    run: RunInfo = field(metadata=wire("The run joined."))


@dataclass(frozen=True)
class AlphaDelta:
    """One applied round: alpha[k, b] += values[i, j] for k = pool_indices[i], b = blocks[j],
    and alpha[k, readout_block] += readout_values[i] for the i-th k set in `readout_rows`.

    A client syncs by `theta[b] -= value * z[k, b]` for every entry whose block it holds.
    The label readout's column travels apart from the dense matrix: each client of a round
    measures its own readout pool indices, a few hundred a round, and as rows of the dense
    matrix each would cost a float for every block (docs/learning.md, "The readout's own
    directions").
    """

    version: int = field(metadata=wire(
        "The alpha version this delta produces (versions count published deltas: applied "
        "rounds and the loss guard's rollbacks).",
        ge=1, le=MAX_COUNTER))
    round: int = field(metadata=wire("The round applied.", ge=1, le=MAX_COUNTER))
    pool_indices: tuple[int, ...] = field(metadata=wire("Rows of alpha: distinct, ascending.",
                                                        item=wire(ge=0)))
    blocks: tuple[int, ...] = field(metadata=wire("Columns of alpha: distinct, ascending.",
                                                  item=wire(ge=0)))
    values: bytes = field(metadata=wire(
        "float32 little-endian, len(pool_indices) x len(blocks), row-major.",
        max_len=MAX_SEQUENCE_LEN * 256 * 4))
    readout_block: int | None = field(default=None, metadata=wire(
        "The label readout's column R (num_blocks) that `readout_rows` and `readout_values` "
        "move; never one of `blocks`. Left out while nil (no readout entries).",
        ge=0, omit_default=True))
    readout_rows: bytes = field(default=b"", metadata=wire(
        "The pool indices k with an entry in column readout_block, as a bitmap: bit k % 8 "
        "(least significant first) of byte k // 8. Left out while empty.",
        max_len=MAX_SEQUENCE_LEN // 8 + 1, omit_default=True))
    readout_values: bytes = field(default=b"", metadata=wire(
        "One value per bit set in readout_rows, in ascending k: float16 little-endian where "
        "it holds 2 bytes per bit (the server rounds an applied round's readout increments to "
        "float16 before it adds them to its own table, so the rebuild stays exact), else "
        "float32. Left out while empty.", max_len=MAX_SEQUENCE_LEN * 4, omit_default=True))

    def __post_init__(self) -> None:
        expected = 4 * len(self.pool_indices) * len(self.blocks)
        if len(self.values) != expected:
            raise SchemaError(
                f"values: {len(self.values)} bytes for {len(self.pool_indices)} pool indices x "
                f"{len(self.blocks)} blocks; expected {expected} (float32)"
            )
        rows = len(self.readout_ks())
        if len(self.readout_values) not in (2 * rows, 4 * rows):
            raise SchemaError(f"readout_values: {len(self.readout_values)} bytes for {rows} bits "
                              f"set in readout_rows; expected {2 * rows} (float16) or {4 * rows} "
                              "(float32)")
        if (self.readout_block is None) != (rows == 0):
            raise SchemaError("readout_block: set exactly when readout_rows has a bit set")
        if self.readout_block is not None and self.readout_block in self.blocks:
            raise SchemaError(f"readout_block: {self.readout_block} is one of blocks; the readout's "
                              "column travels only in readout_rows and readout_values")

    def matrix(self) -> np.ndarray:
        """The dense part (without the readout's column)."""
        return np.frombuffer(self.values, dtype="<f4").reshape(
            len(self.pool_indices), len(self.blocks)
        )

    def readout_ks(self) -> tuple[int, ...]:
        """The pool indices of the readout's entries, ascending."""
        bits = np.unpackbits(np.frombuffer(self.readout_rows, dtype=np.uint8), bitorder="little")
        return tuple(int(k) for k in np.flatnonzero(bits))

    def readout_matrix(self) -> np.ndarray:
        """The readout's values as float32 (exact: float16 values widen without loss)."""
        rows = len(self.readout_ks())
        dtype = "<f2" if rows and len(self.readout_values) == 2 * rows else "<f4"
        return np.frombuffer(self.readout_values, dtype=dtype).astype(np.float32)

    def entries(self) -> list[tuple[int, int, float]]:
        """The non-zero (k, block, delta) triples: the dense part k-major, then the readout's."""
        matrix = self.matrix()
        dense = [
            (self.pool_indices[i], self.blocks[j], float(matrix[i, j]))
            for i, j in zip(*np.nonzero(matrix), strict=True)
        ]
        if self.readout_block is None:
            return dense
        return dense + [(k, self.readout_block, float(v))
                        for k, v in zip(self.readout_ks(), self.readout_matrix(), strict=True) if v]

    def add_to_(self, table: np.ndarray) -> None:
        """table[k, b] += each entry, in float64 (the float32 values are exact in it): how the
        server's stored table is the sum of its deltas (aggregation.apply_delta)."""
        if self.pool_indices:
            table[np.ix_(self.pool_indices, self.blocks)] += self.matrix().astype(np.float64)
        if self.readout_block is not None:
            table[list(self.readout_ks()), self.readout_block] += self.readout_matrix().astype(np.float64)

    def max_index(self) -> tuple[int, int]:
        """The largest pool index and block named (-1 where none)."""
        ks = list(self.pool_indices) + list(self.readout_ks())
        bs = list(self.blocks) + ([] if self.readout_block is None else [self.readout_block])
        return max(ks, default=-1), max(bs, default=-1)

    @staticmethod
    def from_matrix(version: int, round_: int, pool_indices: tuple[int, ...],
                    blocks: tuple[int, ...], matrix: np.ndarray,
                    readout_block: int | None = None) -> AlphaDelta:
        """The delta of a dense (pool_indices x blocks) matrix; with `readout_block` (the run's
        column R), that column travels as a bitmap of its non-zero rows and their values, and
        rows left all zero are dropped from the dense part; its values go as float16 where
        every one is exactly a float16 (`half_exact`), else as float32."""
        matrix = np.ascontiguousarray(matrix, dtype="<f4")
        if readout_block is None or readout_block not in blocks:
            return AlphaDelta(version, round_, tuple(pool_indices), tuple(blocks), matrix.tobytes())
        column = list(blocks).index(readout_block)
        readout = matrix[:, column]
        body = np.delete(matrix, column, axis=1)
        body_blocks = tuple(b for b in blocks if b != readout_block)
        keep = np.flatnonzero(np.any(body != 0, axis=1)) if body_blocks else np.zeros(0, dtype=np.int64)
        set_rows = np.flatnonzero(readout != 0)
        ks = np.asarray(pool_indices, dtype=np.int64)
        bits = np.zeros(int(ks[set_rows].max()) + 1 if set_rows.size else 0, dtype=np.uint8)
        bits[ks[set_rows]] = 1
        order = np.argsort(ks[set_rows], kind="stable")
        return AlphaDelta(
            version, round_, tuple(int(k) for k in ks[keep]) if body_blocks else (),
            body_blocks if keep.size else (),
            np.ascontiguousarray(body[keep]).tobytes() if keep.size else b"",
            readout_block if set_rows.size else None,
            np.packbits(bits, bitorder="little").tobytes() if set_rows.size else b"",
            _readout_bytes(readout[set_rows][order]))


def half_exact(values: np.ndarray) -> np.ndarray:
    """`values` (float32) rounded to the nearest float16, where that is finite (else as they
    are): what the server adds for an applied round's readout column, so that the delta can
    carry it in 2 bytes a value and every client rebuilds the server's table exactly."""
    with np.errstate(over="ignore"):  # too large for float16: kept as it is
        half = values.astype(np.float16)
    return np.where(np.isfinite(half), half.astype(np.float32), values).astype(np.float32)


def _readout_bytes(values: np.ndarray) -> bytes:
    """float16 where every value is one exactly (lossless), else float32."""
    values = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):  # too large: not equal below, sent as float32
        half = values.astype("<f2")
    if np.array_equal(half.astype(np.float32), values):
        return half.tobytes()
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


@dataclass(frozen=True)
class Assignment:
    """What one client trains in one round."""

    round: int = field(metadata=wire("The round.", ge=1, le=MAX_COUNTER))
    base_version: int = field(metadata=wire(
        "The alpha version the round trains on; the client must be synced to it.",
        ge=0, le=MAX_COUNTER))
    blocks: tuple[int, ...] = field(metadata=wire(
        "The activated blocks; every other block stays frozen.", item=wire(ge=0)))
    pool_indices: tuple[int, ...] = field(metadata=wire(
        "One pool index per local step, in order (k_t for step t).", item=wire(ge=0)))
    hyper: HyperParams = field(metadata=wire("Hyper-parameters of this round."))
    deadline_in_s: float = field(metadata=wire(
        "Time from the answer to the round's deadline (use this, not the wall clock).",
        unit="seconds"))
    deadline_unix: float = field(metadata=wire("The deadline on the server's clock.",
                                               unit="seconds since 1970 (UTC)"))
    measure_generic: bool = field(default=False, metadata=wire(
        "The fluency watch asks this client to measure the next-token loss of the model as "
        "received on the generic text every client package carries, beside its check loss, "
        "and to report it as `loss_generic` (one forward pass of a few rows). Left out while "
        "false: the server asks only clients whose profile carried `base_rms`, which came with "
        "this field, so an older client is never sent it.", omit_default=True))
    readout_pool_indices: tuple[int, ...] = field(default=(), metadata=wire(
        "The label readout's own pool indices (column R): `hyper.readout_directions` of them per "
        "batch, in order, none measured by another client of the round. Left out while empty: "
        "the readout then takes the body's `pool_indices` in turn.", item=wire(ge=0),
        omit_default=True))


WAIT, TRAIN, FINISHED = "wait", "train", "finished"


@dataclass(frozen=True)
class NextRound:
    """200 answer to GET /v1/rounds/next."""

    status: str = field(metadata=wire(
        "`train` (assignment set), `wait` (poll again), `finished` (the run is over).",
        choices=(TRAIN, WAIT, FINISHED)))
    version: int = field(metadata=wire("The server's alpha version now.", ge=0, le=MAX_COUNTER))
    assignment: Assignment | None = field(default=None, metadata=wire(
        "The work, with status `train` and only then."))
    deltas: tuple[AlphaDelta, ...] = field(default=(), metadata=wire(
        "From the client's version to the assignment's base version (or to `version`)."))
    catch_up: bool = field(default=False, metadata=wire(
        "The gap is too large for deltas: fetch GET /v1/state, then poll again."))
    retry_after_s: float = field(default=0.0, metadata=wire(
        "Suggested pause before the next poll.", unit="seconds", ge=0))
    reason: str = field(default="", metadata=wire("Why there is no work, for people.",
                                                  max_len=4096))

    def __post_init__(self) -> None:
        if self.status not in (WAIT, TRAIN, FINISHED):
            raise SchemaError(f"status: {self.status!r} is not one of train, wait, finished")
        if (self.status == TRAIN) != (self.assignment is not None):
            raise SchemaError("status: an assignment comes with status 'train' and only then")


@dataclass(frozen=True)
class Report:
    """POST /v1/rounds/{round}/reports: what a client measured in one round."""

    idempotency_key: str = field(metadata=wire(
        "Client-chosen, unique per report: a retry with the same key and content is safe.",
        max_len=128))
    base_version: int = field(metadata=wire("The alpha version the client trained on.",
                                            ge=0, le=MAX_COUNTER))
    steps: tuple[tuple[int, float], ...] = field(metadata=wire(
        "(k_t, g_t) per local step, in step order: a prefix of the assignment's pool indices "
        "(at least one; none in the fedavg baseline, whose training travels as weights). "
        "Each g_t finite with |g_t| <= the run's max_abs_scalar.",
        max_len=MAX_STEPS_PER_REPORT, gradient=True))
    num_samples: int = field(metadata=wire(
        "Examples seen this round (the aggregation weight is the registered sample count).",
        unit="examples", ge=0, le=MAX_SAMPLES))
    loss_mean: float = field(metadata=wire("Mean training loss of the round.", unit="nats",
                                           ge=0, le=MAX_LOSS))
    loss_last: float = field(metadata=wire("Training loss of the last step.", unit="nats",
                                           ge=0, le=MAX_LOSS))
    peak_memory_bytes: int = field(metadata=wire(
        "Measured peak of the round (0: not measured).", unit="bytes", ge=0,
        le=MAX_MEMORY_BYTES))
    step_time_s: float = field(metadata=wire("Measured time of one local step.", unit="seconds",
                                             ge=0, le=MAX_STEP_TIME_S))
    loss_check: float | None = field(default=None, metadata=wire(
        "Loss of the model as received (base_version, before any local step) on the client's "
        "check batch, the same examples every round: how the server tells whether an applied "
        "update made the model worse (docs/learning.md, the loss guard). Absent: not measured.",
        unit="nats", ge=0, le=MAX_LOSS))
    loss_generic: float | None = field(default=None, metadata=wire(
        "Next-token loss of the model as received (base_version) on the packaged generic text, "
        "measured where the assignment's `measure_generic` asked for it: how the server's "
        "fluency watch tells whether the run still leaves a language model (docs/learning.md, "
        "the fluency watch). Left out while nil (not measured).", unit="nats", ge=0,
        le=MAX_LOSS, omit_default=True))
    readout_steps: tuple[tuple[int, float], ...] = field(default=(), metadata=wire(
        "(k, g) per pool index of the label readout's directions (block R = num_blocks), "
        "summed over the round's batches: each k one of the assignment's pool indices, at most "
        "once. Present only where the assignment's hyper has readout_directions > 0 and the "
        "client's task is a classification; each g finite with |g| <= the run's "
        "max_abs_scalar. Left out while empty.",
        max_len=MAX_STEPS_PER_REPORT, gradient=True, omit_default=True))

    def __post_init__(self) -> None:
        if not self.idempotency_key:
            raise SchemaError("idempotency_key: must not be empty (use a fresh random string)")


@dataclass(frozen=True)
class ReportAck:
    """200 answer to a report; a retry with the same key gets the very same ack."""

    round: int = field(metadata=wire("The round reported to."))
    idempotency_key: str = field(metadata=wire("The report's key.", max_len=128))
    received_at: float = field(metadata=wire("When the server committed the report.",
                                             unit="seconds since 1970 (UTC)"))


@dataclass(frozen=True)
class AlphaState:
    """200 answer to GET /v1/state: the whole coefficient table."""

    run_id: str = field(metadata=wire("The run."))
    version: int = field(metadata=wire("The table's alpha version.", ge=0, le=MAX_COUNTER))
    pool_size: int = field(metadata=wire("K, rows.", ge=1))
    num_blocks: int = field(metadata=wire("B, columns.", ge=1))
    alpha: bytes = field(metadata=wire(
        "float64 little-endian, pool_size x num_blocks, row-major (alpha[k, b] at k*B + b).",
        max_len=MAX_RESPONSE_BYTES))

    def __post_init__(self) -> None:
        expected = 8 * self.pool_size * self.num_blocks
        if len(self.alpha) != expected:
            raise SchemaError(
                f"alpha: {len(self.alpha)} bytes, expected {expected} (float64 K x B)")

    def matrix(self) -> np.ndarray:
        return np.frombuffer(self.alpha, dtype="<f8").reshape(self.pool_size, self.num_blocks)


MESSAGES: tuple[type, ...] = (RegisterRequest, RegisterResponse, NextRound, Report, ReportAck,
                              AlphaState, ErrorBody)
"""The top-level bodies, in the order docs/protocol.md lists them."""
