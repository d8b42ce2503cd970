"""The package's shape (docs/architecture.md): imports flow one way, modules stay short, the config is a leaf."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sae_ensemble"
MAX_MODULE_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Our modules `path` imports anywhere in it (inside functions and TYPE_CHECKING blocks too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) for p in paths}


def test_no_module_of_the_package_imports_back_up_a_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if target.startswith(module + "."):  # a package importing its own submodules is not a cycle
                continue
            assert state.get(target) != "open", f"import cycle: {' -> '.join(path + [target])}"
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_module_is_longer_than_400_lines_and_sweep_py_is_a_thin_entry():
    long = {
        module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
    assert len((REPO / "sweep.py").read_text().splitlines()) < 80


def test_the_config_imports_nothing_of_the_engine():  # and no torch: tests/test_config.py
    graph = import_graph()
    for module in (m for m in graph if m.startswith("sae_ensemble.config")):
        outside = {t for t in graph[module] if not t.startswith("sae_ensemble.config")}
        assert not outside, f"{module} imports {outside}: the config package is a leaf"


def test_the_engine_never_imports_hydra_or_wandb_at_module_level():
    engine = [
        "sae",
        "ensemble",
        "checkpoint",
        "rundir",
        "plan",
        "train",
        "dispatch",
        "metrics",
        "segments",
        "execution",
        "autotune",
    ]
    for name in engine:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        modules = {alias.name for n in top if isinstance(n, ast.Import) for alias in n.names} | {
            n.module or "" for n in top if isinstance(n, ast.ImportFrom)
        }
        assert not {m for m in modules if m.split(".")[0] in ("hydra", "omegaconf", "wandb")}, name
