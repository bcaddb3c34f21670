"""The house's rules, read from the code's own imports (every import, lazy ones too): packages
import one way, no module imports itself back through others, and run management imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("toolbox", "shards", "launch", "trainer")
# What each package may import of ours (besides itself). Read top to bottom: the bottom first.
ALLOWED = {
    "toolbox": (),
    "shards": ("toolbox",),
    "launch": ("toolbox", "shards"),
    "trainer.rundir": ("toolbox",),
    "trainer.training": ("toolbox", "shards", "trainer.rundir"),
    "trainer.trained": ("toolbox", "shards", "trainer.rundir", "trainer.training"),
    "trainer.runs": ("toolbox", "trainer.rundir", "trainer.training.config"),
}
ENTRIES = (
    "trainer.main",
    "trainer.__main__",
    "trainer.evaluate",
    "trainer.predict",
    "trainer.export",
    "trainer.sweep",
    "trainer.compare",
    "trainer.fetch_weights",
    "trainer.find_lr",
    "trainer.audit",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the modules of ours it imports anywhere in its file (a `from pkg import mod` names pkg.mod)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name, names = module_name(path), set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            found[name] = {n for n in names if n.split(".")[0] in PACKAGES}
    return {name: {n for n in targets if n in found} for name, targets in found.items()}


def owner(module: str) -> str | None:
    """The longest ALLOWED key the module belongs to."""
    keys = [k for k in ALLOWED if module == k or module.startswith(k + ".")]
    return max(keys, key=len) if keys else None


def inside(module: str, places) -> bool:
    return any(module == p or module.startswith(p + ".") for p in places)


def test_packages_import_one_way():
    wrong = []
    for module, targets in imports().items():
        place = owner(module)
        if place is None:
            assert module in ENTRIES or module == "trainer", f"{module} belongs to no package of the map"
            continue
        for target in targets:
            if not inside(target, (place, *ALLOWED[place])):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_the_after_training_commands_never_import_the_training_loop():
    graph = imports()
    assert not [
        m for m, targets in graph.items() if m.startswith("trainer.trained") and "trainer.training.loop" in targets
    ]


def test_no_import_circle():
    graph = imports()
    circles = []
    for start in graph:  # a module reachable from one it imports closes a circle
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module == start:
                circles.append(start)
                break
            if module not in seen:
                seen.add(module)
                todo += graph.get(module, ())
    assert not circles, circles


def test_command_entries_are_thin_and_nothing_imports_them():
    graph = imports()
    for entry in ENTRIES[1:]:
        lines = (REPO / (entry.replace(".", "/") + ".py")).read_text().splitlines()
        assert len(lines) <= 15, f"{entry} is a thin entry point"
    assert not [m for m, targets in graph.items() if targets & set(ENTRIES)]


def test_run_management_imports_no_torch():
    code = "import sys, trainer.runs.compare, trainer.runs.sweep, trainer.rundir; print(sorted({'torch', 'wandb', 'accelerate'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_package_says_what_it_owns():
    for package in ("toolbox", "shards", "launch", "trainer", "trainer/training", "trainer/trained", "trainer/runs"):
        doc = ast.get_docstring(ast.parse((REPO / package / "__init__.py").read_text()))
        assert doc and len(doc) > 40, package


def test_tests_mirror_the_packages():
    folders = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders == {"toolbox", "shards", "launch", "training", "trained", "runs", "slurm", "bench"}
    # At the top: only the checks of the repo as a whole (its imports, its docs' command lines).
    assert sorted(p.name for p in (REPO / "tests").glob("test_*.py")) == ["test_docs.py", "test_layout.py"]
