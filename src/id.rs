//! Archive ids: 63-bit, time-ordered values, shown to clients as short opaque strings.
//!
//! An id is `(unix_microseconds << SEQ_BITS) | sequence`. The timestamp of a message is the
//! time part of its id, so one index on `(archive, id)` answers both id ranges and time ranges.
//! Ids are handed out in hook order by one [`IdGenerator`]; when the clock stands still or goes
//! backwards the generator keeps counting up, so ids never collide and never go backwards.
//! With 11 sequence bits the time part fits a signed 64-bit integer until the year 2112.
//!
//! The lowest [`NODE_BITS`] of the sequence are the writer's node number: several Prosody
//! processes sharing one database server each claim a different node (see
//! `Store::claim_node`), so their ids cannot collide even in the same microsecond. The
//! sequence's top bit is left to imported rows (`store::rows::import_id`).
//!
//! This module owns the id layout and its text form; it does not know where ids are stored.

use std::fmt;

/// Bits of the id that hold a per-microsecond sequence number.
pub const SEQ_BITS: u32 = 11;

/// Bits of the sequence that hold the node number of the process that made the id.
pub const NODE_BITS: u32 = 4;

/// How many processes can write to one database at once.
pub const NODES: u16 = 1 << NODE_BITS;

/// The largest timestamp an id can hold (in the year 2112); later times are clamped to it.
pub const MAX_MICROS: i64 = (1 << (63 - SEQ_BITS)) - 1;

/// Length of the text form of an id.
pub const TEXT_LEN: usize = 13;

/// Crockford's base32 alphabet, lower case: no i, l, o or u, so ids read unambiguously.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// One message's archive id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArchiveId(u64);

impl ArchiveId {
    /// The smallest id whose timestamp is `micros` (for "start" bounds).
    pub fn first_at(micros: i64) -> ArchiveId {
        ArchiveId((micros.clamp(0, MAX_MICROS) as u64) << SEQ_BITS)
    }

    /// The largest id whose timestamp is `micros` (for "end" bounds).
    pub fn last_at(micros: i64) -> ArchiveId {
        ArchiveId(((micros.clamp(0, MAX_MICROS) as u64) << SEQ_BITS) | ((1 << SEQ_BITS) - 1))
    }

    /// The id as stored: a non-negative 64-bit integer.
    pub fn as_i64(self) -> i64 {
        self.0 as i64
    }

    /// An id read back from storage. Negative values are not ids.
    pub fn from_i64(v: i64) -> Option<ArchiveId> {
        (v >= 0).then_some(ArchiveId(v as u64))
    }

    /// Unix time of the message, in microseconds.
    pub fn micros(self) -> i64 {
        (self.0 >> SEQ_BITS) as i64
    }

    /// Parses the text form. Anything that is not exactly a text form of an id gives `None`.
    pub fn parse(text: &str) -> Option<ArchiveId> {
        if text.len() != TEXT_LEN {
            return None;
        }
        let mut v: u64 = 0;
        for &b in text.as_bytes() {
            let digit = ALPHABET.iter().position(|&a| a == b)? as u64;
            v = v.checked_mul(32)?.checked_add(digit)?;
        }
        // 13 base32 digits hold 65 bits; a valid id uses 63.
        (v >> 63 == 0).then_some(ArchiveId(v))
    }
}

impl fmt::Display for ArchiveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; TEXT_LEN];
        let mut v = self.0;
        for slot in buf.iter_mut().rev() {
            *slot = ALPHABET[(v & 31) as usize];
            v >>= 5;
        }
        // The alphabet is ASCII, so this cannot fail.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

/// Hands out strictly increasing ids, each carrying its node number.
#[derive(Debug, Default)]
pub struct IdGenerator {
    last: u64,
    node: u64,
}

impl IdGenerator {
    /// A generator for node 0 that will never hand out an id at or below `last` (for example
    /// the newest id already in the database).
    pub fn starting_after(last: Option<ArchiveId>) -> IdGenerator {
        IdGenerator::for_node(0, last)
    }

    /// A generator for `node` (below [`NODES`]; taken modulo it) that will never hand out an
    /// id at or below `last`.
    pub fn for_node(node: u16, last: Option<ArchiveId>) -> IdGenerator {
        IdGenerator {
            last: last.map_or(0, |id| id.0),
            node: u64::from(node % NODES),
        }
    }

    /// The next id for a message archived at `now_micros`.
    pub fn next(&mut self, now_micros: i64) -> ArchiveId {
        let candidate = ArchiveId::first_at(now_micros).0 | self.node;
        // The next slot of this node after `last`, whichever node `last` came from.
        let after_last = (((self.last >> NODE_BITS) + 1) << NODE_BITS) | self.node;
        self.last = candidate.max(after_last);
        ArchiveId(self.last)
    }

    /// The next id for a message archived now.
    pub fn next_now(&mut self) -> ArchiveId {
        self.next(now_micros())
    }
}

/// The current Unix time in microseconds.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_is_fixed_width() {
        let mut g = IdGenerator::default();
        let id = g.next(1_763_683_200_123_456);
        let text = id.to_string();
        assert_eq!(text.len(), TEXT_LEN);
        assert_eq!(ArchiveId::parse(&text), Some(id));
    }

    #[test]
    fn text_order_is_id_order() {
        let a = ArchiveId::first_at(1_000_000);
        let b = ArchiveId::first_at(2_000_000);
        assert!(a.to_string() < b.to_string());
    }

    #[test]
    fn ids_increase_when_clock_stands_still_or_goes_back() {
        let mut g = IdGenerator::default();
        let a = g.next(5_000_000);
        let b = g.next(5_000_000);
        let c = g.next(4_000_000);
        assert!(a < b && b < c);
        assert_eq!(a.micros(), 5_000_000);
        assert_eq!(c.micros(), 5_000_000);
    }

    #[test]
    fn nodes_never_share_an_id_even_in_the_same_microsecond() {
        let stored = Some(ArchiveId::first_at(5_000_000));
        let mut a = IdGenerator::for_node(1, stored);
        let mut b = IdGenerator::for_node(2, stored);
        let mut seen = std::collections::HashSet::new();
        for now in [5_000_000, 5_000_000, 5_000_001, 4_000_000, 5_000_001] {
            for id in [a.next(now), b.next(now)] {
                assert!(seen.insert(id), "{id:?} handed out twice");
            }
        }
        let (x, y) = (a.next(6_000_000), b.next(6_000_000));
        assert_eq!((x.as_i64() & 15, y.as_i64() & 15), (1, 2));
        assert_eq!((x.micros(), y.micros()), (6_000_000, 6_000_000));
        // Each node's ids still increase, and resume after ids of any other node.
        let mut c = IdGenerator::for_node(3, Some(y));
        assert!(c.next(1) > y);
    }

    #[test]
    fn generator_resumes_after_stored_ids() {
        let stored = ArchiveId::first_at(9_000_000);
        let mut g = IdGenerator::starting_after(Some(stored));
        assert!(g.next(1) > stored);
    }

    #[test]
    fn time_bounds_bracket_every_id_of_that_microsecond() {
        let mut g = IdGenerator::default();
        let id = g.next(7_000_000);
        assert!(ArchiveId::first_at(7_000_000) <= id && id <= ArchiveId::last_at(7_000_000));
        assert!(ArchiveId::last_at(6_999_999) < id);
    }

    #[test]
    fn parse_rejects_foreign_strings() {
        for bad in [
            "",
            "75324cdf-f4a9-4dd3-82f3-1b9e64be053c",
            "mcp1KrfiWm6moYB79Ym4scPs",
            "0000000000000I",
            "zzzzzzzzzzzzz", // 65 bits
            "000000000000u",
        ] {
            assert_eq!(ArchiveId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn far_future_and_past_bounds_clamp_instead_of_wrapping() {
        // 9999-12-31T23:59:59Z, a valid XEP-0082 date a client may send.
        let y9999 = 253_402_300_799_000_000;
        assert_eq!(ArchiveId::last_at(y9999), ArchiveId::last_at(MAX_MICROS));
        assert!(ArchiveId::last_at(y9999).as_i64() > 0);
        assert_eq!(ArchiveId::first_at(-5), ArchiveId::first_at(0));
    }

    #[test]
    fn stored_form_round_trips() {
        let id = ArchiveId::last_at(1_763_683_200_000_000);
        assert_eq!(ArchiveId::from_i64(id.as_i64()), Some(id));
        assert_eq!(ArchiveId::from_i64(-1), None);
    }
}
