"""Checks before a distributed run starts: one worker per process, no simulate-only option, every
rank holding the same parameters."""

from __future__ import annotations

import hashlib

import torch

from recipes.config import RecipeConfig


def check_world_size(
    world_size: int,
    num_workers: int,
    launched: int | None = None,
    group_sizes: list[int] | None = None,
    server_process: bool = False,
) -> None:
    """One process per worker, or ``sum(group_sizes)`` when workers are groups of processes; one more
    with a server process of its own."""
    if server_process or (group_sizes is not None and any(p != 1 for p in group_sizes)):
        needed = sum(group_sizes or [1] * num_workers) + int(server_process)
        if world_size != needed:
            what = f"group_sizes={group_sizes}" if group_sizes else f"num_workers={num_workers}"
            what += " and a server process" if server_process else ""
            raise ValueError(
                f"{what} need {needed} processes, {world_size} were launched; launch with "
                f"`accelerate launch --num_processes {needed} ...`"
            )
        return
    if world_size == num_workers:
        return
    hint = ""
    if launched is not None and launched != world_size:
        hint = (
            f" The launcher started {launched} processes but Accelerate sees {world_size}: on a machine "
            "without GPUs export ACCELERATE_USE_CPU=1 (see accelerate_configs/cpu.yaml)."
        )
    raise ValueError(
        f"mode=distributed runs one worker per process, so the number of processes must equal "
        f"num_workers: {world_size} process(es) launched, num_workers={num_workers}. Launch with "
        f"`accelerate launch --num_processes {num_workers} ...`, or set num_workers={world_size} "
        f"(with {world_size} worker_speeds).{hint}"
    )


def check_distributed_options(config: RecipeConfig) -> None:
    """Options that only make sense in the simulator are refused before anything runs."""
    o = config.diloco
    if o.speed_jitter != 0.0:
        raise ValueError(
            f"speed_jitter={o.speed_jitter} is a simulate-mode option (real rounds have their own "
            "jitter); set it to 0 for mode=distributed"
        )


def parameter_checksum(model: torch.nn.Module) -> int:
    """48 bits of a SHA-256 over every parameter's bytes: equal on two ranks iff (up to collisions)
    they hold bit-identical parameters; 48 bits travel exactly in a float64."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:6], "big")
