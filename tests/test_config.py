"""Config: every key has a default; bad keys and values name the key and file."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from cowbranchd.config import Config, load_config, parse_duration
from cowbranchd.errors import InvalidArgument


def test_defaults_need_no_file() -> None:
    """No file means every default, including the socket under /run/cowbranchd."""
    config = load_config(None)
    assert config == Config()
    assert str(config.daemon.socket) == "/run/cowbranchd/api.sock"
    assert config.postgres.port_range == (54000, 54999)


def test_file_values_are_parsed(tmp_path: Path) -> None:
    """Durations, sizes, ranges and tables are converted to typed values."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[daemon]\nreap_interval = "250ms"\ndefault_ttl = "2h"\nmax_branches = 7\n'
        '[storage]\ndriver = "zfs"\nroot = "tank/cb"\nloop_size = "2G"\n'
        '[postgres]\nport_range = "6000-6009"\nsettings = { work_mem = "8MB" }\n'
    )
    config = load_config(path)
    assert config.daemon.reap_interval == timedelta(milliseconds=250)
    assert config.daemon.default_ttl == timedelta(hours=2)
    assert config.daemon.max_branches == 7
    assert (config.storage.driver, config.storage.root, config.storage.loop_size) == (
        "zfs",
        "tank/cb",
        2 * 1024**3,
    )
    assert config.postgres.port_range == (6000, 6009)
    assert config.postgres.settings == {"work_mem": "8MB"}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[daemon]\nsockett = '/x'\n", "daemon.sockett"),
        ("[nope]\n", "nope"),
        ("[daemon]\nmax_branches = -1\n", "daemon.max_branches"),
        ("[daemon]\nsocket = 'relative'\n", "daemon.socket"),
        ("[daemon]\nreap_interval = 'soon'\n", "daemon.reap_interval"),
        ("[storage]\ndriver = 'ext4'\n", "storage.driver"),
        ("[postgres]\nport_range = '10-5'\n", "postgres.port_range"),
        ("[daemon]\nlog_format = 'xml'\n", "daemon.log_format"),
        ("not toml at all [", "config"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    """A bad key or value is an error naming it and the file."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as info:
        load_config(path)
    assert info.value.field == key
    assert str(path) in str(info.value)


def test_durations() -> None:
    """Durations combine units; garbage is rejected."""
    assert parse_duration("x", "1h30m") == timedelta(minutes=90)
    assert parse_duration("x", "1.5s") == timedelta(seconds=1.5)
    for bad in ("", "5", "5 s", "1y", "-1s"):
        with pytest.raises(InvalidArgument):
            parse_duration("x", bad)
