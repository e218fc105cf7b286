"""The aggregator's optional server policies (heloco.server_policies): rate worker weighting, the
memory of every worker's latest Δ and drift compensation. Expected values are by hand; masters and
pseudo-gradients are the two tensors of shapes (2,) and (2, 2) of tests/test_aggregator.py."""

import math

import pytest
import torch

from heloco.aggregator import AsyncAggregator
from heloco.checkpoint import load_state, save_state
from heloco.optim import DelayedNesterov, HeLoCo
from heloco.server_policies import rate_weight
from tests.test_aggregator import (
    HELOCO_KW,
    SHAPES,
    assert_bit_identical,
    assert_params,
    delta,
    frozen,
    masters,
)


def sgd(num_workers=3, lr=1.0, momentum=0.0, **kw):
    params = masters()
    return params, AsyncAggregator(
        params, torch.optim.SGD(params, lr=lr, momentum=momentum), num_workers, **kw
    )


# ---------------------------------------------------------------------------- worker_weighting="rate"


def test_rate_weight_formula_by_hand():
    # α = 1: w_k = 1 / (p_k·K'); α = 0.5: p_k^−0.5 / Σ p_j^0.5; α = 0: 1
    assert rate_weight([0.75, 0.25, 0.0], 0) == pytest.approx(2 / 3)
    assert rate_weight([0.75, 0.25, 0.0], 1) == pytest.approx(2.0)
    assert rate_weight([2 / 3, 1 / 3], 1, power=0.5) == pytest.approx(3 * (math.sqrt(2) - 1))
    assert rate_weight([2 / 3, 1 / 3], 1, power=0.0) == pytest.approx(1.0)
    shares = [0.5, 0.3, 0.2]
    for power in (0.0, 0.5, 1.0, 2.0):  # the mean weight per arrival is 1
        assert sum(p * rate_weight(shares, k, power) for k, p in enumerate(shares)) == pytest.approx(1.0)


def test_observed_rate_weighting_by_hand():
    # SGD η = 1, no momentum: θ moves by −w·Δ. Shares count every submission, this one included.
    params, agg = sgd(worker_weighting="rate")
    u = agg.submit(0, delta(1), 0)  # counts (1, 0, 0): p_0 = 1, w = 1
    assert u.weight == 1.0 and u.stats["worker_weight"] == 1.0
    agg.submit(0, delta(1), 1)  # (2, 0, 0): w = 1
    assert_params(params, -2, -2)
    u = agg.submit(1, delta(1), 0)  # (2, 1, 0): p_1 = 1/3, K' = 2: w = 3/2
    assert u.weight == pytest.approx(1.5)
    torch.testing.assert_close(params[0], torch.full((2,), -3.5))
    u = agg.submit(0, delta(2), 2)  # (3, 1, 0): p_0 = 3/4: w = 4/(3·2) = 2/3
    assert u.weight == pytest.approx(2 / 3)
    torch.testing.assert_close(params[1], torch.full((2, 2), -3.5 - 4 / 3))


def test_declared_rates_and_power_with_staleness_weight_and_rho():
    # rates (4, 1, 1): p = (2/3, 1/6, 1/6), α = 1: w = (1/2, 2, 2) whatever the counts
    params, agg = sgd(worker_weighting="rate", worker_rates=[4.0, 1.0, 1.0])
    u = agg.submit(1, delta(1), 0)
    assert u.weight == pytest.approx(2.0) and params[0].tolist() == [-2.0, -2.0]
    u = agg.submit(0, delta(1), 1)
    assert u.weight == pytest.approx(0.5)
    # ρ = 0.5 and poly staleness weight 2^−0.5 multiply w: τ = 1, α = 0.5
    params, agg = sgd(
        worker_weighting="rate",
        worker_rates=[4.0, 1.0, 1.0],
        worker_weighting_power=0.5,
        arrival_weight=0.5,
        staleness_weighting="poly",
    )
    agg.submit(0, delta(1), 0)
    u = agg.submit(2, delta(1), 0)
    w = (1 / 6) ** -0.5 / ((2 / 3) ** 0.5 + 2 * (1 / 6) ** 0.5)
    assert u.weight == pytest.approx(0.5 * 2**-0.5 * w) and u.stats["worker_weight"] == pytest.approx(w)


def test_rate_weight_reaches_heloco_as_its_step_weight():
    """Aggregator with ρ and rate weights == HeLoCo.step(weight=ρ·w_k) by hand, Δ unscaled."""
    rho = 5**-0.5
    params = masters()
    agg = AsyncAggregator(params, HeLoCo(params), 2, arrival_weight=rho, worker_weighting="rate")
    ref = masters()
    ref_opt = HeLoCo(ref)
    # counts before each arrival → w: (0,0)→1, (1,0)→ p_1 = 1/2: 1, (1,1)→ p_0 = 2/3: 3/4
    for (worker, base, d), w in zip(
        [(0, 0, delta(1, 2)), (1, 0, delta(-1, 0.5)), (0, 1, delta(2, -3))], [1.0, 1.0, 0.75], strict=True
    ):
        u = agg.submit(worker, d, base)
        for p, g in zip(ref, d, strict=True):
            p.grad = g.clone()
        ref_opt.step(staleness=u.staleness, weight=rho * w)
        assert u.weight == pytest.approx(rho * w)
        assert_bit_identical(list(params), ref)


# ---------------------------------------------------------------------------- memory="latest"


def test_memory_latest_steps_on_the_mean_of_every_workers_latest_delta():
    params, agg = sgd(memory="latest")
    u = agg.submit(0, delta(1, 2), 0)  # S = {0}: p.grad = (1, 2)
    assert u.stats["memory_workers"] == 1.0
    assert_params(params, -1, -2)
    agg.submit(1, delta(3, 0), 0)  # S = {0, 1}: mean((1, 2), (3, 0)) = (2, 1)
    assert_params(params, -3, -3)
    agg.submit(0, delta(-1, 4), 1)  # worker 0's entry replaced: mean((−1, 4), (3, 0)) = (1, 2)
    assert_params(params, -4, -5)
    u = agg.submit(2, delta(1, 2), 0)  # mean((−1, 4), (3, 0), (1, 2)) = (1, 2)
    assert u.stats["memory_workers"] == 3.0
    assert_params(params, -5, -7)
    memory = agg.state_dict()["memory"]
    for entry, expected in zip(memory, [(-1, 4), (3, 0), (1, 2)], strict=True):
        assert_params(entry, *expected)


def test_memory_keeps_weighted_deltas_and_gives_heloco_no_weight():
    # ρ = 0.5 pre-scales every entry; HeLoCo then steps on p.grad = mean with weight None
    rho = 0.5
    params = masters()
    agg = AsyncAggregator(params, HeLoCo(params, **HELOCO_KW), 2, arrival_weight=rho, memory="latest")
    ref = masters()
    ref_opt = HeLoCo(ref, **HELOCO_KW)
    entries = {}
    for worker, base, d in [(0, 0, delta(1, 2)), (1, 0, delta(-1, 0.5)), (0, 1, delta(2, -3))]:
        u = agg.submit(worker, d, base)
        entries[worker] = [rho * t for t in d]
        mean = [sum(e[i] for e in entries.values()) / len(entries) for i in range(2)]
        for p, g in zip(ref, mean, strict=True):
            p.grad = g
        ref_opt.step(staleness=u.staleness)
        torch.testing.assert_close(list(params), ref)
    assert_params(agg.state_dict()["memory"][0], 1.0, -1.5)


@pytest.mark.parametrize("outer", ["nesterov", "heloco"])
def test_memory_with_one_worker_is_the_plain_aggregator(outer):
    def build(**kw):
        params = masters()
        opt = (
            torch.optim.SGD(params, lr=0.3, momentum=0.9, nesterov=True)
            if outer == "nesterov"
            else HeLoCo(params, **HELOCO_KW)
        )
        return params, AsyncAggregator(params, opt, 1, **kw)

    params_a, plain = build()
    params_b, memory = build(memory="latest")
    for i, d in enumerate([delta(1, 2), delta(-1, 0.5), delta(2, -3)]):
        plain.submit(0, d, i)
        memory.submit(0, d, i)
        assert_bit_identical(params_a, params_b)


# ---------------------------------------------------------------------------- drift_compensation=λ


def test_drift_compensation_by_hand():
    # SGD η = 1, λ = 1/4: Δ̃ = Δ + λ·Δ⊙Δ⊙(θ_now − θ_base)
    params, agg = sgd(num_workers=2, drift_compensation=0.25)
    agg.dispatch(0)
    agg.dispatch(1)
    u = agg.submit(0, delta(1, 2), 0)  # no drift yet: θ = (−1, −2)
    assert u.stats["drift/relative_norm"] == 0.0
    assert_params(params, -1, -2)
    # worker 1 started from 0: drift (−1, −2): Δ̃ = (2 − 0.25·4, 1 − 0.25·2) = (1, 0.5)
    u = agg.submit(1, delta(2, 1), 0)
    assert_params(params, -2, -2.5)
    # |correction| / |Δ| = sqrt(2·1² + 4·0.5²) / sqrt(2·2² + 4·1²) = sqrt(3)/sqrt(12) = 1/2
    assert u.stats["drift/relative_norm"] == pytest.approx(0.5)


def test_drift_compensation_normalized_by_the_tensor_max():
    # "max": Δ⊙Δ / max(Δ⊙Δ). Δ_0 = (1, 3): Δ² = (1, 9) → (1/9, 1); Δ_1 ≡ 1 → 1.
    params, agg = sgd(num_workers=2, drift_compensation=0.25, drift_normalization="max")
    agg.dispatch(0)
    agg.dispatch(1)
    agg.submit(0, delta(1, 2), 0)  # θ = (−1, −2)
    agg.submit(1, [torch.tensor([1.0, 3.0]), torch.ones(2, 2)], 0)  # drift (−1, −2)
    torch.testing.assert_close(params[0], torch.tensor([-1 - (1 - 0.25 / 9), -1 - (3 - 0.25)]))
    torch.testing.assert_close(params[1], torch.full((2, 2), -2 - (1 - 0.25 * 2)))


def test_a_compensated_delta_that_overflows_is_refused_and_changes_nothing():
    _, agg = sgd(num_workers=2, drift_compensation=1e30, memory="latest")
    agg.dispatch(0)
    agg.dispatch(1)
    agg.submit(0, delta(1), 0)
    before = frozen(agg)
    with pytest.raises(ValueError, match=r"drift-compensated pseudo_grads\[0\] contains NaN or Inf"):
        agg.submit(1, delta(1e10), 0)  # 1e30·1e20·(−1) overflows fp32
    assert_bit_identical(frozen(agg), before)


def test_drift_is_measured_from_the_lookahead_point_handed_out():
    # SGD η = 1, μ = 0.5 (torch: m ← μm + g, θ ← θ − m), dispatch θ − η·μ·m, λ = 1/4
    params, agg = sgd(num_workers=2, momentum=0.5, dispatch="lookahead", drift_compensation=0.25)
    agg.dispatch(0)
    agg.dispatch(1)
    u = agg.submit(0, delta(1), 0)  # m = 1, θ = −1; worker 0 is handed −1 − 0.5·1 = −1.5
    assert_params(u.params, -1.5, -1.5)
    agg.submit(1, delta(2), 0)  # base 0, drift −1: Δ̃ = 2 − 0.25·4 = 1; m = 1.5, θ = −2.5
    assert_params(params, -2.5, -2.5)
    agg.submit(0, delta(2), 1)  # base −1.5, drift −1: Δ̃ = 1; m = 1.75, θ = −4.25
    assert_params(params, -4.25, -4.25)


def test_drift_compensation_in_a_quorum_round():
    # K = 3, q = 2, SGD η = 1: each Δ is compensated on arrival, then the round's mean is applied
    params, agg = sgd(quorum=2, drift_compensation=0.25)
    for w in range(3):
        agg.dispatch(w)
    agg.submit(0, delta(1), 0)
    u = agg.submit(1, delta(1), 0)  # mean 1: θ = −1
    assert u.applied
    agg.dispatch(0)
    agg.submit(2, delta(2), 0)  # drift −1: Δ̃ = 2 − 0.25·4 = 1
    agg.submit(0, delta(3), 1)  # drift 0: 3; mean 2: θ = −3
    assert_params(params, -3, -3)


def test_drift_out_buffers_get_the_kept_base():
    _, agg = sgd(num_workers=2, momentum=0.5, dispatch="lookahead", drift_compensation=0.25)
    agg.dispatch(0)
    agg.dispatch(1)
    agg.submit(0, delta(1, 2), 0)
    out = [torch.empty(s, dtype=torch.bfloat16) for s in SHAPES]
    u = agg.dispatch(1, out=out)
    assert u.params is out
    expected = agg.state_dict()["drift_bases"]["params"][1]
    assert_bit_identical(out, [t.to(torch.bfloat16) for t in expected])
    assert_params(expected, -1.5, -3.0)  # θ − η·μ·m = −(1, 2) − 0.5·(1, 2)


@pytest.mark.parametrize(
    ("setup", "base", "message"),
    [
        (lambda agg: None, 0, r"drift_compensation needs worker 0 to dispatch before it submits"),
        (lambda agg: agg.dispatch(0), 1, r"base_version 1 is newer"),
        (
            lambda agg: (agg.dispatch(1), agg.submit(1, delta(1), 0), agg.dispatch(0), agg.dispatch(1)),
            0,
            r"worker 0 was last handed version 1, its Δ says base_version 0",
        ),
    ],
)
def test_drift_refuses_a_delta_from_an_unknown_base_and_changes_nothing(setup, base, message):
    _, agg = sgd(num_workers=2, drift_compensation=0.25, memory="latest", worker_weighting="rate")
    setup(agg)
    before = frozen(agg)
    with pytest.raises(ValueError, match=message):
        agg.submit(0, delta(1), base)
    assert_bit_identical(frozen(agg), before)


def test_a_rejected_delta_changes_no_policy_state():
    _, agg = _build("heloco")
    for w in range(3):
        agg.dispatch(w)
    _arrivals(agg, [(0, 1.0), (1, 2.0)])
    before = frozen(agg)
    nan = delta(1)
    nan[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        agg.submit(2, nan, 0)
    assert_bit_identical(frozen(agg), before)


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"worker_weighting": "speed"}, r"worker_weighting must be one of \(None, 'rate'\), got 'speed'"),
        ({"worker_rates": [1.0, 1.0, 1.0]}, r"worker_rates is only read with worker_weighting='rate'"),
        (
            {"worker_weighting": "rate", "worker_rates": [1.0, 2.0]},
            r"worker_rates must be None or a sequence of num_workers=3 arrival rates > 0",
        ),
        ({"worker_weighting": "rate", "worker_rates": [1.0, 0.0, 1.0]}, r"worker_rates\[1\] must be > 0"),
        (
            {"worker_weighting": "rate", "worker_rates": [1.0, 1.0, float("inf")]},
            r"worker_rates\[2\] must be a finite number >= 0",
        ),
        ({"worker_weighting_power": -1.0}, r"worker_weighting_power must be a finite number >= 0"),
        ({"memory": "all"}, r"memory must be one of \(None, 'latest'\), got 'all'"),
        ({"memory": "latest", "quorum": 2}, r"memory='latest' needs quorum=1"),
        ({"drift_compensation": -0.1}, r"drift_compensation must be a finite number >= 0"),
        ({"drift_compensation": float("nan")}, r"drift_compensation must be a finite number >= 0"),
        (
            {"drift_normalization": "global"},
            r"drift_normalization must be one of \('none', 'max'\), got 'global'",
        ),
    ],
)
def test_bad_policy_settings_are_refused(kwargs, message):
    params = masters()
    with pytest.raises(ValueError, match=message):
        AsyncAggregator(params, torch.optim.SGD(params, lr=1.0), 3, **kwargs)


def test_none_strings_switch_the_policies_off():
    _, agg = sgd(worker_weighting="none", memory="none")
    assert agg.policies.worker_weighting is None and agg.policies.memory is None
    assert set(agg.state_dict()) == set(sgd()[1].state_dict())  # no extra entries when off


# ---------------------------------------------------------------------------- checkpoints


OUTER = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, nesterov=True),
    "heloco": lambda p: HeLoCo(p, **HELOCO_KW),
    "dn": lambda p: DelayedNesterov(p, lr=0.3, momentum=0.9, buffer_size=2),
}
ALL_ON = {
    "worker_weighting": "rate",
    "memory": "latest",
    "drift_compensation": 0.1,
    "drift_normalization": "max",
    "arrival_weight": 0.5,
}


def _build(outer, **kw):
    params = masters((0.5, -0.5))
    kw = {**ALL_ON, "dispatch": "plain" if outer == "dn" else "lookahead", **kw}
    return params, AsyncAggregator(params, OUTER[outer](params), 3, **kw)


def _arrivals(agg, arrivals):
    """Each arrival: the worker submits from its last answer and continues from the new one."""
    out = []
    for worker, value in arrivals:
        base = agg.state_dict()["workers"][worker]["base_version"]
        u = agg.submit(worker, delta(value, -value / 2), base)
        out.append((u.version, u.weight, [t.clone() for t in u.params]))
    return out


@pytest.mark.parametrize("outer", ["sgd", "heloco", "dn"])
def test_policies_state_round_trip_through_a_checkpoint(tmp_path, outer):
    params_a, agg_a = _build(outer)
    for w in range(3):
        agg_a.dispatch(w)
    _arrivals(agg_a, [(0, 1.0), (0, 2.0), (1, -1.0), (0, 0.5), (2, 3.0)])
    save_state(tmp_path, "aggregator", agg_a.state_dict())
    sd = load_state(tmp_path, "aggregator")
    assert len(sd["memory"]) == 3 and sd["drift_bases"]["versions"] == [4, 3, 5]
    params_b, agg_b = _build(outer)
    agg_b.load_state_dict(sd)
    rest = [(1, 2.0), (0, -0.5), (2, 1.0), (0, 1.5)]
    assert_bit_identical(_arrivals(agg_a, rest), _arrivals(agg_b, rest))
    assert_bit_identical(params_a, params_b)
    assert_bit_identical(agg_a.state_dict(), agg_b.state_dict())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("memory"), r"state_dict\['memory'\] must be a list of 3 entries"),
        (lambda sd: sd.pop("drift_bases"), r"state_dict has no 'drift_bases' entry"),
        (lambda sd: sd["memory"][0].pop(), r"state_dict\['memory'\]\[0\] has 1 tensors"),
        (
            lambda sd: sd["drift_bases"]["versions"].__setitem__(1, 9),
            r"state_dict\['drift_bases'\]\['versions'\]\[1\]=9 must be an int in \[0, 2\]",
        ),
    ],
)
def test_load_state_dict_checks_the_policies_before_changing_anything(edit, message):
    _, agg_a = _build("sgd")
    for w in range(3):
        agg_a.dispatch(w)
    _arrivals(agg_a, [(0, 1.0), (1, 2.0)])
    sd = agg_a.state_dict()
    edit(sd)
    _, agg_b = _build("sgd")
    agg_b.dispatch(0)
    agg_b.submit(0, delta(1), 0)
    before = frozen(agg_b)
    with pytest.raises(ValueError, match=message):
        agg_b.load_state_dict(sd)
    assert_bit_identical(frozen(agg_b), before)
