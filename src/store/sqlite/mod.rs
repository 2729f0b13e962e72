//! The SQLite [`Store`]: one database file in WAL mode, one writer connection and a pool of
//! read-only connections for queries.
//!
//! This module owns the SQL for appending and finding rows, and the in-memory caches of
//! archive and JID ids. The schema and its migrations live in [`schema`]. It must not know
//! XMPP (stanzas are opaque text) nor decide query semantics beyond stock `archive:find`.
//!
//! Concurrency: [`Store::append`] runs on the engine's writer thread and takes the writer
//! connection; [`Store::find`] and [`Store::last_id`] take a pooled connection that is
//! `query_only`. WAL lets those readers run beside the writer, each on one snapshot.
//! The writer has its own connection so that busy readers can never keep it waiting for a
//! pool slot, and its prepared statements stay warm.
//!
//! Caches: `(host, user, store) → aid` and `jid → jid_id` are kept in memory so the writer does
//! not look them up per row. Ids created inside a transaction enter the cache only after that
//! transaction commits. So rows of `archives` and `jids` must never be deleted (or renumbered)
//! while a store is open; other code may delete `messages` rows (triggers keep the counts).

mod compress;
mod schema;
#[cfg(test)]
mod tests;

pub use schema::SCHEMA_VERSION;

use super::codec::{self, Codec};
use super::rows::{self, stored_id, Filter, Fresh, IdCache, IdRange, MinuteSplit};
use super::{
    ArchiveRef, ExpiryBatch, ExpiryCursor, ExpiryRule, Figures, ImportBatch, ImportCheckpoint,
    ImportRow, Item, Mark, NewItem, Page, Query, Stats, Store, StoreError, Strategy,
};
use crate::id::ArchiveId;
use parking_lot::Mutex;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How to open a [`SqliteStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Read connections, i.e. how many queries run at once. The writer has its own
    /// connection on top of these.
    pub pool_size: u32,
    /// How long a statement waits for a lock held by another connection or process.
    pub busy_timeout: Duration,
    /// How long a query waits for a free read connection before failing.
    pub pool_timeout: Duration,
    /// SQLite's page cache, per connection, in KiB.
    pub page_cache_kib: u32,
    /// Entries each id cache (archives, JIDs) holds; a full cache is emptied and refills.
    pub id_cache_capacity: usize,
    /// `archive_compression`: store new stanzas zstd-compressed (see [`codec`]).
    pub compression: bool,
    /// How hard each commit makes sure it is on disk (`sqlite_tune`).
    pub synchronous: Synchronous,
}

/// SQLite's `synchronous` setting for the archive's connections (in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// `FULL`: each commit is fsync'ed before it counts as done, so a committed row survives
    /// an OS crash or a power loss. The default.
    Full,
    /// `EXTRA`: as `FULL`, for admins who ask for the safest setting.
    Extra,
    /// `NORMAL`: commits are not fsync'ed (checkpoints are). A committed row survives Prosody
    /// crashing; an OS crash or a power loss can take the last commits away.
    Normal,
    /// `OFF`: nothing is fsync'ed. As `NORMAL`, and an OS crash or a power loss can also
    /// corrupt the file.
    Off,
}

impl Synchronous {
    /// The pragma's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
            Synchronous::Normal => "NORMAL",
            Synchronous::Off => "OFF",
        }
    }
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            pool_size: 4,
            busy_timeout: Duration::from_secs(5),
            pool_timeout: Duration::from_secs(10),
            page_cache_kib: 8 * 1024,
            id_cache_capacity: 100_000,
            compression: false,
            synchronous: Synchronous::Full,
        }
    }
}

/// An archive store in one SQLite file.
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: r2d2::Pool<SqliteConnectionManager>,
    ids: Mutex<IdCache>,
    codec: Codec,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("readers", &self.readers.max_size())
            .finish_non_exhaustive()
    }
}

// Point lookups and inserts. The page and count queries are built by `Filter::where_clause`.
const SELECT_ARCHIVE: &str =
    "SELECT aid FROM archives WHERE host = ?1 AND user = ?2 AND store = ?3";
const INSERT_ARCHIVE: &str = "INSERT INTO archives (host, user, store) VALUES (?1, ?2, ?3)";
const SELECT_JID: &str = "SELECT jid_id FROM jids WHERE jid = ?1";
const INSERT_JID: &str = "INSERT INTO jids (jid) VALUES (?1)";
const INSERT_MESSAGE: &str =
    "INSERT INTO messages (id, aid, with_id, stanza) VALUES (?1, ?2, ?3, ?4)";
const SELECT_ITEM_IN_ARCHIVE: &str = "SELECT 1 FROM messages WHERE id = ?1 AND aid = ?2";
const SELECT_ITEM_COUNT: &str = "SELECT item_count FROM archives WHERE aid = ?1";
const SELECT_WITH_COUNT: &str =
    "SELECT coalesce((SELECT item_count FROM with_counts WHERE aid = ?1 AND with_id = ?2), 0)";
const SELECT_LAST_ID: &str = "SELECT max(id) FROM messages";
const SELECT_ARCHIVES_FROM: &str =
    "SELECT aid FROM archives WHERE host = ?1 AND store = ?2 AND aid > ?3 ORDER BY aid LIMIT 64";
const DELETE_EXPIRED: &str = "DELETE FROM messages WHERE id IN \
     (SELECT id FROM messages WHERE aid = ?1 AND id <= ?2 ORDER BY id LIMIT ?3)";
const SELECT_MAX_MARK: &str = "SELECT max(last_id) FROM client_marks WHERE aid = ?1 AND seen >= ?2";
const SELECT_MIN_MARK: &str = "SELECT min(last_id) FROM client_marks WHERE aid = ?1 AND seen >= ?2";
const UPSERT_MARK: &str = "INSERT INTO client_marks (aid, client, last_id, seen) VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (aid, client) DO UPDATE SET last_id = max(last_id, excluded.last_id), seen = max(seen, excluded.seen)";
const SELECT_LEGACY: &str = "SELECT id FROM legacy_ids WHERE aid = ?1 AND key = ?2";
const INSERT_LEGACY: &str = "INSERT INTO legacy_ids (id, aid, key) VALUES (?1, ?2, ?3)";
const SELECT_ID_TAKEN: &str = "SELECT aid FROM messages WHERE id = ?1";
const SELECT_IMPORT: &str = "SELECT position, last_id FROM imports WHERE source = ?1 AND aid = ?2";
const UPSERT_IMPORT: &str = "INSERT INTO imports (source, aid, position, last_id) VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (source, aid) DO UPDATE SET position = excluded.position, last_id = excluded.last_id";
const DELETE_ARCHIVE_ROWS: &str =
    "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE aid = ?1 LIMIT ?2)";
const SELECT_ARCHIVE_COUNT: &str =
    "SELECT aid, item_count FROM archives WHERE host = ?1 AND user = ?2 AND store = ?3";
const SELECT_HOST_ARCHIVE_COUNTS: &str =
    "SELECT aid, item_count FROM archives WHERE host = ?1 AND store = ?2";
const SELECT_ARCHIVE_FIGURES: &str = "SELECT min(id), max(id), sum(length(CAST(stanza AS BLOB))) \
     FROM messages WHERE aid = ?1";
const SELECT_CONTACTS: &str =
    "SELECT (SELECT jid FROM jids WHERE jid_id = with_id), count(*) AS n \
     FROM messages WHERE aid = ?1 GROUP BY with_id ORDER BY n DESC LIMIT 20";
const DELETE_OLDEST: &str =
    "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE aid = ?1 ORDER BY id LIMIT ?2)";
// One row per archive of the host (the counts are kept by triggers), never the messages.
const SELECT_HOST_FIGURES: &str = "SELECT count(*), coalesce(sum(item_count), 0) FROM archives \
     WHERE host = ?1 AND store = ?2 AND item_count > 0";

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, migrates its schema to
    /// [`SCHEMA_VERSION`], and opens the read pool. A file with a newer schema is refused.
    pub fn open(path: &Path, options: &SqliteOptions) -> Result<SqliteStore, StoreError> {
        if options.pool_size == 0 {
            return Err(StoreError::Open("pool_size must be at least 1".into()));
        }
        let open_err = |e: rusqlite::Error| StoreError::Open(format!("{}: {e}", path.display()));

        let mut writer = Connection::open(path).map_err(open_err)?;
        schema::configure(&writer, options).map_err(open_err)?;
        schema::enable_wal(&writer)?;
        schema::migrate(&mut writer)?;
        let codec = Codec::new(options.compression);
        codec.load(&writer).map_err(open_err)?;

        let reader_options = options.clone();
        let manager = SqliteConnectionManager::file(path).with_init(move |conn| {
            schema::configure(conn, &reader_options)?;
            conn.pragma_update(None, "query_only", true)
        });
        let readers = r2d2::Pool::builder()
            .thread_pool(super::pool_threads())
            .max_size(options.pool_size)
            .min_idle(Some(1))
            .connection_timeout(options.pool_timeout)
            .build(manager)
            .map_err(|e| StoreError::Open(format!("{}: read pool: {e}", path.display())))?;

        Ok(SqliteStore {
            path: path.to_owned(),
            writer: Mutex::new(writer),
            readers,
            ids: Mutex::new(IdCache::new(options.id_cache_capacity)),
            codec,
        })
    }

    /// The file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn reader(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>, StoreError> {
        self.readers
            .get()
            .map_err(|e| StoreError::Database(format!("no read connection: {e}")))
    }

    /// The `aid` of an archive, creating it inside the writer's transaction if needed.
    fn archive_for_write(
        &self,
        conn: &Connection,
        archive: &ArchiveRef,
        fresh: &mut Fresh,
    ) -> rusqlite::Result<i64> {
        fresh.archive(&self.ids, archive, || {
            let key = (&*archive.host, &archive.user, &*archive.store);
            match conn
                .prepare_cached(SELECT_ARCHIVE)?
                .query_row(key, |row| row.get(0))
                .optional()?
            {
                Some(aid) => Ok(aid),
                None => {
                    conn.prepare_cached(INSERT_ARCHIVE)?.execute(key)?;
                    Ok(conn.last_insert_rowid())
                }
            }
        })
    }

    /// The `jid_id` of a JID, creating it inside the writer's transaction if needed.
    fn jid_for_write(
        &self,
        conn: &Connection,
        jid: &str,
        fresh: &mut Fresh,
    ) -> rusqlite::Result<i64> {
        fresh.jid(&self.ids, jid, || {
            match conn
                .prepare_cached(SELECT_JID)?
                .query_row([jid], |row| row.get(0))
                .optional()?
            {
                Some(id) => Ok(id),
                None => {
                    conn.prepare_cached(INSERT_JID)?.execute([jid])?;
                    Ok(conn.last_insert_rowid())
                }
            }
        })
    }

    /// The `aid` of an existing archive, as seen by a reader.
    fn archive_for_read(
        &self,
        conn: &Connection,
        archive: &ArchiveRef,
    ) -> rusqlite::Result<Option<i64>> {
        if let Some(aid) = self.ids.lock().archives.get(archive).copied() {
            return Ok(Some(aid));
        }
        let key = (&*archive.host, &archive.user, &*archive.store);
        let aid: Option<i64> = conn
            .prepare_cached(SELECT_ARCHIVE)?
            .query_row(key, |row| row.get(0))
            .optional()?;
        if let Some(aid) = aid {
            self.ids.lock().remember_archive(archive.clone(), aid);
        }
        Ok(aid)
    }

    /// The `jid_id` of a known JID, as seen by a reader.
    fn jid_for_read(&self, conn: &Connection, jid: &str) -> rusqlite::Result<Option<i64>> {
        if let Some(id) = self.ids.lock().jids.get(jid).copied() {
            return Ok(Some(id));
        }
        let id: Option<i64> = conn
            .prepare_cached(SELECT_JID)?
            .query_row([jid], |row| row.get(0))
            .optional()?;
        if let Some(id) = id {
            self.ids.lock().remember_jid(jid.to_owned(), id);
        }
        Ok(id)
    }
}

/// One read transaction of a [`SqliteStore`], for [`rows::find`].
struct Snap<'a> {
    store: &'a SqliteStore,
    conn: &'a Connection,
}

impl rows::Snapshot for Snap<'_> {
    fn archive(&mut self, archive: &ArchiveRef) -> Result<Option<i64>, StoreError> {
        self.store.archive_for_read(self.conn, archive).map_err(db)
    }

    fn jid(&mut self, jid: &str) -> Result<Option<i64>, StoreError> {
        self.store.jid_for_read(self.conn, jid).map_err(db)
    }

    fn lookup_id(&mut self, aid: i64, text: &str) -> Result<Option<i64>, StoreError> {
        lookup_id(self.conn, aid, text)
    }

    fn count(&mut self, filter: &Filter<'_>, range: IdRange) -> Result<u64, StoreError> {
        count(self.conn, filter, range)
    }

    fn keeps_with_totals(&self) -> bool {
        true
    }

    fn page(
        &mut self,
        filter: &Filter<'_>,
        range: IdRange,
        limit: Option<u32>,
        reverse: bool,
    ) -> Result<Vec<Item>, StoreError> {
        select_page(self.conn, &self.store.codec, filter, range, limit, reverse)
    }
}

impl Store for SqliteStore {
    fn append(&self, batch: &[NewItem]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer.lock();
        // Before the batch's transaction: a dictionary is committed on its own, so that it is
        // never rolled back with a batch while new rows are compressed with it.
        self.codec.prepare(&conn, batch.len()).map_err(db)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        // SAFETY: only read by `with_os_error` while `conn` is locked and open.
        let handle = unsafe { tx.handle() };
        let mut fresh = Fresh::default();
        {
            let mut insert = tx.prepare_cached(INSERT_MESSAGE).map_err(db)?;
            for item in batch {
                let aid = self
                    .archive_for_write(&tx, &item.archive, &mut fresh)
                    .map_err(db)?;
                let with_id = self
                    .jid_for_write(&tx, &item.with, &mut fresh)
                    .map_err(db)?;
                if let Some(quota) = item.quota {
                    make_room(&tx, aid, quota)?;
                }
                insert
                    .execute((
                        item.id.as_i64(),
                        aid,
                        with_id,
                        self.codec.encode(&item.stanza),
                    ))
                    .map_err(|e| with_os_error(handle, e))?;
            }
        }
        // On any error above, dropping `tx` rolls back and `fresh` is forgotten.
        tx.commit().map_err(|e| with_os_error(handle, e))?;
        drop(conn);
        if !fresh.archives.is_empty() || !fresh.jids.is_empty() {
            self.ids.lock().remember(fresh);
        }
        Ok(())
    }

    fn find(&self, archive: &ArchiveRef, query: &Query) -> Result<Page, StoreError> {
        let mut conn = self.reader()?;
        // Deferred and read-only: dropping it at the end just ends the snapshot.
        let tx = conn.transaction().map_err(db)?;
        rows::find(
            &mut Snap {
                store: self,
                conn: &tx,
            },
            archive,
            query,
        )
    }

    fn holds(&self, id: ArchiveId) -> Result<bool, StoreError> {
        let conn = self.reader()?;
        conn.prepare_cached("SELECT 1 FROM messages WHERE id = ?1")
            .and_then(|mut stmt| stmt.exists([id.as_i64()]))
            .map_err(db)
    }

    fn last_id(&self) -> Result<Option<ArchiveId>, StoreError> {
        let conn = self.reader()?;
        let max: Option<i64> = conn
            .prepare_cached(SELECT_LAST_ID)
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .map_err(db)?;
        max.map(stored_id).transpose()
    }

    fn expire(
        &self,
        host: &str,
        store: &str,
        rule: &ExpiryRule,
        limit: u32,
        cursor: &mut ExpiryCursor,
    ) -> Result<ExpiryBatch, StoreError> {
        let mut conn = self.writer.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let mut deleted: u64 = 0;
        let mut done = false;
        'archives: while deleted < u64::from(limit) {
            let aids: Vec<i64> = tx
                .prepare_cached(SELECT_ARCHIVES_FROM)
                .and_then(|mut stmt| {
                    stmt.query_map((host, store, cursor.after_archive), |row| row.get(0))?
                        .collect()
                })
                .map_err(db)?;
            if aids.is_empty() {
                done = true;
                break;
            }
            for aid in aids {
                let room = u64::from(limit) - deleted;
                let Some(last) = expiry_bound(&tx, aid, rule)? else {
                    cursor.after_archive = aid;
                    continue;
                };
                let n = tx
                    .prepare_cached(DELETE_EXPIRED)
                    .and_then(|mut stmt| stmt.execute((aid, last, room as i64)))
                    .map_err(db)? as u64;
                deleted += n;
                if n == room {
                    // This archive may have more: stay on it.
                    break 'archives;
                }
                cursor.after_archive = aid;
            }
        }
        tx.commit().map_err(db)?;
        Ok(ExpiryBatch { deleted, done })
    }

    fn record_marks(&self, marks: &[Mark]) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let mut fresh = Fresh::default();
        for mark in marks {
            let aid = self
                .archive_for_write(&tx, &mark.archive, &mut fresh)
                .map_err(db)?;
            tx.prepare_cached(UPSERT_MARK)
                .and_then(|mut stmt| {
                    stmt.execute((aid, &mark.client, mark.last_id.as_i64(), mark.seen))
                })
                .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        drop(conn);
        let mut ids = self.ids.lock();
        for (archive, aid) in fresh.archives {
            ids.remember_archive(archive, aid);
        }
        Ok(())
    }

    fn import_checkpoint(
        &self,
        archive: &ArchiveRef,
        source: &str,
    ) -> Result<Option<ImportCheckpoint>, StoreError> {
        let conn = self.reader()?;
        let Some(aid) = self.archive_for_read(&conn, archive).map_err(db)? else {
            return Ok(None);
        };
        conn.prepare_cached(SELECT_IMPORT)
            .and_then(|mut stmt| {
                stmt.query_row((source, aid), |row| {
                    Ok(ImportCheckpoint {
                        position: row.get(0)?,
                        last_id: row.get(1)?,
                    })
                })
                .optional()
            })
            .map_err(db)
    }

    fn import(
        &self,
        archive: &ArchiveRef,
        source: &str,
        rows: &[ImportRow],
        position: i64,
    ) -> Result<ImportBatch, StoreError> {
        let mut conn = self.writer.lock();
        self.codec.prepare(&conn, rows.len()).map_err(db)?; // Before the transaction: see append.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let mut fresh = Fresh::default();
        let aid = self
            .archive_for_write(&tx, archive, &mut fresh)
            .map_err(db)?;
        let mut last_id: i64 = tx
            .prepare_cached(SELECT_IMPORT)
            .and_then(|mut stmt| stmt.query_row((source, aid), |row| row.get(1)).optional())
            .map_err(db)?
            .unwrap_or(0);
        let now = crate::id::now_micros();
        let mut done = ImportBatch::default();
        for row in rows {
            if lookup_id(&tx, aid, &row.key)?.is_some() {
                done.already += 1;
                continue;
            }
            let taken = |id: i64| -> Result<bool, StoreError> {
                tx.prepare_cached(SELECT_ID_TAKEN)
                    .and_then(|mut stmt| stmt.query_row([id], |_| Ok(())).optional())
                    .map(|found| found.is_some())
                    .map_err(db)
            };
            let (id, keep_key) = rows::import_id(&row.key, row.micros, last_id, now, taken)?;
            let with_id = self.jid_for_write(&tx, &row.with, &mut fresh).map_err(db)?;
            let stanza = self.codec.encode(&row.stanza);
            tx.prepare_cached(INSERT_MESSAGE)
                .and_then(|mut stmt| stmt.execute((id, aid, with_id, stanza)))
                .map_err(db)?;
            if keep_key {
                tx.prepare_cached(INSERT_LEGACY)
                    .and_then(|mut stmt| stmt.execute((id, aid, &row.key)))
                    .map_err(db)?;
            }
            last_id = id;
            done.imported += 1;
        }
        tx.prepare_cached(UPSERT_IMPORT)
            .and_then(|mut stmt| stmt.execute((source, aid, position, last_id)))
            .map_err(db)?;
        tx.commit().map_err(db)?;
        drop(conn);
        self.ids.lock().remember(fresh);
        Ok(done)
    }

    fn stats(&self, host: &str, store: &str, user: Option<&str>) -> Result<Stats, StoreError> {
        let conn = self.reader()?;
        let aids: Vec<(i64, i64)> = match user {
            Some(user) => conn
                .prepare_cached(SELECT_ARCHIVE_COUNT)
                .and_then(|mut stmt| {
                    stmt.query_map((host, user, store), |row| Ok((row.get(0)?, row.get(1)?)))?
                        .collect()
                }),
            None => conn
                .prepare_cached(SELECT_HOST_ARCHIVE_COUNTS)
                .and_then(|mut stmt| {
                    stmt.query_map((host, store), |row| Ok((row.get(0)?, row.get(1)?)))?
                        .collect()
                }),
        }
        .map_err(db)?;
        let mut stats = Stats::default();
        for (aid, count) in &aids {
            if *count == 0 {
                continue;
            }
            let (oldest, newest, bytes): (Option<i64>, Option<i64>, Option<i64>) = conn
                .prepare_cached(SELECT_ARCHIVE_FIGURES)
                .and_then(|mut stmt| {
                    stmt.query_row([aid], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                })
                .map_err(db)?;
            stats.add_archive(*count as u64, oldest, newest, bytes.unwrap_or(0) as u64)?;
        }
        if let (Some(_), [(aid, count)]) = (user, aids.as_slice()) {
            if *count > 0 {
                stats.contacts = conn
                    .prepare_cached(SELECT_CONTACTS)
                    .and_then(|mut stmt| {
                        stmt.query_map([aid], |row| {
                            Ok((row.get(0)?, row.get::<_, i64>(1)? as u64))
                        })?
                        .collect()
                    })
                    .map_err(db)?;
            }
        }
        Ok(stats)
    }

    fn delete_archive(&self, archive: &ArchiveRef, limit: u32) -> Result<u64, StoreError> {
        let mut conn = self.writer.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let key = (&*archive.host, &archive.user, &*archive.store);
        let Some(aid) = tx
            .prepare_cached(SELECT_ARCHIVE)
            .and_then(|mut stmt| stmt.query_row(key, |row| row.get::<_, i64>(0)).optional())
            .map_err(db)?
        else {
            return Ok(0);
        };
        let deleted = tx
            .prepare_cached(DELETE_ARCHIVE_ROWS)
            .and_then(|mut stmt| stmt.execute((aid, i64::from(limit))))
            .map_err(db)? as u64;
        if deleted == 0 {
            // The archive row itself stays (ids of archives are cached and never reused).
            tx.execute_batch(&format!(
                "DELETE FROM client_marks WHERE aid = {aid}; DELETE FROM imports WHERE aid = {aid};"
            ))
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(deleted)
    }

    fn optimize(&self, vacuum: bool) -> Result<Vec<String>, StoreError> {
        let conn = self.writer.lock();
        let mut report = Vec::new();
        let missing = schema::missing_indexes(&conn).map_err(db)?;
        report.push(rows::indexes_checked(&missing)?);
        let check: Vec<String> = conn
            .prepare("PRAGMA quick_check")
            .and_then(|mut stmt| stmt.query_map([], |row| row.get(0))?.collect())
            .map_err(db)?;
        if check != ["ok"] {
            return Err(StoreError::Database(format!(
                "quick_check found damage: {}",
                check.join("; ")
            )));
        }
        report.push("quick_check: ok".to_string());
        if self.codec.enabled() {
            report.push(compress_all(&conn, &self.codec)?);
        }
        conn.execute_batch("ANALYZE; PRAGMA optimize;")
            .map_err(db)?;
        report.push("ANALYZE: statistics refreshed".to_string());
        let before = file_bytes(&self.path);
        if vacuum {
            conn.execute_batch("VACUUM").map_err(db)?;
            report.push("VACUUM: file rebuilt without free pages".to_string());
        }
        let (busy, log, done): (i64, i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .map_err(db)?;
        report.push(if busy == 0 {
            format!("WAL checkpoint: {done} of {log} pages, log truncated")
        } else {
            format!("WAL checkpoint: {done} of {log} pages (readers busy, log kept)")
        });
        report.push(format!(
            "database file: {before} -> {} bytes",
            file_bytes(&self.path)
        ));
        Ok(report)
    }

    fn figures(&self, host: &str, store: &str) -> Result<Figures, StoreError> {
        let (archives, messages): (i64, i64) = self
            .reader()?
            .prepare_cached(SELECT_HOST_FIGURES)
            .and_then(|mut stmt| {
                stmt.query_row((host, store), |row| Ok((row.get(0)?, row.get(1)?)))
            })
            .map_err(db)?;
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        Ok(Figures {
            archives: archives as u64,
            messages: messages as u64,
            bytes: file_bytes(&self.path) + file_bytes(Path::new(&wal)),
        })
    }
}

/// `optimize` with compression on: trains a dictionary if there is none yet, then compresses
/// the rows stored as text, a batch per transaction.
fn compress_all(conn: &Connection, codec: &Codec) -> Result<String, StoreError> {
    let has_dictionary: bool = conn
        .query_row("SELECT EXISTS (SELECT 1 FROM dictionaries)", [], |row| {
            row.get(0)
        })
        .map_err(db)?;
    if !has_dictionary {
        if let Some(report) = codec::not_trained(codec.train_from(conn).map_err(db)?) {
            return Ok(report);
        }
    }
    let (mut done, mut before, mut after) = (0u64, 0u64, 0u64);
    let mut after_id = i64::MIN;
    loop {
        let tx = conn.unchecked_transaction().map_err(db)?;
        let rows: Vec<(i64, String)> = tx
            .prepare_cached(
                "SELECT id, stanza FROM messages WHERE id > ?1 AND typeof(stanza) = 'text' \
                 ORDER BY id LIMIT 2000",
            )
            .and_then(|mut stmt| {
                stmt.query_map([after_id], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(db)?;
        for (id, text) in &rows {
            let value = codec.encode(text);
            if let rusqlite::types::Value::Blob(blob) = &value {
                before += text.len() as u64;
                after += blob.len() as u64;
                done += 1;
                tx.prepare_cached("UPDATE messages SET stanza = ?2 WHERE id = ?1")
                    .and_then(|mut stmt| stmt.execute((id, value)))
                    .map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        match rows.last() {
            Some((id, _)) if rows.len() == 2000 => after_id = *id,
            _ => break,
        }
    }
    Ok(codec::compressed(done, before, after))
}

fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The newest id `rule` lets go in archive `aid`, or `None` when nothing may go.
fn expiry_bound(conn: &Connection, aid: i64, rule: &ExpiryRule) -> Result<Option<i64>, StoreError> {
    rows::expiry_bound(rule, |strategy, seen_since| {
        let sql = match strategy {
            Strategy::One => SELECT_MAX_MARK,
            Strategy::All => SELECT_MIN_MARK,
        };
        conn.prepare_cached(sql)
            .and_then(|mut stmt| stmt.query_row((aid, seen_since), |row| row.get(0)))
            .map_err(db)
    })
}

/// Stock's quota rule ([`rows::over_quota`]) before a row goes into archive `aid`.
fn make_room(conn: &Connection, aid: i64, quota: u32) -> Result<(), StoreError> {
    let count: i64 = conn
        .prepare_cached(SELECT_ITEM_COUNT)
        .and_then(|mut stmt| stmt.query_row([aid], |row| row.get(0)))
        .map_err(db)?;
    if let Some(excess) = rows::over_quota(count, quota) {
        conn.prepare_cached(DELETE_OLDEST)
            .and_then(|mut stmt| stmt.execute((aid, excess)))
            .map_err(db)?;
    }
    Ok(())
}

/// `WHERE ...` for `filter` and `range`, pushing the parameters it binds.
///
/// Every condition is bound except the `ids` list, which is written as integer literals:
/// they are `i64` values we formatted, and a literal list lets SQLite look each one up
/// by rowid. Only those statements are prepared uncached. With an ids list, `+aid` and
/// `+with_id` keep SQLite from walking the archive's index instead (the unary `+` makes
/// a term unusable by an index); without one, the archive index is the plan.
fn where_clause(filter: &Filter<'_>, range: IdRange, params: &mut Vec<i64>) -> String {
    let plus = if filter.ids.is_some() { "+" } else { "" };
    let mut sql = format!(" WHERE {plus}aid = ?");
    params.push(filter.aid);
    if let Some(with_id) = filter.with_id {
        let _ = write!(sql, " AND {plus}with_id = ?");
        params.push(with_id);
    }
    sql.push_str(" AND id BETWEEN ? AND ?");
    params.extend([range.lo, range.hi]);
    if let Some(ids) = filter.ids {
        sql.push_str(" AND id IN (");
        for (i, id) in ids.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(sql, "{sep}{id}");
        }
        sql.push(')');
    }
    sql
}

/// Rows matching `filter` and `range` (not empty).
fn count(conn: &Connection, filter: &Filter<'_>, range: IdRange) -> Result<u64, StoreError> {
    let n: i64 = if filter.ids.is_none() && range.is_everything() {
        match filter.with_id {
            None => conn
                .prepare_cached(SELECT_ITEM_COUNT)
                .and_then(|mut stmt| stmt.query_row([filter.aid], |row| row.get(0))),
            Some(with_id) => conn
                .prepare_cached(SELECT_WITH_COUNT)
                .and_then(|mut stmt| stmt.query_row([filter.aid, with_id], |row| row.get(0))),
        }
        .map_err(db)?
    } else if let (None, None, Some(minutes)) = (filter.with_id, filter.ids, MinuteSplit::of(range))
    {
        conn.prepare_cached(COUNT_BY_MINUTES)
            .and_then(|mut stmt| stmt.query_row(minutes.params(filter.aid), |row| row.get(0)))
            .map_err(db)?
    } else {
        let (sql, params) = count_query(filter, range);
        prepare(conn, &sql, filter.ids.is_none())
            .and_then(|mut stmt| {
                stmt.query_row(rusqlite::params_from_iter(params), |row| row.get(0))
            })
            .map_err(db)?
    };
    u64::try_from(n).map_err(|_| StoreError::Database(format!("negative count {n}")))
}

/// The rows of an archive (`?1`) in a range split as [`MinuteSplit`] does: the kept counts of
/// its whole minutes (`?2` to `?3`, schema version 5), and the rows of its two ends counted
/// (`?4` to `?5`, `?6` to `?7`).
const COUNT_BY_MINUTES: &str = "SELECT \
     (SELECT coalesce(sum(item_count), 0) FROM minute_counts \
      WHERE aid = ?1 AND minute BETWEEN ?2 AND ?3) \
   + (SELECT count(*) FROM messages WHERE aid = ?1 AND id BETWEEN ?4 AND ?5) \
   + (SELECT count(*) FROM messages WHERE aid = ?1 AND id BETWEEN ?6 AND ?7)";

fn count_query(filter: &Filter<'_>, range: IdRange) -> (String, Vec<i64>) {
    let mut params = Vec::with_capacity(4);
    let sql = format!(
        "SELECT count(*) FROM messages{}",
        where_clause(filter, range, &mut params)
    );
    (sql, params)
}

/// One page of rows, ascending ids or descending when `reverse`.
fn select_page(
    conn: &Connection,
    codec: &Codec,
    filter: &Filter<'_>,
    range: IdRange,
    limit: Option<u32>,
    reverse: bool,
) -> Result<Vec<Item>, StoreError> {
    let (sql, params) = page_query(filter, range, limit, reverse);
    let mut stmt = prepare(conn, &sql, filter.ids.is_none()).map_err(db)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(params), |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, rusqlite::types::Value>(2)?,
                row.get::<_, Option<String>>(3)?,
            ))
        })
        .map_err(db)?;
    let mut items = Vec::with_capacity(limit.map_or(0, |n| n.min(1000) as usize));
    for row in rows {
        let (id, with, stored, key) = row.map_err(db)?;
        let stanza = codec
            .decode(conn, stored)
            .map_err(|e| StoreError::Database(format!("message {id}: {e}")))?;
        items.push(Item {
            id: stored_id(id)?,
            key,
            with,
            stanza,
        });
    }
    Ok(items)
}

/// The `with` JID comes from a correlated lookup rather than a join, so the plan always walks
/// `messages` by index first and stops after `LIMIT` rows.
fn page_query(
    filter: &Filter<'_>,
    range: IdRange,
    limit: Option<u32>,
    reverse: bool,
) -> (String, Vec<i64>) {
    let mut params = Vec::with_capacity(5);
    let sql = format!(
        "SELECT id, (SELECT jid FROM jids WHERE jid_id = messages.with_id), stanza, \
         (SELECT key FROM legacy_ids WHERE legacy_ids.id = messages.id) \
         FROM messages{} ORDER BY id {} LIMIT ?",
        where_clause(filter, range, &mut params),
        if reverse { "DESC" } else { "ASC" },
    );
    params.push(limit.map_or(-1, i64::from));
    (sql, params)
}

/// The row of archive `aid` that clients know as `text`: a native id, or an imported key.
fn lookup_id(conn: &Connection, aid: i64, text: &str) -> Result<Option<i64>, StoreError> {
    if let Some(id) = ArchiveId::parse(text).map(ArchiveId::as_i64) {
        let found = conn
            .prepare_cached(SELECT_ITEM_IN_ARCHIVE)
            .and_then(|mut stmt| stmt.query_row((id, aid), |_| Ok(())).optional())
            .map_err(db)?;
        if found.is_some() {
            return Ok(Some(id));
        }
    }
    conn.prepare_cached(SELECT_LEGACY)
        .and_then(|mut stmt| stmt.query_row((aid, text), |row| row.get(0)).optional())
        .map_err(db)
}

fn prepare<'c>(conn: &'c Connection, sql: &str, cached: bool) -> rusqlite::Result<Statement<'c>> {
    if cached {
        conn.prepare_cached(sql).map(Statement::Cached)
    } else {
        conn.prepare(sql).map(Statement::Once)
    }
}

/// A statement from the connection's cache, or one prepared for a single use.
enum Statement<'c> {
    Cached(rusqlite::CachedStatement<'c>),
    Once(rusqlite::Statement<'c>),
}

impl<'c> std::ops::Deref for Statement<'c> {
    type Target = rusqlite::Statement<'c>;
    fn deref(&self) -> &Self::Target {
        match self {
            Statement::Cached(stmt) => stmt,
            Statement::Once(stmt) => stmt,
        }
    }
}

impl std::ops::DerefMut for Statement<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Statement::Cached(stmt) => stmt,
            Statement::Once(stmt) => stmt,
        }
    }
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

/// `e` from a write on connection `handle`, with what the operating system said where SQLite's
/// own text hides it: a write the OS refused (an immutable file, a failing disk) is only
/// "disk I/O error" otherwise. A full disk is already SQLite's "database or disk is full".
fn with_os_error(handle: *mut rusqlite::ffi::sqlite3, e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{CannotOpen, SystemIoFailure};
    let os = match &e {
        rusqlite::Error::SqliteFailure(failure, _)
            if matches!(failure.code, SystemIoFailure | CannotOpen) =>
        {
            // SAFETY: `handle` is the caller's open connection, which it holds locked. SQLite
            // sets this value on exactly these two kinds of failure, so it is this one's.
            let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(handle) };
            (errno != 0).then(|| std::io::Error::from_raw_os_error(errno))
        }
        _ => None,
    };
    match os {
        Some(os) => StoreError::Database(format!("{e}: {os}")),
        None => db(e),
    }
}
