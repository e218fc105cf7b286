"""What parameters a worker starts from: the aggregator's ``dispatch`` modes and their look-ahead math.

With η and μ the ``lr`` and ``momentum`` of a parameter's group and m its
``state["momentum_buffer"]`` (absent or zero: no extrapolation), a worker is handed

* ``"plain"``: θ;
* ``"lookahead"``: θ − η·μ·m, one step along the momentum, as HeLoCo's authors dispatch
  (arXiv 2606.00271);
* ``"scaled_lookahead"``: θ − η·τ̂_i·μ·m with τ̂_i the running mean of worker i's observed staleness:
  heloco's own reading of momentum look-ahead (ICLR 2025 MCDC workshop; the published rule is not
  public), the point the model is expected to reach while the worker trains.

μ here is the momentum's weight in the outer *step*: a group's ``step_momentum`` where it is set
(HeLoCo's, ours), else its ``momentum``. A look-ahead predicts where the steps will take θ, so a
HeLoCo that steps by Δ alone (``step_momentum=0``) while its momentum serves only as the
correction's reference extrapolates nowhere: its dispatch is plain θ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["DISPATCHES", "dispatched_params", "lookahead_coefs", "resolve_dispatch"]

DISPATCHES = ("plain", "lookahead", "scaled_lookahead")


def resolve_dispatch(dispatch: str, lookahead: bool, optimizer: torch.optim.Optimizer) -> str:
    """The dispatch mode (``lookahead=True`` is the deprecated spelling of ``"scaled_lookahead"``),
    checked against the optimizer: extrapolating needs a ``momentum`` > 0 in its param groups."""
    if lookahead:
        if dispatch not in ("plain", "scaled_lookahead"):
            raise ValueError(f"lookahead=True means dispatch='scaled_lookahead', got dispatch={dispatch!r}")
        dispatch = "scaled_lookahead"
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {list(DISPATCHES)}, got {dispatch!r}")
    if dispatch != "plain":
        groups = optimizer.param_groups
        if not all("momentum" in g and "lr" in g for g in groups) or not any(g["momentum"] for g in groups):
            raise ValueError(
                f"dispatch={dispatch!r} extrapolates along the outer momentum, but "
                f"{type(optimizer).__name__} has no 'momentum' > 0 in its param groups; "
                "use SGD(momentum>0), HeLoCo or DelayedNesterov, or dispatch='plain'"
            )
    return dispatch


def lookahead_coefs(
    mode: str, param_groups: Sequence[Mapping[str, Any]], staleness_mean: float
) -> dict[int, float]:
    """Per param group, the c of the dispatched point θ − c·m (empty: plain θ)."""
    if mode == "plain":
        return {}
    scale = 1.0
    if mode == "scaled_lookahead":
        scale = staleness_mean
        if scale == 0.0:
            return {}
    return {
        g_idx: float(group["lr"]) * scale * _step_momentum(group) for g_idx, group in enumerate(param_groups)
    }


def _step_momentum(group: Mapping[str, Any]) -> float:
    """The weight of m in the group's outer step: ``step_momentum`` where set, else ``momentum``."""
    step_momentum = group.get("step_momentum")
    return float(group["momentum"] if step_momentum is None else step_momentum)


def dispatched_params(
    masters: Sequence[Tensor],
    state: Mapping[Tensor, Mapping[str, Any]],
    group_of: Sequence[int],
    coef_of: Mapping[int, float],
    dest: list[Tensor] | None = None,
) -> list[Tensor]:
    """Copies of ``masters`` extrapolated to θ − c·m (c = ``coef_of[group]``, m the momentum in the
    optimizer ``state``), fresh tensors or written into ``dest`` (any floating dtype and device)."""
    if dest is not None:
        return _into(masters, state, group_of, coef_of, dest)
    out = [p.detach().clone() for p in masters]
    if not coef_of:
        return out
    by_group: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
    for i, p in enumerate(masters):
        m = state.get(p, {}).get("momentum_buffer")
        if isinstance(m, Tensor):
            dst, src = by_group.setdefault(group_of[i], ([], []))
            dst.append(out[i])
            src.append(m)
    for g_idx, (dst, src) in by_group.items():
        coef = coef_of[g_idx]
        if coef != 0.0:
            torch._foreach_add_(dst, src, alpha=-coef)
    return out


def _into(
    masters: Sequence[Tensor],
    state: Mapping[Tensor, Mapping[str, Any]],
    group_of: Sequence[int],
    coef_of: Mapping[int, float],
    dest: list[Tensor],
) -> list[Tensor]:
    """``dispatched_params`` into given tensors in one pass each: an extrapolated tensor is computed as
    ``torch.add(θ, m, alpha=−c, out=d)`` (the same kernel, in the masters' dtype, as the allocating
    path's in-place add, rounded once into ``d``'s dtype), the rest is copied."""
    copy_dst, copy_src = [], []
    for i, (p, d) in enumerate(zip(masters, dest, strict=True)):
        coef = coef_of.get(group_of[i], 0.0)
        m = state.get(p, {}).get("momentum_buffer") if coef != 0.0 else None
        if isinstance(m, Tensor):
            if d.device == p.device:
                torch.add(p.detach(), m, alpha=-coef, out=d)
            else:  # computed where the masters live, then moved: the allocating path's values
                d.copy_(torch.add(p.detach(), m, alpha=-coef))
        else:
            copy_dst.append(d)
            copy_src.append(p.detach())
    if copy_dst:
        torch._foreach_copy_(copy_dst, copy_src)
    return dest
