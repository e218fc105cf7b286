"""recipes/train.py --push_to_hub against a fake Hub: what arrives, and a run that survives no Hub."""

from __future__ import annotations

import hashlib
import json

import yaml

from recipes.config import config_from_dict
from recipes.train import run
from tests.fake_hub import FAKE_TOKEN, closed_port_url, point_clients_at
from tests.test_recipe_train import base_values


def test_checkpoints_arrive_with_a_model_card(tiny_shards, tmp_path, fake_hub):
    out = tmp_path / "pushed"
    values = base_values(
        tiny_shards,
        out,
        method="heloco",
        budget_tokens=2500,
        save_every=6,
        push_to_hub=True,
        hub_model_id="someone/heloco-tiny",
        hub_revision="run1",
    )
    summary = run(config_from_dict(values), command="recipes/train.py --config x.yaml")
    assert summary["hub_pushes"] and all(p["state"] in ("ok", "superseded") for p in summary["hub_pushes"])
    assert summary["hub_pushes"][-1]["state"] == "ok"
    files = fake_hub.files("someone/heloco-tiny", revision="run1")
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
        "loss.png",
    ):
        assert name in files, name
    checkpoint = out / f"checkpoint-{summary['arrivals']}"
    local = checkpoint / "model" / "model.safetensors"
    assert hashlib.sha256(files["model.safetensors"]).digest() == hashlib.sha256(local.read_bytes()).digest()
    # The card and plot went to the Hub only: the checkpoint folder is never written to.
    assert not (checkpoint / "loss.png").exists() and not (checkpoint / "model" / "README.md").exists()
    card = files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert "heloco" in metadata["tags"] and set(metadata["language"]) == {"de", "en", "es", "fr"}
    assert "| keep_threshold |" in card.replace("`", "") or "keep_threshold" in card
    final = summary["final_val_loss"]
    assert f"{final['de']:.4f}" in card
    assert "dominant-language (p=0.8)" in card
    assert "recipes/train.py --config x.yaml" in card
    assert FAKE_TOKEN not in card
    messages = [c.message for c in fake_hub.commits("someone/heloco-tiny", revision="run1")]
    assert any(f"checkpoint-{summary['arrivals']}" in m for m in messages)


def test_unreachable_hub_never_stops_training_or_touches_the_checkpoint(tiny_shards, tmp_path, monkeypatch):
    point_clients_at(monkeypatch, closed_port_url())
    out = tmp_path / "offline"
    values = base_values(
        tiny_shards, out, method="async", budget_tokens=2000, push_to_hub=True, hub_model_id="someone/nowhere"
    )
    summary = run(config_from_dict(values))
    assert summary["hub_pushes"][-1]["state"] == "failed"
    assert "ConnectError" in summary["hub_pushes"][-1]["error"]
    checkpoint = out / f"checkpoint-{summary['arrivals']}"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert json.loads((out / "summary.json").read_text())["tokens"] >= 2000
    assert FAKE_TOKEN not in (out / "metrics.jsonl").read_text()
