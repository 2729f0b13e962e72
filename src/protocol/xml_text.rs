//! Names and character data written as XML text: what the stored copy of a message is made of
//! (`lua::stanza::to_xml` walks the stanza table and writes through these).

use minidom::rxml::strings::validate_ncname;

/// An element or attribute name (without prefix) that XML with namespaces accepts.
pub fn check_name(name: &str) -> Result<(), String> {
    validate_ncname(name).map_err(|_| format!("the name {name:?}"))
}

/// Appends `s` escaped for text, or for a double-quoted attribute value. Line ends and tabs in
/// attributes, and carriage returns anywhere, become character references so that a parser
/// gives them back as they were; characters XML 1.0 has no place for are refused, naming the
/// first one.
pub fn escape(out: &mut String, s: &str, attribute: bool) -> Result<(), String> {
    let mut from = 0;
    for (i, c) in s.char_indices() {
        let replacement = match c {
            '<' => "&lt;",
            '>' => "&gt;",
            '&' => "&amp;",
            '"' if attribute => "&quot;",
            '\r' => "&#xD;",
            '\n' if attribute => "&#xA;",
            '\t' if attribute => "&#x9;",
            '\t' | '\n' => continue,
            '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => {
                return Err(format!("the character U+{:04X}", c as u32))
            }
            _ => continue,
        };
        out.push_str(&s[from..i]);
        out.push_str(replacement);
        from = i + c.len_utf8();
    }
    out.push_str(&s[from..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use minidom::Element;

    fn round_trip(s: &str) -> (String, String) {
        let (mut attr, mut text) = (String::new(), String::new());
        escape(&mut attr, s, true).unwrap();
        escape(&mut text, s, false).unwrap();
        let el: Element = format!("<a xmlns='urn:x' v=\"{attr}\">{text}</a>")
            .parse()
            .unwrap();
        (el.attr("v").unwrap().to_owned(), el.text())
    }

    #[test]
    fn text_and_attributes_come_back_as_they_were() {
        for s in [
            "",
            "plain",
            "<&>'\"",
            "]]>",
            "line\nend\r\nand\ttab\r",
            "  spaces  ",
            "é😀\u{fffd}\u{10ffff}",
            "&amp; is not unescaped",
        ] {
            assert_eq!(round_trip(s), (s.to_owned(), s.to_owned()), "{s:?}");
        }
    }

    #[test]
    fn characters_xml_cannot_carry_are_refused_by_name() {
        for (s, named) in [
            ("a\u{0}", "U+0000"),
            ("bell\u{7}", "U+0007"),
            ("\u{1f}", "U+001F"),
            ("\u{fffe}", "U+FFFE"),
            ("x\u{ffff}", "U+FFFF"),
        ] {
            let mut out = String::new();
            let err = escape(&mut out, s, false).unwrap_err();
            assert!(err.contains(named), "{s:?}: {err}");
        }
    }

    #[test]
    fn names_are_checked_as_xml_names() {
        assert!(check_name("body").is_ok());
        assert!(check_name("stanza-id").is_ok());
        for bad in ["", "a b", "a:b", "1st", "<"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
