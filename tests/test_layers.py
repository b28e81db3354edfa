"""The package's layers, read from its imports: each module imports only from its own layer or
the layers below it, and no set of modules imports each other in a circle.

docs/architecture.md ("The layers") states the same table for people; a module that is in
neither fails here until it is placed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "trio_relay"

#: Layer of each module, lowest first; a dotted prefix ending in "." places a whole package.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core: errors, limits and the wire", (
        "trio_relay._errors", "trio_relay._config", "trio_relay._wire.",
    )),
    ("seams: what a backend and an agent are", (
        "trio_relay._store.backend", "trio_relay._store.hub", "trio_relay._agents.agent",
    )),
    ("stream: one broadcaster per resource", ("trio_relay._stream.",)),
    ("connection: one client's WebSocket, requests and timers", (
        "trio_relay._server.connection", "trio_relay._server.websocket",
        "trio_relay._server.timers", "trio_relay._server.counters",
        "trio_relay._server.limits", "trio_relay._server.pairing",
        "trio_relay._server.subscription",
    )),
    ("edge: HTTP and the WebSocket handshake", (
        "trio_relay._server.edge", "trio_relay._server.http",
    )),
    ("facade: the relay an application opens", (
        "trio_relay._server.relay", "trio_relay._server.listener", "trio_relay._server.nonces",
    )),
    ("outside: stores, agents, clients, settings and the testing kit", (
        "trio_relay._store.", "trio_relay._agents.", "trio_relay._client.", "trio_relay._chat.",
        "trio_relay._settings.", "trio_relay._memory_streams",
        "trio_relay.testing", "trio_relay._testing_client", "trio_relay.pytest_plugin",
        "trio_relay.client", "trio_relay.__main__",
        "trio_relay._server", "trio_relay._stream", "trio_relay._wire", "trio_relay._store",
        "trio_relay._agents", "trio_relay._client", "trio_relay._chat", "trio_relay._settings",
        "trio_relay",
    )),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    for number, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or (member.endswith(".") and module.startswith(member)):
                return number
    raise LookupError(module)


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """The package's own modules that ``module`` imports, with the line, wherever the import
    stands (TYPE_CHECKING blocks and functions included: a dependency all the same)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from . import x`` may name a module; ``from .m import x`` names an object.
            names = [f"{prefix}.{alias.name}" for alias in node.names
                     if f"{prefix}.{alias.name}" in known] or [prefix]
        else:
            continue
        for name in names:
            if name in known and name != module:
                yield name, node.lineno


def graph() -> dict[str, dict[str, int]]:
    found = modules()
    known = set(found)
    return {module: dict(imports_of(module, path, known)) for module, path in found.items()}


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for module in modules():
        try:
            layer_of(module)
        except LookupError:
            unplaced.append(module)
    assert not unplaced, f"place these in LAYERS and in docs/architecture.md: {unplaced}"


def test_imports_go_down_or_sideways() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)}) "
        f"on line {line}"
        for module, targets in graph().items()
        for target, line in targets.items()
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_circle() -> None:
    edges = graph()
    # A package's __init__ re-exports its own modules: an edge from a module to its own
    # package's surface would be a circle, and none may exist.
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, {})):
            if state.get(target) == 1:
                circles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(" -> ".join(circle) for circle in circles)


def test_the_architecture_doc_names_every_layer() -> None:
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for title, _ in LAYERS:
        assert title in doc, f"docs/architecture.md does not describe the layer {title!r}"


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    known = {"trio_relay.a.x", "trio_relay.a.b", "trio_relay.a"}
    path = tmp_path / "m.py"
    path.write_text("from ..x import y\nfrom . import b\nfrom .. import q\n", encoding="utf-8")
    found = [name for name, _ in imports_of("trio_relay.a.b.m", path, known)]
    # ``from . import b`` in a.b.m names no module a.b.b: it imports the package a.b itself.
    assert found == ["trio_relay.a.x", "trio_relay.a.b", "trio_relay.a"]
    package = tmp_path / "__init__.py"
    package.write_text("from .x import y\nfrom . import b\n", encoding="utf-8")
    assert [name for name, _ in imports_of("trio_relay.a", package, known)] == [
        "trio_relay.a.x", "trio_relay.a.b"]
