"""What both run modes share: the inner optimizer and its schedule, the inner step, RNG state, data
loading, the cached warm start and the model (the metrics log lives in recipes/tracking.py).
recipes/train.py (simulate) and recipes/distributed/ (one worker per process) import it; neither
script imports the other's code.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from heloco.checkpoint import (
    atomic_directory,
    load_state,
    save_state,
)
from recipes.config import RecipeConfig
from recipes.data import TokenStream, to_tensor
from recipes.inner_optimizer import MuonAdamW, muon_split
from recipes.model import build_model


def inner_lr_factor(config: RecipeConfig, progress: float, worker_step: int = 0) -> float:
    """Inner learning-rate multiplier. ``cosine`` follows the run's progress in [0, 1] (the same for
    every method at equal progress, so schedules never favour one); ``worker_cosine`` follows the
    worker's own inner steps, reaching the floor after ``cosine_steps`` and staying there (the
    paper's: a slow worker that makes fewer steps than ``cosine_steps`` never anneals);
    ``worker_cosine_or_progress`` (ours) follows whichever of the two is further along,
    x = max(worker_step / cosine_steps, progress), so every worker also reaches the floor by the end
    of the run."""
    t = config.train
    if t.lr_schedule == "constant":
        return 1.0
    if t.lr_schedule == "cosine":
        x = progress
    else:
        x = worker_step / t.cosine_steps
        if t.lr_schedule == "worker_cosine_or_progress":
            x = max(x, progress)
    floor = t.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(x, 1.0)))


def set_inner_lr(
    config: RecipeConfig, optimizer: torch.optim.Optimizer, progress: float, worker_step: int
) -> None:
    lr = config.train.inner_lr * inner_lr_factor(config, progress, worker_step)
    for group in optimizer.param_groups:
        group["lr"] = lr


def begin_round(config: RecipeConfig, optimizer: torch.optim.Optimizer) -> None:
    """With ``reset_inner_optimizer`` the round starts from a fresh inner optimizer (no moments, step
    0), as if re-created: its state is rebuilt lazily at the first step."""
    if config.train.reset_inner_optimizer:
        optimizer.state.clear()


def make_inner_optimizer(
    config: RecipeConfig, model: torch.nn.Module, warm_state: dict[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The worker's inner optimizer (``inner_optimizer``: AdamW, or ``MuonAdamW`` of
    recipes/inner_optimizer.py), seeded with a copy of the warm start's state if given (a copy for
    each: ``load_state_dict`` keeps same-device tensors shared)."""
    t = config.train
    adamw = {
        "lr": t.inner_lr,
        "betas": (0.9, t.inner_beta2),
        "weight_decay": t.inner_weight_decay,
        "fused": True if t.fused_adamw else None,
    }
    optimizer: torch.optim.Optimizer
    if t.inner_optimizer == "muon":
        matrices, others = muon_split(model)
        optimizer = MuonAdamW(matrices, others, muon_momentum=t.muon_momentum, **adamw)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), **adamw)
    if warm_state is not None:
        optimizer.load_state_dict(copy.deepcopy(warm_state))
    return optimizer


def inner_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    accelerator: Accelerator,
    clip: float,
) -> torch.Tensor:
    with accelerator.autocast():
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def quiet_libraries() -> None:
    """No progress bars from datasets/transformers (runs in subprocesses, whose logs should read well)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "python": random.getstate()[1],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.array(state["numpy"], dtype=np.uint32), *np_state[2:]))
    py_state = random.getstate()
    random.setstate((py_state[0], tuple(state["python"]), py_state[2]))


def load_data(config: RecipeConfig) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Per-worker train tensors, per-language validation tensors and the shards' metadata."""
    from data_prep import ensure_sample_shards, load_shards

    data_dir = Path(config.data.data_dir)
    if not data_dir.exists() and config.data.build_sample_if_missing:
        ensure_sample_shards(
            data_dir,
            num_workers=config.diloco.num_workers,
            partition=config.data.sample_partition,
            p=config.data.sample_p,
        )
    train, validation, metadata = load_shards(data_dir, num_workers=config.diloco.num_workers)
    workers = [to_tensor(train[f"worker_{k}"]) for k in range(config.diloco.num_workers)]
    val = {lang: to_tensor(validation[lang])[: config.data.eval_sequences] for lang in metadata["languages"]}
    return workers, val, metadata


# ---------------------------------------------------------------------------------------------------
# warm start: ordinary training before the DiLoCo phase, identical for every method and cached


def warm_start(
    config: RecipeConfig,
    model: torch.nn.Module,
    shards: list[torch.Tensor],
    metadata: dict[str, Any],
    accelerator: Accelerator,
) -> dict[str, Any] | None:
    """Train ``pretrain_steps`` ordinary steps on all shards together; returns the inner optimizer's
    state to seed every worker with. The result depends only on data, model and inner hyperparameters,
    so it is cached and reused by every method of a comparison."""
    t = config.train
    if t.pretrain_steps == 0:
        return None
    key_fields = {
        "data": metadata,
        "model": [config.model.model_size, config.model.model_name_or_path, config.model.mixed_precision],
        "train": [
            t.seed,
            t.pretrain_steps,
            t.pretrain_warmup_steps,
            t.inner_lr,
            t.inner_weight_decay,
            t.inner_beta2,
            t.grad_clip,
            config.data.batch_size,
        ],
    }
    if t.inner_optimizer != "adamw":  # AdamW's key unchanged, so existing caches stay valid
        key_fields["inner_optimizer"] = [t.inner_optimizer, t.muon_momentum]
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache = Path(t.pretrain_cache_dir) / key if t.pretrain_cache_dir else None
    optimizer = make_inner_optimizer(config, model)
    if cache is not None and (cache / "model.json").exists():
        model.load_state_dict(load_state(cache, "model"))
        return load_state(cache, "optimizer")
    stream = TokenStream(torch.cat(shards), config.data.batch_size, t.seed, stream_id=10_000)
    device = accelerator.device
    bar = tqdm(range(t.pretrain_steps), desc="warm start", disable=not t.progress, leave=False)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = t.inner_lr * min(1.0, (step + 1) / max(1, t.pretrain_warmup_steps))
        loss = inner_step(model, optimizer, stream.next_batch().to(device), accelerator, t.grad_clip)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    state = optimizer.state_dict()
    if cache is not None:
        with atomic_directory(cache) as tmp:
            save_state(tmp, "model", model.state_dict())
            save_state(tmp, "optimizer", state)
    return state


def make_model(config: RecipeConfig, metadata: dict[str, Any]) -> torch.nn.Module:
    return build_model(
        config.model.model_size,
        vocab_size=int(metadata["vocab_size"]),
        max_positions=int(metadata["seq_len"]),
        eos_token_id=metadata.get("eos_token_id"),
        model_name_or_path=config.model.model_name_or_path,
        seed=config.train.seed,
    )


def prepare(config: RecipeConfig, seeds: list[int] | tuple[int, ...] = (0,)) -> int:
    """Build the shards (if asked) and the cached warm starts for these seeds; returns seq_len. Lets a
    comparison do the shared work once before its runs start in parallel."""
    shards, _, metadata = load_data(config)
    accelerator = Accelerator(mixed_precision=config.model.mixed_precision)
    for seed in seeds:
        seeded = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
        model = make_model(seeded, metadata).to(accelerator.device)
        warm_start(seeded, model, shards, metadata, accelerator)
    return int(metadata["seq_len"])
