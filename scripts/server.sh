#!/usr/bin/env bash
# Team mode: a shared MLflow tracking server on this machine's loopback interface, backed by a
# private PostgreSQL cluster and a proxied artifact store, all kept in one state directory.
#
#   scripts/server.sh start    # idempotent: starts what is not running, prints the tracking URI
#   scripts/server.sh stop     # idempotent: stops MLflow, then PostgreSQL
#   scripts/server.sh status   # exit 0 when both run, 3 when neither does, 1 when only one does
#   scripts/server.sh uri      # prints `export MLFLOW_TRACKING_URI=...` of the running server
#
# Settings (environment):
#   E2E_SERVER_DIR            state directory (default: <repo>/.server, git-ignored)
#   E2E_SERVER_PORT           MLflow port on 127.0.0.1 (default 5000)
#   E2E_SERVER_PG_PORT        PostgreSQL port on 127.0.0.1 (default 55432, away from a distro
#                             cluster on 5432/5433)
#   E2E_SERVER_WORKERS        MLflow worker processes (default 2)
#   E2E_SERVER_AUTH           1: MLflow's basic-auth app (admin from MLFLOW_AUTH_ADMIN_USERNAME,
#                             default "admin", and MLFLOW_AUTH_ADMIN_PASSWORD, needed on the first
#                             start with auth only; neither is ever written or printed)
#   E2E_SERVER_AUTH_DEFAULT_PERMISSION  what every user may do on resources without a grant:
#                             READ (default), EDIT, MANAGE or NO_PERMISSIONS
#   E2E_SERVER_VENV           virtual environment holding mlflow + psycopg2 (default <repo>/.venv)
#   E2E_SERVER_PG_BIN         directory with initdb/pg_ctl (default: newest /usr/lib/postgresql/*/bin)
#   E2E_SERVER_START_TIMEOUT  seconds to wait for each server to answer (default 60)
#
# Layout of the state directory:
#   pgdata/          the PostgreSQL cluster (owned by the user PostgreSQL runs as)
#   artifacts/       the artifact store MLflow proxies (--artifacts-destination)
#   secrets/         pgpass (database passwords) and the Flask secret key; mode 0700, files 0600
#   postgres.log, mlflow.log, mlflow.pid, server.env (ports and mode of the running server)
#   basic_auth.ini   the auth app's configuration (no credentials in it)
#
# PostgreSQL refuses to run as root. Run as root, this script runs initdb/pg_ctl as the `postgres`
# system user (created by Debian's package; created here if missing) and hands it the cluster
# directory; run as anyone else, PostgreSQL runs as that user. Database passwords are random, kept
# in secrets/pgpass and passed to libpq through PGPASSFILE, so they appear in no command line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${E2E_SERVER_DIR:-$ROOT/.server}"
HOST=127.0.0.1  # loopback only: reach it from elsewhere through an SSH tunnel or a TLS proxy
PORT="${E2E_SERVER_PORT:-5000}"
PG_PORT="${E2E_SERVER_PG_PORT:-55432}"
WORKERS="${E2E_SERVER_WORKERS:-2}"
AUTH="${E2E_SERVER_AUTH:-0}"
AUTH_DEFAULT_PERMISSION="${E2E_SERVER_AUTH_DEFAULT_PERMISSION:-READ}"
VENV="${E2E_SERVER_VENV:-$ROOT/.venv}"
START_TIMEOUT="${E2E_SERVER_START_TIMEOUT:-60}"
STOP_TIMEOUT=30
DB_ROLE=mlflow
DB_NAME=mlflow
AUTH_DB_NAME=mlflow_auth
SUPERUSER=postgres

PGDATA="$STATE/pgdata"
SECRETS="$STATE/secrets"
PGPASS="$SECRETS/pgpass"
FLASK_KEY="$SECRETS/flask_secret_key"
ARTIFACTS="$STATE/artifacts"
PG_LOG="$STATE/postgres.log"
ML_LOG="$STATE/mlflow.log"
ML_PID="$STATE/mlflow.pid"
SERVER_ENV="$STATE/server.env"
AUTH_INI="$STATE/basic_auth.ini"
AUTH_MARK="$STATE/.auth_admin_bootstrapped"

say() { echo "server: $*" >&2; }
die() { echo "server: error: $*" >&2; exit 1; }

check_int() {  # name value
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1='$2' is not a number; set it to an integer (e.g. $1=5000)"
}
check_int E2E_SERVER_PORT "$PORT"
check_int E2E_SERVER_PG_PORT "$PG_PORT"
check_int E2E_SERVER_WORKERS "$WORKERS"
check_int E2E_SERVER_START_TIMEOUT "$START_TIMEOUT"
[[ "$AUTH" == 0 || "$AUTH" == 1 ]] || die "E2E_SERVER_AUTH='$AUTH' must be 0 or 1"
[[ "$AUTH_DEFAULT_PERMISSION" =~ ^(READ|EDIT|MANAGE|NO_PERMISSIONS)$ ]] \
  || die "E2E_SERVER_AUTH_DEFAULT_PERMISSION='$AUTH_DEFAULT_PERMISSION' must be READ, EDIT, MANAGE or NO_PERMISSIONS"
[[ "$PORT" != "$PG_PORT" ]] || die "E2E_SERVER_PORT and E2E_SERVER_PG_PORT are both $PORT; pick two ports"

# --- PostgreSQL binaries and the user that runs them -------------------------------------------

find_pg_bin() {
  if [[ -n "${E2E_SERVER_PG_BIN:-}" ]]; then
    [[ -x "$E2E_SERVER_PG_BIN/initdb" && -x "$E2E_SERVER_PG_BIN/pg_ctl" ]] || return 1
    echo "$E2E_SERVER_PG_BIN"; return
  fi
  local d
  # Newest major version first (Debian installs each under /usr/lib/postgresql/<major>/bin).
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r); do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then echo "$d"; return; fi
  done
  if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"; return
  fi
  return 1
}

ensure_pg_bin() {
  if PG_BIN="$(find_pg_bin)"; then return; fi
  [[ -z "${E2E_SERVER_PG_BIN:-}" ]] \
    || die "E2E_SERVER_PG_BIN='$E2E_SERVER_PG_BIN' holds no initdb/pg_ctl; point it at PostgreSQL's bin directory (e.g. /usr/lib/postgresql/15/bin) or unset it"
  if [[ "$(id -u)" != 0 ]]; then
    die "PostgreSQL server binaries (initdb, pg_ctl) are not installed and installing them needs root: run 'sudo apt-get install -y postgresql' (Debian/Ubuntu) once, or set E2E_SERVER_PG_BIN to the directory holding them"
  fi
  command -v apt-get >/dev/null \
    || die "PostgreSQL server binaries are not installed and this system has no apt-get; install PostgreSQL 15+ and set E2E_SERVER_PG_BIN to its bin directory"
  say "installing PostgreSQL with apt-get (once)"
  # The package's own cluster (port 5432) is not used; ours lives in $STATE.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >"$STATE/apt.log" 2>&1 \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$STATE/apt.log" 2>&1 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >>"$STATE/apt.log" 2>&1; } \
    || { tail -n 20 "$STATE/apt.log" >&2; die "apt-get install postgresql failed (log: $STATE/apt.log)"; }
  PG_BIN="$(find_pg_bin)" || die "apt-get installed postgresql but no initdb/pg_ctl was found under /usr/lib/postgresql"
}

pick_pg_user() {
  if [[ "$(id -u)" != 0 ]]; then PG_USER="$(id -un)"; return; fi
  PG_USER=postgres
  if ! id -u "$PG_USER" >/dev/null 2>&1; then
    say "creating system user '$PG_USER' (PostgreSQL refuses to run as root)"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$PG_USER" \
      || die "cannot create the system user '$PG_USER' that PostgreSQL needs to run as"
  fi
  command -v runuser >/dev/null || die "runuser (util-linux) is needed to run PostgreSQL as '$PG_USER'"
  # The cluster lives under $STATE: every parent directory must be searchable by that user.
  runuser -u "$PG_USER" -- test -x "$STATE" \
    || die "PostgreSQL runs as '$PG_USER' (it refuses root) but cannot reach $STATE: a parent directory is not searchable by other users (mode 0700?); set E2E_SERVER_DIR to a directory under a world-searchable path (e.g. /srv/mlflow) or chmod o+x the parents"
}

as_pg() {  # run a command as the PostgreSQL user, from a directory that user can enter
  # 9>&-: the postmaster must not inherit (and so hold forever) the state directory's lock.
  if [[ "$PG_USER" == "$(id -un)" ]]; then (cd "$STATE" && "$@" 9>&-)
  else (cd "$STATE" && runuser -u "$PG_USER" -- "$@" 9>&-); fi
}

pg_running() { [[ -d "$PGDATA" ]] && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

port_in_use() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

rand_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

pg_port_of_running() {  # line 4 of postmaster.pid is the port the running cluster listens on
  sed -n 4p "$PGDATA/postmaster.pid" 2>/dev/null
}

psql_super() {  # SQL on stdin, never on the command line (it may hold a password)
  PGPASSFILE="$PGPASS" "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$HOST" -p "$RUN_PG_PORT" \
    -U "$SUPERUSER" -d postgres "$@"
}

init_cluster() {
  [[ -f "$PGDATA/PG_VERSION" ]] && return
  say "creating the PostgreSQL cluster in $PGDATA"
  rm -rf "$PGDATA"
  mkdir -p "$PGDATA"
  local super_pw role_pw pwfile
  super_pw="$(rand_hex 24)"; role_pw="$(rand_hex 24)"
  pwfile="$PGDATA.pwfile"
  (umask 077
   printf '%s:*:*:%s:%s\n%s:*:*:%s:%s\n' "$HOST" "$SUPERUSER" "$super_pw" "$HOST" "$DB_ROLE" "$role_pw" >"$PGPASS"
   printf '%s\n' "$super_pw" >"$pwfile")
  chown "$PG_USER" "$PGDATA" "$pwfile"
  chmod 700 "$PGDATA"
  # Password logins only (scram), the superuser named `postgres` whoever runs the cluster.
  as_pg "$PG_BIN/initdb" -D "$PGDATA" -U "$SUPERUSER" --pwfile="$pwfile" --auth=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$STATE/initdb.log" 2>&1 \
    || { rm -f "$pwfile"; tail -n 20 "$STATE/initdb.log" >&2; rm -rf "$PGDATA"; die "initdb failed (log: $STATE/initdb.log)"; }
  rm -f "$pwfile"
  # TCP on loopback only, no unix socket (its path limit of ~100 bytes breaks deep state dirs).
  cat >>"$PGDATA/postgresql.conf" <<EOF

# --- written by scripts/server.sh ---
listen_addresses = '$HOST'
unix_socket_directories = ''
max_connections = 50
EOF
}

start_pg() {
  RUN_PG_PORT="$PG_PORT"
  if pg_running; then
    RUN_PG_PORT="$(pg_port_of_running)"
    say "PostgreSQL already running on $HOST:$RUN_PG_PORT"
    [[ "$RUN_PG_PORT" == "$PG_PORT" ]] \
      || say "note: E2E_SERVER_PG_PORT=$PG_PORT differs from the running cluster's port $RUN_PG_PORT; keeping $RUN_PG_PORT"
    return
  fi
  port_in_use "$PG_PORT" && die "port $PG_PORT on $HOST is taken by another process; set E2E_SERVER_PG_PORT to a free port"
  touch "$PG_LOG"; chown "$PG_USER" "$PG_LOG"
  say "starting PostgreSQL on $HOST:$PG_PORT (user $PG_USER, log $PG_LOG)"
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PG_LOG" -o "-p $PG_PORT" -w -t "$START_TIMEOUT" start >/dev/null \
    || { tail -n 20 "$PG_LOG" >&2; die "PostgreSQL did not start within ${START_TIMEOUT}s (log: $PG_LOG)"; }
}

provision_db() {  # idempotent: role, databases, ownership
  local role_pw
  role_pw="$(awk -F: -v u="$DB_ROLE" '$4 == u {print $5}' "$PGPASS")"
  [[ -n "$role_pw" ]] || die "$PGPASS lacks the '$DB_ROLE' password; remove $STATE to start from scratch"
  if [[ "$(echo "SELECT 1 FROM pg_roles WHERE rolname = '$DB_ROLE'" | psql_super)" != 1 ]]; then
    printf "CREATE ROLE %s LOGIN PASSWORD '%s';\n" "$DB_ROLE" "$role_pw" | psql_super
  fi
  local db
  for db in "$DB_NAME" "$AUTH_DB_NAME"; do
    if [[ "$(echo "SELECT 1 FROM pg_database WHERE datname = '$db'" | psql_super)" != 1 ]]; then
      echo "CREATE DATABASE $db OWNER $DB_ROLE" | psql_super
    fi
  done
}

check_venv() {  # before anything starts: the interpreter runs and has mlflow + the PostgreSQL driver
  [[ -x "$VENV/bin/mlflow" ]] || die "no mlflow in $VENV/bin; run 'make setup' or set E2E_SERVER_VENV"
  "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("mlflow") and u.find_spec("psycopg2") else 3)' 2>/dev/null \
    || die "$VENV/bin/python cannot run here or lacks mlflow/psycopg2 (psycopg2-binary); run 'make setup' as this user or set E2E_SERVER_VENV to a venv that has them"
  if [[ "$AUTH" == 1 ]]; then
    "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("flask_wtf") else 3)' 2>/dev/null \
      || die "E2E_SERVER_AUTH=1: MLflow's basic-auth app needs Flask-WTF, missing in $VENV; run 'make setup' (or '$VENV/bin/pip install \"mlflow[auth]\"')"
  fi
}

# --- MLflow ------------------------------------------------------------------------------------

ml_pid() {  # the recorded MLflow pid if that process is still an MLflow server
  local pid
  pid="$(cat "$ML_PID" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "mlflow.* server" || return 1
  echo "$pid"
}

recorded() {  # key from server.env
  sed -n "s/^$1=//p" "$SERVER_ENV" 2>/dev/null
}

backend_uri() {  # no password in it: libpq reads it from PGPASSFILE
  echo "postgresql+psycopg2://$DB_ROLE@$HOST:$RUN_PG_PORT/$1"
}

health() { curl -fsS --max-time 5 "http://$HOST:$1/health" >/dev/null 2>&1; }

start_mlflow() {
  local pid
  if pid="$(ml_pid)"; then
    local rport rauth
    rport="$(recorded PORT)"; rauth="$(recorded AUTH)"
    [[ "$rauth" == "$AUTH" ]] \
      || die "MLflow is already running with E2E_SERVER_AUTH=$rauth (pid $pid); run 'scripts/server.sh stop' first to switch"
    say "MLflow already running on $HOST:$rport (pid $pid)"
    RUN_PORT="$rport"
    return
  fi
  rm -f "$ML_PID"
  port_in_use "$PORT" && die "port $PORT on $HOST is taken by another process; set E2E_SERVER_PORT to a free port"
  mkdir -p "$ARTIFACTS"
  if [[ ! -s "$FLASK_KEY" ]]; then (umask 077; rand_hex 32 >"$FLASK_KEY"); fi
  local app_args=() auth_env=()
  if [[ "$AUTH" == 1 ]]; then
    # Credentials stay out of this file: MLflow reads them from MLFLOW_AUTH_ADMIN_* at bootstrap.
    cat >"$AUTH_INI" <<EOF
[mlflow]
default_permission = $AUTH_DEFAULT_PERMISSION
database_uri = $(backend_uri "$AUTH_DB_NAME")
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    app_args=(--app-name basic-auth)
    auth_env=(MLFLOW_AUTH_CONFIG_PATH="$AUTH_INI")
  fi
  : >"$ML_LOG"
  say "starting MLflow on $HOST:$PORT (auth: $([[ $AUTH == 1 ]] && echo basic-auth || echo off), log $ML_LOG)"
  # setsid: the server and its workers form one process group, stopped together.
  # MLflow's job runner (GenAI scorers; a runner plus several huey consumers) is off unless asked
  # for: the pipeline does not use it and it costs seconds of start-up and ~1 GB of memory.
  # MLFLOW_AUTH_CONFIG_PATH only with auth: MLflow 3.17's search_runs handler imports the auth
  # module whenever Flask-WTF is installed, and that import fails (HTTP 500) on a config path that
  # does not exist.
  env -u MLFLOW_AUTH_CONFIG_PATH "${auth_env[@]}" \
  PGPASSFILE="$PGPASS" \
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$FLASK_KEY")" \
  PATH="$VENV/bin:$PATH" \
    setsid "$VENV/bin/mlflow" server \
      --backend-store-uri "$(backend_uri "$DB_NAME")" \
      --artifacts-destination "$ARTIFACTS" --serve-artifacts \
      --host "$HOST" --port "$PORT" --workers "$WORKERS" "${app_args[@]}" \
      </dev/null >>"$ML_LOG" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$ML_PID"
  printf 'PORT=%s\nPG_PORT=%s\nAUTH=%s\n' "$PORT" "$RUN_PG_PORT" "$AUTH" >"$SERVER_ENV"
  local deadline=$((SECONDS + START_TIMEOUT))
  until health "$PORT"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$ML_LOG" >&2; rm -f "$ML_PID"
      die "MLflow exited during start-up (log: $ML_LOG); PostgreSQL is still up: 'scripts/server.sh stop' stops it"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 30 "$ML_LOG" >&2
      stop_mlflow >/dev/null 2>&1 || true
      die "MLflow did not answer on http://$HOST:$PORT/health within ${START_TIMEOUT}s (log: $ML_LOG); PostgreSQL is still up: 'scripts/server.sh stop' stops it"
    fi
    sleep 0.5
  done
  [[ "$AUTH" == 1 ]] && touch "$AUTH_MARK"
  RUN_PORT="$PORT"
}

stop_mlflow() {
  local pid
  if ! pid="$(ml_pid)"; then rm -f "$ML_PID"; say "MLflow is not running"; return; fi
  say "stopping MLflow (pid $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 -- "-$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      say "MLflow ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || true
      sleep 1; break
    fi
    sleep 0.3
  done
  rm -f "$ML_PID"
}

stop_pg() {
  if ! pg_running; then say "PostgreSQL is not running"; return; fi
  say "stopping PostgreSQL"
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t "$STOP_TIMEOUT" stop >/dev/null \
    || die "PostgreSQL did not stop within ${STOP_TIMEOUT}s (log: $PG_LOG)"
}

print_uri() {
  echo "export MLFLOW_TRACKING_URI=http://$HOST:$1"
  if [[ "$(recorded AUTH)" == 1 ]]; then
    say "basic auth is on: also export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
  fi
}

lock_state() {  # one start/stop at a time per state directory (two terminals, make -j)
  exec 9>"$STATE/.lock"
  flock -w "$((START_TIMEOUT * 2 + 60))" 9 || die "another server.sh holds $STATE/.lock; retry when it is done"
}

# --- commands ----------------------------------------------------------------------------------

cmd_start() {
  # Checked before anything starts, so a refused start leaves nothing running.
  if [[ "$AUTH" == 1 && ! -e "$AUTH_MARK" && -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
    die "E2E_SERVER_AUTH=1 needs MLFLOW_AUTH_ADMIN_PASSWORD on its first start to create the admin user '${MLFLOW_AUTH_ADMIN_USERNAME:-admin}' (MLflow ships no default password); export it (e.g. read -rs MLFLOW_AUTH_ADMIN_PASSWORD; export MLFLOW_AUTH_ADMIN_PASSWORD) and rerun"
  fi
  check_venv
  mkdir -p "$STATE" "$SECRETS"
  chmod 755 "$STATE"; chmod 700 "$SECRETS"
  lock_state
  ensure_pg_bin
  pick_pg_user
  init_cluster
  start_pg
  provision_db
  start_mlflow
  say "ready: tracking http://$HOST:$RUN_PORT, PostgreSQL $HOST:$RUN_PG_PORT, artifacts $ARTIFACTS"
  print_uri "$RUN_PORT"
}

cmd_stop() {
  [[ -d "$STATE" ]] || { say "nothing to stop: $STATE does not exist"; return; }
  lock_state
  stop_mlflow
  if [[ -d "$PGDATA" ]]; then
    PG_BIN="$(find_pg_bin)" || die "cannot find pg_ctl to stop the cluster in $PGDATA; set E2E_SERVER_PG_BIN"
    pick_pg_user
    stop_pg
  fi
  rm -f "$SERVER_ENV"
}

cmd_status() {
  local ml=0 pg=0 pid
  if pid="$(ml_pid)" && health "$(recorded PORT)"; then
    ml=1; say "MLflow: running on http://$HOST:$(recorded PORT) (pid $pid, auth $(recorded AUTH))"
  else
    say "MLflow: not running"
  fi
  if [[ -d "$PGDATA" ]] && PG_BIN="$(find_pg_bin)"; then
    pick_pg_user
    if pg_running; then pg=1; say "PostgreSQL: running on $HOST:$(pg_port_of_running) (data $PGDATA)"; fi
  fi
  ((pg)) || say "PostgreSQL: not running"
  ((ml)) && print_uri "$(recorded PORT)"
  if ((ml && pg)); then return 0; elif ((ml || pg)); then return 1; else return 3; fi
}

cmd_uri() {
  ml_pid >/dev/null || die "the MLflow server is not running; run 'make server' first"
  print_uri "$(recorded PORT)"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  uri) cmd_uri ;;
  *) echo "usage: $0 start|stop|status|uri   (settings: see the top of this file)" >&2; exit 2 ;;
esac
