//! `ArchiveId::parse` on arbitrary strings: what it accepts must print back as the same text
//! and survive the stored (i64) form. Also the text form of an arbitrary stored value (the
//! first 8 bytes) must parse back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mam_rs_native::id::{ArchiveId, TEXT_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(id) = ArchiveId::parse(s) {
            assert_eq!(id.to_string(), s);
            assert_eq!(ArchiveId::from_i64(id.as_i64()), Some(id));
            assert!(id.micros() >= 0);
        }
    }
    if let Some(bytes) = data.get(..8) {
        let v = i64::from_le_bytes(bytes.try_into().unwrap());
        if let Some(id) = ArchiveId::from_i64(v) {
            let text = id.to_string();
            assert_eq!(text.len(), TEXT_LEN);
            assert_eq!(ArchiveId::parse(&text), Some(id), "{v} as {text:?}");
        }
    }
});
