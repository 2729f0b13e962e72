"""mam_smart_enable (reference §1.1, §2.8, §2.14) and storage_archive_item_limit (§1.1, §2.9 step 8).

Smart enable: a user with no stored prefs is not archived until a MAM-capable client does a prefs
get/set, a query-form get or a query; then {[false] = default_archive_policy} is persisted.

Quota: when an append fails with "quota-limit", stock first deletes expired items (none here) and
then truncates the archive to the newest floor(limit * 0.99) items, and appends again. The limit is
enforced by the storage driver; stock 0.12 SQL honours storage_archive_item_limit (SQL:153, 317-321).
"""

import math
import time

import pytest

from conftest import USERS, ProsodyServer, exchange, stanza_ids, token, xml_escape, stored_prefs_sql

SMART_USERS = USERS + ("s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8")


@pytest.fixture(scope="module")
def smart():
    srv = ProsodyServer(["mam_smart_enable = true"], users=SMART_USERS).start()
    yield srv
    srv.stop()




def bodies(client, t, **kw):
    return [b for b in client.mam_all(**kw).bodies if t in b]


PERSISTED_ALWAYS = [("", "json", '{"__hash":[false,true]}')]


# --------------------------------------------------------------------------
# mam_smart_enable


def test_smart_query_enables_archiving(smart, connect):
    s1 = connect(smart, "s1")
    s2 = connect(smart, "s2")
    t = token()
    exchange(s1, s2, "before " + t)
    exchange(s2, s1, "before-in " + t)
    assert stored_prefs_sql(smart, "s1") == []
    # The first query is the explicit MAM action: it finds nothing, and enables archiving
    assert bodies(s1, t) == []
    assert stored_prefs_sql(smart, "s1") == PERSISTED_ALWAYS
    exchange(s1, s2, "after " + t)
    exchange(s2, s1, "after-in " + t)
    assert bodies(s1, t) == ["after " + t, "after-in " + t]
    # s2 never did anything MAM-ish before its first query: its archive is empty
    assert bodies(s2, t) == []
    exchange(s2, s1, "later " + t)
    assert bodies(s2, t) == ["later " + t]
    assert bodies(s1, t)[-1] == "later " + t


def test_smart_prefs_get_enables_archiving(smart, connect):
    s3 = connect(smart, "s3")
    s4 = connect(smart, "s4")
    t = token()
    exchange(s3, s4, "before " + t)
    assert stored_prefs_sql(smart, "s3") == []
    r = s3.iq("get", "<prefs xmlns='urn:xmpp:mam:2'/>")
    assert r.type == "result", r
    prefs = r.xml.find("{urn:xmpp:mam:2}prefs")
    assert prefs.get("default") == "always"
    assert stored_prefs_sql(smart, "s3") == PERSISTED_ALWAYS
    exchange(s3, s4, "after " + t)
    exchange(s4, s3, "after-in " + t)
    assert bodies(s3, t) == ["after " + t, "after-in " + t]


def test_smart_form_get_enables_archiving(smart, connect):
    s5 = connect(smart, "s5")
    alice = connect(smart, "alice")
    t = token()
    exchange(s5, alice, "before " + t)
    r = s5.iq("get", "<query xmlns='urn:xmpp:mam:2'/>")
    assert r.type == "result", r
    assert stored_prefs_sql(smart, "s5") == PERSISTED_ALWAYS
    exchange(s5, alice, "after " + t)
    assert bodies(s5, t) == ["after " + t]


def test_smart_explicit_never_stays_never(smart, connect):
    s6 = connect(smart, "s6")
    bob = connect(smart, "bob")
    r = s6.iq("set", "<prefs xmlns='urn:xmpp:mam:2' default='never'><always/><never/></prefs>")
    assert r.type == "result", r
    assert r.xml.find("{urn:xmpp:mam:2}prefs").get("default") == "never"
    t = token()
    exchange(s6, bob, "one " + t)
    assert bodies(s6, t) == []  # a query does not re-enable
    exchange(bob, s6, "two " + t)
    s6.iq("get", "<query xmlns='urn:xmpp:mam:2'/>")
    exchange(s6, bob, "three " + t)
    assert bodies(s6, t) == []
    assert stored_prefs_sql(smart, "s6") == [("", "json", '{"__hash":[false,false]}')]


def test_smart_metadata_does_not_enable(smart, connect):
    s7 = connect(smart, "s7")
    carol = connect(smart, "carol")
    r = s7.iq("get", "<metadata xmlns='urn:xmpp:mam:2'/>")
    assert r.type == "result", r
    t = token()
    exchange(s7, carol, "before " + t)
    assert stored_prefs_sql(smart, "s7") == []
    assert bodies(s7, t) == []  # this query enables
    exchange(s7, carol, "after " + t)
    assert bodies(s7, t) == ["after " + t]


def test_smart_enable_persists_default_archive_policy(make_server, connect):
    srv = make_server(["mam_smart_enable = true", "default_archive_policy = false"])
    alice = connect(srv, "alice")
    bob = connect(srv, "bob")
    r = alice.iq("get", "<prefs xmlns='urn:xmpp:mam:2'/>")
    assert r.xml.find("{urn:xmpp:mam:2}prefs").get("default") == "never"
    assert stored_prefs_sql(srv, "alice") == [("", "json", '{"__hash":[false,false]}')]
    t = token()
    exchange(alice, bob, "x " + t)
    assert bodies(alice, t) == []


# --------------------------------------------------------------------------
# storage_archive_item_limit


@pytest.fixture(scope="module", params=[100, 200])
def quota(request):
    srv = ProsodyServer(["storage_archive_item_limit = %d" % request.param]).start()
    yield srv, request.param
    srv.stop()


def burst(sender, to, bodies_):
    stamp = time.monotonic_ns()
    ids = ["q-%d-%d" % (stamp, i) for i in range(len(bodies_))]
    sender.send_raw("".join(
        "<message to='%s' id='%s' type='chat'><body>%s</body></message>" % (to, mid, xml_escape(b))
        for mid, b in zip(ids, bodies_)))
    return ids


def test_quota_truncates_oldest_percent(quota, connect):
    srv, limit = quota
    keep = math.floor(limit * 0.99)  # same float arithmetic as Lua: 100 -> 99, 200 -> 198
    alice = connect(srv, "alice")
    bob = connect(srv, "bob")
    names = ["q%04d" % i for i in range(limit + 3)]

    ids = burst(alice, "bob@localhost", names[:limit])
    got = bob.wait_messages(lambda x: x.get("id") in set(ids), n=limit, timeout=60)
    assert len(got) == limit
    assert alice.mam_all().bodies == names[:limit]
    assert alice.mam_ok(rsm={"max": 0}).count == limit

    model = list(names[:limit])  # what both archives should hold
    for name in names[limit:]:
        mid = alice.send_message("bob@localhost", name)
        live = bob.wait_id(mid)  # delivered whatever happens to the archive
        sids = stanza_ids(live)
        assert [by for by, _ in sids] == ["bob@localhost"], "not archived for bob: %r" % sids
        if len(model) >= limit:
            model = model[-keep:]
        model.append(name)
        for c in (alice, bob):
            full = c.mam_all()
            assert full.bodies == model, "%s after %s: %d items, first %r" % (
                c.user, name, len(full.bodies), full.bodies[:3])
            assert c.mam_ok(rsm={"max": 0}).count == len(model) <= limit
        assert full.ids[-1] == sids[0][1]  # bob's archive: newest id is the live stanza-id
        start, end = metadata_ids(alice)
        full = alice.mam_all()
        assert (start, end) == (full.ids[0], full.ids[-1])


def metadata_ids(client):
    r = client.iq("get", "<metadata xmlns='urn:xmpp:mam:2'/>")
    assert r.type == "result", r
    m = r.xml.find("{urn:xmpp:mam:2}metadata")
    return m.find("{urn:xmpp:mam:2}start").get("id"), m.find("{urn:xmpp:mam:2}end").get("id")
