//! `Prefs::parse` on fuzzed `<prefs/>`s, then `Element::from(&prefs)` and `Prefs::parse`
//! again (also through XML text) must give the same preferences. Must never panic.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mam_rs_native::protocol::xep0441::Prefs;
use minidom::Element;

fn check(el: &Element) {
    let prefs = Prefs::parse(el);
    let built = Element::from(&prefs);
    let again = Prefs::parse(&built);
    assert_eq!(again, prefs, "built {built:?}");
    let wire = common::reserialised(&built);
    assert_eq!(Prefs::parse(&wire), prefs, "reserialised {wire:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some(xml) = common::text(data) else {
        return;
    };
    if let Some(el) = common::element(xml) {
        check(&el);
    }
    if let Some(el) = common::wrapped("<prefs xmlns='urn:xmpp:mam:2' default='roster'>", xml, "</prefs>") {
        check(&el);
    }
});
