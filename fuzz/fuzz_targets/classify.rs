//! The archiving decision on fuzzed messages: `Summary::of`, `should_store` and
//! `strip_for_storage`. Must never panic; stripping must remove exactly the direct children
//! in the given namespaces and keep everything else in order.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mam_rs_native::policy::{should_store, strip_for_storage, Summary};
use minidom::{Element, Node};
use std::collections::BTreeSet;

const REASONS: &[&str] = &[
    "headline", "bounce", "groupchat", "hint", "body", "subject", "encrypted", "receipt",
    "marker", "invite", "jingle call", "default",
];

fn kept(el: &Element, namespaces: &BTreeSet<String>) -> Vec<Node> {
    el.nodes()
        .filter(|n| !n.as_element().is_some_and(|e| namespaces.contains(&e.ns())))
        .cloned()
        .collect()
}

fn check(message: &Element, selector: u8) {
    let summary = Summary::of(message);
    assert_eq!(summary.children.len(), message.children().count());
    let (_, reason) = should_store(&summary);
    assert!(REASONS.contains(&reason), "unknown reason {reason:?}");

    // Strip a selection of the namespaces present (chosen by the bits of `selector`), plus
    // the usual configured ones.
    let mut namespaces: BTreeSet<String> = message
        .children()
        .enumerate()
        .filter(|(i, _)| selector & (1 << (i % 8)) != 0)
        .map(|(_, c)| c.ns())
        .collect();
    if selector & 1 != 0 {
        namespaces.insert("http://jabber.org/protocol/chatstates".to_owned());
    }
    for set in [BTreeSet::new(), namespaces] {
        let mut stored = message.clone();
        let expected = kept(message, &set);
        let any_left = strip_for_storage(&mut stored, &set);
        assert_eq!(any_left, stored.children().next().is_some());
        assert_eq!(stored.nodes().cloned().collect::<Vec<_>>(), expected, "{set:?}");
        assert_eq!(stored.name(), message.name());
        assert_eq!(stored.ns(), message.ns());
        assert!(stored.attrs().eq(message.attrs()));
        let _ = should_store(&Summary::of(&stored));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Some(xml) = common::text(rest) else {
        return;
    };
    if let Some(el) = common::element(xml) {
        check(&el, selector);
    }
    if let Some(el) = common::wrapped(
        "<message xmlns='jabber:client' type='chat' to='juliet@capulet.lit/balcony' id='m1'>",
        xml,
        "</message>",
    ) {
        check(&el, selector);
    }
});
