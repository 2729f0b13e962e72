"""Two Prosody processes sharing one archive database on a real server (issue 5): each claims
its own writer node, their ids never collide even while both archive at once, and a message
one process archives is in the answers the other gives.

Both servers serve the same VirtualHost with the same accounts (each its own Prosody storage,
on SQLite); only the archive is shared, through `mam_rs_sql`.
"""

import re
import threading

import pytest

from conftest import ProsodyServer, exchange, token

pytestmark = pytest.mark.mam_rs_only

BURST = 150  # messages each process archives while the other does too


@pytest.fixture(params=["postgres", "mariadb"])
def db_server(request):
    return request.getfixturevalue(request.param + "_server")


def mam_rs_sql(db, name):
    params = db.params(name)
    return "mam_rs_sql = { %s }" % ", ".join(
        "%s = %s" % (k, params[k] if isinstance(params[k], int) else '"%s"' % params[k])
        for k in ("driver", "database", "host", "port", "username", "password"))


def writer_node(srv):
    found = re.findall(r"Archive in .*, writer node (\d+)", srv.log_text())
    assert found, "no 'Archive in' line:\n%s" % srv.log_tail(30)
    return int(found[-1])


def test_two_processes_on_one_database_share_the_archive_without_colliding(db_server, connect):
    shared = mam_rs_sql(db_server, db_server.create_database())
    one = ProsodyServer([shared]).start()
    two = ProsodyServer([shared]).start()
    try:
        assert writer_node(one) != writer_node(two), "both processes took the same writer node"

        a1, b1 = connect(one, "alice"), connect(one, "bob")
        c2, d2 = connect(two, "carol"), connect(two, "dave")
        tag = token()

        # Both processes archive at the same time.
        def burst(sender, recipient, label):
            payload = "".join("<message to='%s' type='chat' id='%s-%d'><body>%s %s %03d</body></message>"
                              % (recipient.bare, label, i, tag, label, i) for i in range(BURST))
            sender.send_raw(payload)
            recipient.wait_messages(lambda m: (m.findtext("{jabber:client}body") or "").startswith(
                "%s %s " % (tag, label)), BURST, timeout=60)

        threads = [threading.Thread(target=burst, args=(a1, b1, "one")),
                   threading.Thread(target=burst, args=(c2, d2, "two"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads)

        # What one process archived is in what the other answers, whole and in order.
        b_on_two = connect(two, "bob", resource="other")
        r = b_on_two.mam_all(fields={"with": a1.bare})
        assert r.bodies == ["%s one %03d" % (tag, i) for i in range(BURST)], r.bodies[:5]
        c_on_one = connect(one, "carol", resource="other")
        r2 = c_on_one.mam_all(fields={"with": d2.bare})
        assert r2.bodies == ["%s two %03d" % (tag, i) for i in range(BURST)], r2.bodies[:5]

        # No id is used twice across the two processes' rows.
        ids = []
        for client in (a1, b1, c2, d2):
            ids += client.mam_all().ids
        assert len(ids) == 4 * BURST and len(set(ids)) == len(ids)

        # And a message sent on one process after that is at once visible on the other.
        body = exchange(a1, b1, "after " + tag)
        assert b_on_two.mam_all(fields={"with": a1.bare}).bodies[-1] == body
    finally:
        one.stop()
        two.stop()
