"""Atomic, resumable checkpoints of nested training state (safetensors for tensors, JSON for the rest).

Optimizer and aggregator states are nested dicts/lists of tensors and Python scalars. ``save_state``
splits them into one ``.safetensors`` file (the tensors, under path-like keys) and one ``.json`` file
(the skeleton, with tensors replaced by references), so nothing is pickled. ``atomic_directory``
writes a whole checkpoint next to its destination and renames it into place only when complete: an
interrupted save never leaves a directory that looks finished, and the temporaries of a writer that
was killed are removed by the next writer in that directory (``remove_stale_temporaries``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"  # a dict whose keys are not all strings (optimizer state is keyed by int ids)


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, f"{prefix}.{k}" if prefix else k, tensors) for k, v in obj.items()}
        return {
            _ITEMS: [[k, _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors)] for k, v in obj.items()]
        }
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at '{prefix}'")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: _unflatten(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(directory: str | Path, name: str, state: Any) -> None:
    """Write ``state`` as ``<name>.safetensors`` + ``<name>.json`` in ``directory``."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: str | Path, name: str, device: str | torch.device = "cpu") -> Any:
    """Inverse of ``save_state``."""
    directory = Path(directory)
    skeleton_path = directory / f"{name}.json"
    if not skeleton_path.exists():
        raise FileNotFoundError(f"checkpoint {directory} has no '{name}' state ({skeleton_path} is missing)")
    tensors = load_file(str(directory / f"{name}.safetensors"), device=str(device))
    return _unflatten(json.loads(skeleton_path.read_text()), tensors)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


# What atomic_directory and atomic_write_text leave behind when their process is killed mid-write.
_TEMPORARY_RE = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` entries of ``directory`` whose process
    is gone; returns what was removed.

    Why: a writer killed mid-save leaves its temporary (a whole checkpoint's size) behind, and
    only the same pid would ever reuse the name. Liveness is judged by pid on this host, which is
    right because one host writes each directory (rank 0 the run's checkpoints, every rank its own
    worker-state directory).
    """
    directory = Path(directory)
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for path in directory.iterdir():
            match = _TEMPORARY_RE.match(path.name)
            if match is None or _pid_alive(int(match.group(1))):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    On an exception the temporary directory is removed and ``final`` is untouched. Temporaries that
    killed writers left in the same directory are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file so that readers see either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-<n>``) of a run, oldest first; temporaries are ignored."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
