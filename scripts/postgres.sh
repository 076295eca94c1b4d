#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the distributed-tuning tests (and under
# scripts/mlflow-server.sh, MLflow's backend store):
#   scripts/postgres.sh DATA_DIR PORT [ROLE]  -> prints the database URL on the last line
# The database is named $TYMPAN_PG_DB (default optuna).
# Installs Debian's postgresql package when no server binaries are found (needs root and the
# Debian registry). The cluster trusts local connections, listens on 127.0.0.1 only, and is
# stopped with: pg_ctl -D DATA_DIR stop
# With ROLE, it also creates that login role with the password in $TYMPAN_PG_PASSWORD (read
# from the environment, never from the command line) and a database of the same name that it
# owns; TCP logins as ROLE must give that password (scram-sha-256), everyone else is trusted.
set -euo pipefail
data=$1 port=$2 role=${3:-}
if [ -n "$role" ] && [ -z "${TYMPAN_PG_PASSWORD:-}" ]; then
  echo "postgres.sh: ROLE $role needs its password in TYMPAN_PG_PASSWORD" >&2
  exit 2
fi
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
  bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
as_user=()
if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  mkdir -p "$data" && chown postgres "$data" && chmod 700 "$data"
  as_user=(runuser -u postgres --)
fi
"${as_user[@]}" "$bindir/initdb" -D "$data" -U postgres --auth=trust >/dev/null
if [ -n "$role" ]; then  # the first matching line wins: this one before initdb's trust lines
  "${as_user[@]}" sed -i "1i host all $role 127.0.0.1/32 scram-sha-256" "$data/pg_hba.conf"
fi
"${as_user[@]}" "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $data" start >&2
db=${TYMPAN_PG_DB:-optuna}
"${as_user[@]}" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db"
if [ -n "$role" ]; then
  # through stdin, quotes doubled: the password never appears in a process's arguments
  printf "CREATE ROLE \"%s\" LOGIN PASSWORD '%s';\n" "$role" "${TYMPAN_PG_PASSWORD//\'/\'\'}" |
    "${as_user[@]}" "$bindir/psql" -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres \
      -d postgres >&2
  "${as_user[@]}" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres -O "$role" "$role"
fi
echo "postgresql+psycopg2://postgres@127.0.0.1:$port/$db"
