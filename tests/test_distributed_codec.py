"""Encoded payloads on the gloo wire, the emulated link and the background exchange of overlapped
rounds, in one process (the server's threads and a worker's transport on a TCPStore on 127.0.0.1).
Bad messages are hand-crafted and sent through the server's real receive path: each is refused with
an ERROR before the aggregator sees it, the global model stays as it was, and the connection goes on."""

import struct
import threading
import time

import pytest
import torch

from heloco.aggregator import AsyncAggregator
from heloco.codecs import ErrorFeedback, make_codec
from heloco.distributed.client import DistributedTransport
from heloco.distributed.link import EmulatedLink, link_seconds
from heloco.distributed.overlap import BackgroundExchange
from heloco.distributed.server import DistributedServer
from heloco.distributed.wire import FlatMessage, MessageHeader, MessageKind
from heloco.transport import InProcessTransport, TransportError
from heloco.worker import DiLoCoWorker
from tests.conftest import tcp_store

pytestmark = pytest.mark.timeout(120)

SHAPES = [(300,), (20, 30)]


def _masters():
    torch.manual_seed(0)
    return [torch.randn(s) for s in SHAPES]


def _delta(scale=0.01):
    return [torch.full(s, scale) for s in SHAPES]


@pytest.fixture
def served():
    """A server with an int8 codec over an SGD(lr=1) aggregator, and worker 1's connected transport."""
    store = tcp_store()
    params = _masters()
    aggregator = AsyncAggregator(params, torch.optim.SGD(params, lr=1.0), 2)
    server = DistributedServer(aggregator, store, 2, timeout=30, connect_timeout=30, codec=make_codec("int8"))
    server.start()
    worker = DistributedTransport(
        1, _masters(), store, timeout=30, connect_timeout=30, codec=make_codec("int8")
    )
    yield aggregator, server, worker, store
    worker.leave()
    server.leave(0)
    server.join(timeout=30)


# -- the wire format ----------------------------------------------------------------------------------


def test_an_encoded_payload_travels_as_its_own_bytes_not_padded_to_fp32():
    codec = make_codec("int8")
    msg = FlatMessage(SHAPES, codec=codec)
    plain = FlatMessage(SHAPES)
    message = codec.encode(_delta(), out=msg.encoded_region())
    data = msg.pack_encoded(MessageHeader(MessageKind.SUBMIT, 1, version=3), message.payload)
    assert data.numel() == msg.payload_offset + message.nbytes
    assert message.nbytes < plain.payload_nbytes / 3.5  # int8: ~3.9× fewer than the fp32 tensors
    header = msg.read_header()
    assert header.encoded and header.encoded_nbytes == message.nbytes and header.version == 3
    assert msg.message_nbytes(header) == data.numel()
    out = [torch.empty(s) for s in SHAPES]
    codec.decode(msg.encoded_payload(header), out)
    assert all(torch.allclose(o, d, atol=1e-4) for o, d in zip(out, _delta(), strict=True))
    # without a codec the layout is what it always was (the HELLO of an fp32 run is unchanged)
    assert "codec" not in plain.layout() and plain.buffer.numel() == plain.nbytes
    assert "int8" in plain.layout_mismatch(msg.layout())


def test_read_header_refuses_an_encoded_payload_it_cannot_hold():
    msg = FlatMessage(SHAPES, codec=make_codec("int8"))
    msg.pack_encoded(MessageHeader(MessageKind.SUBMIT, 1), torch.ones(40, dtype=torch.uint8))
    struct.pack_into("<Q", msg._mv, 36, msg.encoded_capacity + 1)  # payload size field: one too many
    with pytest.raises(ValueError, match=r"encoded payload of \d+ bytes refused"):
        msg.read_header()
    plain = FlatMessage(SHAPES)
    plain.buffer[:64] = msg.buffer[:64]
    struct.pack_into("<Q", plain._mv, 36, 40)
    with pytest.raises(ValueError, match="no codec"):
        plain.read_header()
    with pytest.raises(ValueError, match="does not fit"):
        msg.pack_encoded(
            MessageHeader(MessageKind.SUBMIT, 1), torch.ones(msg.encoded_capacity + 1, dtype=torch.uint8)
        )


# -- the server's receive path --------------------------------------------------------------------------


def test_encoded_submissions_are_decoded_before_the_outer_step(served):
    aggregator, server, worker, _ = served
    before = [p.clone() for p in aggregator.global_params]
    update = worker.dispatch(1)
    codec = make_codec("int8")
    message = codec.encode(_delta(0.5), out=worker.encoded_buffer())  # straight into the send buffer
    update = worker.submit_encoded(1, message, update.version)
    assert update.applied and update.version == 1
    for p, b in zip(aggregator.global_params, before, strict=True):  # SGD(lr=1): θ − Δ
        assert torch.allclose(p, b - 0.5, atol=1e-3)
    stats = server.worker_stats()[1]
    assert stats["bytes_in"] < 2 * FlatMessage(SHAPES).payload_offset + message.nbytes  # hello + submit


def _bad_payloads():
    int8 = make_codec("int8")
    good = int8.encode(_delta()).payload
    nan_scale = good.clone()
    nan_scale[32:36] = torch.tensor(list(struct.pack("<f", float("nan"))), dtype=torch.uint8)
    minus_128 = good.clone()
    minus_128[-1] = 128  # int8 −128: the encoder never writes it
    other_codec = good.clone()
    other_codec[5] = make_codec("bf16").codec_id  # the header's codec id
    return {
        "truncated": (good[:-7].clone(), "truncated"),
        "garbage": (torch.randint(0, 256, (200,), dtype=torch.uint8), "magic"),
        "other codec": (other_codec, "encoded by codec"),
        "too large to send": (make_codec("bf16").encode(_delta()).payload, "does not fit"),
        "other shapes": (int8.encode([torch.ones(300), torch.ones(30, 20)]).payload, "shapes"),
        "non-finite scale": (nan_scale, "NaN|Inf|finite"),
        "out of range value": (minus_128, "-128"),
    }


@pytest.mark.parametrize("case", list(_bad_payloads()))
def test_a_malformed_encoded_message_is_refused_before_anything_changes(served, case):
    aggregator, _, worker, _ = served
    payload, error = _bad_payloads()[case]
    before = [p.clone() for p in aggregator.global_params]
    version = worker.dispatch(1).version
    with pytest.raises(ValueError, match=error):
        worker.submit_encoded(1, payload, version)
    assert aggregator.version == version
    assert all(torch.equal(p, b) for p, b in zip(aggregator.global_params, before, strict=True))
    update = worker.submit_encoded(1, make_codec("int8").encode(_delta()), version)  # still connected
    assert update.applied and aggregator.version == version + 1


@pytest.mark.parametrize("worker_codec", [make_codec("int8", block=64), None])
def test_a_worker_with_another_codec_is_refused_at_hello(worker_codec):
    store = tcp_store()
    params = _masters()
    aggregator = AsyncAggregator(params, torch.optim.SGD(params, lr=1.0), 2)
    server = DistributedServer(aggregator, store, 2, timeout=30, connect_timeout=30, codec=make_codec("int8"))
    server.start()
    with pytest.raises(ValueError, match=r"layout mismatch.*codec"):
        DistributedTransport(1, _masters(), store, timeout=30, connect_timeout=30, codec=worker_codec)
    server.leave(0)
    server.join(timeout=30)
    assert server.worker_stats()[1]["state"] == "dead" and aggregator.version == 0


# -- a worker with error feedback over the wire, the emulated link and the background exchange ----------


def test_error_feedback_worker_over_the_wire_with_an_emulated_link_and_overlap(served):
    aggregator, _, transport, _ = served
    slept = []
    link = EmulatedLink(
        transport, uplink_bandwidth=1e6, uplink_latency=0.01, downlink_bandwidth=2e6, sleep=slept.append
    )
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    module = torch.nn.Module()
    module.a, module.b = params
    optimizer = torch.optim.SGD(params, lr=0.1)
    worker = DiLoCoWorker(
        module, optimizer, link, 1, 2, codec=ErrorFeedback(make_codec("int8")), overlap=True
    )
    worker.pull()
    exchange = BackgroundExchange(worker)
    for _ in range(4):
        for _ in range(2):  # a round: two inner steps pulling every parameter towards +1
            optimizer.zero_grad()
            sum(((p - 1) ** 2).sum() for p in params).backward()
            optimizer.step()
        if exchange.pending:
            worker.receive(exchange.wait())
        outgoing = worker.outgoing()
        assert outgoing.message is not None and outgoing.nbytes == make_codec("int8").max_nbytes(SHAPES)
        exchange.start(outgoing)
    worker.receive(exchange.wait())
    assert aggregator.version == 4
    n = sum(torch.Size(s).numel() for s in SHAPES)
    reply = link_seconds(4 * n, 2e6, 0.0)
    assert sum(slept) == pytest.approx(0.01 + reply + 4 * (link_seconds(outgoing.nbytes, 1e6, 0.01) + reply))
    assert link.uplink_bytes == 4 * outgoing.nbytes  # the encoded bytes, not fp32
    assert link.downlink_bytes == 5 * 4 * n  # a dispatch and four replies in fp32
    assert all(p.mean() > 0.05 for p in aggregator.global_params)  # moved towards +1 from ~0


def test_a_failure_in_the_background_exchange_surfaces_in_the_worker_thread():
    class Broken:
        writes_into_out = False

        def dispatch(self, worker_id):
            from heloco.aggregator import Update

            return Update(params=[torch.zeros(3)], version=0)

        def submit(self, worker_id, pseudo_grads, base_version):
            time.sleep(0.05)
            raise TransportError("lost the connection to the heloco server")

    module = torch.nn.Linear(3, 1, bias=False)
    module.weight.data = torch.zeros(3)
    worker = DiLoCoWorker(module, torch.optim.SGD(module.parameters(), lr=0.1), Broken(), 0, 1, overlap=True)
    worker.pull()
    exchange = BackgroundExchange(worker)
    exchange.start(worker.outgoing())
    assert exchange.pending and worker.awaiting_reply
    started = time.monotonic()
    with pytest.raises(TransportError, match="lost the connection"):
        exchange.wait()
    assert time.monotonic() - started < 5 and not exchange.pending
    assert not any(t.name.startswith("heloco-exchange") for t in threading.enumerate())


def test_in_process_transport_with_a_codec_decodes_for_the_server_rank(served):
    aggregator, server, _, _ = served
    local = InProcessTransport(server, codec=make_codec("int8"), params_like=_masters())
    version = local.dispatch(0).version
    update = local.submit_encoded(0, make_codec("int8").encode(_delta(0.25)), version)
    assert update.applied and aggregator.version == version + 1
