"""The simulator's own cost, side by side in one run: model-sized writes per round and tokens/s.

Three paths train on the same batches, round by round, in turn (the order rotates every round):

- plain: one replica and its AdamW, no DiLoCo (the user's loop; the throughput ceiling);
- hooks: the simulator before the redesign, each virtual worker a ``heloco.DiLoCoWorker`` whose
  optimizer hook sends Δ through the in-process transport (what users' own loops still use);
- explicit: ``recipes.simulator.Simulator`` (Δ into a preallocated buffer in one pass, submit with
  the answer written into θ_start, one copy into the replica).

Writes are counted with a ``TorchFunctionMode`` over the end of one round (Δ → submit → load): the
elements every torch call writes (its ``out=``, the tensors it mutates, or a new result), divided by the model's
parameter count; the outer optimizer's own step is counted apart. Inner steps use a constant
learning rate and keep AdamW across rounds so that the three paths do the same inner work.

    python benchmarks/simulator.py [--rounds 20] [--inner_steps 20] [--method heloco]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch.overrides import TorchFunctionMode

from heloco import DiLoCoWorker, InProcessTransport
from heloco.simulation import VirtualClock
from recipes.common import inner_step, make_inner_optimizer, make_model
from recipes.config import RecipeConfig, config_from_dict
from recipes.data import TokenStream
from recipes.methods import build_aggregator
from recipes.simulator import SimulatedWorker, Simulator
from recipes.worker_round import InnerLoop, RoundResult

NO_RESULT = RoundResult(steps=0, train_loss=0.0, data_checksum=0)  # the round's end alone is counted

PACES = [1.0, 6.0, 6.0, 6.0, 6.0]  # the paper's moderate cell, seconds per inner step


class WriteCounter(TorchFunctionMode):
    """Counts the elements written by torch calls: an ``out=`` tensor, the first argument of an
    in-place call (``add_``, ``_foreach_copy_``), else a returned tensor that is not a view of an
    argument. Calls made inside a counted call are not counted again."""

    def __init__(self) -> None:
        super().__init__()
        self.written = {"sync": 0, "outer step": 0}
        self.section = "sync"

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if "out" in kwargs:
            self.written[self.section] += _numel(kwargs["out"])
        elif name.endswith("_") and not name.endswith("__") and args:
            self.written[self.section] += _numel(args[0])
        elif isinstance(out, torch.Tensor) and not _is_view_of(out, [*args, *kwargs.values()]):
            self.written[self.section] += out.numel()
        return out


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, list | tuple):
        return sum(_numel(v) for v in value)
    return 0


def _is_view_of(tensor: torch.Tensor, inputs: list[Any]) -> bool:
    pointer = tensor.untyped_storage().data_ptr()
    flat = [x for v in inputs for x in (v if isinstance(v, list | tuple) else [v])]
    return any(isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() == pointer for x in flat)


def counting_outer_step(optimizer: torch.optim.Optimizer, counter: WriteCounter) -> None:
    step = optimizer.step

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter.section = "outer step"
        try:
            return step(*args, **kwargs)
        finally:
            counter.section = "sync"

    optimizer.step = counted  # type: ignore[method-assign]


def make_config(args: argparse.Namespace) -> RecipeConfig:
    return config_from_dict(
        dict(
            data_dir="unused",
            model_size=args.model_size,
            method=args.method,
            num_workers=len(PACES),
            worker_speeds=[1.0 / p for p in PACES],
            inner_steps=args.inner_steps,
            batch_size=args.batch_size,
            inner_lr=2e-4,
            lr_schedule="constant",
            report_to="none",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="arrivals timed per path")
    parser.add_argument("--inner_steps", type=int, default=20, help="H (the paper's 20)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--model_size", default="paper")
    parser.add_argument("--method", default="heloco")
    args = parser.parse_args()
    config = make_config(args)
    accelerator = Accelerator(cpu=True)
    metadata = {"vocab_size": 8192, "seq_len": 128, "eos_token_id": 0}
    model = make_model(config, metadata)
    numel = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    shards = [torch.randint(0, 8192, (256, 128), generator=generator) for _ in PACES]

    def streams() -> list[TokenStream]:
        return [TokenStream(s, args.batch_size, 0, stream_id=k) for k, s in enumerate(shards)]

    def replicas() -> list[tuple[torch.nn.Module, torch.optim.Optimizer]]:
        out = []
        for _ in PACES:
            replica = copy.deepcopy(model)
            out.append((replica, make_inner_optimizer(config, replica)))
        return out

    def masters() -> list[torch.Tensor]:
        return [p.detach().clone().float() for p in model.parameters()]

    # explicit: the recipe's simulator
    explicit_agg = build_aggregator(config, masters())
    explicit_transport = InProcessTransport(explicit_agg)
    workers = [
        SimulatedWorker(
            k,
            InnerLoop(config, m, o, s, accelerator),
            explicit_transport,
            args.inner_steps,
            accelerator.device,
        )
        for k, ((m, o), s) in enumerate(zip(replicas(), streams(), strict=True))
    ]
    simulator = Simulator(
        config, explicit_agg, workers, VirtualClock(config.diloco.worker_speeds), accelerator
    )
    simulator.start()

    # hooks: DiLoCoWorker over the in-process transport, driven by the same clock order
    hooks_agg = build_aggregator(config, masters())
    transport = InProcessTransport(hooks_agg)
    hook_workers = [
        (DiLoCoWorker(m, o, transport, k, args.inner_steps), s)
        for k, ((m, o), s) in enumerate(zip(replicas(), streams(), strict=True))
    ]
    hook_clock = VirtualClock(config.diloco.worker_speeds)
    for k, (worker, _) in enumerate(hook_workers):
        worker.pull()
        hook_clock.start(k, args.inner_steps)

    # plain: one replica, the same batches
    plain_model, plain_opt = replicas()[0]
    plain_streams = streams()

    def steps(m: torch.nn.Module, o: torch.optim.Optimizer, stream: TokenStream) -> None:
        for _ in range(args.inner_steps):
            inner_step(m, o, stream.next_batch(), accelerator, 0.0)

    def explicit_round() -> None:
        simulator.step(progress=lambda: 0.0)

    def hooks_round() -> None:
        _, k = hook_clock.pop()
        worker, stream = hook_workers[k]
        with worker:
            steps(worker.model, worker.optimizer, stream)
        hook_clock.start(k, args.inner_steps)

    plain_turn = [0]

    def plain_round() -> None:
        k = plain_turn[0] % len(PACES)  # the same shard sizes and batch shapes; order does not matter here
        plain_turn[0] += 1
        steps(plain_model, plain_opt, plain_streams[k])

    paths: dict[str, Callable[[], None]] = {
        "plain": plain_round,
        "hooks": hooks_round,
        "explicit": explicit_round,
    }
    for run_round in paths.values():  # warm up
        run_round()
    seconds = dict.fromkeys(paths, 0.0)
    names = list(paths)
    for r in range(args.rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            start = time.perf_counter()
            paths[name]()
            seconds[name] += time.perf_counter() - start

    tokens = args.rounds * args.inner_steps * args.batch_size * metadata["seq_len"]
    tps = {name: tokens / s for name, s in seconds.items()}
    print(
        f"simulator {args.method} {args.model_size} ({numel / 1e6:.2f}M params, K={len(PACES)}, "
        f"H={args.inner_steps}, batch {args.batch_size}x128, {args.rounds} rounds per path): "
        f"explicit/plain = {tps['explicit'] / tps['plain']:.3f}, hooks/plain = {tps['hooks'] / tps['plain']:.3f} "
        f"(plain {tps['plain']:.0f}, hooks {tps['hooks']:.0f}, explicit {tps['explicit']:.0f} tok/s)"
    )

    # model-sized writes at the end of one round (after warm-up, so no buffer is allocated lazily)
    counts = {}
    for name, aggregator, end_round in (
        ("hooks", hooks_agg, lambda: hook_workers[hook_clock.pop()[1]][0].sync()),
        (
            "explicit",
            explicit_agg,
            lambda: simulator.round_boundary(workers[simulator.clock.pop()[1]], NO_RESULT, chain=True),
        ),
    ):
        counter = WriteCounter()
        counting_outer_step(aggregator.outer_optimizer, counter)
        with counter:
            end_round()
        counts[name] = {k: v / numel for k, v in counter.written.items()}
    print(
        "simulator writes per round (model sizes, Δ → submit → load): "
        + ", ".join(
            f"{name} {c['sync']:.2f} + outer step {c['outer step']:.2f}" for name, c in counts.items()
        )
    )


if __name__ == "__main__":
    main()
