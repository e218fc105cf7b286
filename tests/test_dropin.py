"""The outer optimizers as drop-ins for a minimal DiLoCo loop written with plain torch.

K = 2 workers each copy the global model, run H AdamW steps on their own data, and return
Δ = θ_global − θ_local, which is written into ``global_param.grad`` before ``outer.step()``.
"""

import copy

import pytest
import torch
from torch import nn

from heloco import optim as heloco_optim

K, H, ROUNDS = 2, 10, 12


def make_data(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One shared target function, worker-specific (non-IID) input distributions."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(8, 1, generator=gen)
    data = []
    for k in range(K):
        x = torch.randn(256, 8, generator=gen) + 2.0 * (k - 0.5)  # worker k sees shifted inputs
        y = torch.tanh(x @ w_true) + 0.01 * torch.randn(256, 1, generator=gen)
        data.append((x, y))
    return data


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def global_loss(model: nn.Module, data) -> float:
    with torch.no_grad():
        return sum(nn.functional.mse_loss(model(x), y).item() for x, y in data) / len(data)


def train_local(global_model: nn.Module, x: torch.Tensor, y: torch.Tensor, inner_state: dict | None):
    local = copy.deepcopy(global_model)
    inner = torch.optim.AdamW(local.parameters(), lr=1e-2, weight_decay=0.0)
    if inner_state is not None:  # the inner optimizer's state stays with the worker across rounds
        inner.load_state_dict(inner_state)
    for i in range(H):
        idx = slice((i * 32) % 256, (i * 32) % 256 + 32)
        loss = nn.functional.mse_loss(local(x[idx]), y[idx])
        inner.zero_grad()
        loss.backward()
        inner.step()
    return local, inner.state_dict()


def run_diloco(make_outer, mode: str, step_kwargs=None) -> tuple[float, float, torch.optim.Optimizer]:
    """mode "sync": average the K pseudo-gradients, one outer step per round.
    mode "arrivals": apply each worker's Δ on its own as it arrives; the k-th arrival of a round was
    computed from parameters that are k outer steps old (staleness k)."""
    data = make_data(1)
    model = make_model()
    outer = make_outer(model.parameters())
    inner_states: list[dict | None] = [None] * K
    start = global_loss(model, data)
    for _ in range(ROUNDS):
        locals_ = []
        for k, (x, y) in enumerate(data):
            local, inner_states[k] = train_local(model, x, y, inner_states[k])
            locals_.append(local)
        deltas = [
            [g.detach() - lp.detach() for g, lp in zip(model.parameters(), local.parameters(), strict=True)]
            for local in locals_
        ]
        if mode == "sync":
            for i, g in enumerate(model.parameters()):
                g.grad = torch.stack([d[i] for d in deltas]).mean(0)
            outer.step(**(step_kwargs or {}))
        else:
            for k, delta in enumerate(deltas):
                for g, d in zip(model.parameters(), delta, strict=True):
                    g.grad = d.clone()
                outer.step(staleness=k, **(step_kwargs or {}))
        outer.zero_grad()
    return start, global_loss(model, data), outer


@pytest.mark.parametrize(
    ("name", "make_outer", "mode"),
    [
        ("sgd-nesterov", lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True), "sync"),
        ("heloco-sync", lambda p: heloco_optim.HeLoCo(p, lr=0.7), "sync"),
        ("heloco-arrivals", lambda p: heloco_optim.HeLoCo(p, lr=0.35), "arrivals"),
        ("dn-arrivals", lambda p: heloco_optim.DelayedNesterov(p, lr=0.7, buffer_size=K), "arrivals"),
    ],
)
def test_outer_optimizer_trains_a_diloco_loop(name, make_outer, mode):
    start, end, outer = run_diloco(make_outer, mode)
    assert end < 0.1 * start, f"{name}: loss {start:.4f} -> {end:.4f}"
    if isinstance(outer, heloco_optim.HeLoCo):
        # plain step() (unknown staleness) and staleness 1 are corrected; the stats say what happened
        assert outer.last_stats is not None
        assert outer.last_stats.num_blocks == 4


def test_every_heloco_variant_trains_the_loop():
    # The same loop, every HeLoCo variant: the correction must not break a working setup.
    for variant in ("full", "project", "none"):
        start, end, _ = run_diloco(
            lambda p, v=variant: heloco_optim.HeLoCo(p, lr=0.35, variant=v), "arrivals"
        )
        assert end < 0.1 * start, f"{variant}: {start:.4f} -> {end:.4f}"


def test_delayed_nesterov_on_arrivals_matches_sync_nesterov():
    # With N = K, c = 0 and all K workers starting from the same global model, DN applied arrival by
    # arrival is the synchronous DiLoCo Nesterov step on the mean pseudo-gradient.
    _, dn_end, _ = run_diloco(lambda p: heloco_optim.DelayedNesterov(p, lr=0.7, buffer_size=K), "arrivals")
    _, sgd_end, _ = run_diloco(lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True), "sync")
    assert dn_end == pytest.approx(sgd_end, rel=1e-4)
