"""What a checkpoint costs, as a share of a round, on the tiny model, measured side by side in one run.

One worker round (H inner AdamW steps on batch × 128 tokens) is the unit. Beside it:

- keep: what every distributed worker pays after every submission, its state copied to the host
  (``WorkerState.take``; without AdamW moments when each round starts from a fresh AdamW);
- worker part: writing that state when a checkpoint asks for it (``worker-states/rank{r}/…``);
- server part: rank 0's ``write_checkpoint`` (global model + tokenizer files, aggregator, manifest
  with sha256), done by its background thread, off the workers' path;
- simulate: the simulator's whole checkpoint with K workers (every replica, AdamW, the server).

Each is the median of ``--repeats`` timings, interleaved with the rounds.

    python benchmarks/checkpoint.py [--inner_steps 50] [--batch_size 8] [--num_workers 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from heloco.simulation import VirtualClock
from heloco.transport import InProcessTransport
from recipes.common import make_inner_optimizer, make_model, quiet_libraries
from recipes.config import config_from_dict
from recipes.data import TokenStream
from recipes.distributed.worker_state import WorkerState
from recipes.methods import build_aggregator
from recipes.run_state import RunState, write_checkpoint
from recipes.simulator import SimulatedWorker, Simulator
from recipes.worker_round import InnerLoop


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inner_steps", type=int, default=50, help="H")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=4, help="K, for the simulator's checkpoint")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    quiet_libraries()
    k = args.num_workers
    config = config_from_dict(
        dict(
            data_dir="unused",
            model_size="tiny",
            method="heloco",
            num_workers=k,
            worker_speeds=[1.0] * k,
            inner_steps=args.inner_steps,
            batch_size=args.batch_size,
            report_to="none",
            keep_checkpoints=2,
        )
    )
    accelerator = Accelerator(cpu=True)
    metadata = {"vocab_size": 8192, "seq_len": 128, "eos_token_id": 0}
    model = make_model(config, metadata)
    numel = sum(p.numel() for p in model.parameters())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    )
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, 8192, (512, 128), generator=generator)

    aggregator = build_aggregator(config, [p.detach().clone() for p in model.parameters()])
    transport = InProcessTransport(aggregator)
    workers = []
    for w in range(k):
        replica = copy.deepcopy(model)
        stream = TokenStream(data, args.batch_size, 0, stream_id=w)
        loop = InnerLoop(config, replica, make_inner_optimizer(config, replica), stream, accelerator)
        workers.append(SimulatedWorker(w, loop, transport, args.inner_steps, accelerator.device))
    simulator = Simulator(config, aggregator, workers, VirtualClock([1.0] * k), accelerator)
    simulator.start()
    worker = workers[0].loop

    def round_() -> None:
        worker.run(args.inner_steps, progress=lambda: 0.0)

    def take() -> WorkerState:
        return WorkerState.take(0, 1, worker.local_step, worker.optimizer, worker.stream)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)

        def write(mode: str, workers: dict) -> None:
            """Rank 0's part (``distributed``: the workers' submission counts) or the simulator's whole
            checkpoint (``simulate``: every worker)."""
            state = RunState(
                mode=mode,
                schedule={"arrivals": 1},
                aggregator=aggregator.state_dict(),
                metrics_lines=0,
                inner_steps=[args.inner_steps] * k,
                workers=workers,
            )
            path = out / mode / "checkpoint-1"
            write_checkpoint(path, state, model=model, tokenizer=tokenizer, config=config)

        round_()  # warm up: AdamW state exists from here on
        timings: dict[str, list[float]] = {
            name: []
            for name in ("round", "keep", "keep (fresh AdamW)", "worker part", "server part", "simulate")
        }
        for _ in range(args.repeats):
            timings["round"].append(seconds(round_))
            timings["keep"].append(seconds(take))
            timings["keep (fresh AdamW)"].append(
                seconds(
                    lambda: WorkerState.take(0, 1, 0, worker.optimizer, worker.stream, with_moments=False)
                )
            )
            held = take()
            timings["worker part"].append(seconds(lambda held=held: held.write(out, keep=2)))
            timings["server part"].append(seconds(lambda: write("distributed", {"submissions": [1] * k})))
            timings["simulate"].append(seconds(lambda: write("simulate", simulator.state_dict())))

    median = {name: statistics.median(values) for name, values in timings.items()}
    round_s = median["round"]
    print(
        f"checkpoint tiny ({numel / 1e6:.2f}M params, H={args.inner_steps}, batch {args.batch_size}x128, "
        f"K={k}): round {round_s * 1e3:.0f} ms; "
        + ", ".join(
            f"{name} {median[name] * 1e3:.1f} ms = {median[name] / round_s:.3f} round"
            for name in list(median)[1:]
        )
    )


if __name__ == "__main__":
    main()
