"""`cowbranchd install` / `uninstall` into a `--root` directory: what a dry run
prints (a golden file), that the unit it writes passes `systemd-analyze
verify`, that uninstall takes back all of it (config and data only with
--purge), and that hostile values and planted links are refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cowbranchd.host.files import Pool, render_unit
from tests.fix_postgres import TEST_PORTS

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "install-dry-run.txt"
VENV_EXEC = Path(sys.prefix) / "bin" / "cowbranchd"
PORTS = f"{TEST_PORTS[1] - 19}-{TEST_PORTS[1] - 10}"


def cowbranchd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cowbranchd.host", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` -> its content (files), link target or "dir"."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            found[name] = "dir"
        else:
            found[name] = path.read_text()
    return found


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    """An empty root with the group files groupadd --prefix works on (and their
    backups, which the shadow tools rewrite on every change)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name, text in (("group", "root:x:0:\n"), ("gshadow", "root:*::\n")):
        for suffix in ("", "-"):
            (root / "etc" / f"{name}{suffix}").write_text(text)
    return root


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_repository_unit_is_the_default_rendering() -> None:
    """systemd/cowbranchd.service is what install writes for /opt/cowbranchd and a loop pool."""
    assert (REPO / "systemd" / "cowbranchd.service").read_text() == render_unit()


@pytest.mark.parametrize(
    "pool", [Pool("loop"), Pool("btrfs", "/var/tmp"), Pool("zfs", "tank/cowbranchd")], ids=str
)
def test_the_generated_unit_passes_systemd_analyze_verify(tmp_path: Path, pool: Pool) -> None:
    """For each kind of pool the unit verifies cleanly, with ExecStart a real cowbranchd."""
    unit = tmp_path / "cowbranchd.service"
    unit.write_text(render_unit(VENV_EXEC, tmp_path / "config.toml", pool))
    result = verify(unit)
    assert (result.returncode, result.stderr) == (0, "")


def test_dry_run_prints_every_step_and_changes_nothing(host_root: Path) -> None:
    """`install --dry-run` prints the golden steps and files (paths substituted), writes nothing."""
    before = tree(host_root)
    result = cowbranchd(
        "install", "--dry-run", "--use-current-venv", "--pool", "btrfs:/srv/cowbranchd",
        "--root", str(host_root),
    )
    expected = GOLDEN.read_text().format(root=host_root, venv=sys.prefix)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == expected
    assert tree(host_root) == before


@pytest.mark.btrfs
def test_install_then_uninstall_leaves_nothing(host_root: Path, btrfs_pool: Path) -> None:
    """Install writes the config, group, unit and record (the unit verifies and is enabled);
    uninstall takes all of it back but the config and data; --purge removes those too."""
    before = tree(host_root)
    result = cowbranchd(
        "install", "--use-current-venv", "--pool", f"btrfs:{btrfs_pool}", "--port-range", PORTS,
        "--root", str(host_root),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    etc = host_root / "etc"
    unit = etc / "systemd" / "system" / "cowbranchd.service"
    assert oct((etc / "cowbranchd" / "config.toml").stat().st_mode) == "0o100644"
    assert oct(unit.stat().st_mode) == "0o100644"
    assert f"ExecStart={VENV_EXEC} --config /etc/cowbranchd/config.toml\n" in unit.read_text()
    assert (etc / "group").read_text().startswith("root:x:0:\ncowbranchd:x:")
    wanted = etc / "systemd" / "system" / "multi-user.target.wants" / "cowbranchd.service"
    assert os.readlink(wanted) == "/etc/systemd/system/cowbranchd.service"
    assert (verify(unit).returncode, verify(unit).stderr) == (0, "")

    state = host_root / "var" / "lib" / "cowbranchd" / "logs"
    state.mkdir(parents=True)
    (state / "br-1.log").write_text("a branch's log\n")
    result = cowbranchd("uninstall", "--root", str(host_root))
    assert result.returncode == 0, result.stdout + result.stderr
    left = {k: v for k, v in tree(host_root).items() if not k.startswith("etc/g")}
    assert sorted(set(left) - set(before)) == [
        "etc/cowbranchd",
        "etc/cowbranchd/config.toml",
        "var",
        "var/lib",
        "var/lib/cowbranchd",
        "var/lib/cowbranchd/logs",
        "var/lib/cowbranchd/logs/br-1.log",
    ]
    assert (etc / "group").read_text() == "root:x:0:\n"

    result = cowbranchd("uninstall", "--purge", "--root", str(host_root))
    assert result.returncode == 0, result.stdout + result.stderr
    shutil.rmtree(host_root / "var" / "lib")  # the test's own parent directories
    (host_root / "var").rmdir()
    # etc/group- and etc/gshadow- are the shadow tools' backups of the last change.
    backups = ("etc/group-", "etc/gshadow-")
    after = {k: v for k, v in tree(host_root).items() if k not in backups}
    assert after == {k: v for k, v in before.items() if k not in backups}


def test_uninstall_leaves_a_unit_it_did_not_write(host_root: Path) -> None:
    """An operator's own cowbranchd.service (no install marker) is kept, and said so."""
    units = host_root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / "cowbranchd.service").write_text("[Service]\nExecStart=/bin/true\n")
    result = cowbranchd("uninstall", "--root", str(host_root))
    assert result.returncode == 0
    assert "keep /etc/systemd/system/cowbranchd.service: not written by cowbranchd install" in (
        result.stdout
    )
    assert (units / "cowbranchd.service").read_text() == "[Service]\nExecStart=/bin/true\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pool", "btrfs:/srv/x\nExecStart=/bin/sh"], "is not an absolute path of letters"),
        (["--pool", "btrfs:srv/x"], "is not an absolute path of letters"),
        (["--pool", "btrfs:/srv/../etc"], "is not normalised"),
        (["--pool", "zfs:tank/a b"], "is not a ZFS dataset"),
        (["--socket-group", "wheel;rm"], "is not a group name"),
        (["--prefix", "/opt/x y"], "is not an absolute path of letters"),
    ],
)
def test_hostile_values_are_refused_before_anything_is_written(
    host_root: Path, args: list[str], message: str
) -> None:
    """A value that could add a line to the unit or config, or leave the tree, is a usage
    error naming it; the root is untouched."""
    before = tree(host_root)
    result = cowbranchd("install", "--use-current-venv", "--root", str(host_root), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert tree(host_root) == before


def test_a_planted_link_is_not_followed(host_root: Path, tmp_path: Path) -> None:
    """With /etc/systemd a link to elsewhere, install refuses to write the unit through it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (host_root / "etc" / "systemd").symlink_to(elsewhere)
    result = cowbranchd(
        "install", "--use-current-venv", "--skip-doctor", "--root", str(host_root),
    )
    assert result.returncode == 1
    assert f"{host_root}/etc/systemd is a symbolic link or not a directory; refusing" in (
        result.stderr
    )
    assert list(elsewhere.iterdir()) == []
