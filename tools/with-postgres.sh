#!/bin/sh
# Runs a command beside a throwaway PostgreSQL server (Debian's postgresql package), with
# MAM_RS_TEST_POSTGRES naming it ("host=127.0.0.1 port=N user=postgres"). The server has its
# own temporary directory and a free port on loopback, and is removed when the command ends.
#
#   tools/with-postgres.sh cargo test --no-default-features --features postgres-tests
set -eu
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$BIN" ]; then
	echo "with-postgres: PostgreSQL is not installed (apt-get install postgresql)" >&2
	exit 1
fi
dir=$(mktemp -d /tmp/mam_rs_pg.XXXXXX)
# PostgreSQL refuses to run as root: run it as the postgres system user then.
as_pg=""
if [ "$(id -u)" = 0 ]; then
	chown postgres "$dir"
	as_pg="runuser -u postgres --"
fi
stop() {
	$as_pg "$BIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
	rm -rf "$dir"
}
trap stop EXIT INT TERM
$as_pg "$BIN/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$as_pg "$BIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
	-o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
MAM_RS_TEST_POSTGRES="host=127.0.0.1 port=$port user=postgres" "$@"
