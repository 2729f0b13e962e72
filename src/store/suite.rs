// The store test suite: what every `Store` must do, after the archive cases of Prosody's
// `spec/core_storagemanager_spec.lua` (append, find by time, by id, by ids, limits, totals,
// isolation between hosts, stores and `with`), plus atomicity, expiry, smart retention,
// import, statistics and deletion.
//
// Included (`include!`) by each backend's tests module, which provides `type Backend` and
// `fn open(dir: &TempDir) -> Backend` (a fresh, empty store per `dir`; opening the same `dir`
// again gives the same store) and the imports below.

/// Prosody's spec uses this time (seconds); rows here are at `T0 + n` seconds.
const T0: i64 = 1_539_204_123_000_000;
const SECOND: i64 = 1_000_000;

fn archive(host: &str, user: &str, store: &str) -> ArchiveRef {
    ArchiveRef {
        host: Arc::from(host),
        user: user.to_owned(),
        store: Arc::from(store),
    }
}

fn romeo() -> ArchiveRef {
    archive("example.com", "romeo", "archive")
}

/// The id of row `n`: the first id of second `n`, plus `n` to tell rows of different archives
/// at the same second apart when needed.
fn id(n: i64) -> ArchiveId {
    ArchiveId::first_at(T0 + n * SECOND)
}

fn row(archive: &ArchiveRef, id: ArchiveId, with: &str) -> NewItem {
    NewItem {
        archive: archive.clone(),
        id,
        with: with.to_owned(),
        stanza: format!("<message xmlns='jabber:client' id='{id}'><body>hi</body></message>"),
        quota: None,
    }
}

/// Row `n` is with mercutio when `n` is a multiple of 3, else with juliet.
fn with_of(n: i64) -> &'static str {
    if n % 3 == 0 {
        "mercutio@example.net"
    } else {
        "juliet@capulet.lit"
    }
}

/// A store holding rows 1..=10 in romeo's archive.
fn romeo_with_ten_rows(dir: &TempDir) -> Backend {
    let store = open(dir);
    let batch: Vec<NewItem> = (1..=10).map(|n| row(&romeo(), id(n), with_of(n))).collect();
    store.append(&batch).expect("append");
    store
}

/// The row numbers of a page, in page order.
fn numbers(page: &Page) -> Vec<i64> {
    page.items
        .iter()
        .map(|item| (item.id.micros() - T0) / SECOND)
        .collect()
}

fn find(store: &dyn Store, query: Query) -> Page {
    store.find(&romeo(), &query).expect("find")
}

/// The total of romeo's rows from `start` to `end` (microseconds), as a query gives it.
fn window_total(store: &dyn Store, start: Option<i64>, end: Option<i64>) -> Option<u64> {
    let query = Query {
        start,
        end,
        limit: Some(0),
        total: true,
        ..Query::default()
    };
    find(store, query).total
}

fn text(n: i64) -> Option<String> {
    Some(id(n).to_string())
}

#[test]
fn appended_rows_come_back_whole() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    let page = find(&store, Query::default());
    assert_eq!(numbers(&page), (1..=10).collect::<Vec<_>>());
    assert_eq!(page.total, None);
    let first = &page.items[0];
    assert_eq!(first.id, id(1));
    assert_eq!(first.with, "juliet@capulet.lit");
    assert_eq!(first.stanza, row(&romeo(), id(1), "").stanza);
    assert_eq!(page.items[2].with, "mercutio@example.net");
}

#[test]
fn find_by_time_is_inclusive() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    let at = |n: i64| Some(T0 + n * SECOND);

    let q = |start, end| Query {
        start,
        end,
        ..Query::default()
    };
    assert_eq!(
        numbers(&find(&store, q(at(3), None))),
        (3..=10).collect::<Vec<_>>()
    );
    assert_eq!(numbers(&find(&store, q(None, at(4)))), vec![1, 2, 3, 4]);
    assert_eq!(numbers(&find(&store, q(at(3), at(5)))), vec![3, 4, 5]);
    assert_eq!(numbers(&find(&store, q(at(7), at(7)))), vec![7]);
    // Before the first row, after the last one.
    assert!(find(&store, q(None, at(0))).items.is_empty());
    assert!(find(&store, q(at(11), None)).items.is_empty());
    // Start after end.
    assert!(find(&store, q(at(5), at(4))).items.is_empty());
    // Out of the id space: far future and before 1970.
    assert!(find(&store, q(Some(i64::MAX), None)).items.is_empty());
    assert_eq!(find(&store, q(None, Some(i64::MAX))).items.len(), 10);
    assert_eq!(find(&store, q(Some(-5), None)).items.len(), 10);
    assert!(find(&store, q(None, Some(-5))).items.is_empty());
}

#[test]
fn find_by_id_is_exclusive() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);

    let after = find(
        &store,
        Query {
            after: text(3),
            ..Query::default()
        },
    );
    assert_eq!(numbers(&after), (4..=10).collect::<Vec<_>>());

    let before = find(
        &store,
        Query {
            before: text(8),
            ..Query::default()
        },
    );
    assert_eq!(numbers(&before), (1..=7).collect::<Vec<_>>());

    let between = Query {
        after: text(3),
        before: text(8),
        ..Query::default()
    };
    assert_eq!(numbers(&find(&store, between)), vec![4, 5, 6, 7]);

    let none_between = Query {
        after: text(5),
        before: text(6),
        ..Query::default()
    };
    assert!(find(&store, none_between).items.is_empty());

    let after_last = find(
        &store,
        Query {
            after: text(10),
            ..Query::default()
        },
    );
    assert!(after_last.items.is_empty());
}

#[test]
fn reverse_pages_are_nearest_the_end_or_before() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);

    let last = Query {
        reverse: true,
        limit: Some(3),
        ..Query::default()
    };
    assert_eq!(numbers(&find(&store, last)), vec![10, 9, 8]);

    let before = Query {
        reverse: true,
        limit: Some(2),
        before: text(8),
        ..Query::default()
    };
    assert_eq!(numbers(&find(&store, before)), vec![7, 6]);

    let window = Query {
        reverse: true,
        after: text(2),
        before: text(6),
        ..Query::default()
    };
    assert_eq!(numbers(&find(&store, window)), vec![5, 4, 3]);
}

#[test]
fn limit_and_paging() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);

    let first = find(
        &store,
        Query {
            limit: Some(3),
            ..Query::default()
        },
    );
    assert_eq!(numbers(&first), vec![1, 2, 3]);
    let next = Query {
        limit: Some(3),
        after: Some(first.items[2].id.to_string()),
        ..Query::default()
    };
    assert_eq!(numbers(&find(&store, next)), vec![4, 5, 6]);
    let big = find(
        &store,
        Query {
            limit: Some(1000),
            ..Query::default()
        },
    );
    assert_eq!(big.items.len(), 10);
}

#[test]
fn find_by_ids_ignores_unknown_and_unparseable() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    let other = archive("example.com", "juliet", "archive");
    store
        .append(&[row(&other, id(20), "romeo@example.com")])
        .unwrap();

    let wanted = |ids: Vec<String>| Query {
        ids: Some(ids),
        total: true,
        ..Query::default()
    };
    let ids = vec![
        id(5).to_string(),
        "75324cdf-f4a9-4dd3-82f3-1b9e64be053c".to_owned(),
        id(2).to_string(),
        id(20).to_string(), // juliet's row, not romeo's
        id(2).to_string(),
        id(99).to_string(), // never stored
    ];
    let page = find(&store, wanted(ids.clone()));
    assert_eq!(numbers(&page), vec![2, 5]);
    assert_eq!(page.total, Some(2));

    let reversed = find(
        &store,
        Query {
            reverse: true,
            ..wanted(ids)
        },
    );
    assert_eq!(numbers(&reversed), vec![5, 2]);

    let nothing = find(&store, wanted(vec!["bogus".into(), String::new()]));
    assert!(nothing.items.is_empty());
    assert_eq!(nothing.total, Some(0));
    let empty_list = find(&store, wanted(Vec::new()));
    assert_eq!(empty_list.total, Some(0));
}

#[test]
fn one_batch_across_archives_adds_to_each_archives_totals() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir); // juliet 7, mercutio 3
    let benvolio = archive("example.com", "benvolio", "archive");
    let tybalt = archive("example.com", "tybalt", "archive");
    let batch = [
        row(&benvolio, ArchiveId::first_at(T0 + 11 * SECOND + 1), "juliet@capulet.lit"),
        row(&romeo(), id(11), "mercutio@example.net"),
        row(&tybalt, ArchiveId::first_at(T0 + 11 * SECOND + 2), "juliet@capulet.lit"),
        row(&benvolio, ArchiveId::first_at(T0 + 12 * SECOND + 1), "juliet@capulet.lit"),
        row(&romeo(), id(12), "juliet@capulet.lit"),
        row(&benvolio, ArchiveId::first_at(T0 + 13 * SECOND + 1), "mercutio@example.net"),
        row(&romeo(), id(13), "mercutio@example.net"),
    ];
    store.append(&batch).unwrap();
    assert_eq!(total(&store), Some(13));
    assert_eq!(with_total(&store, "juliet@capulet.lit"), Some(8));
    assert_eq!(with_total(&store, "mercutio@example.net"), Some(5));
    let totals = |archive: &ArchiveRef, with: Option<&str>| {
        let query = Query {
            with: with.map(str::to_owned),
            limit: Some(0),
            total: true,
            ..Query::default()
        };
        store.find(archive, &query).unwrap().total
    };
    assert_eq!(totals(&benvolio, None), Some(3));
    assert_eq!(totals(&benvolio, Some("juliet@capulet.lit")), Some(2));
    assert_eq!(totals(&benvolio, Some("mercutio@example.net")), Some(1));
    assert_eq!(totals(&tybalt, None), Some(1));
    assert_eq!(totals(&tybalt, Some("mercutio@example.net")), Some(0));
}

#[test]
fn totals_ignore_before_and_after() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);

    let page = find(
        &store,
        Query {
            after: text(3),
            before: text(9),
            limit: Some(2),
            total: true,
            ..Query::default()
        },
    );
    assert_eq!(numbers(&page), vec![4, 5]);
    assert_eq!(page.total, Some(10));

    let with_and_time = find(
        &store,
        Query {
            with: Some("juliet@capulet.lit".into()),
            start: Some(T0 + 2 * SECOND),
            end: Some(T0 + 8 * SECOND),
            after: text(5),
            total: true,
            ..Query::default()
        },
    );
    // juliet in 2..=8: 2, 4, 5, 7, 8; after 5: 7, 8.
    assert_eq!(numbers(&with_and_time), vec![7, 8]);
    assert_eq!(with_and_time.total, Some(5));
}

/// The totals of time windows are exact however the rows spread over time: rows a millisecond
/// to three minutes apart over several hours, in two archives, windows from a second to all of
/// it (their ends on rows, between rows, and on whole minutes of 2^26 µs, where the SQLite
/// store's kept counts begin and end), and again after expiry took the oldest rows.
#[test]
fn window_totals_are_exact_over_hours_of_rows() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let juliet = archive("example.com", "juliet", "archive");
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: i64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as i64
    };
    let minute = 1i64 << 26;
    let (mut times, mut batch) = (Vec::new(), Vec::new());
    let mut t = T0;
    for i in 0..400 {
        t = match next(6) {
            0 => t + 1_000 * (1 + next(5)),
            // The first or the last microsecond of a minute.
            1 => (t / minute + 1) * minute + next(2) * (minute - 1),
            _ => t + SECOND * (1 + next(180)),
        };
        times.push(t);
        // The last id of a minute too (a sequence number at its largest).
        let id = match t % minute == minute - 1 {
            true => ArchiveId::last_at(t),
            false => ArchiveId::first_at(t),
        };
        batch.push(row(&romeo(), id, "juliet@capulet.lit"));
        if i % 3 == 0 {
            batch.push(row(&juliet, ArchiveId::first_at(t + 500), "romeo@example.com"));
        }
    }
    store.append(&batch).unwrap();
    let mut windows = vec![(None, None), (Some(T0), None), (None, Some(t))];
    for _ in 0..150 {
        let mut at = || match next(3) {
            0 => times[next(times.len() as i64) as usize],
            1 => (T0 + next(t - T0)) / minute * minute + next(2) - 1,
            _ => T0 + next(t - T0 + 2),
        };
        let (a, b) = (at(), at());
        windows.push((Some(a.min(b)), Some(a.max(b))));
    }
    let check = |times: &[i64]| {
        for &(start, end) in &windows {
            let expected = times
                .iter()
                .filter(|&&w| start.is_none_or(|s| w >= s) && end.is_none_or(|e| w <= e))
                .count() as u64;
            let total = window_total(&store, start, end);
            assert_eq!(total, Some(expected), "window {start:?} to {end:?}");
        }
    };
    check(&times);
    let cut = times[times.len() / 3];
    expire_all(&store, ExpiryRule::Age { end: cut });
    times.retain(|&w| w > cut);
    check(&times);
}

#[test]
fn limit_zero_gives_the_total_without_checking_ids() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    for unknown in ["", "unknown", "0000000000000"] {
        let page = find(
            &store,
            Query {
                after: Some(unknown.into()),
                before: Some(unknown.into()),
                limit: Some(0),
                total: true,
                ..Query::default()
            },
        );
        assert!(page.items.is_empty());
        assert_eq!(page.total, Some(10), "{unknown:?}");
    }
    let no_total = find(
        &store,
        Query {
            limit: Some(0),
            ..Query::default()
        },
    );
    assert_eq!(no_total, Page::default());
}

#[test]
fn unknown_or_invalid_before_after_is_item_not_found() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    // Same user and id space on another host: its ids are not romeo@example.com's.
    let elsewhere = archive("other.example", "romeo", "archive");
    store.append(&[row(&elsewhere, id(30), "x@y")]).unwrap();

    let bad = [
        String::new(),
        "garbage".into(),
        "75324cdf-f4a9-4dd3-82f3-1b9e64be053c".into(),
        id(99).to_string(),
        id(30).to_string(),
    ];
    for text in &bad {
        for reverse in [false, true] {
            let after = store.find(
                &romeo(),
                &Query {
                    after: Some(text.clone()),
                    reverse,
                    total: true,
                    ..Query::default()
                },
            );
            assert!(
                matches!(after, Err(StoreError::ItemNotFound)),
                "after {text:?}"
            );
            let before = store.find(
                &romeo(),
                &Query {
                    before: Some(text.clone()),
                    reverse,
                    ..Query::default()
                },
            );
            assert!(
                matches!(before, Err(StoreError::ItemNotFound)),
                "before {text:?}"
            );
        }
    }
    // A known after with an unknown before is still an error.
    let mixed = store.find(
        &romeo(),
        &Query {
            after: text(2),
            before: Some("nope".into()),
            ..Query::default()
        },
    );
    assert!(matches!(mixed, Err(StoreError::ItemNotFound)));
}

#[test]
fn unknown_ids_are_errors_even_where_nothing_could_match() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    let after = |archive: &ArchiveRef, with: Option<&str>, ids: Option<Vec<String>>| {
        store.find(
            archive,
            &Query {
                after: Some(id(99).to_string()),
                with: with.map(str::to_owned),
                ids,
                ..Query::default()
            },
        )
    };
    // An archive that does not exist, a `with` never seen, an `ids` list of nothing known.
    let nobody = archive("example.com", "nobody", "archive");
    assert!(matches!(
        after(&nobody, None, None),
        Err(StoreError::ItemNotFound)
    ));
    assert!(matches!(
        after(&romeo(), Some("stranger@x"), None),
        Err(StoreError::ItemNotFound)
    ));
    assert!(matches!(
        after(&romeo(), None, Some(vec!["junk".into()])),
        Err(StoreError::ItemNotFound)
    ));
    // A known id there gives an empty page; limit 0 never checks ids.
    let known = store.find(
        &romeo(),
        &Query {
            after: text(2),
            with: Some("stranger@x".into()),
            ..Query::default()
        },
    );
    assert!(known.unwrap().items.is_empty());
    let counted = store.find(
        &nobody,
        &Query {
            after: Some("junk".into()),
            limit: Some(0),
            total: true,
            ..Query::default()
        },
    );
    assert_eq!(counted.unwrap().total, Some(0));
}

#[test]
fn hosts_and_stores_are_isolated() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let a = archive("a.example", "user", "archive");
    let b = archive("b.example", "user", "archive");
    let c = archive("a.example", "user", "muc_log");
    store
        .append(&[
            row(&a, id(1), "contact@example.com"),
            row(&b, id(2), "contact@example.com"),
            row(&c, id(3), "contact@example.com"),
            row(&a, id(4), "contact@example.com"),
        ])
        .unwrap();

    let all = Query {
        total: true,
        ..Query::default()
    };
    let page_a = store.find(&a, &all).unwrap();
    assert_eq!(numbers(&page_a), vec![1, 4]);
    assert_eq!(page_a.total, Some(2));
    let page_b = store.find(&b, &all).unwrap();
    assert_eq!(numbers(&page_b), vec![2]);
    assert_eq!(page_b.total, Some(1));
    let page_c = store.find(&c, &all).unwrap();
    assert_eq!(numbers(&page_c), vec![3]);

    // An id from another archive is not a valid bound here.
    let cross = store.find(
        &a,
        &Query {
            after: Some(id(2).to_string()),
            ..Query::default()
        },
    );
    assert!(matches!(cross, Err(StoreError::ItemNotFound)));

    // A third archive that was never written is empty.
    let unknown = store
        .find(&archive("b.example", "user", "muc_log"), &all)
        .unwrap();
    assert_eq!(
        unknown,
        Page {
            items: vec![],
            total: Some(0)
        }
    );
    let unknown_plain = store
        .find(
            &archive("c.example", "nobody", "archive"),
            &Query::default(),
        )
        .unwrap();
    assert_eq!(unknown_plain, Page::default());
}

#[test]
fn with_is_an_exact_match() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);

    let with = |jid: &str| Query {
        with: Some(jid.into()),
        total: true,
        ..Query::default()
    };
    let mercutio = find(&store, with("mercutio@example.net"));
    assert_eq!(numbers(&mercutio), vec![3, 6, 9]);
    assert_eq!(mercutio.total, Some(3));
    assert!(mercutio
        .items
        .iter()
        .all(|i| i.with == "mercutio@example.net"));

    let last_juliet = find(
        &store,
        Query {
            reverse: true,
            limit: Some(2),
            ..with("juliet@capulet.lit")
        },
    );
    assert_eq!(numbers(&last_juliet), vec![10, 8]);
    assert_eq!(last_juliet.total, Some(7));

    for other in [
        "Juliet@capulet.lit",
        "juliet@capulet.lit/balcony",
        "capulet.lit",
        "",
    ] {
        let page = find(&store, with(other));
        assert_eq!(
            page,
            Page {
                items: vec![],
                total: Some(0)
            },
            "{other:?}"
        );
    }
    // A JID known from another archive has no rows in this one.
    store
        .append(&[row(
            &archive("example.com", "benvolio", "archive"),
            id(40),
            "tybalt@capulet.lit",
        )])
        .unwrap();
    assert_eq!(find(&store, with("tybalt@capulet.lit")).total, Some(0));
}

#[test]
fn a_failing_batch_leaves_nothing_and_the_next_one_works() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    let new_archive = archive("example.com", "paris", "archive");
    let other_new = archive("example.com", "tybalt", "archive");

    // A new archive and a new JID, then a duplicate id: the whole batch must go.
    let failing = [
        row(&new_archive, id(50), "nurse@capulet.lit"),
        row(&romeo(), id(51), "friar@verona.lit"),
        row(&romeo(), id(3), "juliet@capulet.lit"),
    ];
    assert!(matches!(
        store.append(&failing),
        Err(StoreError::Database(_))
    ));
    let all = Query {
        total: true,
        ..Query::default()
    };
    assert_eq!(store.find(&new_archive, &all).unwrap().total, Some(0));
    assert_eq!(find(&store, all.clone()).total, Some(10));
    assert_eq!(store.last_id().unwrap(), Some(id(10)));

    // The rolled-back aid would be reused by the next new archive; a cache that kept it
    // would file paris's next row under tybalt.
    store
        .append(&[row(&other_new, id(52), "nurse@capulet.lit")])
        .unwrap();
    store
        .append(&[row(&new_archive, id(53), "friar@verona.lit")])
        .unwrap();
    assert_eq!(numbers(&store.find(&other_new, &all).unwrap()), vec![52]);
    let paris = store.find(&new_archive, &all).unwrap();
    assert_eq!(numbers(&paris), vec![53]);
    assert_eq!(paris.items[0].with, "friar@verona.lit");
    assert_eq!(paris.total, Some(1));

    assert!(store.append(&[]).is_ok());
}

#[test]
fn last_id_is_the_newest_row_anywhere() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    assert_eq!(store.last_id().unwrap(), None);
    store
        .append(&[
            row(&romeo(), id(1), "a@b"),
            row(&archive("x.example", "y", "archive"), id(7), "a@b"),
            row(&romeo(), id(5), "a@b"),
        ])
        .unwrap();
    assert_eq!(store.last_id().unwrap(), Some(id(7)));
}

#[test]
fn readers_run_beside_the_writer() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(open(&dir));
    let writer = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            for b in 0..40 {
                let batch: Vec<NewItem> = (0..25)
                    .map(|i| row(&romeo(), id(b * 25 + i + 1), with_of(i)))
                    .collect();
                store.append(&batch).unwrap();
            }
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut seen = 0;
                while seen < 1000 {
                    let page = find(
                        &*store,
                        Query {
                            total: true,
                            ..Query::default()
                        },
                    );
                    // One snapshot: the page and the total agree, and whole batches appear.
                    assert_eq!(page.total, Some(page.items.len() as u64));
                    assert_eq!(page.items.len() % 25, 0);
                    assert!(page.items.len() >= seen);
                    seen = page.items.len();
                }
            })
        })
        .collect();
    writer.join().unwrap();
    for reader in readers {
        reader.join().unwrap();
    }
}

#[test]
fn a_full_archive_loses_its_oldest_rows_down_to_99_percent() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let quota = |n: i64| NewItem {
        quota: Some(200),
        ..row(&romeo(), id(n), "juliet@capulet.lit")
    };
    store
        .append(&(0..200).map(quota).collect::<Vec<_>>())
        .unwrap();
    // Other archives do not count against romeo's quota, nor lose rows.
    let other = archive("example.com", "benvolio", "archive");
    store.append(&[row(&other, id(500), "x@y")]).unwrap();

    store.append(&[quota(200)]).unwrap();
    let all = find(
        &store,
        Query {
            total: true,
            limit: Some(1000),
            ..Query::default()
        },
    );
    // 200 rows at the limit: down to floor(200 * 0.99) = 198, then the new one.
    assert_eq!(all.total, Some(199));
    assert_eq!(numbers(&all).first(), Some(&2), "the two oldest rows went");
    assert_eq!(numbers(&all).last(), Some(&200));
    // Under the limit nothing more goes.
    store.append(&[quota(201)]).unwrap();
    assert_eq!(
        find(
            &store,
            Query {
                total: true,
                limit: Some(0),
                ..Query::default()
            }
        )
        .total,
        Some(200)
    );
    let others = store
        .find(
            &other,
            &Query {
                total: true,
                limit: Some(0),
                ..Query::default()
            },
        )
        .unwrap();
    assert_eq!(others.total, Some(1));
}

#[test]
fn a_batch_that_fills_an_archive_makes_room_with_its_own_earlier_rows() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let quota = |n: i64| NewItem {
        quota: Some(10),
        ..row(&romeo(), id(n), "juliet@capulet.lit")
    };
    // One batch of 15 for a quota of 10: from the 11th row on, each finds the archive full (its
    // own batch's rows counted) and takes it down to 9 first.
    store
        .append(&(1..=15).map(quota).collect::<Vec<_>>())
        .unwrap();
    let all = find(
        &store,
        Query {
            total: true,
            limit: Some(100),
            ..Query::default()
        },
    );
    assert_eq!(all.total, Some(10));
    assert_eq!(numbers(&all), (6..=15).collect::<Vec<_>>());
}

#[test]
fn expiry_removes_old_rows_of_one_host_in_bounded_batches() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let juliet = archive("example.com", "juliet", "archive");
    let elsewhere = archive("other.example", "romeo", "archive");
    let offline = archive("example.com", "romeo", "offline");
    // Romeo's rows at even seconds, juliet's at odd ones; the other archives later on.
    let mut rows = Vec::new();
    for n in 0..10 {
        rows.push(row(&romeo(), id(2 * n), "juliet@capulet.lit"));
        rows.push(row(&juliet, id(2 * n + 1), "romeo@montague.lit"));
        rows.push(row(&elsewhere, id(100 + n), "x@y"));
        rows.push(row(&offline, id(200 + n), "x@y"));
    }
    store.append(&rows).unwrap();

    // Everything at or before second 9 (inclusive): romeo 0,2,4,6,8 and juliet 1,3,5,7,9.
    let mut cursor = ExpiryCursor::default();
    let mut batches = Vec::new();
    loop {
        let batch = store
            .expire(
                "example.com",
                "archive",
                &ExpiryRule::Age {
                    end: id(9).micros(),
                },
                3,
                &mut cursor,
            )
            .unwrap();
        assert!(batch.deleted <= 3, "a batch is bounded");
        batches.push(batch.deleted);
        if batch.done {
            break;
        }
    }
    assert_eq!(batches.iter().sum::<u64>(), 10);
    assert!(batches.len() >= 4, "{batches:?}");
    let left = |a: &ArchiveRef| {
        store
            .find(
                a,
                &Query {
                    total: true,
                    limit: Some(0),
                    ..Query::default()
                },
            )
            .unwrap()
            .total
    };
    assert_eq!(left(&romeo()), Some(5));
    assert_eq!(left(&juliet), Some(5));
    assert_eq!(left(&elsewhere), Some(10), "another host is untouched");
    assert_eq!(left(&offline), Some(10), "another store name is untouched");
    assert_eq!(
        numbers(&find(&store, Query::default())),
        vec![10, 12, 14, 16, 18]
    );
    // A second run finds nothing more.
    let again = store
        .expire(
            "example.com",
            "archive",
            &ExpiryRule::Age {
                end: id(9).micros(),
            },
            3,
            &mut ExpiryCursor::default(),
        )
        .unwrap();
    assert_eq!(
        again,
        ExpiryBatch {
            deleted: 0,
            done: true
        }
    );
}

fn mark(archive: &ArchiveRef, client: &str, n: i64, seen: i64) -> Mark {
    Mark {
        archive: archive.clone(),
        client: client.to_owned(),
        last_id: id(n),
        seen: id(seen).micros(),
    }
}

/// Runs an expiry rule over example.com to the end; returns how many rows went.
fn expire_all(store: &dyn Store, rule: ExpiryRule) -> u64 {
    let mut cursor = ExpiryCursor::default();
    let mut total = 0;
    loop {
        let batch = store
            .expire("example.com", "archive", &rule, 2, &mut cursor)
            .unwrap();
        total += batch.deleted;
        if batch.done {
            return total;
        }
    }
}

#[test]
fn smart_retention_removes_what_one_or_all_clients_have() {
    let delivered = |strategy, seen_since| ExpiryRule::Delivered {
        end: id(100).micros(),
        strategy,
        seen_since: id(seen_since).micros(),
    };

    // No client known: nothing goes, whatever its age.
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    assert_eq!(expire_all(&store, delivered(Strategy::One, 0)), 0);

    // Rows 1..=10. The phone has rows up to 6, the laptop up to 3 (marks only move forward).
    store
        .record_marks(&[
            mark(&romeo(), "phone", 6, 50),
            mark(&romeo(), "laptop", 3, 50),
        ])
        .unwrap();
    store
        .record_marks(&[mark(&romeo(), "phone", 2, 60)])
        .unwrap();
    assert_eq!(
        expire_all(&store, delivered(Strategy::All, 0)),
        3,
        "rows 1..=3 reached every client"
    );
    assert_eq!(
        numbers(&find(&store, Query::default())),
        vec![4, 5, 6, 7, 8, 9, 10]
    );
    assert_eq!(
        expire_all(&store, delivered(Strategy::One, 0)),
        3,
        "rows 4..=6 reached the phone"
    );
    assert_eq!(numbers(&find(&store, Query::default())), vec![7, 8, 9, 10]);
}

#[test]
fn smart_retention_keeps_young_rows_and_ignores_stale_clients() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    store
        .record_marks(&[
            mark(&romeo(), "phone", 9, 50),
            mark(&romeo(), "old tablet", 1, 10),
        ])
        .unwrap();
    // Rows 1..=10. Rows up to 9 reached the phone, but only rows up to time 4 are old enough.
    let young = ExpiryRule::Delivered {
        end: id(4).micros(),
        strategy: Strategy::All,
        seen_since: id(20).micros(),
    };
    assert_eq!(expire_all(&store, young), 4);
    // The tablet (last seen at 10, has row 1 only) holds the rest back while it counts...
    let with_tablet = ExpiryRule::Delivered {
        end: id(100).micros(),
        strategy: Strategy::All,
        seen_since: id(5).micros(),
    };
    assert_eq!(expire_all(&store, with_tablet), 0);
    // ...and not once it is stale: rows 5..=9 go; row 10 reached no client and stays.
    let without = ExpiryRule::Delivered {
        end: id(100).micros(),
        strategy: Strategy::All,
        seen_since: id(20).micros(),
    };
    assert_eq!(expire_all(&store, without), 5);
    assert_eq!(numbers(&find(&store, Query::default())), vec![10]);
}

// Import: stock rows keep the ids clients know them by.

/// How many rows romeo's archive has.
fn total(store: &dyn Store) -> Option<u64> {
    find(
        store,
        Query {
            total: true,
            ..Query::default()
        },
    )
    .total
}

/// How many rows romeo's archive has with one contact.
fn with_total(store: &dyn Store, with: &str) -> Option<u64> {
    find(
        store,
        Query {
            with: Some(with.to_owned()),
            limit: Some(0),
            total: true,
            ..Query::default()
        },
    )
    .total
}

/// After a migration has filled in the contact totals of [`romeo_with_ten_rows`]: they are
/// right, and a new row adds to them.
fn assert_filled_contact_totals(store: &dyn Store) {
    assert_eq!(with_total(store, "juliet@capulet.lit"), Some(7));
    assert_eq!(with_total(store, "mercutio@example.net"), Some(3));
    store
        .append(&[row(&romeo(), id(11), "mercutio@example.net")])
        .unwrap();
    assert_eq!(with_total(store, "mercutio@example.net"), Some(4));
}

fn stock(n: i64) -> crate::store::ImportRow {
    crate::store::ImportRow {
        key: format!("stock-{n:04}"),
        micros: T0 + n * SECOND,
        with: with_of(n).to_owned(),
        stanza: format!("<message xmlns='jabber:client' id='s{n}'><body>old {n}</body></message>"),
    }
}

fn keys(page: &Page) -> Vec<String> {
    page.items.iter().map(|i| i.client_id()).collect()
}

#[test]
fn imported_rows_answer_with_their_stock_ids_and_page_from_them() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let rows: Vec<_> = (1..=5).map(stock).collect();
    let done = store.import(&romeo(), "sql", &rows, 5).unwrap();
    assert_eq!((done.imported, done.already), (5, 0));

    let all = find(&store, Query::default());
    assert_eq!(
        keys(&all),
        [
            "stock-0001",
            "stock-0002",
            "stock-0003",
            "stock-0004",
            "stock-0005"
        ]
    );
    assert_eq!(numbers(&all), [1, 2, 3, 4, 5], "time kept to the second");

    let after = find(
        &store,
        Query {
            after: Some("stock-0002".into()),
            limit: Some(2),
            ..Query::default()
        },
    );
    assert_eq!(keys(&after), ["stock-0003", "stock-0004"]);
    let before = find(
        &store,
        Query {
            before: Some("stock-0002".into()),
            ..Query::default()
        },
    );
    assert_eq!(keys(&before), ["stock-0001"]);
    let ids = find(
        &store,
        Query {
            ids: Some(vec!["stock-0005".into(), "nope".into()]),
            ..Query::default()
        },
    );
    assert_eq!(keys(&ids), ["stock-0005"]);
    // Stock ids belong to their archive only.
    let juliet = archive("example.com", "juliet", "archive");
    assert!(matches!(
        store.find(
            &juliet,
            &Query {
                after: Some("stock-0002".into()),
                ..Query::default()
            }
        ),
        Err(StoreError::ItemNotFound)
    ));
}

#[test]
fn a_second_import_changes_nothing_and_new_messages_sort_after() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let rows: Vec<_> = (1..=5).map(stock).collect();
    store.import(&romeo(), "sql", &rows[..3], 3).unwrap();
    assert_eq!(
        store
            .import_checkpoint(&romeo(), "sql")
            .unwrap()
            .map(|c| c.position),
        Some(3)
    );
    // Resumed with an overlap: the overlap is recognised, the rest imported.
    let again = store.import(&romeo(), "sql", &rows[1..], 5).unwrap();
    assert_eq!((again.imported, again.already), (2, 2));
    let third = store.import(&romeo(), "sql", &rows, 5).unwrap();
    assert_eq!((third.imported, third.already), (0, 5));
    assert_eq!(total(&store), Some(5));

    store
        .append(&[row(&romeo(), ArchiveId::first_at(T0 + 100 * SECOND), "x@y")])
        .unwrap();
    let all = find(&store, Query::default());
    assert_eq!(all.items.len(), 6);
    assert_eq!(
        all.items[5].key, None,
        "a native row is known by its own id"
    );
}

#[test]
fn source_order_is_kept_when_times_go_backwards() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let mut rows: Vec<_> = (1..=3).map(stock).collect();
    rows[2].micros = T0; // older than the rows before it in the source
    store.import(&romeo(), "sql", &rows, 3).unwrap();
    assert_eq!(
        keys(&find(&store, Query::default())),
        ["stock-0001", "stock-0002", "stock-0003"]
    );
}

#[test]
fn an_export_read_back_keeps_native_ids() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    let page = find(&store, Query::default());
    let other = TempDir::new().unwrap();
    let copy = open(&other);
    let rows: Vec<_> = page
        .items
        .iter()
        .map(|i| crate::store::ImportRow {
            key: i.client_id(),
            micros: i.id.micros(),
            with: i.with.clone(),
            stanza: i.stanza.clone(),
        })
        .collect();
    copy.import(&romeo(), "file", &rows, 0).unwrap();
    let back = copy.find(&romeo(), &Query::default()).unwrap();
    assert_eq!(back, page, "same ids, no stored key, same rows");
}

#[test]
fn stats_delete_and_expiry_cover_imported_rows() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    let rows: Vec<_> = (11..=12).map(stock).collect();
    store.import(&romeo(), "sql", &rows, 2).unwrap();
    let s = store
        .stats("example.com", "archive", Some("romeo"))
        .unwrap();
    assert_eq!((s.users, s.messages), (1, 12));
    assert_eq!(s.oldest.map(|i| i.micros()), Some(T0 + SECOND));
    assert_eq!(s.newest.map(|i| i.micros()), Some(T0 + 12 * SECOND));
    assert!(s.bytes > 12 * 40, "{}", s.bytes);
    assert_eq!(s.contacts[0], ("juliet@capulet.lit".to_owned(), 8));
    let host = store.stats("example.com", "archive", None).unwrap();
    assert_eq!((host.users, host.messages), (1, 12));
    assert_eq!(
        store
            .stats("example.com", "archive", Some("nobody"))
            .unwrap(),
        Stats::default()
    );

    // Expiry removes the legacy id with its row.
    let mut cursor = ExpiryCursor::default();
    store
        .expire(
            "example.com",
            "archive",
            &ExpiryRule::Age {
                end: T0 + 11 * SECOND,
            },
            100,
            &mut cursor,
        )
        .unwrap();
    // The expired imported row's stock id went with it; the other one still answers.
    assert!(matches!(
        store.find(&romeo(), &Query { after: Some("stock-0011".into()), ..Query::default() }),
        Err(StoreError::ItemNotFound)
    ));
    assert_eq!(keys(&find(&store, Query { ids: Some(vec!["stock-0012".into()]), ..Query::default() })), ["stock-0012"]);

    assert_eq!(store.delete_archive(&romeo(), 1000).unwrap(), 1);
    assert_eq!(store.delete_archive(&romeo(), 1000).unwrap(), 0);
    assert_eq!(total(&store), Some(0));
    assert_eq!(store.import_checkpoint(&romeo(), "sql").unwrap(), None);
    let report = store.optimize(true).unwrap();
    assert!(report.iter().any(|l| l.starts_with("VACUUM")), "{report:?}");
}

#[test]
fn a_duplicate_id_fails_the_whole_batch() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let juliet = archive("example.com", "juliet", "archive");
    let r = store.append(&[row(&romeo(), id(1), "a@b"), row(&juliet, id(1), "a@b")]);
    assert!(r.is_err(), "{r:?}");
    assert_eq!(total(&store), Some(0));
}


#[test]
fn holds_tells_whether_a_row_is_stored() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    assert!(!store.holds(id(1)).unwrap());
    store.append(&[row(&romeo(), id(1), "juliet@capulet.lit")]).unwrap();
    assert!(store.holds(id(1)).unwrap());
    assert!(!store.holds(id(2)).unwrap());
}

#[test]
fn window_totals_are_exact_whatever_part_of_the_archive_they_cover() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir);
    // Another archive's rows must not count.
    store.append(&[row(&archive("example.com", "juliet", "archive"), ArchiveId::first_at(T0 + 5 * SECOND + 1), "x@y")])
        .unwrap();
    for (start, end, want) in [
        (None, None, 10),
        (Some(T0 - 1000 * SECOND), Some(T0 + 1000 * SECOND), 10), // wider than the archive
        (Some(T0 + SECOND), Some(T0 + 10 * SECOND), 10),          // exactly the archive
        (Some(T0 + 2 * SECOND), Some(T0 + 9 * SECOND), 8),        // most of it
        (Some(T0 + 2 * SECOND), None, 9),
        (None, Some(T0 + 9 * SECOND), 9),
        (Some(T0 + 4 * SECOND), Some(T0 + 5 * SECOND), 2),        // a small part
        (Some(T0 + 11 * SECOND), None, 0),                        // after it
        (None, Some(T0), 0),                                      // before it
    ] {
        let page = find(
            &store,
            Query {
                start,
                end,
                limit: Some(0),
                total: true,
                ..Query::default()
            },
        );
        assert_eq!(page.total, Some(want), "start {start:?} end {end:?}");
    }
}

#[test]
fn with_totals_are_exact_through_windows_expiry_quota_import_and_deletion() {
    let dir = TempDir::new().unwrap();
    let store = romeo_with_ten_rows(&dir); // juliet 1 2 4 5 7 8 10, mercutio 3 6 9
    store
        .append(&[row(&archive("example.com", "benvolio", "archive"), ArchiveId::first_at(T0 + 5 * SECOND + 1), "juliet@capulet.lit")])
        .unwrap();
    let total = |store: &Backend, with: &str, start: Option<i64>, end: Option<i64>| {
        find(
            store,
            Query {
                with: Some(with.to_owned()),
                start: start.map(|n| T0 + n * SECOND),
                end: end.map(|n| T0 + n * SECOND),
                limit: Some(0),
                total: true,
                ..Query::default()
            },
        )
        .total
    };
    let juliet = "juliet@capulet.lit";
    let mercutio = "mercutio@example.net";
    for (start, end, want) in [
        (None, None, 7),
        (Some(-1000), Some(1000), 7),
        (Some(2), Some(9), 5), // most of them: total minus the rows outside
        (Some(2), None, 6),
        (None, Some(8), 6),
        (Some(4), Some(5), 2),
        (Some(11), None, 0),
    ] {
        assert_eq!(total(&store, juliet, start, end), Some(want), "{start:?} {end:?}");
    }
    assert_eq!(with_total(&store, mercutio), Some(3));
    assert_eq!(with_total(&store, "nobody@example.net"), Some(0));

    // Expiry of rows 1..=4.
    assert_eq!(expire_all(&store, ExpiryRule::Age { end: id(4).micros() }), 4);
    assert_eq!(with_total(&store, juliet), Some(4));
    assert_eq!(with_total(&store, mercutio), Some(2));

    // A quota drops the oldest rows.
    let full = |n: i64| NewItem {
        quota: Some(8),
        ..row(&romeo(), id(n), juliet)
    };
    store.append(&[full(11), full(12)]).unwrap();
    let left = find(&store, Query { limit: Some(100), ..Query::default() });
    let juliet_left = left.items.iter().filter(|i| i.with == juliet).count() as u64;
    let mercutio_left = left.items.iter().filter(|i| i.with == mercutio).count() as u64;
    assert_eq!(with_total(&store, juliet), Some(juliet_left));
    assert_eq!(with_total(&store, mercutio), Some(mercutio_left));

    // Imported rows count too.
    store
        .import(&romeo(), "stock", &[stock(30), stock(31)], 2)
        .unwrap();
    let with_imported = find(&store, Query { limit: Some(100), ..Query::default() })
        .items
        .iter()
        .filter(|i| i.with == juliet)
        .count() as u64;
    assert_eq!(with_total(&store, juliet), Some(with_imported));

    // Deleting the archive empties its totals; benvolio's stay.
    while store.delete_archive(&romeo(), 3).unwrap() > 0 {}
    assert_eq!(with_total(&store, juliet), Some(0));
    assert_eq!(with_total(&store, mercutio), Some(0));
    let benvolio = store
        .find(
            &archive("example.com", "benvolio", "archive"),
            &Query { with: Some(juliet.to_owned()), limit: Some(0), total: true, ..Query::default() },
        )
        .unwrap();
    assert_eq!(benvolio.total, Some(1));
    store.append(&[row(&romeo(), id(40), juliet)]).unwrap();
    assert_eq!(with_total(&store, juliet), Some(1));
}

/// Compression, for a backend that has it (`store::codec`): `compressed` opens the store at a
/// directory with `archive_compression` on, `kinds` counts its (text, compressed) rows. Rows
/// written before a dictionary stay text and the rest are compressed; every row reads back as
/// written, also through another opening of the store; `optimize` compresses the text rows;
/// with compression off, compressed rows stay readable and new ones are text.
fn compression_round_trip(
    compressed: impl Fn(&TempDir) -> Backend,
    kinds: impl Fn(&Backend) -> (i64, i64),
) {
    let dir = TempDir::new().unwrap();
    let store = compressed(&dir);
    let text = |n: i64| {
        format!(
            "<message xmlns='jabber:client' from='romeo@example.com/phone' to='juliet@capulet.lit' \
             type='chat' id='m{n}'><body>message number {n}, wherefore art thou</body></message>"
        )
    };
    let rows: Vec<NewItem> = (1..=3000)
        .map(|n| NewItem {
            stanza: text(n),
            ..row(&romeo(), id(n), with_of(n))
        })
        .collect();
    for chunk in rows.chunks(500) {
        store.append(chunk).unwrap();
    }
    assert_eq!(kinds(&store), (1000, 2000), "rows before the dictionary stay text");
    let all = find(&store, Query::default());
    assert_eq!(all.items.len(), 3000);
    for (n, item) in (1..).zip(&all.items) {
        assert_eq!(item.stanza, text(n));
    }
    let other = open(&dir);
    let newest = Query {
        with: Some(with_of(2999).to_owned()),
        reverse: true,
        limit: Some(1),
        ..Query::default()
    };
    assert_eq!(find(&other, newest).items[0].stanza, text(2999));
    drop(other);

    let report = store.optimize(false).unwrap();
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("compression: 1000 messages")),
        "{report:?}"
    );
    assert_eq!(kinds(&store), (0, 3000));
    let bytes = store.stats("example.com", "archive", None).unwrap().bytes;
    assert!(
        bytes < 3000 * text(1).len() as u64 / 2,
        "{bytes} bytes stored"
    );
    drop(store);

    // Turned off: compressed rows stay readable, new ones are text.
    let plain = open(&dir);
    plain.append(&[row(&romeo(), id(5000), "x@y")]).unwrap();
    let all = plain.find(&romeo(), &Query::default()).unwrap();
    assert_eq!(all.items.len(), 3001);
    assert_eq!(all.items[0].stanza, text(1));
    assert_eq!(kinds(&plain), (1, 3000));
}

/// Compression, for a backend that has it: a batch that fails after training the dictionary
/// (here on a duplicate id) does not take the dictionary with it, so the rows compressed next
/// read back.
fn compression_keeps_a_dictionary_trained_by_a_failed_batch(compressed: impl Fn(&TempDir) -> Backend) {
    let dir = TempDir::new().unwrap();
    let store = compressed(&dir);
    let rows: Vec<NewItem> = (1..=2500).map(|n| row(&romeo(), id(n), with_of(n))).collect();
    store.append(&rows[..1000]).unwrap(); // too few rows to train on before these
    let mut failing = rows[1000..2000].to_vec();
    failing.push(row(&romeo(), id(1), "x@y")); // id 1 is taken: the batch fails
    assert!(store.append(&failing).is_err());
    store.append(&rows[1000..]).unwrap(); // compressed with the dictionary the failure trained
    drop(store);
    let all = find(&open(&dir), Query { limit: Some(3000), ..Query::default() });
    assert_eq!(all.items.len(), 2500);
    for (item, want) in all.items.iter().zip(&rows) {
        assert_eq!(item.stanza, want.stanza);
    }
}

/// Compression on a database several processes write to: the first dictionary trained is the
/// one every process uses. `kinds` counts (text, compressed) rows, `dictionaries` lists the
/// stored dictionaries' ids.
#[allow(dead_code)] // Not SQLite: one process writes a file.
fn compression_shares_the_first_dictionary(
    compressed: impl Fn(&TempDir) -> Backend,
    kinds: impl Fn(&Backend) -> (i64, i64),
    dictionaries: impl Fn(&Backend) -> Vec<i64>,
) {
    let dir = TempDir::new().unwrap();
    let one = compressed(&dir);
    let two = compressed(&dir);
    let rows: Vec<NewItem> = (1..=2500).map(|n| row(&romeo(), id(n), with_of(n))).collect();
    one.append(&rows[..1000]).unwrap(); // too few rows to train on before these
    one.append(&rows[1000..2000]).unwrap(); // trains dictionary 1, then compresses these
    two.append(&rows[2000..]).unwrap(); // finds dictionary 1 and compresses with it
    assert_eq!(dictionaries(&one), vec![1]);
    assert_eq!(kinds(&one), (1000, 1500));
    // Each reads what the other wrote.
    for store in [&one, &two] {
        let all = find(store, Query { limit: Some(3000), ..Query::default() });
        assert_eq!(all.items.len(), 2500);
        for (item, want) in all.items.iter().zip(&rows) {
            assert_eq!(item.stanza, want.stanza);
        }
    }
}
