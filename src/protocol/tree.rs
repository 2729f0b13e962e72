//! A stanza as a flat tree: every string in one buffer, every element, attribute and text in
//! one array, in document order. This is how a result message travels from the query worker
//! to Prosody's loop, where `lua::stanza` turns it into a `util.stanza`.
//!
//! A `minidom::Element` holds a `String` per name, namespace, attribute and text, and a map
//! per element; building a page of them on the worker and dropping them on the loop cost more
//! than any other part of a page (`results/respond` in `benches/archive_path.rs`). A [`Tree`]
//! is two allocations whatever its size, and its attributes are kept under the keys
//! `util.stanza` uses (`name`, `xml:<name>`, `<namespace>\1<name>`), ready for the Lua side.
//!
//! Trees are built with [`Builder`] (the result wrapper, [`crate::protocol::stored`]'s reader)
//! and read with [`Elem`]; [`Tree::from_element`] and [`Tree::to_element`] convert, for the
//! reader's fallback and for tests.

use minidom::rxml::{Namespace, NcName};
use minidom::{Element, Node};

use super::ns;

/// Appends the `util.stanza` key of the attribute `local` in namespace `attr_ns` (none for a
/// plain attribute): `local`, `xml:<local>`, or `<namespace>\1<local>`.
pub fn write_attr_key(out: &mut String, attr_ns: Option<&str>, local: &str) {
    match attr_ns {
        None => {}
        Some(ns::XML) => out.push_str("xml:"),
        Some(uri) => {
            out.push_str(uri);
            out.push('\u{1}');
        }
    }
    out.push_str(local);
}

/// The namespace and local name of the attribute under a `util.stanza` key.
pub fn split_attr_key(key: &str) -> (Namespace<'static>, &str) {
    match key.split_once('\u{1}') {
        Some((uri, local)) => (Namespace::from(uri.to_owned()), local),
        None => match key.strip_prefix("xml:") {
            Some(local) => (Namespace::XML, local),
            None => (Namespace::NONE, key),
        },
    }
}

/// A range of [`Tree`]'s string buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..(self.start + self.len) as usize
    }
}

/// An element: its `attrs` attributes follow it, then its children (each a text, or an
/// element with its own subtree); `end` is the index after its subtree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    name: Span,
    ns: Span,
    attrs: u32,
    /// Children, texts and elements.
    nodes: u32,
    /// Child elements.
    tags: u32,
    end: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Element(Head),
    /// An attribute, under its `util.stanza` key.
    Attr {
        key: Span,
        value: Span,
    },
    Text(Span),
}

/// One element and its subtree (see the module comment).
#[derive(Debug, Clone, Default)]
pub struct Tree {
    text: String,
    items: Vec<Item>,
}

impl Tree {
    /// The top element. A tree is never empty: [`Builder::finish`] requires an element.
    pub fn root(&self) -> Elem<'_> {
        Elem { tree: self, at: 0 }
    }

    fn str(&self, span: Span) -> &str {
        &self.text[span.range()]
    }

    /// The tree of `el`, with its attributes under `util.stanza`'s keys.
    pub fn from_element(el: &Element) -> Tree {
        let mut b = Builder::default();
        b.element(el);
        b.finish()
    }

    /// The element this tree describes.
    pub fn to_element(&self) -> Element {
        self.root().to_element()
    }
}

/// Trees are equal when the elements they describe are (attribute order aside).
impl PartialEq for Tree {
    fn eq(&self, other: &Tree) -> bool {
        self.to_element() == other.to_element()
    }
}

/// An element of a [`Tree`].
#[derive(Clone, Copy)]
pub struct Elem<'t> {
    tree: &'t Tree,
    at: usize,
}

/// A child of an element.
pub enum Child<'t> {
    Element(Elem<'t>),
    Text(&'t str),
}

impl<'t> Elem<'t> {
    fn head(&self) -> Head {
        match self.tree.items[self.at] {
            Item::Element(head) => head,
            _ => unreachable!("an Elem points at an element"),
        }
    }

    pub fn name(&self) -> &'t str {
        self.tree.str(self.head().name)
    }

    pub fn ns(&self) -> &'t str {
        self.tree.str(self.head().ns)
    }

    /// The attributes, as (`util.stanza` key, value).
    pub fn attrs(&self) -> impl ExactSizeIterator<Item = (&'t str, &'t str)> + 't {
        let tree = self.tree;
        let from = self.at + 1;
        tree.items[from..from + self.head().attrs as usize]
            .iter()
            .map(move |item| match *item {
                Item::Attr { key, value } => (tree.str(key), tree.str(value)),
                _ => unreachable!("an element's attributes follow it"),
            })
    }

    /// The value of the attribute under `key`.
    pub fn attr(&self, key: &str) -> Option<&'t str> {
        self.attrs().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// How many children (texts and elements) it has.
    pub fn node_count(&self) -> usize {
        self.head().nodes as usize
    }

    /// How many child elements it has.
    pub fn tag_count(&self) -> usize {
        self.head().tags as usize
    }

    /// The children, in order.
    pub fn children(&self) -> impl Iterator<Item = Child<'t>> + 't {
        let tree = self.tree;
        let Head { attrs, end, .. } = self.head();
        let (mut at, end) = (self.at + 1 + attrs as usize, end as usize);
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            match tree.items[at] {
                Item::Text(span) => {
                    at += 1;
                    Some(Child::Text(tree.str(span)))
                }
                Item::Element(Head { end: after, .. }) => {
                    let child = Elem { tree, at };
                    at = after as usize;
                    Some(Child::Element(child))
                }
                Item::Attr { .. } => unreachable!("attributes come before children"),
            }
        })
    }

    /// The child elements, in order.
    pub fn elements(&self) -> impl Iterator<Item = Elem<'t>> + 't {
        self.children().filter_map(|child| match child {
            Child::Element(el) => Some(el),
            Child::Text(_) => None,
        })
    }

    pub fn to_element(&self) -> Element {
        let mut el = Element::builder(self.name(), self.ns()).build();
        for (key, value) in self.attrs() {
            let (ns, name) = split_attr_key(key);
            let name = NcName::try_from(name).expect("a tree's attribute names are NCNames");
            el.set_attr(ns, name, value);
        }
        for child in self.children() {
            match child {
                Child::Element(c) => {
                    el.append_child(c.to_element());
                }
                Child::Text(t) => el.append_text_node(t),
            }
        }
        el
    }
}

/// Builds a [`Tree`] in document order: [`Builder::start`] an element, give its attributes,
/// then its children, then [`Builder::end`] it.
#[derive(Default)]
pub struct Builder {
    tree: Tree,
    /// The elements started and not yet ended, innermost last.
    open: Vec<usize>,
}

/// A point [`Builder::rewind`] can go back to.
#[derive(Clone, Copy)]
pub(crate) struct Mark {
    text: usize,
    items: usize,
    open: usize,
    parent: Option<(usize, Item)>,
}

impl Builder {
    /// A builder with room for `text` bytes of strings and `items` nodes and attributes.
    pub fn with_capacity(text: usize, items: usize) -> Builder {
        Builder {
            tree: Tree {
                text: String::with_capacity(text),
                items: Vec::with_capacity(items),
            },
            open: Vec::with_capacity(8),
        }
    }

    pub(crate) fn push_str(&mut self, s: &str) -> Span {
        let start = self.tree.text.len();
        self.tree.text.push_str(s);
        self.span_from(start)
    }

    /// The span of what was written to the buffer since `start`.
    pub(crate) fn span_from(&self, start: usize) -> Span {
        Span {
            start: start as u32,
            len: (self.tree.text.len() - start) as u32,
        }
    }

    /// The buffer, for writers that decode into it; see [`Builder::span_from`].
    pub(crate) fn buffer(&mut self) -> &mut String {
        &mut self.tree.text
    }

    pub(crate) fn str(&self, span: Span) -> &str {
        self.tree.str(span)
    }

    /// Starts an element as a child of the open one (or as the root).
    pub fn start(&mut self, name: &str, ns: &str) {
        let (name, ns) = (self.push_str(name), self.push_str(ns));
        self.start_spans(name, ns);
    }

    pub(crate) fn start_spans(&mut self, name: Span, ns: Span) {
        debug_assert!(
            self.open.is_empty() == self.tree.items.is_empty(),
            "one root"
        );
        self.count_child(true);
        self.open.push(self.tree.items.len());
        self.tree.items.push(Item::Element(Head {
            name,
            ns,
            attrs: 0,
            nodes: 0,
            tags: 0,
            end: 0,
        }));
    }

    /// An attribute of the element just started, under its `util.stanza` key.
    pub fn attr(&mut self, key: &str, value: &str) {
        let (key, value) = (self.push_str(key), self.push_str(value));
        self.attr_spans(key, value);
    }

    pub(crate) fn attr_spans(&mut self, key: Span, value: Span) {
        let &open = self
            .open
            .last()
            .expect("an attribute belongs to an element");
        let next = self.tree.items.len();
        if let Item::Element(head) = &mut self.tree.items[open] {
            debug_assert_eq!(
                open + 1 + head.attrs as usize,
                next,
                "attributes before children"
            );
            head.attrs += 1;
        }
        self.tree.items.push(Item::Attr { key, value });
    }

    /// A text child of the open element; an empty one is left out, and one that follows
    /// another text is joined to it, as a parser gives it.
    pub fn text(&mut self, text: &str) {
        let span = self.push_str(text);
        self.text_span(span);
    }

    pub(crate) fn text_span(&mut self, span: Span) {
        if span.len == 0 {
            return;
        }
        if let Some(Item::Text(last)) = self.tree.items.last_mut() {
            if last.start + last.len == span.start {
                last.len += span.len;
                return;
            }
        }
        self.count_child(false);
        self.tree.items.push(Item::Text(span));
    }

    fn count_child(&mut self, element: bool) {
        if let Some(&open) = self.open.last() {
            if let Item::Element(head) = &mut self.tree.items[open] {
                head.nodes += 1;
                head.tags += u32::from(element);
            }
        }
    }

    /// Ends the innermost open element.
    pub fn end(&mut self) {
        let open = self.open.pop().expect("an element to end");
        let after = self.tree.items.len() as u32;
        if let Item::Element(head) = &mut self.tree.items[open] {
            head.end = after;
        }
    }

    /// Appends `el` and its subtree as a child of the open element (or as the root).
    pub fn element(&mut self, el: &Element) {
        self.start(el.name(), &el.ns());
        for ((attr_ns, name), value) in el.attrs().iter() {
            let start = self.tree.text.len();
            let attr_ns = (!attr_ns.is_none()).then(|| attr_ns.as_str());
            write_attr_key(&mut self.tree.text, attr_ns, name.as_str());
            let key = self.span_from(start);
            let value = self.push_str(value);
            self.attr_spans(key, value);
        }
        for node in el.nodes() {
            match node {
                Node::Element(child) => self.element(child),
                Node::Text(text) => self.text(text),
            }
        }
        self.end();
    }

    /// Where the builder is, to [`Builder::rewind`] to if what follows fails.
    pub(crate) fn mark(&self) -> Mark {
        Mark {
            text: self.tree.text.len(),
            items: self.tree.items.len(),
            open: self.open.len(),
            parent: self.open.last().map(|&at| (at, self.tree.items[at])),
        }
    }

    /// Forgets everything built since `mark`.
    pub(crate) fn rewind(&mut self, mark: Mark) {
        self.tree.text.truncate(mark.text);
        self.tree.items.truncate(mark.items);
        self.open.truncate(mark.open);
        if let Some((at, item)) = mark.parent {
            self.tree.items[at] = item;
        }
    }

    /// Moves the element started at item `at` to namespace `to`, with every descendant that
    /// shares its namespace through an unbroken line of such elements (as descendants that
    /// inherit a namespace would move with it).
    pub(crate) fn move_namespace(&mut self, at: usize, to: &str) {
        let Item::Element(Head { ns: from, end, .. }) = self.tree.items[at] else {
            unreachable!("a namespace moves with an element");
        };
        if self.tree.str(from) == to {
            return;
        }
        let to = self.push_str(to);
        // The elements around the current item: where each ends, and whether it moved.
        let mut ancestors: Vec<(u32, bool)> = Vec::new();
        for i in at..end as usize {
            let Item::Element(Head { ns, end, .. }) = self.tree.items[i] else {
                continue;
            };
            while ancestors.last().is_some_and(|&(e, _)| e as usize <= i) {
                ancestors.pop();
            }
            let parent_moved = ancestors.last().is_none_or(|&(_, moved)| moved);
            let moves = parent_moved && self.tree.str(ns) == self.tree.str(from);
            if moves {
                if let Item::Element(head) = &mut self.tree.items[i] {
                    head.ns = to;
                }
            }
            ancestors.push((end, moves));
        }
    }

    /// The index the next item gets.
    pub(crate) fn len(&self) -> usize {
        self.tree.items.len()
    }

    /// The finished tree. Every started element must have ended.
    pub fn finish(self) -> Tree {
        assert!(self.open.is_empty(), "every element ended");
        assert!(!self.tree.items.is_empty(), "a tree has a root");
        self.tree
    }
}
