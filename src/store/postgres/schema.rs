//! The PostgreSQL schema: the module's own tables (prefixed `mam_rs_`, so they sit beside
//! Prosody's `prosody` and `prosodyarchive` in the admin's database) and the migration runner.
//!
//! The version lives in `mam_rs_schema`. [`MIGRATIONS`] is the list of steps; step `i` moves a
//! database from version `i` to `i + 1`. Steps run in one transaction under an advisory lock,
//! so several Prosody processes starting together migrate once. A newer database is refused.

use crate::store::StoreError;
use postgres::Client;

/// Step `i` moves the schema from version `i` to version `i + 1`.
const MIGRATIONS: &[&str] = &[V1, V2, V3, V4];

/// The schema version this code writes and understands.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Any fixed number: the advisory lock that serialises migrations.
const MIGRATION_LOCK: i64 = 0x6d61_6d5f_7273; // "mam_rs"

/// Version 1: the same model as the SQLite store (see `store::sqlite::schema`).
///
/// - Archives and JIDs are interned; message rows refer to them by integer.
/// - `(aid, id)` and `(aid, with_id, id)` are the two query paths.
/// - `item_count` is kept by statement-level triggers (one update per archive per statement,
///   not per row), so an unfiltered total is one row read.
/// - `legacy_ids` keeps the stock ids of imported messages; a trigger removes them with their
///   rows.
const V1: &str = r#"
CREATE TABLE mam_rs_archives (
    aid        BIGSERIAL PRIMARY KEY,
    host       TEXT NOT NULL,
    username   TEXT NOT NULL,
    store      TEXT NOT NULL,
    item_count BIGINT NOT NULL DEFAULT 0,
    UNIQUE (host, username, store)
);
CREATE TABLE mam_rs_jids (
    jid_id BIGSERIAL PRIMARY KEY,
    jid    TEXT NOT NULL UNIQUE
);
CREATE TABLE mam_rs_messages (
    id      BIGINT PRIMARY KEY,
    aid     BIGINT NOT NULL REFERENCES mam_rs_archives (aid),
    with_id BIGINT NOT NULL REFERENCES mam_rs_jids (jid_id),
    stanza  TEXT NOT NULL
);
CREATE INDEX mam_rs_messages_by_archive ON mam_rs_messages (aid, id);
CREATE INDEX mam_rs_messages_by_with ON mam_rs_messages (aid, with_id, id);
CREATE TABLE mam_rs_legacy_ids (
    id  BIGINT PRIMARY KEY,
    aid BIGINT NOT NULL REFERENCES mam_rs_archives (aid),
    key TEXT NOT NULL,
    UNIQUE (aid, key)
);
CREATE TABLE mam_rs_imports (
    source   TEXT NOT NULL,
    aid      BIGINT NOT NULL REFERENCES mam_rs_archives (aid),
    position BIGINT NOT NULL,
    last_id  BIGINT NOT NULL,
    PRIMARY KEY (source, aid)
);
CREATE TABLE mam_rs_client_marks (
    aid     BIGINT NOT NULL REFERENCES mam_rs_archives (aid),
    client  TEXT NOT NULL,
    last_id BIGINT NOT NULL,
    seen    BIGINT NOT NULL,
    PRIMARY KEY (aid, client)
);

CREATE FUNCTION mam_rs_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mam_rs_archives a SET item_count = a.item_count + n.c
    FROM (SELECT aid, count(*) AS c FROM new_rows GROUP BY aid) n WHERE a.aid = n.aid;
    RETURN NULL;
END $$;
CREATE FUNCTION mam_rs_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mam_rs_archives a SET item_count = a.item_count - o.c
    FROM (SELECT aid, count(*) AS c FROM old_rows GROUP BY aid) o WHERE a.aid = o.aid;
    DELETE FROM mam_rs_legacy_ids WHERE id IN (SELECT id FROM old_rows);
    RETURN NULL;
END $$;
CREATE TRIGGER mam_rs_messages_count_insert AFTER INSERT ON mam_rs_messages
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION mam_rs_count_insert();
CREATE TRIGGER mam_rs_messages_count_delete AFTER DELETE ON mam_rs_messages
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION mam_rs_count_delete();
"#;

/// Version 2: the number of rows per (archive, contact), kept by the same statement-level
/// triggers as `item_count`, so that the `<count>` of a query `with` one contact is one row read
/// (see `store::sqlite::schema`, version 4). The messages table is locked while the totals are
/// filled in, so that a process still running the previous version cannot insert rows the
/// totals miss; the upserts go in key order, so two writers cannot deadlock on them.
const V2: &str = r#"
LOCK TABLE mam_rs_messages IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE mam_rs_with_counts (
    aid        BIGINT NOT NULL,
    with_id    BIGINT NOT NULL,
    item_count BIGINT NOT NULL,
    PRIMARY KEY (aid, with_id)
);
INSERT INTO mam_rs_with_counts (aid, with_id, item_count)
    SELECT aid, with_id, count(*) FROM mam_rs_messages GROUP BY aid, with_id;

CREATE OR REPLACE FUNCTION mam_rs_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mam_rs_archives a SET item_count = a.item_count + n.c
    FROM (SELECT aid, count(*) AS c FROM new_rows GROUP BY aid) n WHERE a.aid = n.aid;
    INSERT INTO mam_rs_with_counts AS w (aid, with_id, item_count)
        SELECT aid, with_id, count(*) FROM new_rows GROUP BY aid, with_id ORDER BY aid, with_id
    ON CONFLICT (aid, with_id) DO UPDATE SET item_count = w.item_count + EXCLUDED.item_count;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION mam_rs_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mam_rs_archives a SET item_count = a.item_count - o.c
    FROM (SELECT aid, count(*) AS c FROM old_rows GROUP BY aid) o WHERE a.aid = o.aid;
    UPDATE mam_rs_with_counts w SET item_count = w.item_count - o.c
    FROM (SELECT aid, with_id, count(*) AS c FROM old_rows GROUP BY aid, with_id) o
    WHERE w.aid = o.aid AND w.with_id = o.with_id;
    DELETE FROM mam_rs_legacy_ids WHERE id IN (SELECT id FROM old_rows);
    RETURN NULL;
END $$;
"#;

/// Version 3: `archive_compression` (see `store::codec`). A compressed row has its stanza in
/// `zstanza` and an empty `stanza`: not NULL, so that a process still running version 2 reads
/// it as text rather than failing. Dictionaries are never changed once written. Adding a
/// nullable column rewrites nothing.
const V3: &str = r#"
CREATE TABLE mam_rs_dictionaries (
    dict_id SMALLINT PRIMARY KEY,
    dict    BYTEA NOT NULL
);
ALTER TABLE mam_rs_messages ADD COLUMN zstanza BYTEA;
"#;

/// Version 4: the number of rows per (archive, minute of 2^26 µs), kept by the same triggers,
/// so that a time window's `<count>` is the sum of its whole minutes plus the rows of the two
/// at its ends (see `store::sqlite::schema`, version 5; `37` is `rows::MINUTE_SHIFT`). A minute
/// whose rows are all gone loses its row. Filled under the same lock as version 2's totals.
const V4: &str = r#"
LOCK TABLE mam_rs_messages IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE mam_rs_minute_counts (
    aid        BIGINT NOT NULL,
    minute     BIGINT NOT NULL,
    item_count BIGINT NOT NULL,
    PRIMARY KEY (aid, minute)
);
INSERT INTO mam_rs_minute_counts (aid, minute, item_count)
    SELECT aid, id >> 37, count(*) FROM mam_rs_messages GROUP BY aid, id >> 37;

CREATE OR REPLACE FUNCTION mam_rs_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mam_rs_archives a SET item_count = a.item_count + n.c
    FROM (SELECT aid, count(*) AS c FROM new_rows GROUP BY aid) n WHERE a.aid = n.aid;
    INSERT INTO mam_rs_with_counts AS w (aid, with_id, item_count)
        SELECT aid, with_id, count(*) FROM new_rows GROUP BY aid, with_id ORDER BY aid, with_id
    ON CONFLICT (aid, with_id) DO UPDATE SET item_count = w.item_count + EXCLUDED.item_count;
    INSERT INTO mam_rs_minute_counts AS m (aid, minute, item_count)
        SELECT aid, id >> 37, count(*) FROM new_rows GROUP BY aid, id >> 37 ORDER BY 1, 2
    ON CONFLICT (aid, minute) DO UPDATE SET item_count = m.item_count + EXCLUDED.item_count;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION mam_rs_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mam_rs_archives a SET item_count = a.item_count - o.c
    FROM (SELECT aid, count(*) AS c FROM old_rows GROUP BY aid) o WHERE a.aid = o.aid;
    UPDATE mam_rs_with_counts w SET item_count = w.item_count - o.c
    FROM (SELECT aid, with_id, count(*) AS c FROM old_rows GROUP BY aid, with_id) o
    WHERE w.aid = o.aid AND w.with_id = o.with_id;
    UPDATE mam_rs_minute_counts m SET item_count = m.item_count - o.c
    FROM (SELECT aid, id >> 37 AS minute, count(*) AS c FROM old_rows GROUP BY 1, 2) o
    WHERE m.aid = o.aid AND m.minute = o.minute;
    DELETE FROM mam_rs_minute_counts m
    WHERE m.item_count = 0 AND (m.aid, m.minute) IN (SELECT aid, id >> 37 FROM old_rows);
    DELETE FROM mam_rs_legacy_ids WHERE id IN (SELECT id FROM old_rows);
    RETURN NULL;
END $$;
"#;

/// Brings the database up to [`SCHEMA_VERSION`] in one transaction, or refuses a newer one.
/// Returns the version it had.
pub fn migrate(client: &mut Client) -> Result<i32, StoreError> {
    let open_err = |e: postgres::Error| StoreError::Open(format!("schema migration failed: {e}"));
    let mut tx = client.transaction().map_err(open_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(open_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS mam_rs_schema (version INTEGER NOT NULL)")
        .map_err(open_err)?;
    let found: i32 = tx
        .query_opt("SELECT version FROM mam_rs_schema", &[])
        .map_err(open_err)?
        .map_or(0, |row| row.get(0));
    if found > SCHEMA_VERSION {
        return Err(StoreError::Open(format!(
            "the database has mod_mam_rs schema version {found}, newer than the {SCHEMA_VERSION} \
             this build knows; upgrade mod_mam_rs or use another database"
        )));
    }
    for step in &MIGRATIONS[found as usize..] {
        tx.batch_execute(step).map_err(open_err)?;
    }
    if found < SCHEMA_VERSION {
        tx.execute("DELETE FROM mam_rs_schema", &[])
            .map_err(open_err)?;
        tx.execute(
            "INSERT INTO mam_rs_schema (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )
        .map_err(open_err)?;
    }
    tx.commit().map_err(open_err)?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    #[test]
    fn minutes_are_counted_by_the_shift_the_queries_use() {
        let shift = format!("id >> {}", crate::store::rows::MINUTE_SHIFT);
        assert_eq!(
            super::V4.matches("id >> ").count(),
            super::V4.matches(&shift).count()
        );
    }
}
