"""Metrics on Prosody's own /metrics (mod_http_openmetrics; issue 4), as an admin scrapes them.

A known number of messages and queries goes through a real server, then the counters must show
exactly that many. Times and the database size are checked for presence and sanity.
"""

import re
import time
import urllib.request

import pytest

from conftest import E2E_BACKEND, ModulesServer, _free_port, backend_rows, exchange, token, wait_until

pytestmark = pytest.mark.mam_rs_only

P = "prosody_mod_mam_rs__"
HOST = {"host": "localhost"}
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')



class Scrape:
    """One GET /metrics: samples by (series name, labels), and the # TYPE of each family."""

    def __init__(self, text):
        self.text = text
        self.samples, self.types = {}, {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, family, kind = line.split(" ")
                self.types[family] = kind
            elif line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                name, _, labels = series.partition("{")
                key = (name, frozenset(LABEL_RE.findall(labels)))
                self.samples[key] = float(value)

    def get(self, name, **labels):
        return self.samples.get((P + name, frozenset(dict(HOST, **labels).items())))

    def buckets(self, name):
        """[(le, count)] of a histogram, in bound order (+Inf last)."""
        found = []
        for (series, labels), value in self.samples.items():
            labels = dict(labels)
            if series == P + name + "_bucket" and labels.get("host") == "localhost":
                found.append((float(labels["le"].replace("+Inf", "inf")), value))
        return sorted(found)


def start_metered(extra_config=()):
    """A server with mod_http_openmetrics, collecting statistics on each scrape."""
    http_port = _free_port()
    srv = ModulesServer(
        ['statistics = "internal"', 'statistics_interval = "manual"', "http_ports = { %d }" % http_port,
         'http_interfaces = { "127.0.0.1" }', 'openmetrics_allow_cidr = "127.0.0.0/8"', *extra_config],
        extra_modules=["http_openmetrics"]).start()

    def scrape():
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % http_port, timeout=5) as r:
            return Scrape(r.read().decode())

    srv.scrape = scrape
    return srv


@pytest.fixture
def metered():
    srv = start_metered()
    yield srv
    srv.stop()


def chat_state(sender, recipient):
    """A chat state alone, which is never archived; waits until the recipient has it."""
    mid = sender.send_message(recipient.bare, None, payload="<active xmlns='http://jabber.org/protocol/chatstates'/>")
    recipient.wait_id(mid)


def test_every_counter_starts_at_zero(metered, connect):
    connect(metered, "alice")
    m = metered.scrape()
    for direction in ("in", "out"):
        assert m.get("archived_total", direction=direction) == 0
    for reason in ("policy", "prefs", "limit", "empty", "too-deep", "queue-full", "unavailable", "failed"):
        assert m.get("not_archived_total", reason=reason) == 0, reason
    for outcome in ("ok", "error", "refused"):
        assert m.get("queries_total", outcome=outcome) == 0
    assert m.get("failed_writes_total") == 0
    assert m.get("write_queue") == 0
    assert m.get("query_seconds_count") is None, "no sample before the first query"
    assert m.types[P + "archived"] == "counter"
    assert m.types[P + "query_seconds"] == "histogram"
    assert m.types[P + "archive_messages"] == "gauge"


def test_messages_queries_and_writes_are_counted_exactly(metered, connect):
    alice, bob, carol = connect(metered, "alice"), connect(metered, "bob"), connect(metered, "carol")
    # bob archives nothing from carol.
    r = bob.iq("set", "<prefs xmlns='urn:xmpp:mam:2' default='always'><always/>"
                      "<never><jid>carol@localhost</jid></never></prefs>")
    assert r.type == "result", r

    for _ in range(5):
        exchange(alice, bob, "a->b " + token())  # alice out, bob in
    for _ in range(3):
        exchange(bob, alice, "b->a " + token())  # bob out, alice in
    exchange(carol, bob, "c->b " + token())  # carol out; bob's prefs say never
    for _ in range(2):
        chat_state(alice, bob)  # neither alice's copy nor bob's

    # Queries: three searches and a metadata request answered, one search refused.
    for rsm in ({"max": 2}, {"max": 10}, {"max": 1, "before": ""}):
        alice.mam_ok(rsm=rsm)
    meta = alice.iq("get", "<metadata xmlns='urn:xmpp:mam:2'/>")
    assert meta.type == "result", meta
    refused = alice.mam(rsm={"after": "no-such-id"})
    assert refused.iq.condition == "item-not-found", refused.iq

    m = metered.scrape()
    assert m.get("archived_total", direction="out") == 5 + 3 + 1
    assert m.get("archived_total", direction="in") == 5 + 3
    assert m.get("not_archived_total", reason="prefs") == 1
    assert m.get("not_archived_total", reason="policy") == 2 * 2
    for reason in ("limit", "empty", "too-deep", "queue-full", "unavailable", "failed"):
        assert m.get("not_archived_total", reason=reason) == 0, reason
    assert m.get("queries_total", outcome="ok") == 4
    assert m.get("queries_total", outcome="error") == 1
    assert m.get("queries_total", outcome="refused") == 0

    # Query durations: one sample per answer, each bucket counting what is at or below it.
    assert m.get("query_seconds_count") == 5
    assert 0 < m.get("query_seconds_sum") < 5 * 10
    query_buckets = m.buckets("query_seconds")
    assert query_buckets[-1] == (float("inf"), 5)
    assert [c for _, c in query_buckets] == sorted(c for _, c in query_buckets)

    # Every archived row was committed once, in however many transactions.
    rows = 5 + 3 + 1 + 5 + 3
    assert m.get("batch_size_sum") == rows
    commits = m.get("batch_size_count")
    assert 1 <= commits <= rows
    assert m.get("commit_seconds_count") == commits
    assert m.get("commit_seconds_sum") > 0
    assert m.buckets("batch_size")[-1] == (float("inf"), commits)
    assert m.get("failed_writes_total") == 0
    assert m.get("write_queue") == 0

    # The archive figures are read off the loop, a few seconds apart at most.
    def figures():
        s = metered.scrape()
        return s.get("archive_messages"), s.get("archive_users")

    assert wait_until(lambda: figures() == (rows, 3), timeout=20.0), figures()
    size = metered.scrape().get("database_bytes")
    if E2E_BACKEND == "sqlite":
        on_disk = sum(p.stat().st_size for p in metered.data.glob("mam_rs.sqlite*") if not p.name.endswith("-shm"))
    else:  # what the server says the messages table takes, indexes included
        on_disk = int(backend_rows(metered, {
            "postgres": "SELECT pg_total_relation_size('mam_rs_messages')",
            "mariadb": "SELECT SUM(data_length + index_length) FROM information_schema.tables "
                       "WHERE table_schema = DATABASE() AND table_name LIKE 'mam\\_rs\\_%'",
        }[E2E_BACKEND])[0][0])
    assert size and 4096 <= size and abs(size - on_disk) <= on_disk, (size, on_disk)

    # Counters only ever grow, by what happened since.
    exchange(alice, bob, "again " + token())
    again = metered.scrape()
    assert again.get("archived_total", direction="out") == 10
    assert again.get("archived_total", direction="in") == 9
    assert again.get("batch_size_sum") == rows + 2


def test_messages_refused_by_the_native_side_are_counted_by_reason(connect):
    """The shim decides policy and prefs; the native side decides the rest, for example that
    nothing is left of the stored copy once dont_archive_namespaces are stripped."""
    srv = start_metered(['dont_archive_namespaces = { "http://jabber.org/protocol/chatstates", "urn:xmpp:hints" }'])
    try:
        alice, bob = connect(srv, "alice"), connect(srv, "bob")
        exchange(alice, bob, "kept " + token())
        # Archivable by its <store/> hint, and nothing left once both namespaces are stripped:
        # neither alice's copy nor bob's.
        mid = alice.send_message(bob.bare, None, payload="<store xmlns='urn:xmpp:hints'/>"
                                                         "<active xmlns='http://jabber.org/protocol/chatstates'/>")
        bob.wait_id(mid)
        m = srv.scrape()
        assert m.get("archived_total", direction="out") == 1
        assert m.get("archived_total", direction="in") == 1
        assert m.get("not_archived_total", reason="empty") == 2
        assert m.get("not_archived_total", reason="policy") == 0
    finally:
        srv.stop()


def test_queries_refused_before_a_worker_are_counted(connect):
    """Over the rate limit, or nested too deep to copy: turned away on the loop, counted as
    `refused`, and not as answered."""
    srv = start_metered(["mam_rs_max_queries_per_second = 1"])
    try:
        alice = connect(srv, "alice")
        time.sleep(1.1)  # the budget is full
        ids = ["burst-%d" % i for i in range(5)]
        futs = [alice.iq_async("set", "<query xmlns='urn:xmpp:mam:2' queryid='%s'/>" % i, iq_id=i) for i in ids]
        replies = [f.result(15) for f in futs]
        limited = [r for r in replies if r.type == "error"]
        assert limited and all(r.condition == "resource-constraint" for r in limited), replies
        time.sleep(1.1)
        deep = "<a xmlns='urn:x:deep'>" + "<a>" * 4999 + "</a>" * 5000
        r = alice.iq("set", "<query xmlns='urn:xmpp:mam:2'>%s</query>" % deep)
        assert (r.type, r.condition) == ("error", "bad-request"), r
        m = srv.scrape()
        assert m.get("queries_total", outcome="refused") == len(limited) + 1
        assert m.get("queries_total", outcome="ok") == len(replies) - len(limited)
        assert m.get("queries_total", outcome="error") == 0
        assert m.get("query_seconds_count") == len(replies) - len(limited)
    finally:
        srv.stop()
