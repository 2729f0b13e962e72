//! The XMPP protocol layer: one file per XEP, each element a typed Rust value with checked
//! conversion from and to XML (in the style of the `xmpp-parsers` crate).
//!
//! - [`xep0004`]: data forms (the MAM search form).
//! - [`xep0059`]: result set management (`<set>`: max, before, after, first, last, count).
//! - [`xep0082`]: date-time parsing and formatting (`start`, `end`, delay stamps).
//! - [`xep0313`]: message archive management: the query, how it maps to a store query, the
//!   result messages and `<fin>`.
//! - [`xep0359`]: unique stanza ids (`<stanza-id>`).
//! - [`xml_text`]: names and character data written as XML text (the stored copy).
//! - [`stored`]: the stored copy read back, as a [`tree::Tree`]: the flat form in which result
//!   messages go to the Lua side.
//!
//! This layer parses and builds elements; it never touches the store, threads or Lua.
//! Errors are [`StanzaError`] values that the Lua surface turns into `st.error_reply`.

pub mod stored;
pub mod tree;
pub mod xep0004;
pub mod xep0059;
pub mod xep0082;
pub mod xep0313;
pub mod xep0359;
pub mod xep0441;
pub mod xml_text;

/// Namespaces used across the protocol layer.
pub mod ns {
    pub const MAM: &str = "urn:xmpp:mam:2";
    pub const MAM_EXTENDED: &str = "urn:xmpp:mam:2#extended";
    pub const SID: &str = "urn:xmpp:sid:0";
    pub const RSM: &str = "http://jabber.org/protocol/rsm";
    pub const DATA_FORMS: &str = "jabber:x:data";
    pub const FORWARD: &str = "urn:xmpp:forward:0";
    pub const DELAY: &str = "urn:xmpp:delay";
    pub const CLIENT: &str = "jabber:client";
    /// The namespace of `xml:` attributes (`xml:lang`).
    pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
    pub const XDATA_VALIDATE: &str = "http://jabber.org/protocol/xdata-validate";
}

/// The `type` of an XMPP error (RFC 6120 §8.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    Auth,
    Cancel,
    Continue,
    Modify,
    Wait,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Auth => "auth",
            ErrorType::Cancel => "cancel",
            ErrorType::Continue => "continue",
            ErrorType::Modify => "modify",
            ErrorType::Wait => "wait",
        }
    }
}

/// An error to send back to the client as an `<iq type="error">`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} / {}{}", kind.as_str(), condition, text.as_deref().map(|t| format!(": {t}")).unwrap_or_default())]
pub struct StanzaError {
    pub kind: ErrorType,
    /// The defined condition, e.g. `bad-request`, `item-not-found`.
    pub condition: &'static str,
    /// Human-readable text, sent in `<text>`.
    pub text: Option<String>,
}

impl StanzaError {
    pub fn bad_request(text: impl Into<String>) -> StanzaError {
        StanzaError {
            kind: ErrorType::Modify,
            condition: "bad-request",
            text: Some(text.into()),
        }
    }

    pub fn item_not_found() -> StanzaError {
        StanzaError {
            kind: ErrorType::Modify,
            condition: "item-not-found",
            text: None,
        }
    }

    /// The archive's database cannot be reached (or cannot write) now: retry later.
    pub fn database_unavailable() -> StanzaError {
        StanzaError {
            kind: ErrorType::Wait,
            condition: "internal-server-error",
            text: Some("The message archive's database is unavailable; try again later".into()),
        }
    }

    pub fn internal_server_error() -> StanzaError {
        StanzaError {
            kind: ErrorType::Cancel,
            condition: "internal-server-error",
            text: None,
        }
    }
}

/// An attribute name for the element builder. Only ever called with literal names that are
/// valid XML NCNames, so the conversion cannot fail.
pub(crate) fn attr_name(name: &'static str) -> minidom::rxml::NcName {
    minidom::rxml::NcName::try_from(name).expect("attribute names in this layer are NCNames")
}

/// Prosody's `stanza:get_text()`: the text of an element that holds only text, or `None` when
/// it has child elements.
pub(crate) fn text_only(el: &minidom::Element) -> Option<String> {
    el.children().next().is_none().then(|| el.text())
}

/// Where a JID's parts are, as Prosody's `jid.split` (util/jid.lua) finds them: byte ranges of
/// the raw JID, nothing prepared. The bare JID, `node@host` or `host`, is the raw JID up to
/// the host's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JidSplit {
    pub node: Option<std::ops::Range<usize>>,
    pub host: std::ops::Range<usize>,
    pub resource: Option<std::ops::Range<usize>>,
}

/// Splits `raw` as Prosody's `jid.split` does, on bytes, in one pass instead of its three
/// pattern matches: the node is what comes before the first `@` if no `/` comes first, the
/// host runs to the next `@` or `/`, and the resource is everything after that `/`. `None`
/// where `jid.split` returns nil: an empty node, host or resource, or an `@` after the host.
pub(crate) fn split_jid(raw: &[u8]) -> Option<JidSplit> {
    let stop = |from: usize| {
        raw[from..]
            .iter()
            .position(|&b| b == b'@' || b == b'/')
            .map_or(raw.len(), |i| from + i)
    };
    let first = stop(0);
    let (node, host_start) = match raw.get(first) {
        Some(b'@') if first > 0 => (Some(0..first), first + 1),
        _ => (None, 0),
    };
    let host_end = stop(host_start);
    let resource = match raw.get(host_end) {
        None => None,
        Some(b'/') if host_end + 1 < raw.len() => Some(host_end + 1..raw.len()),
        Some(_) => return None,
    };
    if host_end == host_start {
        return None;
    }
    Some(JidSplit {
        node,
        host: host_start..host_end,
        resource,
    })
}

/// A JID split into prepared parts: Prosody's `jid.prepped_split` (util/jid.lua).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PreppedJid {
    pub node: Option<String>,
    pub domain: String,
    pub resource: Option<String>,
}

impl PreppedJid {
    /// Splits like Prosody's `jid.split`, drops one trailing dot of the domain, and applies
    /// nodeprep/nameprep/resourceprep (via the `jid` crate, which also checks the domain with
    /// IDNA rules, slightly stricter than Prosody). `None` when Prosody's would return nil.
    pub fn parse(raw: &str) -> Option<PreppedJid> {
        let split = split_jid(raw.as_bytes())?;
        // The parts end and start at ASCII bytes (`@`, `/`, the ends), so they are UTF-8.
        let text = |range: std::ops::Range<usize>| &raw[range];
        let node = split.node.map(text);
        let host = text(split.host);
        let resource = split.resource.map(text);
        if host == "." {
            return None;
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        Some(PreppedJid {
            node: match node {
                Some(n) => Some(jid::NodePart::new(n).ok()?.as_str().to_owned()),
                None => None,
            },
            domain: jid::DomainPart::new(host).ok()?.as_str().to_owned(),
            resource: match resource {
                Some(r) => Some(jid::ResourcePart::new(r).ok()?.as_str().to_owned()),
                None => None,
            },
        })
    }

    /// The whole prepared JID, with its resource if it has one (Prosody's `jid.prep`).
    pub fn full(&self) -> String {
        match &self.resource {
            Some(resource) => format!("{}/{resource}", self.bare()),
            None => self.bare(),
        }
    }

    /// The bare JID, `node@domain` or `domain`.
    pub fn bare(&self) -> String {
        match &self.node {
            Some(node) => format!("{node}@{}", self.domain),
            None => self.domain.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(node, host, resource)` as strings.
    type Parts<'a> = (Option<&'a str>, &'a str, Option<&'a str>);

    fn split(raw: &str) -> Option<Parts<'_>> {
        let s = split_jid(raw.as_bytes())?;
        Some((
            s.node.map(|r| &raw[r]),
            &raw[s.host.clone()],
            s.resource.map(|r| &raw[r]),
        ))
    }

    #[test]
    fn splits_as_prosody_does() {
        // What Prosody 0.12's and 13.0's jid.split return (their spec/util_jid_spec.lua cases,
        // and the edges of their patterns); spec/mod_mam_rs_spec.lua compares every short
        // string with util.jid itself.
        let cases: &[(&str, Option<Parts>)] = &[
            (
                "node@domain/resource",
                Some((Some("node"), "domain", Some("resource"))),
            ),
            ("node@domain", Some((Some("node"), "domain", None))),
            ("domain", Some((None, "domain", None))),
            ("domain/resource", Some((None, "domain", Some("resource")))),
            (
                "node@domain/res/our@ce",
                Some((Some("node"), "domain", Some("res/our@ce"))),
            ),
            (
                "domain/res@ource",
                Some((None, "domain", Some("res@ource"))),
            ),
            ("node@domain//", Some((Some("node"), "domain", Some("/")))),
            ("", None),
            ("@domain", None),
            ("node@", None),
            ("node@/res", None),
            ("/res", None),
            ("domain/", None),
            ("node@domain/", None),
            ("node@dom@ain", None),
            ("node@@domain", None),
            ("é@dömain/ré", Some((Some("é"), "dömain", Some("ré")))),
        ];
        for (raw, want) in cases {
            assert_eq!(split(raw), *want, "{raw:?}");
        }
    }

    #[test]
    fn the_bare_jid_is_the_start_up_to_the_host() {
        for (raw, bare) in [("a@b/c", "a@b"), ("a@b", "a@b"), ("b/c@d", "b"), ("b", "b")] {
            assert_eq!(&raw[..split_jid(raw.as_bytes()).unwrap().host.end], bare);
        }
    }

    #[test]
    fn prepped_split_drops_one_trailing_dot_and_refuses_a_lone_dot() {
        let j = PreppedJid::parse("Node@Example.COM./Res").unwrap();
        assert_eq!(j.full(), "node@example.com/Res");
        assert_eq!(PreppedJid::parse("."), None);
        assert_eq!(PreppedJid::parse("a@./r"), None);
    }
}
