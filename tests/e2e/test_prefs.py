"""Archiving preferences: <prefs/> get and set, and archiving by them (reference §2.3, §2.8, §4.1-4.2, §5).

Stock shapes (mamprefsxml.lib.lua): the reply is <prefs xmlns=urn:xmpp:mam:2 [default=always|never|roster]>
with <always/> then <never/>, both always present. A set replaces everything, JIDs are jid.prep'd
(invalid ones dropped), a JID in both lists ends up in never, a missing or unknown default stores
no default (then only `always` JIDs are archived). Prefs live in Prosody's `archive_prefs` keyval
store, so they carry over between mod_mam and mod_mam_rs.
"""


import pytest

from conftest import (
    stored_prefs_sql,
    NS_MAM, USERS, ProsodyServer, exchange, restart_server, stop_server_keep_data, token, xml_escape,
)

PREFS_USERS = USERS + ("fresh", "pa", "pb", "pc", "pd", "pe", "pf", "pg")


@pytest.fixture(scope="module")
def server():
    srv = ProsodyServer(users=PREFS_USERS).start()
    yield srv
    srv.stop()


# --------------------------------------------------------------------------
# helpers


def prefs_xml(default=None, always=(), never=(), with_lists=True):
    d = " default='%s'" % xml_escape(default) if default is not None else ""
    if not with_lists:
        return "<prefs xmlns='urn:xmpp:mam:2'%s/>" % d
    return "<prefs xmlns='urn:xmpp:mam:2'%s><always>%s</always><never>%s</never></prefs>" % (
        d, "".join("<jid>%s</jid>" % xml_escape(j) for j in always),
        "".join("<jid>%s</jid>" % xml_escape(j) for j in never))


def parse_prefs(reply):
    """(default attr or None, sorted always JIDs, sorted never JIDs), checking the stock shape."""
    assert reply.type == "result", "prefs iq failed: %r" % (reply,)
    children = list(reply.xml)
    assert len(children) == 1, "expected exactly <prefs/> in the reply, got %r" % [c.tag for c in children]
    p = children[0]
    assert p.tag == "{%s}prefs" % NS_MAM
    assert set(p.attrib) <= {"default"}, p.attrib
    assert [c.tag for c in p] == ["{%s}always" % NS_MAM, "{%s}never" % NS_MAM], \
        "want <always/> then <never/>, got %r" % [c.tag for c in p]
    lists = []
    for c in p:
        assert all(j.tag == "{%s}jid" % NS_MAM for j in c), [j.tag for j in c]
        lists.append(sorted(j.text or "" for j in c))
    return p.get("default"), lists[0], lists[1]


def get_prefs(client, to=None):
    return parse_prefs(client.iq("get", "<prefs xmlns='urn:xmpp:mam:2'/>", to=to))


def set_prefs(client, default=None, always=(), never=(), **kw):
    return parse_prefs(client.iq("set", prefs_xml(default, always, never, **kw)))




def archived(client, with_jid):
    return client.mam_all(fields={"with": with_jid}).bodies


# --------------------------------------------------------------------------
# get


def test_get_on_fresh_account(server, connect):
    fresh = connect(server, "fresh")
    # default_archive_policy defaults to true -> "always"; both lists present and empty
    assert get_prefs(fresh) == ("always", [], [])
    # A get changes nothing
    assert get_prefs(fresh) == ("always", [], [])


@pytest.mark.parametrize("policy, expected", [
    ("false", "never"),
    ('"roster"', "roster"),
    ("true", "always"),
])
def test_get_default_follows_default_archive_policy(make_server, connect, policy, expected):
    srv = make_server(["default_archive_policy = %s" % policy])
    alice = connect(srv, "alice")
    assert get_prefs(alice) == (expected, [], [])


def test_get_and_set_to_own_bare_jid(server, connect):
    alice = connect(server, "alice")
    assert get_prefs(alice, to="alice@localhost")[0] == "always"


def test_prefs_to_another_users_jid_is_service_unavailable(server, connect):
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    before = get_prefs(bob)
    for itype, payload in (("get", "<prefs xmlns='urn:xmpp:mam:2'/>"),
                           ("set", prefs_xml("never", [], ["alice@localhost"]))):
        r = alice.iq(itype, payload, to="bob@localhost")
        assert r.type == "error", r
        assert (r.error_type, r.condition) == ("cancel", "service-unavailable"), r
    assert get_prefs(bob) == before


# --------------------------------------------------------------------------
# set


@pytest.mark.parametrize("default", ["always", "never", "roster"])
def test_set_echoes_stored_state_and_replaces_everything(server, connect, default):
    pa = connect(server, "pa")
    first = (default, ["alice@localhost", "bob@localhost"], ["carol@localhost"])
    assert set_prefs(pa, *first) == first
    assert get_prefs(pa) == first
    # A second set replaces the lists and the default entirely
    other = {"always": "never", "never": "roster", "roster": "always"}[default]
    second = (other, ["dave@localhost"], [])
    assert set_prefs(pa, *second) == second
    assert get_prefs(pa) == second
    # ... and a set with empty lists clears them
    assert set_prefs(pa, default) == (default, [], [])
    assert get_prefs(pa) == (default, [], [])


def test_set_with_missing_list_elements(server, connect):
    pa = connect(server, "pa")
    set_prefs(pa, "always", ["alice@localhost"], ["bob@localhost"])
    # <prefs default='never'/> with no <always/>/<never/>: the reply still has both, empty
    assert set_prefs(pa, "never", with_lists=False) == ("never", [], [])
    assert get_prefs(pa) == ("never", [], [])


def test_jids_are_prepped_and_invalid_ones_dropped(server, connect):
    pb = connect(server, "pb")
    got = set_prefs(pb, "always",
                    always=["Alice@LocalHost", "Bob@LOCALHOST/MyRes", "@localhost", "user@", "", "a@b@c"],
                    never=["CAROL@localhost", "foo bar@localhost", "x@localhost/"])
    # resource case is kept, node and domain are lower-cased; a full JID is kept as is
    assert got == ("always", ["alice@localhost", "bob@localhost/MyRes"], ["carol@localhost"])
    assert get_prefs(pb) == got


def test_duplicate_jids_collapse(server, connect):
    pb = connect(server, "pb")
    got = set_prefs(pb, "roster", always=["dave@localhost", "DAVE@localhost", "dave@localhost"])
    assert got == ("roster", ["dave@localhost"], [])


def test_jid_in_both_lists_ends_up_in_never(server, connect):
    pb = connect(server, "pb")
    got = set_prefs(pb, "always", always=["alice@localhost", "bob@localhost"],
                    never=["Bob@localhost", "carol@localhost"])
    assert got == ("always", ["alice@localhost"], ["bob@localhost", "carol@localhost"])
    assert get_prefs(pb) == got


@pytest.mark.parametrize("default", [None, "", "sometimes", "ALWAYS", "true"])
def test_set_without_valid_default_archives_only_always_jids(server, connect, default):
    pc = connect(server, "pc")
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    got = set_prefs(pc, default, always=["bob@localhost"])
    assert got == (None, ["bob@localhost"], []), "no default attr when none is stored"
    assert get_prefs(pc) == got

    t = token()
    exchange(pc, alice, "out-alice " + t)
    exchange(alice, pc, "in-alice " + t)
    exchange(pc, bob, "out-bob " + t)
    exchange(bob, pc, "in-bob " + t)
    assert [b for b in archived(pc, "alice@localhost") if t in b] == []
    assert [b for b in archived(pc, "bob@localhost") if t in b] == ["out-bob " + t, "in-bob " + t]
    # The contacts' own archives follow their own (default) prefs
    assert [b for b in archived(alice, "pc@localhost") if t in b] == ["out-alice " + t, "in-alice " + t]


# --------------------------------------------------------------------------
# archiving obeys the prefs


def test_never_jid_is_not_archived(server, connect):
    pd = connect(server, "pd")
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    set_prefs(pd, "always", never=["alice@localhost"])
    t = token()
    exchange(pd, alice, "out " + t)
    exchange(alice, pd, "in " + t)
    exchange(pd, bob, "out " + t)
    exchange(bob, pd, "in " + t)
    assert [b for b in archived(pd, "alice@localhost") if t in b] == []
    assert [b for b in archived(pd, "bob@localhost") if t in b] == ["out " + t, "in " + t]
    # alice's archive is hers: both directions stored
    assert [b for b in archived(alice, "pd@localhost") if t in b] == ["out " + t, "in " + t]


def test_never_jid_message_is_delivered_without_stanza_id(server, connect):
    pd = connect(server, "pd")
    alice = connect(server, "alice")
    set_prefs(pd, "always", never=["alice@localhost"])
    mid = alice.send_message("pd@localhost", "no sid " + token())
    live = pd.wait_id(mid)
    sids = [s.get("by") for s in live.findall("{urn:xmpp:sid:0}stanza-id")]
    assert sids == [], "not archived for pd, so no stanza-id by pd (got %r)" % sids


def test_always_jid_is_archived_with_default_never(server, connect):
    pe = connect(server, "pe")
    alice = connect(server, "alice")
    bob = connect(server, "bob")
    set_prefs(pe, "never", always=["alice@localhost"])
    t = token()
    exchange(pe, alice, "out " + t)
    exchange(alice, pe, "in " + t)
    exchange(pe, bob, "out " + t)
    exchange(bob, pe, "in " + t)
    assert [b for b in archived(pe, "alice@localhost") if t in b] == ["out " + t, "in " + t]
    assert [b for b in archived(pe, "bob@localhost") if t in b] == []


def test_roster_default_archives_only_roster_contacts(server, connect):
    pf = connect(server, "pf")
    carol = connect(server, "carol")
    dave = connect(server, "dave")
    # A roster item with no subscription at all counts as "in the roster"
    r = pf.iq("set", "<query xmlns='jabber:iq:roster'><item jid='carol@localhost'/></query>")
    assert r.type == "result", r
    assert set_prefs(pf, "roster") == ("roster", [], [])
    t = token()
    exchange(pf, carol, "out " + t)
    exchange(carol, pf, "in " + t)
    exchange(pf, dave, "out " + t)
    exchange(dave, pf, "in " + t)
    assert [b for b in archived(pf, "carol@localhost") if t in b] == ["out " + t, "in " + t]
    assert [b for b in archived(pf, "dave@localhost") if t in b] == []
    # never beats roster membership, always beats its absence
    set_prefs(pf, "roster", always=["dave@localhost"], never=["carol@localhost"])
    t = token()
    exchange(pf, carol, "out " + t)
    exchange(pf, dave, "out " + t)
    assert [b for b in archived(pf, "carol@localhost") if t in b] == []
    assert [b for b in archived(pf, "dave@localhost") if t in b] == ["out " + t]


def test_full_jid_rule_never_matches(server, connect):
    pg = connect(server, "pg")
    alice = connect(server, "alice", resource="fixed")
    # Stored as given, but rules are looked up by the contact's bare JID only
    assert set_prefs(pg, "never", always=["alice@localhost/fixed"]) == ("never", ["alice@localhost/fixed"], [])
    t = token()
    exchange(alice, pg, "in " + t)
    exchange(pg, alice, "out " + t)
    assert [b for b in archived(pg, "alice@localhost") if t in b] == []


# --------------------------------------------------------------------------
# persistence
#
# Stock quirk (0.12 mod_storage_sql keyval_store_get skips rows whose value is false): with SQL
# storage the <never/> JIDs are written but dropped when the prefs are read back from the store.
# mod_mam caches prefs per user only while the user has a session, so under SQL never-rules hold
# while the user is online and are lost after that (reconnect, restart, messages while offline).
# The default (stored as a __hash in the key='' row) and the always-JIDs survive. Internal
# (file) storage keeps everything.


PREFS_A = ("roster", ["bob@localhost"], ["carol@localhost"])
STORAGE_CONFIG = {"sql": [], "internal": ['storage = "internal"']}


def as_reloaded(prefs, storage):
    """What a get returns once prefs come back from the store (see the quirk above)."""
    default, always, never = prefs
    return (default, always, [] if storage == "sql" else never)


def check_prefs_effect(srv, connect, t):
    """PREFS_A set for alice: bob archived (always), carol and dave not (roster default, neither in it)."""
    alice = connect(srv, "alice")
    others = {u: connect(srv, u) for u in ("bob", "carol", "dave")}
    for u, c in others.items():
        exchange(alice, c, "%s %s" % (u, t))
    assert [b for b in archived(alice, "bob@localhost") if t in b] == ["bob " + t]
    assert [b for b in archived(alice, "carol@localhost") if t in b] == []
    assert [b for b in archived(alice, "dave@localhost") if t in b] == []


@pytest.mark.parametrize("storage", ["sql", "internal"])
def test_prefs_persist_across_restart(make_server, connect, storage):
    srv = make_server(STORAGE_CONFIG[storage])
    alice = connect(srv, "alice")
    assert set_prefs(alice, *PREFS_A) == PREFS_A
    alice.disconnect()
    stop_server_keep_data(srv)
    restart_server(srv)
    alice = connect(srv, "alice")
    assert get_prefs(alice) == as_reloaded(PREFS_A, storage)
    check_prefs_effect(srv, connect, token())


@pytest.mark.parametrize("storage", ["sql", "internal"])
def test_never_rule_for_offline_user(make_server, connect, storage):
    """default=always, never=[carol]; carol writes while the owner is offline (stock quirk above:
    under SQL the never-rule is lost once the owner has no session)."""
    srv = make_server(STORAGE_CONFIG[storage])
    alice = connect(srv, "alice")
    carol = connect(srv, "carol")
    set_prefs(alice, "always", never=["carol@localhost"])
    t = token()
    exchange(carol, alice, "online " + t)
    alice.disconnect()
    carol.send_message("alice@localhost", "offline " + t)
    carol.ping()
    alice = connect(srv, "alice")
    alice.wait_body("offline " + t)  # from offline storage
    got = [b for b in archived(alice, "carol@localhost") if t in b]
    assert got == (["offline " + t] if storage == "sql" else [])
    assert get_prefs(alice) == as_reloaded(("always", [], ["carol@localhost"]), storage)


def test_prefs_stored_in_archive_prefs_keyval_sql(server, connect):
    """Stock layout (reference §4.1): one row per JID rule, the default in the key='' row as a __hash."""
    pa = connect(server, "pa")
    set_prefs(pa, "roster", ["bob@localhost"], ["carol@localhost"])
    assert stored_prefs_sql(server, "pa") == [
        ("", "json", '{"__hash":[false,"roster"]}'),
        ("bob@localhost", "boolean", "true"),
        ("carol@localhost", "boolean", "false"),
    ]


def test_prefs_stored_in_archive_prefs_keyval_internal(make_server, connect):
    """Stock layout (reference §4.2): <data>/localhost/archive_prefs/<user>.dat, a Lua table."""
    srv = make_server(STORAGE_CONFIG["internal"])
    alice = connect(srv, "alice")
    set_prefs(alice, "never", ["bob@localhost"], ["carol@localhost"])
    text = (srv.data / "localhost" / "archive_prefs" / "alice.dat").read_text()
    for frag in ("[false] = false;", '["bob@localhost"] = true;', '["carol@localhost"] = false;'):
        assert frag in text, text


@pytest.mark.mam_rs_only
@pytest.mark.parametrize("storage", ["sql", "internal"])
def test_prefs_carry_over_between_stock_and_mam_rs(connect, storage):
    """Prefs set under stock mod_mam are read by mod_mam_rs on the same data dir and storage
    config, and prefs set by mod_mam_rs are read by stock."""
    srv = ProsodyServer(STORAGE_CONFIG[storage], module="mam").start()
    try:
        # 1. stock sets
        alice = connect(srv, "alice")
        assert set_prefs(alice, *PREFS_A) == PREFS_A
        alice.disconnect()
        stop_server_keep_data(srv)

        # 2. mam_rs reads them, obeys them, and sets new ones
        srv.module = "mam_rs"
        restart_server(srv)
        alice = connect(srv, "alice")
        assert get_prefs(alice) == as_reloaded(PREFS_A, storage)
        check_prefs_effect(srv, connect, token())
        prefs_b = ("never", ["dave@localhost"], ["bob@localhost"])
        assert set_prefs(alice, *prefs_b) == prefs_b
        alice.disconnect()
        stop_server_keep_data(srv)
        if storage == "internal":
            text = (srv.data / "localhost" / "archive_prefs" / "alice.dat").read_text()
            for frag in ("[false] = false;", '["dave@localhost"] = true;', '["bob@localhost"] = false;'):
                assert frag in text, text
        else:
            assert stored_prefs_sql(srv, "alice") == [
                ("", "json", '{"__hash":[false,false]}'),
                ("bob@localhost", "boolean", "false"),
                ("dave@localhost", "boolean", "true"),
            ]

        # 3. stock reads what mam_rs wrote
        srv.module = "mam"
        restart_server(srv)
        alice = connect(srv, "alice")
        assert get_prefs(alice) == as_reloaded(prefs_b, storage)
    finally:
        srv.stop()
