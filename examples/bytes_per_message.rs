//! Bytes on disk per archived message: appends N messages with 80-character bodies (two
//! users writing to each other, ids like a client's) the way the writer does, then reports
//! the database file size per message after a checkpoint.
//!
//! cargo run --release --no-default-features --example bytes_per_message -- [N] [compress]

use mam_rs_native::id::ArchiveId;
use mam_rs_native::store::sqlite::{SqliteOptions, SqliteStore};
use mam_rs_native::store::{ArchiveRef, NewItem, Store};
use std::sync::Arc;

fn main() {
    let n: i64 = std::env::args()
        .nth(1)
        .map_or(200_000, |a| a.parse().expect("N"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bytes.sqlite");
    let compression = std::env::args().nth(2).as_deref() == Some("compress");
    let options = SqliteOptions {
        compression,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&path, &options).expect("open");
    let users = ["romeo", "juliet"];
    let words = [
        "wherefore",
        "art",
        "thou",
        "rose",
        "by",
        "any",
        "other",
        "name",
        "would",
        "smell",
        "as",
        "sweet",
        "parting",
        "is",
        "such",
        "sorrow",
    ];
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let t0 = 1_700_000_000_000_000i64;
    let mut batch = Vec::with_capacity(1000);
    for i in 0..n {
        let mut body = String::new();
        while body.len() < 80 {
            body.push_str(words[(next() % words.len() as u64) as usize]);
            body.push(' ');
        }
        body.truncate(80);
        let (me, other) = (users[(i % 2) as usize], users[((i + 1) % 2) as usize]);
        let msg_id = format!("{:016x}{:016x}", next(), next());
        for (owner, with) in [(me, other), (other, me)] {
            batch.push(NewItem {
                archive: ArchiveRef {
                    host: Arc::from("localhost"),
                    user: owner.to_string(),
                    store: Arc::from("archive"),
                },
                id: ArchiveId::first_at(t0 + i * 1000 + i64::from(owner == users[1])),
                with: format!("{with}@localhost"),
                stanza: format!(
                    "<message xmlns='jabber:client' from='{me}@localhost/phone' id='{msg_id}' \
                     to='{other}@localhost' type='chat'><body>{body}</body></message>"
                ),
                quota: None,
            });
        }
        if batch.len() >= 1000 {
            store.append(&batch).expect("append");
            batch.clear();
        }
    }
    store.append(&batch).expect("append");
    let report = store.optimize(true).expect("optimize");
    let size = std::fs::metadata(&path).expect("stat").len();
    let rows = 2 * n;
    println!("{}", report.join("\n"));
    println!(
        "{rows} rows, {size} bytes: {:.1} bytes per archived message (compression {})",
        size as f64 / rows as f64,
        if compression { "on" } else { "off" }
    );
}
