"""Throughput of the heloco worker loop relative to a plain Accelerate loop, measured side by side.

Same model, same batches, same AdamW: the plain loop is the user's loop as they wrote it; the heloco
loop is that loop inside `with DiLoCoWorker(...)` (a step hook, and every H steps Δ + an outer HeLoCo
step + loading the answer, through the in-process transport). Steps alternate one by one between the two
so that machine load drifts affect both alike. Prints tokens/s of each and their ratio.

    python benchmarks/worker_overhead.py [--size tiny] [--inner_steps 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate import Accelerator
from common import build_llama, num_params, random_batch, set_threads

from heloco import AsyncAggregator, DiLoCoWorker, HeLoCo, InProcessTransport


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--inner_steps", type=int, default=50, help="H")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    args = parser.parse_args()
    set_threads()
    accelerator = Accelerator()
    generator = torch.Generator().manual_seed(0)
    batches = [
        random_batch(args.batch_size, args.seq_len, generator=generator)["input_ids"] for _ in range(8)
    ]

    base = build_llama(args.size)
    plain_model = copy.deepcopy(base)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, weight_decay=0.1)
    plain_model, plain_opt = accelerator.prepare(plain_model, plain_opt)

    worker_model = copy.deepcopy(base)
    worker_opt = torch.optim.AdamW(worker_model.parameters(), lr=1e-3, weight_decay=0.1)
    worker_model, worker_opt = accelerator.prepare(worker_model, worker_opt)
    global_params = [p.detach().clone() for p in base.parameters()]
    aggregator = AsyncAggregator(global_params, HeLoCo(global_params), num_workers=1)
    worker = DiLoCoWorker(worker_model, worker_opt, InProcessTransport(aggregator), 0, args.inner_steps)

    def step(model, optimizer, i):
        batch = batches[i % len(batches)].to(accelerator.device)
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    def timed(model, optimizer, i):
        start = time.perf_counter()
        step(model, optimizer, i)
        return time.perf_counter() - start

    for _ in range(3):  # warm up both paths
        step(plain_model, plain_opt, 0)
    # Steps alternate one by one (plain, heloco, plain, ...) so that load on a shared machine hits both
    # alike; the heloco side pays its hook on every step and Δ + outer step + reload every H-th step.
    plain_s = worker_s = 0.0
    with worker:
        for i in range(args.rounds * args.inner_steps):
            if i % 2:  # swap the order every step: neither side always runs second (warmer caches)
                worker_s += timed(worker_model, worker_opt, i)
                plain_s += timed(plain_model, plain_opt, i)
            else:
                plain_s += timed(plain_model, plain_opt, i)
                worker_s += timed(worker_model, worker_opt, i)
    tokens = args.rounds * args.inner_steps * args.batch_size * args.seq_len
    plain_tps, worker_tps = tokens / plain_s, tokens / worker_s
    print(
        f"worker_overhead {args.size} ({num_params(base) / 1e6:.1f}M params, H={args.inner_steps}, "
        f"{aggregator.version} outer steps): heloco/plain = {worker_tps / plain_tps:.3f} "
        f"(heloco {worker_tps:.0f} tok/s, plain {plain_tps:.0f} tok/s)"
    )


if __name__ == "__main__":
    main()
