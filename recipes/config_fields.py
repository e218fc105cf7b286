"""The recipe's config fields: one dataclass per group (model, data, DiLoCo, training), the tuples of
values a choice field accepts, and RecipeConfig that holds the four groups.

Data only, so every module that takes a config can import it without the parser or the checks
(those are recipes.config_parsing and recipes.config_checks; recipes.config puts them together).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from heloco.aggregator import DISPATCHES
from heloco.codecs import CODEC_NAMES
from heloco.correction import REORIENT_SCHEDULES
from heloco.optim import CORRECTION_SUPPORTS
from heloco.server_policies import DRIFT_NORMALIZATIONS
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
    outer_step_momentum: float | None = field(
        default=None,
        metadata={
            "help": "HeLoCo/MLA: weight of the momentum in the step (unset: outer_momentum; "
            "0: plain SGD on the corrected Δ, the momentum kept as the correction's reference; ours)"
        },
    )
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
    correction_support: str | None = field(
        default=None,
        metadata={
            "help": f"one of {', '.join(CORRECTION_SUPPORTS)}: where Δ meets the momentum (nonzero: ours)"
        },
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
    def uses_dylu(self) -> bool:
        """Dynamic Local Updates: ``dylu: true``, or a method that has them built in (``heloco_dylu``)."""
        return self.diloco.dylu or METHOD_SPECS[self.diloco.method].dylu

    @property
    def outer_lr(self) -> float:
        d = self.diloco
        return d.outer_lr if d.outer_lr is not None else METHOD_SPECS[d.method].lr
