#!/usr/bin/env bash
# Regenerates the gRPC/protobuf stubs (and their mypy stubs) in src/cowbranchd/v1
# from protos/. Run from anywhere: `bash scripts/gen_protos.sh`.
# tests/test_protos.py fails when the committed stubs are stale.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/src}"
python="${PYTHON:-$root/.venv/bin/python}"
bindir="$(dirname "$python")"
PATH="$bindir:$PATH" "$python" -m grpc_tools.protoc -I"$root/protos" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  "$root"/protos/cowbranchd/v1/*.proto
touch "$out/cowbranchd/v1/__init__.py"
