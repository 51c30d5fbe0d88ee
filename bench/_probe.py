"""Another client of the daemon, in its own process (so the benchmark's own
threads cannot delay it): GetBranch, ListBranches(page_size=5) and health
Check, one after the other, in a loop. Used by the storm (bench/_measure.py).

    python bench/_probe.py SOCKET BRANCH_NAME IDLE_CYCLES

Does IDLE_CYCLES cycles, prints `ready`, waits for `go` on stdin, then loops
until `stop` (or end of input) on stdin, and prints one JSON object: the
latencies in seconds per kind, idle and during, and the failed calls counted
by status code. Every call has a deadline (PROBE_TIMEOUT).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cowbranchd.v1 import branches_pb2, branches_pb2_grpc

__all__ = ["PROBE_KINDS", "PROBE_TIMEOUT"]

PROBE_KINDS = ("get", "list", "health")
PROBE_TIMEOUT = 10.0  # seconds; the target is 1 s, a longer deadline shows how long it took


class Probe:
    def __init__(self, socket_path: str, branch_name: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.branches = branches_pb2_grpc.BranchServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.branch_name = branch_name

    def _timed(self, out: dict[str, list[float]], errors: Counter[str], kind: str,
               call: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        try:
            call()
        except grpc.RpcError as exc:
            code = exc.code()
            errors[f"{kind} {code.name if code is not None else 'UNKNOWN'}"] += 1
        out[kind].append(time.perf_counter() - t0)

    def cycle(self, out: dict[str, list[float]], errors: Counter[str]) -> None:
        self._timed(out, errors, "get", lambda: self.branches.GetBranch(
            branches_pb2.GetBranchRequest(name=self.branch_name), timeout=PROBE_TIMEOUT))
        self._timed(out, errors, "list", lambda: self.branches.ListBranches(
            branches_pb2.ListBranchesRequest(page_size=5), timeout=PROBE_TIMEOUT))
        self._timed(out, errors, "health", lambda: self.health.Check(
            health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT))


def main(argv: list[str]) -> int:
    socket_path, branch_name, idle_cycles = argv[0], argv[1], int(argv[2])
    probe = Probe(socket_path, branch_name)
    idle: dict[str, list[float]] = {k: [] for k in PROBE_KINDS}
    idle_errors: Counter[str] = Counter()
    for _ in range(idle_cycles):
        probe.cycle(idle, idle_errors)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()  # "stop", or end of input
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    during: dict[str, list[float]] = {k: [] for k in PROBE_KINDS}
    during_errors: Counter[str] = Counter()
    while not stop.is_set():
        probe.cycle(during, during_errors)
    probe.channel.close()
    print(json.dumps({"idle": idle, "idle_errors": idle_errors,
                      "during": during, "during_errors": during_errors}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
