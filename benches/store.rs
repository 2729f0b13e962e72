//! Benchmarks of the SQLite store: the writer, appending batches (one transaction and one fsync
//! each) beside the ceiling, SQLite's own batched insert rate (a plain rusqlite INSERT of the
//! same stanzas into a minimal table in one transaction, same pragmas); and one query page
//! against an archive of 1,000,000 rows.
//!
//! Run with `cargo bench --no-default-features --bench store`. The 1.2M-row fixture is built
//! once per run into a temporary file (about 10 s and 0.6 GB) and shared by the query benches.
//! This file measures; it does not test behaviour (that is in `src/store/sqlite/tests.rs`).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mam_rs_native::id::ArchiveId;
use mam_rs_native::store::sqlite::{SqliteOptions, SqliteStore};
use mam_rs_native::store::{ArchiveRef, NewItem, Query, Store};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// 2023-11-14, in microseconds; fixture rows are one millisecond apart from here.
const T0: i64 = 1_700_000_000_000_000;
/// Rows of the user whose archive is queried.
const BIG_ARCHIVE: u64 = 1_000_000;
/// Microseconds between the fixture's rows: romeo's 1M over five days, as the end-to-end
/// benchmark's archive (about 8,300 an hour).
const FIXTURE_STEP: i64 = 360_000;
/// Every sixth row belongs to one of these other users.
const OTHER_USERS: u64 = 99;
/// The queried user's rows are spread over this many contacts.
const CONTACTS: u64 = 50;

fn archive(user: &str) -> ArchiveRef {
    ArchiveRef {
        host: Arc::from("example.com"),
        user: user.to_owned(),
        store: Arc::from("archive"),
    }
}

fn contact(n: u64) -> String {
    format!("contact{n}@example.net")
}

/// A stored message of about 400 bytes.
fn stanza(id: ArchiveId, with: &str) -> String {
    format!(
        "<message xmlns='jabber:client' from='romeo@example.com/orchard' to='{with}' \
         type='chat' id='{id}'><body>But soft, what light through yonder window breaks? \
         It is the east, and Juliet is the sun. Arise, fair sun, and kill the envious \
         moon, who is already sick and pale with grief.</body>\
         <origin-id xmlns='urn:xmpp:sid:0' id='{id}'/></message>"
    )
}

fn row(archive: &ArchiveRef, id: ArchiveId, with: String) -> NewItem {
    NewItem {
        archive: archive.clone(),
        stanza: stanza(id, &with),
        id,
        with,
        quota: None,
    }
}

fn open(dir: &TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("bench.sqlite"), &SqliteOptions::default())
        .expect("open the bench database")
}

/// The ceiling for the writer: the same rows as plain INSERTs into a minimal table (an integer
/// key and the stanza) in one transaction, on a connection with the store's durability
/// settings (WAL, `synchronous = FULL`).
struct Ceiling {
    conn: rusqlite::Connection,
}

impl Ceiling {
    fn open(dir: &TempDir) -> Ceiling {
        let conn = rusqlite::Connection::open(dir.path().join("ceiling.sqlite")).expect("open");
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))
            .expect("WAL");
        conn.pragma_update(None, "synchronous", "FULL")
            .expect("FULL");
        conn.execute_batch("CREATE TABLE m (id INTEGER PRIMARY KEY, stanza TEXT NOT NULL)")
            .expect("create");
        Ceiling { conn }
    }

    fn append(&mut self, batch: &[NewItem]) {
        let tx = self.conn.transaction().expect("begin");
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO m (id, stanza) VALUES (?1, ?2)")
                .expect("prepare");
            for item in batch {
                insert
                    .execute((item.id.as_i64(), &item.stanza))
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
}

fn writer(c: &mut Criterion) {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let mut ceiling = Ceiling::open(&dir);
    let users: Vec<ArchiveRef> = (0..20).map(|u| archive(&format!("user{u}"))).collect();
    let mut next = 0i64;
    let mut batch_of = |size: usize| -> Vec<NewItem> {
        (0..size)
            .map(|i| {
                next += 1;
                let id = ArchiveId::first_at(T0 + next);
                row(&users[i % users.len()], id, contact(i as u64 % 7))
            })
            .collect()
    };

    let mut group = c.benchmark_group("writer");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    // 1 and 10: the batches an end-to-end run of 10 chatting clients commits (each client's
    // session waits for its message's commit); 100 and 1000: a backlog.
    for size in [1usize, 10, 100, 1000] {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(format!("mod_mam_rs append/{size}"), |b| {
            b.iter_batched(
                || batch_of(size),
                |batch| store.append(&batch).expect("append"),
                BatchSize::PerIteration,
            )
        });
        group.bench_function(
            format!("rusqlite insert, minimal table (ceiling)/{size}"),
            |b| {
                b.iter_batched(
                    || batch_of(size),
                    |batch| ceiling.append(&batch),
                    BatchSize::PerIteration,
                )
            },
        );
    }
    group.finish();
}

/// Row `k` of the fixture: every sixth belongs to another user, the rest to `romeo`.
fn fixture_row(k: u64, romeo: &ArchiveRef, others: &[ArchiveRef]) -> NewItem {
    let id = ArchiveId::first_at(T0 + k as i64 * FIXTURE_STEP);
    if k % 6 == 0 {
        let other = &others[(k / 6 % OTHER_USERS) as usize];
        row(other, id, "romeo@example.com".to_owned())
    } else {
        row(romeo, id, contact(k % CONTACTS))
    }
}

/// Builds the fixture with large transactions. Returns the id of a row of romeo's in the
/// middle of his archive.
fn build_fixture(store: &SqliteStore) -> ArchiveId {
    let started = Instant::now();
    let romeo = archive("romeo");
    let others: Vec<ArchiveRef> = (0..OTHER_USERS)
        .map(|u| archive(&format!("other{u}")))
        .collect();
    let rows = BIG_ARCHIVE * 6 / 5;
    let chunk = 50_000;
    for first in (0..rows).step_by(chunk) {
        let batch: Vec<NewItem> = (first..(first + chunk as u64).min(rows))
            .map(|k| fixture_row(k, &romeo, &others))
            .collect();
        store.append(&batch).expect("append fixture");
    }
    let size = std::fs::metadata(store.path()).map_or(0, |m| m.len());
    eprintln!(
        "fixture: {rows} rows ({BIG_ARCHIVE} in one archive) in {:.1} s, {} MB",
        started.elapsed().as_secs_f64(),
        size / 1_000_000
    );
    let middle = rows / 2 + 1;
    assert!(middle % 6 != 0, "the middle row must be romeo's");
    ArchiveId::first_at(T0 + middle as i64 * FIXTURE_STEP)
}

fn query(c: &mut Criterion) {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let middle = build_fixture(&store);
    let romeo = archive("romeo");
    let page = Query {
        limit: Some(51),
        total: true,
        ..Query::default()
    };
    let cases = [
        (
            "last_page",
            Query {
                reverse: true,
                ..page.clone()
            },
        ),
        (
            "last_page_no_total",
            Query {
                reverse: true,
                total: false,
                ..page.clone()
            },
        ),
        (
            "after_middle_id",
            Query {
                after: Some(middle.to_string()),
                ..page.clone()
            },
        ),
        (
            "with_last_page",
            Query {
                with: Some(contact(7)),
                reverse: true,
                ..page.clone()
            },
        ),
        (
            // The total cannot come from the archive's row count: it counts 500k index entries.
            "start_half_way",
            Query {
                start: Some(middle.micros()),
                ..page.clone()
            },
        ),
        (
            // The benchmark's window page: one hour, about 8,300 of the archive's rows, counted
            // for the total.
            "window_8k",
            Query {
                start: Some(middle.micros()),
                end: Some(middle.micros() + 3_600_000_000),
                ..page.clone()
            },
        ),
        (
            "window_8k_no_total",
            Query {
                start: Some(middle.micros()),
                end: Some(middle.micros() + 3_600_000_000),
                total: false,
                ..page.clone()
            },
        ),
        (
            "start_half_way_no_total",
            Query {
                start: Some(middle.micros()),
                total: false,
                ..page.clone()
            },
        ),
    ];

    let mut group = c.benchmark_group("find_1m");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, q) in &cases {
        let check = store.find(&romeo, q).expect("find");
        assert_eq!(check.items.len(), 51, "{name}");
        group.bench_function(*name, |b| {
            b.iter(|| store.find(&romeo, black_box(q)).expect("find"))
        });
    }
    group.finish();
}

/// `archive_compression`: the one-off cost of training a dictionary in the writer's transaction
/// (printed), then a page and an append with compressed rows beside the same with text rows.
fn compression(c: &mut Criterion) {
    let dir = TempDir::new().expect("temp dir");
    let romeo = archive("romeo");
    let rows = |from: u64, n: u64| -> Vec<NewItem> {
        (from..from + n)
            .map(|k| {
                let id = ArchiveId::first_at(T0 + k as i64 * 1000);
                row(&romeo, id, contact(k % CONTACTS))
            })
            .collect()
    };
    let open_with = |name: &str, compression: bool| {
        let options = SqliteOptions {
            compression,
            ..SqliteOptions::default()
        };
        SqliteStore::open(&dir.path().join(name), &options).expect("open")
    };
    // The first training: the append after the archive reaches 1,000 rows; and the first
    // append after compression is turned on for an archive of 20,000 text rows.
    let timed_train = |name: &str, text_rows: u64| {
        open_with(name, false)
            .append(&rows(0, text_rows))
            .expect("append");
        let store = open_with(name, true);
        let started = Instant::now();
        store.append(&rows(text_rows, 1)).expect("append");
        eprintln!(
            "compression: the append that trains on {text_rows} text rows took {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        store
    };
    timed_train("small.sqlite", 1000);
    let zstd = timed_train("zstd.sqlite", 20_000);
    zstd.append(&rows(20_001, 20_000)).expect("append");
    let text = open_with("text.sqlite", false);
    text.append(&rows(0, 40_001)).expect("append");

    let newest = Query {
        limit: Some(51),
        total: true,
        reverse: true,
        ..Query::default()
    };
    let mut group = c.benchmark_group("compression");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, store) in [("text", &text), ("zstd", &zstd)] {
        group.bench_function(format!("newest page of 51/{name}"), |b| {
            b.iter(|| store.find(&romeo, black_box(&newest)).expect("find"))
        });
    }
    let mut next = 1_000_000u64;
    for (name, store) in [("text", &text), ("zstd", &zstd)] {
        group.bench_function(format!("append/10/{name}"), |b| {
            b.iter_batched(
                || {
                    next += 10;
                    rows(next, 10)
                },
                |batch| store.append(&batch).expect("append"),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, writer, query, compression);
criterion_main!(benches);
