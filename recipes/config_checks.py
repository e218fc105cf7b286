"""Validation of a parsed recipe config: every value a run would otherwise trip over later (a choice
outside its accepted values, a speed list of the wrong length, a negative budget, options that do not
go together), checked before any data is read or a model is built, with a message naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from heloco.aggregator import DISPATCHES
from heloco.codecs import CODEC_NAMES, TOPK_SCOPES
from heloco.correction import REORIENT_SCHEDULES
from heloco.optim import CORRECTION_SUPPORTS
from heloco.server_policies import DRIFT_NORMALIZATIONS
from recipes.cli import ConfigError
from recipes.config_fields import (
    CODEC_OPTION_DEFAULTS,
    DOWNLINKS,
    GROUP_PARALLELISMS,
    MODEL_SIZES,
    MODES,
    NETWORK_FIELDS,
    PRECISIONS,
    REPORTERS,
    SCHEDULES,
    SERVER_MEMORIES,
    UPLINK_CODECS,
    WEIGHTINGS,
    WORKER_WEIGHTINGS,
    RecipeConfig,
)
from recipes.inner_optimizer import INNER_OPTIMIZERS
from recipes.method_specs import METHOD_SPECS, METHODS


def _one_of(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{name} must be one of {', '.join(accepted)}; got {value!r}")


def _validate_choices(config: RecipeConfig) -> None:
    """Every field with a fixed set of accepted values."""
    m, o, t = config.model, config.diloco, config.train
    _one_of("model_size", m.model_size, MODEL_SIZES)
    _one_of("mixed_precision", m.mixed_precision, PRECISIONS)
    _one_of("method", o.method, METHODS)
    _one_of("mode", o.mode, MODES)
    _one_of("staleness_weighting", o.staleness_weighting, WEIGHTINGS)
    _one_of("report_to", t.report_to, REPORTERS)
    _one_of("lr_schedule", t.lr_schedule, SCHEDULES)
    _one_of("wire_dtype", o.wire_dtype, ("float32", "bfloat16"))
    _one_of("group_parallelism", o.group_parallelism, GROUP_PARALLELISMS)
    _one_of("worker_weighting", o.worker_weighting, WORKER_WEIGHTINGS)
    _one_of("server_memory", o.server_memory, SERVER_MEMORIES)
    _one_of("drift_normalization", o.drift_normalization, DRIFT_NORMALIZATIONS)
    _one_of("uplink_codec", o.uplink_codec, UPLINK_CODECS)
    _one_of("topk_scope", o.topk_scope, TOPK_SCOPES)
    _one_of("downlink", o.downlink, DOWNLINKS)
    _one_of("downlink_codec", o.downlink_codec, CODEC_NAMES)
    _one_of("inner_optimizer", t.inner_optimizer, INNER_OPTIMIZERS)
    if o.dispatch is not None:
        _one_of("dispatch", o.dispatch, DISPATCHES)
    if o.reorient_schedule is not None:
        _one_of("reorient_schedule", o.reorient_schedule, REORIENT_SCHEDULES)
    if o.correction_support is not None:
        _one_of("correction_support", o.correction_support, CORRECTION_SUPPORTS)


def _validate_outer_knobs(config: RecipeConfig) -> None:
    """The arrival weight, the reorientation schedule's cos_bad and the worker cosine."""
    o, t = config.diloco, config.train
    if o.arrival_weight is not None and not (math.isfinite(o.arrival_weight) and o.arrival_weight > 0):
        raise ConfigError(f"arrival_weight must be a finite number > 0 or unset, got {o.arrival_weight}")
    if o.cos_bad is not None and not -1.0 <= o.cos_bad <= 0.0:
        raise ConfigError(f"cos_bad must be in [-1, 0] or unset, got {o.cos_bad}")
    if t.cosine_steps < 1 or not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(
            f"cosine_steps must be >= 1 and min_lr_ratio in [0, 1], got {t.cosine_steps} and {t.min_lr_ratio}"
        )


def _validate_server_policies(config: RecipeConfig) -> None:
    """worker_weighting_power, server_memory (asynchronous methods only), drift_compensation, and
    muon_momentum."""
    o, t = config.diloco, config.train
    for name in ("worker_weighting_power", "drift_compensation"):
        value = getattr(o, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if o.server_memory != "none" and METHOD_SPECS[o.method].synchronous:
        raise ValueError(
            f"server_memory {o.server_memory!r} needs an asynchronous method (one arrival per outer step); "
            f"method {o.method!r} waits for all K workers"
        )
    if not 0.0 <= t.muon_momentum < 1.0:
        raise ValueError(f"muon_momentum must be in [0, 1), got {t.muon_momentum}")


def _validate_workers(config: RecipeConfig) -> None:
    """One positive speed per worker."""
    o = config.diloco
    if o.num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {o.num_workers}")
    if len(o.worker_speeds) != o.num_workers:
        raise ConfigError(
            f"worker_speeds has {len(o.worker_speeds)} entries but num_workers is {o.num_workers}; "
            "give one speed (inner steps per second) per worker"
        )
    for i, v in enumerate(o.worker_speeds):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"worker_speeds[{i}] must be a positive number, got {v}")
    if o.group_sizes is not None and (
        len(o.group_sizes) != o.num_workers or any(int(p) != p or p < 1 for p in o.group_sizes)
    ):
        raise ConfigError(
            f"group_sizes must give one integer >= 1 (processes) per worker, {o.num_workers} in all; "
            f"got {o.group_sizes}"
        )


def network_options_set(config: RecipeConfig) -> list[str]:
    """The simulated-network and codec fields set away from their defaults."""
    o = config.diloco
    named = [name for name in NETWORK_FIELDS if getattr(o, name) is not None]
    changed = {
        "server_step_time": o.server_step_time != 0.0,
        "overlap": o.overlap,
        "uplink_codec": o.uplink_codec != "fp32",
        "error_feedback": o.error_feedback,
        "downlink": o.downlink != "params",
        "downlink_codec": o.downlink_codec != "fp32",
    }
    changed.update({name: getattr(o, name) != default for name, default in CODEC_OPTION_DEFAULTS.items()})
    return named + [name for name, is_set in changed.items() if is_set]


def _validate_network(config: RecipeConfig) -> None:
    """Link bandwidths > 0, latencies >= 0, one per worker or one for all; the codec's options."""
    o = config.diloco
    for name in NETWORK_FIELDS:
        values = getattr(o, name)
        if values is None:
            continue
        if len(values) not in (1, o.num_workers):
            raise ConfigError(
                f"{name} has {len(values)} entries; give one per worker ({o.num_workers}) or one for all"
            )
        for i, v in enumerate(values):
            if name.endswith("bandwidth") and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}[{i}] must be a positive number of bytes per second, got {v}")
            if name.endswith("latency") and not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name}[{i}] must be a number of seconds >= 0, got {v}")
    if not (math.isfinite(o.server_step_time) and o.server_step_time >= 0):
        raise ConfigError(f"server_step_time must be a number of seconds >= 0, got {o.server_step_time}")
    if not 0.0 < o.error_feedback_decay <= 1.0:
        raise ConfigError(f"error_feedback_decay must be in (0, 1], got {o.error_feedback_decay}")
    if not 0.0 < o.topk_fraction <= 1.0:
        raise ConfigError(f"topk_fraction must be in (0, 1], got {o.topk_fraction}")
    if not 2 <= o.topk_bits <= 8:
        raise ConfigError(f"topk_bits must be an integer in [2, 8], got {o.topk_bits}")
    for name, low in (("topk_chunk", 2), ("int8_block", 1)):
        if not low <= getattr(o, name) <= 2**24:
            raise ConfigError(f"{name} must be an integer in [{low}, 2**24], got {getattr(o, name)}")
    if o.downlink == "params" and o.downlink_codec != "fp32":
        raise ConfigError(
            f"downlink_codec {o.downlink_codec!r} needs downlink: delta (downlink: params sends the fp32 "
            "parameters)"
        )
    if o.mode == "distributed":
        _validate_distributed_network(config)


def _validate_distributed_network(config: RecipeConfig) -> None:
    """Distributed mode takes the codec (encoded Δ on the gloo wire), ``downlink: delta`` (encoded
    replies on the wire), overlap (a background exchange) and the link fields (an emulated slow
    link: each message sleeps latency + bytes / bandwidth); all of them also on workers that are
    groups of processes (the leader encodes, holds the replies' copy, sleeps for the link and, with
    overlap, makes its server call on a background thread);
    server_step_time stays simulate-only (the real server takes its real time)."""
    o = config.diloco
    if o.server_step_time != 0.0:
        raise ConfigError(
            f"server_step_time={o.server_step_time} is a simulate-mode option (the real server takes its "
            "real time); leave it at 0 for mode=distributed"
        )


def _validate_sizes_and_budget(config: RecipeConfig) -> None:
    """Batch sizes, evaluation cadence and the stopping budget."""
    d, o, t = config.data, config.diloco, config.train
    positive_ints = {
        "inner_steps": o.inner_steps,
        "batch_size": d.batch_size,
        "eval_sequences": d.eval_sequences,
        "eval_batch_size": d.eval_batch_size or d.batch_size,
        "eval_every": t.eval_every,
    }
    for name, value in positive_ints.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if t.budget_tokens is None and t.budget_time is None:
        raise ConfigError("set budget_tokens or budget_time (or both: the run stops at the first reached)")
    if t.budget_tokens is not None and t.budget_tokens <= 0:
        raise ConfigError(f"budget_tokens must be > 0, got {t.budget_tokens}")
    if t.budget_time is not None and t.budget_time <= 0:
        raise ConfigError(f"budget_time must be > 0 virtual seconds, got {t.budget_time}")


def _validate_the_rest(config: RecipeConfig) -> None:
    """Learning rates, momentum, timeouts, staleness cap and the Hub."""
    o, t = config.diloco, config.train
    if not (0.0 <= o.dylu_power <= 1.0):
        raise ConfigError(f"dylu_power must be in [0, 1] (1: DyLU, 0: equal rounds), got {o.dylu_power}")
    if o.dylu_power != 1.0 and not config.uses_dylu:
        raise ConfigError(
            "dylu_power is only read with dylu: true; set dylu: true or leave dylu_power at 1.0"
        )
    if not (0.0 <= o.speed_jitter < 1.0):
        raise ConfigError(f"speed_jitter must be in [0, 1), got {o.speed_jitter}")
    if config.outer_lr <= 0:
        raise ConfigError(f"outer_lr must be > 0, got {config.outer_lr}")
    if not (0.0 <= o.outer_momentum < 1.0):
        raise ConfigError(f"outer_momentum must be in [0, 1), got {o.outer_momentum}")
    if o.outer_step_momentum is not None:
        if not (0.0 <= o.outer_step_momentum < 1.0):
            raise ConfigError(f"outer_step_momentum must be in [0, 1) or unset, got {o.outer_step_momentum}")
        if METHOD_SPECS[o.method].optimizer != "heloco":
            raise ConfigError(
                f"outer_step_momentum is only read by HeLoCo's optimizer (methods "
                f"{', '.join(m for m in METHODS if METHOD_SPECS[m].optimizer == 'heloco')}), "
                f"not by {o.method!r}; leave it unset"
            )
    if o.comm_timeout_s <= 0 or o.rejoin_timeout_s < 0:
        raise ConfigError(
            f"comm_timeout_s must be > 0 and rejoin_timeout_s >= 0 seconds, "
            f"got {o.comm_timeout_s} and {o.rejoin_timeout_s}"
        )
    if o.max_staleness is not None and o.max_staleness < 0:
        raise ConfigError(f"max_staleness must be >= 0 or unset, got {o.max_staleness}")
    if t.pretrain_steps < 0 or t.save_every < 0:
        raise ConfigError("pretrain_steps and save_every must be >= 0")
    if t.keep_checkpoints < 0:
        raise ConfigError(f"keep_checkpoints must be >= 0 (0 keeps all), got {t.keep_checkpoints}")
    if t.inner_lr <= 0:
        raise ConfigError(f"inner_lr must be > 0, got {t.inner_lr}")
    if t.push_to_hub and not t.hub_model_id:
        raise ConfigError("push_to_hub needs hub_model_id (e.g. 'your-name/heloco-tiny')")


def validate(config: RecipeConfig) -> None:
    """Check every value that a run would otherwise trip over later, naming the field."""
    _validate_choices(config)
    _validate_outer_knobs(config)
    _validate_server_policies(config)
    _validate_workers(config)
    _validate_network(config)
    _validate_sizes_and_budget(config)
    _validate_the_rest(config)
