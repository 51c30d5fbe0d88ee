"""Everything about PostgreSQL processes and data directories, nothing about storage or gRPC.

A base is made here (`initdb`) or accepted (`check_clean_shutdown`); a clone of
it is made startable (`prepare_clone`), started (`start`: ready means `SELECT 1`
answered), adopted after a daemon restart (`find_postmaster`), checkpointed
before it is snapshotted (`checkpoint`) and stopped (`stop`).

Errors: PostgresError (with the tail of the postgres log) and its subclass
PortInUse (retry on another port); FailedPrecondition for a dirty or foreign
data directory; NotFound for a missing PostgreSQL version; InvalidArgument for
a bad per-branch setting. The implementation lives in `datadir` (files at rest),
`postmaster` (processes) and `cluster` (initdb, credentials, DSNs,
checkpoint).
"""

from __future__ import annotations

from .cluster import (
    PG_HBA,
    SCRAM_ITERATIONS,
    checkpoint,
    client_networks,
    dsn,
    initdb,
    scram_verifier,
    write_hba,
)
from .datadir import (
    DAEMON_OWNED_SETTINGS,
    Binaries,
    check_clean_shutdown,
    find_binaries,
    foreign_owned,
    installed_versions,
    pg_version,
    prepare_clone,
    validate_settings,
)
from .postmaster import OnReady, PortInUse, start
from .process import Postmaster, find_postmaster, stop

__all__ = [
    "DAEMON_OWNED_SETTINGS",
    "PG_HBA",
    "SCRAM_ITERATIONS",
    "Binaries",
    "OnReady",
    "PortInUse",
    "Postmaster",
    "check_clean_shutdown",
    "checkpoint",
    "client_networks",
    "dsn",
    "find_binaries",
    "find_postmaster",
    "foreign_owned",
    "initdb",
    "installed_versions",
    "pg_version",
    "prepare_clone",
    "scram_verifier",
    "start",
    "stop",
    "validate_settings",
    "write_hba",
]
