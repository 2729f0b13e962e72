//! The shared store suite (`store/suite.rs`) on a real MySQL or MariaDB server, and what is
//! particular to it: exact names, big batches, connections that go away.
//!
//! Built with the `mysql-tests` feature and run by `make test-rust` through
//! `tools/with-mariadb.sh`, which starts a throwaway server and sets `MAM_RS_TEST_MYSQL`, a
//! URL: `mysql://user:password@127.0.0.1:port/?socket=/path/to/socket` (the account may create
//! databases; `socket` is optional and, when given, also tests connecting through it). Each
//! test gets its own database, named after its temporary directory, so opening the same
//! directory again opens the same store, and tests run in parallel.

use super::*;
use crate::store::{
    ArchiveRef, ExpiryBatch, ExpiryCursor, ExpiryRule, Mark, NewItem, Query, Store, StoreError,
    Strategy,
};
use std::sync::Arc;
use tempfile::TempDir;

type Backend = MysqlStore;

fn server() -> mysql::Opts {
    let url = std::env::var("MAM_RS_TEST_MYSQL").expect(
        "MAM_RS_TEST_MYSQL must name a MySQL/MariaDB server (tools/with-mariadb.sh sets it)",
    );
    mysql::Opts::from_url(&url).expect("MAM_RS_TEST_MYSQL")
}

/// An administrative connection, to no database in particular.
fn admin() -> Conn {
    let server = server();
    Conn::new(
        OptsBuilder::new()
            .ip_or_hostname(Some(server.get_ip_or_hostname()))
            .tcp_port(server.get_tcp_port())
            .user(server.get_user())
            .pass(server.get_pass())
            .prefer_socket(false),
    )
    .expect("connect to the test server")
}

/// The database of `dir`, created when new.
fn database(dir: &TempDir) -> String {
    let name = format!(
        "mam_rs_t_{:016x}",
        dir.path()
            .to_string_lossy()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            })
    );
    admin()
        .query_drop(format!(
            "CREATE DATABASE IF NOT EXISTS {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .unwrap();
    name
}

fn options(dir: &TempDir) -> MysqlOptions {
    let server = server();
    MysqlOptions {
        host: server.get_ip_or_hostname().into_owned(),
        port: Some(server.get_tcp_port()),
        database: database(dir),
        user: server.get_user().unwrap_or("root").to_owned(),
        password: server.get_pass().map(str::to_owned),
        pool_size: 4,
        connect_timeout: std::time::Duration::from_secs(5),
    }
}

fn open(dir: &TempDir) -> MysqlStore {
    open_with(dir, false)
}

/// [`open`], with `archive_compression` as given.
fn open_with(dir: &TempDir, compression: bool) -> MysqlStore {
    MysqlStore::open(&options(dir), compression).expect("open")
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
fn many_processes_opening_at_once_migrate_once() {
    let dir = TempDir::new().unwrap();
    let options = options(&dir);
    let opened: Vec<_> = (0..6)
        .map(|_| {
            let options = options.clone();
            std::thread::spawn(move || MysqlStore::open(&options, false).map(|_| ()))
        })
        .collect();
    for one in opened {
        one.join().unwrap().expect("open");
    }
    let mut conn = Conn::new(options.opts()).unwrap();
    let versions: Vec<i32> = conn.query("SELECT version FROM mam_rs_schema").unwrap();
    assert_eq!(versions, vec![SCHEMA_VERSION]);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = TempDir::new().unwrap();
    let options = options(&dir);
    drop(MysqlStore::open(&options, false).unwrap());
    let mut conn = Conn::new(options.opts()).unwrap();
    conn.query_drop("UPDATE mam_rs_schema SET version = version + 1")
        .unwrap();
    let err = MysqlStore::open(&options, false).unwrap_err();
    assert!(
        matches!(&err, StoreError::Open(m) if m.contains("newer")),
        "{err:?}"
    );
}

#[test]
fn names_are_exact_and_any_unicode_comes_back() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    // Trailing spaces and case differ in byte comparison only (utf8mb4_bin VARCHARs would pad).
    let plain = archive("example.com", "romeo", "archive");
    let spaced = archive("example.com", "romeo ", "archive");
    let upper = archive("example.com", "Romeo", "archive");
    let stanza = "<message xmlns='jabber:client'><body>🦀 𝄞 \u{10FFFF} ’quote’ \\' ; -- \
                  é\u{301} 中文</body></message>";
    store
        .append(&[
            NewItem {
                stanza: stanza.to_owned(),
                ..row(&plain, id(1), "juliet@capulet.lit")
            },
            row(&spaced, id(2), "juliet@capulet.lit "),
            row(&upper, id(3), "Juliet@capulet.lit"),
        ])
        .unwrap();
    let all = Query {
        total: true,
        ..Query::default()
    };
    let page = store.find(&plain, &all).unwrap();
    assert_eq!(numbers(&page), vec![1]);
    assert_eq!(page.items[0].stanza, stanza);
    assert_eq!(numbers(&store.find(&spaced, &all).unwrap()), vec![2]);
    assert_eq!(numbers(&store.find(&upper, &all).unwrap()), vec![3]);
    let with = |jid: &str| Query {
        with: Some(jid.to_owned()),
        total: true,
        ..Query::default()
    };
    assert_eq!(
        store
            .find(&spaced, &with("juliet@capulet.lit"))
            .unwrap()
            .total,
        Some(0)
    );
    assert_eq!(
        store
            .find(&spaced, &with("juliet@capulet.lit "))
            .unwrap()
            .total,
        Some(1)
    );

    // Stock ids are exact too.
    let mut one = stock(1);
    one.key = "key".into();
    let mut two = stock(2);
    two.key = "key ".into();
    let done = store.import(&plain, "sql", &[one, two], 2).unwrap();
    assert_eq!((done.imported, done.already), (2, 0));
    let after = store
        .find(
            &plain,
            &Query {
                after: Some("key".into()),
                ..Query::default()
            },
        )
        .unwrap();
    assert_eq!(keys(&after), ["key "]);
}

#[test]
fn a_batch_larger_than_a_packet_is_split() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let max_packet: usize = Conn::new(options(&dir).opts())
        .unwrap()
        .query_first("SELECT @@max_allowed_packet")
        .unwrap()
        .unwrap();
    // Rows of 1 MiB, 3 more than fit one packet: several INSERTs, one transaction.
    let body = "x".repeat(1 << 20);
    let rows = max_packet.min(MAX_PAYLOAD) / (1 << 20) + 3;
    let batch: Vec<NewItem> = (1..=rows as i64)
        .map(|n| NewItem {
            stanza: format!("<message xmlns='jabber:client'><body>{body}</body></message>"),
            ..row(&romeo(), id(n), "juliet@capulet.lit")
        })
        .collect();
    store.append(&batch).unwrap();
    let page = find(
        &store,
        Query {
            total: true,
            ..Query::default()
        },
    );
    assert_eq!(page.total, Some(rows as u64));
    assert!(page.items.iter().all(|i| i.stanza == batch[0].stanza));
}

/// Ends every connection to `dir`'s database, as a server restart would.
fn kill_connections(database: &str) -> usize {
    let mut admin = admin();
    let ids: Vec<u64> = admin
        .exec(
            "SELECT id FROM information_schema.processlist WHERE db = ?",
            (database,),
        )
        .unwrap();
    for id in &ids {
        // One may have ended meanwhile.
        let _ = admin.query_drop(format!("KILL CONNECTION {id}"));
    }
    ids.len()
}

#[test]
fn connections_that_went_away_are_replaced() {
    let dir = TempDir::new().unwrap();
    let options = options(&dir);
    let store = MysqlStore::open(&options, false).unwrap();
    store.append(&[row(&romeo(), id(1), "a@b")]).unwrap();
    assert_eq!(total(&store), Some(1));

    assert!(
        kill_connections(&options.database) >= 2,
        "writer and a reader"
    );
    // Not one failed write or query.
    store.append(&[row(&romeo(), id(2), "a@b")]).unwrap();
    assert_eq!(total(&store), Some(2));
    store
        .record_marks(&[mark(&romeo(), "phone", 2, 2)])
        .unwrap();

    kill_connections(&options.database);
    assert_eq!(total(&store), Some(2));
    assert_eq!(store.last_id().unwrap(), Some(id(2)));
    store.append(&[row(&romeo(), id(3), "a@b")]).unwrap();
    assert_eq!(total(&store), Some(3));

    // Several queries at once leave several connections in the pool; none is checked before
    // use, and every one that went away is replaced.
    let store = Arc::new(store);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for _ in 0..20 {
                    assert_eq!(total(&*store), Some(3));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    kill_connections(&options.database);
    for _ in 0..3 {
        assert_eq!(total(&*store), Some(3));
    }
    assert!(store.holds(id(3)).unwrap());
}

#[test]
fn a_unix_socket_is_a_host_starting_with_a_slash() {
    let Some(socket) = server().get_socket().map(str::to_owned) else {
        eprintln!("MAM_RS_TEST_MYSQL names no socket: skipped");
        return;
    };
    let dir = TempDir::new().unwrap();
    let tcp = romeo_with_ten_rows(&dir);
    let options = MysqlOptions {
        host: socket,
        port: None,
        ..options(&dir)
    };
    let local = MysqlStore::open(&options, false).unwrap();
    assert_eq!(total(&local), Some(10));
    local.append(&[row(&romeo(), id(11), "a@b")]).unwrap();
    assert_eq!(total(&tcp), Some(11));
}

#[test]
fn a_server_that_is_not_there_is_unavailable() {
    let dir = TempDir::new().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let options = MysqlOptions {
        host: "127.0.0.1".into(),
        port: Some(port),
        password: Some("never shown".into()),
        ..options(&dir)
    };
    let err = MysqlStore::open(&options, false).unwrap_err();
    let text = err.to_string();
    // Not a refusal: the running module waits for it (store::open_or_defer).
    assert!(matches!(err, StoreError::Unavailable(_)), "{text}");
    assert!(text.contains(&options.describe(ENGINE)), "{text}");
    assert!(!text.contains("never shown"), "{text}");
}

#[test]
fn an_archive_or_jid_another_process_created_is_found_by_the_upsert() {
    // The writer looks a name up first; a row committed after its snapshot is found by the
    // INSERT instead, whose LAST_INSERT_ID(…) names the existing row.
    let dir = TempDir::new().unwrap();
    let options = options(&dir);
    let store = MysqlStore::open(&options, false).unwrap();
    store.append(&[row(&romeo(), id(1), "a@b")]).unwrap();
    let mut conn = Conn::new(options.opts()).unwrap();
    let name = ("example.com", "romeo", "archive");
    let aid: i64 = first(&mut conn, SELECT_ARCHIVE, name).unwrap().unwrap();
    assert_eq!(insert_id(&mut conn, UPSERT_ARCHIVE, name).unwrap(), aid);
    let jid: i64 = first(&mut conn, SELECT_JID, ("a@b",)).unwrap().unwrap();
    assert_eq!(insert_id(&mut conn, UPSERT_JID, ("a@b",)).unwrap(), jid);
    let new = insert_id(&mut conn, UPSERT_JID, ("c@d",)).unwrap();
    assert!(new > jid, "{new} {jid}");
}

#[test]
fn figures_and_optimize_read_the_server() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    store
        .append(&[row(
            &archive("other.example", "x", "archive"),
            id(20),
            "a@b",
        )])
        .unwrap();
    let figures = store.figures("example.com", "archive").unwrap();
    assert_eq!((figures.archives, figures.messages), (1, 10));
    assert!(figures.bytes > 0, "{figures:?}");
    assert_eq!(store.figures("example.com", "muc_log").unwrap().messages, 0);
    let report = store.optimize(false).unwrap();
    assert_eq!(report[0], "indexes: all present");
    assert!(
        report.iter().any(|l| l.starts_with("ANALYZE")),
        "{report:?}"
    );

    // An index dropped by hand is reported.
    let mut conn = Conn::new(options(&dir).opts()).unwrap();
    conn.query_drop("ALTER TABLE mam_rs_messages DROP INDEX mam_rs_messages_by_with")
        .unwrap();
    let err = store.optimize(false).unwrap_err();
    assert!(err.to_string().contains("mam_rs_messages_by_with"), "{err}");
}

#[test]
fn processes_on_one_database_claim_different_writer_nodes_and_free_them_on_close() {
    let dir = TempDir::new().unwrap();
    let one = open(&dir);
    let two = open(&dir);
    let (a, b) = (one.claim_node().unwrap(), two.claim_node().unwrap());
    assert_ne!(a, b);
    assert_eq!(one.claim_node().unwrap(), a, "a store keeps its node");
    // Another database on the same server has nodes of its own.
    let elsewhere = TempDir::new().unwrap();
    assert_eq!(open(&elsewhere).claim_node().unwrap(), 0);
    drop(one);
    // The lock goes with the session, which ends when the connection closes.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let three = open(&dir);
    assert_eq!(three.claim_node().unwrap(), a);
}

#[test]
fn a_writer_that_lost_its_node_while_disconnected_refuses_to_write() {
    let dir = TempDir::new().unwrap();
    let options = options(&dir);
    let one = MysqlStore::open(&options, false).unwrap();
    let node = one.claim_node().unwrap();
    // The server drops the writer's session (as a restart would) and, before this store
    // reconnects, another process takes the node.
    let mut admin = Conn::new(options.opts()).unwrap();
    let holder: Option<u64> = admin
        .exec_first(
            "SELECT IS_USED_LOCK(CONCAT('mam_rs:', MD5(DATABASE()), ':node:', ?))",
            (node,),
        )
        .unwrap()
        .flatten();
    admin
        .query_drop(format!("KILL CONNECTION {}", holder.expect("held")))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let two = MysqlStore::open(&options, false).unwrap();
    assert_eq!(two.claim_node().unwrap(), node);
    // The write finds the connection gone, reconnects, and refuses.
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
fn quotas_within_and_across_batches_match_the_sqlite_store() {
    // This store counts a batch's rows itself instead of reading the count before each row:
    // the result must be the reference's, row for row.
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let reference = crate::store::sqlite::SqliteStore::open(
        &dir.path().join("reference.sqlite"),
        &crate::store::sqlite::SqliteOptions::default(),
    )
    .unwrap();
    let juliet = archive("example.com", "juliet", "archive");
    let mut n = 0;
    // Rows per batch, romeo's and juliet's quotas, and how many of romeo's first rows come
    // without one (as when the limit is set while rows are queued).
    for (size, romeo_quota, juliet_quota, unlimited) in [
        (8, Some(10), None, 0),
        (5, Some(10), Some(3), 0),
        (30, Some(10), Some(3), 0),
        (1, Some(10), Some(3), 0),
        (12, None, Some(4), 0),
        (7, Some(5), Some(4), 0),
        (20, Some(8), None, 6),
    ] {
        let batch: Vec<NewItem> = (0..size)
            .map(|i| {
                n += 1;
                let (archive, quota) = if i % 3 == 2 {
                    (&juliet, juliet_quota)
                } else if i < unlimited {
                    (&romeo(), None)
                } else {
                    (&romeo(), romeo_quota)
                };
                NewItem {
                    quota,
                    ..row(archive, id(n), with_of(n))
                }
            })
            .collect();
        store.append(&batch).unwrap();
        reference.append(&batch).unwrap();
        for archive in [romeo(), juliet.clone()] {
            let all = Query {
                total: true,
                ..Query::default()
            };
            let (ours, theirs) = (
                store.find(&archive, &all).unwrap(),
                reference.find(&archive, &all).unwrap(),
            );
            assert_eq!(
                numbers(&ours),
                numbers(&theirs),
                "{} after {n}",
                archive.user
            );
            assert_eq!(ours.total, theirs.total, "{} after {n}", archive.user);
        }
        assert_minute_counts_match_the_rows(&dir, &format!("after {n} rows"));
    }
}

/// The kept counts per minute are the rows' own, minute for minute, and no minute whose rows
/// are all gone keeps a row.
fn assert_minute_counts_match_the_rows(dir: &TempDir, when: &str) {
    let mut conn = Conn::new(options(dir).opts()).unwrap();
    let kept: Vec<(i64, i64, i64)> = conn
        .query("SELECT aid, minute, item_count FROM mam_rs_minute_counts ORDER BY aid, minute")
        .unwrap();
    let counted: Vec<(i64, i64, i64)> = conn
        .query(format!(
            "SELECT aid, CAST(id >> {MINUTE_SHIFT} AS SIGNED) AS minute, COUNT(*) \
             FROM mam_rs_messages GROUP BY aid, minute ORDER BY aid, minute"
        ))
        .unwrap();
    assert_eq!(kept, counted, "{when}");
}

/// Version 4 fills the counts per minute of an existing database, and every write that adds
/// or removes rows keeps them: an import, expiry, an archive's deletion (the quota is in
/// `quotas_within_and_across_batches_match_the_sqlite_store`).
#[test]
fn version_4_fills_the_minute_counts_and_every_write_keeps_them() {
    let dir = TempDir::new().unwrap();
    let juliet = archive("example.com", "juliet", "archive");
    {
        let store = romeo_with_ten_rows(&dir);
        // Rows over three hours, a minute (2^26 us) holding from none to several of them.
        let batch: Vec<NewItem> = (0..120)
            .map(|n| row(&juliet, id(20 + n * 97), with_of(n)))
            .collect();
        store.append(&batch).unwrap();
    }
    let mut conn = Conn::new(options(&dir).opts()).unwrap();
    conn.query_drop("DROP TABLE mam_rs_minute_counts").unwrap();
    conn.query_drop("UPDATE mam_rs_schema SET version = 3")
        .unwrap();
    let store = open(&dir);
    assert_minute_counts_match_the_rows(&dir, "filled by version 4");
    let imported: Vec<crate::store::ImportRow> = (0..40).map(|n| stock(15 + n * 211)).collect();
    store.import(&juliet, "sql", &imported, 40).unwrap();
    assert_minute_counts_match_the_rows(&dir, "after an import");
    expire_all(
        &store,
        ExpiryRule::Age {
            end: T0 + 3000 * SECOND,
        },
    );
    assert_minute_counts_match_the_rows(&dir, "after expiry");
    while store.delete_archive(&juliet, 7).unwrap() > 0 {}
    assert_minute_counts_match_the_rows(&dir, "after juliet's archive was deleted");
    let versions: Vec<i32> = conn.query("SELECT version FROM mam_rs_schema").unwrap();
    assert_eq!(versions, vec![SCHEMA_VERSION]);
}

#[test]
fn a_server_that_refuses_is_an_open_error() {
    let dir = TempDir::new().unwrap();
    let options = MysqlOptions {
        database: "mam_rs_no_such_database".into(),
        ..options(&dir)
    };
    let Err(err) = MysqlStore::open(&options, false) else {
        panic!("no such database")
    };
    let text = err.to_string();
    assert!(matches!(err, StoreError::Open(_)), "{text}");
    assert!(text.contains("mam_rs_no_such_database"), "{text}");
}

#[test]
fn version_2_fills_the_contact_totals_of_an_existing_database() {
    let dir = TempDir::new().unwrap();
    let options = options(&dir);
    drop(romeo_with_ten_rows(&dir));
    // The database as version 1 left it: no contact totals, no compression (version 3).
    let mut conn = Conn::new(options.opts()).unwrap();
    conn.query_drop("DROP TABLE mam_rs_dictionaries").unwrap();
    conn.query_drop("ALTER TABLE mam_rs_messages DROP COLUMN zstanza")
        .unwrap();
    conn.query_drop("DROP TABLE mam_rs_with_counts").unwrap();
    conn.query_drop("DROP TABLE mam_rs_minute_counts").unwrap();
    conn.query_drop("UPDATE mam_rs_schema SET version = 1")
        .unwrap();
    let store = open(&dir);
    assert_filled_contact_totals(&store);
    // Read from the kept row, not counted: a row the module did not delete still counts.
    conn.exec_drop(
        "DELETE FROM mam_rs_messages WHERE id = ?",
        (id(11).as_i64(),),
    )
    .unwrap();
    assert_eq!(with_total(&store, "mercutio@example.net"), Some(4));
    let versions: Vec<i32> = conn.query("SELECT version FROM mam_rs_schema").unwrap();
    assert_eq!(versions, vec![SCHEMA_VERSION]);
}

#[test]
fn a_migration_cut_short_after_adding_a_column_runs_again() {
    let dir = TempDir::new().unwrap();
    let options = options(&dir);
    drop(romeo_with_ten_rows(&dir));
    // Version 3 added its table and column, then the process stopped before writing the
    // version: the next one runs the step again, which must not try to add them twice.
    let mut conn = Conn::new(options.opts()).unwrap();
    conn.query_drop("UPDATE mam_rs_schema SET version = 2")
        .unwrap();
    let store = open_with(&dir, true);
    assert_eq!(total(&store), Some(10));
    let versions: Vec<i32> = conn.query("SELECT version FROM mam_rs_schema").unwrap();
    assert_eq!(versions, vec![SCHEMA_VERSION]);
}

/// (rows stored as text, rows compressed)
fn kinds(store: &MysqlStore) -> (i64, i64) {
    let mut guard = store.writer.lock();
    let conn = &mut guard.as_mut().unwrap().conn;
    first::<(i64, i64)>(
        conn,
        "SELECT CAST(COALESCE(SUM(zstanza IS NULL), 0) AS SIGNED), \
         CAST(COALESCE(SUM(zstanza IS NOT NULL AND stanza = ''), 0) AS SIGNED) \
         FROM mam_rs_messages",
        (),
    )
    .unwrap()
    .unwrap()
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
            let conn = &mut guard.as_mut().unwrap().conn;
            conn.query("SELECT dict_id FROM mam_rs_dictionaries ORDER BY dict_id")
                .unwrap()
        },
    );
}

#[test]
fn compression_keeps_a_dictionary_a_failed_batch_trained() {
    compression_keeps_a_dictionary_trained_by_a_failed_batch(|dir| open_with(dir, true));
}

/// `EXPLAIN` of `sql`: each table read, in join order, as (table, index, Extra).
fn plan(conn: &mut Conn, sql: &str, params: Vec<Value>) -> Vec<(String, String, String)> {
    let rows: Vec<Row> = conn.exec(format!("EXPLAIN {sql}"), params).unwrap();
    rows.into_iter()
        .map(|row| {
            let text = |name: &str| {
                row.get::<Option<String>, _>(name)
                    .flatten()
                    .unwrap_or_default()
            };
            (text("table"), text("key"), text("Extra"))
        })
        .collect()
}

#[test]
fn queries_walk_the_archive_indexes() {
    let dir = TempDir::new().unwrap();
    drop(romeo_with_ten_rows(&dir));
    let mut conn = Conn::new(options(&dir).opts()).unwrap();
    let aid: i64 = conn
        .query_first("SELECT aid FROM mam_rs_archives")
        .unwrap()
        .unwrap();
    let with_id: i64 = conn
        .query_first("SELECT jid_id FROM mam_rs_jids WHERE jid = 'mercutio@example.net'")
        .unwrap()
        .unwrap();
    let everything = IdRange::from_times(None, None);
    let bounded = IdRange::from_times(Some(T0), Some(T0 + 5 * SECOND));
    let ids = [id(3).as_i64(), id(6).as_i64()];
    let unsorted = |extra: &str| !extra.contains("filesort") && !extra.contains("temporary");
    for (with_id, index) in [
        (None, "mam_rs_messages_by_archive"),
        (Some(with_id), "mam_rs_messages_by_with"),
    ] {
        for listed in [None, Some(&ids[..])] {
            let filter = Filter {
                aid,
                with_id,
                ids: listed,
            };
            for range in [everything, bounded] {
                // A page: the messages first, from the index in id order (no sort), then one
                // JID and one stock id each, by primary key.
                for reverse in [false, true] {
                    let (sql, params) = page_query(&filter, range, Some(51), reverse);
                    let lines = plan(&mut conn, &sql, params);
                    let tables: Vec<(&str, &str)> = lines
                        .iter()
                        .map(|(t, k, _)| (t.as_str(), k.as_str()))
                        .collect();
                    assert_eq!(
                        tables,
                        [("m", index), ("j", "PRIMARY"), ("l", "PRIMARY")],
                        "{sql}: {lines:?}"
                    );
                    assert!(
                        lines.iter().all(|(_, _, x)| unsorted(x)),
                        "{sql}: {lines:?}"
                    );
                }
                // A total: from the index alone, no row read.
                let (sql, params) = count_query(&filter, range);
                let lines = plan(&mut conn, &sql, params);
                assert_eq!(lines.len(), 1, "{sql}: {lines:?}");
                assert_eq!(lines[0].1, index, "{sql}: {lines:?}");
                assert!(lines[0].2.contains("Using index"), "{sql}: {lines:?}");
            }
        }
    }
}
