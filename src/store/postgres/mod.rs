//! The PostgreSQL [`Store`]: the archive in a database server, in the module's own tables.
//!
//! The same model and the same query semantics as the SQLite store (`store::sqlite`): interned
//! archives and JIDs, ids as `BIGINT` primary keys, totals from a count kept per archive. The
//! SQL differs where PostgreSQL does better: batches go in as arrays in one statement (one
//! round trip per commit, not per row), `ids` lists are bound as one array parameter, and the
//! per-archive counts are kept by statement-level triggers.
//!
//! Connections: one writer connection (reconnected when the server went away) and an r2d2
//! pool for queries (a read whose pooled connection the server closed runs again on a new
//! one, so a restarted server is picked up again). Each keeps the statements it prepared
//! (`conn`): a statement is one round trip, not two. A batch whose archives and contacts are
//! all known and that no quota limits is one statement, committed on its own: one round trip
//! per commit.
//!
//! `archive_compression` (`store::codec`): a compressed row keeps its stanza in `zstanza` and
//! an empty `stanza`; the dictionaries are in `mam_rs_dictionaries`, shared by every process
//! writing to the database.

mod conn;
mod schema;
#[cfg(all(test, feature = "postgres-tests"))]
mod tests;

pub use schema::SCHEMA_VERSION;

use super::codec::{self, Codec, Trained};
use super::rows::{self, stored_id, Filter, Fresh, IdCache, IdRange, MinuteSplit};
use super::{
    ArchiveRef, ExpiryBatch, ExpiryCursor, ExpiryRule, Figures, ImportBatch, ImportCheckpoint,
    ImportRow, Item, Mark, NewItem, Page, Query, Stats, Store, StoreError, Strategy,
};
use crate::id::{ArchiveId, NODES};
use conn::{Manager, PgConn, Statements};
use parking_lot::Mutex;
use postgres::types::ToSql;
use postgres::{Client, GenericClient};
use std::fmt;
use std::time::Duration;

/// How to reach the server (libpq's settings).
pub type PgOptions = super::ServerOptions;

/// The engine's name in messages.
pub const ENGINE: &str = "PostgreSQL";

impl PgOptions {
    fn config(&self) -> postgres::Config {
        let mut c = postgres::Config::new();
        c.host(&self.host)
            .dbname(&self.database)
            .user(&self.user)
            .connect_timeout(self.connect_timeout)
            .application_name("mod_mam_rs");
        if let Some(port) = self.port {
            c.port(port);
        }
        if let Some(password) = &self.password {
            c.password(password);
        }
        c
    }
}

/// An archive store in a PostgreSQL database.
pub struct PgStore {
    options: PgOptions,
    writer: Mutex<Option<PgConn>>,
    /// The writer node this process holds (a session advisory lock on the writer connection).
    node: Mutex<Option<u16>>,
    readers: r2d2::Pool<Manager>,
    ids: Mutex<IdCache>,
    codec: Codec,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("server", &self.options.describe(ENGINE))
            .finish_non_exhaustive()
    }
}

const SELECT_ARCHIVE: &str =
    "SELECT aid FROM mam_rs_archives WHERE host = $1 AND username = $2 AND store = $3";
const UPSERT_ARCHIVE: &str =
    "INSERT INTO mam_rs_archives (host, username, store) VALUES ($1, $2, $3) \
     ON CONFLICT (host, username, store) DO UPDATE SET store = EXCLUDED.store RETURNING aid";
const SELECT_JID: &str = "SELECT jid_id FROM mam_rs_jids WHERE jid = $1";
const UPSERT_JID: &str = "INSERT INTO mam_rs_jids (jid) VALUES ($1) \
     ON CONFLICT (jid) DO UPDATE SET jid = EXCLUDED.jid RETURNING jid_id";
const INSERT_MESSAGES: &str = "INSERT INTO mam_rs_messages (id, aid, with_id, stanza, zstanza) \
     SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::BYTEA[])";
const INSERT_MESSAGE: &str = "INSERT INTO mam_rs_messages (id, aid, with_id, stanza, zstanza) \
     VALUES ($1, $2, $3, $4, $5)";
const SELECT_NEWEST_DICTIONARY: &str =
    "SELECT dict_id, dict FROM mam_rs_dictionaries ORDER BY dict_id DESC LIMIT 1";
const SELECT_DICTIONARY: &str = "SELECT dict FROM mam_rs_dictionaries WHERE dict_id = $1";
const SELECT_ITEM_COUNT: &str = "SELECT item_count FROM mam_rs_archives WHERE aid = $1";
const SELECT_WITH_COUNT: &str = "SELECT coalesce((SELECT item_count FROM mam_rs_with_counts \
     WHERE aid = $1 AND with_id = $2), 0)";
const SELECT_ITEM_IN_ARCHIVE: &str = "SELECT 1 FROM mam_rs_messages WHERE id = $1 AND aid = $2";
/// An archive's first and last ids, all or with one contact (each end read from an index).
const SELECT_ENDS: &str = "SELECT min(id), max(id) FROM mam_rs_messages WHERE aid = $1";
const SELECT_WITH_ENDS: &str =
    "SELECT min(id), max(id) FROM mam_rs_messages WHERE aid = $1 AND with_id = $2";
const SELECT_LEGACY: &str = "SELECT id FROM mam_rs_legacy_ids WHERE aid = $1 AND key = $2";
const DELETE_OLDEST: &str = "DELETE FROM mam_rs_messages WHERE id IN \
     (SELECT id FROM mam_rs_messages WHERE aid = $1 ORDER BY id LIMIT $2)";

/// The advisory lock class of writer nodes (`pg_try_advisory_lock(NODE_LOCK, node)`).
const NODE_LOCK: i32 = 0x6d61_6d6e; // "mamn"

/// Takes writer node `node` for this session, if no other session holds it.
fn try_node_lock(client: &mut Client, node: u16) -> Result<bool, StoreError> {
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&NODE_LOCK, &i32::from(node)],
        )
        .map_err(db)?;
    Ok(row.get(0))
}

impl PgStore {
    /// Connects, migrates the schema to [`SCHEMA_VERSION`] and opens the read pool;
    /// `compression` is `archive_compression`.
    pub fn open(options: &PgOptions, compression: bool) -> Result<PgStore, StoreError> {
        let describe = options.describe(ENGINE);
        // A server that does not answer (or answers that it is starting or stopping) may come
        // back: Unavailable. One that refuses (password, database) is an error: Open.
        let open_err = |e: postgres::Error| {
            let silent = e.as_db_error().is_none();
            match db(e) {
                StoreError::Database(why) if !silent => {
                    StoreError::Open(format!("{describe}: {why}"))
                }
                StoreError::Database(why) | StoreError::Unavailable(why) => {
                    StoreError::Unavailable(format!("{describe}: {why}"))
                }
                other => other,
            }
        };
        let mut writer = PgConn::connect(&options.config()).map_err(open_err)?;
        schema::migrate(&mut writer.client)?;
        let codec = Codec::new(compression);
        if compression {
            use_newest_dictionary(&codec, &mut writer.client).map_err(|e| match e {
                StoreError::Database(why) => StoreError::Open(format!("{describe}: {why}")),
                e => e,
            })?;
        }
        let readers = r2d2::Pool::builder()
            .thread_pool(super::pool_threads())
            .max_size(options.pool_size.max(1))
            .min_idle(Some(1))
            .test_on_check_out(false) // See PgStore::read.
            .connection_timeout(options.connect_timeout.max(Duration::from_secs(1)))
            .build(Manager(options.config()))
            .map_err(|e| StoreError::Open(format!("{describe}: read pool: {e}")))?;
        Ok(PgStore {
            options: options.clone(),
            writer: Mutex::new(Some(writer)),
            node: Mutex::new(None),
            readers,
            ids: Mutex::new(IdCache::new(ID_CACHE_CAPACITY)),
            codec,
        })
    }

    /// Before writing `incoming` rows: trains the first dictionary once the database holds
    /// enough rows (see `store::codec`).
    fn prepare_codec(
        &self,
        client: &mut impl GenericClient,
        incoming: usize,
    ) -> Result<(), StoreError> {
        self.codec.before_write(incoming, || self.train(client))
    }

    /// `optimize` with compression on: trains a dictionary if there is none yet (else takes the
    /// newest), then compresses the rows stored as text, a batch per statement. The old row
    /// versions are left for `VACUUM`, which lets new rows reuse their space.
    fn compress_all(&self, client: &mut Client) -> Result<String, StoreError> {
        if let Some(report) = codec::not_trained(self.train(client)?) {
            return Ok(report);
        }
        const BATCH: usize = 2000;
        let (mut done, mut before, mut after) = (0u64, 0u64, 0u64);
        let mut after_id = i64::MIN;
        loop {
            let rows = client
                .query(
                    "SELECT id, stanza FROM mam_rs_messages WHERE zstanza IS NULL AND id > $1 \
                     ORDER BY id LIMIT $2",
                    &[&after_id, &(BATCH as i64)],
                )
                .map_err(db)?;
            let Some(last) = rows.last() else { break };
            after_id = last.get(0);
            let (mut ids, mut blobs) = (Vec::new(), Vec::new());
            for row in &rows {
                let text: &str = row.get(1);
                if let Some(blob) = self.codec.compress(text) {
                    before += text.len() as u64;
                    after += blob.len() as u64;
                    ids.push(row.get::<_, i64>(0));
                    blobs.push(blob);
                }
            }
            if !ids.is_empty() {
                done += client
                    .execute(
                        "UPDATE mam_rs_messages m SET stanza = '', zstanza = x.z \
                         FROM unnest($1::BIGINT[], $2::BYTEA[]) AS x(id, z) \
                         WHERE m.id = x.id AND m.zstanza IS NULL",
                        &[&ids, &blobs],
                    )
                    .map_err(db)?;
            }
            if rows.len() < BATCH {
                break;
            }
        }
        Ok(codec::compressed(done, before, after))
    }

    /// Makes the newest dictionary in the database current, training one from the newest text
    /// rows and storing it when there is none. Every process writing to the database uses the
    /// first one trained; two processes training at once both offer the next id, and the one
    /// that loses takes the winner's dictionary.
    fn train(&self, client: &mut impl GenericClient) -> Result<Trained, StoreError> {
        if let Some(id) = use_newest_dictionary(&self.codec, client)? {
            return Ok(Trained::Yes(id));
        }
        let samples: Vec<Vec<u8>> = client
            .query(
                "SELECT stanza FROM mam_rs_messages WHERE zstanza IS NULL ORDER BY id DESC LIMIT $1",
                &[&codec::SAMPLES],
            )
            .map_err(db)?
            .into_iter()
            .map(|row| row.get::<_, String>(0).into_bytes())
            .collect();
        let dict = match Codec::train(&samples) {
            Ok(dict) => dict,
            Err(why) => return Ok(why),
        };
        // Adds nothing when another process has just added its own: then that one is used.
        client
            .execute(
                "INSERT INTO mam_rs_dictionaries (dict_id, dict) \
                 SELECT coalesce(max(dict_id), 0) + 1, $1 FROM mam_rs_dictionaries \
                 ON CONFLICT (dict_id) DO NOTHING",
                &[&dict],
            )
            .map_err(db)?;
        Ok(use_newest_dictionary(&self.codec, client)?.map_or(Trained::Failed, Trained::Yes))
    }

    /// Runs `f` on the writer connection, connecting again first if the last one broke (and
    /// taking this process's node lock again on the new connection).
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_prepared(|conn| f(&mut conn.client))
    }

    /// [`PgStore::write`], with the writer connection's prepared statements.
    fn write_prepared<T>(
        &self,
        f: impl FnOnce(&mut PgConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut slot = self.writer.lock();
        if slot.as_ref().is_none_or(|conn| conn.client.is_closed()) {
            *slot = None;
            let mut conn = PgConn::connect(&self.options.config()).map_err(|e| {
                StoreError::Unavailable(format!(
                    "{}: {}",
                    self.options.describe(ENGINE),
                    with_cause(&e)
                ))
            })?;
            if let Some(node) = *self.node.lock() {
                if !try_node_lock(&mut conn.client, node)? {
                    return Err(StoreError::Database(format!(
                        "{}: writer node {node} of this database was claimed by another process \
                         while this one was disconnected; its ids could collide with ours, so \
                         nothing is written until this Prosody restarts and claims a free node",
                        self.options.describe(ENGINE)
                    )));
                }
            }
            *slot = Some(conn);
        }
        let conn = slot.as_mut().expect("connected above");
        let result = f(conn);
        if conn.client.is_closed() {
            *slot = None;
        }
        result
    }

    /// Runs the read `f` on a pooled connection. A connection the server closed while it sat
    /// in the pool (a restart) fails its first use; the pool discards it, and `f` runs again
    /// on the next, until one is new. Checking each connection before use instead would cost
    /// every query a round trip.
    fn read<T>(
        &self,
        mut f: impl FnMut(&mut PgConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut stale = 0;
        loop {
            let mut conn = self.readers.get().map_err(|e| {
                StoreError::Unavailable(format!(
                    "{}: no connection: {e}",
                    self.options.describe(ENGINE)
                ))
            })?;
            match f(&mut conn) {
                // Each closed one is dropped (Manager::has_broken): at most the pool's size.
                Err(_) if conn.client.is_closed() && stale < self.readers.max_size() => stale += 1,
                result => return result,
            }
        }
    }

    fn archive_for_write(
        &self,
        tx: &mut impl GenericClient,
        archive: &ArchiveRef,
        fresh: &mut Fresh,
    ) -> Result<i64, StoreError> {
        fresh.archive(&self.ids, archive, || {
            let row = tx
                .query_one(
                    UPSERT_ARCHIVE,
                    &[&&*archive.host, &archive.user, &&*archive.store],
                )
                .map_err(db)?;
            Ok(row.get(0))
        })
    }

    fn jid_for_write(
        &self,
        tx: &mut impl GenericClient,
        jid: &str,
        fresh: &mut Fresh,
    ) -> Result<i64, StoreError> {
        fresh.jid(&self.ids, jid, || {
            Ok(tx.query_one(UPSERT_JID, &[&jid]).map_err(db)?.get(0))
        })
    }

    /// `batch` as rows, when every archive and contact in it has a known id and no quota
    /// applies: nothing to look up or delete first.
    fn known_columns<'b>(&self, batch: &'b [NewItem]) -> Option<Columns<'b>> {
        if batch.iter().any(|item| item.quota.is_some()) {
            return None;
        }
        let ids = self.ids.lock();
        let mut columns = Columns::with_capacity(batch.len());
        for item in batch {
            let aid = *ids.archives.get(&item.archive)?;
            let with_id = *ids.jids.get(item.with.as_str())?;
            columns.push(item, aid, with_id);
        }
        Some(columns)
    }

    fn archive_for_read(
        &self,
        conn: &mut impl GenericClient,
        archive: &ArchiveRef,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(&aid) = self.ids.lock().archives.get(archive) {
            return Ok(Some(aid));
        }
        let aid: Option<i64> = conn
            .query_opt(
                SELECT_ARCHIVE,
                &[&&*archive.host, &archive.user, &&*archive.store],
            )
            .map_err(db)?
            .map(|row| row.get(0));
        if let Some(aid) = aid {
            self.ids.lock().remember_archive(archive.clone(), aid);
        }
        Ok(aid)
    }

    fn jid_for_read(
        &self,
        conn: &mut impl GenericClient,
        jid: &str,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(&id) = self.ids.lock().jids.get(jid) {
            return Ok(Some(id));
        }
        let id: Option<i64> = conn
            .query_opt(SELECT_JID, &[&jid])
            .map_err(db)?
            .map(|row| row.get(0));
        if let Some(id) = id {
            self.ids.lock().remember_jid(jid.to_owned(), id);
        }
        Ok(id)
    }
}

/// One read transaction of a [`PgStore`], for [`rows::find`], with its connection's prepared
/// statements.
struct Snap<'a, C> {
    store: &'a PgStore,
    conn: &'a mut C,
    statements: &'a mut Statements,
}

impl<C: GenericClient> rows::Snapshot for Snap<'_, C> {
    fn archive(&mut self, archive: &ArchiveRef) -> Result<Option<i64>, StoreError> {
        self.store.archive_for_read(self.conn, archive)
    }

    fn jid(&mut self, jid: &str) -> Result<Option<i64>, StoreError> {
        self.store.jid_for_read(self.conn, jid)
    }

    fn lookup_id(&mut self, aid: i64, text: &str) -> Result<Option<i64>, StoreError> {
        lookup_id(self.conn, self.statements, aid, text)
    }

    fn count(&mut self, filter: &Filter<'_>, range: IdRange) -> Result<u64, StoreError> {
        count(self.conn, self.statements, filter, range)
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
        select_page(
            self.conn,
            self.statements,
            &self.store.codec,
            filter,
            range,
            limit,
            reverse,
        )
    }

    fn ends(&mut self, filter: &Filter<'_>) -> Result<Option<(i64, i64)>, StoreError> {
        let row = match filter.with_id {
            None => {
                let ends = self.statements.get(self.conn, SELECT_ENDS).map_err(db)?;
                self.conn.query_one(&ends, &[&filter.aid])
            }
            Some(with_id) => {
                let ends = self
                    .statements
                    .get(self.conn, SELECT_WITH_ENDS)
                    .map_err(db)?;
                self.conn.query_one(&ends, &[&filter.aid, &with_id])
            }
        }
        .map_err(db)?;
        Ok(row.get::<_, Option<i64>>(0).zip(row.get(1)))
    }
}

impl Store for PgStore {
    fn claim_node(&self) -> Result<u16, StoreError> {
        if let Some(node) = *self.node.lock() {
            return Ok(node);
        }
        self.write(|client| {
            for node in 0..NODES {
                if try_node_lock(client, node)? {
                    *self.node.lock() = Some(node);
                    return Ok(node);
                }
            }
            Err(StoreError::Open(format!(
                "{}: all {NODES} writer nodes are held by other Prosody processes",
                self.options.describe(ENGINE)
            )))
        })
    }

    fn append(&self, batch: &[NewItem]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let known = self.known_columns(batch);
        let fresh = self.write_prepared(|conn| {
            let PgConn { client, statements } = conn;
            // Outside the batch's transaction: a dictionary committed on its own is never
            // rolled back with a failed batch while new rows are compressed with it.
            self.prepare_codec(client, batch.len())?;
            if let Some(mut columns) = known {
                // One statement, its own transaction: one round trip.
                columns.flush(client, statements, &self.codec)?;
                return Ok(Fresh::default());
            }
            let mut tx = client.transaction().map_err(db)?;
            let mut fresh = Fresh::default();
            let mut columns = Columns::with_capacity(batch.len());
            for item in batch {
                let aid = self.archive_for_write(&mut tx, &item.archive, &mut fresh)?;
                let with_id = self.jid_for_write(&mut tx, &item.with, &mut fresh)?;
                if let Some(quota) = item.quota {
                    // Rows of this batch ahead of this one count towards the quota too.
                    columns.flush(&mut tx, statements, &self.codec)?;
                    make_room(&mut tx, aid, quota)?;
                }
                columns.push(item, aid, with_id);
            }
            columns.flush(&mut tx, statements, &self.codec)?;
            tx.commit().map_err(db)?;
            Ok(fresh)
        })?;
        self.ids.lock().remember(fresh);
        Ok(())
    }

    fn find(&self, archive: &ArchiveRef, query: &Query) -> Result<Page, StoreError> {
        self.read(|conn| {
            let PgConn { client, statements } = conn;
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(db)?;
            rows::find(
                &mut Snap {
                    store: self,
                    conn: &mut tx,
                    statements,
                },
                archive,
                query,
            )
        })
    }

    fn holds(&self, id: ArchiveId) -> Result<bool, StoreError> {
        self.read(|conn| {
            let conn = &mut conn.client;
            Ok(conn
                .query_opt(
                    "SELECT 1 FROM mam_rs_messages WHERE id = $1",
                    &[&id.as_i64()],
                )
                .map_err(db)?
                .is_some())
        })
    }

    fn last_id(&self) -> Result<Option<ArchiveId>, StoreError> {
        self.read(|conn| {
            let conn = &mut conn.client;
            let max: Option<i64> = conn
                .query_one("SELECT max(id) FROM mam_rs_messages", &[])
                .map_err(db)?
                .get(0);
            max.map(stored_id).transpose()
        })
    }

    fn expire(
        &self,
        host: &str,
        store: &str,
        rule: &ExpiryRule,
        limit: u32,
        cursor: &mut ExpiryCursor,
    ) -> Result<ExpiryBatch, StoreError> {
        let mut at = *cursor;
        let batch = self.write(|client| {
            let mut tx = client.transaction().map_err(db)?;
            let mut deleted: u64 = 0;
            let mut done = false;
            'archives: while deleted < u64::from(limit) {
                let aids: Vec<i64> = tx
                    .query(
                        "SELECT aid FROM mam_rs_archives WHERE host = $1 AND store = $2 AND aid > $3 \
                         ORDER BY aid LIMIT 64",
                        &[&host, &store, &at.after_archive],
                    )
                    .map_err(db)?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                if aids.is_empty() {
                    done = true;
                    break;
                }
                for aid in aids {
                    let room = u64::from(limit) - deleted;
                    let Some(last) = expiry_bound(&mut tx, aid, rule)? else {
                        at.after_archive = aid;
                        continue;
                    };
                    let n = tx
                        .execute(
                            "DELETE FROM mam_rs_messages WHERE id IN (SELECT id FROM mam_rs_messages \
                             WHERE aid = $1 AND id <= $2 ORDER BY id LIMIT $3)",
                            &[&aid, &last, &(room as i64)],
                        )
                        .map_err(db)?;
                    deleted += n;
                    if n == room {
                        break 'archives;
                    }
                    at.after_archive = aid;
                }
            }
            tx.commit().map_err(db)?;
            Ok(ExpiryBatch { deleted, done })
        })?;
        *cursor = at;
        Ok(batch)
    }

    fn record_marks(&self, marks: &[Mark]) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        let fresh = self.write(|client| {
            let mut tx = client.transaction().map_err(db)?;
            let mut fresh = Fresh::default();
            for mark in marks {
                let aid = self.archive_for_write(&mut tx, &mark.archive, &mut fresh)?;
                tx.execute(
                    "INSERT INTO mam_rs_client_marks (aid, client, last_id, seen) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (aid, client) DO UPDATE SET \
                     last_id = GREATEST(mam_rs_client_marks.last_id, EXCLUDED.last_id), \
                     seen = GREATEST(mam_rs_client_marks.seen, EXCLUDED.seen)",
                    &[&aid, &mark.client, &mark.last_id.as_i64(), &mark.seen],
                )
                .map_err(db)?;
            }
            tx.commit().map_err(db)?;
            Ok(fresh)
        })?;
        self.ids.lock().remember(fresh);
        Ok(())
    }

    fn import_checkpoint(
        &self,
        archive: &ArchiveRef,
        source: &str,
    ) -> Result<Option<ImportCheckpoint>, StoreError> {
        self.read(|conn| {
            let conn = &mut conn.client;
            let Some(aid) = self.archive_for_read(&mut *conn, archive)? else {
                return Ok(None);
            };
            Ok(conn
                .query_opt(
                    "SELECT position, last_id FROM mam_rs_imports WHERE source = $1 AND aid = $2",
                    &[&source, &aid],
                )
                .map_err(db)?
                .map(|row| ImportCheckpoint {
                    position: row.get(0),
                    last_id: row.get(1),
                }))
        })
    }

    fn import(
        &self,
        archive: &ArchiveRef,
        source: &str,
        rows: &[ImportRow],
        position: i64,
    ) -> Result<ImportBatch, StoreError> {
        let (done, fresh) = self.write_prepared(|conn| {
            let PgConn { client, statements } = conn;
            // Outside the transaction, as in append: a dictionary is never rolled back.
            self.prepare_codec(client, rows.len())?;
            let mut tx = client.transaction().map_err(db)?;
            // One import into one archive at a time (as SQLite's write lock gives).
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('mam_rs_import'))",
                &[],
            )
            .map_err(db)?;
            let mut fresh = Fresh::default();
            let aid = self.archive_for_write(&mut tx, archive, &mut fresh)?;
            let mut last_id: i64 = tx
                .query_opt(
                    "SELECT last_id FROM mam_rs_imports WHERE source = $1 AND aid = $2",
                    &[&source, &aid],
                )
                .map_err(db)?
                .map_or(0, |row| row.get(0));
            let now = crate::id::now_micros();
            let mut done = ImportBatch::default();
            for row in rows {
                if lookup_id(&mut tx, statements, aid, &row.key)?.is_some() {
                    done.already += 1;
                    continue;
                }
                let (id, keep_key) =
                    rows::import_id(&row.key, row.micros, last_id, now, |id| taken(&mut tx, id))?;
                let with_id = self.jid_for_write(&mut tx, &row.with, &mut fresh)?;
                let (text, blob) = self.codec.to_columns(&row.stanza);
                tx.execute(INSERT_MESSAGE, &[&id, &aid, &with_id, &text, &blob])
                    .map_err(db)?;
                if keep_key {
                    tx.execute(
                        "INSERT INTO mam_rs_legacy_ids (id, aid, key) VALUES ($1, $2, $3)",
                        &[&id, &aid, &row.key],
                    )
                    .map_err(db)?;
                }
                last_id = id;
                done.imported += 1;
            }
            tx.execute(
                "INSERT INTO mam_rs_imports (source, aid, position, last_id) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (source, aid) DO UPDATE SET position = EXCLUDED.position, \
                 last_id = EXCLUDED.last_id",
                &[&source, &aid, &position, &last_id],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok((done, fresh))
        })?;
        self.ids.lock().remember(fresh);
        Ok(done)
    }

    fn stats(&self, host: &str, store: &str, user: Option<&str>) -> Result<Stats, StoreError> {
        self.read(|conn| {
            let conn = &mut conn.client;
            let rows = match user {
                Some(user) => conn.query(
                    "SELECT aid, item_count FROM mam_rs_archives WHERE host = $1 AND username = $2 AND store = $3",
                    &[&host, &user, &store],
                ),
                None => conn.query(
                    "SELECT aid, item_count FROM mam_rs_archives WHERE host = $1 AND store = $2",
                    &[&host, &store],
                ),
            }
            .map_err(db)?;
            let aids: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let mut stats = Stats::default();
            for (aid, count) in &aids {
                if *count == 0 {
                    continue;
                }
                let row = conn
                    .query_one(
                        "SELECT min(id), max(id), \
                         sum(octet_length(stanza) + coalesce(octet_length(zstanza), 0))::BIGINT \
                         FROM mam_rs_messages WHERE aid = $1",
                        &[aid],
                    )
                    .map_err(db)?;
                let (oldest, newest, bytes): (Option<i64>, Option<i64>, Option<i64>) =
                    (row.get(0), row.get(1), row.get(2));
                stats.add_archive(*count as u64, oldest, newest, bytes.unwrap_or(0) as u64)?;
            }
            if let (Some(_), [(aid, count)]) = (user, aids.as_slice()) {
                if *count > 0 {
                    stats.contacts = conn
                        .query(
                            "SELECT j.jid, count(*) AS n FROM mam_rs_messages m \
                             JOIN mam_rs_jids j ON j.jid_id = m.with_id WHERE m.aid = $1 \
                             GROUP BY j.jid ORDER BY n DESC, j.jid LIMIT 20",
                            &[aid],
                        )
                        .map_err(db)?
                        .iter()
                        .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                        .collect();
                }
            }
            Ok(stats)
        })
    }

    fn delete_archive(&self, archive: &ArchiveRef, limit: u32) -> Result<u64, StoreError> {
        self.write(|client| {
            let mut tx = client.transaction().map_err(db)?;
            let Some(aid): Option<i64> = tx
                .query_opt(
                    SELECT_ARCHIVE,
                    &[&&*archive.host, &archive.user, &&*archive.store],
                )
                .map_err(db)?
                .map(|row| row.get(0))
            else {
                return Ok(0);
            };
            let deleted = tx
                .execute(
                    "DELETE FROM mam_rs_messages WHERE id IN \
                     (SELECT id FROM mam_rs_messages WHERE aid = $1 LIMIT $2)",
                    &[&aid, &i64::from(limit)],
                )
                .map_err(db)?;
            if deleted == 0 {
                tx.execute("DELETE FROM mam_rs_client_marks WHERE aid = $1", &[&aid])
                    .map_err(db)?;
                tx.execute("DELETE FROM mam_rs_imports WHERE aid = $1", &[&aid])
                    .map_err(db)?;
            }
            tx.commit().map_err(db)?;
            Ok(deleted)
        })
    }

    fn optimize(&self, vacuum: bool) -> Result<Vec<String>, StoreError> {
        self.write(|client| {
            let mut report = Vec::new();
            let expected = [
                "mam_rs_messages_by_archive",
                "mam_rs_messages_by_with",
                "mam_rs_legacy_ids_aid_key_key",
            ];
            let mut missing = Vec::new();
            for name in expected {
                let found: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE indexname = $1)",
                        &[&name],
                    )
                    .map_err(db)?
                    .get(0);
                if !found {
                    missing.push(name);
                }
            }
            report.push(rows::indexes_checked(&missing)?);
            if self.codec.enabled() {
                report.push(self.compress_all(client)?);
            }
            let tables = "mam_rs_messages, mam_rs_archives, mam_rs_jids, mam_rs_legacy_ids";
            if vacuum {
                client
                    .batch_execute(&format!("VACUUM (ANALYZE) {tables}"))
                    .map_err(db)?;
                report.push("VACUUM (ANALYZE): dead rows reclaimed, statistics refreshed".into());
            } else {
                client
                    .batch_execute(&format!("ANALYZE {tables}"))
                    .map_err(db)?;
                report.push("ANALYZE: statistics refreshed".into());
            }
            Ok(report)
        })
    }

    fn figures(&self, host: &str, store: &str) -> Result<Figures, StoreError> {
        self.read(|conn| {
            let conn = &mut conn.client;
            let row = conn
                .query_one(
                    "SELECT count(*) FILTER (WHERE item_count > 0), coalesce(sum(item_count), 0)::BIGINT, \
                     pg_total_relation_size('mam_rs_messages') FROM mam_rs_archives \
                     WHERE host = $1 AND store = $2",
                    &[&host, &store],
                )
                .map_err(db)?;
            Ok(Figures {
                archives: row.get::<_, i64>(0) as u64,
                messages: row.get::<_, i64>(1) as u64,
                bytes: row.get::<_, i64>(2) as u64,
            })
        })
    }
}

/// Makes the newest dictionary in the database the one new rows are compressed with; its id,
/// or `None` when there is none yet.
fn use_newest_dictionary(
    codec: &Codec,
    client: &mut impl GenericClient,
) -> Result<Option<u8>, StoreError> {
    let Some(row) = client
        .query_opt(SELECT_NEWEST_DICTIONARY, &[])
        .map_err(db)?
    else {
        return Ok(None);
    };
    codec
        .use_stored_dictionary(row.get::<_, i16>(0).into(), row.get(1))
        .map(Some)
        .map_err(StoreError::Database)
}

/// Rows to insert, as the arrays [`INSERT_MESSAGES`] takes.
struct Columns<'b> {
    ids: Vec<i64>,
    aids: Vec<i64>,
    withs: Vec<i64>,
    stanzas: Vec<&'b str>,
}

impl<'b> Columns<'b> {
    fn with_capacity(n: usize) -> Columns<'b> {
        Columns {
            ids: Vec::with_capacity(n),
            aids: Vec::with_capacity(n),
            withs: Vec::with_capacity(n),
            stanzas: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, item: &'b NewItem, aid: i64, with_id: i64) {
        self.ids.push(item.id.as_i64());
        self.aids.push(aid);
        self.withs.push(with_id);
        self.stanzas.push(item.stanza.as_str());
    }

    /// Inserts the rows gathered so far, in one statement (each stanza compressed with
    /// `codec`'s current dictionary, if any), and starts again.
    fn flush(
        &mut self,
        conn: &mut impl GenericClient,
        statements: &mut Statements,
        codec: &Codec,
    ) -> Result<(), StoreError> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let (texts, blobs): (Vec<&str>, Vec<Option<Vec<u8>>>) = self
            .stanzas
            .iter()
            .map(|stanza| codec.to_columns(stanza))
            .unzip();
        let insert = statements.get(conn, INSERT_MESSAGES).map_err(db)?;
        conn.execute(
            &insert,
            &[&self.ids, &self.aids, &self.withs, &texts, &blobs],
        )
        .map_err(db)?;
        self.ids.clear();
        self.aids.clear();
        self.withs.clear();
        self.stanzas.clear();
        Ok(())
    }
}

/// Stock's quota rule ([`rows::over_quota`]) before a row goes into archive `aid`.
fn make_room(tx: &mut impl GenericClient, aid: i64, quota: u32) -> Result<(), StoreError> {
    let count: i64 = tx.query_one(SELECT_ITEM_COUNT, &[&aid]).map_err(db)?.get(0);
    if let Some(excess) = rows::over_quota(count, quota) {
        tx.execute(DELETE_OLDEST, &[&aid, &excess]).map_err(db)?;
    }
    Ok(())
}

/// The newest id `rule` lets go in archive `aid`, or `None` when nothing may go.
fn expiry_bound(
    tx: &mut impl GenericClient,
    aid: i64,
    rule: &ExpiryRule,
) -> Result<Option<i64>, StoreError> {
    rows::expiry_bound(rule, |strategy, seen_since| {
        let sql = match strategy {
            Strategy::One => {
                "SELECT max(last_id) FROM mam_rs_client_marks WHERE aid = $1 AND seen >= $2"
            }
            Strategy::All => {
                "SELECT min(last_id) FROM mam_rs_client_marks WHERE aid = $1 AND seen >= $2"
            }
        };
        Ok(tx.query_one(sql, &[&aid, &seen_since]).map_err(db)?.get(0))
    })
}

fn taken(tx: &mut impl GenericClient, id: i64) -> Result<bool, StoreError> {
    Ok(tx
        .query_opt("SELECT 1 FROM mam_rs_messages WHERE id = $1", &[&id])
        .map_err(db)?
        .is_some())
}

/// The row of archive `aid` that clients know as `text`: a native id, or an imported key.
fn lookup_id(
    conn: &mut impl GenericClient,
    statements: &mut Statements,
    aid: i64,
    text: &str,
) -> Result<Option<i64>, StoreError> {
    if let Some(id) = ArchiveId::parse(text).map(ArchiveId::as_i64) {
        let held = statements.get(conn, SELECT_ITEM_IN_ARCHIVE).map_err(db)?;
        if conn.query_opt(&held, &[&id, &aid]).map_err(db)?.is_some() {
            return Ok(Some(id));
        }
    }
    let legacy = statements.get(conn, SELECT_LEGACY).map_err(db)?;
    Ok(conn
        .query_opt(&legacy, &[&aid, &text])
        .map_err(db)?
        .map(|row| row.get(0)))
}

/// ` WHERE ...` for `filter` and `range` over table alias `m`, and its parameters.
fn where_clause<'p>(
    filter: &'p Filter<'_>,
    range: &'p IdRange,
) -> (String, Vec<&'p (dyn ToSql + Sync)>) {
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&filter.aid];
    let mut sql = String::from(" WHERE m.aid = $1");
    if let Some(with_id) = &filter.with_id {
        params.push(with_id);
        sql.push_str(&format!(" AND m.with_id = ${}", params.len()));
    }
    params.push(&range.lo);
    params.push(&range.hi);
    sql.push_str(&format!(
        " AND m.id BETWEEN ${} AND ${}",
        params.len() - 1,
        params.len()
    ));
    if let Some(ids) = &filter.ids {
        params.push(ids);
        sql.push_str(&format!(" AND m.id = ANY(${})", params.len()));
    }
    (sql, params)
}

/// The rows of an archive (`$1`) in a range split as [`MinuteSplit`] does: the kept counts of
/// its whole minutes (`$2` to `$3`, schema version 4), and the rows of its two ends counted
/// (`$4` to `$5`, `$6` to `$7`).
const COUNT_BY_MINUTES: &str = "SELECT \
     (SELECT coalesce(sum(item_count), 0) FROM mam_rs_minute_counts \
      WHERE aid = $1 AND minute BETWEEN $2 AND $3)::BIGINT \
   + (SELECT count(*) FROM mam_rs_messages WHERE aid = $1 AND id BETWEEN $4 AND $5) \
   + (SELECT count(*) FROM mam_rs_messages WHERE aid = $1 AND id BETWEEN $6 AND $7)";

/// Rows matching `filter` and `range` (not empty).
fn count(
    conn: &mut impl GenericClient,
    statements: &mut Statements,
    filter: &Filter<'_>,
    range: IdRange,
) -> Result<u64, StoreError> {
    let n: i64 = if filter.ids.is_none() && range.is_everything() {
        match filter.with_id {
            None => {
                let total = statements.get(conn, SELECT_ITEM_COUNT).map_err(db)?;
                conn.query_one(&total, &[&filter.aid])
            }
            Some(with_id) => {
                let total = statements.get(conn, SELECT_WITH_COUNT).map_err(db)?;
                conn.query_one(&total, &[&filter.aid, &with_id])
            }
        }
        .map_err(db)?
        .get(0)
    } else if let (None, None, Some(minutes)) =
        (filter.with_id, &filter.ids, MinuteSplit::of(range))
    {
        let count = statements.get(conn, COUNT_BY_MINUTES).map_err(db)?;
        let params = minutes.params(filter.aid);
        let params = params.each_ref().map(|p| p as &(dyn ToSql + Sync));
        conn.query_one(&count, &params).map_err(db)?.get(0)
    } else {
        let (clause, params) = where_clause(filter, &range);
        let count = statements
            .get(
                conn,
                &format!("SELECT count(*) FROM mam_rs_messages m{clause}"),
            )
            .map_err(db)?;
        conn.query_one(&count, &params).map_err(db)?.get(0)
    };
    u64::try_from(n).map_err(|_| StoreError::Database(format!("negative count {n}")))
}

fn select_page(
    conn: &mut impl GenericClient,
    statements: &mut Statements,
    codec: &Codec,
    filter: &Filter<'_>,
    range: IdRange,
    limit: Option<u32>,
    reverse: bool,
) -> Result<Vec<Item>, StoreError> {
    let (clause, mut params) = where_clause(filter, &range);
    let limit = limit.map(i64::from);
    params.push(&limit);
    let sql = format!(
        "SELECT m.id, j.jid, m.stanza, m.zstanza, l.key FROM mam_rs_messages m \
         JOIN mam_rs_jids j ON j.jid_id = m.with_id \
         LEFT JOIN mam_rs_legacy_ids l ON l.id = m.id{clause} \
         ORDER BY m.id {} LIMIT ${}",
        if reverse { "DESC" } else { "ASC" },
        params.len()
    );
    let page = statements.get(conn, &sql).map_err(db)?;
    let rows = conn.query(&page, &params).map_err(db)?;
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.get(0);
        let stanza = codec
            .stanza_of_columns(row.get(2), row.get(3), |dict_id| {
                let dict = statements
                    .get(conn, SELECT_DICTIONARY)
                    .map_err(|e| e.to_string())?;
                conn.query_one(&dict, &[&i16::from(dict_id)])
                    .map(|row| row.get(0))
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| StoreError::Database(format!("message {id}: {e}")))?;
        items.push(Item {
            id: stored_id(id)?,
            with: row.get(1),
            stanza,
            key: row.get(4),
        });
    }
    Ok(items)
}

/// Entries each id cache (archives, JIDs) holds, as the SQLite store's default.
const ID_CACHE_CAPACITY: usize = 100_000;

/// The driver's error and what caused it ("error connecting to server: Connection refused").
fn with_cause(e: &postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

/// The driver's error, with the server's own message (the driver's `Display` says only "db
/// error"). A closed connection or a server shutting down is [`StoreError::Unavailable`].
fn db(e: postgres::Error) -> StoreError {
    use postgres::error::SqlState;
    let Some(server) = e.as_db_error() else {
        let text = with_cause(&e);
        return if e.is_closed() {
            StoreError::Unavailable(text)
        } else {
            StoreError::Database(text)
        };
    };
    let text = format!(
        "{} {}: {}",
        server.severity(),
        server.code().code(),
        server.message()
    );
    let code = server.code();
    if *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
    {
        StoreError::Unavailable(text)
    } else {
        StoreError::Database(text)
    }
}
