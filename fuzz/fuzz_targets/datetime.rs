//! XEP-0082 date-times: `parse` on arbitrary strings must not panic, and whatever it accepts
//! within the years 0000-9999 must survive `format` then `parse` unchanged. Also `format` of an
//! arbitrary instant (the first 8 bytes), which, when it parses back, must give the same instant.
//!
//! Like stock (os.time), `parse` normalises out-of-range fields and offsets, which can carry a
//! date outside 0000-9999; `format` (used only for the times of archive ids, 1970-2112) cannot
//! write those with four digits, so the round trip is only asked of four-digit years. The seeds
//! in corpus/datetime/roundtrip-* are the inputs that first showed this.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mam_rs_native::protocol::xep0082::{format, parse};

/// 0000-01-01T00:00:00Z and 10000-01-01T00:00:00Z in Unix microseconds: the instants
/// `format` can write with a four-digit year.
const FOUR_DIGIT_YEARS: std::ops::Range<i64> = -62_167_219_200_000_000..253_402_300_800_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(t) = parse(s).filter(|t| FOUR_DIGIT_YEARS.contains(t)) {
            let text = format(t);
            assert_eq!(parse(&text), Some(t), "{s:?} parsed to {t}, formatted as {text:?}");
        }
    }
    if let Some(bytes) = data.get(..8) {
        let t = i64::from_le_bytes(bytes.try_into().unwrap());
        let text = format(t);
        match parse(&text) {
            Some(back) => assert_eq!(back, t, "{t} formatted as {text:?}"),
            None => assert!(!FOUR_DIGIT_YEARS.contains(&t), "{t} formatted as {text:?}, which does not parse"),
        }
    }
});
