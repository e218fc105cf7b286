"""One registry: a method name → its outer optimizer, server settings and default outer lr.

The paper's methods, as the HeLoCo authors' experiment code runs them (arXiv 2606.00271):
sync            synchronous DiLoCo: quorum K, mean of the K Δ, torch SGD Nesterov, η 0.7
async_nesterov  every arrival ρΔ gets a torch SGD Nesterov step, η 0.07, ρ = 1/√K
mla             momentum look-ahead as the authors run it: the EMA-form Nesterov step on each ρΔ,
                η 0.7, no dispatch look-ahead, no correction
heloco          the correction (reference values) + the fixed look-ahead dispatch θ − η·μ·m + ρ, η 0.7

Ours (kept for the studies of docs/results.md; not the paper's definitions):
async           naive async Nesterov without ρ, at our swept η 0.025
async_dn        Delayed Nesterov (Liu et al. 2024); add `dylu: true` for DN + DyLU
heloco_dylu     heloco with Dynamic Local Updates built in (= heloco + `dylu: true`), η 0.7 chosen on the
                dev seed (docs/paper_reproduction/beyond.md)
lookahead       the EMA-form step with our staleness-scaled dispatch θ − η·τ̂·μ·m, no ρ
async_ema       the EMA-form step alone, no ρ (= mla without ρ)
heloco_tiny     HeLoCo with the values our sweeps chose on the tiny model (preset "tiny_sweep"):
                stale arrivals only, c_ok 0, plain dispatch, no ρ, η 0.175
heloco_project  heloco_tiny with conflicting blocks projected off the momentum (PCGrad), no reorientation

Any method's dispatch, arrival weight and correction knobs can be overridden from the config
(`dispatch`, `arrival_weight`, `keep_threshold`, ...), which is how the ablations are written. The
server policies of heloco.server_policies (ours) switch on the same way over any method:
`worker_weighting: rate|declared_rate` (+ `worker_weighting_power`), `server_memory: latest`,
`drift_compensation: λ` (+ `drift_normalization: tensor`), e.g. `method: mla` + `server_memory: latest`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from heloco import AsyncAggregator, DelayedNesterov, HeLoCo
from heloco.optim import HELOCO_PRESETS
from heloco.simulation import dylu_steps
from recipes.method_specs import METHOD_SPECS

if TYPE_CHECKING:
    from recipes.config import RecipeConfig


# Config fields that override the preset of a HeLoCo method (None in the config: the preset's value).
CORRECTION_FIELDS = (
    "keep_threshold",
    "shrink_strength",
    "shrink_max",
    "reorient_strength",
    "kappa",
    "reorient_schedule",
    "cos_bad",
    "correct_fresh",
    "weight_before_correction",
    "correction_support",
)


def fields_not_read(method: str) -> set[str]:
    """Config fields that ``method``'s optimizer never reads (see build_outer_optimizer), so a finished
    run stays valid when only their values or defaults change."""
    spec = METHOD_SPECS[method]
    unused = set()
    if spec.optimizer != "delayed_nesterov":
        unused |= {"dn_buffer_size", "dn_activation"}
    if spec.optimizer != "heloco":
        unused.add("outer_step_momentum")
    if spec.variant == "none":
        unused |= set(CORRECTION_FIELDS)
    elif spec.variant == "project":  # always projects fully (β = 1) and never reorients
        unused |= set(CORRECTION_FIELDS) - {"correct_fresh", "weight_before_correction", "correction_support"}
    return unused


def heloco_hyperparameters(config: RecipeConfig) -> dict[str, object]:
    """The method's preset with the config's explicit overrides."""
    o = config.diloco
    spec = METHOD_SPECS[o.method]
    values = dict(HELOCO_PRESETS[spec.preset])
    for name in CORRECTION_FIELDS:
        if getattr(o, name) is not None:
            values[name] = getattr(o, name)
    values.update(lr=config.outer_lr, momentum=o.outer_momentum, variant=spec.variant)
    if o.outer_step_momentum is not None:
        values["step_momentum"] = o.outer_step_momentum
    return values


def arrival_weight(config: RecipeConfig) -> float | None:
    """ρ: the config's value, else 1/√K for the paper's asynchronous methods, else none."""
    o = config.diloco
    if o.arrival_weight is not None:
        return o.arrival_weight
    return 1.0 / math.sqrt(o.num_workers) if METHOD_SPECS[o.method].inverse_sqrt_k_weight else None


def dispatch_mode(config: RecipeConfig) -> str:
    o = config.diloco
    return o.dispatch if o.dispatch is not None else METHOD_SPECS[o.method].dispatch


def declared_rates(config: RecipeConfig) -> list[float]:
    """Each worker's arrivals per virtual second: its speed over its inner steps per round."""
    o = config.diloco
    steps = (
        dylu_steps(o.worker_speeds, o.inner_steps, o.dylu_power)
        if config.uses_dylu
        else [o.inner_steps] * o.num_workers
    )
    return [speed / h for speed, h in zip(o.worker_speeds, steps, strict=True)]


def server_policies(config: RecipeConfig) -> dict[str, object]:
    """The AsyncAggregator keywords of the server policies the config switches on."""
    o = config.diloco
    return {
        "worker_weighting": None if o.worker_weighting == "none" else "rate",
        "worker_rates": declared_rates(config) if o.worker_weighting == "declared_rate" else None,
        "worker_weighting_power": o.worker_weighting_power,
        "memory": None if o.server_memory == "none" else o.server_memory,
        "drift_compensation": o.drift_compensation,
        "drift_normalization": o.drift_normalization,
    }


def build_outer_optimizer(config: RecipeConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    o, lr = config.diloco, config.outer_lr
    spec = METHOD_SPECS[o.method]
    if spec.optimizer == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=o.outer_momentum, nesterov=True)
    if spec.optimizer == "delayed_nesterov":
        return DelayedNesterov(
            params,
            lr=lr,
            momentum=o.outer_momentum,
            buffer_size=o.dn_buffer_size or o.num_workers,
            activation=o.dn_activation,
        )
    return HeLoCo(params, **heloco_hyperparameters(config))


def build_aggregator(config: RecipeConfig, params: list[torch.Tensor]) -> AsyncAggregator:
    o = config.diloco
    return AsyncAggregator(
        params,
        build_outer_optimizer(config, params),
        num_workers=o.num_workers,
        quorum=o.num_workers if METHOD_SPECS[o.method].synchronous else 1,
        staleness_weighting=None if o.staleness_weighting == "none" else o.staleness_weighting,
        staleness_a=o.staleness_a,
        staleness_b=o.staleness_b,
        max_staleness=o.max_staleness,
        arrival_weight=arrival_weight(config),
        dispatch=dispatch_mode(config),
        **server_policies(config),
    )
