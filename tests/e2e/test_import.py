"""`prosodyctl mod_mam_rs import`: a stock mod_mam archive carried over into mod_mam_rs.

The archives imported here are written by stock mod_mam itself on a real Prosody 0.12
(mod_storage_sql on SQLite, on PostgreSQL and on MariaDB with the "MySQL" driver, and internal
file storage), or through Prosody's own archive storage API for the large one. Only the
deliberately malformed rows are written by hand. After the switch to mam_rs on the same data
directory and config (and a copy of the same database), clients must see what stock showed
them: the same ids (so a client resuming from a stock id goes on where it stopped), bodies,
stamps and order. The PostgreSQL and MariaDB servers are the session's own (dbservers.py).
"""

import math
import os
import re
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest

from conftest import (
    wait_until,
    NS_SID, Client, StorageServer, exchange, prosodyctl, restart_server, stamp_to_epoch,
    stop_server_keep_data, token,
)

pytestmark = [pytest.mark.mam_rs_only, pytest.mark.sqlite_only]

HOST = "localhost"
LIVE = ("alice", "bob", "carol")  # online while stock archives
ALL = LIVE + ("dave",)  # dave stays offline: his archive holds only what mod_offline also kept
# One round of conversation; 3 bursts x 3 rounds x 13 = 117 messages, plus 3 to offline dave.
ROUND = [("alice", "bob"), ("bob", "alice"), ("alice", "bob"), ("alice", "carol"), ("carol", "alice"),
         ("bob", "carol"), ("carol", "bob"), ("alice", "bob"), ("bob", "alice"), ("alice", "carol"),
         ("bob", "carol"), ("alice", "bob"), ("bob", "alice")]
BURSTS, ROUNDS_PER_BURST = 3, 3
EXTRA = ("<thread>th-{n}</thread><x xmlns='urn:example:e2e' note='a&amp;b &lt;c&gt; &quot;q&quot; ü'>"
         "<y>ü &amp; z</y></x>")

SUMMARY_RE = re.compile(r"users=(\d+) messages=(\d+) already=(\d+) skipped=(\d+)")

# Test-only Prosody module, written into the module's tmp dir: `prosodyctl mod_e2e_stock_fill
# <host> <user> <with> <n> [store]` appends n chat messages to <user>'s archive through Prosody's
# archive storage API (storagemanager), exactly as stock mod_mam's archive:append(user, nil,
# stanza, when, with) does, with one message per second ending now.
FILL_PLUGIN = r'''
local st = require "util.stanza";
function module.command(arg)
	local host, user, with, n, store = arg[1], arg[2], arg[3], tonumber(arg[4]), arg[5] or "archive";
	assert(prosody.hosts[host], "no VirtualHost " .. tostring(host));
	local sm = require "core.storagemanager";
	sm.initialize_host(host);
	local archive = assert(sm.open(host, store, "archive"));
	local me = user .. "@" .. host;
	local now = os.time();
	for i = 1, n do
		local out = i % 2 == 1;
		local msg = st.message({ from = out and me .. "/fill" or with .. "/fill", to = out and with or me,
			type = "chat", id = "fill-" .. i }):text_tag("body", "fill " .. i .. " & <ü>");
		assert(archive:append(user, nil, msg, now - n + i, with));
	end
	print("filled " .. n);
	return 0;
end
'''


@pytest.fixture(scope="module")
def fill_plugin_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e-plugins")
    (d / "mod_e2e_stock_fill.lua").write_text(FILL_PLUGIN)
    return d


def stock_fill(srv, user, with_jid, n, store="archive"):
    r = prosodyctl(srv, "mod_e2e_stock_fill", HOST, user, with_jid, str(n), store, timeout=300)
    assert r.returncode == 0 and ("filled %d" % n) in r.stdout, (r.stdout, r.stderr)


# --------------------------------------------------------------------------
# What stock showed: archive keys as stored, and the answers stock mod_mam gave its clients.


@dataclass
class Item:
    id: str
    body: str
    stamp: str
    norm: tuple  # the archived <message>, normalised


@dataclass
class StockView:
    srv: StorageServer  # stopped; clone_stock() gives a server on a copy of its data
    keys: dict  # user -> archive keys in storage order (read from the store, not from MAM)
    archives: dict = field(default_factory=dict)  # user -> [Item], stock's full answer
    with_pages: dict = field(default_factory=dict)  # (user, with) -> [(ids, count, complete)], max 7
    last_pages: dict = field(default_factory=dict)  # (user, with) -> ids of RSM <before/> max 7
    windows: dict = field(default_factory=dict)  # user -> (start, end, ids)
    received: dict = field(default_factory=dict)  # user -> {body: stanza-id by the user, live}
    resumed: dict = field(default_factory=dict)  # name -> (ids, complete): stock's answers to resume_queries
    dave_bodies: list = field(default_factory=list)
    sql: "StockSql" = None  # where stock's SQL tables are (storage "sql")

    @property
    def total(self):
        return sum(len(k) for k in self.keys.values())


def norm(el):
    return (el.tag, tuple(sorted(el.attrib.items())), el.text or "", tuple(norm(c) for c in el), el.tail or "")


def items(result):
    return [Item(i, b, s, norm(m)) for i, b, s, m in zip(result.ids, result.bodies, result.stamps, result.forwarded)]


def sql_keys(data_dir, store="archive", database="prosody.sqlite"):
    db = sqlite3.connect(str(data_dir / database))
    try:
        rows = db.execute('SELECT "user", "key" FROM prosodyarchive WHERE host=? AND store=? ORDER BY sort_id',
                          (HOST, store)).fetchall()
    finally:
        db.close()
    out = {}
    for user, key in rows:
        out.setdefault(user, []).append(key)
    return out


LIST_KEY_RE = re.compile(r'\["key"\] = "([^"]*)";')


def internal_keys(data_dir, store="archive"):
    out = {}
    d = data_dir / HOST / store
    for f in sorted(d.glob("*.list")) if d.is_dir() else []:
        out[f.stem] = LIST_KEY_RE.findall(f.read_text())
    return out


def _lit(s):
    return "'%s'" % str(s).replace("'", "''")


SQL_BACKENDS = ("sqlite", "postgres", "mariadb")


@dataclass
class StockSql:
    """Where stock's mod_storage_sql keeps its tables: "sqlite", the base config's prosody.sqlite
    in the server's data directory, or a database of its own on the session's real PostgreSQL
    or MariaDB (tests/e2e/dbservers.py), named by the config's `sql = { ... }` line."""
    backend: str
    db: object = None  # dbservers.DatabaseServer, None for sqlite
    database: str = None  # the database's name on db

    @classmethod
    def new(cls, backend, request):
        if backend == "sqlite":
            return cls(backend)
        db = request.getfixturevalue({"postgres": "postgres_server", "mariadb": "mariadb_server"}[backend])
        return cls(backend, db, db.create_database())

    def config_line(self):
        """StorageServer's sql= (None: the base config's SQLite line)."""
        return None if self.db is None else self.db.prosody_sql(self.database)

    def copy(self):
        """A copy of the database. For sqlite, clone() copies the data directory and the file in it."""
        return self if self.db is None else StockSql(self.backend, self.db, self.db.create_database(template=self.database))

    def drop(self):
        if self.db is not None:
            self.db.drop_database(self.database)

    def keys(self, srv, store="archive"):
        """user -> archive keys of `store` in storage order, read from the database itself."""
        if self.db is None:
            return sql_keys(srv.data, store)
        out = {}
        for user, key in self.db.sql('SELECT "user", "key" FROM "prosodyarchive" WHERE "host" = %s AND "store" = %s '
                                     'ORDER BY "sort_id";' % (_lit(HOST), _lit(store)), database=self.database):
            out.setdefault(user, []).append(key)
        return out

    def insert_archive_rows(self, srv, rows):
        """Raw rows (user, key, when, with, type, value) into the "archive" store, as a damaged or
        foreign writer might have left them."""
        if self.db is None:
            db = sqlite3.connect(str(srv.data / "prosody.sqlite"))
            with db:
                db.executemany('INSERT INTO prosodyarchive (host, "user", store, "key", "when", "with", type, value) '
                               "VALUES ('localhost', ?, 'archive', ?, ?, ?, ?, ?)", rows)
            db.close()
            return
        self.db.sql("\n".join(
            'INSERT INTO "prosodyarchive" ("host", "user", "store", "key", "when", "with", "type", "value") '
            "VALUES (%s, %s, 'archive', %s, %d, %s, %s, %s);" % (_lit(HOST), _lit(u), _lit(k), when, _lit(w), _lit(t), _lit(v))
            for u, k, when, w, t, v in rows), database=self.database)


def read_keys(srv, store="archive"):
    if srv.storage != "sql":
        return internal_keys(srv.data, store)
    return (getattr(srv, "stock_sql", None) or StockSql("sqlite")).keys(srv, store)


def clone_stock(view, **overrides):
    """view.srv.clone(**overrides), with a copy of stock's database when it is on a database
    server (so that no test sees another's changes). Stop it with stop_clone()."""
    sql = view.sql.copy() if view.sql else None
    if sql is not None and sql.db is not None:
        overrides["sql"] = sql.config_line()
    try:
        srv = view.srv.clone(**overrides)
    except BaseException:
        if sql is not None and sql is not view.sql:
            sql.drop()
        raise
    srv.stock_sql = sql
    return srv


def stop_clone(srv):
    srv.stop()
    sql = getattr(srv, "stock_sql", None)
    if sql is not None:
        sql.drop()


def next_second():
    """Waits until the wall clock is well into a new second (stock 0.12 stamps whole seconds
    with time(), a coarse clock that may lag a few milliseconds behind Python's)."""
    target = int(time.time()) + 1.05
    while time.time() < target:
        time.sleep(0.01)


def build_stock_view(loop_thread, storage, sql=None):
    srv = StorageServer(storage=storage, module="mam", users=ALL, sql=sql.config_line() if sql else None).start()
    srv.stock_sql = sql
    view = StockView(srv, {}, sql=sql)
    clients = {}
    try:
        clients.update((u, Client(loop_thread, srv, u, resource="stock").connect()) for u in LIVE)
        n = 0
        burst_first = []
        for burst in range(BURSTS):
            if burst:
                next_second()
            for _ in range(ROUNDS_PER_BURST):
                for sender, recipient in ROUND:
                    n += 1
                    body = "%d %s→%s & <b>x</b> > ünïcødé ☃ 日本 😀 \"q\" 'a' %s" % (n, sender, recipient, token())
                    mid = clients[sender].send_message(clients[recipient].bare, body,
                                                       payload=EXTRA.format(n=n % 3) if n % 5 == 0 else "")
                    got = clients[recipient].wait_id(mid)
                    sid = [i for by, i in _sids(got) if by == clients[recipient].bare]
                    assert len(sid) == 1, "stock gave %s no stanza-id: %r" % (recipient, got)
                    view.received.setdefault(recipient, {})[body] = sid[0]
                    if burst and len(burst_first) < burst:
                        burst_first.append(body)
        for i in range(3):
            body = "offline %d for dave & <ü> %s" % (i, token())
            clients["alice"].send_message("dave@localhost", body)
            view.dave_bodies.append(body)
        clients["alice"].ping()  # stock archives (and mod_offline stores) before answering this
        view.keys = read_keys(srv)
        assert sorted(view.keys) == sorted(ALL), "stock archives: %r" % sorted(view.keys)
        for u, c in clients.items():
            r = c.mam_all()
            view.archives[u] = items(r)
            assert [i.id for i in view.archives[u]] == view.keys[u], "stock MAM disagrees with its own store"
        for u, w in (("alice", "bob"), ("bob", "carol"), ("carol", "alice")):
            fields = {"with": w + "@" + HOST}
            pages, after = [], None
            while True:
                rsm = {"max": 7}
                if after:
                    rsm["after"] = after
                r = clients[u].mam_ok(fields=fields, rsm=rsm)
                pages.append((r.ids, r.count, r.complete))
                if r.complete or not r.ids:
                    break
                after = r.last
            view.with_pages[(u, w)] = pages
            view.last_pages[(u, w)] = clients[u].mam_ok(fields=fields, rsm={"max": 7, "before": ""}).ids
        # A time window: the middle burst (bursts start on a new second), in whole seconds, as
        # stock's SQL store compares them (Prosody 13 floors both ends, and its stamps have
        # microseconds; 0.12's are whole seconds): from the second of its first message to the
        # last whole second before the next burst's first.
        stamp_of = {i.body: i.stamp for i in view.archives["alice"]}
        whole = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
        start = whole(math.floor(stamp_to_epoch(stamp_of[burst_first[0]])))
        end = whole(math.ceil(stamp_to_epoch(stamp_of[burst_first[1]])) - 1)
        for u in LIVE:
            r = clients[u].mam_ok(fields={"start": start, "end": end}, rsm={"max": 50})
            assert 0 < len(r.ids) < len(view.archives[u]), \
                "window query start=%s end=%s should select part of %s's archive; its stamps: %r" % (
                    start, end, u, sorted(set(i.stamp for i in view.archives[u])))
            view.windows[u] = (start, end, r.ids)
        for name, kw in resume_queries(view):
            r = clients["alice"].mam_ok(**kw)
            view.resumed[name] = (r.ids, r.complete)
        # mod_offline kept dave's messages in its own archive store: an importer must leave those.
        offline = read_keys(srv, "offline")
        assert len(offline.get("dave", [])) == 3, "mod_offline should hold dave's 3 messages: %r" % offline
    except BaseException:
        # Not left running (and connected to its database); its log stays for the report.
        stop_server_keep_data(srv)
        raise
    finally:
        for c in clients.values():
            c.disconnect()
    stop_server_keep_data(srv)
    return view


def with_ids(view, user, contact):
    return [i for p in view.with_pages[(user, contact)] for i in p[0]]


def resume_queries(view):
    """(name, mam kwargs) of queries a client resuming from stock ids would send, as alice."""
    w = with_ids(view, "alice", "bob")
    full = [i.id for i in view.archives["alice"]]
    wb = {"with": "bob@localhost"}
    out = []
    for k in (0, 9, len(w) - 6):
        out += [
            ("RSM after #%d" % k, dict(fields=wb, rsm={"max": 5, "after": w[k]})),
            ("after-id #%d" % k, dict(fields=dict(wb, **{"after-id": w[k]}), rsm={"max": 5})),
            ("RSM before #%d" % k, dict(fields=wb, rsm={"max": 5, "before": w[k]})),
            ("before-id #%d" % k, dict(fields=dict(wb, **{"before-id": w[k]}), rsm={"max": 5})),
            ("before-id #%d, RSM <before/>" % k, dict(fields=dict(wb, **{"before-id": w[k]}),
                                                       rsm={"max": 5, "before": ""})),
        ]
    out += [
        ("RSM after the newest", dict(fields=wb, rsm={"max": 5, "after": w[-1]})),
        ("ids", dict(fields={"ids": [w[3], w[17], w[-1]]})),
        ("RSM after, no with", dict(rsm={"max": 10, "after": full[40]})),
    ]
    return out


def _sids(msg):
    return [(s.get("by"), s.get("id")) for s in msg.findall("{%s}stanza-id" % NS_SID)]


@pytest.fixture(scope="module", params=SQL_BACKENDS)
def stock_sql(request, loop_thread):
    """Stock mod_mam's archive on mod_storage_sql: SQLite, PostgreSQL, or MariaDB ("MySQL")."""
    sql = StockSql.new(request.param, request)
    try:
        view = build_stock_view(loop_thread, "sql", sql)
        yield view
        view.srv.stop()
    finally:
        sql.drop()


@pytest.fixture(scope="module")
def stock_internal(loop_thread):
    view = build_stock_view(loop_thread, "internal")
    yield view
    view.srv.stop()


# --------------------------------------------------------------------------
# Helpers


@dataclass
class ImportRun:
    proc: subprocess.CompletedProcess
    users: int
    messages: int
    already: int
    skipped: int
    skipped_lines: list

    @property
    def out(self):
        return self.proc.stdout + self.proc.stderr


def parse_import(proc):
    out = proc.stdout
    lines = re.split(r"[\r\n]", out)
    summary = [ln for ln in lines if ln.startswith("import summary:")]
    assert len(summary) == 1, "want one 'import summary:' line, got:\n%s\n--- stderr ---\n%s" % (out, proc.stderr)
    m = SUMMARY_RE.search(summary[0])
    assert m, "summary line lacks users=.. messages=.. already=.. skipped=..: %r" % summary[0]
    skipped_lines = [ln for ln in lines if ln.startswith("  skipped ")]
    return ImportRun(proc, *(int(g) for g in m.groups()), skipped_lines)


def run_import(srv, *args, expect_rc=0, timeout=300):
    proc = prosodyctl(srv, "mod_mam_rs", "import", *args, timeout=timeout)
    assert proc.returncode == expect_rc, "import %s: exit %d\n%s\n--- stderr ---\n%s" % (
        " ".join(args), proc.returncode, proc.stdout, proc.stderr)
    return parse_import(proc)


def first_difference(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return "first difference at %d: got %r, want %r" % (i, g, w)
    return "lengths differ: got %d, want %d" % (len(got), len(want))


def assert_same_archive(client, want, what):
    got = items(client.mam_all())
    ids, want_ids = [i.id for i in got], [i.id for i in want]
    assert ids == want_ids, "%s: ids/order differ from stock; %s" % (what, first_difference(ids, want_ids))
    bodies, want_bodies = [i.body for i in got], [i.body for i in want]
    assert bodies == want_bodies, "%s: bodies differ; %s" % (what, first_difference(bodies, want_bodies))
    # The same instant, to the microsecond (0.12's stock stamps are whole seconds, 13's have
    # microseconds; ours always show six digits).
    secs = [stamp_to_epoch(i.stamp) for i in got]
    want_secs = [stamp_to_epoch(i.stamp) for i in want]
    assert secs == want_secs, "%s: stamps differ; %s" % (
        what, first_difference([i.stamp for i in got], [i.stamp for i in want]))
    norms, want_norms = [i.norm for i in got], [i.norm for i in want]
    assert norms == want_norms, "%s: archived stanzas differ; %s" % (what, first_difference(norms, want_norms))


def assert_same_views(view, clients):
    for u in LIVE:
        assert_same_archive(clients[u], view.archives[u], "%s's archive" % u)
    for (u, w), pages in view.with_pages.items():
        fields = {"with": w + "@" + HOST}
        # Prosody 13's internal store gives no <count> (0.12's did, as we do): then ours must
        # be the number of messages the pages held.
        total = sum(len(ids) for ids, _, _ in pages)
        after = None
        for n, (ids, count, complete) in enumerate(pages):
            rsm = {"max": 7}
            if after:
                rsm["after"] = after
            if count is None:
                count = total
            r = clients[u].mam_ok(fields=fields, rsm=rsm)
            assert (r.ids, r.count, r.complete) == (ids, count, complete), \
                "%s with %s, page %d: got %r, stock gave %r" % (u, w, n, (r.ids, r.count, r.complete),
                                                               (ids, count, complete))
            after = r.last
        got = clients[u].mam_ok(fields=fields, rsm={"max": 7, "before": ""}).ids
        assert got == view.last_pages[(u, w)], "%s with %s: last page" % (u, w)
    for u, (start, end, ids) in view.windows.items():
        got = clients[u].mam_ok(fields={"start": start, "end": end}, rsm={"max": 50}).ids
        assert got == ids, "%s: start=%s end=%s; %s" % (u, start, end, first_difference(got, ids))
    # Every stanza-id a client was shown live by stock names the same message now.
    for u in LIVE:
        by_body = {i.body: i.id for i in items(clients[u].mam_all())}
        for body, sid in view.received[u].items():
            assert by_body.get(body) == sid, "%s was shown stanza-id %s for %r; the archive has %r" % (
                u, sid, body, by_body.get(body))


def assert_dave_imported(view, dave):
    """dave's archive is his archive store, not also mod_offline's copies (another store)."""
    r = dave.mam_all()
    assert r.ids == view.keys["dave"], "dave: got %r, want the archive store's keys %r" % (r.ids, view.keys["dave"])
    assert r.bodies == view.dave_bodies



# --------------------------------------------------------------------------
# Import from stock SQL (SQLite), beside a running mod_mam_rs


@pytest.fixture(scope="module")
def imported_sql(stock_sql, loop_thread):
    """mam_rs running on a copy of the stock SQL data dir (and database); `import` run while it runs."""
    srv = clone_stock(stock_sql, module="mam_rs")
    clients = {}
    try:
        run = run_import(srv)
        clients.update((u, Client(loop_thread, srv, u).connect()) for u in LIVE)
        yield srv, run, clients
    finally:
        for c in clients.values():
            c.disconnect()
        stop_clone(srv)


def test_sql_import_summary_counts_every_stock_message(stock_sql, imported_sql):
    srv, run, _ = imported_sql
    assert (run.users, run.messages, run.already, run.skipped) == (len(ALL), stock_sql.total, 0, 0), run.out
    assert run.skipped_lines == [], run.out
    sql = srv.stock_sql
    source = ("%s database %s" % (sql.db.driver, sql.database) if sql.db
              else "SQLite3 database %s" % (srv.data / "prosody.sqlite"))
    assert " from %s into " % source in run.out, "the import should name the database it read, %s:\n%s" % (
        source, run.out)


def test_sql_import_answers_as_stock_did(stock_sql, imported_sql, connect):
    srv, _, clients = imported_sql
    assert_same_views(stock_sql, clients)
    assert_dave_imported(stock_sql, connect(srv, "dave"))


def test_sql_import_resume_from_a_stock_id(stock_sql, imported_sql):
    """A client that last saw a stock id goes on from exactly there (RSM and extended fields)."""
    _, _, clients = imported_sql
    check_resume(stock_sql, clients["alice"])


def check_resume(view, alice):
    w = with_ids(view, "alice", "bob")
    for k in (0, 9, len(w) - 6):  # exactly the next / previous messages
        assert view.resumed["RSM after #%d" % k][0] == w[k + 1:k + 6]
        assert view.resumed["after-id #%d" % k][0] == w[k + 1:k + 6]
        assert view.resumed["RSM before #%d" % k][0] == w[max(0, k - 5):k]
    assert view.resumed["RSM after the newest"] == ([], True)
    for name, kw in resume_queries(view):
        r = alice.mam_ok(**kw)
        assert (r.ids, r.complete) == view.resumed[name], "%s: got %r, stock gave %r" % (
            name, (r.ids, r.complete), view.resumed[name])


def test_sql_import_second_run_imports_nothing_new(stock_sql, imported_sql):
    srv, _, clients = imported_sql
    again = run_import(srv)
    assert again.messages == 0, again.out
    assert_same_archive(clients["alice"], stock_sql.archives["alice"], "alice after a second import")
    assert again.already == stock_sql.total, "already= should count the messages found already imported:\n" \
        + again.out


@pytest.mark.parametrize("stock_sql", ["sqlite"], indirect=True)  # about mam_rs's own archive: one backend will do
def test_messages_after_the_import_sort_after_imported_ones(stock_sql, connect):
    srv = clone_stock(stock_sql, module="mam_rs")
    try:
        alice, bob = connect(srv, "alice"), connect(srv, "bob")
        # Switched to mam_rs and restarted; clients chat before the admin runs the import.
        before_import = exchange(alice, bob, "before the import " + token())
        run = run_import(srv)
        assert run.messages == stock_sql.total, run.out
        after_import = exchange(bob, alice, "after the import " + token())
        got = alice.mam_all()
        stock_ids = [i.id for i in stock_sql.archives["alice"]]
        assert [i for i in got.ids if i in set(stock_ids)] == stock_ids, "stock history out of order"
        assert got.bodies[-1] == after_import, "a message archived after the import must sort last"
        # The stock history is older than anything mam_rs archived, including before the import.
        assert got.ids[:len(stock_ids)] == stock_ids and got.bodies[len(stock_ids):] == [before_import, after_import], \
            "want the stock history first, then the live messages; got bodies %r" % (
                [b[:20] for b in got.bodies[:3]] + ["..."] + [b[:20] for b in got.bodies[-3:]])
        last = with_ids(stock_sql, "alice", "bob")[-1]
        r = alice.mam_ok(fields={"with": "bob@localhost"}, rsm={"max": 10, "after": last})
        assert r.bodies == [before_import, after_import] and r.complete
        assert alice.mam_ok(rsm={"max": 2, "before": ""}).bodies == [before_import, after_import]
    finally:
        stop_clone(srv)


# --------------------------------------------------------------------------
# Import from internal (file) storage, with Prosody stopped, one user first


def test_internal_import_one_user_then_the_rest_while_stopped(stock_internal, connect):
    view = stock_internal
    srv = view.srv.clone(module="mam_rs", start=False)
    try:
        one = run_import(srv, "alice@localhost")
        n_alice = len(view.keys["alice"])
        assert (one.messages, one.already, one.skipped) == (n_alice, 0, 0), one.out
        rest = run_import(srv, HOST)
        assert (rest.users, rest.messages, rest.skipped) == (len(ALL), view.total - n_alice, 0), rest.out
        restart_server(srv)
        clients = {u: connect(srv, u) for u in LIVE}
        assert_same_views(view, clients)
        assert_dave_imported(view, connect(srv, "dave"))
        check_resume(view, clients["alice"])
        w = with_ids(view, "carol", "alice")
        assert clients["carol"].mam_ok(fields={"with": "alice@localhost"}, rsm={"max": 4, "after": w[5]}).ids == w[6:10]
        again = run_import(srv)
        assert again.messages == 0, again.out
        assert (rest.already, again.already) == (n_alice, view.total), \
            "already= should count the messages found already imported:\n%s\n%s" % (rest.out, again.out)
    finally:
        srv.stop()


# --------------------------------------------------------------------------
# Malformed data is reported and skipped, never fatal


def test_malformed_sql_rows_are_reported_and_skipped(stock_sql, fill_plugin_dir, connect):
    view = stock_sql
    srv = clone_stock(view, module="mam_rs", start=False, plugin_paths=[fill_plugin_dir])
    try:
        now = int(time.time())
        bad = [
            ("alice", "e2e-bad-notxml", "bob@localhost", "xml", "<message><body>unclosed &amp; <b>"),
            ("alice", "e2e-bad-iq", "bob@localhost", "xml", "<iq type='get' id='x'><ping xmlns='urn:xmpp:ping'/></iq>"),
            ("bob", "e2e-bad-json", "alice@localhost", "json", '{"body":"not a stanza"}'),
        ]
        srv.stock_sql.insert_archive_rows(srv, [(u, k, now, w, t, v) for u, k, w, t, v in bad])
        stock_fill(srv, "bob", "alice@localhost", 5)  # good rows after bob's bad one, by the stock API
        keys = read_keys(srv)
        want_bob = [k for k in keys["bob"] if not k.startswith("e2e-bad")]
        assert want_bob[:-5] == view.keys["bob"] and len(want_bob) == len(view.keys["bob"]) + 5
        good = view.total + 5

        run = run_import(srv)
        assert (run.messages, run.already, run.skipped) == (good, 0, 3), run.out
        for u, k, *_ in bad:
            line = [ln for ln in run.skipped_lines if ln.startswith("  skipped %s@localhost %s: " % (u, k))]
            assert len(line) == 1 and line[0].split(": ", 1)[1].strip(), \
                "want one '  skipped %s@localhost %s: <reason>' line in:\n%s" % (u, k, run.out)
        assert len(run.skipped_lines) == 3, run.out

        restart_server(srv)
        alice, bob = connect(srv, "alice"), connect(srv, "bob")
        assert_same_archive(alice, view.archives["alice"], "alice without her malformed rows")
        got_bob = bob.mam_all()
        assert got_bob.ids == want_bob
        assert got_bob.bodies[-5:] == ["fill %d & <ü>" % i for i in range(1, 6)]
        again = run_import(srv)
        assert again.messages == 0, again.out
        assert again.already == good, "already= should count the messages found already imported:\n" + again.out
    finally:
        stop_clone(srv)


def test_unreadable_internal_archive_skips_that_user_and_goes_on(stock_internal, fill_plugin_dir, connect):
    view = stock_internal
    srv = view.srv.clone(module="mam_rs", start=False, plugin_paths=[fill_plugin_dir])
    try:
        archive_dir = srv.data / HOST / "archive"
        # bob: a well-formed item that is not a message, then good items by the stock API.
        with open(archive_dir / "bob.list", "a") as f:
            f.write('item({\n\t["attr"] = {\n\t\t["type"] = "unavailable";\n\t};\n\t["name"] = "presence";\n'
                    '\t["key"] = "e2e-bad-presence";\n\t["when"] = %d;\n\t["with"] = "alice@localhost";\n});\n'
                    % int(time.time()))
        stock_fill(srv, "bob", "alice@localhost", 3)
        # carol: a torn write leaves the file unreadable as a whole (for Prosody too).
        with open(archive_dir / "carol.list", "a") as f:
            f.write("item({\n\t[\"key\"] = \"e2e-torn\";\n")
        want_bob = [k for k in internal_keys(srv.data)["bob"] if k != "e2e-bad-presence"]
        assert want_bob[:-3] == view.keys["bob"] and len(want_bob) == len(view.keys["bob"]) + 3

        run = run_import(srv)
        good = len(view.keys["alice"]) + len(want_bob) + len(view.keys["dave"])
        assert (run.messages, run.already) == (good, 0), run.out
        carol = [ln for ln in run.skipped_lines if ln.startswith("  skipped carol@localhost: ")]
        assert len(carol) == 1 and carol[0].split(": ", 1)[1].strip(), \
            "want '  skipped carol@localhost: <reason>' in:\n%s" % run.out
        bob_bad = [ln for ln in run.skipped_lines if ln.startswith("  skipped bob@localhost e2e-bad-presence: ")]
        assert len(bob_bad) == 1, "want '  skipped bob@localhost e2e-bad-presence: <reason>' in:\n%s" % run.out
        assert run.skipped >= 2, run.out

        restart_server(srv)
        c = {u: connect(srv, u) for u in ALL}
        assert_same_archive(c["alice"], view.archives["alice"], "alice (imported before carol's file)")
        assert c["bob"].mam_all().ids == want_bob
        assert c["carol"].mam_ok(rsm={"max": 0}).count == 0, "nothing of carol's unreadable archive"
        assert c["dave"].mam_all().ids == view.keys["dave"], "dave (after carol) imported"
    finally:
        srv.stop()


# --------------------------------------------------------------------------
# An interrupted import, rerun, has every message exactly once


LARGE = 20000


def test_interrupted_import_resumes_to_exactly_the_full_archive(fill_plugin_dir, connect):
    srv = StorageServer(module="mam_rs", users=("alice", "bob"), plugin_paths=[fill_plugin_dir],
                        extra_config=["max_archive_query_results = 1000"]).start()
    try:
        # Filled while the server is stopped: Prosody 13's server writes the same SQLite file
        # (mod_cron's first run, a second after start), and neither side waits for the other's lock.
        stop_server_keep_data(srv)
        stock_fill(srv, "alice", "bob@localhost", LARGE)
        restart_server(srv)
        keys = sql_keys(srv.data)["alice"]
        assert len(keys) == LARGE

        proc = subprocess.Popen(["prosodyctl", "--config", str(srv.cfg), "mod_mam_rs", "import"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        buf = bytearray()

        def reader():
            while True:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    return
                buf.extend(chunk)

        t = threading.Thread(target=reader, daemon=True)
        t.start()

        def progress_seen():
            # A progress line is rewritten with \r; wait for one whose count (its first number)
            # is above zero.
            firsts = [re.search(rb"\d+", s.split(b"\n")[0]) for s in bytes(buf).split(b"\r")[1:]]
            return any(m and int(m.group()) > 0 for m in firsts) or proc.poll() is not None

        assert wait_until(progress_seen, timeout=120, step=0.005), "no progress line: %r" % bytes(buf)
        finished = proc.poll() is not None
        proc.kill()  # SIGKILL our own child, by PID
        proc.wait(timeout=10)
        t.join(5)
        first_out = bytes(buf).decode(errors="replace")
        assert not finished and b"import summary:" not in buf, \
            "import of %d rows finished before it could be interrupted:\n%s" % (LARGE, first_out)

        alice = connect(srv, "alice")
        partial = alice.mam_ok(rsm={"max": 0}).count
        assert 0 < partial < LARGE, "after a kill mid-way, want some (committed batches) but not all of %d, " \
                                    "got %r; output:\n%s" % (LARGE, partial, first_out)

        run = run_import(srv)
        assert (run.messages, run.skipped) == (LARGE - partial, 0), run.out
        ids, after = [], None
        while True:
            rsm = {"max": 1000}
            if after:
                rsm["after"] = after
            r = alice.mam_ok(rsm=rsm)
            ids += r.ids
            if r.complete or not r.ids:
                break
            after = r.last
        assert len(ids) == LARGE and len(set(ids)) == LARGE, "want %d distinct, got %d (%d distinct)" % (
            LARGE, len(ids), len(set(ids)))
        assert ids == keys, first_difference(ids, keys)
        assert alice.mam_ok(rsm={"max": 1, "before": ""}).bodies == ["fill %d & <ü>" % LARGE]
        assert run.already == partial, "already= should count the messages found already imported:\n" + run.out
    finally:
        srv.stop()


# --------------------------------------------------------------------------
# The archive stock would read under this config: archive_store and the sql block count


def test_import_reads_the_store_and_database_the_config_names(fill_plugin_dir, connect):
    srv = StorageServer(module="mam_rs", users=("alice", "bob"), plugin_paths=[fill_plugin_dir],
                        extra_config=['archive_store = "chats"',
                                      'sql = { driver = "SQLite3", database = "stock-elsewhere.sqlite" }']).start()
    try:
        stock_fill(srv, "alice", "bob@localhost", 5, "chats")
        stock_fill(srv, "alice", "bob@localhost", 7, "archive")  # not what stock mod_mam would read here
        assert not (srv.data / "prosody.sqlite").exists()
        keys = sql_keys(srv.data, "chats", "stock-elsewhere.sqlite")["alice"]
        assert len(keys) == 5 and len(sql_keys(srv.data, "archive", "stock-elsewhere.sqlite")["alice"]) == 7
        run = run_import(srv)
        assert (run.users, run.messages, run.skipped) == (1, 5, 0), run.out
        alice = connect(srv, "alice")
        r = alice.mam_all()
        assert r.ids == keys and r.bodies == ["fill %d & <ü>" % i for i in range(1, 6)]
    finally:
        srv.stop()


# --------------------------------------------------------------------------
# The stock database server unreachable


def test_import_while_the_database_server_is_down_fails_clearly_then_works(postgres_server, fill_plugin_dir,
                                                                          connect):
    db = postgres_server
    name = db.create_database()
    srv = StorageServer(module="mam_rs", users=("alice", "bob"), plugin_paths=[fill_plugin_dir],
                        sql=db.prosody_sql(name)).start()
    try:
        stock_fill(srv, "alice", "bob@localhost", 5)
        keys = StockSql("postgres", db, name).keys(srv)["alice"]
        assert len(keys) == 5
        stop_server_keep_data(srv)
        db.stop()
        try:
            down = run_import(srv, expect_rc=1)
        finally:
            db.start()
        assert (down.users, down.messages, down.already) == (0, 0, 0), down.out
        # The archive is on the same server (sql names it), so opening it is what fails first.
        assert "cannot open the archive database: PostgreSQL" in down.out and name in down.out, down.out
        assert "Connection refused" in down.out, down.out
        run = run_import(srv)
        assert (run.users, run.messages, run.already, run.skipped) == (1, 5, 0, 0), run.out
        restart_server(srv)
        r = connect(srv, "alice").mam_all()
        assert r.ids == keys and r.bodies == ["fill %d & <ü>" % i for i in range(1, 6)]
    finally:
        srv.stop()
        db.drop_database(name)
