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
transfer; the scalars are computed there in float64 (‖ũ‖ follows from c_b in closed form:
‖ũ‖² = (1−λ)² + λ² + 2λ(1−λ)c); the updates are applied with ``torch._foreach_*`` ops grouped by
branch, without temporary tensors. :func:`plan_correction` (measure and decide) and
:func:`apply_correction` (write Δ̂ in place or into caller-provided buffers) are separate so that an
optimizer can correct into preallocated buffers and leave ``p.grad`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import Tensor

__all__ = [
    "CORRECTION_VARIANTS",
    "REORIENT_SCHEDULES",
    "CorrectionPlan",
    "CorrectionStats",
    "apply_correction",
    "correct_pseudo_gradient",
    "plan_correction",
    "validate_correction_hparams",
]

CORRECTION_VARIANTS = ("full", "project")
REORIENT_SCHEDULES = ("normalized", "printed")

_KEEP, _SHRINK, _REORIENT = 0, 1, 2


@dataclass
class CorrectionStats:
    """What one correction did, counted over blocks (= parameter tensors) and over their elements."""

    blocks_kept: int = 0
    blocks_shrunk: int = 0
    blocks_reoriented: int = 0
    elements_kept: int = 0
    elements_shrunk: int = 0
    elements_reoriented: int = 0
    cosines: list[float] = field(default_factory=list)  # cos(Δ_b, m_b) per block, 0.0 where a norm is 0
    betas: list[float] = field(default_factory=list)  # β_b of every shrunk block
    lambdas: list[float] = field(default_factory=list)  # λ_b of every reoriented block
    relative_changes: list[float] = field(default_factory=list)  # ‖Δ̂_b − Δ_b‖ / ‖Δ_b‖ per block (0: kept)

    @property
    def num_blocks(self) -> int:
        return self.blocks_kept + self.blocks_shrunk + self.blocks_reoriented

    @property
    def num_elements(self) -> int:
        return self.elements_kept + self.elements_shrunk + self.elements_reoriented

    def as_dict(self) -> dict[str, float]:
        """Flat, JSON-able summary for logging: fractions of blocks/elements per branch, cosine stats."""
        nb, ne = max(self.num_blocks, 1), max(self.num_elements, 1)
        cos = self.cosines
        return {
            "frac_blocks_kept": self.blocks_kept / nb,
            "frac_blocks_shrunk": self.blocks_shrunk / nb,
            "frac_blocks_reoriented": self.blocks_reoriented / nb,
            "frac_elements_kept": self.elements_kept / ne,
            "frac_elements_shrunk": self.elements_shrunk / ne,
            "frac_elements_reoriented": self.elements_reoriented / ne,
            "frac_blocks_corrected": (self.blocks_shrunk + self.blocks_reoriented) / nb,
            "mean_cosine": sum(cos) / len(cos) if cos else 0.0,
            "min_cosine": min(cos) if cos else 0.0,
            # over all blocks (a kept one counts 0), as the authors' logs average them
            "mean_beta": sum(self.betas) / nb,
            "mean_lambda": sum(self.lambdas) / nb,
            "mean_relative_change": _mean(self.relative_changes),
        }

    @classmethod
    def concat(cls, parts: Iterable[CorrectionStats]) -> CorrectionStats:
        """Combine the statistics of several corrections (e.g. one per parameter group)."""
        out = cls()
        for p in parts:
            out.blocks_kept += p.blocks_kept
            out.blocks_shrunk += p.blocks_shrunk
            out.blocks_reoriented += p.blocks_reoriented
            out.elements_kept += p.elements_kept
            out.elements_shrunk += p.elements_shrunk
            out.elements_reoriented += p.elements_reoriented
            out.cosines.extend(p.cosines)
            out.betas.extend(p.betas)
            out.lambdas.extend(p.lambdas)
            out.relative_changes.extend(p.relative_changes)
        return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def check_number(
    name: str, value: object, low: float, high: float | None = None, high_open: bool = False
) -> None:
    """Raise ValueError unless ``value`` is a finite real number in [low, high] (or [low, high))."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if high is None:
            rng = f"a finite number >= {low:g}"
        else:
            rng = f"in [{low:g}, {high:g})" if high_open else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be {rng}, got {value!r}")


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


def _check_blocks(deltas: list[Tensor], moms: list[Tensor]) -> None:
    if len(deltas) != len(moms):
        raise ValueError(
            f"pseudo_grads and momentum must have the same number of tensors, got {len(deltas)} and {len(moms)}"
        )
    for i, (d, m) in enumerate(zip(deltas, moms, strict=True)):
        if not isinstance(d, Tensor) or not isinstance(m, Tensor):
            raise ValueError(f"block {i}: pseudo_grads and momentum must hold tensors")
        if d.shape != m.shape:
            raise ValueError(
                f"block {i}: pseudo-gradient shape {tuple(d.shape)} != momentum shape {tuple(m.shape)}"
            )
        if d.dtype != m.dtype or d.device != m.device:
            raise ValueError(
                f"block {i}: pseudo-gradient ({d.dtype}, {d.device}) and momentum ({m.dtype}, {m.device}) "
                "must share dtype and device"
            )
        if not d.is_floating_point() or d.layout != torch.strided:
            raise ValueError(
                f"block {i}: only dense floating-point tensors are supported, got {d.dtype}/{d.layout}"
            )


def _dot(d: Tensor, m: Tensor) -> Tensor:
    return torch.dot(d.reshape(-1), m.reshape(-1))


def _block_statistics(
    deltas: list[Tensor], moms: list[Tensor], batched: bool
) -> list[tuple[float, float, float]]:
    """(‖Δ_b‖, ‖m_b‖, ⟨Δ_b, m_b⟩) per block as Python floats.

    All three come from dot products: on CPU, torch's (MKL) dot is both faster and more accurate than
    its norm kernel for large fp32 tensors. ``batched`` stacks the 3·n device scalars and moves them
    to the host in one transfer per device; otherwise each is read with ``.item()``.
    """
    n = len(deltas)
    sums: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * n
    if batched:
        by_device: dict[torch.device, list[int]] = {}
        for i, d in enumerate(deltas):
            by_device.setdefault(d.device, []).append(i)
        for idx in by_device.values():
            parts = [_dot(deltas[i], deltas[i]) for i in idx]
            parts += [_dot(moms[i], moms[i]) for i in idx]
            parts += [_dot(deltas[i], moms[i]) for i in idx]
            host = torch.stack(parts).to("cpu", torch.float64).tolist()  # the one sync
            k = len(idx)
            for j, i in enumerate(idx):
                sums[i] = (host[j], host[k + j], host[2 * k + j])
    else:
        sums = [
            (_dot(d, d).item(), _dot(m, m).item(), _dot(d, m).item())
            for d, m in zip(deltas, moms, strict=True)
        ]
    out = []
    for i, (dd, mm, dm) in enumerate(sums):
        stat = (math.sqrt(dd), math.sqrt(mm), dm)
        small = math.sqrt(torch.finfo(deltas[i].dtype).tiny) * 1e4
        if not all(math.isfinite(v) for v in stat) or 0.0 < stat[0] < small or 0.0 < stat[1] < small:
            # Non-finite input, or a sum that overflowed (huge values) or lost precision to subnormals
            # (tiny values) in the tensor dtype: redo this block in float64.
            d, m = deltas[i].double(), moms[i].double()
            stat = (math.sqrt(_dot(d, d).item()), math.sqrt(_dot(m, m).item()), _dot(d, m).item())
            if not all(math.isfinite(v) for v in stat):
                raise ValueError(f"block {i}: pseudo-gradient or momentum contains NaN or Inf")
        out.append(stat)
    return out


def _plan_block(
    nd: float,
    nm: float,
    dot: float,
    *,
    keep_threshold: float,
    shrink_strength: float,
    shrink_max: float,
    reorient_strength: float,
    kappa: float,
    eps: float,
    variant: str,
    reorient_schedule: str,
    cos_bad: float,
    confidence_scale: float,
) -> tuple[int, float, float, float, float]:
    """Branch, cosine, strength (β or λ; 0 when kept) and the scalars (s, r) of Δ̂ = s·Δ + r·m for
    one block, in float64."""
    if nd == 0.0 or nm == 0.0:
        return _KEEP, 0.0, 0.0, 1.0, 0.0
    c = min(max(dot / (nd * nm), -1.0), 1.0)
    if c >= keep_threshold:
        return _KEEP, c, 0.0, 1.0, 0.0
    scaled = confidence_scale * nd
    conf = scaled / (scaled + kappa * nm + eps)
    if c < 0.0:
        beta = 1.0 if variant == "project" else min(shrink_strength * (-c) * conf, shrink_max)
        return _SHRINK, c, beta, 1.0, -beta * c * nd / nm
    if variant == "project":
        return _KEEP, c, 0.0, 1.0, 0.0
    if reorient_schedule == "normalized":  # here cos_bad ≤ 0 ≤ c < keep_threshold
        t = min(max((c - cos_bad) / (keep_threshold - cos_bad), 0.0), 1.0)
        lam = min(reorient_strength * (1.0 - t) * conf, 1.0)
    else:
        lam = min(reorient_strength * (1.0 - c) * conf, 1.0)
    norm_u = math.sqrt(max((1.0 - lam) ** 2 + lam**2 + 2.0 * lam * (1.0 - lam) * c, 0.0))
    den = max(norm_u, eps)
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
    """Validate the inputs, measure every block and decide its branch; modifies nothing.

    Raises ValueError on bad hyperparameters, mismatched blocks, or NaN/Inf in the inputs.
    """
    deltas, moms = list(pseudo_grads), list(momentum)
    validate_correction_hparams(
        keep_threshold=keep_threshold,
        shrink_strength=shrink_strength,
        shrink_max=shrink_max,
        reorient_strength=reorient_strength,
        kappa=kappa,
        eps=eps,
        variant=variant,
        reorient_schedule=reorient_schedule,
        cos_bad=cos_bad,
    )
    check_number("confidence_scale", confidence_scale, 0.0)
    _check_blocks(deltas, moms)
    plan = CorrectionPlan(CorrectionStats())
    stats = plan.stats
    for i, (nd, nm, dot) in enumerate(_block_statistics(deltas, moms, foreach is not False)):
        branch, c, strength, s, r = _plan_block(
            nd,
            nm,
            dot,
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
        )
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
    ``_foreach_addcmul_(x, m, one, r)`` (a broadcast scalar 1), since ``_foreach_add_`` has no
    per-tensor alpha; nothing is allocated besides those scalars. (Because of the broadcast, CUDA runs
    this through torch's per-tensor fallback rather than a fused kernel; the result is the same.)
    """
    deltas, moms = list(pseudo_grads), list(momentum)
    dst = list(deltas) if out is None else list(out)
    if len(dst) != len(deltas):
        raise ValueError(f"out must have {len(deltas)} tensors, got {len(dst)}")
    result = list(deltas)
    for i in plan.corrected:
        result[i] = dst[i]
    copies = [i for i in plan.corrected if dst[i] is not deltas[i]]
    shrink_idx = [i for i, _ in plan.shrink]
    reo_idx = [i for i, _, _ in plan.reorient]
    ones: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def one(t: Tensor) -> Tensor:
        key = (t.device, t.dtype)
        if key not in ones:
            ones[key] = torch.ones((), device=t.device, dtype=t.dtype)
        return ones[key]

    if foreach is not False:
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
    else:
        for i in copies:
            dst[i].copy_(deltas[i])
        for i, r in plan.shrink:
            dst[i].addcmul_(moms[i], one(moms[i]), value=r)
        for i, s, r in plan.reorient:
            dst[i].mul_(s).addcmul_(moms[i], one(moms[i]), value=r)
    for i, s, r in plan.wide:
        dst[i].copy_(_wide_result(deltas[i], moms[i], s, r))
    return result


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
