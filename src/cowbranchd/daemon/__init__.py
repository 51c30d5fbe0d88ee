"""The daemon side of cowbranchd: the `cowbranchd` process (`server`), its
gRPC servicers (`service`), and the orchestration under them: bases, branches,
the warm pool, the reaper and start-up reconcile, over one shared `inventory`
context (`lifecycle` holds the steps they compose, `revert` the undo stack).

It builds on `cowbranchd.postgres`, `cowbranchd.storage` and
`cowbranchd.ports`; nothing below it and nothing on the client side
(`cowbranchd.client`, `cowbranchd.ctl`, `cowbranchd.pytest_plugin`) imports
it, which tests/test_import_boundaries.py checks.
"""

from __future__ import annotations

from .server import Daemon, main

__all__ = ["Daemon", "main"]
