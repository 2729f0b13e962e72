//! The per-message work of the archive path: classification (`archive-should-store`), id
//! generation, and preparing the stored copy (namespace stripping, and serialisation on the
//! writer thread; the shim removes spoofed stanza-ids from the live stanza before this). Store appends and query pages are in `store.rs`.
//!
//! Run: `cargo bench --no-default-features --bench archive_path`

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use mam_rs_native::config::CHATSTATES;
use mam_rs_native::id::IdGenerator;
use mam_rs_native::policy::{should_store, strip_for_storage, Summary};
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
}

fn stored_copy(c: &mut Criterion) {
    let chat: Element = CHAT.parse().unwrap();
    let strip = BTreeSet::from([CHATSTATES.to_string()]);
    c.bench_function("stored copy/strip + serialise", |b| {
        b.iter(|| {
            let mut stored = chat.clone();
            strip_for_storage(&mut stored, &strip);
            let mut xml = Vec::with_capacity(512);
            stored.write_to(&mut xml).unwrap();
            black_box(xml)
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3));
    targets = classification, ids, stored_copy
}
criterion_main!(benches);
