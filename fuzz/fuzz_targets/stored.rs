//! Reading stored stanzas back: the small reader (`stored::read_small`) must never panic,
//! and whatever it takes it reads exactly as `minidom` does; `parse_stored` (small reader,
//! then `minidom` for the rest) must give what `minidom` alone gives, or fail where it fails.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mam_rs_native::protocol::stored::{parse_stored, read_small, read_with_minidom};

fuzz_target!(|data: &[u8]| {
    let Some(xml) = common::text(data) else {
        return;
    };
    let general = read_with_minidom(xml);
    if let Some(small) = read_small(xml) {
        assert_eq!(Ok(&small), general.as_ref(), "the small reader on {xml:?}");
    }
    assert_eq!(parse_stored(xml).ok(), general.ok(), "parse_stored on {xml:?}");
});
