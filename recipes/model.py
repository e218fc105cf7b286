"""Model construction: Llama size presets built from a transformers config (no download), or any
causal-LM checkpoint by name or path."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

# Parameter counts are for the sample corpus' 8k vocabulary (embeddings are untied).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),  # ≈3.1M
    "small": dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=4
    ),  # ≈15M
    "150m": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    ),  # ≈126M+emb
}


def build_model(
    size: str,
    vocab_size: int,
    max_positions: int,
    eos_token_id: int | None,
    model_name_or_path: str | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A freshly initialised Llama preset (seeded), or a pretrained causal LM."""
    if model_name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32)
    if size not in PRESETS:
        raise ValueError(f"model_size must be one of {', '.join(PRESETS)}; got {size!r}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        **PRESETS[size],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
