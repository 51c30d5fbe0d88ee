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


def test_import_roots_are_absolute_normalised_directories(tmp_path: Path) -> None:
    """`daemon.import_roots` is read as a tuple of the paths given; none is the default."""
    assert Config().daemon.import_roots == ()
    path = tmp_path / "c.toml"
    path.write_text("[daemon]\nimport_roots = ['/srv/pgdata', '/var/lib/dumps/v16']\n")
    assert load_config(path).daemon.import_roots == ("/srv/pgdata", "/var/lib/dumps/v16")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("'/srv/pgdata'", "must be a list of absolute directory paths"),
        ("[1]", "must be a list of absolute directory paths"),
        ("['srv/pgdata']", "'srv/pgdata' is not an absolute path"),
        ("['']", "'' is not an absolute path"),
        ('["/srv/\\u0000x"]', "'/srv/\\x00x' holds a NUL character"),
        ("['/']", "'/' would allow importing from anywhere"),
        ("['/srv/..']", "'/srv/..' would allow importing from anywhere"),
        ("['/srv/a/../b']", "'/srv/a/../b' is not normalised; write '/srv/b'"),
        ("['/srv/pgdata/']", "'/srv/pgdata/' is not normalised; write '/srv/pgdata'"),
        ("['/srv//pgdata']", "'/srv//pgdata' is not normalised; write '/srv/pgdata'"),
        ("['//srv/pgdata']", "'//srv/pgdata' is not normalised; write '/srv/pgdata'"),
        ("['/srv/./pgdata']", "'/srv/./pgdata' is not normalised; write '/srv/pgdata'"),
    ],
)
def test_bad_import_roots_are_refused(tmp_path: Path, value: str, problem: str) -> None:
    """A root that is not a list of absolute, normalised paths (or is '/') is
    InvalidArgument naming `daemon.import_roots` and saying what is wrong."""
    path = tmp_path / "c.toml"
    path.write_text(f"[daemon]\nimport_roots = {value}\n")
    with pytest.raises(InvalidArgument) as info:
        load_config(path)
    assert (info.value.field, info.value.problem) == (
        "daemon.import_roots",
        f"{problem} (in {path})",
    )


TLS = 'tls_cert = "/etc/cb/cert.pem"\ntls_key = "/etc/cb/key.pem"\n'
TOKEN = 'token_file = "/etc/cb/token"\n'


NO_TOKEN = "a token (daemon.token_file or tenants.tokens_dir)"


@pytest.mark.parametrize(
    ("lines", "missing"),
    [
        (TOKEN, "TLS (daemon.tls_cert, daemon.tls_key)"),
        (TLS, NO_TOKEN),
        ("", f"TLS (daemon.tls_cert, daemon.tls_key) or {NO_TOKEN}"),
    ],
)
def test_tcp_without_tls_or_token_is_refused(tmp_path: Path, lines: str, missing: str) -> None:
    """TCP lacking TLS or a token is a configuration error naming the keys to set."""
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\ntcp_address = "0.0.0.0:7443"\n{lines}')
    with pytest.raises(InvalidArgument) as info:
        load_config(path)
    assert (info.value.field, info.value.problem) == (
        "daemon.tcp_address",
        f"TCP without {missing} lets anyone who can reach the port use every branch; "
        f"configure them, or set daemon.insecure_tcp = true to accept that (in {path})",
    )


@pytest.mark.parametrize("lines", [TLS + TOKEN, "insecure_tcp = true\n"])
def test_tcp_with_tls_and_token_or_insecure_tcp_is_accepted(tmp_path: Path, lines: str) -> None:
    """TLS plus a token, or the operator's explicit `insecure_tcp = true`, lets TCP through."""
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\ntcp_address = "0.0.0.0:7443"\n{lines}')
    assert load_config(path).daemon.tcp_address == "0.0.0.0:7443"


def test_insecure_tcp_must_be_a_boolean(tmp_path: Path) -> None:
    """`insecure_tcp = "yes"` is refused: opening TCP takes a real `true`."""
    path = tmp_path / "c.toml"
    path.write_text('[daemon]\ntcp_address = "0.0.0.0:7443"\ninsecure_tcp = "yes"\n')
    with pytest.raises(InvalidArgument) as info:
        load_config(path)
    assert info.value.field == "daemon.insecure_tcp"
