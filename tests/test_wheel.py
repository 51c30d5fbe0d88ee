"""The release artifacts: `python -m build` makes an sdist and a wheel from the
checkout; the wheel, installed with its dependencies into a fresh venv
outside the checkout, carries the generated protobuf modules and type
information, and its `cowbranchd`, `cowbranchctl` and pytest plugin run."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

import cowbranchd

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def sh(argv: Sequence[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `argv` in `cwd` with nothing of this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and wheel `python -m build` makes (the wheel from the sdist)."""
    out = tmp_path_factory.mktemp("dist")
    sh([sys.executable, "-m", "build", "--outdir", out, REPO], cwd=out)
    return out


@pytest.fixture(scope="module")
def wheel_venv(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel, its dependencies (pip's cache) and pytest."""
    venv = tmp_path_factory.mktemp("venv")
    sh([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv)
    (wheel,) = artifacts.glob("cowbranchd-*.whl")
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
    sh([*pip, "install", "-q", "--disable-pip-version-check", wheel, "pytest"], cwd=venv)
    return venv


def test_build_makes_an_sdist_and_a_wheel(artifacts: Path) -> None:
    """One of each, named for this version."""
    version = cowbranchd.__version__
    assert sorted(p.name for p in artifacts.iterdir()) == [
        f"cowbranchd-{version}-py3-none-any.whl",
        f"cowbranchd-{version}.tar.gz",
    ]


def test_the_wheel_carries_generated_code_and_type_information(artifacts: Path) -> None:
    """Protobuf modules and their stubs, py.typed, every package of the layers."""
    (wheel,) = artifacts.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for proto in ("bases", "branches", "daemon"):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert f"cowbranchd/v1/{proto}{suffix}" in names
    assert "cowbranchd/py.typed" in names
    packages = sorted(
        str(p.parent.relative_to(REPO / "src"))
        for p in (REPO / "src" / "cowbranchd").rglob("__init__.py")
    )
    assert [p for p in packages if f"{p}/__init__.py" not in names] == []


def test_the_installed_commands_run_outside_the_checkout(wheel_venv: Path) -> None:
    """`cowbranchd --version`, `cowbranchd doctor --help`, `cowbranchctl --help` from the venv,
    importing cowbranchd from the venv, not from this checkout."""
    bin_dir = wheel_venv / "bin"
    version = sh([bin_dir / "cowbranchd", "--version"], cwd=wheel_venv).stdout
    assert version == f"cowbranchd {cowbranchd.__version__}\n"
    assert "--json" in sh([bin_dir / "cowbranchd", "doctor", "--help"], cwd=wheel_venv).stdout
    assert "doctor" in sh([bin_dir / "cowbranchctl", "--help"], cwd=wheel_venv).stdout
    where = sh(
        [bin_dir / "python", "-c", "import cowbranchd.v1.branches_pb2 as m; print(m.__file__)"],
        cwd=wheel_venv,
    ).stdout
    assert where.startswith(str(wheel_venv / "lib"))


def test_the_pytest_plugin_loads_from_the_wheel(wheel_venv: Path) -> None:
    """pytest in the venv finds the plugin by its entry point: its options are in --help, and
    a test run sees it registered."""
    bin_dir = wheel_venv / "bin"
    assert "--cowbranch-parent" in sh([bin_dir / "pytest", "--help"], cwd=wheel_venv).stdout
    test = wheel_venv / "test_loaded.py"
    test.write_text(
        "def test_plugin(pytestconfig):\n"
        "    assert pytestconfig.pluginmanager.hasplugin('cowbranchd')\n"
    )
    out = sh([bin_dir / "pytest", "-q", "-p", "no:cacheprovider", test], cwd=wheel_venv).stdout
    assert "1 passed" in out
