"""The distributed transport with real processes: gloo on 127.0.0.1, one worker per process, the
aggregator in a server thread on rank 0. Asynchronous rounds with a slow worker, synchronous rounds
through DiLoCoWorker, a worker killed mid-run, and a killed worker that rejoins as a new process."""

import datetime
import logging
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from heloco.aggregator import AsyncAggregator
from heloco.distributed.client import DistributedTransport
from heloco.distributed.setup import setup_transport
from heloco.worker import DiLoCoWorker
from tests.conftest import free_port, tcp_store

# About 6-10 s each here (three processes importing torch): the async and kill runs stay in the
# default suite so CI exercises real processes; the others are marked slow.
pytestmark = pytest.mark.timeout(180)

SHAPES = [(3,), (2, 2)]
TIMEOUT = 60


def masters():
    return [torch.zeros(s) for s in SHAPES]


def delta(a, b):
    return [torch.full(SHAPES[0], float(a)), torch.full(SHAPES[1], float(b))]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _async_rounds(transport, rank, rounds, delay, die_after=None):
    """Plain rounds: sleep ('train'), submit Δ = (rank + 1, round + 1); record staleness."""
    update = transport.dispatch(rank)
    version, staleness = update.version, []
    for r in range(rounds):
        if die_after is not None and r == die_after:
            os._exit(3)  # killed mid-round: no LEAVE, sockets closed by the kernel
        time.sleep(delay)
        update = transport.submit(rank, delta(rank + 1, r + 1), version)
        version = update.version
        staleness.append(update.staleness)
    return staleness


def _rank_main(rank, world, port, scenario, queue):
    torch.set_num_threads(1)
    records = _Records()
    log = logging.getLogger("heloco.distributed")  # the server's modules log under the package
    log.addHandler(records)
    log.setLevel(logging.INFO)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT),
    )
    quorum = world if scenario == "sync" else 1
    torch.manual_seed(0)
    model = nn.Linear(4, 2)  # the sync scenario's replica; its initial weights are the global start

    def build():
        params = [p.detach().clone() for p in model.parameters()] if scenario == "sync" else masters()
        return AsyncAggregator(params, torch.optim.SGD(params, lr=1.0), world, quorum=quorum)

    params_like = list(model.parameters()) if scenario == "sync" else masters()
    rejoin = 60.0 if scenario == "rejoin" else 0.0
    transport, server = setup_transport(
        params_like, build, timeout=TIMEOUT, connect_timeout=TIMEOUT, rejoin_timeout=rejoin
    )
    dist.barrier()  # everyone connected: the rounds start together, whatever the start-up skew
    result = {"rank": rank}
    if scenario == "async":
        rounds, delay = (5, 0.15) if rank == 2 else (15, 0.05)
        result["staleness"] = _async_rounds(transport, rank, rounds, delay)
    elif scenario in ("kill", "rejoin"):
        die = 1 if scenario == "rejoin" else 2
        rounds, delay = (5, 0.05) if rank == 2 else (10, 0.05)
        result["staleness"] = _async_rounds(
            transport, rank, rounds, delay, die_after=die if rank == 2 else None
        )
    elif scenario == "sync":
        torch.manual_seed(100 + rank)
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        versions = []
        with DiLoCoWorker(
            model,
            inner,
            transport,
            rank,
            sync_every=2,
            on_sync=lambda u: versions.append((u.version, u.staleness)),
        ):
            for _ in range(6):
                if rank == 2:
                    time.sleep(0.1)  # the slow one: the others wait for it at every round
                x = torch.randn(8, 4)
                loss = (model(x) - x[:, :2]).pow(2).mean()
                loss.backward()
                inner.step()
                inner.zero_grad()
        result["versions"] = versions
        result["params"] = [p.detach().tolist() for p in model.parameters()]
    if server is None:
        transport.leave()
    else:
        transport.leave(rank)
        server.join(timeout=120)
        agg = server.aggregator
        result["server"] = {
            "version": agg.version,
            "params": [p.tolist() for p in agg.global_params],
            "stats": server.worker_stats(),
            "log": records.lines,
        }
    queue.put(result)  # plain Python values: tensors would travel as shared memory the child takes away


def _rejoin_main(port, queue):
    """A restarted worker 2: no init_process_group, only a store client and its own transport."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=TIMEOUT))
    with DistributedTransport(2, masters(), store, timeout=TIMEOUT, connect_timeout=TIMEOUT) as t:
        u = t.dispatch(2)
        first = u.version
        for r in range(3):
            u = t.submit(2, delta(3, 10 + r), u.version)
        queue.put({"rank": "rejoined", "first_version": first, "incarnation": t.incarnation})


def _launch(scenario, world=3, expect=None):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, scenario, queue)) for r in range(world)]
    omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the children's environment (copied at start)
    try:
        for p in procs:
            p.start()
        extra = None
        if scenario == "rejoin":
            procs[2].join(TIMEOUT)  # the first incarnation of worker 2 dies ...
            extra = ctx.Process(target=_rejoin_main, args=(port, queue))  # ... and is restarted
            extra.start()
    finally:
        if omp is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    results = {}
    expect = expect if expect is not None else world
    try:
        while len(results) < expect:
            r = queue.get(timeout=150)
            results[r["rank"]] = r
    finally:
        for p in [*procs, *([extra] if extra else [])]:
            p.join(30)
            if p.is_alive():
                p.kill()
    codes = [p.exitcode for p in procs]
    return results, codes


def test_async_rounds_with_a_slow_worker():
    results, codes = _launch("async")
    assert codes == [0, 0, 0]
    server = results[0]["server"]
    assert server["version"] == 15 + 15 + 5  # every submission was one outer step (quorum 1)
    # SGD lr 1: θ = −ΣΔ: Σ(rank+1) = 15·1 + 15·2 + 5·3; Σ(round+1) = 2·(1+…+15) + (1+…+5)
    assert server["params"] == [[-60.0] * 3, [[-255.0] * 2] * 2]
    mean = {r: sum(results[r]["staleness"]) / len(results[r]["staleness"]) for r in range(3)}
    assert mean[2] > max(mean[0], mean[1]), mean  # the slow worker's Δ is the stalest
    stats = server["stats"]
    assert [s["state"] for s in stats] == ["left", "left", "left"]
    assert stats[1]["messages_in"] == 1 + 1 + 15 + 1  # hello, dispatch, 15 submits, leave
    assert stats[2]["messages_in"] == 1 + 1 + 5 + 1


@pytest.mark.slow
def test_sync_rounds_through_diloco_workers():
    results, codes = _launch("sync")
    assert codes == [0, 0, 0]
    server = results[0]["server"]
    assert server["version"] == 3  # 6 inner steps / sync_every 2, one outer step per full quorum
    for r in range(3):
        assert results[r]["versions"] == [(1, 0), (2, 0), (3, 0)]
        assert results[r]["params"] == server["params"]  # every replica ends on the global parameters


def test_killed_worker_leaves_the_others_running():
    results, codes = _launch("kill", expect=2)
    assert codes == [0, 0, 3]
    server = results[0]["server"]
    assert server["version"] == 10 + 10 + 2  # worker 2 submitted twice before dying
    stats = server["stats"]
    assert [s["state"] for s in stats] == ["left", "left", "dead"]
    assert stats[2]["departures"] == 1 and not stats[2]["alive"]
    assert any(line.startswith("worker 2 left: connection lost") for line in server["log"]), server["log"]
    assert len(results[1]["staleness"]) == 10


@pytest.mark.slow
def test_killed_worker_rejoins_and_resumes_from_the_global_parameters():
    results, codes = _launch("rejoin", expect=3)
    assert codes == [0, 0, 3]
    server = results[0]["server"]
    assert server["version"] == 10 + 10 + 1 + 3
    # Σ(rank+1) = 10·1 + 10·2 + 1·3 + 3·3; Σb = 2·(1+…+10) + 1 + (10+11+12)
    assert server["params"] == [[-42.0] * 3, [[-144.0] * 2] * 2]
    rejoined = results["rejoined"]
    assert rejoined["incarnation"] == 2 and rejoined["first_version"] >= 1
    s = server["stats"][2]
    assert s["state"] == "left" and s["incarnation"] == 2 and s["departures"] == 1
    assert any("worker 2 connected (incarnation 2)" in line for line in server["log"])


def test_a_worker_silent_past_the_timeout_is_refused_at_once_not_blocked():
    """The server declares a worker gone when its receive times out; the worker, back after a longer
    silence (stopped, swapped out), refuses to send on that connection at once, with the reason,
    instead of blocking on a connection gloo keeps open without reading. One process, two threads."""
    from heloco.distributed.server import DistributedServer
    from heloco.transport import TransportError

    store = tcp_store()
    params = masters()
    aggregator = AsyncAggregator(params, torch.optim.SGD(params, lr=1.0), 2)
    server = DistributedServer(aggregator, store, 2, timeout=2.0, connect_timeout=TIMEOUT).start()
    worker = DistributedTransport(1, masters(), store, timeout=2.0, connect_timeout=TIMEOUT)
    update = worker.dispatch(1)
    assert worker.silent_for() < 2.0 and not worker.given_up()
    time.sleep(2.5)  # the server's receive times out meanwhile
    assert worker.given_up()
    started = time.monotonic()
    with pytest.raises(
        TransportError, match=r"submit failed, not sent: silent for \d+\.\d s, longer than timeout=2\.0"
    ):
        worker.submit(1, delta(1, 1), update.version)
    assert time.monotonic() - started < 0.5
    assert not worker.connected
    worker.leave()  # closed already: nothing to send
    server.leave(0)
    server.join(timeout=30)
    assert server.worker_stats()[1]["state"] == "dead" and aggregator.version == 0  # nothing applied
