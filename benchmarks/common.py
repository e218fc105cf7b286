"""Shared helpers for the benchmarks: small Llama models built locally (no download), random batches,
thread settings and timing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB_SIZE = 8192

# Shapes of the benchmark models. "tiny" matches the CPU calibration runs (~3.1M parameters);
# "small" is ~15M parameters (hidden 256, 8 layers).
LLAMA_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, intermediate_size=1408),
}


def llama_config(
    size: str, *, vocab_size: int = VOCAB_SIZE, max_position_embeddings: int = 512
) -> LlamaConfig:
    """The LlamaConfig of a named benchmark size."""
    if size not in LLAMA_SIZES:
        raise ValueError(f"size must be one of {sorted(LLAMA_SIZES)}, got {size!r}")
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        **LLAMA_SIZES[size],
    )


def build_llama(size: str, *, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM of a named size, built from a config (no download)."""
    config = llama_config(size)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_batch(
    batch_size: int, seq_len: int, *, vocab_size: int = VOCAB_SIZE, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A causal-LM batch of uniformly random token ids (labels = inputs)."""
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def set_threads(requested: int | None = None) -> int:
    """Use the requested number of threads, or every core this process may run on."""
    n = requested or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def time_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def median(values: list[float]) -> float:
    return statistics.median(values)
