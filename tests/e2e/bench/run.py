"""`make bench`: stock mod_mam, mod_mam_rs, the in-memory reference and Prosody with no archive
module, side by side in one run, reported as ratios. See README.md, "Benchmark".

The machine is shared and noisy, so the modules are never measured one after the other in
long stretches: their servers run at the same time (an idle Prosody costs nothing) and every
phase alternates between them, in short turns.

1. Throughput, for the floor (no archive module), stock mod_mam (storage = "sql", SQLite) and
   mod_mam_rs: K clients each send M messages to the others, in bursts of B followed by a ping
   (flow control), until every recipient has every message. Archived messages per second, and
   Prosody's CPU (utime + stime of its process, all threads, from /proc) per 1,000 messages.
   --rounds rounds, in rotating order; figures are the medians.
2. Archive queries, for stock, mod_mam_rs and mod_mam_memory_ref, each seeded with the same
   --rows messages of one user (written straight into the database / seed file). Each server
   has its own querying client (alice) and its own other client (bob, a process of its own,
   pinging every --ping-interval throughout).
   - pages: --samples queries of each shape, max=50 with <count>: newest page (`<before/>`),
     oldest page (no RSM id), `with` one contact (its newest page), a one-hour `start`/`end`
     window, and a page after a random id. Each query goes to every module in turn.
   - idle / heavy: --rounds rounds; in each, per module, --idle/rounds seconds of nothing, then
     --heavy/rounds seconds of alice querying a `start`/`end` window spanning the whole archive
     (max=50, with <count>) back to back. bob's pings in those windows.
   - walk: the whole archive, forwards, --walk-max per page (after = the last page's last id),
     pages alternating between modules; a module's walk time is the sum of its pages' round
     trips.
3. Expiry, for stock and mod_mam_rs, one after the other: the seeded server restarted with
   archive_expires_after = 30 minutes (every seeded row is older), bob pinging before and
   while the module removes them. Stock 0.12 runs expiry as a daily mod_cron task;
   mod_bench_run_task runs that task at a chosen time. mod_mam_rs runs its own timer
   (archive_cleanup_interval).
   With --postgres (--mariadb), every phase also runs mod_mam_rs with its archive (`mam_rs_sql`)
   on one throwaway PostgreSQL (MariaDB) server, seeded with the same rows; reported beside,
   against the same references, with no target.
4. Bytes per message: growth of the archive's database file(s) from seeding / rows. mod_mam_rs
   is seeded as text rows (as with archive_compression = false), then `prosodyctl mod_mam_rs
   optimize` compresses them as its default configuration (archive_compression on) stores
   messages, and the queries run on that; --skip-compressed leaves it as text. The same on
   PostgreSQL, where VACUUM FULL then packs the rewritten table; MariaDB's rows stay text.
"""

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import seed as seeding
from bench.server import Server, file_bytes, password
from bench.xmpp import Conn

HERE = Path(__file__).resolve().parent
E2E = HERE.parent
REPO = E2E.parents[1]

LABELS = {"floor": "no archive module", "stock": "stock mod_mam", "rs": "mod_mam_rs", "mem": "memory reference",
          "rs-pg": "mod_mam_rs on PostgreSQL", "rs-my": "mod_mam_rs on MariaDB",
          "rs-b": "mod_mam_rs, compared build"}
ARCHIVE_MODULES = {"floor": [], "stock": ["mam"], "rs": ["mam_rs"], "mem": ["mam_memory_ref"], "rs-pg": ["mam_rs"],
                   "rs-my": ["mam_rs"], "rs-b": ["mam_rs"]}
# mod_mam_rs with its archive on a database server: the kind, and the server (tests/e2e/dbservers.py).
ON_SERVER = {"rs-pg": "postgres", "rs-my": "mariadb"}
# The kinds whose archive is compressed by default (archive_compression).
COMPRESSED = ("rs", "rs-pg", "rs-my", "rs-b")
# Every kind, in the order tables and plots show them.
KINDS = ("floor", "stock", "rs", "mem", "rs-pg", "rs-my", "rs-b")
# The kinds that are mod_mam_rs set up otherwise, each reported beside the references as "rs" is:
# on a database server, or another build of it (--compare-dir) on the same SQLite setup.
VARIANTS = ("rs-pg", "rs-my", "rs-b")


def plugin_dir(ctx, kind):
    """The module directory a kind's server loads mod_mam_rs from."""
    return ctx.compare_dir if kind == "rs-b" else ctx.plugin_dir
# The benchmark's MariaDB: a buffer pool that holds a 1M-message archive, as an admin's server
# would have (the test suite's is 32 MB), and a redo log that seeding does not keep flushing.
MARIADB_SIZES = {"buffer_pool": "1G", "log_file": "256M"}
SHAPES = ("newest", "oldest", "with", "window", "after-id")
PAGE = 50


def common_config(ctx):
    return [
        'archive_expires_after = "never"',
        "mam_include_total = true",
        "max_archive_query_results = %d" % max(ctx.walk_max, PAGE),
    ] + ctx.config


# ---------------------------------------------------------------------------------------------
# small helpers


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stats_ms(xs):
    return {"n": len(xs), "p50": pct(xs, 50) * 1e3, "p99": pct(xs, 99) * 1e3,
            "max": (max(xs) * 1e3 if xs else float("nan"))}


def stamp(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def log(msg):
    print(msg, flush=True)


class Pinger:
    """bob in a process of his own (bench/pinger.py)."""

    def __init__(self, port, interval):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.pinger", str(port), str(interval)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=E2E)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError("pinger did not start: %r" % line)
        self.ready_at = time.time()
        self.pid = self.proc.pid

    def stop(self):
        out, _ = self.proc.communicate("stop\n", timeout=600)
        return [tuple(s) for s in json.loads(out.strip().splitlines()[-1])]


def window(samples, t0, t1):
    return [r for t, r in samples if r is not None and t0 <= t <= t1]


def lost(samples, t0, t1):
    return sum(1 for t, r in samples if r is None and t0 <= t <= t1)


class CpuMeter:
    """Prosody's and this process's CPU over a stretch of wall time."""

    def __init__(self, srv):
        self.srv = srv
        self.threads0 = srv.thread_cpu()
        self.cpu0, self.self0, self.t0 = srv.cpu(), time.process_time(), time.perf_counter()

    def done(self):
        wall = time.perf_counter() - self.t0
        cpu, client = self.srv.cpu() - self.cpu0, time.process_time() - self.self0
        threads = {k: v - self.threads0.get(k, 0.0) for k, v in self.srv.thread_cpu().items()}
        main = threads.pop("lua5.4", 0.0)
        return {"wall": wall, "server_cpu": cpu, "client_cpu": client, "main_loop_cpu": main,
                "other_threads_cpu": {k: v for k, v in threads.items() if v > 0}}


# ---------------------------------------------------------------------------------------------
# 1. throughput


def rotated(kinds, r):
    """kinds, starting at a different one each round (so no module always goes first)."""
    r %= len(kinds)
    return list(kinds[r:]) + list(kinds[:r])


def chat_messages(users, m, tag):
    """The throughput workload: each user's `m` chat messages (XML), to the other users in turn,
    and how many each user receives. `tag` makes the message ids unique."""
    expected = {u: 0 for u in users}
    plans = []
    for u in users:
        others = [x for x in users if x != u]
        msgs = []
        for j in range(m):
            to = others[j % len(others)]
            expected[to] += 1
            msgs.append("<message to='%s@localhost' id='%s-%s-%d' type='chat'><body>bench %s %d: "
                        "the quick brown fox jumps over the lazy dog</body></message>" % (to, u, tag, j, u, j))
        plans.append(msgs)
    return plans, expected


async def send_in_bursts(c, msgs, burst):
    """Sends `msgs` on `c`, `burst` at a time, each burst followed by a ping answered."""
    for i in range(0, len(msgs), burst):
        c.send("".join(msgs[i:i + burst]))
        await c.ping()


async def _throughput(srv, k, m, burst, round_no):
    users = ["u%d" % i for i in range(k)]
    conns = [await Conn(srv.port, u, password(u), "bench%d" % round_no).connect() for u in users]
    plans, expected = chat_messages(users, m, round_no)
    total = k * m
    counts0 = [(await c.mam(max_=0))[1].count for c in conns] if srv.modules else None
    loop = asyncio.get_running_loop()
    all_in = loop.create_future()
    state = {"n": 0, "last": 0.0}

    def on_message(t):
        state["n"] += 1
        state["last"] = t
        if state["n"] >= total and not all_in.done():
            all_in.set_result(True)

    for c in conns:
        c.on_message = on_message

    meter = CpuMeter(srv)
    t0 = time.perf_counter()
    await asyncio.gather(*(send_in_bursts(c, msgs, burst) for c, msgs in zip(conns, plans)))
    await asyncio.wait_for(all_in, 1800)
    wall = state["last"] - t0
    usage = meter.done()
    stamped = sum(c.stanza_ids for c in conns)
    got = {c.user: c.messages for c in conns}
    ok = got == expected
    if srv.modules:
        counts = [(await c.mam(max_=0))[1].count for c in conns]
        ok = ok and stamped == total and [b - a for a, b in zip(counts0, counts)] == [m + expected[u] for u in users]
    for c in conns:
        await c.close()
    return {"messages": total, "wall": wall, "rate": total / wall,
            "cpu_ms_per_1000": usage["server_cpu"] / total * 1e6,
            "main_loop_ms_per_1000": usage["main_loop_cpu"] / total * 1e6,
            "threads_ms_per_1000": {k: v / total * 1e6 for k, v in usage["other_threads_cpu"].items()},
            "server_cpu_pct": usage["server_cpu"] / usage["wall"] * 100,
            "client_cpu_pct": usage["client_cpu"] / usage["wall"] * 100,
            "stamped": stamped, "ok": ok}


def median(xs):
    return pct(xs, 50)


def server_archive(ctx, kind):
    """For mod_mam_rs on a database server (`kind` in ON_SERVER): (the server, the `mam_rs_sql`
    line that puts the archive in a new database there, that database's name). One throwaway
    server of each kind for the run, started at the first call in the work dir, so on the same
    disk as the SQLite archives, with fsync on; main() closes them."""
    which = ON_SERVER[kind]
    if which not in ctx.db_servers:
        os.environ["MAM_E2E_WORKDIR"] = str(ctx.root)  # dbservers' work root, read on import
        os.chmod(ctx.root, 0o755)  # the server runs as its system user when we are root
        from dbservers import open_server
        ctx.db_servers[which] = open_server(which, **(MARIADB_SIZES if which == "mariadb" else {}))
    db = ctx.db_servers[which]
    database = db.create_database()
    p = db.params(database)
    line = "mam_rs_sql = { %s }" % ", ".join(
        "%s = %s" % (k, p[k] if isinstance(p[k], int) else '"%s"' % p[k])
        for k in ("driver", "database", "host", "port", "username", "password"))
    return db, line, database


def throughput(ctx, kinds):
    """Every module's server up at once (idle ones cost nothing); --rounds rounds, each running the
    workload once against each, in rotating order. Figures are the medians over the rounds."""
    servers = {}
    rounds = {k: [] for k in kinds}
    try:
        for kind in kinds:
            extra = common_config(ctx)
            if kind in ON_SERVER:
                extra = extra + [server_archive(ctx, kind)[1]]
            servers[kind] = Server(ctx.root, "tp-" + kind, ARCHIVE_MODULES[kind], plugin_dir(ctx, kind),
                                   extra, accounts_from=ctx.accounts).start()
        for r in range(ctx.rounds):
            for kind in rotated(kinds, r):
                t = asyncio.run(_throughput(servers[kind], ctx.clients, ctx.msgs, ctx.burst, r))
                rounds[kind].append(t)
                log("    round %d %-6s %6.0f messages/s, Prosody CPU %4.0f ms per 1,000 messages (main loop %.0f), "
                    "load generator %.0f%% of a core%s" % (r + 1, kind, t["rate"], t["cpu_ms_per_1000"],
                                                          t["main_loop_ms_per_1000"], t["client_cpu_pct"],
                                                          "" if t["ok"] else ", WRONG COUNTS"))
    finally:
        for srv in servers.values():
            srv.remove(ctx.keep)
    out = {}
    for kind, rs in rounds.items():
        threads = sorted({n for t in rs for n in t["threads_ms_per_1000"]})
        out[kind] = {
            "rate": median([t["rate"] for t in rs]),
            "cpu_ms_per_1000": median([t["cpu_ms_per_1000"] for t in rs]),
            "main_loop_ms_per_1000": median([t["main_loop_ms_per_1000"] for t in rs]),
            "threads_ms_per_1000": {n: median([t["threads_ms_per_1000"].get(n, 0.0) for t in rs]) for n in threads},
            "server_cpu_pct": median([t["server_cpu_pct"] for t in rs]),
            "client_cpu_pct": max(t["client_cpu_pct"] for t in rs),
            "ok": all(t["ok"] for t in rs),
            "rounds": rs,
        }
    return out


# ---------------------------------------------------------------------------------------------
# 2. archive queries


def query_plan(ctx, plan):
    """The same queries for every module: row indexes and times, mapped to each module's ids later."""
    rng = random.Random(ctx.seed * 7919)
    qs = []
    for _ in range(ctx.samples):
        for shape in SHAPES:
            if shape == "with":
                qs.append((shape, rng.randrange(seeding.CONTACTS)))
            elif shape == "window":
                s = int(rng.uniform(plan.start, plan.end - 3600))
                qs.append((shape, s))
            elif shape == "after-id":
                qs.append((shape, rng.randrange(int(plan.rows * 0.9))))
            else:
                qs.append((shape, None))
    return qs


def query_args(shape, arg, keys, plan):
    if shape == "newest":
        return {"max_": PAGE, "before": ""}
    if shape == "oldest":
        return {"max_": PAGE}
    if shape == "with":
        return {"with_": seeding.contact_jid(arg), "max_": PAGE, "before": ""}
    if shape == "window":
        return {"start": stamp(arg), "end": stamp(arg + 3600), "max_": PAGE}
    if shape == "after-id":
        return {"after": keys[arg], "max_": PAGE}
    if shape == "heavy":
        return {"start": stamp(math.floor(plan.start) - 1), "end": stamp(math.ceil(plan.end) + 1), "max_": PAGE}
    raise ValueError(shape)


def expected_count(shape, arg, plan, kind):
    if shape == "with":
        return plan.per_contact[arg]
    if shape == "window":
        return plan.count_between(arg, arg + 3600, stock=(kind == "stock"))
    return plan.rows


def expected_results(shape, arg, plan, kind):
    if shape == "after-id":
        return min(PAGE, plan.rows - arg - 1)
    if shape == "window":
        return min(PAGE, plan.count_between(arg, arg + 3600, stock=(kind == "stock")))
    return min(PAGE, plan.rows)


async def _archive_queries(ctx, servers, plan, queries, res):
    """All archive servers are up; each phase alternates between them, so that the machine's
    background load falls on each alike."""
    kinds = list(servers)
    keys = {k: plan.stock_ids if k == "stock" else plan.rs_ids for k in kinds}
    pingers, alices = {}, {}
    problems = {k: [] for k in kinds}
    windows = {k: {"idle": [], "heavy": []} for k in kinds}
    try:
        for k in kinds:
            pingers[k] = Pinger(servers[k].port, ctx.ping_interval)
            alices[k] = await Conn(servers[k].port, "alice", password("alice"), "bench").connect()
        log("    warming up ...")
        for k in kinds:
            for shape, arg in queries[:3 * len(SHAPES)]:
                await alices[k].mam(**query_args(shape, arg, keys[k], plan))
            await alices[k].mam(**query_args("heavy", None, keys[k], plan))

        log("    pages: %d queries of each shape on each module ..." % ctx.samples)
        lat = {k: {s: [] for s in SHAPES} for k in kinds}
        for i, (shape, arg) in enumerate(queries):
            for k in rotated(kinds, i):
                dt, r = await alices[k].mam(**query_args(shape, arg, keys[k], plan))
                want_n, want_count = expected_results(shape, arg, plan, k), expected_count(shape, arg, plan, k)
                if r.type != "result" or r.results != want_n or r.count is None or abs(r.count - want_count) > 2:
                    problems[k].append("%s(%s): type=%s results=%s (want %d) count=%s (want %d) condition=%s"
                                       % (shape, arg, r.type, r.results, want_n, r.count, want_count, r.condition))
                lat[k][shape].append(dt)
        for k in kinds:
            res[k]["pages"] = {s: stats_ms(v) for s, v in lat[k].items()}

        log("    idle and heavy queries: %d rounds of %.1f s idle + %.1f s heavy on each module ..." % (
            ctx.rounds, ctx.idle / ctx.rounds, ctx.heavy / ctx.rounds))
        heavy = {k: [] for k in kinds}
        cpu = {k: {"wall": 0.0, "server_cpu": 0.0, "client_cpu": 0.0, "main_loop_cpu": 0.0} for k in kinds}
        for r in range(ctx.rounds):
            for k in rotated(kinds, r):
                t0 = time.time()
                await asyncio.sleep(ctx.idle / ctx.rounds)
                windows[k]["idle"].append((t0, time.time()))
                meter = CpuMeter(servers[k])
                t0 = time.time()
                deadline = time.perf_counter() + ctx.heavy / ctx.rounds
                while time.perf_counter() < deadline:
                    dt, q = await alices[k].mam(**query_args("heavy", None, keys[k], plan))
                    if q.type != "result" or q.results != PAGE or q.count != plan.rows:
                        problems[k].append("heavy: type=%s results=%s count=%s (want %d)" % (
                            q.type, q.results, q.count, plan.rows))
                    heavy[k].append(dt)
                windows[k]["heavy"].append((t0, time.time()))
                u = meter.done()
                for f in cpu[k]:
                    cpu[k][f] += u[f]
        for k in kinds:
            res[k]["heavy"] = stats_ms(heavy[k])
            res[k]["heavy"]["queries_per_s"] = len(heavy[k]) / cpu[k]["wall"]
            res[k]["heavy_cpu"] = cpu[k]

        log("    full walk, max=%d per page, pages alternating between modules ..." % ctx.walk_max)
        walk = {k: {"seconds": 0.0, "pages": 0, "results": 0, "max": ctx.walk_max, "after": None, "done": False}
                for k in kinds}
        cpu0 = {k: servers[k].thread_cpu() for k in kinds}
        self0, wall0 = time.process_time(), time.perf_counter()
        while not all(w["done"] for w in walk.values()):
            for k in kinds:
                w = walk[k]
                if w["done"]:
                    continue
                kw = {"max_": ctx.walk_max}
                if w["after"] is not None:
                    kw["after"] = w["after"]
                dt, q = await alices[k].mam(**kw)
                if q.type != "result":
                    problems[k].append("walk: page %d failed (%s)" % (w["pages"], q.condition))
                    w["done"] = True
                    continue
                w["seconds"] += dt
                w["pages"] += 1
                w["results"] += q.results
                w["after"] = q.last
                w["done"] = q.complete or q.results == 0
        client = {"client_cpu": time.process_time() - self0, "wall": time.perf_counter() - wall0}
        for k in kinds:
            w = walk[k]
            w["load_generator"] = client
            del w["after"], w["done"]
            cpu1 = servers[k].thread_cpu()
            used = {n: v - cpu0[k].get(n, 0.0) for n, v in cpu1.items()}
            w["server_cpu"] = sum(used.values())
            w["main_loop_cpu"] = used.get("lua5.4", 0.0)
            if w["results"] != plan.rows:
                problems[k].append("walk: %d results, want %d" % (w["results"], plan.rows))
            res[k]["walk"] = w
    finally:
        for k in alices:
            await alices[k].close()
        samples = {k: p.stop() for k, p in pingers.items()}
    for k in kinds:
        idle = [r for t0, t1 in windows[k]["idle"] for r in window(samples[k], t0, t1)]
        busy = [r for t0, t1 in windows[k]["heavy"] for r in window(samples[k], t0, t1)]
        res[k]["ping"] = {"idle": stats_ms(idle), "heavy": stats_ms(busy),
                          "lost": sum(1 for _, r in samples[k] if r is None)}
        res[k]["problems"] = problems[k]


def seeded_server(ctx, kind, plan, res):
    """A stopped server of `kind` whose archive holds the plan's rows; records bytes per message."""
    on_server = server_archive(ctx, kind) if kind in ON_SERVER else None
    extra = common_config(ctx) + ([on_server[1]] if on_server else [])
    srv = Server(ctx.root, "q-" + kind, ARCHIVE_MODULES[kind], plugin_dir(ctx, kind), extra,
                 accounts_from=ctx.accounts)
    t = time.monotonic()
    size = None  # the archive's bytes now (none for the in-memory reference)
    if on_server:
        db, _, database = on_server
        srv.start()  # creates its schema in the database
        srv.stop()
        server_size, seed = {"rs-pg": (seeding.pg_archive_bytes, seeding.seed_rs_postgres),
                             "rs-my": (seeding.mysql_archive_bytes, seeding.seed_rs_mysql)}[kind]
        size = lambda: server_size(db, database)  # noqa: E731
        before = size()
        seed(db, database, plan, ctx.root / ("seed-%s.txt" % kind))
    elif kind in ("rs", "rs-b"):
        srv.start()  # creates its schema in mam_rs.sqlite
        srv.stop()
        files = [srv.data / "mam_rs.sqlite", srv.data / "mam_rs.sqlite-wal"]
        size = lambda: file_bytes(*files)  # noqa: E731
        before = size()
        seeding.seed_rs(files[0], plan)
    elif kind == "stock":
        files = [srv.data / "prosody.sqlite", srv.data / "prosody.sqlite-wal"]
        size = lambda: file_bytes(*files)  # noqa: E731
        before = size()
        seeding.seed_stock(files[0], plan)
    else:
        seed_file = srv.data / "memory_ref_rows.tsv"
        seeding.seed_memory_ref(seed_file, plan)
        srv.extra = extra + ['mam_memory_ref_seed = "%s"' % seed_file]
    res["seed_seconds"] = time.monotonic() - t
    if size:
        res["db_bytes"] = size() - before
        res["bytes_per_message"] = res["db_bytes"] / plan.rows
    log("[%s] seeded %d rows in %.1f s%s" % (kind, plan.rows, res["seed_seconds"], (
        "; %.0f bytes per message" % res["bytes_per_message"]) if "bytes_per_message" in res else ""))
    if kind in COMPRESSED and not ctx.skip_compressed:
        # The seeded rows are text; compressed, they are what the default configuration stores.
        res["bytes_per_message_text"] = res["bytes_per_message"]
        t = time.monotonic()
        r = srv.prosodyctl("mod_mam_rs", "optimize", timeout=3600)
        too_few = "fewer than" in r.stdout and "rows stay as text" in r.stdout
        if r.returncode != 0 or "optimize: ok" not in r.stdout or not ("messages compressed" in r.stdout or too_few):
            raise RuntimeError("optimize failed: %s %s" % (r.stdout[-2000:], r.stderr[-2000:]))
        if too_few:  # as a default installation keeps so small an archive
            log("    too few rows to train a dictionary: the archive stays as text")
            return srv
        if kind == "rs-pg":
            # optimize rewrote every row: the old versions wait for VACUUM, which leaves their
            # space to new rows. VACUUM FULL packs the table as compressed rows written from
            # the start would have filled it.
            db.sql("VACUUM FULL ANALYZE mam_rs_messages;", database, timeout=600 + plan.rows / 1000)
        res["optimize_seconds"] = time.monotonic() - t
        res["db_bytes"] = size() - before
        res["bytes_per_message"] = res["db_bytes"] / plan.rows
        log("    compressed by `prosodyctl mod_mam_rs optimize` in %.1f s: %.0f bytes per message"
            % (res["optimize_seconds"], res["bytes_per_message"]))
    return srv


def archive_phase(ctx, kinds, plan, queries):
    res = {k: {} for k in kinds}
    servers = {}
    try:
        for kind in kinds:
            servers[kind] = seeded_server(ctx, kind, plan, res[kind])
        for kind in kinds:
            t = time.monotonic()
            servers[kind].start(timeout=120 + plan.rows / 5000)
            res[kind]["start_seconds"] = time.monotonic() - t
        asyncio.run(_archive_queries(ctx, servers, plan, queries, res))
        for kind in kinds:
            servers[kind].stop()
            a = res[kind]
            p = a["pages"]
            log("    %-5s pages p50 %s ms; heavy p50 %.1f ms; walk %.1f s; ping p99 idle %.2f ms, heavy %.2f ms%s" % (
                kind, ", ".join("%s %.1f" % (s, p[s]["p50"]) for s in SHAPES), a["heavy"]["p50"],
                a["walk"]["seconds"], a["ping"]["idle"]["p99"], a["ping"]["heavy"]["p99"],
                ("; PROBLEMS: %d, first: %s" % (len(a["problems"]), a["problems"][0])) if a["problems"] else ""))
        for kind in [k for k in kinds if k != "mem" and not ctx.skip_expiry]:
            log("[%s] expiry of %d messages ..." % (kind, plan.rows))
            e = res[kind]["expiry"] = expiry(ctx, kind, servers[kind], plan)
            log("    deleted %s in %.2f s; ping p99 before %.2f ms (n=%d), during %.2f ms (n=%d, max %.1f ms)" % (
                e["deleted"], e["seconds"], e["idle"]["p99"], e["idle"]["n"], e["during"]["p99"], e["during"]["n"],
                e["during"]["max"]))
    finally:
        for srv in servers.values():
            srv.remove(ctx.keep)
    return res


# ---------------------------------------------------------------------------------------------
# 3. expiry

RS_DELETED = re.compile(rb"Deleted (\d+) expired messages in ([\d.]+) s")
STOCK_DELETED = re.compile(rb"Deleted (\d+) expired messages")
TASK_STARTED = re.compile(rb"bench_run_task: \S+ started at ([\d.]+)")
TASK_FINISHED = re.compile(rb"bench_run_task: \S+ finished at ([\d.]+)")


def expiry(ctx, kind, srv, plan):
    after = ctx.expiry_idle + 2
    extra = [l for l in srv.extra if not l.startswith("archive_expires_after")]
    extra.append("archive_expires_after = 1800")
    if kind == "stock":
        srv.modules = ["mam", "bench_run_task"]
        extra += ['bench_run_task = "mam/remove_expired_messages"', "bench_run_task_after = %d" % after]
    else:
        extra += ["archive_cleanup_interval = %d" % after]
    offset = srv.log_size()
    srv.start(extra=extra)
    pinger = Pinger(srv.port, ctx.ping_interval)
    try:
        deadline = time.monotonic() + after + 600 + plan.rows / 1000
        end_seen = None
        while time.monotonic() < deadline:
            text = srv.log_bytes(offset)
            if (kind != "stock" and RS_DELETED.search(text)) or (kind == "stock" and TASK_FINISHED.search(text)):
                end_seen = time.time()
                break
            time.sleep(0.02)
        if end_seen is None:
            raise RuntimeError("[%s] no expiry in the log within the deadline:\n%s" % (
                kind, srv.log_bytes(offset)[-3000:].decode(errors="replace")))
        time.sleep(1.0)
    finally:
        samples = pinger.stop()
        srv.stop()
    text = srv.log_bytes(offset)
    if kind != "stock":
        m = RS_DELETED.search(text)
        deleted, took = int(m.group(1)), float(m.group(2))
        end = end_seen
        start = end - took
    else:
        start = float(TASK_STARTED.search(text).group(1))
        end = float(TASK_FINISHED.search(text).group(1))
        m = STOCK_DELETED.search(text)
        deleted, took = (int(m.group(1)) if m else None), end - start
    return {"deleted": deleted, "seconds": took, "idle": stats_ms(window(samples, pinger.ready_at, start - 0.5)),
            "during": stats_ms(window(samples, start, end)), "lost": lost(samples, 0, float("inf"))}


# ---------------------------------------------------------------------------------------------
# report


def machine():
    model = "?"
    mem = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = "%.0f GB" % (int(line.split()[1]) / 1024 / 1024)
                break
    except OSError:
        pass
    prosody = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "prosody"], capture_output=True,
                             text=True).stdout.strip() or "?"
    return {"nproc": os.cpu_count(), "cpu": model, "memory": mem, "kernel": platform.release(),
            "prosody": prosody, "python": platform.python_version()}


def on_label(kind):
    """What a database server kind adds to a figure's name: ' on PostgreSQL'."""
    return LABELS[kind][len(LABELS["rs"]):]


def build_rows(r):
    """(figure, stock, rs, reference, ratio, target, met) rows; values already formatted."""
    rows = []
    nan = float("nan")

    def g(*path):
        cur = r
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return nan
            cur = cur[p]
        return cur

    def fmt(v, nd):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if abs(v) >= 1000:
            return "{:,.0f}".format(v)
        return "%.*f" % (nd, v)

    def row(name, s, rs, ref, ratio=None, target=None, op=None, limit=None, nd=1, rnd=2):
        met = ""
        rtxt = ""
        if ratio is not None and not math.isnan(ratio):
            rtxt = "%.*f×" % (rnd, ratio)
            if op == "<=":
                met = "yes" if ratio <= limit else "**no**"
            elif op == ">=":
                met = "yes" if ratio >= limit else "**no**"
        rows.append((name, fmt(s, nd), fmt(rs, nd), fmt(ref, nd), rtxt, target or "", met))

    def ratio(a, b):
        try:
            return a / b
        except (TypeError, ZeroDivisionError):
            return nan

    tp = r.get("throughput", {})
    if tp:
        s, x, f = g("throughput", "stock", "rate"), g("throughput", "rs", "rate"), g("throughput", "floor", "rate")
        row("archived messages/s (floor: delivered/s)", s, x, f, ratio(x, s), "≥ 20× stock", ">=", 20, nd=0, rnd=1)
        s, x, f = (g("throughput", k, "cpu_ms_per_1000") for k in ("stock", "rs", "floor"))
        row("Prosody CPU per 1,000 messages, ms", s, x, f, ratio(x, f), "≤ 1.25× floor", "<=", 1.25, nd=0)
        for kind in [k for k in VARIANTS if k in tp]:
            on = on_label(kind)
            s, x, f = g("throughput", "stock", "rate"), g("throughput", kind, "rate"), g("throughput", "floor", "rate")
            row("archived messages/s, mod_mam_rs%s" % on, s, x, f, ratio(x, s), nd=0, rnd=1)
            s, x, f = (g("throughput", k, "cpu_ms_per_1000") for k in ("stock", kind, "floor"))
            row("Prosody CPU per 1,000 messages, mod_mam_rs%s, ms" % on, s, x, f, ratio(x, f), nd=0)
    q = r.get("archive", {})
    if q:
        for shape in SHAPES:
            for stat in ("p50", "p99"):
                s, x, m = (g("archive", k, "pages", shape, stat) for k in ("stock", "rs", "mem"))
                row("page '%s' %s, ms" % (shape, stat), s, x, m, ratio(x, m), "≤ 1.15× memory", "<=", 1.15, nd=2)
        for stat in ("p50", "p99"):
            s, x, m = (g("archive", k, "heavy", stat) for k in ("stock", "rs", "mem"))
            row("heavy query (whole-archive window + count) %s, ms" % stat, s, x, m, ratio(x, m), "≤ 1.5× memory",
                "<=", 1.5, nd=1)
        s, x, m = (g("archive", k, "walk", "seconds") for k in ("stock", "rs", "mem"))
        row("full walk, s", s, x, m, ratio(x, m), "≤ 1.2× memory", "<=", 1.2, nd=2)
        for stat in ("p50", "p99", "max"):
            s, x, m = (g("archive", k, "ping", "idle", stat) for k in ("stock", "rs", "mem"))
            row("other client's ping, idle, %s, ms" % stat, s, x, m, nd=2)
        for stat in ("p50", "p99", "max"):
            s, x, m = (g("archive", k, "ping", "heavy", stat) for k in ("stock", "rs", "mem"))
            if stat == "p99":
                row("ping during heavy queries, p99, ms (ratio: vs idle p99)", s, x, m,
                    ratio(x, g("archive", "rs", "ping", "idle", "p99")), "≤ 1.5× idle", "<=", 1.5, nd=2)
            else:
                row("ping during heavy queries, %s, ms" % stat, s, x, m, nd=2)
        if g("archive", "rs", "expiry", "seconds") == g("archive", "rs", "expiry", "seconds"):
            s, x = g("archive", "stock", "expiry", "seconds"), g("archive", "rs", "expiry", "seconds")
            row("expiry of the whole archive, s", s, x, None, nd=2)
            for stat in ("p50", "p99", "max"):
                s, x = g("archive", "stock", "expiry", "idle", stat), g("archive", "rs", "expiry", "idle", stat)
                row("ping before expiry, %s, ms" % stat, s, x, None, nd=2)
            for stat in ("p50", "p99", "max"):
                s, x = g("archive", "stock", "expiry", "during", stat), g("archive", "rs", "expiry", "during", stat)
                if stat == "p99":
                    row("ping during expiry, p99, ms (ratio: vs before)", s, x, None,
                        ratio(x, g("archive", "rs", "expiry", "idle", "p99")), "≤ 1.5× idle", "<=", 1.5, nd=2)
                else:
                    row("ping during expiry, %s, ms" % stat, s, x, None, nd=2)
        s, x = g("archive", "stock", "bytes_per_message"), g("archive", "rs", "bytes_per_message")
        row("bytes per message on disk", s, x, None, ratio(x, s), "≤ 0.33× stock", "<=", 1 / 3, nd=0)
        x = g("archive", "rs", "bytes_per_message_text")
        row("bytes per message, mod_mam_rs with archive_compression = false", s, x, None, ratio(x, s), nd=0)
    for kind in [k for k in VARIANTS if k in q]:
        # The same figures with mod_mam_rs's archive on a database server, or for the compared
        # build (stock's column: stock on SQLite).
        on = on_label(kind)
        for shape in SHAPES:
            for stat in ("p50", "p99"):
                s, x, m = (g("archive", k, "pages", shape, stat) for k in ("stock", kind, "mem"))
                row("page '%s' %s%s, ms" % (shape, stat, on), s, x, m, ratio(x, m), nd=2)
        for stat in ("p50", "p99"):
            s, x, m = (g("archive", k, "heavy", stat) for k in ("stock", kind, "mem"))
            row("heavy query %s%s, ms" % (stat, on), s, x, m, ratio(x, m), nd=1)
        s, x, m = (g("archive", k, "walk", "seconds") for k in ("stock", kind, "mem"))
        row("full walk%s, s" % on, s, x, m, ratio(x, m), nd=2)
        s, x, m = (g("archive", k, "ping", "heavy", "p99") for k in ("stock", kind, "mem"))
        row("ping during heavy queries, p99%s, ms (ratio: vs idle p99)" % on, s, x, m,
            ratio(x, g("archive", kind, "ping", "idle", "p99")), nd=2)
        if g("archive", kind, "expiry", "seconds") == g("archive", kind, "expiry", "seconds"):
            s, x = g("archive", "stock", "expiry", "seconds"), g("archive", kind, "expiry", "seconds")
            row("expiry of the whole archive%s, s" % on, s, x, None, nd=2)
            s, x = g("archive", "stock", "expiry", "during", "p99"), g("archive", kind, "expiry", "during", "p99")
            row("ping during expiry, p99%s, ms (ratio: vs before)" % on, s, x, None,
                ratio(x, g("archive", kind, "expiry", "idle", "p99")), nd=2)
        s, x = g("archive", "stock", "bytes_per_message"), g("archive", kind, "bytes_per_message")
        row("bytes per message%s (tables and indexes)" % on, s, x, None, ratio(x, s), nd=0)
        x = g("archive", kind, "bytes_per_message_text")
        if x == x:  # compressed there: its size as text too
            row("bytes per message%s with archive_compression = false" % on, s, x, None, ratio(x, s), nd=0)
    return rows


def markdown(r):
    m = r["meta"]
    out = ["# mod_mam_rs benchmark, %s" % m["date"], "",
           "Machine: %s cores, %s, %s RAM; Linux %s; Prosody %s. Command: `%s`. Took %.0f s." % (
               m["machine"]["nproc"], m["machine"]["cpu"], m["machine"]["memory"], m["machine"]["kernel"],
               m["machine"]["prosody"], m["command"], m["seconds"]), "",
           "Workload: %s. Ratios compare mod_mam_rs with the column the target names, measured in this run." % (
               m["workload"]), "",
           "| figure | stock mod_mam | mod_mam_rs | memory ref. / floor | ratio | target | met? |",
           "|---|---:|---:|---:|---:|---|---|"]
    for row in build_rows(r):
        out.append("| %s |" % " | ".join(row))
    notes = []
    for kind in KINDS:
        a = r.get("archive", {}).get(kind, {})
        if a.get("problems"):
            notes.append("- %s: %d wrong answers, first: %s" % (LABELS[kind], len(a["problems"]), a["problems"][0]))
    for kind in KINDS:
        t = r.get("throughput", {}).get(kind)
        if t and not t["ok"]:
            notes.append("- throughput %s: delivery or archive counts wrong (%s)" % (LABELS[kind], t))
    if notes:
        out += ["", "**Problems seen:**", ""] + notes
    cpu, split = [], []
    for kind in KINDS:
        t = r.get("throughput", {}).get(kind)
        if t:
            cpu.append("throughput %s: Prosody %.0f%%, load generator %.0f%%" % (
                LABELS[kind], t["server_cpu_pct"], t["client_cpu_pct"]))
            split.append("%s: main loop %.0f ms%s" % (LABELS[kind], t["main_loop_ms_per_1000"], "".join(
                ", %s %.0f ms" % (k, v) for k, v in sorted(t["threads_ms_per_1000"].items()) if v >= 0.5)))
    walk = []
    for kind in KINDS:
        a = r.get("archive", {}).get(kind)
        if a and "walk" in a:
            w = a["walk"]
            walk.append("%s %.1f s%s over %.1f s of round trips" % (
                LABELS[kind], w["server_cpu"], (" (main loop %.1f s)" % w["main_loop_cpu"]) if "main_loop_cpu" in w else "",
                w["seconds"]))
    if walk:
        lg = next((a["walk"]["load_generator"] for a in r.get("archive", {}).values() if "load_generator" in
                   a.get("walk", {})), None)
        cpu.append("Prosody CPU during the walk: " + ", ".join(walk) + (
            "; load generator %.1f s over the walk's %.1f s" % (lg["client_cpu"], lg["wall"]) if lg else ""))
    if split:
        out += ["", "Prosody CPU per 1,000 messages by thread: " + "; ".join(split) + "."]
    if cpu:
        out += ["", "CPU (% of one core over the phase; the load generator is this benchmark's own process): "
                + "; ".join(cpu) + "."]
    return "\n".join(out) + "\n"


def plot(r, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"floor": "#999999", "stock": "#d95f02", "rs": "#1b9e77", "mem": "#7570b3", "rs-pg": "#66a61e", "rs-my": "#e6ab02",
               "rs-b": "#e7298a"}
    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    axes = axes.ravel()
    m = r["meta"]
    import textwrap
    fig.suptitle("stock mod_mam vs mod_mam_rs (and the references), %s; %s cores, %s, Prosody %s\n%s" % (
        m["date"], m["machine"]["nproc"], m["machine"]["cpu"], m["machine"]["prosody"],
        "\n".join(textwrap.wrap(m["workload"], 170))), fontsize=10)

    def bars(ax, title, groups, kinds, values, ylabel, log_y=False):
        import numpy as np
        x = np.arange(len(groups))
        w = 0.8 / len(kinds)
        for i, k in enumerate(kinds):
            vals = [values(k, gname) for gname in groups]
            vals = [v if v is not None and v == v else 0 for v in vals]
            b = ax.bar(x + (i - (len(kinds) - 1) / 2) * w, vals, w, label=LABELS[k], color=colours[k])
            for rect, v in zip(b, vals):
                if v:
                    ax.annotate(("%.0f" % v) if v >= 100 else ("%.1f" % v) if v >= 1 else ("%.2f" % v),
                                (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                                ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x)
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
        if log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=7)

    def get(*path):
        cur = r
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur

    if r.get("throughput"):
        kinds = [k for k in KINDS if k in r["throughput"]]
        bars(axes[0], "archived messages/s (higher is better)", ["messages/s"], kinds,
             lambda k, _: get("throughput", k, "rate"), "messages/s", log_y=True)
        bars(axes[1], "Prosody CPU per 1,000 messages", ["CPU ms"], kinds,
             lambda k, _: get("throughput", k, "cpu_ms_per_1000"), "ms")
    if r.get("archive"):
        kinds = [k for k in KINDS if k in r["archive"]]
        bars(axes[2], "page latency p50 (max=50, with <count>)", list(SHAPES), kinds,
             lambda k, s: get("archive", k, "pages", s, "p50"), "ms")
        bars(axes[3], "page latency p99", list(SHAPES), kinds,
             lambda k, s: get("archive", k, "pages", s, "p99"), "ms")
        bars(axes[4], "heavy query (window over the whole archive + count)", ["p50", "p99"], kinds,
             lambda k, s: get("archive", k, "heavy", s), "ms")
        bars(axes[5], "full walk of the archive", ["walk"], kinds,
             lambda k, _: get("archive", k, "walk", "seconds"), "seconds")
        groups = ["idle", "heavy queries", "before expiry", "during expiry"]

        def ping(k, gname):
            if gname == "idle":
                return get("archive", k, "ping", "idle", "p99")
            if gname == "heavy queries":
                return get("archive", k, "ping", "heavy", "p99")
            if gname == "before expiry":
                return get("archive", k, "expiry", "idle", "p99")
            return get("archive", k, "expiry", "during", "p99")

        bars(axes[6], "other client's ping p99", groups, kinds, ping, "ms", log_y=True)
        bars(axes[7], "bytes per message on disk", ["default", "compression off"],
             [k for k in kinds if k != "mem"],
             # Stock and MySQL/MariaDB store text either way.
             lambda k, s: get("archive", k, "bytes_per_message" if s == "default" or k not in COMPRESSED
                              else "bytes_per_message_text"), "bytes")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# main


class Ctx:
    pass


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench_vs_stock.py",
                                 description="stock mod_mam vs mod_mam_rs vs an in-memory reference, side by side")
    ap.add_argument("--rows", type=int, default=50_000, help="seeded archive size (1000000 for the record)")
    ap.add_argument("--plugin-dir", default=str(REPO / "build" / "plugins" / "mod_mam_rs"),
                    help="directory holding mod_mam_rs.lua, commands.lib.lua and mam_rs_native.so")
    ap.add_argument("--workdir", default="/var/tmp/mam-bench",
                    help="where the servers' temp dirs go (real disk by default: fsync costs count)")
    ap.add_argument("--results-dir", default=str(REPO / "benches" / "results"))
    ap.add_argument("--clients", type=int, default=10, help="throughput: clients")
    ap.add_argument("--msgs", type=int, default=300, help="throughput: messages each client sends")
    ap.add_argument("--burst", type=int, default=50, help="throughput: messages per burst before a ping")
    ap.add_argument("--samples", type=int, default=100, help="queries of each page shape")
    ap.add_argument("--idle", type=float, default=15.0, help="seconds of idle pings per module (over all rounds)")
    ap.add_argument("--heavy", type=float, default=15.0,
                    help="seconds of back-to-back heavy queries per module (over all rounds)")
    ap.add_argument("--walk-max", type=int, default=250, help="page size of the full walk")
    ap.add_argument("--ping-interval", type=float, default=0.02, help="the other client's ping interval, s")
    ap.add_argument("--rounds", type=int, default=3,
                    help="throughput runs per module, and idle/heavy windows per module, alternating between modules")
    ap.add_argument("--expiry-idle", type=float, default=8.0, help="seconds of pings before expiry starts")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default="floor,stock,rs,mem",
                    help="comma-separated subset of floor, stock, rs, mem (for development; ratios need all)")
    ap.add_argument("--postgres", action="store_true",
                    help="every phase also with mod_mam_rs's archive on a throwaway PostgreSQL (Debian's package)")
    ap.add_argument("--mariadb", action="store_true",
                    help="every phase also with mod_mam_rs's archive on a throwaway MariaDB (Debian's package)")
    ap.add_argument("--compare-dir", metavar="DIR",
                    help="every phase also with the mod_mam_rs build in DIR (a directory named mod_mam_rs, as "
                         "--plugin-dir), on the same SQLite setup, its queries interleaved with the others': "
                         "two builds side by side under the same load")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-archive", action="store_true")
    ap.add_argument("--skip-expiry", action="store_true")
    ap.add_argument("--skip-compressed", action="store_true", help="query mod_mam_rs's seeded rows as text: no `optimize` to compress them "
                    "(as the default configuration stores them), no default size figure")
    ap.add_argument("--config", action="append", default=[], metavar="LINE",
                    help="a line added to every server's configuration, such as "
                         "'gc = { mode = \"generational\" }' (repeatable)")
    ap.add_argument("--no-save", action="store_true", help="print the table only; write no results folder")
    ap.add_argument("--keep", action="store_true", help="keep the servers' work dirs")
    ap.add_argument("--render", metavar="DIR",
                    help="only write DIR/results.md and DIR/results.png again from DIR/results.json")
    args = ap.parse_args(argv)

    if args.render:
        d = Path(args.render)
        r = json.loads((d / "results.json").read_text())
        md = markdown(r)
        (d / "results.md").write_text(md)
        plot(r, d / "results.png")
        print(md)
        return 0
    only = set(args.only.split(","))
    ctx = Ctx()
    for k, v in vars(args).items():
        setattr(ctx, k, v)
    ctx.db_servers = {}
    on_servers = (["rs-pg"] if args.postgres else []) + (["rs-my"] if args.mariadb else []) + (
        ["rs-b"] if args.compare_dir else [])
    ctx.plugin_dir = Path(args.plugin_dir).resolve()
    ctx.compare_dir = Path(args.compare_dir).resolve() if args.compare_dir else None
    for d in [ctx.plugin_dir] + ([ctx.compare_dir] if ctx.compare_dir else []):
        if d.name != "mod_mam_rs":
            sys.exit("a plugin directory must be named mod_mam_rs (Prosody's plugin layout): %s" % d)
        for f in ("mod_mam_rs.lua", "commands.lib.lua", "mam_rs_native.so"):
            if not (d / f).exists():
                sys.exit("%s missing in %s: run `make build` first" % (f, d))

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    import tempfile
    ctx.root = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    cmd = " ".join(["bench_vs_stock.py"] + (sys.argv[1:] if argv is None else list(argv)))
    started = time.monotonic()
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    log("mod_mam_rs benchmark %s; plugin %s; work dir %s" % (date, ctx.plugin_dir, ctx.root))
    r = {"meta": {"date": date, "command": cmd, "machine": machine(), "plugin_dir": str(ctx.plugin_dir),
                  "params": {k: v for k, v in vars(args).items() if k not in ("keep", "no_save")}}}
    r["meta"]["workload"] = "%d clients × %d messages, median of %d rounds; %s-message archive, %d contacts; " \
                            "%d queries per page shape; idle %gs and heavy %gs per module in %d rounds; walk " \
                            "max=%d; ping every %g ms" % (
                                args.clients, args.msgs, args.rounds, "{:,}".format(args.rows), seeding.CONTACTS,
                                args.samples, args.idle, args.heavy, args.rounds, args.walk_max,
                                args.ping_interval * 1e3)
    try:
        # Accounts once; each server gets a copy of this data dir.
        acc = Server(ctx.root, "accounts", [], ctx.plugin_dir, common_config(ctx))
        acc.register(["alice", "bob"] + ["u%d" % i for i in range(args.clients)])
        ctx.accounts = acc.data

        if not args.skip_throughput:
            kinds = [k for k in ("floor", "stock", "rs") if k in only] + on_servers
            log("throughput: %d clients × %d messages, %d rounds on each of %s ..." % (
                args.clients, args.msgs, args.rounds, ", ".join(kinds)))
            r["throughput"] = throughput(ctx, kinds)
        if not args.skip_archive:
            plan = seeding.Plan(args.rows, args.seed)
            queries = query_plan(ctx, plan)
            kinds = [k for k in ("stock", "rs", "mem") if k in only] + on_servers
            r["archive"] = archive_phase(ctx, kinds, plan, queries)
    finally:
        for db in ctx.db_servers.values():
            db.close()
        if not args.keep:
            shutil.rmtree(ctx.root, ignore_errors=True)
    r["meta"]["seconds"] = time.monotonic() - started

    md = markdown(r)
    print()
    print(md)
    if not args.no_save:
        out = Path(args.results_dir) / datetime.datetime.now().strftime("%Y-%m-%d_%H%M")
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(md)
        (out / "results.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
        plot(r, out / "results.png")
        shutil.copyfile(out / "results.md", Path(args.results_dir) / "latest.md")
        shutil.copyfile(out / "results.png", Path(args.results_dir) / "latest.png")
        shutil.copyfile(out / "results.json", Path(args.results_dir) / "latest.json")
        log("written: %s/results.{md,json,png} and %s/latest.*" % (out, args.results_dir))
    return 0
