//! The MySQL/MariaDB schema: the module's own tables (prefixed `mam_rs_`, so they sit beside
//! Prosody's `prosody` and `prosodyarchive` in the admin's database), the session settings every
//! connection gets, and the migration runner.
//!
//! The version lives in `mam_rs_schema`. [`MIGRATIONS`] is the list of steps; step `i` moves a
//! database from version `i` to `i + 1`. MySQL commits implicitly around every `CREATE TABLE`,
//! so a step cannot be one transaction as on PostgreSQL: instead every statement of a step may
//! run again (`IF NOT EXISTS`), the version is written after each step, and the whole run holds
//! a named lock (`GET_LOCK`), so several Prosody processes starting together migrate once and a
//! run cut short is finished by the next one. A newer database is refused, never touched.
//! MySQL has no `ADD COLUMN IF NOT EXISTS` (MariaDB has), so a step adds a column as a
//! [`Step::AddColumn`], which looks first.
//! This module does not read or write archive rows.

use crate::store::StoreError;
use mysql::prelude::Queryable;
use mysql::Conn;

/// Step `i` moves the schema from version `i` to version `i + 1`.
const MIGRATIONS: &[&[Step]] = &[V1, V2, V3, V4];

/// One statement of a migration step, safe to run again.
enum Step {
    /// SQL that is itself safe to run again (`IF NOT EXISTS`, `REPLACE`).
    Sql(&'static str),
    /// `ALTER TABLE table ADD COLUMN column definition`, unless the table has the column.
    AddColumn {
        table: &'static str,
        column: &'static str,
        definition: &'static str,
    },
}

/// The schema version this code writes and understands.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Run on every new connection, writer and readers alike (the pool does not reset them, so
/// they hold for the connection's life).
///
/// - `utf8mb4`: stanzas and JIDs may hold any Unicode character, those outside the BMP too.
/// - Strict mode: a value too long for its column is an error, never silently cut short; and
///   no other engine is put in for InnoDB.
/// - `REPEATABLE READ`: a query's page and its total come from one snapshot, whatever the
///   server's default is.
pub const SESSION_SETTINGS: &[&str] = &[
    "SET NAMES utf8mb4 COLLATE utf8mb4_bin, \
     SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
    "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
];

/// Seconds to wait for another process that is migrating the same database.
const MIGRATION_LOCK_WAIT: u32 = 60;

/// The name of the lock that serialises migrations. `GET_LOCK` names are server-wide, so the
/// database's name is part of it (hashed: names are at most 64 characters).
const MIGRATION_LOCK: &str = "CONCAT('mam_rs:', MD5(DATABASE()), ':migrate')";

/// Version 1: the same model as the SQLite and PostgreSQL stores (see `store::sqlite::schema`).
///
/// - Archives and JIDs are interned; message rows refer to them by integer. `id` is the
///   clustered primary key, so new rows append at the end of the table and the newest id is
///   one seek; `(aid, id)` and `(aid, with_id, id)` are the two query paths.
/// - Names (host, user, store, JIDs, clients, stock ids) are `VARBINARY`: compared byte for
///   byte, as XMPP needs (`Juliet@…` is not `juliet@…`), without the trailing-space padding
///   of `utf8mb4_bin` `VARCHAR`s (`a ` would equal `a`), the same on MySQL and MariaDB. Their
///   widths are the XMPP limits (1023 bytes a part, 3071 a full JID), within InnoDB's 3072
///   bytes a key.
/// - `stanza` is `utf8mb4` text, exact (`utf8mb4_bin`), so that an admin can read it.
/// - `item_count` is kept by the store itself in the transaction that inserts or deletes (see
///   `store::mysql`), so an unfiltered total is one row read.
/// - `legacy_ids` keeps the stock ids of imported messages; the foreign key removes them with
///   their rows (`ON DELETE CASCADE`).
/// - `with_id` has no foreign key: InnoDB would add an index on it alone, a cost on every
///   insert for no query, and JIDs are never deleted.
const V1: &[Step] = &[
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS mam_rs_archives (
        aid        BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        host       VARBINARY(1023) NOT NULL,
        username   VARBINARY(1023) NOT NULL,
        store      VARBINARY(255) NOT NULL,
        item_count BIGINT NOT NULL DEFAULT 0,
        UNIQUE KEY mam_rs_archives_name (host, username, store)
    ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    ),
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS mam_rs_jids (
        jid_id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        jid    VARBINARY(3071) NOT NULL,
        UNIQUE KEY mam_rs_jids_jid (jid)
    ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    ),
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS mam_rs_messages (
        id      BIGINT NOT NULL PRIMARY KEY,
        aid     BIGINT NOT NULL,
        with_id BIGINT NOT NULL,
        stanza  LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
        KEY mam_rs_messages_by_archive (aid, id),
        KEY mam_rs_messages_by_with (aid, with_id, id),
        CONSTRAINT mam_rs_messages_archive FOREIGN KEY (aid) REFERENCES mam_rs_archives (aid)
    ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    ),
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS mam_rs_legacy_ids (
        id         BIGINT NOT NULL PRIMARY KEY,
        aid        BIGINT NOT NULL,
        legacy_key VARBINARY(1023) NOT NULL,
        UNIQUE KEY mam_rs_legacy_ids_key (aid, legacy_key),
        CONSTRAINT mam_rs_legacy_ids_message FOREIGN KEY (id) REFERENCES mam_rs_messages (id)
            ON DELETE CASCADE
    ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    ),
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS mam_rs_imports (
        aid      BIGINT NOT NULL,
        source   VARBINARY(255) NOT NULL,
        position BIGINT NOT NULL,
        last_id  BIGINT NOT NULL,
        PRIMARY KEY (aid, source),
        CONSTRAINT mam_rs_imports_archive FOREIGN KEY (aid) REFERENCES mam_rs_archives (aid)
    ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    ),
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS mam_rs_client_marks (
        aid     BIGINT NOT NULL,
        client  VARBINARY(1023) NOT NULL,
        last_id BIGINT NOT NULL,
        seen    BIGINT NOT NULL,
        PRIMARY KEY (aid, client),
        CONSTRAINT mam_rs_client_marks_archive FOREIGN KEY (aid) REFERENCES mam_rs_archives (aid)
    ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    ),
];

/// Version 2: per-contact totals, so that a `with` query's `<count>` reads one row (as on
/// SQLite and PostgreSQL). Kept by the store in the transactions that insert or delete, as
/// `item_count`; filled here from the rows already stored (`REPLACE`: a step cut short runs
/// again whole).
const V2: &[Step] = &[
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS mam_rs_with_counts (
        aid        BIGINT NOT NULL,
        with_id    BIGINT NOT NULL,
        item_count BIGINT NOT NULL,
        PRIMARY KEY (aid, with_id),
        CONSTRAINT mam_rs_with_counts_archive FOREIGN KEY (aid) REFERENCES mam_rs_archives (aid)
    ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    ),
    Step::Sql(
        "REPLACE INTO mam_rs_with_counts (aid, with_id, item_count)
        SELECT aid, with_id, COUNT(*) FROM mam_rs_messages GROUP BY aid, with_id",
    ),
];

/// Version 3: `archive_compression` (see `store::codec`), as on PostgreSQL: a compressed row
/// has its stanza in `zstanza` and an empty `stanza` (not NULL, so that a process still running
/// version 2 reads text rather than failing); dictionaries are never changed once written.
/// InnoDB adds a nullable last column in place (`INSTANT` on MySQL 8.0.12+ and MariaDB 10.3+):
/// no rows are rewritten.
const V3: &[Step] = &[
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS mam_rs_dictionaries (
        dict_id SMALLINT NOT NULL PRIMARY KEY,
        dict    LONGBLOB NOT NULL
    ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC",
    ),
    Step::AddColumn {
        table: "mam_rs_messages",
        column: "zstanza",
        definition: "LONGBLOB NULL",
    },
];

/// Version 4: the number of rows per (archive, minute of 2^26 µs), so that a time window's
/// `<count>` is the sum of its whole minutes plus the rows of the two minutes at its ends (as
/// on SQLite, schema 5, and PostgreSQL, schema 4; `37` is `rows::MINUTE_SHIFT`). Kept by the
/// store in the transactions that insert or delete, as the other totals; a minute whose rows
/// are all gone loses its row. Filled here from the rows already stored.
const V4: &[Step] = &[
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS mam_rs_minute_counts (
        aid        BIGINT NOT NULL,
        minute     BIGINT NOT NULL,
        item_count BIGINT NOT NULL,
        PRIMARY KEY (aid, minute),
        CONSTRAINT mam_rs_minute_counts_archive FOREIGN KEY (aid) REFERENCES mam_rs_archives (aid)
    ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC",
    ),
    Step::Sql(
        "REPLACE INTO mam_rs_minute_counts (aid, minute, item_count)
        SELECT aid, id >> 37, COUNT(*) FROM mam_rs_messages GROUP BY aid, id >> 37",
    ),
];

/// The indexes queries depend on, for `optimize` to check.
pub const INDEXES: &[(&str, &str)] = &[
    ("mam_rs_messages", "mam_rs_messages_by_archive"),
    ("mam_rs_messages", "mam_rs_messages_by_with"),
    ("mam_rs_legacy_ids", "mam_rs_legacy_ids_key"),
];

/// Brings the database up to [`SCHEMA_VERSION`] under the migration lock, or refuses a newer
/// one. Returns the version it had.
pub fn migrate(conn: &mut Conn) -> Result<i32, StoreError> {
    let open_err = |e: mysql::Error| StoreError::Open(format!("schema migration failed: {e}"));
    let locked = super::first::<Option<i64>>(
        conn,
        &format!("SELECT GET_LOCK({MIGRATION_LOCK}, {MIGRATION_LOCK_WAIT})"),
        (),
    )
    .map_err(as_open)?;
    if locked.flatten() != Some(1) {
        return Err(StoreError::Open(format!(
            "schema migration: another process held the migration lock for \
             {MIGRATION_LOCK_WAIT} s"
        )));
    }
    let result = migrate_locked(conn).map_err(as_open);
    // Released with the connection too, should this fail.
    let released = conn.query_drop(format!("DO RELEASE_LOCK({MIGRATION_LOCK})"));
    let found = result?;
    released.map_err(open_err)?;
    Ok(found)
}

fn as_open(e: StoreError) -> StoreError {
    match e {
        StoreError::Database(e) => StoreError::Open(format!("schema migration failed: {e}")),
        e => e,
    }
}

fn migrate_locked(conn: &mut Conn) -> Result<i32, StoreError> {
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS mam_rs_schema (version INT NOT NULL) ENGINE = InnoDB",
    )
    .map_err(super::db)?;
    let found: i32 =
        super::first::<Option<i32>>(conn, "SELECT MAX(version) FROM mam_rs_schema", ())?
            .flatten()
            .unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::Open(format!(
            "the database has mod_mam_rs schema version {found}, newer than the {SCHEMA_VERSION} \
             this build knows; upgrade mod_mam_rs or use another database"
        )));
    }
    for (done, step) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        for statement in *step {
            statement.run(conn)?;
        }
        let version = done as i32 + 1;
        let mut tx = conn
            .start_transaction(mysql::TxOpts::default())
            .map_err(super::db)?;
        tx.query_drop("DELETE FROM mam_rs_schema")
            .map_err(super::db)?;
        tx.exec_drop("INSERT INTO mam_rs_schema (version) VALUES (?)", (version,))
            .map_err(super::db)?;
        tx.commit().map_err(super::db)?;
    }
    Ok(found)
}

impl Step {
    fn run(&self, conn: &mut Conn) -> Result<(), StoreError> {
        match *self {
            Step::Sql(sql) => conn.query_drop(sql).map_err(super::db),
            Step::AddColumn {
                table,
                column,
                definition,
            } => {
                let found = super::first::<i64>(
                    conn,
                    "SELECT 1 FROM information_schema.columns \
                     WHERE table_schema = DATABASE() AND table_name = ? AND column_name = ?",
                    (table, column),
                )?;
                if found.is_some() {
                    return Ok(());
                }
                conn.query_drop(format!(
                    "ALTER TABLE {table} ADD COLUMN {column} {definition}"
                ))
                .map_err(super::db)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn minutes_are_counted_by_the_shift_the_queries_use() {
        let fill = super::V4.iter().filter_map(|step| match step {
            super::Step::Sql(sql) => Some(*sql),
            _ => None,
        });
        crate::store::rows::assert_minutes_by_shift(&fill.collect::<Vec<_>>().join("\n"), "V4");
    }
}
