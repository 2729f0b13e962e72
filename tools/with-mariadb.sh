#!/bin/sh
# Runs a command beside a throwaway MariaDB server (Debian's mariadb-server package), with
# MAM_RS_TEST_MYSQL naming it: "mysql://mam_rs:mam_rs@127.0.0.1:N/?socket=DIR/mariadbd.sock",
# an account that may create databases. The server has its own temporary directory, socket and
# a free port on loopback, and is removed when the command ends. It reads no option file
# (--no-defaults), so its defaults are the compiled ones (latin1): the store must not depend on
# the server's character set. Composes with tools/with-postgres.sh:
#
#   tools/with-postgres.sh tools/with-mariadb.sh cargo test --no-default-features \
#       --features postgres-tests,mysql-tests
set -eu
MARIADBD=$(command -v mariadbd || ls /usr/sbin/mariadbd 2>/dev/null || true)
if [ -z "$MARIADBD" ] || ! command -v mariadb-install-db >/dev/null || ! command -v mariadb >/dev/null; then
	echo "with-mariadb: MariaDB is not installed (apt-get install mariadb-server mariadb-client)" >&2
	exit 1
fi
dir=$(mktemp -d /tmp/mam_rs_mariadb.XXXXXX)
# mariadbd refuses to run as root: run it as the mysql system user then. The OS user we are
# gets an administrator account of the same name through the socket (unix_socket plugin).
me=$(id -un)
os_user=$me
as_db=""
if [ "$(id -u)" = 0 ]; then
	os_user=mysql
	chown mysql "$dir"
	# setpriv execs (runuser would fork): $! below is the server itself.
	as_db="setpriv --reuid=mysql --regid=mysql --clear-groups --"
fi
pid=""
stop() {
	if [ -n "$pid" ]; then
		kill -TERM "$pid" 2>/dev/null || true
		# A clean shutdown is quick with this little data; do not wait for ever.
		i=0
		while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do
			sleep 0.1
			i=$((i + 1))
		done
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	rm -rf "$dir"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
sizes="--innodb-buffer-pool-size=64M --innodb-log-file-size=16M"
# shellcheck disable=SC2086
mariadb-install-db --no-defaults --datadir="$dir/data" --user="$os_user" \
	--auth-root-authentication-method=socket --auth-root-socket-user="$me" \
	--skip-test-db --skip-name-resolve $sizes >"$dir/install.log" 2>&1 || {
	cat "$dir/install.log" >&2
	exit 1
}
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# No fsync per commit, no binary log: a test server, thrown away. Enough connections for
# every test running at once (a writer and a pool each).
# shellcheck disable=SC2086
$as_db "$MARIADBD" --no-defaults --datadir="$dir/data" --socket="$dir/mariadbd.sock" \
	--pid-file="$dir/mariadbd.pid" --log-error="$dir/mariadbd.log" --tmpdir="$dir" \
	--port="$port" --bind-address=127.0.0.1 --skip-name-resolve --skip-log-bin \
	--innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --max-connections=1000 \
	$sizes >"$dir/mariadbd.out" 2>&1 &
pid=$!
i=0
until mariadb-admin --no-defaults --socket="$dir/mariadbd.sock" -u "$me" --connect-timeout=1 \
	ping >/dev/null 2>&1; do
	if ! kill -0 "$pid" 2>/dev/null || [ $i -ge 600 ]; then
		echo "with-mariadb: the server did not start:" >&2
		cat "$dir/mariadbd.out" "$dir/mariadbd.log" >&2 || true
		exit 1
	fi
	sleep 0.1
	i=$((i + 1))
done
mariadb --no-defaults --socket="$dir/mariadbd.sock" -u "$me" -e "
	CREATE USER 'mam_rs'@'127.0.0.1' IDENTIFIED BY 'mam_rs';
	CREATE USER 'mam_rs'@'localhost' IDENTIFIED BY 'mam_rs';
	GRANT ALL ON *.* TO 'mam_rs'@'127.0.0.1';
	GRANT ALL ON *.* TO 'mam_rs'@'localhost';"
MAM_RS_TEST_MYSQL="mysql://mam_rs:mam_rs@127.0.0.1:$port/?socket=$dir/mariadbd.sock" "$@"
