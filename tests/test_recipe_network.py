"""recipes/train.py in simulate mode with a simulated network, overlapped rounds and codecs, on tiny
shards: the default stays bit-identical, a slow link costs idle time that overlap removes, and a
run with messages in flight resumes bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from heloco.checkpoint import latest_checkpoint
from recipes.config import config_from_dict
from recipes.run_state import read_checkpoint
from recipes.train import run
from tests.test_recipe_train import base_values, read_metrics


def message_bytes(shards: Path, out: Path) -> int:
    """Bytes of one fp32 message of the tiny model (4 per parameter)."""
    from recipes.common import make_model

    config = config_from_dict(base_values(shards, out))
    metadata = json.loads((shards / "metadata.json").read_text())
    return 4 * sum(p.numel() for p in make_model(config, metadata).parameters())


def test_instantaneous_network_is_bit_identical_to_none(tiny_shards, tmp_path):
    """A network whose links take no time goes through the clock's message events and gives the
    metrics of a run without one, byte for byte (and the same busy and idle times)."""
    common = dict(method="heloco", budget_tokens=2500)
    plain = tmp_path / "plain"
    a = run(config_from_dict(base_values(tiny_shards, plain, **common)))
    networked = tmp_path / "networked"
    b = run(config_from_dict(base_values(tiny_shards, networked, uplink_latency=[0.0], **common)))
    assert (plain / "metrics.jsonl").read_bytes() == (networked / "metrics.jsonl").read_bytes()
    assert (a["busy_time"], a["idle_time"]) == (b["busy_time"], b["idle_time"])


def test_slow_link_idles_the_fast_worker_and_overlap_does_not(tiny_shards, tmp_path):
    """Worker 0 (1 step/s, H = 3: 3 s rounds) on links where one fp32 message takes 1.5 s each way:
    without overlap it waits 3 s after every 3 s round (idle fraction 1/2 once a reply is in); with
    overlap the reply comes exactly when the next round ends, so it never waits."""
    bandwidth = message_bytes(tiny_shards, tmp_path / "m") / 1.5
    link = dict(
        method="heloco", budget_tokens=3000, uplink_bandwidth=[bandwidth], downlink_bandwidth=[bandwidth]
    )
    waiting = run(config_from_dict(base_values(tiny_shards, tmp_path / "waiting", **link)))
    arrivals = [r for r in read_metrics(tmp_path / "waiting") if r["event"] == "arrival"]
    fast = [r["time"] for r in arrivals if r["worker"] == 0]
    assert fast[:3] == pytest.approx([4.5, 10.5, 16.5])  # compute 3 s, up 1.5 s, down 1.5 s, again
    busy, idle = waiting["busy_time"][0], waiting["idle_time"][0]
    assert idle == pytest.approx(busy - 3.0)  # every round but the running one was followed by 3 s idle
    overlapped = run(config_from_dict(base_values(tiny_shards, tmp_path / "overlap", overlap=True, **link)))
    arrivals = [r for r in read_metrics(tmp_path / "overlap") if r["event"] == "arrival"]
    fast = [r["time"] for r in arrivals if r["worker"] == 0]
    assert fast[:3] == pytest.approx([4.5, 7.5, 10.5])  # one every 3 s
    assert overlapped["idle_fraction"][0] < 1e-9 < waiting["idle_fraction"][0] - 0.4


def test_resume_with_messages_in_flight_is_bit_for_bit(tiny_shards, tmp_path):
    bandwidth = message_bytes(tiny_shards, tmp_path / "m") / 2.0
    common = dict(
        method="heloco",
        save_every=3,
        budget_tokens=3500,
        overlap=True,
        uplink_bandwidth=[bandwidth],
        uplink_latency=[0.25, 0.5, 0.0],
        downlink_bandwidth=[bandwidth * 2],
        server_step_time=0.1,
    )
    full = tmp_path / "full"
    run(config_from_dict(base_values(tiny_shards, full, **common)))
    cut = tmp_path / "cut"
    interrupted = run(config_from_dict(base_values(tiny_shards, cut, stop_after_arrivals=9, **common)))
    assert interrupted["interrupted"]
    state = read_checkpoint(latest_checkpoint(cut), "simulate")
    in_flight = [w["network"] for w in state.workers["workers"]]
    assert any(n["in_transit"] is not None or n["reply_on_the_way"] for n in in_flight), in_flight
    run(config_from_dict(base_values(tiny_shards, cut, resume_from="latest", **common)))
    assert read_metrics(cut) == read_metrics(full)
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert a["final_val_loss"] == b["final_val_loss"]
    assert (a["busy_time"], a["idle_time"]) == (b["busy_time"], b["idle_time"])


def shapes_of_model(shards: Path, out: Path) -> list[tuple[int, ...]]:
    from recipes.common import make_model

    config = config_from_dict(base_values(shards, out))
    metadata = json.loads((shards / "metadata.json").read_text())
    return [tuple(p.shape) for p in make_model(config, metadata).parameters()]


@pytest.mark.parametrize(
    ("codec", "downlink"),
    [("int8", {}), ("topk", {}), ("int8", {"downlink": "delta", "downlink_codec": "int8"})],
)
def test_codec_in_the_loop_charges_its_bytes_and_resumes_bit_for_bit(codec, downlink, tiny_shards, tmp_path):
    """A lossy codec with error feedback over a slow uplink, overlapped: the first arrival comes
    after the round (3 s) plus the encoded message's bytes at the link's bandwidth; an interrupted
    run resumes (residuals and messages in flight included) to the same metrics, byte for byte."""
    options = {"int8": {"int8_block": 64}, "topk": {"topk_fraction": 0.05, "topk_bits": 3, "topk_chunk": 512}}
    from heloco.codecs import make_codec

    made = make_codec(codec, **{k.split("_", 1)[1]: v for k, v in options[codec].items()})
    nbytes = made.max_nbytes(shapes_of_model(tiny_shards, tmp_path / "m"))
    assert nbytes < message_bytes(tiny_shards, tmp_path / "m") / 3
    common = dict(
        method="heloco",
        save_every=3,
        budget_tokens=3500,
        overlap=True,
        uplink_codec=codec,
        error_feedback=True,
        uplink_bandwidth=[nbytes / 2.0],  # 2 s per message
        downlink_latency=[0.5],
        **options[codec],
        **downlink,  # the servers' copies of what each worker holds resume too
    )
    full = tmp_path / "full"
    run(config_from_dict(base_values(tiny_shards, full, **common)))
    first = next(r for r in read_metrics(full) if r["event"] == "arrival")
    assert (first["worker"], first["time"]) == (0, pytest.approx(3.0 + 2.0))
    cut = tmp_path / "cut"
    run(config_from_dict(base_values(tiny_shards, cut, stop_after_arrivals=7, **common)))
    state = read_checkpoint(latest_checkpoint(cut), "simulate")
    assert all(w["codec"]["residuals"] is not None for w in state.workers["workers"])
    run(config_from_dict(base_values(tiny_shards, cut, resume_from="latest", **common)))
    assert (cut / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    evals = [r for r in read_metrics(full) if r["event"] == "eval"]
    assert evals[-1]["val_loss/mean"] < evals[0]["val_loss/mean"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"uplink_bandwidth": [0.0]}, r"uplink_bandwidth\[0\] must be a positive number of bytes per second"),
        ({"downlink": "deltas"}, r"downlink must be one of params, delta; got 'deltas'"),
        ({"downlink_codec": "int8"}, r"downlink_codec 'int8' needs downlink: delta"),
        ({"downlink": "delta", "downlink_codec": "zstd"}, r"downlink_codec must be one of fp32, bf16"),
        ({"topk_scope": "layer"}, r"topk_scope must be one of chunk, global; got 'layer'"),
        ({"downlink_bandwidth": [-5.0]}, r"downlink_bandwidth\[0\] must be a positive"),
        (
            {"uplink_latency": [0.1, 0.2]},
            "uplink_latency has 2 entries; give one per worker \\(3\\) or one for all",
        ),
        ({"downlink_latency": [-1.0]}, r"downlink_latency\[0\] must be a number of seconds >= 0"),
        ({"server_step_time": -0.5}, "server_step_time must be a number of seconds >= 0"),
        ({"uplink_codec": "gzip"}, "uplink_codec must be one of fp32, bf16, int8, topk; got 'gzip'"),
        ({"topk_fraction": 0.0}, r"topk_fraction must be in \(0, 1\]"),
        ({"topk_bits": 1}, r"topk_bits must be an integer in \[2, 8\]"),
        ({"topk_chunk": 1}, r"topk_chunk must be an integer in \[2, 2\*\*24\]"),
        ({"int8_block": 0}, r"int8_block must be an integer in \[1, 2\*\*24\]"),
        ({"error_feedback_decay": 1.5}, r"error_feedback_decay must be in \(0, 1\]"),
        ({"mode": "distributed", "server_step_time": 0.5}, "server_step_time=0.5 is a simulate-mode option"),
    ],
)
def test_bad_network_config_is_refused(overrides, match, tiny_shards, tmp_path):
    with pytest.raises(ValueError, match=match):
        config_from_dict(base_values(tiny_shards, tmp_path / "x", **overrides))


def test_distributed_mode_takes_the_codec_overlap_and_link_fields(tiny_shards, tmp_path):
    """mode=distributed accepts them (docs/communication.md: encoded Δ on the wire, a background
    exchange, an emulated link), one process per worker."""
    values = {"uplink_codec": "int8", "error_feedback": True, "overlap": True, "uplink_bandwidth": [1e6]}
    config = config_from_dict(base_values(tiny_shards, tmp_path / "x", mode="distributed", **values))
    assert config.diloco.uplink_codec == "int8" and config.diloco.overlap
    values = {"uplink_codec": "topk", "topk_scope": "global", "error_feedback": True}
    config = config_from_dict(base_values(tiny_shards, tmp_path / "x", mode="distributed", **values))
    assert config.diloco.topk_scope == "global"
    values = {"downlink": "delta", "downlink_codec": "int8"}  # the same keys as in simulate mode
    config = config_from_dict(base_values(tiny_shards, tmp_path / "x", mode="distributed", **values))
    assert config.diloco.downlink == "delta"


def test_groups_take_the_codec_error_feedback_delta_replies_link_and_overlap(tiny_shards, tmp_path):
    """A worker of several processes: its leader encodes Δ, holds the replies' copy, sleeps for the
    link and makes its server call on a background thread (recipes/distributed/groups.py,
    group_exchange.py), so all of these are accepted with group_sizes."""
    values = {
        "uplink_codec": "topk",
        "error_feedback": True,
        "uplink_bandwidth": [1e6],
        "downlink_latency": [0.01],
        "group_sizes": [2, 1, 1],
    }
    config = config_from_dict(base_values(tiny_shards, tmp_path / "x", mode="distributed", **values))
    assert config.diloco.uplink_codec == "topk" and config.diloco.group_sizes == [2, 1, 1]
    values = {"downlink": "delta", "downlink_codec": "int8", "group_sizes": [1, 2, 1]}
    config = config_from_dict(base_values(tiny_shards, tmp_path / "x", mode="distributed", **values))
    assert config.diloco.downlink == "delta" and config.diloco.group_sizes == [1, 2, 1]
    values = {"overlap": True, "uplink_codec": "int8", "error_feedback": True, "group_sizes": [1, 1, 2]}
    config = config_from_dict(base_values(tiny_shards, tmp_path / "x", mode="distributed", **values))
    assert config.diloco.overlap and config.diloco.group_sizes == [1, 1, 2]


def test_slow_link_yaml_says_its_arithmetic():
    """recipes/configs/communication/moderate_slow_link.yaml: one fp32 message of the paper model
    (3,699,968 parameters) takes half of the fast worker's 20 s round, both ways; every run validates."""
    from recipes.analysis.compare import load_matrix, run_configs

    spec = load_matrix(Path(__file__).parents[1] / "recipes/configs/communication/moderate_slow_link.yaml")
    base = spec["base"]
    fast_round = base["inner_steps"] / max(base["worker_speeds"])
    assert fast_round == 20.0
    for direction in ("uplink_bandwidth", "downlink_bandwidth"):
        (bandwidth,) = base[direction]
        assert 4 * 3_699_968 / bandwidth == pytest.approx(fast_round / 2, rel=1e-12)
    runs = run_configs(spec)
    assert {label for label, _, _ in runs} == {
        "heloco",
        "heloco_overlap",
        "heloco_int8",
        "heloco_int8_overlap",
    }
    for label, _, values in runs:
        assert values.get("overlap", False) == label.endswith("_overlap")
        assert values.get("uplink_codec", "fp32") == ("int8" if "int8" in label else "fp32")
    assert base["budget_tokens"] == 256_000  # the CPU budget of docs/paper_reproduction.md


def test_delta_downlink_fp32_follows_params_and_int8_shortens_the_reply(tiny_shards, tmp_path):
    """downlink: delta with fp32 trains like downlink: params (the worker holds h + (θ − h), θ up
    to rounding; instantaneous links, so the 32 header bytes cannot reorder arrivals); with int8 the
    reply is ≈3.9× smaller, so on a link where the parameters take 1.5 s worker 0's second arrival
    comes earlier by 1.5 s less the int8 reply's time."""
    from heloco.codecs import make_codec

    common = dict(method="heloco", budget_tokens=3000)
    params = tmp_path / "params"
    run(config_from_dict(base_values(tiny_shards, params, **common)))
    fp32 = tmp_path / "fp32"
    run(config_from_dict(base_values(tiny_shards, fp32, downlink="delta", **common)))
    evals = [[r["val_loss/mean"] for r in read_metrics(d) if r["event"] == "eval"] for d in (params, fp32)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-4)
    bandwidth = message_bytes(tiny_shards, tmp_path / "m") / 1.5
    link = dict(uplink_bandwidth=[bandwidth], downlink_bandwidth=[bandwidth], **common)
    int8 = tmp_path / "int8"
    run(config_from_dict(base_values(tiny_shards, int8, downlink="delta", downlink_codec="int8", **link)))
    fast = [r["time"] for r in read_metrics(int8) if r["event"] == "arrival" and r["worker"] == 0]
    reply = make_codec("int8").max_nbytes(shapes_of_model(tiny_shards, tmp_path / "m")) / bandwidth
    assert fast[:2] == pytest.approx([4.5, 4.5 + reply + 3.0 + 1.5])
    evals = [r["val_loss/mean"] for r in read_metrics(int8) if r["event"] == "eval"]
    assert evals[-1] < evals[0]
