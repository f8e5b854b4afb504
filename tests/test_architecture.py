"""The package's shape: imports go one way (no cycle, nothing private imported across modules), the public
API is what the README says, and the README's Python example runs."""

from __future__ import annotations

import ast
import importlib
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
    """config -> store -> data -> models -> context -> train -> score -> attacks -> study -> executors -> runner
    -> cli."""
    modules = _modules()
    upper = {"memlens.runner", "memlens.cli", "memlens.demo", "memlens.executors"}
    lower = {"config", "store", "data", "models", "context", "train", "score", "attacks", "metrics", "study", "report"}
    for name, path in modules.items():
        if name.split(".")[1:2] and name.split(".")[1] in lower:
            bad = {t for t, _ in _imports(name, path, modules)} & upper
            bad |= {t for t, _ in _imports(name, path, modules) if t.startswith("memlens.executors.")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_public_api_and_version():
    importlib.import_module("memlens.auditing")  # importing the workflow's package leaves the function memlens.audit

    assert re.fullmatch(r"\d+\.\d+\.\d+.*", memlens.__version__)
    for name in ("load_study", "run_study", "attack_models", "audit", "build_report", "study_status", "StudyConfig"):
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


# ----------------------------------------------------------------------------------- seams (issue 24)
PARSES_A_STUDY = ("read_study", "load_study", "model_validate", "safe_load")
MUTATES = ("clear", "update", "setdefault", "add", "append", "pop", "__setitem__")


def _module_containers(tree: ast.Module) -> set[str]:
    """Names bound at module level to a dict, set or list (literal, comprehension or constructor call)."""
    names = set()
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        is_container = isinstance(value, (ast.Dict, ast.Set, ast.List, ast.DictComp, ast.SetComp)) or (
            isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id in {"dict", "set", "list"})
        if is_container:
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def study_file_caches(source: str) -> list[str]:
    """Functions that parse a study file and keep what they parsed in a module-level container (a cache that
    outlives the study it was read for: a stage must take the study from its context instead)."""
    tree = ast.parse(source)
    containers = _module_containers(tree)
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                 for n in ast.walk(fn) if isinstance(n, ast.Call)}
        if not calls & set(PARSES_A_STUDY):
            continue
        for node in ast.walk(fn):
            mutated = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATES:
                mutated = node.func.value
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                mutated = next((t.value for t in targets if isinstance(t, ast.Subscript)), None)
            if isinstance(mutated, ast.Name) and mutated.id in containers:
                found.append(f"{fn.name} keeps parsed studies in module-level {mutated.id}")
    return found


def test_no_module_level_cache_of_parsed_study_files():
    offenders = [f"{name}: {what}" for name, path in _modules().items()
                 for what in study_file_caches(path.read_text())]
    assert not offenders, offenders


def test_the_cache_check_catches_what_stage_py_once_did():
    once = """
_STUDIES = {}

def _folder_study(layout, run_id):
    key = (1, 2)
    if key not in _STUDIES:
        _STUDIES.clear()
        _STUDIES[key] = StudyConfig.model_validate(yaml.safe_load(path.read_text()))
    return _STUDIES[key]
"""
    assert study_file_caches(once) == ["_folder_study keeps parsed studies in module-level _STUDIES"] * 2
    registry = "ATTACKS = {}\n\ndef register(name, fn):\n    ATTACKS[name] = fn\n"
    assert study_file_caches(registry) == []  # a registry parses no study


def test_attack_inputs_carry_data_not_settings():
    """An attack's settings are its own (its settings model); AttackInputs holds what was computed: statistics,
    arrays, texts. A scalar field there would be a copied setting again."""
    import dataclasses
    import types
    import typing

    from memlens.attacks.registry import ATTACKS, AttackInputs

    def scalar(hint) -> bool:
        if hint in (int, float, str, bool) or typing.get_origin(hint) is typing.Literal:
            return True
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            return all(scalar(a) for a in typing.get_args(hint) if a is not type(None))
        return False

    scalars = {name for name, hint in typing.get_type_hints(AttackInputs).items() if scalar(hint)}
    assert not scalars, f"AttackInputs has settings-like fields {scalars}: give them to the attack's settings model"
    settings = {key for attack in ATTACKS.values() for key in attack.settings.model_fields}
    clashes = settings & {f.name for f in dataclasses.fields(AttackInputs)}
    assert not clashes, f"AttackInputs fields named like attack settings: {clashes}"


SHAPE = re.compile(r"\(\s*(?:\.\.\.,\s*[\w -]+|[\w -]+,\s*(?:[\w -]+)?)\)")  # (records,) (n, K) (..., members)


def test_array_taking_functions_state_shapes():
    """A function taking an array says in its docstring what shape it expects, e.g. "(records, references)"."""
    missing = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            arrays = [a.arg for a in node.args.args + node.args.kwonlyargs if a.annotation is not None
                      and "ndarray" in ast.unparse(a.annotation) and "Callable" not in ast.unparse(a.annotation)]
            if arrays and not SHAPE.search(ast.get_docstring(node) or ""):
                missing.append(f"{name}.{node.name}({', '.join(arrays)})")
    assert not missing, missing
