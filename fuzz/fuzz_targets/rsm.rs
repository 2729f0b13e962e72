//! `SetQuery::get` on fuzzed `<set/>`s: whole elements, and fuzzed children of a
//! `<set xmlns='http://jabber.org/protocol/rsm'>` in a query. Must never panic; what it
//! accepts must build back to a `<set/>` that reads the same.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mam_rs_native::protocol::xep0059::SetQuery;
use minidom::Element;

fn check(parent: &Element) {
    let Ok(Some(q)) = SetQuery::get(parent) else {
        return;
    };
    let built = Element::from(&q);
    assert_eq!(SetQuery::parse(&built).as_ref(), Ok(&q), "built {built:?}");
    let wire = common::reserialised(&built);
    assert_eq!(SetQuery::parse(&wire).as_ref(), Ok(&q), "reserialised {wire:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some(xml) = common::text(data) else {
        return;
    };
    if let Some(el) = common::element(xml) {
        check(&el);
        // The element may itself be the <set/>.
        let _ = SetQuery::parse(&el);
    }
    if let Some(el) = common::wrapped(
        "<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'>",
        xml,
        "</set></query>",
    ) {
        check(&el);
    }
});
