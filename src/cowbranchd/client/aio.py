"""`AsyncClient`, the asyncio client on grpc.aio, and the one definition of
both clients: `.ci/gen-sync-client` derives `sync.py` (`Client`) from this
file by dropping async/await and renaming the few asyncio names (its rules
are listed at its top). Edit here, run `.ci/gen-sync-client`, never edit
`sync.py`; tests/test_client_generated.py fails while it is stale.

So write docstrings and messages for both clients: `AsyncClient` reads
`Client` there, and code in them (`async with`, `await close()`) loses its
async keyword. Comments are not carried over.

The requests come from `ops`, the addresses, retries and errors from
`transport`; only the sending is awaited. The channel opens on the first
call, inside the running event loop, so an `AsyncClient` may be built
outside one.

Re-exported by `cowbranchd.client`. Speaks gRPC only; it may not import
daemon code.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from cowbranchd.errors import CowbranchError, FailedPrecondition, NotFound
from cowbranchd.v1 import leases_pb2

from . import ops
from .leases import AioLeaseStream, answer_error
from .transport import (
    Endpoint,
    RetryPolicy,
    close_aio_channel,
    deadline_error,
    open_aio_channel,
    resolve_endpoint,
    status_code,
    translate,
)
from .types import (
    Base,
    BaseVersion,
    Branch,
    BranchDiff,
    DurationLike,
    Operation,
    SelectorLike,
)

__all__ = ["AsyncClient", "AsyncLease"]

T = TypeVar("T")


class AsyncClient:
    """A connection to one cowbranchd daemon.

    `address`: `unix:///path.sock`, a bare socket path or `host:port`; default
    `COWBRANCHD_ADDRESS`, else `unix:///run/cowbranchd/api.sock`. `token` is
    sent as `authorization: Bearer <token>` (default `COWBRANCHD_TOKEN`);
    `tls_root_cert` (PEM path or bytes, default `COWBRANCHD_TLS_ROOT_CERT`)
    turns on TLS for TCP. `timeout` is each call's overall deadline in seconds,
    retries included. Nothing connects until the first call. Use `async with`,
    or `await close()` when done.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        tls_root_cert: str | os.PathLike[str] | bytes | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.endpoint: Endpoint = resolve_endpoint(
            address, token=token, tls_root_cert=tls_root_cert
        )
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[str, Any] = {}
        self._closed = False
        self._lease: AsyncLease | None = None

    @property
    def address(self) -> str:
        """The daemon address in use."""
        return self.endpoint.address

    def __repr__(self) -> str:
        return f"AsyncClient({self.address!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the lease cleanly (see `lease`), then the channel.

        Calling it again does nothing.
        """
        lease, self._lease = self._lease, None
        if lease is not None and not self._closed:
            # The daemon may be gone: then its TTLs and the lease grace clean up.
            with suppress(CowbranchError):
                await lease.close()
        self._closed = True
        channel, self._channel = self._channel, None
        self._stubs.clear()
        if channel is not None:
            await close_aio_channel(channel)

    def _open_channel(self) -> grpc.aio.Channel:
        if self._closed:
            raise CowbranchError("this AsyncClient is closed")
        if self._channel is None:
            self._channel = open_aio_channel(self.endpoint)
        return self._channel

    def _stub(self, service: ops.Service) -> Any:
        channel = self._open_channel()
        if service not in self._stubs:
            self._stubs[service] = ops.STUBS[service](channel)
        return self._stubs[service]

    async def lease(self, *, holder: str = "") -> AsyncLease:
        """This client's lease, opened on first use: one stream for the client's life.

        Branches it holds are deleted by the daemon when the process dies
        without closing it (after `daemon.lease_grace`), and when `close()`
        closes it; `keep` lets a branch outlive it. `branch()` and the pytest
        plugin hold their branches in it. `holder` names it in the daemon's
        log (default: program, pid and host).
        """
        if self._lease is None:
            self._lease = AsyncLease(self, holder or _default_holder())
        await self._lease.open()
        return self._lease

    async def _call(self, op: ops.Op[T], timeout: float | None = None) -> T:
        """Send `op`, retrying UNAVAILABLE within the retry policy and the call's deadline."""
        method = getattr(self._stub(op.service), op.method)
        budget = self.timeout if timeout is None else timeout
        started = time.monotonic()
        attempt = 0
        while True:
            remaining = started + budget - time.monotonic()
            if remaining <= 0:
                raise deadline_error(self.endpoint, budget)
            try:
                response = await method(
                    op.request, timeout=remaining, metadata=self.endpoint.metadata()
                )
            except grpc.RpcError as exc:
                code = status_code(exc)
                if code == grpc.StatusCode.NOT_FOUND and attempt and op.missing_ok_after_retry:
                    return op.convert(None)
                wait = None
                if code == grpc.StatusCode.UNAVAILABLE and op.retry:
                    elapsed = time.monotonic() - started
                    wait = self.retry.next_delay(attempt, elapsed, budget - elapsed)
                if wait is None:
                    raise translate(exc, self.endpoint) from exc
                await asyncio.sleep(wait)
                attempt += 1
            else:
                return op.convert(response)

    # -- branches -----------------------------------------------------------------

    async def create_branch(
        self,
        parent: str,
        *,
        branch_id: str = "",
        labels: Mapping[str, str] | None = None,
        ttl: DurationLike | None = None,
        postgres_settings: Mapping[str, str] | None = None,
        protected: bool = False,
        request_id: str | None = None,
        max_bytes: int = 0,
        role: str = "",
        idle_suspend: DurationLike | None = None,
        at: datetime | None = None,
        lease: AsyncLease | None = None,
        timeout: float | None = None,
    ) -> Branch:
        """Create a branch of `parent` and return it once it answers queries.

        `request_id` (default: a new uuid4) makes the call idempotent: the same
        id again, from the same caller, returns the same branch. `max_bytes`
        limits what the branch may write (0: the daemon's
        `storage.max_branch_bytes`). `role` asks for a database role other
        than the base's default among those the base allows. `idle_suspend`
        stops its postgres after that long without a connection (it resumes
        on the next one); 0: never; None: the daemon's default. `at` (a
        followed base only) gives the server as it was at that time.
        `lease` (see `lease()`) holds the branch from the moment it exists,
        in the same call: a process killed at any point leaks nothing.
        """
        request_id = request_id or str(uuid.uuid4())  # the same on every attempt
        for attempt in range(2):
            lease_name = ""
            if lease is not None:
                await lease.open()
                lease_name = lease.name
            op = ops.create_branch(
                parent,
                branch_id=branch_id,
                labels=labels,
                ttl=ttl,
                postgres_settings=postgres_settings,
                protected=protected,
                request_id=request_id,
                max_bytes=max_bytes,
                role=role,
                idle_suspend=idle_suspend,
                at=at,
                lease=lease_name,
            )
            try:
                created = await self._call(op, timeout)
            except FailedPrecondition as exc:
                # The daemon restarted since the lease opened (its leases
                # live in memory): open it again and retry, same request_id.
                if lease is None or attempt or lease_name not in exc.message:
                    raise
                await lease.reopen()
                continue
            if lease is not None:
                lease.held_by_create(created.name)
            return created
        raise AssertionError("unreachable")

    async def diff_branch(self, name: str, *, timeout: float | None = None) -> BranchDiff:
        """What the branch changed since it was made: its schema as a unified
        diff against its parent's, and rows inserted/updated/deleted per table."""
        return await self._call(ops.diff_branch(name), timeout)

    async def get_branch(self, name: str, *, timeout: float | None = None) -> Branch:
        """The branch `name` (`branches/{id}` or just the id)."""
        return await self._call(ops.get_branch(name), timeout)

    async def list_branches(
        self, selector: SelectorLike = None, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[Branch]:
        """Every branch matching the label `selector`, fetching pages as it goes (`async for`)."""
        token = ""
        while True:
            op = ops.list_branches_page(selector, page_size, token)
            page, token = await self._call(op, timeout)
            for item in page:
                yield item
            if not token:
                return

    async def delete_branch(
        self,
        name: str,
        *,
        allow_missing: bool = False,
        force: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Delete a branch; NotFound unless `allow_missing`; `force` deletes a protected one too."""
        op = ops.delete_branch(name, allow_missing=allow_missing, force=force)
        await self._call(op, timeout)

    async def reset_branch(
        self, name: str, *, version: int = 0, timeout: float | None = None
    ) -> Branch:
        """Throw away the branch's writes; same port and credentials afterwards.

        With `version`, the branch moves to that version of its base (its
        parent then names it); only for a branch made from a base version.
        """
        return await self._call(ops.reset_branch(name, version), timeout)

    async def stream_branch_log(
        self,
        name: str,
        *,
        tail_lines: int | None = None,
        follow: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[bytes]:
        """The branch's postgres log in chunks of bytes (`async for`): all
        the daemon keeps of it, or only its last `tail_lines` lines; with
        `follow`, then each line as postgres writes it, until you stop
        iterating (break, or close the iterator). A followed log has no
        deadline unless `timeout` is given. Only the branch's owner or an
        admin may read it (PermissionDenied otherwise); a broken stream is
        not retried.
        """
        op = ops.stream_branch_log(name, tail_lines=tail_lines, follow=follow)
        budget = timeout if timeout is not None else None if follow else self.timeout
        method = getattr(self._stub(op.service), op.method)
        call = method(op.request, timeout=budget, metadata=self.endpoint.metadata())
        try:
            async for chunk in call:
                data = op.convert(chunk)
                if data:  # empty: a keepalive
                    yield data
        except grpc.RpcError as exc:
            raise translate(exc, self.endpoint) from exc
        finally:
            call.cancel()

    async def update_branch(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        ttl: DurationLike | None = None,
        protected: bool | None = None,
        idle_suspend: DurationLike | None = None,
        timeout: float | None = None,
    ) -> Branch:
        """Change the fields given.

        `labels` replaces all labels; `ttl` counts from now (0: never expire);
        `idle_suspend` 0: never suspend.
        """
        op = ops.update_branch(
            name, labels=labels, ttl=ttl, protected=protected, idle_suspend=idle_suspend
        )
        return await self._call(op, timeout)

    async def freeze_branch(self, name: str, *, timeout: float | None = None) -> Branch:
        """Make the branch a template: its data as it is now is what every
        later child clones (warm clones included); it is left SUSPENDED and
        cannot be reset. Idempotent."""
        return await self._call(ops.freeze_branch(name), timeout)

    @asynccontextmanager
    async def branch(
        self,
        parent: str,
        *,
        branch_id: str = "",
        labels: Mapping[str, str] | None = None,
        ttl: DurationLike | None = None,
        postgres_settings: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Branch]:
        """A branch for the `async with` block, deleted when the block ends (also on error).

        It is held in the client's lease (see `lease`): when the process is
        killed, the daemon deletes it after its lease grace. A `ttl` is the
        backstop should the daemon restart meanwhile.
        """
        created = await self.create_branch(
            parent,
            branch_id=branch_id,
            labels=labels,
            ttl=ttl,
            postgres_settings=postgres_settings,
            lease=await self.lease(),
            timeout=timeout,
        )
        try:
            yield created
        finally:
            await self.delete_branch(created.name, allow_missing=True, force=True, timeout=timeout)

    # -- bases --------------------------------------------------------------------

    async def create_base(
        self,
        base_id: str,
        *,
        data_directory: str | None = None,
        database: str = "",
        pg_version: int = 0,
        init_sql: str = "",
        labels: Mapping[str, str] | None = None,
        branch_role: str = "",
        roles: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Base:
        """Create a base from `data_directory` (copied), or by initdb when it is
        None. Its branches hand out `branch_role` (default: the superuser) or,
        on request, one of `roles`."""
        op = ops.create_base(
            base_id,
            data_directory=data_directory,
            database=database,
            pg_version=pg_version,
            init_sql=init_sql,
            labels=labels,
            branch_role=branch_role,
            roles=roles,
        )
        return await self._call(op, timeout)

    async def get_base(self, name: str, *, timeout: float | None = None) -> Base:
        """The base `name` (`bases/{id}` or just the id)."""
        return await self._call(ops.get_base(name), timeout)

    async def list_bases(self, *, timeout: float | None = None) -> list[Base]:
        """Every base."""
        return await self._call(ops.list_bases(), timeout)

    async def delete_base(
        self,
        name: str,
        *,
        force: bool = False,
        allow_missing: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Delete a base; FailedPrecondition while branches depend on it, unless `force`."""
        await self._call(ops.delete_base(name, force=force, allow_missing=allow_missing), timeout)

    async def create_base_version(
        self, name: str, *, data_directory: str = "", timeout: float | None = None
    ) -> BaseVersion:
        """Snapshot the base's current data as its next version; with
        `data_directory` (a cleanly shut down PGDATA on the daemon's host), a
        copy of it replaces the base's data first."""
        return await self._call(ops.create_base_version(name, data_directory), timeout)

    async def import_base(
        self,
        base_id: str,
        *,
        from_server: str = "",
        from_dump: str = "",
        data_directory: str = "",
        transforms: Sequence[tuple[str, str]] = (),
        transform_command: Sequence[str] = (),
        jobs: int = 0,
        keep_raw: bool = False,
        database: str = "",
        labels: Mapping[str, str] | None = None,
        branch_role: str = "",
        roles: Sequence[str] = (),
        follow: str = "",
        timeout: float | None = None,
    ) -> Operation:
        """Start importing a base (a new one, or the next version of `base_id`)
        from a live server (a DSN with a replication role), a pg_dump archive
        or SQL file, or a data directory on the daemon's host; `transforms`
        are (name, sql) pairs run in order before the version is sealed.
        `follow` (a DSN with a replication role) makes a new base that keeps
        following the server (docs/bases.md, "Point in time").
        Returns the operation at once: follow it with `wait_operation`."""
        op = ops.import_base(
            base_id,
            from_server=from_server,
            from_dump=from_dump,
            data_directory=data_directory,
            transforms=transforms,
            transform_command=transform_command,
            jobs=jobs,
            keep_raw=keep_raw,
            database=database,
            labels=labels,
            branch_role=branch_role,
            roles=roles,
            follow=follow,
        )
        return await self._call(op, timeout)

    async def refresh_base(self, name: str, *, timeout: float | None = None) -> Operation:
        """Start replaying the recipe of the base's newest import into its next version."""
        return await self._call(ops.refresh_base(name), timeout)

    # -- operations ---------------------------------------------------------------

    async def get_operation(self, name: str, *, timeout: float | None = None) -> Operation:
        """The operation `name` (`operations/{id}` or just the id)."""
        return await self._call(ops.get_operation(name), timeout)

    async def list_operations(self, *, timeout: float | None = None) -> list[Operation]:
        """The caller's operations (an admin's: all), newest first."""
        return await self._call(ops.list_operations(), timeout)

    async def wait_operation(self, name: str, *, wait_s: float = 60.0) -> Operation:
        """The operation once it is done, or after `wait_s` seconds (at most
        600), whichever comes first."""
        return await self._call(ops.wait_operation(name, wait_s), wait_s + 30)

    async def cancel_operation(self, name: str, *, timeout: float | None = None) -> Operation:
        """Ask the operation to stop; it ends CANCELLED with nothing left behind."""
        return await self._call(ops.cancel_operation(name), timeout)

    async def finish(self, operation: Operation, *, wait_s: float = 10.0) -> Operation:
        """Wait until `operation` is done, and raise its error if it failed
        (the same error class the call itself would have raised)."""
        while not operation.done:
            operation = await self.wait_operation(operation.name, wait_s=wait_s)
        operation.raise_if_failed()
        return operation

    # -- daemon -------------------------------------------------------------------

    async def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The daemon's version, storage driver and pool usage, and capacity."""
        return await self._call(ops.status(), timeout)

    async def health(
        self, service: str = ops.HEALTH_SERVICE, *, timeout: float | None = None
    ) -> str:
        """The daemon's grpc health status for `service` ("" is the whole daemon): `SERVING`, ...

        Unavailable (with what to do) when nothing answers at the address.
        """
        return await self._call(ops.health(service), timeout)


def _default_holder() -> str:
    program = os.path.basename(sys.argv[0]) or "python"
    return f"{program} pid {os.getpid()} on {socket.gethostname()}"


class AsyncLease:
    """A lease: branches tied to this process's life (see `AsyncClient.lease`).

    The stream opens on first use and again after it broke (a daemon
    restart), holding again what it held. `hold` adds branches (only your
    own: PermissionDenied otherwise, and then nothing is added); `keep` lets
    them go so they outlive the lease (until their TTL); `close` ends the
    lease and the daemon deletes what it still holds, except protected ones.
    """

    def __init__(self, client: AsyncClient, holder: str) -> None:
        self.client = client
        self.holder = holder
        self.name = ""
        self._stream: AioLeaseStream | None = None
        self._held: set[str] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncLease({self.name or 'not open'!r}, holding {len(self._held)})"

    @property
    def held(self) -> frozenset[str]:
        """The branches the lease holds, as far as this client knows."""
        return frozenset(self._held)

    async def open(self) -> None:
        """Open the stream now (else the first `hold` does); holds again what it held."""
        if self._closed:
            raise CowbranchError(f"lease {self.name} is closed")
        if self._stream is not None:
            return
        stream = AioLeaseStream(self.client._open_channel(), self.client.endpoint.metadata())
        try:
            response = await stream.send(leases_pb2.LeaseRequest(holder=self.holder))
            self.name = response.name
            for name in sorted(self._held):  # one by one: one of them may be gone by now
                error = answer_error(await stream.send(leases_pb2.LeaseRequest(hold=[name])))
                if isinstance(error, NotFound):
                    self._held.discard(name)
                elif error is not None:
                    raise error
        except grpc.RpcError as exc:
            await stream.close()
            raise translate(exc, self.client.endpoint) from exc
        except BaseException:
            await stream.close()
            raise
        self._stream = stream

    async def reopen(self) -> None:
        """Drop the stream and open a new one (the daemon forgot this lease):
        it holds again what it held."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()
        await self.open()

    def held_by_create(self, name: str) -> None:
        """A create with this lease made `name`: the daemon holds it already."""
        self._held.add(name)

    async def _send(self, request: leases_pb2.LeaseRequest) -> leases_pb2.LeaseResponse:
        for attempt in range(2):
            await self.open()
            assert self._stream is not None
            try:
                response = await self._stream.send(request)
            except (grpc.RpcError, CowbranchError) as exc:
                stream, self._stream = self._stream, None
                await stream.close()
                if attempt or status_code(exc) not in (grpc.StatusCode.UNAVAILABLE,):
                    if isinstance(exc, CowbranchError):
                        raise
                    raise translate(exc, self.client.endpoint) from exc
                continue
            error = answer_error(response)
            if error is not None:
                raise error
            return response
        raise AssertionError("unreachable")

    async def hold(self, *names: str) -> None:
        """Hold these branches (`branches/{id}` or ids): all of them, or none on error."""
        full = [n if n.startswith("branches/") else f"branches/{n}" for n in names]
        await self._send(leases_pb2.LeaseRequest(hold=full))
        self._held.update(full)

    async def keep(self, *names: str) -> None:
        """Let these branches go: they outlive the lease (until their TTL)."""
        full = [n if n.startswith("branches/") else f"branches/{n}" for n in names]
        await self._send(leases_pb2.LeaseRequest(keep=full))
        self._held.difference_update(full)

    async def close(self) -> list[str]:
        """End the lease; the daemon deletes what it still holds (not protected
        ones) and this returns their names. Calling it again does nothing."""
        if self._closed:
            return []
        deleted: list[str] = []
        if self._stream is not None or self._held:
            response = await self._send(leases_pb2.LeaseRequest(close=True))
            deleted = list(response.deleted)
        self._closed = True
        self._held.clear()
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()
        return deleted
