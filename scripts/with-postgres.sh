#!/usr/bin/env bash
# Run a command with a throwaway PostgreSQL server on 127.0.0.1 and ALIGNLOOP_TEST_PG_URL pointing at it.
# The annotation tests read that variable (each test makes and drops its own database there).
# Usage: scripts/with-postgres.sh COMMAND [ARGS...]
# Needs Debian's postgresql (scripts/system-deps.sh postgres installs it) and psycopg (the `postgres` extra).
set -euo pipefail
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "with-postgres: no PostgreSQL server binaries under /usr/lib/postgresql (scripts/system-deps.sh postgres)" >&2
  exit 1
fi
dir=$(mktemp -d /tmp/alignloop-pg.XXXXXX)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# initdb refuses to run as root: as root, the server runs as the postgres user made by the Debian package.
as_pg=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$dir"
  as_pg=(runuser -u postgres --)
fi
stop() {
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap stop EXIT
"${as_pg[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
# fsync stays on: the crash test must see what a real server keeps.
"${as_pg[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=300" start >/dev/null \
  || { cat "$dir/server.log" >&2; exit 1; }
export ALIGNLOOP_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
echo "with-postgres: $("$bindir/postgres" --version) on 127.0.0.1:$port" >&2
"$@"
