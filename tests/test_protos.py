"""The committed gRPC stubs match the protos, and the protos serve reflection."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    """Regenerating the stubs from protos/ changes nothing (else run `bash .ci/gen-protos`)."""
    subprocess.run(
        ["bash", str(ROOT / ".ci" / "gen-protos"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh = tmp_path / "cowbranchd" / "v1"
    committed = ROOT / "src" / "cowbranchd" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file())
    _match, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert (mismatch, errors) == ([], []), "stale stubs: run `bash .ci/gen-protos`"
