//! XEP-0441 (formerly XEP-0313 §6): archiving preferences, `<prefs xmlns="urn:xmpp:mam:2">`.
//!
//! Parsing follows Prosody's `mamprefsxml.lib.lua`, leniently as stock does: an unknown or
//! missing `default` means "no default" (nothing archived unless listed in `<always>`), and
//! JIDs that do not prep are dropped. A JID listed in both lists ends up in `<never>`.
//! Building always emits both `<always>` and `<never>`, possibly empty.
//!
//! Owns the element only; where preferences are stored, and how they decide, is elsewhere.

use minidom::Element;

use super::{attr_name, ns, PreppedJid};

/// The `default` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultRule {
    Always,
    Never,
    Roster,
}

impl DefaultRule {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultRule::Always => "always",
            DefaultRule::Never => "never",
            DefaultRule::Roster => "roster",
        }
    }

    pub fn parse(s: &str) -> Option<DefaultRule> {
        match s {
            "always" => Some(DefaultRule::Always),
            "never" => Some(DefaultRule::Never),
            "roster" => Some(DefaultRule::Roster),
            _ => None,
        }
    }
}

/// A user's archiving preferences. JID lists are sorted and free of duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prefs {
    pub default: Option<DefaultRule>,
    pub always: Vec<String>,
    pub never: Vec<String>,
}

impl Prefs {
    /// Reads a `<prefs>` element the way stock mod_mam does (lenient; never an error).
    pub fn parse(el: &Element) -> Prefs {
        let jids = |list: &str| -> Vec<String> {
            el.get_child(list, ns::MAM)
                .map(|l| {
                    l.children()
                        .filter(|c| c.is("jid", ns::MAM))
                        .filter_map(|c| PreppedJid::parse(&c.text()).map(|j| j.full()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut never = jids("never");
        never.sort();
        never.dedup();
        let mut always: Vec<String> = jids("always")
            .into_iter()
            .filter(|j| never.binary_search(j).is_err())
            .collect();
        always.sort();
        always.dedup();
        Prefs {
            default: el.attr("default").and_then(DefaultRule::parse),
            always,
            never,
        }
    }
}

impl From<&Prefs> for Element {
    fn from(prefs: &Prefs) -> Element {
        let list = |name: &str, jids: &[String]| {
            Element::builder(name, ns::MAM)
                .append_all(
                    jids.iter()
                        .map(|j| Element::builder("jid", ns::MAM).append(j.as_str()).build()),
                )
                .build()
        };
        let mut builder = Element::builder("prefs", ns::MAM);
        if let Some(default) = prefs.default {
            builder = builder.attr(attr_name("default"), default.as_str());
        }
        builder
            .append(list("always", &prefs.always))
            .append(list("never", &prefs.never))
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Prefs {
        Prefs::parse(&xml.parse::<Element>().unwrap())
    }

    #[test]
    fn xep_0313_example_round_trips() {
        let prefs = parse(
            "<prefs xmlns='urn:xmpp:mam:2' default='roster'>\
               <always><jid>romeo@montague.lit</jid></always>\
               <never><jid>montague@montague.lit</jid></never>\
             </prefs>",
        );
        assert_eq!(prefs.default, Some(DefaultRule::Roster));
        assert_eq!(prefs.always, ["romeo@montague.lit"]);
        assert_eq!(prefs.never, ["montague@montague.lit"]);
        assert_eq!(Prefs::parse(&Element::from(&prefs)), prefs);
    }

    #[test]
    fn jids_are_prepped_and_invalid_ones_dropped() {
        let prefs = parse(
            "<prefs xmlns='urn:xmpp:mam:2' default='always'>\
               <always><jid>JULIET@Capulet.LIT</jid><jid>@invalid</jid><jid>a@b/Res</jid></always>\
               <never/>\
             </prefs>",
        );
        assert_eq!(prefs.always, ["a@b/Res", "juliet@capulet.lit"]);
    }

    #[test]
    fn never_wins_over_always() {
        let prefs = parse(
            "<prefs xmlns='urn:xmpp:mam:2'>\
               <always><jid>x@y</jid></always><never><jid>X@y</jid></never>\
             </prefs>",
        );
        assert!(prefs.always.is_empty());
        assert_eq!(prefs.never, ["x@y"]);
    }

    #[test]
    fn unknown_or_missing_default_means_none_and_both_lists_are_always_built() {
        assert_eq!(
            parse("<prefs xmlns='urn:xmpp:mam:2' default='sometimes'/>").default,
            None
        );
        let el = Element::from(&Prefs::default());
        assert_eq!(el.attr("default"), None);
        assert!(el.get_child("always", ns::MAM).is_some());
        assert!(el.get_child("never", ns::MAM).is_some());
    }
}
