//! The SQLite schema: connection settings, the tables, and the migration runner.
//!
//! The schema version lives in `PRAGMA user_version`. [`MIGRATIONS`] is the list of steps;
//! step `i` moves a file from version `i` to `i + 1`, so a new version is one new function
//! appended to that list. A file whose version is newer than the code is refused, never
//! touched. This module does not read or write archive rows.

use super::SqliteOptions;
use crate::store::StoreError;
use rusqlite::{Connection, Transaction, TransactionBehavior};

/// One schema step, run inside the migration transaction.
type Migration = fn(&Transaction<'_>) -> rusqlite::Result<()>;

/// Step `i` moves the schema from version `i` to version `i + 1`.
const MIGRATIONS: &[Migration] = &[
    v1_initial,
    v2_client_marks,
    v3_imports,
    v4_with_counts,
    v5_minute_counts,
];

/// The schema version this code writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Version 1.
///
/// - `archives` and `jids` hold each (host, user, store) and each `with` JID once; message rows
///   refer to them by integer, so no string is repeated per row.
/// - `messages.id` is the [`ArchiveId`](crate::id::ArchiveId) and the rowid: ids are globally
///   unique, new rows append at the end of the table b-tree, and the newest id is one seek.
/// - The indexes name only `aid` and `(aid, with_id)`: SQLite appends the rowid (`id`) to every
///   index entry, so they are the `(aid, id)` and `(aid, with_id, id)` indexes the queries
///   need. Naming `id` as well would store it twice (measured: about 40% bigger index).
/// - `archives.item_count` is kept by triggers, so the total of an unfiltered query (the usual
///   "sync from my last id" query) is one row read instead of counting the whole archive.
fn v1_initial(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        r#"
        CREATE TABLE archives (
            aid        INTEGER PRIMARY KEY,
            host       TEXT NOT NULL,
            user       TEXT NOT NULL,
            store      TEXT NOT NULL,
            item_count INTEGER NOT NULL DEFAULT 0,
            UNIQUE (host, user, store)
        );
        CREATE TABLE jids (
            jid_id INTEGER PRIMARY KEY,
            jid    TEXT NOT NULL UNIQUE
        );
        CREATE TABLE messages (
            id      INTEGER PRIMARY KEY,
            aid     INTEGER NOT NULL REFERENCES archives (aid),
            with_id INTEGER NOT NULL REFERENCES jids (jid_id),
            stanza  TEXT NOT NULL
        );
        CREATE INDEX messages_by_archive ON messages (aid);
        CREATE INDEX messages_by_with ON messages (aid, with_id);

        CREATE TRIGGER messages_count_insert AFTER INSERT ON messages BEGIN
            UPDATE archives SET item_count = item_count + 1 WHERE aid = NEW.aid;
        END;
        CREATE TRIGGER messages_count_delete AFTER DELETE ON messages BEGIN
            UPDATE archives SET item_count = item_count - 1 WHERE aid = OLD.aid;
        END;
        CREATE TRIGGER messages_count_move AFTER UPDATE OF aid ON messages
        WHEN OLD.aid IS NOT NEW.aid BEGIN
            UPDATE archives SET item_count = item_count - 1 WHERE aid = OLD.aid;
            UPDATE archives SET item_count = item_count + 1 WHERE aid = NEW.aid;
        END;
        "#,
    )
}

/// Settings every connection gets, writer and readers alike.
pub fn configure(conn: &Connection, options: &SqliteOptions) -> rusqlite::Result<()> {
    conn.busy_timeout(options.busy_timeout)?;
    // By default (FULL) a committed id survives an OS crash: the WAL is fsync'ed on every
    // commit. The admin may trade that away (`sqlite_tune`).
    conn.pragma_update(None, "synchronous", options.synchronous.as_str())?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Negative: a size in KiB rather than in pages.
    conn.pragma_update(None, "cache_size", -i64::from(options.page_cache_kib))?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(())
}

/// Puts the file in WAL mode (persistent; readers then run beside the writer).
pub fn enable_wal(conn: &Connection) -> Result<(), StoreError> {
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| StoreError::Open(format!("cannot switch to WAL mode: {e}")))?;
    if mode.eq_ignore_ascii_case("wal") {
        Ok(())
    } else {
        Err(StoreError::Open(format!(
            "cannot switch to WAL mode: the journal mode stays {mode:?}"
        )))
    }
}

/// Version 2: what each of a user's clients has received, for smart retention.
///
/// One row per (archive, client): the newest archive id the client got (live, or through a
/// query) and when it was last seen, in Unix microseconds. Small and rewritten in place.
fn v2_client_marks(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        r#"
        CREATE TABLE client_marks (
            aid     INTEGER NOT NULL REFERENCES archives (aid),
            client  TEXT NOT NULL,
            last_id INTEGER NOT NULL,
            seen    INTEGER NOT NULL,
            PRIMARY KEY (aid, client)
        ) WITHOUT ROWID;
        "#,
    )
}

/// Version 3: messages imported from another archive (stock mod_mam's) keep their ids.
///
/// - `legacy_ids` maps the id clients know an imported message by (stock's `key`) to its row.
///   Only imported rows have one, so native rows pay nothing; a trigger removes the entry with
///   its message (expiry, quota, deletion).
/// - `imports` is where each import source stopped in each archive, so a rerun resumes.
/// - `dictionaries` holds the zstd dictionaries of `archive_compression` (see `compress`).
fn v3_imports(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        r#"
        CREATE TABLE legacy_ids (
            id  INTEGER PRIMARY KEY,
            aid INTEGER NOT NULL REFERENCES archives (aid),
            key TEXT NOT NULL,
            UNIQUE (aid, key)
        );
        CREATE TRIGGER messages_legacy_delete AFTER DELETE ON messages BEGIN
            DELETE FROM legacy_ids WHERE id = OLD.id;
        END;
        CREATE TABLE dictionaries (
            dict_id INTEGER PRIMARY KEY,
            dict    BLOB NOT NULL
        );
        CREATE TABLE imports (
            source   TEXT NOT NULL,
            aid      INTEGER NOT NULL REFERENCES archives (aid),
            position INTEGER NOT NULL,
            last_id  INTEGER NOT NULL,
            PRIMARY KEY (source, aid)
        ) WITHOUT ROWID;
        "#,
    )
}

/// Version 4: the number of rows per (archive, contact), kept by triggers as
/// `archives.item_count` is, so that the `<count>` of a query `with` one contact is one row read
/// (or the total minus the rows outside its window) instead of counting the contact's rows.
/// Filled from the existing rows by one pass over `messages_by_with`.
fn v4_with_counts(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        r#"
        CREATE TABLE with_counts (
            aid        INTEGER NOT NULL,
            with_id    INTEGER NOT NULL,
            item_count INTEGER NOT NULL,
            PRIMARY KEY (aid, with_id)
        ) WITHOUT ROWID;
        INSERT INTO with_counts (aid, with_id, item_count)
            SELECT aid, with_id, count(*) FROM messages GROUP BY aid, with_id;

        CREATE TRIGGER messages_with_count_insert AFTER INSERT ON messages BEGIN
            INSERT INTO with_counts (aid, with_id, item_count) VALUES (NEW.aid, NEW.with_id, 1)
                ON CONFLICT (aid, with_id) DO UPDATE SET item_count = item_count + 1;
        END;
        CREATE TRIGGER messages_with_count_delete AFTER DELETE ON messages BEGIN
            UPDATE with_counts SET item_count = item_count - 1
                WHERE aid = OLD.aid AND with_id = OLD.with_id;
        END;
        CREATE TRIGGER messages_with_count_move AFTER UPDATE OF aid, with_id ON messages
        WHEN OLD.aid IS NOT NEW.aid OR OLD.with_id IS NOT NEW.with_id BEGIN
            UPDATE with_counts SET item_count = item_count - 1
                WHERE aid = OLD.aid AND with_id = OLD.with_id;
            INSERT INTO with_counts (aid, with_id, item_count) VALUES (NEW.aid, NEW.with_id, 1)
                ON CONFLICT (aid, with_id) DO UPDATE SET item_count = item_count + 1;
        END;
        "#,
    )
}

/// Version 5: the number of rows per (archive, minute), kept by triggers as the totals are, so
/// that the `<count>` of a time window is the sum of its whole minutes plus the rows of the
/// two minutes at its ends, not a count of every row in it: a one-hour window of a busy
/// archive reads about 60 kept counts and two minutes' rows instead of thousands of rows.
/// A minute whose rows are all gone loses its row. Filled from the existing rows by one pass
/// over the table.
fn v5_minute_counts(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(&format!(
        r#"
        CREATE TABLE minute_counts (
            aid        INTEGER NOT NULL,
            minute     INTEGER NOT NULL,
            item_count INTEGER NOT NULL,
            PRIMARY KEY (aid, minute)
        ) WITHOUT ROWID;
        INSERT INTO minute_counts (aid, minute, item_count)
            SELECT aid, id >> {shift}, count(*) FROM messages GROUP BY aid, id >> {shift};

        CREATE TRIGGER messages_minute_count_insert AFTER INSERT ON messages BEGIN
            INSERT INTO minute_counts (aid, minute, item_count)
                VALUES (NEW.aid, NEW.id >> {shift}, 1)
                ON CONFLICT (aid, minute) DO UPDATE SET item_count = item_count + 1;
        END;
        CREATE TRIGGER messages_minute_count_delete AFTER DELETE ON messages BEGIN
            UPDATE minute_counts SET item_count = item_count - 1
                WHERE aid = OLD.aid AND minute = OLD.id >> {shift};
            DELETE FROM minute_counts
                WHERE aid = OLD.aid AND minute = OLD.id >> {shift} AND item_count = 0;
        END;
        CREATE TRIGGER messages_minute_count_move AFTER UPDATE OF aid, id ON messages
        WHEN OLD.aid IS NOT NEW.aid OR OLD.id >> {shift} IS NOT NEW.id >> {shift} BEGIN
            UPDATE minute_counts SET item_count = item_count - 1
                WHERE aid = OLD.aid AND minute = OLD.id >> {shift};
            DELETE FROM minute_counts
                WHERE aid = OLD.aid AND minute = OLD.id >> {shift} AND item_count = 0;
            INSERT INTO minute_counts (aid, minute, item_count)
                VALUES (NEW.aid, NEW.id >> {shift}, 1)
                ON CONFLICT (aid, minute) DO UPDATE SET item_count = item_count + 1;
        END;
        "#,
        shift = crate::store::rows::MINUTE_SHIFT
    ))
}

/// The indexes and triggers the queries and counts rely on, by name.
const EXPECTED: &[(&str, &str)] = &[
    ("index", "messages_by_archive"),
    ("index", "messages_by_with"),
    ("index", "sqlite_autoindex_archives_1"),
    ("index", "sqlite_autoindex_jids_1"),
    ("index", "sqlite_autoindex_legacy_ids_1"),
    ("trigger", "messages_count_insert"),
    ("trigger", "messages_count_delete"),
    ("trigger", "messages_count_move"),
    ("trigger", "messages_legacy_delete"),
    ("trigger", "messages_with_count_insert"),
    ("trigger", "messages_with_count_delete"),
    ("trigger", "messages_with_count_move"),
    ("trigger", "messages_minute_count_insert"),
    ("trigger", "messages_minute_count_delete"),
    ("trigger", "messages_minute_count_move"),
];

/// Which of the [`EXPECTED`] indexes and triggers the file lacks.
pub fn missing_indexes(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut missing = Vec::new();
    for (kind, name) in EXPECTED {
        let found: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = ?1 AND name = ?2)",
            (kind, name),
            |row| row.get(0),
        )?;
        if !found {
            missing.push(format!("{kind} {name}"));
        }
    }
    Ok(missing)
}

/// Brings the file up to [`SCHEMA_VERSION`] in one transaction, or refuses a newer file.
/// Returns the version the file had.
pub fn migrate(conn: &mut Connection) -> Result<u32, StoreError> {
    let open_err = |e: rusqlite::Error| StoreError::Open(format!("schema migration failed: {e}"));
    // IMMEDIATE: take the write lock before reading the version, so two processes opening
    // the same new file cannot both run a step.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_err)?;
    let found: u32 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_err)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::Open(format!(
            "the database has schema version {found}, newer than the {SCHEMA_VERSION} this \
             build of mod_mam_rs knows; upgrade mod_mam_rs or use another file"
        )));
    }
    for step in &MIGRATIONS[found as usize..] {
        step(&tx).map_err(open_err)?;
    }
    if found < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_err)?;
    }
    tx.commit().map_err(open_err)?;
    Ok(found)
}
