"""The layering rule: which parts of gridd may not import which.

Read every source file with ``ast`` and list what it imports: ``import a.b``
and ``from a import b`` (as ``a.b``, since ``b`` may be a module), relative
imports resolved against the file's package, and imports anywhere in the
file, inside functions and ``if TYPE_CHECKING:`` blocks included. A name
given as a string (``ServiceMaker("gridd", "gridd.server.tap", ...)``) is
not an import and is not seen. docs/architecture.md draws the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (layer, what it may not import, exceptions to that). A module belongs to a
# layer if its name is the layer's or lies under it; an import is forbidden
# if its name is, or lies under, one that is forbidden and under no exception.
RULES = [
    ("gridd.wire", ["gridd.store"], []),
    ("gridd.scheduler", ["gridd.wire", "gridd.server", "gridd.worker", "gridd.client", "gridd.cli"], []),
    ("gridd.store", ["gridd.scheduler", "gridd.server", "gridd.wire", "gridd.worker"], []),
    ("gridd.worker", ["gridd.scheduler", "gridd.store", "gridd.server"], []),
    ("twisted.plugins.gridd_plugins", ["gridd"], ["gridd.server.tap", "gridd.worker.tap"]),
    # The photos job type runs in workers and gridctl: the MySQL URI and connection settings are
    # shared with gridd's store, nothing of the server side is.
    ("gridd.photos", ["gridd.scheduler", "gridd.server", "gridd.wire", "gridd.worker", "gridd.cli"], []),
]


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_name(path: Path) -> str:
    """``gridd/scheduler/queue.py`` -> ``gridd.scheduler.queue``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every (line, imported name) in ``source``, as if it were the module ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return sorted(found)


def violations(source: str, module: str, forbidden, allowed, is_package: bool = False) -> list[tuple[int, str]]:
    return [
        (line, name)
        for line, name in imports(source, module, is_package)
        if any(under(name, f) for f in forbidden) and not any(under(name, a) for a in allowed)
    ]


def sources() -> list[Path]:
    return sorted((ROOT / "gridd").rglob("*.py")) + sorted((ROOT / "twisted" / "plugins").glob("*.py"))


@pytest.mark.parametrize(("layer", "forbidden", "allowed"), RULES, ids=[rule[0] for rule in RULES])
def test_layer_imports_nothing_forbidden(layer, forbidden, allowed):
    files = [path for path in sources() if under(module_name(path), layer)]
    assert files, f"no source file belongs to {layer}: the rule checks nothing"
    found = [
        f"{path.relative_to(ROOT)}:{line}: imports {name} ({layer} may not import {', '.join(forbidden)})"
        for path in files
        for line, name in violations(
            path.read_text(encoding="utf-8"), module_name(path), forbidden, allowed, path.name == "__init__.py"
        )
    ]
    assert not found, "layering broken:\n" + "\n".join(found)


def test_checker_reports_a_forbidden_import_wherever_it_hides():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from gridd import errors, wire\n"
        "if TYPE_CHECKING:\n"
        "    import gridd.server.session\n"
        "def later():\n"
        "    from ..client import Client\n"
    )
    _, forbidden, allowed = RULES[1]
    assert violations(source, "gridd.scheduler.queue", forbidden, allowed) == [
        (2, "gridd.wire"),
        (4, "gridd.server.session"),
        (6, "gridd.client.Client"),
    ]


def test_checker_resolves_relative_imports():
    assert imports("from . import leases", "gridd.scheduler.queue") == [(1, "gridd.scheduler.leases")]
    assert imports("from . import leases", "gridd.scheduler", is_package=True) == [(1, "gridd.scheduler.leases")]
    assert imports("from ..store.base import IStore", "gridd.scheduler.results") == [(1, "gridd.store.base.IStore")]


def test_checker_keeps_the_plugins_exception_to_the_taps():
    _, forbidden, allowed = RULES[4]
    source = "from gridd.server import tap\nimport gridd.worker.tap\nfrom gridd.server import session\n"
    assert violations(source, "twisted.plugins.gridd_plugins", forbidden, allowed) == [(3, "gridd.server.session")]
