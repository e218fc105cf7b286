"""Checks shared by the outer optimizers and the aggregator: validate, then mutate.

Everything that can make an outer step fail (bad settings, tensors of the wrong count, shape or
dtype, a pseudo-gradient holding NaN or Inf) is checked here, before anything is changed, so a
rejected request leaves the global model, the optimizer state and the bookkeeping bit for bit as
they were. Settings are checked once, where they are given (constructors, ``add_param_group``,
``load_state_dict``), not on every step; a pseudo-gradient is checked for finiteness once, when it
arrives.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_aggregator_settings",
    "check_finite",
    "check_masters",
    "check_number",
    "check_out",
    "check_tensor_list",
    "is_int",
    "receive",
]


def is_int(x: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_number(
    name: str, value: object, low: float, high: float | None = None, high_open: bool = False
) -> None:
    """Raise ValueError unless ``value`` is a finite real number in [low, high] (or [low, high))."""
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= low
    )
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if high is None:
            rng = f"a finite number >= {low:g}"
        else:
            rng = f"in [{low:g}, {high:g})" if high_open else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be {rng}, got {value!r}")


def check_masters(params: list[Any], optimizer: Any) -> list[int]:
    """Validate the aggregator's master tensors against its outer optimizer; return the index of
    each master's param group."""
    if not params:
        raise ValueError("global_params is empty; pass the master tensors the outer optimizer was built over")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise ValueError(f"global_params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        if not p.is_floating_point():
            raise ValueError(
                f"global_params[{i}] has dtype {p.dtype}; master parameters must be floating point"
            )
    if len({id(p) for p in params}) != len(params):
        raise ValueError("global_params contains the same tensor more than once")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"outer_optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    group_of: dict[int, int] = {}
    for g_idx, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of[id(p)] = g_idx
    ours = {id(p) for p in params}
    extra = sum(1 for p in params if id(p) not in group_of)
    missing = sum(1 for pid in group_of if pid not in ours)
    if extra or missing:
        raise ValueError(
            "global_params must be exactly the tensors in outer_optimizer.param_groups: "
            f"{extra} of the {len(params)} global_params are not in the optimizer and "
            f"{missing} of the optimizer's {len(group_of)} tensors are not in global_params"
        )
    return [group_of[id(p)] for p in params]


def check_tensor_list(tensors: Any, like: Sequence[Tensor], what: str) -> list[Tensor]:
    """``tensors`` as a list, checked to hold one floating-point tensor shaped like each of ``like``."""
    if isinstance(tensors, Tensor) or not isinstance(tensors, Iterable):
        raise ValueError(f"{what} must be a list of {len(like)} tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if len(tensors) != len(like):
        raise ValueError(f"{what} has {len(tensors)} tensors, the global model has {len(like)}")
    for i, (t, p) in enumerate(zip(tensors, like, strict=True)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{what}[{i}] is a {type(t).__name__}, expected a torch.Tensor")
        if t.shape != p.shape:
            raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{what}[{i}] has dtype {t.dtype}, expected a floating-point dtype")
    return tensors


def check_out(out: Any, masters: Sequence[Tensor]) -> list[Tensor] | None:
    """Validate an ``out=`` list (shapes, floating dtype, not the masters themselves)."""
    if out is None:
        return None
    tensors = check_tensor_list(out, masters, "out")
    taken = {p.data_ptr() for p in masters}
    for i, t in enumerate(tensors):
        if t.data_ptr() in taken:
            raise ValueError(f"out[{i}] shares memory with a global parameter; pass separate tensors")
    return out if isinstance(out, list) else tensors  # Update.params is the caller's own list


def check_finite(tensors: Sequence[Tensor], what: str = "pseudo_grads") -> None:
    """Raise ValueError if any tensor holds NaN or Inf: one ``_foreach_norm`` pass, and a per-tensor
    confirmation only when a norm is not finite (a huge finite tensor may overflow its norm)."""
    norms = torch.stack(torch._foreach_norm(list(tensors)))
    if bool(torch.isfinite(norms).all()):
        return
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{what}[{i}] contains NaN or Inf (after conversion to {t.dtype}); nothing was applied"
            )


def receive(
    pseudo_grads: Any, masters: Sequence[Tensor], scratch: list[Tensor], out: list[Tensor] | None = None
) -> list[Tensor]:
    """Validate an arriving Δ and return it in the masters' dtype and device; raise if not finite.

    Δ is converted into ``scratch`` (preallocated like the masters), unless the caller passed the
    very same tensors as ``out`` (a transport answering from the buffer it received Δ in) and they
    already have the masters' dtype, device and layout: then they serve as the scratch directly,
    which saves a model-sized copy (their contents are overwritten by the reply anyway).
    """
    grads = [g.detach() for g in check_tensor_list(pseudo_grads, masters, "pseudo_grads")]
    reuse = out is not None and all(
        o.data_ptr() == g.data_ptr()
        and o.dtype == g.dtype == p.dtype
        and g.device == p.device
        and g.is_contiguous()
        for o, g, p in zip(out, grads, masters, strict=True)
    )
    if reuse:
        incoming = grads
    else:
        incoming = scratch
        torch._foreach_copy_(incoming, grads)
    check_finite(incoming)
    return incoming


def check_aggregator_settings(
    num_workers: Any,
    quorum: Any,
    staleness_weighting: Any,
    staleness_a: Any,
    staleness_b: Any,
    max_staleness: Any,
    arrival_weight: Any,
    *,
    weightings: Sequence[str | None],
) -> None:
    """The ``AsyncAggregator`` constructor's scalar settings (``staleness_weighting`` already
    mapped from ``"none"`` to ``None``; ``weightings``: the accepted ones)."""
    if not is_int(num_workers) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if not is_int(quorum) or not 1 <= quorum <= num_workers:
        raise ValueError(f"quorum must be an int in [1, num_workers={num_workers}], got {quorum!r}")
    if staleness_weighting not in weightings:
        raise ValueError(f"staleness_weighting must be one of {weightings}, got {staleness_weighting!r}")
    check_number("staleness_a", staleness_a, 0.0)
    check_number("staleness_b", staleness_b, 0.0)
    if max_staleness is not None and (not is_int(max_staleness) or max_staleness < 0):
        raise ValueError(f"max_staleness must be None or an int >= 0, got {max_staleness!r}")
    if arrival_weight is not None and (
        not isinstance(arrival_weight, numbers.Real)
        or isinstance(arrival_weight, bool)
        or not (math.isfinite(arrival_weight) and arrival_weight > 0)
    ):
        raise ValueError(f"arrival_weight must be None or a finite number > 0, got {arrival_weight!r}")
