#!/usr/bin/env bash
# Start or stop a private PostgreSQL 15 cluster on 127.0.0.1 for the tests.
#   scripts/postgres.sh start DIR PORT   prints the admin URL on stdout
#   scripts/postgres.sh stop DIR
set -euo pipefail

action=${1:?usage: postgres.sh start DIR PORT | stop DIR}
dir=${2:?missing cluster directory}
pgbin=$(ls -d /usr/lib/postgresql/15/bin 2>/dev/null || true)
[ -n "$pgbin" ] || { echo "PostgreSQL 15 binaries not found under /usr/lib/postgresql/15" >&2; exit 1; }

as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$action" in
start)
    port=${3:?missing port}
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$dir"; fi
    chmod 700 "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_postgres "$pgbin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale >/dev/null
    fi
    as_postgres "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" start >/dev/null
    echo "postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_postgres "$pgbin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    fi
    ;;
*)
    echo "unknown action $action; use start or stop" >&2; exit 2 ;;
esac
