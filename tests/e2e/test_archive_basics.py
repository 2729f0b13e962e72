"""Both archives get a copy, result/fin shape, stanza-id stamping, carbons, disco (reference §2.1, §2.2, §2.6, §2.9)."""

import time

from conftest import NS_CLIENT, NS_DELAY, NS_FORWARD, NS_MAM, NS_SID, mam_query_xml, stamp_to_epoch, stanza_ids, token


def assert_result_shape(res, owner, queryid, sender_full, to, body, msg_id):
    """One page holding exactly one archived message, with the stock result and fin shape."""
    assert res.iq.type == "result"
    assert len(res.messages) == 1
    outer = res.messages[0].xml
    assert outer.tag == "{%s}message" % NS_CLIENT
    assert outer.get("to") == owner.jid
    assert outer.get("from") is None  # self-query: the iq had no 'to', so results have no 'from'
    assert outer.get("type") is None
    result = outer.find("{%s}result" % NS_MAM)
    assert result is not None
    assert result.get("queryid") == queryid
    archive_id = result.get("id")
    assert archive_id
    fwd = result.find("{urn:xmpp:forward:0}forwarded")
    assert fwd is not None
    delay = fwd.find("{%s}delay" % NS_DELAY)
    assert delay is not None
    assert abs(stamp_to_epoch(delay.get("stamp")) - time.time()) < 120
    inner = fwd.find("{%s}message" % NS_CLIENT)
    assert inner is not None, "inner message must be in jabber:client"
    assert inner.findtext("{%s}body" % NS_CLIENT) == body
    assert inner.get("from") == sender_full
    assert inner.get("to") == to
    assert inner.get("id") == msg_id
    assert inner.get("type") == "chat"
    # fin: complete, RSM first/last/count
    fin = res.fin
    assert fin is not None
    assert fin.get("complete") == "true"
    assert fin.get("queryid") is None
    assert res.first == archive_id
    assert res.last == archive_id
    assert res.count == 1
    return archive_id, inner


def test_message_lands_in_both_archives(server, connect):
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    msg_id = alice.send_message("bob@localhost", "hello bob, this is alice")
    bob.wait_id(msg_id)

    ra = alice.mam_ok(queryid="qa1", fields={"with": "bob@localhost"})
    a_id, _ = assert_result_shape(ra, alice, "qa1", alice.jid, "bob@localhost",
                                  "hello bob, this is alice", msg_id)
    rb = bob.mam_ok(queryid="qb1", fields={"with": "alice@localhost"})
    b_id, inner = assert_result_shape(rb, bob, "qb1", alice.jid, "bob@localhost",
                                      "hello bob, this is alice", msg_id)
    assert a_id != b_id, "two archive rows must have two ids"
    # The stored copy carries no stanza-id of ours (it is added to the live stanza only).
    assert not [s for s in stanza_ids(inner) if s[0] in ("alice@localhost", "bob@localhost")]

    # Nothing for the wrong direction / contact.
    assert alice.mam_ok(fields={"with": "carol@localhost"}).count == 0


def test_query_without_queryid(server, connect):
    erin = connect(server, "erin")
    frank = connect(server, "frank")
    erin.send_message("frank@localhost", "no queryid")
    frank.wait_body("no queryid")
    seq = erin.last_seq()
    reply = erin.iq("set", mam_query_xml(None, fields={"with": "frank@localhost"}))
    assert reply.type == "result"
    results = [m.xml.find("{%s}result" % NS_MAM) for m in erin.messages(seq) if m.seq < reply.seq]
    results = [r for r in results if r is not None]
    assert len(results) == 1
    assert results[0].get("queryid") is None
    assert results[0].get("id")


def test_stanza_id_on_live_message(server, connect):
    carol = connect(server, "carol")
    dave = connect(server, "dave")
    msg_id = carol.send_message("dave@localhost", "stanza-id check")
    live = dave.wait_id(msg_id)

    sids = stanza_ids(live)
    assert len(sids) == 1, "recipient must see exactly its own stanza-id, got %r" % sids
    by, sid = sids[0]
    assert by == "dave@localhost"
    assert sid

    rd = dave.mam_ok(fields={"with": "carol@localhost"})
    assert rd.ids == [sid]
    rc = carol.mam_ok(fields={"with": "dave@localhost"})
    assert len(rc.ids) == 1
    assert rc.ids[0] != sid
    assert ("carol@localhost", rc.ids[0]) not in sids
    # stanza-id is appended as the last child
    assert list(live)[-1].tag == "{%s}stanza-id" % NS_SID


def test_sent_carbon_carries_senders_stanza_id(server, connect):
    erin1 = connect(server, "erin", resource="one")
    erin2 = connect(server, "erin", resource="two")
    dave = connect(server, "dave")
    r = erin2.iq("set", "<enable xmlns='urn:xmpp:carbons:2'/>")
    assert r.type == "result"
    msg_id = erin1.send_message("dave@localhost", "carbon check")
    live = dave.wait_id(msg_id)
    assert [by for by, _ in stanza_ids(live)] == ["dave@localhost"]

    got = erin2.wait_messages(lambda x: x.find("{urn:xmpp:carbons:2}sent") is not None)
    assert got, "no sent carbon"
    fwd_msg = got[0].xml.find("{urn:xmpp:carbons:2}sent/{%s}forwarded/{%s}message" % (NS_FORWARD, NS_CLIENT))
    assert fwd_msg.get("id") == msg_id
    sids = stanza_ids(fwd_msg)
    assert len(sids) == 1 and sids[0][0] == "erin@localhost"
    re_ = erin1.mam_ok(fields={"with": "dave@localhost"})
    assert re_.ids == [sids[0][1]]


def test_disco_info_on_bare_jid(server, connect):
    alice = connect(server, "alice")
    features = alice.disco_features()
    assert "urn:xmpp:mam:2" in features
    assert "urn:xmpp:sid:0" in features
    # Nothing on the server's own disco#info
    host_features = alice.disco_features(to="localhost")
    assert "urn:xmpp:mam:2" not in host_features


def test_a_burst_arrives_in_order_and_the_senders_next_query_has_it_all(server, connect):
    """The sender's stanzas are handled without waiting for their commits, and deliveries are
    held until the rows are committed: what the recipient gets keeps the order sent, archived
    messages (each with its stanza-id) and messages that are not archived (chat states) alike;
    and a query the sender makes right after the burst has every archived message."""
    erin, frank = connect(server, "erin"), connect(server, "frank")
    before = erin.mam_ok(fields={"with": "frank@localhost"}, rsm={"max": 0}).count
    t = token()
    sent, archived = [], []
    for i in range(60):
        mid = "burst-%s-%d" % (t, i)
        if i % 3 == 2:
            sent.append("<message to='frank@localhost' id='%s' type='chat'>"
                        "<active xmlns='http://jabber.org/protocol/chatstates'/></message>" % mid)
        else:
            sent.append("<message to='frank@localhost' id='%s' type='chat'><body>burst %s %d</body></message>"
                        % (mid, t, i))
            archived.append(mid)
    erin.send_raw("".join(sent))  # one write: the server reads the whole burst at once
    r = erin.mam_ok(fields={"with": "frank@localhost"}, rsm={"max": 0})
    assert r.count - before == len(archived), "the sender's query right after the burst missed some"

    frank.wait_id("burst-%s-59" % t)
    got = [m.xml for m in frank.chat_messages() if (m.xml.get("id") or "").startswith("burst-%s-" % t)]
    assert [m.get("id") for m in got] == ["burst-%s-%d" % (t, i) for i in range(60)], "out of order"
    for m in got:
        sids = stanza_ids(m)
        if m.get("id") in archived:
            assert [by for by, _ in sids] == ["frank@localhost"], m.get("id")
        else:
            assert sids == [], m.get("id")
    # Every id frank saw is in his archive, in the order he got them.
    mine = frank.mam_all(fields={"with": "erin@localhost"})
    seen = [stanza_ids(m)[0][1] for m in got if m.get("id") in archived]
    assert [i for i in mine.ids if i in set(seen)] == seen
