"""Import hygiene: ``import heloco`` stays light (the distributed machinery loads only when used, the
Hub client never: Hub upload lives in recipes/hub), ``heloco.distributed`` resolves its names lazily,
and no module imports another module's underscore-prefixed (private) names."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ["heloco.distributed.wire", "heloco.distributed.server", "heloco.distributed.session"]
HEAVY += ["heloco.distributed.client", "huggingface_hub"]


def loaded_after(code: str) -> list[str]:
    """The modules in sys.modules after running ``code`` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_import_heloco_loads_no_distributed_machinery_nor_the_hub():
    modules = loaded_after("import heloco\nassert heloco.InProcessTransport")
    assert "heloco.transport" in modules  # InProcessTransport's home, light
    assert [m for m in HEAVY if m in modules] == []
    assert [m for m in modules if m.startswith("heloco.distributed")] == []  # not even the package


def test_the_library_never_imports_the_hub_client():
    """Hub upload is the recipes' business (recipes/hub); heloco needs only torch and safetensors."""
    hits = []
    for path in (ROOT / "heloco").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            hits += [
                f"{path.relative_to(ROOT)}:{node.lineno}"
                for n in names
                if n.split(".")[0] == "huggingface_hub"
            ]
    assert hits == []


def test_distributed_package_resolves_names_on_first_use():
    modules = loaded_after(
        "import sys\n"
        "import heloco.distributed as d\n"
        "assert 'heloco.distributed.server' not in sys.modules\n"
        "assert d.DistributedServer.__module__ == 'heloco.distributed.server'\n"
        "assert d.FlatMessage.__module__ == 'heloco.distributed.wire'"
    )
    assert "heloco.distributed.server" in modules and "heloco.distributed.client" not in modules


def test_a_worker_rank_does_not_load_the_server():
    modules = loaded_after("from heloco.distributed.setup import setup_transport")
    assert "heloco.distributed.wire" in modules
    assert "heloco.distributed.server" not in modules and "heloco.distributed.session" not in modules


def test_every_exported_name_resolves_and_unknown_names_are_attribute_errors():
    import heloco.distributed
    from heloco.distributed import wire

    values = {name: getattr(heloco.distributed, name) for name in heloco.distributed.__all__}
    assert values.pop("WIRE_DTYPES") is wire.WIRE_DTYPES
    assert all(v.__module__.startswith(("heloco.distributed.", "heloco.transport")) for v in values.values())
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        heloco.distributed.nope  # noqa: B018


def private_imports(path: Path) -> list[str]:
    """Underscore-prefixed names imported in one file, as ``from m import`` or ``import m.x`` (``__future__``
    and dunders aside)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            parts = (node.module or "").split(".")
            names = [a.name for a in node.names]
            bad = [n for n in [*parts, *names] if n.startswith("_") and not n.startswith("__")]
        elif isinstance(node, ast.Import):
            bad = [
                p
                for a in node.names
                for p in a.name.split(".")
                if p.startswith("_") and not p.startswith("__")
            ]
        else:
            continue
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in bad]
    return found


def test_no_module_imports_another_modules_private_names():
    files = [
        p
        for d in ("heloco", "recipes", "tests", "benchmarks", "data_prep", "examples")
        for p in (ROOT / d).rglob("*.py")
    ]
    assert files
    assert [hit for p in files for hit in private_imports(p)] == []


@pytest.mark.parametrize("script", ["train.py", "analysis/compare.py", "analysis/report.py"])
def test_recipe_scripts_run_from_anywhere_without_touching_sys_path(script, tmp_path):
    """recipes is an installed package: its entry scripts import it like any other, from any cwd."""
    source = (ROOT / "recipes" / script).read_text()
    assert "sys.path" not in source
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / script), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:")


def import_graph(packages: tuple[str, ...] = ("heloco", "recipes", "data_prep")) -> dict[str, set[str]]:
    """Module → the project modules it imports at module level, ``if TYPE_CHECKING:`` blocks included
    (a cycle there is still two modules that need each other); lazy imports inside functions are how
    optional parts stay optional, so they do not count."""
    modules = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        body = ast.parse(path.read_text()).body
        nodes = [n for n in body if not isinstance(n, ast.If)]
        nodes += [inner for n in body if isinstance(n, ast.If) for inner in n.body]  # TYPE_CHECKING
        for node in nodes:
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycle():
    graph = import_graph()
    assert "recipes.train" in graph and "heloco.aggregator" in graph
    assert "recipes.simulator" in graph["recipes.train"]
    assert find_cycles(graph) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
