"""The fault matrix of distributed mode, with real processes on this machine (ranks started by hand,
as a shell loop or srun would, so that killing one leaves the others running). Each case checks that
nothing is lost: the run completes, with the uninterrupted run's token count, and resumed
evaluations equal the uninterrupted ones where the run is deterministic (K = 1)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.test_recipe_distributed import (
    ACCELERATE,
    PYTHON,
    ROOT,
    child_env,
    cli,
    free_port,
    read_jsonl,
    start_rank,
    values,
    warm_cache,  # noqa: F401 - a fixture
)

pytestmark = pytest.mark.slow


def one_process(v: dict, log: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Distributed mode in one process without a launcher (K = 1: rank 0 is the only worker)."""
    with open(log, "w") as f:
        return subprocess.run(
            [PYTHON, "recipes/train.py", *cli(v)],
            cwd=ROOT,
            env=child_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )


def run_ranks(v: dict, world: int, port: int, log_prefix: Path) -> list[int]:
    """Every rank as its own process, until all have exited; their exit codes."""
    procs = [start_rank(v, r, world, port, Path(f"{log_prefix}-{r}.log")) for r in range(world)]
    try:
        return [p.wait(300) for p in procs]
    finally:
        for p in procs:
            p.kill()


def evaluations(run_dir: Path) -> list[tuple[str, int, int, float]]:
    """(reason, version, tokens, mean loss) of every evaluation, in version order."""
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["event"] == "eval"]
    return sorted((r["reason"], r["version"], r["tokens"], r["val_loss/mean"]) for r in evals)


@pytest.mark.timeout(400)
def test_k1_crash_and_resume_evaluates_like_the_uninterrupted_run(tmp_path):
    from tests.conftest import build_tiny_shards

    shards = build_tiny_shards(tmp_path / "data", num_workers=1)
    common = dict(num_workers=1, worker_speeds=[1.0], budget_tokens=9000, eval_every=3, save_every=4)
    full = tmp_path / "k1-full"
    assert one_process(values(shards, full, **common), tmp_path / "k1-full.log").returncode == 0
    cut = tmp_path / "k1-cut"
    crashed = one_process(values(shards, cut, stop_after_arrivals=10, **common), tmp_path / "k1-cut.log")
    assert crashed.returncode == -signal.SIGKILL
    assert not (cut / "summary.json").exists()
    resumed = one_process(values(shards, cut, resume_from="latest", **common), tmp_path / "k1-resume.log")
    assert resumed.returncode == 0, (tmp_path / "k1-resume.log").read_text()[-3000:]
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert (b["tokens"], b["arrivals"], b["outer_updates"]) == (
        a["tokens"],
        a["arrivals"],
        a["outer_updates"],
    )
    assert evaluations(cut) == evaluations(full)
    assert b["final_val_loss"] == a["final_val_loss"]
    rank_log = read_jsonl(cut / "metrics-rank0.jsonl")
    [resume] = [r for r in rank_log if r["event"] == "resume"]
    # checkpoint-8 if rank 0's background thread wrote it before the crash at arrival 10, else 4
    assert resume["submissions"] in (4, 8)


@pytest.mark.timeout(500)
def test_rank0_killed_then_every_rank_resumes_and_the_run_completes(tiny_shards, warm_cache):  # noqa: F811
    out = warm_cache / "rank0-killed"
    common = dict(save_every=4, comm_timeout_s=30.0)
    port = free_port()
    v = values(tiny_shards, out, stop_after_arrivals=9, **common)
    codes = run_ranks(v, 3, port, warm_cache / "rank0-killed")
    assert codes[0] == -signal.SIGKILL and all(c != 0 for c in codes[1:]), codes
    assert not (out / "summary.json").exists()
    port = free_port()
    v = values(tiny_shards, out, resume_from="latest", **common)
    codes = run_ranks(v, 3, port, warm_cache / "rank0-resumed")
    logs = [(warm_cache / f"rank0-resumed-{r}.log").read_text()[-2000:] for r in range(3)]
    assert codes == [0, 0, 0], logs
    summary = json.loads((out / "summary.json").read_text())
    per_arrival = 3 * 4 * 32  # H × batch × seq_len, every worker alike
    assert summary["tokens"] == -(-12000 // per_arrival) * per_arrival  # the uninterrupted run's count
    arrivals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "arrival"]
    assert [r["arrival"] for r in arrivals] == list(range(1, summary["arrivals"] + 1))  # none twice
    resumed = [r for r in read_jsonl(out / "metrics-rank1.jsonl") if r["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["submissions"] >= 1


@pytest.mark.timeout(500)
def test_rank0_killed_under_the_launcher_restarts_and_resumes_by_itself(tiny_shards, warm_cache):  # noqa: F811
    """`accelerate launch --max_restarts 1`: rank 0 dies, the agent SIGTERMs the others and starts the
    group again, which resumes from the latest complete checkpoint and finishes the run. (The
    relaunched group's keys live under /worker/attempt_1/ of the agent's store, apart from the dead
    attempt's; workers finish writing a requested state before they take SIGTERM.)"""
    out = warm_cache / "max-restarts"
    v = values(tiny_shards, out, save_every=4, comm_timeout_s=30.0, stop_after_arrivals=9)
    config = ROOT / "accelerate_configs" / "cpu.yaml"
    cmd = [ACCELERATE, "launch", "--config_file", str(config), "--num_processes", "3", "--max_restarts", "1"]
    cmd += ["--monitor_interval", "1", "recipes/train.py", *cli(v)]
    log = warm_cache / "max-restarts.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT, timeout=400)
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    assert "restart 1 of the job: resuming from the latest complete checkpoint" in text
    summary = json.loads((out / "summary.json").read_text())
    per_arrival = 3 * 4 * 32  # H × batch × seq_len, every worker alike
    assert summary["tokens"] == -(-12000 // per_arrival) * per_arrival  # the uninterrupted run's count
    arrivals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "arrival"]
    assert [r["arrival"] for r in arrivals] == list(range(1, summary["arrivals"] + 1))  # none twice
    for r in range(3):
        resumed = [x for x in read_jsonl(out / f"metrics-rank{r}.jsonl") if x["event"] == "resume"]
        assert len(resumed) == 1, r
