"""The outer optimizers' math as functions over tensor lists, as ``torch.optim.sgd.sgd`` is for SGD.

``HeLoCo.step`` and ``DelayedNesterov.step`` (:mod:`heloco.optim`) gather each param group's tensors
and call these. Each step picks its implementation once: a per-tensor loop (``foreach=False``) or
``torch._foreach_*`` over the tensors grouped by device and dtype (``group_by_device_and_dtype``;
anything else). On CPU both run the same per-tensor kernels and give bit-identical results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor
from torch.profiler import record_function

from heloco.correction import CorrectionHParams, CorrectionPlan, apply_correction, plan_blocks

__all__ = ["delayed_nesterov_step", "group_by_device_and_dtype", "heloco_step", "plan_heloco_correction"]

T = TypeVar("T")


def group_by_device_and_dtype(*tensorlists: Sequence[Tensor]) -> list[list[int]]:
    """Indices of aligned tensor lists grouped so that within a group every list's tensors share one
    device and dtype (what a fused ``torch._foreach_*`` kernel needs); groups in order of first
    appearance, indices in order."""
    groups: dict[tuple[tuple[torch.device, torch.dtype], ...], list[int]] = {}
    for i, row in enumerate(zip(*tensorlists, strict=True)):
        groups.setdefault(tuple((t.device, t.dtype) for t in row), []).append(i)
    return list(groups.values())


def _take(items: Sequence[T], idx: Sequence[int]) -> list[T]:
    return [items[i] for i in idx]


# ------------------------------------------------------------------------------------------ HeLoCo


def plan_heloco_correction(
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    hp: CorrectionHParams,
    *,
    staleness: int | None,
    weight: float | None,
    correct_fresh: bool,
    weight_before_correction: bool,
    foreach: bool,
) -> CorrectionPlan | None:
    """How HeLoCo corrects Δ = ``grads`` against the momentum, or ``None`` when it does not
    (``variant="none"``, or a fresh arrival with ``correct_fresh=False``). Modifies nothing; raises
    ``ValueError`` on NaN/Inf or mismatched tensors. With ``weight_before_correction`` the weight
    enters the confidence (the correction sees wΔ)."""
    if hp.variant == "none" or not (staleness is None or staleness > 0 or correct_fresh):
        return None
    w_in = 1.0 if weight is None or not weight_before_correction else weight
    with record_function("heloco.correction"):
        return plan_blocks(grads, momentum_buffers, hp, confidence_scale=w_in, foreach=foreach)


def heloco_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    plan: CorrectionPlan | None,
    correction_out: list[Tensor] | None,
    lr: float,
    momentum: float,
    weight: float | None,
    foreach: bool,
    reference: list[Tensor] | None = None,
    step_momentum: float | None = None,
) -> None:
    """HeLoCo's update of one param group: Δ̂ = Δ corrected as ``plan`` says (corrected blocks
    written to ``correction_out``, ``grads`` then only read; with ``correction_out=None`` they are
    corrected in ``grads`` in place), G = w·Δ̂, then the EMA-form Nesterov step::

        m ← μ·m + (1 − μ)·G
        θ ← θ − η·(G + μ_s·m)

    with μ_s = ``step_momentum``, or μ when it is ``None`` (the paper). ``reference`` is what the
    plan compared Δ with (Δ̂_b = s_b·Δ_b + r_b·reference_b); ``None``: the momentum buffers, as in
    the paper.
    """
    updates = grads
    if plan is not None and plan.corrected:
        ref = momentum_buffers if reference is None else reference
        with record_function("heloco.correction"):
            updates = apply_correction(plan, grads, ref, out=correction_out, foreach=foreach)
    impl = _multi_tensor_heloco if foreach else _single_tensor_heloco
    mu_step = momentum if step_momentum is None else step_momentum
    impl(params, updates, momentum_buffers, lr=lr, mu=momentum, mu_step=mu_step, weight=weight)


def _single_tensor_heloco(
    params: list[Tensor],
    updates: list[Tensor],
    bufs: list[Tensor],
    *,
    lr: float,
    mu: float,
    mu_step: float,
    weight: float | None,
) -> None:
    w = 1.0 if weight is None else weight
    for p, g, m in zip(params, updates, bufs, strict=True):
        if weight is None:
            m.lerp_(g, 1.0 - mu)
        else:
            m.mul_(mu).add_(g, alpha=(1.0 - mu) * w)
        p.add_(g, alpha=-lr * w)
        if mu_step:
            p.add_(m, alpha=-lr * mu_step)


def _multi_tensor_heloco(
    params: list[Tensor],
    updates: list[Tensor],
    bufs: list[Tensor],
    *,
    lr: float,
    mu: float,
    mu_step: float,
    weight: float | None,
) -> None:
    w = 1.0 if weight is None else weight
    for idx in group_by_device_and_dtype(params, updates, bufs):
        p, g, m = _take(params, idx), _take(updates, idx), _take(bufs, idx)
        if weight is None:
            torch._foreach_lerp_(m, g, 1.0 - mu)
        else:
            torch._foreach_mul_(m, mu)
            torch._foreach_add_(m, g, alpha=(1.0 - mu) * w)
        torch._foreach_add_(p, g, alpha=-lr * w)
        if mu_step:
            torch._foreach_add_(p, m, alpha=-lr * mu_step)


# ---------------------------------------------------------------------------------- Delayed Nesterov


def delayed_nesterov_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    delay_buffers: list[Tensor],
    flush: list[bool],
    *,
    lr: float,
    momentum: float,
    buffer_size: int,
    activation: float,
    weight: float | None,
    foreach: bool,
) -> None:
    """Delayed Nesterov's update of one param group for one arrival g = w·Δ (``grads`` only read);
    ``flush[i]``: this arrival is the N-th of parameter i's buffer. With β = ``momentum``,
    N = ``buffer_size``, c = ``activation``::

        D ← D + g
        flush:  m ← β·m + D/N;  θ ← θ − η·[(1 − c·N + c)·β·m + g/N];  D ← 0
        else:   θ ← θ − η·[c·β·m + g/N]
    """
    impl = _multi_tensor_delayed_nesterov if foreach else _single_tensor_delayed_nesterov
    impl(
        params,
        grads,
        momentum_buffers,
        delay_buffers,
        flush,
        lr=lr,
        beta=momentum,
        n=buffer_size,
        c=activation,
        weight=weight,
    )


def _single_tensor_delayed_nesterov(
    params: list[Tensor],
    grads: list[Tensor],
    mbufs: list[Tensor],
    dbufs: list[Tensor],
    flush: list[bool],
    *,
    lr: float,
    beta: float,
    n: int,
    c: float,
    weight: float | None,
) -> None:
    for p, g, m, d, f in zip(params, grads, mbufs, dbufs, flush, strict=True):
        if weight is not None:
            g = g.mul(weight)
        d.add_(g)
        if f:
            m.mul_(beta).add_(d, alpha=1.0 / n)
            p.add_(m, alpha=-lr * (1.0 - c * n + c) * beta)
            p.add_(g, alpha=-lr / n)
            d.zero_()
        else:
            if c != 0.0:
                p.add_(m, alpha=-lr * c * beta)
            p.add_(g, alpha=-lr / n)


def _multi_tensor_delayed_nesterov(
    params: list[Tensor],
    grads: list[Tensor],
    mbufs: list[Tensor],
    dbufs: list[Tensor],
    flush: list[bool],
    *,
    lr: float,
    beta: float,
    n: int,
    c: float,
    weight: float | None,
) -> None:
    for idx in group_by_device_and_dtype(params, grads, mbufs, dbufs):
        p, g, m, d = _take(params, idx), _take(grads, idx), _take(mbufs, idx), _take(dbufs, idx)
        if weight is not None:
            g = torch._foreach_mul(g, weight)
        torch._foreach_add_(d, g)
        f_idx = [j for j, i in enumerate(idx) if flush[i]]
        h_idx = [j for j, i in enumerate(idx) if not flush[i]]
        if f_idx:
            p_f, g_f, m_f, d_f = _take(p, f_idx), _take(g, f_idx), _take(m, f_idx), _take(d, f_idx)
            torch._foreach_mul_(m_f, beta)
            torch._foreach_add_(m_f, d_f, alpha=1.0 / n)
            torch._foreach_add_(p_f, m_f, alpha=-lr * (1.0 - c * n + c) * beta)
            torch._foreach_add_(p_f, g_f, alpha=-lr / n)
            torch._foreach_zero_(d_f)
        if h_idx:
            p_h, g_h = _take(p, h_idx), _take(g, h_idx)
            if c != 0.0:
                torch._foreach_add_(p_h, _take(m, h_idx), alpha=-lr * c * beta)
            torch._foreach_add_(p_h, g_h, alpha=-lr / n)
