"""The candidates over MLA in the recipes: the server-policy fields, ``inner_optimizer: muon``, and
every label of recipes/configs/reproduction/candidates.yaml run end to end at a tiny budget."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from heloco.checkpoint import load_state, save_state
from recipes.analysis.compare import finished_matches, load_matrix, run_configs
from recipes.common import begin_round, make_inner_optimizer, set_inner_lr
from recipes.config import config_from_dict
from recipes.inner_optimizer import MuonAdamW, muon_split
from recipes.methods import METHOD_SPECS, build_aggregator
from recipes.model import build_model
from recipes.train import run
from tests.conftest import build_tiny_shards

REPO = Path(__file__).resolve().parent.parent
CANDIDATES = REPO / "recipes" / "configs" / "reproduction" / "candidates.yaml"
SPEEDS = [1.0, 1 / 6, 1 / 6, 1 / 6, 1 / 6]


def values(**overrides) -> dict:
    return {"num_workers": 5, "worker_speeds": SPEEDS, "method": "mla", **overrides}


# ---------------------------------------------------------------------------- server policies


def test_policy_fields_switch_on_over_mla():
    masters = [torch.zeros(3)]
    plain = build_aggregator(config_from_dict(values()), masters).policies
    assert (plain.worker_weighting, plain.memory, plain.drift_compensation) == (None, None, 0.0)
    rate = build_aggregator(config_from_dict(values(worker_weighting="rate")), masters)
    assert rate.policies.worker_weighting == "rate" and rate.policies.worker_rates is None
    assert rate.arrival_weight == pytest.approx(5**-0.5) and type(rate.outer_optimizer).__name__ == "HeLoCo"
    # declared: speed / H arrivals per virtual second; with DyLU the slow workers' H is shorter
    declared = build_aggregator(config_from_dict(values(worker_weighting="declared_rate")), masters)
    assert declared.policies.worker_rates == pytest.approx([1 / 20] + [1 / 120] * 4)
    dylu = config_from_dict(values(worker_weighting="declared_rate", dylu=True, method="async_dn"))
    assert build_aggregator(dylu, masters).policies.worker_rates == pytest.approx(
        [1 / 20] + [(1 / 6) / 3] * 4
    )
    both = build_aggregator(
        config_from_dict(
            values(
                server_memory="latest",
                drift_compensation=0.3,
                drift_normalization="max",
                worker_weighting="rate",
                worker_weighting_power=0.5,
            )
        ),
        masters,
    ).policies
    assert (both.memory, both.drift_compensation, both.drift_normalization) == ("latest", 0.3, "max")
    assert both.worker_weighting_power == 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"worker_weighting": "speed"},
            r"worker_weighting must be one of none, rate, declared_rate; got 'speed'",
        ),
        ({"worker_weighting_power": -1.0}, r"worker_weighting_power must be a finite number >= 0, got -1.0"),
        ({"server_memory": "all"}, r"server_memory must be one of none, latest; got 'all'"),
        (
            {"server_memory": "latest", "method": "sync"},
            r"server_memory 'latest' needs an asynchronous method",
        ),
        ({"drift_compensation": math.inf}, r"drift_compensation must be a finite number >= 0, got inf"),
        ({"drift_normalization": "mean"}, r"drift_normalization must be one of none, max; got 'mean'"),
        ({"inner_optimizer": "sgd"}, r"inner_optimizer must be one of adamw, muon; got 'sgd'"),
        ({"muon_momentum": 1.0}, r"muon_momentum must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_values_name_the_field_and_the_accepted_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(values(**overrides))


def test_a_finished_run_from_before_the_new_fields_is_still_reused(tmp_path):
    run_values = values(output_dir=str(tmp_path))
    config = config_from_dict(run_values).to_dict()
    for new in ("worker_weighting", "server_memory", "drift_compensation", "inner_optimizer"):
        del config[new]  # not written by the code of the time
    summary = {"outer_lr": 0.7, "config": config}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert finished_matches(tmp_path, run_values)
    with pytest.raises(FileExistsError, match="server_memory"):
        finished_matches(tmp_path, {**run_values, "server_memory": "latest"})


# ---------------------------------------------------------------------------- inner_optimizer: muon


def gpt2():
    """The paper's GPT-2 shape at a tiny vocabulary: 8 blocks of width 128, untied head."""
    return build_model("paper", vocab_size=64, max_positions=16, eos_token_id=None, seed=0)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = gpt2()
    names = {id(p): n for n, p in model.named_parameters()}
    matrices, others = muon_split(model)
    hidden = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    assert sorted(names[id(p)] for p in matrices) == sorted(
        f"transformer.h.{i}.{h}" for i in range(8) for h in hidden
    )
    rest = {names[id(p)] for p in others}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} <= rest
    assert all(names[id(p)] in rest for p in model.parameters() if p.ndim != 2)
    assert len(matrices) + len(others) == len(list(model.parameters()))
    # a Llama preset: embeddings and head to AdamW, the projections to Muon
    llama = build_model("tiny", vocab_size=64, max_positions=16, eos_token_id=None)
    llama_names = {id(p): n for n, p in llama.named_parameters()}
    m, o = muon_split(llama)
    assert {llama_names[id(p)] for p in o} >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert all("proj" in llama_names[id(p)] for p in m) and len(m) == 4 * 7


def test_muon_inner_optimizer_is_built_from_the_config_and_trains():
    config = config_from_dict(values(inner_optimizer="muon", inner_lr=3e-3, fused_adamw=True))
    model = gpt2()
    opt = make_inner_optimizer(config, model)
    assert isinstance(opt, MuonAdamW)
    muon, adamw = opt.param_groups
    matrices, others = muon_split(model)
    assert muon["params"] == matrices and adamw["params"] == others
    assert (muon["adjust_lr_fn"], muon["momentum"], muon["weight_decay"]) == ("match_rms_adamw", 0.95, 0.1)
    assert (adamw["betas"], adamw["weight_decay"], adamw["fused"]) == ((0.9, 0.95), 0.1, True)
    assert muon["lr"] == adamw["lr"] == 3e-3
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses
    assert all("momentum_buffer" in opt.state[p] for p in matrices)
    assert all("exp_avg" in opt.state[p] for p in others)


def test_muon_schedule_reset_and_state_dict_round_trip(tmp_path):
    config = config_from_dict(
        values(
            inner_optimizer="muon",
            reset_inner_optimizer=True,
            lr_schedule="worker_cosine",
            cosine_steps=200,
            min_lr_ratio=0.0,
        )
    )
    model = gpt2()
    opt = make_inner_optimizer(config, model)
    set_inner_lr(config, opt, progress=0.0, worker_step=100)  # half-way down the cosine: lr / 2
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3])
    batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

    def one_step(m, o):
        m(input_ids=batch, labels=batch).loss.backward()
        o.step()
        o.zero_grad(set_to_none=True)

    one_step(model, opt)
    # the state of both optimizers, through a checkpoint file, into a fresh copy (the warm-start path)
    save_state(tmp_path, "inner", opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = make_inner_optimizer(config, twin, warm_state=load_state(tmp_path, "inner"))
    assert isinstance(twin_opt.param_groups[0]["ns_coefficients"], tuple)
    assert len(twin_opt.state_dict()["state"]) == len(list(model.parameters()))
    assert (
        twin_opt.parts[0].state is twin_opt.state
        and twin_opt.parts[1].param_groups[0] is twin_opt.param_groups[1]
    )
    one_step(model, opt)
    one_step(twin, twin_opt)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    # reset_inner_optimizer: both parts start the round from nothing
    begin_round(config, opt)
    assert len(opt.state) == 0 and all(len(part.state) == 0 for part in opt.parts)
    one_step(model, opt)
    assert len(opt.state) == len(list(model.parameters()))


# ---------------------------------------------------------------------------- candidates.yaml


def test_candidates_yaml_is_the_moderate_cell_at_the_cpu_budget_on_the_dev_seed():
    spec = load_matrix(CANDIDATES)
    base = spec["base"]
    assert base["budget_tokens"] == 256_000 and base["model_size"] == "paper"
    assert base["worker_speeds"] == pytest.approx(SPEEDS) and spec["seeds"] == [100]
    assert spec["reference"] == "mla" and "mla" in spec["methods"]
    labels = list(spec["methods"])
    # each label names its outer method first: mla+..., or async_dn+... (tempered DyLU over DN)
    assert all(label.split("+")[0] == spec["methods"][label]["method"] for label in labels)
    assert {spec["methods"][label]["method"] for label in labels} == {"mla", "async_dn"} and len(labels) >= 4
    assert not set(labels) & {"sync", "heloco", "async_nesterov"}
    assert set(METHOD_SPECS) == {
        "sync",
        "async_nesterov",
        "mla",
        "heloco",
        "async",
        "async_dn",
        "lookahead",
        "async_ema",
        "heloco_tiny",
        "heloco_project",
        "heloco_dylu",
    }  # fmt: skip  (heloco_dylu: registered from candidates_past_dylu.yaml, see its test below)
    assert len(run_configs(spec)) == len(labels)


@pytest.fixture(scope="module")
def five_languages(tmp_path_factory) -> Path:
    """Five workers, one (synthetic) language each."""
    return build_tiny_shards(tmp_path_factory.mktemp("candidates"), num_workers=5, p=1.0)


@pytest.mark.parametrize(
    "label",
    [  # one in the default suite; every candidate with -m slow
        label if label == "mla+memory" else pytest.param(label, marks=pytest.mark.slow)
        for label in load_matrix(CANDIDATES)["methods"]
    ],
)
def test_each_candidate_runs_and_its_loss_falls(label, five_languages, tmp_path):
    spec = load_matrix(CANDIDATES)
    spec["output_dir"] = str(tmp_path)
    ((_, _, run_values),) = [r for r in run_configs(spec) if r[0] == label]
    run_values.update(
        data_dir=str(five_languages),
        model_size="tiny",
        inner_steps=5,
        inner_lr=3e-3 * run_values.get("inner_lr", 2e-4) / 2e-4,
        cosine_steps=100,
        budget_tokens=20 * 5 * 2 * 32,  # 20 arrivals of 5 steps of 2 × 32 tokens: every slow one twice
        eval_every=100,
        eval_sequences=4,
        progress=False,
    )
    summary = run(config_from_dict(run_values))
    out = Path(run_values["output_dir"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert evals[-1]["val_loss/mean"] < evals[0]["val_loss/mean"] - 0.05, label
    arrivals = [r for r in records if r["event"] == "arrival"]
    assert summary["arrivals"] == len(arrivals) >= 20 and {r["worker"] for r in arrivals} == set(range(5))
    policy_stats = {
        "worker_weighting": "worker_weight",
        "server_memory": "memory_workers",
        "drift_compensation": "drift/relative_norm",
    }
    for field, stat in policy_stats.items():
        if field in spec["methods"][label]:
            assert all(stat in r for r in arrivals), (label, stat)


def test_heloco_dylu_is_heloco_with_dylu_rounds_bit_for_bit(five_languages, tmp_path):
    """The registered method is exactly ``method: heloco`` + ``dylu: true``: the same aggregator, the
    same rounds, the same run."""
    named = config_from_dict(values(method="heloco_dylu"))
    spelled = config_from_dict(values(method="heloco", dylu=True))
    assert named.uses_dylu and spelled.uses_dylu and not config_from_dict(values(method="heloco")).uses_dylu
    assert named.outer_lr == spelled.outer_lr == 0.7
    masters = [torch.zeros(3)]
    a, b = build_aggregator(named, masters), build_aggregator(spelled, masters)
    assert (
        (a.dispatch_mode, a.arrival_weight)
        == (b.dispatch_mode, b.arrival_weight)
        == ("lookahead", pytest.approx(5**-0.5))
    )
    assert a.outer_optimizer.defaults == b.outer_optimizer.defaults
    summaries = []
    for name, overrides in (
        ("named", {"method": "heloco_dylu"}),
        ("spelled", {"method": "heloco", "dylu": True}),
    ):
        summaries.append(
            run(
                config_from_dict(
                    values(
                        **overrides,
                        data_dir=str(five_languages),
                        output_dir=str(tmp_path / name),
                        model_size="tiny",
                        inner_steps=6,
                        inner_lr=3e-3,
                        budget_tokens=12 * 6 * 2 * 32,
                        eval_every=100,
                        eval_sequences=4,
                        progress=False,
                    )
                )
            )
        )
    # DyLU: H_w = floor(v_w / max v · H) = [6, 1, 1, 1, 1]
    assert summaries[0]["inner_steps"] == summaries[1]["inner_steps"] == [6, 1, 1, 1, 1]
    assert summaries[0]["final_val_loss"] == summaries[1]["final_val_loss"]
    assert summaries[0]["arrivals"] == summaries[1]["arrivals"] > 5
