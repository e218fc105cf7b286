"""Map a method name to its outer optimizer and server configuration.

sync            synchronous DiLoCo: quorum K, average, torch SGD with Nesterov (Douillard et al. 2023)
async           naive asynchronous DiLoCo: every arrival gets a torch Nesterov step
async_dn        Delayed Nesterov (Liu et al. 2024); add `dylu: true` for DN + DyLU
lookahead       EMA-form Nesterov, parameters dispatched extrapolated along −momentum (our reading
                of the momentum look-ahead idea; the exact published rule is not public)
heloco          EMA-form Nesterov + HeLoCo's correction of stale pseudo-gradients
heloco_project  ablation: conflicting blocks projected off the momentum (PCGrad), no reorientation
async_ema       ablation: EMA-form Nesterov without correction (isolates what the correction adds)
"""

from __future__ import annotations

import torch

from heloco import AsyncAggregator, DelayedNesterov, HeLoCo
from recipes.config import RecipeConfig

_CORRECTION_FIELDS = {"keep_threshold", "shrink_strength", "shrink_max", "reorient_strength", "kappa"}


def fields_not_read(method: str) -> set[str]:
    """Config fields that ``method``'s optimizer never reads (see build_outer_optimizer), so a finished
    run stays valid when only their values or defaults change."""
    unused = set()
    if method != "async_dn":
        unused |= {"dn_buffer_size", "dn_activation"}
    if method != "heloco":  # heloco_project always projects fully (β = 1) and never reorients
        unused |= _CORRECTION_FIELDS
    if method not in ("heloco", "heloco_project"):
        unused.add("correct_fresh")
    return unused


def build_outer_optimizer(config: RecipeConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    o, lr = config.diloco, config.outer_lr
    if o.method in ("sync", "async"):
        return torch.optim.SGD(params, lr=lr, momentum=o.outer_momentum, nesterov=True)
    if o.method == "async_dn":
        return DelayedNesterov(
            params,
            lr=lr,
            momentum=o.outer_momentum,
            buffer_size=o.dn_buffer_size or o.num_workers,
            activation=o.dn_activation,
        )
    variant = {"heloco": "full", "heloco_project": "project", "lookahead": "none", "async_ema": "none"}[
        o.method
    ]
    return HeLoCo(
        params,
        lr=lr,
        momentum=o.outer_momentum,
        keep_threshold=o.keep_threshold,
        shrink_strength=o.shrink_strength,
        shrink_max=o.shrink_max,
        reorient_strength=o.reorient_strength,
        kappa=o.kappa,
        correct_fresh=o.correct_fresh,
        variant=variant,
    )


def build_aggregator(config: RecipeConfig, params: list[torch.Tensor]) -> AsyncAggregator:
    o = config.diloco
    outer = build_outer_optimizer(config, params)
    return AsyncAggregator(
        params,
        outer,
        num_workers=o.num_workers,
        quorum=o.num_workers if o.method == "sync" else 1,
        staleness_weighting=None if o.staleness_weighting == "none" else o.staleness_weighting,
        staleness_a=o.staleness_a,
        staleness_b=o.staleness_b,
        max_staleness=o.max_staleness,
        lookahead=o.method == "lookahead",
    )
