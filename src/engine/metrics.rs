//! Measurements for Prosody's statistics (`module:metric`, served by mod_http_openmetrics).
//!
//! The numbers are kept here, where things happen: the archive path counts with one atomic
//! increment (no allocation), the writer records each commit, the loop records each answered
//! query, and a query worker refreshes the archive figures (messages, users, database size) in
//! the background. The shim only copies them into Prosody's metric objects: a [`Reporter`]
//! hands it what changed since its last call, as counter increments, gauge values and
//! histogram samples.
//!
//! Histograms keep, per bucket, the count and the sum of what fell in it. A reporter gives
//! each bucket's new samples as `(mean, count)`: the mean of values in a bucket lies in that
//! bucket, so adding `count` samples of it to Prosody's histogram (same bounds) gives exact
//! bucket counts, count and sum.
//!
//! Owns no Lua state and no database connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Bucket bounds (upper, inclusive) of the duration histograms, in seconds.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bucket bounds of the batch size histogram, in messages (up to [`super::MAX_BATCH`]).
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// How old the archive figures may get before a statistics collection asks for new ones.
pub const FIGURES_MAX_AGE: Duration = Duration::from_secs(5);

/// Why the native side did not archive a message. (The shim counts the reasons it decides
/// itself: `policy`, `prefs` and `limit`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotArchived {
    // The order of `ALL` and of `REASON_LABELS`.
    /// Nothing left once `dont_archive_namespaces` were stripped (expected, quiet).
    Empty,
    /// Nested deeper than the copy allows (a client's doing).
    TooDeep,
    /// The writer's queue is at its bound (the database cannot keep up).
    QueueFull,
    /// The database server has not answered since the module started.
    Unavailable,
    /// Anything else: the archive is closed, a name or character XML cannot carry, or an
    /// unexpected failure.
    Failed,
}

impl NotArchived {
    pub const ALL: [NotArchived; 5] = [
        NotArchived::Empty,
        NotArchived::TooDeep,
        NotArchived::QueueFull,
        NotArchived::Unavailable,
        NotArchived::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotArchived::Empty => "empty",
            NotArchived::TooDeep => "too-deep",
            NotArchived::QueueFull => "queue-full",
            NotArchived::Unavailable => "unavailable",
            NotArchived::Failed => "failed",
        }
    }
}

/// Archive figures for the gauges, as [`crate::store::Store::figures`] reads them.
pub use crate::store::Figures;

/// A histogram over fixed bounds: per bucket, how many values fell in it and their sum.
/// Values are recorded as integers (`raw`) and reported as `raw / per_unit`.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    per_unit: f64,
    /// One more than `bounds`: the last bucket is `+Inf`.
    buckets: Mutex<Vec<Bucket>>,
}

/// One bucket's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    pub count: u64,
    pub sum: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64], per_unit: f64) -> Histogram {
        Histogram {
            bounds,
            per_unit,
            buckets: Mutex::new(vec![Bucket::default(); bounds.len() + 1]),
        }
    }

    /// Durations, recorded in nanoseconds and reported in seconds.
    pub fn seconds() -> Histogram {
        Histogram::new(SECONDS_BUCKETS, 1e9)
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    pub fn record(&self, raw: u64) {
        let value = raw as f64 / self.per_unit;
        let i = self.bounds.partition_point(|bound| *bound < value);
        let mut buckets = self.buckets.lock();
        let bucket = &mut buckets[i];
        bucket.count += 1;
        bucket.sum = bucket.sum.saturating_add(raw);
    }

    pub fn record_duration(&self, took: Duration) {
        self.record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Every bucket's totals so far.
    pub fn totals(&self) -> Vec<Bucket> {
        self.buckets.lock().clone()
    }

    /// What was recorded since `seen` (a reader's copy of [`Histogram::totals`], which this
    /// moves forward): for each bucket with new values, their mean and how many there are.
    pub fn samples_since(&self, seen: &mut [Bucket]) -> Vec<(f64, u64)> {
        let buckets = self.buckets.lock();
        let mut samples = Vec::new();
        for (i, (now, seen)) in buckets.iter().zip(seen.iter_mut()).enumerate() {
            let count = now.count - seen.count;
            if count == 0 {
                continue;
            }
            let mean = (now.sum - seen.sum) as f64 / self.per_unit / count as f64;
            samples.push((self.within(i, mean), count));
            *seen = *now;
        }
        samples
    }

    /// `value` moved into bucket `i` where rounding took it out: `(bounds[i-1], bounds[i]]`.
    fn within(&self, i: usize, value: f64) -> f64 {
        let upper = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
        let lower = match i {
            0 => f64::NEG_INFINITY,
            _ => self.bounds[i - 1],
        };
        if value > upper {
            upper
        } else if value <= lower {
            // The next float above `lower` (bounds are positive).
            f64::from_bits(lower.to_bits() + 1)
        } else {
            value
        }
    }
}

/// What the writer measures. One per engine, so shared by every host whose archive is in the
/// same database file.
#[derive(Debug)]
pub struct WriterMetrics {
    /// Messages per committed transaction.
    pub batch_size: Histogram,
    /// How long each successful commit took.
    pub commit_seconds: Histogram,
    /// Commit attempts that failed (each retry counts).
    failed_writes: AtomicU64,
}

impl Default for WriterMetrics {
    fn default() -> Self {
        WriterMetrics {
            batch_size: Histogram::new(BATCH_BUCKETS, 1.0),
            commit_seconds: Histogram::seconds(),
            failed_writes: AtomicU64::new(0),
        }
    }
}

impl WriterMetrics {
    /// A transaction of `rows` messages was committed in `took`.
    pub fn committed(&self, rows: usize, took: Duration) {
        self.batch_size.record(rows as u64);
        self.commit_seconds.record_duration(took);
    }

    /// A commit attempt failed.
    pub fn failed(&self) {
        self.failed_writes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failed_writes(&self) -> u64 {
        self.failed_writes.load(Ordering::Relaxed)
    }
}

/// What one host measures (one module instance, one VirtualHost).
#[derive(Debug)]
pub struct HostMetrics {
    /// Archived messages: `[in, out]`.
    archived: [AtomicU64; 2],
    /// Indexed by [`NotArchived`] (as in [`NotArchived::ALL`]).
    not_archived: [AtomicU64; 5],
    /// Answered requests (queries and metadata): `[ok, error]`.
    answered: [AtomicU64; 2],
    /// From a request's arrival to its answer being ready.
    pub query_seconds: Histogram,
    figures: Mutex<FiguresState>,
}

#[derive(Debug, Default)]
struct FiguresState {
    value: Option<Figures>,
    refreshed: Option<Instant>,
    /// A refresh was asked for and has not finished.
    pending: bool,
    /// The last refresh failed (so the next failure is not logged again).
    failing: bool,
}

impl Default for HostMetrics {
    fn default() -> Self {
        HostMetrics {
            archived: Default::default(),
            not_archived: Default::default(),
            answered: Default::default(),
            query_seconds: Histogram::seconds(),
            figures: Mutex::new(FiguresState::default()),
        }
    }
}

impl HostMetrics {
    /// A message was archived: `outgoing` when the user sent it, else received.
    pub fn archived(&self, outgoing: bool) {
        self.archived[usize::from(outgoing)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn not_archived(&self, why: NotArchived) {
        self.not_archived[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A query or metadata request was answered (`ok`) or refused, `took` after it arrived.
    pub fn answered(&self, ok: bool, took: Duration) {
        self.answered[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        self.query_seconds.record_duration(took);
    }

    /// Whether the caller should ask for new figures now: none is pending and the last are
    /// older than `max_age` (or there are none yet). When true, a refresh counts as pending
    /// until [`HostMetrics::figures_refreshed`] or [`HostMetrics::figures_failed`].
    pub fn claim_refresh(&self, max_age: Duration) -> bool {
        let mut figures = self.figures.lock();
        let stale = figures.refreshed.is_none_or(|at| at.elapsed() >= max_age);
        if figures.pending || !stale {
            return false;
        }
        figures.pending = true;
        true
    }

    /// The refresh asked for could not be started.
    pub fn refresh_dropped(&self) {
        self.figures.lock().pending = false;
    }

    pub fn figures_refreshed(&self, value: Figures) {
        let mut figures = self.figures.lock();
        *figures = FiguresState {
            value: Some(value),
            refreshed: Some(Instant::now()),
            pending: false,
            failing: false,
        };
    }

    /// A refresh failed; the figures stay as they were. Returns whether this starts a run of
    /// failures (worth one log line).
    pub fn figures_failed(&self) -> bool {
        let mut figures = self.figures.lock();
        figures.pending = false;
        figures.refreshed = Some(Instant::now());
        !std::mem::replace(&mut figures.failing, true)
    }

    pub fn figures(&self) -> Option<Figures> {
        self.figures.lock().value
    }
}

/// A new value for one of Prosody's metrics: `name` is the shim's name for the metric family,
/// `labels` its label values after `host`.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub name: &'static str,
    pub labels: &'static [&'static str],
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Add to a counter.
    Add(u64),
    /// Set a gauge.
    Set(f64),
    /// Add samples to a histogram: `(value, how many times)`.
    Samples(Vec<(f64, u64)>),
}

/// The metric families a [`Reporter`] updates, by the shim's names (see README.md, Metrics).
pub mod names {
    pub const ARCHIVED: &str = "archived";
    pub const NOT_ARCHIVED: &str = "not_archived";
    pub const QUERIES: &str = "queries";
    pub const QUERY_SECONDS: &str = "query";
    pub const ARCHIVE_MESSAGES: &str = "archive_messages";
    pub const ARCHIVE_USERS: &str = "archive_users";
    pub const DATABASE_BYTES: &str = "database";
    pub const WRITE_QUEUE: &str = "write_queue";
    pub const BATCH_SIZE: &str = "batch_size";
    pub const COMMIT_SECONDS: &str = "commit";
    pub const FAILED_WRITES: &str = "failed_writes";
}

const DIRECTION_LABELS: [&[&str]; 2] = [&["in"], &["out"]];
const OUTCOME_LABELS: [&[&str]; 2] = [&["ok"], &["error"]];
const REASON_LABELS: [&[&str]; 5] = [
    &["empty"],
    &["too-deep"],
    &["queue-full"],
    &["unavailable"],
    &["failed"],
];

fn load<const N: usize>(counts: &[AtomicU64; N]) -> [u64; N] {
    std::array::from_fn(|i| counts[i].load(Ordering::Relaxed))
}

/// One host's reader: what it reported last, so that each call gives only what changed.
#[derive(Debug)]
pub struct Reporter {
    host: Arc<HostMetrics>,
    writer: Arc<WriterMetrics>,
    /// Nothing reported yet: the first report names every counter, even at zero.
    first: bool,
    archived: [u64; 2],
    not_archived: [u64; 5],
    answered: [u64; 2],
    failed_writes: u64,
    query_seconds: Vec<Bucket>,
    batch_size: Vec<Bucket>,
    commit_seconds: Vec<Bucket>,
    queue: Option<usize>,
    figures: Option<Figures>,
}

impl Reporter {
    /// A reader for `host`, counting from now: what came before is not reported (for the
    /// writer's figures, another host on the same database reported it).
    pub fn new(host: Arc<HostMetrics>, writer: Arc<WriterMetrics>) -> Reporter {
        Reporter {
            first: true,
            archived: load(&host.archived),
            not_archived: load(&host.not_archived),
            answered: load(&host.answered),
            failed_writes: writer.failed_writes(),
            query_seconds: host.query_seconds.totals(),
            batch_size: writer.batch_size.totals(),
            commit_seconds: writer.commit_seconds.totals(),
            queue: None,
            figures: None,
            host,
            writer,
        }
    }

    pub fn host(&self) -> &Arc<HostMetrics> {
        &self.host
    }

    /// What changed since the last call. `queue` is the writer's queue depth (none once the
    /// archive is closed).
    pub fn report(&mut self, queue: Option<usize>) -> Vec<Update> {
        let mut out = Vec::new();
        let first = std::mem::replace(&mut self.first, false);
        let mut counter = |name, labels, now: u64, seen: &mut u64| {
            if now > *seen || first {
                out.push(Update {
                    name,
                    labels,
                    value: Value::Add(now - *seen),
                });
                *seen = now;
            }
        };
        for (i, labels) in DIRECTION_LABELS.into_iter().enumerate() {
            let now = self.host.archived[i].load(Ordering::Relaxed);
            counter(names::ARCHIVED, labels, now, &mut self.archived[i]);
        }
        for (i, labels) in REASON_LABELS.into_iter().enumerate() {
            let now = self.host.not_archived[i].load(Ordering::Relaxed);
            counter(names::NOT_ARCHIVED, labels, now, &mut self.not_archived[i]);
        }
        for (i, labels) in OUTCOME_LABELS.into_iter().enumerate() {
            let now = self.host.answered[i].load(Ordering::Relaxed);
            counter(names::QUERIES, labels, now, &mut self.answered[i]);
        }
        let failed = self.writer.failed_writes();
        counter(names::FAILED_WRITES, &[], failed, &mut self.failed_writes);

        for (name, histogram, seen) in [
            (
                names::QUERY_SECONDS,
                &self.host.query_seconds,
                &mut self.query_seconds,
            ),
            (
                names::BATCH_SIZE,
                &self.writer.batch_size,
                &mut self.batch_size,
            ),
            (
                names::COMMIT_SECONDS,
                &self.writer.commit_seconds,
                &mut self.commit_seconds,
            ),
        ] {
            let samples = histogram.samples_since(seen);
            if !samples.is_empty() {
                out.push(Update {
                    name,
                    labels: &[],
                    value: Value::Samples(samples),
                });
            }
        }

        let mut gauge = |name, now: f64, before: Option<f64>| {
            if before != Some(now) {
                out.push(Update {
                    name,
                    labels: &[],
                    value: Value::Set(now),
                });
            }
        };
        if let Some(queue) = queue {
            gauge(
                names::WRITE_QUEUE,
                queue as f64,
                self.queue.map(|q| q as f64),
            );
            self.queue = Some(queue);
        }
        if let Some(now) = self.host.figures() {
            let before = self.figures;
            gauge(
                names::ARCHIVE_MESSAGES,
                now.messages as f64,
                before.map(|f| f.messages as f64),
            );
            gauge(
                names::ARCHIVE_USERS,
                now.archives as f64,
                before.map(|f| f.archives as f64),
            );
            gauge(
                names::DATABASE_BYTES,
                now.bytes as f64,
                before.map(|f| f.bytes as f64),
            );
            self.figures = Some(now);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporter() -> Reporter {
        Reporter::new(
            Arc::new(HostMetrics::default()),
            Arc::new(WriterMetrics::default()),
        )
    }

    fn added(updates: &[Update], name: &str, labels: &[&str]) -> Option<u64> {
        updates.iter().find_map(|u| match &u.value {
            Value::Add(n) if u.name == name && u.labels == labels => Some(*n),
            _ => None,
        })
    }

    fn samples(updates: &[Update], name: &str) -> Vec<(f64, u64)> {
        updates
            .iter()
            .find_map(|u| match &u.value {
                Value::Samples(s) if u.name == name => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    fn set(updates: &[Update], name: &str) -> Option<f64> {
        updates.iter().find_map(|u| match u.value {
            Value::Set(v) if u.name == name => Some(v),
            _ => None,
        })
    }

    /// Prosody's histogram (util.statistics): a value counts in every bucket whose bound is
    /// at least the value.
    fn prosody_buckets(bounds: &[f64], samples: &[(f64, u64)]) -> Vec<u64> {
        bounds
            .iter()
            .map(|bound| {
                samples
                    .iter()
                    .filter(|(v, _)| v <= bound)
                    .map(|(_, n)| n)
                    .sum()
            })
            .collect()
    }

    #[test]
    fn the_first_report_names_every_counter_at_zero_then_only_changes() {
        let mut r = reporter();
        let first = r.report(Some(0));
        for dir in ["in", "out"] {
            assert_eq!(added(&first, names::ARCHIVED, &[dir]), Some(0));
        }
        for why in NotArchived::ALL {
            assert_eq!(added(&first, names::NOT_ARCHIVED, &[why.as_str()]), Some(0));
        }
        assert_eq!(added(&first, names::QUERIES, &["ok"]), Some(0));
        assert_eq!(added(&first, names::QUERIES, &["error"]), Some(0));
        assert_eq!(added(&first, names::FAILED_WRITES, &[]), Some(0));
        assert_eq!(set(&first, names::WRITE_QUEUE), Some(0.0));
        assert_eq!(set(&first, names::ARCHIVE_MESSAGES), None, "not known yet");
        assert!(r.report(Some(0)).is_empty(), "nothing changed");
    }

    #[test]
    fn counters_report_what_was_added_since_the_last_report() {
        let mut r = reporter();
        r.report(None);
        let host = r.host().clone();
        for _ in 0..3 {
            host.archived(true);
        }
        host.archived(false);
        host.not_archived(NotArchived::QueueFull);
        host.not_archived(NotArchived::QueueFull);
        host.not_archived(NotArchived::TooDeep);
        host.answered(true, Duration::from_millis(2));
        host.answered(false, Duration::from_millis(3));
        host.answered(true, Duration::from_millis(30));
        let u = r.report(None);
        assert_eq!(added(&u, names::ARCHIVED, &["out"]), Some(3));
        assert_eq!(added(&u, names::ARCHIVED, &["in"]), Some(1));
        assert_eq!(added(&u, names::NOT_ARCHIVED, &["queue-full"]), Some(2));
        assert_eq!(added(&u, names::NOT_ARCHIVED, &["too-deep"]), Some(1));
        assert_eq!(added(&u, names::NOT_ARCHIVED, &["empty"]), None);
        assert_eq!(added(&u, names::QUERIES, &["ok"]), Some(2));
        assert_eq!(added(&u, names::QUERIES, &["error"]), Some(1));
        let q = samples(&u, names::QUERY_SECONDS);
        assert_eq!(q.iter().map(|(_, n)| n).sum::<u64>(), 3);
        let sum: f64 = q.iter().map(|(v, n)| v * *n as f64).sum();
        assert!((sum - 0.035).abs() < 1e-9, "{sum}");
        host.archived(false);
        let again = r.report(None);
        assert_eq!(added(&again, names::ARCHIVED, &["in"]), Some(1));
        assert_eq!(added(&again, names::ARCHIVED, &["out"]), None);
        assert_eq!(added(&again, names::QUERIES, &["ok"]), None);
    }

    #[test]
    fn writer_figures_reach_every_host_reporting_them_once_each() {
        let writer = Arc::new(WriterMetrics::default());
        writer.committed(5, Duration::from_millis(1));
        let mut a = Reporter::new(Arc::new(HostMetrics::default()), writer.clone());
        let mut b = Reporter::new(Arc::new(HostMetrics::default()), writer.clone());
        a.report(Some(0));
        b.report(Some(0));
        writer.committed(3, Duration::from_millis(4));
        writer.committed(700, Duration::from_millis(40));
        writer.failed();
        for r in [&mut a, &mut b] {
            let u = r.report(Some(2));
            let batches = samples(&u, names::BATCH_SIZE);
            assert_eq!(
                prosody_buckets(BATCH_BUCKETS, &batches),
                [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2],
                "the commit before the reporter started is not reported"
            );
            let total: f64 = batches.iter().map(|(v, n)| v * *n as f64).sum();
            assert_eq!(total, 703.0);
            assert_eq!(samples(&u, names::COMMIT_SECONDS).len(), 2);
            assert_eq!(added(&u, names::FAILED_WRITES, &[]), Some(1));
            assert_eq!(set(&u, names::WRITE_QUEUE), Some(2.0));
            assert!(r.report(Some(2)).is_empty());
        }
    }

    #[test]
    fn samples_land_in_the_bucket_their_values_came_from() {
        let h = Histogram::seconds();
        let mut seen = h.totals();
        // Exactly on a bound, just above one, and beyond the last.
        let values = [0.001, 0.001, 0.0010001, 0.01, 0.2, 0.25, 42.0];
        for v in values {
            h.record_duration(Duration::from_secs_f64(v));
        }
        let samples = h.samples_since(&mut seen);
        let expected: Vec<u64> = SECONDS_BUCKETS
            .iter()
            .map(|b| values.iter().filter(|v| *v <= b).count() as u64)
            .collect();
        assert_eq!(prosody_buckets(SECONDS_BUCKETS, &samples), expected);
        assert_eq!(samples.iter().map(|(_, n)| n).sum::<u64>(), 7);
        let sum: f64 = samples.iter().map(|(v, n)| v * *n as f64).sum();
        assert!((sum - values.iter().sum::<f64>()).abs() < 1e-6, "{sum}");
        assert!(h.samples_since(&mut seen).is_empty());
    }

    #[test]
    fn figures_refresh_at_most_once_at_a_time_and_not_while_fresh() {
        let mut r = reporter();
        let host = r.host().clone();
        assert!(host.claim_refresh(FIGURES_MAX_AGE), "none yet");
        assert!(!host.claim_refresh(FIGURES_MAX_AGE), "one is pending");
        let figures = Figures {
            archives: 2,
            messages: 16,
            bytes: 4096,
        };
        host.figures_refreshed(figures);
        assert!(!host.claim_refresh(FIGURES_MAX_AGE), "fresh");
        assert!(host.claim_refresh(Duration::ZERO), "stale");
        let u = r.report(None);
        assert_eq!(set(&u, names::ARCHIVE_MESSAGES), Some(16.0));
        assert_eq!(set(&u, names::ARCHIVE_USERS), Some(2.0));
        assert_eq!(set(&u, names::DATABASE_BYTES), Some(4096.0));
        assert!(
            host.figures_failed(),
            "the first failure is worth a log line"
        );
        assert!(host.claim_refresh(Duration::ZERO));
        assert!(!host.figures_failed(), "the second is not");
        assert_eq!(host.figures(), Some(figures), "kept through failures");
        assert!(r.report(None).is_empty());
    }
}
