"""Distributed mode (recipes/distributed/): fast checks of its pieces (world-size and option
errors, slowdown emulation, the budget gate in front of a real aggregator), and real multi-process
runs on CPU: `accelerate launch` with accelerate_configs/cpu.yaml (gloo), ranks started by hand for
the fault tests (so killing one leaves the others alive), one process against the simulator."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from heloco.aggregator import AsyncAggregator
from heloco.transport import ServerStopped
from recipes.config import config_from_dict
from recipes.distributed import pacing
from recipes.distributed.checks import check_distributed_options, check_world_size, parameter_checksum
from recipes.distributed.gate import Gate
from recipes.distributed.pacing import emulate_slowdown, slowdown_factors
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def values(shards: Path | None = None, out: Path | None = None, **overrides) -> dict:
    v = dict(
        data_dir=str(shards or "unused"),
        mode="distributed",
        method="heloco",
        num_workers=3,
        worker_speeds=[1.0, 1.0, 0.333],
        inner_steps=3,
        batch_size=4,
        inner_lr=3e-3,
        pretrain_steps=20,
        pretrain_cache_dir=str(out.parent / "pretrain_cache") if out else None,
        budget_tokens=12000,
        eval_every=8,
        eval_sequences=8,
        report_to="none",
        progress=False,
        output_dir=str(out or "unused"),
        model_size="tiny",
        comm_timeout_s=120.0,
    )
    v.update(overrides)
    return v


def cli(v: dict) -> list[str]:
    args = []
    for key, value in v.items():
        if value is None:
            continue
        args.append(f"--{key}")
        args.extend(str(x) for x in value) if isinstance(value, list) else args.append(str(value))
    return args


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **extra}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ---------------------------------------------------------------------------------------------------
# fast: configuration errors and the pieces


def test_world_size_must_equal_num_workers():
    check_world_size(3, 3)
    with pytest.raises(ValueError, match=r"2 process\(es\) launched, num_workers=3.*--num_processes 3"):
        check_world_size(2, 3)
    # the launcher started 3 processes but Accelerate saw one each: the CPU hint is part of the message
    with pytest.raises(ValueError, match="ACCELERATE_USE_CPU=1"):
        check_world_size(1, 3, launched=3)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"speed_jitter": 0.1}, "speed_jitter=0.1 is a simulate-mode option"),
    ],
)
def test_simulate_only_options_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        check_distributed_options(config_from_dict(values(**overrides)))


def test_timeouts_are_validated():
    with pytest.raises(ValueError, match="rejoin_timeout_s >= 0"):
        config_from_dict(values(rejoin_timeout_s=-1.0))
    with pytest.raises(ValueError, match="comm_timeout_s must be > 0"):
        config_from_dict(values(comm_timeout_s=0.0))


def test_slowdown_is_relative_to_the_fastest_worker():
    assert slowdown_factors([1.0, 1.0, 0.25]) == [1.0, 1.0, 4.0]
    assert slowdown_factors([2.0, 0.5, 1.0]) == [1.0, 4.0, 2.0]


def test_emulated_slowdown_sleeps_the_missing_time(monkeypatch):
    slept = []
    monkeypatch.setattr(pacing.time, "sleep", slept.append)
    assert emulate_slowdown(0.25, 3.0) == 0.5  # the step must last 3 × 0.25 s: 0.5 s more
    assert emulate_slowdown(0.25, 1.0) == 0.0  # the fastest worker never sleeps
    assert slept == [0.5]


def test_checksum_detects_a_one_ulp_difference():
    model = torch.nn.Linear(4, 3)
    other = copy.deepcopy(model)
    assert parameter_checksum(model) == parameter_checksum(other)
    with torch.no_grad():
        other.bias[1] = torch.nextafter(other.bias[1], torch.tensor(math.inf))
    assert parameter_checksum(model) != parameter_checksum(other)
    assert 0 <= parameter_checksum(model) < 2**48  # exact in the float64 all-gather


def test_speed_probe_includes_the_slowdown_and_leaves_the_model_unchanged(monkeypatch):
    from recipes.distributed.pacing import measure_speed
    from recipes.distributed.rejoin import Standalone
    from recipes.model import build_model

    model = build_model("tiny", vocab_size=64, max_positions=16, eos_token_id=None)
    before = copy.deepcopy(model.state_dict())
    slept = []
    monkeypatch.setattr(pacing.time, "sleep", slept.append)
    batch = torch.randint(0, 64, (2, 16))
    speed = measure_speed(model, batch, Standalone(torch.device("cpu"), "no"), slowdown=3.0, repeats=3)
    assert speed > 0 and len(slept) == 4  # one warm-up and three timed steps, each padded to 3×
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class FakeLog:
    def __init__(self):
        self.records = []

    def write(self, record, step):
        self.records.append(record)

    @property
    def lines(self):
        return len(self.records)


class FakeBackground:
    def __init__(self):
        self.pending_evals = 0
        self.evals = []
        self.checkpoints = []

    def put_eval(self, reason, info, params):
        self.evals.append((reason, info, [p.clone() for p in params]))

    def put_checkpoint(self, snapshot):
        self.checkpoints.append(snapshot)


def make_gate(quorum=1, steps=(2, 1), start_offset=0.0, **overrides):
    """A gate over a real aggregator: θ ∈ R², SGD lr 1, so θ = −ΣΔ after every applied step."""
    params = [torch.zeros(2)]
    agg = AsyncAggregator(params, torch.optim.SGD(params, lr=1.0), num_workers=len(steps), quorum=quorum)
    speeds = [1.0] * len(steps)
    config = config_from_dict(values(num_workers=len(steps), worker_speeds=speeds, **overrides))
    log, background = FakeLog(), FakeBackground()
    gate = Gate(agg, config, list(steps), 10, log, background)
    gate.start(time.monotonic() - start_offset)
    return gate, agg, log, background


def delta(x):
    return [torch.full((2,), float(x))]


def test_gate_counts_tokens_and_stops_at_the_budget():
    gate, agg, log, background = make_gate(budget_tokens=50, eval_every=2, save_every=3)
    assert [r for r, _, _ in background.evals] == ["start"]
    u = gate.submit(0, delta(1), 0)  # worker 0: H=2 → 20 tokens
    assert u.stats["tokens"] == 20.0 and "stop" not in u.stats
    u = gate.submit(1, delta(2), 0)  # worker 1: H=1 → 30 tokens
    assert u.stats["tokens"] == 30.0 and not gate.closed.is_set()
    u = gate.submit(0, delta(4), 1)  # 50 ≥ 50: applied, and the reply says stop
    assert u.applied and u.stats["stop"] == 1.0 and gate.closed.is_set()
    assert gate.stop_reason == "budget_tokens" and agg.version == 3
    with pytest.raises(ServerStopped, match="budget_tokens"):
        gate.submit(1, delta(100), 1)  # refused: not applied, not counted
    assert agg.version == 3 and gate.tokens == 50 and gate.arrivals == 3
    assert agg.global_params[0].tolist() == [-7.0, -7.0]
    arrivals = [r for r in log.records if r["event"] == "arrival"]
    assert [(r["worker"], r["tokens"], r["version"], r["staleness"]) for r in arrivals] == [
        (0, 20, 1, 0),
        (1, 30, 2, 1),
        (0, 50, 3, 1),
    ]
    # an evaluation every 2 outer updates (version 2: θ = −3), a checkpoint every 3 arrivals
    assert [(r, i["version"], p[0].tolist()) for r, i, p in background.evals[1:]] == [
        ("updates", 2, [-3.0, -3.0])
    ]
    [snapshot] = background.checkpoints  # schedule, aggregator and log as they stood at arrival 3
    assert snapshot.eval_info() == {
        "arrival": 3,
        "time": pytest.approx(0.0, abs=5.0),
        "tokens": 50,
        "version": 3,
    }
    assert snapshot.schedule["arrivals"] == 3 and snapshot.schedule["evaluated_start"]
    assert snapshot.metrics_lines == 3 and snapshot.aggregator["global_params"][0].tolist() == [-7.0, -7.0]


def test_gate_completes_an_open_synchronous_round_before_stopping():
    gate, agg, _, _ = make_gate(quorum=2, steps=(1, 1), budget_tokens=10)
    u = gate.submit(0, delta(1), 0)  # budget reached, but worker 0 waits in an open round
    assert u.params is None and not gate.closed.is_set()
    u = gate.submit(1, delta(3), 0)  # the round completes: one outer step, then stop
    assert u.applied and gate.closed.is_set() and u.stats["stop"] == 1.0
    assert agg.global_params[0].tolist() == [-2.0, -2.0]


def test_gate_refuses_arrivals_after_the_time_budget():
    gate, agg, _, background = make_gate(
        budget_tokens=None, budget_time=10.0, eval_times=[5.0], start_offset=11
    )
    with pytest.raises(ServerStopped, match=r"time budget of 10\.0 s"):
        gate.submit(0, delta(1), 0)
    assert agg.version == 0 and gate.arrivals == 0 and gate.stop_reason == "budget_time"
    # the evaluation due at 5 s was taken (from the model as it was then) before refusing
    assert [(r, i["time"], i["version"]) for r, i, _ in background.evals] == [
        ("start", 0.0, 0),
        ("time", 5.0, 0),
    ]


def test_dispatch_tells_a_joining_worker_its_round_length_and_the_progress():
    gate, _, _, _ = make_gate(steps=(2, 1), budget_tokens=1000)
    gate.submit(0, delta(1), 0)
    u = gate.dispatch(1)
    assert u.stats == {"inner_steps": 1.0, "tokens": 20.0, "submissions": 0.0} and u.version == 1


# ---------------------------------------------------------------------------------------------------
# slow: real processes


@pytest.fixture(scope="module")
def warm_cache(tiny_shards, tmp_path_factory):
    """Fill the warm-start cache once, so the ranks of every run below only load it."""
    from recipes.common import prepare

    root = tmp_path_factory.mktemp("dist")
    prepare(config_from_dict(values(tiny_shards, root / "x", mode="simulate")))
    return root


def accelerate_launch(v: dict, log: Path, num_processes: int = 3) -> subprocess.CompletedProcess:
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / "cpu.yaml"),
        "--num_processes",
        str(num_processes),
        "recipes/train.py",
        *cli(v),
    ]
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT, timeout=240)


def start_rank(v: dict, rank: int, world: int, port: int, log: Path, **env: str) -> subprocess.Popen:
    """One rank as its own process (what srun or a shell loop does): killing it kills nothing else."""
    rank_env = child_env(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **env,
    )
    f = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [PYTHON, "recipes/train.py", *cli(v)], cwd=ROOT, env=rank_env, stdout=f, stderr=subprocess.STDOUT
    )


def wait_for_rounds(
    path: Path, rounds: int, procs: list[subprocess.Popen], timeout: float = 150, standby: bool = False
) -> dict:
    """Until a rank's metrics file shows ``rounds`` arrivals (and, if asked, a replacement process
    waiting to take over); returns the rank's start record (its pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            ready = not standby or any(r["event"] == "standby" for r in records)
            if ready and sum(r["event"] == "arrival" for r in records) >= rounds:
                return next(r for r in records if r["event"] == "start")
        assert all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.1)
    raise TimeoutError(f"{path} never showed {rounds} rounds")


def evaluate_checkpoint(checkpoint: Path, shards: Path) -> float:
    """Load the exported model as a user would and compute the mean validation loss."""
    from transformers import AutoModelForCausalLM

    from recipes.common import load_data
    from recipes.data import evaluate

    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    _, validation, _ = load_data(config_from_dict(values(shards, eval_sequences=8)))
    return evaluate(model, validation, 4, torch.device("cpu"), contextlib.nullcontext)["mean"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_async_and_sync_with_a_3x_slower_rank(tiny_shards, warm_cache, capsys):
    """3 CPU processes through `accelerate launch`: rank 2 is emulated 3× slower. Async (HeLoCo, bf16
    on the wire) keeps everyone busy and the slow rank's Δ is the stalest; sync DiLoCo makes the
    fast ranks wait for it."""
    runs = {}
    for method, wire in (("heloco", "bfloat16"), ("sync", "float32")):
        out = warm_cache / f"launch-{method}"
        proc = accelerate_launch(
            values(tiny_shards, out, method=method, wire_dtype=wire), warm_cache / f"{method}.log"
        )
        assert proc.returncode == 0, (warm_cache / f"{method}.log").read_text()[-3000:]
        runs[method] = (out, json.loads((out / "summary.json").read_text()))

    for out, summary in runs.values():
        evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "eval"]
        assert evals[0]["reason"] == "start" and evals[-1]["reason"] == "final"
        assert evals[-1]["val_loss/mean"] < evals[0]["val_loss/mean"] - 0.2
        assert set(evals[-1]) >= {"arrival", "time", "tokens", "version", "val_loss/de", "val_loss/fr"}
        assert summary["tokens"] >= 12000 and summary["stop_reason"] == "budget_tokens"
        assert (out / f"checkpoint-{summary['arrivals']}" / "model" / "model.safetensors").is_file()
        for r in range(3):
            rank_records = read_jsonl(out / f"metrics-rank{r}.jsonl")
            assert rank_records[0]["event"] == "start" and rank_records[-1]["event"] == "end"
            assert (
                sum(x["event"] == "arrival" for x in rank_records)
                == summary["distributed"]["ranks"][r]["rounds"]
                >= 1
            )
        # every arrival the server counted is one round some rank logged
        assert sum(rank["rounds"] for rank in summary["distributed"]["ranks"]) == summary["arrivals"]

    heloco, sync = runs["heloco"][1], runs["sync"][1]
    staleness = [w["staleness_mean"] for w in heloco["workers"]]
    assert staleness[2] > max(staleness[0], staleness[1]), staleness
    assert heloco["outer_updates"] == heloco["arrivals"]
    assert all(w["staleness_max"] == 0 for w in sync["workers"])
    assert sync["outer_updates"] * 3 == sync["arrivals"]
    assert (
        heloco["distributed"]["ranks"][2]["sleep_s"] > heloco["distributed"]["ranks"][2]["compute_s"]
    )  # 3×: sleeps 2× its compute
    # bf16 on the wire halves the bytes of every message with tensors
    per_msg = {
        m: s["distributed"]["server"][1]["bytes_in"] / s["distributed"]["server"][1]["messages_in"]
        for m, s in (("bf16", heloco), ("fp32", sync))
    }
    assert 0.45 < per_msg["bf16"] / per_msg["fp32"] < 0.55, per_msg

    idle = {m: s["idle_fraction"] for m, s in (("async", heloco), ("sync", sync))}
    with capsys.disabled():
        print(f"\nidle fraction per rank (rank 2 is 3x slower): {idle}")
        print(f"idle seconds: async {heloco['idle_time']} sync {sync['idle_time']}")
    fast_async, fast_sync = mean(idle["async"][:2]), mean(idle["sync"][:2])
    assert fast_sync > 0.3  # the fast ranks wait for the slow one at every round
    assert fast_async < fast_sync
    assert mean(idle["async"]) < mean(idle["sync"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_worker_leaves_the_run_and_a_loadable_checkpoint(tiny_shards, warm_cache):
    out = warm_cache / "killed"
    v = values(tiny_shards, out, comm_timeout_s=60.0)
    port = free_port()
    procs = [start_rank(v, r, 3, port, warm_cache / f"killed-{r}.log") for r in range(3)]
    try:
        wait_for_rounds(out / "metrics-rank2.jsonl", 2, procs)
        procs[2].send_signal(signal.SIGKILL)
        codes = [p.wait(200) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0, -signal.SIGKILL], [
        (warm_cache / f"killed-{r}.log").read_text()[-2000:] for r in range(2)
    ]
    summary = json.loads((out / "summary.json").read_text())
    server = summary["distributed"]["server"]
    assert [s["state"] for s in server][2] == "dead" and server[2]["departures"] == 1
    assert summary["distributed"]["ranks"][2] is None and summary["distributed"]["ranks"][1]["rounds"] >= 1
    assert summary["workers"][2]["submissions"] >= 2
    assert summary["tokens"] >= 12000  # the two others finished the budget
    checkpoint = out / f"checkpoint-{summary['arrivals']}"
    loss = evaluate_checkpoint(checkpoint, tiny_shards)
    assert math.isfinite(loss) and loss == pytest.approx(summary["final_val_loss"]["mean"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_restarted_worker_rejoins_the_running_job(tiny_shards, warm_cache):
    out = warm_cache / "rejoin"
    v = values(
        tiny_shards,
        out,
        comm_timeout_s=120.0,
        rejoin_timeout_s=60.0,
        budget_tokens=None,
        budget_time=25.0,
        worker_speeds=[1.0, 1.0, 0.2],
        method="async_dn",
        dylu=True,  # measured speeds: the 5× slower rank gets fewer inner steps
        inner_steps=6,
    )
    port = free_port()
    procs = [start_rank(v, r, 3, port, warm_cache / f"rejoin-{r}.log") for r in range(3)]
    # The replacement starts beside the ranks (on a loaded machine its start-up may take longer than
    # the run) and waits, connected to the store, until the old rank 2 is gone.
    restarted = start_rank(v, 2, 3, port, warm_cache / "rejoin-2b.log", HELOCO_REJOIN="1")
    try:
        wait_for_rounds(out / "metrics-rank2.jsonl", 2, [*procs, restarted], standby=True)
        procs[2].send_signal(signal.SIGKILL)
        codes = [p.wait(200) for p in (procs[0], procs[1], restarted)]
    finally:
        for p in [*procs, restarted]:
            p.kill()
    assert codes == [0, 0, 0], (warm_cache / "rejoin-2b.log").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "budget_time" and 25.0 <= summary["time"] < 35.0
    s2 = summary["distributed"]["server"][2]
    assert s2["incarnation"] == 2 and s2["departures"] == 1
    records = read_jsonl(out / "metrics-rank2.jsonl")
    rejoin_at = next(i for i, r in enumerate(records) if r["event"] == "rejoin")
    after = [r for r in records[rejoin_at:] if r["event"] == "arrival"]
    assert after and summary["distributed"]["ranks"][2]["incarnation"] == 2  # it trained again
    speeds, steps = summary["distributed"]["measured_speeds"], summary["inner_steps"]
    assert speeds[2] < 0.5 * min(speeds[:2]) and steps[2] < min(steps[:2]), (speeds, steps)
    assert all(r["inner_steps"] == steps[2] for r in records if r["event"] == "arrival")  # kept on rejoin


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_process_distributed_equals_the_simulator_with_one_worker(tmp_path):
    """Same warm start, same data order, same aggregator: the evaluations match exactly, and both
    modes write the same checkpoint format (distributed: the workers' submission counts; their states lie beside)."""
    from recipes.run_state import read_checkpoint
    from tests.conftest import build_tiny_shards

    shards = build_tiny_shards(tmp_path / "data", num_workers=1)
    summaries, evals = {}, {}
    for mode in ("simulate", "distributed"):
        out = tmp_path / mode
        v = values(
            shards,
            out,
            mode=mode,
            num_workers=1,
            worker_speeds=[1.0],
            budget_tokens=3000,
            eval_every=4,
            save_every=3,
        )
        proc = subprocess.run(
            [PYTHON, "recipes/train.py", *cli(v)],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=200,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[mode] = json.loads((out / "summary.json").read_text())
        evals[mode] = [
            {k: x for k, x in r.items() if k != "time"}
            for r in read_jsonl(out / "metrics.jsonl")
            if r["event"] == "eval"
        ]
    assert summaries["distributed"]["final_val_loss"] == summaries["simulate"]["final_val_loss"]
    for key in ("outer_updates", "arrivals", "tokens"):
        assert summaries["distributed"][key] == summaries["simulate"][key]
    assert evals["distributed"] == evals["simulate"] and len(evals["simulate"]) >= 3
    finals = {
        mode: read_checkpoint(tmp_path / mode / f"checkpoint-{summaries[mode]['arrivals']}", mode)
        for mode in summaries
    }
    assert finals["distributed"].schedule == finals["simulate"].schedule
    assert finals["distributed"].metrics_lines == finals["simulate"].metrics_lines
    assert finals["distributed"].inner_steps == finals["simulate"].inner_steps
    # distributed: the server's count of the worker's submissions (its own state goes beside), and
    # the worker has left by the final checkpoint
    arrivals = summaries["distributed"]["arrivals"]
    assert finals["distributed"].workers == {"submissions": [arrivals], "gone": [0]}
    assert finals["distributed"].info["stop_reason"] == "budget_tokens"
    # a periodic checkpoint of the evaluation thread, as the schedule stood at its arrival
    periodic = sorted(tmp_path.glob("distributed/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    state = read_checkpoint(periodic, "distributed")
    assert (
        state.schedule["arrivals"] == int(periodic.name.split("-")[1]) < summaries["distributed"]["arrivals"]
    )
    assert state.aggregator["version"] == state.info["version"] == state.schedule["arrivals"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_under_accelerate_launch_a_dead_rank_stops_the_job_but_rank0_checkpoints(tiny_shards, warm_cache):
    """torchrun's agent (behind `accelerate launch`) SIGTERMs every local rank when one dies: rank 0
    takes that as an interrupt and still writes a final checkpoint; there is no summary."""
    out = warm_cache / "agent"
    v = values(tiny_shards, out, budget_tokens=10_000_000)
    log = warm_cache / "agent.log"
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / "cpu.yaml"),
        "recipes/train.py",
        *cli(v),
    ]
    with open(log, "w") as f:
        launcher = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            start = wait_for_rounds(out / "metrics-rank2.jsonl", 2, [launcher])
            os.kill(start["pid"], signal.SIGKILL)
            code = launcher.wait(120)
        finally:
            launcher.kill()
    assert code != 0
    assert not (out / "summary.json").exists()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, log.read_text()[-3000:]
    assert math.isfinite(evaluate_checkpoint(checkpoints[0], tiny_shards))
