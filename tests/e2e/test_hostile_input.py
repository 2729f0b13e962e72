"""Hostile query input over a real connection (reference §2.3-2.8, §5).

Every bad query gets a stanza error or a correct answer; the server never crashes or stalls, and
another client's ping is answered promptly after every case (a watcher pings after each test;
the heavy cases also run a concurrent pinger). mam_rs-only tests cover the limits stock lacks:
mam_rs_max_ids_per_query, mam_rs_max_prefs_jids, mam_rs_max_queries_per_second, and the
stricter answers to a negative/fractional <max/> and a FORM_TYPE without a value.
"""

import threading
import time

import pytest

from conftest import NS_MAM, exchange, xml_escape

N_MESSAGES = 3
FT = "<field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>"
PING_LIMIT = 2.0  # seconds; a ping slower than this means the loop stalled


# --------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def env(server, connect_module):
    alice = connect_module(server, "alice")
    bob = connect_module(server, "bob")
    watcher = connect_module(server, "carol")
    for i in range(N_MESSAGES):
        exchange(alice, bob, "hostile %d" % i)
    r = alice.mam_ok()
    assert r.count == N_MESSAGES and r.complete
    return {"server": server, "alice": alice, "bob": bob, "watcher": watcher}


@pytest.fixture
def alice(env):
    return env["alice"]


@pytest.fixture(autouse=True)
def _still_alive(request):
    """After every test: the module server still runs and answers a ping promptly."""
    yield
    if "env" not in request.fixturenames:
        return
    env = request.getfixturevalue("env")
    assert_alive(env["server"], env["watcher"])


def assert_alive(server, watcher, limit=PING_LIMIT):
    assert server.proc is not None and server.proc.poll() is None, \
        "prosody exited (rc %r); log tail:\n%s" % (server.proc and server.proc.returncode, server.log_tail(3))
    r = watcher.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost", timeout=10)
    assert r.type == "result", "watcher ping not answered: %r" % (r,)
    _, rtt = watcher.ping(timeout=10)
    assert rtt < limit, "ping took %.2fs" % rtt


class Pinger:
    """Pings from `client` every `interval` seconds in a thread while the block runs."""

    def __init__(self, client, interval=0.05):
        self.client = client
        self.interval = interval
        self.rtts = []
        self.failures = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            r = self.client.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost", timeout=10)
            if r.type != "result":
                self.failures.append(r)
                return
            self.rtts.append(time.monotonic() - t0)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)

    def check(self, limit=PING_LIMIT):
        assert not self.failures, "concurrent ping failed: %r" % (self.failures,)
        assert self.rtts, "no concurrent ping completed"
        assert max(self.rtts) < limit, "concurrent ping took %.2fs" % max(self.rtts)


def answered(r):
    """The query got a reply: a result with <fin/> or an error with a defined condition."""
    assert r.iq.xml is not None, "no reply"
    if r.iq.type == "result":
        assert r.fin is not None, "result without <fin/>"
    else:
        assert r.iq.type == "error" and r.iq.error_type and r.iq.condition, r.iq
        assert r.messages == []
    return r


def assert_error(r, etype, condition, text=None):
    assert r.iq.xml is not None, "no reply"
    assert r.iq.type == "error", "expected an error, got %r" % (r.iq,)
    assert (r.iq.error_type, r.iq.condition) == (etype, condition), r.iq
    if text is not None:
        assert r.iq.text == text
    assert r.messages == []


def assert_full(r):
    """A normal answer: alice's whole (small) archive in one page."""
    assert r.iq.type == "result", r.iq
    assert r.complete and r.count == N_MESSAGES and len(r.messages) == N_MESSAGES, (r.count, len(r.messages))


def assert_empty(r):
    assert r.iq.type == "result", r.iq
    assert r.messages == [] and r.count in (None, 0)


def form(*fields, ft=FT):
    return "<x xmlns='jabber:x:data' type='submit'>%s%s</x>" % (ft, "".join(fields))


def connected(client):
    return client.lt.call(lambda: client.x is not None and client.x.transport is not None)


# --------------------------------------------------------------------------
# dates


@pytest.mark.parametrize("value,as_start,as_end", [
    ("0000-01-01T00:00:00Z", "full", "empty"),               # year 0 (Prosody normalises like mktime)
    ("0000-00-00T00:00:00Z", "full", "empty"),               # month and day 0
    ("2020-13-01T00:00:00Z", "full", "empty"),               # month 13 = January next year
    ("2020-01-32T25:61:61Z", "full", "empty"),
    ("9999-99-99T99:99:99Z", "empty", "full"),
    ("2020-01-01T00:00:00." + "9" * 5000 + "Z", "full", "empty"),  # huge fraction
    ("2020-01-01T00:00:00+99:99", "full", "empty"),
    ("2020-01-01T00:00:00-00:0000000", "full", "empty"),
    ("99999-01-01T00:00:00Z", "invalid", "invalid"),        # year 99999
    ("-2020-01-01T00:00:00Z", "invalid", "invalid"),
    ("2020-01-01T00:00:00+garbage", "invalid", "invalid"),  # timezone garbage
    ("2020-01-01T00:00:00garbage", "invalid", "invalid"),
    ("2020-01-01T00:00:00-0", "invalid", "invalid"),
    ("2020-01-01T00:00:00\u202e", "invalid", "invalid"),
    ("\uff12\uff10\uff12\uff10-01-01T00:00:00Z", "invalid", "invalid"),  # non-ASCII digits
    ("2020-01-01 00:00:00Z", "invalid", "invalid"),
    ("x" * 100000, "invalid", "invalid"),
], ids=lambda v: v[:30] if isinstance(v, str) else v)
def test_dates(alice, value, as_start, as_end):
    for var, want in (("start", as_start), ("end", as_end)):
        r = alice.mam(fields={var: value}, timeout=15)
        if want == "invalid":
            assert_error(r, "modify", "bad-request", "invalid timestamp")
        elif want == "full":
            assert_full(r)
        else:
            assert_empty(r)


def test_start_after_end(alice):
    assert_empty(alice.mam(fields={"start": "2030-01-01T00:00:00Z", "end": "2000-01-01T00:00:00Z"}))


# --------------------------------------------------------------------------
# RSM <max/>


@pytest.mark.parametrize("value", ["1" + "0" * 30, "1e400", "abc", "", "nan", "inf", " 3 ", "0x10", "1e3", "-0"])
def test_max_values_that_are_answered(alice, value):
    r = alice.mam(rsm={"max": value})
    if value == "-0":
        assert r.iq.type == "result" and r.complete and r.count == N_MESSAGES and r.messages == []
    else:
        assert_full(r)  # huge values are clamped; non-numeric ones mean "no max"


@pytest.mark.parametrize("value", ["-1", "-5", "-1" + "0" * 30, "2.5", "-1e400"])
def test_max_negative_or_fractional_is_answered(alice, value):
    # Stock: -1 behaves like 0, <= -2 gives an empty page, 2.5 an internal-server-error.
    r = answered(alice.mam(rsm={"max": value}))
    assert len(r.messages) <= N_MESSAGES


@pytest.mark.mam_rs_only
@pytest.mark.parametrize("value", ["-1", "-5", "-1" + "0" * 30, "2.5", "-1e400"])
def test_max_negative_or_fractional_is_bad_request(alice, value):
    assert_error(alice.mam(rsm={"max": value}), "modify", "bad-request")


# --------------------------------------------------------------------------
# the form

UNEXPECTED = "Unexpected FORM_TYPE, expected 'urn:xmpp:mam:2'"


@pytest.mark.parametrize("raw", [
    form(ft="<field var='FORM_TYPE' type='hidden'><value></value></field>"),
    form(ft="<field var='FORM_TYPE' type='hidden'><value> urn:xmpp:mam:2 </value></field>"),
    form("<field var='with'><value>bob@localhost</value></field>", ft=""),
    form(ft=""),
], ids=["empty_value", "padded_value", "missing_with_fields", "missing_empty_form"])
def test_bad_form_type(alice, raw):
    assert_error(alice.mam(raw_form=raw), "modify", "bad-request", UNEXPECTED)


@pytest.mark.mam_rs_only
def test_form_type_without_value(alice):
    r = alice.mam(raw_form=form(ft="<field var='FORM_TYPE' type='hidden'/>"), timeout=10)
    assert_error(r, "modify", "bad-request")


@pytest.mark.parametrize("raw", [
    form("<field var='x-unknown'><value>1</value></field>", "<field var='with '><value>@@</value></field>"),
    form("<field><value>no var</value></field>", "<field var=''><value/></field>"),
    form("<field var='x'>" + "<value>v</value>" * 2000 + "</field>"),
    form("<field var='before-id' type='bogus'/>"),
], ids=["unknown", "no_var", "many_values", "empty_field"])
def test_unknown_and_odd_fields_are_ignored(alice, raw):
    assert_full(alice.mam(raw_form=raw))


# --------------------------------------------------------------------------
# ids

@pytest.mark.mam_rs_only
def test_ten_thousand_ids_is_bad_request(env, alice):
    ids = ["%d" % i for i in range(10000)]  # short values: the stanza stays under 256 KiB
    with Pinger(env["watcher"]) as p:
        r = alice.mam(fields={"ids": ids}, timeout=30)
    p.check()
    assert_error(r, "modify", "bad-request")
    assert "1000" in r.iq.text and "mam_rs_max_ids_per_query" in r.iq.text, r.iq.text


@pytest.mark.mam_rs_only
def test_thousand_ids_is_accepted(alice):
    own = alice.mam_ok().ids
    r = alice.mam_ok(fields={"ids": own + ["%d" % i for i in range(1000 - len(own))]}, timeout=30)
    assert r.ids == own


def test_ten_thousand_ids_is_answered(env, alice):
    with Pinger(env["watcher"]) as p:
        r = answered(alice.mam(fields={"ids": ["%d" % i for i in range(10000)]}, timeout=30))
    p.check()
    assert r.messages == []


@pytest.mark.mam_rs_only
def test_configured_limits(make_server, connect):
    srv = make_server(["mam_rs_max_ids_per_query = 3", "mam_rs_max_prefs_jids = 2"])
    a = connect(srv, "alice")
    b = connect(srv, "bob")
    exchange(a, b, "limits")
    own = a.mam_ok().ids
    assert a.mam_ok(fields={"ids": own + ["x", "y"]}).ids == own
    r = a.mam(fields={"ids": own + ["x", "y", "z"]})
    assert_error(r, "modify", "bad-request")
    assert "3" in r.iq.text and "mam_rs_max_ids_per_query" in r.iq.text, r.iq.text
    ok = a.iq("set", prefs_xml(["p1@localhost", "p2@localhost"]))
    assert ok.type == "result", ok
    r = a.iq("set", prefs_xml(["p1@localhost", "p2@localhost", "p3@localhost"]))
    assert (r.type, r.error_type, r.condition) == ("error", "modify", "not-acceptable"), r
    assert "2" in r.text and "mam_rs_max_prefs_jids" in r.text, r.text


# --------------------------------------------------------------------------
# with


@pytest.mark.parametrize("value", [
    "a@b@c", "@localhost", "bob@localhost/", "", "x" * 1100 + "@localhost", "bob@" + "x" * 1100,
    "\u202ebob@localhost", "bob@localhost/" + "r" * 1100,
], ids=["two_at", "no_local", "empty_resource", "empty", "long_local", "long_domain", "bidi", "long_resource"])
def test_invalid_with(alice, value):
    assert_error(alice.mam(fields={"with": value}), "modify", "bad-request", "Invalid JID: " + value)


@pytest.mark.parametrize("value", ["%", "*", "bob@local host", "bob@%", "bob@localhost%", "_ob@localhost",
                                   "bob@localhost' OR '1'='1"])
def test_odd_with_is_error_or_empty(alice, value):
    # Stock jid.prep accepts these (empty result); mod_mam_rs rejects some as invalid JIDs.
    r = answered(alice.mam(fields={"with": value}))
    if r.iq.type == "error":
        assert (r.iq.error_type, r.iq.condition) == ("modify", "bad-request")
        assert r.iq.text == "Invalid JID: " + value
    else:
        assert_empty(r)


def test_200k_with_is_invalid_jid(env, alice):
    value = "x" * 200000 + "@localhost"  # within c2s_stanza_size_limit (256 KiB)
    with Pinger(env["watcher"]) as p:
        r = alice.mam(fields={"with": value}, timeout=30)
    p.check()
    assert_error(r, "modify", "bad-request", "Invalid JID: " + value)


def test_1mb_with_closes_only_that_stream(env, connect):
    """Over c2s_stanza_size_limit: Prosody closes the sender's stream (policy-violation) before any
    module sees the stanza. Other clients are unaffected and the sender can reconnect."""
    server, watcher = env["server"], env["watcher"]
    dave = connect(server, "dave")
    log_offset = len(server.log_text())
    with Pinger(watcher) as p:
        qid, fut = dave.mam_async(fields={"with": "x" * (1024 * 1024) + "@localhost"})
        deadline = time.monotonic() + 15
        while connected(dave) and time.monotonic() < deadline:
            time.sleep(0.05)
    p.check()
    assert not connected(dave), "the stream with a 1 MB stanza was not closed"
    assert not fut.done() or fut.result(0).type != "result"
    assert "stanza is too big" in server.log_text()[log_offset:]
    dave.x = None  # already closed
    again = connect(server, "dave")
    assert again.mam_ok().complete
    assert env["alice"].mam_ok().count == N_MESSAGES


# --------------------------------------------------------------------------
# namespaces


@pytest.mark.parametrize("ns", ["urn:xmpp:mam:1", "urn:xmpp:mam:0", "urn:xmpp:mam:2#extended", "urn:xmpp:mam:tmp"])
def test_query_in_other_namespace(alice, ns):
    r = alice.iq("set", "<query xmlns='%s' queryid='q'>%s</query>" % (ns, form()))
    assert (r.type, r.error_type, r.condition) == ("error", "cancel", "service-unavailable"), r


def test_metadata_set_is_unhandled(alice):
    r = alice.iq("set", "<metadata xmlns='urn:xmpp:mam:2'/>")
    assert (r.type, r.error_type, r.condition) == ("error", "cancel", "service-unavailable"), r


@pytest.mark.parametrize("payload", [
    "<x xmlns='urn:bogus' type='submit'><field var='FORM_TYPE'><value>bogus</value></field>"
    "<field var='with'><value>nobody@localhost</value></field></x>",
    "<x xmlns='jabber:x:dat' type='submit'><field var='with'><value>@@</value></field></x>",
    "<set xmlns='urn:bogus'><max>-5</max><after>no-such-id</after></set>",
    "<set xmlns='http://jabber.org/protocol/rsm'><max xmlns='urn:bogus'>-5</max></set>",
    "<set xmlns='http://jabber.org/protocol/rsm'/>",
], ids=["x_other_ns", "x_typo_ns", "set_other_ns", "max_other_ns", "empty_set"])
def test_children_in_other_namespaces_are_ignored(alice, payload):
    r = alice.mam(raw_form=payload)
    assert_full(r)


# --------------------------------------------------------------------------
# deep nesting (a crash-prone shape: each case gets its own server)


def nested(depth):
    return "<a xmlns='urn:x:deep'>" + "<a>" * (depth - 1) + "</a>" * depth


@pytest.mark.parametrize("where", ["query", "value", "rsm_after"])
def test_nesting_500_levels(alice, where):
    inner = nested(500)
    if where == "query":
        r = alice.mam(raw_form=inner)
        assert_full(r)
    elif where == "value":
        r = alice.mam(raw_form=form("<field var='with'><value>%s</value></field>" % inner))
        answered(r)
    else:
        r = alice.iq("set", "<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'>"
                     "<after>%s</after></set></query>" % inner)
        assert r.type in ("result", "error"), r


def reply_unless_dead(srv, fut, timeout=15.0):
    """The reply of an iq future, or None once the server process has exited (or on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fut.done():
            return fut.result()
        if srv.proc.poll() is not None:
            return None
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("depth", [5000, 20000])
@pytest.mark.parametrize("where", ["query", "prefs"])
def test_deep_nesting(make_server, connect, where, depth):
    # 20000 levels is ~140 KB, inside Prosody's 256 KiB stanza limit; stock answers normally.
    srv = make_server()
    a = connect(srv, "alice")
    w = connect(srv, "carol")
    if where == "query":
        payload = "<query xmlns='urn:xmpp:mam:2' queryid='deep'>%s</query>" % nested(depth)
    else:
        payload = "<prefs xmlns='urn:xmpp:mam:2' default='always'><always/><never/>%s</prefs>" % nested(depth)
    r = reply_unless_dead(srv, a.iq_async("set", payload))
    assert_alive(srv, w)
    assert r is not None and r.type in ("result", "error"), "no reply to a %d-level %s" % (depth, where)


@pytest.mark.parametrize("depth", [5000, 20000])
def test_deep_nesting_in_archived_message(make_server, connect, depth):
    # The recipient (erin) is offline, so no client has to parse the message back.
    srv = make_server()
    d = connect(srv, "dave")
    w = connect(srv, "carol")
    d.send_message("erin@localhost", "deep", payload=nested(depth))
    r = reply_unless_dead(srv, d.iq_async("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost"))
    assert_alive(srv, w)
    assert r is not None and r.type == "result"
    # The sender's archive still answers (the deep message's payload is not read back here).
    assert d.mam_ok(rsm={"max": 0}).count in (0, 1)


# --------------------------------------------------------------------------
# prefs


def prefs_xml(always=(), never=(), default="always"):
    return "<prefs xmlns='urn:xmpp:mam:2' default='%s'><always>%s</always><never>%s</never></prefs>" % (
        default, "".join("<jid>%s</jid>" % xml_escape(j) for j in always),
        "".join("<jid>%s</jid>" % xml_escape(j) for j in never))


def prefs_jids(client):
    r = client.iq("get", "<prefs xmlns='urn:xmpp:mam:2'/>")
    assert r.type == "result", r
    return sorted(j.text for j in r.xml.iter("{%s}jid" % NS_MAM))


@pytest.fixture
def frank(env, connect):
    return connect(env["server"], "frank")


def test_prefs_with_thousands_of_jids_is_answered(env, frank):
    jids = ["u%d@localhost" % i for i in range(5000)]
    with Pinger(env["watcher"]) as p:
        r = frank.iq("set", prefs_xml(jids[:2500], jids[2500:]), timeout=30)
    p.check()
    assert r.type in ("result", "error") and (r.type == "result" or r.condition), r
    assert frank.iq("set", prefs_xml()).type == "result"


@pytest.mark.mam_rs_only
def test_prefs_over_the_limit(frank):
    thousand = ["u%d@localhost" % i for i in range(1000)]
    assert frank.iq("set", prefs_xml(thousand[:600], thousand[600:])).type == "result"
    assert prefs_jids(frank) == sorted(thousand)
    for n in (1001, 5000):
        jids = ["v%d@localhost" % i for i in range(n)]
        r = frank.iq("set", prefs_xml(jids[: n // 2], jids[n // 2:]), timeout=30)
        assert (r.type, r.error_type, r.condition) == ("error", "modify", "not-acceptable"), r
        assert "1000" in r.text and "mam_rs_max_prefs_jids" in r.text, r.text
        assert prefs_jids(frank) == sorted(thousand), "a refused prefs set changed the stored prefs"
    assert frank.iq("set", prefs_xml()).type == "result"


# --------------------------------------------------------------------------
# RSM / id fields with SQL-looking strings

SQLISH = ["' OR '1'='1", "1' OR 1=1 --", "x'); DROP TABLE messages; --", "\" OR \"\"=\"", "%", "*", "?", "0",
          "-1", "9223372036854775807", "18446744073709551616", "0000000000000", "zzzzzzzzzzzzz"]


@pytest.mark.parametrize("where", ["rsm_after", "rsm_before", "after-id", "before-id"])
def test_sql_looking_ids_are_unknown(alice, where):
    for v in SQLISH:
        if where.startswith("rsm_"):
            r = alice.mam(rsm={where[4:]: v})
        else:
            r = alice.mam(fields={where: v})
        assert_error(r, "modify", "item-not-found")
    assert alice.mam_ok().count == N_MESSAGES


# --------------------------------------------------------------------------
# query rate limit


@pytest.mark.mam_rs_only
def test_query_rate_limit(make_server, connect):
    srv = make_server(["mam_rs_max_queries_per_second = 2"])
    a = connect(srv, "alice")
    b = connect(srv, "bob")
    exchange(a, b, "rate")
    time.sleep(1.1)  # the setup query budget is full again
    # Ten queries in one write.
    ids = ["rate-%d" % i for i in range(10)]
    futs = []
    for iq_id in ids:
        futs.append(a.iq_async("set", "<query xmlns='urn:xmpp:mam:2' queryid='%s'><set xmlns="
                               "'http://jabber.org/protocol/rsm'><max>1</max></set></query>" % iq_id,
                               iq_id=iq_id))
    replies = [f.result(15) for f in futs]
    ok = [r for r in replies if r.type == "result"]
    limited = [r for r in replies if r.type == "error"]
    assert 1 <= len(ok) <= 3, [(r.type, r.condition) for r in replies]
    assert len(ok) + len(limited) == 10
    for r in limited:
        assert (r.error_type, r.condition) == ("wait", "resource-constraint"), r
    # Per user: bob is not limited by alice's burst.
    assert b.mam_ok().complete
    # After a second the budget is back.
    time.sleep(1.1)
    assert a.mam_ok().complete
    assert a.ping()[1] < PING_LIMIT
