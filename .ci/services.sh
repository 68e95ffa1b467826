# A throwaway PostgreSQL and an MLflow tracking server on it, for the tests that need a real server
# (tests/test_tracking_server.py). Sourced by .ci/run; by hand:
#
#   source .ci/services.sh && start_services && env | grep IMGSEARCH_TEST; stop_services
#
# start_services: PostgreSQL in a temp dir on a free loopback port (initdb + pg_ctl, as the
# postgres user when run as root), databases `mlflow` and `jobs`, then `mlflow server` with the
# PostgreSQL backend store and a local artifact root (served by the server), in its own process
# group. Exports IMGSEARCH_TEST_TRACKING_URI (http://127.0.0.1:PORT) and IMGSEARCH_TEST_PG_URL
# (postgresql+psycopg2://postgres@127.0.0.1:PORT/jobs, for the APScheduler job store). stop_services stops
# the whole mlflow process group (it starts several workers) and the cluster, and removes the dir.

SERVICES_PY="${SERVICES_PY:-python}"

_free_port() {
  "$SERVICES_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_pg_bin() {
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir
    return
  fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

# run a PostgreSQL command as the postgres user when root (initdb refuses root), else as is
_as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    su postgres -s /bin/sh -c "$*"
  else
    sh -c "$*"
  fi
}

start_postgres() {
  local bin
  bin="$(_pg_bin)"
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "services: PostgreSQL (initdb, pg_ctl) not found; install postgresql" >&2
    return 1
  fi
  SERVICES_DIR="$(mktemp -d /tmp/imgsearch-services.XXXXXX)"
  chmod 755 "$SERVICES_DIR"
  PG_DIR="$SERVICES_DIR/pg"
  mkdir -p "$PG_DIR"
  [ "$(id -u)" -eq 0 ] && chown postgres "$PG_DIR"
  PG_PORT="$(_free_port)"
  _as_pg "'$bin/initdb' -D '$PG_DIR/data' -A trust -U postgres >'$PG_DIR/initdb.log' 2>&1" || {
    cat "$PG_DIR/initdb.log" >&2
    return 1
  }
  _as_pg "'$bin/pg_ctl' -D '$PG_DIR/data' -l '$PG_DIR/server.log' -w start \
    -o \"-p $PG_PORT -k '$PG_DIR' -c listen_addresses=127.0.0.1\"" >/dev/null || {
    cat "$PG_DIR/server.log" >&2
    return 1
  }
  PG_CTL="$bin/pg_ctl"
  for db in mlflow jobs; do
    _as_pg "'$bin/createdb' -h 127.0.0.1 -p $PG_PORT -U postgres $db"
  done
  export IMGSEARCH_TEST_PG_URL="postgresql+psycopg2://postgres@127.0.0.1:$PG_PORT/jobs"
  echo "services: PostgreSQL on 127.0.0.1:$PG_PORT ($PG_DIR)"
}

start_mlflow_server() {
  local port url i
  port="$(_free_port)"
  url="http://127.0.0.1:$port"
  mkdir -p "$SERVICES_DIR/artifacts"
  # setsid: the server and its workers form one process group, stopped together. One worker and
  # no GenAI job runner (half a dozen huey consumers): on 2 busy cores uvicorn's supervisor kills
  # workers that miss its health pings, and the job runner is not used here.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$SERVICES_PY" -m mlflow server \
    --backend-store-uri "postgresql+psycopg2://postgres@127.0.0.1:$PG_PORT/mlflow" \
    --artifacts-destination "$SERVICES_DIR/artifacts" \
    --host 127.0.0.1 --port "$port" --workers 1 \
    >"$SERVICES_DIR/mlflow.log" 2>&1 &
  MLFLOW_PGID=$!
  for i in $(seq 1 180); do
    if "$SERVICES_PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$url" 2>/dev/null; then
      export IMGSEARCH_TEST_TRACKING_URI="$url"
      echo "services: mlflow server on $url (process group $MLFLOW_PGID, ${i}s)"
      return 0
    fi
    if ! kill -0 "$MLFLOW_PGID" 2>/dev/null; then
      break
    fi
    sleep 1
  done
  echo "services: mlflow server did not come up:" >&2
  tail -40 "$SERVICES_DIR/mlflow.log" >&2
  return 1
}

start_services() {
  start_postgres && start_mlflow_server
}

stop_services() {
  if [ -n "${MLFLOW_PGID:-}" ]; then
    kill -TERM -- "-$MLFLOW_PGID" 2>/dev/null || true
    for _ in $(seq 1 20); do
      kill -0 -- "-$MLFLOW_PGID" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$MLFLOW_PGID" 2>/dev/null || true
    MLFLOW_PGID=""
  fi
  if [ -n "${PG_DIR:-}" ] && [ -d "$PG_DIR/data" ]; then
    _as_pg "'$PG_CTL' -D '$PG_DIR/data' -m fast -w stop" >/dev/null 2>&1 || true
  fi
  if [ -n "${SERVICES_DIR:-}" ]; then
    rm -rf "$SERVICES_DIR"
    SERVICES_DIR=""
  fi
  unset IMGSEARCH_TEST_TRACKING_URI IMGSEARCH_TEST_PG_URL
}
