"""Which PostgreSQL settings a caller may pass for a branch (`postgres_settings`).

An allowlist, not a denylist: the daemon runs as root and every branch hands out
a superuser, so a setting gets through only when a test may legitimately tune
it (planner, memory, timeouts, logging of statements, vacuum, WAL speed knobs,
client defaults, statistics). Anything that loads code, runs a command, names a
file or directory, moves the log, configures TLS or authentication, or turns a
branch into a standby is refused with its reason, and so is a setting the
daemon sets itself. Operators may still set anything in `[postgres] settings`.

Names are those of PostgreSQL 15 (checked against `postgres --describe-config`
and `pg_settings`, see tests/test_settings.py), lower case: postgres folds
names, so `DateStyle` is `datestyle`. Dotted custom settings (`app.tenant`,
read by row-level security policies) are allowed unless they belong to an
extension that runs code or names files.

Pure logic: this module does no I/O and imports nothing of the daemon but
`errors`, so the client side could check settings before a call.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from cowbranchd.errors import InvalidArgument

__all__ = [
    "ALLOWED_SETTINGS",
    "DAEMON_OWNED_SETTINGS",
    "FORBIDDEN_SETTINGS",
    "setting_refusal",
    "validate_client_settings",
]

_FIELD = "postgres_settings"
_SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_.]*$")
_NAME_PART = re.compile(r"^[a-z_][a-z0-9_]*$")  # postgres refuses `a.`, `a..b`, `a.1b`
_MAX_NAME = 63  # NAMEDATALEN - 1: postgres truncates longer names anyway
_MAX_VALUE = 4096
_MAX_SETTINGS = 200

# -- allowed, by category (PostgreSQL 15) -------------------------------------------

_PLANNER = frozenset(
    {
        "enable_async_append", "enable_bitmapscan", "enable_gathermerge", "enable_hashagg",
        "enable_hashjoin", "enable_incremental_sort", "enable_indexonlyscan",
        "enable_indexscan", "enable_material", "enable_memoize", "enable_mergejoin",
        "enable_nestloop", "enable_parallel_append", "enable_parallel_hash",
        "enable_partition_pruning", "enable_partitionwise_aggregate",
        "enable_partitionwise_join", "enable_seqscan", "enable_sort", "enable_tidscan",
        "cpu_index_tuple_cost", "cpu_operator_cost", "cpu_tuple_cost", "effective_cache_size",
        "jit_above_cost", "jit_inline_above_cost", "jit_optimize_above_cost",
        "min_parallel_index_scan_size", "min_parallel_table_scan_size", "parallel_setup_cost",
        "parallel_tuple_cost", "random_page_cost", "seq_page_cost",
        "geqo", "geqo_effort", "geqo_generations", "geqo_pool_size", "geqo_seed",
        "geqo_selection_bias", "geqo_threshold",
        "constraint_exclusion", "cursor_tuple_fraction", "default_statistics_target",
        "from_collapse_limit", "jit", "join_collapse_limit", "plan_cache_mode",
        "recursive_worktable_factor",
        # A developer option, but the documented way to test that functions are
        # labelled PARALLEL SAFE correctly: exactly what a test suite should check.
        "force_parallel_mode",
    }
)  # fmt: skip
_RESOURCES = frozenset(
    {
        "work_mem", "maintenance_work_mem", "autovacuum_work_mem", "logical_decoding_work_mem",
        "hash_mem_multiplier", "temp_buffers", "shared_buffers", "max_stack_depth",
        "max_prepared_transactions", "temp_file_limit", "max_files_per_process",
        "bgwriter_delay", "bgwriter_flush_after", "bgwriter_lru_maxpages",
        "bgwriter_lru_multiplier", "vacuum_cost_delay", "vacuum_cost_limit",
        "vacuum_cost_page_dirty", "vacuum_cost_page_hit", "vacuum_cost_page_miss",
        "backend_flush_after", "effective_io_concurrency", "maintenance_io_concurrency",
        "old_snapshot_threshold",
    }
)  # fmt: skip
_PARALLELISM = frozenset(
    {
        "max_parallel_maintenance_workers", "max_parallel_workers",
        "max_parallel_workers_per_gather", "max_worker_processes",
        "parallel_leader_participation",
    }
)  # fmt: skip
_CONNECTIONS_AND_TIMEOUTS = frozenset(
    {
        "max_connections", "superuser_reserved_connections", "client_connection_check_interval",
        "tcp_keepalives_count", "tcp_keepalives_idle", "tcp_keepalives_interval",
        "tcp_user_timeout", "statement_timeout", "lock_timeout",
        "idle_in_transaction_session_timeout", "idle_session_timeout", "deadlock_timeout",
    }
)  # fmt: skip
_LOCKS = frozenset(
    {
        "max_locks_per_transaction", "max_pred_locks_per_page", "max_pred_locks_per_relation",
        "max_pred_locks_per_transaction",
    }
)  # fmt: skip
_VACUUM = frozenset(
    {
        "autovacuum", "autovacuum_analyze_scale_factor", "autovacuum_analyze_threshold",
        "autovacuum_freeze_max_age", "autovacuum_max_workers",
        "autovacuum_multixact_freeze_max_age", "autovacuum_naptime",
        "autovacuum_vacuum_cost_delay", "autovacuum_vacuum_cost_limit",
        "autovacuum_vacuum_insert_scale_factor", "autovacuum_vacuum_insert_threshold",
        "autovacuum_vacuum_scale_factor", "autovacuum_vacuum_threshold",
        "vacuum_failsafe_age", "vacuum_freeze_min_age", "vacuum_freeze_table_age",
        "vacuum_multixact_failsafe_age", "vacuum_multixact_freeze_min_age",
        "vacuum_multixact_freeze_table_age", "vacuum_defer_cleanup_age",
    }
)  # fmt: skip
# timezone_abbreviations and default_text_search_config name things too, but
# postgres confines them (alphabetic file names under share/timezonesets; a
# catalog object); default_tablespace/temp_tablespaces name catalog objects only.
_CLIENT_DEFAULTS = frozenset(
    {
        "application_name", "bytea_output", "check_function_bodies", "client_encoding",
        "client_min_messages", "datestyle", "default_table_access_method",
        "default_tablespace", "default_text_search_config", "default_toast_compression",
        "default_transaction_deferrable", "default_transaction_isolation",
        "default_transaction_read_only", "exit_on_error", "extra_float_digits",
        "gin_fuzzy_search_limit", "gin_pending_list_limit", "intervalstyle", "lc_messages",
        "lc_monetary", "lc_numeric", "lc_time", "row_security", "search_path",
        "temp_tablespaces", "timezone", "timezone_abbreviations", "xmlbinary", "xmloption",
        "array_nulls", "backslash_quote", "escape_string_warning", "lo_compat_privileges",
        "quote_all_identifiers", "standard_conforming_strings", "synchronize_seqscans",
        "transform_null_equals",
    }
)  # fmt: skip
_LOGGING = frozenset(
    {
        "log_autovacuum_min_duration", "log_checkpoints", "log_connections",
        "log_disconnections", "log_duration", "log_error_verbosity", "log_hostname",
        "log_line_prefix", "log_lock_waits", "log_parameter_max_length",
        "log_parameter_max_length_on_error", "log_recovery_conflict_waits",
        "log_replication_commands", "log_statement", "log_temp_files", "log_timezone",
        "log_min_duration_sample", "log_min_duration_statement", "log_min_error_statement",
        "log_min_messages", "log_startup_progress_interval", "log_statement_sample_rate",
        "log_transaction_sample_rate", "cluster_name", "update_process_title",
    }
)  # fmt: skip
_STATISTICS = frozenset(
    {
        "compute_query_id", "log_executor_stats", "log_parser_stats", "log_planner_stats",
        "log_statement_stats", "stats_fetch_consistency", "track_activities",
        "track_activity_query_size", "track_counts", "track_functions", "track_io_timing",
        "track_wal_io_timing",
    }
)  # fmt: skip
# A branch is a filesystem snapshot, not a WAL copy, and crash recovery works at
# every wal_level: so wal_level is the test's choice (`logical` for logical
# decoding tests, `minimal` for fast bulk loads). fsync=off and
# full_page_writes=off only lose data on a host crash, and a branch is disposable.
_WAL = frozenset(
    {
        "checkpoint_completion_target", "checkpoint_flush_after", "checkpoint_timeout",
        "checkpoint_warning", "max_wal_size", "min_wal_size", "commit_delay", "commit_siblings",
        "fsync", "full_page_writes", "synchronous_commit", "wal_buffers", "wal_compression",
        "wal_init_zero", "wal_level", "wal_log_hints", "wal_recycle", "wal_skip_threshold",
        "wal_sync_method", "wal_writer_delay", "wal_writer_flush_after", "recovery_prefetch",
        "wal_decode_buffer_size",
    }
)  # fmt: skip
# Slots and senders for logical decoding tests inside the branch; nothing here
# makes the branch connect anywhere (primary_conninfo is refused below).
_LOGICAL_DECODING = frozenset(
    {
        "max_replication_slots", "max_wal_senders", "max_slot_wal_keep_size", "wal_keep_size",
        "wal_sender_timeout", "track_commit_timestamp",
    }
)  # fmt: skip

ALLOWED_SETTINGS: frozenset[str] = frozenset().union(
    _PLANNER, _RESOURCES, _PARALLELISM, _CONNECTIONS_AND_TIMEOUTS, _LOCKS, _VACUUM,
    _CLIENT_DEFAULTS, _LOGGING, _STATISTICS, _WAL, _LOGICAL_DECODING,
)  # fmt: skip

# Set by the daemon on every start (`-c`), or fixing where files, logs and
# sockets are: a client may not override them per branch.
DAEMON_OWNED_SETTINGS: frozenset[str] = frozenset(
    {
        "archive_command", "archive_library", "archive_mode", "config_file", "data_directory",
        "external_pid_file", "hba_file", "ident_file", "listen_addresses", "log_destination",
        "logging_collector", "max_logical_replication_workers", "port",
        "recovery_init_sync_method", "restore_command", "unix_socket_directories",
        "unix_socket_group", "unix_socket_permissions",
    }
)  # fmt: skip

# -- refused, each with its reason ---------------------------------------------------

_OPERATOR = "operators set it in the config file's [postgres] settings"
_LOADS_CODE = f"it loads code; {_OPERATOR}"
_RUNS_COMMAND = f"it runs a command; {_OPERATOR}"
_NAMES_FILE = f"it names a file or directory; {_OPERATOR}"
_TLS = f"TLS is the operator's (ssl settings name key and certificate files); {_OPERATOR}"
_LOG_PLACE = f"cowbranchd collects each branch's log from postgres's stderr; {_OPERATOR}"
_AUTH = f"cowbranchd owns authentication (its pg_hba and a password per branch); {_OPERATOR}"
_PRIMARY = f"a branch always starts as a primary of its own; {_OPERATOR}"
_CORRUPTS = f"it causes or hides data corruption; {_OPERATOR}"
_DEVELOPER = f"a developer option for debugging PostgreSQL itself; {_OPERATOR}"
_HOST_MEMORY = f"it chooses how the host provides shared memory; {_OPERATOR}"
_FIXED = "it is fixed when PostgreSQL is built or the cluster is initialised"
_PER_TRANSACTION = "it applies to one transaction; use its default_transaction_* setting"


def _reasons(reason: str, names: Iterable[str]) -> dict[str, str]:
    return dict.fromkeys(names, reason)


FORBIDDEN_SETTINGS: Mapping[str, str] = MappingProxyType(
    {
        **_reasons(_LOADS_CODE, [
            "shared_preload_libraries", "session_preload_libraries", "local_preload_libraries",
            "dynamic_library_path", "extension_destdir", "jit_provider",
        ]),
        **_reasons(_RUNS_COMMAND, [
            "archive_cleanup_command", "recovery_end_command", "ssl_passphrase_command",
        ]),
        **_reasons(_NAMES_FILE, [
            "log_directory", "log_filename", "krb_server_keyfile", "promote_trigger_file",
            "stats_temp_directory",  # PostgreSQL 14 and older
        ]),
        **_reasons(_TLS, [
            "ssl", "ssl_ca_file", "ssl_cert_file", "ssl_ciphers", "ssl_crl_dir", "ssl_crl_file",
            "ssl_dh_params_file", "ssl_ecdh_curve", "ssl_key_file", "ssl_max_protocol_version",
            "ssl_min_protocol_version", "ssl_passphrase_command_supports_reload",
            "ssl_prefer_server_ciphers",
        ]),
        **_reasons(_LOG_PLACE, [
            "event_source", "log_file_mode", "log_rotation_age", "log_rotation_size",
            "log_truncate_on_rotation", "syslog_facility", "syslog_ident",
            "syslog_sequence_numbers", "syslog_split_messages",
        ]),
        **_reasons(_AUTH, [
            "authentication_timeout", "db_user_namespace", "krb_caseins_users",
            "password_encryption",
        ]),
        **_reasons(f"it advertises the server on the network; {_OPERATOR}", [
            "bonjour", "bonjour_name",
        ]),
        "primary_conninfo": f"it connects the branch to another server; {_OPERATOR}",
        **_reasons(_PRIMARY, [
            "hot_standby", "hot_standby_feedback", "max_standby_archive_delay",
            "max_standby_streaming_delay", "primary_slot_name", "recovery_min_apply_delay",
            "wal_receiver_create_temp_slot", "wal_receiver_status_interval",
            "wal_receiver_timeout", "wal_retrieve_retry_interval", "synchronous_standby_names",
            "recovery_target", "recovery_target_action", "recovery_target_inclusive",
            "recovery_target_lsn", "recovery_target_name", "recovery_target_time",
            "recovery_target_timeline", "recovery_target_xid",
        ]),
        "archive_timeout": f"archiving is off in every branch; {_OPERATOR}",
        "max_sync_workers_per_subscription": (
            "subscriptions never run in a branch (cowbranchd sets "
            f"max_logical_replication_workers=0); {_OPERATOR}"
        ),
        **_reasons(_CORRUPTS, [
            "zero_damaged_pages", "ignore_checksum_failure", "ignore_invalid_pages",
            "data_sync_retry",
        ]),
        "restart_after_crash": (
            f"cowbranchd relies on a branch recovering from a backend crash; {_OPERATOR}"
        ),
        # Harmless to the host, but as every session's default it silently turns
        # off triggers and foreign keys: the tests would pass and production break.
        "session_replication_role": (
            "as every session's default it turns off triggers and foreign keys; "
            "SET it in the session that needs it"
        ),
        **_reasons(_DEVELOPER, [
            "allow_in_place_tablespaces", "allow_system_table_mods", "backtrace_functions",
            "debug_discard_caches", "debug_pretty_print", "debug_print_parse", "debug_print_plan",
            "debug_print_rewritten", "ignore_system_indexes", "jit_debugging_support",
            "jit_dump_bitcode", "jit_expressions", "jit_profiling_support", "jit_tuple_deforming",
            "post_auth_delay", "pre_auth_delay", "remove_temp_files_after_crash", "trace_notify",
            "trace_recovery_messages", "trace_sort", "wal_consistency_checking",
        ]),
        **_reasons(_HOST_MEMORY, [
            "dynamic_shared_memory_type", "huge_page_size", "huge_pages",
            "min_dynamic_shared_memory", "shared_memory_type",
        ]),
        **_reasons(_PER_TRANSACTION, [
            "transaction_deferrable", "transaction_isolation", "transaction_read_only",
        ]),
        **_reasons(_FIXED, [
            "block_size", "data_checksums", "data_directory_mode", "debug_assertions",
            "in_hot_standby", "integer_datetimes", "lc_collate", "lc_ctype", "max_function_args",
            "max_identifier_length", "max_index_keys", "segment_size", "server_encoding",
            "server_version", "server_version_num", "shared_memory_size",
            "shared_memory_size_in_huge_pages", "ssl_library", "wal_block_size",
            "wal_segment_size",
        ]),
    }
)  # fmt: skip

# Names of other PostgreSQL versions and of extensions are judged by their shape:
# a last word that says it runs, loads or names something.
_SUFFIX_REASONS = {
    **_reasons(_RUNS_COMMAND, ["command", "commands", "program"]),
    **_reasons(_LOADS_CODE, ["library", "libraries"]),
    **_reasons(_NAMES_FILE, [
        "file", "files", "keyfile", "dir", "dirs", "directory", "directories", "path", "paths",
    ]),
}  # fmt: skip
_PREFIX_REASONS = {"ssl_": _TLS, "debug_": _DEVELOPER, "trace_": _DEVELOPER, "syslog_": _LOG_PLACE}
# Extension settings that are dangerous whatever their last word. In contrib,
# only preloaded modules and procedural languages read settings that act.
_CUSTOM_PREFIX_REASONS = {
    "sepgsql": f"it changes SELinux enforcement; {_OPERATOR}",
    "basebackup_to_shell": _RUNS_COMMAND,
    "basic_archive": f"archiving is off in every branch; {_OPERATOR}",
}
_CUSTOM_REASONS = {
    **_reasons(f"it runs Perl code in every new interpreter; {_OPERATOR}", [
        "plperl.on_init", "plperl.on_plperl_init", "plperl.on_plperlu_init",
    ]),
    **_reasons(f"it runs a function in every new interpreter; {_OPERATOR}", [
        "pltcl.start_proc", "pltclu.start_proc",
    ]),
}  # fmt: skip


def _by_last_word(word: str) -> str | None:
    for suffix, reason in _SUFFIX_REASONS.items():
        if word == suffix or word.endswith("_" + suffix):
            return reason
    return None


def setting_refusal(name: str) -> str | None:
    """Why a caller may not pass the (well-formed) setting `name`; None if it may."""
    if name in ALLOWED_SETTINGS:
        return None
    if name in DAEMON_OWNED_SETTINGS:
        return f"{name} is set by cowbranchd"
    if "." in name:
        reason = (
            _CUSTOM_REASONS.get(name)
            or _CUSTOM_PREFIX_REASONS.get(name.partition(".")[0])
            or _by_last_word(name.rpartition(".")[2])
        )
        if reason is None:
            return None  # a placeholder such as app.current_tenant
    else:
        reason = (
            FORBIDDEN_SETTINGS.get(name)
            or _by_last_word(name)
            or next((r for p, r in _PREFIX_REASONS.items() if name.startswith(p)), None)
        )
    if reason is None:
        return f"{name} is not a PostgreSQL setting cowbranchd allows (see docs/security.md)"
    return f"{name} is not allowed for a branch: {reason}"


def validate_client_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """The caller's `postgres_settings`, checked; InvalidArgument("postgres_settings", ...)
    names the first setting that is malformed or not allowed, and why."""
    if len(settings) > _MAX_SETTINGS:
        raise InvalidArgument(_FIELD, f"more than {_MAX_SETTINGS} settings")
    for name, value in settings.items():
        if (
            not isinstance(name, str)
            or not _SETTING_NAME.match(name)
            or len(name) > _MAX_NAME
            or not all(_NAME_PART.match(part) for part in name.split("."))
        ):
            raise InvalidArgument(
                _FIELD,
                f"{name!r} is not a setting name (lower case, ^[a-z_][a-z0-9_.]*$, "
                f"at most {_MAX_NAME} characters)",
            )
        refusal = setting_refusal(name)
        if refusal is not None:
            raise InvalidArgument(_FIELD, refusal)
        if not isinstance(value, str):
            raise InvalidArgument(_FIELD, f"{name}: value must be a string")
        if any(c in value for c in "\0\n\r"):
            raise InvalidArgument(_FIELD, f"{name}: value contains NUL or a line break")
        if len(value) > _MAX_VALUE:
            raise InvalidArgument(_FIELD, f"{name}: value longer than {_MAX_VALUE} characters")
    return dict(settings)
