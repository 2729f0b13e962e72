"""archive_compression, on by default: once the archive holds 1,000 messages a dictionary is
trained and new rows are stored as zstd frames (in the SQLite file, or on PostgreSQL or MariaDB). Clients see no difference: every message comes
back as it was sent, before and after `optimize` compresses the older rows, after a restart
(the dictionary is read back from the database), and after compression is turned off again.
"""

import xml.etree.ElementTree as ET

import pytest

from conftest import E2E_BACKEND, NS_CLIENT, backend_rows, prosodyctl, restart_server, stop_server_keep_data
from test_lifecycle import burst, wait_delivered

pytestmark = pytest.mark.mam_rs_only
SERVER = E2E_BACKEND in ("postgres", "mariadb")

TRAIN_AFTER = 1000  # src/store/codec.rs
NS_E2E = "urn:example:e2e:zstd"
# Markup that a dictionary trained on plain chat messages has never seen: escapes, non-ASCII,
# a namespaced extension with attributes and nested text.
PAYLOAD = ("<x xmlns='%s' note='a&amp;b &lt;c&gt; &quot;q&quot; ü'><y>ü &amp; z — ✓</y><z/></x>" % NS_E2E)


def row_types(srv):
    """{"text" or "blob": rows} of the archive: SQLite's type of the stanza column, or on
    a database server whether the row is in zstanza (beside an empty stanza)."""
    if SERVER:
        sql = ("SELECT CASE WHEN zstanza IS NULL THEN 'text' WHEN stanza = '' THEN 'blob' "
               "ELSE 'both' END, count(*) FROM mam_rs_messages GROUP BY 1")
    else:
        sql = "SELECT typeof(stanza), count(*) FROM messages GROUP BY 1"
    return dict((t, int(n)) for t, n in backend_rows(srv, sql, "mam_rs.sqlite"))


def dictionaries(srv):
    table = "mam_rs_dictionaries" if SERVER else "dictionaries"
    return int(backend_rows(srv, "SELECT count(*) FROM %s" % table, "mam_rs.sqlite")[0][0])


def archive(client):
    """[(id, body, the payload element as text or None)] of the client's whole archive."""
    r = client.mam_all()
    out = []
    for msg in r.forwarded:
        x = msg.find("{%s}x" % NS_E2E)
        out.append((msg.findtext("{%s}body" % NS_CLIENT), None if x is None else ET.tostring(x, "unicode")))
    return list(zip(r.ids, out))


def send_special(alice, bob, body):
    mid = alice.send_message(bob.bare, body, payload=PAYLOAD)
    bob.wait_id(mid)


def test_rows_are_compressed_once_trained_and_read_back_unchanged(make_server, connect):
    srv = make_server()  # the default configuration: archive_compression not set
    alice, bob = connect(srv, "alice"), connect(srv, "bob")

    # Each message is archived twice (alice's and bob's copy): 560 messages are 1,120 rows.
    n = 560
    bodies = ["zstd %04d" % i for i in range(n)]
    for first in range(0, n, 40):
        burst(alice, bob.bare, bodies[first:first + 40])
        assert len(wait_delivered(bob, "zstd ", first + 40)) == first + 40
    send_special(alice, bob, "special after training")

    types = row_types(srv)
    assert dictionaries(srv) == 1, "no dictionary trained after %s rows" % types
    assert types.get("blob", 0) >= 2, "rows written after training are not compressed: %s" % types
    assert types.get("text", 0) >= TRAIN_AFTER, types

    want_bodies = bodies + ["special after training"]
    before = {c.user: archive(c) for c in (alice, bob)}
    for user, rows in before.items():
        assert [b for _, (b, _) in rows] == want_bodies, user
        special = rows[-1][1][1]
        assert special is not None, "%s's compressed row lost its payload" % user
        got = ET.fromstring(special)
        assert got.get("note") == 'a&b <c> "q" ü'
        assert got.findtext("{%s}y" % NS_E2E) == "ü & z — ✓"
        assert got.find("{%s}z" % NS_E2E) is not None

    r = prosodyctl(srv, "mod_mam_rs", "optimize", timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "optimize: ok", (r.stdout, r.stderr)
    assert "messages compressed" in r.stdout, r.stdout
    assert row_types(srv) == {"blob": 2 * (n + 1)}, "optimize left text rows"
    assert {c.user: archive(c) for c in (alice, bob)} == before, "optimize changed what clients see"

    # A restart reads the dictionary back; with compression turned off new rows are text and the
    # compressed ones stay readable.
    for c in (alice, bob):
        c.disconnect()
    stop_server_keep_data(srv)
    srv.extra_config.append("archive_compression = false")
    restart_server(srv)
    alice, bob = connect(srv, "alice"), connect(srv, "bob")
    send_special(alice, bob, "special as text")
    assert row_types(srv) == {"blob": 2 * (n + 1), "text": 2}
    for c in (alice, bob):
        rows = archive(c)
        assert rows[:-1] == before[c.user]
        assert rows[-1][1] == ("special as text", before[c.user][-1][1][1])
