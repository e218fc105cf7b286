"""Recipe configuration: dataclasses parsed by transformers' HfArgumentParser from a YAML file, with
any key overridable on the command line (``--config recipes/configs/x.yaml --outer_lr 0.3``).

Every value is checked here, before any data is read or a model is built, so a typo fails in a second
with a message naming the field and the accepted values.
"""

from __future__ import annotations

import math
import os
import sys
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

from heloco.aggregator import DISPATCHES
from heloco.codecs import CODEC_NAMES, TOPK_SCOPES
from heloco.correction import REORIENT_SCHEDULES
from heloco.server_policies import DRIFT_NORMALIZATIONS
from recipes.cli import ConfigError, MissingFileError
from recipes.inner_optimizer import INNER_OPTIMIZERS
from recipes.method_specs import METHOD_SPECS, METHODS
from recipes.model import PRESETS

MODES = ("simulate", "distributed")
GROUP_PARALLELISMS = ("ddp", "fsdp")
MODEL_SIZES = tuple(PRESETS)
WEIGHTINGS = ("none", "poly", "hinge")
REPORTERS = ("none", "tensorboard", "wandb", "trackio")
PRECISIONS = ("no", "bf16")
# constant; cosine over the run's progress (the same for every worker); worker_cosine: cosine over
# each worker's own inner steps with period cosine_steps, no warm-up (the HeLoCo authors' schedule).
SCHEDULES = ("constant", "cosine", "worker_cosine", "worker_cosine_or_progress")
# p_k, a worker's share of the arrivals: observed (rate) or from worker_speeds / inner steps (declared)
WORKER_WEIGHTINGS = ("none", "rate", "declared_rate")
SERVER_MEMORIES = ("none", "latest")
# How Δ goes to the server (heloco.codecs); fp32 sends Δ's tensors as they are (no codec in the loop).
UPLINK_CODECS = CODEC_NAMES
NETWORK_FIELDS = ("uplink_bandwidth", "uplink_latency", "downlink_bandwidth", "downlink_latency")
# the codecs' options as config fields (recipes.simulator.uplink_encoder passes them on)
CODEC_OPTION_DEFAULTS = {
    "error_feedback_decay": 1.0,
    "int8_block": 256,
    "topk_fraction": 0.01,
    "topk_bits": 2,
    "topk_chunk": 4096,
    "topk_scope": "chunk",
}
# What a reply carries down: the parameters, or their change since the worker's copy encoded with
# downlink_codec (simulate: heloco.transport.DeltaDownlink; distributed: heloco.distributed.downlink)
DOWNLINKS = ("params", "delta")


@dataclass
class ModelArguments:
    model_size: str = field(default="tiny", metadata={"help": f"Llama size preset: {', '.join(MODEL_SIZES)}"})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A transformers causal-LM checkpoint (name or path) instead of a preset"},
    )
    mixed_precision: str = field(default="no", metadata={"help": f"one of {', '.join(PRECISIONS)}"})


@dataclass
class DataArguments:
    data_dir: str = field(
        default="data/sample_shards", metadata={"help": "Shards built by `python -m data_prep.build`"}
    )
    build_sample_if_missing: bool = field(
        default=False, metadata={"help": "Build the offline sample shards into data_dir if it does not exist"}
    )
    sample_partition: str = field(
        default="dominant", metadata={"help": "When building the sample: iid, dominant or dirichlet"}
    )
    sample_p: float = field(default=0.8, metadata={"help": "When building the sample: dominant share p"})
    batch_size: int = field(default=8, metadata={"help": "Sequences per inner step, per worker"})
    eval_sequences: int = field(default=64, metadata={"help": "Validation sequences per language per eval"})
    eval_batch_size: int | None = field(
        default=None, metadata={"help": "Sequences per evaluation forward pass (unset: batch_size)"}
    )


@dataclass
class DiLoCoArguments:
    method: str = field(default="heloco", metadata={"help": f"one of {', '.join(METHODS)}"})
    mode: str = field(default="simulate", metadata={"help": f"one of {', '.join(MODES)}"})
    num_workers: int = field(default=5, metadata={"help": "K"})
    worker_speeds: list[float] = field(
        default_factory=lambda: [1.0, 1.0, 1.0, 0.5, 0.25],
        metadata={"help": "Inner steps per second, one per worker"},
    )
    speed_jitter: float = field(default=0.0, metadata={"help": "Relative spread of each round's duration"})
    inner_steps: int = field(
        default=20, metadata={"help": "H: inner steps per round (fastest worker's, with DyLU)"}
    )
    dylu: bool = field(
        default=False, metadata={"help": "Dynamic local updates: slow workers run fewer steps"}
    )
    dylu_power: float = field(
        default=1.0,
        metadata={
            "help": "With dylu: H_w = floor((v_w / max v)^power · H); 1 is DyLU, < 1 tempers it (ours)"
        },
    )
    outer_lr: float | None = field(
        default=None, metadata={"help": "Outer learning rate (method default if unset)"}
    )
    outer_momentum: float = field(default=0.9)
    dn_buffer_size: int | None = field(default=None, metadata={"help": "Delayed Nesterov N (default K)"})
    dn_activation: float = field(default=0.0, metadata={"help": "Delayed Nesterov c in [0, 1/N]"})
    dispatch: str | None = field(
        default=None, metadata={"help": f"one of {', '.join(DISPATCHES)} (unset: the method's)"}
    )
    arrival_weight: float | None = field(
        default=None, metadata={"help": "ρ multiplying every Δ (unset: the method's, 1/√K for paper async)"}
    )
    # HeLoCo's correction; unset: the method's preset (heloco.optim.HELOCO_PRESETS)
    keep_threshold: float | None = field(default=None, metadata={"help": "c_ok"})
    shrink_strength: float | None = field(default=None, metadata={"help": "k_s"})
    shrink_max: float | None = field(default=None, metadata={"help": "β_max"})
    reorient_strength: float | None = field(default=None, metadata={"help": "k_d"})
    kappa: float | None = field(default=None, metadata={"help": "κ"})
    reorient_schedule: str | None = field(
        default=None, metadata={"help": f"one of {', '.join(REORIENT_SCHEDULES)}"}
    )
    cos_bad: float | None = field(default=None, metadata={"help": "normalised schedule's lower cosine"})
    correct_fresh: bool | None = field(default=None, metadata={"help": "Also correct staleness-0 arrivals"})
    weight_before_correction: bool | None = field(
        default=None, metadata={"help": "ρ enters the correction (its confidence) instead of scaling after"}
    )
    staleness_weighting: str = field(default="none", metadata={"help": f"one of {', '.join(WEIGHTINGS)}"})
    staleness_a: float = field(default=0.5)
    staleness_b: float = field(default=4.0)
    max_staleness: int | None = field(
        default=None, metadata={"help": "Drop pseudo-gradients staler than this"}
    )
    # Ours, after published ideas; formulas and sources in heloco.server_policies. Over any method.
    worker_weighting: str = field(
        default="none", metadata={"help": f"{', '.join(WORKER_WEIGHTINGS)}: Δ_k × p_k^-α / Σ_j p_j^(1-α)"}
    )
    worker_weighting_power: float = field(default=1.0, metadata={"help": "α of worker_weighting"})
    server_memory: str = field(
        default="none", metadata={"help": f"{', '.join(SERVER_MEMORIES)}: step on every worker's latest Δ"}
    )
    drift_compensation: float = field(default=0.0, metadata={"help": "λ: Δ + λ·Δ⊙Δ⊙(θ_now − θ_base)"})
    drift_normalization: str = field(
        default="none", metadata={"help": f"{', '.join(DRIFT_NORMALIZATIONS)}: Δ⊙Δ / its per-tensor max"}
    )
    offload_idle_workers: bool = field(
        default=False, metadata={"help": "Keep idle simulated workers on CPU so many large ones fit one GPU"}
    )
    wire_dtype: str = field(
        default="float32", metadata={"help": "distributed: float32 or bfloat16 on the wire"}
    )
    comm_timeout_s: float = field(
        default=600.0, metadata={"help": "distributed: timeout of every gloo operation"}
    )
    rejoin_timeout_s: float = field(
        default=0.0,
        metadata={"help": "distributed: seconds the server waits for a dead worker to restart (0: never)"},
    )
    group_sizes: list[int] | None = field(
        default=None,
        metadata={
            "help": "Processes per worker (e.g. 2 1 1; unset: one each). A worker's global batch is its "
            "size x batch_size; in distributed mode its processes train one replica with data parallelism"
        },
    )
    server_process: bool = field(
        default=False,
        metadata={
            "help": "distributed: rank 0 only serves (aggregator, evaluation, checkpoints); workers from rank 1"
        },
    )
    group_parallelism: str = field(
        default="ddp",
        metadata={"help": f"distributed: inside a group, one of {', '.join(GROUP_PARALLELISMS)}"},
    )
    # The network (docs/communication.md): simulated, or emulated in distributed mode; one value per
    # worker, or one for all; unset: an instantaneous link (bit-identical to a run without these fields).
    uplink_bandwidth: list[float] | None = field(
        default=None,
        metadata={
            "help": "bytes per second from each worker to the server (unset: unlimited); simulate: virtual "
            "seconds, distributed: an emulated link (the transport sleeps)"
        },
    )
    uplink_latency: list[float] | None = field(
        default=None,
        metadata={"help": "seconds added to every message to the server (virtual; distributed: slept)"},
    )
    downlink_bandwidth: list[float] | None = field(
        default=None,
        metadata={
            "help": "bytes per second from the server to each worker (unset: unlimited); distributed: emulated"
        },
    )
    downlink_latency: list[float] | None = field(
        default=None, metadata={"help": "seconds added to every reply (virtual; distributed: slept)"}
    )
    server_step_time: float = field(
        default=0.0, metadata={"help": "simulate: virtual seconds between a message's receipt and its reply"}
    )
    overlap: bool = field(
        default=False,
        metadata={
            "help": "a worker starts its next round as soon as it has sent (distributed: the exchange runs on a "
            "background thread) and merges the reply "
            "at that round's end (θ ← θ_reply + θ_now − θ_sent)"
        },
    )
    uplink_codec: str = field(
        default="fp32",
        metadata={"help": f"how Δ is encoded (distributed: on the wire), one of {', '.join(UPLINK_CODECS)}"},
    )
    error_feedback: bool = field(
        default=False,
        metadata={"help": "keep each worker's residual Δ + e − decode(encode(Δ + e)) for its next Δ"},
    )
    error_feedback_decay: float = field(
        default=1.0, metadata={"help": "β in (0, 1]: Δ + β·e is encoded (SparseLoCo decays the residual)"}
    )
    int8_block: int = field(default=256, metadata={"help": "uplink_codec int8: elements per absmax scale"})
    topk_fraction: float = field(
        default=0.01, metadata={"help": "uplink_codec topk: entries kept per chunk, as a fraction"}
    )
    topk_bits: int = field(default=2, metadata={"help": "uplink_codec topk: bits per kept value (2..8)"})
    topk_chunk: int = field(default=4096, metadata={"help": "uplink_codec topk: elements per chunk"})
    topk_scope: str = field(
        default="chunk",
        metadata={
            "help": "uplink_codec topk: chunk (top-k of every chunk) or global (the largest "
            "topk_fraction of all entries, wherever they are)"
        },
    )
    downlink: str = field(
        default="params",
        metadata={
            "help": "a reply carries the fp32 parameters (params) or their change since the worker's "
            "copy, encoded with downlink_codec (delta; distributed: on the wire, the first reply of a "
            "connection full)"
        },
    )
    downlink_codec: str = field(
        default="fp32",
        metadata={
            "help": f"downlink delta: how the change is encoded, one of {', '.join(CODEC_NAMES)} "
            "(options: int8_block, topk_*)"
        },
    )


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/run")
    seed: int = field(default=0)
    inner_lr: float = field(default=2e-3)
    inner_weight_decay: float = field(default=0.1)
    inner_beta2: float = field(default=0.95)
    grad_clip: float = field(default=1.0)
    inner_optimizer: str = field(
        default="adamw", metadata={"help": f"{', '.join(INNER_OPTIMIZERS)}: muon = Muon for hidden matrices"}
    )
    muon_momentum: float = field(default=0.95, metadata={"help": "inner_optimizer muon: Muon's momentum"})
    fused_adamw: bool = field(
        default=False, metadata={"help": "torch's fused AdamW kernel (faster at small batch; not bit-equal)"}
    )
    reset_inner_optimizer: bool = field(
        default=False,
        metadata={"help": "Re-create each worker's inner optimizer every round (state not kept)"},
    )
    lr_schedule: str = field(default="constant", metadata={"help": f"inner lr: {', '.join(SCHEDULES)}"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor, as a fraction of inner_lr"})
    cosine_steps: int = field(
        default=2000, metadata={"help": "worker_cosine: a worker's own inner steps to reach the floor"}
    )
    pretrain_steps: int = field(
        default=300, metadata={"help": "Ordinary training steps before the DiLoCo phase (shared, cached)"}
    )
    pretrain_warmup_steps: int = field(default=50)
    pretrain_cache_dir: str | None = field(
        default="outputs/pretrain_cache", metadata={"help": "Reuse identical warm starts across runs"}
    )
    budget_tokens: int | None = field(default=400_000, metadata={"help": "DiLoCo-phase tokens, all workers"})
    budget_time: float | None = field(
        default=None,
        metadata={
            "help": "DiLoCo-phase seconds: virtual (simulate), real since the rounds started (distributed)"
        },
    )
    eval_every: int = field(default=10, metadata={"help": "Evaluate every N outer updates"})
    eval_times: list[float] = field(
        default_factory=list,
        metadata={"help": "Also evaluate at these times, in budget_time's seconds (for equal wall-clock)"},
    )
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N arrivals (0: only at the end)"})
    keep_checkpoints: int = field(
        default=2, metadata={"help": "Checkpoints kept per run, newest first (0 keeps all)"}
    )
    resume_from: str | None = field(
        default=None,
        metadata={
            "help": "'latest' (the newest complete checkpoint of output_dir), or a checkpoint dir's path"
        },
    )
    stop_after_arrivals: int | None = field(
        default=None,
        metadata={
            "help": "Fault injection for tests of resume: simulate stops after this arrival as if "
            "interrupted; in distributed mode rank 0 kills itself (SIGKILL) after it, unless resumed"
        },
    )
    report_to: str = field(default="tensorboard", metadata={"help": f"one of {', '.join(REPORTERS)}"})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar"})
    push_to_hub: bool = field(default=False)
    hub_model_id: str | None = field(default=None)
    hub_private: bool = field(default=False)
    hub_revision: str | None = field(default=None)


CONFIG_CLASSES = (ModelArguments, DataArguments, DiLoCoArguments, TrainArguments)


@dataclass
class RecipeConfig:
    model: ModelArguments
    data: DataArguments
    diloco: DiLoCoArguments
    train: TrainArguments

    def to_dict(self) -> dict[str, Any]:
        """One flat dict (the YAML's shape), for trackers, metadata and model cards."""
        out: dict[str, Any] = {}
        for part in (self.model, self.data, self.diloco, self.train):
            out.update(asdict(part))
        return out

    @property
    def group_sizes(self) -> list[int]:
        """Processes per worker (1 each unless ``group_sizes`` is set)."""
        sizes = self.diloco.group_sizes
        return [int(p) for p in sizes] if sizes is not None else [1] * self.diloco.num_workers

    @property
    def outer_lr(self) -> float:
        d = self.diloco
        return d.outer_lr if d.outer_lr is not None else METHOD_SPECS[d.method].lr


def _all_field_names() -> set[str]:
    return {f for cls in CONFIG_CLASSES for f in cls.__dataclass_fields__}


def _field_types() -> dict[str, Any]:
    """Field name → its annotation, resolved (``int | None``, ``list[float]``, ...)."""
    return {name: hint for cls in CONFIG_CLASSES for name, hint in typing.get_type_hints(cls).items()}


class _ErrorRaisingParser(HfArgumentParser):
    """HfArgumentParser whose usage errors raise ``ConfigError`` (one line) instead of printing the
    whole usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help for every option)")


def parse_config(argv: list[str] | None = None) -> RecipeConfig:
    """``--config file.yaml`` sets defaults; every other ``--key value`` overrides them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _ErrorRaisingParser(CONFIG_CLASSES)
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file path")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    if config_path is not None:
        values = load_yaml(config_path)
        parser.set_defaults(**values)
    model, data, diloco, train, extra = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True
    )
    if extra:
        raise ConfigError(f"unknown command-line arguments {extra} (see --help for every option)")
    config = RecipeConfig(model, data, diloco, train)
    validate(config)
    return config


def config_from_dict(values: dict[str, Any], source: str = "config") -> RecipeConfig:
    """Build and validate a config from a flat dict (what compare.py and tests use); ``source``
    names where the values came from in error messages."""
    values = check_values(values, source)
    parts = HfArgumentParser(CONFIG_CLASSES).parse_dict(values)
    config = RecipeConfig(*parts)
    validate(config)
    return config


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe config file's values, each checked against its field's type (see ``check_values``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if values is None:
        raise ConfigError(f"{path} is empty; a recipe config is a mapping of key: value")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe config must be a mapping of key: value")
    return check_values(values, str(path))


def check_values(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Unknown keys refused and every value checked against its field's type, naming ``source``
    and the key. Numbers may be written in exponent form (``1e5``, ``2e-3``: YAML reads those as
    strings); an integer field takes ``1e5`` but not ``1.5``. Returns the converted values."""
    unknown = sorted(set(values) - _all_field_names())
    if unknown:
        raise ConfigError(f"{source}: unknown config keys {unknown}")
    types_ = _field_types()
    return {key: _convert(value, types_[key], f"{source}: {key}") for key, value in values.items()}


def _type_error(where: str, expected: str, value: Any) -> NoReturn:
    raise ConfigError(f"{where} must be {expected}, got {value!r}")


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field type ``hint`` wants it, or ConfigError naming ``where``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list | tuple):
            _type_error(where, f"a list of {args[0].__name__} (e.g. [1.0, 0.5])", value)
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            _type_error(where, "true or false", value)
        return value
    if hint is str:
        if isinstance(value, os.PathLike):  # a Path from code calling config_from_dict
            return os.fspath(value)
        if not isinstance(value, str):
            _type_error(where, "a string (quote it in YAML)", value)
        return value
    number = _as_number(value)
    if hint is float:
        if number is None:
            _type_error(where, "a number (e.g. 0.7 or 2e-3)", value)
        return float(number)
    if hint is int:
        if number is None or not float(number).is_integer():
            _type_error(where, "an integer (e.g. 400000 or 4e5)", value)
        return int(number)
    raise TypeError(f"{where}: no conversion for the field type {hint!r}")  # a new field type: extend this


def _as_number(value: Any) -> int | float | None:
    """An int or float as given, a string in exponent or decimal form converted; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


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
    link: each message sleeps latency + bytes / bandwidth), on workers of one process each;
    server_step_time stays simulate-only (the real server takes its real time)."""
    o = config.diloco
    if o.server_step_time != 0.0:
        raise ConfigError(
            f"server_step_time={o.server_step_time} is a simulate-mode option (the real server takes its "
            "real time); leave it at 0 for mode=distributed"
        )
    grouped = o.group_sizes is not None and any(p != 1 for p in o.group_sizes)
    if grouped and network_options_set(config):
        raise ConfigError(
            f"{', '.join(network_options_set(config))}: in mode=distributed these need one process per "
            f"worker; group_sizes={o.group_sizes} makes workers of several processes (unset group_sizes "
            "or these fields)"
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
    if o.dylu_power != 1.0 and not o.dylu:
        raise ConfigError(
            "dylu_power is only read with dylu: true; set dylu: true or leave dylu_power at 1.0"
        )
    if not (0.0 <= o.speed_jitter < 1.0):
        raise ConfigError(f"speed_jitter must be in [0, 1), got {o.speed_jitter}")
    if config.outer_lr <= 0:
        raise ConfigError(f"outer_lr must be > 0, got {config.outer_lr}")
    if not (0.0 <= o.outer_momentum < 1.0):
        raise ConfigError(f"outer_momentum must be in [0, 1), got {o.outer_momentum}")
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
