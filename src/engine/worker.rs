//! Query workers: threads that answer archive queries off the loop.
//!
//! A worker takes a job, waits until every row archived before the query was made is committed
//! (read-your-writes), parses the query, runs it against the store, builds the result stanzas
//! and `<fin>`, and queues the completion for the loop. Workers only read the store.

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use minidom::Element;
use parking_lot::Mutex;

use super::wake::{Completion, Level, Mailbox, Progress};
use crate::protocol::xep0313::{respond, Limits, MamQuery, Response};
use crate::protocol::StanzaError;
use crate::store::{ArchiveRef, Store, StoreError};

/// How long a query waits for earlier messages to be committed before it runs anyway (only
/// reached when the database is failing).
const READ_YOUR_WRITES_WAIT: Duration = Duration::from_secs(10);

/// One archive query.
#[derive(Debug)]
pub struct Job {
    pub ticket: u64,
    pub archive: ArchiveRef,
    /// The `<query xmlns="urn:xmpp:mam:2">` element.
    pub query: Element,
    /// `to` and `from` for the result messages (the iq's `from` and `to`).
    pub to: Option<String>,
    pub from: Option<String>,
    /// The newest id handed out when the query arrived.
    pub seen: u64,
    /// Page sizes and totals, from the host's options.
    pub limits: Limits,
    /// Where the completion goes: the mailbox of the host that asked.
    pub reply: Arc<Mailbox>,
}

pub struct Worker {
    pub store: Arc<dyn Store>,
    pub progress: Arc<Progress>,
    /// Testing only: every query sleeps this long (`mam_rs_test_query_delay`).
    pub test_delay: Duration,
}

impl Worker {
    pub fn run(self, jobs: Arc<Mutex<Receiver<Job>>>) {
        loop {
            // Only the receive holds the lock; the other workers queue behind it.
            let job = match jobs.lock().recv() {
                Ok(job) => job,
                Err(_) => return,
            };
            let (ticket, reply) = (job.ticket, job.reply.clone());
            let result = self.answer(job);
            reply.push(Completion::Query { ticket, result });
        }
    }

    fn answer(&self, job: Job) -> Result<Response, StanzaError> {
        if !self
            .progress
            .wait_committed(job.seen, READ_YOUR_WRITES_WAIT)
        {
            job.reply.log(
                Level::Warn,
                "Archive query runs before earlier messages were written (the database is failing)",
            );
        }
        if !self.test_delay.is_zero() {
            std::thread::sleep(self.test_delay);
        }
        let query = MamQuery::parse(&job.query)?;
        let plan = query.plan(&job.limits);
        let page = self
            .store
            .find(&job.archive, &plan.store)
            .map_err(|e| match e {
                StoreError::ItemNotFound => StanzaError::item_not_found(),
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
            })?;
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
        Ok(response)
    }
}
