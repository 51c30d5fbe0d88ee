"""Fixtures for tests that need a real PostgreSQL: binaries, one base per session,
a fresh copy of it per test (standing in for a clone), and started postmasters.

Every postmaster a test starts is stopped by pid at teardown, pass or fail;
as a last resort, any postgres whose working directory is under this
session's scratch root is stopped before the root is removed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from cowbranchd import postgres
from cowbranchd.errors import NotFound
from cowbranchd.ports import PortAllocator
from cowbranchd.run import run

PG_MAJOR = 15
BIN_DIRS = ["/usr/lib/postgresql/{version}/bin"]
OS_USER = "postgres"
SUPERUSER = "cowbranch"
PASSWORD = "s3cret:/@?pw"  # URI-special characters on purpose
DATABASE = "app"
INIT_SQL = "CREATE TABLE greeting (word text); INSERT INTO greeting VALUES ('hello');\n"
_FIRST = int(os.environ.get("COWBRANCHD_TEST_PG_FIRST_PORT", "25400"))
TEST_PORTS = (_FIRST, _FIRST + 599)


@dataclass
class PgDir:
    """A test's copy of the base, with a socket directory and a log file beside it."""

    pgdata: str
    socket_dir: str
    log_path: str

    def log(self) -> str:
        return Path(self.log_path).read_text() if os.path.exists(self.log_path) else ""


@dataclass
class Running:
    """A postmaster a test started, with how to reach it."""

    dir: PgDir
    postmaster: postgres.Postmaster
    port: int

    @property
    def dsn(self) -> str:
        return postgres.dsn("127.0.0.1", self.port, SUPERUSER, PASSWORD, DATABASE)

    @property
    def socket_dsn(self) -> str:
        return postgres.dsn(self.dir.socket_dir, self.port, SUPERUSER, "", DATABASE)


StartPg = Callable[..., Running]


def stop_everything_under(root: str) -> None:
    """Stop, by pid, every postgres process whose working directory is under `root`."""
    root = os.path.realpath(root) + os.sep
    for _ in range(2):
        found = []
        for proc in psutil.process_iter(["name", "cwd"]):
            cwd = proc.info["cwd"]
            if proc.info["name"] == "postgres" and cwd and (cwd + os.sep).startswith(root):
                found.append(proc)
        for proc in found:
            master = postgres.find_postmaster(proc.info["cwd"])
            if master is not None:
                postgres.stop(master, fast_timeout=0)
            else:  # a backend that outlived its postmaster
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(found, timeout=10)


@pytest.fixture(scope="session")
def pg_binaries() -> postgres.Binaries:
    if os.geteuid() != 0:
        pytest.skip("needs root (postgres runs as the postgres OS user)")
    try:
        return postgres.find_binaries(PG_MAJOR, BIN_DIRS)
    except NotFound as exc:  # pragma: no cover - depends on the host
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def pg_root(pg_binaries: postgres.Binaries) -> Iterator[str]:
    # Outside pytest's tmp_path: its parents are 0700 root, and postgres must traverse.
    root = tempfile.mkdtemp(prefix="cowbranchd-test-pg-")
    os.chmod(root, 0o711)
    try:
        yield root
    finally:
        stop_everything_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_base(pg_root: str, pg_binaries: postgres.Binaries) -> str:
    base = os.path.join(pg_root, "base")
    os.mkdir(base)
    postgres.initdb(
        base,
        pg_binaries,
        os_user=OS_USER,
        superuser=SUPERUSER,
        password=PASSWORD,
        database=DATABASE,
        init_sql=INIT_SQL,
    )
    return base


@pytest.fixture(scope="session")
def pg_ports() -> PortAllocator:
    return PortAllocator(*TEST_PORTS, "127.0.0.1")


@pytest.fixture
def pg_dir(pg_root: str, pg_base: str) -> Iterator[PgDir]:
    """A fresh copy of the base (as a clone would be), removed after the test."""
    scratch = tempfile.mkdtemp(dir=pg_root)
    os.chmod(scratch, 0o711)
    pgdata = os.path.join(scratch, "pgdata")
    run(["cp", "-a", "--reflink=auto", pg_base, pgdata])
    try:
        yield PgDir(pgdata, os.path.join(scratch, "socket"), os.path.join(scratch, "pg.log"))
    finally:
        stop_everything_under(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def start_pg(pg_binaries: postgres.Binaries, pg_ports: PortAllocator) -> Iterator[StartPg]:
    """Start postgres on a PgDir (on a free port unless given); stopped by pid at teardown."""
    started: list[postgres.Postmaster] = []
    ports: list[int] = []

    def start(
        d: PgDir, *, settings: Mapping[str, str] | None = None, port: int | None = None
    ) -> Running:
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            chosen = port if port is not None else pg_ports.allocate()
            ports.append(chosen)
            try:
                pm = postgres.start(
                    d.pgdata,
                    binaries=pg_binaries,
                    os_user=OS_USER,
                    port=chosen,
                    socket_dir=d.socket_dir,
                    listen_addresses="127.0.0.1",
                    settings=settings or {},
                    log_path=d.log_path,
                    ready_dsn=postgres.dsn("127.0.0.1", chosen, SUPERUSER, PASSWORD, DATABASE),
                    ready_timeout=60,
                )
            except postgres.PortInUse:
                if attempt == attempts - 1:
                    raise
                continue
            started.append(pm)
            return Running(d, pm, chosen)
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        for pm in started:
            postgres.stop(pm, fast_timeout=0)
        for p in ports:
            pg_ports.release(p)


ImportSource = Callable[..., Path]


@pytest.fixture
def import_source() -> Iterator[ImportSource]:
    """Makes clean data directories under /tmp (the test daemons' import root),
    owned by postgres, for CreateBase/CreateBaseVersion(data_directory=...)."""
    made: list[Path] = []

    def make(*, superuser: str = "owner", init_sql: str | None = None) -> Path:
        root = Path(tempfile.mkdtemp(prefix="cbt-import-", dir="/tmp"))
        made.append(root)
        os.chmod(root, 0o755)
        pgdata = root / "pgdata"
        pgdata.mkdir(mode=0o700)
        postgres.initdb(
            str(pgdata),
            postgres.find_binaries(PG_MAJOR, BIN_DIRS),
            os_user=OS_USER,
            superuser=superuser,
            password="pw",
            init_sql=init_sql,
        )
        return pgdata

    yield make
    for root in made:
        shutil.rmtree(root, ignore_errors=True)


# A "production" server for the import and masking tests: personal data,
# constraints, a trigger, a row-level security policy, a replication role.
PROD_SUPERUSER = "prod_admin"
PROD_DATABASE = "shop"
REPLICATION_USER = "replicator"
REPLICATION_PASSWORD = "repl:pw/@?s3cret"  # URI-special characters on purpose
PROD_SQL = f"""
CREATE ROLE app_user NOLOGIN;
CREATE ROLE {REPLICATION_USER} REPLICATION LOGIN PASSWORD '{REPLICATION_PASSWORD}';
CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE CHECK (email LIKE '%@%'),
    phone text,
    bio text,
    tenant text NOT NULL DEFAULT 'acme',
    updated_at timestamptz
);
ALTER TABLE customers ALTER bio SET STORAGE EXTERNAL;  -- TOASTed, uncompressed
CREATE INDEX customers_phone ON customers (phone);
CREATE TABLE orders (
    id serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers (id),
    total numeric NOT NULL CHECK (total >= 0)
);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql
    AS $$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
CREATE TRIGGER customers_touch BEFORE UPDATE ON customers
    FOR EACH ROW EXECUTE FUNCTION touch();
ALTER TABLE customers ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON customers TO app_user
    USING (tenant = current_setting('app.tenant', true));
GRANT SELECT ON customers TO app_user;
INSERT INTO customers (name, email, phone, bio, tenant)
SELECT 'Person ' || g, 'person' || g || '@prod-example.com', '+1-555-' || lpad(g::text, 4, '0'),
       CASE WHEN g = 1 THEN repeat('biography of toasted-secret@prod-example.com; ', 3000)
            ELSE 'bio ' || g END,
       CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END
FROM generate_series(1, 200) g;
INSERT INTO orders (customer_id, total) SELECT g, g * 1.5 FROM generate_series(1, 200) g;
ANALYZE;
"""
PROD_EMAILS = [f"person{n}@prod-example.com".encode() for n in (2, 17, 64, 123, 200)] + [
    b"toasted-secret@prod-example.com"
]


@dataclass
class Production:
    """The production server: its superuser's and the replication role's DSNs."""

    pgdata: str
    port: int

    @property
    def dsn(self) -> str:
        return postgres.dsn("127.0.0.1", self.port, PROD_SUPERUSER, PASSWORD, PROD_DATABASE)

    @property
    def replication_dsn(self) -> str:
        return postgres.dsn(
            "127.0.0.1", self.port, REPLICATION_USER, REPLICATION_PASSWORD, PROD_DATABASE
        )


@pytest.fixture(scope="session")
def production(
    pg_root: str, pg_binaries: postgres.Binaries, pg_ports: PortAllocator
) -> Iterator[Production]:
    """A running "production" server on 127.0.0.1, loaded with PROD_SQL."""
    scratch = tempfile.mkdtemp(dir=pg_root, prefix="production-")
    os.chmod(scratch, 0o711)
    pgdata = os.path.join(scratch, "pgdata")
    os.mkdir(pgdata)
    postgres.initdb(
        pgdata, pg_binaries, os_user=OS_USER, superuser=PROD_SUPERUSER, password=PASSWORD,
        database=PROD_DATABASE, init_sql=PROD_SQL,
    )
    port = pg_ports.allocate()
    pm = postgres.start(
        pgdata, binaries=pg_binaries, os_user=OS_USER, port=port,
        socket_dir=os.path.join(scratch, "socket"), listen_addresses="127.0.0.1", settings={},
        log_path=os.path.join(scratch, "pg.log"),
        ready_dsn=postgres.dsn("127.0.0.1", port, PROD_SUPERUSER, PASSWORD, PROD_DATABASE),
    )
    try:
        yield Production(pgdata, port)
    finally:
        postgres.stop(pm, fast_timeout=0)
        pg_ports.release(port)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def postgres_dir() -> Iterator[Callable[[], str]]:
    """Makes empty directories owned by the postgres OS user under /tmp (an
    import target, or a place for dumps the postgres user reads)."""
    made: list[str] = []
    owner = pwd.getpwnam(OS_USER)

    def make() -> str:
        root = tempfile.mkdtemp(prefix="cbt-pg-", dir="/tmp")
        made.append(root)
        os.chmod(root, 0o711)
        path = os.path.join(root, "d")
        os.mkdir(path, 0o700)
        os.chown(path, owner.pw_uid, owner.pw_gid)
        return path

    yield make
    for root in made:
        stop_everything_under(root)
        shutil.rmtree(root, ignore_errors=True)
