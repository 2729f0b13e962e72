//! Storage: the [`Store`] trait that the engine talks to, and its implementations.
//!
//! A store keeps rows of `(archive, id, with, stanza)`. An archive is one user's archive on one
//! host under one store name ([`ArchiveRef`]); many hosts share one database, isolated by it.
//! The timestamp of a row is the time part of its [`ArchiveId`], so there is no separate time
//! column and time bounds are id bounds.
//!
//! This layer knows SQL and rows. It does not know XMPP: stanzas are opaque serialised XML,
//! and query semantics ([`Query`]) are already resolved by the protocol layer.

mod codec;
pub mod deferred;
pub mod mysql;
pub mod postgres;
pub(crate) mod rows;
pub mod sqlite;

use crate::id::ArchiveId;
use std::path::PathBuf;
use std::sync::Arc;

/// How to reach a database server: Prosody's `sql` block, as `config` reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerOptions {
    /// A host name or address, or a Unix socket (PostgreSQL: its directory; MySQL: its path).
    pub host: String,
    /// The TCP port; the engine's default when `None`.
    pub port: Option<u16>,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
    /// Read connections, i.e. how many queries run at once.
    pub pool_size: u32,
    /// How long to wait for a connection.
    pub connect_timeout: std::time::Duration,
}

impl ServerOptions {
    /// `engine user@host:port/database`, for messages (never the password).
    pub fn describe(&self, engine: &str) -> String {
        let (user, host, database) = (&self.user, &self.host, &self.database);
        match self.port {
            Some(port) => format!("{engine} {user}@{host}:{port}/{database}"),
            None => format!("{engine} {user}@{host}/{database}"),
        }
    }
}

/// Where an archive lives, as the configuration names it (`mam_rs_database`, `sql`,
/// `mam_rs_sql`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The embedded SQLite file (the default).
    Sqlite(PathBuf),
    /// A PostgreSQL server, in the module's own tables.
    Postgres(postgres::PgOptions),
    /// A MySQL or MariaDB server, in the module's own tables.
    Mysql(mysql::MysqlOptions),
    /// The configuration names no usable database; the text says which option and why. The
    /// archive stays closed rather than writing somewhere the admin did not ask for.
    Unusable(String),
}

impl Location {
    /// For people (logs, commands): the file, or `engine user@host:port/database`. Never a
    /// password. Two hosts with the same description share one database.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(path) => path.display().to_string(),
            Location::Postgres(options) => options.describe(postgres::ENGINE),
            Location::Mysql(options) => mysql::describe(options),
            Location::Unusable(why) => format!("no database ({why})"),
        }
    }
}

/// The background threads of one r2d2 connection pool. r2d2's default keeps its threads
/// running its reaper job after the pool is dropped; these end with the pool, so a module
/// reload (which opens a new store) leaves no threads behind.
pub(crate) fn pool_threads() -> Arc<scheduled_thread_pool::ScheduledThreadPool> {
    pool_threads_named("mam_rs-pool-{}")
}

fn pool_threads_named(pattern: &str) -> Arc<scheduled_thread_pool::ScheduledThreadPool> {
    Arc::new(
        scheduled_thread_pool::ScheduledThreadPool::builder()
            .num_threads(1)
            .thread_name_pattern(pattern)
            .on_drop_behavior(scheduled_thread_pool::OnPoolDropBehavior::DiscardPendingScheduled)
            .build(),
    )
}

/// How a store is opened, beyond where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Read connections, i.e. how many queries run at once.
    pub read_connections: u32,
    /// `archive_compression`.
    pub compression: bool,
    /// An SQLite archive's commits (`sqlite_tune`); a database server ignores it.
    pub synchronous: sqlite::Synchronous,
}

/// Opens (creating and migrating when needed) the store at `location`. A database server that
/// does not answer is an error here, as anything else that stops the opening.
pub fn open(location: &Location, options: OpenOptions) -> Result<Arc<dyn Store>, StoreError> {
    open_store(location, options).map_err(|e| match e {
        StoreError::Unavailable(why) => StoreError::Open(why),
        e => e,
    })
}

/// As [`open`], with a server that does not answer as [`StoreError::Unavailable`].
fn open_store(location: &Location, options: OpenOptions) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match location {
        Location::Sqlite(path) => {
            let sqlite = sqlite::SqliteOptions {
                pool_size: options.read_connections,
                compression: options.compression,
                synchronous: options.synchronous,
                ..sqlite::SqliteOptions::default()
            };
            Arc::new(sqlite::SqliteStore::open(path, &sqlite)?)
        }
        Location::Postgres(pg) => {
            let pg = postgres::PgOptions {
                pool_size: options.read_connections,
                ..pg.clone()
            };
            Arc::new(postgres::PgStore::open(&pg, options.compression)?)
        }
        Location::Mysql(my) => {
            let my = mysql::MysqlOptions {
                pool_size: options.read_connections,
                ..my.clone()
            };
            Arc::new(mysql::MysqlStore::open(&my, options.compression)?)
        }
        Location::Unusable(why) => return Err(StoreError::Open(why.clone())),
    })
}

/// How long the module's start waits for a database server's store to open.
const OPEN_WAIT_AT_START: std::time::Duration = std::time::Duration::from_secs(10);
/// How long each later attempt of the connect thread waits (an attempt still running is taken
/// up again, not started anew).
const OPEN_WAIT_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// As [`open`], but a database server that does not answer yet is no error: the store comes
/// back [`deferred`], failing every call at once until [`Store::claim_node`] connects (the
/// engine keeps calling it). For the running module; admin commands use [`open`].
///
/// A server's store is opened on a thread of its own ([`BoundedOpen`]), and the start waits
/// for it at most [`OPEN_WAIT_AT_START`]: a server that accepts the connection and then says
/// nothing would otherwise hold Prosody's start for as long as the socket lives.
pub fn open_or_defer(
    location: &Location,
    options: OpenOptions,
) -> Result<Arc<dyn Store>, StoreError> {
    if !matches!(location, Location::Postgres(_) | Location::Mysql(_)) {
        return open_store(location, options);
    }
    let opener = BoundedOpen::new(location.clone(), options);
    match opener.open(OPEN_WAIT_AT_START) {
        Err(StoreError::Unavailable(why)) => Ok(Arc::new(deferred::Deferred::new(
            why,
            Box::new(move || opener.open(OPEN_WAIT_RETRY)),
        ))),
        other => other,
    }
}

/// The result of one attempt to open a store.
type Opened = Result<Arc<dyn Store>, StoreError>;

/// Opens a database server's store on a thread of its own and waits a bounded time for it.
///
/// The drivers' connect timeouts cover the TCP connection only. A server that accepts it and
/// then says nothing (stopped with SIGSTOP, overloaded, a proxy whose backend is gone) holds
/// the handshake for as long as the socket lives. An attempt that outlives the wait goes on
/// alone, its thread never joined (nothing waits for it at shutdown), and the next call takes
/// it up instead of starting another: one attempt at a time, whatever the server does.
struct BoundedOpen {
    location: Location,
    options: OpenOptions,
    /// The attempt still running, if the last wait ended before it did.
    pending: parking_lot::Mutex<Option<std::sync::mpsc::Receiver<Opened>>>,
}

impl BoundedOpen {
    fn new(location: Location, options: OpenOptions) -> BoundedOpen {
        BoundedOpen {
            location,
            options,
            pending: parking_lot::Mutex::new(None),
        }
    }

    /// The store, or why not: [`StoreError::Unavailable`] when the attempt takes longer than
    /// `wait` (it goes on).
    fn open(&self, wait: std::time::Duration) -> Opened {
        use std::sync::mpsc::RecvTimeoutError;
        let mut pending = self.pending.lock();
        let attempt = match pending.take() {
            Some(running) => running,
            None => {
                let (tx, rx) = std::sync::mpsc::channel();
                let (location, options) = (self.location.clone(), self.options);
                std::thread::Builder::new()
                    .name("mam_rs-open".into())
                    .spawn(move || {
                        // Nobody listening any more (the module went away): the store, if
                        // any, is dropped here.
                        let _ = tx.send(open_store(&location, options));
                    })
                    .map_err(|e| StoreError::Open(format!("cannot start a thread: {e}")))?;
                rx
            }
        };
        match attempt.recv_timeout(wait) {
            Ok(opened) => opened,
            Err(RecvTimeoutError::Timeout) => {
                *pending = Some(attempt);
                // The same words each time: the connect thread logs a reason when it changes.
                Err(StoreError::Unavailable(format!(
                    "{}: no answer (still waiting for it)",
                    self.location.describe()
                )))
            }
            Err(RecvTimeoutError::Disconnected) => Err(StoreError::Unavailable(format!(
                "{}: the attempt to connect ended without a result",
                self.location.describe()
            ))),
        }
    }
}

/// Which archive a row belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ArchiveRef {
    /// The VirtualHost, e.g. `example.com`.
    pub host: Arc<str>,
    /// The local part of the account, e.g. `juliet`.
    pub user: String,
    /// The store name (mod_mam's `archive_store` option, default `archive`).
    pub store: Arc<str>,
}

/// A row waiting to be written.
#[derive(Debug, Clone)]
pub struct NewItem {
    pub archive: ArchiveRef,
    pub id: ArchiveId,
    /// Bare JID of the other party.
    pub with: String,
    /// The stored copy of the stanza, serialised XML with `xmlns="jabber:client"` on the top element.
    pub stanza: String,
    /// `storage_archive_item_limit`: when the archive already holds this many rows, its oldest
    /// rows are removed first, down to 99% of the limit (stock's truncation, #1545).
    pub quota: Option<u32>,
}

/// A row read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: ArchiveId,
    /// The id clients know this row by, when it is not `id`'s text: the stock id of an
    /// imported message (see [`Store::import`]).
    pub key: Option<String>,
    pub with: String,
    pub stanza: String,
}

impl Item {
    /// The id clients see (`<result id>`, `<stanza-id>`, RSM): the imported key, or `id`.
    pub fn client_id(&self) -> String {
        match &self.key {
            Some(key) => key.clone(),
            None => self.id.to_string(),
        }
    }
}

/// A message read from another archive (stock mod_mam's store, or an export file), ready to
/// be imported with its own id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRow {
    /// The id clients know it by (stock's `key`). Kept: queries accept it and answer with it.
    pub key: String,
    /// When it was archived, Unix microseconds.
    pub micros: i64,
    /// Bare JID of the other party.
    pub with: String,
    /// The stored copy, in the form [`NewItem::stanza`] has.
    pub stanza: String,
}

/// Where an import from one source stands in one archive, so that a rerun resumes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportCheckpoint {
    /// The source's own position of the last row handled (e.g. stock's `sort_id`).
    pub position: i64,
    /// The id given to the last row imported: later rows get larger ids.
    pub last_id: i64,
}

/// What one [`Store::import`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportBatch {
    /// Rows written.
    pub imported: u64,
    /// Rows already in the archive (same key), left as they are.
    pub already: u64,
}

/// Figures for `info` and `user_stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Archives (users) with at least one message.
    pub users: u64,
    pub messages: u64,
    /// Bytes of stored stanzas (as stored, so compressed where compression is on).
    pub bytes: u64,
    pub oldest: Option<ArchiveId>,
    pub newest: Option<ArchiveId>,
    /// Messages per `with` JID, most first (only for one archive; at most 20).
    pub contacts: Vec<(String, u64)>,
}

impl Stats {
    /// Adds one archive (a user) that holds `messages`: its oldest and newest row ids and its
    /// stored bytes, as the database gives them.
    pub(crate) fn add_archive(
        &mut self,
        messages: u64,
        oldest: Option<i64>,
        newest: Option<i64>,
        bytes: u64,
    ) -> Result<(), StoreError> {
        self.users += 1;
        self.messages += messages;
        self.bytes += bytes;
        if let Some(oldest) = oldest.map(rows::stored_id).transpose()? {
            self.oldest = Some(self.oldest.map_or(oldest, |o| o.min(oldest)));
        }
        if let Some(newest) = newest.map(rows::stored_id).transpose()? {
            self.newest = Some(self.newest.map_or(newest, |n| n.max(newest)));
        }
        Ok(())
    }
}

/// Figures for the metrics gauges ([`Store::figures`]): cheap to read, never a scan of the
/// messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Archives (users) with at least one message.
    pub archives: u64,
    /// Messages in them.
    pub messages: u64,
    /// The database on disk, write-ahead log included: the whole file, every host in it.
    pub bytes: u64,
}

/// What to look for, with stock `archive:find` semantics (reference §3):
/// every bound is optional; `start`/`end` are inclusive; `before`/`after` are exclusive and name
/// ids as a client sent them; results come in id order, newest first when `reverse`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Only rows with this exact bare JID.
    pub with: Option<String>,
    /// Only rows at or after this Unix time in microseconds.
    pub start: Option<i64>,
    /// Only rows at or before this Unix time in microseconds.
    pub end: Option<i64>,
    /// Only rows strictly after this id (client text). An id unknown in this archive is an error.
    pub after: Option<String>,
    /// Only rows strictly before this id (client text). An id unknown in this archive is an error.
    pub before: Option<String>,
    /// Only rows with one of these ids (client text); unknown ones are ignored.
    pub ids: Option<Vec<String>>,
    /// At most this many rows. `Some(0)` returns no rows (and skips the id checks).
    pub limit: Option<u32>,
    /// Newest first: the rows nearest to `before` (or to the end) are returned.
    pub reverse: bool,
    /// Also count every row that matches `with`/`start`/`end`/`ids`, ignoring before/after.
    pub total: bool,
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// In the order asked for (ascending ids, or descending when `reverse`).
    pub items: Vec<Item>,
    /// Present when the query asked for a total.
    pub total: Option<u64>,
}

/// A client of a user has received the archive up to `last_id` (smart retention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub archive: ArchiveRef,
    /// The client: its resource, or a stable client id where the server has one.
    pub client: String,
    pub last_id: ArchiveId,
    /// When the client was seen, Unix microseconds.
    pub seen: i64,
}

/// Which of a user's clients must have a message before smart retention may remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Any one of them.
    One,
    /// Every client seen recently.
    All,
}

/// What an expiry run removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryRule {
    /// Messages at or before `end` (Unix microseconds, inclusive as stock).
    Age { end: i64 },
    /// Messages at or before `end` that have reached one / all of the archive's clients seen at
    /// or after `seen_since`. An archive with no such client loses nothing.
    Delivered {
        end: i64,
        strategy: Strategy,
        seen_since: i64,
    },
}

/// Where an expiry run is: the archives before `after_archive` are done. Opaque to callers;
/// start with `ExpiryCursor::default()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpiryCursor {
    pub(crate) after_archive: i64,
}

/// What one expiry batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryBatch {
    pub deleted: u64,
    /// No expired row is left (of the archives that existed when the run began).
    pub done: bool,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An `after`/`before` id that is not in this archive.
    #[error("item-not-found: no such id in this archive")]
    ItemNotFound,
    /// The database refused or failed.
    #[error("database error: {0}")]
    Database(String),
    /// The database server cannot be reached now (no connection); it may come back.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database file or pool could not be opened.
    #[error("cannot open the archive database: {0}")]
    Open(String),
}

impl StoreError {
    /// The reason alone, without the variant's prefix where it carries one (for log lines
    /// that say themselves what failed).
    pub fn reason(&self) -> String {
        match self {
            StoreError::Unavailable(why) | StoreError::Open(why) => why.clone(),
            other => other.to_string(),
        }
    }
}

/// An archive store. Implementations are shared between the writer thread and the query
/// workers, so every method takes `&self` and may block.
pub trait Store: Send + Sync + 'static {
    /// Writes all rows in one transaction: either all are committed, or none is.
    fn append(&self, batch: &[NewItem]) -> Result<(), StoreError>;

    /// Runs a query against one archive.
    fn find(&self, archive: &ArchiveRef, query: &Query) -> Result<Page, StoreError>;

    /// The newest id in the whole database, so that new ids continue after it.
    fn last_id(&self) -> Result<Option<ArchiveId>, StoreError>;

    /// One bounded step of expiry: removes at most `limit` rows that `rule` lets go, oldest
    /// first archive by archive, of `host`'s archives under `store`. One short transaction;
    /// call again with the same cursor until `done`.
    fn expire(
        &self,
        host: &str,
        store: &str,
        rule: &ExpiryRule,
        limit: u32,
        cursor: &mut ExpiryCursor,
    ) -> Result<ExpiryBatch, StoreError>;

    /// Records what clients have received; a mark only ever moves forward.
    fn record_marks(&self, marks: &[Mark]) -> Result<(), StoreError>;

    /// Where the import from `source` into `archive` stopped, if it ever ran.
    fn import_checkpoint(
        &self,
        archive: &ArchiveRef,
        source: &str,
    ) -> Result<Option<ImportCheckpoint>, StoreError>;

    /// Imports `rows` (in the source's order) into `archive` in one transaction, and records
    /// `position` as the source's position after them. Each row keeps its key: a row whose key
    /// is already in the archive is skipped (so a rerun changes nothing); a new row gets the
    /// smallest free id at or after its time that is above every id this source gave before,
    /// so the source's order is kept; when that id's text is not the key, the key is kept
    /// beside it and queries answer with it.
    fn import(
        &self,
        archive: &ArchiveRef,
        source: &str,
        rows: &[ImportRow],
        position: i64,
    ) -> Result<ImportBatch, StoreError>;

    /// Figures for the archives of `host` under `store`, or one user's.
    fn stats(&self, host: &str, store: &str, user: Option<&str>) -> Result<Stats, StoreError>;

    /// Removes at most `limit` of an archive's rows (and, once it is empty, its client marks
    /// and import checkpoints). Returns how many rows went; call again until it returns 0.
    fn delete_archive(&self, archive: &ArchiveRef, limit: u32) -> Result<u64, StoreError>;

    /// Maintenance for the `optimize` command: each step done, in words.
    fn optimize(&self, vacuum: bool) -> Result<Vec<String>, StoreError>;

    /// Figures of `host`'s archives under `store` for the metrics gauges. Called every few
    /// seconds at most, on a query worker: must not scan the messages.
    fn figures(&self, host: &str, store: &str) -> Result<Figures, StoreError>;

    /// Whether a row with this id is stored. The writer asks before retrying a batch whose
    /// commit failed: with a database server, the commit may have gone through and only its
    /// answer been lost (a server restart at that moment), and a batch commits whole or not at
    /// all, so its last row tells.
    fn holds(&self, id: ArchiveId) -> Result<bool, StoreError>;

    /// Claims a writer node number (below [`crate::id::NODES`]) that no other process writing
    /// to this database holds, for as long as this store is open: ids carry it, so several
    /// Prosody processes on one database server never make the same id. An embedded database
    /// has one writing process: node 0.
    fn claim_node(&self) -> Result<u16, StoreError> {
        Ok(0)
    }

    /// Whether the writer, after each removal batch (expiry, a deleted account's archive),
    /// lets as much time pass again before the next. Where the database's work for a delete
    /// runs in a server beside Prosody on the machine's cores and goes on after the commit
    /// (InnoDB's purge), back-to-back batches made other clients' pings wait: 2.07× the idle
    /// p99 during an expiry of 1M rows on MariaDB, 1.47× paced. SQLite's work is the writer's
    /// own and in the transaction: pings were no slower unpaced, and pacing took 2.9× as long.
    fn paces_removals(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of this process whose name starts with `prefix`.
    fn threads_named(prefix: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with(prefix))
            .count()
    }

    #[test]
    fn a_server_that_says_nothing_is_waited_for_once_and_not_for_long() {
        // Accepts connections (the kernel does, from the backlog) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        silent.set_nonblocking(true).unwrap();
        let server = ServerOptions {
            host: "127.0.0.1".into(),
            port: Some(port),
            database: "x".into(),
            user: "u".into(),
            password: None,
            pool_size: 1,
            connect_timeout: std::time::Duration::from_secs(5),
        };
        for location in [Location::Postgres(server.clone()), Location::Mysql(server)] {
            let opener = BoundedOpen::new(
                location,
                OpenOptions {
                    read_connections: 1,
                    compression: false,
                    synchronous: sqlite::Synchronous::Full,
                },
            );
            let wait = std::time::Duration::from_millis(300);
            let mut accepted = Vec::new();
            for _ in 0..3 {
                let began = std::time::Instant::now();
                match opener.open(wait) {
                    Err(StoreError::Unavailable(why)) => {
                        assert!(why.ends_with(": no answer (still waiting for it)"), "{why}")
                    }
                    other => panic!("{:?}", other.map(|_| "a store")),
                }
                assert!(began.elapsed() < std::time::Duration::from_secs(2));
                while let Ok((socket, _)) = silent.accept() {
                    accepted.push(socket);
                }
            }
            // One attempt, taken up again by each call, not one per call.
            assert_eq!(accepted.len(), 1);
        }
    }

    #[test]
    fn a_dropped_connection_pool_leaves_no_thread_behind() {
        let pool = r2d2::Pool::builder()
            .thread_pool(pool_threads_named("leak-probe-{}"))
            .idle_timeout(Some(std::time::Duration::from_secs(600)))
            .build(r2d2_sqlite::SqliteConnectionManager::memory())
            .unwrap();
        drop(pool.get().unwrap());
        assert_eq!(threads_named("leak-probe-"), 1);
        drop(pool);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while threads_named("leak-probe-") > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the pool's thread outlived it"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
