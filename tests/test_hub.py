"""recipes.hub against an in-process fake Hub: what arrives, a failing or unreachable or hung Hub,
superseding, shutdown, and the model card."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import tempfile
import time
from pathlib import Path

import pytest
from huggingface_hub import DatasetCard, ModelCard, constants

from recipes.hub import HubUploader, ModelCardInfo, redact_secrets, render_model_card
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


def _card_info(**overrides) -> ModelCardInfo:
    info = {
        "model_name": "tiny-llama-heloco",
        "method": "HeLoCo",
        "hyperparameters": {"outer": {"lr": 0.7, "momentum": 0.9}, "inner_lr": 4e-4, "sync_every": 50},
        "worker_speeds": [4.0, 1.0],
        "partition": "dominant-language p=0.8",
        "language_histogram": {0: {"de": 1000, "en": 250}, 1: {"en": 3000, "fr": 5}},
        "tokens_seen": 123456,
        "validation_loss": {"en": 3.0, "de": 2.5},
        "command": "accelerate launch recipes/train.py --config recipes/configs/tiny.yaml",
        "datasets": ["allenai/c4"],
        "loss_plot": "loss.png",
    }
    info.update(overrides)
    return ModelCardInfo(**info)


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


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _tree_digest(folder: Path) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in _local_files(folder).items()}


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A model folder shaped like save_pretrained output."""
    folder = tmp_path / "checkpoint-100" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    return folder


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where ``tempfile`` puts the uploader's staging copies during the test, to check them."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------------------------------------------- card


def test_card_metadata_and_tables_hold_the_run(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    card = render_model_card(_card_info(step=7))
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
    assert "Checkpoint at outer step 7" in card.text
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
    assert "Checkpoint of a language model" in card.text  # no step given


def test_card_cells_cannot_break_a_table():
    card = render_model_card(_card_info(hyperparameters={"pattern": "a|b", "note": "two\nlines"}))
    assert "| pattern | a\\|b |\n| note | two lines |" in card.text


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
    assert redact_secrets("password=swordfish", extra=["swordfish", None]) == "password=***"


@pytest.mark.parametrize(
    "override",
    [{"worker_speeds": [1.0]}, {"worker_speeds": [1.0, 0.0]}, {"language_histogram": {0: {"en": 1}}}],
    ids=["too-few-speeds", "zero-speed", "missing-worker"],
)
def test_card_rejects_workers_that_do_not_add_up(override):
    with pytest.raises(ValueError, match=r"worker_speeds|language_histogram"):
        _card_info(**override)


# ---------------------------------------------------------------------------------------------------- uploading


@pytest.mark.parametrize("xet", [True, False], ids=["xet-pipeline", "legacy-commit"])
def test_push_uploads_the_folder_and_card(fake_hub, checkpoint, monkeypatch, caplog, xet):  # noqa: F811
    # huggingface_hub takes a different code path when hf_xet is installed; both must work.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    caplog.set_level(logging.DEBUG)
    before = _tree_digest(checkpoint)
    card = render_model_card(_card_info(step=100, loss_plot=None))

    uploader = HubUploader(REPO)
    index = uploader.push(checkpoint, "step 100: outer version 100", step=100, card=card)
    assert uploader.close(timeout=60)
    record = uploader.history[index]

    assert record["ok"] and record["state"] == "ok" and record["error"] is None and record["step"] == 100
    files = fake_hub.files(REPO)
    assert files == {**_local_files(checkpoint), "README.md": str(card).encode()}
    commits = fake_hub.commits(REPO)
    assert [c.message for c in commits] == ["initial commit", "step 100: outer version 100"]
    assert record["commit_url"].endswith(commits[-1].oid)
    assert uploader.status["ok"] == 1 and uploader.status["last_ok"]["index"] == index
    assert ("language", "validation loss", "perplexity") in _tables(
        ModelCard(files["README.md"].decode()).text
    )

    # Authenticated with the token from HF_TOKEN, which never leaks into files or logs.
    upload_requests = [r for r in fake_hub.requests if r.kind in UPLOAD_KINDS]
    assert upload_requests and {r.authorization for r in upload_requests} == {f"Bearer {FAKE_TOKEN}"}
    assert all(FAKE_TOKEN.encode() not in content for content in files.values())
    assert FAKE_TOKEN not in caplog.text
    # The local folder is untouched: same bytes, and no README.md written into it.
    assert _tree_digest(checkpoint) == before


def test_push_returns_while_the_hub_hangs_and_uploads_a_snapshot(fake_hub, checkpoint, temp_root):  # noqa: F811
    original = _local_files(checkpoint)
    fake_hub.pause()  # the Hub does not answer until resume()
    uploader = HubUploader(REPO)
    started = time.monotonic()
    index = uploader.push(checkpoint, "step 1")
    assert time.monotonic() - started < 5  # the copy only, never the Hub
    assert fake_hub.wait_until_blocked()
    assert uploader.history[index]["state"] == "running" and not uploader.wait(timeout=0.05)
    # The staging copy is private to this user.
    (staging,) = temp_root.iterdir()
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    # The trainer rotates its checkpoint right away: overwrite one file, delete another.
    (checkpoint / "model.safetensors").write_bytes(b"overwritten")
    (checkpoint / "config.json").unlink()
    fake_hub.resume()
    assert uploader.close(timeout=60)
    assert uploader.history[index]["ok"]
    assert fake_hub.files(REPO) == original
    assert list(temp_root.iterdir()) == []  # the staging copy is gone


@pytest.mark.parametrize(("kind", "status"), [("create_repo", 500), ("commit", 422)])
def test_a_failed_push_is_logged_counted_and_the_next_one_tries_again(
    monkeypatch, checkpoint, caplog, kind, status
):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # one commit POST, not retried by the client
    hub = FakeHub(echo_authorization_in_errors=True)  # server errors quote the Authorization header
    try:
        point_clients_at(monkeypatch, hub.url)
        hub.fail_next(kind, status=status)
        before = _tree_digest(checkpoint)
        uploader = HubUploader(REPO, revision="run-1")
        first = uploader.push(checkpoint, "step 2")
        assert uploader.wait(timeout=60)
        failed = uploader.history[first]
        assert failed["state"] == "failed" and not failed["ok"]
        assert uploader.status["failed"] == 1 and uploader.status["last_ok"] is None
        second = uploader.push(checkpoint, "step 3")
        assert uploader.close(timeout=60)
        assert uploader.history[second]["ok"]
        assert hub.files(REPO, revision="run-1") == _local_files(checkpoint)
        assert [r.status for r in hub.requests_of(kind)] == [status, 200]
    finally:
        hub.close()
    # The server did send the token back; it was scrubbed everywhere we report it.
    assert "Authorization: Bearer ***" in failed["error"] and FAKE_TOKEN not in failed["error"]
    assert any("'step 2' failed" in m for m in _errors(caplog))
    assert FAKE_TOKEN not in caplog.text
    assert _tree_digest(checkpoint) == before


def test_unreachable_hub_is_logged_and_never_raises(monkeypatch, checkpoint, caplog):
    point_clients_at(monkeypatch, closed_port_url())
    before = _tree_digest(checkpoint)
    uploader = HubUploader(REPO)
    index = uploader.push(checkpoint, "step 4", step=4)
    assert uploader.close(timeout=60)
    record = uploader.history[index]
    assert record["state"] == "failed" and "ConnectError" in record["error"]
    assert uploader.status["failed"] == 1
    assert any("'step 4' failed" in m for m in _errors(caplog))
    assert FAKE_TOKEN not in caplog.text
    assert _tree_digest(checkpoint) == before


def test_revision_and_private_reach_the_server(fake_hub, checkpoint):  # noqa: F811
    uploader = HubUploader(REPO, private=True, revision="run-7")
    uploader.push(checkpoint, "step 5")
    assert uploader.close(timeout=60)
    repo = fake_hub.repo(REPO)
    assert repo.private is True
    assert set(repo.branches) == {"main", "run-7"}
    assert fake_hub.files(REPO, revision="run-7") == _local_files(checkpoint)
    assert fake_hub.files(REPO, revision="main") == {}  # main keeps only the initial commit
    assert [c.message for c in fake_hub.commits(REPO, revision="run-7")] == ["initial commit", "step 5"]


def test_public_is_the_default_visibility(fake_hub, checkpoint):  # noqa: F811
    uploader = HubUploader(REPO)
    uploader.push(checkpoint, "step 1")
    assert uploader.close(timeout=60)
    assert fake_hub.repo(REPO).private is False


def test_one_upload_in_flight_and_a_newer_push_supersedes_the_queued_one(fake_hub, tmp_path, temp_root):  # noqa: F811
    folders = []
    for step in (1, 2, 3):
        folder = tmp_path / f"ckpt-{step}"
        folder.mkdir()
        (folder / "step.txt").write_text(str(step))
        folders.append(folder)
    fake_hub.pause()
    uploader = HubUploader(REPO)
    uploader.push(folders[0], "step 1")
    assert fake_hub.wait_until_blocked()  # push 1 is in flight
    uploader.push(folders[1], "step 2")  # queued behind it ...
    assert [r["state"] for r in uploader.history] == ["running", "queued"]
    uploader.push(folders[2], "step 3")  # ... and replaced by this one
    assert [r["state"] for r in uploader.history] == ["running", "superseded", "queued"]
    assert len(list(temp_root.iterdir())) == 2  # the superseded copy is already deleted
    fake_hub.resume()
    assert uploader.close(timeout=60)
    assert [r["state"] for r in uploader.history] == ["ok", "superseded", "ok"]
    assert uploader.status["superseded"] == 1
    assert [c.message for c in fake_hub.commits(REPO)] == ["initial commit", "step 1", "step 3"]
    assert fake_hub.files(REPO) == {"step.txt": b"3"}
    assert list(temp_root.iterdir()) == []


def test_close_with_timeout_reports_the_upload_in_flight(fake_hub, tmp_path, temp_root, caplog):  # noqa: F811
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.bin").write_bytes(name.encode())
    fake_hub.pause()  # the Hub accepts connections but never answers
    uploader = HubUploader(REPO)
    uploader.push(tmp_path / "a", "step a")
    assert fake_hub.wait_until_blocked()
    uploader.push(tmp_path / "b", "step b")
    started = time.monotonic()
    assert uploader.close(timeout=0.2) is False
    assert time.monotonic() - started < 5
    history = uploader.history
    assert history[0]["state"] == "running"
    assert history[1]["state"] == "failed" and "closed before it started" in history[1]["error"]
    assert any("'step a' still uploading" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="closed"):
        uploader.push(tmp_path / "a", "step c")
    fake_hub.resume()  # the upload in flight finishes in the background
    assert uploader.wait(timeout=60)
    assert uploader.history[0]["ok"] and fake_hub.files(REPO) == {"w.bin": b"a"}
    assert list(temp_root.iterdir()) == []


def test_push_rejects_bad_arguments_before_queueing(fake_hub, checkpoint, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="repo"):
        HubUploader("not a/valid/repo id")
    with pytest.raises(ValueError, match="revision"):
        HubUploader(REPO, revision=" ")
    uploader = HubUploader(REPO)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        uploader.push(tmp_path / "missing", "msg")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        uploader.push(checkpoint / "config.json", "msg")
    with pytest.raises(ValueError, match="commit_message"):
        uploader.push(checkpoint, "  ")
    with pytest.raises(FileNotFoundError, match="extra_files"):
        uploader.push(checkpoint, "msg", extra_files={"loss.png": tmp_path / "nope.png"})
    with pytest.raises(ValueError, match="extra_files key"):
        uploader.push(checkpoint, "msg", extra_files={"../x": checkpoint / "config.json"})
    assert uploader.history == []
    assert uploader.close()
    assert fake_hub.requests_of("create_repo") == []


def test_extra_files_land_in_the_repo_not_in_the_folder(fake_hub, checkpoint, tmp_path):  # noqa: F811
    plot = tmp_path / "elsewhere.png"
    plot.write_bytes(b"\x89PNG plot")
    uploader = HubUploader(REPO)
    uploader.push(checkpoint, "step 8", extra_files={"plots/loss.png": plot})
    assert uploader.close(timeout=60)
    assert fake_hub.files(REPO)["plots/loss.png"] == b"\x89PNG plot"
    assert not (checkpoint / "plots").exists()


def test_repr_hides_the_token(fake_hub):  # noqa: F811
    assert FAKE_TOKEN not in repr(HubUploader(REPO, token=FAKE_TOKEN))


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


def test_a_hung_hub_fails_the_push_after_the_http_timeout_and_never_holds_the_process(
    fake_hub,  # noqa: F811
    checkpoint,
    temp_root,
    request,
):
    import threading

    from huggingface_hub import close_session

    request.addfinalizer(
        close_session
    )  # the timeout is set on the shared client: the next test gets a new one
    fake_hub.pause()  # accepts connections, never answers
    uploader = HubUploader(REPO, http_timeout=0.5)
    uploader.push(checkpoint, "step 1")
    assert fake_hub.wait_until_blocked()
    worker = [t for t in threading.enumerate() if t.name == f"heloco-hub-{REPO}"]
    assert worker and all(t.daemon for t in worker)  # the interpreter does not wait for them at exit
    started = time.monotonic()
    assert uploader.close(timeout=120)  # without the HTTP timeout this waits for ever
    took = time.monotonic() - started
    record = uploader.history[0]
    assert record["state"] == "failed" and "timeout" in record["error"].lower(), record
    assert took < 60, took
    assert list(temp_root.iterdir()) == []
    fake_hub.resume()
    with pytest.raises(ValueError, match="http_timeout"):
        HubUploader(REPO, http_timeout=0)


def test_the_upload_worker_ends_when_idle_and_starts_again():
    from recipes.hub.upload import DaemonWorker

    worker = DaemonWorker("heloco-hub-test")
    worker.IDLE_S = 0.05
    assert worker.submit(lambda x: x + 1, 1).result(timeout=5) == 2
    first = worker.thread
    assert first is not None and first.daemon
    first.join(timeout=5)
    assert not first.is_alive() and worker.thread is None
    assert worker.submit(lambda: 3).result(timeout=5) == 3
