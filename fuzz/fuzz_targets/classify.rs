//! The archiving decision on fuzzed messages: `Summary::of` and `should_store` must never
//! panic, give a known reason, and see every direct child. (`dont_archive_namespaces` is
//! stripped while the stored copy is written from the Lua table, so it needs Lua: the busted
//! specs cover it.) The text the stored copy is written with round-trips: `xml_text`.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mam_rs_native::policy::{should_store, Summary};
use mam_rs_native::protocol::xml_text;
use minidom::Element;

const REASONS: &[&str] = &[
    "headline",
    "bounce",
    "groupchat",
    "hint",
    "body",
    "subject",
    "encrypted",
    "receipt",
    "marker",
    "invite",
    "jingle call",
    "default",
];

fn check(message: &Element) {
    let summary = Summary::of(message);
    assert_eq!(summary.children.len(), message.children().count());
    let (_, reason) = should_store(&summary);
    assert!(REASONS.contains(&reason), "unknown reason {reason:?}");

    // Every text and attribute value the parser accepted is written back as XML text that
    // parses to the same string.
    for node in message.nodes() {
        if let Some(text) = node.as_text() {
            let mut out = String::new();
            xml_text::escape(&mut out, text, false).expect("parsed text is XML text");
            let again: Element = format!("<t xmlns='urn:x'>{out}</t>")
                .parse()
                .expect("escaped text parses");
            assert_eq!(again.text(), *text);
        }
    }
    for (_, value) in message.attrs() {
        let mut out = String::new();
        xml_text::escape(&mut out, value, true).expect("parsed attribute is XML text");
        let again: Element = format!("<t xmlns='urn:x' v=\"{out}\"/>")
            .parse()
            .expect("escaped attribute parses");
        assert_eq!(again.attr("v"), Some(value.as_str()));
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte chose namespaces to strip when stripping was a Rust function; the corpus
    // keeps its layout.
    let Some((_, rest)) = data.split_first() else {
        return;
    };
    let Some(xml) = common::text(rest) else {
        return;
    };
    if let Some(el) = common::element(xml) {
        check(&el);
    }
    if let Some(el) = common::wrapped(
        "<message xmlns='jabber:client' type='chat' to='juliet@capulet.lit/balcony' id='m1'>",
        xml,
        "</message>",
    ) {
        check(&el);
    }
});
