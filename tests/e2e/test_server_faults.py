"""A database server stopped and restarted under load (issues 5 and 6): the archive is on a real
PostgreSQL (or MariaDB) through `mam_rs_sql`, Prosody's own stores stay on SQLite, and the
test stops the server while clients chat, then starts it again.

Proven, with the same harness as the SQLite faults (test_database_faults.chat_through_fault):
messages are delivered while the server is down; Prosody answers pings; the log has one error
line for the outage, naming the server, and one line when writes work again; every stanza-id a
client received is then in the archive, once; `mam_rs_max_queued_rows` is enforced to the row
and reported once each way. And: an archive query made while the server is down gets a
"try again later" error at once (not a hang); after the restart, queries work again on new
connections. And a server that accepts connections and says nothing holds neither Prosody's
start (10 s at most) nor its stop, and is archived to once it answers.
"""

import signal
import socket
import threading
import time

import pytest

from conftest import ProsodyServer, exchange, token
from test_database_faults import MAX_QUEUED, chat_through_fault

pytestmark = pytest.mark.mam_rs_only


class ServerStopped:
    """The database server goes away (a fast shutdown: its connections are closed) and comes
    back on the same port."""

    def __init__(self, db):
        self.db = db
        self.name = "%s stopped" % db.kind

    def start(self):
        self.db.stop()

    def clear(self):
        self.db.start()


@pytest.fixture(params=["postgres", "mariadb"])
def db_server(request):
    return request.getfixturevalue(request.param + "_server")


def mam_rs_sql(params):
    """The `mam_rs_sql` line that puts the archive at `params` (dbservers' params())."""
    return "mam_rs_sql = { %s }" % ", ".join(
        "%s = %s" % (k, params[k] if isinstance(params[k], int) else '"%s"' % params[k])
        for k in ("driver", "database", "host", "port", "username", "password"))


def first_archived(alice, bob, prefix, within=30):
    """Sends alice -> bob until a message arrives with bob's stanza-id (or `within` seconds
    pass): (its body, the stanza-id or None)."""
    from test_lifecycle import sid_for

    deadline = time.monotonic() + within
    while True:
        body = prefix + token()
        sid = sid_for(bob.wait_id(alice.send_message(bob.bare, body)), bob.bare)
        if sid or time.monotonic() > deadline:
            return body, sid
        time.sleep(0.5)


def archive_server(db, extra=()):
    """A Prosody whose archive (only) is in a fresh database on `db`."""
    name = db.create_database()
    params = db.params(name)
    srv = ProsodyServer([mam_rs_sql(params), *extra]).start()
    return srv, params


def describe(params):
    """The server as the module names it in its log (store::Location::describe)."""
    engine = {"PostgreSQL": "PostgreSQL", "MySQL": "MySQL"}[params["driver"]]
    return "%s %s@%s:%d/%s" % (engine, params["username"], params["host"], params["port"], params["database"])


def test_server_stopped_and_restarted_under_load_loses_nothing(db_server, connect):
    srv, params = archive_server(db_server, ["mam_rs_max_queued_rows = %d" % MAX_QUEUED])
    try:
        assert describe(params) in srv.log_text(), "the archive is not on %s" % describe(params)
        # The first write after the stop fails at once (its connection is closed), so nothing
        # is held longer than scheduling noise after the first message.
        chat_through_fault(srv, connect, describe(params), ServerStopped(db_server), cause="",
                           hold_limit=5.0, prompt_after=1.0)
    finally:
        if not db_server.running:
            db_server.start()
        srv.stop()


def test_queries_while_the_server_is_down_get_try_again_later_at_once(db_server, connect):
    srv, params = archive_server(db_server)
    try:
        alice, bob = connect(srv, "alice"), connect(srv, "bob")
        before = exchange(alice, bob, "before " + token())
        db_server.stop()
        try:
            during = exchange(alice, bob, "during " + token())  # delivered; the write fails
            t0 = time.monotonic()
            r = alice.mam(rsm={"max": 10})
            took = time.monotonic() - t0
            assert r.iq.type == "error", r.iq
            assert (r.iq.error_type, r.iq.condition) == ("wait", "internal-server-error"), r.iq
            assert "try again later" in (r.iq.text or ""), r.iq.text
            # Bounded by the connect timeout (5 s), not the 10 s read-your-writes wait.
            assert took < 7.0, "the query took %.1f s to fail" % took
            print("\nquery while %s is down: %s after %.2f s" % (db_server.kind, r.iq.condition, took))
            assert srv.proc.poll() is None
        finally:
            db_server.start()
        # Back: the held message is written, and the archive answers whole.
        deadline = time.monotonic() + 30
        while True:
            r = alice.mam(rsm={"max": 10})
            if r.iq.type == "result" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.iq.type == "result", r.iq
        assert [b for b in alice.mam_all(fields={"with": bob.bare}).bodies] == [before, during]
    finally:
        if not db_server.running:
            db_server.start()
        srv.stop()


def test_a_server_down_at_start_delays_archiving_not_the_module(db_server, connect):
    """Prosody starting before its database server (boot order): the module loads, says once
    that the server does not answer, delivers messages without archiving them, answers queries
    with "try again later", and archives from the moment the server answers, without a
    restart."""
    from test_lifecycle import sid_for

    name = db_server.create_database()
    params = db_server.params(name)
    db_server.stop()
    srv = None
    try:
        srv = ProsodyServer([mam_rs_sql(params)]).start()  # fails if the module does not load
        lines = [ln for ln in srv.log_text().splitlines() if "Cannot reach the archive" in ln]
        assert len(lines) == 1 and describe(params) in lines[0] and "\terror\t" in lines[0], lines

        alice, bob = connect(srv, "alice"), connect(srv, "bob")
        mid = alice.send_message(bob.bare, "while down " + token())
        assert sid_for(bob.wait_id(mid), bob.bare) is None, "a stanza-id for a message not archived"
        r = alice.mam(rsm={"max": 10})
        assert (r.iq.type, r.iq.error_type, r.iq.condition) == ("error", "wait", "internal-server-error"), r.iq
        assert srv.proc.poll() is None

        db_server.start()
        body, sid = first_archived(alice, bob, "after ")
        assert sid, "still not archiving 30 s after %s started" % db_server.kind
        assert "answered after" in srv.log_text()
        page = bob.mam_all(fields={"with": alice.bare})
        assert page.bodies == [body] and page.ids == [sid], (page.bodies, page.ids)
    finally:
        if not db_server.running:
            db_server.start()
        if srv is not None:
            srv.stop()


class SilentUntilReleased:
    """A TCP port in front of the database server that accepts connections and then says
    nothing (as a server stopped with SIGSTOP, or a proxy whose backend is gone) until
    `release()`, after which each connection, waiting or new, is carried to the server."""

    def __init__(self, host, port):
        self.upstream = (host, port)
        self.released = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._carry, args=(client,), daemon=True).start()

    def _carry(self, client):
        self.released.wait()
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        for a, b in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def release(self):
        self.released.set()

    def close(self):
        self.listener.close()


# Prosody's own storage plays no part: once per suite run (the SQLite passes), not per backend.
@pytest.mark.sqlite_only
def test_a_server_that_accepts_and_says_nothing_holds_neither_start_nor_stop(db_server, connect):
    """The drivers' connect timeouts cover the TCP connection only: a server that accepts it and
    then says nothing would hold the opening for as long as the socket lives. Prosody's start
    waits for it 10 s, then goes on without the archive (as for a server that is down); the
    attempt goes on, and archiving starts when the server answers. Stopping Prosody meanwhile
    does not wait for it."""
    from test_lifecycle import sid_for

    params = db_server.params(db_server.create_database())
    silent = SilentUntilReleased(params["host"], params["port"])
    srv = None
    try:
        behind_silent = mam_rs_sql(dict(params, host="127.0.0.1", port=silent.port))
        t0 = time.monotonic()
        srv = ProsodyServer([behind_silent]).start(timeout=30)
        started = time.monotonic() - t0
        assert started < 20, "the start took %.1f s" % started
        assert silent.accepted >= 1
        lines = [ln for ln in srv.log_text().splitlines() if "Cannot reach the archive" in ln]
        assert len(lines) == 1 and "no answer (still waiting for it)" in lines[0], lines

        alice, bob = connect(srv, "alice"), connect(srv, "bob")
        mid = alice.send_message(bob.bare, "while silent " + token())
        assert sid_for(bob.wait_id(mid), bob.bare) is None, "a stanza-id for a message not archived"
        r = alice.mam(rsm={"max": 10})
        assert (r.iq.type, r.iq.error_type, r.iq.condition) == ("error", "wait", "internal-server-error"), r.iq
        time.sleep(3)  # the connect thread's retries take up the same attempt: no new connection
        assert silent.accepted == 1, silent.accepted

        silent.release()
        body, sid = first_archived(alice, bob, "answered ")
        assert sid, "still not archiving 30 s after the server answered"
        assert "answered after" in srv.log_text()
        page = bob.mam_all(fields={"with": alice.bare})
        assert page.bodies == [body] and page.ids == [sid], (page.bodies, page.ids)
        srv.stop()

        # Silent for good: stopping Prosody does not wait for the attempt.
        silent.released.clear()
        srv = ProsodyServer([behind_silent]).start(timeout=30)
        assert "no answer (still waiting for it)" in srv.log_text()
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=30)
        stopped = time.monotonic() - t0
        assert stopped < 5, "stopping took %.1f s" % stopped
    finally:
        silent.close()
        if srv is not None:
            srv.stop()
