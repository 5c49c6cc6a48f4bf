"""The package's import order is the one ``docs/architecture.md`` states, and no import circle exists.

Every import in ``flexlora_pl/`` counts: module-level ones, function-local ones and ``TYPE_CHECKING`` ones, since
each is a dependency a reader has to follow. A room is a sub-package (``core``, ``methods``, …) or a top-level
module (``module``, ``sources``); a room may import its own modules and the rooms below it, never one above.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "flexlora_pl"


def _stated_order() -> list[str]:
    """The rooms, top to bottom, from architecture.md's line "Imports point downwards only: `a` → `b` → …"."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("Imports point downwards only"))
    return re.findall(r"`(\w+)`", line)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The ``flexlora_pl`` modules ``path`` imports, wherever the import statement sits."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("flexlora_pl"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("flexlora_pl"):
            for alias in node.names:  # `from flexlora_pl import export` imports a module, not a name
                candidate = f"{node.module}.{alias.name}"
                submodule = PACKAGE.parent / Path(*candidate.split("."))
                found.add(candidate if submodule.with_suffix(".py").is_file() or submodule.is_dir() else node.module)
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "flexlora_pl"


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_architecture_states_every_room_once():
    order = _stated_order()
    rooms = {_room(module) for module in _graph()} - {"flexlora_pl"}
    assert len(order) == len(set(order)), f"a room is named twice in architecture.md's order: {order}"
    assert set(order) == rooms, (f"architecture.md's import order {order} should name exactly the package's rooms "
                                 f"{sorted(rooms)}")


def test_imports_point_downwards_only():
    order = _stated_order()
    level = {room: i for i, room in enumerate(order)}
    upward = []
    for module, targets in _graph().items():
        source = _room(module)
        if source == "flexlora_pl":  # the package's __init__ re-exports the public names of every room
            continue
        for target in targets:
            room = _room(target)
            if room == "flexlora_pl":
                upward.append(f"{module} imports the package root (import from the room that defines the name)")
            elif room != source and level[room] < level[source]:
                upward.append(f"{module} ({source}) imports {target} ({room}), which lies above it")
    assert not upward, "imports that point upwards against docs/architecture.md:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    graph = _graph()
    modules = set(graph)

    def resolve(target: str) -> str | None:  # `flexlora_pl.core.allocation` or a package's __init__
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {t for t in map(resolve, targets) if t and t != m} for m, targets in graph.items()}
    # a package's __init__ re-exporting its own modules is how packages work, not a circle
    edges = {m: {t for t in ts if not (t.startswith(m + ".") or (m.startswith(t + ".") and _is_package(t)))}
             for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / Path(*module.split(".")) / "__init__.py").is_file()
