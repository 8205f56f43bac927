"""No import cycle among fedcost's modules (issue 17).

Edges are the imports a module runs when it is imported (module level, not under
``TYPE_CHECKING``); an import inside a function is lazy and not an edge. ``from pkg import
name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``).
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedcost"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _eager_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    statements: list[ast.Import | ast.ImportFrom] = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            statements.append(node)
        elif isinstance(node, ast.If | ast.Try) and "TYPE_CHECKING" not in ast.unparse(getattr(node, "test", node)):
            statements += [s for s in node.body if isinstance(s, ast.Import | ast.ImportFrom)]
    return statements


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for statement in _eager_imports(ast.parse(path.read_text())):
        if isinstance(statement, ast.Import):
            found |= {alias.name for alias in statement.names}
            continue
        base = statement.module or ""
        if statement.level:
            anchor = package.split(".")[: len(package.split(".")) - statement.level + 1]
            base = ".".join([*anchor, *([statement.module] if statement.module else [])])
        found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in statement.names}
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def test_fedcost_has_no_import_cycle() -> None:
    try:
        order = list(TopologicalSorter(import_graph()).static_order())
    except CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None
    assert "fedcost.schema" in order and "fedcost.cli" in order


def test_the_cores_import_neither_flower_nor_the_bindings() -> None:
    """secagg, privacy, audit, analytics, models, data and linkage are pure (DESIGN.md): no eager
    import of Flower, the bindings or deployment (an audit CLI may import it lazily)."""
    cores = ("secagg", "privacy", "audit", "analytics", "models", "data", "linkage")
    bindings = ("flwr", "fedcost.client", "fedcost.server", "fedcost.federation")
    for name, path in _modules().items():
        if name.split(".")[1:2] and name.split(".")[1] in cores:
            imported = {
                alias.name if isinstance(statement, ast.Import) else statement.module or ""
                for statement in _eager_imports(ast.parse(path.read_text()))
                for alias in statement.names
            }
            assert not {m for m in imported if m.startswith(bindings)}, f"{name} imports {sorted(imported)}"


def test_deployment_sits_above_the_bindings() -> None:
    """Layers go one way (issue 17): ``fedcost.federation`` (provisioning, processes, the
    coordinator's and the node's deployed apps) uses the bindings; ``fedcost.client`` and
    ``fedcost.server`` never import deployment, eagerly or lazily."""
    for name, path in _modules().items():
        if name.startswith(("fedcost.client", "fedcost.server")):
            imported = {
                alias.name if isinstance(statement, ast.Import) else statement.module or ""
                for statement in ast.walk(ast.parse(path.read_text()))
                if isinstance(statement, ast.Import | ast.ImportFrom)
                for alias in statement.names
            }
            assert not {m for m in imported if m.startswith("fedcost.federation")}, f"{name} imports deployment"
