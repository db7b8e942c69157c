"""The run ends on a judged version: the final check (pure).

The loss guard and the fluency watch judge the model at version v by the check and generic-text
losses the clients measure at the start of the round that trains on v. The last applied round's
version has no such round, so the version people export was never judged: on Gemma 3 270M at
the defaults the watch rolled back twice, and the final version, never judged, generated
garbage (issue 26, item 5).

So when run.max_rounds rounds have been applied, the run does not finish yet: the next round is
a *final check*. Its clients are planned as in any round, with one local step each (the least a
report of any client version carries; two forward passes), and measure the model as received as
every round's clients do (check loss, generic-text loss). Its close judges that version by the
very rules of every round and never applies its own steps:

- sound (or nobody measured anything the rules read): the round closes `checked`; the run
  finishes on that version;
- the loss guard or the fluency watch rejects it: the table is rolled back, as in any round,
  to the version they last found sound (`rejected`); the run finishes on that one, which was
  judged when it was current;
- too few reports (clients left): `failed`, and the next round is a final check again; the run
  waits for clients to check its final version, however long.

Everything is in the stored rounds (the plan's `final_check` flag and the round's status) and
the stored safety state, so a restarted server knows where the check stands. Judging needs a
rule that can judge and clients that measure what it reads: a run with the loss guard, its
drift rule and the fluency watch all off, or whose clients have sent no check or generic-text
loss (older clients, the fedavg baseline), finishes as soon as run.max_rounds rounds have been
applied, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from zorba_server.config import RunConfig
from zorba_server.engine_state import RoundRecord
from zorba_server.fluency_watch import FluencyVerdict
from zorba_server.loss_guard import Verdict
from zorba_server.round_status import CHECKED, REJECTED

STEPS = 1
"""Local steps of each client of a final check: reports carry at least one, and the steps are
never applied."""


def judges(run: RunConfig, measured: bool) -> bool:
    """The run has a rule that can judge its final version, and its clients measure what it
    reads (`measured`: some client has sent a check or generic-text loss in the run)."""
    rules = run.loss_jump_tolerance > 0 or run.loss_drift_rounds > 0 or run.fluency_tolerance > 0
    return rules and measured


def due(run: RunConfig, measured: bool, applied: int) -> bool:
    """run.max_rounds rounds are applied and the run checks its final version."""
    return bool(run.max_rounds) and applied >= run.max_rounds and judges(run, measured)


def run_end(run: RunConfig, measured: bool, applied: int,
            history: Sequence[RoundRecord]) -> str | None:
    """Why the run is over (None: it is not): run.max_rounds applied rounds and, where a rule
    can judge, a final check that ended (checked, or rolled back)."""
    if not run.max_rounds or applied < run.max_rounds:
        return None
    if not judges(run, measured):
        return f"the run finished after {applied} applied rounds"
    last = history[-1] if history else None
    if last is None or not last.final_check or last.status not in (CHECKED, REJECTED):
        return None
    verdict = "judged sound" if last.status == CHECKED else "rolled back by the final check"
    return (f"the run finished after {applied} applied rounds, its final version {verdict} "
            f"(round {last.round})")


def waiting(reason: str, version: int) -> str:
    """Why no final check is open."""
    return f"run.max_rounds reached: the final version ({version}) is not checked yet; {reason}"


def passed(version: int, guard: Verdict | None, fluency: FluencyVerdict | None) -> str:
    """The message of a final check that found the version sound."""
    parts = []
    if guard is not None:
        parts.append(f"check loss {guard.before:.4g} (anchor) -> {guard.now:.4g} in {guard.judged} "
                     f"client(s), {guard.rising} past the tolerance")
    if fluency is not None:
        parts.append(f"generic-text loss {fluency.reference:.4g} (base) -> {fluency.now:.4g}, "
                     f"{fluency.breaking} of {fluency.judged} client(s) past the tolerance")
    judged = "; ".join(parts) if parts else "not judged: no client measured a check or generic-text loss"
    return (f"final check of version {version}: {judged}: the run ends on version {version} "
            f"(this round's {STEPS} step(s) per client are not applied)")


def rejected(version: int, why: str, target: int) -> str:
    """The message of a final check that rolled the final version back."""
    return (f"final check of version {version}: {why}; the run ends on version {target}'s table, "
            "the last the checks found sound")


def not_judged(message: str, version: int) -> str:
    """The message of a final check with too few reports."""
    return (f"{message}; final check: version {version} is not judged yet, the next round "
            "checks it again")
