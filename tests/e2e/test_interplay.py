"""Interplay with mod_carbons, mod_offline and mod_smacks (reference §2.1, §2.9 step 9, §2.12).

- carbons (-0.5) runs after archiving (0): a received carbon carries the recipient's stanza-id.
  (The sent-carbon side is in test_archive_basics.py.)
- offline: a message to an offline user is archived and stored offline with the stanza-id; a
  session that queried MAM before its initial presence gets no offline push (message/offline/
  broadcast is claimed), and the messages stay for a later non-MAM session.
- smacks (XEP-0198): MAM results go through session.send, so they are counted like any stanza;
  unacked MAM results and archived messages of a session that used MAM are neither bounced nor
  put in offline storage when the session dies (mod_smacks delivery/failure, session.mam_requested).
"""

import asyncio
import time

import pytest
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.base import MatcherBase

from conftest import NS_CLIENT, NS_FORWARD, NS_MAM, USERS, Client, ModulesServer, _Xmpp, stanza_ids, token

NS_SM = "urn:xmpp:sm:3"
NS_CARBONS = "urn:xmpp:carbons:2"
STANZA_TAGS = {"{%s}%s" % (NS_CLIENT, n) for n in ("message", "presence", "iq")}
INTERPLAY_USERS = USERS + ("o1", "o2", "o3", "o4", "sm1", "sm2", "sm3", "sm4")


@pytest.fixture(scope="module")
def server():
    srv = ModulesServer(extra_modules=["smacks"], users=INTERPLAY_USERS).start()
    yield srv
    srv.stop()


class _MatchAll(MatcherBase):
    def __init__(self):
        super().__init__(None)

    def match(self, xml):
        return True


class _RawXmpp(_Xmpp):
    """_Xmpp that may skip the initial presence, and speaks XEP-0198 by hand: counts the stanzas
    received since <enabled/>, answers the server's <r/> with that count (unless auto_ack is off),
    and records every sm element and stream error."""

    def __init__(self, jid, pw, auto_presence=True):
        self.auto_presence = auto_presence
        super().__init__(jid, pw)
        self.sm_enabled = False
        self.sm_in = 0
        self.auto_ack = True
        self.sm_log = []  # (tag local name, attrs, sm_in at that moment)
        self.stream_errors = []
        self.register_handler(Callback("e2e raw", _MatchAll(), self._on_any))

    def _on_start(self, _event):
        if self.auto_presence:
            self.send_raw("<presence/>")
        if not self.started.done():
            self.started.set_result(True)

    def _on_any(self, stanza):
        tag = stanza.xml.tag
        if tag in STANZA_TAGS:
            if self.sm_enabled:
                self.sm_in += 1
        elif tag.startswith("{%s}" % NS_SM):
            name = tag.split("}", 1)[1]
            if name == "enabled":
                self.sm_enabled, self.sm_in = True, 0
            self.sm_log.append((name, dict(stanza.xml.attrib), self.sm_in))
            if name == "r" and self.auto_ack:
                self.send_raw("<a xmlns='%s' h='%d'/>" % (NS_SM, self.sm_in))
        elif tag == "{http://etherx.jabber.org/streams}error":
            self.stream_errors.append(copy_text(stanza.xml))


def copy_text(xml):
    return " ".join(t.strip() for t in xml.itertext() if t.strip()) + " " + " ".join(c.tag for c in xml)


class RawClient(Client):
    def __init__(self, lt, server, user, resource=None, auto_presence=True):
        super().__init__(lt, server, user, resource)
        self.auto_presence = auto_presence

    def connect(self, timeout=15.0):
        async def go():
            self.x = _RawXmpp("%s/%s" % (self.bare, self.resource), "pw-" + self.user, self.auto_presence)
            self.x.connect("127.0.0.1", self.server.port)
            await asyncio.wait_for(self.x.started, timeout)

        self.lt.run(go(), timeout + 5)
        self.ping()
        return self

    def enable_sm(self, timeout=10.0):
        self.send_raw("<enable xmlns='%s'/>" % NS_SM)
        self._wait(lambda: self.x.sm_enabled, timeout, "no <enabled/>")

    def sm_log(self):
        return self.lt.call(list, self.x.sm_log)

    def request_ack(self, timeout=10.0):
        """Sends <r/>; returns the server's h (stanzas it handled from us since <enable/>)."""
        n = len(self.sm_log())
        self.send_raw("<r xmlns='%s'/>" % NS_SM)
        self._wait(lambda: any(e[0] == "a" for e in self.x.sm_log[n:]), timeout, "no <a/> for our <r/>")
        return int([e for e in self.sm_log()[n:] if e[0] == "a"][0][1]["h"])

    def ack(self, extra=0):
        """Sends <a h=(stanzas received since <enabled/>) + extra/> from the loop thread; returns h."""
        def go():
            h = self.x.sm_in + extra
            self.x.send_raw("<a xmlns='%s' h='%d'/>" % (NS_SM, h))
            return h
        return self.lt.call(go)

    def abort(self):
        """Drops the TCP connection without closing the stream."""
        x, self.x = self.x, None
        self.lt.call(x.abort)

    def _wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        while not self.lt.call(pred):
            assert time.monotonic() < deadline, what
            time.sleep(0.02)


@pytest.fixture
def raw_connect(loop_thread):
    made = []

    def factory(server, user, resource=None, auto_presence=True):
        c = RawClient(loop_thread, server, user, resource, auto_presence).connect()
        made.append(c)
        return c

    yield factory
    for c in made:
        c.disconnect()



def errors_from(client, jid_bare, since=0):
    return [m for m in client.messages(since)
            if m.xml.get("type") == "error" and (m.xml.get("from") or "").split("/")[0] == jid_bare]


# --------------------------------------------------------------------------
# carbons


def test_received_carbon_carries_recipients_stanza_id(server, connect):
    alice = connect(server, "alice")
    bob1 = connect(server, "bob", resource="one")
    bob2 = connect(server, "bob", resource="two")
    assert bob2.iq("set", "<enable xmlns='%s'/>" % NS_CARBONS).type == "result"
    t = token()
    mid = alice.send_message("bob@localhost/one", "to one " + t)
    live = bob1.wait_id(mid)
    (by, sid), = stanza_ids(live)
    assert by == "bob@localhost"

    got = bob2.wait_messages(lambda x: x.find("{%s}received" % NS_CARBONS) is not None
                             and x.find(".//{%s}message" % NS_CLIENT) is not None
                             and x.find(".//{%s}message" % NS_CLIENT).get("id") == mid)
    assert got, "no received carbon"
    inner = got[0].xml.find("{%s}received/{%s}forwarded/{%s}message" % (NS_CARBONS, NS_FORWARD, NS_CLIENT))
    assert stanza_ids(inner) == [("bob@localhost", sid)], "carbon must carry bob's stanza-id only"
    assert bob1.mam_ok(fields={"with": "alice@localhost"}).ids[-1] == sid


def test_bare_message_to_two_resources_is_one_archive_row(server, connect):
    carol = connect(server, "carol")
    dave1 = connect(server, "dave", resource="one")
    dave2 = connect(server, "dave", resource="two")
    t = token()
    mid = carol.send_message("dave@localhost", "to both " + t)
    s1 = stanza_ids(dave1.wait_id(mid))
    s2 = stanza_ids(dave2.wait_id(mid))
    assert s1 == s2 and len(s1) == 1 and s1[0][0] == "dave@localhost"
    res = dave1.mam_all(fields={"with": "carol@localhost"})
    assert [i for i, b in zip(res.ids, res.bodies) if t in b] == [s1[0][1]]


def test_a_held_message_goes_through_the_send_path_once(server, connect):
    """A message whose delivery waits for its row's commit is sent on through the session's
    filters and rawsend, not through session.send again: Prosody's send logs one
    `Sending[c2s]` line for it (and serialises its top tag once). On Prosody 0.12 and 13.0,
    whose sessionmanager send the module has checked; any other send is called again."""
    erin = connect(server, "erin")
    frank = connect(server, "frank")
    offset = len(server.log_text())
    t = token()
    mids = [erin.send_message("frank@localhost", "once %d %s" % (i, t)) for i in range(20)]
    for mid in mids:
        frank.wait_id(mid)
    log = server.log_text()[offset:].splitlines()
    sent = {mid: [ln for ln in log if "Sending[c2s]: <message" in ln and "id='%s'" % mid in ln] for mid in mids}
    assert all(len(lines) == 1 for lines in sent.values()), \
        "each message sent once to frank's one session: %r" % {m: len(v) for m, v in sent.items() if len(v) != 1}


# --------------------------------------------------------------------------
# offline


def test_offline_message_is_archived_and_stored_with_stanza_id(server, connect):
    alice = connect(server, "alice")
    t = token()
    mid = alice.send_message("o1@localhost", "while offline " + t)
    alice.ping()
    o1 = connect(server, "o1")  # initial presence -> offline messages pushed
    pushed = o1.wait_id(mid)
    assert pushed.findtext("{%s}body" % NS_CLIENT) == "while offline " + t
    (by, sid), = stanza_ids(pushed)
    assert by == "o1@localhost"
    res = o1.mam_ok(fields={"with": "alice@localhost"})
    assert res.ids == [sid]
    assert errors_from(alice, "o1@localhost") == []
    # alice's own archive has it too, under another id
    ra = alice.mam_ok(fields={"with": "o1@localhost"})
    assert len(ra.ids) == 1 and ra.ids[0] != sid


def test_mam_query_before_presence_suppresses_offline_push(server, connect, raw_connect):
    alice = connect(server, "alice")
    t = token()
    mids = [alice.send_message("o2@localhost", "offline %d %s" % (i, t)) for i in range(2)]
    alice.ping()

    quiet = raw_connect(server, "o2", auto_presence=False)
    res = quiet.mam_ok(fields={"with": "alice@localhost"})
    assert [f.get("id") for f in res.forwarded] == mids
    seq = quiet.last_seq()
    quiet.send_raw("<presence/>")
    quiet.ping()  # the offline broadcast happens while the presence is processed
    time.sleep(0.3)
    assert [m for m in quiet.chat_messages(seq) if m.xml.get("id") in mids] == []
    quiet.disconnect()

    # They stayed in offline storage: a session that did not query first gets them
    later = connect(server, "o2")
    for mid in mids:
        later.wait_id(mid)
    assert errors_from(alice, "o2@localhost") == []


def test_mam_query_after_presence_does_not_matter(server, connect, raw_connect):
    alice = connect(server, "alice")
    t = token()
    mid = alice.send_message("o3@localhost", "offline " + t)
    alice.ping()
    o3 = connect(server, "o3")  # presence first: pushed at once
    o3.wait_id(mid)
    o3.mam_ok()
    o3.disconnect()
    again = connect(server, "o3")  # mod_offline deleted them after the push
    again.ping()
    time.sleep(0.3)
    assert [m for m in again.chat_messages() if m.xml.get("id") == mid] == []


# --------------------------------------------------------------------------
# smacks


def fill_archive(server, connect, user, peer, n):
    a = connect(server, user)
    p = connect(server, peer)
    t = token()
    last = None
    for i in range(n):
        last = a.send_message("%s@localhost" % peer, "fill %d %s" % (i, t))
    p.wait_id(last)
    a.disconnect()
    p.disconnect()


def test_smacks_counts_mam_results(server, connect, raw_connect):
    offset = len(server.log_text())
    fill_archive(server, connect, "sm1", "carol", 25)
    c = raw_connect(server, "sm1", auto_presence=False)
    c.enable_sm()
    res = c.mam_ok(rsm={"max": 25})
    assert len(res.messages) == 25
    assert c.lt.call(lambda: c.x.sm_in) == 26  # 25 results + the iq result
    assert c.request_ack() == 1  # the server handled our one query iq
    c.ack()
    c.ping()
    assert c.request_ack() == 2  # the query and the ping (<r/>, <a/> are not stanzas)
    log = server.log_text()[offset:]
    assert "Client acknowledged more stanzas than sent" not in log
    assert "The client says it handled" not in log
    assert c.lt.call(lambda: c.x.stream_errors) == []

    # The server's count is exact: one more than we received is refused.
    c.ack(extra=1)
    deadline = time.monotonic() + 10
    while not c.lt.call(lambda: list(c.x.stream_errors)):
        assert time.monotonic() < deadline, "an ack beyond what was sent must be refused"
        time.sleep(0.05)
    assert "Client acknowledged more stanzas than sent" in c.lt.call(lambda: c.x.stream_errors[0])


def test_smacks_second_query_page_counts_too(server, connect, raw_connect):
    offset = len(server.log_text())
    fill_archive(server, connect, "sm2", "dave", 30)
    c = raw_connect(server, "sm2", auto_presence=True)
    c.enable_sm()
    total = 0
    after = None
    for _ in range(5):
        rsm = {"max": 7}
        if after:
            rsm["after"] = after
        r = c.mam_ok(rsm=rsm)
        total += len(r.messages)
        c.ack()  # acking as we go, like a real client
        if r.complete:
            break
        after = r.last
    assert total == 30
    c.ping()
    c.ack()
    assert c.request_ack() == 6  # 5 queries + 1 ping
    assert c.lt.call(lambda: c.x.stream_errors) == []
    assert "Client acknowledged more stanzas than sent" not in server.log_text()[offset:]


@pytest.mark.parametrize("queried", [True, False], ids=["after-mam-query", "no-mam-query"])
def test_smacks_unacked_on_disconnect(server, connect, raw_connect, queried):
    """Unacked stanzas of a dying non-resumable smacks session: MAM results are dropped; an
    archived message is dropped too if the session used MAM (it will find it in the archive),
    else it goes to offline storage. No error goes back to the sender either way."""
    user = "sm3" if queried else "sm4"
    fill_archive(server, connect, user, "erin", 3)
    erin = connect(server, "erin")
    c = raw_connect(server, user, auto_presence=True)
    c.x.auto_ack = False
    c.enable_sm()
    if queried:
        assert len(c.mam_ok().messages) == 3
    t = token()
    mid = erin.send_message("%s@localhost" % user, "unacked " + t)
    c.wait_id(mid)
    offset = len(server.log_text())
    c.abort()
    deadline = time.monotonic() + 10
    while "Destroying session with" not in server.log_text()[offset:]:
        assert time.monotonic() < deadline, "session not destroyed"
        time.sleep(0.05)
    time.sleep(0.2)

    later = connect(server, user)
    later.ping()
    if queried:
        time.sleep(0.5)
        assert [m for m in later.chat_messages() if m.xml.get("id") == mid] == []
    else:
        later.wait_id(mid)
    # no MAM result was put in offline storage
    assert [m for m in later.messages() if m.xml.find("{%s}result" % NS_MAM) is not None] == []
    # and the archive has the message
    assert [b for b in later.mam_all(fields={"with": "erin@localhost"}).bodies if t in b] == ["unacked " + t]
    assert errors_from(erin, "%s@localhost" % user) == []
