"""Transports, fast: in-process forwarding, the flat wire format (round trips, header fields, sizes,
refusals), the server's synchronous waiting and stop, and the gloo path with both ends in one
process (threads, a TCPStore on 127.0.0.1). Multi-process runs live in test_transport_dist.py."""

import contextlib
import datetime
import gc
import json
import logging
import math
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed import HashStore, TCPStore

from heloco.aggregator import AsyncAggregator, Update
from heloco.distributed.client import DistributedTransport
from heloco.distributed.server import DistributedServer
from heloco.distributed.wire import FlatMessage, MessageHeader, MessageKind
from heloco.transport import (
    AggregatorLike,
    InProcessTransport,
    QuorumUnreachable,
    Server,
    ServerStopped,
    TransportError,
)

SHAPES = [(3,), (2, 2)]


def masters(a=0.0, b=0.0):
    return [torch.full(SHAPES[0], float(a)), torch.full(SHAPES[1], float(b))]


def delta(a, b=None):
    return masters(a, a if b is None else b)


def sgd_aggregator(num_workers=2, quorum=1, lr=1.0):
    params = masters()
    return params, AsyncAggregator(params, torch.optim.SGD(params, lr=lr), num_workers, quorum=quorum)


def tcp_store():
    return TCPStore(
        "127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False
    )


# -- in process -------------------------------------------------------------------------------------


class Recorder:
    """Stand-in server: records calls, returns sentinel updates."""

    def __init__(self):
        self.calls = []
        self.reply = Update(params=[torch.ones(1)], version=7)

    def dispatch(self, worker_id):
        self.calls.append(("dispatch", worker_id))
        return self.reply

    def submit(self, worker_id, pseudo_grads, base_version):
        self.calls.append(("submit", worker_id, pseudo_grads, base_version))
        return self.reply


def test_in_process_forwards_calls_and_results_unchanged():
    server = Recorder()
    t = InProcessTransport(server)
    grads = [torch.zeros(2)]
    assert t.dispatch(3) is server.reply
    assert t.submit(1, grads, 5) is server.reply
    assert server.calls[0] == ("dispatch", 3)
    assert server.calls[1][:2] == ("submit", 1) and server.calls[1][2] is grads and server.calls[1][3] == 5
    t.leave(1)  # the stand-in has no leave(): a no-op


def test_in_process_over_real_aggregator_applies_steps():
    params, agg = sgd_aggregator()
    t = InProcessTransport(agg)
    assert t.dispatch(0).version == 0
    u = t.submit(0, delta(1.0, 2.0), 0)
    assert u.applied and u.version == 1 and u.staleness == 0
    assert torch.equal(u.params[0], torch.full((3,), -1.0)) and torch.equal(
        u.params[1], torch.full((2, 2), -2.0)
    )
    u = t.submit(1, delta(0.5), 0)  # stale by one step
    assert u.staleness == 1 and u.version == 2
    assert torch.equal(params[0], torch.full((3,), -1.5))


def test_in_process_rejects_objects_without_the_two_calls():
    with pytest.raises(ValueError, match=r"callable dispatch\(\)"):
        InProcessTransport(object())


# -- wire format ------------------------------------------------------------------------------------

shapes_st = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


def filled(shapes, data):
    return [
        torch.tensor(
            data.draw(st.lists(finite, min_size=math.prod(s), max_size=math.prod(s))), dtype=torch.float32
        ).reshape(s)
        for s in shapes
    ]


def transfer(src: FlatMessage, data: torch.Tensor, dst: FlatMessage) -> None:
    """What gloo does: the sent bytes land at the start of the receiver's buffer."""
    dst.buffer[: data.numel()].copy_(data)


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_st, data=st.data())
def test_fp32_round_trip_is_exact(shapes, data):
    tensors = filled(shapes, data)
    a, b = FlatMessage(shapes), FlatMessage(shapes)
    sent = a.pack(MessageHeader(MessageKind.SUBMIT, 1, version=4), tensors)
    transfer(a, sent, b)
    h = b.read_header()
    assert h.has_payload and h.kind == MessageKind.SUBMIT and h.version == 4
    for t, v, u in zip(tensors, b.views, b.unpack(torch.float32), strict=True):
        assert v.shape == t.shape and torch.equal(v.view(torch.int32), t.view(torch.int32))
        assert torch.equal(u, t)


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_st, data=st.data())
def test_bf16_round_trip_rounds_to_nearest_bf16(shapes, data):
    tensors = filled(shapes, data)
    a, b = FlatMessage(shapes, torch.bfloat16), FlatMessage(shapes, torch.bfloat16)
    transfer(a, a.pack(MessageHeader(MessageKind.REPLY, 0), tensors), b)
    b.read_header()
    for t, u in zip(tensors, b.unpack(torch.float32), strict=True):
        assert torch.equal(u, t.to(torch.bfloat16).float())
        # bf16 keeps 8 significant bits: round to nearest errs by at most half an ulp, 2^-8 relative (normal range;
        # values above bf16's largest finite number round to infinity)
        normal = (t.abs() >= torch.finfo(torch.float32).tiny) & u.isfinite()
        assert torch.all((u - t).abs()[normal] <= t.abs()[normal] * 2.0**-8)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(list(MessageKind)),
    worker=st.integers(0, 2**31 - 1),
    version=st.integers(0, 2**63 - 1),
    staleness=st.integers(-(2**63), 2**63 - 1),
    weight=st.floats(allow_nan=False),
    applied=st.booleans(),
    dropped=st.booleans(),
    stats=st.dictionaries(st.text(max_size=8), st.floats(allow_nan=False), max_size=4),
)
def test_header_fields_round_trip(kind, worker, version, staleness, weight, applied, dropped, stats):
    m = FlatMessage(SHAPES)
    header = MessageHeader(
        kind,
        worker,
        version=version,
        staleness=staleness,
        weight=weight,
        applied=applied,
        dropped=dropped,
        info={"stats": stats},
    )
    sent = m.pack(header)
    got = FlatMessage(SHAPES)
    transfer(m, sent, got)
    assert got.read_header() == header  # has_payload False on both sides


def test_message_sizes_by_hand():
    m = FlatMessage(SHAPES, torch.float32, info_capacity=100)
    # header region 64 + 100 = 164 → padded to 192; 3 + 4 = 7 floats of 4 bytes
    assert m.payload_offset == 192 and m.payload_nbytes == 28 and m.nbytes == 220
    assert m.pack(MessageHeader(MessageKind.DISPATCH, 1)).numel() == 64  # header only, no info
    assert m.pack(MessageHeader(MessageKind.ERROR, 1, info={"a": 1})).numel() == 64 + len(b'{"a":1}')
    assert m.pack(MessageHeader(MessageKind.SUBMIT, 1), delta(1.0)).numel() == 220
    assert FlatMessage(SHAPES, torch.bfloat16, info_capacity=100).nbytes == 192 + 14
    assert m.views[0].data_ptr() % 64 == 0  # the payload starts aligned


def test_in_place_payload_is_sent_as_written():
    m = FlatMessage(SHAPES)
    views = m.views
    assert m.holds(views) and not m.holds(delta(0.0)) and not m.holds(views[:1])
    views[0].fill_(2.5)
    views[1].fill_(-1.0)
    out = FlatMessage(SHAPES)
    transfer(m, m.pack(MessageHeader(MessageKind.SUBMIT, 0), payload=True), out)
    assert out.read_header().has_payload
    assert torch.equal(out.views[0], torch.full((3,), 2.5)) and torch.equal(
        out.views[1], torch.full((2, 2), -1.0)
    )
    with pytest.raises(ValueError, match="payload=False"):
        m.pack(MessageHeader(MessageKind.SUBMIT, 0), views, payload=False)


def test_read_header_refuses_foreign_or_mismatched_messages():
    m = FlatMessage(SHAPES)
    m.buffer[:4] = torch.tensor(list(b"XXXX"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a heloco message"):
        m.read_header()

    bf = FlatMessage(SHAPES, torch.bfloat16)
    data = bf.pack(MessageHeader(MessageKind.SUBMIT, 0), delta(1.0))
    fp = FlatMessage(SHAPES)
    transfer(bf, data, fp)
    with pytest.raises(ValueError, match="wire dtype mismatch"):
        fp.read_header()

    small = FlatMessage([(3,)])
    transfer(small, small.pack(MessageHeader(MessageKind.SUBMIT, 0), [torch.ones(3)]), fp)
    with pytest.raises(ValueError, match="payload size mismatch"):
        fp.read_header()

    fp.pack(MessageHeader(MessageKind.DISPATCH, 0))
    fp.buffer[4] = 99  # kind byte
    with pytest.raises(ValueError, match="unknown message kind 99"):
        fp.read_header()


def test_pack_refuses_bad_input():
    m = FlatMessage(SHAPES, info_capacity=64)
    with pytest.raises(ValueError, match="got 1 tensors"):
        m.pack(MessageHeader(MessageKind.SUBMIT, 0), [torch.ones(3)])
    with pytest.raises(ValueError, match=r"tensor 1 has shape \(4,\), expected \(2, 2\)"):
        m.pack(MessageHeader(MessageKind.SUBMIT, 0), [torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError, match="info_capacity=64"):
        m.pack(MessageHeader(MessageKind.REPLY, 0, info={"x": "y" * 100}))
    with pytest.raises(ValueError, match="wire_dtype"):
        FlatMessage(SHAPES, torch.int32)
    with pytest.raises(ValueError, match="info_capacity"):
        FlatMessage(SHAPES, info_capacity=8)


# -- server logic without the network ---------------------------------------------------------------


def test_server_constructor_validation():
    _, agg = sgd_aggregator(num_workers=2)
    store = HashStore()
    with pytest.raises(ValueError, match="server_rank"):
        DistributedServer(agg, store, server_rank=2)
    with pytest.raises(ValueError, match="aggregator was built for 2"):
        DistributedServer(agg, store, num_workers=3)
    with pytest.raises(ValueError, match="wire_dtype"):
        DistributedServer(agg, store, wire_dtype=torch.int8)
    for bad in (0, -1.0, float("nan"), "10"):
        with pytest.raises(ValueError, match="timeout"):
            DistributedServer(agg, store, timeout=bad)
    with pytest.raises(ValueError, match="rejoin_timeout"):
        DistributedServer(agg, store, rejoin_timeout=-1)
    with pytest.raises(ValueError, match="store"):
        DistributedServer(agg, "127.0.0.1:29500")
    with pytest.raises(ValueError, match="mixes dtypes"):
        DistributedServer(agg, store, params_like=[torch.zeros(3), torch.zeros(2, 2, dtype=torch.float64)])


def test_server_submit_waits_for_the_quorum_and_answers_everyone():
    _, agg = sgd_aggregator(num_workers=3, quorum=3)
    server = DistributedServer(agg, HashStore(), timeout=20)  # not started: no remote threads needed
    results = {}

    def run(w):
        results[w] = server.submit(w, delta(float(w + 1), 3.0 * (w + 1)), 0)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [0, 1, 2]
    # θ = 0 − mean(Δ): mean of 1, 2, 3 is 2; mean of 3, 6, 9 is 6
    for u in results.values():
        assert u.version == 1 and u.staleness == 0
        assert torch.equal(u.params[0], torch.full((3,), -2.0)) and torch.equal(
            u.params[1], torch.full((2, 2), -6.0)
        )
    assert sum(u.applied for u in results.values()) == 1  # exactly one call ran the step
    assert agg.version == 1 and agg.pending_workers == []


def test_server_stop_wakes_a_pending_quorum_and_refuses_later_calls():
    _, agg = sgd_aggregator(num_workers=2, quorum=2)
    server = DistributedServer(agg, HashStore(), timeout=30)
    errors = []

    def run():
        try:
            server.submit(0, delta(1.0), 0)
        except ServerStopped as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while agg.pending_workers != [0] and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1
    with pytest.raises(ServerStopped):
        server.dispatch(1)
    assert agg.version == 0
    server.join(timeout=1)  # a stopped server has nothing left to wait for


def test_server_quorum_wait_is_bounded_by_timeout():
    _, agg = sgd_aggregator(num_workers=2, quorum=2)
    server = DistributedServer(agg, HashStore(), timeout=0.3)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="quorum round did not complete"):
        server.submit(1, delta(1.0), 0)
    assert time.monotonic() - start < 5


# -- gloo, both ends in this process ----------------------------------------------------------------


def test_worker_thread_over_gloo_async_exact_values_and_stats():
    params, agg = sgd_aggregator(num_workers=2)
    store = tcp_store()
    server = DistributedServer(agg, store, timeout=30, connect_timeout=30, prefix="t1").start()
    out = {}

    def worker():
        with DistributedTransport(1, masters(), store, timeout=30, connect_timeout=30, prefix="t1") as t:
            u = t.dispatch(1)
            out["dispatch"] = (u.version, [p.clone() for p in u.params])
            u = t.submit(1, delta(1.0, 2.0), u.version)
            out["submit"] = (u.version, u.staleness, u.applied, [p.clone() for p in u.params], dict(u.stats))
            with pytest.raises(ValueError, match="NaN or Inf"):
                t.submit(1, delta(float("nan")), u.version)
            u = t.submit(1, delta(1.0, 0.0), u.version)  # the connection survives a refused Δ
            out["last"] = (u.version, [p.clone() for p in u.params])
            with pytest.raises(ValueError, match="belongs to worker 1"):
                t.dispatch(0)
            out["transport"] = t

    th = threading.Thread(target=worker)
    th.start()
    th.join(60)
    server.join(timeout=30)
    assert out["dispatch"][0] == 0 and all(torch.equal(p, torch.zeros_like(p)) for p in out["dispatch"][1])
    version, staleness, applied, got, stats = out["submit"]
    assert (version, staleness, applied) == (1, 0, True) and stats == {"staleness": 0.0, "weight": 1.0}
    assert torch.equal(got[0], torch.full((3,), -1.0)) and torch.equal(got[1], torch.full((2, 2), -2.0))
    assert out["last"][0] == 2 and torch.equal(out["last"][1][0], torch.full((3,), -2.0))
    assert torch.equal(params[1], torch.full((2, 2), -2.0))
    s = server.worker_stats()[1]
    assert s["state"] == "left" and not s["alive"] and s["incarnation"] == 1 and s["departures"] == 0
    # hello, dispatch, 3 submits, leave in; ack, 3 replies with params, 1 error, 1 ack out
    assert s["messages_in"] == 6 and s["messages_out"] == 6
    m = FlatMessage(SHAPES)
    hello = 64 + len(json.dumps(m.layout(), separators=(",", ":")))
    assert s["bytes_in"] == hello + 64 + 3 * m.nbytes + 64
    t = out["transport"]  # left at the end of its with block
    assert not t.connected and (t.bytes_sent, t.bytes_received) == (s["bytes_in"], s["bytes_out"])


def test_bf16_wire_sends_rounded_parameters():
    params, agg = sgd_aggregator(num_workers=2)
    store = tcp_store()
    server = DistributedServer(agg, store, wire_dtype=torch.bfloat16, timeout=30, prefix="t2").start()
    out = {}

    def worker():
        t = DistributedTransport(1, masters(), store, wire_dtype=torch.bfloat16, timeout=30, prefix="t2")
        u = t.dispatch(1)
        u = t.submit(1, delta(1.0 + 2**-10, 3.0), u.version)  # 1 + 2^-10 is not a bf16 number
        out["params"] = [p.clone() for p in u.params]
        t.leave()

    th = threading.Thread(target=worker)
    th.start()
    th.join(60)
    server.join(timeout=30)
    # Δ arrives rounded to 1.0, so the fp32 master becomes exactly −1; the reply is bf16
    assert torch.equal(params[0], torch.full((3,), -1.0)) and torch.equal(params[1], torch.full((2, 2), -3.0))
    assert out["params"][0].dtype == torch.bfloat16 and torch.equal(out["params"][0].float(), params[0])


def test_stopped_server_answers_stopped_to_the_next_message():
    _, agg = sgd_aggregator(num_workers=2)
    store = tcp_store()
    server = DistributedServer(agg, store, timeout=30, prefix="t3").start()
    t = DistributedTransport(1, masters(), store, timeout=30, prefix="t3")
    u = t.dispatch(1)
    server.stop()  # e.g. after KeyboardInterrupt on the server rank, before a final checkpoint
    with pytest.raises(ServerStopped):
        t.submit(1, delta(1.0), u.version)
    assert agg.version == 0 and not t.connected
    assert server.worker_stats()[1]["state"] == "stopped"


class FlakyServer:
    """Stand-in ``Server`` (not an ``AggregatorLike``: no ``out=``, no quorum) whose outer step fails
    once (e.g. out of memory), then works. The server must be told K and the parameter shapes."""

    num_workers = 2

    def __init__(self):
        self.global_params = masters()
        self.version = 0
        self.failed = False

    def dispatch(self, worker_id):
        return Update(params=[p.clone() for p in self.global_params], version=self.version)

    def submit(self, worker_id, pseudo_grads, base_version):
        if not self.failed:
            self.failed = True
            raise RuntimeError("outer step failed")
        torch._foreach_sub_(self.global_params, list(pseudo_grads))
        self.version += 1
        return Update(params=[p.clone() for p in self.global_params], version=self.version, applied=True)


def test_aggregator_failure_reaches_the_worker_and_the_server_goes_on(caplog):
    agg = FlakyServer()
    store = tcp_store()
    server = DistributedServer(agg, store, 2, masters(), timeout=30, prefix="t10").start()
    t = DistributedTransport(1, masters(), store, timeout=30, prefix="t10")
    with (
        caplog.at_level(logging.ERROR, logger="heloco.distributed.session"),
        pytest.raises(RuntimeError, match="outer step failed"),
    ):
        t.submit(1, delta(1.0), 0)
    assert "worker 1's SUBMIT failed on the server" in caplog.text
    u = t.submit(1, delta(2.0), 0)
    assert u.version == 1 and torch.equal(u.params[0], torch.full((3,), -2.0))
    t.leave()
    server.join(timeout=30)
    assert server.worker_stats()[1]["state"] == "left"


def test_pending_quorum_fails_fast_when_too_few_workers_remain():
    _, agg = sgd_aggregator(num_workers=2, quorum=2)
    store = tcp_store()
    server = DistributedServer(agg, store, timeout=60, prefix="t8", shrink_quorum=False).start()
    remote = DistributedTransport(1, masters(), store, timeout=60, prefix="t8")
    errors = []

    def local_round():  # the server rank's own worker, waiting for worker 1's Δ
        try:
            server.submit(0, delta(1.0), 0)
        except QuorumUnreachable as e:
            errors.append(str(e))

    th = threading.Thread(target=local_round)
    th.start()
    deadline = time.monotonic() + 10
    while agg.pending_workers != [0] and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    remote.leave()  # worker 1 quits instead of submitting: the round can never complete
    th.join(10)
    assert errors and "quorum 2, but workers [1] left or died" in errors[0]
    assert time.monotonic() - start < 5  # not the 60 s timeout
    server.join(timeout=10)


def test_layout_mismatch_is_refused_at_connection(caplog):
    _, agg = sgd_aggregator(num_workers=2)
    store = tcp_store()
    server = DistributedServer(agg, store, timeout=30, prefix="t4").start()
    with caplog.at_level(logging.ERROR, logger="heloco.distributed.session"):
        with pytest.raises(ValueError, match=r"layout mismatch.*tensors: peer 1, here 2"):
            DistributedTransport(1, [torch.zeros(3)], store, timeout=30, prefix="t4")  # one tensor short
        server.join(timeout=30)  # the refused worker counts as gone; nothing is left to serve
    assert "worker 1 refused" in caplog.text
    assert server.worker_stats()[1]["state"] == "dead" and agg.version == 0


def test_server_context_manager_joins_on_normal_exit():
    _, agg = sgd_aggregator(num_workers=2)
    server = DistributedServer(agg, tcp_store(), connect_timeout=0.5, prefix="t7")
    with pytest.raises(TimeoutError, match="never connected"), server:
        pass  # a normal exit joins, and worker 1 never came
    assert server.worker_stats()[1]["state"] == "missing"


def test_interrupt_inside_the_with_block_stops_the_server_for_a_final_checkpoint():
    _, agg = sgd_aggregator(num_workers=2)
    server = DistributedServer(agg, tcp_store(), connect_timeout=30, prefix="t9")
    with pytest.raises(KeyboardInterrupt), server:
        server.submit(0, delta(1.0), 0)
        raise KeyboardInterrupt  # Ctrl-C during training on the server rank
    assert server.stopped
    with pytest.raises(ServerStopped):
        server.submit(0, delta(1.0), 1)
    state = agg.state_dict()  # nothing touches the aggregator any more: safe to save
    assert state["version"] == 1


def test_server_without_workers_raises_timeout(caplog):
    _, agg = sgd_aggregator(num_workers=3)
    server = DistributedServer(agg, tcp_store(), connect_timeout=0.5, prefix="t5").start()
    start = time.monotonic()
    with (
        caplog.at_level(logging.ERROR, logger="heloco.distributed.session"),
        pytest.raises(TimeoutError, match=r"\[1, 2\] never connected"),
    ):
        server.join(timeout=20)
    assert time.monotonic() - start < 10
    assert [s["state"] for s in server.worker_stats()] == ["local", "missing", "missing"]
    assert "worker 1 never connected" in caplog.text


def test_worker_without_server_fails_in_bounded_time():
    start = time.monotonic()
    with pytest.raises(TransportError, match="could not connect"):
        DistributedTransport(1, masters(), tcp_store(), connect_timeout=0.5, prefix="t6")
    assert time.monotonic() - start < 10


def test_worker_transport_validation():
    store = HashStore()
    with pytest.raises(ValueError, match="server rank"):
        DistributedTransport(0, masters(), store)
    with pytest.raises(ValueError, match="worker_id"):
        DistributedTransport(-1, masters(), store)
    with pytest.raises(ValueError, match="params_like"):
        DistributedTransport(1, [], store)
    with pytest.raises(ValueError, match="floating-point"):
        DistributedTransport(1, [torch.zeros(2, dtype=torch.int64)], store)


# -- a worker gone for good in synchronous rounds: the quorum shrinks ---------------------------------


def _local_submit_in_thread(server, worker_id, grads, base):
    """The server rank's own worker submitting (it blocks while its round is open)."""
    result = {}

    def run():
        try:
            result["update"] = server.submit(worker_id, grads, base)
        except Exception as e:  # reported to the test
            result["error"] = e

    th = threading.Thread(target=run)
    th.start()
    return th, result


def _wait_pending(agg, workers):
    deadline = time.monotonic() + 10
    while agg.pending_workers != workers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agg.pending_workers == workers


def test_leaving_worker_shrinks_the_quorum_and_releases_the_waiting_round(caplog):
    params, agg = sgd_aggregator(num_workers=2, quorum=2)
    store = tcp_store()
    server = DistributedServer(agg, store, timeout=60, prefix="t11").start()
    remote = DistributedTransport(1, masters(), store, timeout=60, prefix="t11")
    th, result = _local_submit_in_thread(server, 0, delta(1.0, 3.0), 0)
    _wait_pending(agg, [0])
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="heloco.distributed.server"):
        remote.leave()  # worker 1 quits instead of submitting: the round goes on without it
        th.join(10)
    assert time.monotonic() - start < 5 and "error" not in result
    u = result["update"]
    assert u.version == 1 and torch.equal(u.params[0], torch.full((3,), -1.0))  # θ = 0 − Δ₀
    assert torch.equal(u.params[1], torch.full((2, 2), -3.0))
    assert agg.removed_workers == [1] and agg.effective_quorum == 1
    assert (
        "worker 1 removed from the quorum (now 1); its removal completed the round of workers [0]"
        in caplog.text
    )
    u = server.submit(0, delta(1.0), 1)  # alone from now on: every submission is a full round
    assert u.applied and u.version == 2 and torch.equal(params[0], torch.full((3,), -2.0))
    server.join(timeout=10)
    assert server.worker_stats()[1]["state"] == "left"


def test_dead_worker_is_removed_and_the_round_of_the_others_completes():
    _, agg = sgd_aggregator(num_workers=3, quorum=3)
    store = tcp_store()
    server = DistributedServer(agg, store, timeout=60, prefix="t12").start()
    survivor = DistributedTransport(1, masters(), store, timeout=60, prefix="t12")
    doomed = DistributedTransport(2, masters(), store, timeout=60, prefix="t12")
    remote = {}

    def survivor_round():
        u = survivor.submit(1, delta(3.0, 5.0), 0)
        remote["update"] = (u.version, u.applied, [p.clone() for p in u.params])

    th_local, local = _local_submit_in_thread(server, 0, delta(1.0, 1.0), 0)
    th_remote = threading.Thread(target=survivor_round)
    th_remote.start()
    deadline = time.monotonic() + 10
    while sorted(agg.pending_workers) != [0, 1] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(agg.pending_workers) == [0, 1]
    with contextlib.suppress(RuntimeError), doomed:  # leaving by an exception drops the connection
        raise RuntimeError("worker 2's process dies: its sockets close, no LEAVE")
    del doomed
    gc.collect()
    th_local.join(10)
    th_remote.join(10)
    assert "error" not in local and "update" in remote
    # θ = 0 − mean(Δ₀, Δ₁) = −(2, 3) for both the local and the remote worker
    version, applied, got = remote["update"]
    assert version == 1 and not applied  # the step ran when worker 2 was removed, not in this call
    assert torch.equal(got[0], torch.full((3,), -2.0)) and torch.equal(got[1], torch.full((2, 2), -3.0))
    assert all(torch.equal(a, b) for a, b in zip(local["update"].params, got, strict=True))
    assert agg.removed_workers == [2] and agg.version == 1
    stats = server.worker_stats()
    assert stats[2]["state"] == "dead" and stats[2]["departures"] == 1
    survivor.leave()
    server.join(timeout=10)


def test_worker_that_never_connects_is_removed_from_the_quorum():
    _, agg = sgd_aggregator(num_workers=2, quorum=2)
    server = DistributedServer(agg, tcp_store(), timeout=60, connect_timeout=0.5, prefix="t13").start()
    u = server.submit(0, delta(2.0), 0)  # waits until worker 1 counts as missing, then goes on alone
    assert u.version == 1 and torch.equal(u.params[0], torch.full((3,), -2.0))
    assert agg.removed_workers == [1]
    with pytest.raises(TimeoutError, match="never connected"):
        server.join(timeout=10)


# -- replies written into given tensors -------------------------------------------------------------


def test_server_passes_out_to_an_aggregator_that_accepts_it():
    _, agg = sgd_aggregator(num_workers=2, lr=0.5)
    server = DistributedServer(agg, HashStore())
    out = [torch.full(s, 9.0, dtype=torch.bfloat16) for s in SHAPES]
    u = server.submit(0, delta(2.0, 4.0), 0, out=out)
    assert u.params is out and torch.equal(out[1], torch.full((2, 2), -2.0, dtype=torch.bfloat16))
    u = server.dispatch(1, out=out)
    assert u.params is out and torch.equal(out[0], torch.full((3,), -1.0, dtype=torch.bfloat16))


def test_server_decides_once_what_it_may_use_of_its_aggregator():
    _, agg = sgd_aggregator(num_workers=2, quorum=2)
    assert isinstance(agg, AggregatorLike)
    plain = FlakyServer()
    assert isinstance(plain, Server) and not isinstance(plain, AggregatorLike)
    with pytest.raises(ValueError, match="num_workers must be an int >= 1"):
        DistributedServer(plain, HashStore())  # a plain Server's attributes are not probed
    with pytest.raises(ValueError, match="params_like is required"):
        DistributedServer(plain, HashStore(), 2)
    with pytest.raises(ValueError, match="callable dispatch"):
        DistributedServer(object(), HashStore(), 2, masters())


def test_server_without_out_support_answers_with_the_aggregators_copies():
    agg = FlakyServer()
    agg.failed = True  # no failure this time
    server = DistributedServer(agg, HashStore(), 2, masters())
    out = [torch.full(s, 9.0) for s in SHAPES]
    u = server.submit(1, delta(2.0), 0, out=out)
    assert u.params is not out and torch.equal(u.params[0], torch.full((3,), -2.0))
    assert all(torch.equal(o, torch.full_like(o, 9.0)) for o in out)  # untouched


def test_diloco_worker_over_gloo_equals_the_in_process_run():
    """A remote DiLoCoWorker (Δ written into the transport's send buffer, parameters written by the
    aggregator into the server's reply buffer) ends bit for bit where the in-process run ends."""
    from heloco.worker import DiLoCoWorker

    def build():
        torch.manual_seed(4)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
        masters_ = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(masters_, lr=0.7, momentum=0.9, nesterov=True)
        return model, AsyncAggregator(masters_, opt, 2, lookahead=True)

    def train(model, transport, sent):
        inner = torch.optim.AdamW(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(8)
        with DiLoCoWorker(model, inner, transport, 1, sync_every=2) as worker:
            for _ in range(6):
                x = torch.randn(5, 4, generator=g)
                (model(x) - x[:, :2]).pow(2).mean().backward()
                inner.step()
                inner.zero_grad()
                if worker.steps_since_sync == 1 and sent is not None:
                    sent.append(transport.send_message.holds(worker.pseudo_gradient()))

    model_a, agg_a = build()
    train(model_a, InProcessTransport(agg_a), None)

    model_b, agg_b = build()
    store = tcp_store()
    server = DistributedServer(agg_b, store, timeout=30, prefix="t14").start()
    sent = []

    def remote():
        with DistributedTransport(1, list(model_b.parameters()), store, timeout=30, prefix="t14") as t:
            train(model_b, t, sent)

    th = threading.Thread(target=remote)
    th.start()
    th.join(60)
    server.join(timeout=30)
    assert sent == [True, True, True]  # Δ lived in the transport's buffer
    assert agg_b.version == agg_a.version == 3
    for a, b in zip(agg_a.global_params, agg_b.global_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)  # with look-ahead: the extrapolated point, written into the reply buffer
