"""Round-trip throughput of heloco's distributed transport against raw gloo send/recv.

Two processes on 127.0.0.1 (gloo, ``OMP_NUM_THREADS=1``). One round trip = the worker sends a
pseudo-gradient the size of the model and receives new parameters of the same size:

- heloco: ``DistributedTransport.submit`` → the server thread of a ``DistributedServer`` → a trivial
  aggregator (no math: it answers with its preallocated parameters) → reply. The cost measured is
  the transport's own: packing Δ into the flat buffer (converting to bf16 on the bf16 lines), header
  and JSON handling, the server packing the parameters into its reply buffer.
- "Δ in place": the same, but Δ was written straight into ``transport.pseudo_grad_buffers()`` (as a
  worker computing Δ = start − now into them would), so the worker-side copy disappears.
- raw: the same number of payload bytes sent and sent back with plain ``send``/``recv`` on a second
  pair group between the same two processes.

All are measured in the same run, alternating blocks of round trips; each line reports the median
over blocks of payload bytes moved (both directions) per second, and the ratio to raw.

    python benchmarks/transport.py [--rounds 5] [--per-block 4]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.multiprocessing as mp
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

from heloco.aggregator import Update
from heloco.transport import DistributedServer, DistributedTransport

TIMEOUT = datetime.timedelta(seconds=300)


def llama_like(vocab: int, d: int, ffn: int, layers: int) -> list[torch.Tensor]:
    """Tensor shapes of a small Llama: embeddings, attention, MLP, norms, untied head."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    shapes += [(d,), (vocab, d)]
    return [torch.randn(s) for s in shapes]


MODELS = {
    "small": dict(vocab=8192, d=128, ffn=344, layers=4),  # ~2.9M parameters
    "medium": dict(vocab=16384, d=256, ffn=688, layers=8),  # ~14.7M parameters
}


class EchoAggregator:
    """No math: answers every call with the same preallocated parameters."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.global_params = params
        self.num_workers = 2
        self.version = 0

    def dispatch(self, worker_id: int) -> Update:
        return Update(params=self.global_params, version=self.version)

    def submit(self, worker_id: int, pseudo_grads, base_version: int) -> Update:
        self.version += 1
        return Update(params=self.global_params, version=self.version, applied=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rank: int, port: int, rounds: int, per_block: int, out: mp.Queue) -> None:
    torch.manual_seed(0)
    store = TCPStore("127.0.0.1", port, 2, rank == 0, timeout=TIMEOUT)
    for name, cfg in MODELS.items():
        params = llama_like(**cfg)
        numel = sum(p.numel() for p in params)
        for wire in (torch.float32, torch.bfloat16):
            tag = f"{name}/{str(wire).split('.')[-1]}"
            payload = numel * torch.empty((), dtype=wire).element_size()
            raw_pg = ProcessGroupGloo(PrefixStore(f"raw/{tag}", store), rank, 2, TIMEOUT)
            raw_buf = torch.empty(payload, dtype=torch.uint8)
            if rank == 0:
                server = DistributedServer(
                    EchoAggregator(params), store, wire_dtype=wire, timeout=300, prefix=f"bench/{tag}"
                ).start()
                for _ in range(rounds * (per_block + 1)):  # echo the raw blocks (+1 warm-up each)
                    raw_pg.recv([raw_buf], 1, 0).wait()
                    raw_pg.send([raw_buf], 1, 0).wait()
                server.join(timeout=300)
                continue
            transport = DistributedTransport(
                1, params, store, wire_dtype=wire, timeout=300, prefix=f"bench/{tag}"
            )
            delta = [torch.randn_like(p) for p in params]
            in_place = transport.pseudo_grad_buffers()  # Δ written straight into the send buffer
            for buf, d in zip(in_place, delta, strict=True):
                buf.copy_(d)
            version = transport.dispatch(1).version
            rates: dict[str, list[float]] = {"raw": [], "copy": [], "in place": []}
            for _ in range(rounds):
                raw_pg.send([raw_buf], 0, 0).wait()  # warm-up
                raw_pg.recv([raw_buf], 0, 0).wait()
                t0 = time.perf_counter()
                for _ in range(per_block):
                    raw_pg.send([raw_buf], 0, 0).wait()
                    raw_pg.recv([raw_buf], 0, 0).wait()
                rates["raw"].append(2 * payload * per_block / (time.perf_counter() - t0))
                for mode, grads in (("copy", delta), ("in place", in_place)):
                    version = transport.submit(1, grads, version).version  # warm-up
                    t0 = time.perf_counter()
                    for _ in range(per_block):
                        version = transport.submit(1, grads, version).version
                    rates[mode].append(2 * payload * per_block / (time.perf_counter() - t0))
            transport.leave()
            r = statistics.median(rates["raw"])
            wire_name = "fp32" if wire == torch.float32 else "bf16"
            for mode, label in (("copy", ""), ("in place", ", Δ in place")):
                h = statistics.median(rates[mode])
                out.put(
                    f"transport {numel / 1e6:.1f}M params {wire_name}{label}: heloco/raw = {h / r:.2f} "
                    f"(heloco {h / 1e6:.0f} MB/s, raw {r / 1e6:.0f} MB/s)"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks per configuration")
    parser.add_argument("--per-block", type=int, default=4, help="round trips per block")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=run, args=(r, port, args.rounds, args.per_block, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    codes = [p.exitcode for p in procs]
    lines = []
    while not out.empty():
        lines.append(out.get())
    print("\n".join(lines))
    print(
        "(one round trip = submit Δ + receive params; trivial no-math aggregator; "
        "raw = plain gloo send/recv of the same payload bytes there and back)"
    )
    if codes != [0, 0]:
        sys.exit(f"benchmark processes exited with {codes}")


if __name__ == "__main__":
    main()
