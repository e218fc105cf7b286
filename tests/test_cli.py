"""A user's mistake is one line on stderr, ``error: ...`` naming the field or file, exit code 2, no
traceback; internal errors keep theirs; a run refused before its first round leaves no output_dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipes import train
from recipes.analysis import compare
from recipes.cli import DEBUG_ENV, ConfigError, removed_if_failed_early, run_cli
from recipes.config import parse_config
from recipes.tracking import rounds_recorded

REPO = Path(__file__).resolve().parent.parent


def one_line_error(capsys, main, argv) -> str:
    """Run ``main`` as the scripts do; return its stderr, which must be one ``error:`` line."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_word_for_an_integer_in_yaml_names_the_file_and_the_key(tmp_path, capsys):
    config = write(tmp_path / "run.yaml", "budget_tokens: lots\n")
    err = one_line_error(capsys, train.main, ["--config", str(config)])
    assert err == f"error: {config}: budget_tokens must be an integer (e.g. 400000 or 4e5), got 'lots'"


def test_yaml_exponent_numbers_are_accepted_and_a_fraction_is_not_an_integer(tmp_path, capsys):
    # YAML 1.1 reads 1e5 and 2e-3 as strings
    config = write(
        tmp_path / "run.yaml", "budget_tokens: 1e5\ninner_lr: 2e-3\nworker_speeds: [1, 1e0, 0.5, 5e-1, 1]\n"
    )
    parsed = parse_config(["--config", str(config)])
    assert parsed.train.budget_tokens == 100_000 and isinstance(parsed.train.budget_tokens, int)
    assert parsed.train.inner_lr == 0.002 and parsed.diloco.worker_speeds == [1.0, 1.0, 0.5, 0.5, 1.0]
    write(config, "budget_tokens: 2.5e0\n")
    err = one_line_error(capsys, train.main, ["--config", str(config)])
    assert err.endswith("budget_tokens must be an integer (e.g. 400000 or 4e5), got '2.5e0'")
    write(config, "progress: 'yes'\n")
    assert one_line_error(capsys, train.main, ["--config", str(config)]).endswith(
        "progress must be true or false, got 'yes'"
    )
    write(config, "worker_speeds: [1, fast, 1, 1, 1]\n")
    assert one_line_error(capsys, train.main, ["--config", str(config)]).endswith(
        "worker_speeds[1] must be a number (e.g. 0.7 or 2e-3), got 'fast'"
    )


def test_an_empty_yaml_file_is_refused(tmp_path, capsys):
    config = write(tmp_path / "empty.yaml", "# nothing yet\n")
    err = one_line_error(capsys, train.main, ["--config", str(config)])
    assert err == f"error: {config} is empty; a recipe config is a mapping of key: value"


def test_a_missing_config_file_and_an_unknown_key(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert one_line_error(capsys, train.main, ["--config", str(missing)]) == (
        f"error: config file {missing} does not exist"
    )
    config = write(tmp_path / "run.yaml", "budget_token: 5\n")
    assert one_line_error(capsys, train.main, ["--config", str(config)]) == (
        f"error: {config}: unknown config keys ['budget_token']"
    )


def test_a_bad_flag_is_one_line_without_the_usage(capsys):
    err = one_line_error(capsys, train.main, ["--budget_tokens", "lots"])
    assert "invalid int value: 'lots'" in err and "usage" not in err
    err = one_line_error(capsys, train.main, ["--method", "diloco"])
    assert err.startswith("error: method must be one of sync, async_nesterov")


def test_compare_yaml_values_are_checked_with_the_file_and_key(tmp_path, capsys):
    config = write(
        tmp_path / "m.yaml", yaml.safe_dump({"base": {"budget_tokens": "lots"}, "methods": {"a": {}}})
    )
    assert one_line_error(capsys, compare.main, ["--config", str(config)]) == (
        f"error: {config}: base: budget_tokens must be an integer (e.g. 400000 or 4e5), got 'lots'"
    )
    write(config, yaml.safe_dump({"base": {}, "methods": {"a": {"outer_lr": "fast"}}}))
    assert one_line_error(capsys, compare.main, ["--config", str(config)]).startswith(
        f"error: {config}: methods.a: outer_lr must be a number"
    )
    write(config, "")
    assert "is empty" in one_line_error(capsys, compare.main, ["--config", str(config)])
    write(config, yaml.safe_dump({"base": {"budget_tokens": "4e5"}, "methods": {"a": None}, "seeds": [0]}))
    assert compare.load_matrix(config)["base"]["budget_tokens"] == 400_000


def test_internal_errors_keep_their_traceback_and_debug_shows_user_errors(monkeypatch, capsys):
    def broken(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(broken, [])

    def refused(argv):
        assert "--debug" not in argv  # stripped before main parses its arguments
        raise ConfigError("budget_tokens must be > 0")

    with pytest.raises(ConfigError):
        run_cli(refused, ["--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ConfigError):
        run_cli(refused, [])
    monkeypatch.setenv(DEBUG_ENV, "0")
    with pytest.raises(SystemExit):
        run_cli(refused, [])
    assert capsys.readouterr().err == "error: budget_tokens must be > 0\n"


def test_a_run_refused_before_its_first_round_leaves_no_output_dir(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data_dir", str(tmp_path / "no_shards"), "--output_dir", str(out), "--report_to", "none"]
    err = one_line_error(capsys, train.main, argv)
    assert err.startswith(f"error: no shards at '{tmp_path / 'no_shards'}'")
    assert not out.exists()
    out.mkdir()  # a directory the user made is left alone
    one_line_error(capsys, train.main, argv)
    assert out.is_dir()


def test_the_output_dir_guard_keeps_a_started_run_and_other_ranks_never_remove(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(KeyError), removed_if_failed_early(out) as guard:
        out.mkdir()
        guard.started()
        raise KeyError
    assert out.is_dir()
    out.rmdir()
    with pytest.raises(KeyError), removed_if_failed_early(out, started_when=rounds_recorded):
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"event": "eval"}\n{"event": "arrival"}\n')
        raise KeyError
    assert out.is_dir()
    (out / "metrics.jsonl").unlink()
    out.rmdir()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(KeyError), removed_if_failed_early(out):
        out.mkdir()
        raise KeyError
    assert out.is_dir()


def test_the_script_prints_one_line_and_exits_2():
    """The real entry point, as a user runs it (one subprocess: the cost of importing the recipes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(DEBUG_ENV, None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "train.py"), "--config", "/nonexistent/run.yaml"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr == "error: config file /nonexistent/run.yaml does not exist\n", proc.stderr
