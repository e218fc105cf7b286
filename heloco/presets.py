"""HeLoCo's and Delayed Nesterov's hyperparameter values: the defaults and the named presets.

The single place where they live; :mod:`heloco.optim` re-exports every name (``HELOCO_DEFAULTS``,
``HELOCO_PRESETS``, ``HELOCO_VARIANTS``, ``DELAYED_NESTEROV_DEFAULTS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = [
    "CORRECTION_SUPPORTS",
    "DELAYED_NESTEROV_DEFAULTS",
    "HELOCO_DEFAULTS",
    "HELOCO_PRESETS",
    "HELOCO_VARIANTS",
]

# The single place where HeLoCo's default hyperparameters live: the authors' reference values (their
# "Table 3" in the experiment code of arXiv 2606.00271): c_ok 0.2, k_s 0.5, β_max 0.5, k_d 1, κ 3,
# μ 0.9, η 0.7, the normalised reorientation schedule with cos_bad = −0.2, every arrival corrected,
# and the arrival weight applied before the correction. ``correction_support`` is ours: "all" (the
# paper) compares Δ with the whole momentum; "nonzero" only where Δ is non-zero (for sparse codecs).
# ``step_momentum`` is ours too: the weight of m in the step, None (the paper) meaning μ.
HELOCO_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
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
        "variant": "full",
        "correction_support": "all",
        "step_momentum": None,
    }
)

# Named hyperparameter sets. "reference" = HELOCO_DEFAULTS. "tiny_sweep" is ours, not the paper's:
# the values our sweeps chose on the 3M-parameter model, severe speeds, 80%-one-language shards
# (docs/results.md §1): only blocks with a negative cosine are corrected, stale arrivals only, the
# printed reorientation schedule (unused at c_ok = 0), η 0.175, and no arrival weight was used there.
HELOCO_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "reference": HELOCO_DEFAULTS,
        "tiny_sweep": MappingProxyType(
            {
                **HELOCO_DEFAULTS,
                "lr": 0.175,
                "keep_threshold": 0.0,
                "shrink_strength": 2.0,
                "shrink_max": 1.0,
                "reorient_strength": 0.5,
                "kappa": 1.0,
                "correct_fresh": False,
                "reorient_schedule": "printed",
                "weight_before_correction": False,
            }
        ),
    }
)
HELOCO_VARIANTS = ("full", "project", "none")
CORRECTION_SUPPORTS = ("all", "nonzero")

DELAYED_NESTEROV_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"lr": 0.7, "momentum": 0.9, "buffer_size": 1, "activation": 0.0}
)
