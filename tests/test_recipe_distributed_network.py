"""Distributed mode with issue 19's network options, real processes through `accelerate launch`
(gloo on CPU): Δ encoded in int8 with error feedback on the wire, and overlapped rounds on an
emulated slow link. Slow (two launches each): marked so."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from heloco.codecs import make_codec
from recipes.common import make_model
from recipes.config import config_from_dict
from tests.conftest import build_tiny_shards
from tests.test_recipe_distributed import accelerate_launch, read_jsonl, values

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def two_workers(shards, out, **overrides) -> dict:
    return values(shards, out, num_workers=2, worker_speeds=[1.0, 1.0], **overrides)


@pytest.fixture(scope="module")
def shards2(tmp_path_factory):
    """Shards for K=2 workers (two processes: the machine may have two cores)."""
    return build_tiny_shards(tmp_path_factory.mktemp("data2"), num_workers=2)


@pytest.fixture(scope="module")
def warm2(shards2, tmp_path_factory):
    """The warm-start cache filled once, so the ranks of every run below only load it."""
    from recipes.common import prepare

    root = tmp_path_factory.mktemp("dist2")
    prepare(config_from_dict(two_workers(shards2, root / "x", mode="simulate")))
    return root


def launch(v: dict, log) -> dict:
    proc = accelerate_launch(v, log, num_processes=2)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return json.loads((Path(v["output_dir"]) / "summary.json").read_text())


def parameter_shapes(v: dict) -> list[tuple[int, ...]]:
    from recipes.common import load_data

    config = config_from_dict(v)
    _, _, metadata = load_data(config)
    return [tuple(p.shape) for p in make_model(config, metadata).parameters()]


def test_int8_with_error_feedback_on_the_wire(shards2, warm2):
    """Every Δ travels as an int8 message (≈3.9× fewer bytes than fp32), the server decodes it, and
    the run learns as usual."""
    out = warm2 / "int8-ef"
    v = two_workers(shards2, out, uplink_codec="int8", error_feedback=True)
    summary = launch(v, warm2 / "int8-ef.log")
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "eval"]
    assert evals[-1]["val_loss/mean"] < evals[0]["val_loss/mean"] - 0.2
    assert summary["stop_reason"] == "budget_tokens"
    shapes = parameter_shapes(v)
    encoded = make_codec("int8").max_nbytes(shapes)
    fp32 = 4 * sum(math.prod(s) for s in shapes)
    assert encoded < fp32 / 3.5
    for rank in summary["distributed"]["ranks"]:
        assert rank["uplink_codec"] == "int8" and rank["rounds"] >= 1
        assert rank["uplink_bytes"] == rank["rounds"] * encoded  # the encoded size, every round
    server = summary["distributed"]["server"][1]  # rank 1's messages as the server received them
    # HELLO and dispatch carry no payload; each SUBMIT carries the 4 KiB info region + the message
    assert server["bytes_in"] < server["messages_in"] * (4160 + encoded)


def test_overlap_hides_an_emulated_slow_link(shards2, warm2, capsys):
    """On a link where an fp32 message takes ~half a round each way, a worker that waits for its
    reply idles for a large share of its time; overlapped, the exchange runs behind the next round.
    Compared between the two runs (not against wall-clock thresholds): the machine may be loaded."""
    shapes = parameter_shapes(two_workers(shards2, warm2 / "unused"))
    fp32 = 4 * sum(math.prod(s) for s in shapes)
    bandwidth = fp32 / 0.1  # 0.1 s per fp32 message each way; a round of 10 tiny steps takes ~0.3-0.6 s
    runs = {}
    for overlap in (False, True):
        out = warm2 / f"link-overlap-{overlap}"
        v = two_workers(
            shards2,
            out,
            inner_steps=10,
            budget_tokens=24000,
            uplink_bandwidth=[bandwidth],
            downlink_bandwidth=[bandwidth],
            overlap=overlap,
        )
        runs[overlap] = launch(v, warm2 / f"link-overlap-{overlap}.log")
    for summary in runs.values():
        assert summary["stop_reason"] == "budget_tokens" and summary["tokens"] >= 24000
        for rank in summary["distributed"]["ranks"]:
            assert rank["link_uplink_bytes"] >= rank["uplink_bytes"] > 0  # + a Δ the stopped server refused
            assert rank["link_sleep_s"] > 0
    idle = {o: s["idle_fraction"] for o, s in runs.items()}
    with capsys.disabled():
        print(
            f"\nidle fraction per rank, emulated link {bandwidth:.0f} B/s: without overlap {idle[False]}, with {idle[True]}"
        )
    assert sum(idle[True]) < 0.6 * sum(idle[False]), idle
    evals = [r for r in read_jsonl(warm2 / "link-overlap-True" / "metrics.jsonl") if r["event"] == "eval"]
    assert evals[-1]["val_loss/mean"] < evals[0]["val_loss/mean"] - 0.2


def test_delta_downlink_in_int8_on_the_wire(shards2, warm2):
    """``downlink: delta`` with int8 (the simulator's YAML keys): after a full first reply every
    reply is the encoded change of the parameters, ≈3.9× fewer bytes than fp32, on the emulated link
    too, and the run learns as usual."""
    out = warm2 / "delta-int8"
    v = two_workers(shards2, out, downlink="delta", downlink_codec="int8", downlink_bandwidth=[1e12])
    summary = launch(v, warm2 / "delta-int8.log")
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "eval"]
    assert evals[-1]["val_loss/mean"] < evals[0]["val_loss/mean"] - 0.2
    assert summary["stop_reason"] == "budget_tokens"
    shapes = parameter_shapes(v)
    encoded = make_codec("int8").max_nbytes(shapes)
    fp32 = 4 * sum(math.prod(s) for s in shapes)
    assert encoded < fp32 / 3.5
    for rank in summary["distributed"]["ranks"]:  # rank 0's worker too (in process, DeltaDownlink)
        assert rank["downlink"] == "delta" and rank["rounds"] >= 2
        assert rank["downlink_bytes"] == fp32 + rank["rounds"] * encoded  # one full reply, then changes
        assert rank["downlink_bytes"] < (rank["rounds"] + 1) * fp32 / 3
        assert rank["link_downlink_bytes"] == rank["downlink_bytes"]
        assert rank["uplink_bytes"] == rank["rounds"] * fp32  # Δ still goes up in fp32
    server = summary["distributed"]["server"][1]  # rank 1's replies as the server sent them
    assert server["bytes_out"] < server["messages_out"] * 4160 + fp32 + (server["messages_out"] - 2) * encoded
