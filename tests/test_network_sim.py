"""The simulated network (heloco.simulation), overlapped rounds (heloco.worker) and their simulator
(recipes.simulator), on toy workers whose times and values can be worked out by hand."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from heloco.aggregator import AsyncAggregator
from heloco.codecs import HEADER_BYTES, ErrorFeedback, make_codec
from heloco.simulation import COMPUTED, DELIVERED, RECEIVED, Link, NetworkModel, VirtualClock
from heloco.transport import InProcessTransport
from heloco.worker import DiLoCoWorker
from recipes.simulator import SimulatedWorker, Simulator
from recipes.worker_round import RoundResult

NBYTES = 16  # nn.Linear(3, 1): 4 fp32 parameters


# -- links and the clock ----------------------------------------------------------------------------


def test_link_time_is_latency_plus_size_over_bandwidth():
    assert Link(8.0, 0.5).seconds(16) == 2.5
    assert Link().seconds(10**9) == 0.0
    assert Link(latency=0.25).seconds(10**9) == 0.25
    net = NetworkModel.per_worker(
        2, uplink_bandwidth=[16.0], downlink_latency=[0.0, 1.0], server_step_time=0.5
    )
    assert [net.upload_seconds(w, 16) for w in (0, 1)] == [1.0, 1.0]
    assert [net.reply_seconds(w, 16) for w in (0, 1)] == [0.5, 1.5]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Link(bandwidth=0.0), "bandwidth must be > 0"),
        (lambda: Link(bandwidth=-1.0), "bandwidth must be > 0"),
        (lambda: Link(latency=-0.1), "latency must be a finite number >= 0"),
        (lambda: Link(latency=math.inf), "latency must be a finite number >= 0"),
        (lambda: NetworkModel.per_worker(3, uplink_bandwidth=[1.0, 2.0]), "one entry per worker"),
        (lambda: NetworkModel.per_worker(2, server_step_time=-1.0), "server_step_time"),
        (lambda: VirtualClock([1.0], network=NetworkModel.per_worker(2)), "links for 2 workers"),
    ],
)
def test_network_refuses_bad_values(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_clock_orders_events_by_time_worker_kind_and_resumes():
    net = NetworkModel.per_worker(2, uplink_bandwidth=[16.0], uplink_latency=[1.0])
    clock = VirtualClock([1.0, 0.5], network=net)
    clock.start(0, 2)
    clock.start(1, 2)
    event = clock.pop_event()
    assert (event.time, event.worker, event.kind) == (2.0, 0, COMPUTED)
    assert clock.upload_done(0, NBYTES) == 4.0
    clock.schedule(4.0, 0, RECEIVED)
    clock.schedule(4.0, 0, DELIVERED)
    saved = clock.state_dict()
    with pytest.raises(RuntimeError, match="use pop_event"):
        clock.pop()  # the next event at t=4 is worker 0's message (worker 1's round also ends at 4)

    def drain(c):
        return [(e.time, e.worker, e.kind) for e in (c.pop_event() for _ in range(3))]

    expected = [(4.0, 0, RECEIVED), (4.0, 0, DELIVERED), (4.0, 1, COMPUTED)]
    assert drain(clock) == expected
    other = VirtualClock([1.0, 0.5], network=net)
    other.load_state_dict(saved)
    assert drain(other) == expected
    with pytest.raises(ValueError, match="network"):
        VirtualClock([1.0, 0.5]).load_state_dict(saved)


def test_clock_without_network_keeps_its_state_format():
    clock = VirtualClock([1.0, 0.5])
    clock.start(0, 2)
    assert clock.upload_done(0, 10**9) == clock.now == clock.reply_done(0, 10**9)
    assert clock.state_dict()["transit"] == [] and clock.state_dict()["network"] is None


# -- toy simulator ----------------------------------------------------------------------------------


class ToyLoop:
    """A round moves θ by a fixed, worker-specific map (θ ← 0.9 θ + 0.1 (k + 1)), so its result
    depends only on the parameters it started from."""

    def __init__(self, worker_id: int) -> None:
        torch.manual_seed(0)
        self.worker_id = worker_id
        self.model = torch.nn.Linear(3, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.local_step = 0
        self.stream = SimpleNamespace(state_dict=dict, load_state_dict=lambda state: None)

    @torch.no_grad()
    def run(self, steps, progress):
        for p in self.model.parameters():
            p.mul_(0.9).add_(0.1 * (self.worker_id + 1))
        self.local_step += steps
        return RoundResult(steps, float(self.local_step), self.local_step)


def toy_simulator(network=None, overlap=False, speeds=(1.0, 0.5), steps=2, quorum=1, codec=None):
    """Two toy workers over an SGD(lr 1) aggregator; ``codec()`` makes each worker's encoder (the
    transport decodes bf16)."""
    torch.manual_seed(0)
    masters = [p.detach().clone() for p in torch.nn.Linear(3, 1).parameters()]
    aggregator = AsyncAggregator(masters, torch.optim.SGD(masters, lr=1.0), len(speeds), quorum=quorum)
    transport = InProcessTransport(aggregator, codec=None if codec is None else make_codec("bf16"))
    workers = [
        SimulatedWorker(
            k,
            ToyLoop(k),
            transport,
            steps,
            torch.device("cpu"),
            overlap=overlap,
            codec=None if codec is None else codec(),
        )
        for k in range(len(speeds))
    ]
    clock = VirtualClock(list(speeds), network=network)
    config = SimpleNamespace(diloco=SimpleNamespace(offload_idle_workers=False))
    simulator = Simulator(config, aggregator, workers, clock, SimpleNamespace(device=torch.device("cpu")))
    simulator.start()
    return simulator


def arrivals(simulator, n):
    seen = []
    while len(seen) < n:
        arrival = simulator.step(lambda: 0.0)
        if arrival is not None:
            seen.append((arrival.time, arrival.worker, arrival.update.staleness))
    return seen


# speeds 1 and 0.5 steps/s, H = 2: rounds of 2 s (worker 0) and 4 s (worker 1); a 16-byte Δ takes
# 1 s + 16 B / 16 B/s = 2 s up; the server answers 0.5 s after receipt; 16 B at 16 B/s = 1 s down.
SLOW = dict(uplink_bandwidth=[16.0], uplink_latency=[1.0], downlink_bandwidth=[16.0], server_step_time=0.5)


def test_arrival_and_reply_times_by_hand_without_overlap():
    simulator = toy_simulator(NetworkModel.per_worker(2, **SLOW))
    # worker 0: compute ends 2, received 4, reply 4 + 0.5 + 1 = 5.5 → next round 5.5–7.5, received 9.5,
    #   reply 11 → 11–13, received 15
    # worker 1: compute ends 4, received 6, reply 7.5 → 7.5–11.5, received 13.5
    # staleness: w1's first Δ (base 0) meets version 1; w0's second (base 1) meets 2; w1's second
    # (base 2, from the reply at 6) meets 3; w0's third (base 3) meets 4
    assert arrivals(simulator, 5) == [(4.0, 0, 0), (6.0, 1, 1), (9.5, 0, 1), (13.5, 1, 1), (15.0, 0, 1)]
    clock = simulator.clock
    # worker 0 waited 3.5 s after each of its rounds (2 s up, 0.5 s server, 1 s down); its third
    # round's reply is still on its way
    assert clock.busy[0] == 3 * 2.0 and clock.idle[0] == 2 * 3.5


def test_arrival_and_reply_times_by_hand_with_overlap():
    simulator = toy_simulator(NetworkModel.per_worker(2, **SLOW), overlap=True)
    # worker 0 sends at 2 (received 4, reply 5.5); its next round (2–4) waits for that reply until 5.5,
    #   merges and sends (received 7.5, reply 9); the round 5.5–7.5 waits until 9; sends, received 11 ...
    #   sends at 2, 5.5, 9, 12.5 → received 4, 7.5, 11, 14.5
    # worker 1 sends at 4 (received 6, reply 7.5); the round 4–8 finds it there: sends at 8, 12, 16 →
    #   received 6, 10, 14, 18
    seen = arrivals(simulator, 7)
    assert [(t, w) for t, w, _ in seen] == [
        (4.0, 0),
        (6.0, 1),
        (7.5, 0),
        (10.0, 1),
        (11.0, 0),
        (14.0, 1),
        (14.5, 0),
    ]
    # bases: each Δ after the first is sent from the merged reply to the worker's previous Δ, and one
    # other arrival came between that reply and this one (w0 at 7.5: base 1, version 2) → staleness 1
    assert [s for _, _, s in seen] == [0, 1, 1, 1, 1, 1, 1]
    clock = simulator.clock
    # worker 0 waited 1.5 s at each boundary (4→5.5, 7.5→9, 11→12.5); its round from 12.5 is running
    assert clock.idle[0] == 4.5 and clock.busy[0] == 5 * 2.0


def test_instantaneous_network_equals_no_network_bit_for_bit():
    """A network of unlimited links runs the clock's event path; it gives the arrivals, parameters and
    busy/idle times of the clock without a network."""
    plain = toy_simulator()
    seen = arrivals(plain, 9)
    networked = toy_simulator(NetworkModel.per_worker(2))
    assert arrivals(networked, 9) == seen
    assert (plain.clock.busy, plain.clock.idle) == (networked.clock.busy, networked.clock.idle)
    for a, b in zip(plain.aggregator.global_params, networked.aggregator.global_params, strict=True):
        assert torch.equal(a, b)


def idle_fraction(clock, worker):
    return clock.idle[worker] / (clock.busy[worker] + clock.idle[worker])


def test_overlap_removes_the_fast_workers_wait_on_a_slow_link():
    """A link on which one fp32 message takes half the fast worker's round (2 s), both ways: without
    overlap a round costs 2 + 1 + 1 = 4 s, half of it idle; with overlap the reply (1 s up + 1 s
    down) arrives exactly when the next round ends, so the worker never waits."""
    half_round = dict(uplink_bandwidth=[16.0], downlink_bandwidth=[16.0])
    waiting = toy_simulator(NetworkModel.per_worker(2, **half_round))
    seen = arrivals(waiting, 8)
    fast = [t for t, w, _ in seen if w == 0]
    assert fast == [3.0, 7.0, 11.0, 15.0, 19.0]  # received every 4 s
    # after the 5th: 5 rounds computed (10 s), 4 waits of 2 s; the 5th reply still on its way
    assert waiting.clock.idle[0] == 8.0 and waiting.clock.busy[0] == 10.0
    overlapped = toy_simulator(NetworkModel.per_worker(2, **half_round), overlap=True)
    seen = arrivals(overlapped, 10)
    fast = [t for t, w, _ in seen if w == 0]
    assert fast == [3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0]  # received every 2 s
    assert overlapped.clock.idle[0] == 0.0 and idle_fraction(overlapped.clock, 0) == 0.0
    assert idle_fraction(waiting.clock, 0) == 8.0 / 18.0  # → 1/2 as rounds go on


def test_simulator_state_round_trips_with_messages_in_flight():
    """A checkpoint between a round's end and the server's receipt (a Δ on the uplink), and with
    overlapped rounds: the restored simulator continues exactly as the original."""
    net = NetworkModel.per_worker(2, **SLOW)
    original = toy_simulator(net, overlap=True)
    arrivals(original, 3)
    while not any(w.in_transit is not None for w in original.workers):
        original.step(lambda: 0.0)
    state = copy.deepcopy(original.state_dict())  # as written to disk: no tensor shared with the run
    agg_state = copy.deepcopy(original.aggregator.state_dict())
    rest = arrivals(original, 6)
    restored = toy_simulator(net, overlap=True)
    restored.aggregator.load_state_dict(agg_state)
    restored.load_state_dict(state)
    assert arrivals(restored, 6) == rest
    for a, b in zip(original.aggregator.global_params, restored.aggregator.global_params, strict=True):
        assert torch.equal(a, b)


def test_synchronous_quorum_over_a_slow_link():
    """Quorum 2: both Δ must be received before the outer step; both replies leave then."""
    simulator = toy_simulator(NetworkModel.per_worker(2, **SLOW), quorum=2)
    # w0 received 4 (waits), w1 received 6: step, replies at 6 + 1.5 = 7.5 → both rounds start 7.5:
    # w0 ends 9.5 → received 11.5; w1 ends 11.5 → received 13.5 (step), replies 15
    assert [(t, w) for t, w, _ in arrivals(simulator, 4)] == [(4.0, 0), (6.0, 1), (11.5, 0), (13.5, 1)]
    assert simulator.aggregator.version == 2


# -- a codec in the loop ---------------------------------------------------------------------------


def bf16_with_feedback():
    return ErrorFeedback(make_codec("bf16"))


class Recording:
    """Records what the aggregator is handed."""

    def __init__(self, params):
        self.params = [p.detach().clone() for p in params]
        self.received = []

    def dispatch(self, worker_id):
        return SimpleNamespace(params=[p.clone() for p in self.params], version=0)

    def submit(self, worker_id, pseudo_grads, base_version):
        self.received.append([g.clone() for g in pseudo_grads])
        return SimpleNamespace(params=[p.clone() for p in self.params], version=0)


def test_server_steps_on_the_decoded_message_with_error_feedback():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    server = Recording(model.parameters())
    transport = InProcessTransport(server, codec=make_codec("bf16"), params_like=list(model.parameters()))
    ef = bf16_with_feedback()
    worker = DiLoCoWorker(model, torch.optim.SGD(model.parameters(), lr=0.1), transport, 0, 1, codec=ef)
    worker.pull()
    start = [p.detach().clone() for p in model.parameters()]
    residual = [torch.zeros_like(p) for p in start]
    for r in range(3):
        step_by(model, 0.0123 * (r + 1))
        delta = [s - p.detach() for s, p in zip(start, model.parameters(), strict=True)]
        corrected = [d + e for d, e in zip(delta, residual, strict=True)]
        expected = [c.to(torch.bfloat16).float() for c in corrected]  # decode(encode(Δ + e))
        outgoing = worker.outgoing()
        assert outgoing.nbytes == HEADER_BYTES + 2 * sum(p.numel() for p in start)
        assert outgoing.pseudo_grads is None
        worker.receive(worker.send(outgoing))
        assert all(torch.equal(g, x) for g, x in zip(server.received[-1], expected, strict=True))
        residual = [c - x for c, x in zip(corrected, expected, strict=True)]
        assert all(torch.equal(e, x) for e, x in zip(ef.residuals, residual, strict=True))
        assert any(e.abs().sum() > 0 for e in residual)  # bf16 is lossy: e carries something
    with pytest.raises(TypeError, match="submit_encoded"):
        DiLoCoWorker(model, torch.optim.SGD(model.parameters(), lr=0.1), server, 0, 1, codec=ef)
    with pytest.raises(ValueError, match="no codec"):
        InProcessTransport(server).submit_encoded(0, SimpleNamespace(), 0)


def test_network_charges_the_encoded_size():
    """The toy model's Δ is 16 bytes in fp32 (2 s up at 8 B/s); bf16 sends its 32-byte header and
    2 bytes per value: 40 bytes, 5 s."""
    assert make_codec("bf16").max_nbytes([(1, 3), (1,)]) == 40
    net = NetworkModel.per_worker(2, uplink_bandwidth=[8.0])
    fp32 = arrivals(toy_simulator(net), 2)
    half = arrivals(toy_simulator(net, codec=bf16_with_feedback), 2)
    assert [(t, w) for t, w, _ in fp32] == [(4.0, 0), (6.0, 1)]  # rounds end at 2 and 4, + 2 s
    assert [(t, w) for t, w, _ in half] == [(7.0, 0), (9.0, 1)]  # + 5 s


def test_resume_with_error_feedback_and_encoded_messages_in_flight():
    net = NetworkModel.per_worker(2, **SLOW)
    make = dict(overlap=True, codec=bf16_with_feedback)
    original = toy_simulator(net, **make)
    arrivals(original, 3)
    while not any(w.in_transit is not None for w in original.workers):
        original.step(lambda: 0.0)
    state = copy.deepcopy(original.state_dict())
    agg_state = copy.deepcopy(original.aggregator.state_dict())
    assert all(w["codec"]["residuals"] is not None for w in state["workers"])
    rest = arrivals(original, 6)
    restored = toy_simulator(net, **make)
    restored.aggregator.load_state_dict(agg_state)
    restored.load_state_dict(state)
    assert arrivals(restored, 6) == rest
    for a, b in zip(original.aggregator.global_params, restored.aggregator.global_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(original.workers, restored.workers, strict=True):
        assert all(
            torch.equal(x, y) for x, y in zip(a.diloco.codec.residuals, b.diloco.codec.residuals, strict=True)
        )


# -- the overlap rule on one worker -----------------------------------------------------------------


class KnownReplies:
    """A server that records each Δ and answers with a given θ_reply per submission."""

    def __init__(self, params, replies):
        self.params = [p.detach().clone() for p in params]
        self.replies = list(replies)
        self.submissions = []

    def dispatch(self, worker_id):
        return SimpleNamespace(params=[p.clone() for p in self.params], version=0)

    def submit(self, worker_id, pseudo_grads, base_version):
        self.submissions.append(([g.clone() for g in pseudo_grads], base_version))
        return SimpleNamespace(params=self.replies.pop(0), version=len(self.submissions))


def step_by(model, amount):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount * torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + 0.3)


def test_overlap_merge_rule_exact():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    theta0 = [p.detach().clone() for p in model.parameters()]
    reply1 = [torch.randn_like(p) for p in theta0]
    reply2 = [torch.randn_like(p) for p in theta0]
    server = KnownReplies(model.parameters(), [reply1, reply2, reply2])
    worker = DiLoCoWorker(model, torch.optim.SGD(model.parameters(), lr=0.1), server, 0, 1, overlap=True)
    worker.pull()
    step_by(model, 0.1)  # round 0
    sent0 = [p.detach().clone() for p in model.parameters()]
    worker.sync()  # Δ0 = θ0 − θ_sent0; the reply is held, the replica goes on from θ_sent0
    delta0, base0 = server.submissions[0]
    assert base0 == 0 and all(torch.equal(d, a - b) for d, a, b in zip(delta0, theta0, sent0, strict=True))
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), sent0, strict=True))
    assert worker.reply_held and worker.base_version == 0
    step_by(model, -0.05)  # round 1, from θ_sent0
    now1 = [p.detach().clone() for p in model.parameters()]
    worker.sync()  # merge: θ ← reply1 + (θ_now − θ_sent0); Δ1 = θ_sent0 − θ_now, base = reply's version 1
    delta1, base1 = server.submissions[1]
    assert base1 == 1
    for d, s, n in zip(delta1, sent0, now1, strict=True):
        assert torch.equal(d, s - n)  # exactly round 1's progress
    merged = [r + (n - s) for r, n, s in zip(reply1, now1, sent0, strict=True)]
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), merged, strict=True))
    # θ_start is the reply; the next Δ is θ_reply − θ_merged = progress of the next round, as computed
    step_by(model, 0.2)  # round 2, from θ_merged
    now2 = [p.detach().clone() for p in model.parameters()]
    worker.sync()
    delta2, base2 = server.submissions[2]
    assert base2 == 2 and all(torch.equal(d, m - n) for d, m, n in zip(delta2, merged, now2, strict=True))


def test_overlap_refuses_a_round_end_before_the_reply():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    worker = DiLoCoWorker(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        KnownReplies(model.parameters(), [list(model.parameters())]),
        0,
        1,
        overlap=True,
    )
    worker.pull()
    worker.send(worker.outgoing())  # sent; its reply never received
    with pytest.raises(RuntimeError, match="has not arrived"):
        worker.outgoing()


def test_overlap_worker_state_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    replies = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]
    server = KnownReplies(model.parameters(), replies)
    worker = DiLoCoWorker(model, torch.optim.SGD(model.parameters(), lr=0.1), server, 0, 1, overlap=True)
    worker.pull()
    step_by(model, 0.1)
    worker.sync()
    state = worker.state_dict()
    params = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1)
    model2 = torch.nn.Linear(3, 1)
    server2 = KnownReplies(model2.parameters(), [r for r in replies[1:]])
    worker2 = DiLoCoWorker(model2, torch.optim.SGD(model2.parameters(), lr=0.1), server2, 0, 1, overlap=True)
    with torch.no_grad():
        for p, q in zip(model2.parameters(), params, strict=True):
            p.copy_(q)
    worker2.load_state_dict(state)
    for m in (model, model2):
        step_by(m, 0.3)
    worker.sync()
    worker2.sync()
    for (a, va), (b, vb) in zip(server.submissions[1:], server2.submissions, strict=True):
        assert va == vb and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="overlap"):
        DiLoCoWorker(model2, torch.optim.SGD(model2.parameters(), lr=0.1), server2, 0, 1).load_state_dict(
            state
        )


# -- downlink: the encoded change since the worker's copy --------------------------------------------


class MovingServer:
    """Answers every call with a copy of θ, which moves by ``step`` each submit (no optimizer)."""

    def __init__(self, theta: list[torch.Tensor], step: list[torch.Tensor]) -> None:
        self.theta, self.step, self.global_params = theta, step, theta

    def dispatch(self, worker_id):
        from heloco.aggregator import Update

        return Update(params=[t.clone() for t in self.theta], version=0)

    def submit(self, worker_id, pseudo_grads, base_version):
        from heloco.aggregator import Update

        torch._foreach_add_(self.theta, self.step)
        return Update(params=[t.clone() for t in self.theta], version=base_version + 1)


def test_delta_downlink_fp32_is_the_parameters_and_charges_4n_plus_header():
    from heloco.transport import DeltaDownlink

    gen = torch.Generator().manual_seed(0)
    server = MovingServer([torch.randn(5, 3, generator=gen)], [torch.randn(5, 3, generator=gen)])
    link = DeltaDownlink(InProcessTransport(server), make_codec("fp32"), server.theta)
    assert torch.equal(link.dispatch(0).params[0], server.theta[0])  # the first answer: θ itself
    assert link.reply_nbytes(0) == 4 * 15
    for _ in range(3):
        got = link.submit(0, [torch.zeros(5, 3)], 0).params[0]
        torch.testing.assert_close(got, server.theta[0], rtol=0, atol=1e-6)  # h + (θ − h): rounding only
        assert link.reply_nbytes(0) == HEADER_BYTES + 4 * 15


def test_int8_delta_downlink_keeps_the_worker_within_one_messages_error():
    """int8 (blocks of 4) changes: after every reply the worker is within half a scale of the last
    change's block maxima, never a sum of the errors; fewer bytes than fp32 parameters."""
    from heloco.transport import DeltaDownlink

    gen = torch.Generator().manual_seed(1)
    theta = [torch.randn(64, generator=gen)]
    server = MovingServer(theta, [torch.full((64,), 0.01)])
    link = DeltaDownlink(InProcessTransport(server), make_codec("int8", block=4), theta)
    held = link.dispatch(0).params[0]
    for _ in range(20):
        change = server.theta[0] + server.step[0] - held  # what the next reply encodes
        bound = change.view(16, 4).abs().amax(1, keepdim=True) / 127 / 2 * (1 + 1e-5) + 1e-7
        held = link.submit(0, [torch.zeros(64)], 0).params[0]
        assert bool(((held - server.theta[0]).view(16, 4).abs() <= bound).all())
        assert torch.equal(held, link.held[0][0])  # the server's copy is exactly what the worker holds
        assert link.reply_nbytes(0) == HEADER_BYTES + 64 + 4 * 16 < 4 * 64
    state = link.state_dict()
    twin = copy.deepcopy(server)  # the same θ, for a resumed copy of the link
    resumed = DeltaDownlink(InProcessTransport(twin), make_codec("int8", block=4), twin.theta)
    resumed.load_state_dict(state)
    assert torch.equal(
        resumed.submit(0, [torch.zeros(64)], 0).params[0], link.submit(0, [torch.zeros(64)], 0).params[0]
    )
