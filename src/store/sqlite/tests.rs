//! Tests of the SQLite store: the shared store suite (`store/suite.rs`), plus what is SQLite's
//! own: schema versions, options, plans, counts kept by triggers, and compression.
//! Each test uses its own temporary database file.

use super::*;
use crate::store::{
    ArchiveRef, ExpiryBatch, ExpiryCursor, ExpiryRule, Mark, NewItem, Query, Store, StoreError,
    Strategy,
};
use std::sync::Arc;
use tempfile::TempDir;

type Backend = SqliteStore;

fn db_path(dir: &TempDir) -> PathBuf {
    dir.path().join("mam.sqlite")
}

fn open(dir: &TempDir) -> SqliteStore {
    SqliteStore::open(&db_path(dir), &SqliteOptions::default()).expect("open")
}

include!("../suite.rs");

#[test]
fn reopening_keeps_rows_and_schema_version() {
    let dir = TempDir::new().unwrap();
    drop(romeo_with_ten_rows(&dir));
    let store = open(&dir);
    let page = find(
        &store,
        Query {
            total: true,
            ..Query::default()
        },
    );
    assert_eq!(page.items.len(), 10);
    assert_eq!(page.total, Some(10));
    store
        .append(&[row(&romeo(), id(11), "juliet@capulet.lit")])
        .unwrap();
    drop(store);

    let conn = Connection::open(db_path(&dir)).unwrap();
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let archives: i64 = conn
        .query_row("SELECT count(*) FROM archives", [], |r| r.get(0))
        .unwrap();
    assert_eq!(archives, 1);
}

#[test]
fn a_newer_schema_is_refused_untouched() {
    let dir = TempDir::new().unwrap();
    drop(romeo_with_ten_rows(&dir));
    let newer = SCHEMA_VERSION + 1;
    Connection::open(db_path(&dir))
        .unwrap()
        .pragma_update(None, "user_version", newer)
        .unwrap();

    match SqliteStore::open(&db_path(&dir), &SqliteOptions::default()) {
        Err(StoreError::Open(msg)) => assert!(msg.contains("newer"), "{msg}"),
        other => panic!("expected an open error, got {other:?}"),
    }
    let version: u32 = Connection::open(db_path(&dir))
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, newer);
}

#[test]
fn bad_options_and_paths_are_open_errors() {
    let dir = TempDir::new().unwrap();
    let zero = SqliteOptions {
        pool_size: 0,
        ..SqliteOptions::default()
    };
    assert!(matches!(
        SqliteStore::open(&db_path(&dir), &zero),
        Err(StoreError::Open(_))
    ));
    let missing_dir = dir.path().join("no/such/dir/mam.sqlite");
    assert!(matches!(
        SqliteStore::open(&missing_dir, &SqliteOptions::default()),
        Err(StoreError::Open(_))
    ));
}

#[test]
fn item_counts_follow_deletes_made_elsewhere() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    let conn = Connection::open(db_path(&dir)).unwrap();
    conn.execute("DELETE FROM messages WHERE id <= ?1", [id(4).as_i64()])
        .unwrap();
    let page = find(
        &store,
        Query {
            total: true,
            ..Query::default()
        },
    );
    assert_eq!(numbers(&page), (5..=10).collect::<Vec<_>>());
    assert_eq!(page.total, Some(6));
}

#[test]
fn version_4_fills_the_contact_totals_of_an_existing_archive() {
    let dir = TempDir::new().unwrap();
    drop(romeo_with_ten_rows(&dir));
    // The file as version 3 left it: no contact totals.
    let conn = Connection::open(db_path(&dir)).unwrap();
    conn.execute_batch(
        "DROP TRIGGER messages_with_count_insert; DROP TRIGGER messages_with_count_delete; \
         DROP TRIGGER messages_with_count_move; DROP TABLE with_counts; \
         DROP TRIGGER messages_minute_count_insert; DROP TRIGGER messages_minute_count_delete; \
         DROP TRIGGER messages_minute_count_move; DROP TABLE minute_counts; \
         PRAGMA user_version = 3;",
    )
    .unwrap();
    drop(conn);
    // And the triggers are back.
    assert_filled_contact_totals(&open(&dir));
}

#[test]
fn with_counts_follow_deletes_made_elsewhere() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    let conn = Connection::open(db_path(&dir)).unwrap();
    conn.execute("DELETE FROM messages WHERE id <= ?1", [id(4).as_i64()])
        .unwrap();
    let page = find(
        &store,
        Query {
            with: Some("juliet@capulet.lit".to_owned()),
            total: true,
            ..Query::default()
        },
    );
    assert_eq!(numbers(&page), vec![5, 7, 8, 10]);
    assert_eq!(page.total, Some(4));
}

/// The id of row `n` of [`rows_over_ten_minutes`].
fn spread(n: i64) -> ArchiveId {
    ArchiveId::first_at(T0 + n * 20 * SECOND)
}

/// Romeo's 30 rows, 20 s apart: over ten minutes of 2^26 µs, so that windows over them are
/// counted by minutes.
fn rows_over_ten_minutes(dir: &TempDir) -> SqliteStore {
    let store = open(dir);
    let batch: Vec<NewItem> = (0..30).map(|n| row(&romeo(), spread(n), "a@b")).collect();
    store.append(&batch).unwrap();
    store
}

#[test]
fn version_5_fills_the_minute_counts_of_an_existing_archive() {
    let dir = TempDir::new().unwrap();
    drop(rows_over_ten_minutes(&dir));
    let kept = |conn: &Connection| -> Vec<(i64, i64)> {
        let mut stmt = conn
            .prepare("SELECT minute, item_count FROM minute_counts ORDER BY minute")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let conn = Connection::open(db_path(&dir)).unwrap();
    let before = kept(&conn);
    assert!(before.len() >= 9, "{before:?}");
    assert_eq!(before.iter().map(|(_, n)| n).sum::<i64>(), 30);
    // The file as version 4 left it: no minute counts.
    conn.execute_batch(
        "DROP TRIGGER messages_minute_count_insert; DROP TRIGGER messages_minute_count_delete; \
         DROP TRIGGER messages_minute_count_move; DROP TABLE minute_counts; \
         PRAGMA user_version = 4;",
    )
    .unwrap();
    drop(conn);
    let store = open(&dir);
    let conn = Connection::open(db_path(&dir)).unwrap();
    assert_eq!(kept(&conn), before);
    // And the triggers are back: a window's total follows new rows.
    store.append(&[row(&romeo(), spread(31), "a@b")]).unwrap();
    assert_eq!(
        window_total(&store, Some(T0), Some(T0 + 40 * 20 * SECOND)),
        Some(31)
    );
}

#[test]
fn minute_counts_follow_deletes_made_elsewhere_and_empty_minutes_go() {
    let dir = TempDir::new().unwrap();
    let store = rows_over_ten_minutes(&dir);
    let conn = Connection::open(db_path(&dir)).unwrap();
    conn.execute("DELETE FROM messages WHERE id <= ?1", [spread(14).as_i64()])
        .unwrap();
    assert_eq!(
        window_total(&store, Some(T0), Some(T0 + 29 * 20 * SECOND)),
        Some(15)
    );
    let (start, end) = (T0 + 5 * 20 * SECOND, T0 + 24 * 20 * SECOND);
    assert_eq!(window_total(&store, Some(start), Some(end)), Some(10));
    let (rows, empty): (i64, i64) = conn
        .query_row(
            "SELECT coalesce(sum(item_count), 0), count(*) FILTER (WHERE item_count = 0) \
             FROM minute_counts",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((rows, empty), (15, 0));
}

/// Runs `EXPLAIN QUERY PLAN` and returns the plan's detail lines.
fn plan(conn: &Connection, sql: &str, params: &[i64]) -> Vec<String> {
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    stmt.query_map(rusqlite::params_from_iter(params), |row| {
        row.get::<_, String>(3)
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[test]
fn queries_walk_the_archive_indexes() {
    let dir = TempDir::new().unwrap();
    drop(romeo_with_ten_rows(&dir));
    let conn = Connection::open(db_path(&dir)).unwrap();
    let everything = IdRange::from_times(None, None);
    let bounded = IdRange::from_times(Some(T0), Some(T0 + 5 * SECOND));
    let ids = [id(2).as_i64(), id(5).as_i64()];
    let cases = [
        (
            Filter {
                aid: 1,
                with_id: None,
                ids: None,
            },
            "messages_by_archive (aid=? AND rowid>? AND rowid<?)",
        ),
        (
            Filter {
                aid: 1,
                with_id: Some(1),
                ids: None,
            },
            "messages_by_with (aid=? AND with_id=? AND rowid>? AND rowid<?)",
        ),
    ];
    for (filter, index) in &cases {
        for range in [everything, bounded] {
            for reverse in [false, true] {
                let (sql, params) = page_query(filter, range, Some(51), reverse);
                let lines = plan(&conn, &sql, &params);
                assert!(lines.iter().any(|l| l.contains(index)), "{sql}: {lines:?}");
                assert!(
                    !lines.iter().any(|l| l.contains("TEMP B-TREE")),
                    "{sql}: {lines:?}"
                );
                assert!(
                    !lines.iter().any(|l| l.starts_with("SCAN")),
                    "{sql}: {lines:?}"
                );
            }
            let (sql, params) = count_query(filter, range);
            let lines = plan(&conn, &sql, &params);
            assert!(lines.iter().any(|l| l.contains(index)), "{sql}: {lines:?}");
        }
    }
    // A window of whole minutes reads their kept counts and the archive's index at its ends.
    let minutes = MinuteSplit::of(IdRange::from_times(Some(T0), Some(T0 + 3600 * SECOND))).unwrap();
    let lines = plan(&conn, COUNT_BY_MINUTES, &minutes.params(1));
    assert!(
        lines.iter().any(
            |l| l.contains("minute_counts USING PRIMARY KEY (aid=? AND minute>? AND minute<?)")
        ),
        "{lines:?}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("messages_by_archive (aid=? AND rowid>? AND rowid<?)"))
            .count(),
        2,
        "{lines:?}"
    );
    // An ids list is looked up by rowid, not by walking the whole archive.
    for with_id in [None, Some(1)] {
        let filter = Filter {
            aid: 1,
            with_id,
            ids: Some(&ids),
        };
        for reverse in [false, true] {
            let (sql, params) = page_query(&filter, bounded, None, reverse);
            let lines = plan(&conn, &sql, &params);
            assert!(
                lines[0].contains("USING INTEGER PRIMARY KEY (rowid=?)"),
                "{sql}: {lines:?}"
            );
            assert!(
                !lines.iter().any(|l| l.contains("TEMP B-TREE")),
                "{sql}: {lines:?}"
            );
        }
        let (sql, params) = count_query(&filter, everything);
        let lines = plan(&conn, &sql, &params);
        assert!(
            lines[0].contains("USING INTEGER PRIMARY KEY (rowid=?)"),
            "{sql}: {lines:?}"
        );
    }
}

#[test]
fn compression_trains_a_dictionary_and_every_row_reads_back() {
    compression_round_trip(
        |dir| {
            let options = SqliteOptions {
                compression: true,
                ..SqliteOptions::default()
            };
            SqliteStore::open(&db_path(dir), &options).unwrap()
        },
        |store| {
            store
                .writer
                .lock()
                .query_row(
                    "SELECT sum(typeof(stanza) = 'text'), sum(typeof(stanza) = 'blob') \
                     FROM messages",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap()
        },
    );
}

#[test]
fn compression_keeps_a_dictionary_a_failed_batch_trained() {
    compression_keeps_a_dictionary_trained_by_a_failed_batch(|dir| {
        let options = SqliteOptions {
            compression: true,
            ..SqliteOptions::default()
        };
        SqliteStore::open(&db_path(dir), &options).unwrap()
    });
}

#[test]
fn every_connection_commits_as_synchronous_says() {
    for (synchronous, level) in [
        (Synchronous::Off, 0),
        (Synchronous::Normal, 1),
        (Synchronous::Full, 2),
        (Synchronous::Extra, 3),
    ] {
        let dir = TempDir::new().unwrap();
        let options = SqliteOptions {
            synchronous,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open(&db_path(&dir), &options).unwrap();
        let of = |conn: &Connection| -> i64 {
            conn.pragma_query_value(None, "synchronous", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(of(&store.writer.lock()), level, "{synchronous:?}: writer");
        assert_eq!(
            of(&store.reader().unwrap()),
            level,
            "{synchronous:?}: reader"
        );
        // Whatever it is, the journal stays WAL: queries read beside the writer.
        let mode: String = store
            .writer
            .lock()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        store
            .append(&[row(&romeo(), id(1), "juliet@capulet.lit")])
            .unwrap();
        drop(store);
        assert_eq!(find(&open(&dir), Query::default()).items.len(), 1);
    }
}
