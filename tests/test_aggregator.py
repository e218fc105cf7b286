"""AsyncAggregator: versions and staleness, weighting/dropping, quorum, look-ahead, validation before
mutation, dtype conversion, thread safety and state_dict round trips. Expected values are by hand."""

import copy
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heloco.aggregator import AsyncAggregator, Update, staleness_weight
from heloco.optim import DelayedNesterov, HeLoCo

SHAPES = [(2,), (2, 2)]
HELOCO_KW = {
    "lr": 0.5,
    "momentum": 0.9,
    "keep_threshold": 0.5,
    "shrink_strength": 2.0,
    "shrink_max": 1.0,
    "reorient_strength": 0.5,
    "kappa": 1.0,
    "reorient_schedule": "printed",
    "correct_fresh": False,
}


def masters(values=(0.0, 0.0)):
    """Two fp32 master tensors of shapes (2,) and (2, 2), filled with the given values."""
    return [torch.full(s, float(v)) for s, v in zip(SHAPES, values, strict=True)]


def delta(a, b=None, dtype=torch.float32):
    """A pseudo-gradient: (2,) filled with a, (2, 2) filled with b (default a)."""
    b = a if b is None else b
    return [torch.full(SHAPES[0], float(a), dtype=dtype), torch.full(SHAPES[1], float(b), dtype=dtype)]


def make(num_workers=3, lr=1.0, momentum=0.0, nesterov=False, opt_cls=None, **kw):
    params = masters()
    if opt_cls is None:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)
    else:
        opt = opt_cls(params, lr=lr, momentum=momentum)
    return params, opt, AsyncAggregator(params, opt, num_workers, **kw)


def frozen(agg):
    """Bit-exact snapshot of everything an aggregator holds (params, optimizer state, bookkeeping)."""
    return copy.deepcopy(agg.state_dict())


def assert_bit_identical(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert (
            torch.equal(a.view(torch.int32), b.view(torch.int32))
            if a.dtype == torch.float32
            else torch.equal(a, b)
        )
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_bit_identical(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_bit_identical(x, y)
    else:
        assert a == b


def assert_params(tensors, first, second):
    assert torch.equal(tensors[0], torch.full(SHAPES[0], float(first)))
    assert torch.equal(tensors[1], torch.full(SHAPES[1], float(second)))


class _Stats:
    def as_dict(self):
        return {"blocks_kept": 1.0, "mean_cosine": -0.25}


class KeywordSGD(torch.optim.Optimizer):
    """Stand-in for heloco's outer optimizers: ``step(closure=None, *, staleness=None, weight=None)``.

    Heavy-ball m ← βm + w·g, θ ← θ − lr·m, keeping m in state["momentum_buffer"]. Records each call's
    keywords and the p.grad it saw (to check the aggregator did not pre-scale), and exposes last_stats.
    """

    def __init__(self, params, lr=1.0, momentum=0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.calls = []
        self.last_stats = None

    @torch.no_grad()
    def step(self, closure=None, *, staleness=None, weight=None):
        grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        self.calls.append({"staleness": staleness, "weight": weight, "grads": grads})
        w = 1.0 if weight is None else weight
        for group in self.param_groups:
            for p in group["params"]:
                m = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                m.mul_(group["momentum"]).add_(p.grad, alpha=w)
                p.add_(m, alpha=-group["lr"])
        self.last_stats = _Stats()


class RefusingSGD(torch.optim.SGD):
    """SGD whose step raises before changing anything (as an optimizer refusing its input would),
    until ``refuse`` is set to False."""

    refuse = True

    def step(self, closure=None):
        if self.refuse:
            raise RuntimeError("boom")
        return super().step(closure)


class ExplodingSGD(torch.optim.SGD):
    """Completes a real SGD step (θ and momentum change), then fails. Nothing is rolled back."""

    def step(self, closure=None):
        super().step()
        self.state[self.param_groups[0]["params"][0]]["junk"] = torch.ones(1)
        self.param_groups[0]["lr"] = 123.0
        raise RuntimeError("boom")


# ---------------------------------------------------------------------------- staleness bookkeeping


def test_interleaved_arrivals_versions_and_staleness():
    params, _, agg = make(num_workers=3)
    for w in range(3):
        assert agg.dispatch(w).version == 0
    # Arrival sequence (quorum 1, every Δ applied, version += 1 each time):
    #   worker  base  server version at arrival  τ = version − base  new version  new base
    #     0      0              0                       0                1           1
    #     1      0              1                       1                2           2
    #     0      1              2                       1                3           3
    #     2      0              3                       3                4           4
    #     0      3              4                       1                5           5
    #     1      2              5                       3                6           6
    arrivals = [(0, 0, 0, 1), (1, 0, 1, 2), (0, 1, 1, 3), (2, 0, 3, 4), (0, 3, 1, 5), (1, 2, 3, 6)]
    total = 0.0
    for n, (worker, base, tau, new_version) in enumerate(arrivals, start=1):
        u = agg.submit(worker, delta(n, 10 * n), base)
        total += n
        assert (u.version, u.staleness, u.applied, u.dropped, u.weight, u.released) == (
            new_version,
            tau,
            True,
            False,
            1.0,
            [],
        )
        assert u.stats == {"staleness": float(tau), "weight": 1.0}
        assert agg.version == new_version
        # SGD lr 1, momentum 0: θ = −Σ Δ, and the submitter gets exactly the new globals.
        assert_params(params, -total, -10 * total)
        assert_params(u.params, -total, -10 * total)
    stats = agg.worker_stats()
    # worker 0: τ = 0, 1, 1; worker 1: τ = 1, 3; worker 2: τ = 3.
    assert stats[0] == {
        "worker": 0,
        "base_version": 5,
        "submissions": 3,
        "dropped": 0,
        "staleness_mean": 2 / 3,
        "staleness_max": 1,
        "staleness_last": 1,
        "pending": False,
    }
    assert stats[1]["base_version"] == 6 and stats[1]["submissions"] == 2
    assert (stats[1]["staleness_mean"], stats[1]["staleness_max"], stats[1]["staleness_last"]) == (2.0, 3, 3)
    assert stats[2]["base_version"] == 4 and stats[2]["staleness_mean"] == 3.0


def test_worker_stats_before_any_submission_and_dispatch_copies():
    params, _, agg = make(num_workers=2)
    assert agg.worker_stats()[1] == {
        "worker": 1,
        "base_version": None,
        "submissions": 0,
        "dropped": 0,
        "staleness_mean": 0.0,
        "staleness_max": None,
        "staleness_last": None,
        "pending": False,
    }
    u = agg.dispatch(1)
    assert isinstance(u, Update) and u.staleness == 0 and not u.applied and u.released == []
    u.params[0].fill_(7.0)  # a copy: the masters are untouched
    assert_params(params, 0, 0)
    assert agg.worker_stats()[1]["base_version"] == 0


# ---------------------------------------------------------------------------- dropping and weighting


def test_drop_when_staleness_exceeds_max():
    params, _, agg = make(num_workers=3, momentum=0.9, max_staleness=1)
    agg.submit(0, delta(1), 0)  # v1
    agg.submit(1, delta(2), 0)  # τ = 1 = max_staleness: applied, v2
    assert agg.version == 2
    before = frozen(agg)
    u = agg.submit(2, delta(5), 0)  # τ = 2 > 1: dropped
    assert u.dropped and not u.applied and u.staleness == 2 and u.weight == 0.0 and u.version == 2
    for t, p in zip(u.params, params, strict=True):  # the worker restarts from the current params
        assert torch.equal(t, p)
    after = frozen(agg)
    assert_bit_identical(after["global_params"], before["global_params"])
    assert_bit_identical(after["optimizer"], before["optimizer"])
    assert after["version"] == 2
    stats = agg.worker_stats()[2]
    assert (stats["dropped"], stats["submissions"], stats["staleness_last"], stats["base_version"]) == (
        1,
        1,
        2,
        2,
    )


def test_staleness_weights_by_hand():
    assert staleness_weight(7, None) == 1.0
    assert staleness_weight(3, "poly", a=0.5) == 0.5  # (1 + 3)^(−1/2)
    assert staleness_weight(8, "poly", a=0.5) == pytest.approx(1 / 3)  # 9^(−1/2)
    assert staleness_weight(0, "poly", a=0.5) == 1.0
    assert staleness_weight(4, "hinge", a=0.5, b=4) == 1.0  # τ ≤ b
    assert staleness_weight(6, "hinge", a=0.5, b=4) == 0.5  # 1 / (0.5·2 + 1)
    assert staleness_weight(10, "hinge", a=0.25, b=2) == pytest.approx(1 / 3)  # 1 / (0.25·8 + 1)
    with pytest.raises(ValueError, match="staleness_weighting must be one of"):
        staleness_weight(1, "linear")


@pytest.mark.parametrize(
    ("weighting", "a", "b", "expected"),
    [("poly", 0.5, 4, 0.5), ("hinge", 0.5, 1, 0.5)],  # τ = 3: 4^(−1/2); 1 / (0.5·(3 − 1) + 1)
)
def test_weighting_prescales_for_plain_optimizer(weighting, a, b, expected):
    params, _, agg = make(num_workers=2, staleness_weighting=weighting, staleness_a=a, staleness_b=b)
    for _ in range(3):
        agg.submit(0, delta(0), agg.version)
    u = agg.submit(1, delta(2, 4), 0)  # τ = 3
    assert (u.staleness, u.weight) == (3, expected)
    assert u.stats == {"staleness": 3.0, "weight": expected}
    assert_params(params, -2 * expected, -4 * expected)


def test_keyword_optimizer_gets_staleness_and_weight_unscaled_and_stats():
    params, opt, agg = make(num_workers=2, opt_cls=KeywordSGD, staleness_weighting="poly")
    agg.submit(0, delta(0), 0)
    agg.submit(0, delta(0), 1)
    agg.submit(0, delta(0), 2)
    u = agg.submit(1, delta(2, 4), 0)  # τ = 3, w = 0.5
    call = opt.calls[-1]
    assert (call["staleness"], call["weight"]) == (3, 0.5)
    assert_params(call["grads"], 2, 4)  # not pre-scaled: the optimizer applies the weight itself
    assert_params(params, -1, -2)
    assert u.stats == {
        "staleness": 3.0,
        "weight": 0.5,
        "correction/blocks_kept": 1.0,
        "correction/mean_cosine": -0.25,
    }
    assert all(p.grad is None for p in params)


def test_keyword_optimizer_without_weighting_gets_no_weight():
    params, opt, agg = make(num_workers=2, opt_cls=KeywordSGD)
    agg.submit(0, delta(0), 0)
    agg.submit(1, delta(2, 4), 0)  # τ = 1
    assert (opt.calls[-1]["staleness"], opt.calls[-1]["weight"]) == (1, None)
    assert_params(params, -2, -4)


# ---------------------------------------------------------------------------- quorum


def test_quorum_k_is_one_sync_diloco_nesterov_step_on_the_mean():
    eta, beta = 0.7, 0.9
    params, _, agg = make(num_workers=3, quorum=3, lr=eta, momentum=beta, nesterov=True)
    theta = [p.clone() for p in params]
    v = None
    rounds = [[delta(1, 2), delta(2, 0), delta(6, -5)], [delta(-3, 1), delta(0, 0), delta(0.5, 2)]]
    for r, deltas in enumerate(rounds):
        for w in range(3):
            assert agg.dispatch(w).version == r
        u0 = agg.submit(0, deltas[0], r)
        u1 = agg.submit(2, deltas[2], r)
        for u in (u0, u1):
            assert u.params is None and not u.applied and u.version == r and u.staleness == 0
        assert agg.pending_workers == [0, 2]
        u = agg.submit(1, deltas[1], r)
        assert u.applied and u.version == r + 1 and u.released == [0, 2]
        assert u.stats == {"staleness": 0.0, "weight": 1.0, "round_max_staleness": 0.0}
        # PyTorch Nesterov by hand on g = mean of the three Δ: v ← βv + g; θ ← θ − η(g + βv).
        g = [(a + b + c) / 3 for a, b, c in zip(*deltas, strict=True)]
        v = g if v is None else [beta * vi + gi for vi, gi in zip(v, g, strict=True)]
        theta = [t - eta * (gi + beta * vi) for t, gi, vi in zip(theta, g, v, strict=True)]
        for p, t, s in zip(params, theta, u.params, strict=True):
            torch.testing.assert_close(p, t, rtol=0, atol=1e-6)
            assert torch.equal(s, p)
    assert agg.version == 2


def test_first_quorum_round_by_hand():
    # Δ = (1, 2), (2, 0), (6, −5) → g = (3, −1); first Nesterov step: v = g, θ = −0.7·(1 + 0.9)·g.
    params, _, agg = make(num_workers=3, quorum=3, lr=0.7, momentum=0.9, nesterov=True)
    for w, d in enumerate([delta(1, 2), delta(2, 0), delta(6, -5)]):
        agg.submit(w, d, 0)
    torch.testing.assert_close(params[0], torch.full((2,), -3.99))
    torch.testing.assert_close(params[1], torch.full((2, 2), 1.33))


def test_released_workers_and_pending_dispatch():
    params, _, agg = make(num_workers=3, quorum=2)
    u = agg.submit(0, delta(2), 0)
    assert u.params is None and u.version == 0 and agg.pending_workers == [0]
    assert agg.dispatch(0).params is None  # still waiting for the round
    assert agg.worker_stats()[0]["pending"]
    u = agg.submit(2, delta(4), 0)
    assert u.applied and u.released == [0] and u.version == 1
    assert_params(params, -3, -3)  # mean of 2 and 4
    assert agg.pending_workers == []
    d = agg.dispatch(0)
    assert d.version == 1 and agg.worker_stats()[0]["base_version"] == 1
    assert_params(d.params, -3, -3)


def test_second_submission_in_open_round_is_rejected():
    _, _, agg = make(num_workers=3, quorum=2)
    agg.submit(1, delta(1), 0)
    before = frozen(agg)
    with pytest.raises(ValueError, match="worker 1 already submitted to the open quorum round"):
        agg.submit(1, delta(3), 0)
    assert_bit_identical(frozen(agg), before)


def test_quorum_weighted_mean_and_round_staleness_passed_to_keyword_optimizer():
    params, opt, agg = make(num_workers=3, quorum=2, opt_cls=KeywordSGD, staleness_weighting="poly")
    agg.submit(0, delta(0), 0)
    agg.submit(1, delta(0), 0)  # round 1 done: v1
    agg.submit(0, delta(0), 1)
    agg.submit(1, delta(0), 1)  # v2
    agg.submit(0, delta(0), 2)
    agg.submit(1, delta(0), 2)  # v3
    u = agg.submit(2, delta(4, 8), 0)  # τ = 3, w = 0.5: pending, buffered as 0.5·Δ
    assert u.params is None and u.weight == 0.5
    u = agg.submit(0, delta(2, 2), 3)  # τ = 0, w = 1
    # mean of the weighted Δ: ((2, 4) + (2, 2)) / 2 = (2, 3); pre-scaled, so weight is not passed.
    assert (opt.calls[-1]["staleness"], opt.calls[-1]["weight"]) == (3, None)
    assert_params(opt.calls[-1]["grads"], 2, 3)
    assert u.released == [2] and u.stats["round_max_staleness"] == 3.0
    assert_params(params, -2, -3)


# ---------------------------------------------------------------------------- look-ahead


def test_lookahead_dispatch_by_hand():
    a, b = torch.zeros(2), torch.zeros(3)
    opt = torch.optim.SGD([{"params": [a], "momentum": 0.9}, {"params": [b], "momentum": 0.0}], lr=0.5)
    agg = AsyncAggregator([a, b], opt, num_workers=2, lookahead=True)

    def d(x, y):
        return [torch.tensor(x), torch.full((3,), y)]

    # SGD (η = 0.5, β = 0.9 on a; no momentum on b): m ← βm + Δ; θ ← θ − η m.
    u = agg.submit(0, d([1.0, 2.0], 1.0), 0)  # τ = 0: m = (1, 2), a = (−0.5, −1)
    torch.testing.assert_close(u.params[0], torch.tensor([-0.5, -1.0]))  # τ̂₀ = 0: no extrapolation
    u = agg.submit(1, d([2.0, 0.0], 1.0), 0)  # τ = 1: m = (2.9, 1.8), a = (−1.95, −1.9)
    torch.testing.assert_close(a, torch.tensor([-1.95, -1.9]))
    # τ̂₁ = 1: a − η·τ̂·β·m = (−1.95, −1.9) − 0.45·(2.9, 1.8) = (−3.255, −2.71); b has no momentum.
    torch.testing.assert_close(u.params[0], torch.tensor([-3.255, -2.71]))
    torch.testing.assert_close(u.params[1], torch.full((3,), -1.0))
    torch.testing.assert_close(agg.dispatch(1).params[0], torch.tensor([-3.255, -2.71]))
    torch.testing.assert_close(agg.dispatch(0).params[0], torch.tensor([-1.95, -1.9]))  # τ̂₀ still 0
    u = agg.submit(0, d([0.0, 1.0], 0.0), 1)  # τ = 1, τ̂₀ = 0.5: m = (2.61, 2.62), a = (−3.255, −3.21)
    torch.testing.assert_close(a, torch.tensor([-3.255, -3.21]))  # the masters are not extrapolated
    # a − 0.5·0.5·0.9·m = (−3.255 − 0.58725, −3.21 − 0.5895)
    torch.testing.assert_close(u.params[0], torch.tensor([-3.84225, -3.7995]))
    assert u.version == 3


def test_lookahead_with_drop_returns_extrapolated_fresh_params():
    params, _, agg = make(num_workers=2, lr=1.0, momentum=0.5, max_staleness=0, lookahead=True)
    agg.submit(0, delta(2), 0)  # m = 2, θ = −2
    u = agg.submit(1, delta(9), 0)  # τ = 1 > 0: dropped; τ̂₁ = 1 → θ − 1·1·0.5·2 = −3
    assert u.dropped
    assert_params(u.params, -3, -3)
    assert_params(params, -2, -2)


@pytest.mark.parametrize(
    "make_opt",
    [lambda p: torch.optim.Adam(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.0)],
    ids=["adam", "sgd-no-momentum"],
)
def test_lookahead_needs_momentum(make_opt):
    params = masters()
    with pytest.raises(ValueError, match="extrapolates along the outer momentum"):
        AsyncAggregator(params, make_opt(params), 2, lookahead=True)


# ---------------------------------------------------------------------------- validation before mutation


def _bad_inputs():
    nan = delta(1)
    nan[1][0, 1] = float("nan")
    inf = delta(1)
    inf[0][1] = float("-inf")
    return [
        ("wrong-count", 0, [torch.zeros(2)], 1, r"pseudo_grads has 1 tensors, the global model has 2"),
        (
            "wrong-shape",
            0,
            [torch.zeros(2), torch.zeros(3)],
            1,
            r"pseudo_grads\[1\] has shape \(3,\), expected \(2, 2\)",
        ),
        ("not-a-list", 0, torch.zeros(2), 1, r"pseudo_grads must be a list of 2 tensors"),
        (
            "int-dtype",
            0,
            [torch.zeros(2), torch.zeros(2, 2, dtype=torch.int64)],
            1,
            r"pseudo_grads\[1\] has dtype",
        ),
        ("nan", 0, nan, 1, r"pseudo_grads\[1\] contains NaN or Inf"),
        ("inf", 0, inf, 1, r"pseudo_grads\[0\] contains NaN or Inf"),
        ("worker-too-big", 3, delta(1), 1, r"worker_id must be an int in \[0, 3\), got 3"),
        ("worker-negative", -1, delta(1), 1, r"worker_id must be an int in \[0, 3\), got -1"),
        ("worker-str", "0", delta(1), 1, r"worker_id must be an int in \[0, 3\), got '0'"),
        ("worker-bool", True, delta(1), 1, r"worker_id must be an int in \[0, 3\)"),
        ("base-newer", 0, delta(1), 2, r"base_version 2 is newer than the server version 1"),
        ("base-negative", 0, delta(1), -1, r"base_version must be an int >= 0"),
    ]


@pytest.mark.parametrize("outer", ["sgd", "heloco", "dn"])
@pytest.mark.parametrize(
    ("worker", "grads", "base", "message"), [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()]
)
def test_rejections_leave_everything_bit_identical(worker, grads, base, message, outer):
    params = masters()
    agg = AsyncAggregator(params, OUTER[outer](params), 3, quorum=2)
    agg.submit(0, delta(1, 2), 0)
    agg.submit(1, delta(3, -1), 0)  # v1, momentum state exists
    agg.submit(2, delta(0.5, 0.25), 1)  # pending in the open round
    before = frozen(agg)
    stats_before = agg.worker_stats()
    with pytest.raises(ValueError, match=message):
        agg.submit(worker, grads, base)
    assert_bit_identical(frozen(agg), before)
    assert agg.worker_stats() == stats_before
    assert all(p.grad is None for p in params)
    # the aggregator still works afterwards, and the pending Δ was kept: mean of (0.5, 0.25) and (1.5, 1.75)
    u = agg.submit(0, delta(1.5, 1.75), 1)
    assert u.applied and u.released == [2]


@pytest.mark.parametrize(
    ("worker", "grads", "base", "message"), [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()]
)
def test_async_heloco_rejections_leave_params_momentum_and_version_bit_identical(
    worker, grads, base, message
):
    """The recipes' HeLoCo setting (quorum 1, arrival weight, look-ahead dispatch), after two
    corrected steps: a rejected Δ changes neither θ, nor the momentum, nor the version."""
    params = masters()
    opt = HeLoCo(params, **HELOCO_KW)
    agg = AsyncAggregator(params, opt, 3, arrival_weight=3**-0.5, dispatch="lookahead")
    agg.submit(0, delta(1, 2), 0)
    agg.submit(1, delta(-3, 1), 0)  # τ = 1: corrected against the momentum
    assert agg.version == 2 and opt.last_stats is not None
    before = frozen(agg)
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in params]
    if "newer" in message:  # the table's versions are one behind this aggregator's
        base, message = 3, r"base_version 3 is newer than the server version 2"
    with pytest.raises(ValueError, match=message):
        agg.submit(worker, grads, base)
    assert_bit_identical(frozen(agg), before)
    assert_bit_identical([opt.state[p]["momentum_buffer"] for p in params], momentum)
    assert agg.version == 2 and all(p.grad is None for p in params)


def test_outer_step_that_raises_changes_no_bookkeeping_and_the_round_recovers():
    params = masters((1.0, 2.0))
    opt = RefusingSGD(params, lr=0.5, momentum=0.9)
    agg = AsyncAggregator(params, opt, 2, quorum=2)
    agg.submit(0, delta(1), 0)  # pending
    before = frozen(agg)
    with pytest.raises(RuntimeError, match="boom"):
        agg.submit(1, delta(3), 0)  # completes the round; the step raises before changing anything
    assert_bit_identical(frozen(agg), before)
    assert not opt.state
    assert agg.pending_workers == [0] and agg.version == 0
    assert all(p.grad is None for p in params)
    assert agg.worker_stats()[1]["submissions"] == 0

    opt.refuse = False  # the same submission now completes the still-open round
    u = agg.submit(1, delta(3), 0)  # mean Δ = 2: m = 2, θ = (1, 2) − 0.5·2 = (0, 1)
    assert u.applied and u.released == [0] and u.version == 1
    assert_params(params, 0, 1)


def test_an_outer_step_failing_midway_is_not_rolled_back_but_the_round_stays_open():
    """Validate, then mutate: no rollback copies. The aggregator's bookkeeping is untouched by a
    failing step; what the optimizer itself changed before raising stays."""
    params = masters((1.0, 2.0))
    opt = ExplodingSGD(params, lr=0.5, momentum=0.9)
    agg = AsyncAggregator(params, opt, 2, quorum=2)
    agg.submit(0, delta(1), 0)
    with pytest.raises(RuntimeError, match="boom"):
        agg.submit(1, delta(3), 0)
    assert agg.pending_workers == [0] and agg.version == 0
    assert agg.worker_stats()[1]["submissions"] == 0
    assert all(p.grad is None for p in params)
    assert_params(params, 0, 1)  # the SGD step ran before the failure


# ---------------------------------------------------------------------------- construction errors


def test_params_must_be_exactly_the_optimizer_tensors_any_order():
    params = masters()
    opt = torch.optim.SGD(params, lr=1.0)
    agg = AsyncAggregator(reversed(params), opt, 1)  # any order, any iterable; Δ follows this order
    agg.submit(0, [torch.full((2, 2), 3.0), torch.full((2,), 5.0)], 0)
    assert_params(params, -5, -3)
    with pytest.raises(ValueError, match="1 of the 3 global_params are not in the optimizer"):
        AsyncAggregator([*params, torch.zeros(1)], opt, 1)
    with pytest.raises(ValueError, match="1 of the optimizer's 2 tensors are not in global_params"):
        AsyncAggregator(params[:1], opt, 1)
    with pytest.raises(ValueError, match="same tensor more than once"):
        AsyncAggregator([params[0], params[0], params[1]], opt, 1)
    with pytest.raises(ValueError, match="global_params is empty"):
        AsyncAggregator([], opt, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_workers": 0}, r"num_workers must be an int >= 1"),
        ({"quorum": 0}, r"quorum must be an int in \[1, num_workers=3\], got 0"),
        ({"quorum": 4}, r"quorum must be an int in \[1, num_workers=3\], got 4"),
        ({"staleness_weighting": "linear"}, r"staleness_weighting must be one of \(None, 'poly', 'hinge'\)"),
        ({"staleness_a": -1.0}, r"staleness_a must be a finite number >= 0"),
        ({"staleness_b": float("nan")}, r"staleness_b must be a finite number >= 0"),
        ({"max_staleness": -1}, r"max_staleness must be None or an int >= 0"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs, message):
    params = masters()
    opt = torch.optim.SGD(params, lr=1.0)
    args = {"num_workers": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        AsyncAggregator(params, opt, **args)


def test_staleness_weighting_accepts_none_string():
    _, _, agg = make(staleness_weighting="none")
    assert agg.staleness_weighting is None


# ---------------------------------------------------------------------------- dtypes


def test_bf16_and_fp64_pseudo_grads_are_converted_into_fp32_masters():
    params, _, agg = make(num_workers=1)
    agg.submit(0, delta(0.5, -1.25, dtype=torch.bfloat16), 0)
    agg.submit(0, delta(0.25, 0.125, dtype=torch.float64), 1)
    assert all(p.dtype == torch.float32 for p in params)
    assert_params(params, -0.75, 1.125)
    u = agg.dispatch(0)
    assert all(t.dtype == torch.float32 for t in u.params)


def test_huge_finite_pseudo_grad_is_not_mistaken_for_inf():
    # ‖Δ‖ overflows fp32 (2·(1e30)² > 3.4e38) although every element is finite.
    params, _, agg = make(num_workers=1)
    agg.submit(0, delta(1e30, 0, dtype=torch.bfloat16), 0)
    assert torch.isfinite(params[0]).all() and params[0][0] < -9e29


def test_fp64_value_that_overflows_fp32_is_rejected():
    _, _, agg = make(num_workers=1)
    with pytest.raises(
        ValueError, match=r"pseudo_grads\[0\] contains NaN or Inf \(after conversion to torch.float32\)"
    ):
        agg.submit(0, delta(1e300, 0, dtype=torch.float64), 0)


# ---------------------------------------------------------------------------- threads


def test_concurrent_submissions_lose_no_update():
    workers, rounds = 4, 30
    params, _, agg = make(num_workers=workers)
    start = threading.Barrier(workers)
    errors = []

    def run(w):
        try:
            start.wait()
            u = agg.dispatch(w)
            for r in range(rounds):
                u = agg.submit(w, delta(w * 100 + r, 1), u.version)
                assert u.applied
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert agg.version == workers * rounds
    expected = sum(w * 100 + r for w in range(workers) for r in range(rounds))  # integers: exact in fp32
    assert_params(params, -expected, -workers * rounds)
    assert [s["submissions"] for s in agg.worker_stats()] == [rounds] * workers


# ---------------------------------------------------------------------------- state_dict


def _run(agg, script):
    """Apply (worker, Δ value) arrivals, each worker submitting from its latest params' version."""
    out = []
    for w, value in script:
        base = agg.worker_stats()[w]["base_version"]
        u = agg.submit(w, delta(value, -value / 2), 0 if base is None else base)
        if u.params is None:
            out.append((u.version, u.staleness, u.released))
        else:
            out.append((u.version, u.staleness, u.released, [t.clone() for t in u.params]))
        for r in u.released:
            agg.dispatch(r)
    return out


OUTER = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, nesterov=True),
    "heloco": lambda p: HeLoCo(p, **HELOCO_KW),
    "dn": lambda p: DelayedNesterov(p, lr=0.3, momentum=0.9, buffer_size=2),
}


def _fresh(values=(9.0, -9.0), outer="sgd", **kw):
    params = masters(values)
    opt = OUTER[outer](params)
    kw = {"quorum": 2, "staleness_weighting": "poly", "lookahead": True, **kw}
    return params, AsyncAggregator(params, opt, 3, **kw)


@pytest.mark.parametrize(
    ("outer", "through_checkpoint"), [("sgd", False), ("sgd", True), ("heloco", True), ("dn", True)]
)
def test_state_dict_round_trip_mid_round_continues_identically(tmp_path, outer, through_checkpoint):
    params_a, agg_a = _fresh((0.0, 0.0), outer=outer)
    for w in range(3):
        agg_a.dispatch(w)
    _run(agg_a, [(0, 1.0), (1, 2.0), (2, 3.0), (0, -1.0), (1, 0.5), (2, 4.0), (1, 1.5)])
    assert agg_a.pending_workers == [1]
    sd = agg_a.state_dict()
    if through_checkpoint:
        from heloco.checkpoint import load_state, save_state

        save_state(tmp_path, "aggregator", sd)
        sd = load_state(tmp_path, "aggregator")
    params_b, agg_b = _fresh(outer=outer)
    agg_b.load_state_dict(sd)
    assert agg_b.version == agg_a.version and agg_b.pending_workers == [1]
    assert agg_b.worker_stats() == agg_a.worker_stats()
    rest = [(0, 2.0), (1, -3.0), (2, 1.5), (0, 0.25), (1, 1.0), (0, 2.0)]
    out_a, out_b = _run(agg_a, rest), _run(agg_b, rest)
    assert_bit_identical(out_a, out_b)
    assert_bit_identical(params_a, params_b)
    assert_bit_identical(agg_a.state_dict(), agg_b.state_dict())


def test_state_dict_is_a_snapshot():
    _, agg = _fresh((1.0, 1.0))
    sd = agg.state_dict()
    agg.submit(0, delta(1), 0)
    agg.submit(1, delta(1), 0)
    assert_params(sd["global_params"], 1, 1)
    assert sd["version"] == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.update(num_workers=4), r"saved with num_workers=4, this aggregator has 3"),
        (lambda sd: sd["global_params"].pop(), r"state_dict\['global_params'\] has 1 tensors"),
        (
            lambda sd: sd["pending"].update(workers=[2, 0], staleness=[0, 0], weights=[1.0, 1.0]),
            r"2 pending submissions, quorum is 2",
        ),
        (lambda sd: sd["workers"][1].update(base_version=99), r"base_version'\]=99 is outside \[0, 1\]"),
        (lambda sd: sd.pop("optimizer"), r"no 'optimizer' entry"),
    ],
)
def test_load_state_dict_validates_before_changing_anything(edit, message):
    _, agg_a = _fresh((0.0, 0.0))
    _run(agg_a, [(0, 1.0), (1, 2.0), (2, 3.0)])
    sd = agg_a.state_dict()
    edit(sd)
    _, agg_b = _fresh()
    agg_b.submit(1, delta(1), 0)
    before = frozen(agg_b)
    with pytest.raises(ValueError, match=message):
        agg_b.load_state_dict(sd)
    assert_bit_identical(frozen(agg_b), before)


# ---------------------------------------------------------------------------- property test


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.integers(0, 2), min_size=1, max_size=25),
    max_staleness=st.one_of(st.none(), st.integers(0, 3)),
)
def test_async_bookkeeping_matches_reference_model(arrivals, max_staleness):
    """Any arrival order: τ, drops, versions and θ = −Σ(applied Δ) match a plain-Python model."""
    params, _, agg = make(num_workers=3, max_staleness=max_staleness)
    version, base, applied_sum = 0, [0, 0, 0], 0.0
    for n, w in enumerate(arrivals, start=1):
        tau = version - base[w]
        drop = max_staleness is not None and tau > max_staleness
        u = agg.submit(w, delta(n), base[w])
        if not drop:
            version += 1
            applied_sum += n
        base[w] = version
        assert (u.staleness, u.dropped, u.applied, u.version) == (tau, drop, not drop, version)
    assert agg.version == version
    assert_params(params, -applied_sum, -applied_sum)
    assert [s["base_version"] for s in agg.worker_stats()] == [
        b if arrivals.count(i) else None for i, b in enumerate(base)
    ]


# ---------------------------------------------------------------------------- heloco's outer optimizers


def test_heloco_through_aggregator_equals_direct_steps_with_staleness_and_weight():
    """Aggregator + HeLoCo == HeLoCo.step(staleness=τ, weight=w) by hand on the raw Δ, bit for bit."""
    params = masters()
    opt = HeLoCo(params, **HELOCO_KW)
    agg = AsyncAggregator(params, opt, 3, staleness_weighting="poly")
    ref = masters()
    ref_opt = HeLoCo(ref, **HELOCO_KW)
    # (worker, base version, Δ): τ = 0, 1, 2, 1; later Δ disagree with the momentum on some blocks.
    arrivals = [(0, 0, delta(1, 2)), (1, 0, delta(-1, 0.5)), (2, 0, delta(2, -3)), (0, 2, delta(0.5, -1))]
    corrected = 0.0
    for worker, base, d in arrivals:
        tau = agg.version - base
        w = (1 + tau) ** -0.5
        u = agg.submit(worker, d, base)
        for p, g in zip(ref, d, strict=True):
            p.grad = g.clone()
        ref_opt.step(staleness=tau, weight=w)
        assert_bit_identical(list(params), ref)
        assert (u.staleness, u.weight) == (tau, w)
        if tau == 0:
            assert ref_opt.last_stats is None and not any(k.startswith("correction/") for k in u.stats)
        else:
            expected = {f"correction/{k}": v for k, v in ref_opt.last_stats.as_dict().items()}
            assert {k: v for k, v in u.stats.items() if k.startswith("correction/")} == expected
            corrected += (
                expected["correction/frac_blocks_shrunk"] + expected["correction/frac_blocks_reoriented"]
            )
    assert corrected > 0  # the correction really acted on some blocks


def test_lookahead_with_heloco_ema_momentum_by_hand():
    params = masters()
    opt = HeLoCo(params, **{**HELOCO_KW, "variant": "none"})
    agg = AsyncAggregator(params, opt, 2, lookahead=True)
    # EMA-Nesterov, η = 0.5, μ = 0.9: m ← 0.9m + 0.1Δ; θ ← θ − 0.5(Δ + 0.9m).
    agg.submit(0, delta(1), 0)  # m = 0.1, θ = −0.5·1.09 = −0.545
    u = agg.submit(1, delta(2), 0)  # τ = 1: m = 0.29, θ = −0.545 − 0.5·2.261 = −1.6755
    torch.testing.assert_close(params[0], torch.full((2,), -1.6755))
    # τ̂₁ = 1: θ − η·τ̂·μ·m = −1.6755 − 0.5·1·0.9·0.29 = −1.806
    torch.testing.assert_close(u.params[0], torch.full((2,), -1.806))
    torch.testing.assert_close(u.params[1], torch.full((2, 2), -1.806))


def test_async_delayed_nesterov_matches_sync_quorum_nesterov():
    """DN with N = K (activation 0) over K arrivals of the same Δ == one sync Nesterov step on it."""
    eta, beta = 0.7, 0.9
    p_async = masters((1.0, -1.0))
    agg_async = AsyncAggregator(p_async, DelayedNesterov(p_async, lr=eta, momentum=beta, buffer_size=3), 3)
    p_sync = masters((1.0, -1.0))
    opt_sync = torch.optim.SGD(p_sync, lr=eta, momentum=beta, nesterov=True)
    agg_sync = AsyncAggregator(p_sync, opt_sync, 3, quorum=3)
    for r, value in enumerate([1.0, -0.5, 2.0]):
        for w in range(3):
            agg_async.submit(w, delta(value, 2 * value), agg_async.version - w)  # τ = w, ignored by DN
            agg_sync.submit(w, delta(value, 2 * value), r)
        for a, b in zip(p_async, p_sync, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert agg_async.version == 9 and agg_sync.version == 3


def test_snapshot_is_a_copy_of_the_current_globals():
    import torch

    from heloco.aggregator import AsyncAggregator

    params = [torch.zeros(2)]
    agg = AsyncAggregator(params, torch.optim.SGD(params, lr=1.0), num_workers=1)
    agg.dispatch(0)
    agg.submit(0, [torch.tensor([1.0, -2.0])], 0)
    copies, version = agg.snapshot()
    assert version == 1 and torch.equal(copies[0], torch.tensor([-1.0, 2.0]))
    copies[0].add_(5.0)
    assert torch.equal(agg.global_params[0], torch.tensor([-1.0, 2.0]))


# ---------------------------------------------------------------------------- out= (reply buffers)


def _bits(t):
    """A tensor's raw bits, so that −0.0 ≠ 0.0 and NaN payloads count."""
    return t.contiguous().view(torch.uint8)


@settings(max_examples=40, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(st.integers(0, 2), st.floats(-8, 8, allow_nan=False, width=32)), min_size=1, max_size=8
    ),
    out_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    lookahead=st.booleans(),
    max_staleness=st.sampled_from([None, 1]),
    quorum=st.sampled_from([1, 2]),
    outer=st.sampled_from(["sgd", "heloco"]),
    alias=st.booleans(),
)
def test_out_variants_write_exactly_the_allocating_values(
    arrivals, out_dtype, lookahead, max_staleness, quorum, outer, alias
):
    """Twin aggregators driven identically: the one answering into out= gives, bit for bit, the
    allocating twin's parameters converted to out's dtype, and the same everything else. With
    ``alias`` Δ arrives in ``out`` itself, as on the server (fp32: used in place as the scratch)."""
    kw = {"quorum": quorum, "lookahead": lookahead, "max_staleness": max_staleness, "outer": outer}
    _, agg_a = _fresh((0.5, -1.5), **kw)
    _, agg_b = _fresh((0.5, -1.5), **kw)
    out = [torch.full(s, 7.0, dtype=out_dtype) for s in SHAPES]
    base = {}
    for w in range(3):
        ua, ub = agg_a.dispatch(w), agg_b.dispatch(w, out=out)
        assert ub.params is out and ub.version == ua.version
        assert all(torch.equal(_bits(x.to(out_dtype)), _bits(y)) for x, y in zip(ua.params, out, strict=True))
        base[w] = ua.version
    for w, value in arrivals:
        if w in agg_a.pending_workers:
            continue
        grads = delta(value, -value / 3)
        if alias:  # Δ lands in the reply buffer (in its dtype); the twin gets the same values
            torch._foreach_copy_(out, grads)
            grads_a, grads_b = [t.clone() for t in out], out
        else:
            grads_a = grads_b = grads
        before = [t.clone() for t in out]
        ua = agg_a.submit(w, grads_a, base[w])
        ub = agg_b.submit(w, grads_b, base[w], out=out)
        assert (ua.version, ua.staleness, ua.applied, ua.dropped, ua.weight, ua.released, ua.stats) == (
            ub.version, ub.staleness, ub.applied, ub.dropped, ub.weight, ub.released, ub.stats
        )  # fmt: skip
        if ua.params is None:
            assert ub.params is None and all(
                torch.equal(_bits(x), _bits(y)) for x, y in zip(out, before, strict=True)
            )
        else:
            assert ub.params is out
            for x, y in zip(ua.params, out, strict=True):
                assert torch.equal(_bits(x.to(out_dtype)), _bits(y))
            base[w] = ua.version
        for r in ua.released:
            ra, rb = agg_a.dispatch(r), agg_b.dispatch(r, out=out)
            assert all(
                torch.equal(_bits(x.to(out_dtype)), _bits(y))
                for x, y in zip(ra.params, rb.params, strict=True)
            )
            base[r] = ra.version
    assert_bit_identical(agg_a.state_dict(), agg_b.state_dict())


def test_out_by_hand_with_lookahead_into_bf16():
    params, _, agg = make(num_workers=2, lr=1.0, momentum=0.5, lookahead=True)
    agg.submit(0, delta(2), 0)  # m = 2, θ = −2
    out = [torch.empty(s, dtype=torch.bfloat16) for s in SHAPES]
    u = agg.submit(1, delta(0.25), 0, out=out)  # τ = 1: m = 0.5·2 + 0.25 = 1.25, θ = −3.25; τ̂₁ = 1
    # reply: θ − η·τ̂·β·m = −3.25 − 1·1·0.5·1.25 = −3.875, exactly a bf16 number
    assert u.params is out and out[0].dtype == torch.bfloat16
    assert_params([t.float() for t in out], -3.875, -3.875)
    assert_params(params, -3.25, -3.25)


class GradRecordingSGD(torch.optim.SGD):
    """SGD that records which tensors each step read as ``p.grad`` (the aggregator sets them)."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.grads_read = []

    def step(self, closure=None):
        self.grads_read.append([p.grad for group in self.param_groups for p in group["params"]])
        return super().step(closure)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_submit_out_may_be_the_pseudo_grad_tensors_themselves(dtype):
    """A transport receives Δ and answers from one buffer: Δ is read before the reply overwrites it.
    In the masters' dtype the buffer itself is the step's p.grad (no copy into a scratch of its own)."""
    params, opt, agg = make(num_workers=2, lr=0.5, opt_cls=GradRecordingSGD)
    buf = delta(2.0, 4.0, dtype=dtype)
    ptrs = [t.data_ptr() for t in buf]
    u = agg.submit(0, buf, 0, out=buf)  # θ = 0 − 0.5·Δ
    assert u.params is buf
    assert_params([t.float() for t in buf], -1.0, -2.0)
    assert_params(params, -1.0, -2.0)
    (grads,) = opt.grads_read
    read_in_place = [g.data_ptr() for g in grads] == ptrs
    assert read_in_place == (dtype == torch.float32)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (lambda p: [torch.zeros(2)], r"out has 1 tensors, the global model has 2"),
        (lambda p: [torch.zeros(3), torch.zeros(2, 2)], r"out\[0\] has shape \(3,\), expected \(2,\)"),
        (lambda p: [torch.zeros(2, dtype=torch.int32), torch.zeros(2, 2)], r"out\[0\] has dtype torch.int32"),
        (lambda p: [torch.zeros(2), p[1]], r"out\[1\] shares memory with a global parameter"),
        (lambda p: torch.zeros(2), r"out must be a list of 2 tensors"),
    ],
    ids=["length", "shape", "dtype", "master", "tensor"],
)
def test_bad_out_is_refused_before_anything_changes(out, message):
    params, _, agg = make(num_workers=3, quorum=2, momentum=0.9)
    agg.submit(0, delta(1, 2), 0)
    agg.submit(1, delta(3, -1), 0)
    before = frozen(agg)
    with pytest.raises(ValueError, match=message):
        agg.submit(2, delta(1), 1, out=out(params))
    with pytest.raises(ValueError, match=message):
        agg.dispatch(2, out=out(params))
    assert_bit_identical(frozen(agg), before)


# ---------------------------------------------------------------------------- remove_worker


def test_removing_a_worker_completes_the_open_round_of_the_others():
    params, _, agg = make(num_workers=3, quorum=3)
    assert agg.submit(0, delta(1, 2), 0).params is None
    assert agg.submit(1, delta(3, 4), 0).params is None
    u = agg.remove_worker(2)  # worker 2 died mid-round: the round of 0 and 1 completes now
    assert u.params is None and u.applied and u.version == 1 and u.released == [0, 1]
    assert u.stats == {"round_max_staleness": 0.0}
    assert_params(params, -2, -3)  # θ = 0 − mean((1, 2), (3, 4))
    assert agg.removed_workers == [2] and agg.effective_quorum == 2 and agg.pending_workers == []
    assert_params(agg.dispatch(0).params, -2, -3)
    agg.dispatch(1)
    # the next rounds need the two live workers
    assert agg.submit(1, delta(2), 1).params is None
    u = agg.submit(0, delta(4), 1)
    assert u.applied and u.version == 2 and u.released == [1]
    assert_params(params, -5, -6)
    assert agg.remove_worker(2).applied is False  # idempotent


def test_removing_does_not_complete_a_round_that_still_lacks_live_workers():
    params, _, agg = make(num_workers=4, quorum=4)
    agg.submit(0, delta(1), 0)
    u = agg.remove_worker(3)
    assert not u.applied and u.released == [] and agg.effective_quorum == 3 and agg.pending_workers == [0]
    agg.submit(1, delta(2), 0)
    u = agg.submit(2, delta(6), 0)
    assert u.applied and u.released == [0, 1]
    assert_params(params, -3, -3)  # mean of 1, 2, 6


def test_a_removed_workers_received_delta_stays_in_its_round():
    params, _, agg = make(num_workers=3, quorum=3)
    agg.submit(0, delta(3), 0)
    agg.remove_worker(0)  # 0 is gone, but its Δ arrived in full: the round still waits for 1 and 2
    assert agg.effective_quorum == 3 and agg.pending_workers == [0]
    agg.submit(1, delta(6), 0)
    u = agg.submit(2, delta(9), 0)
    assert u.applied and u.released == [0, 1]
    assert_params(params, -6, -6)  # mean of 3, 6, 9
    assert agg.effective_quorum == 2  # from now on only 1 and 2 count


def test_removed_worker_cannot_submit_until_it_dispatches_again():
    params, _, agg = make(num_workers=2, quorum=2)
    agg.remove_worker(1)
    assert agg.effective_quorum == 1
    before = frozen(agg)
    with pytest.raises(ValueError, match="worker 1 was removed"):
        agg.submit(1, delta(1), 0)
    assert_bit_identical(frozen(agg), before)
    u = agg.submit(0, delta(2), 0)  # alone, worker 0 is a full round
    assert u.applied and u.version == 1
    assert_params(params, -2, -2)
    agg.dispatch(1)  # rejoined
    assert agg.removed_workers == [] and agg.effective_quorum == 2
    assert agg.submit(1, delta(1), 1).params is None


def test_remove_in_async_mode_changes_nothing_for_the_others():
    _, _, agg = make(num_workers=2)
    u = agg.remove_worker(1)
    assert not u.applied and agg.effective_quorum == 1
    assert agg.submit(0, delta(1), 0).applied
    with pytest.raises(ValueError, match=r"worker_id must be an int in \[0, 2\), got 2"):
        agg.remove_worker(2)


def test_failed_step_while_removing_leaves_the_round_open():
    params = masters((1.0, 2.0))
    opt = RefusingSGD(params, lr=0.5, momentum=0.9)
    agg = AsyncAggregator(params, opt, 3, quorum=3)
    agg.submit(0, delta(1), 0)
    agg.submit(1, delta(3), 0)
    before = frozen(agg)
    with pytest.raises(RuntimeError, match="boom"):
        agg.remove_worker(2)
    assert_bit_identical(frozen(agg), before)
    assert agg.removed_workers == [] and agg.pending_workers == [0, 1] and agg.effective_quorum == 3


def test_load_state_dict_counts_every_worker_again():
    _, _, agg = make(num_workers=3, quorum=3)
    sd = agg.state_dict()
    agg.remove_worker(2)
    agg.load_state_dict(sd)
    assert agg.removed_workers == [] and agg.effective_quorum == 3


# ---------------------------------------------------------------------------- dispatch and arrival weight


def test_fixed_lookahead_dispatch_by_hand():
    """dispatch="lookahead": every worker starts from θ − η·μ·m, and its Δ is applied to θ itself.

    EMA step, η = 1, μ = 0.5, θ0 = 0, no correction:
      both dispatch θ0 (m = 0: nothing to extrapolate);
      worker 0, Δ = 2 (τ = 0): m1 = 0.5·2 = 1, θ1 = 0 − (2 + 0.5·1) = −2.5; it gets θ1 − 1·0.5·m1 = −3;
      worker 1, Δ = 1 (τ = 1): m2 = 0.5·1 + 0.5·1 = 1, θ2 = −2.5 − (1 + 0.5) = −4 (Δ goes to θ, not to
      the point worker 1 started from); it gets θ2 − 0.5 = −4.5.
    """
    params = masters()
    opt = HeLoCo(params, lr=1.0, momentum=0.5, variant="none")
    agg = AsyncAggregator(params, opt, 2, dispatch="lookahead")
    assert agg.dispatch(0).params[0].tolist() == [0.0, 0.0]
    assert agg.dispatch(1).params[0].tolist() == [0.0, 0.0]
    u0 = agg.submit(0, delta(2), 0)
    assert params[0].tolist() == [-2.5, -2.5]
    assert u0.params[0].tolist() == [-3.0, -3.0] and u0.params[1].tolist() == [[-3.0, -3.0]] * 2
    u1 = agg.submit(1, delta(1), 0)
    assert u1.staleness == 1 and params[0].tolist() == [-4.0, -4.0]
    assert u1.params[0].tolist() == [-4.5, -4.5]
    out = [torch.empty(s, dtype=torch.bfloat16) for s in SHAPES]
    assert agg.dispatch(0, out=out).params[0].tolist() == [-4.5, -4.5]  # the buffer path agrees
    assert agg.snapshot()[0][0].tolist() == [-4.0, -4.0]  # evaluation sees θ, never the look-ahead
    # the staleness-scaled reading (ours) would have answered worker 0 with θ1 itself (τ̂ = 0)
    params2 = masters()
    agg2 = AsyncAggregator(
        params2, HeLoCo(params2, lr=1.0, momentum=0.5, variant="none"), 2, dispatch="scaled_lookahead"
    )
    assert agg2.submit(0, delta(2), 0).params[0].tolist() == [-2.5, -2.5]


def test_lookahead_extrapolates_by_the_steps_momentum_weight():
    """A look-ahead predicts where the steps take θ, so it uses HeLoCo's ``step_momentum`` μ_s when set.

    EMA step, η = 1, μ = 0.5, θ0 = 0, no correction, worker 0 sends Δ = 2 (m1 = 0.5·2 = 1):
      μ_s = 0.25: θ1 = 0 − (2 + 0.25·1) = −2.25, the reply θ1 − 1·0.25·m1 = −2.5 (μ would give −2.75);
      μ_s = 0: θ1 = −2 and the reply is θ1 itself, though m1 = 1 is kept as the reference.
    """
    for step_momentum, theta, reply in ((0.25, -2.25, -2.5), (0.0, -2.0, -2.0)):
        params = masters()
        opt = HeLoCo(params, lr=1.0, momentum=0.5, variant="none", step_momentum=step_momentum)
        agg = AsyncAggregator(params, opt, 2, dispatch="lookahead")
        update = agg.submit(0, delta(2), 0)
        assert params[0].tolist() == [theta, theta]
        assert update.params[0].tolist() == [reply, reply]
        assert opt.state[params[0]]["momentum_buffer"].tolist() == [1.0, 1.0]
        out = [torch.empty(s, dtype=torch.float32) for s in SHAPES]
        assert agg.dispatch(1, out=out).params[0].tolist() == [reply, reply]  # the buffer path agrees


def test_bad_dispatch_and_arrival_weight_are_refused():
    params = masters()
    with pytest.raises(ValueError, match="dispatch must be one of"):
        AsyncAggregator(params, HeLoCo(params), 2, dispatch="ahead")
    with pytest.raises(ValueError, match="arrival_weight must be None or a finite number > 0"):
        AsyncAggregator(params, HeLoCo(params), 2, arrival_weight=0.0)
    with pytest.raises(ValueError, match="has no 'momentum' > 0"):
        AsyncAggregator(params, torch.optim.SGD(params, lr=0.1), 2, dispatch="lookahead")


def test_arrival_weight_prescales_for_a_torch_optimizer_and_multiplies_staleness_weights():
    # SGD without momentum, η = 1, ρ = 0.5: Δ = 2 moves θ by −1; τ = 1 with poly weighting: 0.5·2^−0.5
    params, _, agg = make(num_workers=2, arrival_weight=0.5, staleness_weighting="poly")
    u = agg.submit(0, delta(2), 0)
    assert u.weight == 0.5 and params[0].tolist() == [-1.0, -1.0]
    u = agg.submit(1, delta(2), 0)
    assert u.weight == pytest.approx(0.5 * 2**-0.5)
    torch.testing.assert_close(params[0], torch.full((2,), -1.0 - 2 * 0.5 * 2**-0.5))


def test_arrival_weight_reaches_heloco_before_its_correction():
    """Aggregator with ρ == HeLoCo.step(weight=ρ) by hand: the correction sees ρΔ (reference default)."""
    rho = 5**-0.5
    params = masters()
    agg = AsyncAggregator(params, HeLoCo(params), 2, arrival_weight=rho)
    ref = masters()
    ref_opt = HeLoCo(ref)
    for worker, base, d in [(0, 0, delta(1, 2)), (1, 0, delta(-1, 0.5)), (0, 1, delta(2, -3))]:
        u = agg.submit(worker, d, base)
        for p, g in zip(ref, d, strict=True):
            p.grad = g.clone()
        ref_opt.step(staleness=u.staleness, weight=rho)
        assert u.weight == rho
        assert_bit_identical(list(params), ref)
    assert ref_opt.last_stats is not None and ref_opt.last_stats.num_blocks == 2
