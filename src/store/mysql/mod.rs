//! The MySQL/MariaDB [`Store`]: the archive in a database server, in the module's own tables.
//!
//! The same model and the same query semantics as the SQLite and PostgreSQL stores (the query
//! algorithm and the id, quota, import and expiry rules are `store::rows`; this file only runs
//! the SQL): interned archives and JIDs, ids as `BIGINT` primary keys, totals from a count kept
//! per archive, InnoDB tables. Where MySQL differs:
//!
//! - A commit batch goes in as one multi-row `INSERT … VALUES (…), (…)`, split only where it
//!   would not fit the server's `max_allowed_packet` (one round trip per commit, not per row).
//! - The counts, per archive, per archive and contact (`mam_rs_with_counts`, schema 2) and per
//!   archive and minute (`mam_rs_minute_counts`, schema 4, for time windows), are kept here, not
//!   by triggers: MySQL triggers run once per row (a 1000-row batch would
//!   update its archive row 1000 times), so each write that inserts or deletes adds or
//!   subtracts its rows, in the same transaction: one text query for all the batch's archives
//!   and contacts (a round trip, not one per archive). Every write locks the archive rows before
//!   touching their messages, in `aid` order within a batch, so that writers of several Prosody
//!   processes do not deadlock on them. Rows deleted with SQL from outside the module are not
//!   taken off the counts (on SQLite and PostgreSQL, triggers keep them).
//! - MySQL commits around DDL, so migrations are not one transaction (see `schema`).
//!
//! Connections: one writer connection, connected again when the server went away (the first
//! statement of a write finds out, before anything was done), and the driver's pool for
//! queries, each connection pinged before use, so a restarted server is picked up again. The
//! writer connection also holds this process's writer node ([`Store::claim_node`]) as a named
//! lock (`GET_LOCK`), which the server releases with the session.
//!
//! `archive_compression` (`store::codec`), as on PostgreSQL: a compressed row keeps its stanza
//! in `zstanza` and an empty `stanza`; the dictionaries are in `mam_rs_dictionaries`, shared by
//! every process writing to the database.

mod schema;
#[cfg(all(test, feature = "mysql-tests"))]
mod tests;

pub use schema::SCHEMA_VERSION;

use super::codec::{self, Codec, Trained};
use super::rows::{self, stored_id, Filter, Fresh, IdCache, IdRange, MinuteSplit, MINUTE_SHIFT};
use super::{
    ArchiveRef, ExpiryBatch, ExpiryCursor, ExpiryRule, Figures, ImportBatch, ImportCheckpoint,
    ImportRow, Item, Mark, NewItem, Page, Query, Stats, Store, StoreError, Strategy,
};
use crate::id::{ArchiveId, NODES};
use mysql::prelude::{FromRow, Queryable};
use mysql::{Conn, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, PooledConn, Row, Value};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

/// How to reach the server; a `host` starting with `/` is the server's Unix socket.
pub type MysqlOptions = super::ServerOptions;

/// The engine's name in messages.
pub const ENGINE: &str = "MySQL";

/// `MySQL user@host:port/database` for messages (never the password); no port with a socket,
/// where it is not used.
pub fn describe(options: &MysqlOptions) -> String {
    if options.host.starts_with('/') {
        MysqlOptions {
            port: None,
            ..options.clone()
        }
        .describe(ENGINE)
    } else {
        options.describe(ENGINE)
    }
}

impl MysqlOptions {
    fn opts(&self) -> OptsBuilder {
        let builder = OptsBuilder::new()
            .user(Some(&self.user))
            .pass(self.password.clone())
            .db_name(Some(&self.database))
            // The driver would otherwise switch a loopback TCP connection to the server's
            // socket: connect where the configuration says.
            .prefer_socket(false)
            .tcp_connect_timeout((!self.connect_timeout.is_zero()).then_some(self.connect_timeout))
            .init(schema::SESSION_SETTINGS.to_vec())
            .connect_attrs(Some(HashMap::from([("program_name", "mod_mam_rs")])));
        if self.host.starts_with('/') {
            builder.socket(Some(&self.host))
        } else {
            builder
                .ip_or_hostname(Some(&self.host))
                .tcp_port(self.port.unwrap_or(DEFAULT_PORT))
        }
    }
}

const DEFAULT_PORT: u16 = 3306;

/// An archive store in a MySQL or MariaDB database.
pub struct MysqlStore {
    options: MysqlOptions,
    writer: Mutex<Option<Writer>>,
    /// The writer node this process holds (a named lock of the writer connection's session).
    node: Mutex<Option<u16>>,
    readers: Pool,
    ids: Mutex<IdCache>,
    codec: Codec,
}

impl fmt::Debug for MysqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlStore")
            .field("server", &describe(&self.options))
            .finish_non_exhaustive()
    }
}

/// The writer connection and what it learnt from the server when it connected.
struct Writer {
    conn: Conn,
    /// Bytes one `INSERT` may take (`max_allowed_packet`, within the driver's packet size).
    insert_budget: usize,
}

const SELECT_ARCHIVE: &str =
    "SELECT aid FROM mam_rs_archives WHERE host = ? AND username = ? AND store = ?";
/// Inserts an archive, or finds the one another process inserted since this transaction's
/// snapshot: either way `LAST_INSERT_ID()` is its `aid`.
const UPSERT_ARCHIVE: &str = "INSERT INTO mam_rs_archives (host, username, store) \
     VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE aid = LAST_INSERT_ID(aid)";
const SELECT_JID: &str = "SELECT jid_id FROM mam_rs_jids WHERE jid = ?";
const UPSERT_JID: &str = "INSERT INTO mam_rs_jids (jid) VALUES (?) \
     ON DUPLICATE KEY UPDATE jid_id = LAST_INSERT_ID(jid_id)";
/// Locks an archive row until commit, before its messages are touched; reads its count.
const LOCK_ARCHIVE: &str = "SELECT item_count FROM mam_rs_archives WHERE aid = ? FOR UPDATE";
const SELECT_ITEM_COUNT: &str = "SELECT item_count FROM mam_rs_archives WHERE aid = ?";
const INSERT_MESSAGE: &str =
    "INSERT INTO mam_rs_messages (id, aid, with_id, stanza, zstanza) VALUES (?, ?, ?, ?, ?)";
const SELECT_NEWEST_DICTIONARY: &str =
    "SELECT dict_id, dict FROM mam_rs_dictionaries ORDER BY dict_id DESC LIMIT 1";
const SELECT_DICTIONARY: &str = "SELECT dict FROM mam_rs_dictionaries WHERE dict_id = ?";
const SELECT_ITEM_IN_ARCHIVE: &str = "SELECT 1 FROM mam_rs_messages WHERE id = ? AND aid = ?";
const SELECT_LEGACY: &str = "SELECT id FROM mam_rs_legacy_ids WHERE aid = ? AND legacy_key = ?";
/// Archive `aid`'s oldest rows up to an id, locked (a current read, as the `DELETE` after it).
const SELECT_OLDEST: &str = "SELECT id, with_id FROM mam_rs_messages WHERE aid = ? AND id <= ? \
                             ORDER BY id LIMIT ? FOR UPDATE";
const DELETE_OLDEST: &str =
    "DELETE FROM mam_rs_messages WHERE aid = ? AND id <= ? ORDER BY id LIMIT ?";
const SELECT_WITH_COUNT: &str =
    "SELECT item_count FROM mam_rs_with_counts WHERE aid = ? AND with_id = ?";
/// An archive's first and last ids, all or with one contact (each end read from an index).
const SELECT_ENDS: &str = "SELECT MIN(id), MAX(id) FROM mam_rs_messages WHERE aid = ?";
const SELECT_WITH_ENDS: &str =
    "SELECT MIN(id), MAX(id) FROM mam_rs_messages WHERE aid = ? AND with_id = ?";
/// Takes writer node `?` for this session, if no other session holds it: 1 when taken. Named
/// locks are server-wide, so the database's name is part of the lock's (hashed: a name has at
/// most 64 characters).
const NODE_LOCK: &str = "SELECT GET_LOCK(CONCAT('mam_rs:', MD5(DATABASE()), ':node:', ?), 0)";

/// Rows in one `INSERT` at most (five placeholders each, of the 65535 a statement may have).
const MAX_ROWS_PER_INSERT: usize = 1024;
/// Bytes a row takes in an `INSERT` packet beside its stanza (three integers, types, lengths).
const ROW_OVERHEAD: usize = 64;
/// The driver sends each value of a statement larger than one packet (16 MiB) as a packet of
/// its own: keep each `INSERT` within one.
const MAX_PAYLOAD: usize = (1 << 24) - 1;
/// Room kept in a packet for the statement's own header.
const PACKET_HEADROOM: usize = 4096;

impl MysqlStore {
    /// Connects, migrates the schema to [`SCHEMA_VERSION`] and opens the read pool;
    /// `compression` is `archive_compression`.
    pub fn open(options: &MysqlOptions, compression: bool) -> Result<MysqlStore, StoreError> {
        let describe = describe(options);
        // A server that does not answer may come back: Unavailable stays (see `connect`).
        let open_err = |e: StoreError| match e {
            StoreError::Database(e) => StoreError::Open(e),
            e => e,
        };
        let mut writer = connect(options).map_err(open_err)?;
        schema::migrate(&mut writer.conn)?;
        let codec = Codec::new(compression);
        if compression {
            use_newest_dictionary(&codec, &mut writer.conn).map_err(|e| match e {
                StoreError::Database(why) => StoreError::Open(format!("{describe}: {why}")),
                e => e,
            })?;
        }
        let constraints = PoolConstraints::new(1, options.pool_size.max(1) as usize)
            .ok_or_else(|| StoreError::Open(format!("{describe}: bad pool size")))?;
        let readers = Pool::new(
            options.opts().pool_opts(
                PoolOpts::default()
                    .with_constraints(constraints)
                    // Sessions hold nothing but the settings above: no reset (a round trip
                    // per query) when a connection goes back.
                    .with_reset_connection(false)
                    // Nor a ping before each use (another round trip): see MysqlStore::read.
                    .with_check_health(false),
            ),
        )
        .map_err(|e| StoreError::Open(format!("{describe}: read pool: {e}")))?;
        Ok(MysqlStore {
            options: options.clone(),
            writer: Mutex::new(Some(writer)),
            node: Mutex::new(None),
            readers,
            ids: Mutex::new(IdCache::new(ID_CACHE_CAPACITY)),
            codec,
        })
    }

    /// Before writing `incoming` rows: trains the first dictionary once the database holds
    /// enough rows (see `store::codec`), in transactions of its own, never the batch's.
    fn prepare_codec(&self, incoming: usize) -> Result<(), StoreError> {
        self.codec.before_write(incoming, || self.train())
    }

    /// Makes the newest dictionary in the database current, training one from the newest text
    /// rows and storing it when there is none. Every process writing to the database uses the
    /// first one trained: two processes training at once both offer the next id, and the one
    /// whose insert finds it taken takes the winner's dictionary.
    fn train(&self) -> Result<Trained, StoreError> {
        let newest = || self.write(|w| use_newest_dictionary(&self.codec, &mut w.conn));
        if let Some(id) = newest()? {
            return Ok(Trained::Yes(id));
        }
        let (next, samples) = self.write(|w| {
            let next: Option<i64> = first(
                &mut w.conn,
                "SELECT CAST(COALESCE(MAX(dict_id), 0) + 1 AS SIGNED) FROM mam_rs_dictionaries",
                (),
            )?;
            let samples: Vec<Vec<u8>> = all(
                &mut w.conn,
                "SELECT stanza FROM mam_rs_messages WHERE zstanza IS NULL ORDER BY id DESC LIMIT ?",
                (codec::SAMPLES,),
            )?;
            Ok((next.unwrap_or(1), samples))
        })?;
        let dict = match Codec::train(&samples) {
            Ok(dict) => dict,
            Err(why) => return Ok(why),
        };
        // Its own transaction, committed before `newest` reads (a new snapshot). An insert of
        // the same id by another process waits for that one's commit, then changes nothing.
        self.write(|w| {
            execute(
                &mut w.conn,
                "INSERT INTO mam_rs_dictionaries (dict_id, dict) VALUES (?, ?) \
                 ON DUPLICATE KEY UPDATE dict_id = dict_id",
                (next, dict),
            )
        })?;
        Ok(newest()?.map_or(Trained::Failed, Trained::Yes))
    }

    /// `optimize` with compression on: trains a dictionary if there is none yet (else takes the
    /// newest), then compresses the rows stored as text, a batch per statement, each committed
    /// on its own (`conn` is in autocommit). `OPTIMIZE TABLE` reclaims the space.
    fn compress_all(&self, conn: &mut PooledConn) -> Result<String, StoreError> {
        if let Some(report) = codec::not_trained(self.train()?) {
            return Ok(report);
        }
        const BATCH: usize = 2000;
        let budget = statement_budget(&mut *conn)?;
        let (mut done, mut before, mut after) = (0u64, 0u64, 0u64);
        let mut after_id = i64::MIN;
        loop {
            let rows: Vec<(i64, String)> = all(
                &mut *conn,
                "SELECT id, stanza FROM mam_rs_messages WHERE zstanza IS NULL AND id > ? \
                 ORDER BY id LIMIT ?",
                (after_id, BATCH as i64),
            )?;
            let Some(&(last, _)) = rows.last() else { break };
            after_id = last;
            let mut compressed = Vec::new();
            for (id, text) in &rows {
                if let Some(blob) = self.codec.compress(text) {
                    before += text.len() as u64;
                    after += blob.len() as u64;
                    compressed.push((*id, blob));
                }
            }
            let mut rest = &compressed[..];
            for len in chunk_lengths(rest.iter().map(|(_, blob)| blob.len()), budget) {
                let (chunk, tail) = rest.split_at(len);
                rest = tail;
                let mut params = Vec::with_capacity(chunk.len() * 3);
                for (id, blob) in chunk {
                    params.extend([Value::from(*id), Value::from(blob.as_slice())]);
                }
                params.extend(chunk.iter().map(|(id, _)| Value::from(*id)));
                done += execute(
                    &mut *conn,
                    &format!(
                        "UPDATE mam_rs_messages SET stanza = '', zstanza = CASE id {} END \
                         WHERE id IN ({}) AND zstanza IS NULL",
                        vec!["WHEN ? THEN ?"; chunk.len()].join(" "),
                        value_rows(chunk.len(), "?")
                    ),
                    params,
                )?;
            }
            if rows.len() < BATCH {
                break;
            }
        }
        Ok(codec::compressed(done, before, after))
    }

    /// Runs `f` in a transaction on the writer connection and commits, connecting again first
    /// if the connection went away.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Writer) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut slot = self.writer.lock();
        let mut writer = self.begin(slot.take())?;
        let result = f(&mut writer).and_then(|done| {
            writer.conn.query_drop("COMMIT").map_err(db)?;
            Ok(done)
        });
        // A connection that cannot even roll back is gone: the next write connects again.
        if result.is_ok() || writer.conn.query_drop("ROLLBACK").is_ok() {
            *slot = Some(writer);
        }
        result
    }

    /// `writer` (or a new connection) with a transaction begun. The first statement is where a
    /// connection that went away shows it (the server restarted, or closed it after
    /// `wait_timeout`); nothing was done yet then, so a new connection takes over.
    fn begin(&self, writer: Option<Writer>) -> Result<Writer, StoreError> {
        if let Some(mut writer) = writer {
            match writer.conn.query_drop("START TRANSACTION") {
                Ok(()) => return Ok(writer),
                // It still answers: the server refused.
                Err(e) if writer.conn.ping().is_ok() => return Err(db(e)),
                Err(_) => {}
            }
        }
        let mut writer = connect(&self.options)?;
        if let Some(node) = *self.node.lock() {
            if !try_node_lock(&mut writer.conn, node)? {
                return Err(StoreError::Database(format!(
                    "{}: writer node {node} of this database was claimed by another process \
                     while this one was disconnected; its ids could collide with ours, so \
                     nothing is written until this Prosody restarts and claims a free node",
                    describe(&self.options)
                )));
            }
        }
        writer.conn.query_drop("START TRANSACTION").map_err(db)?;
        Ok(writer)
    }

    /// Runs the read `f` on a pooled connection. The pool does not ping a connection before
    /// handing it out (a round trip per query). A read that fails on a connection that then
    /// does not answer a ping (the server restarted, or closed it after `wait_timeout`) takes
    /// that connection out of the pool and runs again on the next, until one is new.
    fn read<T>(
        &self,
        mut f: impl FnMut(&mut PooledConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut stale = 0;
        loop {
            let mut conn = self
                .readers
                .try_get_conn(self.options.connect_timeout.max(Duration::from_secs(1)))
                .map_err(|e| {
                    StoreError::Unavailable(format!(
                        "{}: no connection: {e}",
                        describe(&self.options)
                    ))
                })?;
            match f(&mut conn) {
                Err(_)
                    if stale < self.options.pool_size.max(1) && conn.as_mut().ping().is_err() =>
                {
                    // The reset fails as it goes back to the pool, which then drops it.
                    conn.reset_connection(true);
                    stale += 1;
                }
                result => return result,
            }
        }
    }

    fn archive_for_write(
        &self,
        conn: &mut Conn,
        archive: &ArchiveRef,
        fresh: &mut Fresh,
    ) -> Result<i64, StoreError> {
        fresh.archive(&self.ids, archive, || {
            let name = (&*archive.host, archive.user.as_str(), &*archive.store);
            match first(conn, SELECT_ARCHIVE, name)? {
                Some(aid) => Ok(aid),
                None => insert_id(conn, UPSERT_ARCHIVE, name),
            }
        })
    }

    fn jid_for_write(
        &self,
        conn: &mut Conn,
        jid: &str,
        fresh: &mut Fresh,
    ) -> Result<i64, StoreError> {
        fresh.jid(&self.ids, jid, || match first(conn, SELECT_JID, (jid,))? {
            Some(id) => Ok(id),
            None => insert_id(conn, UPSERT_JID, (jid,)),
        })
    }

    fn archive_for_read(
        &self,
        conn: &mut impl Queryable,
        archive: &ArchiveRef,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(&aid) = self.ids.lock().archives.get(archive) {
            return Ok(Some(aid));
        }
        let aid: Option<i64> = first(
            conn,
            SELECT_ARCHIVE,
            (&*archive.host, archive.user.as_str(), &*archive.store),
        )?;
        if let Some(aid) = aid {
            self.ids.lock().remember_archive(archive.clone(), aid);
        }
        Ok(aid)
    }

    fn jid_for_read(
        &self,
        conn: &mut impl Queryable,
        jid: &str,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(&id) = self.ids.lock().jids.get(jid) {
            return Ok(Some(id));
        }
        let id: Option<i64> = first(conn, SELECT_JID, (jid,))?;
        if let Some(id) = id {
            self.ids.lock().remember_jid(jid.to_owned(), id);
        }
        Ok(id)
    }
}

/// Takes writer node `node` for the session of `conn`, if no other session holds it.
fn try_node_lock(conn: &mut Conn, node: u16) -> Result<bool, StoreError> {
    Ok(first::<Option<i64>>(conn, NODE_LOCK, (node,))?.flatten() == Some(1))
}

/// A new writer connection.
fn connect(options: &MysqlOptions) -> Result<Writer, StoreError> {
    // The server's own refusal (a wrong password, no such database) is not a server away;
    // too many connections (1040) and shutting down (1053) pass.
    let gone = |e: mysql::Error| match e {
        mysql::Error::MySqlError(ref server) if !matches!(server.code, 1040 | 1053) => {
            StoreError::Database(format!("{}: {e}", describe(options)))
        }
        e => StoreError::Unavailable(format!("{}: {e}", describe(options))),
    };
    let mut conn = Conn::new(options.opts()).map_err(gone)?;
    let insert_budget = statement_budget(&mut conn)?;
    Ok(Writer {
        conn,
        insert_budget,
    })
}

/// Bytes of values one statement may take on `conn`: the server's `max_allowed_packet`, within
/// the driver's packet size.
fn statement_budget(conn: &mut impl Queryable) -> Result<usize, StoreError> {
    let max_packet: i64 = first(conn, "SELECT @@max_allowed_packet", ())?
        .ok_or_else(|| StoreError::Database("no max_allowed_packet".into()))?;
    Ok(usize::try_from(max_packet)
        .unwrap_or(MAX_PAYLOAD)
        .min(MAX_PAYLOAD)
        .saturating_sub(PACKET_HEADROOM)
        .max(1))
}

/// One read transaction of a [`MysqlStore`], for [`rows::find`].
struct Snap<'a, C> {
    store: &'a MysqlStore,
    conn: &'a mut C,
}

impl<C: Queryable> rows::Snapshot for Snap<'_, C> {
    fn archive(&mut self, archive: &ArchiveRef) -> Result<Option<i64>, StoreError> {
        self.store.archive_for_read(self.conn, archive)
    }

    fn jid(&mut self, jid: &str) -> Result<Option<i64>, StoreError> {
        self.store.jid_for_read(self.conn, jid)
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

    fn ends(&mut self, filter: &Filter<'_>) -> Result<Option<(i64, i64)>, StoreError> {
        let ends: Option<(Option<i64>, Option<i64>)> = match filter.with_id {
            None => first(self.conn, SELECT_ENDS, (filter.aid,))?,
            Some(with_id) => first(self.conn, SELECT_WITH_ENDS, (filter.aid, with_id))?,
        };
        Ok(ends.and_then(|(first, last)| first.zip(last)))
    }
}

/// A row waiting for the batch's `INSERT`.
struct Pending<'a> {
    id: i64,
    aid: i64,
    with_id: i64,
    stanza: &'a str,
}

impl Store for MysqlStore {
    fn paces_removals(&self) -> bool {
        true
    }
    fn claim_node(&self) -> Result<u16, StoreError> {
        if let Some(node) = *self.node.lock() {
            return Ok(node);
        }
        self.write(|w| {
            for node in 0..NODES {
                if try_node_lock(&mut w.conn, node)? {
                    *self.node.lock() = Some(node);
                    return Ok(node);
                }
            }
            Err(StoreError::Open(format!(
                "{}: all {NODES} writer nodes are held by other Prosody processes",
                describe(&self.options)
            )))
        })
    }

    fn append(&self, batch: &[NewItem]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.prepare_codec(batch.len())?;
        let fresh = self.write(|w| {
            let mut fresh = Fresh::default();
            let mut pending: Vec<Pending<'_>> = Vec::with_capacity(batch.len());
            // Rows of each archive with a quota, this batch's so far included: the quota rule
            // needs the database only when an archive is first seen and when it is full.
            let mut counts: HashMap<i64, i64> = HashMap::new();
            for item in batch {
                let aid = self.archive_for_write(&mut w.conn, &item.archive, &mut fresh)?;
                let with_id = self.jid_for_write(&mut w.conn, &item.with, &mut fresh)?;
                if let Some(quota) = item.quota {
                    let mut count = match counts.get(&aid) {
                        Some(&count) => count,
                        None => {
                            let waiting = pending.iter().filter(|row| row.aid == aid).count();
                            lock_archive(&mut w.conn, aid)? + waiting as i64
                        }
                    };
                    if let Some(excess) = rows::over_quota(count, quota) {
                        // The oldest rows may be among this batch's.
                        flush(w, &self.codec, &mut pending)?;
                        let deleted = delete_oldest(&mut w.conn, aid, i64::MAX, excess as u64)?;
                        count -= deleted as i64;
                    }
                    counts.insert(aid, count);
                }
                if let Some(count) = counts.get_mut(&aid) {
                    *count += 1;
                }
                pending.push(Pending {
                    id: item.id.as_i64(),
                    aid,
                    with_id,
                    stanza: &item.stanza,
                });
            }
            flush(w, &self.codec, &mut pending)?;
            Ok(fresh)
        })?;
        self.ids.lock().remember(fresh);
        Ok(())
    }

    fn find(&self, archive: &ArchiveRef, query: &Query) -> Result<Page, StoreError> {
        self.read(|conn| {
            // REPEATABLE READ (a session setting): every read below sees the snapshot of the first.
            let mut tx = conn
                .start_transaction(mysql::TxOpts::default())
                .map_err(db)?;
            rows::find(
                &mut Snap {
                    store: self,
                    conn: &mut tx,
                },
                archive,
                query,
            )
        })
    }

    fn holds(&self, id: ArchiveId) -> Result<bool, StoreError> {
        self.read(|conn| {
            let found: Option<i64> = first(
                &mut *conn,
                "SELECT 1 FROM mam_rs_messages WHERE id = ?",
                (id.as_i64(),),
            )?;
            Ok(found.is_some())
        })
    }

    fn last_id(&self) -> Result<Option<ArchiveId>, StoreError> {
        self.read(|conn| {
            let max: Option<i64> =
                first(&mut *conn, "SELECT MAX(id) FROM mam_rs_messages", ())?.flatten();
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
        let batch = self.write(|w| {
            let conn = &mut w.conn;
            let mut deleted: u64 = 0;
            let mut done = false;
            'archives: while deleted < u64::from(limit) {
                let aids: Vec<i64> = all(
                    conn,
                    "SELECT aid FROM mam_rs_archives WHERE host = ? AND store = ? AND aid > ? \
                     ORDER BY aid LIMIT 64",
                    (host, store, at.after_archive),
                )?;
                if aids.is_empty() {
                    done = true;
                    break;
                }
                for aid in aids {
                    let room = u64::from(limit) - deleted;
                    let Some(last) = expiry_bound(conn, aid, rule)? else {
                        at.after_archive = aid;
                        continue;
                    };
                    let n = if lock_archive(conn, aid)? > 0 {
                        delete_oldest(conn, aid, last, room)?
                    } else {
                        0
                    };
                    deleted += n;
                    if n == room {
                        break 'archives;
                    }
                    at.after_archive = aid;
                }
            }
            Ok(ExpiryBatch { deleted, done })
        })?;
        *cursor = at;
        Ok(batch)
    }

    fn record_marks(&self, marks: &[Mark]) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        let fresh = self.write(|w| {
            let mut fresh = Fresh::default();
            for mark in marks {
                let aid = self.archive_for_write(&mut w.conn, &mark.archive, &mut fresh)?;
                execute(
                    &mut w.conn,
                    "INSERT INTO mam_rs_client_marks (aid, client, last_id, seen) \
                     VALUES (?, ?, ?, ?) ON DUPLICATE KEY UPDATE \
                     last_id = GREATEST(last_id, VALUES(last_id)), \
                     seen = GREATEST(seen, VALUES(seen))",
                    (aid, mark.client.as_str(), mark.last_id.as_i64(), mark.seen),
                )?;
            }
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
            let Some(aid) = self.archive_for_read(&mut *conn, archive)? else {
                return Ok(None);
            };
            Ok(first::<(i64, i64)>(
                &mut *conn,
                "SELECT position, last_id FROM mam_rs_imports WHERE aid = ? AND source = ?",
                (aid, source),
            )?
            .map(|(position, last_id)| ImportCheckpoint { position, last_id }))
        })
    }

    fn import(
        &self,
        archive: &ArchiveRef,
        source: &str,
        rows: &[ImportRow],
        position: i64,
    ) -> Result<ImportBatch, StoreError> {
        self.prepare_codec(rows.len())?;
        let (done, fresh) = self.write(|w| {
            let conn = &mut w.conn;
            // One import at a time (as SQLite's write lock gives): the schema row, locked until
            // this transaction ends, as PostgreSQL's transaction-level advisory lock.
            execute(conn, "SELECT version FROM mam_rs_schema FOR UPDATE", ())?;
            let mut fresh = Fresh::default();
            let aid = self.archive_for_write(conn, archive, &mut fresh)?;
            lock_archive(conn, aid)?;
            let mut last_id: i64 = first(
                conn,
                "SELECT last_id FROM mam_rs_imports WHERE aid = ? AND source = ?",
                (aid, source),
            )?
            .unwrap_or(0);
            let now = crate::id::now_micros();
            let mut done = ImportBatch::default();
            let mut added = CountChanges::default();
            for row in rows {
                if lookup_id(conn, aid, &row.key)?.is_some() {
                    done.already += 1;
                    continue;
                }
                let (id, keep_key) =
                    rows::import_id(&row.key, row.micros, last_id, now, |id| taken(conn, id))?;
                let with_id = self.jid_for_write(conn, &row.with, &mut fresh)?;
                let (text, blob) = self.codec.to_columns(&row.stanza);
                execute(conn, INSERT_MESSAGE, (id, aid, with_id, text, blob))?;
                added.row(aid, with_id, id, 1);
                if keep_key {
                    execute(
                        conn,
                        "INSERT INTO mam_rs_legacy_ids (id, aid, legacy_key) VALUES (?, ?, ?)",
                        (id, aid, row.key.as_str()),
                    )?;
                }
                last_id = id;
                done.imported += 1;
            }
            add_to_counts(conn, &added)?;
            execute(
                conn,
                "INSERT INTO mam_rs_imports (aid, source, position, last_id) VALUES (?, ?, ?, ?) \
                 ON DUPLICATE KEY UPDATE position = VALUES(position), last_id = VALUES(last_id)",
                (aid, source, position, last_id),
            )?;
            Ok((done, fresh))
        })?;
        self.ids.lock().remember(fresh);
        Ok(done)
    }

    fn stats(&self, host: &str, store: &str, user: Option<&str>) -> Result<Stats, StoreError> {
        self.read(|conn| {
            let aids: Vec<(i64, i64)> = match user {
                Some(user) => all(
                    &mut *conn,
                    "SELECT aid, item_count FROM mam_rs_archives \
                     WHERE host = ? AND username = ? AND store = ?",
                    (host, user, store),
                )?,
                None => all(
                    &mut *conn,
                    "SELECT aid, item_count FROM mam_rs_archives WHERE host = ? AND store = ?",
                    (host, store),
                )?,
            };
            let mut stats = Stats::default();
            for &(aid, count) in &aids {
                if count == 0 {
                    continue;
                }
                let (oldest, newest, bytes): (Option<i64>, Option<i64>, Option<i64>) = first(
                    &mut *conn,
                    "SELECT MIN(id), MAX(id), \
                     CAST(SUM(LENGTH(stanza) + COALESCE(LENGTH(zstanza), 0)) AS SIGNED) \
                     FROM mam_rs_messages WHERE aid = ?",
                    (aid,),
                )?
                .unwrap_or_default();
                stats.add_archive(
                    non_negative(count)?,
                    oldest,
                    newest,
                    non_negative(bytes.unwrap_or(0))?,
                )?;
            }
            if let (Some(_), [(aid, count)]) = (user, aids.as_slice()) {
                if *count > 0 {
                    stats.contacts = all::<(String, i64)>(
                        &mut *conn,
                        "SELECT j.jid, c.n FROM (SELECT with_id, COUNT(*) AS n FROM mam_rs_messages \
                         WHERE aid = ? GROUP BY with_id) c JOIN mam_rs_jids j ON j.jid_id = c.with_id \
                         ORDER BY c.n DESC, j.jid LIMIT 20",
                        (aid,),
                    )?
                    .into_iter()
                    .map(|(jid, n)| Ok((jid, non_negative(n)?)))
                    .collect::<Result<_, StoreError>>()?;
                }
            }
            Ok(stats)
        })
    }

    fn delete_archive(&self, archive: &ArchiveRef, limit: u32) -> Result<u64, StoreError> {
        self.write(|w| {
            let conn = &mut w.conn;
            let Some(aid) = first::<i64>(
                conn,
                SELECT_ARCHIVE,
                (&*archive.host, archive.user.as_str(), &*archive.store),
            )?
            else {
                return Ok(0);
            };
            let deleted = if lock_archive(conn, aid)? > 0 {
                delete_oldest(conn, aid, i64::MAX, u64::from(limit))?
            } else {
                0
            };
            if deleted == 0 {
                execute(
                    conn,
                    "DELETE FROM mam_rs_client_marks WHERE aid = ?",
                    (aid,),
                )?;
                execute(conn, "DELETE FROM mam_rs_imports WHERE aid = ?", (aid,))?;
            }
            Ok(deleted)
        })
    }

    /// On a read connection: `OPTIMIZE TABLE` rebuilds InnoDB tables online, and the writer
    /// keeps committing meanwhile; so does the compression of text rows, a batch at a time.
    fn optimize(&self, vacuum: bool) -> Result<Vec<String>, StoreError> {
        self.read(|conn| {
            let mut report = Vec::new();
            let mut missing = Vec::new();
            for &(table, index) in schema::INDEXES {
                let found: Option<i64> = first(
                    &mut *conn,
                    "SELECT 1 FROM information_schema.statistics \
                     WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ? LIMIT 1",
                    (table, index),
                )?;
                if found.is_none() {
                    missing.push(index);
                }
            }
            report.push(rows::indexes_checked(&missing)?);
            if self.codec.enabled() {
                report.push(self.compress_all(conn)?);
            }
            let tables = "mam_rs_messages, mam_rs_archives, mam_rs_jids, mam_rs_legacy_ids";
            if vacuum {
                table_command(&mut *conn, &format!("OPTIMIZE TABLE {tables}"))?;
                report.push(
                    "VACUUM (OPTIMIZE TABLE: on InnoDB a rebuild and ANALYZE): tables rebuilt \
                     without free space, statistics refreshed"
                        .into(),
                );
            } else {
                table_command(&mut *conn, &format!("ANALYZE TABLE {tables}"))?;
                report.push("ANALYZE TABLE: statistics refreshed".into());
            }
            Ok(report)
        })
    }

    fn figures(&self, host: &str, store: &str) -> Result<Figures, StoreError> {
        self.read(|conn| {
            let (archives, messages, bytes): (i64, i64, i64) = first(
                &mut *conn,
                "SELECT CAST(COALESCE(SUM(item_count > 0), 0) AS SIGNED), \
                 CAST(COALESCE(SUM(item_count), 0) AS SIGNED), \
                 (SELECT CAST(COALESCE(SUM(data_length + index_length), 0) AS SIGNED) \
                  FROM information_schema.tables \
                  WHERE table_schema = DATABASE() AND table_name LIKE 'mam\\_rs\\_%') \
                 FROM mam_rs_archives WHERE host = ? AND store = ?",
                (host, store),
            )?
            .unwrap_or_default();
            Ok(Figures {
                archives: non_negative(archives)?,
                messages: non_negative(messages)?,
                bytes: non_negative(bytes)?,
            })
        })
    }
}

/// Writes the rows gathered so far (each stanza compressed with `codec`'s current dictionary,
/// if any), in as few `INSERT`s as the packet size allows, and adds them to their archives'
/// counts.
fn flush(w: &mut Writer, codec: &Codec, pending: &mut Vec<Pending<'_>>) -> Result<(), StoreError> {
    if pending.is_empty() {
        return Ok(());
    }
    // Compressed before any row is locked.
    let rows: Vec<_> = pending
        .iter()
        .map(|row| (row, codec.to_columns(row.stanza)))
        .collect();
    // The counts first: archive rows are locked before message rows, in `aid` order.
    let mut added = CountChanges::default();
    for row in pending.iter() {
        added.row(row.aid, row.with_id, row.id, 1);
    }
    add_to_counts(&mut w.conn, &added)?;
    let mut rest = &rows[..];
    let lengths = rows
        .iter()
        .map(|(_, (text, blob))| text.len() + blob.as_ref().map_or(0, Vec::len));
    for len in chunk_lengths(lengths, w.insert_budget) {
        let (chunk, tail) = rest.split_at(len);
        rest = tail;
        let mut params = Vec::with_capacity(chunk.len() * 5);
        for (row, (text, blob)) in chunk {
            params.extend([
                Value::from(row.id),
                Value::from(row.aid),
                Value::from(row.with_id),
                Value::from(*text),
                blob.as_deref().map_or(Value::NULL, Value::from),
            ]);
        }
        w.conn
            .exec_drop(insert_messages(chunk.len()), params)
            .map_err(db)?;
    }
    pending.clear();
    Ok(())
}

/// `INSERT INTO mam_rs_messages … VALUES (?, ?, ?, ?, ?), …` for `rows` rows.
fn insert_messages(rows: usize) -> String {
    format!(
        "INSERT INTO mam_rs_messages (id, aid, with_id, stanza, zstanza) VALUES {}",
        value_rows(rows, "(?, ?, ?, ?, ?)")
    )
}

/// Makes the newest dictionary in the database the one new rows are compressed with; its id,
/// or `None` when there is none yet.
fn use_newest_dictionary(codec: &Codec, conn: &mut Conn) -> Result<Option<u8>, StoreError> {
    let Some((id, dict)) = first::<(i64, Vec<u8>)>(conn, SELECT_NEWEST_DICTIONARY, ())? else {
        return Ok(None);
    };
    codec
        .use_stored_dictionary(id, &dict)
        .map(Some)
        .map_err(StoreError::Database)
}

/// `row` `rows` times, separated by commas: the values list of a multi-row `INSERT`.
fn value_rows(rows: usize, row: &str) -> String {
    vec![row; rows].join(", ")
}

/// How many rows go in each `INSERT`, for rows with stanzas of these lengths: at most
/// [`MAX_ROWS_PER_INSERT`] rows and `budget` bytes each. A row larger than the budget goes
/// alone (and the server refuses it if it is larger than `max_allowed_packet`).
fn chunk_lengths(stanza_lengths: impl Iterator<Item = usize>, budget: usize) -> Vec<usize> {
    let mut chunks = Vec::new();
    let (mut rows, mut bytes) = (0, 0);
    for len in stanza_lengths {
        let size = len.saturating_add(ROW_OVERHEAD);
        if rows > 0 && (rows == MAX_ROWS_PER_INSERT || bytes + size > budget) {
            chunks.push(rows);
            (rows, bytes) = (0, 0);
        }
        rows += 1;
        bytes += size;
    }
    if rows > 0 {
        chunks.push(rows);
    }
    chunks
}

/// Locks archive `aid`'s row until commit (see the module header); returns its count.
fn lock_archive(conn: &mut Conn, aid: i64) -> Result<i64, StoreError> {
    first(conn, LOCK_ARCHIVE, (aid,))?
        .ok_or_else(|| StoreError::Database(format!("archive {aid} vanished")))
}

/// What a write adds to (or, negative, takes off) the kept counts: per archive, per archive
/// and contact, and per archive and minute (`rows::MINUTE_SHIFT`).
#[derive(Default)]
struct CountChanges {
    archives: BTreeMap<i64, i64>,
    withs: BTreeMap<(i64, i64), i64>,
    minutes: BTreeMap<(i64, i64), i64>,
}

impl CountChanges {
    /// `n` rows (1 inserted, -1 deleted) of archive `aid` with contact `with_id` and id `id`.
    fn row(&mut self, aid: i64, with_id: i64, id: i64, n: i64) {
        *self.archives.entry(aid).or_default() += n;
        *self.withs.entry((aid, with_id)).or_default() += n;
        *self.minutes.entry((aid, id >> MINUTE_SHIFT)).or_default() += n;
    }
}

/// Adds `changes` to the kept counts in one round trip: up to four statements in one text
/// query (integers only, formatted here), not a prepared statement per archive. The `UPDATE`
/// locks the archive rows in `aid` order, before the other counts' rows; a minute left with no
/// rows loses its row.
fn add_to_counts(conn: &mut Conn, changes: &CountChanges) -> Result<(), StoreError> {
    use std::fmt::Write;
    let mut sql = String::new();
    let changed = || changes.archives.iter().filter(|(_, &n)| n != 0);
    if changed().next().is_some() {
        sql.push_str("UPDATE mam_rs_archives SET item_count = item_count + CASE aid");
        for (aid, n) in changed() {
            let _ = write!(sql, " WHEN {aid} THEN {n}");
        }
        sql.push_str(" END WHERE aid IN (");
        for (i, (aid, _)) in changed().enumerate() {
            let _ = write!(sql, "{}{aid}", if i == 0 { "" } else { ", " });
        }
        sql.push_str(");");
    }
    for (table, key, counts) in [
        ("mam_rs_with_counts", "with_id", &changes.withs),
        ("mam_rs_minute_counts", "minute", &changes.minutes),
    ] {
        if counts.is_empty() {
            continue;
        }
        let _ = write!(sql, "INSERT INTO {table} (aid, {key}, item_count) VALUES ");
        for (i, ((aid, k), n)) in counts.iter().enumerate() {
            let _ = write!(sql, "{}({aid}, {k}, {n})", if i == 0 { "" } else { ", " });
        }
        sql.push_str(" ON DUPLICATE KEY UPDATE item_count = item_count + VALUES(item_count);");
    }
    let emptied = || changes.minutes.iter().filter(|(_, &n)| n < 0);
    if emptied().next().is_some() {
        sql.push_str(
            "DELETE FROM mam_rs_minute_counts WHERE item_count = 0 AND (aid, minute) IN (",
        );
        for (i, ((aid, minute), _)) in emptied().enumerate() {
            let _ = write!(sql, "{}({aid}, {minute})", if i == 0 { "" } else { ", " });
        }
        sql.push_str(");");
    }
    if sql.is_empty() {
        return Ok(());
    }
    conn.query_drop(sql).map_err(db)
}

/// Deletes archive `aid`'s oldest rows with ids up to `upto`, at most `limit` of them, and
/// takes them off its counts. The caller has locked the archive row, so no other writer
/// changes these rows meanwhile.
fn delete_oldest(conn: &mut Conn, aid: i64, upto: i64, limit: u64) -> Result<u64, StoreError> {
    let oldest: Vec<(i64, i64)> = all(conn, SELECT_OLDEST, (aid, upto, limit))?;
    if oldest.is_empty() {
        return Ok(0);
    }
    let n = execute(conn, DELETE_OLDEST, (aid, upto, limit))?;
    if n != oldest.len() as u64 {
        // Rolled back by the caller's transaction: never counts out of step with the rows.
        return Err(StoreError::Database(format!(
            "archive {aid}: {n} rows deleted where {} were selected",
            oldest.len()
        )));
    }
    let mut gone = CountChanges::default();
    for (id, with_id) in oldest {
        gone.row(aid, with_id, id, -1);
    }
    add_to_counts(conn, &gone)?;
    Ok(n)
}

/// Runs `ANALYZE TABLE` or `OPTIMIZE TABLE`, which report failures as rows, not as errors.
fn table_command(conn: &mut PooledConn, sql: &str) -> Result<(), StoreError> {
    let rows: Vec<Row> = conn.query(sql).map_err(db)?;
    for row in rows {
        // Table, Op, Msg_type, Msg_text.
        let (table, _op, kind, text): (String, String, String, String) = convert(row)?;
        if kind.eq_ignore_ascii_case("error") {
            return Err(StoreError::Database(format!("{sql}: {table}: {text}")));
        }
    }
    Ok(())
}

/// The newest id `rule` lets go in archive `aid`, or `None` when nothing may go.
fn expiry_bound(conn: &mut Conn, aid: i64, rule: &ExpiryRule) -> Result<Option<i64>, StoreError> {
    rows::expiry_bound(rule, |strategy, seen_since| {
        let sql = match strategy {
            Strategy::One => {
                "SELECT MAX(last_id) FROM mam_rs_client_marks WHERE aid = ? AND seen >= ?"
            }
            Strategy::All => {
                "SELECT MIN(last_id) FROM mam_rs_client_marks WHERE aid = ? AND seen >= ?"
            }
        };
        Ok(first::<Option<i64>>(conn, sql, (aid, seen_since))?.flatten())
    })
}

fn taken(conn: &mut Conn, id: i64) -> Result<bool, StoreError> {
    Ok(first::<i64>(conn, "SELECT 1 FROM mam_rs_messages WHERE id = ?", (id,))?.is_some())
}

/// The row of archive `aid` that clients know as `text`: a native id, or an imported key.
fn lookup_id(conn: &mut impl Queryable, aid: i64, text: &str) -> Result<Option<i64>, StoreError> {
    if let Some(id) = ArchiveId::parse(text).map(ArchiveId::as_i64) {
        if first::<i64>(conn, SELECT_ITEM_IN_ARCHIVE, (id, aid))?.is_some() {
            return Ok(Some(id));
        }
    }
    first(conn, SELECT_LEGACY, (aid, text))
}

/// ` WHERE …` for `filter` and `range` over table alias `m`, and its parameters.
fn where_clause(filter: &Filter<'_>, range: IdRange) -> (String, Vec<Value>) {
    let mut params = vec![Value::from(filter.aid)];
    let mut sql = String::from(" WHERE m.aid = ?");
    if let Some(with_id) = filter.with_id {
        params.push(Value::from(with_id));
        sql.push_str(" AND m.with_id = ?");
    }
    params.push(Value::from(range.lo));
    params.push(Value::from(range.hi));
    sql.push_str(" AND m.id BETWEEN ? AND ?");
    if let Some(ids) = filter.ids {
        // Never empty; at most `mam_rs_max_ids_per_query` long.
        sql.push_str(" AND m.id IN (");
        for (i, &id) in ids.iter().enumerate() {
            sql.push_str(if i == 0 { "?" } else { ", ?" });
            params.push(Value::from(id));
        }
        sql.push(')');
    }
    (sql, params)
}

/// The index a read of `filter` goes through, named. Left to choose, MariaDB 10.11 took the
/// contact index for a range of an archive's ids (its `aid` prefix matches as well) and sorted
/// what it found: a page after an id in a 1,000,000-message archive took 36 ms instead of 5.
fn index_hint(filter: &Filter<'_>) -> &'static str {
    if filter.with_id.is_some() {
        " FORCE INDEX (mam_rs_messages_by_with)"
    } else {
        " FORCE INDEX (mam_rs_messages_by_archive)"
    }
}

/// The rows of an archive in a range split as [`MinuteSplit`] does: the kept counts of its
/// whole minutes (schema version 4), and the rows of its two ends counted. The parameters are
/// [`MinuteSplit::params`], the archive repeated before each part.
const COUNT_BY_MINUTES: &str = "SELECT CAST( \
     (SELECT COALESCE(SUM(item_count), 0) FROM mam_rs_minute_counts \
      WHERE aid = ? AND minute BETWEEN ? AND ?) \
   + (SELECT COUNT(*) FROM mam_rs_messages WHERE aid = ? AND id BETWEEN ? AND ?) \
   + (SELECT COUNT(*) FROM mam_rs_messages WHERE aid = ? AND id BETWEEN ? AND ?) AS SIGNED)";

/// Rows matching `filter` and `range` (not empty).
fn count(
    conn: &mut impl Queryable,
    filter: &Filter<'_>,
    range: IdRange,
) -> Result<u64, StoreError> {
    let n: Option<i64> = if filter.ids.is_none() && range.is_everything() {
        match filter.with_id {
            None => first(conn, SELECT_ITEM_COUNT, (filter.aid,))?,
            Some(with_id) => first(conn, SELECT_WITH_COUNT, (filter.aid, with_id))?,
        }
    } else if let (None, None, Some(minutes)) =
        (filter.with_id, &filter.ids, MinuteSplit::of(range))
    {
        let [aid, first_minute, last_minute, below_lo, below_hi, above_lo, above_hi] =
            minutes.params(filter.aid);
        let params = (
            aid,
            first_minute,
            last_minute,
            aid,
            below_lo,
            below_hi,
            aid,
            above_lo,
            above_hi,
        );
        first(conn, COUNT_BY_MINUTES, params)?
    } else {
        let (sql, params) = count_query(filter, range);
        first(conn, &sql, params)?
    };
    non_negative(n.unwrap_or(0))
}

/// `SELECT COUNT(*)` of the rows matching `filter` and `range`, and its parameters.
fn count_query(filter: &Filter<'_>, range: IdRange) -> (String, Vec<Value>) {
    let (clause, params) = where_clause(filter, range);
    let sql = format!(
        "SELECT COUNT(*) FROM mam_rs_messages m{}{clause}",
        index_hint(filter)
    );
    (sql, params)
}

fn select_page(
    conn: &mut impl Queryable,
    codec: &Codec,
    filter: &Filter<'_>,
    range: IdRange,
    limit: Option<u32>,
    reverse: bool,
) -> Result<Vec<Item>, StoreError> {
    let (sql, params) = page_query(filter, range, limit, reverse);
    /// id, with, stanza (text), zstanza, stock id
    type PageRow = (i64, String, String, Option<Vec<u8>>, Option<String>);
    let rows: Vec<PageRow> = all(&mut *conn, &sql, params)?;
    let mut items = Vec::with_capacity(rows.len());
    for (id, with, text, blob, key) in rows {
        let stanza = codec
            .stanza_of_columns(text, blob.as_deref(), |dict_id| {
                first::<Vec<u8>>(&mut *conn, SELECT_DICTIONARY, (dict_id,))
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| "not in mam_rs_dictionaries".to_owned())
            })
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

/// One page of rows matching `filter` and `range`, ascending ids or descending when
/// `reverse`, and its parameters.
fn page_query(
    filter: &Filter<'_>,
    range: IdRange,
    limit: Option<u32>,
    reverse: bool,
) -> (String, Vec<Value>) {
    let (clause, mut params) = where_clause(filter, range);
    // STRAIGHT_JOIN: the messages first, in id order, so the page is its first `limit` rows
    // of an index. Left to itself, MySQL/MariaDB may read the (few) JIDs first and then sort
    // every message of the archive for each page: 3.4 ms for a page of 2,000 rows instead of
    // 0.3 ms, and growing with the archive.
    let mut sql = format!(
        "SELECT STRAIGHT_JOIN m.id, j.jid, m.stanza, m.zstanza, l.legacy_key \
         FROM mam_rs_messages m{} \
         JOIN mam_rs_jids j ON j.jid_id = m.with_id \
         LEFT JOIN mam_rs_legacy_ids l ON l.id = m.id{clause} \
         ORDER BY m.id {}",
        index_hint(filter),
        if reverse { "DESC" } else { "ASC" },
    );
    if let Some(limit) = limit {
        sql.push_str(" LIMIT ?");
        params.push(Value::from(limit));
    }
    (sql, params)
}

/// The first row of a statement, as `T`.
fn first<T: FromRow>(
    conn: &mut impl Queryable,
    sql: &str,
    params: impl Into<Params>,
) -> Result<Option<T>, StoreError> {
    conn.exec_first::<Row, _, _>(sql, params)
        .map_err(db)?
        .map(convert)
        .transpose()
}

/// Every row of a statement, as `T`s.
fn all<T: FromRow>(
    conn: &mut impl Queryable,
    sql: &str,
    params: impl Into<Params>,
) -> Result<Vec<T>, StoreError> {
    conn.exec::<Row, _, _>(sql, params)
        .map_err(db)?
        .into_iter()
        .map(convert)
        .collect()
}

/// Runs a statement; returns how many rows it changed.
fn execute(
    conn: &mut impl Queryable,
    sql: &str,
    params: impl Into<Params>,
) -> Result<u64, StoreError> {
    Ok(conn.exec_iter(sql, params).map_err(db)?.affected_rows())
}

/// Runs an `INSERT`; returns the `AUTO_INCREMENT` value it gave, or the one it named with
/// `LAST_INSERT_ID(…)`.
fn insert_id(
    conn: &mut impl Queryable,
    sql: &str,
    params: impl Into<Params>,
) -> Result<i64, StoreError> {
    let id = conn.exec_iter(sql, params).map_err(db)?.last_insert_id();
    match id.map(i64::try_from) {
        Some(Ok(id)) if id > 0 => Ok(id),
        _ => Err(StoreError::Database(format!(
            "no id from {}",
            sql.split(" (").next().unwrap_or(sql)
        ))),
    }
}

/// A row as `T`. A value of another type is an error, not a panic (as `Row::get` would give);
/// the message does not quote the row, which may hold a stanza.
fn convert<T: FromRow>(row: Row) -> Result<T, StoreError> {
    let columns = row.len();
    mysql::from_row_opt(row).map_err(|_| {
        StoreError::Database(format!(
            "a row of {columns} columns does not hold the expected types"
        ))
    })
}

fn non_negative(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Database(format!("negative count {n}")))
}

/// Entries each id cache (archives, JIDs) holds, as the SQLite store's default.
const ID_CACHE_CAPACITY: usize = 100_000;

fn db(e: mysql::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn batches_split_by_rows_and_bytes() {
        assert_eq!(chunk_lengths([].into_iter(), 1000), Vec::<usize>::new());
        assert_eq!(chunk_lengths([10, 10, 10].into_iter(), 1000), vec![3]);
        // Each row takes its stanza and ROW_OVERHEAD.
        let row = 100 - ROW_OVERHEAD;
        assert_eq!(chunk_lengths([row; 5].into_iter(), 250), vec![2, 2, 1]);
        // A row larger than the budget goes alone.
        assert_eq!(
            chunk_lengths([10, 5000, 10].into_iter(), 1000),
            vec![1, 1, 1]
        );
        let many = chunk_lengths(std::iter::repeat_n(1, 2500), usize::MAX);
        assert_eq!(many, vec![MAX_ROWS_PER_INSERT, MAX_ROWS_PER_INSERT, 452]);
    }

    #[test]
    fn describe_never_shows_the_password() {
        let mut options = MysqlOptions {
            host: "db.example".into(),
            port: Some(3307),
            database: "prosody".into(),
            user: "prosody".into(),
            password: Some("secret".into()),
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
        };
        assert_eq!(describe(&options), "MySQL prosody@db.example:3307/prosody");
        options.port = None;
        assert_eq!(describe(&options), "MySQL prosody@db.example/prosody");
        options.host = "/run/mysqld/mysqld.sock".into();
        options.port = Some(3306);
        assert_eq!(
            describe(&options),
            "MySQL prosody@/run/mysqld/mysqld.sock/prosody"
        );
    }

    #[test]
    fn insert_statements_have_five_placeholders_a_row() {
        assert_eq!(
            insert_messages(2),
            "INSERT INTO mam_rs_messages (id, aid, with_id, stanza, zstanza) \
             VALUES (?, ?, ?, ?, ?), (?, ?, ?, ?, ?)"
        );
    }
}
