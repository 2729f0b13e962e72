//! Helpers shared by the fuzz targets (included with `mod common;`).
#![allow(dead_code)]

use minidom::Element;

/// The input as a string, if it is UTF-8 (XML text always is).
pub fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// `xml` parsed as one element, if minidom takes it.
pub fn element(xml: &str) -> Option<Element> {
    xml.parse().ok()
}

/// `inner` (fuzzed children and text) wrapped in `open` ... `close`, parsed. This gets the
/// fuzzer past the root element and its namespace declaration to the code under test.
pub fn wrapped(open: &str, inner: &str, close: &str) -> Option<Element> {
    element(&format!("{open}{inner}{close}"))
}

/// The element serialised and parsed back, as a stanza makes a round trip over the wire.
pub fn reserialised(el: &Element) -> Element {
    let mut out = Vec::new();
    el.write_to(&mut out).expect("minidom writes any element it holds");
    let text = String::from_utf8(out).expect("minidom writes UTF-8");
    Element::from_reader(text.as_bytes())
        .unwrap_or_else(|e| panic!("minidom cannot read back its own output {text:?}: {e}"))
}
