//! The hot functions outside the store:
//!
//! - the per-message work of the archive path: classification (`archive-should-store`), id
//!   generation and the id's text form (the stored copy is written straight from the Lua
//!   table, `src/lua/stanza.rs`, so it needs Lua and is measured end to end by `make bench`);
//! - the per-query work: parsing a `<query/>` and planning it, and building the result
//!   messages and `<fin/>` of a page from the store's rows (parsing each stored stanza), which
//!   runs on a query worker. Turning those into `util.stanza` tables needs Lua and is measured
//!   end to end by `make bench`.
//!
//! Store appends (against SQLite's own batched insert rate) and query pages are in `store.rs`.
//!
//! Run: `cargo bench --no-default-features --bench archive_path` (or `make bench-micro`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use mam_rs_native::id::{ArchiveId, IdGenerator};
use mam_rs_native::policy::{should_store, Summary};
use mam_rs_native::protocol::xep0313::{respond, Limits, MamQuery};
use mam_rs_native::store::{Item, Page};
use minidom::Element;

/// A typical chat message with a body, a chat state, a receipt request and an origin-id.
const CHAT: &str = "<message xmlns='jabber:client' from='romeo@example.com/orchard' to='juliet@example.com' type='chat' id='a8c4' xml:lang='en'><body>Art thou not Romeo, and a Montague?</body><active xmlns='http://jabber.org/protocol/chatstates'/><request xmlns='urn:xmpp:receipts'/><markable xmlns='urn:xmpp:chat-markers:0'/><origin-id xmlns='urn:xmpp:sid:0' id='de305d54'/></message>";

/// A chat-state notification: the most common message that is not archived.
const TYPING: &str = "<message xmlns='jabber:client' from='romeo@example.com/orchard' to='juliet@example.com' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>";

fn classification(c: &mut Criterion) {
    let chat: Element = CHAT.parse().unwrap();
    let typing: Element = TYPING.parse().unwrap();
    let chat_summary = Summary::of(&chat);
    let typing_summary = Summary::of(&typing);
    c.bench_function("should_store/chat with body", |b| {
        b.iter(|| should_store(black_box(&chat_summary)))
    });
    c.bench_function("should_store/chat state only", |b| {
        b.iter(|| should_store(black_box(&typing_summary)))
    });
    c.bench_function("summary+should_store/chat with body", |b| {
        b.iter(|| should_store(&Summary::of(black_box(&chat))))
    });
}

fn ids(c: &mut Criterion) {
    let mut generator = IdGenerator::default();
    c.bench_function("id/next_now", |b| {
        b.iter(|| black_box(generator.next_now()))
    });
    let mut generator = IdGenerator::default();
    c.bench_function("id/next_now + text form", |b| {
        b.iter(|| black_box(generator.next_now().to_string()))
    });
    let id = ArchiveId::first_at(1_700_000_000_123_456);
    c.bench_function("id/text form", |b| {
        b.iter(|| black_box(black_box(id).to_string()))
    });
    let text = id.to_string();
    c.bench_function("id/parse text form", |b| {
        b.iter(|| black_box(ArchiveId::parse(black_box(&text))))
    });
}

/// A client's query: `with` one contact, a time window, the newest page of 50 with RSM.
const QUERY: &str = "<query xmlns='urn:xmpp:mam:2' queryid='f27'>\
    <x xmlns='jabber:x:data' type='submit'>\
    <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>\
    <field var='with'><value>juliet@capulet.lit</value></field>\
    <field var='start'><value>2023-11-14T00:00:00Z</value></field>\
    <field var='end'><value>2023-11-15T00:00:00.000000Z</value></field></x>\
    <set xmlns='http://jabber.org/protocol/rsm'><max>50</max><before/></set></query>";

/// The usual "sync from my last id" query: RSM only.
const QUERY_AFTER: &str = "<query xmlns='urn:xmpp:mam:2' queryid='q1'>\
    <set xmlns='http://jabber.org/protocol/rsm'><max>50</max><after>0jzbq8p7n0000</after></set></query>";

fn query_parsing(c: &mut Criterion) {
    let limits = Limits::default();
    for (name, xml) in [("form + rsm", QUERY), ("rsm after", QUERY_AFTER)] {
        let el: Element = xml.parse().unwrap();
        c.bench_function(&format!("query/parse + plan ({name})"), |b| {
            b.iter(|| {
                let q = MamQuery::parse(black_box(&el)).unwrap();
                black_box(q.plan(&limits))
            })
        });
    }
}

/// A page as the store returns it: `n` rows of a stored chat message (as the writer stores it).
fn page(n: usize) -> Page {
    let items = (0..n)
        .map(|i| {
            let id = ArchiveId::first_at(1_700_000_000_000_000 + i as i64 * 1000);
            Item {
                id,
                key: None,
                with: "juliet@capulet.lit".to_owned(),
                stanza: format!(
                    "<message xmlns='jabber:client' from='romeo@montague.lit/orchard' \
                     to='juliet@capulet.lit' type='chat' id='m{i}' xml:lang='en'><body>message \
                     {i}: but soft, what light through yonder window breaks? It is the east.</body>\
                     <origin-id xmlns='urn:xmpp:sid:0' id='o{i}'/></message>"
                ),
            }
        })
        .collect();
    Page {
        items,
        total: Some(1_000_000),
    }
}

fn result_building(c: &mut Criterion) {
    let limits = Limits {
        max_max: 250,
        ..Limits::default()
    };
    let query = MamQuery::parse(&QUERY_AFTER.parse().unwrap()).unwrap();
    for n in [1usize, 50, 250] {
        let mut plan = query.plan(&limits);
        plan.qmax = n as u32;
        // The store is asked for one more row than the page holds.
        let rows = page(n + 1);
        c.bench_function(&format!("results/respond, page of {n}"), |b| {
            b.iter_batched(
                || rows.clone(),
                |rows| {
                    black_box(respond(
                        &query,
                        &plan,
                        rows,
                        Some("romeo@montague.lit/orchard"),
                        Some("romeo@montague.lit"),
                    ))
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3));
    targets = classification, ids, query_parsing, result_building
}
criterion_main!(benches);
