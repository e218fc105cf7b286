"""Round trip of a DiLoCo pseudo-gradient through heloco's distributed transport, against raw gloo.

Two processes on 127.0.0.1 (gloo, ``OMP_NUM_THREADS=1``): rank 0 runs a ``DistributedServer``, rank 1
a worker. One round trip = the worker sends a model-sized message and gets a model-sized reply. Four
ways, measured in the same run, in interleaved blocks:

- raw: plain gloo ``send``/``recv`` of the same payload bytes there and back, nothing else.
- ordinary (the main line): what a distributed run does at the end of every round.
  ``DiLoCoWorker.sync()`` computes Δ = start − now straight into the transport's send buffer
  (``pseudo_grad_buffers()``), ``DistributedTransport.submit`` sends it, the server thread hands it
  to a real ``AsyncAggregator`` (finiteness check, Δ converted into its scratch unless it is fp32
  already, outer step (no pre-step backup since the aggregator validates before it mutates),
  reply written into the server's message buffer with
  ``out=``), the worker loads the reply into the model and θ_start. The outer optimizer is a no-op, so the line measures everything but the outer
  step's own math (which is the same wherever the server runs).
- before: the same without the shortcuts, as the code was before them: Δ in the worker's own
  buffers and copied into the send buffer, copied again into the aggregator's scratch, the reply
  parameters cloned by the aggregator and copied into the message buffer by the server.
- transport only: ``DistributedTransport.submit`` of a Δ already in the send buffer, answered by an
  aggregator that only copies its parameters into the reply buffer: the transport's own cost.

Each line is the median over rounds of the per-round ratio of payload bytes moved per second
(heloco / raw, paired so that drifting machine load cancels). A breakdown line times, in the worker
process alone, the pieces the ordinary path adds to a raw round trip.

With ``--codec int8`` (or bf16, topk; ``none`` skips it) two more lines per model compare an
*encoded* round trip with raw gloo moving the same bytes (the encoded Δ there, the fp32 parameters
back), measured in the same run, in interleaved blocks:

- encoded, transport only: ``DistributedTransport.submit_encoded`` of a message already encoded
  into the send buffer; the server decodes it into fp32 (its checks included) and an aggregator that
  only copies its parameters answers: the wire and the server's decode.
- encoded, ordinary: ``DiLoCoWorker.sync()`` with ``ErrorFeedback(codec)``: Δ, error feedback and
  encoding on the worker, then the above with a real ``AsyncAggregator`` (no-op outer step).
- encoded, transport only, link B Gbit/s (``--link-gbps B ...``): the transport-only round trip
  through ``EmulatedLink`` (the wrapper distributed runs use: it sleeps encoded bytes / B up and
  reply bytes / B down), against raw gloo that sleeps as long for the same bytes. On loopback the
  bytes cost a memory copy, so the server's decode and reply copy weigh as much as the wire; a
  link slower than memory is the regime DiLoCo is for, and these lines measure the transport there.

A ceiling line gives the best ratio any server could reach on loopback while doing the two pieces of
work raw gloo does not: raw / (raw + decode + reply copy). The reply copy is not optional: replies
are sent from a snapshot because another connection's outer step may change the parameters
while this one's reply is on the wire.

The machine's load average is printed with the numbers (they move with it).

    python benchmarks/transport.py [--rounds 7] [--per-block 3] [--codec int8] [--link-gbps 10 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

from heloco.aggregator import AsyncAggregator, Update
from heloco.codecs import CODEC_NAMES, Codec, ErrorFeedback, make_codec
from heloco.distributed.client import DistributedTransport
from heloco.distributed.link import EmulatedLink, link_seconds
from heloco.distributed.server import DistributedServer
from heloco.worker import DiLoCoWorker

TIMEOUT = datetime.timedelta(seconds=300)
MODES = ("ordinary", "before", "transport only")
ENCODED_MODES = ("encoded, transport only", "encoded, ordinary")


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


class NoOpOuter(torch.optim.Optimizer):
    """An outer optimizer whose step changes nothing: the aggregator's plumbing without its math."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__(params, {"lr": 0.0})

    def step(self, closure: Callable[[], float] | None = None) -> None:
        return None


def aggregator(params: list[torch.Tensor]) -> AsyncAggregator:
    masters = [p.clone() for p in params]
    return AsyncAggregator(masters, NoOpOuter(masters), num_workers=2)


class AllocatingAggregator:
    """The aggregator as it was before ``out=``: every answer is a fresh clone of the parameters."""

    def __init__(self, inner: AsyncAggregator) -> None:
        self.inner = inner
        self.num_workers = inner.num_workers
        self.global_params = inner.global_params

    def dispatch(self, worker_id: int) -> Update:
        return self.inner.dispatch(worker_id)

    def submit(self, worker_id: int, pseudo_grads: Sequence[torch.Tensor], base_version: int) -> Update:
        return self.inner.submit(worker_id, pseudo_grads, base_version)


class CopyingAggregator:
    """No math: writes its preallocated parameters into the reply buffer (the transport's own cost)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.global_params = params
        self.num_workers = 2
        self.quorum = 1
        self.effective_quorum = 1
        self.version = 0

    def remove_worker(self, worker_id: int) -> Update:
        return Update(params=None, version=self.version)

    def dispatch(self, worker_id: int, *, out: list[torch.Tensor] | None = None) -> Update:
        return self.submit(worker_id, [], self.version, out=out)

    def submit(
        self,
        worker_id: int,
        pseudo_grads: object,
        base_version: int,
        *,
        out: list[torch.Tensor] | None = None,
    ) -> Update:
        if out is not None:
            torch._foreach_copy_(out, self.global_params)
        return Update(params=out if out is not None else self.global_params, version=self.version)


class OpaqueTransport:
    """Hides ``pseudo_grad_buffers()``: the worker computes Δ in its own buffers, as before."""

    def __init__(self, transport: DistributedTransport) -> None:
        self.transport = transport

    def dispatch(self, worker_id: int) -> Update:
        return self.transport.dispatch(worker_id)

    def submit(self, worker_id: int, pseudo_grads: Sequence[torch.Tensor], base_version: int) -> Update:
        return self.transport.submit(worker_id, pseudo_grads, base_version)


class Replica(nn.Module):
    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(p.clone()) for p in params])


def worker_for(params: list[torch.Tensor], transport: object) -> DiLoCoWorker:
    model = Replica(params)
    worker = DiLoCoWorker(model, torch.optim.SGD(model.parameters(), lr=0.0), transport, 1, sync_every=1)
    worker.pull()
    return worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ms(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best of ``repeat`` timings, in milliseconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def serve(
    store: TCPStore, tag: str, params: list[torch.Tensor], wire: torch.dtype, raw: tuple, blocks: int
) -> None:
    """Rank 0: one server per way of answering, plus the raw echo."""
    raw_pg, raw_buf = raw
    targets = {
        "ordinary": aggregator(params),
        "before": AllocatingAggregator(aggregator(params)),
        "transport only": CopyingAggregator(params),
    }
    # "before" is a plain Server (no out=): the server is told K and the parameter shapes.
    servers = [
        DistributedServer(
            agg,
            store,
            num_workers=agg.num_workers,
            params_like=agg.global_params,
            wire_dtype=wire,
            timeout=300,
            prefix=f"{tag}/{mode}",
        ).start()
        for mode, agg in targets.items()
    ]
    for _ in range(blocks):
        raw_pg.recv([raw_buf], 1, 0).wait()
        raw_pg.send([raw_buf], 1, 0).wait()
    for server in servers:
        server.join(timeout=300)


def measure(
    store: TCPStore,
    tag: str,
    params: list[torch.Tensor],
    wire: torch.dtype,
    raw: tuple,
    rounds: int,
    per_block: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Rank 1: interleaved blocks of raw and heloco round trips (bytes/s per block), and the
    ordinary path's added pieces timed alone (ms)."""
    raw_pg, raw_buf = raw
    payload = raw_buf.numel()
    transports = {
        mode: DistributedTransport(1, params, store, wire_dtype=wire, timeout=300, prefix=f"{tag}/{mode}")
        for mode in MODES
    }
    ordinary = worker_for(params, transports["ordinary"])
    before = worker_for(params, OpaqueTransport(transports["before"]))
    direct = transports["transport only"]
    in_place = direct.pseudo_grad_buffers()
    for buf, p in zip(in_place, params, strict=True):
        buf.copy_(torch.randn_like(p) * 1e-3)
    version = direct.dispatch(1).version
    steps: dict[str, Callable[[], object]] = {
        "ordinary": ordinary.sync,
        "before": before.sync,
        "transport only": lambda: direct.submit(1, in_place, version),
    }
    local = aggregator(params)
    message = [b.clone() for b in in_place]  # Δ arrives in the server's buffer; the reply goes there
    received = transports["ordinary"].recv_message.views
    pieces: dict[str, Callable[[], object]] = {
        "Δ into the send buffer": ordinary.pseudo_gradient,
        "load reply": lambda: ordinary.load(received, ordinary.base_version),
        "aggregator": lambda: local.submit(0, message, local.version, out=message),
    }

    def raw_round_trip() -> None:
        raw_pg.send([raw_buf], 0, 0).wait()
        raw_pg.recv([raw_buf], 0, 0).wait()

    rates: dict[str, list[float]] = {"raw": [], **{m: [] for m in MODES}}
    piece_ms: dict[str, list[float]] = {k: [] for k in pieces}
    for _ in range(rounds):
        for mode, step in {"raw": raw_round_trip, **steps}.items():
            step()  # warm-up
            t0 = time.perf_counter()
            for _ in range(per_block):
                step()
            rates[mode].append(2 * payload * per_block / (time.perf_counter() - t0))
        for piece, fn in pieces.items():
            piece_ms[piece].append(ms(fn))
    for t in transports.values():
        t.leave()
    return rates, piece_ms


def serve_encoded(
    store: TCPStore, tag: str, params: list[torch.Tensor], codec: Codec, raw: tuple, blocks: int
) -> None:
    """Rank 0, encoded: a server with the codec per way of answering, plus the raw echo (the
    encoded bytes in, the fp32 parameters' bytes out)."""
    raw_pg, raw_in, raw_out = raw
    targets = {"encoded, transport only": CopyingAggregator(params), "encoded, ordinary": aggregator(params)}
    servers = [
        DistributedServer(
            agg, store, num_workers=2, params_like=params, timeout=300, prefix=f"{tag}/{mode}", codec=codec
        ).start()
        for mode, agg in targets.items()
    ]
    for _ in range(blocks):
        raw_pg.recv([raw_in], 1, 0).wait()
        raw_pg.send([raw_out], 1, 0).wait()
    for server in servers:
        server.join(timeout=300)


def measure_encoded(
    store: TCPStore,
    tag: str,
    params: list[torch.Tensor],
    codec: Codec,
    raw: tuple,
    rounds: int,
    per_block: int,
    links_gbps: Sequence[float] = (),
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Rank 1, encoded: interleaved blocks of raw and heloco round trips (bytes/s per block; each
    heloco mode is paired with the raw mode of the same link), and the two pieces of server work
    that raw gloo does not do, timed alone (ms): decoding the message into fp32 and copying the
    parameters into the reply."""
    raw_pg, raw_in, raw_out = raw
    moved = raw_in.numel() + raw_out.numel()
    transports = {
        mode: DistributedTransport(1, params, store, timeout=300, prefix=f"{tag}/{mode}", codec=codec)
        for mode in ENCODED_MODES
    }
    direct = transports["encoded, transport only"]
    version = direct.dispatch(1).version
    message = codec.encode([torch.randn_like(p) * 1e-3 for p in params], out=direct.encoded_buffer())
    model = Replica(params)
    ordinary = DiLoCoWorker(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        transports["encoded, ordinary"],
        1,
        sync_every=1,
        codec=ErrorFeedback(make_codec(**codec.config())),
    )
    ordinary.pull()
    steps: dict[str, Callable[[], object]] = {
        "encoded, transport only": lambda: direct.submit_encoded(1, message, version),
        "encoded, ordinary": ordinary.sync,
    }
    server_codec = make_codec(**codec.config())
    decoded, reply = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    pieces: dict[str, Callable[[], object]] = {
        "decode": lambda: server_codec.decode(message, decoded),
        "reply copy": lambda: torch._foreach_copy_(reply, params),
    }

    def raw_round_trip(bandwidth: float | None = None) -> None:
        time.sleep(link_seconds(raw_in.numel(), bandwidth, 0.0))
        raw_pg.send([raw_in], 0, 0).wait()
        raw_pg.recv([raw_out], 0, 0).wait()
        time.sleep(link_seconds(raw_out.numel(), bandwidth, 0.0))

    steps["raw"] = raw_round_trip
    for gbps in links_gbps:
        link = EmulatedLink(direct, uplink_bandwidth=gbps * 1.25e8, downlink_bandwidth=gbps * 1.25e8)
        steps[f"raw, link {gbps:g} Gbit/s"] = lambda b=gbps * 1.25e8: raw_round_trip(b)
        steps[f"encoded, transport only, link {gbps:g} Gbit/s"] = lambda e=link: e.submit_encoded(
            1, message, version
        )
    rates: dict[str, list[float]] = {mode: [] for mode in steps}
    piece_ms: dict[str, list[float]] = {k: [] for k in pieces}
    for _ in range(rounds):
        for mode, step in steps.items():
            step()  # warm-up
            t0 = time.perf_counter()
            for _ in range(per_block):
                step()
            rates[mode].append(moved * per_block / (time.perf_counter() - t0))
        for piece, fn in pieces.items():
            piece_ms[piece].append(ms(fn))
    for t in transports.values():
        t.leave()
    return rates, piece_ms


def run_encoded(
    rank: int,
    store: TCPStore,
    codec_name: str,
    rounds: int,
    per_block: int,
    out: mp.Queue,
    links_gbps: Sequence[float] = (),
) -> None:
    """The encoded lines: per model, our encoded round trip against raw gloo moving the same bytes
    (on loopback, then on each emulated link)."""
    for name, cfg in MODELS.items():
        params = llama_like(**cfg)
        numel = sum(p.numel() for p in params)
        codec = make_codec(codec_name)
        encoded = codec.max_nbytes([tuple(p.shape) for p in params])
        tag = f"{name}/codec-{codec_name}"
        raw_pg = ProcessGroupGloo(PrefixStore(f"raw/{tag}", store), rank, 2, TIMEOUT)
        raw = (raw_pg, torch.empty(encoded, dtype=torch.uint8), torch.empty(4 * numel, dtype=torch.uint8))
        if rank == 0:
            serve_encoded(store, tag, params, codec, raw, rounds * (per_block + 1) * (1 + len(links_gbps)))
            continue
        rates, piece_ms = measure_encoded(store, tag, params, codec, raw, rounds, per_block, links_gbps)
        raw_rate = statistics.median(rates["raw"])
        label = f"transport {numel / 1e6:.1f}M params {codec_name} up ({encoded / 4 / numel:.2f} of fp32) fp32 down"
        paired = {mode: "raw" for mode in ENCODED_MODES}
        paired |= {
            f"encoded, transport only, link {g:g} Gbit/s": f"raw, link {g:g} Gbit/s" for g in links_gbps
        }
        for mode, raw_mode in paired.items():
            ratio = statistics.median(h / r for h, r in zip(rates[mode], rates[raw_mode], strict=True))
            rate, raw_mode_rate = statistics.median(rates[mode]), statistics.median(rates[raw_mode])
            out.put(
                f"{label}, {mode}: heloco/raw = {ratio:.2f} (heloco {rate / 1e6:.0f} MB/s, raw "
                f"{raw_mode_rate / 1e6:.0f} MB/s; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})"
            )
        moved = encoded + 4 * numel
        raw_ms = moved / raw_rate * 1e3
        ours_ms = moved / statistics.median(rates["encoded, transport only"]) * 1e3
        added = {k: statistics.median(v) for k, v in piece_ms.items()}
        wire_ms = ours_ms - sum(added.values())
        out.put(
            f"{label}, breakdown of transport only: {ours_ms:.1f} ms per round trip = server work "
            f"{sum(added.values()):.1f} ms ({', '.join(f'{k} {v:.1f}' for k, v in added.items())}) + "
            f"the rest {wire_ms:.1f} ms, against raw {raw_ms:.1f} ms for the same bytes "
            f"(raw/rest = {raw_ms / wire_ms:.2f}); ceiling on loopback with that server work: raw / (raw + "
            f"server work) = {raw_ms / (raw_ms + sum(added.values())):.2f}"
        )


def run(
    rank: int,
    port: int,
    rounds: int,
    per_block: int,
    out: mp.Queue,
    codec: str = "none",
    links_gbps: Sequence[float] = (),
) -> None:
    torch.manual_seed(0)
    store = TCPStore("127.0.0.1", port, 2, rank == 0, timeout=TIMEOUT)
    for name, cfg in MODELS.items():
        params = llama_like(**cfg)
        numel = sum(p.numel() for p in params)
        for wire in (torch.float32, torch.bfloat16):
            wire_name = "fp32" if wire == torch.float32 else "bf16"
            tag = f"{name}/{wire_name}"
            payload = numel * torch.empty((), dtype=wire).element_size()
            raw_pg = ProcessGroupGloo(PrefixStore(f"raw/{tag}", store), rank, 2, TIMEOUT)
            raw = (raw_pg, torch.empty(payload, dtype=torch.uint8))
            if rank == 0:
                serve(store, tag, params, wire, raw, rounds * (per_block + 1))
                continue
            rates, piece_ms = measure(store, tag, params, wire, raw, rounds, per_block)
            raw_rate = statistics.median(rates["raw"])
            label = f"transport {numel / 1e6:.1f}M params {wire_name}"
            for mode in MODES:
                ratio = statistics.median(h / r for h, r in zip(rates[mode], rates["raw"], strict=True))
                rate = statistics.median(rates[mode])
                out.put(
                    f"{label}, {mode}: heloco/raw = {ratio:.2f} "
                    f"(heloco {rate / 1e6:.0f} MB/s, raw {raw_rate / 1e6:.0f} MB/s)"
                )
            raw_ms = 2 * payload / raw_rate * 1e3
            ordinary_ms = 2 * payload / statistics.median(rates["ordinary"]) * 1e3
            added = {k: statistics.median(v) for k, v in piece_ms.items()}
            parts = ", ".join(f"{k} {v:.1f}" for k, v in added.items())
            out.put(
                f"{label}, breakdown: ordinary {ordinary_ms:.1f} ms per round trip vs raw {raw_ms:.1f} ms "
                f"+ added work {sum(added.values()):.1f} ms ({parts})"
            )
    if codec != "none":
        run_encoded(rank, store, codec, rounds, per_block, out, links_gbps)


def run_codec_only(
    rank: int, port: int, rounds: int, per_block: int, out: mp.Queue, codec: str, links_gbps: Sequence[float]
) -> None:
    torch.manual_seed(0)
    store = TCPStore("127.0.0.1", port, 2, rank == 0, timeout=TIMEOUT)
    run_encoded(rank, store, "int8" if codec == "none" else codec, rounds, per_block, out, links_gbps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved blocks per configuration")
    parser.add_argument("--per-block", type=int, default=3, help="round trips per block")
    parser.add_argument(
        "--codec",
        default="int8",
        choices=["none", *(c for c in CODEC_NAMES if c != "fp32")],
        help="also measure Δ encoded with this codec against raw gloo of the same bytes (none: skip)",
    )
    parser.add_argument("--only-codec", action="store_true", help="only the encoded lines")
    parser.add_argument(
        "--link-gbps",
        type=float,
        nargs="*",
        default=[],
        help="also time the encoded transport-only round trip through EmulatedLink at these Gbit/s, "
        "against raw gloo sleeping as long for the same bytes",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.per_block < 1:
        parser.error("--rounds and --per-block must be >= 1")
    if any(not g > 0 for g in args.link_gbps):
        parser.error(f"--link-gbps must be > 0 Gbit/s, got {args.link_gbps}")
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    target = run_codec_only if args.only_codec else run
    procs = [
        ctx.Process(
            target=target, args=(r, port, args.rounds, args.per_block, out, args.codec, args.link_gbps)
        )
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    codes = [p.exitcode for p in procs]
    lines = []
    while not out.empty():
        lines.append(out.get())
    print(f"load average before/after: {load_before} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(lines))
    print(
        "(one round trip = Δ there, parameters back; ratios are medians of per-round paired ratios; "
        "ordinary = DiLoCoWorker.sync() → DistributedServer → AsyncAggregator with a no-op outer step → "
        "load; raw = plain gloo send/recv of the same payload bytes)"
    )
    if codes != [0, 0]:
        sys.exit(f"benchmark processes exited with {codes}")


if __name__ == "__main__":
    main()
