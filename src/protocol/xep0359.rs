//! XEP-0359 unique and stable stanza ids: building the `<stanza-id/>` stamped on archived
//! messages, and recognising (and removing) `<stanza-id/>` elements that claim to be ours, as
//! stock mod_mam's `strip_stanza_id` does (mod_mam.lua:298-312), so that a sender cannot spoof
//! an archive id.
//!
//! This module does not decide when to stamp or strip; the policy and the Lua surface do.

use super::{attr_name, ns, PreppedJid};
use minidom::{Element, Node};

/// A `<stanza-id xmlns="urn:xmpp:sid:0" by=... id=.../>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StanzaId {
    /// The entity that assigned the id (for a user archive, the account's bare JID).
    pub by: String,
    pub id: String,
}

impl From<&StanzaId> for Element {
    fn from(s: &StanzaId) -> Element {
        Element::builder("stanza-id", ns::SID)
            .attr(attr_name("by"), s.by.as_str())
            .attr(attr_name("id"), s.id.as_str())
            .build()
    }
}

impl TryFrom<&Element> for StanzaId {
    type Error = ();

    /// A `{urn:xmpp:sid:0}stanza-id` with both `by` and `id`, else `Err(())`.
    fn try_from(el: &Element) -> Result<StanzaId, ()> {
        if !el.is("stanza-id", ns::SID) {
            return Err(());
        }
        Ok(StanzaId {
            by: el.attr("by").ok_or(())?.to_owned(),
            id: el.attr("id").ok_or(())?.to_owned(),
        })
    }
}

/// `<stanza-id xmlns="urn:xmpp:sid:0" by="{by}" id="{id}"/>`.
pub fn stanza_id(by: &str, id: &str) -> Element {
    Element::from(&StanzaId {
        by: by.to_owned(),
        id: id.to_owned(),
    })
}

/// Whether `el` is a `{urn:xmpp:sid:0}stanza-id` whose `by`, after JID preparation, is the
/// bare JID `user@host`: the node equals `user`, the domain equals `host` and there is no
/// resource. `user` and `host` must already be prepared (as Prosody's usernames and hosts are).
/// A missing or invalid `by` is not ours.
pub fn is_own_stanza_id(el: &Element, user: &str, host: &str) -> bool {
    if !el.is("stanza-id", ns::SID) {
        return false;
    }
    let Some(by) = el.attr("by") else {
        return false;
    };
    let Some(by) = PreppedJid::parse(by) else {
        return false;
    };
    by.resource.is_none() && by.domain == host && by.node.as_deref() == Some(user)
}

/// Removes every direct child of `stanza` that [`is_own_stanza_id`], keeping everything else
/// (including text nodes) in place. Returns how many were removed.
pub fn remove_own_stanza_ids(stanza: &mut Element, user: &str, host: &str) -> usize {
    let is_own = |n: &Node| {
        n.as_element()
            .is_some_and(|e| is_own_stanza_id(e, user, host))
    };
    if !stanza.nodes().any(is_own) {
        return 0;
    }
    let nodes = stanza.take_nodes();
    let before = nodes.len();
    for node in nodes.into_iter().filter(|n| !is_own(n)) {
        stanza.append_node(node);
    }
    before - stanza.nodes().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    fn sid(by: &str) -> Element {
        el(&format!(
            "<stanza-id xmlns='urn:xmpp:sid:0' by='{by}' id='x'/>"
        ))
    }

    #[test]
    fn builds_and_reads_the_xep_example() {
        // XEP-0359 Example 1.
        let e = stanza_id("room@muc.xmpp.org", "de305d54-75b4-431b-adb2-eb6b9e546013");
        assert_eq!(
            e,
            el("<stanza-id xmlns='urn:xmpp:sid:0' id='de305d54-75b4-431b-adb2-eb6b9e546013' by='room@muc.xmpp.org'/>")
        );
        assert_eq!(
            StanzaId::try_from(&e),
            Ok(StanzaId {
                by: "room@muc.xmpp.org".into(),
                id: "de305d54-75b4-431b-adb2-eb6b9e546013".into()
            })
        );
        assert!(StanzaId::try_from(&el("<stanza-id xmlns='urn:xmpp:sid:0' id='a'/>")).is_err());
        assert!(StanzaId::try_from(&el("<origin-id xmlns='urn:xmpp:sid:0' id='a'/>")).is_err());
    }

    #[test]
    fn own_ids_are_recognised_after_preparation() {
        assert!(is_own_stanza_id(
            &sid("juliet@capulet.lit"),
            "juliet",
            "capulet.lit"
        ));
        assert!(is_own_stanza_id(
            &sid("Juliet@Capulet.LIT"),
            "juliet",
            "capulet.lit"
        ));
        assert!(is_own_stanza_id(
            &sid("juliet@capulet.lit."),
            "juliet",
            "capulet.lit"
        ));
    }

    #[test]
    fn other_ids_are_not_ours() {
        for by in [
            "juliet@capulet.lit/balcony",
            "romeo@capulet.lit",
            "juliet@montague.lit",
            "capulet.lit",
            "",
            "juliet@@capulet.lit",
            "juliet@capulet.lit/",
        ] {
            assert!(!is_own_stanza_id(&sid(by), "juliet", "capulet.lit"), "{by}");
        }
        let no_by = el("<stanza-id xmlns='urn:xmpp:sid:0' id='x'/>");
        assert!(!is_own_stanza_id(&no_by, "juliet", "capulet.lit"));
        let wrong_ns = el("<stanza-id xmlns='urn:xmpp:sid:1' by='juliet@capulet.lit' id='x'/>");
        assert!(!is_own_stanza_id(&wrong_ns, "juliet", "capulet.lit"));
    }

    #[test]
    fn removes_only_own_direct_children() {
        let mut msg = el("<message xmlns='jabber:client' to='juliet@capulet.lit'>\
             <body>hi</body>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='juliet@capulet.lit' id='spoofed'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='room@muc.capulet.lit' id='keep'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='JULIET@capulet.lit' id='spoofed2'/>\
             <x xmlns='urn:other'><stanza-id xmlns='urn:xmpp:sid:0' by='juliet@capulet.lit' id='nested'/></x>\
             </message>");
        assert_eq!(remove_own_stanza_ids(&mut msg, "juliet", "capulet.lit"), 2);
        let ids: Vec<_> = msg
            .children()
            .filter(|c| c.is("stanza-id", ns::SID))
            .map(|c| c.attr("id").unwrap())
            .collect();
        assert_eq!(ids, ["keep"]);
        assert_eq!(msg.get_child("body", ns::CLIENT).unwrap().text(), "hi");
        assert!(msg.get_child("x", "urn:other").unwrap().children().count() == 1);
        assert_eq!(remove_own_stanza_ids(&mut msg, "juliet", "capulet.lit"), 0);
    }
}
