"""The recipe methods by name and what each one is: outer optimizer, default outer learning rate,
correction, quorum, dispatch, arrival weight. Data only, so that the config can name the methods
without importing the code that builds them (``recipes.methods``)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["METHODS", "METHOD_SPECS", "MethodSpec"]


@dataclass(frozen=True)
class MethodSpec:
    optimizer: str  # "nesterov" (torch SGD), "delayed_nesterov" or "heloco"
    lr: float  # default outer learning rate
    variant: str = "none"  # HeLoCo's correction: "full", "project" or "none"
    preset: str = "reference"  # HeLoCo hyperparameters (heloco.optim.HELOCO_PRESETS)
    synchronous: bool = False  # quorum K instead of 1
    dispatch: str = "plain"
    inverse_sqrt_k_weight: bool = False  # arrival weight ρ = 1/√K
    paper: bool = False  # defined as the HeLoCo authors define it
    dylu: bool = False  # Dynamic Local Updates on (Liu et al. 2024): as `dylu: true` in the config


METHOD_SPECS = MappingProxyType(
    {
        "sync": MethodSpec("nesterov", 0.7, synchronous=True, paper=True),
        "async_nesterov": MethodSpec("nesterov", 0.07, inverse_sqrt_k_weight=True, paper=True),
        "mla": MethodSpec("heloco", 0.7, inverse_sqrt_k_weight=True, paper=True),
        "heloco": MethodSpec(
            "heloco", 0.7, variant="full", dispatch="lookahead", inverse_sqrt_k_weight=True, paper=True
        ),
        "async": MethodSpec("nesterov", 0.025),
        "async_dn": MethodSpec("delayed_nesterov", 0.35),
        "lookahead": MethodSpec("heloco", 0.175, dispatch="scaled_lookahead"),
        "async_ema": MethodSpec("heloco", 0.175),
        "heloco_tiny": MethodSpec("heloco", 0.175, variant="full", preset="tiny_sweep"),
        "heloco_project": MethodSpec("heloco", 0.175, variant="project", preset="tiny_sweep"),
        "heloco_dylu": MethodSpec(
            "heloco", 0.7, variant="full", dispatch="lookahead", inverse_sqrt_k_weight=True, dylu=True
        ),
    }
)
METHODS = tuple(METHOD_SPECS)
