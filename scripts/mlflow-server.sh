#!/usr/bin/env bash
# A shared MLflow tracking server for a team: PostgreSQL as the backend store (runs, metrics,
# the model registry), artifacts proxied by the server into a folder (--serve-artifacts: clients
# need no access to the storage, only to the server), bound to 127.0.0.1 unless told otherwise.
#
#   scripts/mlflow-server.sh DIR PORT [--host HOST] [--auth] [--workers N] [--store sqlite]
#   scripts/mlflow-server.sh DIR stop
#
# DIR holds the PostgreSQL cluster (DIR/postgres, on port PORT+1, started by
# scripts/postgres.sh; database `mlflow`), the artifacts (DIR/artifacts), the server's log and
# pid. `mlflow server` runs in its own session; once /health answers, the last line printed is
#   MLFLOW_TRACKING_URI=http://HOST:PORT
# which every tympan stage, `optuna` workers, `mlflow ui` users and `mlflow models serve -m
# models:/NAME@champion` then use (export it). A DIR already holding a cluster is reused.
# `--store sqlite`: DIR/mlflow.db instead of PostgreSQL (one machine, a handful of users).
#
# --auth: MLflow's basic-auth app (`--app-name basic-auth`; needs mlflow[auth]): every request
# without valid credentials is refused (401). The admin is created on first start with the
# password in MLFLOW_AUTH_ADMIN_PASSWORD (environment only: never an argument, a file in the
# repo or a log line); the users' database is DIR/auth.db; MLFLOW_FLASK_SERVER_SECRET_KEY is
# taken from the environment, else generated once into DIR/flask-secret (mode 600). Clients
# authenticate with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. A checked password is
# cached per worker for $TYMPAN_AUTH_CACHE_S seconds (default 60; 0: every request pays the
# PBKDF2 check, which made a training run's logging 3x slower here).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$1 port=$2
shift 2
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
as_user=()
[ "$(id -u)" = 0 ] && as_user=(runuser -u postgres --)
if [ "$port" = stop ]; then
  [ -f "$dir/server.pid" ] && kill -TERM -- "-$(cat "$dir/server.pid")" 2>/dev/null || true
  rm -f "$dir/server.pid"
  [ -n "$bindir" ] && [ -d "$dir/postgres" ] && "${as_user[@]}" "$bindir/pg_ctl" -D "$dir/postgres" -w stop -m fast >&2 || true
  exit 0
fi
host=127.0.0.1 auth=() workers=2 kind=postgresql
while [ $# -gt 0 ]; do
  case $1 in
    --host) host=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --auth) auth=(--app-name basic-auth); shift ;;
    --store) kind=$2; shift 2 ;;
    *) echo "mlflow-server.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
pg_port=$((port + 1))
if [ "$kind" = sqlite ]; then
  store="sqlite:///$dir/mlflow.db"
elif [ -d "$dir/postgres" ] && [ -n "$bindir" ]; then  # a cluster from an earlier start
  "${as_user[@]}" "$bindir/pg_ctl" -D "$dir/postgres" -l "$dir/postgres/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $dir/postgres" start >&2 || true
  store="postgresql+psycopg2://postgres@127.0.0.1:$pg_port/mlflow"
else
  chmod 755 "$dir"  # the server runs as the postgres user, which must reach its folder
  store=$(TYMPAN_PG_DB=mlflow "$here/postgres.sh" "$dir/postgres" "$pg_port" | tail -n 1)
fi
mkdir -p "$dir/artifacts"
if [ ${#auth[@]} -gt 0 ]; then
  if [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] && [ ! -f "$dir/auth.db" ]; then
    echo "mlflow-server.sh: --auth creates the admin with MLFLOW_AUTH_ADMIN_PASSWORD; set it" >&2
    exit 2
  fi
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    if [ ! -f "$dir/flask-secret" ]; then
      (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > "$dir/flask-secret")
    fi
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$dir/flask-secret")
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  # auth_cache_ttl_seconds: a checked password is remembered for a minute per worker, so each
  # request does not pay PBKDF2 again (a changed password reaches the other worker within it)
  printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s\nadmin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\nauth_cache_ttl_seconds = %s\nauth_cache_max_size = 10000\n' \
    "$dir/auth.db" "${TYMPAN_AUTH_CACHE_S:-60}" > "$dir/basic_auth.ini"
  export MLFLOW_AUTH_CONFIG_PATH=$dir/basic_auth.ini
fi
mlflow=${MLFLOW_BIN:-$(command -v mlflow || echo "$here/../.venv/bin/mlflow")}
setsid "$mlflow" server --backend-store-uri "$store" --serve-artifacts \
  --artifacts-destination "$dir/artifacts" --host "$host" --port "$port" \
  --workers "$workers" "${auth[@]}" > "$dir/server.log" 2>&1 < /dev/null &
echo $! > "$dir/server.pid"
for _ in $(seq 1 240); do
  if curl -fs "http://127.0.0.1:$port/health" > /dev/null 2>&1; then
    echo "MLFLOW_TRACKING_URI=http://$host:$port"
    exit 0
  fi
  if ! kill -0 "$(cat "$dir/server.pid")" 2>/dev/null; then
    echo "mlflow-server.sh: mlflow server exited; its log:" >&2
    tail -n 40 "$dir/server.log" >&2
    exit 1
  fi
  sleep 0.5
done
echo "mlflow-server.sh: no answer on port $port after 120 s; see $dir/server.log" >&2
exit 1
