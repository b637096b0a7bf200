#!/usr/bin/env bash
# Regenerates the committed Python stubs from protos/ds01/v1/*.proto.
# tests/test_protos.py fails when the committed stubs differ from what this writes.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-protos}"
python=${PYTHON:-.venv/bin/python}
"$python" -m grpc_tools.protoc -Iprotos \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    protos/ds01/v1/*.proto
