"""End-to-end builds on small generated corpora: layout, metadata, load_shards, determinism, atomicity,
budgets, configuration errors, the CLI, ensure_sample_shards and the Hub card."""

from __future__ import annotations

import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_prep import build as build_module
from data_prep import load_shards
from data_prep.build import build_shards, ensure_sample_shards
from data_prep.config import load_config, parse_args
from data_prep.hub import dataset_card, hub_dataset_dict
from data_prep.synthetic import synthetic_documents, write_c4_layout

LANGS = ["de", "fr", "it"]


def _write_local_corpus(root: Path, docs_per_language: int = 120) -> Path:
    for lang in LANGS:
        (root / lang).mkdir(parents=True)
        with gzip.open(root / lang / "docs.json.gz", "wt") as f:
            for text in synthetic_documents(lang, docs_per_language, seed=1):
                f.write(json.dumps({"text": text}) + "\n")
    return root


def _config(tmp_path: Path, corpus: Path, **overrides):
    values = {
        "output_dir": str(tmp_path / "shards"),
        "source": "local",
        "local_path": str(corpus),
        "languages": LANGS,
        "vocab_size": 300,
        "seq_len": 32,
        "num_workers": 4,
        "partition": "dominant",
        "p": 0.8,
        "validation_fraction": 0.1,
        "seed": 0,
    }
    return load_config(**(values | overrides))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_local_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("build")
    return build_shards(_config(tmp, corpus))


def test_layout_metadata_and_load_shards(built, corpus):
    train, validation, meta = load_shards(built, num_workers=4)
    assert sorted(train) == [f"worker_{k}" for k in range(4)]
    assert sorted(validation) == LANGS
    for ds in [*train.values(), *validation.values()]:
        assert ds.column_names == ["input_ids"]
        assert {len(row) for row in ds["input_ids"]} == {32}
    assert meta["heloco_data_version"] == 1
    assert (
        meta["languages"] == LANGS
        and meta["num_workers"] == 4
        and meta["seq_len"] == 32
        and meta["seed"] == 0
    )
    assert (
        meta["partition"]["scheme"] == "dominant"
        and meta["partition"]["p"] == 0.8
        and "alpha" in meta["partition"]
    )
    assert meta["source"]["kind"] == "local"
    for k in range(4):
        name = f"worker_{k}"
        assert meta["sequences_per_worker"][name] == len(train[name])
        assert sum(meta["tokens_per_worker"][name].values()) == 32 * len(train[name])
        # dominant language k mod 3 gets the largest share of every worker
        counts = meta["tokens_per_worker"][name]
        assert max(counts, key=counts.get) == LANGS[k % 3]
    for lang in LANGS:
        assert meta["validation_tokens"][lang] == 32 * len(validation[lang])
    # every training document is used once: only each worker's last partial row is dropped
    used = sum(sum(c.values()) for c in meta["tokens_per_worker"].values())
    assert (
        sum(meta["source"]["train_tokens"].values()) - 4 * 32
        < used
        <= sum(meta["source"]["train_tokens"].values())
    )
    tokenizer = AutoTokenizer.from_pretrained(Path(built) / "tokenizer")
    assert meta["tokenizer"] == str(Path(built) / "tokenizer")
    assert meta["tokenizer_path"] == str(Path(built) / "tokenizer")
    assert meta["vocab_size"] == len(tokenizer) and meta["eos_token_id"] == tokenizer.eos_token_id
    # decoding a worker's rows gives whole input documents between EOS tokens
    documents = {t for lang in LANGS for t in synthetic_documents(lang, 120, seed=1)}
    stream = tokenizer.decode(np.concatenate(train["worker_0"]["input_ids"]).tolist())
    inner = stream.split(tokenizer.eos_token)[1:-1]
    assert len(inner) > 5 and all(piece in documents for piece in inner)


def test_same_seed_same_shards_other_seed_differs(built, corpus, tmp_path):
    again = build_shards(_config(tmp_path / "a", corpus))
    other = build_shards(_config(tmp_path / "b", corpus, seed=1))
    first, val_first, _ = load_shards(built)
    second, val_second, _ = load_shards(again)
    third, _, _ = load_shards(other)
    for name in first:
        assert first[name]["input_ids"] == second[name]["input_ids"]
    for lang in LANGS:
        assert val_first[lang]["input_ids"] == val_second[lang]["input_ids"]
    assert any(first[name]["input_ids"] != third[name]["input_ids"] for name in first)


def test_existing_output_is_kept_without_overwrite_and_interrupted_build_leaves_nothing(
    corpus, tmp_path, monkeypatch
):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass --overwrite"):
        build_shards(_config(tmp_path, corpus))

    def crash(directory, *args, **kwargs):
        (directory / "train").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "save_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        build_shards(_config(tmp_path, corpus, overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temporary directory left
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old output is untouched
    monkeypatch.undo()
    build_shards(_config(tmp_path, corpus, overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "metadata.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_load_shards_errors(built, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"no shards at .*nowhere.*python -m data_prep\.build --config"
    ):
        load_shards(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a complete shard directory \(metadata\.json missing\)"):
        load_shards(tmp_path / "half")
    with pytest.raises(ValueError, match=r"num_workers=3 was requested .* built for K=4 workers"):
        load_shards(built, num_workers=3)


def test_budgets_and_k_different_from_l(corpus, tmp_path):
    out = build_shards(
        _config(tmp_path, corpus, max_documents={"de": 30}, max_tokens=2000, num_workers=5, p=1.0, seq_len=16)
    )
    _, _, meta = load_shards(out)
    assert meta["source"]["train_documents"]["de"] <= 30
    tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer_path"])
    longest = max(
        len(tokenizer(t)["input_ids"]) + 1 for x in LANGS for t in synthetic_documents(x, 120, seed=1)
    )
    for lang in LANGS:
        assert meta["source"]["train_tokens"][lang] >= (2000 if lang != "de" else 0)
        assert meta["source"]["train_tokens"][lang] < 2000 + longest  # stops after the document reaching it
    for k in range(5):  # p = 1 with K=5 > L=3: worker k reads only language k mod 3
        counts = meta["tokens_per_worker"][f"worker_{k}"]
        assert [lang for lang, n in counts.items() if n > 0] == [LANGS[k % 3]]


def test_c4_source_and_pretrained_tokenizer(built, tmp_path):
    docs = {lang: synthetic_documents(lang, 80, seed=2) for lang in LANGS}
    write_c4_layout(tmp_path / "c4", docs, num_files=2)
    out = build_shards(
        load_config(
            output_dir=str(tmp_path / "out"),
            source="c4",
            c4_path=str(tmp_path / "c4"),
            c4_num_files=1,
            languages=LANGS,
            tokenizer=str(Path(built) / "tokenizer"),
            partition="iid",
            num_workers=2,
            seq_len=16,
            validation_fraction=0.2,
        )
    )
    _, _, meta = load_shards(out)
    assert meta["tokenizer"] == str(Path(built) / "tokenizer")
    assert meta["source"]["data_files"]["de"] == ["multilingual/c4-de.tfrecord-00000-of-*.json.gz"]
    # num_files=1 reads the first of the two files only: 40 documents per language
    for lang in LANGS:
        assert meta["source"]["train_documents"][lang] + meta["source"]["validation_documents"][lang] == 40


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            {"source": "sample", "languages": ["de", "pt"]},
            ValueError,
            r"unknown language 'pt' .* accepted: \['de'",
        ),
        ({"p": 1.5}, ValueError, r"p must be in \[0, 1\]"),
        ({"partition": "dirichlet", "alpha": 0}, ValueError, "alpha must be > 0"),
        ({"num_workers": 0}, ValueError, "num_workers must be an integer >= 1"),
        ({"partition": "skewed"}, ValueError, "partition must be one of"),
        ({"seq_len": 1}, ValueError, "seq_len must be an integer >= 2"),
        ({"validation_fraction": 0}, ValueError, r"validation_fraction must be in \(0, 1\)"),
        ({"max_tokens": -5}, ValueError, "max_tokens must be null, an integer >= 1"),
        ({"max_documents": {"pt": 3}}, ValueError, r"max_documents names languages \['pt'\]"),
        ({"source": "hub"}, ValueError, r"source must be one of \('sample', 'c4', 'local'\)"),
        ({"colour": "red"}, ValueError, r"unknown config fields \['colour'\]"),
    ],
)
def test_config_errors_name_the_field(corpus, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        _config(tmp_path, corpus, **overrides)


def test_data_errors(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="no directory for language 'es'"):
        build_shards(_config(tmp_path, corpus, languages=["de", "es"]))
    empty = tmp_path / "blank"
    for lang in LANGS:
        (empty / lang).mkdir(parents=True)
        (empty / lang / "a.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(ValueError, match=r"corpus is empty after filtering"):
        build_shards(_config(tmp_path, empty, tokenizer=None))
    with pytest.raises(
        ValueError,
        match=r"validation for language '(de|fr|it)' has \d+ tokens, fewer than one sequence .* raise validation_fraction",
    ):
        build_shards(_config(tmp_path, corpus, validation_fraction=0.001))
    assert not (tmp_path / "shards").exists()


def test_cli_flags_override_yaml(tmp_path):
    config = parse_args(
        [
            *("--config", "data_prep/configs/sample.yaml", "--num_workers", "3", "--languages", "de,fr"),
            *("--overwrite", "--output_dir", "007", "--max_tokens", "{de: 1000}"),
        ]
    )
    assert config.num_workers == 3 and config.languages == ["de", "fr"] and config.overwrite is True
    assert config.output_dir == "007" and config.max_tokens == {"de": 1000}
    assert (
        config.partition == "dominant"
        and config.p == 0.8
        and config.seq_len == 128
        and config.vocab_size == 8192
    )
    c4 = load_config("data_prep/configs/c4.yaml")
    assert c4.source == "c4" and c4.c4_path == "allenai/c4"


def test_ensure_sample_shards_builds_once(corpus, tmp_path, monkeypatch):
    overrides = {"source": "local", "local_path": str(corpus), "languages": LANGS, "vocab_size": 300}
    overrides |= {"seq_len": 32, "num_workers": 3, "validation_fraction": 0.1}
    out = ensure_sample_shards(tmp_path / "demo", **overrides)
    assert load_shards(out, num_workers=3)[2]["build_config"]["num_workers"] == 3

    def no_rebuild(config):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(build_module, "build_shards", no_rebuild)
    assert ensure_sample_shards(tmp_path / "demo", **overrides) == out
    with pytest.raises(
        ValueError, match=r"built with other parameters \(num_workers: built 3, requested 4\)"
    ):
        ensure_sample_shards(tmp_path / "demo", **(overrides | {"num_workers": 4}))


def test_ensure_sample_shards_started_together_builds_once(corpus, tmp_path, monkeypatch):
    """Two compare.py lanes launched at once used to build into the same folder and crash."""
    overrides = {"source": "local", "local_path": str(corpus), "languages": LANGS, "vocab_size": 300}
    overrides |= {"seq_len": 32, "num_workers": 3, "validation_fraction": 0.1}
    builds = []
    real_build = build_module.build_shards

    def counted_build(config):
        builds.append(config.output_dir)
        time.sleep(0.2)  # a slow build: the other caller arrives while it runs
        return real_build(config)

    monkeypatch.setattr(build_module, "build_shards", counted_build)
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: ensure_sample_shards(tmp_path / "demo", **overrides), range(2)))
    assert outs[0] == outs[1] == tmp_path / "demo"
    assert len(builds) == 1
    assert load_shards(outs[0], num_workers=3)[2]["build_config"]["num_workers"] == 3


def test_hub_card_and_splits(built):
    train, validation, meta = load_shards(built)
    merged = hub_dataset_dict(train, validation)
    assert sorted(merged) == sorted(
        [f"train_worker_{k}" for k in range(4)] + [f"validation_{x}" for x in LANGS]
    )
    card = dataset_card(meta, "someone/shards")
    assert card.data.language == LANGS and card.data.license == "other"
    text = str(card)
    assert text.startswith("---\n") and "heloco" in text
    counts = meta["tokens_per_worker"]["worker_2"]
    total = sum(counts.values())
    row = " | ".join(f"{counts[x]:,} ({100 * counts[x] / total:.0f}%)" for x in LANGS)
    assert f"| worker_2 | {row} | {total:,} |" in text
    assert "| partition | dominant |" in text and "| p | 0.8 |" in text
    assert str(built) not in text  # no local paths in a public card


def test_push_to_hub_uses_the_standard_api_and_never_prints_the_token(built, monkeypatch, capsys):
    """No Hub here: record the huggingface_hub / datasets calls instead of sending them."""
    from datasets import DatasetDict
    from huggingface_hub import DatasetCard, HfApi

    from data_prep.hub import push_shards_to_hub

    calls = []
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or "u"
    )
    monkeypatch.setattr(
        DatasetCard, "push_to_hub", lambda self, repo_id, **kw: calls.append(("card", str(self), kw))
    )
    monkeypatch.setattr(
        DatasetDict, "push_to_hub", lambda self, repo_id, **kw: calls.append(("data", sorted(self), kw))
    )
    monkeypatch.setattr(
        HfApi, "upload_folder", lambda self, **kw: calls.append(("folder", kw["path_in_repo"], kw))
    )
    monkeypatch.setattr(
        HfApi, "upload_file", lambda self, **kw: calls.append(("file", kw["path_in_repo"], kw))
    )
    push_shards_to_hub(built, "me/shards", private=True, token="hf_secret_token")
    assert [c[0] for c in calls] == ["create", "card", "data", "folder", "file"]  # card before data
    assert calls[0][2]["repo_type"] == "dataset" and calls[0][2]["private"] is True
    assert calls[2][1] == sorted([f"train_worker_{k}" for k in range(4)] + [f"validation_{x}" for x in LANGS])
    assert calls[2][2]["token"] == "hf_secret_token"
    uploaded = json.loads(calls[4][2]["path_or_fileobj"])
    assert uploaded["num_workers"] == 4 and "tokenizer_path" not in uploaded
    assert str(built) not in json.dumps(uploaded["tokenizer"])
    out = capsys.readouterr()
    assert "hf_secret_token" not in out.out + out.err


def test_cli_prints_one_line_errors(capsys, tmp_path):
    from recipes.cli import run_cli

    with pytest.raises(SystemExit) as exit_:
        run_cli(build_module.main, ["--config", "data_prep/configs/sample.yaml", "--p", "2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: p must be in [0, 1] for partition 'dominant', got 2\n"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SystemExit):
        run_cli(build_module.main, ["--config", str(empty)])
    assert capsys.readouterr().err.startswith(f"error: config file '{empty}' is empty")


def test_the_sample_caches_follow_heloco_cache_dir(monkeypatch, tmp_path):
    from data_prep.config import CONFIG_DIR, load_config

    monkeypatch.delenv("HELOCO_CACHE_DIR", raising=False)
    home = load_config(CONFIG_DIR / "sample.yaml")
    assert home.sample_cache_dir == "~/.cache/heloco/debian"
    assert home.corpus_dir == Path("~/.cache/heloco/sample_c4").expanduser()
    monkeypatch.setenv("HELOCO_CACHE_DIR", str(tmp_path / "cache"))
    moved = load_config(CONFIG_DIR / "sample.yaml")  # the demo's config follows the variable
    assert moved.sample_cache_dir == str(tmp_path / "cache" / "debian")
    assert moved.corpus_dir == tmp_path / "cache" / "sample_c4"
    assert moved.data_fields() == home.data_fields()  # where the cache is never changes the shards
