"""Model construction: size presets built from a transformers config (no download), or any causal-LM
checkpoint by name or path."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

# Parameter counts are for the sample corpus' 8k vocabulary (embeddings are untied).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),  # ≈3.1M
    "small": dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=4
    ),  # ≈15M
    "150m": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    ),  # ≈126M+emb
    # The HeLoCo authors' model shape: GPT-2, 8 layers, width 128, 4 heads, untied head, 128 positions
    # (≈3.7M parameters with 8k vocabulary; ≈15M with GPT-2's 50k, which their runs used).
    "paper": dict(n_embd=128, n_layer=8, n_head=4),
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
        return with_causal_lm_loss(
            AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32)
        )
    if size not in PRESETS:
        raise ValueError(f"model_size must be one of {', '.join(PRESETS)}; got {size!r}")
    if size == "paper":
        gpt2 = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=False,
            resid_pdrop=0.0,  # the authors train without dropout
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **PRESETS[size],
        )
        torch.manual_seed(seed)
        return with_causal_lm_loss(GPT2LMHeadModel(gpt2))
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


def with_causal_lm_loss(model: PreTrainedModel) -> PreTrainedModel:
    """Name the loss of a causal LM whose class name transformers cannot map to one.

    Why: transformers picks the loss from the class name; ``GPT2LMHeadModel`` has no "ForCausalLM"
    in it, so every run warned "`loss_type=None` ... unrecognized" and fell back to that same loss.
    """
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
