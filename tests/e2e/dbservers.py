"""Real database servers for the e2e suite: a PostgreSQL and a MariaDB of our own.

Each server runs from Debian's packages (`postgresql`, `mariadb-server`) in a temporary
directory of its own, listens on 127.0.0.1 on a free port (plus a unix socket in that
directory), and has one database and one user with a password made for the suite. No system
service or cluster is used or needed. conftest.py starts each one at most once per pytest
session, when a test first asks for it (`postgres_server`, `mariadb_server` fixtures), and
stops it and removes its directory at the end, failures included.

API of both (see DatabaseServer):

    db.driver, db.host, db.port, db.user, db.password, db.database   Prosody's `sql` parameters
    db.prosody_sql(database=None)     the `sql = { ... }` line for prosody.cfg.lua
    db.sql(statement, database=None)  run SQL with the CLI (psql / mariadb) as db.user over
                                      TCP; returns the result rows as tuples of str (None for
                                      NULL). Identifiers are double-quoted on both servers
                                      ("user", "key", "when"): MariaDB sessions get ANSI_QUOTES.
    db.admin_sql(statement, database=None)  the same as the server's superuser (unix socket)
    db.create_database(name=None, template=None)  a new empty database (or a copy of
                                      `template`) owned by / granted to db.user; returns its name
    db.drop_database(name)
    db.stop(crash=False)              stop the server (crash=True: PostgreSQL immediate shutdown,
                                      MariaDB SIGKILL, so the next start runs crash recovery)
    db.start()                        start it again: same port, same data
    db.running, db.log_tail(n)

With MAM_E2E_POSTGRES / MAM_E2E_MYSQL set to a URL (postgresql://user:password@host:port/db,
mysql://user:password@host:port/db), the fixtures use that existing server instead of starting
one (ExternalServer below): db.sql() works as above, and the CLI needs only to reach it over
TCP; admin_sql() runs as the URL's user, so create_database() needs CREATEDB (PostgreSQL) or
ALL ON *.* (MariaDB) for it; stop()/start() are not possible and skip the test.
"""

import atexit
import csv
import ctypes
import io
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

PG_BIN = Path(os.environ.get("MAM_E2E_PG_BIN") or max(
    (p / "bin" for p in Path("/usr/lib/postgresql").glob("*") if (p / "bin" / "postgres").exists()),
    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    default=Path("/usr/lib/postgresql/15/bin")))
MARIADBD = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/sbin") or "/usr/sbin/mariadbd"
DB_USER = "prosody_e2e"
DB_NAME = "prosody_e2e"
START_TIMEOUT = 60.0

_IS_ROOT = os.geteuid() == 0
_LIVE = []  # servers that are running, stopped at exit if a fixture could not


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _work_root():
    from conftest import WORK_ROOT  # the e2e work root (tmpfs by default)
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    return WORK_ROOT


# A server started from pytest's main thread dies with pytest (SIGKILLed by a CI timeout, say)
# instead of being left behind. Not for servers started from other threads: the signal is
# sent when the thread that forked it ends.
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig):
    if threading.current_thread() is not threading.main_thread():
        return None
    return lambda: _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _run(argv, timeout=60, **kw):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise RuntimeError("%s: exit %d\n--- stdout ---\n%s\n--- stderr ---\n%s"
                           % (" ".join(map(str, argv)), proc.returncode, proc.stdout, proc.stderr))
    return proc


def _lua_string(s):
    return '"%s"' % str(s).replace("\\", "\\\\").replace('"', '\\"')


def _sql_literal(s):
    return "'%s'" % str(s).replace("'", "''")


class DatabaseServer:
    driver = None  # Prosody's sql.driver
    kind = None
    host = "127.0.0.1"
    can_restart = True

    def __init__(self):
        self.port = None
        self.user = DB_USER
        self.password = "pw-" + uuid.uuid4().hex[:16]
        self.database = DB_NAME
        self.dir = None
        self.proc = None
        self.startup_seconds = None  # first start, initialisation included

    # -- common API
    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def params(self, database=None):
        return dict(driver=self.driver, database=database or self.database, host=self.host, port=self.port,
                    username=self.user, password=self.password)

    def prosody_sql(self, database=None):
        p = self.params(database)
        return "sql = { %s }" % ", ".join(
            "%s = %s" % (k, p[k] if isinstance(p[k], int) else _lua_string(p[k]))
            for k in ("driver", "database", "host", "port", "username", "password"))

    def sql(self, statement, database=None, timeout=60):
        return self._cli(statement, database or self.database, admin=False, timeout=timeout)

    def admin_sql(self, statement, database=None, timeout=60):
        return self._cli(statement, database, admin=True, timeout=timeout)

    def log_tail(self, n=50):
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except (OSError, AttributeError) as e:
            return "(no log: %s)" % e

    def setup(self):
        """Initialises the data directory, starts the server, creates the user and database."""
        t0 = time.monotonic()
        root = _work_root()
        self.dir = Path(tempfile.mkdtemp(prefix="%s-" % self.kind, dir=root))
        _LIVE.append(self)
        try:
            self._init()
            for attempt in range(3):
                self.port = _free_port()
                try:
                    self.start()
                    break
                except _PortTaken:
                    if attempt == 2:
                        raise
            self._create_user_and_database()
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def start(self, timeout=START_TIMEOUT):
        assert not self.running, "%s is already running" % self.kind
        offset = self.log.stat().st_size if self.log.exists() else 0
        out = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(self._server_argv(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.dir, **self._popen_kw())
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._ready():
                return self
            time.sleep(0.05)
        rc = self.proc.poll()
        self._terminate()
        text = self.log.read_bytes()[offset:].decode(errors="replace")
        if rc is not None and self._port_taken(text):
            raise _PortTaken("%s: port %d is taken\n%s" % (self.kind, self.port, text[-2000:]))
        raise RuntimeError("%s did not start within %.0f s (exit %r, %s)\n--- log ---\n%s"
                           % (self.kind, timeout, rc, self.dir, text[-4000:]))

    def stop(self, crash=False, timeout=60.0):
        """Stops the server and waits for it. crash=True: no clean shutdown."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(self._crash_signal if crash else self._stop_signal)  # our child, by PID
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._terminate()
                raise RuntimeError("%s did not stop within %.0f s" % (self.kind, timeout))
        self.proc = None

    def restart(self, crash=False):
        self.stop(crash=crash)
        return self.start()

    def close(self):
        """Stops the server (if running) and removes its directory."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.stop()
                except Exception:
                    self._terminate()
        finally:
            self.proc = None
            if self in _LIVE:
                _LIVE.remove(self)
            if self.dir is not None and not os.environ.get("MAM_E2E_KEEP"):
                shutil.rmtree(self.dir, ignore_errors=True)

    def _terminate(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(self._crash_signal)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def create_database(self, name=None, template=None):
        name = name or "e2e_" + uuid.uuid4().hex[:12]
        assert re.fullmatch(r"[a-z0-9_]+", name), name
        self._create_database(name, template)
        return name


class _PortTaken(RuntimeError):
    pass


def _owner_ids(user):
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


class PostgresServer(DatabaseServer):
    """PostgreSQL from Debian's postgresql package. As root, the cluster belongs to the
    `postgres` system user (initdb refuses to run as root): initdb runs through runuser, and
    the server is started with setuid/setgid in the forked child, so that the process we
    signal is the postmaster itself (runuser would stay in between, and SIGKILLs its child
    two seconds after passing on a signal)."""

    driver = "PostgreSQL"
    kind = "postgres"
    _stop_signal = signal.SIGINT  # fast shutdown
    _crash_signal = signal.SIGQUIT  # immediate shutdown: crash recovery at the next start

    def __init__(self):
        super().__init__()
        self.os_user = "postgres" if _IS_ROOT else None
        self.superuser = "postgres"

    @property
    def data(self):
        return self.dir / "data"

    @property
    def log(self):
        return self.dir / "postgres.log"

    def _as_owner(self, argv):
        return ["runuser", "-u", self.os_user, "--", *argv] if self.os_user else list(argv)

    def _popen_kw(self):
        kw = dict(preexec_fn=_die_with_parent(signal.SIGQUIT))
        if self.os_user:
            uid, gid = _owner_ids(self.os_user)
            kw.update(user=uid, group=gid, extra_groups=[])
        return kw

    def _init(self):
        if self.os_user:
            uid, gid = _owner_ids(self.os_user)
            os.chown(self.dir, uid, gid)
        _run(self._as_owner([PG_BIN / "initdb", "-D", self.data, "-U", self.superuser, "-E", "UTF8",
                             "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256",
                             "--no-sync", "--no-instructions"]), cwd=self.dir, timeout=120)

    def _server_argv(self):
        return [PG_BIN / "postgres", "-D", self.data, "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1",
                "-c", "unix_socket_directories=%s" % self.dir,
                "-c", "unix_socket_permissions=0700",
                "-c", "logging_collector=off",
                "-c", "shared_buffers=32MB",
                "-c", "max_connections=100"]

    def _ready(self):
        # Over TCP, as a client would connect; exit 0 only once connections are accepted.
        r = subprocess.run([PG_BIN / "pg_isready", "-q", "-h", self.host, "-p", str(self.port), "-t", "1"],
                           capture_output=True, timeout=10)
        return r.returncode == 0

    @staticmethod
    def _port_taken(log_text):
        return "could not bind" in log_text or "Address already in use" in log_text

    def _cli(self, statement, database, admin, timeout=60):
        if admin:
            argv = self._as_owner([PG_BIN / "psql", "-h", self.dir, "-p", str(self.port), "-U", self.superuser])
            env = dict(os.environ)
        else:
            argv = [PG_BIN / "psql", "-h", self.host, "-p", str(self.port), "-U", self.user]
            env = dict(os.environ, PGPASSWORD=self.password)
        argv += ["-d", database or "postgres", "-X", "-q", "--csv", "-t", "-v", "ON_ERROR_STOP=1", "-P", "null=\\N"]
        proc = subprocess.run(argv, input=statement, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError("psql (%s): %s\n%s" % ("admin" if admin else self.user, proc.stderr.strip(), statement))
        return [tuple(None if v == "\\N" else v for v in row) for row in csv.reader(io.StringIO(proc.stdout))]

    def _create_user_and_database(self):
        self.admin_sql("CREATE ROLE %s LOGIN PASSWORD %s;" % (self.user, _sql_literal(self.password)))
        self._create_database(self.database, None)

    def _create_database(self, name, template):
        self.admin_sql('CREATE DATABASE %s OWNER %s ENCODING \'UTF8\'%s;'
                       % (name, self.user, " TEMPLATE %s" % template if template else ""))

    def drop_database(self, name):
        self.admin_sql("DROP DATABASE IF EXISTS %s WITH (FORCE);" % name)


class MariaDBServer(DatabaseServer):
    """MariaDB from Debian's mariadb-server package. As root, mariadbd runs as the `mysql`
    system user, started with setuid/setgid in the forked child rather than by its own --user
    switch (changing user in mariadbd would clear the die-with-pytest signal). The superuser
    is the OS user we run as (root), through the unix socket (unix_socket authentication)."""

    driver = "MySQL"
    kind = "mariadb"
    _stop_signal = signal.SIGTERM  # clean shutdown
    _crash_signal = signal.SIGKILL  # InnoDB crash recovery at the next start

    def __init__(self, buffer_pool="32M", log_file="16M"):
        """Small InnoDB sizes by default: for tests, the defaults (a 96 MB redo log) only cost
        time and tmpfs. The benchmark asks for a buffer pool that holds its archive, as an
        admin's server would have."""
        super().__init__()
        self._sizes = ["--innodb-buffer-pool-size=%s" % buffer_pool, "--innodb-log-file-size=%s" % log_file]
        self.os_user = "mysql" if _IS_ROOT else pwd.getpwuid(os.geteuid()).pw_name
        # mariadb-install-db gives this OS user (root when we are root) socket access as itself.
        # (mariadbd runs as os_user; install-db chowns the data directory to it.)
        self.superuser = pwd.getpwuid(os.geteuid()).pw_name

    @property
    def data(self):
        return self.dir / "data"

    @property
    def socket(self):
        return self.dir / "mariadbd.sock"

    @property
    def log(self):
        return self.dir / "mariadbd.log"

    def _popen_kw(self):
        kw = dict(preexec_fn=_die_with_parent(signal.SIGTERM))
        if _IS_ROOT:
            uid, gid = _owner_ids(self.os_user)
            kw.update(user=uid, group=gid, extra_groups=[])
        return kw

    def _init(self):
        if _IS_ROOT:
            uid, gid = _owner_ids(self.os_user)
            os.chown(self.dir, uid, gid)
        _run(["mariadb-install-db", "--no-defaults", "--datadir=%s" % self.data, "--user=%s" % self.os_user,
              "--auth-root-authentication-method=socket", "--auth-root-socket-user=%s" % self.superuser,
              "--skip-test-db", "--skip-name-resolve", *self._sizes], cwd=self.dir, timeout=180)

    def _server_argv(self):
        return [MARIADBD, "--no-defaults", "--datadir=%s" % self.data,
                "--socket=%s" % self.socket, "--pid-file=%s" % (self.dir / "mariadbd.pid"),
                "--port=%d" % self.port, "--bind-address=127.0.0.1", "--skip-name-resolve",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_unicode_ci", "--skip-log-bin", *self._sizes]

    def _ready(self):
        if not self.socket.exists():
            return False
        r = subprocess.run(["mariadb-admin", "--no-defaults", "-S", self.socket, "-u", self.superuser,
                            "--connect-timeout=1", "ping"], capture_output=True, timeout=10)
        return r.returncode == 0

    @staticmethod
    def _port_taken(log_text):
        return "Address already in use" in log_text or "Can't start server: Bind" in log_text

    def _cli(self, statement, database, admin, timeout=60):
        if admin:
            argv = ["mariadb", "--no-defaults", "-S", self.socket, "-u", self.superuser]
            env = dict(os.environ)
        else:
            argv = ["mariadb", "--no-defaults", "-h", self.host, "-P", str(self.port), "-u", self.user]
            env = dict(os.environ, MYSQL_PWD=self.password)
        argv += ["--batch", "--skip-column-names", "--default-character-set=utf8mb4"]
        if database:
            argv.append(database)
        statement = "SET SESSION sql_mode = CONCAT(@@SESSION.sql_mode, ',ANSI_QUOTES');\n" + statement
        proc = subprocess.run(argv, input=statement, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError("mariadb (%s): %s\n%s" % ("admin" if admin else self.user, proc.stderr.strip(), statement))
        return [tuple(_mysql_unescape(v) for v in line.split("\t")) for line in proc.stdout.split("\n") if line != ""]

    def _create_user_and_database(self):
        self.admin_sql("CREATE USER '%s'@'127.0.0.1' IDENTIFIED BY %s;" % (self.user, _sql_literal(self.password)))
        self._create_database(self.database, None)

    def _create_database(self, name, template):
        stmts = ["CREATE DATABASE %s CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;" % name,
                 "GRANT ALL ON %s.* TO '%s'@'127.0.0.1';" % (name, self.user)]
        if template:  # MariaDB has no template databases: copy each table
            for (table,) in self.admin_sql("SELECT table_name FROM information_schema.tables "
                                           "WHERE table_schema = '%s' ORDER BY table_name;" % template):
                stmts += ['CREATE TABLE %s."%s" LIKE %s."%s";' % (name, table, template, table),
                          'INSERT INTO %s."%s" SELECT * FROM %s."%s";' % (name, table, template, table)]
        self.admin_sql("\n".join(stmts))

    def drop_database(self, name):
        self.admin_sql("DROP DATABASE IF EXISTS %s;" % name)


_MYSQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a", "\\": "\\"}


def _mysql_unescape(v):
    if v == "NULL":
        return None
    return re.sub(r"\\(.)", lambda m: _MYSQL_ESCAPES.get(m.group(1), m.group(1)), v)


class ExternalServer:
    """An existing server named by a URL (MAM_E2E_POSTGRES / MAM_E2E_MYSQL). Same API; not
    started, stopped or removed by the suite."""

    can_restart = False
    startup_seconds = 0.0

    def __init__(self, cls, url):
        u = urllib.parse.urlsplit(url)
        self._impl = cls.__new__(cls)
        DatabaseServer.__init__(self._impl)
        impl = self._impl
        impl.host = u.hostname or "127.0.0.1"
        impl.port = u.port or (5432 if cls is PostgresServer else 3306)
        impl.user = urllib.parse.unquote(u.username or DB_USER)
        impl.password = urllib.parse.unquote(u.password or "")
        impl.database = u.path.lstrip("/") or DB_NAME
        impl.os_user = None
        impl.superuser = impl.user
        impl.dir = None
        self.driver, self.kind = cls.driver, cls.kind + " (external)"

    def __getattr__(self, name):
        return getattr(self._impl, name)

    @property
    def running(self):
        return True

    def admin_sql(self, statement, database=None, timeout=60):
        # No superuser here: the URL's user over TCP.
        return self._impl._cli(statement, database or self._impl.database, admin=False, timeout=timeout)

    def create_database(self, name=None, template=None):
        name = name or "e2e_" + uuid.uuid4().hex[:12]
        impl = self._impl
        if isinstance(impl, PostgresServer):
            self.admin_sql("CREATE DATABASE %s%s;" % (name, " TEMPLATE %s" % template if template else ""))
        else:
            stmts = ["CREATE DATABASE %s CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;" % name]
            if template:
                for (table,) in self.admin_sql("SELECT table_name FROM information_schema.tables "
                                               "WHERE table_schema = '%s' ORDER BY table_name;" % template):
                    stmts += ['CREATE TABLE %s."%s" LIKE %s."%s";' % (name, table, template, table),
                              'INSERT INTO %s."%s" SELECT * FROM %s."%s";' % (name, table, template, table)]
            self.admin_sql("\n".join(stmts))
        return name

    def drop_database(self, name):
        if isinstance(self._impl, PostgresServer):
            self.admin_sql("DROP DATABASE IF EXISTS %s WITH (FORCE);" % name)
        else:
            self.admin_sql("DROP DATABASE IF EXISTS %s;" % name)

    def _no_restart(self, *_a, **_kw):
        import pytest
        pytest.skip("%s: an external server (MAM_E2E_POSTGRES / MAM_E2E_MYSQL) cannot be stopped by the suite"
                    % self.kind)

    stop = start = restart = _no_restart

    def close(self):
        pass


def open_server(kind, **settings):
    """A started server of `kind` ("postgres" or "mariadb"), or the external one the
    environment names. The caller closes it. `settings`: for the server's constructor."""
    cls, env = {"postgres": (PostgresServer, "MAM_E2E_POSTGRES"), "mariadb": (MariaDBServer, "MAM_E2E_MYSQL")}[kind]
    if os.environ.get(env):
        return ExternalServer(cls, os.environ[env])
    need = {"postgres": [(PG_BIN / "postgres", "postgresql"), (PG_BIN / "psql", "postgresql-client")],
            "mariadb": [(MARIADBD, "mariadb-server"), (shutil.which("mariadb-install-db"), "mariadb-server"),
                        (shutil.which("mariadb"), "mariadb-client")]}[kind]
    missing = sorted({pkg for path, pkg in need if not path or not os.path.exists(path)})
    if missing:
        raise RuntimeError("no %s to start: install the Debian package(s) %s (make deps does)"
                           % (kind, ", ".join(missing)))
    return cls(**settings).setup()


@atexit.register
def _stop_leftovers():
    for srv in list(_LIVE):
        srv.close()
