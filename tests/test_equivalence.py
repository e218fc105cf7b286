"""Sanity anchor: with H = 1 inner SGD step, outer SGD(lr 1, momentum 0) and a quorum of all K workers,
DiLoCo through the aggregator is exactly data-parallel SGD on the mean of the K workers' gradients:
Δ_i = lr·g_i, θ ← θ − mean_i Δ_i = θ − lr·mean_i g_i."""

import copy

import pytest
import torch
from torch import nn

from heloco.aggregator import AsyncAggregator
from heloco.optim import DelayedNesterov, HeLoCo

K, ROUNDS, INNER_LR = 3, 5, 0.1

# Outer optimizers that reduce to θ ← θ − mean Δ: SGD(lr 1, momentum 0); HeLoCo with μ = 0 (m ← G,
# θ ← θ − G; τ = 0 in a full quorum, so nothing is corrected); Delayed Nesterov with N = 1, β = 0.
OUTER = {
    "sgd": lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.0),
    "heloco": lambda p: HeLoCo(p, lr=1.0, momentum=0.0, correct_fresh=False),
    "delayed-nesterov": lambda p: DelayedNesterov(p, lr=1.0, momentum=0.0, buffer_size=1),
}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        [(torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)) for _ in range(K)]
        for _ in range(ROUNDS)
    ]


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def data_parallel_reference(model, data):
    """Plain SGD on the mean of the K per-worker gradients, one step per round."""
    opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    history = []
    for round_batches in data:
        grads = []
        for batch in round_batches:
            model.zero_grad()
            loss_fn(model, batch).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, gs in zip(model.parameters(), zip(*grads, strict=True), strict=True):
            p.grad = torch.stack(gs).mean(0)
        opt.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


@pytest.mark.parametrize(
    ("outer", "arrival_order"),
    [("sgd", (0, 1, 2)), ("sgd", (2, 0, 1)), ("heloco", (1, 2, 0)), ("delayed-nesterov", (2, 1, 0))],
)
def test_sync_diloco_h1_equals_data_parallel_sgd(outer, arrival_order):
    base = mlp()
    data = batches()
    reference = data_parallel_reference(copy.deepcopy(base), data)

    master = [p.detach().clone() for p in base.parameters()]
    agg = AsyncAggregator(master, OUTER[outer](master), num_workers=K, quorum=K)
    workers = [copy.deepcopy(base) for _ in range(K)]
    inner = [torch.optim.SGD(w.parameters(), lr=INNER_LR) for w in workers]
    updates = [agg.dispatch(i) for i in range(K)]

    for r, round_batches in enumerate(data):
        released = []
        for i in arrival_order:
            model, u = workers[i], updates[i]
            assert u.version == r
            with torch.no_grad():
                for p, t in zip(model.parameters(), u.params, strict=True):
                    p.copy_(t)
            start = [p.detach().clone() for p in model.parameters()]
            inner[i].zero_grad()
            loss_fn(model, round_batches[i]).backward()
            inner[i].step()
            pseudo_grads = [s - p.detach() for s, p in zip(start, model.parameters(), strict=True)]
            reply = agg.submit(i, pseudo_grads, u.version)
            updates[i] = reply
            released += reply.released
        # The last arrival completed the round and got the new params; the others dispatch again.
        assert sorted(released) == sorted(arrival_order[:-1])
        assert updates[arrival_order[-1]].applied
        for i in released:
            updates[i] = agg.dispatch(i)
        assert agg.version == r + 1
        for p, ref in zip(master, reference[r], strict=True):
            torch.testing.assert_close(p, ref, rtol=0, atol=1e-6)
        for u in updates:
            for t, ref in zip(u.params, reference[r], strict=True):
                torch.testing.assert_close(t, ref, rtol=0, atol=1e-6)
    # The model really moved, so the comparison above is not trivially satisfied.
    assert max((a - b).abs().max() for a, b in zip(master, base.parameters(), strict=True)) > 1e-2
