"""The package's shape: imports go one way (no cycle, nothing private imported across modules), the public
API is what the README says, and the README's Python example runs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import memlens
from tests.conftest import LLAMA_TINY, PHEE, REPO

SRC = REPO / "src"


def _modules() -> dict[str, Path]:
    """memlens module name -> file."""
    return {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (SRC / "memlens").rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(imported memlens module, imported name or None) for every import in the file, function bodies included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                if target in modules:
                    found.append((target, alias.name))
    return found


def test_imports_have_no_cycle_and_no_private_names():
    modules = _modules()
    graph = {m: set() for m in modules}
    private = []
    for name, path in modules.items():
        for target, imported in _imports(name, path, modules):
            if target != name:
                graph[name].add(target)
                if imported and imported.startswith("_") and not imported.startswith("__"):
                    private.append(f"{name} imports {target}.{imported}")
    assert not private, private

    # depth-first search for a back edge: any cycle is reported with its path
    state: dict[str, int] = {}  # 1 on the stack, 2 finished

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_lower_floors_do_not_import_upper_floors():
    """config -> store -> data -> models -> train -> score -> attacks -> study -> executors -> runner -> cli."""
    modules = _modules()
    upper = {"memlens.runner", "memlens.cli", "memlens.demo", "memlens.executors"}
    for name, path in modules.items():
        if name.split(".")[1:2] and name.split(".")[1] in {"config", "store", "data", "models", "train", "score", "attacks", "metrics",
                                  "study", "report"}:
            bad = {t for t, _ in _imports(name, path, modules)} & upper
            bad |= {t for t, _ in _imports(name, path, modules) if t.startswith("memlens.executors.")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_public_api_and_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", memlens.__version__)
    for name in ("load_study", "run_study", "attack_models", "build_report", "study_status", "StudyConfig"):
        assert callable(getattr(memlens, name)), name
    assert set(memlens.__all__) >= {"__version__", "load_study", "run_study", "attack_models", "build_report"}


def test_readme_python_example_runs(tmp_path):
    """The README's Python API example, run as written with its paths pointed at the shared fixtures."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.+?)\n```", section, re.S).group(1)
    code = (code.replace("../shared/data/phee", str(PHEE)).replace("../shared/models/llama-tiny", str(LLAMA_TINY))
            .replace("memlens-out/api", str(tmp_path / "api")))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "api" / "report" / "index.html").exists()
    assert "AUC" in result.stdout
