//! A stored message read back: the XML text the archive keeps, parsed into a [`Tree`] in
//! `jabber:client`, as mod_mam puts it in a result (mod_mam.lua:204).
//!
//! The text comes from two writers: `lua::stanza::to_xml` (every message this module
//! archives) and Prosody's serialiser (archives imported from stock mod_mam). Both write one
//! element, names without prefixes, `xmlns` declarations, attributes in quotes, and the five
//! entities or character references: a small reader for that shape parses a page's stanzas in
//! a fraction of the time a general XML parser takes. Anything outside it (a comment, CDATA, a
//! prefixed element, a literal line end in an attribute value, an XML declaration, a name
//! beyond ASCII, text after the element) is handed, from the start, to `minidom`, whose
//! answer, or error, stands. The shape the small reader takes is checked as strictly as XML
//! does, so it never accepts what `minidom` would refuse; its unit tests and the
//! `stored` fuzz target compare the two.

use minidom::Element;
use std::borrow::Cow;

use super::ns;
use super::tree::{write_attr_key, Builder, Span, Tree};

/// Parses a stored stanza. Elements without a namespace are read as `jabber:client`. A top
/// element in another namespace is moved to `jabber:client` (mod_mam.lua:204), together with
/// the descendants that share its namespace, as they would in Prosody, where they inherit it.
pub fn parse_stored(xml: &str) -> Result<Tree, String> {
    let mut b = Builder::default();
    read_into(&mut b, xml)?;
    Ok(b.finish())
}

/// [`parse_stored`], appending the stanza to `b` as a child of its open element (or as its
/// root). On an error, `b` is as it was.
pub fn read_into(b: &mut Builder, xml: &str) -> Result<(), String> {
    let at = b.len();
    let mark = b.mark();
    if Reader::new(b, xml).read().is_none() {
        b.rewind(mark);
        let el = parse_with_minidom(xml)?;
        b.element(&el);
    }
    b.move_namespace(at, ns::CLIENT);
    Ok(())
}

/// The small reader alone: `None` where it leaves the text to `minidom`. For the tests and
/// the fuzz target, which compare it with [`read_with_minidom`].
pub fn read_small(xml: &str) -> Option<Tree> {
    let mut b = Builder::default();
    Reader::new(&mut b, xml).read()?;
    b.move_namespace(0, ns::CLIENT);
    Some(b.finish())
}

/// [`parse_stored`] with `minidom` alone, as the archive read stored stanzas before the small
/// reader.
pub fn read_with_minidom(xml: &str) -> Result<Tree, String> {
    let mut b = Builder::default();
    b.element(&parse_with_minidom(xml)?);
    b.move_namespace(0, ns::CLIENT);
    Ok(b.finish())
}

/// The general parser: any well-formed XML, namespaces as `minidom` reads them.
fn parse_with_minidom(xml: &str) -> Result<Element, String> {
    Element::from_reader_with_prefixes(xml.as_bytes(), ns::CLIENT.to_owned())
        .map_err(|e| format!("cannot parse the stored stanza: {e}"))
}

/// The small reader. Every method returns `None` as soon as the text leaves the shape it
/// takes; the caller then starts over with `minidom`.
struct Reader<'x, 'b> {
    b: &'b mut Builder,
    src: &'x str,
    pos: usize,
    /// `jabber:client` in the buffer, once an element needed it as its namespace.
    client: Option<Span>,
    /// The prefixes declared by the open elements: (prefix, namespace), innermost last.
    prefixes: Vec<(&'x str, Span)>,
    /// The open elements: name, namespace, and how many prefixes were declared before it.
    open: Vec<(&'x str, Span, usize)>,
    /// The current start tag's attributes: (prefix, local name, value).
    attrs: Vec<(Option<&'x str>, &'x str, Span)>,
    /// The current start tag's attribute keys as written, to find a repeated one.
    keys: Vec<Span>,
}

/// Nesting beyond this is left to `minidom` (the archive refuses deeper stanzas anyway).
const MAX_DEPTH: usize = 1024;

impl<'x, 'b> Reader<'x, 'b> {
    fn new(b: &'b mut Builder, src: &'x str) -> Self {
        Reader {
            b,
            src,
            pos: 0,
            client: None,
            prefixes: Vec::new(),
            open: Vec::new(),
            attrs: Vec::new(),
            keys: Vec::new(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    fn read(mut self) -> Option<()> {
        self.eat(b'<')?;
        loop {
            match self.peek()? {
                b'/' => {
                    self.pos += 1;
                    self.end_tag()?;
                }
                b'!' | b'?' => return None,
                _ => self.start_tag()?,
            }
            if self.open.is_empty() {
                // One element, and nothing after it.
                return (self.pos == self.src.len()).then_some(());
            }
            self.text()?;
            self.eat(b'<')?;
        }
    }

    /// An XML name without a colon, in ASCII.
    fn name(&mut self) -> Option<&'x str> {
        let bytes = self.src.as_bytes();
        let start = self.pos;
        match bytes.get(start)? {
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {}
            _ => return None,
        }
        let mut end = start + 1;
        while let Some(b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.') =
            bytes.get(end)
        {
            end += 1;
        }
        match bytes.get(end) {
            // A name goes on with a byte this reader does not take (a non-ASCII name
            // character, or a colon where it was not expected).
            Some(c) if *c >= 0x80 => return None,
            _ => {}
        }
        self.pos = end;
        Some(&self.src[start..end])
    }

    fn skip_space(&mut self) -> bool {
        let start = self.pos;
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
        self.pos > start
    }

    fn start_tag(&mut self) -> Option<()> {
        if self.open.len() >= MAX_DEPTH {
            return None;
        }
        let name = self.name()?;
        let scope = self.prefixes.len();
        let mut ns = match self.open.last() {
            Some(&(_, parent_ns, _)) => parent_ns,
            None => *self
                .client
                .get_or_insert_with(|| self.b.push_str(ns::CLIENT)),
        };
        let mut declared_ns = false;
        self.attrs.clear();
        let empty = loop {
            let spaced = self.skip_space();
            match self.peek()? {
                b'>' => {
                    self.pos += 1;
                    break false;
                }
                b'/' => {
                    self.pos += 1;
                    self.eat(b'>')?;
                    break true;
                }
                _ if !spaced => return None,
                _ => {}
            }
            let first = self.name()?;
            let (prefix, local) = match self.eat(b':') {
                Some(()) => (Some(first), self.name()?),
                None => (None, first),
            };
            self.skip_space();
            self.eat(b'=')?;
            self.skip_space();
            let value = self.value()?;
            match (prefix, local) {
                (None, "xmlns") => {
                    if declared_ns || value_is_reserved(self.b.str(value)) {
                        return None;
                    }
                    declared_ns = true;
                    ns = value;
                }
                (Some("xmlns"), prefix) => {
                    let uri = self.b.str(value);
                    if matches!(prefix, "xml" | "xmlns")
                        || value_is_reserved(uri)
                        || self.prefixes[scope..].iter().any(|(p, _)| *p == prefix)
                    {
                        return None;
                    }
                    self.prefixes.push((prefix, value));
                }
                (prefix, local) => self.attrs.push((prefix, local, value)),
            }
        };
        let name_span = self.b.push_str(name);
        self.b.start_spans(name_span, ns);
        self.keys.clear();
        for i in 0..self.attrs.len() {
            let (prefix, local, value) = self.attrs[i];
            let key = match prefix {
                None => self.b.push_str(local),
                Some(prefix) => {
                    // A declared namespace is copied out of the buffer the key goes to.
                    let uri = match prefix {
                        "xml" => Cow::Borrowed(ns::XML),
                        _ => {
                            let &(_, uri) =
                                self.prefixes.iter().rev().find(|(p, _)| *p == prefix)?;
                            Cow::Owned(self.b.str(uri).to_owned())
                        }
                    };
                    let start = self.b.buffer().len();
                    write_attr_key(self.b.buffer(), Some(&uri), local);
                    self.b.span_from(start)
                }
            };
            let text = self.b.str(key);
            if self.keys.iter().any(|&k| self.b.str(k) == text) {
                return None;
            }
            self.keys.push(key);
            self.b.attr_spans(key, value);
        }
        if empty {
            self.b.end();
            self.prefixes.truncate(scope);
        } else {
            self.open.push((name, ns, scope));
        }
        Some(())
    }

    fn end_tag(&mut self) -> Option<()> {
        let name = self.name()?;
        self.skip_space();
        self.eat(b'>')?;
        let (open, _, scope) = self.open.pop()?;
        if name != open {
            return None;
        }
        self.b.end();
        self.prefixes.truncate(scope);
        Some(())
    }

    /// Character data up to the next `<`, decoded into one text child.
    fn text(&mut self) -> Option<()> {
        let start = self.b.buffer().len();
        let bytes = self.src.as_bytes();
        let mut run = self.pos;
        let mut i = self.pos;
        loop {
            match *bytes.get(i)? {
                b'<' => break,
                b'&' => {
                    self.b.buffer().push_str(&self.src[run..i]);
                    i = self.reference(i)?;
                    run = i;
                    continue;
                }
                b']' if bytes[i..].starts_with(b"]]>") => return None,
                // A literal carriage return is a line end XML rewrites; leave that to minidom.
                b'\r' => return None,
                c if c < 0x20 && c != b'\t' && c != b'\n' => return None,
                0xEF if is_nonchar(&bytes[i..]) => return None,
                _ => {}
            }
            i += 1;
        }
        self.b.buffer().push_str(&self.src[run..i]);
        self.pos = i;
        let span = self.b.span_from(start);
        self.b.text_span(span);
        Some(())
    }

    /// A quoted attribute value, decoded into the buffer.
    fn value(&mut self) -> Option<Span> {
        let quote = self.peek()?;
        if quote != b'"' && quote != b'\'' {
            return None;
        }
        let start = self.b.buffer().len();
        let bytes = self.src.as_bytes();
        let mut i = self.pos + 1;
        let mut run = i;
        loop {
            match *bytes.get(i)? {
                c if c == quote => break,
                b'&' => {
                    self.b.buffer().push_str(&self.src[run..i]);
                    i = self.reference(i)?;
                    run = i;
                    continue;
                }
                b'<' => return None,
                // Literal tabs and line ends in a value become spaces in XML; leave that to
                // minidom (our writer and Prosody's write them as references).
                c if c < 0x20 => return None,
                0xEF if is_nonchar(&bytes[i..]) => return None,
                _ => {}
            }
            i += 1;
        }
        self.b.buffer().push_str(&self.src[run..i]);
        self.pos = i + 1;
        Some(self.b.span_from(start))
    }

    /// The entity or character reference at `at` (its `&`), appended decoded; returns where
    /// it ends.
    fn reference(&mut self, at: usize) -> Option<usize> {
        let rest = &self.src[at + 1..];
        let semicolon = rest.as_bytes().iter().take(12).position(|&c| c == b';')?;
        let c = match &rest[..semicolon] {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            r => {
                let r = r.strip_prefix('#')?;
                let code = match r.strip_prefix('x') {
                    Some(hex) if is_digits(hex, 16) => u32::from_str_radix(hex, 16).ok()?,
                    None if is_digits(r, 10) => r.parse().ok()?,
                    _ => return None,
                };
                char::from_u32(code).filter(|&c| is_xml_char(c))?
            }
        };
        self.b.buffer().push(c);
        Some(at + 1 + semicolon + 1)
    }
}

/// Namespaces XML reserves, which no `xmlns` may declare (nor an empty default namespace,
/// which this reader leaves to minidom).
fn value_is_reserved(uri: &str) -> bool {
    uri.is_empty() || uri == ns::XML || uri == "http://www.w3.org/2000/xmlns/"
}

fn is_digits(s: &str, radix: u32) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_digit(radix))
}

/// XML 1.0's `Char`.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{fffd}' | '\u{10000}'..)
}

/// U+FFFE or U+FFFF (UTF-8 `EF BF BE`, `EF BF BF`) starts `bytes`.
fn is_nonchar(bytes: &[u8]) -> bool {
    matches!(bytes, [0xEF, 0xBF, 0xBE | 0xBF, ..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::xml_text::escape;

    use read_small as fast;
    use read_with_minidom as general;

    /// `parse_stored` gives what minidom gives, and the small reader never disagrees.
    fn agrees(xml: &str) {
        let (fast, general) = (fast(xml), general(xml));
        if let Some(tree) = &fast {
            assert_eq!(Ok(tree), general.as_ref(), "the small reader on {xml:?}");
        }
        assert_eq!(
            parse_stored(xml).ok(),
            general.ok(),
            "parse_stored on {xml:?}"
        );
    }

    #[test]
    fn what_the_writers_write_is_read_by_the_small_reader() {
        for xml in [
            // lua::stanza::to_xml
            "<message xmlns=\"jabber:client\" to=\"a@b/c\" type=\"chat\" id=\"x\" xml:lang=\"en\">\
             <body>hi &lt;3 &amp; &gt; &#xD; \"'</body>\
             <x xmlns=\"urn:y\" xmlns:ns1=\"urn:z\" ns1:attr=\"v&#xA;&#x9;&quot;\"><y/></x>\
             <origin-id xmlns=\"urn:xmpp:sid:0\" id=\"o1\"/></message>",
            // Prosody's serialiser (imported archives)
            "<message xmlns='jabber:client' to='a@b' from='c@d/e' type='chat'>\
             <body>it&apos;s &quot;quoted&quot;\nand two lines</body>\
             <active xmlns='http://jabber.org/protocol/chatstates'/></message>",
            // No namespace at all: jabber:client
            "<message to='a'><body>x</body></message>",
            // s2s: jabber:server moves to jabber:client, with what inherits it
            "<message xmlns='jabber:server'><body>s2s</body>\
             <x xmlns='urn:other'><body xmlns='jabber:server'/></x></message>",
            // Whitespace between elements, spaces around `=`, references in decimal
            "<message xmlns='jabber:client' id = 'a' >\n  <body>&#60;&#x3E;&#128512;</body>\n</message >",
            "<message xmlns='jabber:client'/>",
        ] {
            assert!(fast(xml).is_some(), "{xml:?} left to minidom");
            agrees(xml);
        }
    }

    #[test]
    fn other_xml_is_left_to_minidom_and_read_as_before() {
        for xml in [
            "<?xml version='1.0'?><message xmlns='jabber:client'/>",
            "<message xmlns='jabber:client'><!-- c --><body>x</body></message>",
            "<message xmlns='jabber:client'><body><![CDATA[<b>]]></body></message>",
            "<p:message xmlns:p='jabber:client'><p:body>x</p:body></p:message>",
            "<message xmlns='jabber:client'><body>a\r\nb\rc</body></message>",
            "<message xmlns='jabber:client' id='a\nb\tc'/>",
            "<message xmlns='jabber:client'><bödy>x</bödy></message>",
            "<message xmlns='jabber:client'/>\n",
            " <message xmlns='jabber:client'/>",
            // minidom lets these through: a repeated attribute or `xmlns` (one value kept),
            // and a second element after the first (left out)
            "<message xmlns='jabber:client' id='1' id='2'/>",
            "<message xmlns='jabber:client' xmlns='jabber:server'/>",
            "<message xmlns='jabber:client' xmlns:p='urn:a' xmlns:q='urn:a' p:x='1' q:x='2'/>",
            "<message xmlns='jabber:client'/><message/>",
        ] {
            assert!(fast(xml).is_none(), "{xml:?} taken by the small reader");
            agrees(xml);
        }
    }

    #[test]
    fn malformed_text_is_refused_as_minidom_refuses_it() {
        for xml in [
            "",
            "message",
            "<message xmlns='jabber:client'>",
            "<message xmlns='jabber:client'><body></message>",
            "<message xmlns='jabber:client'></body>",
            "<message xmlns='jabber:client' p:id='1'/>",
            "<message xmlns='jabber:client' xmlns:p=''/>",
            "<message xmlns='jabber:client' id=1/>",
            "<message xmlns='jabber:client' id='<'/>",
            "<message xmlns='jabber:client'><body>&nbsp;</body></message>",
            "<message xmlns='jabber:client'><body>&#0;</body></message>",
            "<message xmlns='jabber:client'><body>&#xFFFE;</body></message>",
            "<message xmlns='jabber:client'><body>&#xD800;</body></message>",
            "<message xmlns='jabber:client'><body>&#x110000;</body></message>",
            "<message xmlns='jabber:client'><body>&amp</body></message>",
            "<message xmlns='jabber:client'><body>]]></body></message>",
            "<message xmlns='jabber:client'><body>\u{1}</body></message>",
            "<message xmlns='jabber:client'><body>\u{ffff}</body></message>",
            "<message xmlns='jabber:client'id='x'/>",
            "<1message/>",
        ] {
            assert!(fast(xml).is_none(), "{xml:?} taken by the small reader");
            assert!(parse_stored(xml).is_err(), "{xml:?} read");
            agrees(xml);
        }
    }

    #[test]
    fn attributes_are_kept_under_util_stanza_keys() {
        let tree = parse_stored(
            "<message xmlns='jabber:client' xml:lang='en' xmlns:a='urn:a' a:x='1' id='m'>\
             <x xmlns='urn:b' a:y='2'/></message>",
        )
        .unwrap();
        let root = tree.root();
        let mut attrs: Vec<_> = root.attrs().collect();
        attrs.sort();
        assert_eq!(
            attrs,
            [("id", "m"), ("urn:a\u{1}x", "1"), ("xml:lang", "en")]
        );
        let x = root.elements().next().unwrap();
        assert_eq!((x.name(), x.ns()), ("x", "urn:b"));
        assert_eq!(x.attr("urn:a\u{1}y"), Some("2"));
    }

    /// A small random generator (xorshift), so that the comparison covers more than the
    /// examples above without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
            of[self.below(of.len())]
        }
        fn text(&mut self) -> String {
            let pieces = [
                "a", "hello", " ", "<", ">", "&", "'", "\"", "\n", "\t", "\r", "]]>", "é", "😀",
                "\u{fffd}", "&amp;", "\u{7f}", "\u{85}",
            ];
            (0..self.below(5)).map(|_| self.pick(&pieces)).collect()
        }
    }

    const NAMES: [&str; 6] = ["message", "body", "x", "stanza-id", "a.b", "_z9"];
    const NAMESPACES: [&str; 5] = [
        "jabber:client",
        "jabber:server",
        "urn:xmpp:sid:0",
        "urn:a",
        "http://jabber.org/protocol/muc#user",
    ];

    fn random_element(rng: &mut Rng, parent_ns: &str, depth: usize) -> Element {
        let ns = match rng.below(3) {
            0 => NAMESPACES[rng.below(NAMESPACES.len())],
            _ => parent_ns,
        };
        let mut el = Element::builder(rng.pick(&NAMES), ns).build();
        for _ in 0..rng.below(4) {
            let name = NcName::try_from(rng.pick(&["id", "to", "type", "lang", "by"])).unwrap();
            let attr_ns = match rng.below(5) {
                0 => Namespace::XML,
                1 => Namespace::from(rng.pick(&NAMESPACES[2..]).to_owned()),
                _ => Namespace::NONE,
            };
            el.set_attr(attr_ns, name, rng.text());
        }
        for _ in 0..rng.below(4) {
            if depth < 4 && rng.below(2) == 0 {
                el.append_child(random_element(rng, ns, depth + 1));
            } else {
                el.append_text(rng.text());
            }
        }
        el
    }

    use minidom::rxml::{Namespace, NcName};

    /// Writes `el` as `lua::stanza::to_xml` does (double quotes, `xmlns` where the namespace
    /// changes, `xmlns:nsN` for namespaced attributes), through the same escaping.
    fn write_like_to_xml(el: Elem, parent_ns: &str, top: bool, out: &mut String) {
        out.push('<');
        out.push_str(el.name());
        if top || el.ns() != parent_ns {
            out.push_str(" xmlns=\"");
            escape(out, el.ns(), true).unwrap();
            out.push('"');
        }
        for (n, (key, value)) in el.attrs().enumerate() {
            match key.split_once('\u{1}') {
                Some((ans, local)) => {
                    out.push_str(&format!(" xmlns:ns{n}=\"{ans}\" ns{n}:{local}"));
                }
                None => {
                    out.push(' ');
                    out.push_str(key);
                }
            }
            out.push_str("=\"");
            escape(out, value, true).unwrap();
            out.push('"');
        }
        if el.node_count() == 0 {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for child in el.children() {
            match child {
                Child::Element(c) => write_like_to_xml(c, el.ns(), false, out),
                Child::Text(t) => escape(out, t, false).unwrap(),
            }
        }
        out.push_str("</");
        out.push_str(el.name());
        out.push('>');
    }

    use super::super::tree::{Child, Elem};

    #[test]
    fn random_stanzas_read_alike_by_both_readers() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            let el = random_element(&mut rng, ns::CLIENT, 0);
            let tree = Tree::from_element(&el);
            // As this module's writer writes it: the small reader takes every one.
            let mut ours = String::new();
            write_like_to_xml(tree.root(), ns::CLIENT, true, &mut ours);
            assert!(fast(&ours).is_some(), "{ours:?} left to minidom");
            agrees(&ours);
            // As minidom writes it (imported archives).
            let theirs = String::from(&el);
            agrees(&theirs);
            // Cut short, or with a byte changed: malformed or not, both readers agree.
            let cut = rng.below(ours.len());
            if ours.is_char_boundary(cut) {
                agrees(&ours[..cut]);
                let mut changed = ours.clone();
                let byte = b"<>&'\"/=:; x\n"[rng.below(12)] as char;
                if changed.is_char_boundary(cut + 1) {
                    changed.replace_range(cut..cut + 1, &byte.to_string());
                    agrees(&changed);
                }
            }
        }
    }
}
