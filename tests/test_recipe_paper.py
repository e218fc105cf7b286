"""The paper's setting in the recipes: method registry, inner-loop options, metrics, and every
recipes/configs/paper/ YAML run end to end at a tiny budget."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from recipes.analysis.compare import load_matrix, run_configs
from recipes.common import begin_round, inner_lr_factor, make_inner_optimizer
from recipes.config import config_from_dict
from recipes.data import eval_record, evaluate_metrics
from recipes.methods import METHOD_SPECS, arrival_weight, build_aggregator, dispatch_mode, fields_not_read
from recipes.train import run
from tests.conftest import build_tiny_shards

REPO = Path(__file__).resolve().parent.parent
PAPER_YAMLS = sorted((REPO / "recipes" / "configs" / "paper").glob("*_*.yaml"))


def values(**overrides) -> dict:
    return {"num_workers": 5, "worker_speeds": [1.0, 1 / 6, 1 / 6, 1 / 6, 1 / 6], **overrides}


def test_paper_methods_as_the_authors_define_them():
    masters = [torch.zeros(3)]
    rho = 1 / math.sqrt(5)
    expected = {  # method: (optimizer class, lr, quorum, dispatch, ρ, corrects)
        "sync": (torch.optim.SGD, 0.7, 5, "plain", None, False),
        "async_nesterov": (torch.optim.SGD, 0.07, 1, "plain", rho, False),
        "mla": ("HeLoCo", 0.7, 1, "plain", rho, False),
        "heloco": ("HeLoCo", 0.7, 1, "lookahead", rho, True),
    }
    for method, (cls, lr, quorum, dispatch, weight, corrects) in expected.items():
        agg = build_aggregator(config_from_dict(values(method=method)), masters)
        opt = agg.outer_optimizer
        assert type(opt).__name__ == (cls if isinstance(cls, str) else cls.__name__)
        group = opt.param_groups[0]
        assert (group["lr"], agg.quorum, agg.dispatch_mode, agg.arrival_weight) == (
            lr,
            quorum,
            dispatch,
            weight,
        )
        if cls is torch.optim.SGD:
            assert group["nesterov"] and group["momentum"] == 0.9
        else:
            assert (group["variant"] != "none") == corrects
        assert METHOD_SPECS[method].paper
    heloco = build_aggregator(config_from_dict(values(method="heloco")), masters).outer_optimizer.defaults
    assert (heloco["keep_threshold"], heloco["kappa"], heloco["reorient_schedule"]) == (
        0.2,
        3.0,
        "normalized",
    )
    assert heloco["correct_fresh"] and heloco["weight_before_correction"]


def test_ablation_overrides_and_our_preset():
    off = config_from_dict(
        values(method="heloco", dispatch="plain", arrival_weight=1.0, reorient_schedule="printed")
    )
    assert (dispatch_mode(off), arrival_weight(off)) == ("plain", 1.0)
    assert build_aggregator(off, [torch.zeros(2)]).outer_optimizer.defaults["reorient_schedule"] == "printed"
    mla_lookahead = config_from_dict(values(method="mla", dispatch="lookahead"))
    assert dispatch_mode(mla_lookahead) == "lookahead"
    tiny = build_aggregator(config_from_dict(values(method="heloco_tiny")), [torch.zeros(2)])
    d = tiny.outer_optimizer.defaults
    assert (d["lr"], d["keep_threshold"], d["correct_fresh"], tiny.arrival_weight) == (
        0.175,
        0.0,
        False,
        None,
    )
    # every correction knob is read by heloco, none by mla; ρ and dispatch are read by every method
    assert not {"keep_threshold", "cos_bad", "reorient_schedule"} & fields_not_read("heloco")
    assert {"keep_threshold", "cos_bad", "correct_fresh"} <= fields_not_read("mla")
    with pytest.raises(ValueError, match="dispatch must be one of"):
        config_from_dict(values(method="heloco", dispatch="ahead"))
    with pytest.raises(ValueError, match="reorient_schedule must be one of"):
        config_from_dict(values(method="heloco", reorient_schedule="linear"))
    # ours: the correction meets the momentum only where Δ is non-zero (for sparse codecs)
    support = config_from_dict(values(method="heloco", correction_support="nonzero"))
    assert (
        build_aggregator(support, [torch.zeros(2)]).outer_optimizer.defaults["correction_support"]
        == "nonzero"
    )
    assert "correction_support" not in fields_not_read("heloco") and "correction_support" in fields_not_read(
        "mla"
    )
    with pytest.raises(ValueError, match="correction_support must be one of all, nonzero; got 'sparse'"):
        config_from_dict(values(method="heloco", correction_support="sparse"))
    # ours: the momentum kept as the correction's reference only, the step plain SGD
    sgd_step = config_from_dict(values(method="heloco", outer_step_momentum=0.0))
    assert build_aggregator(sgd_step, [torch.zeros(2)]).outer_optimizer.defaults["step_momentum"] == 0.0
    assert build_aggregator(support, [torch.zeros(2)]).outer_optimizer.defaults["step_momentum"] is None
    assert "outer_step_momentum" in fields_not_read("async_nesterov") and "outer_step_momentum" not in (
        fields_not_read("mla")
    )
    with pytest.raises(ValueError, match=r"outer_step_momentum must be in \[0, 1\) or unset, got 1.0"):
        config_from_dict(values(method="heloco", outer_step_momentum=1.0))
    with pytest.raises(ValueError, match=r"outer_step_momentum is only read by HeLoCo's optimizer .*'sync'"):
        config_from_dict(values(method="sync", outer_step_momentum=0.0))


def test_worker_cosine_by_hand():
    # lr = floor + (1 − floor)·0.5·(1 + cos(π·s/T)), T = 200, floor 0.005; flat at the floor after T
    c = config_from_dict(values(lr_schedule="worker_cosine", cosine_steps=200, min_lr_ratio=0.005))
    assert inner_lr_factor(c, progress=0.9, worker_step=0) == 1.0
    assert inner_lr_factor(c, progress=0.0, worker_step=100) == pytest.approx(0.005 + 0.995 * 0.5)
    assert inner_lr_factor(c, progress=0.0, worker_step=200) == pytest.approx(0.005)
    assert inner_lr_factor(c, progress=0.0, worker_step=5000) == pytest.approx(0.005)


def test_worker_cosine_or_progress_follows_whichever_is_further_along():
    """x = max(worker_step / cosine_steps, progress): the fast worker keeps the paper's schedule, a
    slow one that makes few steps still reaches the floor at the run's end."""
    c = config_from_dict(
        values(lr_schedule="worker_cosine_or_progress", cosine_steps=200, min_lr_ratio=0.005)
    )
    assert inner_lr_factor(c, progress=0.0, worker_step=0) == 1.0
    # a slow worker at its step 50 (x 0.25) when the run is half done: x = 0.5
    assert inner_lr_factor(c, progress=0.5, worker_step=50) == pytest.approx(0.005 + 0.995 * 0.5)
    # the fast worker at its step 150 (x 0.75) when the run is half done: its own steps lead
    half = 0.5 * (1.0 + math.cos(math.pi * 0.75))
    assert inner_lr_factor(c, progress=0.5, worker_step=150) == pytest.approx(0.005 + 0.995 * half)
    # at the end of the run every worker is at the floor, whatever its steps
    assert inner_lr_factor(c, progress=1.0, worker_step=3) == pytest.approx(0.005)


def test_reset_inner_optimizer_starts_each_round_from_a_fresh_adamw():
    model = torch.nn.Linear(2, 1)
    config = config_from_dict(values(reset_inner_optimizer=True, fused_adamw=True))
    fresh = make_inner_optimizer(config, model)
    kept = make_inner_optimizer(config_from_dict(values()), torch.nn.Linear(2, 1))
    for opt, m in ((fresh, model), (kept, kept.param_groups[0]["params"])):
        params = m.parameters() if isinstance(m, torch.nn.Module) else m
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    begin_round(config, fresh)
    begin_round(config_from_dict(values()), kept)
    assert len(fresh.state) == 0 and len(kept.state) == 2
    # a re-created AdamW's first step moves every parameter by lr·sign(grad) (bias-corrected moments)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    fresh.step()
    for b, p in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), b * (1 - 2e-3 * 0.1) - 2e-3, rtol=1e-5, atol=1e-6)


def test_the_paper_model_names_its_loss_so_transformers_does_not_warn():
    """GPT2LMHeadModel's class name maps to no loss in transformers, which warned on every run
    ("`loss_type=None` ... unrecognized"); the model now says it is a causal LM, same loss."""
    from recipes.model import build_model

    model = build_model("paper", vocab_size=50, max_positions=8, eos_token_id=0)
    assert model.loss_type == "ForCausalLM"
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, by_hand)


def test_eval_metrics_by_hand():
    class Fixed(torch.nn.Module):
        """Predicts token 1 everywhere, with logits (0, ln 3) over a vocabulary of 2."""

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 2)
            logits[..., 1] = math.log(3.0)
            return type("Out", (), {"logits": logits})()

    # targets after the shift: "a" → [1, 1, 0], "b" → [0, 0, 0]; p(1) = 3/4, p(0) = 1/4
    validation = {"a": torch.tensor([[0, 1, 1, 0]]), "b": torch.tensor([[1, 0, 0, 0]])}
    losses, accuracies = evaluate_metrics(Fixed(), validation, 1, torch.device("cpu"), contextlib.nullcontext)
    la = (2 * -math.log(0.75) - math.log(0.25)) / 3
    lb = -math.log(0.25)
    assert losses == pytest.approx({"a": la, "b": lb, "mean": (la + lb) / 2})
    assert accuracies == pytest.approx({"a": 2 / 3, "b": 0.0, "mean": 1 / 3})
    record = eval_record(losses, accuracies)
    assert record["val_perplexity/mean"] == pytest.approx(math.exp((la + lb) / 2))
    assert record["val_accuracy/a"] == pytest.approx(2 / 3)


def test_extends_merges_base_and_methods(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        "name: parent\nseeds: [0, 1]\nbase: {batch_size: 1, inner_steps: 2}\n"
        "methods: {x: {method: sync}, y: {method: mla}}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "extends: parent.yaml\nname: child\nbase: {inner_steps: 3}\nmethods: {y: null, z: {method: heloco}}\n"
    )
    spec = load_matrix(tmp_path / "child.yaml")
    assert spec["base"] == {"batch_size": 1, "inner_steps": 3} and spec["seeds"] == [0, 1]
    assert list(spec["methods"]) == ["x", "z"] and spec["output_dir"] == "outputs/child"


@pytest.fixture(scope="module")
def paper_shards(tmp_path_factory):
    """Five workers, built on first use: one (synthetic) language each (``dominant``), or IID."""
    root = tmp_path_factory.mktemp("paper")
    built: dict[str, Path] = {}

    def shards(partition: str) -> Path:
        if partition not in built:
            options = {"p": 1.0} if partition == "dominant" else {"partition": partition}
            built[partition] = build_tiny_shards(root / partition, num_workers=5, **options)
        return built[partition]

    return shards


def test_every_paper_yaml_is_the_papers_setting():
    """All eight cells load and every run of each validates; only the paces and the data differ."""
    paces = {}
    for path in PAPER_YAMLS:
        spec = load_matrix(path)
        assert set(spec["methods"]) == {"sync", "async_nesterov", "mla", "heloco"}, path.stem
        assert spec["base"]["budget_tokens"] == 10_000 * 2 * 128 and spec["base"]["model_size"] == "paper"
        runs = run_configs(spec)  # every (method, seed) config validated
        assert len(runs) == 4 * len(spec["seeds"])
        paces[path.stem] = [round(1 / v, 3) for v in spec["base"]["worker_speeds"]]
        assert spec["base"]["sample_partition"] == ("iid" if path.stem.endswith("_iid") else "dominant")
    assert paces["moderate_noniid"] == [1.0, 6.0, 6.0, 6.0, 6.0]
    assert paces["extreme_iid"] == [1.0, 15.0, 15.0, 15.0, 15.0]


# One cell end to end in the default suite (the demo's); the other seven differ only in paces and data
# (checked above) and run with `make test-slow`.
END_TO_END_DEFAULT = "moderate_noniid"


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=() if p.stem == END_TO_END_DEFAULT else pytest.mark.slow) for p in PAPER_YAMLS],
    ids=[p.stem for p in PAPER_YAMLS],
)
def test_each_paper_yaml_runs_end_to_end(path, paper_shards, tmp_path):
    spec = load_matrix(path)
    assert set(spec["methods"]) == {"sync", "async_nesterov", "mla", "heloco"}
    assert spec["base"]["budget_tokens"] == 10_000 * 2 * 128 and spec["base"]["model_size"] == "paper"
    spec["seeds"] = [0]
    spec["output_dir"] = str(tmp_path)
    for label, _, run_values in run_configs(spec):
        run_values.update(
            data_dir=str(paper_shards(run_values["sample_partition"])),
            budget_tokens=2 * 5 * 20 * 2 * 32,  # two sync rounds of the 32-token fixture sequences
            eval_sequences=4,
            progress=False,
        )
        summary = run(config_from_dict(run_values))
        out = Path(run_values["output_dir"])
        evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
        assert evals[-1]["val_loss/mean"] < evals[0]["val_loss/mean"] - 0.01, label
        assert 0.0 <= evals[-1]["val_accuracy/mean"] <= 1.0 and "val_perplexity/mean" in evals[-1]
        assert (out / "summary.json").is_file() and (out / f"checkpoint-{summary['arrivals']}").is_dir()
