"""Run a method matrix on the same shards and seeds, then plot and tabulate the comparison.

    python recipes/analysis/compare.py --config recipes/configs/demo.yaml [--jobs 2] [--output_dir DIR] [--only LABEL ...]
                              [--seeds 0 1]

The YAML has a ``base`` mapping (recipes/train.py keys shared by every run), a ``methods`` mapping
(label → overrides), ``seeds``, and where to put the results. Finished runs (summary.json present) are
skipped and interrupted ones resume from their latest checkpoint, so a comparison can be stopped and
restarted. Runs go to subprocesses, ``jobs`` at a time, each with its share of the CPU threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from heloco.checkpoint import latest_checkpoint
from recipes.analysis.plots import final_eval, read_evals, summarize
from recipes.cli import ConfigError, MissingFileError, UserError, run_cli
from recipes.config import CONFIG_CLASSES, check_values, config_from_dict
from recipes.methods import fields_not_read

REPO = Path(__file__).resolve().parents[2]
MATRIX_KEYS = (
    "extends",
    "name",
    "title",
    "base",
    "methods",
    "seeds",
    "jobs",
    "reference",
    "output_dir",
    "docs_dir",
)


def read_matrix_yaml(path: str | Path) -> dict[str, Any]:
    """A comparison YAML as written. ``extends: other.yaml`` (relative to this file) starts from that
    file: its ``base`` and ``methods`` are updated key by key (a method set to null is dropped), its
    other keys replaced."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"comparison config {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if spec is None:
        raise ConfigError(f"{path} is empty; a comparison config needs 'base' and 'methods' mappings")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a comparison config must be a mapping of key: value")
    unknown = sorted(set(spec) - set(MATRIX_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; accepted: {', '.join(MATRIX_KEYS)}")
    for key in ("base", "methods"):
        if spec.get(key) is not None and not isinstance(spec[key], dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping, got {spec[key]!r}")
    if "extends" in spec:
        parent = read_matrix_yaml(path.parent / spec.pop("extends"))
        for key in ("base", "methods"):
            spec[key] = {**parent.get(key, {}), **(spec.get(key) or {})}
        spec = {**parent, **spec}
        spec["methods"] = {k: v for k, v in spec["methods"].items() if v is not None}  # null: drop
    return spec


def load_matrix(path: str | Path) -> dict[str, Any]:
    """The comparison ``path`` describes, every value checked against the recipe config's types (the
    file and the key named) before anything runs."""
    spec = read_matrix_yaml(path)
    if spec.get("base") is None:
        raise ConfigError(
            f"{path}: a comparison config needs a 'base' mapping (the settings every run shares)"
        )
    if not spec.get("methods"):
        raise ConfigError(
            f"{path}: a comparison config needs a non-empty 'methods' mapping (label: overrides)"
        )
    spec["base"] = check_values(spec["base"], f"{path}: base")
    for label, overrides in spec["methods"].items():
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"{path}: methods.{label} must be a mapping of overrides, got {overrides!r}")
        spec["methods"][label] = check_values(overrides or {}, f"{path}: methods.{label}")
    seeds = spec.setdefault("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    jobs = spec.setdefault("jobs", 1)
    if not _is_int(jobs) or jobs < 1:
        raise ConfigError(f"{path}: jobs must be an integer >= 1, got {jobs!r}")
    spec.setdefault("reference", "heloco")
    spec.setdefault("name", Path(path).stem)
    spec.setdefault("output_dir", f"outputs/{spec['name']}")
    return spec


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def run_configs(spec: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """Every (method label, seed, full train config); validated now, before anything runs."""
    runs = []
    for label, overrides in spec["methods"].items():
        for seed in spec["seeds"]:
            values = {**spec["base"], **(overrides or {}), "seed": seed}
            values["output_dir"] = str(Path(spec["output_dir"]) / "runs" / f"{label}-seed{seed}")
            config_from_dict(values, f"methods.{label}")  # raises with the field name on a bad value
            runs.append((label, seed, values))
    return runs


def equal_wallclock(base: dict[str, Any], seq_len: int) -> float:
    """Virtual seconds the async methods need for the token budget: tokens per second is
    tokens_per_step × Σ speeds whatever H or DyLU (every async worker is always busy)."""
    tokens_per_step = base.get("batch_size", 8) * seq_len
    return base["budget_tokens"] / (tokens_per_step * sum(base["worker_speeds"]))


# Keys that do not change what a run computes.
_BOOKKEEPING = {
    "output_dir",
    "resume_from",
    "eval_times",
    "eval_every",
    "progress",
    "report_to",
    "save_every",
    "keep_checkpoints",
    "stop_after_arrivals",
    "build_sample_if_missing",
}


def field_defaults() -> dict[str, Any]:
    """Every config field's default value, flat (the YAML's shape)."""
    out: dict[str, Any] = {}
    for cls in CONFIG_CLASSES:
        for f in dataclasses.fields(cls):
            out[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return out


def finished_matches(out: Path, values: dict[str, Any]) -> bool:
    """A finished run is reused only if it computed exactly what ``values`` asks for (including the
    code's default outer lr at the time); otherwise the user must move it away."""
    summary_path = out / "summary.json"
    if not summary_path.exists():
        return False
    summary = json.loads(summary_path.read_text())
    config = config_from_dict(values)
    ignored = _BOOKKEEPING | fields_not_read(config.diloco.method)
    wanted = {k: v for k, v in config.to_dict().items() if k not in ignored}
    # a field added since the run finished: it ran with that field's default
    done = {**field_defaults(), **summary["config"]}
    differs = sorted(k for k in wanted if wanted[k] != done.get(k))
    done_lr = summary.get("outer_lr", summary["config"].get("outer_lr"))
    if done_lr != config.outer_lr:
        differs.append(f"outer_lr (effective: {done_lr} vs {config.outer_lr})")
    if differs:
        raise FileExistsError(
            f"{out} holds a finished run with other settings ({', '.join(differs)}); "
            "delete it or choose another output_dir"
        )
    return True


def launch(values: dict[str, Any], threads: int) -> tuple[str, float]:
    out = Path(values["output_dir"])
    if finished_matches(out, values):
        return f"{out.name}: done already", 0.0
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "run_config.yaml"
    run_values = dict(values)
    if latest_checkpoint(out) is not None:
        run_values["resume_from"] = "latest"
    config_path.write_text(yaml.safe_dump(run_values, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with open(out / "train.log", "a") as log:
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "recipes" / "train.py"),
                "--config",
                str(config_path),
                "--progress",
                "false",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            check=False,
        )
    if proc.returncode != 0:
        tail = (out / "train.log").read_text().splitlines()[-15:]
        if proc.returncode == 2 and tail and tail[-1].startswith("error: "):  # the run refused a value
            raise UserError(f"run {out}: {tail[-1].removeprefix('error: ')}")
        raise RuntimeError(f"run {out} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    took = time.perf_counter() - started
    if not (out / "summary.json").exists():  # stopped early (stop_after_arrivals, a signal)
        return f"{out.name}: stopped after {took:.0f} s without finishing; run again to continue", took
    return f"{out.name}: {took:.0f} s", took


def prepare_shared(spec: dict[str, Any]) -> int:
    """Build the data and the warm start once, before parallel runs would race for them."""
    from recipes.common import prepare

    return prepare(config_from_dict(run_configs(spec)[0][2]), seeds=spec["seeds"])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the config's)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)"
    )
    parser.add_argument("--output_dir", default=None)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="run these seeds instead of the config's"
    )
    parser.add_argument("--docs_dir", default=None, help="also copy plots + table here")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="run just these method labels and print their final losses (no plots, no table)",
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="run nothing: tabulate and plot the runs that have finished (methods may have different seeds)",
    )
    args = parser.parse_args(argv)
    spec = load_matrix(args.config)
    if args.output_dir:
        spec["output_dir"] = args.output_dir
    if args.seeds:
        spec["seeds"] = args.seeds
    jobs = args.jobs or int(spec["jobs"])
    runs = run_configs(spec)
    if args.only:
        unknown = sorted(set(args.only) - {label for label, _, _ in runs})
        if unknown:
            raise ConfigError(f"--only: unknown labels {unknown}; the config has {sorted(spec['methods'])}")
        runs = [r for r in runs if r[0] in args.only]
    seq_len = prepare_shared(spec)
    wallclock = equal_wallclock(spec["base"], seq_len)
    for _, _, values in runs:
        values["eval_times"] = [wallclock]
    if args.report_only:
        runs = [r for r in runs if (Path(r[2]["output_dir"]) / "summary.json").exists()]
        if not runs:
            raise ConfigError(f"--report_only: no finished runs under {spec['output_dir']}")
        print(f"{len(runs)} finished runs; equal wall-clock = {wallclock:.1f} virtual s", flush=True)
    else:
        threads = args.threads or max(1, (os.cpu_count() or 2) // jobs)
        print(f"{len(runs)} runs, {jobs} at a time; equal wall-clock = {wallclock:.1f} virtual s", flush=True)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for message, _ in pool.map(lambda r: launch(r[2], threads), runs):
                print(f"  {message}  (total {time.perf_counter() - started:.0f} s)", flush=True)
    paths: dict[str, dict[int, Path]] = {}
    for label, seed, values in runs:
        paths.setdefault(label, {})[seed] = Path(values["output_dir"])
    unfinished = sorted(
        str(p) for seeds in paths.values() for p in seeds.values() if not (p / "summary.json").exists()
    )
    if args.only:
        text = "\n".join(
            f"{label} seed {seed}: "
            + (
                f"final val_loss/mean {final_eval(read_evals(path))['val_loss/mean']:.4f}"
                if (path / "summary.json").exists()
                else "unfinished (run again to continue from its latest checkpoint)"
            )
            for label, seeds in paths.items()
            for seed, path in seeds.items()
        )
        print(text)
        return text
    if unfinished:
        raise SystemExit(f"unfinished runs (run the same command again to continue them): {unfinished}")
    out_dir = Path(spec["output_dir"])
    text = summarize(paths, out_dir, wallclock, spec["reference"], spec.get("title", spec["name"]))
    docs_dir = args.docs_dir or spec.get("docs_dir")
    if docs_dir:
        Path(docs_dir).mkdir(parents=True, exist_ok=True)
        for name in ("loss_vs_tokens.png", "loss_vs_time.png", "loss_per_language.png", "results.md"):
            shutil.copy(out_dir / name, Path(docs_dir) / name)
    print(text)
    return text


if __name__ == "__main__":
    run_cli(main)
