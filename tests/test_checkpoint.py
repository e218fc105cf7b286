import pytest
import torch

from heloco.checkpoint import (
    atomic_directory,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune_checkpoints,
    save_state,
)


def test_optimizer_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "opt": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "meta": {"step": 3, "x": None, "t": (1, 2.5)},
    }
    save_state(tmp_path, "s", state)
    back = load_state(tmp_path, "s")
    assert back["meta"] == {"step": 3, "x": None, "t": (1, 2.5)}
    assert torch.equal(back["rng"], state["rng"])
    other = torch.optim.AdamW(model.parameters(), lr=1e-3)
    other.load_state_dict(back["opt"])
    assert other.param_groups[0]["betas"] == (0.9, 0.95)
    for k, v in opt.state_dict()["state"].items():
        for name, tensor in v.items():
            assert torch.equal(other.state_dict()["state"][k][name], tensor)


def test_unsupported_value_names_its_place(tmp_path):
    with pytest.raises(TypeError, match=r"a\.b"):
        save_state(tmp_path, "s", {"a": {"b": object()}})


def test_missing_state_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="'aggregator'"):
        load_state(tmp_path, "aggregator")


def test_atomic_directory_commits_or_leaves_nothing(tmp_path):
    final = tmp_path / "checkpoint-1"
    with atomic_directory(final) as d:
        (d / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_directory(final) as d:
        (d / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    with atomic_directory(final) as d:
        (d / "a.txt").write_text("two")
    assert (final / "a.txt").read_text() == "two"


def test_listing_ignores_temporaries_and_prunes(tmp_path):
    for n in (2, 10, 1):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / ".checkpoint-11.tmp-5").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2", "checkpoint-10"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert latest_checkpoint(tmp_path / "nope") is None


def test_a_killed_writers_temporaries_are_removed_by_the_next_writer(tmp_path):
    import os
    import subprocess
    import sys

    from heloco.checkpoint import atomic_directory

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    dead = [
        tmp_path / f".checkpoint-3.tmp-{gone.pid}",
        tmp_path / f".checkpoint-2.old-{gone.pid}",
    ]
    for d in dead:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / f".metrics.json.tmp-{gone.pid}").write_text("{}")
    alive = [tmp_path / f".checkpoint-4.tmp-{os.getppid()}", tmp_path / ".hidden", tmp_path / "checkpoint-2"]
    for d in alive:
        d.mkdir()
    with atomic_directory(tmp_path / "checkpoint-5") as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in alive), "checkpoint-5"])
