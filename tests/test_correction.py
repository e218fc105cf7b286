"""The HeLoCo correction: every branch against hand-computed values, plus property tests."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from heloco.correction import CorrectionStats, apply_correction, correct_pseudo_gradient, plan_correction

# Hyperparameters used by the hand examples unless a test says otherwise: eps = 0 keeps the
# arithmetic exact (conf = ‖Δ‖/(‖Δ‖ + κ‖m‖)); the printed λ = min(k_d·(1 − c)·conf, 1).
HP = dict(
    keep_threshold=0.5,
    shrink_strength=1.0,
    shrink_max=1.0,
    reorient_strength=0.5,
    kappa=1.0,
    eps=0.0,
    reorient_schedule="printed",
)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def correct(delta, mom, **overrides):
    hp = {**HP, **overrides}
    d = [x.clone() for x in delta]
    stats = correct_pseudo_gradient(d, mom, **hp)
    return d, stats


def test_keep_branch_leaves_delta_unchanged():
    # Δ = [1, 0], m = [1, 1]: c = 1/√2 ≈ 0.707 ≥ c_ok = 0.5 → kept.
    (out,), stats = correct([t(1, 0)], [t(1, 1)])
    assert torch.equal(out, t(1, 0))
    assert (stats.blocks_kept, stats.blocks_shrunk, stats.blocks_reoriented) == (1, 0, 0)
    assert stats.cosines == pytest.approx([1 / math.sqrt(2)], rel=1e-6)


def test_keep_threshold_is_inclusive():
    # Δ = [3, 4], m = [1, 0]: c = 3/5 = 0.6 exactly; with c_ok = 0.6 the block is kept.
    (out,), stats = correct([t(3, 4)], [t(1, 0)], keep_threshold=0.6)
    assert torch.equal(out, t(3, 4))
    assert stats.blocks_kept == 1


def test_shrink_branch_by_hand():
    # Δ = [3, 4] (‖Δ‖ = 5), m = [-1, 0] (‖m‖ = 1): c = -3/5 = -0.6.
    # conf = 5 / (5 + 1·1) = 5/6;  β = min(k_s·(-c)·conf, β_max) = min(1·0.6·5/6, 1) = 0.5
    # Δ̂ = Δ − β·c·‖Δ‖·m/‖m‖ = [3, 4] − 0.5·(−0.6)·5·[−1, 0] = [3, 4] + 1.5·[−1, 0] = [1.5, 4]
    (out,), stats = correct([t(3, 4)], [t(-1, 0)])
    torch.testing.assert_close(out, t(1.5, 4), rtol=1e-6, atol=1e-6)
    assert (stats.blocks_kept, stats.blocks_shrunk, stats.blocks_reoriented) == (0, 1, 0)
    assert stats.cosines == pytest.approx([-0.6], rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_shrink_by_hand_in_other_dtypes(dtype):
    # the example above, [3, 4] against [−1, 0] → [1.5, 4], is exact in every float dtype
    delta = [t(3, 4).to(dtype)]
    stats = correct_pseudo_gradient(delta, [t(-1, 0).to(dtype)], **HP)
    assert delta[0].dtype == dtype and torch.equal(delta[0], t(1.5, 4).to(dtype))
    assert stats.blocks_shrunk == 1


def test_shrink_is_capped_by_shrink_max():
    # Same block, k_s = 2 → k_s·0.6·5/6 = 1.0, capped at β_max = 0.25:
    # Δ̂ = [3, 4] − 0.25·(−0.6)·5·[−1, 0] = [3, 4] + 0.75·[−1, 0] = [2.25, 4]
    (out,), _ = correct([t(3, 4)], [t(-1, 0)], shrink_strength=2.0, shrink_max=0.25)
    torch.testing.assert_close(out, t(2.25, 4), rtol=1e-6, atol=1e-6)


def test_shrink_with_beta_one_is_pcgrad_projection():
    # PCGrad: Δ − ⟨Δ, m⟩/‖m‖²·m = [3, 4] − (−3)/1·[−1, 0] = [0, 4].
    # "full" with a large k_s reaches β = β_max = 1; "project" uses β = 1 directly.
    (full,), _ = correct([t(3, 4)], [t(-1, 0)], shrink_strength=100.0, shrink_max=1.0)
    (proj,), stats = correct([t(3, 4)], [t(-1, 0)], variant="project")
    torch.testing.assert_close(full, t(0, 4), rtol=0, atol=1e-6)
    torch.testing.assert_close(proj, t(0, 4), rtol=0, atol=1e-6)
    assert stats.blocks_shrunk == 1


def test_project_matches_pcgrad_formula_on_3_vectors():
    delta, mom = t(1.0, -2.0, 0.5), t(-0.5, 1.0, 2.0)  # ⟨Δ, m⟩ = −0.5 − 2 + 1 = −1.5 < 0
    expected = delta - (delta @ mom) / (mom @ mom) * mom  # = Δ + (1.5/5.25)·m
    (out,), _ = correct([delta], [mom], variant="project")
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert abs(float(out @ mom)) < 1e-6  # orthogonal to m afterwards


def test_reorient_branch_by_hand_orthogonal():
    # Δ = [1, 0] (‖Δ‖ = 1), m = [0, 2] (‖m‖ = 2): c = 0 < c_ok = 0.5 → reorient.
    # conf = 1/(1 + 1·2) = 1/3; k_d = 0.75: λ = min(0.75·(1 − 0)·1/3, 1) = 0.25
    # ũ = 0.75·[1, 0] + 0.25·[0, 1] = [0.75, 0.25]; ‖ũ‖ = √0.625 = √10/4
    # Δ̂ = 1·ũ/‖ũ‖ = [3/√10, 1/√10]
    (out,), stats = correct([t(1, 0)], [t(0, 2)], reorient_strength=0.75)
    torch.testing.assert_close(out, t(3 / math.sqrt(10), 1 / math.sqrt(10)), rtol=1e-6, atol=1e-7)
    assert (stats.blocks_kept, stats.blocks_shrunk, stats.blocks_reoriented) == (0, 0, 1)
    assert stats.elements_reoriented == 2


def test_reorient_branch_by_hand_positive_cosine():
    # Δ = [3, 4], m = [1, 0]: c = 0.6 < c_ok = 0.8. κ = 0 → conf = 5/5 = 1.
    # λ = min(0.5·(1 − 0.6)·1, 1) = 0.2;  ũ = 0.8·[0.6, 0.8] + 0.2·[1, 0] = [0.68, 0.64]
    # ‖ũ‖² = 0.68² + 0.64² = 0.872;  Δ̂ = 5·[0.68, 0.64]/√0.872 ≈ [3.641, 3.427] (norm 5 kept)
    (out,), _ = correct([t(3, 4)], [t(1, 0)], keep_threshold=0.8, kappa=0.0)
    expected = 5 * t(0.68, 0.64) / math.sqrt(0.872)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert float(out.norm()) == pytest.approx(5.0, rel=1e-6)


def test_normalized_schedule_by_hand_orthogonal():
    # Δ = [1, 0], m = [0, 2]: c = 0, c_ok = 0.5, cos_bad = −0.2: t = (0 + 0.2)/(0.5 + 0.2) = 2/7;
    # conf = 1/(1 + 1·2) = 1/3; k_d = 0.75: λ = 0.75·(1 − 2/7)·1/3 = 5/28
    # ũ = (23/28)·[1, 0] + (5/28)·[0, 1];  Δ̂ = ‖Δ‖·ũ/‖ũ‖ = [23, 5]/√554
    (out,), stats = correct(
        [t(1, 0)], [t(0, 2)], reorient_strength=0.75, reorient_schedule="normalized", cos_bad=-0.2
    )
    torch.testing.assert_close(out, t(23, 5) / math.sqrt(554), rtol=1e-6, atol=1e-7)
    assert stats.lambdas == pytest.approx([5 / 28])


def test_normalized_schedule_by_hand_positive_cosine():
    # Δ = [3, 4] (‖Δ‖ = 5), m = [1, 0]: c = 0.6; c_ok = 0.8, cos_bad = −0.2: t = 0.8/1.0 = 0.8;
    # conf = 5/(5 + 1) = 5/6; k_d = 1: λ = 1·0.2·5/6 = 1/6
    # ũ = (5/6)·[0.6, 0.8] + (1/6)·[1, 0] = [2/3, 2/3];  Δ̂ = 5·ũ/‖ũ‖ = [5/√2, 5/√2]
    # (the printed λ = 1·(1 − 0.6)·5/6 = 1/3 would give ũ = [11/15, 8/15], Δ̂ = 5·[11, 8]/√185)
    hp = dict(keep_threshold=0.8, reorient_strength=1.0, cos_bad=-0.2)
    (out,), stats = correct([t(3, 4)], [t(1, 0)], reorient_schedule="normalized", **hp)
    torch.testing.assert_close(out, t(5, 5) / math.sqrt(2), rtol=1e-6, atol=1e-6)
    assert stats.lambdas == pytest.approx([1 / 6])
    (printed,), stats = correct([t(3, 4)], [t(1, 0)], reorient_schedule="printed", **hp)
    torch.testing.assert_close(printed, 5 * t(11, 8) / math.sqrt(185), rtol=1e-6, atol=1e-6)
    assert stats.lambdas == pytest.approx([1 / 3])


def test_normalized_schedule_vanishes_at_the_keep_threshold():
    # just below c_ok the normalised λ is ~0 (no jump between reorient and keep); the printed one is not
    d, m = [t(0.6, 0.8)], [t(1, 0)]  # c = 0.6
    _, normalized = correct(d, m, keep_threshold=0.6 + 1e-6, reorient_schedule="normalized")
    _, printed = correct(d, m, keep_threshold=0.6 + 1e-6, reorient_schedule="printed")
    assert normalized.lambdas[0] < 1e-5 < 0.05 < printed.lambdas[0]  # printed: 0.5·0.4·0.5


def test_confidence_scale_is_a_weight_applied_before_the_correction_by_hand():
    # Correcting 2Δ with Δ = [3, 4], m = [−1, 0]: conf = 10/(10 + 1) = 10/11, β = 0.6·10/11 = 6/11,
    # 2Δ − β·(−0.6)·10·[−1, 0] = [6 − 36/11, 8] = [30/11, 8] = 2·(correction of Δ with scale 2)
    (weighted,), _ = correct([t(6, 8)], [t(-1, 0)])
    (scaled,), stats = correct([t(3, 4)], [t(-1, 0)], confidence_scale=2.0)
    torch.testing.assert_close(weighted, t(30 / 11, 8), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(2 * scaled, weighted, rtol=1e-6, atol=1e-6)
    assert stats.betas == pytest.approx([6 / 11])
    # without the scale the correction sees conf = 5/6 (β = 0.5) and gives [1.5, 4]
    (plain,), _ = correct([t(3, 4)], [t(-1, 0)])
    torch.testing.assert_close(plain, t(1.5, 4), rtol=1e-6, atol=1e-6)


def test_relative_change_and_strength_stats_by_hand():
    # shrink of [3, 4] to [1.5, 4]: ‖Δ̂ − Δ‖ = 1.5, ‖Δ‖ = 5 → 0.3, β = 0.5; a kept block [0, 1]
    # (against m = [0, 1]) counts 0 in both means, as in the authors' logs: 0.15 and 0.25
    _, stats = correct([t(3, 4), t(0, 1)], [t(-1, 0), t(0, 1)])
    assert stats.betas == pytest.approx([0.5]) and stats.lambdas == []
    assert stats.relative_changes == pytest.approx([0.3, 0.0])
    summary = stats.as_dict()
    assert summary["mean_relative_change"] == pytest.approx(0.15)
    assert summary["mean_beta"] == pytest.approx(0.25) and summary["mean_lambda"] == 0.0
    assert summary["frac_blocks_corrected"] == 0.5


def test_reorient_lambda_is_capped_at_one():
    # λ = min(100·0.4·1, 1) = 1 → ũ = m/‖m‖, Δ̂ = ‖Δ‖·m/‖m‖ = [5, 0].
    (out,), _ = correct([t(3, 4)], [t(1, 0)], keep_threshold=0.8, kappa=0.0, reorient_strength=100.0)
    torch.testing.assert_close(out, t(5, 0), rtol=1e-6, atol=1e-6)


def test_project_variant_does_not_reorient():
    (out,), stats = correct([t(3, 4)], [t(1, 0)], keep_threshold=0.8, variant="project")
    assert torch.equal(out, t(3, 4))
    assert stats.blocks_kept == 1 and stats.cosines == pytest.approx([0.6])


@pytest.mark.parametrize(
    ("delta", "mom"),
    [(t(3, -4), t(0, 0)), (t(0, 0), t(1, 2)), (t(0, 0), t(0, 0))],
    ids=["zero-momentum", "zero-delta", "both-zero"],
)
def test_zero_blocks_are_kept_with_cosine_zero(delta, mom):
    (out,), stats = correct([delta], [mom])
    assert torch.equal(out, delta)
    assert stats.blocks_kept == 1 and stats.cosines == [0.0]


def test_mixed_blocks_stats_and_as_dict():
    delta = [t(1, 0), t(3, 4), t(1, 0, 0), t(0, 0)]
    mom = [t(1, 1), t(-1, 0), t(0, 2, 0), t(1, 1)]
    out, stats = correct(delta, mom)
    assert (stats.blocks_kept, stats.blocks_shrunk, stats.blocks_reoriented) == (2, 1, 1)
    assert (stats.elements_kept, stats.elements_shrunk, stats.elements_reoriented) == (4, 2, 3)
    assert stats.num_blocks == 4 and stats.num_elements == 9
    d = stats.as_dict()
    assert d["frac_blocks_kept"] == 0.5 and d["frac_blocks_shrunk"] == 0.25
    assert d["frac_elements_reoriented"] == pytest.approx(3 / 9)
    # cosines: 1/√2, −0.6, 0, 0 → mean (1/√2 − 0.6)/4, min −0.6
    assert d["mean_cosine"] == pytest.approx((1 / math.sqrt(2) - 0.6) / 4, rel=1e-6)
    assert d["min_cosine"] == pytest.approx(-0.6, rel=1e-6)
    assert all(isinstance(v, float) for v in d.values())
    torch.testing.assert_close(out[1], t(1.5, 4), rtol=1e-6, atol=1e-6)
    # the momentum is never touched
    assert torch.equal(mom[1], t(-1, 0))


def test_concat_adds_counts():
    a = CorrectionStats(1, 2, 0, 10, 20, 0, [0.1, -0.2, -0.3])
    b = CorrectionStats(0, 0, 1, 0, 0, 5, [0.05])
    c = CorrectionStats.concat([a, b])
    assert (c.blocks_kept, c.blocks_shrunk, c.blocks_reoriented) == (1, 2, 1)
    assert (c.elements_kept, c.elements_shrunk, c.elements_reoriented) == (10, 20, 5)
    assert c.cosines == [0.1, -0.2, -0.3, 0.05]
    assert CorrectionStats().as_dict()["mean_cosine"] == 0.0


def _random_blocks(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 5), (2, 3, 4), (64,), (1,)]
    moms = [torch.randn(s, generator=g) for s in shapes]
    # aligned, opposite, orthogonal-ish, noise, zero-delta: every branch occurs
    deltas = [
        2 * moms[0] + 0.1 * torch.randn(shapes[0], generator=g),
        -moms[1] + 0.3 * torch.randn(shapes[1], generator=g),
        torch.randn(shapes[2], generator=g),
        torch.randn(shapes[3], generator=g),
        torch.zeros(shapes[4]),
    ]
    return deltas, moms


@pytest.mark.parametrize("variant", ["full", "project"])
def test_foreach_and_per_tensor_paths_are_bit_identical(variant):
    deltas, moms = _random_blocks(0)
    hp = dict(HP, keep_threshold=0.3, eps=1e-8, variant=variant)
    a = [d.clone() for d in deltas]
    b = [d.clone() for d in deltas]
    sa = correct_pseudo_gradient(a, moms, foreach=True, **hp)
    sb = correct_pseudo_gradient(b, moms, foreach=False, **hp)
    assert sa == sb
    assert sa.blocks_shrunk >= 1 and (variant == "project" or sa.blocks_reoriented >= 1)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_mismatched_blocks_raise():
    with pytest.raises(ValueError, match="same number of tensors"):
        correct_pseudo_gradient([t(1, 2)], [t(1, 2), t(3)], **HP)
    with pytest.raises(ValueError, match=r"block 1: .*shape \(3,\).*\(2,\)"):
        correct_pseudo_gradient([t(1, 2), t(1, 2, 3)], [t(1, 2), t(1, 2)], **HP)
    with pytest.raises(ValueError, match=r"block 0: .*dtype"):
        correct_pseudo_gradient([t(1, 2)], [t(1, 2).double()], **HP)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("variant", "pcgrad", r"variant must be one of \['full', 'project'\]"),
        ("keep_threshold", -0.1, "keep_threshold must be in"),
        ("keep_threshold", 1.5, "keep_threshold must be in"),
        ("shrink_strength", -1.0, "shrink_strength must be"),
        ("shrink_max", -0.5, "shrink_max must be"),
        ("reorient_strength", -2.0, "reorient_strength must be"),
        ("kappa", -1.0, "kappa must be"),
        ("eps", -1e-8, "eps must be"),
        ("kappa", float("nan"), "kappa must be"),
    ],
)
def test_bad_hyperparameters_raise(field, value, message):
    with pytest.raises(ValueError, match=message):
        correct_pseudo_gradient([t(1, 2)], [t(1, 2)], **{**HP, field: value})


def test_non_finite_input_raises_before_modifying_anything():
    deltas = [t(3, 4), t(1, float("nan"))]
    with pytest.raises(ValueError, match=r"block 1: .*NaN or Inf"):
        correct_pseudo_gradient(deltas, [t(-1, 0), t(1, 1)], **HP)
    assert torch.equal(deltas[0], t(3, 4))  # block 0 would have been shrunk


def test_extreme_magnitudes_stay_finite():
    big = torch.full((4,), 3e38)  # ‖big‖ = 6e38 overflows float32
    # Block 0: Δ = big, m = [−1, 0, 0, 0]: c = −3e38/6e38 = −0.5, conf ≈ 1, β = 0.5:
    #   Δ̂ = Δ − 0.5·(−0.5)·6e38·[−1, 0, 0, 0] = [3e38 − 1.5e38, 3e38, 3e38, 3e38]
    # Block 1: Δ = 1e19·[−1, 2, 0, 0], m = [1e-20, 0, 0, 0] (its square is subnormal; the shrink
    #   coefficient ~4.5e38 overflows float32): c = −1/√5, conf ≈ 1, β = 1/√5:
    #   Δ̂ = Δ − β·c·‖Δ‖·[1, 0, 0, 0] = 1e19·[−1 + (1/5)·√5, 2, 0, 0]
    # Block 2: Δ = −big, m = big: c = −1, conf = 1/2, β = 1/2: Δ̂ = −big + big/2 = −1.5e38
    deltas = [big.clone(), 1e19 * t(-1, 2, 0, 0), -big]
    moms = [t(-1, 0, 0, 0), t(1e-20, 0, 0, 0), big]
    stats = correct_pseudo_gradient(deltas, moms, **{**HP, "eps": 1e-8})
    assert stats.blocks_shrunk == 3
    torch.testing.assert_close(deltas[0], t(1.5e38, 3e38, 3e38, 3e38), rtol=1e-6, atol=0)
    torch.testing.assert_close(deltas[1], 1e19 * t(-1 + 1 / math.sqrt(5), 2, 0, 0), rtol=1e-6, atol=0)
    torch.testing.assert_close(deltas[2], torch.full((4,), -1.5e38), rtol=1e-6, atol=0)


def test_block_whose_correction_would_overflow_is_kept():
    # β = β_max = 3 would give [3e38 − 9e38, 3e38]: not representable, so the block stays as it is.
    delta = t(3e38, 3e38)
    (out,), stats = correct([delta], [t(-1, 0)], shrink_strength=100.0, shrink_max=3.0)
    assert torch.equal(out, delta)
    assert stats.blocks_kept == 1


# ---------------------------------------------------------------- property tests

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
moderate = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)
hparams = st.fixed_dictionaries(
    {
        "keep_threshold": st.floats(0.0, 1.0),
        "shrink_strength": st.floats(0.0, 10.0),
        "shrink_max": st.floats(0.0, 3.0),
        "reorient_strength": st.floats(0.0, 10.0),
        "kappa": st.floats(0.0, 10.0),
        "eps": st.sampled_from([0.0, 1e-8, 1e-3]),
        "variant": st.sampled_from(["full", "project"]),
        "reorient_schedule": st.sampled_from(["normalized", "printed"]),
        "cos_bad": st.floats(-1.0, 0.0),
    }
)


@st.composite
def block_pairs(draw, elements=moderate):
    n_blocks = draw(st.integers(1, 4))
    deltas, moms = [], []
    for _ in range(n_blocks):
        n = draw(st.integers(1, 3))
        deltas.append(torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=torch.float32))
        moms.append(torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=torch.float32))
    return deltas, moms


def _cos64(d: torch.Tensor, m: torch.Tensor) -> float:
    d, m = d.double(), m.double()
    nd, nm = float(d.norm()), float(m.norm())
    return float(d @ m) / (nd * nm) if nd > 0 and nm > 0 else 0.0


@settings(max_examples=200, deadline=None)
@given(block_pairs(), hparams)
def test_aligned_blocks_are_unchanged(pair, hp):
    deltas, moms = pair
    aligned = [_cos64(d, m) >= hp["keep_threshold"] + 1e-5 for d, m in zip(deltas, moms, strict=True)]
    assume(any(aligned))
    out = [d.clone() for d in deltas]
    correct_pseudo_gradient(out, moms, **hp)
    for a, d, o in zip(aligned, deltas, out, strict=True):
        if a:
            assert torch.equal(o, d)


@settings(max_examples=200, deadline=None)
@given(block_pairs(), hparams)
def test_correction_never_increases_conflict_with_momentum(pair, hp):
    # Shrink removes part of the component along −m and reorientation turns Δ towards m, so
    # ⟨Δ̂, m⟩ ≥ ⟨Δ, m⟩ for every block (up to float32 rounding).
    deltas, moms = pair
    out = [d.clone() for d in deltas]
    correct_pseudo_gradient(out, moms, **hp)
    for d, o, m in zip(deltas, out, moms, strict=True):
        before, after = float(d.double() @ m.double()), float(o.double() @ m.double())
        tol = 1e-5 * float(d.double().norm() * m.double().norm()) + 1e-30
        assert after >= before - tol


@settings(max_examples=200, deadline=None)
@given(block_pairs(elements=finite32), hparams)
def test_deterministic_and_finite_for_any_finite_input(pair, hp):
    deltas, moms = pair
    a = [d.clone() for d in deltas]
    b = [d.clone() for d in deltas]
    sa = correct_pseudo_gradient(a, moms, **hp)
    sb = correct_pseudo_gradient(b, moms, **hp)
    assert sa == sb
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
        assert bool(torch.isfinite(x).all())
    assert all(math.isfinite(c) and -1.0 <= c <= 1.0 for c in sa.cosines)


@settings(max_examples=200, deadline=None)
@given(block_pairs(), hparams)
def test_reorientation_preserves_the_norm(pair, hp):
    # Only shrinking changes a block's norm: reoriented (and kept) blocks keep ‖Δ_b‖.
    deltas, moms = pair
    hp = {**hp, "variant": "full", "keep_threshold": max(hp["keep_threshold"], 0.5)}
    out = [d.clone() for d in deltas]
    stats = correct_pseudo_gradient(out, moms, **hp)
    assume(stats.blocks_reoriented > 0)
    for d, o, c in zip(deltas, out, stats.cosines, strict=True):
        if c >= 0.0:
            assert float(o.double().norm()) == pytest.approx(float(d.double().norm()), rel=1e-5, abs=1e-30)


def test_plan_then_apply_out_of_place_matches_in_place():
    deltas, moms = _random_blocks(3)
    hp = dict(HP, keep_threshold=0.3, eps=1e-8)
    originals = [d.clone() for d in deltas]
    plan = plan_correction(deltas, moms, **hp)
    assert plan.corrected and len(plan.corrected) < len(deltas)
    out = [torch.full_like(d, float("nan")) for d in deltas]
    result = apply_correction(plan, deltas, moms, out=out)
    for i, (d, o) in enumerate(zip(deltas, originals, strict=True)):
        assert torch.equal(d, o)  # inputs untouched
        assert result[i] is (out[i] if i in plan.corrected else deltas[i])  # kept blocks are not copied
    in_place = [d.clone() for d in deltas]
    stats = correct_pseudo_gradient(in_place, moms, **hp)
    assert stats == plan.stats
    for r, x in zip(result, in_place, strict=True):
        assert torch.equal(r, x)


@settings(max_examples=200, deadline=None)
@given(block_pairs(), hparams, st.floats(0.01, 10.0))
def test_confidence_scale_equals_correcting_the_weighted_delta(pair, hp, w):
    deltas, moms = pair
    # an identity of real numbers: entries near fp32's underflow can make one side's dot product 0
    # (Δ = [0, 1], m = [1, 1e-45]: 0.5·1e-45 rounds to 0) and flip the branch; keep them away from it
    assume(all(bool(((x == 0) | (x.abs() >= 1e-15)).all()) for x in [*deltas, *moms]))
    weighted = [d * w for d in deltas]
    correct_pseudo_gradient(weighted, moms, **hp)
    scaled = [d.clone() for d in deltas]
    correct_pseudo_gradient(scaled, moms, **hp, confidence_scale=w)
    for a, b in zip(weighted, scaled, strict=True):
        torch.testing.assert_close(a, b * w, rtol=1e-4, atol=1e-3 * (1 + float(a.abs().max())))


@settings(max_examples=200, deadline=None)
@given(block_pairs(), hparams)
def test_normalized_lambda_never_exceeds_the_printed_one(pair, hp):
    deltas, moms = pair
    printed = correct_pseudo_gradient(
        [d.clone() for d in deltas], moms, **{**hp, "reorient_schedule": "printed"}
    )
    normalized = correct_pseudo_gradient(
        [d.clone() for d in deltas], moms, **{**hp, "reorient_schedule": "normalized"}
    )
    assert len(printed.lambdas) == len(normalized.lambdas)
    for a, b in zip(normalized.lambdas, printed.lambdas, strict=True):
        assert a <= b + 1e-12
