"""zorba-edge's own simulator (zorba_sim) set up as a Flower run's twin (not a test module).

Given the run config a Flower app ran with and its nodes' budgets, by partition, this builds
the simulation of the same run: the same server config (`server_config`, the server app's own
reading of it), one virtual device per partition with that partition's budget, the node's
declared step time and memory profile (`client_app_settings`, the client app's own reading),
and the same data file split the same way. The simulator's client i is then the node of
partition i: its Dirichlet share and its batch stream (`client_task_seed(data seed, i)`) are
the node's. Used by tests/test_flower_sim_twin.py and benchmarks/flower_run.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from zorba_edge.client.assembly import DataChoice, memory_profile, training_examples
from zorba_edge.data.jsonl import load_classification_jsonl
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.sources import open_source
from zorba_flower.settings import client_app_settings, server_config
from zorba_sim.fleet import DeviceClass, DeviceGroup, Fleet
from zorba_sim.simulation import Simulation, SimulationConfig


def twin_simulation(values: Mapping[str, Any], budgets_mib: Sequence[float],
                    heldout: Sequence[Any]) -> Simulation:
    """The simulator's run of the Flower run configured by `values` over one node per budget
    (partition i has budgets_mib[i]); `heldout` only feeds the simulator's evaluation."""
    count = len(budgets_mib)
    nodes = [client_app_settings(values, {"partition-id": p, "num-partitions": count,
                                          "budget-mib": b}) for p, b in enumerate(budgets_mib)]
    first = nodes[0]
    if first.step_time_s is None:
        raise ValueError("set client.step-time-s: the twin needs the nodes' declared step time")
    # The simulator's devices are virtual: fast links and always online, as loopback nodes.
    fleet = Fleet(tuple(DeviceGroup(DeviceClass(f"partition-{n.partition_id}", n.budget_bytes,
                                                speed=1.0, upload_mbps=1e6, download_mbps=1e6), 1, 0)
                        for n in nodes))
    server = server_config(values)
    config = SimulationConfig(
        server, rounds=server.run.max_rounds, reference_step_s=first.step_time_s,
        dirichlet_alpha=DataChoice(first.data).dirichlet_alpha, data_seed=first.data_seed,
        memory=memory_profile(LoadConfig("fp32", first.frozen_dtype), first.runtime_bytes))
    choice = DataChoice(first.data)
    examples = load_classification_jsonl(first.data, choice.template.label_names)
    sim = Simulation.build(config, open_source(first.model), fleet, examples, heldout,
                           template=choice.template)
    shares = [len(c.task.examples) for c in sim.clients.values()]
    nodes_shares = [len(training_examples(DataChoice(n.data, num_clients=count,
                                                     client_index=n.partition_id,
                                                     seed=n.data_seed))) for n in nodes]
    if shares != nodes_shares:
        # zorba_sim splits with min_per_client=1, the clients (training_examples) with 2.
        raise ValueError(f"the simulator's data shares {shares} are not the nodes' {nodes_shares}: "
                         "a partition got fewer than 2 examples; choose another client.data-seed")
    sim.run()
    return sim
