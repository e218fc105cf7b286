"""Worker groups (recipes/distributed/groups.py): the layout of ranks into workers, a rank's slice of
its group's batches, the checks, and (slow, real gloo processes) that a DDP group of 2 and an FSDP
group of 2 compute the Δ one process computes on the same global batch, and that an async run with
groups [2, 1] completes its budget with every arrival counted once."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from heloco.aggregator import Update
from heloco.codecs import ErrorFeedback, make_codec
from recipes.config import config_from_dict
from recipes.data import TokenStream
from recipes.distributed.checks import check_world_size
from recipes.distributed.group_exchange import GroupExchange
from recipes.distributed.groups import GroupLayout, GroupSlice, GroupTransport
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_layout_maps_consecutive_ranks_to_workers():
    layout = GroupLayout((2, 1, 3))
    assert layout.world == 6 and layout.num_workers == 3
    assert [layout.worker_of(r) for r in range(6)] == [0, 0, 1, 2, 2, 2]
    assert layout.ranks_of(2) == [3, 4, 5] and [layout.leader_of(w) for w in range(3)] == [0, 2, 3]
    assert [layout.is_leader(r) for r in range(6)] == [True, False, True, True, False, False]
    with pytest.raises(ValueError, match="rank 6 is outside the 6 ranks"):
        layout.worker_of(6)
    served = GroupLayout((2, 1), first_rank=1)  # rank 0: a server process of its own
    assert served.world == 4 and [served.worker_of(r) for r in range(4)] == [None, 0, 0, 1]
    assert [served.is_leader(r) for r in range(4)] == [False, True, False, True]


def test_group_slices_partition_the_group_batch():
    data = torch.arange(40 * 4).reshape(40, 4)
    whole = TokenStream(data, 6, seed=0, stream_id=1)
    parts = [GroupSlice(TokenStream(data, 6, seed=0, stream_id=1), i, 3) for i in range(3)]
    for _ in range(5):
        batch = whole.next_batch()
        assert torch.equal(torch.cat([p.next_batch() for p in parts]), batch)
    assert parts[0].tokens_per_batch == 6 * 4  # the group's tokens per step, what the budget counts
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        GroupSlice(TokenStream(data, 6, seed=0, stream_id=0), 0, 4)


def test_group_sizes_are_validated_and_set_the_world_size():
    base = dict(num_workers=2, worker_speeds=[1.0, 1.0])
    assert config_from_dict({**base, "group_sizes": [2, 1]}).group_sizes == [2, 1]
    assert config_from_dict(base).group_sizes == [1, 1]
    for bad in ([2], [2, 0]):
        with pytest.raises(ValueError, match="group_sizes must give one integer >= 1"):
            config_from_dict({**base, "group_sizes": bad})
    with pytest.raises(ValueError, match=r"group_sizes\[0\] must be an integer"):
        config_from_dict({**base, "group_sizes": [1.5, 1]})
    with pytest.raises(ValueError, match="group_parallelism must be one of ddp, fsdp"):
        config_from_dict({**base, "group_parallelism": "tp"})
    check_world_size(3, 2, group_sizes=[2, 1])
    check_world_size(4, 2, group_sizes=[2, 1], server_process=True)
    with pytest.raises(ValueError, match="num_workers=3 and a server process need 4 processes, 3 were"):
        check_world_size(3, 3, server_process=True)
    with pytest.raises(ValueError, match=r"group_sizes=\[2, 1\] need 3 processes, 2 were launched"):
        check_world_size(2, 2, group_sizes=[2, 1])


def test_the_simulator_counts_a_group_worker_s_global_batch(tmp_path):
    """A simulated worker of group size 2 reads 2 x batch_size sequences per step, so each of its
    rounds counts twice the tokens of a worker of size 1."""
    from recipes.train import run
    from tests.conftest import build_tiny_shards

    shards = build_tiny_shards(tmp_path / "data", num_workers=2)
    v = dict(
        data_dir=str(shards),
        output_dir=str(tmp_path / "run"),
        model_size="tiny",
        num_workers=2,
        worker_speeds=[1.0, 1.0],
        group_sizes=[2, 1],
        inner_steps=2,
        batch_size=2,
        budget_tokens=2000,
        pretrain_steps=0,
        eval_sequences=4,
        report_to="none",
        progress=False,
    )
    run(config_from_dict(v))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    arrivals = [r for r in records if r["event"] == "arrival"]
    step = {
        w: [b["tokens"] - a["tokens"] for a, b in itertools.pairwise(arrivals) if b["worker"] == w]
        for w in (0, 1)
    }
    assert set(step[0]) == {2 * 2 * 2 * 32} and set(step[1]) == {2 * 2 * 32}


# -- real process groups ----------------------------------------------------------------------------


def run_script(code: str, world: int, tmp_path: Path, timeout: float = 240) -> None:
    """``code`` in ``world`` gloo processes (RANK/WORLD_SIZE set); raises with their output on failure."""
    script = tmp_path / "group_script.py"
    script.write_text(code)
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "OUT": str(tmp_path),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)[-4000:]


DELTA_SCRIPT = r"""
import os, torch, torch.distributed as dist
from recipes.model import build_model
from recipes.distributed.groups import wrap_for_group

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
data = torch.randint(0, 64, (6, 4, 16))  # 6 steps of a global batch of 4 sequences
model = build_model("tiny", vocab_size=64, max_positions=16, eos_token_id=None)
start = [p.detach().clone() for p in model.parameters()]
mode = os.environ["MODE"]
if mode != "single":
    model = wrap_for_group(model, dist.group.WORLD, mode, torch.device("cpu"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
rows = 4 // world
for batch in data:
    mine = batch[rank * rows : (rank + 1) * rows]
    model(input_ids=mine, labels=mine).loss.backward()
    opt.step()
    opt.zero_grad()
now = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
delta = [s - n for s, n in zip(start, now)]
if rank == 0:
    torch.save(delta, os.path.join(os.environ["OUT"], mode + ".pt"))
del model, opt  # the DDP reducer / FSDP hooks go before the process group does, not at interpreter exit
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_and_fsdp_groups_of_two_give_the_delta_of_one_process(tmp_path, monkeypatch):
    """H = 6 inner AdamW steps on a global batch of 4: one process on all 4 rows, a DDP group of 2 and
    an FSDP2 group of 2 on 2 rows each give the same Δ (fp32 tolerance)."""
    deltas = {}
    for mode, world in (("single", 1), ("ddp", 2), ("fsdp", 2)):
        monkeypatch.setenv("MODE", mode)
        run_script(DELTA_SCRIPT, world, tmp_path)
        deltas[mode] = torch.load(tmp_path / f"{mode}.pt")
    size = sum(d.abs().sum() for d in deltas["single"])
    assert size > 0
    for mode in ("ddp", "fsdp"):
        for a, b in zip(deltas["single"], deltas[mode], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)  # Adam steps are ~1e-2
    for a, b in zip(deltas["ddp"], deltas["fsdp"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)  # Adam steps are ~1e-2


def launch_three_processes(v: dict, tmp_path: Path) -> None:
    """Build the warm-start cache, then run ``v`` as 3 processes under ``accelerate launch``; fail
    with the end of the log if the launch does not exit 0."""
    from recipes.common import prepare
    from tests.test_recipe_distributed import ACCELERATE, child_env, cli

    prepare(config_from_dict({**v, "mode": "simulate", "group_sizes": None}))  # the warm-start cache
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml")]
    cmd += ["--num_processes", "3", "recipes/train.py", *cli(v)]
    with open(tmp_path / "launch.log", "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT, timeout=800)
    assert proc.returncode == 0, (tmp_path / "launch.log").read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_an_async_run_with_groups_2_1_completes_its_budget(parallelism, tmp_path):
    """Three processes under `accelerate launch`: worker 0 is a group of 2 (DDP or FSDP2 inside),
    worker 1 a single process. The run reaches its token budget, every arrival is counted once, a
    group's arrival counts its global batch, and both ranks of the group log the same rounds."""
    from tests.conftest import build_tiny_shards
    from tests.test_recipe_distributed import read_jsonl, values

    shards = build_tiny_shards(tmp_path / "data", num_workers=2)
    out = tmp_path / "run"
    v = values(shards, out, num_workers=2, worker_speeds=[1.0, 1.0], group_sizes=[2, 1])
    v.update(budget_tokens=6000, group_parallelism=parallelism)
    launch_three_processes(v, tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "budget_tokens" and summary["tokens"] >= 6000
    records = read_jsonl(out / "metrics.jsonl")
    arrivals = [r for r in records if r["event"] == "arrival"]
    assert [r["arrival"] for r in arrivals] == list(range(1, summary["arrivals"] + 1))  # each once
    per_round = {0: 2 * 4 * 32 * 3, 1: 4 * 32 * 3}  # group size x batch x seq_len x H
    for before, after in itertools.pairwise([{"tokens": 0}, *arrivals]):
        assert after["tokens"] - before["tokens"] == per_round[after["worker"]]
    ranks = [read_jsonl(out / f"metrics-rank{r}.jsonl") for r in range(3)]
    rounds = [[x["version"] for x in rank if x["event"] == "arrival"] for rank in ranks]
    assert rounds[0] == rounds[1] and len(rounds[0]) == sum(r["worker"] == 0 for r in arrivals)
    assert len(rounds[2]) == sum(r["worker"] == 1 for r in arrivals)
    evals = [r for r in records if r["event"] == "eval"]
    assert evals[-1]["val_loss/mean"] < evals[0]["val_loss/mean"] - 0.2


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("parallelism", "group_sizes", "downlink", "overlap"),
    [
        ("ddp", [2, 1], "params", False),
        ("fsdp", [2, 1], "params", False),
        ("ddp", [1, 2], "delta", False),
        ("fsdp", [1, 2], "delta", False),
        ("ddp", [2, 1], "params", True),
        ("fsdp", [1, 2], "delta", True),
    ],
)
def test_a_group_sends_an_int8_delta_with_error_feedback_over_an_emulated_link(
    parallelism, group_sizes, downlink, overlap, tmp_path
):
    """A group of 2 with uplink_codec int8 + error feedback and an emulated link: the run completes
    its budget and its loss falls; the group's leader logs each Δ at its encoded size (under 0.3 of
    fp32), its other rank logs the same rounds and sizes, and the leader's link slept for the bytes.
    Groups [2, 1]: the leader is rank 0 (the server's in-process transport); [1, 2] with
    ``downlink: delta`` in int8: the leader is rank 1 (gloo to the server), it holds the replies'
    copy, and both ranks count each encoded change (under 0.3 of fp32) as the link does. With
    ``overlap`` the same holds while the leader's server call runs on a background thread
    (recipes/distributed/group_exchange.py) and both ranks log the same rounds."""
    from tests.conftest import build_tiny_shards
    from tests.test_recipe_distributed import read_jsonl, values

    shards = build_tiny_shards(tmp_path / "data", num_workers=2)
    out = tmp_path / "run"
    v = values(shards, out, num_workers=2, worker_speeds=[1.0, 1.0], group_sizes=group_sizes)
    v.update(budget_tokens=6000, group_parallelism=parallelism, uplink_codec="int8", error_feedback=True)
    v.update(uplink_bandwidth=[5e7], downlink_bandwidth=[5e7], downlink=downlink, overlap=overlap)
    if downlink == "delta":
        v.update(downlink_codec="int8")
    launch_three_processes(v, tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "budget_tokens"
    first = 0 if group_sizes[0] == 2 else 1  # the group's leader
    ranks = [read_jsonl(out / f"metrics-rank{r}.jsonl") for r in range(3)]
    leader, member = ([x for x in rank if x["event"] == "arrival"] for rank in ranks[first : first + 2])
    assert leader and [x["uplink_bytes"] for x in leader] == [x["uplink_bytes"] for x in member]
    assert [x["version"] for x in leader] == [x["version"] for x in member]
    assert [x["downlink_bytes"] for x in leader] == [x["downlink_bytes"] for x in member]
    end = next(x for x in ranks[first] if x["event"] == "end")
    fp32 = end["downlink_bytes"] - sum(x["downlink_bytes"] for x in leader)  # the first pull: in full
    if downlink == "params":
        assert all(x["downlink_bytes"] == fp32 for x in leader)
    else:  # then each reply is an encoded change
        assert all(0 < x["downlink_bytes"] < 0.3 * fp32 for x in leader)
    assert end["link_downlink_bytes"] == end["downlink_bytes"]
    assert all(0 < x["uplink_bytes"] < 0.3 * fp32 for x in leader)
    assert end["uplink_codec"] == "int8" and end["link_sleep_s"] > 0 and end["overlap"] is overlap
    logged, largest = sum(x["uplink_bytes"] for x in leader), max(x["uplink_bytes"] for x in leader)
    assert logged <= end["link_uplink_bytes"] <= logged + largest  # + the round the stop cut off
    member_end = next(x for x in ranks[first + 1] if x["event"] == "end")
    assert "link_sleep_s" not in member_end  # it sent nothing: the leader slept for the group
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "eval"]
    assert evals[-1]["val_loss/mean"] < evals[0]["val_loss/mean"] - 0.2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_machines_on_this_host_run_groups_2_1_1(tmp_path):
    """Two `accelerate launch` invocations as two machines (--num_machines 2, --machine_rank 0/1,
    --main_process_ip 127.0.0.1), two processes each: machine 0 holds the group of 2 (worker 0),
    machine 1 the workers 1 and 2. The run completes its budget with every arrival counted once."""
    from recipes.common import prepare
    from tests.conftest import build_tiny_shards
    from tests.test_recipe_distributed import ACCELERATE, child_env, cli, read_jsonl, values

    shards = build_tiny_shards(tmp_path / "data", num_workers=3)
    out = tmp_path / "run"
    v = values(shards, out, worker_speeds=[1.0, 1.0, 1.0], group_sizes=[2, 1, 1], budget_tokens=6000)
    prepare(config_from_dict({**v, "mode": "simulate", "group_sizes": None}))
    port = str(free_port())
    procs = []
    for machine in (0, 1):
        cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml")]
        cmd += ["--num_machines", "2", "--machine_rank", str(machine), "--num_processes", "4"]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
        cmd += ["recipes/train.py", *cli(v)]
        log = open(tmp_path / f"machine{machine}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(800) for p in procs]
    logs = "\n".join((tmp_path / f"machine{m}.log").read_text()[-2000:] for m in (0, 1))
    assert codes == [0, 0], logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "budget_tokens" and summary["distributed"]["world_size"] == 4
    arrivals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "arrival"]
    assert [r["arrival"] for r in arrivals] == list(range(1, summary["arrivals"] + 1))
    assert {r["worker"] for r in arrivals} == {0, 1, 2}


def start_ranks(v: dict, world: int, log_prefix: Path) -> list[subprocess.Popen]:
    from tests.test_recipe_distributed import start_rank

    port = free_port()
    return [start_rank(v, r, world, port, Path(f"{log_prefix}-{r}.log")) for r in range(world)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_rank_killed_inside_a_group_takes_the_group_out_and_a_resume_restores_every_group(tmp_path):
    """Ranks as separate processes (as srun starts them), groups [1, 2]. (1) Killing rank 2 (SIGKILL)
    breaks worker 1's group: its first rank fails on the group's collective and leaves, worker 0
    finishes the budget and rank 0 writes the summary. (2) Rank 0 crashes after 9 arrivals (the
    whole job is down), every rank restarts with resume_from=latest, both groups continue from the
    checkpoint and the run ends at the first arrival that reaches the budget, none counted twice."""
    from recipes.common import prepare
    from tests.conftest import build_tiny_shards
    from tests.test_recipe_distributed import read_jsonl, values, wait_for_rounds

    shards = build_tiny_shards(tmp_path / "data", num_workers=2)
    common = dict(worker_speeds=[1.0, 1.0], group_sizes=[1, 2], num_workers=2, comm_timeout_s=30.0)
    prepare(
        config_from_dict(
            {**values(shards, tmp_path / "x", **common), "mode": "simulate", "group_sizes": None}
        )
    )

    out = tmp_path / "killed"
    procs = start_ranks(values(shards, out, **common), 3, tmp_path / "killed")
    wait_for_rounds(out / "metrics-rank1.jsonl", 2, procs)
    procs[2].kill()
    codes = [p.wait(400) for p in procs]
    assert codes[0] == 0 and codes[1] != 0 and codes[2] == -9, codes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "budget_tokens" and summary["tokens"] >= 12000
    assert summary["distributed"]["server"][1]["state"] == "dead"
    assert summary["distributed"]["ranks"][1] is None and summary["distributed"]["ranks"][2] is None

    out = tmp_path / "resumed"
    common["save_every"] = 4
    procs = start_ranks(values(shards, out, stop_after_arrivals=9, **common), 3, tmp_path / "crash")
    codes = [p.wait(400) for p in procs]
    assert codes[0] == -9 and not (out / "summary.json").exists(), codes
    procs = start_ranks(values(shards, out, resume_from="latest", **common), 3, tmp_path / "resume")
    codes = [p.wait(400) for p in procs]
    logs = "\n".join((tmp_path / f"resume-{r}.log").read_text()[-1500:] for r in range(3))
    assert codes == [0, 0, 0], logs
    summary = json.loads((out / "summary.json").read_text())
    arrivals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "arrival"]
    assert [r["arrival"] for r in arrivals] == list(range(1, summary["arrivals"] + 1))  # none twice
    assert summary["tokens"] >= 12000 > arrivals[-2]["tokens"]  # stopped at the first one past it
    for rank in (1, 2):  # both ranks of the group resumed their own state
        resumed = [r for r in read_jsonl(out / f"metrics-rank{rank}.jsonl") if r["event"] == "resume"]
        assert len(resumed) == 1 and resumed[0]["submissions"] >= 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_group_leader_s_error_feedback_residual_is_checkpointed_and_resumed(tmp_path):
    """Groups [2, 1] with int8 + error feedback, ranks as separate processes: rank 0 crashes after 5
    arrivals; the group's leader (rank 0) saved a non-zero residual in its worker state, the group's
    other rank (rank 1) none (it holds no residual); every rank resumes from the checkpoint and the
    run ends at its budget with no arrival counted twice."""
    from recipes.common import prepare
    from recipes.distributed.worker_state import WorkerState, available_submissions
    from tests.conftest import build_tiny_shards
    from tests.test_recipe_distributed import read_jsonl, values

    shards = build_tiny_shards(tmp_path / "data", num_workers=2)
    common = dict(
        worker_speeds=[1.0, 0.5],  # the lone rank slowed, so the group has submitted before the crash
        group_sizes=[2, 1],
        num_workers=2,
        comm_timeout_s=30.0,
        uplink_codec="int8",
        error_feedback=True,
        save_every=2,
    )
    prepare(
        config_from_dict(
            {**values(shards, tmp_path / "x", **common), "mode": "simulate", "group_sizes": None}
        )
    )
    out = tmp_path / "run"
    procs = start_ranks(values(shards, out, stop_after_arrivals=5, **common), 3, tmp_path / "crash")
    codes = [p.wait(400) for p in procs]
    assert codes[0] == -9 and not (out / "summary.json").exists(), codes
    leader = [WorkerState.read(out, 0, s) for s in available_submissions(out, 0)]
    member = [WorkerState.read(out, 1, s) for s in available_submissions(out, 1)]
    assert leader and member, "no worker state was written before the crash"
    assert all(state.encoder is not None for state in leader)
    assert all(any(r.abs().max() > 0 for r in state.encoder["residuals"]) for state in leader)
    assert all(state.encoder is None for state in member)

    procs = start_ranks(values(shards, out, resume_from="latest", **common), 3, tmp_path / "resume")
    codes = [p.wait(400) for p in procs]
    logs = "\n".join((tmp_path / f"resume-{r}.log").read_text()[-1500:] for r in range(3))
    assert codes == [0, 0, 0], logs
    summary = json.loads((out / "summary.json").read_text())
    arrivals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "arrival"]
    assert [r["arrival"] for r in arrivals] == list(range(1, summary["arrivals"] + 1))  # none twice
    resumed = [r for r in read_jsonl(out / "metrics-rank0.jsonl") if r["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["submissions"] >= 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_server_can_run_in_a_process_of_its_own(tmp_path):
    """server_process: rank 0 only serves, workers [2, 1] are ranks 1-2 and 3 (4 processes); the run
    completes its budget, every arrival counted once, and rank 0 trained nothing."""
    from recipes.common import prepare
    from tests.conftest import build_tiny_shards
    from tests.test_recipe_distributed import ACCELERATE, child_env, cli, read_jsonl, values

    shards = build_tiny_shards(tmp_path / "data", num_workers=2)
    out = tmp_path / "run"
    v = values(shards, out, num_workers=2, worker_speeds=[1.0, 1.0], group_sizes=[2, 1], budget_tokens=6000)
    v["server_process"] = True
    prepare(config_from_dict({**v, "mode": "simulate", "group_sizes": None, "server_process": False}))
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml")]
    cmd += ["--num_processes", "4", "recipes/train.py", *cli(v)]
    with open(tmp_path / "launch.log", "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT, timeout=800)
    assert proc.returncode == 0, (tmp_path / "launch.log").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "budget_tokens" and summary["distributed"]["world_size"] == 4
    arrivals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "arrival"]
    assert [r["arrival"] for r in arrivals] == list(range(1, summary["arrivals"] + 1))
    assert {r["worker"] for r in arrivals} == {0, 1}
    assert summary["distributed"]["ranks"][0]["reason"] == "budget_tokens"
    assert not any(r["event"] == "arrival" for r in read_jsonl(out / "metrics-rank0.jsonl"))


class RecordingTransport:
    """The leader's inner transport: keeps each encoded message and answers with fixed parameters."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.messages: list[Any] = []
        self.threads: list[threading.Thread] = []

    def submit_encoded(self, worker_id: int, message: Any, base_version: int) -> Update:
        self.messages.append((worker_id, message, base_version))
        self.threads.append(threading.current_thread())
        return Update(params=self.params, version=base_version + 1)

    def reply_nbytes(self, worker_id: int) -> int:
        """As a ``downlink: delta`` transport measures it: a reply smaller than fp32."""
        return 100 + worker_id


def test_a_group_leader_encodes_the_delta_and_keeps_the_residual():
    """GroupTransport with an int8 ErrorFeedback encoder, in a one-rank gloo group: the leader sends
    ``submit_encoded``, its size is relayed as ``uplink_nbytes`` (a quarter of fp32 plus scales),
    what was sent plus what is kept equals Δ (error feedback's identity), and the next round sends
    Δ₂ + e₁. A non-finite Δ is refused before anything is sent."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        params = [torch.zeros(64, 8), torch.zeros(300)]
        inner = RecordingTransport([p + 1 for p in params])
        encoder = ErrorFeedback(make_codec("int8", block=64))
        group = GroupTransport(inner, dist.group.WORLD, 0, True, params, encoder=encoder)
        gen = torch.Generator().manual_seed(0)
        delta = [torch.randn(p.shape, generator=gen) for p in params]
        update = group.submit(3, delta, base_version=7)
        assert update.version == 8 and torch.equal(update.params[0], torch.ones(64, 8))
        worker_id, message, base = inner.messages[0]
        assert (worker_id, base) == (3, 7)
        assert group.uplink_nbytes == message.nbytes < 4 * 812 / 3
        assert group.reply_nbytes(3) == 103 and group.link is inner  # what the worker's records read
        sent = [torch.empty_like(p) for p in params]
        make_codec("int8", block=64).decode(message, sent)
        for d, s, e in zip(delta, sent, encoder.residuals, strict=True):
            torch.testing.assert_close(s + e, d, rtol=0, atol=1e-6)
            assert e.abs().max() > 0  # int8 is lossy: something was kept back
        kept = [e.clone() for e in encoder.residuals]
        group.submit(3, delta, base_version=8)
        make_codec("int8", block=64).decode(inner.messages[1][1], sent)
        for d, s, e, k in zip(delta, sent, encoder.residuals, kept, strict=True):
            torch.testing.assert_close(s + e, d + k, rtol=0, atol=1e-6)
        bad = [delta[0].clone(), delta[1].clone()]
        bad[1][5] = float("nan")
        with pytest.raises(ValueError):
            group.submit(3, bad, base_version=9)
        assert len(inner.messages) == 2
    finally:
        dist.destroy_process_group()


def test_an_overlapped_group_encodes_on_its_thread_and_only_the_server_call_goes_to_the_background():
    """GroupExchange on a group's leader (one-rank gloo group, int8 + error feedback): ``start``
    encodes at once on the worker's thread (the residual has moved before the reply is waited for)
    and makes the server call on another thread; ``wait`` relays the answer and its encoded size.
    A non-finite Δ is refused by ``wait`` (as the group's broadcast would tell every rank), unsent."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        params = [torch.zeros(64, 8), torch.zeros(300)]
        inner = RecordingTransport([p + 1 for p in params])
        encoder = ErrorFeedback(make_codec("int8", block=64))
        group = GroupTransport(inner, dist.group.WORLD, 0, True, params, encoder=encoder)
        marks: list[str] = []
        worker = SimpleNamespace(worker_id=2, overlap=True, mark_in_flight=lambda: marks.append("in flight"))
        exchange = GroupExchange(worker, group)
        delta = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for p in params]
        exchange.start(SimpleNamespace(pseudo_grads=delta, base_version=4))
        assert exchange.pending and marks == ["in flight"]
        assert all(e.abs().max() > 0 for e in encoder.residuals)  # encoded before the wait
        with pytest.raises(RuntimeError, match="already in flight"):
            exchange.start(SimpleNamespace(pseudo_grads=delta, base_version=5))
        update = exchange.wait()
        assert update.version == 5 and not exchange.pending and exchange.exchanges == 1
        assert inner.threads[0] is not threading.current_thread()
        assert group.uplink_nbytes == inner.messages[0][1].nbytes
        bad = [delta[0].clone(), delta[1].clone()]
        bad[0][0, 0] = float("inf")
        exchange.start(SimpleNamespace(pseudo_grads=bad, base_version=5))
        with pytest.raises(ValueError):
            exchange.wait()
        assert len(inner.messages) == 1 and not exchange.pending
    finally:
        dist.destroy_process_group()


def test_only_the_leader_may_hold_an_encoder():
    with pytest.raises(ValueError, match="only the group's leader encodes"):
        GroupTransport(None, None, 0, False, [torch.zeros(2)], encoder=ErrorFeedback(make_codec("int8")))
    member = GroupTransport(None, None, 0, False, [torch.zeros(2), torch.zeros(3)])
    assert member.link is None  # it sends nothing: no link of its own
    assert member.reply_nbytes() == 4 * 5  # before any relayed size: the fp32 parameters
