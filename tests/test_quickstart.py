"""The quickstart's orchestration: the byte-counting proxy, and a whole federation of real
processes on a tiny random model (slow: several Python processes import torch)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from client_support import make_world

from zorba_lab.byte_proxy import CountingProxy, route_of
from zorba_lab.federation import ClientRun, ClientSetup, FederationPlan, RoundLines, run_federation, settle
from zorba_lab.quickstart import accuracy_curve, evaluate_accuracy, round_counts, summarize
from zorba_server.scheduler import SchedulerConfig


def test_route_of_folds_round_numbers_so_counts_group_by_endpoint() -> None:
    assert route_of("/v1/rounds/17/reports") == "/v1/rounds/*/reports"
    assert route_of("/v1/rounds/next") == "/v1/rounds/next"


def test_proxy_forwards_and_counts_exact_body_bytes_both_ways() -> None:
    proxy = asyncio.run(_through_proxy())
    assert (proxy.count.bytes_up, proxy.count.bytes_down, proxy.count.requests) == (1003, 2006, 2)
    assert proxy.count.by_route == {"/v1/rounds/*/reports": [2, 1003, 2006]}


async def _through_proxy() -> CountingProxy:
    async def echo_twice(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body * 2, status=201, headers={"X-Seen": str(len(body))})

    app = web.Application()
    app.router.add_post("/v1/rounds/{r}/reports", echo_twice)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream = f"http://127.0.0.1:{runner.addresses[0][1]}"
    proxy = CountingProxy(upstream)
    url = await proxy.start()
    try:
        async with aiohttp.ClientSession() as session:
            for payload in (b"abc", b"x" * 1000):
                async with session.post(url + "/v1/rounds/3/reports", data=payload) as reply:
                    assert reply.status == 201
                    assert await reply.read() == payload * 2
                    assert reply.headers["X-Seen"] == str(len(payload))
    finally:
        await proxy.close()
        await runner.cleanup()
    return proxy


@pytest.mark.slow
def test_a_tiny_federation_runs_end_to_end_and_reports_bytes_peaks_and_accuracy(
        tmp_path: Path) -> None:
    world = make_world(tmp_path)
    plan = FederationPlan.of(
        tmp_path / "run", (ClientSetup("client-0", 3 * 2**30), ClientSetup("client-1", 4 * 2**30)),
        data=str(world.data), model=str(world.model_dir), lr=0.03, mu=1e-3, batch_size=8,
        seq_len=16, pool_size=64, round_duration_s=8.0, max_steps=4, max_rounds=2,
        frozen_dtype="fp32", extra_client_args=("--step-time", "0.05"))
    served: list[tuple[int, list[int | None]]] = []

    async def while_serving(url: str, clients: list[ClientRun]) -> None:
        async with aiohttp.ClientSession() as session, session.get(url + "/v1/status") as reply:
            version = (await reply.json())["version"]
        served.append((version, [c.process.process.returncode for c in clients]))

    result = asyncio.run(run_federation(plan, progress=lambda line: None,
                                        while_serving=while_serving))
    assert result.remote is not None and result.remote.table.version == 2
    # The hook ran once the clients had stopped, with the finished run's server still up.
    assert served == [(2, [c.exit_code for c in result.clients])]
    before = evaluate_accuracy(plan, 64)
    after = evaluate_accuracy(plan, 64, result.remote)
    summary = summarize(plan, result, before, after, "test", 64)
    assert summary["rounds_applied"] == summary["alpha_version"] == 2
    # One live line per closed round, the last naming the version evaluated.
    # ... and the final check of version 2 (one step per client, not applied).
    assert [t["round"] for t in result.timeline] == [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert result.timeline[-1]["status"] == "checked"
    assert result.timeline[-1]["version"] == 2
    # Both accuracies are counts over the same 64 held-out examples, and the summary carries
    # exactly what was evaluated.
    assert before["examples"] == after["examples"] == summary["eval_examples"] == 64
    for acc, evaluated in ((summary["acc_before"], before), (summary["acc_after"], after)):
        assert acc == evaluated["accuracy"]
        assert acc * 64 == pytest.approx(round(acc * 64), abs=1e-9)
    assert summary["loss_after"] != summary["loss_before"]  # alpha changed the model
    # The base model's evaluation carries the bias floor; the trained model's does not.
    assert 0.0 <= before["acc_bias_floor"] <= 1.0 and after["acc_bias_floor"] is None
    assert summary["acc_bias_floor"] == before["acc_bias_floor"]
    for client in summary["clients"]:
        assert client["rounds_reported"] >= 1
        # Every report crossed the proxy: a report body holds at least its steps.
        assert client["bytes_up_per_round"] > 9 * min(client["steps"], 1)
        assert client["bytes_down_per_round"] > 0
        assert 0 < client["peak_bytes"] and client["peak_over_budget"] < 1.0
    assert summary["bytes_up_per_round"] > 0 and summary["peak_over_budget"] > 0
    assert (plan.out_dir / "server.log").exists()
    # The plot's curve: every version replayed from the record on the same examples; its ends
    # are the before and after figures (the same model, the same scoring).
    curve = accuracy_curve(plan, result.db_path, 64, every=1)
    assert [p["version"] for p in curve] == [0, 1, 2]
    assert curve[0]["accuracy"] == summary["acc_before"]
    assert curve[-1]["accuracy"] == summary["acc_after"]
    assert curve[-1]["loss"] == pytest.approx(summary["loss_after"], rel=1e-4)


@pytest.mark.slow
def test_a_run_stopped_by_its_time_limit_counts_its_rounds_alike_everywhere(tmp_path: Path) -> None:
    """Stopped at a time limit, with the next round open and some clients done with it: the
    live lines, the evaluated version and the record's counts agree, whether that round
    ended applied or failed."""
    world = make_world(tmp_path)
    plan = FederationPlan.of(
        tmp_path / "run", (ClientSetup("client-0", 3 * 2**30), ClientSetup("client-1", 4 * 2**30)),
        data=str(world.data), model=str(world.model_dir), lr=0.03, mu=1e-3, batch_size=8,
        seq_len=16, pool_size=64, round_duration_s=8.0, max_steps=2, minutes=0.01,
        frozen_dtype="fp32", extra_client_args=("--step-time", "0.05"))
    printed: list[str] = []
    result = asyncio.run(run_federation(plan, progress=printed.append))
    assert result.remote is not None
    summary = summarize(plan, result, None, None, "test", 0)
    applied_lines = [t for t in result.timeline if t["status"] == "applied"]
    assert summary["rounds_applied"] == summary["alpha_version"] == len(applied_lines) >= 1
    assert [t["round"] for t in result.timeline] == [r["round"] for r in summary["rounds"]]
    assert result.timeline[-1]["version"] == result.remote.table.version


def closed(round_: int, status: str, reports: int) -> dict[str, Any]:
    """A closed round as /v1/status lists it."""
    return {"round": round_, "status": status, "reports": reports, "assigned": 4,
            "loss": 0.5 if reports else None}


def test_live_lines_name_the_alpha_version_each_round_left_though_one_poll_sees_several() -> None:
    printed: list[str] = []
    lines = RoundLines(printed.append)
    status = {"version": 2, "rounds": [closed(1, "applied", 4), closed(2, "failed", 0),
                                       closed(3, "applied", 3)]}
    lines.show(status)
    lines.show(status)  # a later poll that sees nothing new prints nothing
    assert [line.split("] ", 1)[1] for line in printed] == [
        "round   1 applied  4/4 reports  loss 0.5000  alpha version 1",
        "round   2 failed   0/4 reports  loss -  alpha version 1",
        "round   3 applied  3/4 reports  loss 0.5000  alpha version 2"]
    assert [t["version"] for t in lines.timeline] == [1, 1, 2]


@dataclass
class RunningServer:
    running: bool = True


def test_the_round_open_at_the_stop_is_waited_for_so_lines_version_and_counts_agree() -> None:
    """At a time limit the next round is open; clients that reported in it before they stopped
    get it applied once the others leave. The run reads its version only after that close."""
    eight = [closed(r, "applied", 4) for r in range(1, 9)]
    statuses = [
        {"version": 8, "rounds": eight, "current_round": {"round": 9, "deadline_in_s": 25.0}},
        {"version": 8, "rounds": eight, "current_round": {"round": 9, "deadline_in_s": 24.0}},
        {"version": 9, "rounds": [*eight, closed(9, "applied", 2)], "current_round": None},
    ]
    printed: list[str] = []
    lines = RoundLines(printed.append)
    lines.show(statuses[0])  # the watch saw rounds 1-8
    final = asyncio.run(_settle_against(statuses, lines))
    assert final["version"] == 9 and len(printed) == 9
    assert printed[-1].endswith("round   9 applied  2/4 reports  loss 0.5000  alpha version 9"
                                "  (closed while the clients stopped)")
    summary = {"rounds_applied": 9, "rounds_failed": 0, "rounds_rejected": 0, "alpha_version": 9,
               "train_s": 300.0,
               "rounds_closed_at_stop": [t["round"] for t in lines.timeline if t["at_stop"]]}
    assert round_counts(summary) == ("9 rounds applied (alpha version 9), 0 failed, 0 rejected in "
                                     "300 s of training; round 9 closed while the clients stopped")


async def _settle_against(statuses: list[dict[str, Any]], lines: RoundLines) -> dict[str, Any]:
    """`settle` polling a server that answers `statuses` in turn (the last one from then on)."""
    answers = iter(statuses)
    last: dict[str, Any] = {}

    async def status(request: web.Request) -> web.Response:
        nonlocal last
        last = next(answers, last)
        return web.json_response(last)

    app = web.Application()
    app.router.add_get("/v1/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            return await settle(url, session, RunningServer(), lines,  # type: ignore[arg-type]
                                 statuses[0], poll_s=0.0)
    finally:
        await runner.cleanup()


def test_the_demo_plan_writes_a_server_config_the_server_reads_in_every_mode(tmp_path: Path) -> None:
    from zorba_common.run_defaults import RUN_MODES
    from zorba_server.config import load_config

    for mode in RUN_MODES:
        plan = FederationPlan.of(tmp_path, (ClientSetup("a", 2**30),), mode=mode,
                                 keep_weight_versions=mode == "fedavg",
                                 scheduler=SchedulerConfig(epsilon=0.5))
        path = tmp_path / f"{mode}.toml"
        path.write_text(plan.server_toml(tmp_path / "db.sqlite3"))
        config = load_config(str(path), {})
        assert config.run.mode == mode and config.scheduler.epsilon == 0.5
        assert config.run.keep_weight_versions == (mode == "fedavg")
    plan = FederationPlan.of(tmp_path, (ClientSetup("a", 2**30),), aggregation="sum")
    (tmp_path / "sum.toml").write_text(plan.server_toml(tmp_path / "db.sqlite3"))
    assert load_config(str(tmp_path / "sum.toml"), {}).aggregation.method == "sum"
