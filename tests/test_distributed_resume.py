"""Distributed checkpoints hold the whole run: the gate asks each worker for its state as of the
submission the server recorded, workers write it, and a resume picks the newest checkpoint whose
parts are all there. Fast checks of each piece; the fault matrix with real processes is in
tests/test_distributed_faults.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes.config import config_from_dict
from recipes.data import TokenStream
from recipes.distributed.rank0 import keep_records_until
from recipes.distributed.resume import own_state_for, pick_checkpoint, resume_request
from recipes.distributed.worker_state import WorkerCheckpoints, WorkerState, available_submissions
from recipes.run_state import RunState, write_checkpoint
from tests.test_recipe_distributed import delta, make_gate, values


def test_gate_asks_each_worker_for_the_state_its_checkpoint_needs():
    gate, _, _, background = make_gate(steps=(1, 1), budget_tokens=1000, save_every=2)
    asked = []
    for worker in (0, 1, 0, 1, 0, 0):
        u = gate.submit(worker, delta(1), gate.aggregator.version)
        asked.append({k: v for k, v in u.stats.items() if k.startswith("checkpoint")})
    assert asked == [
        {},
        {"checkpoint_submission": 1.0},  # arrival 2 is a checkpoint: worker 1 writes its 1st state now,
        {"checkpoint_previous": 1.0},  # worker 0 was computing: its 1st (held) at its next reply
        {"checkpoint_submission": 2.0},  # arrival 4: worker 1's 2nd now, worker 0's 2nd later
        {"checkpoint_previous": 2.0},
        {"checkpoint_submission": 4.0},  # arrival 6: worker 0's 4th; worker 1's 2nd is written already
    ]
    assert [s.submissions for s in background.checkpoints] == [[1, 1], [2, 2], [4, 2]]
    assert gate.state_requests == {}
    assert gate.dispatch(1).stats["submissions"] == 2.0


def stream(n: int = 40) -> TokenStream:
    return TokenStream(torch.arange(n * 8).reshape(n, 8), 2, seed=0, stream_id=0)


def test_worker_writes_the_state_it_is_asked_for_and_restores_it(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    data = stream()
    checkpoints = WorkerCheckpoints(tmp_path, rank=1, keep=2)

    def round_(stats):
        for _ in range(2):
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
            data.next_batch()
        checkpoints.after_submission(7, opt, data, stats)

    round_({})
    after_first = (json.dumps(data.state_dict()), opt.state_dict()["state"][0]["exp_avg"].clone())
    round_({"checkpoint_previous": 1.0})  # a checkpoint taken during round 2 needs the state after round 1
    round_({"checkpoint_submission": 3.0})
    assert available_submissions(tmp_path, 1) == [1, 3] and checkpoints.written == [1, 3]
    state = WorkerState.read(tmp_path, 1, 1)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    other = stream()
    state.restore(fresh, other)
    assert json.dumps(other.state_dict()) == after_first[0] and state.local_step == 7
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], after_first[1])
    round_({"checkpoint_previous": 1.0})  # it holds 3 and 4 now: that checkpoint stays incomplete
    assert checkpoints.written == [1, 3] and "stays incomplete" in caplog.text


class _Saveable:
    def __init__(self, name: str) -> None:
        self.name = name

    def save_pretrained(self, folder: Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / self.name).write_text("x")


def server_checkpoint(run_dir: Path, arrivals: int, submissions: list[int], gone: list[int] = ()) -> Path:
    config = config_from_dict(values(out=run_dir / "x", keep_checkpoints=5))
    state = RunState(
        mode="distributed",
        schedule={"arrivals": arrivals, "tokens": 0, "pending_eval_times": [], "evaluated_start": True},
        aggregator={"version": arrivals},
        metrics_lines=arrivals,
        inner_steps=[1, 1, 1],
        workers={"submissions": submissions, "gone": list(gone)},
        info={"time": 1.0, "version": arrivals},
    )
    path = run_dir / f"checkpoint-{arrivals}"
    return write_checkpoint(path, state, model=_Saveable("m"), tokenizer=_Saveable("t"), config=config)


def test_resume_picks_the_newest_checkpoint_whose_worker_states_all_exist(tmp_path, caplog):
    server_checkpoint(tmp_path, 3, [2, 1, 0])
    server_checkpoint(tmp_path, 6, [3, 2, 1])
    # rank 2 died before writing its state for checkpoint-6
    held = [[1, 2, 3], [1, 2], []]
    path, submissions, gone = pick_checkpoint(tmp_path, "latest", held)
    assert Path(path).name == "checkpoint-3" and submissions == [2, 1, 0] and gone == []
    assert "checkpoint-6: no worker state from rank(s) [2]" in caplog.text
    with pytest.raises(FileNotFoundError, match="no worker state from rank"):
        pick_checkpoint(tmp_path, str(tmp_path / "checkpoint-6"), held)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        pick_checkpoint(tmp_path, "latest", [[], [], []])


def test_a_launcher_restart_resumes_by_itself(tmp_path, monkeypatch):
    config = config_from_dict(values(out=tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert resume_request(config) is None  # nothing to resume from: a fresh start
    server_checkpoint(tmp_path, 3, [1, 1, 1])
    assert resume_request(config) == "latest"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert resume_request(config) is None


def test_resumed_metrics_keep_the_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"event": "arrival", "arrival": 1},
        {"event": "arrival", "arrival": 2},
        {"event": "arrival", "arrival": 3},
        {"event": "eval", "arrival": 2},  # written by the background thread after arrival 3
        {"event": "arrival", "arrival": 4},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert keep_records_until(path, 2) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        records[0],
        records[1],
        records[3],
    ]


class Corrupting:
    """A transport that spoils the ``at``-th submission: NaN in Δ, a tensor missing, or a base
    version from the future."""

    def __init__(self, inner, kind: str, at: int) -> None:
        self.inner, self.kind, self.at, self.calls = inner, kind, at, 0

    def dispatch(self, worker_id):
        return self.inner.dispatch(worker_id)

    def submit(self, worker_id, pseudo_grads, base_version):
        self.calls += 1
        if self.calls == self.at:
            if self.kind == "nan":
                pseudo_grads = [g.clone().fill_(float("nan")) for g in pseudo_grads]
            elif self.kind == "shape":
                pseudo_grads = list(pseudo_grads)[:-1]
            else:
                base_version += 100
        return self.inner.submit(worker_id, pseudo_grads, base_version)


@pytest.mark.parametrize("kind", ["nan", "shape", "future"])
def test_a_refused_pseudo_gradient_leaves_the_model_unchanged_and_the_run_goes_on(kind, tmp_path):
    import time

    from heloco import InProcessTransport
    from recipes.common import make_inner_optimizer
    from recipes.distributed.gate import Gate
    from recipes.distributed.logs import JsonLines
    from recipes.distributed.rejoin import Standalone
    from recipes.distributed.worker import train_worker
    from recipes.methods import build_aggregator
    from recipes.model import build_model
    from recipes.worker_round import InnerLoop
    from tests.test_recipe_distributed import FakeBackground, FakeLog

    config = config_from_dict(
        values(out=tmp_path, num_workers=1, worker_speeds=[1.0], inner_steps=2, budget_tokens=5 * 2 * 2 * 16)
    )
    model = build_model("tiny", vocab_size=64, max_positions=16, eos_token_id=None)
    aggregator = build_aggregator(config, [p.detach().clone() for p in model.parameters()])
    gate = Gate(aggregator, config, [2], 2 * 16, FakeLog(), FakeBackground())
    gate.start(time.monotonic())
    versions, unchanged = [], []

    class Watching(Corrupting):
        def submit(self, worker_id, pseudo_grads, base_version):
            versions.append(aggregator.version)
            before = [p.clone() for p in aggregator.global_params]
            try:
                return super().submit(worker_id, pseudo_grads, base_version)
            except ValueError:
                unchanged.append(
                    all(torch.equal(a, b) for a, b in zip(before, aggregator.global_params, strict=True))
                )
                raise

    rank_log = JsonLines(tmp_path / "rank0.jsonl", fresh=True)
    stream = TokenStream(torch.randint(0, 64, (64, 16)), 2, seed=0, stream_id=0)
    shim = Standalone(torch.device("cpu"), "no")
    report = train_worker(
        config=config,
        rank=0,
        loop=InnerLoop(config, model, make_inner_optimizer(config, model), stream, shim),
        transport=Watching(InProcessTransport(gate), kind, at=2),
        steps=2,
        slowdown=1.0,
        start=time.monotonic(),
        rank_log=rank_log,
        gate=gate,
        checkpoints=WorkerCheckpoints(tmp_path, 0, keep=2),
    )
    rank_log.close()
    assert report["reason"] == "budget_tokens" and report["rejected_rounds"] == 1 and report["rounds"] == 5
    assert gate.arrivals == 5 and aggregator.version == 5 and gate.submissions == [5]
    assert versions[:3] == [0, 1, 1] and unchanged == [True]  # the refused round changed nothing
    assert all(torch.isfinite(p).all() for p in aggregator.global_params)
    [refused] = [
        r
        for r in map(json.loads, (tmp_path / "rank0.jsonl").read_text().splitlines())
        if r["event"] == "refused"
    ]
    assert refused["round"] == 2


def test_a_resumed_gate_does_not_ask_for_states_its_checkpoint_already_has():
    gate, _, _, _ = make_gate(steps=(1, 1), budget_tokens=1000, save_every=1)
    schedule = {"arrivals": 4, "tokens": 40, "pending_eval_times": [], "evaluated_start": True}
    gate.restore(schedule, [3, 1], elapsed=5.0)
    u = gate.submit(0, delta(1), gate.aggregator.version)  # arrival 5: a checkpoint
    assert u.stats["checkpoint_submission"] == 4.0 and gate.state_requests == {}  # rank 1's 1st exists
    assert gate.arrivals == 5 and gate.resumed_at == 5.0


def test_sigterm_waits_for_the_worker_state_being_written():
    """torchrun's agent SIGTERMs the other ranks when one fails: a state being written is finished
    first (else its checkpoint stays incomplete and the launcher's restart cannot resume from it)."""
    import os
    import signal

    from recipes.distributed.worker_state import sigterm_deferred

    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with sigterm_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == []  # still writing
        assert received == [signal.SIGTERM]  # then the handler in place before runs
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_relaunched_group_keeps_its_store_keys_apart_from_the_previous_attempt(monkeypatch):
    """torchrun's agent keeps one store for every attempt of a job, with the previous attempt's gloo
    addresses and our keys still in it: after a restart the default group and the job's keys live
    under /worker/attempt_<n>/."""
    import datetime

    import torch.distributed as dist

    from recipes.distributed.setup import init_restarted_group
    from recipes.distributed.store import attempt_prefix, job_store

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    agent.set("heloco/w1/incarnation", "5")  # left by attempt 0
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(agent.port), RANK="0", WORLD_SIZE="1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert attempt_prefix() is None
    assert not init_restarted_group(datetime.timedelta(seconds=10), "gloo")  # attempt 0: torch's own
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert init_restarted_group(datetime.timedelta(seconds=10), "gloo")
    try:
        assert dist.get_world_size() == 1
        assert job_store().add("heloco/w1/incarnation", 1) == 1  # not 6: attempt 0's count is not seen
        assert agent.add("/worker/attempt_1/heloco/w1/incarnation", 0) == 1
    finally:
        dist.destroy_process_group()


def test_a_worker_the_server_had_lost_does_not_hold_the_checkpoint_back(tmp_path):
    server_checkpoint(tmp_path, 3, [2, 1, 1])
    server_checkpoint(tmp_path, 9, [6, 4, 1], gone=[2])  # rank 2 died after its 1st submission
    held = [[2, 6], [1, 4], []]  # it never wrote a state: nobody asked before it died
    path, submissions, gone = pick_checkpoint(tmp_path, "latest", held)
    assert Path(path).name == "checkpoint-9" and gone == [2]
    assert own_state_for(submissions[2], held[2], gone=True) is None  # back to the warm start
    assert own_state_for(5, [1, 3, 7], gone=True) == 3  # its newest state up to the recorded one
    assert own_state_for(4, [1, 4], gone=False) == 4 and own_state_for(0, [], gone=False) is None


def test_a_corrupted_worker_state_is_not_offered_to_a_resume(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for submission in (1, 2):
        WorkerState.take(0, submission, 1, opt, stream()).write(tmp_path, keep=3)
    tensors = next(
        p
        for p in (tmp_path / "worker-states" / "rank0" / "submission-2").iterdir()
        if p.suffix == ".safetensors"
    )
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    tensors.write_bytes(bytes(data))
    assert available_submissions(tmp_path, 0) == [1, 2]  # (listing alone does not hash)
    assert available_submissions(tmp_path, 0, verify=True) == [1]
    assert "does not match its sha256" in caplog.text


def test_a_wrong_resume_path_or_another_worker_count_is_refused_naming_it(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="resume_from='nowhere/checkpoint-3': no checkpoint directory"
    ):
        pick_checkpoint(tmp_path, "nowhere/checkpoint-3", [[], [], []])
    server_checkpoint(tmp_path, 3, [1, 1, 1])
    with pytest.raises(ValueError, match="a run of 3 workers, this one has 2"):
        pick_checkpoint(tmp_path, "latest", [[1], [1]])
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 0"):
        config_from_dict(values(out=tmp_path, keep_checkpoints=-1))


def test_worker_states_follow_the_run_config(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    idle = WorkerCheckpoints.for_run(config_from_dict(values(out=tmp_path, save_every=0)), rank=0)
    idle.after_submission(1, opt, stream(), {})
    assert idle.submissions == 1 and idle.held is None  # no periodic checkpoint: nothing copied
    kept_all = WorkerCheckpoints(tmp_path, rank=0, keep=0)
    for _ in range(5):
        kept_all.after_submission(
            1, opt, stream(), {"checkpoint_submission": float(kept_all.submissions + 1)}
        )
    assert available_submissions(tmp_path, 0) == [1, 2, 3, 4, 5]  # keep_checkpoints 0 keeps all


def test_error_feedback_residual_is_part_of_the_worker_state(tmp_path):
    """With error feedback, what the codec did not send yet is state: the worker's checkpoint keeps it,
    snapshot (overlap) and after_submission alike, and a resumed worker's encoder gets it back."""
    from heloco.codecs import ErrorFeedback, Int8Codec

    model = torch.nn.Linear(300, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    data = stream()
    encoder = ErrorFeedback(Int8Codec(block=256))
    checkpoints = WorkerCheckpoints(tmp_path, rank=0, keep=2)
    checkpoints.encoder = encoder
    encoder.encode([torch.randn(2, 300), torch.randn(2)])  # lossy: a residual is left
    saved = [r.clone() for r in encoder.state_dict()["residuals"]]
    assert any(r.abs().sum() > 0 for r in saved)
    checkpoints.after_submission(3, opt, data, {"checkpoint_submission": 1.0})
    encoder.encode([torch.randn(2, 300), torch.randn(2)])  # the residual moves on after the checkpoint
    state = WorkerState.read(tmp_path, 0, 1)
    fresh = ErrorFeedback(Int8Codec(block=256))
    state.restore_encoder(fresh)
    for a, b in zip(fresh.state_dict()["residuals"], saved, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="has no error feedback"):
        state.restore_encoder(None)
    snap = checkpoints.snapshot(3, opt, data)
    assert snap is not None and snap.encoder is not None
    plain = WorkerCheckpoints(tmp_path / "plain", rank=0, keep=2)  # no encoder: no residual saved
    plain.after_submission(3, opt, data, {"checkpoint_submission": 1.0})
    assert WorkerState.read(tmp_path / "plain", 0, 1).encoder is None
