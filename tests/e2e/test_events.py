"""The archive events other modules rely on (reference §2.1, §2.9 steps 4 and 9, §9), observed with
the test-only plugin tests/e2e/plugins/mod_mam_e2e_probe.lua.

- archive-should-store {stanza, session} fires for every message the archiver looks at (sender
  side at pre-message, recipient side at message/*); the stock classifier sits at -1 and leaves
  its verdict in event.reason; a higher-priority handler returning false vetoes archiving,
  returning true forces it.
- archive-message-added {origin, stanza (the stored copy), for_user, id} fires once per archive
  row, with id = the archive id (= the stanza-id given to that user).
- archive-query / archive-id meta are trunk-only (0.12 has neither); checked only if present.
"""

import sqlite3
import time
import uuid

import pytest

from conftest import NS_CLIENT, ModulesServer, stanza_ids

NS_PROBE = "urn:e2e:mam-probe"


@pytest.fixture(scope="module")
def server():
    srv = ModulesServer(extra_modules=["mam_e2e_probe"]).start()
    assert "mam e2e probe loaded" in srv.log_text()
    yield srv
    srv.stop()


def probe_events(client, name=None, msg_id=None):
    """[(attrs dict, inner <message> or None)] recorded by the probe, oldest first."""
    r = client.iq("get", "<events xmlns='%s'/>" % NS_PROBE, to="localhost")
    assert r.type == "result", r
    out = []
    for ev in r.xml.find("{%s}events" % NS_PROBE).findall("{%s}event" % NS_PROBE):
        msg = ev.find("{%s}message" % NS_CLIENT)
        if name is not None and ev.get("name") != name:
            continue
        if msg_id is not None and (msg is None or msg.get("id") != msg_id):
            continue
        out.append((dict(ev.attrib), msg))
    return out


def decide(store):
    return "<decide xmlns='%s' store='%s'/>" % (NS_PROBE, store)


def test_should_store_fired_with_stanza_and_session(server, connect):
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    mid = alice.send_message("bob@localhost", "event check")
    bob.wait_id(mid)
    evs = probe_events(alice, "archive-should-store", mid)
    # Once for alice's archive (outgoing) and once for bob's (incoming); the origin is alice's
    # c2s session both times.
    assert len(evs) == 2, evs
    for attrs, msg in evs:
        assert attrs["session"] == alice.jid
        assert attrs["session_type"] == "c2s"
        assert attrs.get("reason") == "body"  # left on the payload by the stock classifier
        assert msg.findtext("{%s}body" % NS_CLIENT) == "event check"
        assert msg.get("from") == alice.jid
        assert msg.get("to") == "bob@localhost"


def test_should_store_fired_for_unarchivable_message(server, connect):
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    mid = alice.send_message("bob@localhost", "headline", mtype="headline")
    bob.wait_id(mid)
    evs = probe_events(alice, "archive-should-store", mid)
    assert evs and all(a.get("reason") == "headline" for a, _ in evs), evs
    assert probe_events(alice, "archive-message-added", mid) == []


def test_message_added_fired_with_for_user_and_id(server, connect):
    carol = connect(server, "carol")
    dave = connect(server, "dave")
    t = uuid.uuid4().hex[:8]
    mid = carol.send_message(
        "dave@localhost", "added " + t,
        payload="<active xmlns='http://jabber.org/protocol/chatstates'/>")
    live = dave.wait_id(mid)
    (by, dave_sid), = stanza_ids(live)
    assert by == "dave@localhost"
    carol_id = carol.mam_ok(fields={"with": "dave@localhost"}).ids[-1]

    evs = probe_events(carol, "archive-message-added", mid)
    assert [(a["for_user"], a["id"]) for a, _ in evs] == [("carol", carol_id), ("dave", dave_sid)]
    for attrs, msg in evs:
        assert attrs["origin"] == carol.jid
        # the stored copy: chat state stripped, no stanza-id of ours
        assert msg.findtext("{%s}body" % NS_CLIENT) == "added " + t
        assert msg.find("{http://jabber.org/protocol/chatstates}active") is None
        assert not [s for s in stanza_ids(msg) if s[0] in ("carol@localhost", "dave@localhost")]
    # the live message kept its chat state
    assert live.find("{http://jabber.org/protocol/chatstates}active") is not None


def test_higher_priority_false_vetoes_archiving(server, connect):
    erin = connect(server, "erin")
    frank = connect(server, "frank")
    t = uuid.uuid4().hex[:8]
    mid = erin.send_message("frank@localhost", "vetoed " + t, payload=decide("false"))
    live = frank.wait_id(mid)  # still delivered
    assert stanza_ids(live) == []
    evs = probe_events(erin, "archive-should-store", mid)
    assert len(evs) == 2
    assert all("reason" not in a for a, _ in evs), "the stock classifier must not run after a veto: %r" % evs
    assert probe_events(erin, "archive-message-added", mid) == []
    assert [b for b in erin.mam_all().bodies if t in b] == []
    assert [b for b in frank.mam_all().bodies if t in b] == []


def test_higher_priority_true_forces_archiving(server, connect):
    erin = connect(server, "erin")
    frank = connect(server, "frank")
    # no body: the stock classifier would say "default" -> not stored
    mid = erin.send_message("frank@localhost", None, payload=decide("true"))
    live = frank.wait_id(mid)
    (by, frank_sid), = stanza_ids(live)
    assert by == "frank@localhost"
    assert frank.mam_ok(fields={"ids": [frank_sid]}).forwarded[0].get("id") == mid
    assert [a["for_user"] for a, _ in probe_events(erin, "archive-message-added", mid)] == ["erin", "frank"]
    # and without the marker the same bodiless message is not stored
    mid2 = erin.send_message("frank@localhost", None, payload="<x xmlns='urn:e2e:other'/>")
    live2 = frank.wait_id(mid2)
    assert stanza_ids(live2) == []
    assert [a.get("reason") for a, _ in probe_events(erin, "archive-should-store", mid2)] == ["default", "default"]


def test_prefs_refusal_still_fires_should_store_but_not_added(server, connect):
    bob = connect(server, "bob")
    carol = connect(server, "carol")
    r = bob.iq("set", "<prefs xmlns='urn:xmpp:mam:2' default='always'><always/>"
                      "<never><jid>carol@localhost</jid></never></prefs>")
    assert r.type == "result", r
    try:
        mid = carol.send_message("bob@localhost", "prefs say no")
        bob.wait_id(mid)
        assert len(probe_events(bob, "archive-should-store", mid)) == 2
        assert [a["for_user"] for a, _ in probe_events(bob, "archive-message-added", mid)] == ["carol"]
    finally:
        bob.iq("set", "<prefs xmlns='urn:xmpp:mam:2' default='always'/>")


@pytest.mark.mam_rs_only
@pytest.mark.sqlite_only
def test_message_added_fires_once_the_row_is_committed(server, connect):
    """As stock fires it after its append: while another process holds the archive file's
    write lock (well within the writer's 5 s busy timeout), the message's row is not committed
    and archive-message-added has not fired; once the lock goes, it fires for both archives."""
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    lock = sqlite3.connect(str(server.data / "mam_rs.sqlite"), timeout=10, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        mid = alice.send_message("bob@localhost", "added after commit")
        time.sleep(1.0)
        early = probe_events(alice, "archive-message-added", mid)
        assert early == [], "fired while its row could not be committed: %r" % early
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    bob.wait_id(mid)
    evs = probe_events(alice, "archive-message-added", mid)
    assert sorted(a["for_user"] for a, _ in evs) == ["alice", "bob"]


def test_archive_query_event_if_supported(server, connect):
    """Trunk-only (newer than 13.0): fired after a query with origin, start_time, end_id."""
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    mid = alice.send_message("bob@localhost", "for the query event")
    bob.wait_id(mid)
    res = alice.mam_ok()
    evs = probe_events(alice, "archive-query")
    if not evs:
        pytest.skip("no archive-query event (Prosody 0.12 / 13.0 API)")
    attrs = evs[-1][0]
    assert attrs["origin"] == alice.jid
    assert attrs.get("end_id") == res.ids[-1]
    assert float(attrs["start_time"]) > 0


def test_archive_id_meta_if_supported(server, connect):
    """Trunk-only: the outgoing stanza carries meta archive-id = the sender's archive id."""
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    mid = alice.send_message("bob@localhost", "for the meta")
    bob.wait_id(mid)
    evs = [a for a, _ in probe_events(alice, "archive-id-meta") if a.get("id") == mid]
    if not evs:
        pytest.skip("util.stanza has no get_meta (Prosody 0.12 and 13.0)")
    assert evs[0].get("archive_id") == alice.mam_ok(fields={"with": "bob@localhost"}).ids[-1]
