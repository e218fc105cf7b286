"""heloco.hub against an in-process fake Hub: what arrives, retries, an unreachable Hub, the model card."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from pathlib import Path

import pytest
from huggingface_hub import DatasetCard, ModelCard, constants

from heloco.hub import HubPusher, ModelCardInfo, redact_secrets, render_model_card
from tests.fake_hub import (
    FAKE_TOKEN,
    FakeHub,
    closed_port_url,
    fake_hub,  # noqa: F401  (pytest fixture)
    point_clients_at,
    use_lfs,
)

REPO = "heloco-org/tiny-llama"
UPLOAD_KINDS = {"create_repo", "create_branch", "repo_info", "preupload", "commit", "validate_yaml"}


# ---------------------------------------------------------------------------------------------------- helpers


def _card_info(**overrides) -> dict:
    info = {
        "model_name": "tiny-llama-heloco",
        "method": "HeLoCo",
        "hyperparameters": {"outer": {"lr": 0.7, "momentum": 0.9}, "inner_lr": 4e-4, "sync_every": 50},
        "num_workers": 2,
        "worker_speeds": [4.0, 1.0],
        "partition": "dominant-language p=0.8",
        "language_histogram": {0: {"de": 1000, "en": 250}, "1": {"en": 3000, "fr": 5}},
        "tokens_seen": 123456,
        "validation_loss": {"en": 3.0, "de": 2.5},
        "command": "accelerate launch recipes/train.py --config recipes/configs/tiny.yaml",
        "datasets": ["allenai/c4"],
        "loss_plot": "loss.png",
    }
    info.update(overrides)
    return info


def _tables(markdown: str) -> dict[tuple[str, ...], list[list[str]]]:
    """Markdown tables of ``markdown``: header cells → rows of cells."""
    tables: dict[tuple[str, ...], list[list[str]]] = {}
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            header = tuple(c.strip() for c in lines[i].strip("|").split("|"))
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            tables[header] = rows
        else:
            i += 1
    return tables


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A checkpoint folder shaped like save_pretrained output plus a loss plot."""
    folder = tmp_path / "checkpoint-100"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (folder / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(256))
    return folder


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------- card


def test_card_metadata_and_tables_hold_the_run(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    card = render_model_card(_card_info())
    assert isinstance(card, ModelCard)

    data = ModelCard(str(card)).data  # parse back what would be uploaded
    assert data.library_name == "transformers"
    assert data.license == "apache-2.0"
    assert data.pipeline_tag == "text-generation"
    assert data.tags == ["heloco", "diloco", "llama"]  # method "HeLoCo" slugs to the existing "heloco"
    assert data.datasets == ["allenai/c4"]
    assert data.language == ["de", "en", "fr"]  # histogram ∪ validation languages, sorted

    tables = _tables(card.text)
    assert tables[("hyperparameter", "value")] == [
        ["outer.lr", "0.7"],
        ["outer.momentum", "0.9"],
        ["inner_lr", "0.0004"],
        ["sync_every", "50"],
    ]
    assert tables[("worker", "speed (steps/s)", "relative speed")] == [["0", "4", "1.00"], ["1", "1", "0.25"]]
    assert tables[("worker", "de", "en", "fr", "total")] == [
        ["0", "1,000", "250", "0", "1,250"],
        ["1", "0", "3,000", "5", "3,005"],
        ["total", "1,000", "3,250", "5", "4,255"],
    ]
    # perplexity = e^loss: e^2.5 = 12.182..., e^3 = 20.085...
    assert tables[("language", "validation loss", "perplexity")] == [
        ["de", "2.5000", "12.18"],
        ["en", "3.0000", "20.09"],
    ]
    assert "Outer method: `HeLoCo`" in card.text
    assert "Workers (K): 2" in card.text
    assert "Tokens seen: 123,456" in card.text
    assert "`dominant-language p=0.8`" in card.text
    assert "![Training loss](loss.png)" in card.text
    assert "```bash\naccelerate launch recipes/train.py --config recipes/configs/tiny.yaml\n```" in card.text
    assert "arXiv 2311.08105" in card.text and "arXiv 2606.00271" in card.text


def test_card_method_tag_and_extra_tags_are_added_once():
    card = render_model_card(_card_info(method="Delayed Nesterov", tags=["llama", "tiny"], loss_plot=None))
    assert card.data.tags == ["heloco", "diloco", "delayed-nesterov", "llama", "tiny"]
    assert "![" not in card.text  # no plot given, no image embedded


def test_card_never_contains_a_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    other = "hf_" + "A1b2C3d4" * 4
    info = _card_info(
        command=f"python train.py --hub_token {FAKE_TOKEN} --other {other}",
        hyperparameters={"hub_token": FAKE_TOKEN},
    )
    text = str(render_model_card(info))
    assert FAKE_TOKEN not in text and other not in text
    assert "--hub_token *** --other hf_***" in text
    assert redact_secrets(f"x {FAKE_TOKEN} y") == "x *** y"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"worker_speeds": [1.0]}, "worker_speeds"),
        ({"worker_speeds": [1.0, 0.0]}, "worker_speeds"),
        ({"num_workers": 0}, "num_workers"),
        ({"language_histogram": {0: {"en": 1}}}, "language_histogram"),
        ({"language_histogram": {0: {"en": -1}, 1: {}}}, "language_histogram"),
        ({"tokens_seen": -5}, "tokens_seen"),
        ({"loss_plot": "../loss.png"}, "loss_plot"),
        ({"model_name": ""}, "model_name"),
        ({"datasets": "allenai/c4"}, "datasets"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_card_rejects_bad_info_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        render_model_card(_card_info(**override))


def test_card_info_dataclass_is_accepted_directly():
    info = ModelCardInfo(**_card_info(step=7))
    assert "Checkpoint at outer step 7" in render_model_card(info).text


def test_card_hyperparameters_may_be_a_config_dataclass():
    @dataclasses.dataclass
    class Inner:
        lr: float = 4e-4
        betas: tuple = (0.9, 0.95)

    @dataclasses.dataclass
    class Config:
        method: str = "heloco"
        inner: Inner = dataclasses.field(default_factory=Inner)

    card = render_model_card(_card_info(hyperparameters=Config()))
    assert _tables(card.text)[("hyperparameter", "value")] == [
        ["method", "heloco"],
        ["inner.lr", "0.0004"],
        ["inner.betas", "(0.9, 0.95)"],
    ]


# ---------------------------------------------------------------------------------------------------- pushing


@pytest.mark.parametrize("xet", [True, False], ids=["xet-pipeline", "legacy-commit"])
def test_push_uploads_checkpoint_and_card(fake_hub, checkpoint, monkeypatch, caplog, xet):  # noqa: F811
    # huggingface_hub takes a different code path when hf_xet is installed; both must work.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    caplog.set_level(logging.DEBUG)
    before = _tree_digest(checkpoint)
    card = render_model_card(_card_info(step=100))

    with HubPusher(REPO, retry_backoff=0.01) as pusher:
        index = pusher.push(checkpoint, "step 100: outer version 100", step=100, card=card)
        assert pusher.wait(timeout=60)
        record = pusher.history[index]

    assert record["ok"] and record["state"] == "ok" and record["attempts"] == 1 and record["error"] is None
    assert record["step"] == 100
    files = fake_hub.files(REPO)
    assert files == {**_local_files(checkpoint), "README.md": str(card).encode()}
    commits = fake_hub.commits(REPO)
    assert [c.message for c in commits] == ["initial commit", "step 100: outer version 100"]
    assert record["commit_url"].endswith(commits[-1].oid)

    uploaded_card = ModelCard(files["README.md"].decode())
    assert uploaded_card.data.tags == ["heloco", "diloco", "llama"]
    assert uploaded_card.data.language == ["de", "en", "fr"]
    assert ("language", "validation loss", "perplexity") in _tables(uploaded_card.text)

    # Authenticated with the token from HF_TOKEN, which never leaks into files or logs.
    upload_requests = [r for r in fake_hub.requests if r.kind in UPLOAD_KINDS]
    assert upload_requests and {r.authorization for r in upload_requests} == {f"Bearer {FAKE_TOKEN}"}
    assert all(FAKE_TOKEN.encode() not in content for content in files.values())
    assert FAKE_TOKEN not in caplog.text
    # The local checkpoint is untouched: same bytes, and no README.md written into it.
    assert _tree_digest(checkpoint) == before


def test_push_snapshots_the_folder_before_returning(fake_hub, checkpoint):  # noqa: F811
    original = _local_files(checkpoint)
    fake_hub.pause()  # the Hub does not answer until resume(): the upload cannot have happened yet
    with HubPusher(REPO, retry_backoff=0.01) as pusher:
        index = pusher.push(checkpoint, "step 1")
        assert pusher.history[index]["state"] in ("queued", "running")  # push returned without the Hub
        # The trainer rotates its checkpoint right away: overwrite one file, delete another.
        (checkpoint / "model.safetensors").write_bytes(b"overwritten")
        (checkpoint / "config.json").unlink()
        fake_hub.resume()
        assert pusher.wait(timeout=60)
        assert pusher.history[index]["ok"]
    assert fake_hub.files(REPO) == original


@pytest.mark.parametrize("kind", ["create_repo", "create_branch", "commit"])
def test_one_server_error_is_retried(fake_hub, checkpoint, monkeypatch, caplog, kind):  # noqa: F811
    # The commit POST is only retried by us on the legacy path (the xet pipeline retries it itself).
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    fake_hub.fail_next(kind)
    with HubPusher(REPO, revision="run-1", retry_backoff=0.01) as pusher:
        index = pusher.push(checkpoint, "step 2")
        assert pusher.wait(timeout=60)
        record = pusher.history[index]
    assert record["ok"] and record["attempts"] == 2 and record["error"] is None
    assert next(r.status for r in fake_hub.requests_of(kind)) == 500
    assert fake_hub.files(REPO, revision="run-1") == _local_files(checkpoint)
    assert any("failed (attempt 1/4)" in m and "500" in m for m in caplog.messages)
    assert FAKE_TOKEN not in caplog.text


def test_gives_up_after_the_last_retry_without_leaking_the_token(monkeypatch, checkpoint, caplog):
    hub = FakeHub(echo_authorization_in_errors=True)  # server errors quote the Authorization header
    try:
        point_clients_at(monkeypatch, hub.url)
        hub.fail_next("create_repo", times=10)
        before = _tree_digest(checkpoint)
        with HubPusher(REPO, max_retries=2, retry_backoff=0.01) as pusher:
            index = pusher.push(checkpoint, "step 3")
            assert pusher.wait(timeout=60)
            record = pusher.history[index]
            assert pusher.status["failed"] == 1 and pusher.status["last_ok"] is None
    finally:
        hub.close()
    assert record["state"] == "failed" and not record["ok"] and record["attempts"] == 3
    assert len(hub.requests_of("create_repo")) == 3
    # The server did send the token back; it was scrubbed everywhere we report it.
    assert "Authorization: Bearer ***" in record["error"]
    assert FAKE_TOKEN not in record["error"] and FAKE_TOKEN not in caplog.text
    assert any(
        r.levelno == logging.ERROR and "gave up after 3 attempt(s)" in r.getMessage() for r in caplog.records
    )
    assert _tree_digest(checkpoint) == before


def test_unreachable_hub_is_logged_and_never_raises(monkeypatch, checkpoint, caplog):
    point_clients_at(monkeypatch, closed_port_url())
    before = _tree_digest(checkpoint)
    with HubPusher(REPO, max_retries=1, retry_backoff=0.01) as pusher:
        index = pusher.push(checkpoint, "step 4", step=4)
        assert pusher.wait(timeout=60)
        record = pusher.history[index]
    assert record["state"] == "failed" and record["attempts"] == 2
    assert "ConnectError" in record["error"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("'step 4' gave up after 2 attempt(s)" in m for m in errors)
    assert FAKE_TOKEN not in caplog.text
    assert _tree_digest(checkpoint) == before


def test_revision_and_private_reach_the_server(fake_hub, checkpoint):  # noqa: F811
    with HubPusher(REPO, private=True, revision="run-7", retry_backoff=0.01) as pusher:
        pusher.push(checkpoint, "step 5")
        assert pusher.wait(timeout=60)
    repo = fake_hub.repo(REPO)
    assert repo.private is True
    assert set(repo.branches) == {"main", "run-7"}
    assert fake_hub.files(REPO, revision="run-7") == _local_files(checkpoint)
    assert fake_hub.files(REPO, revision="main") == {}  # main keeps only the initial commit
    assert [c.message for c in fake_hub.commits(REPO, revision="run-7")] == ["initial commit", "step 5"]


def test_public_is_the_default_visibility(fake_hub, checkpoint):  # noqa: F811
    with HubPusher(REPO, retry_backoff=0.01) as pusher:
        pusher.push(checkpoint, "step 1")
    assert fake_hub.repo(REPO).private is False


@pytest.mark.parametrize("supersede", [True, False])
def test_newer_push_supersedes_queued_ones(fake_hub, tmp_path, supersede):  # noqa: F811
    folders = []
    for step in (1, 2, 3):
        folder = tmp_path / f"ckpt-{step}"
        folder.mkdir()
        (folder / "step.txt").write_text(str(step))
        folders.append(folder)
    fake_hub.pause()
    with HubPusher(REPO, retry_backoff=0.01, supersede=supersede) as pusher:
        pusher.push(folders[0], "step 1")
        assert fake_hub.wait_until_blocked()  # push 1 is in flight
        pusher.push(folders[1], "step 2")  # queued behind it ...
        pusher.push(folders[2], "step 3")  # ... and, with supersede, replaced by this one
        fake_hub.resume()
        assert pusher.wait(timeout=60)
        states = [r["state"] for r in pusher.history]
    messages = [c.message for c in fake_hub.commits(REPO)]
    if supersede:
        assert states == ["ok", "superseded", "ok"]
        assert messages == ["initial commit", "step 1", "step 3"]
    else:
        assert states == ["ok", "ok", "ok"]
        assert messages == ["initial commit", "step 1", "step 2", "step 3"]
    assert fake_hub.files(REPO) == {"step.txt": b"3"}


def test_extra_files_and_patterns_shape_the_snapshot(fake_hub, checkpoint, tmp_path, caplog):  # noqa: F811
    plot = tmp_path / "elsewhere.png"
    plot.write_bytes(b"\x89PNG plot")
    (checkpoint / "optimizer.pt").write_bytes(b"huge optimizer state")
    card = render_model_card(_card_info(loss_plot="plots/loss.png"))
    with HubPusher(REPO, retry_backoff=0.01) as pusher:
        pusher.push(
            checkpoint, "step 8", card=card, extra_files={"plots/loss.png": plot}, ignore_patterns=["*.pt"]
        )
    files = fake_hub.files(REPO)
    assert "optimizer.pt" not in files and (checkpoint / "optimizer.pt").exists()
    assert files["plots/loss.png"] == b"\x89PNG plot"
    assert not any("embeds" in m for m in caplog.messages)


def test_card_image_missing_from_the_folder_is_warned(fake_hub, checkpoint, caplog):  # noqa: F811
    card = render_model_card(_card_info(loss_plot="curves/missing.png"))
    with HubPusher(REPO, retry_backoff=0.01) as pusher:
        pusher.push(checkpoint, "step 9", card=card)
    assert any("embeds 'curves/missing.png'" in m for m in caplog.messages)


def test_push_rejects_bad_arguments_before_queueing(fake_hub, checkpoint, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="repo"):
        HubPusher("not a/valid/repo id")
    with pytest.raises(ValueError, match="max_retries"):
        HubPusher(REPO, max_retries=-1)
    with pytest.raises(ValueError, match="retry_backoff"):
        HubPusher(REPO, retry_backoff=float("nan"))
    pusher = HubPusher(REPO, retry_backoff=0.01)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pusher.push(tmp_path / "missing", "msg")
    with pytest.raises(ValueError, match="directory"):
        pusher.push(checkpoint / "config.json", "msg")
    with pytest.raises(ValueError, match="commit_message"):
        pusher.push(checkpoint, "  ")
    with pytest.raises(FileNotFoundError, match="extra_files"):
        pusher.push(checkpoint, "msg", extra_files={"loss.png": tmp_path / "nope.png"})
    with pytest.raises(ValueError, match="extra_files key"):
        pusher.push(checkpoint, "msg", extra_files={"../x": checkpoint / "config.json"})
    assert pusher.history == []
    assert pusher.close()
    with pytest.raises(RuntimeError, match="closed"):
        pusher.push(checkpoint, "msg")
    assert fake_hub.requests_of("create_repo") == []


def test_close_removes_the_staging_copies(fake_hub, checkpoint):  # noqa: F811
    pusher = HubPusher(REPO, retry_backoff=0.01)
    pusher.push(checkpoint, "step 10")
    staging = pusher._staging_root
    assert staging is not None and staging.is_dir() and staging.stat().st_mode & 0o077 == 0  # private
    assert pusher.close(timeout=60)
    assert not staging.exists()
    assert checkpoint.is_dir() and pusher.status["ok"] == 1


def test_repr_hides_the_token(fake_hub):  # noqa: F811
    pusher = HubPusher(REPO, token=FAKE_TOKEN)
    assert FAKE_TOKEN not in repr(pusher)


# ---------------------------------------------------------------------------------------------------- datasets


def test_datasets_push_to_hub_and_dataset_card_arrive(fake_hub, monkeypatch):  # noqa: F811
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    # datasets deletes each temporary Parquet shard right after its preupload, so its bytes must travel
    # before the commit: answer "lfs" for them (legacy LFS protocol; the fake has no Xet storage).
    use_lfs(monkeypatch, fake_hub, ("*.parquet",))
    dataset = DatasetDict(
        {
            "train": Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6]], "worker": [0, 1]}),
            "validation_en": Dataset.from_dict({"input_ids": [[7, 8, 9]], "worker": [-1]}),
        }
    )
    dataset.push_to_hub("heloco-org/tiny-data", private=True, commit_message="packed shards")
    card = DatasetCard("---\nlanguage:\n- en\nlicense: odc-by\n---\n\n# tiny data\n")
    card.push_to_hub("heloco-org/tiny-data", repo_type="dataset", commit_message="dataset card")

    repo = fake_hub.repo("heloco-org/tiny-data", repo_type="dataset")
    assert repo.private is True
    files = fake_hub.files("heloco-org/tiny-data", repo_type="dataset")
    assert set(files) == {
        "README.md",
        "data/train-00000-of-00001.parquet",
        "data/validation_en-00000-of-00001.parquet",
    }
    train = pq.read_table(io.BytesIO(files["data/train-00000-of-00001.parquet"])).to_pydict()
    assert train == {"input_ids": [[1, 2, 3], [4, 5, 6]], "worker": [0, 1]}
    assert DatasetCard(files["README.md"].decode()).data.license == "odc-by"
    messages = [c.message for c in fake_hub.commits("heloco-org/tiny-data", repo_type="dataset")]
    assert messages == ["initial commit", "packed shards", "dataset card"]
    assert fake_hub.requests_of("unknown") == []
    writes = [r for r in fake_hub.requests if r.kind in ("create_repo", "preupload", "lfs_batch", "commit")]
    assert {r.kind for r in writes} == {"create_repo", "preupload", "lfs_batch", "commit"}
    assert {r.authorization for r in writes} == {f"Bearer {FAKE_TOKEN}"}
    # Shard bytes go to the storage URL the LFS batch answer gave, without the Hub token.
    assert [r.authorization for r in fake_hub.requests_of("lfs_upload")] == [None, None]


def test_endpoint_comes_from_argument_then_env_then_constants(fake_hub, checkpoint, monkeypatch):  # noqa: F811
    monkeypatch.setattr(constants, "ENDPOINT", closed_port_url())  # as if HF_ENDPOINT was set after import
    assert HubPusher(REPO).endpoint == fake_hub.url  # the environment, read when the pusher is made
    assert HubPusher(REPO, endpoint="http://example.invalid/").endpoint == "http://example.invalid"
    monkeypatch.delenv("HF_ENDPOINT")
    assert HubPusher(REPO).endpoint == constants.ENDPOINT
    with HubPusher(REPO, endpoint=fake_hub.url, retry_backoff=0.01) as pusher:
        pusher.push(checkpoint, "step 11")
    assert pusher.history[0]["ok"] and fake_hub.files(REPO) == _local_files(checkpoint)


def test_close_with_timeout_does_not_wait_for_a_hung_hub(fake_hub, tmp_path):  # noqa: F811
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.bin").write_bytes(name.encode())
    fake_hub.pause()  # the Hub accepts connections but never answers
    pusher = HubPusher(REPO, retry_backoff=0.01, supersede=False)
    pusher.push(tmp_path / "a", "step a")
    assert fake_hub.wait_until_blocked()
    pusher.push(tmp_path / "b", "step b")
    assert pusher.wait(timeout=0.05) is False
    assert pusher.close(timeout=0.05) is False
    history = pusher.history
    assert history[0]["state"] == "running"
    assert history[1]["state"] == "failed" and "closed before it started" in history[1]["error"]
    fake_hub.resume()  # the in-flight upload may still finish in the background
    pusher._thread.join(timeout=30)
    assert pusher.history[0]["ok"] and not pusher._staging_root.exists()
    assert fake_hub.files(REPO) == {"w.bin": b"a"}
