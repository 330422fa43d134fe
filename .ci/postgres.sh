#!/usr/bin/env bash
# Makes sure the tests have a PostgreSQL server on 127.0.0.1:$PORT whose
# user may create databases. Prints `DATABASE_URL=…` on stdout when the
# tests must use something other than the default
# postgres://postgres@127.0.0.1:5432/postgres (no password); prints nothing
# when the default works. `bash .ci/run` runs it; it also runs alone.
#
# What it may change on the machine, and nothing else:
#   - when no PostgreSQL is installed at all: installs the Debian packages
#     `postgresql` and `postgresql-client` (which create and start a cluster)
#     and records that cluster in $MARK as "created by .ci/run";
#   - starts installed clusters that are stopped (`pg_ctlcluster … start`);
#   - on a cluster recorded in $MARK only, and only when it asks for a
#     password over TCP: gives its `postgres` role the password `postgres`.
# It never changes the authentication (roles, passwords, pg_hba.conf) of a
# server it did not create: if such a server asks for a password, it stops
# and says to set DATABASE_URL.
#
# Knobs (for the test of this script, tests/tests/ci_postgres.rs):
# IGNY8_CI_PG_PORT (5432), IGNY8_CI_PG_SOCKET_DIR (/var/run/postgresql),
# IGNY8_CI_PG_MARK, IGNY8_CI_PG_OS_USER (postgres: the OS user that may use
# the local socket), IGNY8_CI_PG_SETUP=0 (never install or start anything).
set -euo pipefail

PORT="${IGNY8_CI_PG_PORT:-5432}"
SOCKET_DIR="${IGNY8_CI_PG_SOCKET_DIR:-/var/run/postgresql}"
MARK="${IGNY8_CI_PG_MARK:-${XDG_CACHE_HOME:-$HOME/.cache}/igny8-ci-tools/postgres-created-by-ci}"
SETUP="${IGNY8_CI_PG_SETUP:-1}"
OS_USER="${IGNY8_CI_PG_OS_USER:-postgres}"
DEFAULT_URL="postgres://postgres@127.0.0.1:$PORT/postgres"

say() { printf '%s\n' "$*" >&2; }

pg_up() { command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p "$PORT"; }

# The data directories of the clusters Debian's tools know: "port datadir".
clusters() {
    command -v pg_lsclusters >/dev/null || return 0
    pg_lsclusters --no-header 2>/dev/null | awk '{print $3, $6}'
}

# True when the server answering on $PORT is a cluster recorded in $MARK:
# its data directory is listed there and its postmaster.pid names $PORT.
created_by_ci() {
    [ -f "$MARK" ] || return 1
    local port datadir
    while read -r port datadir; do
        [ "$port" = "$PORT" ] || continue
        [ -f "$datadir/postmaster.pid" ] || continue
        [ "$(sed -n 4p "$datadir/postmaster.pid")" = "$PORT" ] && return 0
    done <"$MARK"
    return 1
}

# psql over the local socket as the cluster's OS user (peer or trust auth).
psql_as_postgres() {
    if [ "$(id -un)" = "$OS_USER" ]; then
        psql -w -h "$SOCKET_DIR" -p "$PORT" -U postgres -XqAt "$@"
    else
        runuser -u "$OS_USER" -- psql -w -h "$SOCKET_DIR" -p "$PORT" -U postgres -XqAt "$@"
    fi
}

if ! pg_up && [ "$SETUP" = 1 ]; then
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        command -v apt-get >/dev/null || {
            say "no PostgreSQL on 127.0.0.1:$PORT and no apt-get: install PostgreSQL 15+ or set DATABASE_URL"
            exit 1
        }
        before="$(clusters)"
        say "installing the Debian packages postgresql and postgresql-client"
        apt-get update -qq && apt-get install -y -qq postgresql postgresql-client >/dev/null
        mkdir -p "$(dirname "$MARK")"
        # Record only the clusters this install created.
        comm -13 <(printf '%s\n' "$before" | sort) <(clusters | sort) | sed '/^$/d' >>"$MARK"
    fi
    for version in $(ls /etc/postgresql); do
        say "starting the installed PostgreSQL $version cluster main"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
pg_up || {
    say "PostgreSQL did not come up on 127.0.0.1:$PORT"
    exit 1
}

# -w: never prompt for a password (no terminal in CI; no surprise at yours).
if psql -w "$DEFAULT_URL" -XqAtc 'SELECT 1' >/dev/null 2>&1; then
    exit 0
fi
if created_by_ci; then
    # Our own cluster (a fresh Debian install asks for a password over TCP):
    # give its postgres role a throwaway one.
    psql_as_postgres -c "ALTER ROLE postgres PASSWORD 'postgres'" >/dev/null
    url="postgres://postgres:postgres@127.0.0.1:$PORT/postgres"
    psql -w "$url" -XqAtc 'SELECT 1' >/dev/null
    echo "DATABASE_URL=$url"
    exit 0
fi
say "PostgreSQL on 127.0.0.1:$PORT refuses postgres without a password, and .ci/run did not"
say "create that server, so it will not change its authentication. Set DATABASE_URL to a role"
say "that may create databases, e.g."
say "    DATABASE_URL=postgres://USER:PASSWORD@127.0.0.1:$PORT/postgres bash .ci/run"
exit 1
