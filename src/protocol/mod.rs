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
        let (node, rest) = match raw.find(['@', '/']) {
            Some(i) if i > 0 && raw.as_bytes()[i] == b'@' => (Some(&raw[..i]), &raw[i + 1..]),
            _ => (None, raw),
        };
        let host_len = rest.find(['@', '/']).unwrap_or(rest.len());
        let (host, tail) = rest.split_at(host_len);
        let resource = match tail.strip_prefix('/') {
            _ if tail.is_empty() => None,
            Some(r) if !r.is_empty() => Some(r),
            _ => return None,
        };
        if host.is_empty() || host == "." {
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
