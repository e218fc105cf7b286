"""HeLoCo's correction of a stale pseudo-gradient against the outer momentum (arXiv 2606.00271).

A stale pseudo-gradient Δ was computed from old parameters; the outer momentum m is the best estimate
of where optimisation is heading now. Per tensor block b (one parameter tensor), with
c_b = cos(Δ_b, m_b) and the confidence conf_b = ‖Δ_b‖ / (‖Δ_b‖ + κ‖m_b‖ + ε):

* keep      (c_b ≥ c_ok):      Δ_b is left as it is;
* shrink    (c_b < 0):         Δ_b − β_b·c_b·‖Δ_b‖·m_b/‖m_b‖ with β_b = min(k_s·(−c_b)·conf_b, β_max),
  i.e. part of the component that fights the momentum is removed (β_b = 1 is PCGrad's projection,
  Yu et al. 2020, arXiv 2001.06782);
* reorient  (0 ≤ c_b < c_ok):  Δ_b is turned towards m_b, ũ = (1−λ_b)·Δ_b/‖Δ_b‖ + λ_b·m_b/‖m_b‖,
  then rescaled to keep its norm: ‖Δ_b‖·ũ / max(‖ũ‖, ε). Two schedules for λ_b:
  "normalized" (the authors' experiment code): t_b = clamp((c_b − cos_bad)/(c_ok − cos_bad), 0, 1),
  λ_b = min(k_d·(1 − t_b)·conf_b, 1), which goes to 0 as c_b reaches c_ok (no jump at the threshold);
  "printed" (the paper's equation as printed): λ_b = min(k_d·(1 − c_b)·conf_b, 1).

``confidence_scale`` w multiplies ‖Δ_b‖ inside conf only: conf_b = w‖Δ_b‖ / (w‖Δ_b‖ + κ‖m_b‖ + ε).
Correcting wΔ (an arrival weight applied *before* the correction, as the authors' experiments do)
equals w times the correction of Δ with that confidence, since both branches are linear in ‖Δ_b‖.

Blocks where Δ_b or m_b is zero are kept (cosine reported as 0.0). The variant "project" uses β_b = 1
and never reorients.

Implementation: every corrected block is Δ̂_b = s_b·Δ_b + r_b·m_b for two scalars. The sums ‖Δ_b‖²,
‖m_b‖² and ⟨Δ_b, m_b⟩ are computed on the device as dot products and brought to the host in one
transfer (:mod:`heloco.correction_measure`); the scalars are computed there in float64 (‖ũ‖ follows
from c_b in closed form: ‖ũ‖² = (1−λ)² + λ² + 2λ(1−λ)c); the updates are applied with
``torch._foreach_*`` ops grouped by branch (or a per-tensor loop, chosen once), without temporary
tensors. :func:`plan_correction` (validate the hyperparameters, then :func:`plan_blocks`: measure and
decide) and :func:`apply_correction` (write Δ̂ in place or into caller-provided buffers) are separate
so that an optimizer can correct into preallocated buffers and leave ``p.grad`` alone; an optimizer,
whose :class:`CorrectionHParams` were validated when they were set, calls :func:`plan_blocks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from heloco.correction_measure import block_statistics, check_blocks
from heloco.correction_stats import CorrectionStats
from heloco.validation import check_number

__all__ = [
    "CORRECTION_VARIANTS",
    "REORIENT_SCHEDULES",
    "CorrectionHParams",
    "CorrectionPlan",
    "CorrectionStats",
    "apply_correction",
    "correct_pseudo_gradient",
    "plan_blocks",
    "plan_correction",
    "validate_correction_hparams",
]

CORRECTION_VARIANTS = ("full", "project")
REORIENT_SCHEDULES = ("normalized", "printed")

_KEEP, _SHRINK, _REORIENT = 0, 1, 2


def validate_correction_hparams(
    *,
    keep_threshold: float,
    shrink_strength: float,
    shrink_max: float,
    reorient_strength: float,
    kappa: float,
    eps: float,
    variant: str,
    reorient_schedule: str = "normalized",
    cos_bad: float = -0.2,
    variants: Sequence[str] = CORRECTION_VARIANTS,
) -> None:
    """Raise ValueError naming the first bad hyperparameter and its accepted values."""
    if variant not in variants:
        raise ValueError(f"variant must be one of {list(variants)}, got {variant!r}")
    if reorient_schedule not in REORIENT_SCHEDULES:
        raise ValueError(
            f"reorient_schedule must be one of {list(REORIENT_SCHEDULES)}, got {reorient_schedule!r}"
        )
    check_number("cos_bad", cos_bad, -1.0, 0.0)
    check_number("keep_threshold", keep_threshold, 0.0, 1.0)
    check_number("shrink_strength", shrink_strength, 0.0)
    check_number("shrink_max", shrink_max, 0.0)
    check_number("reorient_strength", reorient_strength, 0.0)
    check_number("kappa", kappa, 0.0)
    check_number("eps", eps, 0.0)


@dataclass(frozen=True)
class CorrectionHParams:
    """The correction's hyperparameters (see the module docstring), unchecked until ``validate``."""

    keep_threshold: float
    shrink_strength: float
    shrink_max: float
    reorient_strength: float
    kappa: float
    eps: float = 1e-8
    variant: str = "full"
    reorient_schedule: str = "normalized"
    cos_bad: float = -0.2

    def validate(self, variants: Sequence[str] = CORRECTION_VARIANTS) -> CorrectionHParams:
        """Raise ValueError naming the first bad value (``validate_correction_hparams``); return self."""
        validate_correction_hparams(**asdict(self), variants=variants)
        return self


def _plan_block(
    nd: float, nm: float, dot: float, hp: CorrectionHParams, confidence_scale: float
) -> tuple[int, float, float, float, float]:
    """Branch, cosine, strength (β or λ; 0 when kept) and the scalars (s, r) of Δ̂ = s·Δ + r·m for
    one block, in float64."""
    if nd == 0.0 or nm == 0.0:
        return _KEEP, 0.0, 0.0, 1.0, 0.0
    c = min(max(dot / (nd * nm), -1.0), 1.0)
    if c >= hp.keep_threshold:
        return _KEEP, c, 0.0, 1.0, 0.0
    scaled = confidence_scale * nd
    conf = scaled / (scaled + hp.kappa * nm + hp.eps)
    if c < 0.0:
        beta = 1.0 if hp.variant == "project" else min(hp.shrink_strength * (-c) * conf, hp.shrink_max)
        return _SHRINK, c, beta, 1.0, -beta * c * nd / nm
    if hp.variant == "project":
        return _KEEP, c, 0.0, 1.0, 0.0
    if hp.reorient_schedule == "normalized":  # here cos_bad ≤ 0 ≤ c < keep_threshold
        t = min(max((c - hp.cos_bad) / (hp.keep_threshold - hp.cos_bad), 0.0), 1.0)
        lam = min(hp.reorient_strength * (1.0 - t) * conf, 1.0)
    else:
        lam = min(hp.reorient_strength * (1.0 - c) * conf, 1.0)
    norm_u = math.sqrt(max((1.0 - lam) ** 2 + lam**2 + 2.0 * lam * (1.0 - lam) * c, 0.0))
    den = max(norm_u, hp.eps)
    return _REORIENT, c, lam, (1.0 - lam) / den, lam * nd / (nm * den)


def _fits(dtype: torch.dtype, nd: float, nm: float, s: float, r: float) -> bool:
    """Whether s·Δ + r·m can be evaluated in ``dtype`` without overflow (|x_i| ≤ ‖x‖ bounds every term)."""
    big = torch.finfo(dtype).max / 2
    return abs(r) <= big and abs(s) * nd + abs(r) * nm <= big


@dataclass
class CorrectionPlan:
    """What to do to each block: Δ̂_b = s_b·Δ_b + r_b·m_b for the corrected ones (see plan_correction)."""

    stats: CorrectionStats
    shrink: list[tuple[int, float]] = field(default_factory=list)  # (block, r); s = 1
    reorient: list[tuple[int, float, float]] = field(default_factory=list)  # (block, s, r)
    wide: list[tuple[int, float, float]] = field(default_factory=list)  # (block, s, r), done in float64

    @property
    def corrected(self) -> list[int]:
        """Indices of the blocks that change."""
        return sorted(
            [i for i, _ in self.shrink] + [i for i, _, _ in self.reorient] + [i for i, _, _ in self.wide]
        )


def plan_correction(
    pseudo_grads: Sequence[Tensor],
    momentum: Sequence[Tensor],
    *,
    keep_threshold: float,
    shrink_strength: float,
    shrink_max: float,
    reorient_strength: float,
    kappa: float,
    eps: float = 1e-8,
    variant: str = "full",
    reorient_schedule: str = "normalized",
    cos_bad: float = -0.2,
    confidence_scale: float = 1.0,
    foreach: bool | None = None,
) -> CorrectionPlan:
    """Validate the hyperparameters, then ``plan_blocks``; modifies nothing.

    Raises ValueError on bad hyperparameters, mismatched blocks, or NaN/Inf in the inputs.
    """
    hp = CorrectionHParams(
        keep_threshold=keep_threshold,
        shrink_strength=shrink_strength,
        shrink_max=shrink_max,
        reorient_strength=reorient_strength,
        kappa=kappa,
        eps=eps,
        variant=variant,
        reorient_schedule=reorient_schedule,
        cos_bad=cos_bad,
    ).validate()
    check_number("confidence_scale", confidence_scale, 0.0)
    return plan_blocks(pseudo_grads, momentum, hp, confidence_scale=confidence_scale, foreach=foreach)


def plan_blocks(
    pseudo_grads: Sequence[Tensor],
    momentum: Sequence[Tensor],
    hp: CorrectionHParams,
    *,
    confidence_scale: float = 1.0,
    foreach: bool | None = None,
) -> CorrectionPlan:
    """Measure every block and decide its branch; modifies nothing. ``hp`` and ``confidence_scale``
    are taken as valid (an optimizer checks them once, when they are set).

    Raises ValueError on mismatched blocks (shape, dtype, device) or NaN/Inf in the inputs, found
    from the sums the plan needs anyway (no extra pass over the tensors).
    """
    deltas, moms = list(pseudo_grads), list(momentum)
    check_blocks(deltas, moms)
    plan = CorrectionPlan(CorrectionStats())
    stats = plan.stats
    for i, (nd, nm, dot) in enumerate(block_statistics(deltas, moms, foreach is not False)):
        branch, c, strength, s, r = _plan_block(nd, nm, dot, hp, confidence_scale)
        wide = branch != _KEEP and not _fits(deltas[i].dtype, nd, nm, s, r)
        if wide and not bool(torch.isfinite(_wide_result(deltas[i], moms[i], s, r)).all()):
            branch = _KEEP  # Δ̂ is not representable in the tensor's dtype: leave the block as it is
        stats.cosines.append(c)
        numel = deltas[i].numel()
        if branch == _KEEP:
            stats.blocks_kept += 1
            stats.elements_kept += numel
            stats.relative_changes.append(0.0)
            continue
        # ‖Δ̂ − Δ‖² = ‖(s − 1)Δ + r·m‖², from the sums already measured.
        change = (s - 1.0) ** 2 * nd * nd + r * r * nm * nm + 2.0 * (s - 1.0) * r * dot
        stats.relative_changes.append(math.sqrt(max(change, 0.0)) / nd)
        if branch == _SHRINK:
            stats.blocks_shrunk += 1
            stats.elements_shrunk += numel
            stats.betas.append(strength)
        else:
            stats.blocks_reoriented += 1
            stats.elements_reoriented += numel
            stats.lambdas.append(strength)
        if wide:
            plan.wide.append((i, s, r))
        elif branch == _SHRINK:
            plan.shrink.append((i, r))
        else:
            plan.reorient.append((i, s, r))
    return plan


def _wide_result(d: Tensor, m: Tensor, s: float, r: float) -> Tensor:
    """s·Δ + r·m evaluated in float64 (huge Δ or subnormal m), rounded to Δ's dtype."""
    return (d.double() * s + m.double() * r).to(d.dtype)


def apply_correction(
    plan: CorrectionPlan,
    pseudo_grads: Sequence[Tensor],
    momentum: Sequence[Tensor],
    *,
    out: Sequence[Tensor] | None = None,
    foreach: bool | None = None,
) -> list[Tensor]:
    """Write Δ̂ of every corrected block into ``out`` (default: ``pseudo_grads``, in place).

    Returns the corrected pseudo-gradient as a list: ``out[i]`` for corrected blocks and
    ``pseudo_grads[i]`` for kept ones, so kept blocks are never copied. ``x += r·m`` is done with
    ``addcmul_(x, m, one, r)`` (a broadcast scalar 1), since ``_foreach_add_`` has no per-tensor
    alpha; nothing is allocated besides those scalars. (Because of the broadcast, CUDA runs this
    through torch's per-tensor fallback rather than a fused kernel; the result is the same.)
    ``foreach=False`` picks the per-tensor implementation, anything else ``torch._foreach_*``.
    """
    deltas, moms = list(pseudo_grads), list(momentum)
    dst = list(deltas) if out is None else list(out)
    if len(dst) != len(deltas):
        raise ValueError(f"out must have {len(deltas)} tensors, got {len(dst)}")
    result = list(deltas)
    for i in plan.corrected:
        result[i] = dst[i]
    copies = [i for i in plan.corrected if dst[i] is not deltas[i]]
    impl = _apply_single_tensor if foreach is False else _apply_multi_tensor
    impl(plan, deltas, moms, dst, copies, _Ones())
    for i, s, r in plan.wide:
        dst[i].copy_(_wide_result(deltas[i], moms[i], s, r))
    return result


class _Ones:
    """A scalar 1 per (device, dtype), made on first use."""

    def __init__(self) -> None:
        self._ones: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def __call__(self, t: Tensor) -> Tensor:
        key = (t.device, t.dtype)
        if key not in self._ones:
            self._ones[key] = torch.ones((), device=t.device, dtype=t.dtype)
        return self._ones[key]


def _apply_multi_tensor(
    plan: CorrectionPlan,
    deltas: list[Tensor],
    moms: list[Tensor],
    dst: list[Tensor],
    copies: list[int],
    one: _Ones,
) -> None:
    shrink_idx = [i for i, _ in plan.shrink]
    reo_idx = [i for i, _, _ in plan.reorient]
    if copies:
        torch._foreach_copy_([dst[i] for i in copies], [deltas[i] for i in copies])
    if shrink_idx:
        torch._foreach_addcmul_(
            [dst[i] for i in shrink_idx],
            [moms[i] for i in shrink_idx],
            [one(moms[i]) for i in shrink_idx],
            [r for _, r in plan.shrink],
        )
    if reo_idx:
        targets = [dst[i] for i in reo_idx]
        torch._foreach_mul_(targets, [s for _, s, _ in plan.reorient])
        torch._foreach_addcmul_(
            targets,
            [moms[i] for i in reo_idx],
            [one(moms[i]) for i in reo_idx],
            [r for _, _, r in plan.reorient],
        )


def _apply_single_tensor(
    plan: CorrectionPlan,
    deltas: list[Tensor],
    moms: list[Tensor],
    dst: list[Tensor],
    copies: list[int],
    one: _Ones,
) -> None:
    for i in copies:
        dst[i].copy_(deltas[i])
    for i, r in plan.shrink:
        dst[i].addcmul_(moms[i], one(moms[i]), value=r)
    for i, s, r in plan.reorient:
        dst[i].mul_(s).addcmul_(moms[i], one(moms[i]), value=r)


def correct_pseudo_gradient(
    pseudo_grads: Sequence[Tensor],
    momentum: Sequence[Tensor],
    *,
    keep_threshold: float,
    shrink_strength: float,
    shrink_max: float,
    reorient_strength: float,
    kappa: float,
    eps: float = 1e-8,
    variant: str = "full",
    reorient_schedule: str = "normalized",
    cos_bad: float = -0.2,
    confidence_scale: float = 1.0,
    foreach: bool | None = None,
) -> CorrectionStats:
    """Correct ``pseudo_grads`` in place, block by block, against ``momentum``; return what was done.

    ``foreach=None`` uses the ``torch._foreach_*`` path (one host sync for the statistics); ``False``
    is a plain per-tensor loop that gives bit-identical results on CPU. Raises ValueError, before
    modifying anything, on bad hyperparameters, mismatched blocks, or NaN/Inf in the inputs.
    """
    plan = plan_correction(
        pseudo_grads,
        momentum,
        keep_threshold=keep_threshold,
        shrink_strength=shrink_strength,
        shrink_max=shrink_max,
        reorient_strength=reorient_strength,
        kappa=kappa,
        eps=eps,
        variant=variant,
        reorient_schedule=reorient_schedule,
        cos_bad=cos_bad,
        confidence_scale=confidence_scale,
        foreach=foreach,
    )
    apply_correction(plan, pseudo_grads, momentum, foreach=foreach)
    return plan.stats
