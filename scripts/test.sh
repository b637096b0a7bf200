#!/usr/bin/env bash
# Runs the whole suite against a real etcd and a real private dockerd started by the
# fixtures (root needed for dockerd). With CI=true nothing may be skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
