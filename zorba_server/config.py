"""The server's configuration: one TOML file, with command-line flags on top.

    [server]      host, port, tls_cert, tls_key
    [storage]     path, synchronous
    [run]         seed, pool_size, lr, mu, batch_size, seq_len, round/membership timing,
                  min_reports, min_clients, max_rounds, model_fingerprint, [run.footprint]
    [aggregation] method, clip, trim_fraction, max_abs_scalar
    [scheduler]   objective, min_cover, epsilon, max_perturbed_params, stability_bonus, time_limit_s

The enrolment secret is never a flag (it would show in `ps`): it comes from the file,
from `enrolment_secret_file`, or from the ZORBA_ENROLMENT_SECRET environment variable.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zorba_common.errors import ZorbaError
from zorba_common.fluency import FLUENCY_TOLERANCE
from zorba_common.memory_model import MEMORY_HEADROOM, ModelFootprint
from zorba_common.readout import MAX_READOUT_DIRECTIONS, READOUT_LR, READOUT_TRUST_RADIUS
from zorba_common.run_defaults import BATCH_SIZE, ESTIMATORS, NORMALISED, ONE_SIDED, SEQ_LEN, ZORBA
from zorba_server.aggregation_rules import RULES, VOTING_RULES
from zorba_server.drift_budget import DRIFT_BUDGET
from zorba_server.enrolment import MIN_SECRET_CHARS
from zorba_server.modes import MODES
from zorba_server.scheduler import SchedulerConfig
from zorba_server.step_rule import STEP_RULES
from zorba_server.step_size import LR_SCALINGS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the stdlib parser arrived in 3.11
    import tomli as tomllib  # type: ignore[no-redef]

SECRET_ENV = "ZORBA_ENROLMENT_SECRET"


class ConfigError(ZorbaError, ValueError):
    """A configuration value that is missing, unknown or out of range."""


def _one_of(names: list[str]) -> str:
    """`a, b or c`: the choices an error message offers."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8470
    tls_cert: str | None = None
    tls_key: str | None = None
    header_timeout_s: float = 30.0
    """Longest a new connection may take to send its first request's head (then it is closed)."""
    max_pending_heads: int = 1024
    """Connections that may be sending a first request's head at once; more are refused."""

    def __post_init__(self) -> None:
        if self.header_timeout_s <= 0 or self.max_pending_heads < 1:
            raise ConfigError("server.header_timeout_s must be > 0 and server.max_pending_heads >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "server.tls_cert and server.tls_key go together: give both or neither")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port={self.port} is not a TCP port")


@dataclass(frozen=True)
class StorageConfig:
    path: str = "zorba-server.sqlite3"
    synchronous: str = "full"
    """sqlite's synchronous mode: `full` survives power loss, `normal` only process crashes."""

    def __post_init__(self) -> None:
        if self.synchronous not in ("full", "normal"):
            raise ConfigError(f"storage.synchronous={self.synchronous!r}: use 'full' or 'normal'")


POOL_SLICES = ("shared", "disjoint")
MAX_STEPS = 65_536
"""The most local steps a round may assign (a report's size limit)."""


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    """Run seed of the perturbation directions z[k, b] and of the pool indices."""
    pool_size: int = 1024
    """K, seeds in the pool (rows of alpha)."""
    lr: float = 1e-4
    """Learning rate of the zeroth-order steps (the quickstart's, measured in docs/learning.md;
    with lr_scaling `dimension` it is the step of a client perturbing one average block, and
    2.6e-3 is the value measured there). The loss guard below backs it off on a model it is
    too large for."""
    mu: float = 1e-3
    """Perturbation scale of the two-sided estimate."""
    batch_size: int = BATCH_SIZE
    """Examples per local step."""
    seq_len: int = SEQ_LEN
    """Tokens per example."""
    round_duration_s: float = 300.0
    """From a round's opening to its deadline; local steps are sized to fit it."""
    report_grace_s: float = 5.0
    """How long after its deadline a round still takes reports before it closes (when one is
    missing): clients plan their steps to end before the deadline, and a report already on its
    way then (its upload, the server's store) still counts rather than being thrown away
    (issue 26, item 6: 3 of 18 reports were, one with all of its planned steps done)."""
    min_reports: int = 1
    """Fewer reports by the deadline: the round applies nothing and is re-run."""
    min_clients: int = 1
    """Active clients (seen within member_timeout_s) needed before any round opens."""
    max_rounds: int = 0
    """Applied rounds after which the run is finished (0: never)."""
    member_timeout_s: float = 0.0
    """A client unseen for this long leaves the schedule (0: 2 x round_duration_s + 60)."""
    poll_timeout_s: float = 25.0
    """Longest a GET /v1/rounds/next waits for a round before answering `wait`."""
    compute_fraction: float = 0.8
    """Share of the round a client's local steps may take (the rest: sync, report, network)."""
    min_steps: int = 1
    """Fewest local steps a client is assigned, however slow it is."""
    max_steps: int = 256
    """Most local steps a client is assigned, however fast it is (at most 65,536)."""
    estimator: str = ONE_SIDED
    """`antithetic` (L(theta + mu z) and L(theta - mu z): two forwards per direction) or
    `one-sided` (`directions` perturbed forwards share one unperturbed one)."""
    directions: int = 4
    """Directions measured on each batch (1 to 64); each reports its own scalar."""
    trust_radius: float = 0.03
    """The trust region of a batch's step: the longest RMS move per perturbed parameter it may
    make, as a fraction of the RMS of the perturbed weight matrices; a longer step is scaled
    down to it (0: off). It bounds the step on a model whose gradients are far larger than lr
    was chosen for (Gemma 3's are ~60x SmolLM2's) and leaves a step within it unchanged
    (docs/learning.md, "The trust region")."""
    readout_directions: int = 0
    """Label-readout directions per batch (0: off; 1..64): the head's label rows as column R of
    alpha, held by every client of a classification run, scored from each batch's first forward."""
    readout_lr: float = READOUT_LR
    """The readout's step: alpha[k, R] += readout_lr x g per scalar (cut with lr; no lr_scaling)."""
    readout_trust_radius: float = READOUT_TRUST_RADIUS
    """The readout's own trust region, relative to the label rows' RMS (0: off). Every readout
    batch measured was trust-bound, so this is the readout's step size; it is cut with lr by
    the loss guard and the plateau rule (zorba_server/step_size.py)."""
    lr_scaling: str = "none"
    """`none`: one lr for every client; `dimension`: each client's step is lr x (mean block
    size / parameters it perturbs), so `lr` is the step of a client holding one average block
    and every client moves the loss alike. `dimension` at lr 2.6e-3 lowered the held-out loss
    faster but did not raise accuracy, so it is not the default (docs/learning.md). `energy`:
    lr x (estimated E[g^2] of all blocks / that of the client's blocks), so `lr` is the step of
    a client perturbing every block (docs/learning.md, "Gradient energy per block")."""
    step_rule: str = "constant"
    """`constant`: the step is `lr`. `probe`: `lr` is set from the clients' start-up probes of
    the task loss (its gradient, signal and curvature around the base model: half the best lr
    of the one-step bound, the median over clients; zorba_server/step_rule.py), `lr` where no
    client sent a usable probe (older clients). Not with the normalised estimator, whose lr
    is of another unit (docs/learning.md, "The step from a start-up probe")."""
    loss_jump_tolerance: float = 0.5
    """The loss guard: a round in which a majority of the clients (by count and by sample
    weight) see their check-batch loss stand more than this fraction above theirs at the last
    version whose losses did not rise is not applied, and the table is rolled back to that
    version (clients without check losses: judged by their training losses; a client whose
    losses are implausible next to the others' is left out, then ignored). Each rejection
    halves the step for later rounds, never below 1/32 of lr; 5 applied rounds in a row undo
    one halving (0: off; docs/learning.md)."""
    plateau_rounds: int = 6
    """A step that decays as learning flattens: this many applied rounds in a row whose
    clients' check losses do not come back to the loss guard's anchor (the last version whose
    check losses did not rise) halve the step for later rounds, without rolling anything back
    (0: never). In the 20-minute quickstart it cut the step after rounds 28, 34, 40 and 46 and
    the held-out loss fell to the end instead of turning up after round 33; no 3-minute run
    reaches a cut (docs/learning.md, "A step that decays on a plateau")."""
    loss_drift_rounds: int = 3
    """The loss guard's slow rule: when the check losses have stood above the anchor's for
    this many applied rounds in a row and now exceed it by more than `loss_drift_tolerance`,
    the round is rolled back as for a jump (0: off; zorba_server/loss_drift.py)."""
    loss_drift_tolerance: float = 0.1
    """How far above the anchor's a drifting check loss may stand (a fraction of
    max(anchor's loss, ln 2)) before `loss_drift_rounds` rounds of it roll the table back."""
    max_drift: float = 0.0
    """The drift bound: the longest distance of a block of base + alpha from its base weights,
    as a fraction of their norm; a round that would go further is scaled down on that block
    (0: off). Needs each block's base RMS: the simulator gives it to the engine, clients send
    it in their profiles (zorba_server/drift.py, base_rms.py)."""
    drift_budget: float = DRIFT_BUDGET
    """The drift budget, measured: no block of base + alpha moves further (RMS per parameter)
    than the move at which the clients' probe predicts the generic-text loss to stand this
    fraction of `fluency_tolerance` above the base model's; a round that would go further is
    scaled down on that block; with max_rounds set, each round takes only an even share of
    what is left, so the run reaches the bound at its end (0: off; without a measurement, from
    older clients, off too; zorba_server/drift_budget.py, docs/learning.md "The drift budget")."""
    fluency_tolerance: float = FLUENCY_TOLERANCE
    """The fluency watch: every client that sent its base RMS (a client of this protocol
    revision) measures, each round, the next-token loss of the model it received on a packaged
    generic text (one forward pass of a few rows); when a majority of them see it more than
    this fraction above their base model's, the round is not applied, the table goes back to
    the last version the watch found fluent and the step is halved (0: off;
    zorba_server/fluency_watch.py)."""
    pool_slices: str = "shared"
    """Which pool indices each client of a round measures. `shared`: a prefix of one list, so
    the holders of a block measure the same directions and aggregation averages their
    estimates of each one (the published increments have as many rows as the longest client's
    steps). `disjoint`: consecutive slices of a longer list, one per client, so a block moves
    along every holder's directions (rows: the sum of the clients' steps). What each does to
    learning and to the bytes per round: docs/learning.md, "Shared directions"."""
    mode: str = ZORBA
    """A mode of zorba_server.modes.MODES: `zorba` (the scheduler assigns blocks), or a
    baseline: `zorba-uniform` (the same number of random blocks on every client), `fedzo-full`
    (every block; clients that cannot hold them all take no part), `fedavg` (first-order AdamW
    on every block, weights exchanged both ways)."""
    keep_weight_versions: bool = False
    """fedavg: keep every version's global weights on disk (for per-round evaluation), not
    just the latest."""
    memory_headroom: float = MEMORY_HEADROOM
    """Share of each declared budget that registration and the scheduler leave free (the
    client's own check leaves the same default): the memory model is an estimate (allocator
    fragmentation and slow RSS growth are not in it; measured: peaks 0.6% over a budget filled
    to the edge in the quickstart)."""
    catch_up_rounds: int = 64
    """Deltas kept for syncing; a client further behind fetches /v1/state."""
    model_fingerprint: str | None = None
    """Pin the base model; None: the first client's model is pinned."""
    footprint: ModelFootprint | None = None
    """With model_fingerprint: the pinned model's sizes (the fields of ModelFootprint)."""

    def __post_init__(self) -> None:
        checks = [
            (self.seed >= 0, "run.seed must be >= 0"),
            (self.step_rule in STEP_RULES,
             f"run.step_rule={self.step_rule!r}: use one of {', '.join(STEP_RULES)}"),
            (not (self.step_rule == "probe" and self.estimator == NORMALISED),
             "run.step_rule = probe sets an lr in the unit of the one-sided and antithetic "
             "estimators: use one of them, or step_rule = constant"),
            (self.lr_scaling in LR_SCALINGS,
             f"run.lr_scaling={self.lr_scaling!r}: use one of {', '.join(LR_SCALINGS)}"),
            (self.loss_jump_tolerance >= 0, "run.loss_jump_tolerance must be >= 0 (0: off)"),
            (self.plateau_rounds >= 0, "run.plateau_rounds must be >= 0 (0: never)"),
            (self.loss_drift_rounds >= 0, "run.loss_drift_rounds must be >= 0 (0: off)"),
            (math.isfinite(self.loss_drift_tolerance) and self.loss_drift_tolerance >= 0,
             "run.loss_drift_tolerance must be a finite number >= 0"),
            (math.isfinite(self.max_drift) and self.max_drift >= 0,
             "run.max_drift must be a finite number >= 0 (0: off)"),
            (math.isfinite(self.drift_budget) and self.drift_budget >= 0,
             "run.drift_budget must be a finite number >= 0 (0: off)"),
            (math.isfinite(self.fluency_tolerance) and self.fluency_tolerance >= 0,
             "run.fluency_tolerance must be a finite number >= 0 (0: off)"),
            (self.pool_slices in POOL_SLICES,
             f"run.pool_slices={self.pool_slices!r}: use one of {', '.join(POOL_SLICES)}"),
            (math.isfinite(self.trust_radius) and self.trust_radius >= 0,
             "run.trust_radius must be a finite number >= 0 (0: off)"),
            (self.estimator in ESTIMATORS,
             f"run.estimator={self.estimator!r}: use one of {', '.join(ESTIMATORS)}"),
            (1 <= self.directions <= 64, "run.directions must be in 1..64"),
            (0 <= self.readout_directions <= MAX_READOUT_DIRECTIONS, "run.readout_directions: 0..64"),
            (math.isfinite(self.readout_lr) and self.readout_lr > 0, "run.readout_lr must be finite and > 0"),
            (math.isfinite(self.readout_trust_radius) and self.readout_trust_radius >= 0,
             "run.readout_trust_radius must be a finite number >= 0 (0: off)"),
            (self.estimator != NORMALISED or self.directions >= 2,
             "run.estimator='normalised' divides by the spread of a batch's differences: it "
             "needs run.directions >= 2"),
            (self.pool_size >= 1, "run.pool_size must be >= 1"),
            (self.lr > 0 and self.mu > 0, "run.lr and run.mu must be > 0"),
            (self.batch_size >= 1 and self.seq_len >= 1,
             "run.batch_size and run.seq_len must be >= 1"),
            (self.round_duration_s > 0, "run.round_duration_s must be > 0"),
            (math.isfinite(self.report_grace_s) and self.report_grace_s >= 0,
             "run.report_grace_s must be a finite number >= 0"),
            (self.min_reports >= 1, "run.min_reports must be >= 1"),
            (self.min_clients >= 1, "run.min_clients must be >= 1"),
            (self.max_rounds >= 0, "run.max_rounds must be >= 0 (0: no limit)"),
            (self.poll_timeout_s > 0, "run.poll_timeout_s must be > 0"),
            (0 < self.compute_fraction <= 1, "run.compute_fraction must be in (0, 1]"),
            (1 <= self.min_steps <= self.max_steps, "run needs 1 <= min_steps <= max_steps"),
            (self.max_steps <= MAX_STEPS,
             f"run.max_steps must be <= {MAX_STEPS} (the report size limit)"),
            (self.catch_up_rounds >= 1, "run.catch_up_rounds must be >= 1"),
            (0 <= self.memory_headroom < 0.5, "run.memory_headroom must be in [0, 0.5)"),
            (self.mode in MODES, f"run.mode={self.mode!r}: use one of {', '.join(MODES)}"),
            ((self.model_fingerprint is None) == (self.footprint is None),
             "run.model_fingerprint and [run.footprint] pin the model together: give both "
             "or neither (neither: the first client's model is pinned)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def membership_timeout_s(self) -> float:
        return self.member_timeout_s or 2 * self.round_duration_s + 60.0


@dataclass(frozen=True)
class AggregationConfig:
    method: str = "mean"
    """A rule of zorba_server.aggregation_rules.RULES: `mean` (the weighted mean of
    docs/design.md §2), `trimmed_mean` or `median` (robust)."""
    clip: float | None = None
    """Clip every scalar to [-clip, clip] before aggregating (robust mode)."""
    trim_fraction: float = 0.1
    max_abs_scalar: float = 1e6
    """A report with |g| above this is refused: no real loss difference gets there."""

    def __post_init__(self) -> None:
        if self.method not in RULES:
            raise ConfigError(f"aggregation.method={self.method!r}: use {_one_of(list(RULES))}")
        if self.clip is not None and self.clip <= 0:
            raise ConfigError("aggregation.clip must be > 0 (or absent)")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError("aggregation.trim_fraction must be in [0, 0.5)")
        if self.max_abs_scalar <= 0:
            raise ConfigError("aggregation.max_abs_scalar must be > 0")


# The [scheduler] section is the scheduler's own SchedulerConfig (one definition of its
# knobs); the round-dependent fields come from [run] and the coordinator, not the file.
SCHEDULER_FIELDS_FROM_RUN = ("round_deadline_s", "min_steps", "max_steps", "signal_share", "signal_sd")


@dataclass(frozen=True)
class ServerConfig:
    enrolment_secret: str
    server: ListenConfig = ListenConfig()
    storage: StorageConfig = StorageConfig()
    run: RunConfig = RunConfig()
    aggregation: AggregationConfig = AggregationConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    insecure_secret: bool = False
    """Accept an enrolment secret shorter than MIN_SECRET_CHARS (`--insecure-secret`): for a
    throwaway run on a trusted network only."""

    def __post_init__(self) -> None:
        if len(self.enrolment_secret) < (1 if self.insecure_secret else MIN_SECRET_CHARS):
            raise ConfigError(
                f"the enrolment secret must have at least {MIN_SECRET_CHARS} characters (it has "
                f"{len(self.enrolment_secret)}): make one with `zorba-server secret` and set "
                f"enrolment_secret, enrolment_secret_file or {SECRET_ENV}; or pass "
                "--insecure-secret (insecure_secret = true) for a throwaway run"
            )
        if self.run.pool_slices == "disjoint" and self.aggregation.method in VOTING_RULES:
            # A robust rule votes per direction among the clients that measured it; with
            # disjoint slices each direction has one measurer, and the rule would guard nothing.
            raise ConfigError(
                f"aggregation.method={self.aggregation.method!r} votes among the clients that "
                "measured a direction, and run.pool_slices='disjoint' gives each direction one: "
                "use run.pool_slices='shared' with a robust rule")


SECTIONS = {
    "server": ListenConfig,
    "storage": StorageConfig,
    "run": RunConfig,
    "aggregation": AggregationConfig,
    "scheduler": SchedulerConfig,
}


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                environ: typing.Mapping[str, str] | None = None, *,
                insecure_secret: bool = False) -> ServerConfig:
    """Config from a TOML file (optional), then `overrides` {section: {key: value}} on top
    (and `insecure_secret`, the flag, over the file's)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    if insecure_secret:
        data["insecure_secret"] = True
    return config_from_dict(data, base_dir=Path(path).parent if path else Path.cwd(),
                            environ=os.environ if environ is None else environ)


def config_from_dict(data: dict[str, Any], *, base_dir: Path | None = None,
                     environ: typing.Mapping[str, str] | None = None) -> ServerConfig:
    data = dict(data)
    base_dir = Path.cwd() if base_dir is None else base_dir
    insecure = data.pop("insecure_secret", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"insecure_secret = {insecure!r}: expected true or false")
    secret = data.pop("enrolment_secret", None)
    secret_file = data.pop("enrolment_secret_file", None)
    if secret is None and secret_file is not None:
        try:
            secret = (base_dir / secret_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read enrolment_secret_file {secret_file}: {exc}") from None
    if secret is None and environ is not None:
        secret = environ.get(SECRET_ENV)
    if secret is None:
        raise ConfigError(
            f"no enrolment secret: set enrolment_secret or enrolment_secret_file in the config "
            f"file, or the {SECRET_ENV} environment variable"
        )
    sections: dict[str, Any] = {}
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section [{name}]; known: {sorted(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table")
        misplaced = sorted(set(values) & set(SCHEDULER_FIELDS_FROM_RUN)) if name == "scheduler" else []
        if misplaced:
            raise ConfigError(f"{misplaced} are not [scheduler] keys: set min_steps and max_steps in "
                              "[run]; the deadline follows from run.round_duration_s, the signal "
                              "shares are the server's estimate")
        sections[name] = _build(SECTIONS[name], values, name)
    return ServerConfig(enrolment_secret=str(secret), insecure_secret=insecure, **sections)


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{section}]; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{section}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}]: {exc}") from None


def _coerce(tp: Any, value: Any, name: str) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_args(tp) and type(None) in typing.get_args(tp):
        tp = args[0]
    if tp is ModelFootprint:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table of ModelFootprint fields")
        return _build(ModelFootprint, {k: tuple(v) if isinstance(v, list) else v
                                       for k, v in value.items()}, name)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str) and type(value) is not tp:
        raise ConfigError(f"{name} = {value!r}: expected {tp.__name__}")
    return value

