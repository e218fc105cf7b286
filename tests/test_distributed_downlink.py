"""``downlink: delta`` on the gloo wire: the server keeps each worker's copy of the parameters and
replies with the encoded change since it; the worker adds it to its own copy, so both hold the same
bits. In one process (the server's threads and a worker's transport on a TCPStore on 127.0.0.1);
bad replies come from a hand-made server end and go through the worker's real receive path."""

import datetime
import math
import struct
import threading

import pytest
import torch
from torch.distributed import ProcessGroupGloo

from heloco.aggregator import AsyncAggregator
from heloco.codecs import make_codec
from heloco.distributed.client import DistributedTransport
from heloco.distributed.downlink import MalformedReply, ReplyDecoder, ReplyEncoder
from heloco.distributed.link import EmulatedLink
from heloco.distributed.overlap import BackgroundExchange
from heloco.distributed.server import DistributedServer
from heloco.distributed.setup import local_transport
from heloco.distributed.wire import (
    MESSAGE_TAG,
    SERVER_PAIR_RANK,
    WORKER_PAIR_RANK,
    FlatMessage,
    MessageHeader,
    MessageKind,
    pair_store,
)
from heloco.transport import DeltaDownlink
from heloco.worker import DiLoCoWorker
from tests.conftest import tcp_store

pytestmark = pytest.mark.timeout(120)

SHAPES = [(300,), (20, 30)]
FP32_NBYTES = 4 * sum(math.prod(s) for s in SHAPES)
INT8_NBYTES = make_codec("int8").max_nbytes(SHAPES)


def _masters():
    torch.manual_seed(0)
    return [torch.randn(s) for s in SHAPES]


def _delta(seed):
    g = torch.Generator().manual_seed(seed)
    return [0.05 * torch.randn(s, generator=g) for s in SHAPES]


def _server(store, aggregator, **kwargs):
    options = dict(timeout=30, connect_timeout=30, downlink_codec=make_codec("int8"))
    return DistributedServer(aggregator, store, 2, **{**options, **kwargs}).start()


def _worker(store, **kwargs):
    options = dict(timeout=30, connect_timeout=30, downlink_codec=make_codec("int8"))
    return DistributedTransport(1, _masters(), store, **{**options, **kwargs})


@pytest.fixture
def served():
    """A delta-downlink server (int8) over an SGD(lr=1) aggregator, and worker 1's transport."""
    store = tcp_store()
    params = _masters()
    aggregator = AsyncAggregator(params, torch.optim.SGD(params, lr=1.0), 2)
    server = _server(store, aggregator, rejoin_timeout=30)
    worker = _worker(store)
    yield aggregator, server, worker, store
    if worker.connected:
        worker.leave()
    server.stop()


def test_first_reply_is_full_then_each_reply_is_the_encoded_change(served):
    aggregator, server, worker, _ = served
    update = worker.dispatch(1)
    assert worker.reply_nbytes(1) == FP32_NBYTES
    assert all(torch.equal(p, g) for p, g in zip(update.params, aggregator.global_params, strict=True))
    held = server._slots[1].replies.held
    assert all(torch.equal(p, h) for p, h in zip(update.params, held, strict=True))
    for seed in range(4):
        before = [h.clone() for h in held]
        received = worker.bytes_received
        update = worker.submit(1, _delta(seed), update.version)
        theta = aggregator.global_params
        # the worker's copy is the server's, bit for bit ...
        assert all(torch.equal(p, h) for p, h in zip(update.params, held, strict=True))
        # ... within one int8 message's error of θ (half a quantisation step of the change's block)
        largest_change = max(float((t - b).abs().max()) for t, b in zip(theta, before, strict=True))
        error = max(float((p - t).abs().max()) for p, t in zip(update.params, theta, strict=True))
        assert 0 < error <= largest_change / 254 * 1.001
        # and the reply on the wire is exactly the codec's message after the header and info region
        assert worker.reply_nbytes(1) == INT8_NBYTES < FP32_NBYTES / 3.5
        assert worker.bytes_received - received == worker.recv_message.payload_offset + INT8_NBYTES
    assert server.worker_stats()[1]["bytes_out"] < 2 * 4160 + FP32_NBYTES + 4 * (4160 + INT8_NBYTES)


def test_the_emulated_link_charges_the_encoded_replies(served):
    _, _, worker, _ = served
    slept = []
    link = EmulatedLink(worker, downlink_bandwidth=1e6, sleep=slept.append)
    update = link.dispatch(1)
    for seed in range(3):
        update = link.submit(1, _delta(seed), update.version)
    assert link.downlink_bytes == FP32_NBYTES + 3 * INT8_NBYTES
    assert sum(slept) == pytest.approx(link.downlink_bytes / 1e6)


def test_an_overlapped_worker_trains_on_delta_replies(served):
    aggregator, server, transport, _ = served
    link = EmulatedLink(transport, downlink_bandwidth=1e9, sleep=lambda s: None)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    module = torch.nn.Module()
    module.a, module.b = params
    optimizer = torch.optim.SGD(params, lr=0.1)
    worker = DiLoCoWorker(module, optimizer, link, 1, 2, overlap=True)
    worker.pull()
    exchange = BackgroundExchange(worker)
    for _ in range(4):
        for _ in range(2):  # a round: two inner steps pulling every parameter towards +1
            optimizer.zero_grad()
            sum(((p - 1) ** 2).sum() for p in params).backward()
            optimizer.step()
        if exchange.pending:
            worker.receive(exchange.wait())
        exchange.start(worker.outgoing())
    worker.receive(exchange.wait())
    assert aggregator.version == 4
    assert link.downlink_bytes == FP32_NBYTES + 4 * INT8_NBYTES
    held = server._slots[1].replies.held
    assert all(torch.equal(w, h) for w, h in zip(transport.replies.held, held, strict=True))
    assert all(p.mean() > 0.05 for p in aggregator.global_params)  # moved towards +1 from ~0


def test_a_rejoined_worker_starts_again_from_a_full_reply(served):
    aggregator, server, worker, store = served
    update = worker.submit(1, _delta(0), worker.dispatch(1).version)
    assert worker.reply_nbytes() == INT8_NBYTES
    worker._pg = None  # the process is gone: its end of the pair group closes
    again = _worker(store)
    update = again.dispatch(1)
    assert again.incarnation == 2 and again.reply_nbytes() == FP32_NBYTES
    assert all(torch.equal(p, g) for p, g in zip(update.params, aggregator.global_params, strict=True))
    update = again.submit(1, _delta(1), update.version)
    assert again.reply_nbytes() == INT8_NBYTES
    held = server._slots[1].replies.held
    assert all(torch.equal(p, h) for p, h in zip(update.params, held, strict=True))
    again.leave()


@pytest.mark.parametrize(
    ("server_side", "worker_side", "match"),
    [
        (
            {},
            {"downlink_codec": None},
            r"downlink: peer 'params', here 'delta' \(downlink is 'params' or 'delta'",
        ),
        ({"downlink_codec": None}, {}, r"downlink: peer 'delta', here 'params'"),
        ({}, {"downlink_codec": make_codec("int8", block=64)}, r"downlink_codec: peer .*'block': 64"),
    ],
)
def test_the_downlink_is_agreed_at_hello(server_side, worker_side, match):
    store = tcp_store()
    params = _masters()
    aggregator = AsyncAggregator(params, torch.optim.SGD(params, lr=1.0), 2)
    server = _server(store, aggregator, **server_side)
    with pytest.raises(ValueError, match=r"layout mismatch.*" + match):
        _worker(store, **worker_side)
    server.leave(0)
    server.join(timeout=30)
    assert server.worker_stats()[1]["state"] == "dead" and aggregator.version == 0


def test_the_server_ranks_own_worker_gets_delta_replies_in_process(served):
    aggregator, server, _, _ = served
    local = local_transport(server, _masters(), None, make_codec("int8"))
    assert isinstance(local, DeltaDownlink)
    update = local.dispatch(0)
    assert local.reply_nbytes(0) == FP32_NBYTES
    update = local.submit(0, _delta(0), update.version)
    assert local.reply_nbytes(0) == INT8_NBYTES and aggregator.version == 1


# -- bad replies, from a hand-made server end ----------------------------------------------------------


def _bad_reply_server(store, reply):
    """Worker 1's first incarnation's server end: ACK to HELLO, the full parameters to DISPATCH, then
    ``reply(msg)`` (the bytes to send) to the next request."""
    msg = FlatMessage(SHAPES, reply_codec=make_codec("int8"))
    own = store.clone()  # a thread's own store connection: the worker's rendezvous blocks on the other

    def serve():
        timeout = datetime.timedelta(seconds=30)
        pg = ProcessGroupGloo(pair_store(own, "heloco", 1, 1), SERVER_PAIR_RANK, 2, timeout)
        answers = [
            lambda: msg.pack(MessageHeader(MessageKind.ACK, 1)),
            lambda: msg.pack(MessageHeader(MessageKind.REPLY, 1), _masters()),
            lambda: reply(msg),
        ]
        for answer in answers:
            pg.recv([msg.buffer], WORKER_PAIR_RANK, MESSAGE_TAG).wait()
            pg.send([answer()], WORKER_PAIR_RANK, MESSAGE_TAG).wait()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _encoded_reply(payload):
    def reply(msg):
        return msg.pack_encoded(MessageHeader(MessageKind.REPLY, 1, version=1), payload)

    return reply


def _oversized(msg):
    data = msg.pack_encoded(MessageHeader(MessageKind.REPLY, 1), torch.ones(40, dtype=torch.uint8))
    struct.pack_into("<Q", msg._mv, 36, msg.reply_capacity + 1)  # the payload size field: one too many
    return data


def _bad_replies():
    int8 = make_codec("int8")
    good = int8.encode(_delta(0)).payload
    nan_scale = good.clone()
    nan_scale[32:36] = torch.tensor(list(struct.pack("<f", float("nan"))), dtype=torch.uint8)
    return {
        "truncated": (_encoded_reply(good[:-7].clone()), "truncated"),
        "garbage": (_encoded_reply(torch.randint(0, 256, (200,), dtype=torch.uint8)), "magic"),
        "non-finite": (_encoded_reply(nan_scale), "NaN|Inf|finite"),
        "other shapes": (
            _encoded_reply(int8.encode([torch.ones(300), torch.ones(30, 20)]).payload),
            "shapes",
        ),
        "oversized": (_oversized, r"encoded payload of \d+ bytes refused"),
    }


@pytest.mark.parametrize("case", list(_bad_replies()))
def test_a_bad_reply_is_refused_without_touching_the_workers_copy(case):
    reply, match = _bad_replies()[case]
    store = tcp_store()
    server = _bad_reply_server(store, reply)
    worker = _worker(store)
    update = worker.dispatch(1)
    held = [p.clone() for p in update.params]
    with pytest.raises(MalformedReply, match=match):
        worker.submit(1, _delta(1), update.version)
    assert all(torch.equal(p, h) for p, h in zip(update.params, held, strict=True))  # its copy, unchanged
    assert not worker.connected  # the copies no longer agree: a new connection starts from a full reply
    server.join(timeout=30)


def test_reply_decoder_refuses_a_change_before_any_full_reply_and_keeps_its_copy():
    codec = make_codec("int8")
    decoder = ReplyDecoder(make_codec("int8"), SHAPES)
    with pytest.raises(MalformedReply, match="before any full reply"):
        decoder.apply(codec.encode(_delta(0)).payload)
    encoder = ReplyEncoder(make_codec("int8"), SHAPES)
    assert encoder.wants_full
    with pytest.raises(ValueError, match="must be full"):
        encoder.encode(_masters(), torch.empty(INT8_NBYTES, dtype=torch.uint8))
    encoder.sent_full(_masters())
    decoder.take_full(_masters())
    theta = [m + d for m, d in zip(_masters(), _delta(3), strict=True)]
    message = encoder.encode(theta, torch.empty(INT8_NBYTES, dtype=torch.uint8))
    assert message.nbytes == INT8_NBYTES
    held = decoder.apply(message.payload)
    assert all(torch.equal(h, e) for h, e in zip(held, encoder.held, strict=True))
    bad = message.payload.clone()
    bad[32:36] = torch.tensor(list(struct.pack("<f", float("inf"))), dtype=torch.uint8)
    before = [h.clone() for h in held]
    with pytest.raises(MalformedReply):
        decoder.apply(bad)
    assert all(torch.equal(h, b) for h, b in zip(decoder.held, before, strict=True))
