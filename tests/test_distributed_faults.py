"""The fault matrix of distributed mode, with real processes on this machine (ranks started by hand,
as a shell loop or srun would, so that killing one leaves the others running). Each case checks that
nothing is lost: the run completes, with the uninterrupted run's token count, and resumed
evaluations equal the uninterrupted ones where the run is deterministic (K = 1)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
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
    wait_for_rounds,
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


def wait_for_text(path: Path, text: str, procs: list[subprocess.Popen], timeout: float) -> None:
    """Until ``text`` appears in a log file (the ranks in ``procs`` must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.2)
    raise TimeoutError(f"{path} never showed {text!r}")


def arrivals_by_worker(run_dir: Path) -> list[int]:
    """How many arrivals rank 0's metrics.jsonl holds from each of the 3 workers so far."""
    counts = [0, 0, 0]
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        if line.strip():
            record = json.loads(line)
            if record["event"] == "arrival":
                counts[record["worker"]] += 1
    return counts


@pytest.mark.timeout(500)
def test_stalled_worker_is_declared_dead_the_others_go_on_and_it_rejoins(tiny_shards, warm_cache):  # noqa: F811
    """Rank 2 is stopped (SIGSTOP) for longer than comm_timeout_s: the server's receive times out, it
    counts the worker as gone and serves the others. Continued (SIGCONT), the stalled process blocks
    sending its submission on the connection the server gave up (30-34 s in our runs), then
    fails with a TransportError ("connection closed by peer"); nothing of it is applied.
    A replacement (HELOCO_REJOIN=1) started meanwhile takes its place and trains to the end."""
    out = warm_cache / "stalled"
    comm_timeout = 15.0
    budget = 480_000  # ~1250 arrivals: still running after the stall, its detection and the restart
    v = values(
        tiny_shards,
        out,
        comm_timeout_s=comm_timeout,
        rejoin_timeout_s=150.0,
        budget_tokens=budget,
        eval_every=100,
    )
    port = free_port()
    logs = [warm_cache / f"stalled-{r}.log" for r in range(3)]
    procs = [start_rank(v, r, 3, port, logs[r]) for r in range(3)]
    replacement = None
    began = time.monotonic()
    try:
        wait_for_rounds(out / "metrics-rank2.jsonl", 2, procs, timeout=200)
        procs[2].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        before = arrivals_by_worker(out)
        wait_for_text(logs[0], "worker 2 left: connection lost", procs[:2], timeout=comm_timeout + 60)
        noticed_after = time.monotonic() - stopped_at
        during = arrivals_by_worker(out)
        # the others kept arriving while rank 2 was silent (at most its submission in flight came)
        assert during[0] > before[0] and during[1] > before[1] and during[2] <= before[2] + 1, (
            before,
            during,
        )
        procs[2].send_signal(signal.SIGCONT)
        continued_at = time.monotonic()
        replacement = start_rank(v, 2, 3, port, warm_cache / "stalled-2b.log", HELOCO_REJOIN="1")
        ended = {}  # when each process exited, seconds after SIGCONT
        while len(ended) < 4 and time.monotonic() < continued_at + 300:
            for name, p in (("0", procs[0]), ("1", procs[1]), ("stalled", procs[2]), ("2b", replacement)):
                if name not in ended and p.poll() is not None:
                    ended[name] = time.monotonic() - continued_at
            time.sleep(0.2)
        codes = [p.wait(1) for p in (procs[0], procs[1], replacement)]
        stalled_code = procs[2].wait(1)
    finally:
        for p in [*procs, *([replacement] if replacement else [])]:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
    took = time.monotonic() - began
    tails = [log.read_text()[-3000:] for log in [*logs, warm_cache / "stalled-2b.log"]]
    assert codes == [0, 0, 0], tails
    stalled_log = logs[2].read_text()
    assert stalled_code != 0 and "TransportError: worker 2: submit failed" in stalled_log, stalled_log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    s2 = summary["distributed"]["server"][2]
    assert s2["departures"] == 1 and s2["incarnation"] == 2, s2  # declared gone once, then rejoined
    assert summary["stop_reason"] == "budget_tokens"
    per_arrival = 3 * 4 * 32  # H × batch × seq_len, every worker alike
    assert summary["tokens"] == -(-budget // per_arrival) * per_arrival  # the uninterrupted run's count
    arrivals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "arrival"]
    assert [r["arrival"] for r in arrivals] == list(range(1, summary["arrivals"] + 1))
    records = read_jsonl(out / "metrics-rank2.jsonl")
    rejoin_at = next(i for i, r in enumerate(records) if r["event"] == "rejoin")
    assert records[rejoin_at]["incarnation"] == 2
    assert any(r["event"] == "arrival" for r in records[rejoin_at:])  # it trained again
    assert (
        summary["distributed"]["ranks"][2]["incarnation"] == 2
        and summary["distributed"]["ranks"][2]["rounds"] >= 1
    )
    # the stalled process's submission never arrived: worker 2's arrivals are its rounds before the
    # stall and the replacement's
    assert arrivals_by_worker(out)[2] == during[2] + summary["distributed"]["ranks"][2]["rounds"]
    print(
        f"\nstall noticed after {noticed_after:.1f} s; arrivals meanwhile {before} -> {during}; "
        f"stalled rank exited {stalled_code}; exits after SIGCONT {ended}; replacement rounds {summary['distributed']['ranks'][2]['rounds']}; "
        f"run {summary['elapsed_s']:.0f} s, test {took:.0f} s"
    )
