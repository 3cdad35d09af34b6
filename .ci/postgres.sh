#!/usr/bin/env bash
# Start a local PostgreSQL for the store tests; safe to run again (idempotent).
#
#   eval "$(.ci/postgres.sh)"        # exports SPECTUNE_TEST_PG_URL
#
# stdout carries only the `export SPECTUNE_TEST_PG_URL=...` line; progress goes to stderr.
# If SPECTUNE_PG_ENV_FILE is set, the same line is also written to that file (for
# scripts that `source` it). Installs Debian's `postgresql` with apt-get when missing,
# creates (if needed) and starts a cluster on 127.0.0.1:$PGPORT, and creates the role
# `spectune` (password `spectune`) with databases `spectune` and `spectune_test`.
set -euo pipefail

PGPORT="${PGPORT:-5432}"
PG_USER="spectune"
PG_PASSWORD="spectune"
PG_DATABASES=("spectune" "spectune_test")

log() { echo "postgres.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

install_postgres() {
    if command -v pg_ctlcluster >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        return
    fi
    log "installing postgresql with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >&2
}

pg_version() {
    ls /usr/lib/postgresql | sort -V | tail -n 1
}

start_cluster() {
    local ver="$1"
    if ! pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main"' | grep -q .; then
        log "creating cluster $ver/main on port $PGPORT"
        as_root pg_createcluster "$ver" main --port "$PGPORT" >&2
    fi
    as_root install -d -o postgres -g postgres -m 2775 /var/run/postgresql
    if pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
        log "cluster $ver/main already running"
    else
        log "starting cluster $ver/main"
        # No systemd in containers/CI: talk to pg_ctl directly.
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start >&2
    fi
    for _ in $(seq 1 30); do
        if pg_isready -q -h 127.0.0.1 -p "$PGPORT"; then return; fi
        sleep 1
    done
    log "PostgreSQL did not become ready on 127.0.0.1:$PGPORT"
    exit 1
}

psql_admin() {
    as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PGPORT" -d postgres "$@"
}

create_role_and_dbs() {
    # Role: create if missing, (re)set the password either way.
    psql_admin -c "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
            CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
        ELSE
            ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
        END IF;
    END \$\$;" >&2
    for db in "${PG_DATABASES[@]}"; do
        if [ -z "$(psql_admin -tA -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
            log "creating database $db"
            psql_admin -c "CREATE DATABASE $db OWNER $PG_USER" >&2
        fi
    done
}

install_postgres
ver="$(pg_version)"
start_cluster "$ver"
create_role_and_dbs

line="export SPECTUNE_TEST_PG_URL=postgresql+psycopg://$PG_USER:$PG_PASSWORD@127.0.0.1:$PGPORT/spectune_test"
if [ -n "${SPECTUNE_PG_ENV_FILE:-}" ]; then
    echo "$line" >"$SPECTUNE_PG_ENV_FILE"
fi
log "ready (PostgreSQL $ver on 127.0.0.1:$PGPORT)"
echo "$line"
