"""The layout's rules: role packages stand on the shared library only, and the learner's --algo seam."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apex_zmq import config as C
from apex_zmq.envs import env_spec
from learner.algos import RULES, make_rule
from learner.dqn import Batch

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("actor", "replay_server", "learner", "evaluator")


def _imported_top_levels(path: Path) -> set[str]:
    """Top-level package names a module imports (absolute imports only; relative ones stay inside)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


PROJECT_PACKAGES = ("apex_zmq", *ROLES)


def _project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (a package is its ``__init__``)."""
    out = {}
    for pkg in PROJECT_PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside functions and classes, except those under
    ``if TYPE_CHECKING:`` (never run)."""
    found: list = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (module- or function-level; relative imports resolved).
    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module (``from . import x`` in a
    package's ``__init__`` imports its submodule x), else to ``pkg`` itself."""
    modules = _project_modules()

    def owner(name: str) -> str | None:  # the module a dotted name lives in: itself or its nearest parent
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [owner(a.name) for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    full = ".".join(base + ([node.module] if node.module else []))
                else:
                    full = node.module or ""
                targets = [f"{full}.{a.name}" if f"{full}.{a.name}" in modules else owner(full) for a in node.names]
            edges |= {t for t in targets if t is not None and t != mod}
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_project_has_no_import_circle() -> None:
    graph = import_graph()
    assert {"apex_zmq.networks", "actor.main", "learner.algos"} <= set(graph)
    assert "apex_zmq.torsos" in graph["apex_zmq.distributional"]  # relative imports resolved
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_sees_lazy_imports_and_from_package_imports(tmp_path: Path) -> None:
    """The checker itself: a circle closed by a function-level import, or by ``from . import x`` in a
    package's ``__init__``, is found; ``from . import x`` elsewhere points at the submodule only."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p.y"}, "p.y": set()}) is None
    tree = ast.parse("import os\ndef f():\n    from .main import g\nif TYPE_CHECKING:\n    from . import h\n")
    assert [type(n).__name__ for n in _runtime_imports(tree)] == ["Import", "ImportFrom"]


@pytest.mark.parametrize("role", ROLES)
def test_a_role_package_imports_no_other_role_package(role: str) -> None:
    files = sorted((ROOT / role).rglob("*.py"))
    assert files, f"{role}/ has no modules"
    for f in files:
        others = _imported_top_levels(f) & (set(ROLES) - {role})
        assert not others, f"{f.relative_to(ROOT)} imports the role package(s) {sorted(others)}"


def test_the_shared_library_imports_no_role_package() -> None:
    # The launcher and the CLI name role modules as strings (python -m / importlib), never by import.
    for f in sorted((ROOT / "apex_zmq").rglob("*.py")):
        assert not _imported_top_levels(f) & set(ROLES), f"{f.relative_to(ROOT)} imports a role package"


@pytest.mark.parametrize("role", ROLES)
def test_each_role_runs_as_python_dash_m(role: str) -> None:
    out = subprocess.run([sys.executable, "-m", role, "--help"], cwd="/", capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--env" in out.stdout and "--algo" in out.stdout


def test_every_algo_choice_has_a_learning_rule() -> None:
    assert set(RULES) == set(C.ALGOS)
    hints = C.typing.get_type_hints(C.Common)
    assert C.typing.get_args(hints["algo"]) == C.ALGOS


def test_dqn_rule_trains_and_returns_one_priority_per_item() -> None:
    cfg = C.LearnerConfig(env="CartPole-v1", hidden=16, lr=1e-3, target_update=2)
    rule = make_rule(env_spec("CartPole-v1"), cfg, torch.device("cpu"))
    n = 8
    g = torch.Generator().manual_seed(0)
    b = Batch(obs=torch.randn(n, 4, generator=g), action=torch.randint(0, 2, (n,), generator=g),
              ret=torch.ones(n), disc=torch.full((n,), 0.97), next_obs=torch.randn(n, 4, generator=g),
              weight=torch.ones(n), ids=np.arange(n))
    before = {k: v.clone() for k, v in rule.net.state_dict().items()}
    prios, loss = rule.step(b)
    assert prios.shape == (n,) and np.all(prios >= 0) and np.isfinite(loss)
    assert rule.steps == 1
    assert any(not torch.equal(before[k], v) for k, v in rule.net.state_dict().items())
    state = rule.state_dict()
    again = make_rule(env_spec("CartPole-v1"), cfg, torch.device("cpu"))
    again.load_state_dict(state)
    assert again.steps == 1
    assert all(torch.equal(v, again.net.state_dict()[k]) for k, v in rule.net.state_dict().items())


def test_unknown_algo_is_refused_naming_the_choices(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        C.parse(C.LearnerConfig, ["--algo", "bogus"], "learner")
    err = capsys.readouterr().err
    assert "--algo" in err and "'dqn'" in err
    cfg = dataclasses.replace(C.LearnerConfig(env="CartPole-v1"), algo="bogus")
    with pytest.raises(SystemExit, match="--algo 'bogus': expected one of"):
        make_rule(env_spec("CartPole-v1"), cfg, torch.device("cpu"))


def test_a_built_wheel_installs_all_five_packages(tmp_path: Path) -> None:
    # Built and installed as a user would get it (not the editable install the tests run on): the wheel
    # holds the four role packages, the shared library and the dashboard's static files, and each role
    # runs from the clean venv. Dependencies come from the project venv's site-packages (no download).
    import shutil
    import venv
    import zipfile
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "runs", "*.egg-info",
                                                             "__pycache__", ".hypothesis", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("apex_zmq-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in (*ROLES, "apex_zmq"):
        assert f"{pkg}/__init__.py" in names, f"{pkg} is not in {wheel.name}"
    for role in ROLES:
        assert f"{role}/__main__.py" in names
    assert {"evaluator/dashboard/static/index.html", "evaluator/dashboard/static/uPlot.iife.min.js"} <= names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    # the licence travels with the wheel, named in its metadata (PEP 639)
    info = next(n.rpartition("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    clean = tmp_path / "venv"
    venv.create(clean, with_pip=False)
    site = next(clean.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(next(Path(sys.prefix).glob("lib/python*/site-packages")).as_posix() + "\n")
    py = clean / "bin" / "python"
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for role in ROLES:
        got = subprocess.run([str(py), "-c", f"import {role}; print({role}.__file__)"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert got.stdout.strip().startswith(str(site)), got.stdout + got.stderr
    got = subprocess.run([str(clean / "bin" / "apex-zmq"), "learner", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0 and "--algo" in got.stdout, got.stderr[-2000:]
