"""The public surface is deliberate: every module's `__all__` is sorted and
names only what the module has, every layer's package declares its public
names, and the top package re-exports the client."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import cowbranchd

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(cowbranchd.__path__, "cowbranchd.")
    if not m.name.startswith("cowbranchd.v1") and not m.name.endswith(".__main__")
)

# One package per layer (docs/architecture.md).
PACKAGES = [
    "cowbranchd.client",
    "cowbranchd.ctl",
    "cowbranchd.daemon",
    "cowbranchd.postgres",
    "cowbranchd.pytest_plugin",
    "cowbranchd.storage",
]


def isort_style(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    """`__all__` lists names the module really has, in ruff's sorted order."""
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        pytest.skip(f"{name} exports nothing by __all__")
    assert list(exported) == sorted(exported, key=isort_style)
    assert [n for n in exported if not hasattr(module, n)] == []


@pytest.mark.parametrize("name", PACKAGES)
def test_each_layer_package_declares_its_public_names(name: str) -> None:
    """Each layer's package has an `__all__`: the names the layers above it may use."""
    module = importlib.import_module(name)
    assert getattr(module, "__all__", [])


def test_package_reexports_the_client() -> None:
    """`from cowbranchd import Client` works, and is the client library's class."""
    from cowbranchd import client  # noqa: PLC0415

    assert cowbranchd.Client is client.Client
    assert cowbranchd.AsyncClient is client.AsyncClient
    assert cowbranchd.Branch is client.Branch
