//! The engine's threads against a real SQLite file: ordering, read-your-writes, flush on
//! shutdown, per-host mailboxes, and what happens while the database fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mam_rs_native::config::Config;
use mam_rs_native::engine::{Answer, Completion, Engine, Level, Mailbox, QueryRequest, Request};
use mam_rs_native::id::ArchiveId;
use mam_rs_native::protocol::xep0313::Limits;
use mam_rs_native::protocol::StanzaError;
use mam_rs_native::store::sqlite::{SqliteOptions, SqliteStore};
use mam_rs_native::store::{
    ArchiveRef, ExpiryBatch, ExpiryCursor, ExpiryRule, Figures, ImportBatch, ImportCheckpoint,
    ImportRow, Item, Location, Mark, NewItem, Page, Query, Stats, Store, StoreError,
};
use minidom::Element;

fn config(dir: &tempfile::TempDir) -> Config {
    Config {
        database: Location::Sqlite(dir.path().join("mam_rs.sqlite")),
        ..Config::default()
    }
}

/// The SQLite file of `cfg`.
fn path(cfg: &Config) -> &std::path::Path {
    match &cfg.database {
        Location::Sqlite(path) => path,
        other => panic!("not an SQLite config: {other:?}"),
    }
}

/// An engine over a fresh SQLite store at `cfg.database`.
fn start(cfg: &Config) -> Engine {
    let store = SqliteStore::open(path(cfg), &SqliteOptions::default()).unwrap();
    Engine::start(Arc::new(store), cfg).unwrap()
}

fn archive_ref(host: &str, user: &str) -> ArchiveRef {
    ArchiveRef {
        host: Arc::from(host),
        user: user.to_string(),
        store: Arc::from("archive"),
    }
}

fn message(body: &str) -> String {
    format!("<message xmlns='jabber:client' to='bob@localhost' type='chat'><body>{body}</body></message>")
}

/// Archives a message from alice to bob in alice's archive; `mailbox` marks the loop turn's end.
fn alice_to_bob(
    engine: &Engine,
    mailbox: &Mailbox,
    body: &str,
) -> Result<mam_rs_native::engine::Archived, mam_rs_native::engine::EngineError> {
    engine.archive(
        archive_ref("localhost", "alice"),
        "bob@localhost".into(),
        message(body),
        None,
        Vec::new(),
        mailbox,
    )
}

fn query(xml: &str) -> Element {
    xml.parse().unwrap()
}

/// Waits for the completion of `ticket` in `mailbox`, keeping the largest release mark seen.
fn wait_for(mailbox: &Mailbox, ticket: u64) -> Result<Answer, StanzaError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for c in mailbox.drain().completions {
            if let Completion::Query {
                ticket: t, result, ..
            } = c
            {
                if t == ticket {
                    return result;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no completion for ticket {ticket}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for the removal job `ticket` (an expiry or an archive's deletion) to finish: the
/// number of messages it removed.
fn wait_removed(engine: &Engine, mailbox: &Mailbox, ticket: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let done = engine
            .drain(mailbox)
            .completions
            .into_iter()
            .find_map(|c| match c {
                Completion::Expired { ticket: t, result } if t == ticket => Some(result),
                _ => None,
            });
        if let Some(result) = done {
            return result.unwrap();
        }
        assert!(Instant::now() < deadline, "removal {ticket} did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn bodies(response: &Answer) -> Vec<String> {
    response
        .messages
        .iter()
        .map(|m| {
            let m = m.to_element();
            let fwd = m.children().next().unwrap().children().next().unwrap();
            let inner = fwd.children().find(|c| c.name() == "message").unwrap();
            inner
                .children()
                .find(|c| c.name() == "body")
                .unwrap()
                .text()
        })
        .collect()
}

fn ask(
    engine: &Engine,
    mailbox: &Arc<Mailbox>,
    user: &str,
    xml: &str,
) -> Result<Answer, StanzaError> {
    let ticket = engine
        .query(
            QueryRequest {
                archive: archive_ref("localhost", user),
                request: Request::Query(query(xml)),
                to: Some(format!("{user}@localhost/r")),
                from: None,
                limits: Limits {
                    default_max: 20,
                    max_max: 1000,
                    include_total: true,
                    ..Limits::default()
                },
            },
            mailbox,
        )
        .unwrap();
    wait_for(mailbox, ticket)
}

/// Asks for alice's whole archive and expects the "try again later" error within `within`.
fn ask_refused(engine: &Engine, mailbox: &Arc<Mailbox>, within: Duration) -> StanzaError {
    let asked = Instant::now();
    let err = ask(engine, mailbox, "alice", ALL).unwrap_err();
    assert!(asked.elapsed() < within, "{:?}", asked.elapsed());
    assert_eq!(
        (err.kind.as_str(), err.condition),
        ("wait", "internal-server-error")
    );
    err
}

const ALL: &str = "<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><max>1000</max></set></query>";

#[test]
fn a_query_sees_every_message_archived_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(&config(&dir));
    let mailbox = engine.mailbox().unwrap();
    let mut ids = Vec::new();
    for i in 0..500 {
        ids.push(
            engine
                .archive(
                    archive_ref("localhost", "alice"),
                    "bob@localhost".into(),
                    message(&format!("m{i:03}")),
                    None,
                    Vec::new(),
                    &mailbox,
                )
                .unwrap()
                .id,
        );
    }
    // No waiting for commits: the query itself must wait for them.
    let response = ask(&engine, &mailbox, "alice", ALL).unwrap();
    let expected: Vec<String> = (0..500).map(|i| format!("m{i:03}")).collect();
    assert_eq!(bodies(&response), expected);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids are handed out in increasing order"
    );
    assert_eq!(response.payload.attr("complete"), Some("true"));
    assert_eq!(response.last_id, Some(ids[499].to_string()));
}

#[test]
fn release_marks_reach_every_host_and_results_only_the_asker() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::shared(&config(&dir)).unwrap();
    let again = Engine::shared(&config(&dir)).unwrap();
    assert!(
        Arc::ptr_eq(&engine, &again),
        "hosts on one database share one engine"
    );
    let host_a = engine.mailbox().unwrap();
    let host_b = engine.mailbox().unwrap();
    let archived = engine
        .archive(
            archive_ref("localhost", "alice"),
            "bob@localhost".into(),
            message("x"),
            None,
            Vec::new(),
            &host_a,
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut a, mut b) = (0, 0);
    while (a < archived.release_at || b < archived.release_at) && Instant::now() < deadline {
        // Either host's drain ends the loop's turn: here host B's, though host A archived.
        b = b.max(engine.drain(&host_b).released);
        a = a.max(host_a.drain().released);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(a >= archived.release_at && b >= archived.release_at);
    ask(&engine, &host_a, "alice", ALL).unwrap();
    assert!(
        host_b.drain().completions.is_empty(),
        "host B got host A's result"
    );
}

#[test]
fn shutdown_commits_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    {
        let engine = start(&cfg);
        let mailbox = engine.mailbox().unwrap();
        for i in 0..3000 {
            engine
                .archive(
                    archive_ref("localhost", "alice"),
                    "bob@localhost".into(),
                    message(&format!("{i}")),
                    None,
                    Vec::new(),
                    &mailbox,
                )
                .unwrap();
        }
        // Dropped at once, with every row still kept for the turn's end: shutdown hands them
        // to the writer.
    }
    let store = SqliteStore::open(path(&cfg), &SqliteOptions::default()).unwrap();
    let page = store
        .find(
            &archive_ref("localhost", "alice"),
            &Query {
                limit: Some(0),
                total: true,
                ..Query::default()
            },
        )
        .unwrap();
    assert_eq!(page.total, Some(3000));
}

/// What the eventfd of `mailbox` has counted since it was last read (and reads it).
fn pokes(mailbox: &Mailbox) -> u64 {
    let mut count: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64 from a descriptor the mailbox owns.
    let n = unsafe { libc::read(mailbox.fd(), (&mut count as *mut u64).cast(), 8) };
    if n == 8 {
        count
    } else {
        0 // EAGAIN: not readable.
    }
}

#[test]
fn a_loop_turns_rows_reach_the_writer_together_when_the_turn_ends() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(&config(&dir));
    let mailbox = engine.mailbox().unwrap();
    let other_host = engine.mailbox().unwrap();
    let mut last = 0;
    for i in 0..5 {
        last = alice_to_bob(&engine, &mailbox, &i.to_string())
            .unwrap()
            .release_at;
    }
    assert_eq!(
        pokes(&mailbox),
        1,
        "one wake-up for the turn, from its first row"
    );
    assert_eq!(
        pokes(&other_host),
        0,
        "only the archiving host's loop watcher is woken"
    );
    // Nothing goes to the writer before the turn's end: no commit, however long we wait.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        mailbox.drain().released < last,
        "committed before the turn ended"
    );
    assert_eq!(
        engine
            .writer_metrics()
            .batch_size
            .totals()
            .iter()
            .map(|b| b.count)
            .sum::<u64>(),
        0
    );
    assert_eq!(
        engine.queued(),
        5,
        "kept rows count against mam_rs_max_queued_rows"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    while engine.drain(&mailbox).released < last {
        assert!(
            Instant::now() < deadline,
            "the turn's rows were never committed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let batches = engine.writer_metrics().batch_size.totals();
    assert_eq!(
        (
            batches.iter().map(|b| b.count).sum::<u64>(),
            batches.iter().map(|b| b.sum).sum::<u64>()
        ),
        (1, 5),
        "the turn's five rows in one transaction"
    );
    // The next turn wakes the loop again. (The commit's own wake-up reached `mailbox` before
    // `other_host`, so once the latter has it, `mailbox` holds no stale one.)
    while other_host.drain().released < last {
        assert!(
            Instant::now() < deadline,
            "the other host never heard of the commit"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    pokes(&mailbox);
    alice_to_bob(&engine, &mailbox, "next").unwrap();
    assert_eq!(pokes(&mailbox), 1);
}

#[test]
fn ids_continue_after_the_newest_stored_id() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let first = {
        let engine = start(&cfg);
        let mailbox = engine.mailbox().unwrap();
        engine
            .archive(
                archive_ref("localhost", "alice"),
                "bob@localhost".into(),
                message("a"),
                None,
                Vec::new(),
                &mailbox,
            )
            .unwrap()
            .id
    };
    let engine = start(&cfg);
    let mailbox = engine.mailbox().unwrap();
    let second = engine
        .archive(
            archive_ref("localhost", "alice"),
            "bob@localhost".into(),
            message("b"),
            None,
            Vec::new(),
            &mailbox,
        )
        .unwrap()
        .id;
    assert!(second > first);
}

#[test]
fn metadata_names_the_first_and_last_message() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(&config(&dir));
    let mailbox = engine.mailbox().unwrap();
    let metadata = |engine: &Engine| {
        let ticket = engine
            .query(
                QueryRequest {
                    archive: archive_ref("localhost", "alice"),
                    request: Request::Metadata,
                    to: None,
                    from: None,
                    limits: Limits::default(),
                },
                &mailbox,
            )
            .unwrap();
        wait_for(&mailbox, ticket).unwrap().payload
    };
    assert_eq!(metadata(&engine).children().count(), 0, "empty archive");
    let ids: Vec<ArchiveId> = (0..3)
        .map(|i| {
            engine
                .archive(
                    archive_ref("localhost", "alice"),
                    "bob@localhost".into(),
                    message(&i.to_string()),
                    None,
                    Vec::new(),
                    &mailbox,
                )
                .unwrap()
                .id
        })
        .collect();
    let el = metadata(&engine);
    let id_of = |name: &str| {
        el.children()
            .find(|c| c.name() == name)
            .and_then(|c| c.attr("id"))
            .map(str::to_owned)
    };
    assert_eq!(id_of("start"), Some(ids[0].to_string()));
    assert_eq!(id_of("end"), Some(ids[2].to_string()));
}

#[test]
fn expiry_interleaves_with_writes_and_reports_what_it_removed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(&config(&dir));
    let mailbox = engine.mailbox().unwrap();
    let old: Vec<ArchiveId> = (0..5000)
        .map(|i| {
            alice_to_bob(&engine, &mailbox, &format!("old {i}"))
                .unwrap()
                .id
        })
        .collect();
    let cutoff = old.last().unwrap().micros();
    let ticket = engine
        .expire(
            Arc::from("localhost"),
            Arc::from("archive"),
            ExpiryRule::Age { end: cutoff },
            &mailbox,
        )
        .unwrap();
    // Rows queued while the expiry runs are kept: they are newer than the cutoff.
    for i in 0..200 {
        engine
            .archive(
                archive_ref("localhost", "alice"),
                "bob@localhost".into(),
                message(&format!("new {i:03}")),
                None,
                Vec::new(),
                &mailbox,
            )
            .unwrap();
    }
    let deleted = wait_removed(&engine, &mailbox, ticket, Duration::from_secs(30));
    assert_eq!(deleted, 5000);
    let left = ask(&engine, &mailbox, "alice", ALL).unwrap();
    let expected: Vec<String> = (0..200).map(|i| format!("new {i:03}")).collect();
    assert_eq!(bodies(&left), expected);
}

/// A store that paces removals gets, after each expiry batch, a pause at least as long as the
/// batch took before the next one starts.
#[test]
fn a_store_that_paces_removals_gets_a_pause_as_long_as_each_batch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let batch_time = Duration::from_millis(40);
    let store = Arc::new(Flaky {
        paced: true,
        expire_time: batch_time,
        ..Flaky::failing(&cfg, 0)
    });
    let engine = Engine::start(store.clone(), &cfg).unwrap();
    let mailbox = engine.mailbox().unwrap();
    let mut last = None;
    for i in 0..5000 {
        last = Some(
            alice_to_bob(&engine, &mailbox, &format!("old {i}"))
                .unwrap()
                .id,
        );
    }
    let ticket = engine
        .expire(
            Arc::from("localhost"),
            Arc::from("archive"),
            ExpiryRule::Age {
                end: last.unwrap().micros(),
            },
            &mailbox,
        )
        .unwrap();
    let deleted = wait_removed(&engine, &mailbox, ticket, Duration::from_secs(30));
    assert_eq!(deleted, 5000);
    let calls = store.expire_calls.lock().clone();
    assert!(
        calls.len() >= 3,
        "5000 rows in batches of 2000: {} batches",
        calls.len()
    );
    for pair in calls.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= 2 * batch_time,
            "a batch of {batch_time:?} then only {gap:?} to the next"
        );
    }
}

#[test]
fn query_errors_come_back_as_stanza_errors() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(&config(&dir));
    let mailbox = engine.mailbox().unwrap();
    let unknown = ask(
        &engine,
        &mailbox,
        "alice",
        "<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><after>0000000000000</after></set></query>",
    );
    assert_eq!(unknown.unwrap_err().condition, "item-not-found");
}

/// A store whose first `failures` appends fail, as a database that went away and came back.
/// With `lost_answers`, that many appends commit and then report a failure, as a commit whose
/// answer a server restart lost.
struct Flaky {
    inner: SqliteStore,
    failures: AtomicUsize,
    lost_answers: AtomicUsize,
    /// That many archive deletions fail, as with the database away.
    delete_failures: AtomicUsize,
    /// Whether it asks for pauses between removal batches, as a database server does.
    paced: bool,
    /// How long each expiry batch takes at least, and when each began.
    expire_time: Duration,
    expire_calls: parking_lot::Mutex<Vec<Instant>>,
}

impl Flaky {
    fn failing(cfg: &Config, failures: usize) -> Flaky {
        Flaky {
            inner: SqliteStore::open(path(cfg), &SqliteOptions::default()).unwrap(),
            failures: AtomicUsize::new(failures),
            lost_answers: AtomicUsize::new(0),
            delete_failures: AtomicUsize::new(0),
            paced: false,
            expire_time: Duration::ZERO,
            expire_calls: parking_lot::Mutex::new(Vec::new()),
        }
    }
}

impl Store for Flaky {
    fn append(&self, batch: &[NewItem]) -> Result<(), StoreError> {
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Database("disk I/O error".into()));
        }
        self.inner.append(batch)?;
        if self.lost_answers.load(Ordering::SeqCst) > 0 {
            self.lost_answers.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("connection closed".into()));
        }
        Ok(())
    }
    fn holds(&self, id: ArchiveId) -> Result<bool, StoreError> {
        self.inner.holds(id)
    }
    fn find(&self, archive: &ArchiveRef, query: &Query) -> Result<Page, StoreError> {
        self.inner.find(archive, query)
    }
    fn last_id(&self) -> Result<Option<ArchiveId>, StoreError> {
        self.inner.last_id()
    }
    fn expire(
        &self,
        host: &str,
        store: &str,
        rule: &ExpiryRule,
        limit: u32,
        cursor: &mut ExpiryCursor,
    ) -> Result<ExpiryBatch, StoreError> {
        self.expire_calls.lock().push(Instant::now());
        std::thread::sleep(self.expire_time);
        self.inner.expire(host, store, rule, limit, cursor)
    }
    fn paces_removals(&self) -> bool {
        self.paced
    }
    fn record_marks(&self, marks: &[Mark]) -> Result<(), StoreError> {
        self.inner.record_marks(marks)
    }
    fn import_checkpoint(
        &self,
        archive: &ArchiveRef,
        source: &str,
    ) -> Result<Option<ImportCheckpoint>, StoreError> {
        self.inner.import_checkpoint(archive, source)
    }
    fn import(
        &self,
        archive: &ArchiveRef,
        source: &str,
        rows: &[ImportRow],
        position: i64,
    ) -> Result<ImportBatch, StoreError> {
        self.inner.import(archive, source, rows, position)
    }
    fn stats(&self, host: &str, store: &str, user: Option<&str>) -> Result<Stats, StoreError> {
        self.inner.stats(host, store, user)
    }
    fn delete_archive(&self, archive: &ArchiveRef, limit: u32) -> Result<u64, StoreError> {
        if self.delete_failures.load(Ordering::SeqCst) > 0 {
            self.delete_failures.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        self.inner.delete_archive(archive, limit)
    }
    fn optimize(&self, vacuum: bool) -> Result<Vec<String>, StoreError> {
        self.inner.optimize(vacuum)
    }
    fn figures(&self, host: &str, store: &str) -> Result<Figures, StoreError> {
        self.inner.figures(host, store)
    }
}

#[test]
fn a_failing_database_releases_deliveries_and_retries_until_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let store = Arc::new(Flaky::failing(&cfg, 3));
    let engine = Engine::start(store.clone(), &cfg).unwrap();
    let mailbox = engine.mailbox().unwrap();
    let archived = engine
        .archive(
            archive_ref("localhost", "alice"),
            "bob@localhost".into(),
            message("kept"),
            None,
            Vec::new(),
            &mailbox,
        )
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut logs = Vec::new();
    let mut released = 0;
    while released < archived.release_at && Instant::now() < deadline {
        let d = engine.drain(&mailbox);
        released = d.released;
        logs.extend(d.completions.into_iter().filter_map(|c| match c {
            Completion::Log { message, .. } => Some(message),
            _ => None,
        }));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        released >= archived.release_at,
        "delivery must not wait for a failing database"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("disk I/O error") && l.contains("retrying")),
        "{logs:?}"
    );

    // Once a retry commits, a query finds the message (while the writer fails, queries get an
    // error at once: see the next test).
    assert!(engine.wait_committed(archived.release_at, Duration::from_secs(20)));
    let response = ask(&engine, &mailbox, "alice", ALL).unwrap();
    assert_eq!(bodies(&response), ["kept"]);
    let found: Vec<Item> = store
        .find(&archive_ref("localhost", "alice"), &Query::default())
        .unwrap()
        .items;
    assert_eq!(found.len(), 1);
}

#[test]
fn the_queue_bound_is_enforced_while_the_database_fails_and_lifts_when_it_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        max_queued_rows: 10,
        ..config(&dir)
    };
    let store = Arc::new(Flaky::failing(&cfg, usize::MAX));
    let engine = Engine::start(store.clone(), &cfg).unwrap();
    let mailbox = engine.mailbox().unwrap();
    let alice = || archive_ref("localhost", "alice");
    let mut accepted = 0;
    let mut refused = None;
    for i in 0..50 {
        match engine.archive(
            alice(),
            "bob@localhost".into(),
            message(&i.to_string()),
            None,
            Vec::new(),
            &mailbox,
        ) {
            Ok(_) => accepted += 1,
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    assert_eq!(accepted, 10, "exactly the bound is queued");
    assert!(refused.unwrap().contains("mam_rs_max_queued_rows"));
    // The database comes back: the queued rows are written and the bound lifts.
    store.failures.store(0, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while engine.queued() > 0 {
        engine.drain(&mailbox); // The loop's turns go on.
        assert!(Instant::now() < deadline, "the queue did not drain");
        std::thread::sleep(Duration::from_millis(10));
    }
    engine
        .archive(
            alice(),
            "bob@localhost".into(),
            message("after"),
            None,
            Vec::new(),
            &mailbox,
        )
        .unwrap();
    let page = store
        .find(
            &alice(),
            &Query {
                total: true,
                limit: Some(0),
                ..Query::default()
            },
        )
        .unwrap();
    assert!(page.total.unwrap() >= 10);
}

#[test]
fn while_the_database_fails_deliveries_go_at_once_and_the_log_has_one_line_each_way() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let database = cfg.database.describe();
    let store = Arc::new(Flaky::failing(&cfg, usize::MAX));
    let engine = Engine::start(store.clone(), &cfg).unwrap();
    let mailbox = engine.mailbox().unwrap();
    let mut logs: Vec<(Level, String)> = Vec::new();
    let drain = |logs: &mut Vec<(Level, String)>| {
        let d = engine.drain(&mailbox);
        logs.extend(d.completions.into_iter().filter_map(|c| match c {
            Completion::Log { level, message } => Some((level, message)),
            _ => None,
        }));
        d.released
    };
    let archive = |body: &str| {
        engine
            .archive(
                archive_ref("localhost", "alice"),
                "bob@localhost".into(),
                message(body),
                None,
                Vec::new(),
                &mailbox,
            )
            .unwrap()
    };

    // The first failed commit releases the first row.
    let first = archive("0");
    let deadline = Instant::now() + Duration::from_secs(10);
    while drain(&mut logs) < first.release_at {
        assert!(
            Instant::now() < deadline,
            "the first failure did not release the row"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // While the writer retries, each new row is released as it is handed out: nothing waits
    // for the database to come back.
    for i in 1..20 {
        let row = archive(&i.to_string());
        assert!(
            drain(&mut logs) >= row.release_at,
            "row {i} waits for a failing database"
        );
        std::thread::sleep(Duration::from_millis(40));
    }
    let attempts = usize::MAX - store.failures.load(Ordering::SeqCst);
    assert!(
        attempts >= 3,
        "only {attempts} attempts: too few to tell one line from many"
    );

    // The database comes back: everything queued is written, and rows wait for commits again.
    store.failures.store(0, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while engine.queued() > 0 {
        assert!(Instant::now() < deadline, "the queue did not drain");
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = archive("after");
    assert!(engine.wait_committed(after.release_at, Duration::from_secs(10)));
    drain(&mut logs);

    // One line when the fault starts, naming the file and the cause; one when it clears.
    let errors: Vec<&String> = logs
        .iter()
        .filter(|(level, _)| *level == Level::Error)
        .map(|(_, m)| m)
        .collect();
    assert_eq!(errors.len(), 1, "{logs:?}");
    assert!(
        errors[0].contains(&database) && errors[0].contains("disk I/O error"),
        "{}",
        errors[0]
    );
    let cleared: Vec<&String> = logs
        .iter()
        .filter(|(level, _)| *level == Level::Info)
        .map(|(_, m)| m)
        .collect();
    assert_eq!(cleared.len(), 1, "{logs:?}");
    assert!(
        cleared[0].contains(&database) && cleared[0].contains("works again"),
        "{}",
        cleared[0]
    );
    let page = store
        .find(
            &archive_ref("localhost", "alice"),
            &Query {
                total: true,
                limit: Some(0),
                ..Query::default()
            },
        )
        .unwrap();
    assert_eq!(page.total, Some(21), "every row, written once");
}

#[test]
fn the_writer_and_the_workers_measure_what_they_do() {
    use mam_rs_native::engine::metrics::{names, HostMetrics, Reporter, Value};

    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        test_query_delay: Duration::from_millis(50),
        ..config(&dir)
    };
    let store = Arc::new(Flaky::failing(&cfg, 2));
    let engine = Engine::start(store, &cfg).unwrap();
    let mailbox = engine.mailbox().unwrap();
    let host = Arc::new(HostMetrics::default());
    let mut reporter = Reporter::new(host.clone(), engine.writer_metrics().clone());
    reporter.report(Some(engine.queued()));

    let mut last = 0;
    for i in 0..10 {
        last = alice_to_bob(&engine, &mailbox, &i.to_string())
            .unwrap()
            .release_at;
    }
    assert!(engine.wait_committed(last, Duration::from_secs(20)));

    // A query's time runs from its arrival to its answer, worker time included.
    let ticket = engine
        .query(
            QueryRequest {
                archive: archive_ref("localhost", "alice"),
                request: Request::Metadata,
                to: None,
                from: None,
                limits: Limits::default(),
            },
            &mailbox,
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let elapsed = 'found: loop {
        for c in engine.drain(&mailbox).completions {
            if let Completion::Query {
                ticket: t,
                elapsed,
                result,
            } = c
            {
                assert_eq!(t, ticket);
                assert!(result.is_ok());
                break 'found elapsed;
            }
        }
        assert!(Instant::now() < deadline, "no answer");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(elapsed >= Duration::from_millis(50), "{elapsed:?}");

    // The figures are read by a worker, in the background.
    engine.refresh_figures(Arc::from("localhost"), Arc::from("archive"), &host);
    let deadline = Instant::now() + Duration::from_secs(20);
    while host.figures().is_none() {
        assert!(Instant::now() < deadline, "no figures");
        std::thread::sleep(Duration::from_millis(2));
    }
    let figures = host.figures().unwrap();
    assert_eq!((figures.archives, figures.messages), (1, 10));
    assert!(figures.bytes > 0);

    let updates = reporter.report(Some(engine.queued()));
    let find = |name: &str| updates.iter().find(|u| u.name == name).map(|u| &u.value);
    assert_eq!(find(names::FAILED_WRITES), Some(&Value::Add(2)));
    let Some(Value::Samples(batches)) = find(names::BATCH_SIZE) else {
        panic!("no batch sizes in {updates:?}");
    };
    let rows: f64 = batches.iter().map(|(v, n)| v * *n as f64).sum();
    assert_eq!(rows, 10.0, "every row committed once");
    let commits: u64 = batches.iter().map(|(_, n)| n).sum();
    let Some(Value::Samples(durations)) = find(names::COMMIT_SECONDS) else {
        panic!("no commit durations in {updates:?}");
    };
    assert_eq!(durations.iter().map(|(_, n)| n).sum::<u64>(), commits);
    assert_eq!(find(names::ARCHIVE_MESSAGES), Some(&Value::Set(10.0)));
    assert_eq!(find(names::ARCHIVE_USERS), Some(&Value::Set(1.0)));
}

#[test]
fn deleting_an_archive_removes_its_rows_after_those_queued_before() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let engine = Engine::open(&cfg).unwrap();
    let mailbox = engine.mailbox().unwrap();
    for body in ["one", "two"] {
        engine
            .archive(
                archive_ref("localhost", "alice"),
                "bob@localhost".into(),
                message(body),
                None,
                Vec::new(),
                &mailbox,
            )
            .unwrap();
    }
    engine
        .archive(
            archive_ref("localhost", "bob"),
            "alice@localhost".into(),
            message("kept"),
            None,
            Vec::new(),
            &mailbox,
        )
        .unwrap();
    let ticket = engine
        .delete_archive(archive_ref("localhost", "alice"), &mailbox)
        .unwrap();
    let removed = wait_removed(&engine, &mailbox, ticket, Duration::from_secs(10));
    assert_eq!(removed, 2);
    let alice = ask(
        &engine,
        &mailbox,
        "alice",
        "<query xmlns='urn:xmpp:mam:2'/>",
    )
    .unwrap();
    assert_eq!(alice.messages.len(), 0);
    let bob = ask(&engine, &mailbox, "bob", "<query xmlns='urn:xmpp:mam:2'/>").unwrap();
    assert_eq!(bob.messages.len(), 1);
}

#[test]
fn while_the_database_fails_queries_get_a_try_again_later_error_at_once_not_a_stale_page() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let store = Arc::new(Flaky::failing(&cfg, usize::MAX));
    let engine = Engine::start(store.clone(), &cfg).unwrap();
    let mailbox = engine.mailbox().unwrap();
    let archived = engine
        .archive(
            archive_ref("localhost", "alice"),
            "bob@localhost".into(),
            message("held"),
            None,
            Vec::new(),
            &mailbox,
        )
        .unwrap();
    // Delivery goes on: the writer is failing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.drain(&mailbox).released < archived.release_at {
        assert!(
            Instant::now() < deadline,
            "delivery waits for a failing database"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let err = ask_refused(&engine, &mailbox, Duration::from_secs(5));
    assert!(err.text.unwrap().contains("try again later"));

    // The database comes back: the held row is written, and the same query finds it.
    store.failures.store(0, Ordering::SeqCst);
    assert!(engine.wait_committed(archived.release_at, Duration::from_secs(20)));
    let page = ask(&engine, &mailbox, "alice", ALL).unwrap();
    assert_eq!(bodies(&page), ["held"]);
}

#[test]
fn a_commit_whose_answer_was_lost_is_not_written_twice_nor_retried_forever() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let store = Arc::new(Flaky::failing(&cfg, 0));
    store.lost_answers.store(1, Ordering::SeqCst);
    let engine = Engine::start(store.clone(), &cfg).unwrap();
    let mailbox = engine.mailbox().unwrap();
    let archived = engine
        .archive(
            archive_ref("localhost", "alice"),
            "bob@localhost".into(),
            message("once"),
            None,
            Vec::new(),
            &mailbox,
        )
        .unwrap();
    assert!(engine.wait_committed(archived.release_at, Duration::from_secs(20)));
    let page = ask(&engine, &mailbox, "alice", ALL).unwrap();
    assert_eq!(bodies(&page), ["once"]);
    assert_eq!(store.lost_answers.load(Ordering::SeqCst), 0);
}

#[test]
fn a_server_silent_at_start_archives_nothing_until_it_answers_then_everything() {
    use mam_rs_native::engine::EngineError;
    use mam_rs_native::store::deferred::Deferred;
    use std::sync::atomic::AtomicBool;

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let answers = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let (flag, counted, file) = (answers.clone(), attempts.clone(), path(&cfg).to_owned());
    let store = Deferred::new(
        "PostgreSQL prosody@db:5432/prosody: connection refused".into(),
        Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            if !flag.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("connection refused again".into()));
            }
            Ok(Arc::new(SqliteStore::open(&file, &SqliteOptions::default())?) as Arc<dyn Store>)
        }),
    );
    let engine = Engine::start(Arc::new(store), &cfg).unwrap();
    let mailbox = engine.mailbox().unwrap();
    assert!(engine.node().unwrap_err().contains("connection refused"));
    match alice_to_bob(&engine, &mailbox, "lost") {
        Err(EngineError::Unavailable(why)) => assert!(why.contains("connection refused"), "{why}"),
        other => panic!("archived while the server is silent: {other:?}"),
    }
    ask_refused(&engine, &mailbox, Duration::from_secs(2));
    // The connect thread keeps trying, with the writer's backoff.
    let deadline = Instant::now() + Duration::from_secs(10);
    while attempts.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no second attempt to connect");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(engine.node().is_err());

    answers.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(15);
    while engine.node().is_err() {
        assert!(Instant::now() < deadline, "the engine never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(engine.node(), Ok(0));
    let logs: Vec<(Level, String)> = engine
        .drain(&mailbox)
        .completions
        .into_iter()
        .filter_map(|c| match c {
            Completion::Log { level, message } => Some((level, message)),
            _ => None,
        })
        .collect();
    let answered: Vec<_> = logs
        .iter()
        .filter(|(level, m)| *level == Level::Info && m.contains("answered after"))
        .collect();
    assert_eq!(answered.len(), 1, "{logs:?}");
    // One line for the changed reason ("again"), not one per attempt.
    let still = logs
        .iter()
        .filter(|(_, m)| m.starts_with("Still cannot use"))
        .count();
    assert_eq!(still, 1, "{logs:?}");

    let kept = alice_to_bob(&engine, &mailbox, "kept").unwrap();
    assert!(engine.wait_committed(kept.release_at, Duration::from_secs(20)));
    assert_eq!(
        bodies(&ask(&engine, &mailbox, "alice", ALL).unwrap()),
        ["kept"]
    );
    engine.shutdown();
}

#[test]
fn an_accounts_deletion_is_retried_until_the_database_takes_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let store = Arc::new(Flaky::failing(&cfg, 0));
    let engine = Engine::start(store.clone(), &cfg).unwrap();
    let mailbox = engine.mailbox().unwrap();
    alice_to_bob(&engine, &mailbox, "one").unwrap();
    let last = alice_to_bob(&engine, &mailbox, "two").unwrap().release_at;
    assert!(engine.wait_committed(last, Duration::from_secs(20)));
    store.delete_failures.store(3, Ordering::SeqCst);
    let ticket = engine
        .delete_archive(archive_ref("localhost", "alice"), &mailbox)
        .unwrap();
    let mut logs: Vec<(Level, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let result = 'done: loop {
        for c in engine.drain(&mailbox).completions {
            match c {
                Completion::Expired { ticket: t, result } if t == ticket => break 'done result,
                Completion::Log { level, message } => logs.push((level, message)),
                _ => {}
            }
        }
        assert!(
            Instant::now() < deadline,
            "the deletion never finished: {logs:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(result, Ok(2));
    assert_eq!(store.delete_failures.load(Ordering::SeqCst), 0);
    let failed: Vec<_> = logs
        .iter()
        .filter(|(l, m)| {
            *l == Level::Error && m.contains("Could not delete the archive of alice@localhost")
        })
        .collect();
    assert_eq!(failed.len(), 1, "{logs:?}");
    assert!(
        logs.iter()
            .any(|(_, m)| m.contains("works again after 3 failed attempts")),
        "{logs:?}"
    );
    assert!(bodies(&ask(&engine, &mailbox, "alice", ALL).unwrap()).is_empty());
}
