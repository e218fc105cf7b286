"""DiLoCoWorker against a hand-written server, so the worker's own logic is checked in isolation."""

from types import SimpleNamespace

import pytest
import torch

from heloco.worker import DiLoCoWorker


class RecordingServer:
    """Outer SGD with lr 1 and no momentum: θ ← θ − Δ, so after a round θ equals the worker's end point."""

    def __init__(self, params, quorum=1):
        self.params = [p.detach().clone() for p in params]
        self.version = 0
        self.quorum = quorum
        self.pending = []
        self.submissions = []

    def dispatch(self, worker_id):
        return SimpleNamespace(params=[p.clone() for p in self.params], version=self.version)

    def submit(self, worker_id, pseudo_grads, base_version):
        self.submissions.append((worker_id, [g.clone() for g in pseudo_grads], base_version))
        self.pending.append([g.clone() for g in pseudo_grads])
        if len(self.pending) < self.quorum:
            return SimpleNamespace(params=None, version=self.version)
        mean = [torch.stack(gs).mean(0) for gs in zip(*self.pending, strict=True)]
        self.pending = []
        for p, g in zip(self.params, mean, strict=True):
            p -= g
        self.version += 1
        return SimpleNamespace(params=[p.clone() for p in self.params], version=self.version)


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt


def train_steps(model, opt, n):
    for i in range(n):
        x = torch.full((2, 3), float(i + 1))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_sync_every_h_steps_with_the_right_delta():
    model, opt = make()
    server = RecordingServer(model.parameters())
    start = [p.detach().clone() for p in model.parameters()]
    with DiLoCoWorker(model, opt, server, worker_id=0, sync_every=3) as worker:
        train_steps(model, opt, 2)
        assert server.submissions == []
        # third step ends the round: Δ = start − end
        x = torch.full((2, 3), 3.0)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        assert len(server.submissions) == 1
        wid, delta, base = server.submissions[0]
        assert (wid, base) == (0, 0)
        end_expected = [s - d for s, d in zip(start, delta, strict=True)]
        # lr-1 server: the new global equals the worker's end point, which the worker loaded
        for p, e in zip(model.parameters(), end_expected, strict=True):
            torch.testing.assert_close(p.detach(), e)
        assert worker.base_version == 1 and worker.local_step == 3 and worker.steps_since_sync == 0


def test_hooks_removed_on_exit():
    model, opt = make()
    server = RecordingServer(model.parameters())
    with DiLoCoWorker(model, opt, server, worker_id=0, sync_every=1):
        train_steps(model, opt, 1)
    train_steps(model, opt, 3)
    assert len(server.submissions) == 1


def test_pending_quorum_blocks_stepping_until_pull():
    model, opt = make()
    server = RecordingServer(model.parameters(), quorum=2)
    model_b, opt_b = make(1)
    with (
        DiLoCoWorker(model, opt, server, 0, sync_every=1) as a,
        DiLoCoWorker(model_b, opt_b, server, 1, 1) as b,
    ):
        train_steps(model, opt, 1)
        assert a.waiting
        with pytest.raises(RuntimeError, match="pending"):
            train_steps(model, opt, 1)
        opt.zero_grad()
        train_steps(model_b, opt_b, 1)
        assert not b.waiting and b.base_version == 1
        a.pull()
        assert not a.waiting and a.base_version == 1
        for pa, pb in zip(model.parameters(), model_b.parameters(), strict=True):
            assert torch.equal(pa, pb)


def test_accelerate_style_wrapper_is_unwrapped():
    model, opt = make()
    wrapped = SimpleNamespace(optimizer=opt)
    server = RecordingServer(model.parameters())
    with DiLoCoWorker(model, wrapped, server, 0, sync_every=2):
        train_steps(model, opt, 4)
    assert len(server.submissions) == 2


def test_state_dict_round_trip_mid_round():
    model, opt = make()
    server = RecordingServer(model.parameters())
    with DiLoCoWorker(model, opt, server, 0, sync_every=5) as worker:
        train_steps(model, opt, 2)
        state = worker.state_dict()
    model2, opt2 = make(7)
    worker2 = DiLoCoWorker(model2, opt2, server, 0, sync_every=1)
    worker2.load_state_dict(state)
    assert worker2.sync_every == 5 and worker2.steps_since_sync == 2 and worker2.base_version == 0
    model2.load_state_dict(model.state_dict())
    for d1, d2 in zip(worker.pseudo_gradient(), worker2.pseudo_gradient(), strict=True):
        assert torch.equal(d1, d2)


def test_bad_arguments():
    model, opt = make()
    with pytest.raises(ValueError, match="sync_every"):
        DiLoCoWorker(model, opt, None, 0, sync_every=0)
    with pytest.raises(TypeError, match="inner_optimizer"):
        DiLoCoWorker(model, object(), None, 0, sync_every=1)


# -- Δ written straight into a transport's send buffers ----------------------------------------------


class WireServer:
    """RecordingServer behind a flat wire buffer: records the exact bytes each submit would send.

    With ``offer=True`` it exposes ``pseudo_grad_buffers()`` (the buffer's own tensors) the way
    ``DistributedTransport`` does; ``buffers`` may override what it offers.
    """

    def __init__(self, params, wire_dtype, offer, buffers=None):
        from heloco.distributed.wire import FlatMessage, MessageHeader, MessageKind

        self.server = RecordingServer(params)
        self.message = FlatMessage([p.shape for p in self.server.params], wire_dtype)
        self.header = lambda w, v: MessageHeader(MessageKind.SUBMIT, w, version=v)
        self.offered = buffers if buffers is not None else self.message.views
        if offer:
            self.pseudo_grad_buffers = lambda: list(self.offered)
        self.sent = []  # (bytes, whether the payload was already in place)
        self.submitted = []  # data_ptr() of each submitted tensor

    def dispatch(self, worker_id):
        return self.server.dispatch(worker_id)

    def submit(self, worker_id, pseudo_grads, base_version):
        in_place = self.message.holds(pseudo_grads)
        self.submitted.append([g.data_ptr() for g in pseudo_grads])
        data = self.message.pack(self.header(worker_id, base_version), pseudo_grads)
        self.sent.append((data.clone(), in_place))
        return self.server.submit(worker_id, self.message.views, base_version)


def two_layer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def run_rounds(model, opt, transport, rounds=3, sync_every=2):
    g = torch.Generator().manual_seed(11)
    with DiLoCoWorker(model, opt, transport, 0, sync_every=sync_every) as worker:
        for _ in range(rounds * sync_every):
            x = torch.randn(6, 5, generator=g)
            (model(x) - x[:, :3]).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    return worker


@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_delta_into_transport_buffers_sends_the_same_bytes(wire):
    model_a, opt_a = two_layer(3)
    model_b, opt_b = two_layer(3)
    plain = WireServer(model_a.parameters(), wire, offer=False)
    offered = WireServer(model_b.parameters(), wire, offer=True)
    run_rounds(model_a, opt_a, plain)
    run_rounds(model_b, opt_b, offered)
    assert len(plain.sent) == len(offered.sent) == 3
    for (bytes_a, in_place_a), (bytes_b, in_place_b) in zip(plain.sent, offered.sent, strict=True):
        assert not in_place_a and in_place_b  # the offered buffers were written, no copy when sent
        assert torch.equal(bytes_a, bytes_b)
        assert bytes_a.float().abs().sum() > 0  # real, non-zero Δ travelled
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_delta_in_transport_buffers_is_start_minus_now_exactly():
    model, opt = two_layer(5)
    server = WireServer(model.parameters(), torch.float32, offer=True)
    with DiLoCoWorker(model, opt, server, 0, sync_every=100) as worker:
        start = [p.detach().clone() for p in model.parameters()]
        run_rounds(model, opt, server, rounds=1, sync_every=3)  # no sync: only 3 of 100 steps
        delta = worker.pseudo_gradient()
        assert server.message.holds(delta)  # the offered buffers, not the worker's own
        for d, s, p in zip(delta, start, model.parameters(), strict=True):
            assert torch.equal(d, s - p.detach())


@pytest.mark.parametrize(
    "buffers",
    [
        lambda ps: [torch.empty_like(p) for p in ps][:-1],  # one tensor short
        lambda ps: [torch.empty(p.numel() + 1) for p in ps],  # wrong shapes
        lambda ps: [torch.empty_like(p, dtype=torch.int32) for p in ps],  # not floating point
        lambda ps: [torch.empty(p.shape[::-1]).t() for p in ps],  # not contiguous (2-d ones)
        lambda ps: [p.detach() for p in ps],  # the parameters themselves
    ],
    ids=["short", "shape", "dtype", "strided", "params"],
)
def test_unfit_transport_buffers_fall_back_to_the_workers_own(buffers):
    model_a, opt_a = two_layer(3)
    model_b, opt_b = two_layer(3)
    plain = WireServer(model_a.parameters(), torch.float32, offer=False)
    odd = WireServer(
        model_b.parameters(), torch.float32, offer=True, buffers=buffers(list(model_b.parameters()))
    )
    run_rounds(model_a, opt_a, plain)
    run_rounds(model_b, opt_b, odd)
    offered = {b.data_ptr() for b in odd.offered}
    assert odd.submitted and all(  # Δ went through the worker's own buffers, never the offered ones
        ptr not in offered for ptrs in odd.submitted for ptr in ptrs
    )
    assert [b for b, _ in plain.sent] and all(
        torch.equal(a, b) for (a, _), (b, _) in zip(plain.sent, odd.sent, strict=True)
    )
