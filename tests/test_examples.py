"""The README's own-loop example runs and learns."""

import importlib.util
from pathlib import Path


def test_own_loop_example_learns():
    path = Path(__file__).resolve().parent.parent / "examples" / "own_loop.py"
    spec = importlib.util.spec_from_file_location("own_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first, last = module.main(steps=60, sync_every=10)
    assert last < first - 1.0
