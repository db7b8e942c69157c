"""The quickstart's orchestration: the byte-counting proxy, and a whole federation of real
processes on a tiny random model (slow: several Python processes import torch)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from client_support import make_world

from zorba_lab.byte_proxy import CountingProxy, route_of
from zorba_lab.federation import ClientRun, ClientSetup, FederationPlan, run_federation
from zorba_lab.quickstart import accuracy_curve, evaluate_accuracy, summarize
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
    assert summary["rounds_applied"] == 2
    assert summary["alpha_version"] == 2
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
