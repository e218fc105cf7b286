"""Inner-step throughput of the paper's model at the paper's batch (2 × 128), before vs after.

"before" is the recipe's inner step as it was: torch's default (foreach) AdamW. "after" is what
recipes/configs/paper/ uses: torch's fused AdamW kernel (`fused_adamw: true`), which updates all
parameters in one kernel instead of a dozen foreach launches. A third line, "compiled", adds
``torch.compile`` of the model (its compile time is printed separately and not counted). The variants
alternate in short blocks on the same batches so that load drifts affect them alike. Gradient clipping
is off, as in the reference setting. Prints tokens/s of each and the ratios to "before".

    python benchmarks/inner_step.py [--steps 60] [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from recipes.model import build_model


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--block", type=int, default=10, help="steps per variant before alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (compare.py runs 1 per job)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build_model("paper", args.vocab_size, args.seq_len, eos_token_id=0, seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        for _ in range(args.block)
    ]
    variants: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    for name, fused in (("before (foreach AdamW)", None), ("after (fused AdamW)", True)):
        model = copy.deepcopy(base)
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=2e-4, fused=fused))
    if args.compile:
        model = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=True)
        compiled = torch.compile(model)
        started = time.perf_counter()
        for batch in batches[:3]:
            step(compiled, optimizer, batch)
        print(f"torch.compile warm-up: {time.perf_counter() - started:.1f} s (not counted)")
        variants["compiled (fused AdamW)"] = (compiled, optimizer)
    for model, optimizer in variants.values():  # warm-up: allocator, optimizer state
        for batch in batches[:2]:
            step(model, optimizer, batch)
    elapsed = dict.fromkeys(variants, 0.0)
    done = 0
    while done < args.steps:
        for name, (model, optimizer) in variants.items():
            started = time.perf_counter()
            for batch in batches:
                step(model, optimizer, batch)
            elapsed[name] += time.perf_counter() - started
        done += len(batches)
    tokens = done * args.batch_size * args.seq_len
    print(
        f"paper model ({sum(p.numel() for p in base.parameters()) / 1e6:.2f}M params), batch "
        f"{args.batch_size}x{args.seq_len}, {args.threads} thread(s), {done} steps per variant"
    )
    reference = tokens / elapsed["before (foreach AdamW)"]
    for name, seconds in elapsed.items():
        rate = tokens / seconds
        print(f"  {name:24s} {rate:8.0f} tokens/s   x{rate / reference:.3f}")


if __name__ == "__main__":
    main()
