//! The shared store suite (`store/suite.rs`) on a real PostgreSQL server.
//!
//! Built with the `postgres-tests` feature and run by `make test-rust` through
//! `tools/with-postgres.sh`, which starts a throwaway server and sets `MAM_RS_TEST_POSTGRES`
//! (`host=… port=… user=…`). Each test gets its own database, named after its temporary
//! directory, so opening the same directory again opens the same store.

use super::*;
use crate::store::{
    ArchiveRef, ExpiryBatch, ExpiryCursor, ExpiryRule, Mark, NewItem, Query, Store, StoreError,
    Strategy,
};
use postgres::NoTls;
use std::sync::Arc;
use tempfile::TempDir;

type Backend = PgStore;

fn server() -> postgres::Config {
    let conninfo = std::env::var("MAM_RS_TEST_POSTGRES").expect(
        "MAM_RS_TEST_POSTGRES must name a PostgreSQL server (tools/with-postgres.sh sets it)",
    );
    conninfo.parse().expect("MAM_RS_TEST_POSTGRES")
}

fn open(dir: &TempDir) -> PgStore {
    open_with(dir, false)
}

/// [`open`], with `archive_compression` as given.
fn open_with(dir: &TempDir, compression: bool) -> PgStore {
    let config = server();
    let name = format!(
        "mam_rs_t_{:016x}",
        dir.path()
            .to_string_lossy()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            })
    );
    let mut admin = config.connect(NoTls).expect("connect to the test server");
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .unwrap()
        .is_some();
    if !exists {
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
    }
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(postgres::config::Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "localhost".into(),
    };
    let options = PgOptions {
        host,
        port: config.get_ports().first().copied(),
        database: name,
        user: config.get_user().unwrap_or("postgres").to_owned(),
        password: config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        pool_size: 4,
        connect_timeout: std::time::Duration::from_secs(5),
    };
    PgStore::open(&options, compression).expect("open")
}

/// A connection of our own to `store`'s database, to change it behind the store's back.
fn admin(store: &PgStore) -> postgres::Client {
    server()
        .dbname(&store.options.database)
        .connect(NoTls)
        .expect("connect to the test database")
}

include!("../suite.rs");

#[test]
fn a_second_process_sees_committed_rows_and_migrates_once() {
    let dir = TempDir::new().unwrap();
    let one = romeo_with_ten_rows(&dir);
    let two = open(&dir);
    assert_eq!(total(&two), Some(10));
    two.append(&[row(&romeo(), id(11), "x@y")]).unwrap();
    assert_eq!(total(&one), Some(11));
}

#[test]
fn version_2_fills_the_contact_totals_of_an_existing_database() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    // The database as version 1 left it: no contact totals, version 1's trigger functions, no
    // compression (version 3).
    let mut admin = admin(&store);
    admin
        .batch_execute(
            r#"
            DROP TABLE mam_rs_dictionaries;
            ALTER TABLE mam_rs_messages DROP COLUMN zstanza;
            DROP TABLE mam_rs_with_counts;
            DROP TABLE mam_rs_minute_counts;
            CREATE OR REPLACE FUNCTION mam_rs_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                UPDATE mam_rs_archives a SET item_count = a.item_count + n.c
                FROM (SELECT aid, count(*) AS c FROM new_rows GROUP BY aid) n WHERE a.aid = n.aid;
                RETURN NULL;
            END $$;
            CREATE OR REPLACE FUNCTION mam_rs_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                UPDATE mam_rs_archives a SET item_count = a.item_count - o.c
                FROM (SELECT aid, count(*) AS c FROM old_rows GROUP BY aid) o WHERE a.aid = o.aid;
                DELETE FROM mam_rs_legacy_ids WHERE id IN (SELECT id FROM old_rows);
                RETURN NULL;
            END $$;
            UPDATE mam_rs_schema SET version = 1;
            "#,
        )
        .unwrap();
    drop(store);
    assert_filled_contact_totals(&open(&dir));
    let version: i32 = admin
        .query_one("SELECT version FROM mam_rs_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, schema::SCHEMA_VERSION);
}

#[test]
fn minute_counts_follow_deletes_made_elsewhere_and_empty_minutes_go() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    // Romeo's 30 rows, 20 s apart: ten minutes of 2^26 µs, counted by minutes.
    let at = |n: i64| ArchiveId::first_at(T0 + n * 20 * SECOND);
    let batch: Vec<NewItem> = (0..30).map(|n| row(&romeo(), at(n), "a@b")).collect();
    store.append(&batch).unwrap();
    let mut admin = admin(&store);
    admin
        .execute(
            "DELETE FROM mam_rs_messages WHERE id <= $1",
            &[&at(14).as_i64()],
        )
        .unwrap();
    let total = |start, end| window_total(&store, Some(start), Some(end));
    assert_eq!(total(T0, T0 + 29 * 20 * SECOND), Some(15));
    assert_eq!(total(T0 + 5 * 20 * SECOND, T0 + 24 * 20 * SECOND), Some(10));
    let kept = admin
        .query_one(
            "SELECT coalesce(sum(item_count), 0)::BIGINT, count(*) FILTER (WHERE item_count = 0) \
             FROM mam_rs_minute_counts",
            &[],
        )
        .unwrap();
    assert_eq!((kept.get::<_, i64>(0), kept.get::<_, i64>(1)), (15, 0));
}

#[test]
fn processes_on_one_database_claim_different_writer_nodes_and_free_them_on_close() {
    let dir = TempDir::new().unwrap();
    let one = open(&dir);
    let two = open(&dir);
    let (a, b) = (one.claim_node().unwrap(), two.claim_node().unwrap());
    assert_ne!(a, b);
    assert_eq!(one.claim_node().unwrap(), a, "a store keeps its node");
    drop(one);
    // The lock goes with the session; the server notices the closed connection at once.
    let three = open(&dir);
    assert_eq!(three.claim_node().unwrap(), a);
}

#[test]
fn a_writer_that_lost_its_node_while_disconnected_refuses_to_write() {
    let dir = TempDir::new().unwrap();
    let one = open(&dir);
    let node = one.claim_node().unwrap();
    // The server drops the writer's session (as a restart would) and, before this store
    // reconnects, another process takes the node.
    let mut admin = admin(&one);
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND classid = $1::int::oid AND objid = $2::int::oid",
            &[&NODE_LOCK, &i32::from(node)],
        )
        .unwrap();
    let two = open(&dir);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(two.claim_node().unwrap(), node);
    // The first write finds the connection gone; the writer's retry reconnects, and refuses.
    assert!(one.append(&[row(&romeo(), id(1), "x@y")]).is_err());
    let err = one.append(&[row(&romeo(), id(1), "x@y")]).unwrap_err();
    assert!(
        err.to_string().contains("claimed by another process"),
        "{err}"
    );
    // Once the other process closes, this one takes its node back and writes.
    drop(two);
    std::thread::sleep(std::time::Duration::from_millis(100));
    one.append(&[row(&romeo(), id(1), "x@y")]).unwrap();
    assert_eq!(total(&one), Some(1));
}

#[test]
fn queries_go_on_after_the_server_closed_the_pooled_connections() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(romeo_with_ten_rows(&dir));
    // Several queries at once leave several connections in the pool.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for _ in 0..20 {
                    assert_eq!(total(&*store), Some(10));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // The server ends every session of the database, as a restart does.
    let mut admin = admin(&store);
    let ended: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ended >= 2, "the writer and at least one reader: {ended}");
    std::thread::sleep(std::time::Duration::from_millis(100));
    for _ in 0..3 {
        assert_eq!(total(&*store), Some(10));
    }
    assert!(store.holds(id(3)).unwrap());
}

#[test]
fn a_server_that_is_not_there_is_unavailable_and_one_that_refuses_is_an_open_error() {
    let dir = TempDir::new().unwrap();
    let options = open(&dir).options.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let silent = PgOptions {
        host: "127.0.0.1".into(),
        port: Some(port),
        password: Some("never shown".into()),
        ..options.clone()
    };
    let Err(err) = PgStore::open(&silent, false) else {
        panic!("nothing listens there")
    };
    let text = err.to_string();
    // The running module waits for it (store::open_or_defer).
    assert!(matches!(err, StoreError::Unavailable(_)), "{text}");
    assert!(text.contains(&silent.describe(ENGINE)), "{text}");
    assert!(!text.contains("never shown"), "{text}");
    let refused = PgOptions {
        database: "mam_rs_no_such_database".into(),
        ..options
    };
    let Err(err) = PgStore::open(&refused, false) else {
        panic!("no such database")
    };
    let text = err.to_string();
    assert!(matches!(err, StoreError::Open(_)), "{text}");
    assert!(text.contains("mam_rs_no_such_database"), "{text}");
}

/// (rows stored as text, rows compressed)
fn kinds(store: &PgStore) -> (i64, i64) {
    let mut guard = store.writer.lock();
    let client = &mut guard.as_mut().unwrap().client;
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE zstanza IS NULL), \
             count(*) FILTER (WHERE zstanza IS NOT NULL AND stanza = '') \
             FROM mam_rs_messages",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn compression_trains_a_dictionary_and_every_row_reads_back() {
    compression_round_trip(|dir| open_with(dir, true), kinds);
}

#[test]
fn compression_takes_the_dictionary_another_process_trained() {
    compression_shares_the_first_dictionary(
        |dir| open_with(dir, true),
        kinds,
        |store| {
            let mut guard = store.writer.lock();
            let client = &mut guard.as_mut().unwrap().client;
            client
                .query(
                    "SELECT dict_id FROM mam_rs_dictionaries ORDER BY dict_id",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| i64::from(r.get::<_, i16>(0)))
                .collect()
        },
    );
}

#[test]
fn compression_keeps_a_dictionary_a_failed_batch_trained() {
    compression_keeps_a_dictionary_trained_by_a_failed_batch(|dir| open_with(dir, true));
}
