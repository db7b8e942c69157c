"""The loss guard's training-loss rule on hand-made reports (clients without a check loss)."""

from __future__ import annotations

from zorba_common.messages import Report
from zorba_server.loss_guard import training_loss_jump
from zorba_server.rounds import ReceivedReport


def report(cid: str, loss: float, last: float | None = None) -> ReceivedReport:
    rep = Report(idempotency_key=f"{cid}-1", base_version=0, steps=((3, 0.1),), num_samples=8,
                 loss_mean=loss, loss_last=loss if last is None else last, peak_memory_bytes=0,
                 step_time_s=0.01)
    return ReceivedReport(cid, rep, b"", 0.0)


def test_a_rise_of_the_same_clients_over_their_reference_is_a_jump() -> None:
    received = {"a": report("a", 1.3), "b": report("b", 5.0)}
    weights = {"a": 1.0, "b": 1.0}
    # Only "a" reported before: "b" (another data shard, another loss) is not compared.
    why = training_loss_jump(received, weights, {"a": 1.0}, tolerance=0.2)
    assert why == "the clients' loss jumped from 1 to 1.3: 1 of 1 clients past the tolerance"
    assert training_loss_jump(received, weights, {"a": 1.2}, tolerance=0.2) is None


def test_a_last_step_above_the_round_mean_needs_twice_the_tolerance() -> None:
    weights = {"a": 1.0}
    assert training_loss_jump({"a": report("a", 1.0, last=1.3)}, weights, {}, 0.2) is None
    why = training_loss_jump({"a": report("a", 1.0, last=1.5)}, weights, {}, 0.2)
    assert why is not None and "(last step)" in why


def test_no_tolerance_or_no_weight_judges_nothing() -> None:
    received = {"a": report("a", 9.0, last=90.0)}
    assert training_loss_jump(received, {"a": 1.0}, {"a": 1.0}, tolerance=0.0) is None
    assert training_loss_jump(received, {"a": 0.0}, {"a": 1.0}, tolerance=0.2) is None
