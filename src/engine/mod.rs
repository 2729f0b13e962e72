//! The engine: the threads that do the archive's work off Prosody's event loop.
//!
//! - [`Engine::archive`] (on the loop, every message): hands out the next id in hook order
//!   and keeps the row until the loop's turn ends; [`Engine::drain`] (on the loop, when a
//!   mailbox is readable) hands a turn's rows to the one writer thread ([`writer`]) together,
//!   which commits in batches.
//! - [`Engine::query`] (on the loop): queues a query for the worker pool ([`worker`]).
//! - [`Engine::mailbox`]: each module instance (one per VirtualHost) gets its own
//!   [`Mailbox`]: an eventfd for the loop to watch and a queue of finished queries, log lines
//!   and the writer's progress ([`wake`]).
//! - [`Engine::shared`]: every host whose archive is in the same database shares one engine,
//!   hence one id generator and one writer: two writers on one SQLite file fail with
//!   SQLITE_BUSY, and two generators could hand out the same id.
//! - [`metrics`]: what the writer, the workers and each host's handle measure, for Prosody's
//!   statistics; [`Engine::refresh_figures`] reads the archive figures on a query worker.
//! - [`Engine::shutdown`] / `Drop`: commits what is queued and joins every thread. A module
//!   reload keeps the library mapped, and Prosody's shutdown runs `Drop` from the Lua
//!   finaliser before the library is unloaded, so no thread may outlive the engine.
//!
//! The engine never touches Lua: only owned Rust values cross its threads.

pub mod metrics;
pub mod wake;
pub mod worker;
pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::Mutex;

use crate::config::Config;
use crate::id::{ArchiveId, IdGenerator};
use crate::protocol::xep0313::Limits;
use crate::store::{self, ArchiveRef, ExpiryRule, Mark, Store, StoreError};
use metrics::{HostMetrics, WriterMetrics};
use wake::Progress;
pub use wake::{Answer, Completion, Drained, Level, Mailbox};
pub use worker::Request;
use worker::{FiguresJob, Job, Task, Worker};
use writer::{ExpiryJob, Removal, Row, Writer, WriterMsg};

/// Most rows committed in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Rows waiting for the writer beyond which senders wait for their commits (see
/// [`Engine::backlogged`]): two full batches.
pub const BACKLOG_WAIT: usize = 2 * MAX_BATCH;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create the wake-up eventfd: {0}")]
    EventFd(#[from] std::io::Error),
    #[error("the archive engine is shut down")]
    Closed,
    /// The database is not keeping up (or is failing): this many rows already wait.
    #[error(
        "archive queue full: {0} messages are waiting for the database (mam_rs_max_queued_rows)"
    )]
    QueueFull(usize),
    /// The database server has not answered since the engine started (see [`Engine::start`]).
    #[error("the archive database cannot be reached yet: {0}")]
    Unavailable(String),
}

/// What the engine hands out for one archived message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Archived {
    pub id: ArchiveId,
    /// Deliver once [`Drained::released`] reaches this value.
    pub release_at: u64,
}

/// A query or metadata request, as the loop hands it over.
#[derive(Debug)]
pub struct QueryRequest {
    pub archive: ArchiveRef,
    pub request: Request,
    /// `to` and `from` of the result messages.
    pub to: Option<String>,
    pub from: Option<String>,
    pub limits: Limits,
}

pub struct Engine {
    progress: Arc<Progress>,
    /// Rows handed to the writer and not yet written (or given up).
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    ids: Arc<Mutex<Ids>>,
    last_handed_out: Arc<AtomicU64>,
    writer: Mutex<Option<Sender<WriterMsg>>>,
    /// Rows archived since the last hand-over, in id order (see [`Engine::archive`]).
    turn: Mutex<Vec<Row>>,
    queries: Mutex<Option<Sender<Task>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    writer_metrics: Arc<WriterMetrics>,
    stopping: Arc<AtomicBool>,
    next_ticket: AtomicU64,
}

/// What the engine needs from the database before it can hand out ids: the writer node its
/// ids carry (see [`Store::claim_node`]) and the newest stored id.
enum Ids {
    Ready {
        generator: IdGenerator,
        node: u16,
    },
    /// The database server has not answered yet: why (the connect thread keeps trying).
    Unreachable(String),
}

/// The engines of this process, by database ([`store::Location::describe`]).
static ENGINES: Mutex<Option<HashMap<String, Weak<Engine>>>> = Mutex::new(None);

impl Engine {
    /// The engine for the database named in `config`: the running one if another host
    /// already opened that file, otherwise a new one. Its threads stop when the last
    /// `Arc` is dropped.
    pub fn shared(config: &Config) -> Result<Arc<Engine>, EngineError> {
        let mut engines = ENGINES.lock();
        let engines = engines.get_or_insert_with(HashMap::new);
        engines.retain(|_, e| e.strong_count() > 0);
        let key = config.database.describe();
        if let Some(engine) = engines.get(&key).and_then(Weak::upgrade) {
            return Ok(engine);
        }
        let engine = Arc::new(Engine::open(config)?);
        engines.insert(key, Arc::downgrade(&engine));
        Ok(engine)
    }

    /// Opens the archive named in `config` (an SQLite file or a database server) and starts
    /// the threads.
    pub fn open(config: &Config) -> Result<Engine, EngineError> {
        // One more read connection than the workers: the figures job shares them.
        let options = config.open_options((config.query_workers as u32).saturating_add(1));
        let store = store::open_or_defer(&config.database, options)?;
        Engine::start(store, config)
    }

    /// Starts the threads over any store. A store whose server does not answer yet
    /// ([`StoreError::Unavailable`], see [`store::deferred`]) is no error: until it does,
    /// messages are not archived ([`EngineError::Unavailable`]), queries fail at once, and a
    /// connect thread keeps trying, with the writer's backoff.
    pub fn start(store: Arc<dyn Store>, config: &Config) -> Result<Engine, EngineError> {
        let progress = Arc::new(Progress::default());
        let last_handed_out = Arc::new(AtomicU64::new(0));
        let ids = Arc::new(Mutex::new(match node_and_last_id(&*store) {
            Ok((node, last)) => ready(node, last, &progress, &last_handed_out),
            Err(StoreError::Unavailable(why)) => Ids::Unreachable(why),
            Err(e) => return Err(e.into()),
        }));
        let stopping = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();

        let queued = Arc::new(AtomicUsize::new(0));
        let writer_metrics = Arc::new(WriterMetrics::default());
        let (writer_tx, writer_rx) = mpsc::channel();
        let writer = Writer {
            store: store.clone(),
            progress: progress.clone(),
            queued: queued.clone(),
            max_batch: MAX_BATCH,
            stopping: stopping.clone(),
            metrics: writer_metrics.clone(),
            database: config.database.describe(),
        };
        threads.push(spawn("mam_rs-writer", move || writer.run(writer_rx))?);

        let (query_tx, query_rx) = mpsc::channel();
        let query_rx = Arc::new(Mutex::new(query_rx));
        for n in 0..config.query_workers.max(1) {
            let worker = Worker {
                store: store.clone(),
                progress: progress.clone(),
                test_delay: config.test_query_delay,
            };
            let rx = query_rx.clone();
            threads.push(spawn(&format!("mam_rs-query-{n}"), move || worker.run(rx))?);
        }

        if matches!(*ids.lock(), Ids::Unreachable(_)) {
            let connect = Connect {
                store: store.clone(),
                ids: ids.clone(),
                progress: progress.clone(),
                last_handed_out: last_handed_out.clone(),
                stopping: stopping.clone(),
                database: config.database.describe(),
            };
            threads.push(spawn("mam_rs-connect", move || connect.run())?);
        }

        Ok(Engine {
            progress,
            queued,
            max_queued: config.max_queued_rows,
            ids,
            last_handed_out,
            writer: Mutex::new(Some(writer_tx)),
            turn: Mutex::new(Vec::new()),
            queries: Mutex::new(Some(query_tx)),
            threads: Mutex::new(threads),
            writer_metrics,
            stopping,
            next_ticket: AtomicU64::new(1),
        })
    }

    /// A new mailbox for one module instance: watch its fd, drain it when readable.
    pub fn mailbox(&self) -> Result<Arc<Mailbox>, EngineError> {
        Ok(self.progress.subscribe()?)
    }

    /// Queues a message for the archive and returns its id. `stanza` is the copy to store, as
    /// XML text with its namespace declared on the top element;
    /// `quota` is the archive's `storage_archive_item_limit`, if any.
    ///
    /// The row waits until the loop's turn is over: the first row of a turn pokes `turn_end`
    /// (the caller's mailbox), whose readable eventfd comes back from the loop's next poll,
    /// after the events of this one; its [`Engine::drain`] hands every row of the turn to the
    /// writer at once. One commit (one fsync) then covers a turn's messages instead of the one
    /// or two that arrive while the previous commit runs, and the writer is woken once a turn
    /// instead of once a message. A row waits no longer than the rest of its turn, and its
    /// delivery waits for its commit anyway.
    pub fn archive(
        &self,
        archive: ArchiveRef,
        with: String,
        stanza: String,
        quota: Option<u32>,
        seen_by: Vec<String>,
        turn_end: &Mailbox,
    ) -> Result<Archived, EngineError> {
        let waiting = self.queued.load(Ordering::Acquire);
        if waiting >= self.max_queued {
            return Err(EngineError::QueueFull(waiting));
        }
        // Held until the row is kept: shutdown hands over the last rows under it.
        let writer = self.writer.lock();
        if writer.is_none() {
            return Err(EngineError::Closed);
        }
        // The id lock is held until the row is kept, so rows reach the writer in id order.
        let mut ids = self.ids.lock();
        let id = match &mut *ids {
            Ids::Ready { generator, .. } => generator.next_now(),
            Ids::Unreachable(why) => return Err(EngineError::Unavailable(why.clone())),
        };
        self.queued.fetch_add(1, Ordering::AcqRel);
        let mut turn = self.turn.lock();
        if turn.is_empty() {
            turn_end.poke();
        }
        turn.push(Row {
            archive,
            id,
            with,
            stanza,
            quota,
            seen_by,
        });
        drop(turn);
        let release_at = id.as_i64() as u64;
        self.last_handed_out.store(release_at, Ordering::Release);
        // Released at once while the writer is failing (see `writer`).
        self.progress.handed_out(release_at);
        Ok(Archived { id, release_at })
    }

    /// The loop's turn is over (a mailbox is readable): hands the turn's rows to the writer,
    /// then takes what `mailbox` holds.
    pub fn drain(&self, mailbox: &Mailbox) -> Drained {
        self.hand_over();
        mailbox.drain()
    }

    /// Hands the rows kept so far to the writer, in one message.
    fn hand_over(&self) {
        let writer = self.writer.lock();
        self.hand_over_to(writer.as_ref());
    }

    /// [`Engine::hand_over`] under the writer lock, which every send to the writer takes, so
    /// that nothing sent after a row reaches the writer before it.
    fn hand_over_to(&self, writer: Option<&Sender<WriterMsg>>) {
        let rows = std::mem::take(&mut *self.turn.lock());
        if rows.is_empty() {
            return;
        }
        let n = rows.len();
        if writer.is_none_or(|tx| tx.send(WriterMsg::Rows(rows)).is_err()) {
            // Only when the writer thread has died (a panic): the rows cannot be written.
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.progress.log(
                Level::Error,
                format!("The archive writer has stopped: {n} archived messages were not written"),
            );
        }
    }

    /// Sends `msg` to the writer after the rows kept so far.
    fn send_to_writer(&self, msg: WriterMsg) -> Result<(), EngineError> {
        let writer = self.writer.lock();
        self.hand_over_to(writer.as_ref());
        let tx = writer.as_ref().ok_or(EngineError::Closed)?;
        tx.send(msg).map_err(|_| EngineError::Closed)
    }

    /// Queues a query; its [`Completion::Query`], carrying the returned ticket, goes to `reply`.
    /// The rows kept so far go to the writer first: the query waits for them (`seen`).
    pub fn query(&self, request: QueryRequest, reply: &Arc<Mailbox>) -> Result<u64, EngineError> {
        self.hand_over();
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            ticket,
            archive: request.archive,
            request: request.request,
            to: request.to,
            from: request.from,
            seen: self.last_handed_out.load(Ordering::Acquire),
            limits: request.limits,
            reply: reply.clone(),
            arrived: Instant::now(),
        };
        let queries = self.queries.lock();
        let tx = queries.as_ref().ok_or(EngineError::Closed)?;
        reply.expect_answer();
        if tx.send(Task::Answer(job)).is_err() {
            reply.answer_not_coming();
            return Err(EngineError::Closed);
        }
        Ok(ticket)
    }

    /// Records that a client received `archive` up to `last_id` (smart retention).
    pub fn mark(&self, mark: Mark) -> Result<(), EngineError> {
        self.send_to_writer(WriterMsg::Mark(mark))
    }

    /// Starts removing what `rule` lets go of `host`'s archives under `store`.
    /// The writer does it in bounded batches between row commits; the [`Completion::Expired`]
    /// with the returned ticket goes to `reply`.
    pub fn expire(
        &self,
        host: Arc<str>,
        store: Arc<str>,
        rule: ExpiryRule,
        reply: &Arc<Mailbox>,
    ) -> Result<u64, EngineError> {
        let removal = Removal::Expire {
            rule,
            cursor: Default::default(),
        };
        self.remove(host, store, removal, reply)
    }

    /// Starts removing every message of `archive` (its owner's account was deleted), in the
    /// same bounded batches as expiry, after the rows queued before it. The
    /// [`Completion::Expired`] with the returned ticket goes to `reply`.
    pub fn delete_archive(
        &self,
        archive: ArchiveRef,
        reply: &Arc<Mailbox>,
    ) -> Result<u64, EngineError> {
        let (host, store) = (archive.host.clone(), archive.store.clone());
        self.remove(host, store, Removal::Archive(archive), reply)
    }

    fn remove(
        &self,
        host: Arc<str>,
        store: Arc<str>,
        removal: Removal,
        reply: &Arc<Mailbox>,
    ) -> Result<u64, EngineError> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        self.send_to_writer(WriterMsg::Expire(ExpiryJob {
            ticket,
            host,
            store,
            removal,
            reply: reply.clone(),
            deleted: 0,
            failures: 0,
            next_at: None,
        }))?;
        Ok(ticket)
    }

    /// The writer's batch, commit and failure figures (shared by every host on this engine).
    pub fn writer_metrics(&self) -> &Arc<WriterMetrics> {
        &self.writer_metrics
    }

    /// Asks a query worker to read `host`'s archive figures into `into` (for the gauges).
    /// The caller has claimed the refresh ([`HostMetrics::claim_refresh`]); if it cannot be
    /// queued (closing), the claim is dropped.
    pub fn refresh_figures(&self, host: Arc<str>, store: Arc<str>, into: &Arc<HostMetrics>) {
        let queries = self.queries.lock();
        let sent = queries.as_ref().is_some_and(|tx| {
            tx.send(Task::Figures(FiguresJob {
                host,
                store,
                into: into.clone(),
            }))
            .is_ok()
        });
        if !sent {
            into.refresh_dropped();
        }
    }

    /// The writer node this engine's ids carry: 0 on an embedded database, one no other
    /// process holds on a database server; or, while that server has not answered since the
    /// start, why.
    pub fn node(&self) -> Result<u16, String> {
        match &*self.ids.lock() {
            Ids::Ready { node, .. } => Ok(*node),
            Ids::Unreachable(why) => Err(why.clone()),
        }
    }

    /// Rows waiting for the writer now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Whether the writer is behind enough that a sender should wait for its row's commit
    /// before its next stanza: half of `mam_rs_max_queued_rows` waiting, and never more
    /// than [`BACKLOG_WAIT`]. Deliveries are held until their rows are committed anyway; this
    /// keeps a fast sender from filling the queue (beyond which messages go unarchived).
    pub fn backlogged(&self) -> bool {
        self.queued() >= (self.max_queued / 2).clamp(1, BACKLOG_WAIT)
    }

    /// Blocks until rows up to `release_at` are committed, or `timeout` passes. The rows kept
    /// so far go to the writer first.
    pub fn wait_committed(&self, release_at: u64, timeout: std::time::Duration) -> bool {
        self.hand_over();
        self.progress.wait_committed(release_at, timeout)
    }

    /// Commits every queued row and joins every thread. Safe to call twice.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let mut writer = self.writer.lock();
        self.hand_over_to(writer.as_ref());
        if let Some(tx) = writer.take() {
            let _ = tx.send(WriterMsg::Stop);
        }
        drop(writer);
        self.queries.lock().take();
        let threads: Vec<JoinHandle<()>> = self.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn node_and_last_id(store: &dyn Store) -> Result<(u16, Option<ArchiveId>), StoreError> {
    Ok((store.claim_node()?, store.last_id()?))
}

/// Ids continue after `last`, and everything already stored counts as committed.
fn ready(
    node: u16,
    last: Option<ArchiveId>,
    progress: &Progress,
    last_handed_out: &AtomicU64,
) -> Ids {
    let stored = last.map_or(0, |id| id.as_i64() as u64);
    progress.advance(stored, true);
    last_handed_out.store(stored, Ordering::Release);
    Ids::Ready {
        generator: IdGenerator::for_node(node, last),
        node,
    }
}

/// The thread that waits for a database server that did not answer at start.
struct Connect {
    store: Arc<dyn Store>,
    ids: Arc<Mutex<Ids>>,
    progress: Arc<Progress>,
    last_handed_out: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
    database: String,
}

impl Connect {
    fn run(self) {
        let started = Instant::now();
        for attempt in 1.. {
            // Short sleeps: shutdown must not wait out a backoff.
            let until = Instant::now() + writer::backoff(attempt);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(left.min(std::time::Duration::from_millis(50)));
            }
            match node_and_last_id(&*self.store) {
                Ok((node, last)) => {
                    let ready = ready(node, last, &self.progress, &self.last_handed_out);
                    self.progress.log(
                        Level::Info,
                        format!(
                            "The archive {} answered after {:.1} s: archiving from now on (writer node {node})",
                            self.database,
                            started.elapsed().as_secs_f64()
                        ),
                    );
                    *self.ids.lock() = ready;
                    return;
                }
                Err(e) => {
                    let why = e.reason();
                    let mut ids = self.ids.lock();
                    // A new reason is worth a line (the server answers now, but refuses).
                    if !matches!(&*ids, Ids::Unreachable(old) if *old == why) {
                        self.progress.log(
                            Level::Error,
                            format!(
                                "Still cannot use the archive {}: {why}; retrying",
                                self.database
                            ),
                        );
                    }
                    *ids = Ids::Unreachable(why);
                }
            }
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, EngineError> {
    Ok(std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)?)
}
