"""Server lifecycle: restart, module reload, SIGHUP and several VirtualHosts lose nothing and mix nothing.

The rule checked throughout: a stanza-id a client was shown must be in the archive afterwards,
with the same id, and queries keep working. Every test starts its own server(s).
"""

import signal
import threading
import time

import pytest

from conftest import (
    prosodyctl,
    MAM_MODULE, NS_CLIENT, Client, ProsodyServer, restart_server, stanza_ids,
    stop_server_keep_data, xml_escape,
)

SECOND = "second.localhost"


class ShellServer(ProsodyServer):
    """A ProsodyServer with mod_admin_shell (and its unix socket) loaded, for `prosodyctl shell`."""

    def _write_config(self):
        super()._write_config()
        text = self.cfg.read_text()
        old = '"%s" }' % self.module
        assert old in text, "modules_enabled line not found in %s" % self.cfg
        self.cfg.write_text(text.replace(old, '"%s", "admin_shell" }' % self.module, 1))


@pytest.fixture
def servers():
    started = []

    def factory(cls=ProsodyServer, extra_config=(), **kw):
        srv = cls(extra_config, **kw).start()
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()


@pytest.fixture
def clients(loop_thread):
    made = []

    def factory(server, user, host="localhost", resource=None):
        c = Client(loop_thread, server, user, resource, host=host).connect()
        made.append(c)
        return c

    yield factory
    for c in made:
        c.disconnect()


def burst(sender, to, bodies):
    """Sends all bodies as one write; returns their message ids in order."""
    stamp = time.monotonic_ns()
    ids = ["m-%s-%d-%d" % (sender.user, stamp, i) for i in range(len(bodies))]
    sender.send_raw("".join(
        "<message to='%s' id='%s' type='chat'><body>%s</body></message>" % (to, mid, xml_escape(b))
        for mid, b in zip(ids, bodies)))
    return ids


def body_of(xml):
    return xml.findtext("{%s}body" % NS_CLIENT)


def sid_for(xml, owner_bare):
    ours = [i for by, i in stanza_ids(xml) if by == owner_bare]
    assert len(ours) <= 1, "more than one stanza-id by %s: %r" % (owner_bare, stanza_ids(xml))
    return ours[0] if ours else None


def delivered(client, prefix):
    """[(body, stanza-id by client or None)] of the live chat messages whose body starts with prefix."""
    out = []
    for m in client.chat_messages():
        b = body_of(m.xml)
        if b is not None and b.startswith(prefix):
            out.append((b, sid_for(m.xml, client.bare)))
    return out


def wait_delivered(client, prefix, n, timeout=60.0, poll=0.002):
    deadline = time.monotonic() + timeout
    while True:
        got = delivered(client, prefix)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(poll)


def archive_of(client, **kw):
    """[(body, id)] of client's whole archive (optionally filtered), oldest first."""
    r = client.mam_all(**kw)
    return list(zip(r.bodies, r.ids))


def error_lines(srv, since=0):
    """Error-level log lines (any source: a traceback in a c2s session counts) after byte offset `since`."""
    text = srv.log.read_bytes()[since:].decode(errors="replace")
    return [ln for ln in text.splitlines() if "\terror\t" in ln]


# --------------------------------------------------------------------------
# Restart


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_loses_nothing(servers, clients, sig):
    n = 200
    srv = servers()
    alice = clients(srv, "alice")
    bob = clients(srv, "bob")
    bodies = ["restart %03d" % i for i in range(n)]
    burst(alice, "bob@localhost", bodies)
    seen = wait_delivered(bob, "restart ", n)
    # As soon as the last one is in: stop the server, before anything else can happen.
    rc = stop_server_keep_data(srv, sig)
    assert len(seen) == n, "bob received %d of %d messages before the stop" % (len(seen), n)
    assert [b for b, _ in seen] == bodies
    assert all(s for _, s in seen), "messages delivered without a stanza-id: %r" % [b for b, s in seen if not s]
    if sig == signal.SIGTERM:
        assert rc == 0, "prosody exited with %r on SIGTERM (crash on shutdown?)" % rc
    alice.disconnect()
    bob.disconnect()

    restart_server(srv)
    alice = clients(srv, "alice")
    bob = clients(srv, "bob")
    arch_b = archive_of(bob, fields={"with": "alice@localhost"})
    assert arch_b == seen, "bob's archive after restart differs from what he was shown"
    r = bob.mam_ok(rsm={"max": 0})
    assert r.count == n
    arch_a = archive_of(alice, fields={"with": "bob@localhost"})
    assert [b for b, _ in arch_a] == bodies, "alice's (sender) archive lost messages"

    # New messages after the restart come after the old ones (ids keep increasing).
    alice.send_message("bob@localhost", "after restart")
    sid = sid_for(bob.wait_body("after restart"), "bob@localhost")
    assert sid
    r = bob.mam_ok(rsm={"max": 2, "before": ""})
    assert r.bodies == ["restart %03d" % (n - 1), "after restart"]
    assert r.ids[-1] == sid
    if MAM_MODULE == "mam_rs":
        # 13-char fixed-width base32: string order is id order.
        assert sid > max(s for _, s in seen)


# --------------------------------------------------------------------------
# Module reload via the admin shell, while traffic flows


class Sender(threading.Thread):
    """Sends one message every `interval` seconds until stopped."""

    def __init__(self, client, to, prefix, interval=0.002):
        super().__init__(daemon=True)
        self.client, self.to, self.prefix, self.interval = client, to, prefix, interval
        self.sent = []
        self.stopped = threading.Event()
        self.error = None

    def run(self):
        try:
            i = 0
            while not self.stopped.is_set():
                body = "%s%05d" % (self.prefix, i)
                self.client.send_message(self.to, body)
                self.sent.append(body)
                i += 1
                time.sleep(self.interval)
        except Exception as e:  # reported by the test
            self.error = e

    def stop(self):
        self.stopped.set()
        self.join(10)
        assert self.error is None, "sender failed: %r" % (self.error,)
        return self.sent


class Querier(threading.Thread):
    """Runs MAM queries back to back until stopped; keeps every reply."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.client = client
        self.replies = []
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            self.replies.append(self.client.mam(rsm={"max": 10, "before": ""}, timeout=20))

    def stop(self):
        self.stopped.set()
        self.join(30)
        return self.replies


def check_traffic_archived(rcpt, sent, prefix, sender_bare):
    """Everything sent was delivered; everything delivered with a stanza-id is archived under it."""
    seen = wait_delivered(rcpt, prefix, len(sent), timeout=20)
    if [b for b, _ in seen] != sent:
        lost = sorted(set(sent) - {b for b, _ in seen})
        raise AssertionError("%s received %d of %d messages; never delivered: %r"
                             % (rcpt.bare, len(seen), len(sent), lost[:10]))
    stamped = [(b, s) for b, s in seen if s]
    assert len({s for _, s in stamped}) == len(stamped), "a stanza-id was handed out twice"
    archived = archive_of(rcpt, fields={"with": sender_bare})
    archived = [(b, i) for b, i in archived if b.startswith(prefix)]
    assert len({b for b, _ in archived}) == len(archived), "a message was archived twice"
    by_body = dict(archived)
    missing = [(b, s) for b, s in stamped if by_body.get(b) != s]
    assert not missing, ("%d of %d stamped messages are missing from the archive or have another id, "
                         "first: %r" % (len(missing), len(stamped), missing[:5]))
    # Archive order is delivery order.
    order = {b: k for k, (b, _) in enumerate(seen)}
    assert [b for b, _ in archived] == sorted((b for b, _ in archived), key=order.get)
    return seen, archived


RELOADS = 4


def test_module_reload_loses_nothing(servers, clients):
    """Reload the module several times while two senders keep sending and carol keeps querying.

    Nothing may be lost: every message is delivered (unstamped at worst, while the module is
    out), and every stamped message is in the archive under the id the recipient saw."""
    srv = servers(ShellServer)
    pairs = [(clients(srv, "alice"), clients(srv, "bob")), (clients(srv, "erin"), clients(srv, "frank"))]
    carol = clients(srv, "carol")
    burst(carol, "dave@localhost", ["carol %d" % i for i in range(5)])
    carol.ping()
    log_offset = srv.log.stat().st_size

    senders = [Sender(a, b.bare, "reload-%s " % a.user) for a, b in pairs]
    querier = Querier(carol)
    for t in senders + [querier]:
        t.start()
    try:
        for _ in range(RELOADS):
            time.sleep(0.4)
            r = prosodyctl(srv, "shell", "module:reload('%s', 'localhost')" % MAM_MODULE)
            assert r.returncode == 0 and "OK: Module reloaded" in r.stdout, (r.stdout, r.stderr)
        time.sleep(0.4)
    finally:
        sent = [t.stop() for t in senders]
        replies = querier.stop()

    for (a, b), msgs in zip(pairs, sent):
        seen, archived = check_traffic_archived(b, msgs, "reload-%s " % a.user, a.bare)
        # The module works after the reloads: the tail of the traffic was stamped and archived.
        assert seen[-1][1], "the last message (sent after the reloads) has no stanza-id"
        assert len(archived) > len(msgs) // 2, "only %d of %d messages archived" % (len(archived), len(msgs))
    # Queries in flight around the reload were answered (a result, or an error while unloaded).
    assert replies and all(q.iq.xml is not None for q in replies), "a query got no reply across the reload"
    assert replies[-1].iq.type == "result"
    # ...and queries work afterwards.
    r = carol.mam_ok(fields={"with": "dave@localhost"})
    assert r.bodies == ["carol %d" % i for i in range(5)] and r.complete
    assert srv.proc.poll() is None
    assert not error_lines(srv, log_offset), error_lines(srv, log_offset)


@pytest.mark.mam_rs_only
def test_query_in_flight_across_reload_is_answered(servers, clients):
    """A query still on a worker thread when the module is unloaded gets its answer."""
    srv = servers(ShellServer, ["mam_rs_test_query_delay = 1"])
    alice = clients(srv, "alice")
    bob = clients(srv, "bob")
    burst(alice, "bob@localhost", ["inflight %d" % i for i in range(3)])
    wait_delivered(bob, "inflight ", 3)
    qid, fut = alice.mam_async(fields={"with": "bob@localhost"})
    time.sleep(0.3)
    r = prosodyctl(srv, "shell", "module:reload('mam_rs', 'localhost')")
    assert r.returncode == 0 and "OK: Module reloaded" in r.stdout, (r.stdout, r.stderr)
    res = alice.mam_collect(qid, fut.result(15))
    assert res.iq.type == "result", res.iq
    assert res.bodies == ["inflight %d" % i for i in range(3)]
    # And the reloaded module archives and answers.
    alice.send_message("bob@localhost", "after reload")
    assert sid_for(bob.wait_body("after reload"), "bob@localhost")
    assert bob.mam_ok(fields={"with": "alice@localhost"}, rsm={"max": 1, "before": ""}).bodies == ["after reload"]


# --------------------------------------------------------------------------
# prosodyctl reload (SIGHUP)


def test_sighup_reload_loses_nothing(servers, clients):
    srv = servers()
    alice = clients(srv, "alice")
    bob = clients(srv, "bob")
    log_offset = srv.log.stat().st_size
    sender = Sender(alice, "bob@localhost", "hup ")
    sender.start()
    try:
        time.sleep(0.5)
        for _ in range(2):
            r = prosodyctl(srv, "reload")
            assert r.returncode == 0, (r.stdout, r.stderr)
            time.sleep(0.5)
    finally:
        sent = sender.stop()
    assert "Received SIGHUP" in srv.log.read_bytes()[log_offset:].decode(errors="replace")
    assert srv.proc.poll() is None
    seen, archived = check_traffic_archived(bob, sent, "hup ", "alice@localhost")
    # A config reload does not touch the module: every message was stamped and archived.
    assert all(s for _, s in seen), "messages without a stanza-id: %r" % [b for b, s in seen if not s][:5]
    assert len(archived) == len(sent)
    assert alice.mam_ok(rsm={"max": 0}).count == len(sent)
    assert not error_lines(srv, log_offset), error_lines(srv, log_offset)


# --------------------------------------------------------------------------
# Two VirtualHosts, one database


def test_two_hosts_are_isolated(servers, clients):
    srv = servers(hosts=("localhost", SECOND))
    a1 = clients(srv, "alice")
    b1 = clients(srv, "bob")
    a2 = clients(srv, "alice", host=SECOND)
    b2 = clients(srv, "bob", host=SECOND)
    one = ["one %d" % i for i in range(3)]
    two = ["two %d" % i for i in range(4)]
    burst(a1, "bob@localhost", one)
    burst(a2, "bob@%s" % SECOND, two)
    wait_delivered(b1, "one ", 3)
    wait_delivered(b2, "two ", 4)
    # Same username, other host: one message from alice@localhost to alice@second.localhost.
    a1.send_message("alice@%s" % SECOND, "cross")
    cross_sid = sid_for(a2.wait_body("cross"), "alice@%s" % SECOND)
    assert cross_sid

    def bodies(c, **kw):
        return [b for b, _ in archive_of(c, **kw)]

    assert bodies(a1) == one + ["cross"]
    assert bodies(a2) == two + ["cross"]
    assert bodies(b1) == one
    assert bodies(b2) == two
    assert bodies(a1, fields={"with": "bob@%s" % SECOND}) == []
    assert bodies(a2, fields={"with": "bob@localhost"}) == []
    assert bodies(a2, fields={"with": "alice@localhost"}) == ["cross"]
    assert a1.mam_ok(rsm={"max": 0}).count == 4
    assert b2.mam_ok(rsm={"max": 0}).count == 4
    assert archive_of(a2)[-1][1] == cross_sid

    # An id from the other host's archive is unknown here.
    foreign = archive_of(a1)[0][1]
    for kw in ({"rsm": {"after": foreign}}, {"rsm": {"before": foreign}}, {"fields": {"after-id": foreign}}):
        r = a2.mam(**kw)
        assert r.iq.type == "error" and r.iq.condition == "item-not-found", (kw, r.iq)
        assert not r.messages
    # The 'ids' field: a foreign id yields nothing (stock: empty result).
    r = a2.mam_ok(fields={"ids": [foreign]})
    assert r.messages == []
