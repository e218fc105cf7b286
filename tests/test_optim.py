"""Outer optimizers: torch Nesterov reference, Delayed Nesterov and HeLoCo against hand-computed steps."""

import copy
import io
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heloco.optim import HELOCO_DEFAULTS, DelayedNesterov, HeLoCo


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def param(*xs: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(t(*xs))


def push(opt: torch.optim.Optimizer, p: torch.Tensor, g: torch.Tensor, **kw) -> None:
    p.grad = g.clone()
    opt.step(**kw)


# ---------------------------------------------------------------- torch reference


def test_torch_sgd_nesterov_semantics_by_hand():
    # PyTorch's SGD(nesterov=True): v ← β·v + g;  θ ← θ − η·(g + β·v)   (v starts at g).
    # θ0 = [1, 2], η = 0.5, β = 0.5
    # g1 = [1, −2]: v1 = [1, −2];  θ1 = [1, 2] − 0.5·([1, −2] + 0.5·[1, −2]) = [0.25, 3.5]
    # g2 = [2, 0]:  v2 = 0.5·[1, −2] + [2, 0] = [2.5, −1]
    #               θ2 = [0.25, 3.5] − 0.5·([2, 0] + 0.5·[2.5, −1]) = [−1.375, 3.75]
    p = param(1, 2)
    opt = torch.optim.SGD([p], lr=0.5, momentum=0.5, nesterov=True)
    push(opt, p, t(1, -2))
    assert torch.equal(p.data, t(0.25, 3.5))
    push(opt, p, t(2, 0))
    assert torch.equal(p.data, t(-1.375, 3.75))
    assert torch.equal(opt.state[p]["momentum_buffer"], t(2.5, -1))


# ---------------------------------------------------------------- Delayed Nesterov


def test_dn_zero_activation_identical_pushes_equal_one_nesterov_step():
    # N = 2, β = 0.5, η = 1, c = 0, g = [2, −4] twice:
    #   arrival 1: D = g, no momentum update: θ −= g/2 = [1, −2]
    #   arrival 2: D = 2g, m = 0.5·0 + D/2 = [2, −4]; θ −= 0.5·m + g/2 = [2, −4]
    #   total [3, −6] = g + β·(β·0 + g): one torch Nesterov step on g.
    p = param(0, 0)
    opt = DelayedNesterov([p], lr=1.0, momentum=0.5, buffer_size=2)
    push(opt, p, t(2, -4))
    assert torch.equal(p.data, t(-1, 2))
    push(opt, p, t(2, -4))
    assert torch.equal(p.data, t(-3, 6))
    assert torch.equal(opt.state[p]["momentum_buffer"], t(2, -4))
    assert torch.equal(opt.state[p]["delay_buffer"], t(0, 0))


def test_dn_zero_activation_rounds_track_nesterov_on_the_mean():
    # Over several rounds of N different arrivals, DN (c = 0) = torch Nesterov on each round's mean.
    gen = torch.Generator().manual_seed(0)
    n = 3
    p_dn, p_ref = param(1, -1, 0.5), param(1, -1, 0.5)
    dn = DelayedNesterov([p_dn], lr=0.7, momentum=0.9, buffer_size=n)
    ref = torch.optim.SGD([p_ref], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(4):
        gs = [torch.randn(3, generator=gen) for _ in range(n)]
        for g in gs:
            push(dn, p_dn, g)
        push(ref, p_ref, torch.stack(gs).mean(0))
        torch.testing.assert_close(p_dn.data, p_ref.data, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dn.state[p_dn]["momentum_buffer"], ref.state[p_ref]["momentum_buffer"])


def test_dn_with_activation_by_hand():
    # N = 2, c = 0.25 (≤ 1/N), β = 0.5, η = 1;  flush factor (1 − c·N + c)·β = 0.75·0.5 = 0.375,
    # in-between factor c·β = 0.125.
    # a1 g=[2, 0] (t=0):  θ −= 0.125·[0, 0] + [1, 0]               → θ = [−1, 0]
    # a2 g=[0, 2] (t=1):  D = [2, 2], m = [1, 1]; θ −= 0.375·[1, 1] + [0, 1] → θ = [−1.375, −1.375]
    # a3 g=[4, 0] (t=2):  θ −= 0.125·[1, 1] + [2, 0]               → θ = [−3.5, −1.5]
    # a4 g=[0, 0] (t=3):  D = [4, 0], m = 0.5·[1, 1] + [2, 0] = [2.5, 0.5]
    #                     θ −= 0.375·[2.5, 0.5]                     → θ = [−4.4375, −1.6875]
    p = param(0, 0)
    opt = DelayedNesterov([p], lr=1.0, momentum=0.5, buffer_size=2, activation=0.25)
    expected = [t(-1, 0), t(-1.375, -1.375), t(-3.5, -1.5), t(-4.4375, -1.6875)]
    for g, e in zip([t(2, 0), t(0, 2), t(4, 0), t(0, 0)], expected, strict=True):
        push(opt, p, g)
        assert torch.equal(p.data, e)
    assert torch.equal(opt.state[p]["momentum_buffer"], t(2.5, 0.5))
    assert opt.state[p]["step"] == 4


def test_dn_weight_scales_the_arrival_and_staleness_is_ignored():
    # weight 0.5 on g = [4, −8] with N = 1, β = 0.5, η = 1: g' = [2, −4], m = [2, −4],
    # θ −= 0.5·m + g' = [3, −6]
    p = param(0, 0)
    opt = DelayedNesterov([p], lr=1.0, momentum=0.5, buffer_size=1)
    push(opt, p, t(4, -8), weight=0.5, staleness=7)
    assert torch.equal(p.data, t(-3, 6))
    assert torch.equal(p.grad, t(4, -8))  # the caller's gradient is not modified


# ---------------------------------------------------------------- HeLoCo

# Shared hand example (μ = 0.5, η = 1, θ0 = [1, 1], eps = 0 so conf is exact):
#   step 1, Δ1 = [2, 0]:  m1 = 0.5·0 + 0.5·[2, 0] = [1, 0];  θ1 = [1, 1] − ([2, 0] + 0.5·[1, 0]) = [−1.5, 1]
#   step 2, Δ2 = [−3, 4] (‖Δ2‖ = 5), against m1 (‖m1‖ = 1): c = −0.6 → shrink;
#     conf = 5/(5 + 1) = 5/6, β = min(1·0.6·5/6, 1) = 0.5,
#     Δ̂2 = [−3, 4] − 0.5·(−0.6)·5·[1, 0] = [−1.5, 4]
#     m2 = 0.5·[1, 0] + 0.5·[−1.5, 4] = [−0.25, 2];  θ2 = [−1.5, 1] − ([−1.5, 4] + 0.5·m2) = [0.125, −4]
#   uncorrected step 2: m2 = [−1, 2];  θ2 = [−1.5, 1] − ([−3, 4] + 0.5·[−1, 2]) = [2, −4]
HAND = dict(
    lr=1.0,
    momentum=0.5,
    keep_threshold=0.5,
    shrink_strength=1.0,
    shrink_max=1.0,
    kappa=1.0,
    eps=0.0,
    correct_fresh=False,
    weight_before_correction=False,
)
CORRECTED, UNCORRECTED = t(0.125, -4), t(2, -4)


def two_steps(step2_kwargs: dict, **opt_kwargs) -> tuple[torch.Tensor, HeLoCo, torch.Tensor]:
    p = param(1, 1)
    opt = HeLoCo([p], **{**HAND, **opt_kwargs})
    push(opt, p, t(2, 0), staleness=3)
    assert torch.equal(p.data, t(-1.5, 1))
    assert torch.equal(opt.state[p]["momentum_buffer"], t(1, 0))
    # the first update is never corrected: the momentum is still zero
    if opt_kwargs.get("variant") != "none":
        assert opt.last_stats.blocks_kept == 1 and opt.last_stats.cosines == [0.0]
    push(opt, p, t(-3, 4), **step2_kwargs)
    assert torch.equal(p.grad, t(-3, 4))  # the correction works on a copy
    return p.data, opt, opt.state[p]["momentum_buffer"]


def test_heloco_ema_nesterov_uncorrected_by_hand():
    theta, opt, m = two_steps({"staleness": 0})
    assert torch.equal(theta, UNCORRECTED)
    assert torch.equal(m, t(-1, 2))
    assert opt.last_stats is None


@pytest.mark.parametrize("foreach", [True, False])
def test_heloco_ema_nesterov_with_asymmetric_momentum_by_hand(foreach):
    # μ = 0.75, η = 1, θ0 = [1, 1], no correction (staleness 0):
    #   G1 = [4, 0]: m1 = 0.75·0 + 0.25·[4, 0] = [1, 0];   θ1 = [1, 1] − ([4, 0] + 0.75·[1, 0]) = [−3.75, 1]
    #   G2 = [0, 8]: m2 = 0.75·[1, 0] + 0.25·[0, 8] = [0.75, 2]
    #                θ2 = [−3.75, 1] − ([0, 8] + 0.75·[0.75, 2]) = [−4.3125, −8.5]
    p = param(1, 1)
    opt = HeLoCo([p], lr=1.0, momentum=0.75, correct_fresh=False, foreach=foreach)
    push(opt, p, t(4, 0), staleness=0)
    assert torch.equal(p.data, t(-3.75, 1))
    push(opt, p, t(0, 8), staleness=0)
    assert torch.equal(opt.state[p]["momentum_buffer"], t(0.75, 2))
    assert torch.equal(p.data, t(-4.3125, -8.5))


def test_heloco_corrected_step_by_hand():
    theta, opt, m = two_steps({"staleness": 1})
    torch.testing.assert_close(theta, CORRECTED, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m, t(-0.25, 2), rtol=1e-6, atol=1e-6)
    assert opt.last_stats.blocks_shrunk == 1
    assert opt.last_stats.cosines == pytest.approx([-0.6], rel=1e-6)


@pytest.mark.parametrize(
    ("step2", "opt_kwargs", "expected"),
    [
        ({}, {}, CORRECTED),  # staleness None = unknown, treated as stale
        ({"staleness": 0}, {"correct_fresh": True}, CORRECTED),
        ({"staleness": 0}, {}, UNCORRECTED),
        ({"staleness": 5}, {"variant": "none"}, UNCORRECTED),
        # project: β = 1, Δ̂2 = [0, 4], m2 = [0.5, 2], θ2 = [−1.5, 1] − ([0, 4] + [0.25, 1]) = [−1.75, −4]
        ({"staleness": 2}, {"variant": "project"}, t(-1.75, -4)),
    ],
    ids=["staleness-None", "fresh-corrected", "fresh-not-corrected", "variant-none", "variant-project"],
)
def test_heloco_when_to_correct(step2, opt_kwargs, expected):
    theta, _, _ = two_steps(step2, **opt_kwargs)
    torch.testing.assert_close(theta, expected, rtol=1e-6, atol=1e-6)


def test_heloco_weight_scales_after_the_correction():
    # Uncorrected, weight 2: G = [−6, 8], m2 = 0.5·[1, 0] + 0.5·G = [−2.5, 4],
    #   θ2 = [−1.5, 1] − ([−6, 8] + 0.5·[−2.5, 4]) = [5.75, −9]
    theta, _, _ = two_steps({"staleness": 0, "weight": 2.0})
    assert torch.equal(theta, t(5.75, -9))
    # Corrected, weight 2: G = 2·Δ̂2 = [−3, 8] (the correction sees the unweighted Δ, conf = 5/6),
    #   m2 = [0.5, 0] + [−1.5, 4] = [−1, 4];  θ2 = [−1.5, 1] − ([−3, 8] + [−0.5, 2]) = [2, −9]
    theta, _, _ = two_steps({"staleness": 1, "weight": 2.0})
    torch.testing.assert_close(theta, t(2, -9), rtol=1e-6, atol=1e-6)


def test_heloco_weight_before_the_correction_enters_the_confidence_by_hand():
    # Weight 2 applied before the correction (the authors' experiments): the correction sees 2Δ2,
    #   conf = 2·5/(2·5 + 1·1) = 10/11, β = min(1·0.6·10/11, 1) = 6/11,
    #   Δ̂ of 2Δ2 = 2·([−3, 4] − (6/11)·(−0.6)·5·[1, 0]) = 2·[−15/11, 4] = [−30/11, 8] = G,
    #   m2 = 0.5·[1, 0] + 0.5·G = [−19/22, 4],  θ2 = [−1.5, 1] − (G + 0.5·m2) = [73/44, −9]
    # (after the correction, above, the same arrival gives θ2 = [2, −9]: conf differs).
    theta, opt, m = two_steps({"staleness": 1, "weight": 2.0}, weight_before_correction=True)
    torch.testing.assert_close(m, t(-19 / 22, 4), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(theta, t(73 / 44, -9), rtol=1e-6, atol=1e-6)
    assert opt.last_stats.betas == pytest.approx([6 / 11])


@pytest.mark.parametrize(
    ("support", "m2", "theta2"),
    [
        # m1 = [.5, .5, .5, .5], θ1 = [−1.25]*4. Δ2 = [0, 0, 0, −2] meets m_S = [0, 0, 0, .5]:
        #   c = −1, conf = 1 (κ = 0), β = min(0.5·1·1, 0.5) = 0.5, Δ̂ = Δ2 − 0.5·(−1)·2·[0, 0, 0, 1]
        #   = [0, 0, 0, −1]; m2 = 0.5·m1 + 0.5·Δ̂ = [.25, .25, .25, −.25]; θ2 = θ1 − (Δ̂ + 0.5·m2)
        ("nonzero", t(0.25, 0.25, 0.25, -0.25), t(-1.375, -1.375, -1.375, -0.125)),
        # the paper's: c = −1/(2·1) = −0.5, β = 0.25, Δ̂ = Δ2 + 0.25·0.5·2·m1/‖m1‖ = [.125, .125, .125, −1.875]
        ("all", t(0.3125, 0.3125, 0.3125, -0.6875), t(-1.53125, -1.53125, -1.53125, 0.96875)),
    ],
)
def test_heloco_correction_on_the_support_of_a_sparse_delta_by_hand(support, m2, theta2):
    p = param(0, 0, 0, 0)
    opt = HeLoCo(
        [p], lr=1.0, momentum=0.5, kappa=0.0, shrink_strength=0.5, shrink_max=0.5, correction_support=support
    )
    push(opt, p, t(1, 1, 1, 1), staleness=0)
    push(opt, p, t(0, 0, 0, -2), staleness=1)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], m2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.data, theta2, rtol=1e-6, atol=1e-6)
    assert opt.last_stats.blocks_shrunk == 1


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), keep=st.floats(0.05, 0.95))
def test_heloco_nonzero_support_keeps_the_sparse_support_and_equals_all_on_a_dense_delta(seed, keep):
    """With correction_support="nonzero" the corrected Δ is zero wherever Δ is (weight 1: the
    momentum then moves exactly to μ·m there), where the paper's correction ("all") adds a dense
    piece of m; on a Δ without zeros the two are bit-identical. c_ok = 0.99: nearly every block is
    corrected."""
    shapes = [(6, 5), (11,)]

    def run(support: str, sparse: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = HeLoCo(params, keep_threshold=0.99, correction_support=support)
        g = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step(staleness=0, weight=1.0)
        before = [opt.state[p]["momentum_buffer"].clone() for p in params]
        zeros = []
        for p in params:
            d = torch.randn(p.shape, generator=g) - opt.state[p]["momentum_buffer"]
            mask = torch.rand(p.shape, generator=g) < keep
            mask.view(-1)[0], mask.view(-1)[-1] = True, False  # some entries sent, some not
            p.grad = torch.where(mask, d, torch.zeros(())) if sparse else d
            zeros.append(~mask)
        opt.step(staleness=2, weight=1.0)
        if sparse:
            moved = [
                not torch.equal(opt.state[p]["momentum_buffer"][z], 0.9 * m0[z])
                for p, m0, z in zip(params, before, zeros, strict=True)
            ]
            # "all" moves m where Δ is zero in every corrected block (a block is kept if cos ≥ 0.99)
            assert not any(moved) if support == "nonzero" else any(moved) == (opt.last_stats.blocks_kept < 2)
        return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]

    run("nonzero", sparse=True)
    run("all", sparse=True)
    for a, b in zip(run("nonzero", sparse=False), run("all", sparse=False), strict=True):
        assert torch.equal(a, b)


def test_a_state_dict_from_before_correction_support_loads_as_the_paper_s():
    """Checkpoints written before the option existed hold no ``correction_support``: they load as
    "all" (what they ran with), and a step goes on as it would have."""
    p = param(1.0, 2.0)
    opt = HeLoCo([p])
    push(opt, p, t(1.0, -1.0), staleness=0)
    state = opt.state_dict()
    del state["param_groups"][0]["correction_support"]
    twin = HeLoCo([p], correction_support="nonzero")
    twin.load_state_dict(state)
    assert twin.param_groups[0]["correction_support"] == "all"


def test_heloco_step_momentum_zero_is_plain_sgd_with_the_momentum_kept_by_hand():
    # step_momentum 0 (ours): θ ← θ − η·G, while m ← μ·m + (1 − μ)·G still runs (variant "none": G = Δ).
    # θ0 = [1, 2], η = 0.5, μ = 0.5
    # g1 = [1, −2]: m1 = [0.5, −1];    θ1 = [1, 2] − 0.5·[1, −2] = [0.5, 3]
    # g2 = [2, 0]:  m2 = [1.25, −0.5]; θ2 = [0.5, 3] − 0.5·[2, 0] = [−0.5, 3]
    for foreach in (False, True):
        p = param(1, 2)
        opt = HeLoCo([p], lr=0.5, momentum=0.5, step_momentum=0.0, variant="none", foreach=foreach)
        push(opt, p, t(1, -2))
        assert torch.equal(p.data, t(0.5, 3)) and torch.equal(opt.state[p]["momentum_buffer"], t(0.5, -1))
        push(opt, p, t(2, 0))
        assert torch.equal(p.data, t(-0.5, 3)) and torch.equal(opt.state[p]["momentum_buffer"], t(1.25, -0.5))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), foreach=st.booleans(), support=st.sampled_from(["all", "nonzero"]))
def test_heloco_step_momentum_changes_the_step_and_nothing_else(seed, foreach, support):
    """The corrections and the momentum do not depend on θ, so on the same arrivals a run with
    step_momentum 0 holds the same m as the paper's step; its θ moved by exactly −η·Σ G, with each
    G read back from m (G_t = (m_t − μ·m_{t−1}) / (1 − μ)). step_momentum = μ is the paper's step, bit
    for bit."""
    g = torch.Generator().manual_seed(seed)
    arrivals = [torch.randn(4, 3, generator=g) * (torch.rand(4, 3, generator=g) < 0.6) for _ in range(5)]
    stalenesses = [0, 2, 1, 3, 0]

    def run(**kw):
        p = torch.nn.Parameter(torch.ones(4, 3))
        opt = HeLoCo([p], lr=0.3, momentum=0.8, correction_support=support, foreach=foreach, **kw)
        ms = [torch.zeros(4, 3)]
        for d, s in zip(arrivals, stalenesses, strict=True):
            push(opt, p, d, staleness=s, weight=0.5)
            ms.append(opt.state[p]["momentum_buffer"].clone())
        return p.detach(), ms

    paper, paper_ms = run()
    same, same_ms = run(step_momentum=0.8)
    sgd, sgd_ms = run(step_momentum=0.0)
    assert torch.equal(paper, same) and all(torch.equal(a, b) for a, b in zip(paper_ms, same_ms, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(paper_ms, sgd_ms, strict=True))
    steps = sum((m1 - 0.8 * m0) / 0.2 for m0, m1 in itertools.pairwise(sgd_ms))
    torch.testing.assert_close(sgd, torch.ones(4, 3) - 0.3 * steps, rtol=1e-4, atol=1e-4)
    assert not torch.equal(sgd, paper)


def test_a_state_dict_from_before_step_momentum_loads_as_the_paper_s():
    p = param(1.0, 2.0)
    opt = HeLoCo([p])
    push(opt, p, t(1.0, -1.0), staleness=0)
    state = opt.state_dict()
    del state["param_groups"][0]["step_momentum"]
    twin = HeLoCo([p], step_momentum=0.0)
    twin.load_state_dict(state)
    assert twin.param_groups[0]["step_momentum"] is None


def test_heloco_corrects_a_fresh_arrival_by_default_by_hand():
    # The authors correct every arrival once m exists: staleness 0 gives the corrected θ2 above.
    theta, opt, _ = two_steps({"staleness": 0}, correct_fresh=True)
    torch.testing.assert_close(theta, CORRECTED, rtol=1e-6, atol=1e-6)
    assert opt.last_stats.blocks_shrunk == 1
    assert HeLoCo([param(1.0)]).defaults["correct_fresh"] is True


def test_heloco_defaults_are_the_reference_values():
    d = HeLoCo([param(1.0)]).defaults
    expected = {
        "lr": 0.7,
        "momentum": 0.9,
        "keep_threshold": 0.2,
        "shrink_strength": 0.5,
        "shrink_max": 0.5,
        "reorient_strength": 1.0,
        "kappa": 3.0,
        "eps": 1e-8,
        "correct_fresh": True,
        "reorient_schedule": "normalized",
        "cos_bad": -0.2,
        "weight_before_correction": True,
    }
    assert {k: d[k] for k in expected} == expected
    swept = HeLoCo.from_preset([param(1.0)], "tiny_sweep").defaults
    assert (swept["lr"], swept["keep_threshold"], swept["correct_fresh"]) == (0.175, 0.0, False)
    assert HeLoCo.from_preset([param(1.0)], "tiny_sweep", lr=0.3).defaults["lr"] == 0.3
    with pytest.raises(ValueError, match="preset must be one of"):
        HeLoCo.from_preset([param(1.0)], "paper")


def test_heloco_lr_scheduler_changes_the_step():
    # LambdaLR halves η after step 1: θ2 = θ1 − 0.5·([−3, 4] + 0.5·[−1, 2]) = [−1.5 + 1.75, 1 − 2.5]
    p = param(1, 1)
    opt = HeLoCo([p], **HAND)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    push(opt, p, t(2, 0), staleness=0)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    push(opt, p, t(-3, 4), staleness=0)
    assert torch.equal(p.data, t(0.25, -1.5))


def test_params_without_grad_are_skipped():
    a, b = param(1, 1), param(5, 5)
    for opt in (HeLoCo([a, b], **HAND), DelayedNesterov([a, b], lr=1.0)):
        a.grad, b.grad = t(2, 0), None
        opt.step()
        assert torch.equal(b.data, t(5, 5)) and b not in opt.state


def test_param_groups_have_their_own_hyperparameters():
    a, b = param(1, 1), param(1, 1)
    opt = HeLoCo([{"params": [a]}, {"params": [b], "lr": 0.0, "variant": "none"}], **HAND)
    a.grad, b.grad = t(2, 0), t(2, 0)
    opt.step()
    assert torch.equal(a.data, t(-1.5, 1)) and torch.equal(b.data, t(1, 1))
    assert torch.equal(opt.state[b]["momentum_buffer"], t(1, 0))  # momentum still updates at η = 0


def test_closure_is_evaluated_with_grad_enabled():
    p = param(1, 1)
    for opt in (HeLoCo([p], **HAND), DelayedNesterov([p], lr=0.1)):

        def closure(p=p):
            p.grad = None
            loss = (p**2).sum()
            loss.backward()
            return loss

        expected = float((p.data**2).sum())
        assert opt.step(closure).item() == expected
        assert p.grad is not None


def _run(opt_cls, foreach, steps, mixed=False, **kw):
    gen = torch.Generator().manual_seed(1)
    shapes = [(4, 3), (7,), (2, 2, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    if mixed:  # one group holding two dtypes: the foreach path groups tensors by device and dtype
        params[1] = torch.nn.Parameter(params[1].detach().double())
    opt = opt_cls(params, foreach=foreach, **kw)
    for i in range(steps):
        for p in params:
            # alternate directions so that keep, shrink and reorient all occur
            p.grad = torch.randn(p.shape, generator=gen) + (-1) ** i * 0.5 * p.detach()
        opt.step(staleness=i % 3, weight=1.0 + 0.25 * (i % 2))
    return params, opt


@pytest.mark.parametrize(
    ("opt_cls", "kw"),
    [
        (HeLoCo, {"variant": "full", "keep_threshold": 0.3}),
        (HeLoCo, {"variant": "project", "correct_fresh": True}),
        (HeLoCo, {"variant": "none"}),
        (DelayedNesterov, {"buffer_size": 3, "activation": 0.2}),
    ],
)
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "fp32+fp64"])
def test_foreach_and_per_tensor_paths_are_bit_identical(opt_cls, kw, mixed):
    pa, oa = _run(opt_cls, True, 7, mixed=mixed, **kw)
    pb, ob = _run(opt_cls, False, 7, mixed=mixed, **kw)
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(oa.state.values(), ob.state.values(), strict=True):
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
    if opt_cls is HeLoCo and kw["variant"] == "full":
        assert oa.last_stats == ob.last_stats


@pytest.mark.parametrize(
    ("opt_cls", "kw"),
    [(HeLoCo, {"keep_threshold": 0.3}), (DelayedNesterov, {"buffer_size": 3, "activation": 0.1})],
)
def test_state_dict_round_trip_continues_identically(opt_cls, kw):
    # 5 steps, save (through torch.save), load into a fresh optimizer on copied params, 2 more steps each.
    params, opt = _run(opt_cls, None, 5, **kw)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = opt_cls(clones, **kw)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    if opt_cls is DelayedNesterov:
        assert fresh.state[clones[0]]["step"] == 5  # the arrival counter survives (next flush at 6)
    gen = torch.Generator().manual_seed(9)
    for i in range(2):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for ps, o in ((params, opt), (clones, fresh)):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            o.step(staleness=1 + i)
    for x, y in zip(params, clones, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"lr": -0.1}, "lr must be"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\), got 1.5"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"keep_threshold": 2.0}, "keep_threshold must be in"),
        ({"shrink_strength": -1.0}, "shrink_strength must be"),
        ({"shrink_max": -1.0}, "shrink_max must be"),
        ({"reorient_strength": -1.0}, "reorient_strength must be"),
        ({"kappa": -1.0}, "kappa must be"),
        ({"eps": -1.0}, "eps must be"),
        ({"variant": "pcgrad"}, r"variant must be one of \['full', 'project', 'none'\]"),
        (
            {"correction_support": "sparse"},
            r"correction_support must be one of \['all', 'nonzero'\], got 'sparse'",
        ),
        ({"step_momentum": 1.0}, r"step_momentum must be in \[0, 1\), got 1.0"),
        ({"correct_fresh": "yes"}, "correct_fresh must be True or False"),
        ({"foreach": 1}, "foreach must be None, True or False"),
    ],
)
def test_heloco_bad_hyperparameters_raise(kw, message):
    with pytest.raises(ValueError, match=message):
        HeLoCo([param(1.0)], **kw)
    with pytest.raises(ValueError, match=message):  # per-group overrides are validated too
        HeLoCo([{"params": [param(1.0)], **kw}])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"lr": float("nan")}, "lr must be"),
        ({"momentum": -0.1}, "momentum must be in"),
        ({"buffer_size": 0}, "buffer_size must be an int >= 1"),
        ({"buffer_size": 2.0}, "buffer_size must be an int >= 1"),
        ({"buffer_size": 4, "activation": 0.3}, r"activation must be in \[0, 0.25\], got 0.3"),
        ({"activation": -0.1}, "activation must be in"),
    ],
)
def test_dn_bad_hyperparameters_raise(kw, message):
    with pytest.raises(ValueError, match=message):
        DelayedNesterov([param(1.0)], **kw)


@pytest.mark.parametrize("opt_cls", [HeLoCo, DelayedNesterov])
def test_bad_step_arguments_raise_before_any_change(opt_cls):
    p = param(1, 1)
    opt = opt_cls([p])
    p.grad = t(1, 1)
    for kw, message in [
        ({"staleness": -1}, "staleness must be None or an int >= 0"),
        ({"staleness": 1.5}, "staleness must be None or an int >= 0"),
        ({"weight": -1.0}, "weight must be"),
        ({"weight": float("inf")}, "weight must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            opt.step(**kw)
    assert torch.equal(p.data, t(1, 1)) and not opt.state


def test_heloco_nan_pseudo_gradient_leaves_everything_unchanged():
    a, b = param(1, 1), param(2, 2)
    opt = HeLoCo([{"params": [a]}, {"params": [b]}], **HAND)
    a.grad, b.grad = t(1, 0), t(1, 0)
    opt.step()
    snapshot = [a.detach().clone(), b.detach().clone(), opt.state[a]["momentum_buffer"].clone()]
    a.grad, b.grad = t(-1, 0), t(float("nan"), 0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step(staleness=1)
    assert torch.equal(a.data, snapshot[0]) and torch.equal(b.data, snapshot[1])
    assert torch.equal(opt.state[a]["momentum_buffer"], snapshot[2])


def test_defaults_live_in_one_place():
    opt = HeLoCo([param(1.0)])
    for key, value in HELOCO_DEFAULTS.items():
        assert opt.defaults[key] == value


def test_corrected_blocks_leave_p_grad_alone_and_stay_out_of_the_state():
    """Corrected blocks go to buffers of the optimizer's own (not p.grad, not the state), reused from
    step to step without carrying anything over: a copy of the optimizer taken before each step, whose
    buffers are fresh, ends bit for bit at the same point."""
    params, opt = _run(HeLoCo, None, 4, keep_threshold=0.3)
    assert all(set(s) == {"momentum_buffer"} for s in opt.state_dict()["state"].values())
    for _ in range(2):
        grads = [-opt.state[p]["momentum_buffer"].clone() for p in params]  # cos = −1: all shrunk
        twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        twin = HeLoCo(twin_params, keep_threshold=0.3)
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # (its tensors would be shared)
        for ps in (params, twin_params):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
        opt.step(staleness=2)
        twin.step(staleness=2)
        assert opt.last_stats.blocks_shrunk == len(params)
        for p, q, g in zip(params, twin_params, grads, strict=True):
            assert torch.equal(p.grad, g)  # only read
            assert torch.equal(p, q)
        assert all(set(s) == {"momentum_buffer"} for s in opt.state_dict()["state"].values())


def test_heloco_first_step_with_nan_leaves_no_state():
    """Every group is gathered and planned before anything changes: the momentum buffers a first
    step would create are not added when it raises."""
    a, b = param(1, 1), param(2, 2)
    opt = HeLoCo([{"params": [a]}, {"params": [b]}])
    a.grad, b.grad = t(1, 0), t(float("nan"), 0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step(staleness=1)
    assert not opt.state and opt.last_stats is None
    assert torch.equal(a.data, t(1, 1)) and torch.equal(b.data, t(2, 2))


def test_dn_checks_every_group_before_changing_any():
    a, b = param(1, 1), param(2, 2)
    opt = DelayedNesterov([{"params": [a]}, {"params": [b]}], lr=0.5)
    a.grad, b.grad = t(1, 1), torch.tensor([1.0, 0.0]).to_sparse()
    with pytest.raises(ValueError, match="does not support sparse gradients"):
        opt.step()
    assert not opt.state and torch.equal(a.data, t(1, 1))


@pytest.mark.parametrize(
    ("opt_cls", "key", "value", "message"),
    [
        (HeLoCo, "keep_threshold", 2.0, "keep_threshold must be in"),
        (DelayedNesterov, "buffer_size", 0, "buffer_size"),
    ],
)
def test_load_state_dict_validates_the_hyperparameters_once(opt_cls, key, value, message):
    p = param(1, 1)
    opt = opt_cls([p])
    sd = opt.state_dict()
    sd["param_groups"][0][key] = value
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert opt.param_groups[0][key] == opt.defaults[key]
