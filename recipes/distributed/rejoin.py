"""A worker restarted alone into a running distributed job (``HELOCO_REJOIN=1``): it reaches the job's
store, opens a new incarnation of its connection to the server and runs the worker loop; the job's
process group cannot be joined again, so ``Standalone`` stands in for the Accelerator."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from heloco.transport import TransportError
from recipes.common import load_data, make_inner_optimizer, make_model, warm_start
from recipes.config import RecipeConfig
from recipes.data import TokenStream
from recipes.distributed.logs import JsonLines
from recipes.distributed.network import emulated_link, reply_codec, wire_codec
from recipes.distributed.pacing import slowdown_factors
from recipes.distributed.setup import (
    REPORT_KEY,
    START_KEY,
)
from recipes.distributed.store import attempt_store
from recipes.distributed.worker import train_worker
from recipes.distributed.worker_state import WorkerCheckpoints, WorkerState, available_submissions
from recipes.worker_round import InnerLoop

REJOIN_ENV = "HELOCO_REJOIN"  # =1: this process restarts a worker of a running job (see rejoin_worker)


class Standalone:
    """What the worker loop needs from an Accelerator, for a process outside the job's process group."""

    def __init__(self, device: torch.device, mixed_precision: str) -> None:
        self.device = device
        self.mixed_precision = mixed_precision

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision == "bf16")


def rejoin_worker(config: RecipeConfig) -> dict[str, Any]:
    """Restart worker RANK of a running job (``HELOCO_REJOIN=1``, same command and environment).

    The job's process group cannot be joined again, so this process only reaches the job's store
    (MASTER_ADDR:MASTER_PORT, hosted by rank 0) and opens a new incarnation of its connection to the
    server, which must run with ``rejoin_timeout_s > 0``. It starts from the current global
    parameters with its own AdamW state and data position as of its last checkpoint (the warm start
    and the start of its shard if it has none), with the round length the server assigned to this
    rank; it appends to its metrics-rank{r}.jsonl.
    """
    from heloco.distributed.client import DistributedTransport

    d, o, t = config.data, config.diloco, config.train
    rank, world = int(os.environ.get("RANK", "-1")), int(os.environ.get("WORLD_SIZE", "0"))
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (0 < rank < world == o.num_workers) or not addr or not port:
        raise ValueError(
            f"{REJOIN_ENV}=1 restarts one worker of a running job: set RANK (1..num_workers-1), "
            f"WORLD_SIZE (= num_workers = {o.num_workers}), MASTER_ADDR and MASTER_PORT as for the "
            f"job; got RANK={rank}, WORLD_SIZE={world}, MASTER_ADDR={addr}, MASTER_PORT={port}"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    cuda = torch.cuda.is_available() and not use_cpu
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    shim = Standalone(device, config.model.mixed_precision)
    shards, _, metadata = load_data(config)
    model = make_model(config, metadata).to(device)
    warm_state = warm_start(config, model, shards, metadata, shim)  # the cache, normally
    optimizer = make_inner_optimizer(config, model, warm_state)
    output_dir = Path(t.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stream = TokenStream(shards[rank], d.batch_size, t.seed, stream_id=rank)
    held = available_submissions(output_dir, rank)
    resumed = WorkerState.read(output_dir, rank, held[-1]) if held else None
    if resumed is not None:  # its own AdamW state and data position as of its last checkpoint
        resumed.restore(optimizer, stream)
    rank_log = JsonLines(output_dir / f"metrics-rank{rank}.jsonl", fresh=False)

    timeout = datetime.timedelta(seconds=o.comm_timeout_s)
    store = attempt_store(
        dist.TCPStore(addr, int(port), is_master=False, timeout=timeout, wait_for_workers=False)
    )
    start = time.monotonic() - (time.time() - float(store.get(START_KEY).decode()))
    # Ready: from here on the connection waits (up to comm_timeout_s) until the server serves a new
    # incarnation, i.e. until the old process is gone, so a replacement can also be started early.
    rank_log.write({"event": "standby", "rank": rank, "pid": os.getpid(), "time": time.monotonic() - start})
    transport = DistributedTransport(
        rank,
        list(model.parameters()),
        store,
        server_rank=0,
        wire_dtype=getattr(torch, o.wire_dtype),
        timeout=o.comm_timeout_s,
        connect_timeout=o.comm_timeout_s,
        codec=wire_codec(config),
        downlink_codec=reply_codec(config),  # a new connection: its first reply is full
    )
    rank_log.write(
        {
            "event": "rejoin",
            "rank": rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "incarnation": transport.incarnation,
            "time": time.monotonic() - start,
        }
    )
    local_step = resumed.local_step if resumed is not None else 0
    report = train_worker(
        config=config,
        rank=rank,
        loop=InnerLoop(config, model, optimizer, stream, shim, local_step),
        transport=emulated_link(config, transport, rank),
        steps=o.inner_steps,
        slowdown=slowdown_factors(o.worker_speeds)[rank],
        start=start,
        rank_log=rank_log,
        gate=None,
        checkpoints=WorkerCheckpoints.for_run(config, rank),  # its count: the server's first reply
        resumed=resumed,
    )
    report["incarnation"] = transport.incarnation
    with contextlib.suppress(TransportError):
        transport.leave()
    store.set(REPORT_KEY.format(rank=rank), json.dumps(report))
    rank_log.close()
    return report
