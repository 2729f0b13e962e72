"""The seeded archive: one user's (alice's) messages with CONTACTS contacts, written straight into
each module's database file (and, for the in-memory reference, a seed file it loads at start).

Every module gets the same rows: the same times, contacts, directions and message text. Rows
are spread evenly over five days that end an hour before seeding, so that a 30-minute
`archive_expires_after` expires all of them.
"""

import os
import random
import sqlite3
import time
import uuid

HOST = "localhost"
USER = "alice"
CONTACTS = 10
SPAN = 5 * 86400.0
ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
SEQ_BITS = 11  # src/id.rs


class Plan:
    """Row i: when[i] (Unix seconds, float, increasing), contact[i], outgoing[i]."""

    def __init__(self, rows, seed):
        rng = random.Random(seed)
        self.rows = rows
        self.end = time.time() - 3600
        self.start = self.end - SPAN
        step = SPAN / rows
        self.when = [self.start + i * step for i in range(rows)]
        self.contact = [rng.randrange(CONTACTS) for _ in range(rows)]
        self.per_contact = [0] * CONTACTS
        for c in self.contact:
            self.per_contact[c] += 1
        # mod_mam_rs ids (and the in-memory reference's): (micros << 11) | seq, increasing.
        ids, prev = [], 0
        for w in self.when:
            v = max(int(w * 1e6) << SEQ_BITS, prev + 1)
            prev = v
            ids.append(v)
        self.rs_ints = ids
        self.rs_ids = [rs_id_text(v) for v in ids]
        urng = random.Random(seed + 1)
        self.stock_ids = [str(uuid.UUID(int=urng.getrandbits(128), version=4)) for _ in range(rows)]

    def outgoing(self, i):
        return bool(i & 1)

    def count_between(self, start, end, stock=False):
        """Rows with start <= when <= end, as each store compares: stock keeps whole seconds."""
        import bisect
        if stock:
            # when is stored as int(when): int(w) >= start <=> w >= start (start whole), int(w) <= end <=> w < end + 1
            return bisect.bisect_left(self.when, end + 1) - bisect.bisect_left(self.when, start)
        return bisect.bisect_right(self.when, end) - bisect.bisect_left(self.when, start)


def rs_id_text(v):
    """mod_mam_rs id text form (src/id.rs): 13 characters of Crockford base32, lower case."""
    out = []
    for _ in range(13):
        out.append(ALPHABET[v & 31])
        v >>= 5
    return "".join(reversed(out))


def contact_jid(c):
    return "c%d@%s" % (c, HOST)


def body_text(i):
    return "archived message number %d, padded to a realistic chat length: lorem ipsum dolor sit amet" % i


def parties(plan, i):
    peer = contact_jid(plan.contact[i])
    if plan.outgoing(i):
        return "%s@%s/bench" % (USER, HOST), peer
    return peer + "/phone", "%s@%s" % (USER, HOST)


def stanza_xml(plan, i, xmlns):
    frm, to = parties(plan, i)
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
    """Rows as mod_storage_sql 0.12 writes them: stanza without xmlns, `when` in whole seconds."""
    db = sqlite3.connect(str(db_path))
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA cache_size = -1000000")
    db.executescript(STOCK_DDL)  # IF NOT EXISTS: a no-op when Prosody created them

    def rows():
        for i in range(plan.rows):
            yield (HOST, USER, "archive", plan.stock_ids[i], int(plan.when[i]), contact_jid(plan.contact[i]), "xml",
                   stanza_xml(plan, i, False))

    with db:
        db.executemany('INSERT INTO "prosodyarchive" ("host","user","store","key","when","with","type","value") '
                       "VALUES (?,?,?,?,?,?,?,?)", rows())
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def seed_rs(db_path, plan):
    """Rows as mod_mam_rs writes them (src/store/sqlite/schema.rs): the module created the schema
    when it was started once on this data dir."""
    db = sqlite3.connect(str(db_path))
    ver = db.execute("PRAGMA user_version").fetchone()[0]
    if ver < 1:
        raise RuntimeError("mod_mam_rs did not create its schema in %s" % db_path)
    cols = {r[1]: r for r in db.execute("PRAGMA table_info(messages)")}
    needed = {"id", "aid", "with_id", "stanza"}
    extra = [c for c, r in cols.items() if c not in needed and r[3] and r[4] is None]
    if not needed <= set(cols) or extra:
        raise RuntimeError("mod_mam_rs's messages table changed (schema version %d, columns %s): update "
                           "tests/e2e/bench/seed.py" % (ver, sorted(cols)))
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA cache_size = -1000000")
    with db:
        db.execute("INSERT OR IGNORE INTO archives (host, user, store) VALUES (?, ?, 'archive')", (HOST, USER))
        aid = db.execute("SELECT aid FROM archives WHERE host=? AND user=? AND store='archive'",
                         (HOST, USER)).fetchone()[0]
        jid_ids = []
        for c in range(CONTACTS):
            db.execute("INSERT OR IGNORE INTO jids (jid) VALUES (?)", (contact_jid(c),))
            jid_ids.append(db.execute("SELECT jid_id FROM jids WHERE jid = ?", (contact_jid(c),)).fetchone()[0])
        last = db.execute("SELECT max(id) FROM messages").fetchone()[0] or 0
        if last >= plan.rs_ints[0]:
            raise RuntimeError("the mod_mam_rs database already has newer rows")

        def rows():
            for i in range(plan.rows):
                yield (plan.rs_ints[i], aid, jid_ids[plan.contact[i]], stanza_xml(plan, i, True))

        db.executemany("INSERT INTO messages (id, aid, with_id, stanza) VALUES (?,?,?,?)", rows())
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def check_server_schema(db, database, engine, in_this_database):
    """Refuses a messages table that has columns this seeding does not fill."""
    ver = db.sql("SELECT version FROM mam_rs_schema;", database)
    cols = {r[0]: r for r in db.sql("SELECT column_name, is_nullable, column_default FROM information_schema.columns "
                                    "WHERE %stable_name = 'mam_rs_messages';" % in_this_database, database)}
    needed = {"id", "aid", "with_id", "stanza"}
    extra = [c for c, r in cols.items() if c not in needed and r[1] == "NO" and r[2] is None]
    if not ver or not needed <= set(cols) or extra:
        raise RuntimeError("mod_mam_rs's %s messages table changed (schema %s, columns %s): update "
                           "tests/e2e/bench/seed.py" % (engine, ver, sorted(cols)))


PG_TABLES = ("mam_rs_archives", "mam_rs_jids", "mam_rs_messages", "mam_rs_legacy_ids", "mam_rs_imports",
             "mam_rs_client_marks", "mam_rs_with_counts", "mam_rs_minute_counts", "mam_rs_dictionaries")


def pg_archive_bytes(db, database):
    """Bytes of mod_mam_rs's tables in PostgreSQL, indexes and TOAST included."""
    names = ", ".join("'%s'" % t for t in PG_TABLES)
    return int(db.sql("SELECT coalesce(sum(pg_total_relation_size(oid)), 0) FROM pg_class "
                      "WHERE relkind = 'r' AND relname IN (%s);" % names, database)[0][0])


def seed_rs_postgres(db, database, plan, tsv_path):
    """The same rows as seed_rs, in mod_mam_rs's PostgreSQL schema (src/store/postgres/schema.rs),
    with COPY; the module created the schema when it was started once on this database. Its
    triggers keep the totals, as they do for the module's own inserts. Ends with VACUUM ANALYZE,
    as autovacuum would have left a long-lived archive."""
    check_server_schema(db, database, "PostgreSQL", "")
    aid = db.sql("INSERT INTO mam_rs_archives (host, username, store) VALUES ('%s', '%s', 'archive') "
                 "ON CONFLICT (host, username, store) DO UPDATE SET store = EXCLUDED.store RETURNING aid;"
                 % (HOST, USER), database)[0][0]
    jid_ids = []
    for c in range(CONTACTS):
        jid_ids.append(db.sql("INSERT INTO mam_rs_jids (jid) VALUES ('%s') ON CONFLICT (jid) DO UPDATE "
                              "SET jid = EXCLUDED.jid RETURNING jid_id;" % contact_jid(c), database)[0][0])
    last = db.sql("SELECT coalesce(max(id), 0) FROM mam_rs_messages;", database)[0][0]
    if int(last) >= plan.rs_ints[0]:
        raise RuntimeError("the mod_mam_rs database already has newer rows")
    with open(tsv_path, "w") as f:
        for i in range(plan.rows):
            # COPY's text format: the stanzas hold no tab, newline or backslash.
            f.write("%d\t%s\t%s\t%s\n" % (plan.rs_ints[i], aid, jid_ids[plan.contact[i]], stanza_xml(plan, i, True)))
    try:
        db.sql("\\copy mam_rs_messages (id, aid, with_id, stanza) FROM '%s'" % tsv_path, database,
               timeout=600 + plan.rows / 1000)
    finally:
        os.unlink(tsv_path)
    db.sql("VACUUM ANALYZE;", database, timeout=600 + plan.rows / 1000)


def mysql_archive_bytes(db, database):
    """Bytes of mod_mam_rs's tables in MySQL/MariaDB, indexes included (InnoDB's figures, as
    of the last ANALYZE TABLE)."""
    return int(db.sql("SELECT coalesce(sum(data_length + index_length), 0) FROM information_schema.tables "
                      "WHERE table_schema = DATABASE() AND table_name LIKE 'mam\\_rs\\_%';", database)[0][0])


def seed_rs_mysql(db, database, plan, sql_path):
    """The same rows as seed_rs, in mod_mam_rs's MySQL/MariaDB schema (src/store/mysql/schema.rs),
    as multi-row INSERTs; the module created the schema when it was started once on this
    database. There the store keeps the totals itself, so they are set here as it would have
    left them. Ends with ANALYZE TABLE."""
    check_server_schema(db, database, "MySQL", "table_schema = DATABASE() AND ")
    db.sql("INSERT IGNORE INTO mam_rs_archives (host, username, store) VALUES ('%s', '%s', 'archive');"
           % (HOST, USER), database)
    aid = db.sql("SELECT aid FROM mam_rs_archives WHERE host = '%s' AND username = '%s' AND store = 'archive';"
                 % (HOST, USER), database)[0][0]
    db.sql("INSERT IGNORE INTO mam_rs_jids (jid) VALUES %s;"
           % ", ".join("('%s')" % contact_jid(c) for c in range(CONTACTS)), database)
    by_jid = dict(db.sql("SELECT jid, jid_id FROM mam_rs_jids;", database))
    jid_ids = [by_jid[contact_jid(c)] for c in range(CONTACTS)]
    last = db.sql("SELECT coalesce(max(id), 0) FROM mam_rs_messages;", database)[0][0]
    if int(last) >= plan.rs_ints[0]:
        raise RuntimeError("the mod_mam_rs database already has newer rows")
    # Schema 4 and later (an older build, as --plugin-dir, has no counts per minute).
    minutes = db.sql("SELECT count(*) FROM information_schema.tables WHERE table_schema = DATABASE() "
                     "AND table_name = 'mam_rs_minute_counts';", database)[0][0] != "0"
    with open(sql_path, "w") as f:
        for start in range(0, plan.rows, 1000):
            f.write("INSERT INTO mam_rs_messages (id, aid, with_id, stanza) VALUES %s;\n" % ",".join(
                "(%d,%s,%s,'%s')" % (plan.rs_ints[i], aid, jid_ids[plan.contact[i]],
                                     stanza_xml(plan, i, True).replace("\\", "\\\\").replace("'", "''"))
                for i in range(start, min(start + 1000, plan.rows))))
        f.write("UPDATE mam_rs_archives SET item_count = (SELECT count(*) FROM mam_rs_messages WHERE aid = %s) "
                "WHERE aid = %s;\n" % (aid, aid))
        f.write("REPLACE INTO mam_rs_with_counts (aid, with_id, item_count) SELECT aid, with_id, count(*) "
                "FROM mam_rs_messages WHERE aid = %s GROUP BY aid, with_id;\n" % aid)
        if minutes:
            f.write("REPLACE INTO mam_rs_minute_counts (aid, minute, item_count) SELECT aid, id >> 37, count(*) "
                    "FROM mam_rs_messages WHERE aid = %s GROUP BY aid, id >> 37;\n" % aid)
        f.write("ANALYZE TABLE mam_rs_messages, mam_rs_archives, mam_rs_with_counts, %smam_rs_jids;\n"
                % ("mam_rs_minute_counts, " if minutes else ""))
    try:
        db.sql("source %s" % sql_path, database, timeout=600 + plan.rows / 500)
    finally:
        os.unlink(sql_path)


def seed_memory_ref(path, plan):
    """The seed file of mod_mam_memory_ref (tests/e2e/plugins): one tab-separated row per line."""
    with open(path, "w") as f:
        for i in range(plan.rows):
            frm, to = parties(plan, i)
            f.write("%s\t%s\t%.6f\t%s\t%s\t%s\tchat\tseed-%d\t%s\n" % (
                USER, plan.rs_ids[i], plan.when[i], contact_jid(plan.contact[i]), frm, to, i, body_text(i)))
