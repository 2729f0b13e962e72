//! What is archived: stock mod_mam's `should_store` rules (reference §2.9). The stripping of
//! `dont_archive_namespaces` happens while the stored copy is written from the Lua table
//! (`lua::stanza::to_xml`), so that the message is walked once.
//!
//! Classification looks only at the top level of a message (its `type`, `to`, and the name and
//! namespace of each direct child), so the Lua surface can summarise a `util.stanza` without
//! copying the whole tree: messages that are not archived (chat states, mostly) never get
//! converted. Pure functions; no I/O, no configuration reads, no Lua.

use minidom::Element;

const HINTS: &str = "urn:xmpp:hints";
const EME: &str = "urn:xmpp:eme:0";
const RECEIPTS: &str = "urn:xmpp:receipts";
const MARKERS: &str = "urn:xmpp:chat-markers:0";
const CONFERENCE: &str = "jabber:x:conference";
const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
const JINGLE_MESSAGE_0: &str = "urn:xmpp:jingle-message:0";
const JINGLE_MESSAGE_1: &str = "urn:xmpp:jingle-message:1";

/// One direct child of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopChild {
    pub name: String,
    /// The child's namespace, inherited from the message when it has no `xmlns` of its own.
    pub ns: String,
    /// For `{muc#user}x` only: whether it holds an `<invite>`.
    pub has_invite: bool,
}

/// The top level of a message: all that classification reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    /// The `type` attribute; absent means "normal".
    pub kind: Option<String>,
    /// The `to` attribute.
    pub to: Option<String>,
    /// The message's own namespace (`jabber:client` or `jabber:server`).
    pub ns: String,
    pub children: Vec<TopChild>,
}

impl Summary {
    /// Summarises a parsed message.
    pub fn of(message: &Element) -> Summary {
        let ns = message.ns();
        Summary {
            kind: message.attr("type").map(str::to_owned),
            to: message.attr("to").map(str::to_owned),
            children: message
                .children()
                .map(|c| TopChild {
                    name: c.name().to_owned(),
                    ns: c.ns(),
                    has_invite: c.is("x", MUC_USER) && c.get_child("invite", MUC_USER).is_some(),
                })
                .collect(),
            ns,
        }
    }

    fn has(&self, name: &str, ns: &str) -> bool {
        self.children.iter().any(|c| c.name == name && c.ns == ns)
    }

    fn has_ns(&self, ns: &str) -> bool {
        self.children.iter().any(|c| c.ns == ns)
    }
}

/// Why a message is or is not archived: the reason strings of stock `should_store`, which
/// other modules may read from the `archive-should-store` event.
pub type Reason = &'static str;

/// Stock mod_mam's default `archive-should-store` decision (M:314-381), rule by rule in the
/// same order: the first rule that matches decides.
pub fn should_store(m: &Summary) -> (bool, Reason) {
    match m.kind.as_deref().unwrap_or("normal") {
        "headline" => return (false, "headline"),
        // A bounce to a full JID is a delivery failure the user's client should see later.
        "error" => return (m.to.as_deref().is_some_and(|to| to.contains('/')), "bounce"),
        "groupchat" => return (false, "groupchat"),
        _ => {}
    }
    if m.has("no-store", HINTS) || m.has("no-permanent-store", HINTS) {
        return (false, "hint");
    }
    if m.has("store", HINTS) {
        return (true, "hint");
    }
    if m.has("body", &m.ns) {
        return (true, "body");
    }
    if m.has("subject", &m.ns) {
        return (true, "subject");
    }
    if m.has("encryption", EME) {
        return (true, "encrypted");
    }
    if m.has_ns(RECEIPTS) {
        return (true, "receipt");
    }
    if m.has_ns(MARKERS) {
        return (true, "marker");
    }
    if m.has("x", CONFERENCE) || m.children.iter().any(|c| c.has_invite) {
        return (true, "invite");
    }
    if m.has_ns(JINGLE_MESSAGE_0) || m.has_ns(JINGLE_MESSAGE_1) {
        return (true, "jingle call");
    }
    (false, "default")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(xml: &str) -> Summary {
        let el: Element = xml.parse().expect("test XML parses");
        Summary::of(&el)
    }

    fn decide(xml: &str) -> (bool, Reason) {
        should_store(&summary(xml))
    }

    const C: &str = "xmlns='jabber:client'";

    #[test]
    fn body_is_stored_and_type_defaults_to_normal() {
        assert_eq!(
            decide(&format!(
                "<message {C} type='chat'><body>hi</body></message>"
            )),
            (true, "body")
        );
        assert_eq!(
            decide(&format!("<message {C}><body>hi</body></message>")),
            (true, "body")
        );
    }

    #[test]
    fn body_in_another_namespace_does_not_count() {
        let xml = format!("<message {C}><body xmlns='urn:example'>hi</body></message>");
        assert_eq!(decide(&xml), (false, "default"));
    }

    #[test]
    fn headline_and_groupchat_are_never_stored() {
        assert_eq!(
            decide(&format!(
                "<message {C} type='headline'><body>x</body></message>"
            )),
            (false, "headline")
        );
        assert_eq!(
            decide(&format!(
                "<message {C} type='groupchat'><body>x</body></message>"
            )),
            (false, "groupchat")
        );
    }

    #[test]
    fn errors_are_stored_only_to_full_jids() {
        let full = format!("<message {C} type='error' to='a@b/c'><error/></message>");
        let bare = format!("<message {C} type='error' to='a@b'><error/></message>");
        assert_eq!(decide(&full), (true, "bounce"));
        assert_eq!(decide(&bare), (false, "bounce"));
    }

    #[test]
    fn no_store_hint_beats_body_and_store_hint_beats_nothing() {
        let no_store = format!("<message {C}><body>x</body><no-store xmlns='{HINTS}'/></message>");
        let no_perm =
            format!("<message {C}><body>x</body><no-permanent-store xmlns='{HINTS}'/></message>");
        let store = format!("<message {C}><store xmlns='{HINTS}'/></message>");
        assert_eq!(decide(&no_store), (false, "hint"));
        assert_eq!(decide(&no_perm), (false, "hint"));
        assert_eq!(decide(&store), (true, "hint"));
    }

    #[test]
    fn non_body_payloads_that_stock_stores() {
        for (child, reason) in [
            ("<subject>s</subject>".to_string(), "subject"),
            (
                format!("<encryption xmlns='{EME}' namespace='eu.siacs.conversations.axolotl'/>"),
                "encrypted",
            ),
            (format!("<request xmlns='{RECEIPTS}'/>"), "receipt"),
            (format!("<received xmlns='{RECEIPTS}' id='x'/>"), "receipt"),
            (format!("<displayed xmlns='{MARKERS}' id='x'/>"), "marker"),
            (
                format!("<x xmlns='{CONFERENCE}' jid='room@muc'/>"),
                "invite",
            ),
            (
                format!("<x xmlns='{MUC_USER}'><invite from='a@b'/></x>"),
                "invite",
            ),
            (
                format!("<propose xmlns='{JINGLE_MESSAGE_0}' id='x'/>"),
                "jingle call",
            ),
            (
                format!("<accept xmlns='{JINGLE_MESSAGE_1}' id='x'/>"),
                "jingle call",
            ),
        ] {
            let xml = format!("<message {C} type='chat'>{child}</message>");
            assert_eq!(decide(&xml), (true, reason), "{child}");
        }
    }

    #[test]
    fn what_stock_does_not_store() {
        for child in [
            "<active xmlns='http://jabber.org/protocol/chatstates'/>".to_string(),
            format!("<x xmlns='{MUC_USER}'/>"),
            "<encrypted xmlns='eu.siacs.conversations.axolotl'/>".to_string(),
            "<sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'/></sent>"
                .to_string(),
        ] {
            let xml = format!("<message {C} type='chat'>{child}</message>");
            assert_eq!(decide(&xml), (false, "default"), "{child}");
        }
    }
}
