"""Every package and module keeps the import rule its docstring states (issue 17).

The rules are written twice on purpose: in the docstrings (for the reader) and in ``RULES``
below (for this test). The test checks both directions: every import of the tree, lazy ones
inside functions included, against ``RULES``; every rule against its docstring (each name it
forbids is named in a "never import" sentence there); and every "never import" sentence of the
tree that names a package against ``RULES``, so a rule added to a docstring and not here fails.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[2]
# Where each top-level package's source lives (txclient is its own distribution, src layout).
PACKAGE_DIRS: Final = {
    "consistency": ROOT / "consistency",
    "regionstore": ROOT / "regionstore",
    "router": ROOT / "router",
    "infra": ROOT / "infra",
    "bench": ROOT / "bench",
    "chaos": ROOT / "chaos",
    "txclient": ROOT / "txclient" / "src" / "txclient",
}
SERVER: Final = ("consistency", "regionstore", "router", "infra", "bench", "chaos")
REQUEST_PATHS: Final = (
    "router.resolver",
    "router.writes",
    "router.batcher",
    "router.opens",
    "router.reads",
    "router.saga_step",
    "router.outcomes",
)


@dataclass(frozen=True)
class Rule:
    """The modules under ``scope`` (a module, or a package and everything below it) never
    import ``forbidden`` (a module or anything below it); ``doc`` is the module whose docstring
    states the rule; ``module_level`` limits the rule to imports outside functions."""

    scope: tuple[str, ...]
    forbidden: tuple[str, ...]
    doc: str
    module_level: bool = False


def rule(scope: str, *forbidden: str) -> Rule:
    return Rule((scope,), forbidden, scope)


RULES: Final = (
    rule("consistency", "regionstore", "router", "infra", "bench", "chaos", "txclient"),
    rule("consistency.failover_plan", "regionstore", "infra"),
    rule("consistency.slot_moves", "regionstore", "infra"),
    rule("consistency.reconcile", "regionstore"),
    rule("regionstore", "router", "infra", "bench", "chaos", "txclient"),
    rule("regionstore.audit", "router", "bench", "chaos", "infra"),
    rule("regionstore.saga_keys", "router"),
    rule("router", "infra", "bench", "chaos", "txclient"),
    rule("router.ratelimit", "infra", "bench", "chaos"),
    rule("router.relays", "infra", "bench", "chaos"),
    rule("router.events", "bench", "chaos", "infra"),
    Rule(
        REQUEST_PATHS,
        ("aiohttp", "router.errors", "router.handlers", "router.validation"),
        "router",
    ),
    rule("infra.local", "infra.cli", "infra.failover", "infra.controller", "bench", "chaos"),
    Rule(("infra.cli",), ("bench", "chaos", "infra.events"), "infra.cli", module_level=True),
    rule("chaos", "bench"),
    rule("chaos.checker", "router", "regionstore", "infra", "bench"),
    rule("txclient", *SERVER),
)


def module_name(path: Path) -> str:
    for top, base in PACKAGE_DIRS.items():
        if path.is_relative_to(base):
            rel = path.relative_to(base).with_suffix("")
            parts = [top, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts)
    raise ValueError(path)


def modules() -> Iterator[tuple[str, Path]]:
    for base in PACKAGE_DIRS.values():
        for path in sorted(base.rglob("*.py")):
            yield module_name(path), path


def _resolve(name: str, node: ast.ImportFrom, *, is_package: bool) -> str:
    """The absolute module of a relative ``from . import x`` inside ``name`` (a package's
    ``__init__`` is inside its own package, a plain module inside its parent)."""
    parts = name.split(".") + ([""] if is_package else [])
    base = parts[: len(parts) - node.level]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(
    name: str, tree: ast.Module, *, module_level: bool, is_package: bool = False
) -> Iterator[tuple[int, str]]:
    """(line, imported name) of every import; ``from a import b`` yields ``a`` and ``a.b``."""

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[int, str]]:
        if isinstance(node, ast.Import) and not (module_level and in_function):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and not (module_level and in_function):
            if node.level == 0:
                mod = node.module or ""
            else:
                mod = _resolve(name, node, is_package=is_package)
            yield node.lineno, mod
            for alias in node.names:
                yield node.lineno, f"{mod}.{alias.name}"
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, inner)

    yield from visit(tree, False)


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(
    name: str, source: str, rules: tuple[Rule, ...] = RULES, *, is_package: bool = False
) -> list[str]:
    tree = ast.parse(source)
    out = []
    for r in rules:
        if not any(within(name, s) for s in r.scope):
            continue
        found = imports(name, tree, module_level=r.module_level, is_package=is_package)
        for line, imported in found:
            for f in r.forbidden:
                if within(imported, f):
                    out.append(f"{name}:{line} imports {imported} (forbidden: {f}, see {r.doc})")
    return out


def test_the_tree_keeps_every_import_rule() -> None:
    found = [
        v
        for name, path in modules()
        for v in violations(name, path.read_text(), is_package=path.name == "__init__.py")
    ]
    assert found == []


def test_every_scope_exists() -> None:
    names = {name for name, _ in modules()}
    for r in RULES:
        for s in (*r.scope, r.doc):
            assert s in names, s


# "never import", "never imports", not "never imported" (who may import a package is the
# importer's rule). A sentence ends at a full stop, colon or semicolon before a blank.
_SENTENCE_RE: Final = re.compile(r"never\s+imports?\b(.*?)(?:[.:;](?:\s|$)|$)", re.I | re.S)
_NAME_RE: Final = re.compile(
    r"\b(?:aiohttp|consistency|regionstore|router|infra|bench|chaos|txclient)(?:\.[a-z_]+)*\b"
)


def forbidden_in_docstring(path: Path) -> set[str]:
    """The package and module names the docstring's "never import" sentences name."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return {n for m in _SENTENCE_RE.finditer(doc) for n in _NAME_RE.findall(m.group(1))}


@pytest.mark.parametrize("r", RULES, ids=lambda r: f"{r.doc}:{','.join(r.forbidden)}")
def test_each_rule_is_stated_in_its_docstring(r: Rule) -> None:
    paths = dict(modules())
    stated = forbidden_in_docstring(paths[r.doc])
    # "the server's packages (router, regionstore, ...)" names them; "never imports the
    # server" alone would not, and fails here.
    assert set(r.forbidden) <= stated, (r.doc, sorted(set(r.forbidden) - stated))


def test_every_rule_a_docstring_states_is_checked() -> None:
    holders = {r.doc for r in RULES}
    for name, path in modules():
        if forbidden_in_docstring(path):
            assert name in holders, f"{name} states an import rule this test does not check"


def test_every_package_docstring_states_a_rule() -> None:
    # Each package says what it must never import (STYLE.md): a package without the sentence
    # fails, bench (which may import everything) by saying so.
    for top, base in PACKAGE_DIRS.items():
        doc = ast.get_docstring(ast.parse((base / "__init__.py").read_text())) or ""
        assert re.search(r"never\s+import|may import every", doc, re.I), top


def test_the_checker_finds_what_a_rule_forbids() -> None:
    # The scanner itself: a direct, a from-, a lazy and a relative import are all seen, and
    # a module-level rule ignores the lazy one.
    source = (
        "import infra.local\n"
        "from infra import cli\n"
        "def f():\n"
        "    from bench import suite\n"
        "from . import errors\n"
    )
    found = violations("router.writes", source)
    assert any("imports infra.local" in v for v in found)
    assert any("imports infra.cli" in v for v in found)
    assert any("imports bench.suite" in v for v in found)
    assert any("imports router.errors" in v for v in found)
    lazy = Rule(("infra.cli",), ("bench",), "infra.cli", module_level=True)
    assert violations("infra.cli.runs", source, (lazy,)) == []
    assert violations("infra.cli.runs", "import bench\n", (lazy,)) != []

    # Relative imports resolve: in a package's __init__, "." is the package itself.
    def names(name: str, source: str, *, is_package: bool) -> set[str]:
        tree = ast.parse(source)
        return {n for _, n in imports(name, tree, module_level=False, is_package=is_package)}

    assert "router.errors" in names("router", "from . import errors", is_package=True)
    assert "router.errors" in names("router.relays", "from .. import errors", is_package=True)
    assert "router.errors" in names("router.writes", "from .errors import X", is_package=False)


def test_the_breaker_imports_nothing_of_the_router_but_its_limits() -> None:
    # router/breaker.py's docstring: "Imports nothing of the router but its limits."
    path = PACKAGE_DIRS["router"] / "breaker.py"
    assert "Imports nothing of the router but its limits" in path.read_text()
    tree = ast.parse(path.read_text())
    ours = {n for _, n in imports("router.breaker", tree, module_level=False)}
    assert {n for n in ours if within(n, "router") and not within(n, "router.limits")} == set()
