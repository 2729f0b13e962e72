//! `MamQuery::parse` on fuzzed queries, then `plan` on what it accepts. Must never panic.
//!
//! Each input is tried three ways: as a whole element, as the children of a
//! `<query xmlns='urn:xmpp:mam:2'>`, and as the fields of a MAM search form inside one (so
//! that the fuzzer reaches the field parsing without having to invent the boilerplate).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mam_rs_native::protocol::xep0313::{Limits, MamQuery};
use minidom::Element;

fn check(query: &Element) {
    let Ok(q) = MamQuery::parse(query) else {
        return;
    };
    for limits in [
        Limits::default(),
        Limits {
            default_max: 0,
            max_max: 0,
            include_total: false,
            ..Limits::default()
        },
        Limits {
            default_max: u32::MAX,
            max_max: u32::MAX,
            include_total: false,
            ..Limits::default()
        },
    ] {
        let _ = q.within(&limits);
        let plan = q.plan(&limits);
        assert!(plan.qmax <= limits.max_max, "qmax above max_max: {plan:?}");
        let expected_limit = if plan.qmax == 0 { 0 } else { plan.qmax.saturating_add(1) };
        assert_eq!(plan.store.limit, Some(expected_limit), "{plan:?}");
        assert_eq!(plan.reverse, plan.store.reverse);
        assert_eq!(plan.store.with, q.with);
        assert_eq!(plan.store.ids, q.ids);
        if plan.qmax == 0 || limits.include_total {
            assert!(plan.store.total);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(xml) = common::text(data) else {
        return;
    };
    if let Some(el) = common::element(xml) {
        check(&el);
    }
    if let Some(el) = common::wrapped("<query xmlns='urn:xmpp:mam:2' queryid='q1'>", xml, "</query>") {
        check(&el);
    }
    if let Some(el) = common::wrapped(
        "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
         <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>",
        xml,
        "</x></query>",
    ) {
        check(&el);
    }
});
