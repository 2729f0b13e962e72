"""No query shape lets a user read, count or delete another user's or another host's messages
(reference §2.3, §2.5-2.8, §5).

One server with two VirtualHosts and the same usernames on both:
  localhost:         alice <-> carol, bob <-> dave (alice never talks to bob or dave)
  second.localhost:  alice <-> bob
Every foreign id, `with` trick, addressing trick and SQL-injection attempt must give an error or
an empty answer, never another archive's messages nor a <count> beyond the asker's own; the
database keeps every row.
"""

import time

import pytest

from conftest import (
    E2E_BACKEND, MAM_MODULE, NS_MAM, Client, ProsodyServer, backend_rows, xml_escape,
)

SECOND = "second.localhost"
HOSTS = ("localhost", SECOND)


# --------------------------------------------------------------------------
# setup


@pytest.fixture(scope="module")
def server():
    srv = ProsodyServer(hosts=HOSTS).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def clients(server, loop_thread):
    made = {}

    def get(user, host="localhost"):
        key = (user, host)
        if key not in made:
            made[key] = Client(loop_thread, server, user, host=host).connect()
        return made[key]

    yield get
    for c in made.values():
        c.disconnect()


def send(sender, recipient, body):
    mid = sender.send_message(recipient.bare, body)
    recipient.wait_id(mid)


@pytest.fixture(scope="module")
def world(server, clients):
    a1, b1, c1, d1 = (clients(u) for u in ("alice", "bob", "carol", "dave"))
    a2, b2 = clients("alice", SECOND), clients("bob", SECOND)
    send(a1, c1, "a1->c1 one")
    send(c1, a1, "c1->a1 two")
    send(a1, c1, "a1->c1 three")
    send(b1, d1, "b1->d1 secret one")
    send(d1, b1, "d1->b1 secret two")
    send(b1, d1, "b1->d1 secret three")
    send(a2, b2, "a2->b2 other host one")
    send(b2, a2, "b2->a2 other host two")
    w = {"a1": a1, "b1": b1, "c1": c1, "d1": d1, "a2": a2, "b2": b2}
    archives = {}
    for k, c in w.items():
        r = c.mam_ok(rsm={"max": 50})
        assert r.complete
        archives[k] = (r.ids, r.bodies)
    assert len(archives["a1"][0]) == 3 and len(archives["b1"][0]) == 3 and len(archives["a2"][0]) == 2
    # Every archive's ids are its own.
    all_ids = [i for ids, _ in archives.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)), "an archive id is shared between archives"
    w["ids"] = {k: v[0] for k, v in archives.items()}
    w["bodies"] = {k: v[1] for k, v in archives.items()}
    want = sum(len(v) for v in w["ids"].values())
    deadline = time.monotonic() + 5  # rows a query has shown may still be on their way to the file
    while db_rows(server) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    w["rows"] = db_rows(server)
    assert w["rows"] == want, (w["rows"], w["ids"])
    return w


def db_rows(server):
    """Archive rows in the database, read directly from it (the SQLite file, or the server)."""
    if MAM_MODULE != "mam_rs":
        return int(backend_rows(server, "SELECT count(*) FROM prosodyarchive WHERE store = 'archive'")[0][0])
    table = "messages" if E2E_BACKEND == "sqlite" else "mam_rs_messages"
    return int(backend_rows(server, "SELECT count(*) FROM %s" % table, sqlite_file="mam_rs.sqlite")[0][0])


def tables(server):
    statement = {
        "sqlite": "SELECT name FROM sqlite_master WHERE type = 'table'",
        "postgres": "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
        "mariadb": "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()",
    }[E2E_BACKEND]
    sqlite_file = "mam_rs.sqlite" if MAM_MODULE == "mam_rs" else "prosody.sqlite"
    return sorted(r[0] for r in backend_rows(server, statement, sqlite_file=sqlite_file))


def foreign_bodies(world, key):
    """Every archived body not in archive `key`."""
    own = set(world["bodies"][key])
    return {b for k, bodies in world["bodies"].items() if k != key for b in bodies} - own


def assert_no_leak(world, key, r):
    """r (a MamResult of client `key`) is an error, or only holds `key`'s own messages and a count
    no larger than `key`'s archive."""
    assert r.iq.xml is not None, "no reply"
    own_ids = set(world["ids"][key])
    got = set(r.ids)
    assert got <= own_ids, "foreign ids returned: %r" % (got - own_ids)
    bodies = set(b for b in r.bodies if b is not None)
    assert not bodies & foreign_bodies(world, key), "foreign bodies returned: %r" % (bodies & foreign_bodies(world, key))
    if r.iq.type == "result":
        assert r.count is None or r.count <= len(own_ids), "count %r > own archive %d" % (r.count, len(own_ids))
    else:
        assert r.iq.type == "error" and r.iq.condition, r.iq
        assert r.messages == []


def assert_error_or_empty(world, key, r):
    assert_no_leak(world, key, r)
    if r.iq.type == "result":
        assert r.messages == [] and r.count in (None, 0), (len(r.messages), r.count)


FOREIGN = {  # asker -> archives whose ids it must not reach
    "a1": ("b1", "c1", "d1", "a2", "b2"),
    "a2": ("a1", "b1", "c1", "b2"),
}


def foreign_ids(world, asker):
    return [i for k in FOREIGN[asker] for i in world["ids"][k]]


# --------------------------------------------------------------------------
# addressing


@pytest.mark.parametrize("to", ["bob@localhost", "bob@localhost/nope", "localhost", SECOND,
                                "alice@" + SECOND, "bob@" + SECOND])
@pytest.mark.parametrize("what", ["query", "metadata", "prefs", "prefs_set"])
def test_addressed_elsewhere_is_service_unavailable(world, to, what):
    a1 = world["a1"]
    if what == "query":
        r = a1.mam(to=to, rsm={"max": 50})
        assert_no_leak(world, "a1", r)
        reply = r.iq
    elif what == "metadata":
        reply = a1.iq("get", "<metadata xmlns='urn:xmpp:mam:2'/>", to=to)
    elif what == "prefs":
        reply = a1.iq("get", "<prefs xmlns='urn:xmpp:mam:2'/>", to=to)
    else:
        reply = a1.iq("set", "<prefs xmlns='urn:xmpp:mam:2' default='never'><always/><never/></prefs>", to=to)
    assert (reply.type, reply.error_type, reply.condition) == ("error", "cancel", "service-unavailable"), reply


def test_query_to_bobs_full_jid_is_not_answered_from_his_archive(world):
    """An iq to a connected full JID is forwarded to that client (mod_iq); the server never
    answers it from bob's archive."""
    a1, b1 = world["a1"], world["b1"]
    since = a1.last_seq()
    r = a1.mam(to=b1.jid, rsm={"max": 50}, timeout=3)
    assert r.iq.type != "result", r.iq
    leaked = [m for m in a1.messages(since) if m.xml.find("{%s}result" % NS_MAM) is not None]
    assert leaked == []


# --------------------------------------------------------------------------
# foreign archive ids


@pytest.mark.parametrize("asker", ["a1", "a2"])
def test_foreign_ids_field(world, asker):
    c = world[asker]
    foreign = foreign_ids(world, asker)
    r = c.mam_ok(fields={"ids": foreign}, rsm={"max": 50})
    assert_error_or_empty(world, asker, r)
    own = world["ids"][asker][0]
    r = c.mam_ok(fields={"ids": foreign + [own]}, rsm={"max": 50})
    assert_no_leak(world, asker, r)
    assert r.ids == [own]
    assert r.count in (None, 1)
    r = c.mam_ok(fields={"ids": foreign}, rsm={"max": 0})
    assert r.count in (None, 0)


@pytest.mark.parametrize("asker", ["a1", "a2"])
@pytest.mark.parametrize("where", ["after-id", "before-id", "rsm_after", "rsm_before"])
def test_foreign_ids_as_bounds(world, asker, where):
    c = world[asker]
    for fid in foreign_ids(world, asker):
        if where.startswith("rsm_"):
            r = c.mam(rsm={where[4:]: fid, "max": 50})
        else:
            r = c.mam(fields={where: fid}, rsm={"max": 50})
        assert_no_leak(world, asker, r)
        assert (r.iq.type, r.iq.error_type, r.iq.condition) == ("error", "modify", "item-not-found"), (fid, r.iq)


@pytest.mark.parametrize("asker", ["a1", "a2"])
def test_foreign_id_with_max_zero_counts_only_own(world, asker):
    c = world[asker]
    own = len(world["ids"][asker])
    for fid in foreign_ids(world, asker):
        for kw in ({"rsm": {"max": 0, "after": fid}}, {"rsm": {"max": 0}, "fields": {"after-id": fid}},
                   {"rsm": {"max": 0, "before": fid}}):
            r = c.mam(**kw)
            assert_no_leak(world, asker, r)
            if r.iq.type == "result":
                assert r.messages == [] and r.count == own, (kw, r.count)


# --------------------------------------------------------------------------
# with


@pytest.mark.parametrize("value", [
    "bob@localhost", "dave@localhost", "alice@localhost", "bob@" + SECOND, "alice@" + SECOND,
    "dave@localhost/res", "localhost", SECOND,
    "%", "*", "%@localhost", "*@localhost", "_ave@localhost", "dave@%", "dave@localhost%",
    "bob@localhost' OR '1'='1", "' OR '1'='1", "dave@localhost' --", "dave@localhost\" OR \"1\"=\"1",
])
def test_with_tricks_on_first_host(world, value):
    assert_error_or_empty(world, "a1", world["a1"].mam(fields={"with": value}, rsm={"max": 50}))


@pytest.mark.parametrize("value", ["carol@localhost", "dave@localhost", "bob@localhost", "alice@localhost",
                                   "%", "*@" + SECOND, "bob@" + SECOND + "' OR '1'='1"])
def test_with_tricks_on_second_host(world, value):
    assert_error_or_empty(world, "a2", world["a2"].mam(fields={"with": value}, rsm={"max": 50}))


def test_with_own_partner_still_works(world):
    r = world["a1"].mam_ok(fields={"with": "carol@localhost"}, rsm={"max": 50})
    assert r.ids == world["ids"]["a1"] and r.count == 3
    r = world["a2"].mam_ok(fields={"with": "bob@" + SECOND}, rsm={"max": 50})
    assert r.ids == world["ids"]["a2"] and r.count == 2
    # bob on the first host talked to dave: bob sees it, alice (above) does not.
    r = world["b1"].mam_ok(fields={"with": "dave@localhost"}, rsm={"max": 50})
    assert r.ids == world["ids"]["b1"]


# --------------------------------------------------------------------------
# whole archives, metadata, prefs


def test_whole_archives_are_separate(world):
    for key, c in world.items():
        if key in ("ids", "bodies", "rows"):
            continue
        r = c.mam_ok(rsm={"max": 50})
        assert r.ids == world["ids"][key], key
        assert r.count == len(world["ids"][key]), key
        assert_no_leak(world, key, r)
    assert world["bodies"]["a1"] == ["a1->c1 one", "c1->a1 two", "a1->c1 three"]
    assert world["bodies"]["a2"] == ["a2->b2 other host one", "b2->a2 other host two"]
    assert world["bodies"]["b2"] == ["a2->b2 other host one", "b2->a2 other host two"]
    assert world["bodies"]["b1"] == ["b1->d1 secret one", "d1->b1 secret two", "b1->d1 secret three"]


def metadata(client):
    r = client.iq("get", "<metadata xmlns='urn:xmpp:mam:2'/>")
    assert r.type == "result", r
    m = r.xml.find("{%s}metadata" % NS_MAM)
    return [(c.tag.split("}")[1], c.get("id")) for c in m]


def test_metadata_is_own(world):
    for key in ("a1", "b1", "a2", "b2"):
        ids = world["ids"][key]
        assert metadata(world[key]) == [("start", ids[0]), ("end", ids[-1])], key


def prefs_of(client):
    r = client.iq("get", "<prefs xmlns='urn:xmpp:mam:2'/>")
    assert r.type == "result", r
    p = r.xml.find("{%s}prefs" % NS_MAM)
    return (p.get("default"),
            sorted(j.text for j in p.iterfind("{%s}always/{%s}jid" % (NS_MAM, NS_MAM))),
            sorted(j.text for j in p.iterfind("{%s}never/{%s}jid" % (NS_MAM, NS_MAM))))


def prefs_xml(default, always=(), never=()):
    return "<prefs xmlns='urn:xmpp:mam:2' default='%s'><always>%s</always><never>%s</never></prefs>" % (
        default, "".join("<jid>%s</jid>" % xml_escape(j) for j in always),
        "".join("<jid>%s</jid>" % xml_escape(j) for j in never))


def test_prefs_are_own(world, clients):
    e1, f1, e2 = clients("erin"), clients("frank"), clients("erin", SECOND)
    before_f1 = prefs_of(f1)
    assert e1.iq("set", prefs_xml("always", ["x1@localhost"], ["y1@localhost"])).type == "result"
    assert e2.iq("set", prefs_xml("roster", ["x2@localhost"], ["y2@localhost"])).type == "result"
    assert prefs_of(e1) == ("always", ["x1@localhost"], ["y1@localhost"])
    assert prefs_of(e2) == ("roster", ["x2@localhost"], ["y2@localhost"])
    assert prefs_of(f1) == before_f1
    for key in ("a1", "b1", "a2"):
        _, always, never = prefs_of(world[key])
        assert not set(always + never) & {"x1@localhost", "y1@localhost", "x2@localhost", "y2@localhost"}, key


# --------------------------------------------------------------------------
# SQL injection in every field

INJECTIONS = [
    "' OR '1'='1",
    "' OR 1=1 --",
    "\" OR \"1\"=\"1",
    "1) OR (1=1",
    "x'); DELETE FROM messages; --",
    "x'); DELETE FROM prosodyarchive; --",
    "x'; DROP TABLE messages; --",
    "x'; DROP TABLE prosodyarchive; --",
    "' UNION SELECT stanza, stanza, stanza FROM messages --",
    "' UNION SELECT \"key\", \"value\", \"when\" FROM prosodyarchive --",
    "%",
    "*",
    "?1",
    ":aid",
    "\\",
]

FIELDS = ["with", "start", "end", "after-id", "before-id", "ids", "rsm_after", "rsm_before", "rsm_max",
          "queryid"]


@pytest.mark.parametrize("field", FIELDS)
def test_sql_injection_is_inert(world, server, field):
    a1 = world["a1"]
    tables_before = tables(server)
    for payload in INJECTIONS:
        if field == "queryid":
            r = a1.mam(queryid=payload, rsm={"max": 50})
            assert r.iq.type == "result", (payload, r.iq)
            assert r.ids == world["ids"]["a1"] and r.count == 3
            assert [res.get("queryid") for res in r.results] == [payload] * 3
            assert_no_leak(world, "a1", r)
            continue
        if field == "rsm_max":
            r = a1.mam(rsm={"max": payload})
            assert r.iq.type == "result", (payload, r.iq)  # non-numeric: no max
            assert r.ids == world["ids"]["a1"]
            assert_no_leak(world, "a1", r)
            continue
        if field.startswith("rsm_"):
            r = a1.mam(rsm={field[4:]: payload, "max": 50})
        elif field == "ids":
            r = a1.mam(fields={"ids": [payload, payload + "x"]}, rsm={"max": 50})
        else:
            r = a1.mam(fields={field: payload}, rsm={"max": 50})
        assert_error_or_empty(world, "a1", r)
        if field in ("start", "end"):
            assert (r.iq.type, r.iq.condition, r.iq.text) == ("error", "bad-request", "invalid timestamp")
        if field in ("after-id", "before-id", "rsm_after", "rsm_before"):
            assert (r.iq.type, r.iq.condition) == ("error", "item-not-found"), (payload, r.iq)
    assert tables(server) == tables_before
    assert db_rows(server) == world["rows"]


def test_sql_injection_in_prefs_is_inert(world, server, clients):
    d2 = clients("dave", SECOND)
    jids = INJECTIONS + ["%s@localhost" % p for p in INJECTIONS] + ["bob@localhost/%s" % p for p in INJECTIONS]
    r = d2.iq("set", prefs_xml("always", jids[:20], jids[20:]))
    assert r.type in ("result", "error"), r
    default, always, never = prefs_of(d2)
    assert default == "always"
    stored = set(always + never)
    # jid.prep lowercases; stock keeps what it can prep, mod_mam_rs drops more as invalid.
    assert {j.lower() for j in stored} <= {j.lower() for j in jids}, stored
    print("prefs kept %d of %d odd JIDs" % (len(stored), len(jids)))
    # Nobody else's prefs changed, no archive row went away.
    for key in ("a1", "b1", "a2"):
        _, a, n = prefs_of(world[key])
        assert not set(a + n) & set(jids), key
    assert db_rows(server) == world["rows"]


def test_everything_is_still_there(world, server):
    """Last: after every attempt above, every archive is whole."""
    assert db_rows(server) == world["rows"]
    for key in ("a1", "b1", "c1", "d1", "a2", "b2"):
        r = world[key].mam_ok(rsm={"max": 50})
        assert r.ids == world["ids"][key], key
        assert r.count == len(world["ids"][key])
