//! XEP-0059 result set management: the `<set/>` a client puts in a query ([`SetQuery`]) and
//! the `<set/>` that closes a result page ([`SetResult`]).
//!
//! Parsing follows Prosody's util/rsm.lua: a `<set/>` counts only when it has a child element;
//! `<max>`/`<index>` are read like Lua's `tonumber` (non-numeric means absent); an empty
//! `<before/>` means "the last page". Deliberate difference: a negative or fractional `<max>`
//! is a `bad-request` here (stock sends nonsense or an internal-server-error).
//!
//! This module does not decide what the values mean for a query (clamping `max`, RSM against
//! form ids): that is [`super::xep0313`]'s job.

use super::{ns, text_only, StanzaError};
use minidom::Element;

/// The `<set/>` of a query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetQuery {
    /// `<max>`: at most this many items. Larger values than `u32::MAX` saturate.
    pub max: Option<u32>,
    /// `<before>`: `Some("")` for an empty `<before/>` ("the last page").
    pub before: Option<String>,
    /// `<after>`: an empty `<after/>` gives `Some("")`.
    pub after: Option<String>,
    /// `<index>`: parsed, but MAM ignores it. A negative or fractional index reads as absent.
    pub index: Option<u32>,
}

impl SetQuery {
    /// Prosody's `rsm.get(parent)`: the first `<set xmlns="http://jabber.org/protocol/rsm">`
    /// child of `parent`, or `None` when there is none or it has no child element at all.
    pub fn get(parent: &Element) -> Result<Option<SetQuery>, StanzaError> {
        match parent.get_child("set", ns::RSM) {
            Some(set) if set.children().next().is_some() => SetQuery::parse(set).map(Some),
            _ => Ok(None),
        }
    }

    /// Reads a `<set/>` element. Children in other namespaces or with unknown names are
    /// ignored; when a child is repeated the last one wins (as in rsm.lua).
    pub fn parse(set: &Element) -> Result<SetQuery, StanzaError> {
        if !set.is("set", ns::RSM) {
            return Err(StanzaError::bad_request(
                "Expected <set xmlns='http://jabber.org/protocol/rsm'/>",
            ));
        }
        let mut q = SetQuery::default();
        let mut max = None;
        for child in set.children().filter(|c| c.has_ns(ns::RSM)) {
            let text = text_only(child);
            match child.name() {
                "max" => max = text.map(|t| lua_tonumber(&t)),
                "index" => q.index = text.and_then(|t| lua_tonumber(&t)?.as_count().ok()),
                "after" => q.after = text,
                "before" => q.before = text,
                _ => {}
            }
        }
        q.max = match max.flatten() {
            None => None,
            Some(n) => Some(n.as_count().map_err(|()| {
                StanzaError::bad_request("Invalid RSM <max/>: expected a non-negative integer")
            })?),
        };
        Ok(q)
    }
}

impl From<&SetQuery> for Element {
    /// A query `<set/>`, children in the order max, after, before, index.
    fn from(q: &SetQuery) -> Element {
        let mut set = Element::builder("set", ns::RSM);
        if let Some(max) = q.max {
            set = set.append(text_element("max", &max.to_string()));
        }
        if let Some(after) = &q.after {
            set = set.append(text_element("after", after));
        }
        if let Some(before) = &q.before {
            set = set.append(text_element("before", before));
        }
        if let Some(index) = q.index {
            set = set.append(text_element("index", &index.to_string()));
        }
        set.build()
    }
}

/// The `<set/>` closing a result page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetResult {
    /// Id of the chronologically first item of the page.
    pub first: Option<String>,
    /// Id of the chronologically last item of the page.
    pub last: Option<String>,
    /// Number of items matching the query as a whole.
    pub count: Option<u64>,
}

impl From<&SetResult> for Element {
    /// `<set>` with `<first>` (no `index` attribute), `<last>`, `<count>` in that order,
    /// leaving out absent ones.
    fn from(r: &SetResult) -> Element {
        let mut set = Element::builder("set", ns::RSM);
        if let Some(first) = &r.first {
            set = set.append(text_element("first", first));
        }
        if let Some(last) = &r.last {
            set = set.append(text_element("last", last));
        }
        if let Some(count) = r.count {
            set = set.append(text_element("count", &count.to_string()));
        }
        set.build()
    }
}

impl TryFrom<&Element> for SetResult {
    type Error = StanzaError;

    /// Reads a result `<set/>`; a `<count>` that is not a non-negative integer is an error.
    fn try_from(set: &Element) -> Result<SetResult, StanzaError> {
        if !set.is("set", ns::RSM) {
            return Err(StanzaError::bad_request(
                "Expected <set xmlns='http://jabber.org/protocol/rsm'/>",
            ));
        }
        let mut r = SetResult::default();
        for child in set.children().filter(|c| c.has_ns(ns::RSM)) {
            match child.name() {
                "first" => r.first = Some(child.text()),
                "last" => r.last = Some(child.text()),
                "count" => {
                    r.count = Some(
                        child
                            .text()
                            .trim()
                            .parse()
                            .map_err(|_| StanzaError::bad_request("Invalid RSM <count/>"))?,
                    )
                }
                _ => {}
            }
        }
        Ok(r)
    }
}

/// Builds the `<set/>` that closes a result page; see [`SetResult`].
pub fn set_result(first: Option<&str>, last: Option<&str>, count: Option<u64>) -> Element {
    Element::from(&SetResult {
        first: first.map(str::to_owned),
        last: last.map(str::to_owned),
        count,
    })
}

fn text_element(name: &str, text: &str) -> Element {
    Element::builder(name, ns::RSM).append(text).build()
}

/// A number as Lua's `tonumber` reads a string.
#[derive(Debug, Clone, Copy, PartialEq)]
enum LuaNumber {
    Int(i64),
    Float(f64),
}

impl LuaNumber {
    /// The number as a count: non-negative and whole. Counts beyond `u32::MAX` saturate.
    fn as_count(self) -> Result<u32, ()> {
        match self {
            LuaNumber::Int(i) if i >= 0 => Ok(u32::try_from(i).unwrap_or(u32::MAX)),
            LuaNumber::Float(f) if f >= 0.0 && f.fract() == 0.0 => Ok(if f >= u32::MAX as f64 {
                u32::MAX
            } else {
                f as u32
            }),
            // Infinity has no fraction in IEEE terms but `fract()` is NaN.
            LuaNumber::Float(f) if f == f64::INFINITY => Ok(u32::MAX),
            _ => Err(()),
        }
    }
}

/// Lua 5.4's `tonumber(s)` for a string: surrounding whitespace allowed; a decimal or `0x` hex
/// integer, else a decimal float (no `inf`/`nan`). Hex floats are not supported and read as
/// non-numeric.
fn lua_tonumber(s: &str) -> Option<LuaNumber> {
    let t = s.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r'));
    let (neg, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        // Lua wraps hex integers around; the exact wrapped value does not matter here
        // beyond its sign, which wrapping also decides.
        let v = hex.bytes().fold(0u64, |v, d| {
            v.wrapping_mul(16)
                .wrapping_add(u64::from((d as char).to_digit(16).unwrap_or(0)))
        }) as i64;
        return Some(LuaNumber::Int(if neg { v.wrapping_neg() } else { v }));
    }
    if !is_decimal(body) {
        return None;
    }
    if body.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(v) = body.parse::<i64>() {
            return Some(LuaNumber::Int(if neg { -v } else { v }));
        }
    }
    let v: f64 = body.parse().ok()?;
    Some(LuaNumber::Float(if neg { -v } else { v }))
}

/// `digits [. digits*] | . digits`, then an optional exponent: the decimal form of `strtod`.
fn is_decimal(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let int_digits = count_digits(&b[i..]);
    i += int_digits;
    let mut frac_digits = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        frac_digits = count_digits(&b[i..]);
        i += frac_digits;
    }
    if int_digits + frac_digits == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp_digits = count_digits(&b[i..]);
        if exp_digits == 0 {
            return false;
        }
        i += exp_digits;
    }
    i == b.len()
}

fn count_digits(b: &[u8]) -> usize {
    b.iter().take_while(|d| d.is_ascii_digit()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    fn get(xml: &str) -> Result<Option<SetQuery>, StanzaError> {
        SetQuery::get(&el(xml))
    }

    fn query_with_set(inner: &str) -> String {
        format!(
            "<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'>{inner}</set></query>"
        )
    }

    #[test]
    fn no_set_or_empty_set_is_absent() {
        assert_eq!(get("<query xmlns='urn:xmpp:mam:2'/>"), Ok(None));
        assert_eq!(get(&query_with_set("")), Ok(None));
        assert_eq!(get(&query_with_set("  ")), Ok(None));
        // A <set/> in another namespace does not count.
        assert_eq!(
            get("<query xmlns='urn:xmpp:mam:2'><set><max>5</max></set></query>"),
            Ok(None)
        );
    }

    #[test]
    fn set_with_only_foreign_children_is_present_but_empty() {
        assert_eq!(
            get(&query_with_set("<foo xmlns='urn:other'/>")),
            Ok(Some(SetQuery::default()))
        );
    }

    #[test]
    fn xep0059_example_first_page() {
        // XEP-0059 Example 1: <max>10</max>.
        let q = get(&query_with_set("<max>10</max>")).unwrap().unwrap();
        assert_eq!(q.max, Some(10));
        assert_eq!((q.before, q.after, q.index), (None, None, None));
    }

    #[test]
    fn xep0059_example_next_and_previous_pages() {
        let q = get(&query_with_set(
            "<max>10</max><after>peterpan@neverland.lit</after>",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(q.after.as_deref(), Some("peterpan@neverland.lit"));
        let q = get(&query_with_set(
            "<max>10</max><before>peter@pixyland.org</before>",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(q.before.as_deref(), Some("peter@pixyland.org"));
    }

    #[test]
    fn empty_before_and_after() {
        let q = get(&query_with_set("<max>10</max><before/>"))
            .unwrap()
            .unwrap();
        assert_eq!(q.before.as_deref(), Some(""));
        let q = get(&query_with_set("<after/>")).unwrap().unwrap();
        assert_eq!(q.after.as_deref(), Some(""));
    }

    #[test]
    fn index_is_read() {
        let q = get(&query_with_set("<max>10</max><index>371</index>"))
            .unwrap()
            .unwrap();
        assert_eq!(q.index, Some(371));
        let q = get(&query_with_set("<index>-1</index>")).unwrap().unwrap();
        assert_eq!(q.index, None);
    }

    #[test]
    fn max_reads_like_tonumber() {
        let max = |text: &str| {
            get(&query_with_set(&format!("<max>{text}</max>")))
                .unwrap()
                .unwrap()
                .max
        };
        assert_eq!(max("0"), Some(0));
        assert_eq!(max(" 7\n"), Some(7));
        assert_eq!(max("+7"), Some(7));
        assert_eq!(max("0x10"), Some(16));
        assert_eq!(max("5.0"), Some(5));
        assert_eq!(max("1e2"), Some(100));
        assert_eq!(max("-0"), Some(0));
        assert_eq!(max("99999999999"), Some(u32::MAX));
        assert_eq!(max("99999999999999999999999"), Some(u32::MAX));
        assert_eq!(max("1e999"), Some(u32::MAX));
        // Non-numeric: absent.
        for text in ["", "ten", "inf", "nan", "0x", "1e", ".", "5 5", "５"] {
            assert_eq!(max(text), None, "{text:?}");
        }
    }

    #[test]
    fn max_with_child_elements_is_absent() {
        let q = get(&query_with_set("<max><b>5</b></max>"))
            .unwrap()
            .unwrap();
        assert_eq!(q.max, None);
    }

    #[test]
    fn negative_or_fractional_max_is_bad_request() {
        for text in ["-1", "-2", "2.5", "0.1", "-0x1", "-1e3"] {
            let err = get(&query_with_set(&format!("<max>{text}</max>"))).unwrap_err();
            assert_eq!(err.kind, crate::protocol::ErrorType::Modify, "{text}");
            assert_eq!(err.condition, "bad-request");
            assert_eq!(
                err.text.as_deref(),
                Some("Invalid RSM <max/>: expected a non-negative integer")
            );
        }
    }

    #[test]
    fn last_repeated_child_wins() {
        let q = get(&query_with_set(
            "<max>-1</max><max>3</max><after>a</after><after>b</after>",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(q.max, Some(3));
        assert_eq!(q.after.as_deref(), Some("b"));
    }

    #[test]
    fn query_set_round_trips() {
        let q = SetQuery {
            max: Some(10),
            before: Some(String::new()),
            after: Some("x".into()),
            index: Some(2),
        };
        assert_eq!(SetQuery::parse(&Element::from(&q)), Ok(q));
    }

    #[test]
    fn set_result_children_in_order_without_index() {
        let set = set_result(Some("a"), Some("b"), Some(3));
        assert!(set.is("set", ns::RSM));
        let names: Vec<_> = set.children().map(|c| c.name().to_owned()).collect();
        assert_eq!(names, ["first", "last", "count"]);
        let first = set.get_child("first", ns::RSM).unwrap();
        assert_eq!(first.attrs().iter().count(), 0);
        assert_eq!(
            SetResult::try_from(&set),
            Ok(SetResult {
                first: Some("a".into()),
                last: Some("b".into()),
                count: Some(3)
            })
        );
    }

    #[test]
    fn set_result_omits_absent_values() {
        let set = set_result(None, None, Some(0));
        let names: Vec<_> = set.children().map(|c| c.name().to_owned()).collect();
        assert_eq!(names, ["count"]);
        assert_eq!(set.get_child("count", ns::RSM).unwrap().text(), "0");
        let set = set_result(None, None, None);
        assert_eq!(set.children().count(), 0);
        assert_eq!(
            String::from(&set),
            "<set xmlns='http://jabber.org/protocol/rsm'/>"
        );
    }
}
