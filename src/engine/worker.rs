//! Query workers: threads that answer archive queries off the loop.
//!
//! A worker takes a job, waits until every row archived before the query was made is committed
//! (read-your-writes; while the writer is failing, the query gets a "try again later" error at
//! once instead of a page missing those rows), parses the query, runs it against the store,
//! builds the result stanzas and `<fin>`, and queues the completion for the loop. Workers only
//! read the store.
//! Between queries they also refresh a host's archive figures for the metrics gauges.

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use minidom::Element;
use parking_lot::Mutex;

use super::metrics::HostMetrics;
use super::wake::{Answer, Committed, Completion, Level, Mailbox, Progress};
use crate::protocol::xep0313::{self, respond, Limits, MamQuery};
use crate::protocol::{ns, StanzaError};
use crate::store::{ArchiveRef, Query, Store, StoreError};

/// How long a query waits for earlier messages to be committed before it runs anyway (only
/// reached when the database is slow; a failing one ends the wait at once).
const READ_YOUR_WRITES_WAIT: Duration = Duration::from_secs(10);

/// What a client asked of its archive.
#[derive(Debug)]
pub enum Request {
    /// A search: the `<query xmlns="urn:xmpp:mam:2">` element.
    Query(Element),
    /// The first and last message (`<metadata xmlns="urn:xmpp:mam:2"/>`).
    Metadata,
}

/// One request, queued for a worker.
#[derive(Debug)]
pub struct Job {
    pub ticket: u64,
    pub archive: ArchiveRef,
    pub request: Request,
    /// `to` and `from` for the result messages (the iq's `from` and `to`).
    pub to: Option<String>,
    pub from: Option<String>,
    /// The newest id handed out when the query arrived.
    pub seen: u64,
    /// Page sizes and totals, from the host's options.
    pub limits: Limits,
    /// Where the completion goes: the mailbox of the host that asked.
    pub reply: Arc<Mailbox>,
    /// When the loop handed it over (the query duration counts from here).
    pub arrived: Instant,
}

/// A host's archive figures to read, for the metrics gauges.
#[derive(Debug)]
pub struct FiguresJob {
    pub host: Arc<str>,
    pub store: Arc<str>,
    pub into: Arc<HostMetrics>,
}

/// What the workers take from their queue.
// Nearly every task is an answer: boxing jobs would only add an allocation per query.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Task {
    Answer(Job),
    Figures(FiguresJob),
}

pub struct Worker {
    pub store: Arc<dyn Store>,
    pub progress: Arc<Progress>,
    /// Testing only: every query sleeps this long (`mam_rs_test_query_delay`).
    pub test_delay: Duration,
}

impl Worker {
    pub fn run(self, tasks: Arc<Mutex<Receiver<Task>>>) {
        loop {
            // Only the receive holds the lock; the other workers queue behind it.
            let job = match tasks.lock().recv() {
                Ok(Task::Answer(job)) => job,
                Ok(Task::Figures(job)) => {
                    self.figures(job);
                    continue;
                }
                Err(_) => return,
            };
            let (ticket, reply, arrived) = (job.ticket, job.reply.clone(), job.arrived);
            let result = self.answer(job);
            reply.push(Completion::Query {
                ticket,
                result,
                elapsed: arrived.elapsed(),
            });
        }
    }

    fn figures(&self, job: FiguresJob) {
        match self.store.figures(&job.host, &job.store) {
            Ok(figures) => job.into.figures_refreshed(figures),
            Err(e) => {
                if job.into.figures_failed() {
                    self.progress.log(
                        Level::Warn,
                        format!(
                            "Could not read the archive figures of {} for metrics: {e}",
                            job.host
                        ),
                    );
                }
            }
        }
    }

    fn answer(&self, job: Job) -> Result<Answer, StanzaError> {
        match self
            .progress
            .wait_for_query(job.seen, READ_YOUR_WRITES_WAIT)
        {
            Committed::Yes => {}
            // A page without the messages the writer holds would tell the client it is in
            // sync when it is not: a clear "try again later" instead (the writer's own log
            // line names the fault, once).
            Committed::NotWhileFailing => return Err(StanzaError::database_unavailable()),
            Committed::NotYet => job.reply.log(
                Level::Warn,
                "Archive query runs before earlier messages were written (the database is slow)",
            ),
        }
        if !self.test_delay.is_zero() {
            std::thread::sleep(self.test_delay);
        }
        match &job.request {
            Request::Query(query) => self.search(&job, query),
            Request::Metadata => self.metadata(&job),
        }
    }

    fn find(&self, job: &Job, query: &Query) -> Result<crate::store::Page, StanzaError> {
        self.store.find(&job.archive, query).map_err(|e| match e {
            StoreError::ItemNotFound => StanzaError::item_not_found(),
            StoreError::Unavailable(_) => StanzaError::database_unavailable(),
            other => {
                job.reply.log(
                    Level::Error,
                    format!(
                        "Archive query for {}@{} failed: {other}",
                        job.archive.user, job.archive.host
                    ),
                );
                StanzaError::internal_server_error()
            }
        })
    }

    fn search(&self, job: &Job, query: &Element) -> Result<Answer, StanzaError> {
        let query = MamQuery::parse(query)?;
        query.within(&job.limits)?;
        let plan = query.plan(&job.limits);
        let page = self.find(job, &plan.store)?;
        let response = respond(&query, &plan, page, job.to.as_deref(), job.from.as_deref());
        for skipped in &response.skipped {
            job.reply.log(
                Level::Warn,
                format!(
                    "Archive of {}@{}: skipped an unreadable stored message: {skipped}",
                    job.archive.user, job.archive.host
                ),
            );
        }
        let last_id = response
            .fin
            .get_child("set", ns::RSM)
            .and_then(|set| set.get_child("last", ns::RSM))
            .map(Element::text);
        Ok(Answer {
            messages: response.messages,
            payload: response.fin,
            last_id,
            mark_id: response.newest.map(|id| id.to_string()),
        })
    }

    fn metadata(&self, job: &Job) -> Result<Answer, StanzaError> {
        let edge = |reverse| -> Result<Option<(String, i64)>, StanzaError> {
            let query = Query {
                limit: Some(1),
                reverse,
                ..Query::default()
            };
            let page = self.find(job, &query)?;
            Ok(page
                .items
                .first()
                .map(|item| (item.client_id(), item.id.micros())))
        };
        let (first, last) = (edge(false)?, edge(true)?);
        let payload = xep0313::metadata(
            first.as_ref().map(|(id, t)| (id.as_str(), *t)),
            last.as_ref().map(|(id, t)| (id.as_str(), *t)),
        );
        Ok(Answer {
            messages: Vec::new(),
            payload,
            last_id: None,
            mark_id: None,
        })
    }
}
