#!/usr/bin/env bash
# Set up (if needed) and run every check: ruff, mypy and the test suite on SQLite and on a
# private PostgreSQL 15 server started here on 127.0.0.1 and stopped afterwards.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/evidence -x
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/setup.sh
bash scripts/setup-keylime.sh >/dev/null

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy

pg_dir=$(mktemp -d -t edgetrust-pg.XXXXXX)
pg_port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() { bash scripts/postgres.sh stop "$pg_dir" || true; rm -rf "$pg_dir"; }
trap cleanup EXIT
EDGETRUST_TEST_POSTGRES_URL=$(bash scripts/postgres.sh start "$pg_dir" "$pg_port")
export EDGETRUST_TEST_POSTGRES_URL
echo "== pytest (SQLite and PostgreSQL at 127.0.0.1:$pg_port)"

export TSS2_LOG=all+none
.venv/bin/python -m pytest "$@"
