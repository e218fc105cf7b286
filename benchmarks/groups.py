"""A worker that is a group of 2 processes (gloo, ``OMP_NUM_THREADS=1`` each), the paper model shape.

Three lines, each measured side by side in one run:

- inner loop: the group's tokens per second through our round (``InnerLoop.run`` over DDP on its
  ``GroupSlice`` of the group batch) against a plain DDP loop (forward, backward, AdamW step) on the
  same batches; interleaved blocks, median of the per-block ratios (goal >= 0.95).
- exchange: one round's ``DiLoCoWorker.sync()`` on both ranks (Δ, the leader's submit to an in-process
  aggregator whose outer step is a no-op, the answer broadcast to the group and loaded) as a share
  of the round (H inner steps + sync).
- who sends (the design question): for a sharded group, (a) the first rank gathers the full Δ,
  sends it to a server process and broadcasts the answer, against (b) every rank sending its own
  shard and receiving its own shard back, on three processes (two group ranks and a server).

    python benchmarks/groups.py [--inner_steps 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from heloco import AsyncAggregator, DiLoCoWorker, InProcessTransport
from recipes.config import config_from_dict
from recipes.data import TokenStream
from recipes.distributed.groups import GroupSlice, GroupTransport, wrap_for_group
from recipes.model import build_model
from recipes.worker_round import InnerLoop

VOCAB, SEQ, BATCH = 8192, 128, 2  # per rank: the paper's batch of 2 x 128


class Shim:
    device = torch.device("cpu")

    @staticmethod
    def autocast():
        return torch.autocast("cpu", enabled=False)


class NoStep(torch.optim.Optimizer):
    """An outer optimizer that does nothing: the exchange line measures everything but its math."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def model_and_data(seed: int):
    torch.manual_seed(seed)
    model = build_model("paper", vocab_size=VOCAB, max_positions=SEQ, eos_token_id=None)
    data = torch.randint(0, VOCAB, (512, SEQ), generator=torch.Generator().manual_seed(1))
    return model, data


def group_rank(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = config_from_dict(dict(inner_lr=2e-4, model_size="paper", lr_schedule="constant", grad_clip=0.0))
    model, data = model_and_data(0)
    ddp = wrap_for_group(model, dist.group.WORLD, "ddp", torch.device("cpu"))
    opt = torch.optim.AdamW(ddp.parameters(), lr=2e-4)
    ours = InnerLoop(
        config, ddp, opt, GroupSlice(TokenStream(data, world * BATCH, 0, stream_id=0), rank, world), Shim()
    )
    plain_model, _ = model_and_data(0)
    plain = wrap_for_group(plain_model, dist.group.WORLD, "ddp", torch.device("cpu"))
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=2e-4)
    plain_stream = TokenStream(data, world * BATCH, 0, stream_id=0)

    def plain_round() -> None:
        for _ in range(args.inner_steps):
            batch = plain_stream.next_batch()[rank * BATCH : (rank + 1) * BATCH]
            plain(input_ids=batch, labels=batch).loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

    aggregator = None
    inner = None
    if rank == 0:
        masters = [p.detach().clone() for p in model.parameters()]
        aggregator = AsyncAggregator(masters, NoStep(masters), num_workers=1)
        inner = InProcessTransport(aggregator)
    transport = GroupTransport(inner, dist.group.WORLD, 0, rank == 0, list(model.parameters()))
    worker = DiLoCoWorker(ddp, opt, transport, 0, args.inner_steps)
    worker.pull()

    ratios, shares = [], []
    for r in range(args.rounds + 1):
        times = {}
        for name in ("ours", "plain") if r % 2 else ("plain", "ours"):
            dist.barrier()
            start = time.perf_counter()
            if name == "ours":
                ours.run(args.inner_steps, progress=lambda: 0.0)
                times["steps"] = time.perf_counter() - start
                synced = time.perf_counter()
                worker.sync()
                times["sync"] = time.perf_counter() - synced
            else:
                plain_round()
            times[name] = time.perf_counter() - start
        if r:  # the first round warms up
            ratios.append(times["plain"] / times["steps"])
            shares.append(times["sync"] / times["ours"])
    if rank == 0:
        results["inner"] = statistics.median(ratios)
        results["share"] = statistics.median(shares)
        results["numel"] = sum(p.numel() for p in model.parameters())
    dist.destroy_process_group()


def who_sends(rank: int, world: int, port: int, args, results) -> None:
    """Ranks 0, 1: a sharded group; rank 2: the server. (a) gather + one sender + broadcast; (b) each
    rank sends and receives its own shard."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group([0, 1])
    numel = args.numel
    full = torch.randn(numel)
    shard = full[: numel // 2].clone()
    times = {"a": [], "b": []}
    for r in range(args.rounds + 1):
        for way in ("a", "b") if r % 2 else ("b", "a"):
            dist.barrier()
            start = time.perf_counter()
            if way == "a":
                if rank < 2:
                    gathered = torch.empty(numel)
                    dist.all_gather_single(gathered, shard, group=group)
                    if rank == 0:
                        dist.send(gathered, 2)
                        dist.recv(gathered, 2)
                    dist.broadcast(gathered, 0, group=group)
                else:
                    dist.recv(full, 0)
                    dist.send(full, 0)
            elif rank < 2:
                dist.send(shard, 2)
                dist.recv(shard, 2)
            else:
                parts = [torch.empty(numel // 2), torch.empty(numel // 2)]
                ops = [dist.P2POp(dist.irecv, parts[0], 0), dist.P2POp(dist.irecv, parts[1], 1)]
                for op in dist.batch_isend_irecv(ops):
                    op.wait()
                ops = [dist.P2POp(dist.isend, parts[0], 0), dist.P2POp(dist.isend, parts[1], 1)]
                for op in dist.batch_isend_irecv(ops):
                    op.wait()
            dist.barrier()
            if r:
                times[way].append(time.perf_counter() - start)
    if rank == 0:
        results["a"] = statistics.median(times["a"])
        results["b"] = statistics.median(times["b"])
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inner_steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(group_rank, args=(2, free_port(), args, results), nprocs=2)
        inner, share, numel = results["inner"], results["share"], results["numel"]
        print(
            f"groups DDP x2 paper model ({numel / 1e6:.2f}M params, H={args.inner_steps}, batch {BATCH}x{SEQ} "
            f"per rank): inner loop ours/plain DDP = {inner:.3f}; exchange (sync on both ranks) = "
            f"{share:.1%} of the round"
        )
        args.numel = numel
        mp.spawn(who_sends, args=(3, free_port(), args, results), nprocs=3)
        print(
            f"groups who sends ({numel / 1e6:.2f}M fp32 values, group of 2 + server, gloo): "
            f"gather + one sender + broadcast {results['a'] * 1e3:.1f} ms, every rank its shard "
            f"{results['b'] * 1e3:.1f} ms (ratio {results['a'] / results['b']:.2f})"
        )


if __name__ == "__main__":
    main()
