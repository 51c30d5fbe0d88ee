"""An undo stack for multi-step operations: register the undo of each step
right after the step succeeds; on failure the undos run in reverse order, on
success they are dropped. No half-built branch or base survives an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Self

import structlog

from cowbranchd.deadline import unbounded

__all__ = ["Revert"]

log = structlog.get_logger("cowbranchd.revert")


class Revert:
    """`with Revert() as undo: step(); undo.add(unstep); ...; undo.success()`."""

    def __init__(self) -> None:
        self._undos: list[tuple[str, Callable[[], object]]] = []

    def add(self, what: str, undo: Callable[[], object]) -> None:
        self._undos.append((what, undo))

    def success(self) -> None:
        self._undos.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        while self._undos:
            what, undo = self._undos.pop()
            try:
                # Past the call's deadline too: half-built work never stays.
                with unbounded():
                    undo()
            except Exception as undo_exc:
                # An undo that fails must not hide the original error, nor
                # stop the remaining undos.
                log.error("undo_failed", step=what, error=str(undo_exc))
