#!/usr/bin/env python3
"""Side-by-side benchmark: stock mod_mam (storage = "sql", SQLite) against mod_mam_rs, in one run.

Not a pytest module (pytest only collects test_*.py / *_test.py). Run from the repository root:

    .venv/bin/python tests/e2e/bench_vs_stock.py [--rows 200000] [--workdir /var/tmp/mam-bench] ...

a) archive throughput: K clients each send M messages to the others, in bursts of B followed by a
   ping (flow control), until every recipient has every message; messages per second.
b) loop responsiveness under query load: one user's archive is seeded with --rows messages by
   writing each server's database directly (server started once first so that it creates its
   schema). While alice runs large queries back to back (max=50 pages with <count>: `with`
   filter + before/after paging, full-archive last page and after-id pages), bob (a separate
   process) pings every 20 ms, open loop; bob's ping RTTs and alice's query latencies.

The servers run one after the other (never at the same time), with the same harness config
(network_settings = { nagle = false }, storage = "sql"), on a real-disk work dir by default.
"""

import argparse
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODULES = (("stock", "mam"), ("rs", "mam_rs"))
CONTACTS = 10
# Both: keep every seeded row (stock's default 1w expiry would make "never" turn the count off).
COMMON_CONFIG = ['archive_expires_after = "never"', "mam_include_total = true"]

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def rs_id_text(v):
    """mod_mam_rs id text form (src/id.rs): 13 chars of Crockford base32, lower case."""
    out = []
    for _ in range(13):
        out.append(ALPHABET[v & 31])
        v >>= 5
    return "".join(reversed(out))


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary_ms(xs):
    return {"n": len(xs), "median": pct(xs, 50) * 1e3, "p95": pct(xs, 95) * 1e3,
            "p99": pct(xs, 99) * 1e3, "max": (max(xs) if xs else float("nan")) * 1e3}


def proc_cpu_seconds(pid):
    """utime + stime of a process (all its threads), seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# Pinger: a separate process (bob), so that alice's result parsing does not delay the pings.


def pinger_main(port, interval, duration):
    import asyncio
    from conftest import Client, LoopThread

    class Srv:  # what Client needs of a server
        pass

    srv = Srv()
    srv.port = port
    lt = LoopThread()
    bob = Client(lt, srv, "bob", "pinger").connect()
    print("ready", flush=True)
    offset = time.time() - time.monotonic()
    samples = []  # (wall send time, rtt or None)

    async def run():
        loop = asyncio.get_running_loop()
        x = bob.x
        t0 = time.monotonic()
        futs = []
        k = 0
        while True:
            target = t0 + k * interval
            if target - t0 > duration:
                break
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            iq_id = "p%d" % k
            fut = loop.create_future()
            x.pending[iq_id] = fut
            sent = time.monotonic()
            x.send_raw("<iq type='get' id='%s' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>" % iq_id)
            futs.append((sent, fut))
            k += 1
        for sent, fut in futs:
            try:
                reply = await asyncio.wait_for(fut, 30)
                samples.append((sent + offset, reply.t - sent))
            except asyncio.TimeoutError:
                samples.append((sent + offset, None))

    lt.run(run(), duration + 60)
    bob.disconnect()
    lt.stop()
    print(json.dumps(samples), flush=True)


# --------------------------------------------------------------------------
# Servers


def make_server(module, users, extra=()):
    from conftest import ProsodyServer
    return ProsodyServer(list(COMMON_CONFIG) + list(extra), users=users, module=module).start()


# --------------------------------------------------------------------------
# a) throughput


def throughput(module, k, m, burst_size):
    import asyncio
    from conftest import Client, LoopThread, NS_SID

    users = tuple("u%d" % i for i in range(k))
    srv = make_server(module, users)
    lt = LoopThread()
    try:
        cl = [Client(lt, srv, u, "bench").connect() for u in users]
        expected = {u: 0 for u in users}
        plan = []
        for i, c in enumerate(cl):
            others = [u for u in users if u != c.user]
            msgs = []
            for j in range(m):
                to = others[j % len(others)]
                expected[to] += 1
                msgs.append("<message to='%s@localhost' id='%s-%d' type='chat'><body>bench %s %d: "
                            "the quick brown fox jumps over the lazy dog</body></message>"
                            % (to, c.user, j, c.user, j))
            plan.append(msgs)

        async def ping(x, n):
            fut = asyncio.get_running_loop().create_future()
            x.pending["fc%d" % n] = fut
            x.send_raw("<iq type='get' id='fc%d' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>" % n)
            await asyncio.wait_for(fut, 120)

        async def sender(c, msgs):
            for n, i in enumerate(range(0, len(msgs), burst_size)):
                c.x.send_raw("".join(msgs[i:i + burst_size]))
                await ping(c.x, n)

        async def all_received():
            while any(len(c.x.received) < expected[c.user] for c in cl):
                await asyncio.sleep(0.005)

        async def run():
            t0 = time.monotonic()
            await asyncio.gather(*(sender(c, msgs) for c, msgs in zip(cl, plan)))
            await asyncio.wait_for(all_received(), 300)
            last = max(c.x.received[-1].t for c in cl)
            return t0, last

        cpu0, pycpu0 = proc_cpu_seconds(srv.proc.pid), time.process_time()
        t0, t1 = lt.run(run(), 600)
        cpu1, pycpu1 = proc_cpu_seconds(srv.proc.pid), time.process_time()
        wall = t1 - t0
        total = k * m
        stamped = sum(1 for c in cl for r in lt.call(list, c.x.received)
                      if r.xml.find("{%s}stanza-id" % NS_SID) is not None)
        # Sanity: each archive holds what its owner sent and received.
        counts = [c.mam_ok(rsm={"max": 0}).count for c in cl]
        ok = counts == [m + expected[c.user] for c in cl] and stamped == total
        for c in cl:
            c.disconnect()
        return {"msgs": total, "wall": wall, "rate": total / wall, "server_cpu": (cpu1 - cpu0) / wall,
                "client_cpu": (pycpu1 - pycpu0) / wall, "ok": ok, "stamped": stamped, "counts": counts}
    finally:
        lt.stop()
        srv.stop()


# --------------------------------------------------------------------------
# b) seeding and query load


def body_text(i):
    return "archived message number %d, padded to a realistic chat length: lorem ipsum dolor sit amet" % i


def plan_rows(rows, rng):
    """(seconds-since-epoch float, contact index, outgoing?) for each row, oldest first; spread over 5 days."""
    end = time.time() - 3600
    span = 5 * 86400.0
    step = span / rows
    return [(end - span + i * step, rng.randrange(CONTACTS), bool(i & 1)) for i in range(rows)]


def stanza_xml(i, contact, outgoing, xmlns):
    peer = "c%d@localhost" % contact
    frm, to = ("alice@localhost/bench", peer) if outgoing else (peer + "/phone", "alice@localhost")
    ns = " xmlns='jabber:client'" if xmlns else ""
    return ("<message%s from='%s' to='%s' type='chat' id='seed-%d' xml:lang='en'><body>%s</body></message>"
            % (ns, frm, to, i, body_text(i)))


STOCK_DDL = """
CREATE TABLE IF NOT EXISTS "prosodyarchive" ("sort_id" INTEGER PRIMARY KEY AUTOINCREMENT, "host" TEXT NOT NULL, "user" TEXT NOT NULL, "store" TEXT NOT NULL, "key" TEXT NOT NULL, "when" INTEGER NOT NULL, "with" TEXT NOT NULL, "type" TEXT NOT NULL, "value" TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS "prosodyarchive_index" ON "prosodyarchive" ("host", "user", "store", "key");
CREATE INDEX IF NOT EXISTS "prosodyarchive_with_when" ON "prosodyarchive" ("host", "user", "store", "with", "when");
CREATE INDEX IF NOT EXISTS "prosodyarchive_when" ON "prosodyarchive" ("host", "user", "store", "when");
CREATE INDEX IF NOT EXISTS "prosodyarchive_sort" ON "prosodyarchive" ("host", "user", "store", "sort_id");
"""


def seed_stock(db_path, plan):
    """Rows as mod_storage_sql 0.12 writes them (reference §4.1). Returns [(key, contact)]."""
    db = sqlite3.connect(db_path)
    db.executescript(STOCK_DDL)  # IF NOT EXISTS: a no-op when Prosody created them
    keys = []

    def rows():
        for i, (when, contact, out) in enumerate(plan):
            key = str(uuid.UUID(int=random.getrandbits(128), version=4))
            keys.append((key, contact))
            yield ("localhost", "alice", "archive", key, int(when), "c%d@localhost" % contact, "xml",
                   stanza_xml(i, contact, out, False))

    with db:
        db.executemany('INSERT INTO "prosodyarchive" ("host","user","store","key","when","with","type","value") '
                       "VALUES (?,?,?,?,?,?,?,?)", rows())
    db.close()
    return keys


def seed_rs(db_path, plan):
    """Rows as mod_mam_rs writes them (schema.rs; ids (micros << 11) | seq, increasing). Returns [(id text, contact)]."""
    db = sqlite3.connect(db_path)
    ver = db.execute("PRAGMA user_version").fetchone()[0]
    assert ver >= 1, "mod_mam_rs did not create its schema in %s" % db_path
    keys = []
    with db:
        db.execute("INSERT OR IGNORE INTO archives (host, user, store) VALUES ('localhost', 'alice', 'archive')")
        aid = db.execute("SELECT aid FROM archives WHERE host='localhost' AND user='alice' AND store='archive'").fetchone()[0]
        jid_ids = []
        for c in range(CONTACTS):
            jid = "c%d@localhost" % c
            db.execute("INSERT OR IGNORE INTO jids (jid) VALUES (?)", (jid,))
            jid_ids.append(db.execute("SELECT jid_id FROM jids WHERE jid = ?", (jid,)).fetchone()[0])
        last = db.execute("SELECT max(id) FROM messages").fetchone()[0] or 0

        def rows():
            prev = last
            for i, (when, contact, out) in enumerate(plan):
                v = max(int(when * 1e6) << 11, prev + 1)
                prev = v
                keys.append((rs_id_text(v), contact))
                yield (v, aid, jid_ids[contact], stanza_xml(i, contact, out, True))

        db.executemany("INSERT INTO messages (id, aid, with_id, stanza) VALUES (?,?,?,?)", rows())
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return keys


def seeded_server(module, rows, seed):
    from conftest import restart_server, stop_server_keep_data
    srv = make_server(module, ("alice", "bob"))
    stop_server_keep_data(srv)
    rng = random.Random(seed)
    plan = plan_rows(rows, rng)
    t = time.monotonic()
    if module == "mam":
        keys = seed_stock(srv.data / "prosody.sqlite", plan)
    else:
        keys = seed_rs(srv.data / "mam_rs.sqlite", plan)
    seed_s = time.monotonic() - t
    restart_server(srv)
    return srv, keys, seed_s


def light_results(lt, client):
    """Replace the harness's store-every-message handler by a counter of MAM results per queryid
    (the harness deep-copies every stanza, which would make the bench client the bottleneck)."""
    from conftest import NS_CLIENT, NS_MAM
    from slixmpp.xmlstream.handler import Callback
    from slixmpp.xmlstream.matcher import MatchXPath
    counts = {}
    tag = "{%s}result" % NS_MAM

    def on_message(stanza):
        r = stanza.xml.find(tag)
        if r is not None:
            qid = r.get("queryid")
            counts[qid] = counts.get(qid, 0) + 1

    def swap():
        client.x.remove_handler("e2e msg")
        client.x.register_handler(Callback("bench msg", MatchXPath("{%s}message" % NS_CLIENT), on_message))

    lt.call(swap)
    return counts


def query_stream(client, counts, keys, by_contact, rng, deadline, lat, errors, totals):
    """One session's loop of large queries, back to back, until the deadline."""
    from conftest import MamResult

    def q(kind, **kw):
        t0 = time.monotonic()
        qid, fut = client.mam_async(**kw)
        reply = fut.result(120)
        r = MamResult(qid, reply)
        n = counts.pop(qid, 0)
        if reply.type != "result" or r.fin is None:
            errors.append((kind, reply.condition))
        else:
            lat.setdefault(kind, []).append(reply.t - t0)
            totals.setdefault(kind, r.count)
            if n != 50:
                errors.append((kind, "%d results" % n))
        return r

    while time.monotonic() < deadline:
        # Full archive, last page (the usual "catch up" query).
        q("full last page", rsm={"max": 50, "before": ""})
        # Full archive, a page after a random id.
        q("full after-id", rsm={"max": 50, "after": rng.choice(keys[:-100])[0]})
        # One contact: last page, then two pages back; then a page after a random id of theirs.
        c = rng.randrange(CONTACTS)
        w = {"with": "c%d@localhost" % c}
        r = q("with last page", fields=w, rsm={"max": 50, "before": ""})
        for _ in range(2):
            if not r.first:
                break
            r = q("with before-id", fields=w, rsm={"max": 50, "before": r.first})
        q("with after-id", fields=w, rsm={"max": 50, "after": rng.choice(by_contact[c][:-100])})


def query_load(srv, keys, duration, idle, interval, seed, streams):
    """`streams` alice sessions query back to back for `duration` s while the pinger process pings."""
    import threading
    from conftest import Client, LoopThread

    by_contact = {}
    for key, c in keys:
        by_contact.setdefault(c, []).append(key)
    lt = LoopThread()
    alices = [Client(lt, srv, "alice", "bench%d" % i).connect() for i in range(streams)]
    counters = [light_results(lt, a) for a in alices]
    pinger = subprocess.Popen([sys.executable, __file__, "--_pinger", str(srv.port), str(interval),
                               str(idle + duration + 1)], stdout=subprocess.PIPE, text=True, cwd=HERE)
    try:
        assert pinger.stdout.readline().strip() == "ready"
        time.sleep(idle)
        lat, errors, totals = {}, [], {}
        load_start = time.time()
        cpu0, pycpu0, m0 = proc_cpu_seconds(srv.proc.pid), time.process_time(), time.monotonic()
        deadline = time.monotonic() + duration
        threads = [threading.Thread(target=query_stream, daemon=True, args=(
            a, cnt, keys, by_contact, random.Random(seed * 1000 + i), deadline, lat, errors, totals))
            for i, (a, cnt) in enumerate(zip(alices, counters))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + 180)
        load_end = time.time()
        wall = time.monotonic() - m0
        server_cpu = (proc_cpu_seconds(srv.proc.pid) - cpu0) / wall
        client_cpu = (time.process_time() - pycpu0) / wall
        out, _ = pinger.communicate(timeout=idle + duration + 120)
        samples = json.loads(out.strip().splitlines()[-1])
    finally:
        if pinger.poll() is None:
            pinger.kill()
            pinger.wait()
        for a in alices:
            a.disconnect()
        lt.stop()
    lost = sum(1 for _, r in samples if r is None)
    idle_rtts = [r for t, r in samples if r is not None and t < load_start]
    load_rtts = [r for t, r in samples if r is not None and load_start <= t <= load_end]
    return {"idle": summary_ms(idle_rtts), "load": summary_ms(load_rtts), "lost": lost,
            "queries": {k: summary_ms(v) for k, v in lat.items()}, "counts": totals, "errors": errors,
            "n_queries": sum(len(v) for v in lat.values()), "load_s": load_end - load_start,
            "server_cpu": server_cpu, "client_cpu": client_cpu}


# --------------------------------------------------------------------------
# c) expiry of a large archive (mod_mam_rs only: stock 0.12 expires from a daily cron job)


def expiry_load(rows, seed, interval):
    """Seeds `rows` messages older than an hour, restarts with archive_expires_after = 30 min and
    a cleanup a few seconds after start, and compares bob's pings before and during the
    in-server expiry (its window comes from the server's own "Deleted N expired messages in
    X s" line)."""
    from conftest import restart_server, stop_server_keep_data
    srv = make_server("mam_rs", ("alice", "bob"),
                      extra=["archive_expires_after = 1800", "archive_cleanup_interval = 8"])
    try:
        stop_server_keep_data(srv)
        t = time.monotonic()
        seed_rs(srv.data / "mam_rs.sqlite", plan_rows(rows, random.Random(seed)))
        seed_s = time.monotonic() - t
        restart_server(srv)
        log_start = srv.log.stat().st_size
        pinger = subprocess.Popen([sys.executable, __file__, "--_pinger", str(srv.port), str(interval), "60"],
                                  stdout=subprocess.PIPE, text=True, cwd=HERE)
        assert pinger.stdout.readline().strip() == "ready"
        line, deadline = None, time.monotonic() + 120
        while line is None and time.monotonic() < deadline:
            time.sleep(0.5)
            with open(srv.log, errors="replace") as f:
                f.seek(log_start)
                line = next((l for l in f if "expired messages in" in l and "Deleted 0 " not in l), None)
        done_at = time.time()
        out, _ = pinger.communicate(timeout=180)
        samples = json.loads(out.strip().splitlines()[-1])
    finally:
        srv.stop()
    assert line, "no expiry run in the log"
    m = re.search(r"Deleted (\d+) expired messages in ([\d.]+) s", line)
    deleted, took = int(m.group(1)), float(m.group(2))
    # The line is read within half a second of being written; the run ended at most then.
    end = done_at
    start = end - took - 0.5
    before = [r for t, r in samples if r is not None and t < start - 0.5]
    during = [r for t, r in samples if r is not None and start <= t <= end]
    return {"deleted": deleted, "took": took, "seed_s": seed_s, "before": summary_ms(before),
            "during": summary_ms(during), "lost": sum(1 for _, r in samples if r is None)}


def fmt(v, nd=1):
    if isinstance(v, float):
        return "%.*f" % (nd, v)
    return str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/mam-bench",
                    help="server work/data dirs (default on real disk: /var/tmp/mam-bench; /dev/shm for tmpfs)")
    ap.add_argument("--clients", type=int, default=4, help="throughput: clients (K)")
    ap.add_argument("--msgs", type=int, default=2000, help="throughput: messages each client sends (M)")
    ap.add_argument("--burst", type=int, default=100, help="throughput: messages per burst before a ping")
    ap.add_argument("--rows", type=int, default=200_000, help="query load: seeded archive size")
    ap.add_argument("--duration", type=float, default=30.0, help="query load: seconds of queries per server")
    ap.add_argument("--idle", type=float, default=3.0, help="query load: seconds of idle pings first")
    ap.add_argument("--streams", type=int, default=1,
                    help="query load: alice sessions querying concurrently, each back to back")
    ap.add_argument("--ping-interval", type=float, default=0.02, help="bob's ping interval, seconds")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-query", action="store_true")
    ap.add_argument("--expiry", type=int, default=0, metavar="ROWS",
                    help="also time expiring ROWS messages in mod_mam_rs (pings before vs during)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the server work dirs")
    ap.add_argument("--_pinger", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()

    sys.path.insert(0, str(HERE))
    if args._pinger:
        port, interval, duration = args._pinger
        return pinger_main(int(port), float(interval), float(duration))

    os.environ["MAM_E2E_WORKDIR"] = args.workdir
    if args.keep:
        os.environ["MAM_E2E_KEEP"] = "1"
    os.environ.pop("MAM_E2E_EXTRA_CONFIG", None)
    so = REPO / "build" / "plugins" / "mod_mam_rs" / "mam_rs_native.so"
    if not so.exists():
        sys.exit("%s missing: run `make build` first" % so)

    cmd = " ".join([os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(os.getcwd())
                    else sys.executable, *sys.argv])
    print("command: %s" % cmd)
    print("workdir: %s  prosody: %s  cores: %d" % (
        args.workdir, subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "prosody"], capture_output=True,
                                     text=True).stdout.strip() or "?", os.cpu_count()))
    t_start = time.monotonic()
    res = {}
    for label, module in MODULES:
        res[label] = {}
        if not args.skip_throughput:
            print("[%s] throughput: %d clients x %d messages ..." % (label, args.clients, args.msgs), flush=True)
            res[label]["tp"] = tp = throughput(module, args.clients, args.msgs, args.burst)
            print("    %.0f msgs/s in %.2fs (server CPU %.0f%%, archives ok: %s)"
                  % (tp["rate"], tp["wall"], tp["server_cpu"] * 100, tp["ok"]), flush=True)
        if not args.skip_query:
            print("[%s] seeding %d rows ..." % (label, args.rows), flush=True)
            srv, keys, seed_s = seeded_server(module, args.rows, args.seed)
            try:
                print("    seeded in %.1fs; query load %.0fs ..." % (seed_s, args.duration), flush=True)
                res[label]["q"] = ql = query_load(srv, keys, args.duration, args.idle, args.ping_interval, args.seed,
                                                   args.streams)
            finally:
                srv.stop()
            print("    %d queries, ping under load median %.2f ms p99 %.2f ms, errors: %d"
                  % (ql["n_queries"], ql["load"]["median"], ql["load"]["p99"], len(ql["errors"])), flush=True)

    # ---- table
    s, r = res["stock"], res["rs"]
    rows = []

    def add(name, a, b, better="lower", nd=2):
        ratio = float("nan")
        if a and b:
            ratio = (a / b) if better == "lower" else (b / a)
        rows.append((name, fmt(a, nd), fmt(b, nd), "%.2fx" % ratio if ratio == ratio else "-"))

    if "tp" in s:
        add("throughput, msgs/s", s["tp"]["rate"], r["tp"]["rate"], "higher", 0)
        add("  server CPU during it, % of one core", s["tp"]["server_cpu"] * 100, r["tp"]["server_cpu"] * 100, "n/a", 0)
        rows[-1] = rows[-1][:3] + ("",)
        add("  bench client CPU during it, % of one core", s["tp"]["client_cpu"] * 100, r["tp"]["client_cpu"] * 100,
            "n/a", 0)
        rows[-1] = rows[-1][:3] + ("",)
    if "q" in s:
        for phase, title in (("idle", "bob ping, idle"), ("load", "bob ping, under query load")):
            for stat in ("median", "p95", "p99", "max"):
                add("%s, %s ms" % (title, stat), s["q"][phase][stat], r["q"][phase][stat])
        add("alice queries completed (%d sessions)" % args.streams, s["q"]["n_queries"], r["q"]["n_queries"],
            "higher", 0)
        add("  server CPU during it, % of one core", s["q"]["server_cpu"] * 100, r["q"]["server_cpu"] * 100, "n/a", 0)
        rows[-1] = rows[-1][:3] + ("",)
        add("  bench client CPU during it, % of one core", s["q"]["client_cpu"] * 100, r["q"]["client_cpu"] * 100,
            "n/a", 0)
        rows[-1] = rows[-1][:3] + ("",)
        for kind in s["q"]["queries"]:
            a, b = s["q"]["queries"][kind], r["q"]["queries"].get(kind)
            if b:
                add("query '%s' median ms" % kind, a["median"], b["median"])
                add("query '%s' p95 ms" % kind, a["p95"], b["p95"])
    if rows:
        w = max(len(x[0]) for x in rows)
        print()
        print("%-*s  %12s  %12s  %s" % (w, "", "stock mam", "mod_mam_rs", "advantage rs"))
        for name, a, b, ratio in rows:
            print("%-*s  %12s  %12s  %s" % (w, name, a, b, ratio))
        print()
    if "tp" in s:
        print("throughput: %d clients x %d msgs, bursts of %d + ping; archives ok: stock %s, rs %s"
              % (args.clients, args.msgs, args.burst, s["tp"]["ok"], r["tp"]["ok"]))
    if "q" in s:
        print("query load: %d rows, %d contacts, %d alice sessions x %.0fs per server, ping every %.0f ms;"
              " <count>: stock %s, rs %s; errors: stock %d, rs %d; lost pings: stock %d, rs %d"
              % (args.rows, CONTACTS, args.streams, args.duration, args.ping_interval * 1e3,
                 s["q"]["counts"].get("full last page"), r["q"]["counts"].get("full last page"),
                 len(s["q"]["errors"]), len(r["q"]["errors"]), s["q"]["lost"], r["q"]["lost"]))
    print("advantage rs = stock/rs for times, rs/stock for rates (>1: mod_mam_rs better)")
    if args.expiry:
        print("\n[mam_rs] expiry of %d messages ..." % args.expiry, flush=True)
        e = expiry_load(args.expiry, args.seed, args.ping_interval)
        print("    deleted %d in %.1f s (seeded in %.0f s); lost pings: %d" % (e["deleted"], e["took"], e["seed_s"], e["lost"]))
        print("%-34s  %10s  %10s  %s" % ("bob ping ms", "before", "during", "during/before"))
        for k in ("median", "p95", "p99", "max"):
            print("%-34s  %10.2f  %10.2f  %.2fx" % (k, e["before"][k], e["during"][k], e["during"][k] / e["before"][k]))
        print("samples: before %d, during %d" % (e["before"]["n"], e["during"]["n"]))
    print("total %.0fs; command: %s" % (time.monotonic() - t_start, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
