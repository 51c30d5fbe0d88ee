"""`AsyncClient`: the asyncio twin of `cowbranchd.client.Client`, on grpc.aio.

Same methods, same arguments, same errors and retry rules (the requests come
from `ops`, the addresses and errors from `transport`); only
the sending is awaited. Imported and re-exported by `cowbranchd.client`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from cowbranchd.errors import CowbranchError

from . import ops
from .transport import (
    Endpoint,
    RetryPolicy,
    deadline_error,
    open_aio_channel,
    resolve_endpoint,
    status_code,
    translate,
)
from .types import Base, BaseVersion, Branch, DurationLike, SelectorLike

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient:
    """An asyncio connection to one cowbranchd daemon; arguments as for `Client`.

    The channel opens on the first call, inside the running event loop, so the
    client may be built outside one. Use `async with` or `await close()`.
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
        """Close the channel; calling it again does nothing."""
        self._closed = True
        channel, self._channel = self._channel, None
        self._stubs.clear()
        if channel is not None:
            await channel.close(None)

    def _stub(self, service: ops.Service) -> Any:
        if self._closed:
            raise CowbranchError("this AsyncClient is closed")
        if self._channel is None:
            self._channel = open_aio_channel(self.endpoint)
        if service not in self._stubs:
            self._stubs[service] = ops.STUBS[service](self._channel)
        return self._stubs[service]

    async def _call(self, op: ops.Op[T], timeout: float | None = None) -> T:
        """Send `op`, retrying UNAVAILABLE like `Client._call`."""
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
        timeout: float | None = None,
    ) -> Branch:
        """Create a branch of `parent`; see `Client.create_branch`."""
        op = ops.create_branch(
            parent,
            branch_id=branch_id,
            labels=labels,
            ttl=ttl,
            postgres_settings=postgres_settings,
            protected=protected,
            request_id=request_id,
        )
        return await self._call(op, timeout)

    async def get_branch(self, name: str, *, timeout: float | None = None) -> Branch:
        """The branch `name` (`branches/{id}` or just the id)."""
        return await self._call(ops.get_branch(name), timeout)

    async def list_branches(
        self, selector: SelectorLike = None, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[Branch]:
        """Every branch matching the label `selector` (`async for`), page by page."""
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
        """Delete a branch; see `Client.delete_branch`."""
        op = ops.delete_branch(name, allow_missing=allow_missing, force=force)
        await self._call(op, timeout)

    async def reset_branch(self, name: str, *, timeout: float | None = None) -> Branch:
        """Throw away the branch's writes."""
        return await self._call(ops.reset_branch(name), timeout)

    async def update_branch(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        ttl: DurationLike | None = None,
        protected: bool | None = None,
        timeout: float | None = None,
    ) -> Branch:
        """Change labels, ttl or protected; see `Client.update_branch`."""
        op = ops.update_branch(name, labels=labels, ttl=ttl, protected=protected)
        return await self._call(op, timeout)

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
        """A branch for the `async with` block, deleted when it ends."""
        created = await self.create_branch(
            parent,
            branch_id=branch_id,
            labels=labels,
            ttl=ttl,
            postgres_settings=postgres_settings,
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
        timeout: float | None = None,
    ) -> Base:
        """Create a base; see `Client.create_base`."""
        op = ops.create_base(
            base_id,
            data_directory=data_directory,
            database=database,
            pg_version=pg_version,
            init_sql=init_sql,
            labels=labels,
        )
        return await self._call(op, timeout)

    async def get_base(self, name: str, *, timeout: float | None = None) -> Base:
        """The base `name`."""
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
        """Delete a base; see `Client.delete_base`."""
        await self._call(ops.delete_base(name, force=force, allow_missing=allow_missing), timeout)

    async def create_base_version(
        self, name: str, *, data_directory: str = "", timeout: float | None = None
    ) -> BaseVersion:
        """Snapshot the base as its next version; see `Client.create_base_version`."""
        return await self._call(ops.create_base_version(name, data_directory), timeout)

    # -- daemon -------------------------------------------------------------------

    async def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The daemon's version, storage driver and pool usage; see `Client.status`."""
        return await self._call(ops.status(), timeout)

    async def health(
        self, service: str = ops.HEALTH_SERVICE, *, timeout: float | None = None
    ) -> str:
        """The daemon's grpc health status for `service`; see `Client.health`."""
        return await self._call(ops.health(service), timeout)
