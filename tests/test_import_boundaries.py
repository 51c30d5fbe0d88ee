"""The layers stay apart: the client side (`client`, `ctl`, `pytest_plugin`)
speaks gRPC only and never imports the daemon side, and nothing below the
daemon imports it. Shown twice: by importing each client-side module in a
fresh interpreter and looking at what got loaded, and by reading every import
statement (also those inside functions, which an import alone never runs)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cowbranchd

PACKAGE_DIR = Path(cowbranchd.__path__[0])

# What each layer may import from cowbranchd; everything else is off limits.
# The bottom (errors, model, v1) is shared by all; config, deadline, run and
# safefs belong to the daemon side.
CLIENT_SIDE = ("cowbranchd.client", "cowbranchd.ctl", "cowbranchd.pytest_plugin")
SHARED = ("cowbranchd.errors", "cowbranchd.model", "cowbranchd.v1")
DAEMON_SIDE = (
    "cowbranchd.config",
    "cowbranchd.daemon",
    "cowbranchd.deadline",
    "cowbranchd.ports",
    "cowbranchd.postgres",
    "cowbranchd.run",
    "cowbranchd.safefs",
    "cowbranchd.storage",
)
BOTTOM = (
    "cowbranchd.config",
    "cowbranchd.deadline",
    "cowbranchd.errors",
    "cowbranchd.model",
    "cowbranchd.run",
    "cowbranchd.safefs",
)
ALLOWED: dict[str, tuple[str, ...]] = {
    "cowbranchd.daemon": (*DAEMON_SIDE, *SHARED),
    "cowbranchd.client": ("cowbranchd.client", *SHARED),
    "cowbranchd.ctl": ("cowbranchd.ctl", "cowbranchd.client", *SHARED),
    "cowbranchd.pytest_plugin": ("cowbranchd.pytest_plugin", "cowbranchd.client", *SHARED),
    # ports is a leaf beside postgres (DESIGN.md's layer picture): the one bind
    # probe that tells a postmaster's port clash from other start failures.
    "cowbranchd.postgres": ("cowbranchd.postgres", "cowbranchd.ports", *BOTTOM),
    "cowbranchd.storage": ("cowbranchd.storage", *BOTTOM),
    "cowbranchd.ports": BOTTOM,
    "cowbranchd.config": BOTTOM,
    "cowbranchd.deadline": BOTTOM,
    "cowbranchd.errors": (),
    "cowbranchd.model": ("cowbranchd.errors",),
    "cowbranchd.run": BOTTOM,
    "cowbranchd.safefs": BOTTOM,
}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every cowbranchd module `path` imports, anywhere in the file, resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from cowbranchd import postgres` imports the module cowbranchd.postgres.
            found.update(f"{target}.{alias.name}" for alias in node.names)
            found.add(target)
    return {name for name in found if _within(name, ("cowbranchd",))}


def _files_of(layer: str) -> list[Path]:
    relative = Path(*layer.split(".")[1:])
    package = PACKAGE_DIR / relative
    if package.is_dir():
        return sorted(package.rglob("*.py"))
    return [p for p in [package.with_suffix(".py")] if p.exists()]


def _known(name: str) -> bool:
    """True for real modules, false for names such as `cowbranchd.client.Client`."""
    relative = Path(*name.split(".")[1:])
    return (PACKAGE_DIR / relative).is_dir() or (PACKAGE_DIR / relative).with_suffix(".py").exists()


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_is_below_it(layer: str) -> None:
    """Read statically, a layer's modules import only the layers it may use."""
    allowed = (layer, *ALLOWED[layer])
    offending = {
        f"{_module_name(path)} -> {name}"
        for path in _files_of(layer)
        for name in _imported(path)
        if name != "cowbranchd" and _known(name) and not _within(name, allowed)
    }
    assert sorted(offending) == []


CLIENT_MODULES = sorted(
    _module_name(path)
    for layer in CLIENT_SIDE
    for path in _files_of(layer)
    if path.name != "__main__.py"
)


@pytest.mark.parametrize("name", CLIENT_MODULES)
def test_client_side_never_loads_the_daemon_side(name: str) -> None:
    """Importing a client-side module in a fresh interpreter loads no daemon-side module."""
    probe = (
        "import importlib, json, sys; "
        f"importlib.import_module({name!r}); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    loaded = json.loads(out)
    assert [m for m in loaded if _within(m, DAEMON_SIDE)] == []
