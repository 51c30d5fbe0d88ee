"""Caller-supplied postgres settings: an allowlist of what tests tune, every other
PostgreSQL 15 setting refused with its reason, dotted custom settings allowed
unless they run, load or name something, and the shape checks on names and values.

The last test runs a real daemon; it is named `integration` so that
`-k "not integration"` runs the pure part alone.
"""

from __future__ import annotations

import uuid
from typing import Any, cast

import pytest

from cowbranchd import postgres
from cowbranchd.client import Client
from cowbranchd.errors import InvalidArgument, NotFound
from cowbranchd.postgres.settings import (
    ALLOWED_SETTINGS,
    DAEMON_OWNED_SETTINGS,
    FORBIDDEN_SETTINGS,
    setting_refusal,
    validate_client_settings,
)
from cowbranchd.run import run
from tests.fix_daemon import DaemonHandle
from tests.fix_postgres import BIN_DIRS, PG_MAJOR

OPERATOR = "operators set it in the config file's [postgres] settings"


def refusal(settings: dict[str, str]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        validate_client_settings(settings)
    assert info.value.field == "postgres_settings"
    return info.value


# -- allowed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # planner
        ("enable_seqscan", "off"),
        ("enable_nestloop", "off"),
        ("enable_partitionwise_join", "on"),
        ("random_page_cost", "1.1"),
        ("effective_cache_size", "4GB"),
        ("default_statistics_target", "500"),
        ("join_collapse_limit", "1"),
        ("geqo_threshold", "20"),
        ("plan_cache_mode", "force_custom_plan"),
        ("jit", "off"),
        ("jit_above_cost", "-1"),
        ("cursor_tuple_fraction", "1.0"),
        ("constraint_exclusion", "partition"),
        ("force_parallel_mode", "regress"),
        # memory and resources
        ("work_mem", "64MB"),
        ("maintenance_work_mem", "256MB"),
        ("hash_mem_multiplier", "4"),
        ("temp_buffers", "32MB"),
        ("shared_buffers", "16MB"),
        ("temp_file_limit", "1GB"),
        ("max_prepared_transactions", "10"),
        # parallelism
        ("max_parallel_workers_per_gather", "0"),
        ("max_worker_processes", "4"),
        # connections and timeouts
        ("max_connections", "20"),
        ("statement_timeout", "5s"),
        ("lock_timeout", "1s"),
        ("idle_in_transaction_session_timeout", "10s"),
        ("idle_session_timeout", "1min"),
        ("deadlock_timeout", "100ms"),
        # locks
        ("max_locks_per_transaction", "256"),
        ("max_pred_locks_per_transaction", "128"),
        # autovacuum and vacuum
        ("autovacuum", "off"),
        ("autovacuum_naptime", "1s"),
        ("vacuum_freeze_min_age", "0"),
        # client defaults
        ("search_path", '"$user", public, app'),
        ("search_path", ""),
        ("timezone", "Europe/Berlin"),
        ("datestyle", "ISO, DMY"),
        ("intervalstyle", "iso_8601"),
        ("default_transaction_isolation", "serializable"),
        ("default_transaction_read_only", "on"),
        ("lc_messages", "C"),
        ("lc_numeric", "C"),
        ("bytea_output", "escape"),
        ("xmloption", "document"),
        ("extra_float_digits", "0"),
        ("row_security", "off"),
        ("check_function_bodies", "off"),
        ("default_toast_compression", "lz4"),
        ("default_table_access_method", "heap"),
        ("standard_conforming_strings", "on"),
        # statement and lock logging
        ("log_statement", "all"),
        ("log_min_duration_statement", "0"),
        ("log_min_messages", "debug1"),
        ("log_min_error_statement", "error"),
        ("log_lock_waits", "on"),
        ("log_line_prefix", "%m [%p] %q%u@%d "),
        ("log_temp_files", "0"),
        ("log_parameter_max_length_on_error", "-1"),
        # statistics
        ("track_io_timing", "on"),
        ("track_functions", "all"),
        ("compute_query_id", "on"),
        # WAL and checkpoints, for speed
        ("fsync", "off"),
        ("synchronous_commit", "off"),
        ("full_page_writes", "off"),
        ("wal_buffers", "16MB"),
        ("max_wal_size", "4GB"),
        ("checkpoint_timeout", "30min"),
        ("commit_delay", "0"),
        ("wal_level", "logical"),
        ("wal_level", "minimal"),
        # logical decoding inside the branch
        ("max_replication_slots", "4"),
        ("track_commit_timestamp", "on"),
    ],
)
def test_settings_a_test_tunes_are_allowed(name: str, value: str) -> None:
    """Planner, memory, timeouts, logging, vacuum, WAL and client defaults pass as given."""
    assert validate_client_settings({name: value}) == {name: value}


def test_every_allowed_setting_passes() -> None:
    """The whole allowlist is accepted, in requests of at most 200 settings."""
    names = sorted(ALLOWED_SETTINGS)
    for start in range(0, len(names), 200):
        settings = dict.fromkeys(names[start : start + 200], "1")
        assert validate_client_settings(settings) == settings


def test_result_is_a_copy_of_the_input() -> None:
    """The checked settings come back as a new plain dict."""
    given = {"work_mem": "64MB", "x.y": "a=b"}
    result = validate_client_settings(given)
    assert result == given
    assert result is not given


@pytest.mark.parametrize(
    "name",
    [
        "app.current_tenant",
        "app.tenant",
        "myapp.user_id",
        "a.b.c",
        "pg_stat_statements.max",
        "auto_explain.log_min_duration",
        "plpgsql.extra_warnings",
        "plperl.use_strict",
    ],
)
def test_dotted_custom_settings_are_allowed(name: str) -> None:
    """Placeholder settings read by row-level security policies and harmless extension
    settings pass."""
    assert validate_client_settings({name: "42"}) == {name: "42"}


# -- refused ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        # loads code
        ("shared_preload_libraries", "it loads code"),
        ("session_preload_libraries", "it loads code"),
        ("local_preload_libraries", "it loads code"),
        ("dynamic_library_path", "it loads code"),
        ("jit_provider", "it loads code"),
        ("extension_destdir", "it loads code"),
        # runs a command
        ("archive_cleanup_command", "it runs a command"),
        ("recovery_end_command", "it runs a command"),
        ("ssl_passphrase_command", "it runs a command"),
        # names a file or directory
        ("log_directory", "it names a file or directory"),
        ("log_filename", "it names a file or directory"),
        ("krb_server_keyfile", "it names a file or directory"),
        ("promote_trigger_file", "it names a file or directory"),
        ("stats_temp_directory", "it names a file or directory"),
        # TLS, authentication, where the log goes
        ("ssl", "TLS is the operator's"),
        ("ssl_key_file", "TLS is the operator's"),
        ("ssl_ciphers", "TLS is the operator's"),
        ("password_encryption", "cowbranchd owns authentication"),
        ("authentication_timeout", "cowbranchd owns authentication"),
        ("bonjour", "it advertises the server on the network"),
        ("syslog_ident", "collects each branch's log"),
        ("log_rotation_age", "collects each branch's log"),
        # replication topology, archiving, subscriptions
        ("primary_conninfo", "it connects the branch to another server"),
        ("hot_standby", "always starts as a primary"),
        ("recovery_target_time", "always starts as a primary"),
        ("synchronous_standby_names", "always starts as a primary"),
        ("archive_timeout", "archiving is off in every branch"),
        ("max_sync_workers_per_subscription", "subscriptions never run in a branch"),
        # corruption, crash handling
        ("zero_damaged_pages", "it causes or hides data corruption"),
        ("ignore_checksum_failure", "it causes or hides data corruption"),
        ("data_sync_retry", "it causes or hides data corruption"),
        ("restart_after_crash", "recovering from a backend crash"),
        # developer options
        ("allow_system_table_mods", "a developer option"),
        ("debug_print_plan", "a developer option"),
        ("wal_consistency_checking", "a developer option"),
        ("jit_dump_bitcode", "a developer option"),
        # host memory
        ("huge_pages", "how the host provides shared memory"),
        ("shared_memory_type", "how the host provides shared memory"),
        # names of other versions, judged by their shape
        ("some_future_command", "it runs a command"),
        ("some_future_libraries", "it loads code"),
        ("some_future_directory", "it names a file or directory"),
        ("ssl_some_future_option", "TLS is the operator's"),
        ("debug_parallel_query", "a developer option"),
    ],
)
def test_dangerous_settings_are_refused_with_their_reason(name: str, reason: str) -> None:
    """Whatever loads code, runs a command, names a file or reconfigures the server
    around the daemon is INVALID_ARGUMENT naming the setting, why, and who may set it."""
    problem = refusal({name: "x"}).problem
    assert problem.startswith(f"{name} is not allowed for a branch: ")
    assert reason in problem
    assert problem.endswith(OPERATOR)


def test_refusal_message_reads_as_documented() -> None:
    """The whole message for the classic attack, as the caller sees it."""
    assert str(refusal({"shared_preload_libraries": "x"})) == (
        "postgres_settings: shared_preload_libraries is not allowed for a branch: "
        "it loads code; operators set it in the config file's [postgres] settings"
    )


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (
            "session_replication_role",
            "session_replication_role is not allowed for a branch: as every session's "
            "default it turns off triggers and foreign keys; SET it in the session that "
            "needs it",
        ),
        (
            "transaction_isolation",
            "transaction_isolation is not allowed for a branch: it applies to one "
            "transaction; use its default_transaction_* setting",
        ),
        (
            "block_size",
            "block_size is not allowed for a branch: it is fixed when PostgreSQL is "
            "built or the cluster is initialised",
        ),
    ],
)
def test_settings_no_operator_would_pass_say_what_to_do_instead(name: str, problem: str) -> None:
    """Refusals that operators cannot lift either point elsewhere instead."""
    assert refusal({name: "x"}).problem == problem


@pytest.mark.parametrize("name", sorted(DAEMON_OWNED_SETTINGS))
def test_daemon_owned_settings_say_cowbranchd_sets_them(name: str) -> None:
    """Ports, sockets, paths, archiving and the log are the daemon's."""
    assert refusal({name: "x"}).problem == f"{name} is set by cowbranchd"


@pytest.mark.parametrize(
    "name", ["wrok_mem", "no_such_setting", "restrict_nonsystem_relation_kind"]
)
def test_unknown_settings_are_refused_pointing_at_the_docs(name: str) -> None:
    """A name outside the allowlist with no known danger is still refused."""
    assert refusal({name: "1"}).problem == (
        f"{name} is not a PostgreSQL setting cowbranchd allows (see docs/security.md)"
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("plperl.on_init", "it runs Perl code"),
        ("plperl.on_plperlu_init", "it runs Perl code"),
        ("pltcl.start_proc", "it runs a function"),
        ("sepgsql.permissive", "SELinux"),
        ("basebackup_to_shell.command", "it runs a command"),
        ("basic_archive.archive_directory", "archiving is off"),
        ("myext.archive_command", "it runs a command"),
        ("myext.command", "it runs a command"),
        ("myext.log_file", "it names a file or directory"),
        ("myext.data_dir", "it names a file or directory"),
        ("myext.module_path", "it names a file or directory"),
        ("myext.library", "it loads code"),
        ("myext.extra_libraries", "it loads code"),
    ],
)
def test_dotted_settings_that_run_or_name_things_are_refused(name: str, reason: str) -> None:
    """Extension settings that run code or name files are refused like core ones."""
    problem = refusal({name: "x"}).problem
    assert problem.startswith(f"{name} is not allowed for a branch: ")
    assert reason in problem


def test_first_refused_setting_is_the_one_named() -> None:
    """Allowed settings before a refused one do not hide it."""
    problem = refusal({"work_mem": "1MB", "app.x": "1", "archive_cleanup_command": "rm -rf /"})
    assert problem.problem.startswith("archive_cleanup_command is not allowed")


def test_setting_refusal_is_none_exactly_for_allowed_names() -> None:
    """The classification agrees with the published sets."""
    assert all(setting_refusal(name) is None for name in ALLOWED_SETTINGS)
    assert all(setting_refusal(name) is not None for name in FORBIDDEN_SETTINGS)
    assert all(setting_refusal(name) is not None for name in DAEMON_OWNED_SETTINGS)
    assert not ALLOWED_SETTINGS & DAEMON_OWNED_SETTINGS
    assert not ALLOWED_SETTINGS & FORBIDDEN_SETTINGS.keys()
    assert not DAEMON_OWNED_SETTINGS & FORBIDDEN_SETTINGS.keys()


# Real settings that `postgres --describe-config` leaves out (not in the sample file).
HIDDEN_BY_DESCRIBE_CONFIG = frozenset({"application_name", "force_parallel_mode"})


def test_every_postgres_setting_is_classified_and_allowed_ones_exist() -> None:
    """Against the real PostgreSQL 15 binary: each setting it describes is allowed, set by
    cowbranchd or refused with a reason, and each allowed name is a real setting (a typo
    would fail every branch start)."""
    try:
        binaries = postgres.find_binaries(PG_MAJOR, BIN_DIRS)
    except NotFound as exc:  # pragma: no cover - depends on the host
        pytest.skip(str(exc))
    described = run([binaries.postgres, "--describe-config"]).stdout
    real = {line.split("\t", 1)[0].lower() for line in described.splitlines() if line}
    known = ALLOWED_SETTINGS | DAEMON_OWNED_SETTINGS | FORBIDDEN_SETTINGS.keys()
    assert sorted(real - known) == []
    assert sorted(ALLOWED_SETTINGS - real) == sorted(HIDDEN_BY_DESCRIBE_CONFIG)


# -- shape -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"Shared_Buffers": "1"}, "is not a setting name"),
        ({"DateStyle": "ISO"}, "is not a setting name"),
        ({"1abc": "1"}, "is not a setting name"),
        ({"a-b": "1"}, "is not a setting name"),
        ({"a=b": "1"}, "is not a setting name"),
        ({"": "1"}, "is not a setting name"),
        ({"x" * 64: "1"}, "is not a setting name"),
        ({"app.": "1"}, "is not a setting name"),
        ({"app..x": "1"}, "is not a setting name"),
        ({"app.1x": "1"}, "is not a setting name"),
        ({".app": "1"}, "is not a setting name"),
        ({"work_mem": "1\n"}, "work_mem: value contains NUL or a line break"),
        ({"work_mem": "1\r"}, "work_mem: value contains NUL or a line break"),
        ({"work_mem": "1\0"}, "work_mem: value contains NUL or a line break"),
        ({"work_mem": "x" * 4097}, "work_mem: value longer than 4096 characters"),
        ({f"app.s{i}": "1" for i in range(201)}, "more than 200 settings"),
    ],
)
def test_malformed_names_and_values_are_refused(settings: dict[str, str], problem: str) -> None:
    """Names are lower-case identifiers (dotted parts too), values one line of at most
    4096 characters, and a request carries at most 200 settings."""
    assert problem in refusal(settings).problem


def test_limits_are_inclusive() -> None:
    """63-character names, 4096-character values and 200 settings are still fine."""
    settings = {"app." + "a" * 59: "1", "app.v": "x" * 4096} | {f"app.s{i}": "" for i in range(198)}
    assert validate_client_settings(settings) == settings


def test_value_must_be_a_string() -> None:
    """A non-string value (from an untyped caller) is refused, naming the setting."""
    assert refusal(cast(Any, {"work_mem": 64})).problem == "work_mem: value must be a string"


# -- end to end ------------------------------------------------------------------------


def test_integration_branch_settings_reach_postgres_and_forbidden_ones_are_refused(
    daemon: DaemonHandle,
) -> None:
    """Through the real daemon: allowed settings (core and dotted) are in effect in the
    branch, and an attempt to preload a library is INVALID_ARGUMENT naming it, with no
    branch left behind."""
    run_label = uuid.uuid4().hex[:8]
    settings = {
        "work_mem": "7MB",
        "statement_timeout": "5s",
        "enable_seqscan": "off",
        "app.tenant": "x",
    }
    with Client(daemon.address) as client:
        with (
            client.branch(
                f"bases/{daemon.base}",
                labels={"run": run_label},
                ttl="10m",
                postgres_settings=settings,
            ) as branch,
            branch.connect() as conn,
        ):
            shown: dict[str, str] = {}
            for name in settings:
                row = conn.execute("select current_setting(%s)", (name,)).fetchone()
                assert row is not None
                shown[name] = row[0]
        assert shown == settings

        with pytest.raises(InvalidArgument) as info:
            client.create_branch(
                f"bases/{daemon.base}",
                labels={"run": run_label},
                ttl="10m",
                postgres_settings={"shared_preload_libraries": "x"},
            )
        assert str(info.value) == (
            "postgres_settings: shared_preload_libraries is not allowed for a branch: "
            "it loads code; operators set it in the config file's [postgres] settings"
        )
        assert list(client.list_branches({"run": run_label})) == []
