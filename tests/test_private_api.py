"""trio-relay uses only the public APIs of trio, trio-websocket, wsproto and h11, and its
dependency pins say so.

A private attribute of a dependency can change in any release; reaching into one forces an
upper pin that conflicts with the user's other packages. So every module of `trio_relay` is
parsed, and these fail:

- an import of a private module or name of those packages (``trio._core``,
  ``trio_websocket._impl``, ``h11._util``, ``wsproto.frame_protocol``, ``from trio import
  _x``);
- any attribute access ``x._name`` (one leading underscore) on a name bound to one of those
  packages, or to anything imported from them;
- any attribute access ``x._name`` at all, unless ``x`` is ``self`` or ``cls``, or the access is
  in `ALLOWED` below (by file and expression, each with its reason): the rule cannot know
  what ``x`` is, so our own objects reaching into each other are listed one by one;
- ``getattr``/``setattr``/``hasattr``/``delattr`` with a private name.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "trio_relay"
DEPENDENCIES = ("trio", "trio_websocket", "wsproto", "h11")
#: Modules of those packages that are not public API though their names do not say so.
PRIVATE_MODULES = frozenset({"wsproto.frame_protocol"})

_TABLE = "the class's dispatch table of its methods"
_OWN_STORE = "the SQLite backend's private ChatStore adapter, in the backend's own module"
_OWN_PG_STORE = "the PostgreSQL backend's private ChatStore adapter, in the backend's own module"
_OWN_CLIENT = "the client library's own classes, each in the module that makes them"

#: (file under trio_relay/, expression) -> why it is not a dependency's private attribute.
ALLOWED: dict[tuple[str, str], str] = {
    ("_client/client.py", "subscription._inbox"): _OWN_CLIENT,
    ("_client/client.py", "watcher._push"): _OWN_CLIENT,
    ("_client/client.py", "client._link"): _OWN_CLIENT,
    ("_client/client.py", "client._supervise"): _OWN_CLIENT,
    ("_client/client.py", "client._close"): _OWN_CLIENT,
    ("_client/transport.py", "link._reader"): _OWN_CLIENT,
    ("_client/transport.py", "link._writer"): _OWN_CLIENT,
    ("_client/transport.py", "link._keepalive"): _OWN_CLIENT,
    ("_chat/cli.py", "argparse._SubParsersAction"):
        "a type annotation only: the standard library names no public type for what "
        "add_subparsers returns (typeshed uses this one)",
    ("_server/relay.py", "relay._registry"): "open_relay starts the tasks of the Relay it made",
    ("_server/relay.py", "relay._timers"): "open_relay starts the tasks of the Relay it made",
    ("_server/relay.py", "relay._begin_shutdown"): "open_relay shuts down the Relay it made",
    ("_server/relay.py", "relay._watch_devices"):
        "open_relay starts the tasks of the Relay it made",
    ("_server/relay.py", "relay._hear_stops"): "open_relay starts the tasks of the Relay it made",
    ("_store/sqlite.py", "backend._closed"):
        "the backend's own context manager marks the backend it made closed",
    ("_store/sqlite.py", "backend._replies"):
        "the backend's own context manager runs the reply runner of the backend it made",
    ("_store/sqlite.py", "backend._lock"): _OWN_STORE,
    ("_store/sqlite.py", "backend._run"): _OWN_STORE,
    ("_store/sqlite.py", "self.backend._run"): _OWN_STORE,
    ("_store/postgres.py", "backend._closed"):
        "the backend's own context manager marks the backend it made closed",
    ("_store/postgres.py", "backend._replies"):
        "the backend's own context manager runs the reply runner of the backend it made",
    ("_store/postgres.py", "backend._drain"):
        "the backend's own context manager starts the tasks of the backend it made",
    ("_store/postgres.py", "backend._maintain"):
        "the backend's own context manager starts the tasks of the backend it made",
    ("_store/postgres.py", "backend._run_anyway"):
        "the backend's own close releases the jobs of the backend it made",
    ("_store/postgres.py", "backend._undeleted"):
        "the backend's own close clears the events of the backend it made",
    ("_store/postgres.py", "backend._clear"):
        "the backend's own close clears the events of the backend it made",
    ("_store/postgres.py", "backend._emit"): _OWN_PG_STORE,
    ("_store/postgres.py", "backend._jobs"): _OWN_PG_STORE,
    ("_store/postgres.py", "backend._lease"): _OWN_PG_STORE,
    ("_store/postgres.py", "backend._lock"): _OWN_PG_STORE,
    ("_store/postgres.py", "backend._run"): _OWN_PG_STORE,
    ("_store/postgres.py", "self.backend._run"): _OWN_PG_STORE,
    ("_server/websocket.py", "ServerWebSocket._on_bytes"): _TABLE,
    ("_server/websocket.py", "ServerWebSocket._on_ping"): _TABLE,
    ("_server/websocket.py", "ServerWebSocket._on_pong"): _TABLE,
    ("_server/websocket.py", "ServerWebSocket._on_close"): _TABLE,
    ("testing.py", "relay._nursery"):
        "the memory relay serves its listener in the nursery of our own Relay",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_dependency(module: str) -> bool:
    return module.split(".")[0] in DEPENDENCIES


def _private_module(module: str) -> bool:
    parts = module.split(".")
    return any(_private(part) for part in parts[1:]) or any(
        module == private or module.startswith(private + ".") for private in PRIVATE_MODULES)


def _root(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def violations(source: str, filename: str) -> Iterator[tuple[int, str, str]]:
    """(line, expression, what is wrong) for each breach of the rule in ``source``; the
    accesses a test may allow come with ``what`` == "private attribute"."""
    tree = ast.parse(source, filename)
    bound: set[str] = set()  # names bound to a dependency or to something imported from one
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_dependency(alias.name):
                    if _private_module(alias.name):
                        yield node.lineno, f"import {alias.name}", "private module"
                    bound.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                _is_dependency(node.module)):
            if _private_module(node.module):
                yield node.lineno, f"from {node.module} import ...", "private module"
            for alias in node.names:
                if _private(alias.name):
                    yield node.lineno, f"from {node.module} import {alias.name}", "private name"
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            expression = ast.unparse(node)
            if _root(node) in bound:
                yield node.lineno, expression, "private attribute of a dependency"
            elif not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                yield node.lineno, expression, "private attribute"
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
            yield node.lineno, ast.unparse(node), "private attribute"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_touches_a_private_attribute_of_a_dependency() -> None:
    found: list[str] = []
    used: set[tuple[str, str]] = set()
    for path in _modules():
        name = path.relative_to(PACKAGE).as_posix()
        for line, expression, what in violations(path.read_text(), str(path)):
            if what == "private attribute" and (name, expression) in ALLOWED:
                used.add((name, expression))
                continue
            found.append(f"trio_relay/{name}:{line}: {expression} ({what})")
    assert not found, "\n".join(found)
    # An entry that allows nothing any more goes, so the list stays the truth.
    assert set(ALLOWED) == used, f"stale entries in ALLOWED: {sorted(set(ALLOWED) - used)}"


@pytest.mark.parametrize("source", [
    "from trio._core import current_task",
    "import trio._core._run",
    "import trio_websocket._impl as impl",
    "from trio_websocket._impl import WebSocketConnection",
    "from wsproto.frame_protocol import Opcode",
    "import wsproto.frame_protocol",
    "from h11._util import RemoteProtocolError",
    "from trio import _core",
    "import trio\ntrio._core.current_task()",
    "import trio as t\nt.lowlevel._private",
    "from wsproto.connection import Connection as C\nC(1)._proto",
    "from trio_websocket import WebSocketConnection\nWebSocketConnection._wsproto",
    "def f(ws):\n    return ws._wsproto.connection._proto",
    "class C:\n    def f(self):\n        return self._ws._proto",
    "getattr(stream, '_write_lock')",
    "setattr(ws, '_close_reason', None)",
])
def test_the_rule_catches(source: str) -> None:
    assert list(violations(source, "example.py"))


@pytest.mark.parametrize("source", [
    "import trio\ntrio.lowlevel.checkpoint()",
    "from wsproto.connection import Connection\nConnection.__name__",
    "class C:\n    def f(self):\n        return self._ws\n    @classmethod\n    def g(cls):\n"
    "        return cls._made",
    "from ._relay import _raise_single",  # our own modules may share private names
    "getattr(fn, '__name__', 'call')",
    "x.__class__.__name__",
])
def test_the_rule_allows(source: str) -> None:
    assert not list(violations(source, "example.py"))


# --- the pins -------------------------------------------------------------------------------------


def _requirements() -> dict[str, Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = (Requirement(line) for line in pyproject["project"]["dependencies"])
    return {r.name.lower().replace("_", "-"): r for r in found}


def _upper_bounds(requirement: Requirement) -> list[Version]:
    bounds = []
    for spec in requirement.specifier:
        if spec.operator in ("<", "<="):
            bounds.append(Version(spec.version))
        elif spec.operator in ("==", "===", "~="):
            pytest.fail(f"{requirement} pins an exact release or series: {spec}")
    return bounds


def test_the_pins_follow_the_public_apis_used() -> None:
    requirements = _requirements()
    # wsproto's Connection, ConnectionType/State, events and generate_accept_token are public
    # since 1.2 and stay so within a major release.
    assert str(requirements["wsproto"].specifier) == str(
        Requirement("wsproto>=1.2,<2").specifier)
    # h11's documented API, within its major release (still 0.x).
    assert str(requirements["h11"].specifier) == str(Requirement("h11>=0.14,<1").specifier)
    # trio-websocket: public API only (the client side), so no upper pin below 1.0.
    websocket = requirements["trio-websocket"]
    assert Version("0.12.2") in websocket.specifier
    assert not [v for v in _upper_bounds(websocket) if v < Version("1")]
    assert Version("0.13") in websocket.specifier and Version("0.99") in websocket.specifier
    # trio: no upper pin at all.
    assert not _upper_bounds(requirements["trio"])


@pytest.mark.parametrize("name", ["trio", "trio-websocket", "wsproto", "h11"])
def test_the_installed_release_is_within_its_pin(name: str) -> None:
    requirement = _requirements()[name]
    assert Version(metadata.version(name)) in requirement.specifier
