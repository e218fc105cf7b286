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
