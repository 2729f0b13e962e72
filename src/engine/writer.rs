//! The writer thread: the only thread that writes archive rows.
//!
//! Rows arrive in id order (ids are handed out on the loop, in hook order, under the lock that
//! keeps each row for its turn's hand-over), a loop turn's rows in one message. The writer takes everything
//! that is waiting and commits it in transactions of up to `max_batch` rows (group commit):
//! under light load each message gets its own commit, under heavy load one fsync covers many
//! messages. After a commit it advances
//! the `committed` watermark, which releases the deliveries waiting on those rows.
//!
//! When a commit fails, the rows are kept and retried with backoff, never dropped while the
//! module runs; the deliveries waiting on them are released at the first failure, and every
//! row handed out after it is released at once until a commit works again
//! ([`Progress::set_failing`]), so messages keep flowing while the database is away. The log
//! gets one line when writes start failing and one when they work again, not one per retry.
//! Only at shutdown, after a last few attempts, are rows given up, and then each is named in
//! the log. An account's deletion is retried the same way (stock gives up on the first
//! failure, leaving the deleted user's messages behind); an expiry run that fails ends, and
//! the next run covers what it left.
//!
//! Does not read, does not parse, does not touch Lua.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use super::metrics::WriterMetrics;
use super::wake::{Completion, Level, Mailbox, Progress};
use crate::id::ArchiveId;
use crate::store::{ArchiveRef, ExpiryBatch, ExpiryCursor, ExpiryRule, Mark, NewItem, Store};

/// A message to archive, as the loop hands it over.
#[derive(Debug)]
pub struct Row {
    pub archive: ArchiveRef,
    pub id: ArchiveId,
    pub with: String,
    /// The stored copy, as XML text.
    pub stanza: String,
    pub quota: Option<u32>,
    /// Clients of the archive's owner that receive this message live (smart retention);
    /// empty when smart retention is off.
    pub seen_by: Vec<String>,
}

pub enum WriterMsg {
    /// A loop turn's rows, in id order.
    Rows(Vec<Row>),
    /// Remove expired messages, a batch at a time between row commits.
    Expire(ExpiryJob),
    /// A client received the archive up to an id (through a query).
    Mark(Mark),
    /// Commit what is queued and exit.
    Stop,
}

/// A removal in progress: an expiry run, or one archive's deletion (account deleted).
#[derive(Debug)]
pub struct ExpiryJob {
    pub ticket: u64,
    pub host: Arc<str>,
    pub store: Arc<str>,
    /// What to remove.
    pub removal: Removal,
    /// Where the result goes.
    pub reply: Arc<Mailbox>,
    pub deleted: u64,
    /// Failed attempts in a row (an account's deletion is retried).
    pub failures: u32,
    /// When the next batch may start: after a failed attempt, its backoff; after a batch, as
    /// long again as that batch took where the store paces removals
    /// ([`Store::paces_removals`]).
    pub next_at: Option<Instant>,
}

/// What an [`ExpiryJob`] removes.
#[derive(Debug)]
pub enum Removal {
    /// What `rule` lets go, archive after archive of the job's host and store.
    Expire {
        rule: ExpiryRule,
        cursor: ExpiryCursor,
    },
    /// Every message of one archive (its owner's account was deleted).
    Archive(ArchiveRef),
}

/// Rows removed per expiry batch: one short transaction, so rows and queries interleave.
pub const EXPIRY_BATCH: u32 = 2000;

/// Attempts made for one batch once shutdown has begun.
const ATTEMPTS_AT_SHUTDOWN: u32 = 3;

pub struct Writer {
    pub store: Arc<dyn Store>,
    pub progress: Arc<Progress>,
    /// Rows handed over and not yet written; the engine refuses new rows above its bound.
    pub queued: Arc<std::sync::atomic::AtomicUsize>,
    pub max_batch: usize,
    /// Set by the engine when it shuts down, so that retries stop in bounded time.
    pub stopping: Arc<AtomicBool>,
    /// Batch sizes, commit durations and failed commits.
    pub metrics: Arc<WriterMetrics>,
    /// The database file, for the log lines about failing writes.
    pub database: String,
}

impl Writer {
    pub fn run(self, rx: Receiver<WriterMsg>) {
        let mut batch: Vec<NewItem> = Vec::with_capacity(self.max_batch);
        let mut jobs: VecDeque<ExpiryJob> = VecDeque::new();
        let mut marks = Marks::default();
        let mut stop = false;
        while !stop {
            // With expiry pending, look for rows until the job's next batch may start;
            // otherwise sleep until work.
            let first = match jobs.front() {
                None => rx.recv().ok(),
                Some(job) => {
                    let wait = job.next_at.map_or(Duration::ZERO, |at| {
                        at.saturating_duration_since(Instant::now())
                    });
                    match rx.recv_timeout(wait) {
                        Ok(msg) => Some(msg),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => {
                            stop = true;
                            None
                        }
                    }
                }
            };
            let mut next = match first {
                Some(msg) => Some(msg),
                None if jobs.is_empty() => break,
                None => None,
            };
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Rows(rows) => {
                        for row in rows {
                            marks.delivered(&row);
                            self.push(&mut batch, row);
                        }
                    }
                    WriterMsg::Mark(mark) => marks.add(mark),
                    WriterMsg::Expire(job) => jobs.push_back(job),
                    WriterMsg::Stop => {
                        stop = true;
                        break;
                    }
                }
                if batch.len() >= self.max_batch {
                    break;
                }
                next = more(&rx, &mut stop);
            }
            for rows in batch.chunks(self.max_batch) {
                self.commit(rows);
            }
            self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
            batch.clear();
            self.record(&mut marks);
            if !stop {
                if let Some(job) = jobs.front_mut() {
                    if self.expire_step(job) {
                        jobs.pop_front();
                    }
                }
            }
        }
        for job in jobs {
            let what = match &job.removal {
                Removal::Expire { .. } => format!("Expiry on {}", job.host),
                Removal::Archive(archive) => format!(
                    "Deleting the archive of {}@{} (account deleted; the rest stays)",
                    archive.user, archive.host
                ),
            };
            job.reply.log(
                Level::Warn,
                format!("{what} stopped by shutdown after {} messages", job.deleted),
            );
        }
    }

    /// One expiry batch; true when the job is finished (done, or failed).
    fn expire_step(&self, job: &mut ExpiryJob) -> bool {
        let started = Instant::now();
        if job.next_at.is_some_and(|at| at > started) {
            return false;
        }
        let step = match &mut job.removal {
            Removal::Expire { rule, cursor } => {
                self.store
                    .expire(&job.host, &job.store, rule, EXPIRY_BATCH, cursor)
            }
            Removal::Archive(archive) => {
                self.store
                    .delete_archive(archive, EXPIRY_BATCH)
                    .map(|deleted| ExpiryBatch {
                        deleted,
                        done: deleted == 0,
                    })
            }
        };
        match step {
            Ok(step) => {
                if let (Removal::Archive(archive), 1..) = (&job.removal, job.failures) {
                    self.progress.log(
                        Level::Info,
                        format!(
                            "Deleting the archive of {}@{} works again after {} failed attempt{}",
                            archive.user,
                            archive.host,
                            job.failures,
                            if job.failures == 1 { "" } else { "s" }
                        ),
                    );
                    job.failures = 0;
                }
                job.next_at = self
                    .store
                    .paces_removals()
                    .then(|| Instant::now() + started.elapsed());
                job.deleted += step.deleted;
                if step.done {
                    job.reply.push(Completion::Expired {
                        ticket: job.ticket,
                        result: Ok(job.deleted),
                    });
                }
                step.done
            }
            Err(e) => match &job.removal {
                // A deleted account's messages must not stay behind: retried until it works
                // (one line when it starts failing, one when it works), except at shutdown.
                Removal::Archive(archive) if !self.stopping.load(Ordering::Acquire) => {
                    job.failures += 1;
                    job.next_at = Some(Instant::now() + backoff(job.failures));
                    if job.failures == 1 {
                        self.progress.log(
                            Level::Error,
                            format!(
                                "Could not delete the archive of {}@{} (account deleted): {e}; retrying until it works",
                                archive.user, archive.host
                            ),
                        );
                    }
                    false
                }
                _ => {
                    job.reply.push(Completion::Expired {
                        ticket: job.ticket,
                        result: Err(format!("{e} (after removing {} messages)", job.deleted)),
                    });
                    true
                }
            },
        }
    }

    /// Marks are bookkeeping for smart retention: one failed write is logged and dropped (the
    /// next delivery or query moves the mark again), never retried in front of messages.
    fn record(&self, marks: &mut Marks) {
        if marks.0.is_empty() {
            return;
        }
        let pending: Vec<Mark> = marks.0.drain().map(|(_, mark)| mark).collect();
        if let Err(e) = self.store.record_marks(&pending) {
            self.progress.log(
                Level::Warn,
                format!(
                    "Could not record what {} clients received: {e}",
                    pending.len()
                ),
            );
        }
    }

    fn push(&self, batch: &mut Vec<NewItem>, row: Row) {
        batch.push(NewItem {
            archive: row.archive,
            id: row.id,
            with: row.with,
            stanza: row.stanza,
            quota: row.quota,
        });
    }

    fn commit(&self, batch: &[NewItem]) {
        let Some(last) = batch.last().map(|item| item.id.as_i64() as u64) else {
            return;
        };
        let mut attempt: u32 = 0;
        let mut failing_since: Option<Instant> = None;
        let last_row = batch.last().map(|item| item.id);
        loop {
            let started = Instant::now();
            // A retry first asks whether the failed attempt committed after all (its answer
            // lost with the connection): appending again would collide with those rows.
            let written = if attempt > 0 {
                last_row.map_or(Ok(false), |id| self.store.holds(id))
            } else {
                Ok(false)
            };
            let outcome = match written {
                Ok(true) => Ok(()),
                Ok(false) => self.store.append(batch),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => {
                    self.metrics.committed(batch.len(), started.elapsed());
                    // One line when a fault clears, as one when it started (not one per retry).
                    if let Some(since) = failing_since {
                        self.progress.set_failing(false);
                        self.progress.log(
                            Level::Info,
                            format!(
                                "Writing to the archive {} works again after {attempt} failed attempt{} in {:.1} s; writing the {} messages queued meanwhile",
                                self.database,
                                if attempt == 1 { "" } else { "s" },
                                since.elapsed().as_secs_f64(),
                                self.queued.load(Ordering::Acquire)
                            ),
                        );
                    }
                    self.progress.advance(last, true);
                    return;
                }
                Err(e) => {
                    self.metrics.failed();
                    attempt += 1;
                    if attempt == 1 {
                        failing_since = Some(started);
                        self.progress.log(
                            Level::Error,
                            format!(
                                "Could not write to the archive {}: {e}; retrying until it works, messages are still delivered meanwhile",
                                self.database
                            ),
                        );
                        // Releases this batch's deliveries, and every later one at once until
                        // a commit works again: none waits for a database that is away.
                        self.progress.set_failing(true);
                    }
                    if self.stopping.load(Ordering::Acquire) && attempt >= ATTEMPTS_AT_SHUTDOWN {
                        for item in batch {
                            self.progress.log(
                                Level::Error,
                                format!(
                                    "Shutting down: archived message {} for {}@{} was not written: {e}",
                                    item.id, item.archive.user, item.archive.host
                                ),
                            );
                        }
                        return;
                    }
                    std::thread::sleep(backoff(attempt));
                }
            }
        }
    }
}

/// The next message already waiting, if any: a batch is what has come in meanwhile, never
/// what is still coming. (A loop turn's rows arrive in one message; waiting a moment for the
/// next turn's saved the writer no CPU measurably and delayed every delivery by it: see the
/// README, Benchmark.)
fn more(rx: &Receiver<WriterMsg>, stop: &mut bool) -> Option<WriterMsg> {
    match rx.try_recv() {
        Ok(msg) => Some(msg),
        Err(TryRecvError::Empty) => None,
        Err(TryRecvError::Disconnected) => {
            *stop = true;
            None
        }
    }
}

/// Marks gathered since the last commit, the newest per (archive, client).
#[derive(Default)]
struct Marks(std::collections::HashMap<(ArchiveRef, String), Mark>);

impl Marks {
    fn add(&mut self, mark: Mark) {
        let key = (mark.archive.clone(), mark.client.clone());
        match self.0.get_mut(&key) {
            Some(known) if known.last_id >= mark.last_id => known.seen = known.seen.max(mark.seen),
            _ => {
                self.0.insert(key, mark);
            }
        }
    }

    fn delivered(&mut self, row: &Row) {
        for client in &row.seen_by {
            self.add(Mark {
                archive: row.archive.clone(),
                client: client.clone(),
                last_id: row.id,
                seen: row.id.micros(),
            });
        }
    }
}

/// 50 ms, doubling, at most 5 s.
pub(super) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << attempt.min(7)).min(5_000))
}

#[cfg(test)]
mod tests {
    use super::{backoff, more, WriterMsg};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) < backoff(2));
        assert_eq!(backoff(30), Duration::from_secs(5));
    }

    #[test]
    fn a_waiting_message_joins_the_batch() {
        let (tx, rx) = mpsc::channel();
        tx.send(WriterMsg::Stop).unwrap();
        let mut stop = false;
        let next = more(&rx, &mut stop);
        assert!(matches!(next, Some(WriterMsg::Stop)));
        assert!(!stop);
    }

    #[test]
    fn a_batch_is_committed_without_waiting_for_later_messages() {
        let (tx, rx) = mpsc::channel();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = tx.send(WriterMsg::Stop);
        });
        let mut stop = false;
        assert!(more(&rx, &mut stop).is_none(), "waited for a later message");
        assert!(!stop);
        late.join().unwrap();
    }

    #[test]
    fn a_closed_channel_stops_the_writer() {
        let (tx, rx) = mpsc::channel::<WriterMsg>();
        drop(tx);
        let mut stop = false;
        assert!(more(&rx, &mut stop).is_none());
        assert!(stop);
    }
}
