"""What gets archived: should-store rules, dont_archive_namespaces, default_archive_policy (reference §2.8, §2.9)."""

import uuid

import pytest

from conftest import NS_CLIENT, NS_SID

CHATSTATES = "http://jabber.org/protocol/chatstates"

# (case id, body, payload, type, stored?)
CASES = [
    ("chat_body", "hi", "", "chat", True),
    ("normal_body_no_type", "hi", "", None, True),
    ("normal_body", "hi", "", "normal", True),
    ("headline", "news", "", "headline", False),
    ("groupchat", "to a user", "", "groupchat", False),
    ("chatstate_only", None, "<composing xmlns='%s'/>" % CHATSTATES, "chat", False),
    ("no_store_hint_with_body", "secret", "<no-store xmlns='urn:xmpp:hints'/>", "chat", False),
    ("no_permanent_store_hint_with_body", "secret", "<no-permanent-store xmlns='urn:xmpp:hints'/>", "chat", False),
    ("store_hint_without_body", None, "<store xmlns='urn:xmpp:hints'/>", "chat", True),
    ("receipt_request", None, "<request xmlns='urn:xmpp:receipts'/>", "chat", True),
    ("receipt_ack", None, "<received xmlns='urn:xmpp:receipts' id='abc'/>", "chat", True),
    ("chat_marker", None, "<displayed xmlns='urn:xmpp:chat-markers:0' id='abc'/>", "chat", True),
    ("eme", None, "<encryption xmlns='urn:xmpp:eme:0' namespace='eu.siacs.conversations.axolotl'/>", "chat", True),
    ("omemo_without_eme_or_body", None,
     "<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'/></encrypted>", "chat", False),
    ("subject_only", None, "<subject>topic</subject>", "chat", True),
    # mod_mam.lua:369-375: invitations and Jingle Message calls, without a body.
    ("direct_invite", None, "<x xmlns='jabber:x:conference' jid='room@conference.localhost'/>", None, True),
    ("mediated_invite", None,
     "<x xmlns='http://jabber.org/protocol/muc#user'><invite from='carol@localhost'/></x>", None, True),
    ("muc_user_without_invite", None,
     "<x xmlns='http://jabber.org/protocol/muc#user'><decline from='carol@localhost'/></x>", None, False),
    ("muc_user_invite_in_other_ns", None,
     "<x xmlns='http://jabber.org/protocol/muc#user'><invite xmlns='urn:example:not-muc'/></x>", None, False),
    ("jingle_message_propose", None,
     "<propose xmlns='urn:xmpp:jingle-message:0' id='call1'><description xmlns='urn:xmpp:jingle:apps:rtp:1' "
     "media='audio'/></propose>", "chat", True),
    ("empty", None, "", "chat", False),
]


def archived_copies(client, peer, msg_id):
    """Inner messages with this id in client's archive (with=peer), ignoring error bounces."""
    res = client.mam_all(fields={"with": peer})
    return [m for m in res.forwarded if m.get("id") == msg_id and m.get("type") != "error"]


def our_sids(msg, owner):
    return [s.get("id") for s in msg.findall("{%s}stanza-id" % NS_SID) if s.get("by") == owner]


@pytest.fixture(scope="module")
def pair(server, connect_module):
    return connect_module(server, "alice"), connect_module(server, "bob")


@pytest.mark.parametrize("case,body,payload,mtype,stored", CASES, ids=[c[0] for c in CASES])
def test_should_store(pair, case, body, payload, mtype, stored):
    alice, bob = pair
    msg_id = "%s-%s" % (case, uuid.uuid4().hex[:8])
    alice.send_message("bob@localhost", body, payload, mtype=mtype, msg_id=msg_id)
    alice.ping()
    if mtype != "groupchat":  # groupchat to a bare user JID bounces instead of being delivered
        live = bob.wait_id(msg_id)
        assert bool(our_sids(live, "bob@localhost")) == stored, "stanza-id on live copy"
    else:
        bob.ping()
    assert len(archived_copies(alice, "bob@localhost", msg_id)) == (1 if stored else 0), "sender archive"
    assert len(archived_copies(bob, "alice@localhost", msg_id)) == (1 if stored else 0), "recipient archive"


def test_chat_states_stripped_from_stored_copy_only(pair):
    alice, bob = pair
    msg_id = alice.send_message("bob@localhost", "with a chat state", "<active xmlns='%s'/>" % CHATSTATES)
    live = bob.wait_id(msg_id)
    assert live.find("{%s}active" % CHATSTATES) is not None, "live copy keeps the chat state"
    for client, peer in ((alice, "bob@localhost"), (bob, "alice@localhost")):
        (copy,) = archived_copies(client, peer, msg_id)
        assert copy.findtext("{%s}body" % NS_CLIENT) == "with a chat state"
        assert copy.find("{%s}active" % CHATSTATES) is None, "stored copy must not keep the chat state"


def test_custom_dont_archive_namespaces(make_server, connect):
    srv = make_server(['dont_archive_namespaces = { "urn:example:e2e-strip", "urn:xmpp:receipts" }'])
    alice = connect(srv, "alice")
    bob = connect(srv, "bob")
    payload = "<x xmlns='urn:example:e2e-strip'/><active xmlns='%s'/>" % CHATSTATES
    msg_id = alice.send_message("bob@localhost", "strip me", payload)
    live = bob.wait_id(msg_id)
    assert live.find("{urn:example:e2e-strip}x") is not None
    assert live.find("{%s}active" % CHATSTATES) is not None
    (copy,) = archived_copies(bob, "alice@localhost", msg_id)
    assert copy.find("{urn:example:e2e-strip}x") is None
    # The option replaces the default set, so chat states are kept now.
    assert copy.find("{%s}active" % CHATSTATES) is not None
    # A receipt-only message is archivable, but empty once stripped: not stored.
    ack_id = alice.send_message("bob@localhost", None, "<received xmlns='urn:xmpp:receipts' id='%s'/>" % msg_id)
    live = bob.wait_id(ack_id)
    assert not our_sids(live, "bob@localhost")
    assert archived_copies(bob, "alice@localhost", ack_id) == []
    assert archived_copies(alice, "bob@localhost", ack_id) == []


def test_default_archive_policy_false(make_server, connect):
    srv = make_server(["default_archive_policy = false"])
    alice = connect(srv, "alice")
    bob = connect(srv, "bob")
    msg_id = alice.send_message("bob@localhost", "not archived")
    live = bob.wait_id(msg_id)
    assert our_sids(live, "bob@localhost") == []
    for client in (alice, bob):
        r = client.mam_ok()
        assert r.messages == [] and r.complete and r.count == 0


def test_default_archive_policy_roster(make_server, connect):
    srv = make_server(['default_archive_policy = "roster"'])
    alice = connect(srv, "alice")
    bob = connect(srv, "bob")
    carol = connect(srv, "carol")
    r = alice.iq("set", "<query xmlns='jabber:iq:roster'><item jid='bob@localhost' name='Bob'/></query>")
    assert r.type == "result"

    to_bob = alice.send_message("bob@localhost", "bob is a contact")
    to_carol = alice.send_message("carol@localhost", "carol is not")
    live_bob = bob.wait_id(to_bob)
    live_carol = carol.wait_id(to_carol)
    # alice has bob in her roster: stored in alice's archive only.
    assert len(archived_copies(alice, "bob@localhost", to_bob)) == 1
    assert archived_copies(alice, "carol@localhost", to_carol) == []
    # Neither bob nor carol has alice in their roster.
    assert archived_copies(bob, "alice@localhost", to_bob) == []
    assert our_sids(live_bob, "bob@localhost") == []
    assert archived_copies(carol, "alice@localhost", to_carol) == []
    assert our_sids(live_carol, "carol@localhost") == []
    # Incoming direction for alice: bob -> alice is stored (alice's roster), carol -> alice is not.
    from_bob = bob.send_message("alice@localhost", "reply from bob")
    from_carol = carol.send_message("alice@localhost", "reply from carol")
    assert our_sids(alice.wait_id(from_bob), "alice@localhost")
    assert not our_sids(alice.wait_id(from_carol), "alice@localhost")
    assert len(archived_copies(alice, "bob@localhost", from_bob)) == 1
    assert archived_copies(alice, "carol@localhost", from_carol) == []
