"""The sync client is generated from the async one (`.ci/gen-sync-client`):
the committed sync.py is what the generator makes of aio.py, the two clients
offer the same methods with the same parameters, and the rules do what the
generator's docstring says."""

from __future__ import annotations

import inspect
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cowbranchd.client import AsyncClient, Client

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / ".ci" / "gen-sync-client"
SYNC = ROOT / "src" / "cowbranchd" / "client" / "sync.py"


def test_committed_sync_client_is_fresh(tmp_path: Path) -> None:
    """Regenerating sync.py from aio.py changes nothing (else run `.ci/gen-sync-client`)."""
    fresh = tmp_path / "sync.py"
    subprocess.run([sys.executable, str(GENERATOR), str(fresh)], check=True, capture_output=True)
    assert fresh.read_text() == SYNC.read_text(), "stale sync.py: run `.ci/gen-sync-client`"


def test_generated_file_says_where_it_comes_from() -> None:
    """sync.py opens with the do-not-edit header naming its source and generator."""
    first = SYNC.read_text().splitlines()[0]
    assert first == "# generated from aio.py by .ci/gen-sync-client — do not edit"


def _public_methods(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in vars(cls).items()
        if callable(member) and (not name.startswith("_") or name in ("__init__", "__repr__"))
    }


def _parameters(function: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_both_clients_offer_the_same_methods_and_parameters() -> None:
    """Client and AsyncClient have the same methods, each taking the same parameters,
    and every method that is a coroutine or async generator on one is plain on the other."""
    sync_methods = _public_methods(Client)
    async_methods = _public_methods(AsyncClient)
    assert sorted(sync_methods) == sorted(async_methods)
    for name, method in async_methods.items():
        assert _parameters(sync_methods[name]) == _parameters(method), name
        plain = sync_methods[name]
        assert not inspect.iscoroutinefunction(plain), name
        assert not inspect.isasyncgenfunction(plain), name
    assert inspect.iscoroutinefunction(AsyncClient.create_branch)
    assert inspect.isasyncgenfunction(AsyncClient.list_branches)
    assert inspect.isgeneratorfunction(Client.list_branches)


ASYNC_EXAMPLE = '''\
"""Replaced by SYNC_DOCSTRING."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import grpc.aio

from .transport import open_aio_channel


class AsyncClient:
    """Use `async with`, or `await close()`; the async client is one AsyncClient."""

    def __init__(self) -> None:
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def pages(self, ids: list[int]) -> AsyncIterator[int]:
        await asyncio.sleep(0.1)
        self._channel = open_aio_channel()
        for item in [i async for i in self.items(ids)]:
            yield item

    @asynccontextmanager
    async def held(self) -> AsyncIterator[AsyncClient]:
        async with self as client:
            yield client
'''

SYNC_EXAMPLE = '''\
# generated from aio.py by .ci/gen-sync-client — do not edit
"""{docstring}"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from .transport import open_channel


class Client:
    """Use `with`, or `close()`; the async client is one Client."""

    def __init__(self) -> None:
        self._channel: grpc.Channel | None = None

    def __enter__(self) -> Client:
        return self

    def pages(self, ids: list[int]) -> Iterator[int]:
        time.sleep(0.1)
        self._channel = open_channel()
        yield from [i for i in self.items(ids)]

    @contextmanager
    def held(self) -> Iterator[Client]:
        with self as client:
            yield client
'''


def test_rules_on_a_small_example() -> None:
    """The rules, shown on a small async module: coroutines become functions, asyncio
    names and modules become their sync twins (in code and in quoted code), an async
    generator's `for`/`yield` becomes `yield from`, and the module docstring is replaced.
    English in strings is left alone ("the async client")."""
    generator = runpy.run_path(str(GENERATOR), run_name="gen_sync_client")
    expected = SYNC_EXAMPLE.format(docstring=generator["SYNC_DOCSTRING"])
    assert generator["generate"](ASYNC_EXAMPLE) == expected
