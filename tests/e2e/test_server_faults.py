"""A database server stopped and restarted under load (issues 5 and 6): the archive is on a real
PostgreSQL (or MariaDB) through `mam_rs_sql`, Prosody's own stores stay on SQLite, and the
test stops the server while clients chat, then starts it again.

Proven, with the same harness as the SQLite faults (test_database_faults.chat_through_fault):
messages are delivered while the server is down; Prosody answers pings; the log has one error
line for the outage, naming the server, and one line when writes work again; every stanza-id a
client received is then in the archive, once; `mam_rs_max_queued_rows` is enforced to the row
and reported once each way. And: an archive query made while the server is down gets a
"try again later" error at once (not a hang); after the restart, queries work again on new
connections.
"""

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


def archive_server(db, extra=()):
    """A Prosody whose archive (only) is in a fresh database on `db`."""
    name = db.create_database()
    params = db.params(name)
    mam_rs_sql = "mam_rs_sql = { %s }" % ", ".join(
        "%s = %s" % (k, params[k] if isinstance(params[k], int) else '"%s"' % params[k])
        for k in ("driver", "database", "host", "port", "username", "password"))
    srv = ProsodyServer([mam_rs_sql, *extra]).start()
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
        mam_rs_sql = "mam_rs_sql = { %s }" % ", ".join(
            "%s = %s" % (k, params[k] if isinstance(params[k], int) else '"%s"' % params[k])
            for k in ("driver", "database", "host", "port", "username", "password"))
        srv = ProsodyServer([mam_rs_sql]).start()  # fails if the module does not load
        lines = [ln for ln in srv.log_text().splitlines() if "Cannot reach the archive" in ln]
        assert len(lines) == 1 and describe(params) in lines[0] and "\terror\t" in lines[0], lines

        alice, bob = connect(srv, "alice"), connect(srv, "bob")
        mid = alice.send_message(bob.bare, "while down " + token())
        assert sid_for(bob.wait_id(mid), bob.bare) is None, "a stanza-id for a message not archived"
        r = alice.mam(rsm={"max": 10})
        assert (r.iq.type, r.iq.error_type, r.iq.condition) == ("error", "wait", "internal-server-error"), r.iq
        assert srv.proc.poll() is None

        db_server.start()
        deadline = time.monotonic() + 30
        while True:
            body = "after " + token()
            got = bob.wait_id(alice.send_message(bob.bare, body))
            if sid_for(got, bob.bare) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        sid = sid_for(got, bob.bare)
        assert sid, "still not archiving 30 s after %s started" % db_server.kind
        assert "answered after" in srv.log_text()
        page = bob.mam_all(fields={"with": alice.bare})
        assert page.bodies == [body] and page.ids == [sid], (page.bodies, page.ids)
    finally:
        if not db_server.running:
            db_server.start()
        if srv is not None:
            srv.stop()
