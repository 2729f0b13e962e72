//! `util.stanza` tables from [`Tree`]s (result messages; elements go through a tree), to
//! `minidom` elements, and to the XML text the archive stores.
//!
//! A `util.stanza` is a table `{ name =, attr = {}, tags = {}, [1..n] = children }` with the
//! metatable `stanza_mt`: text children are strings in the array part, element children are
//! tables (and also listed in `tags`). Attribute keys follow Prosody's conventions: plain
//! names, `xml:lang`, and `"<namespace>\1<name>"` for other namespaced attributes. An element
//! without `attr.xmlns` is in its parent's namespace; a top-level stanza has none (the stream's
//! `jabber:client` is implied).
//!
//! Walking the table from Rust costs about a third of `tostring` plus an XML parse, and the
//! tables built here are real stanzas (`st.is_stanza` holds), so results go through Prosody's
//! outgoing filters (stream management counts them).

use minidom::rxml::NcName;
use minidom::Element;
use mlua::{ffi, Lua, Result as LuaResult, Table, Value};
use std::collections::BTreeSet;
use std::ffi::{c_int, CStr};
use std::fmt::Write as _;

use crate::policy::{Summary, TopChild};
use crate::protocol::tree::{split_attr_key, Child, Elem, Tree};
use crate::protocol::{ns, xml_text};

const MUC_USER: &str = "http://jabber.org/protocol/muc#user";

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.to_string_lossy()),
        _ => None,
    }
}

/// The element's own namespace: its `xmlns`, or its parent's.
fn namespace_of(attr: &Option<Table>, parent_ns: &str) -> LuaResult<String> {
    Ok(match attr {
        Some(a) => a
            .raw_get::<Option<String>>("xmlns")?
            .unwrap_or_else(|| parent_ns.to_owned()),
        None => parent_ns.to_owned(),
    })
}

/// Deepest element nesting copied from a stanza. Real stanzas are a few levels deep; the copy
/// recurses on Prosody's own thread (about 1 KB of stack a level), so an unbounded depth would
/// let one client overflow the stack: a 140 KB message nested 20,000 deep did. 1024 levels stay
/// near 1 MB, and still answer the 500-level queries stock answers.
pub const MAX_DEPTH: usize = 1024;

/// Why a stanza could not be copied.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("the stanza is nested deeper than {MAX_DEPTH} elements")]
    TooDeep,
    #[error("{0}")]
    Lua(#[from] mlua::Error),
}

/// Copies a stanza table into an owned element, refusing nesting deeper than [`MAX_DEPTH`].
pub fn to_element(t: &Table, parent_ns: &str) -> Result<Element, CopyError> {
    copy(t, parent_ns, 0)
}

fn copy(t: &Table, parent_ns: &str, depth: usize) -> Result<Element, CopyError> {
    if depth >= MAX_DEPTH {
        return Err(CopyError::TooDeep);
    }
    let name: String = t.raw_get("name")?;
    let attr: Option<Table> = t.raw_get("attr")?;
    let ns = namespace_of(&attr, parent_ns)?;
    let mut el = Element::bare(name, ns.clone());
    if let Some(attr) = attr {
        for pair in attr.pairs::<Value, Value>() {
            let (k, v) = pair?;
            let (Some(key), Some(value)) = (text(&k), text(&v)) else {
                continue;
            };
            if key == "xmlns" {
                continue;
            }
            let (attr_ns, local) = split_attr_key(&key);
            // Names Prosody's parser let through are valid; anything else cannot be stored.
            let name = NcName::try_from(local)
                .map_err(|e| mlua::Error::external(format!("attribute name {key:?}: {e}")))?;
            el.attrs_mut().insert(attr_ns, name, value);
        }
    }
    let len = t.raw_len();
    for i in 1..=len {
        match t.raw_get::<Value>(i)? {
            Value::String(s) => el.append_text_node(s.to_string_lossy()),
            Value::Table(child) => {
                el.append_child(copy(&child, &ns, depth + 1)?);
            }
            _ => {}
        }
    }
    Ok(el)
}

/// The top level of a message stanza, for classification, without copying the tree.
///
/// Read on Lua's C API inside one protected call, as [`to_xml`] is: through mlua's safe API
/// every field read was a protected call of its own and pushed its key anew, about 15,000
/// instructions a call on Prosody's loop (`make bench-instr`). A child that is not a
/// table, or has no name, is not an element and is passed over.
pub fn summary(lua: &Lua, t: &Table) -> LuaResult<Summary> {
    let mut summary = Summary::default();
    // SAFETY: `exec_raw` runs the closure as one protected call with `t` pushed as its only
    // argument. `summarise` only reads (raw gets, `lua_tolstring` on values already known to
    // be strings), so nothing raises a Lua error but `luaL_checkstack` or pushing a key when
    // memory runs out; the frames unwound then hold owned strings, which are leaked. The
    // stack is left as it was found, and the argument is removed.
    unsafe {
        lua.exec_raw::<()>(t, |state| {
            let top = ffi::lua_gettop(state);
            summarise(state, top, &mut summary);
            ffi::lua_settop(state, top - 1);
        })
    }?;
    Ok(summary)
}

/// `t[key]` as an owned string, for the table at absolute index `t`; `None` unless a string.
unsafe fn string_field(state: *mut ffi::lua_State, t: c_int, key: &CStr) -> Option<String> {
    let value =
        (raw_field(state, t, key) == ffi::LUA_TSTRING).then(|| lua_str(state, -1).into_owned());
    ffi::lua_settop(state, -2);
    value
}

/// The element at absolute index `t`: its name and its `attr` table's `xmlns`, or `None` when
/// it is not an element.
unsafe fn name_and_xmlns(state: *mut ffi::lua_State, t: c_int) -> Option<(String, Option<String>)> {
    if ffi::lua_type(state, t) != ffi::LUA_TTABLE {
        return None;
    }
    let name = string_field(state, t, c"name")?;
    let xmlns = if raw_field(state, t, c"attr") == ffi::LUA_TTABLE {
        string_field(state, ffi::lua_gettop(state), c"xmlns")
    } else {
        None
    };
    ffi::lua_settop(state, -2);
    Some((name, xmlns))
}

unsafe fn summarise(state: *mut ffi::lua_State, t: c_int, s: &mut Summary) {
    ffi::luaL_checkstack(state, 8, c"stanza nested too deep".as_ptr());
    if raw_field(state, t, c"attr") == ffi::LUA_TTABLE {
        let attr = ffi::lua_gettop(state);
        s.kind = string_field(state, attr, c"type");
        s.to = string_field(state, attr, c"to");
        s.ns = string_field(state, attr, c"xmlns").unwrap_or_else(|| ns::CLIENT.to_owned());
    } else {
        s.ns = ns::CLIENT.to_owned();
    }
    ffi::lua_settop(state, t);
    if raw_field(state, t, c"tags") == ffi::LUA_TTABLE {
        let tags = ffi::lua_gettop(state);
        for i in 1..=ffi::lua_rawlen(state, tags) as ffi::lua_Integer {
            ffi::lua_rawgeti(state, tags, i);
            let child = ffi::lua_gettop(state);
            if let Some((name, xmlns)) = name_and_xmlns(state, child) {
                let ns = xmlns.unwrap_or_else(|| s.ns.clone());
                let has_invite =
                    name == "x" && ns == MUC_USER && has_child(state, child, "invite", MUC_USER);
                s.children.push(TopChild {
                    name,
                    ns,
                    has_invite,
                });
            }
            ffi::lua_settop(state, tags);
        }
    }
    ffi::lua_settop(state, t);
}

/// Whether the element at absolute index `t` has a child element `name` in `parent_ns`.
unsafe fn has_child(state: *mut ffi::lua_State, t: c_int, name: &str, parent_ns: &str) -> bool {
    let base = ffi::lua_gettop(state);
    let mut found = false;
    if raw_field(state, t, c"tags") == ffi::LUA_TTABLE {
        let tags = ffi::lua_gettop(state);
        for i in 1..=ffi::lua_rawlen(state, tags) as ffi::lua_Integer {
            ffi::lua_rawgeti(state, tags, i);
            if let Some((child_name, xmlns)) = name_and_xmlns(state, ffi::lua_gettop(state)) {
                found = child_name == name && xmlns.as_deref().unwrap_or(parent_ns) == parent_ns;
            }
            ffi::lua_settop(state, tags);
            if found {
                break;
            }
        }
    }
    ffi::lua_settop(state, base);
    found
}

/// Builds a `util.stanza` from an element (a `<fin/>`, a form): see [`build_tree`].
pub fn build(lua: &Lua, stanza_mt: &Table, el: &Element) -> LuaResult<Table> {
    build_tree(lua, stanza_mt, &Tree::from_element(el))
}

/// Builds a top-level `util.stanza` from a tree. `xmlns` is set only where the namespace
/// differs from the parent's, and on the top element only when it is not `jabber:client`.
///
/// The whole tree is built with Lua's C API inside one protected call: through mlua's safe API
/// every table and string made is a protected call of its own, which was the largest single
/// cost of answering a page on Prosody's loop. The tables are exactly those `util.stanza`
/// makes: `name`, `attr`, `tags`, the child nodes in order, and `stanza_mt`.
pub fn build_tree(lua: &Lua, stanza_mt: &Table, tree: &Tree) -> LuaResult<Table> {
    // SAFETY: `exec_raw` runs the closure as one protected call with `stanza_mt` pushed as its
    // only argument; `build_raw` leaves exactly one new table above it, and the argument is
    // removed, so the one value left is the result. A Lua error raised inside (out of memory)
    // unwinds through `build_raw`'s frames, which hold only borrowed data.
    unsafe {
        lua.exec_raw::<Table>(stanza_mt, |state| {
            let mt = ffi::lua_gettop(state);
            build_raw(state, mt, tree.root(), ns::CLIENT);
            ffi::lua_remove(state, mt);
        })
    }
}

unsafe fn push_str(state: *mut ffi::lua_State, s: &str) {
    ffi::lua_pushlstring(state, s.as_ptr().cast(), s.len());
}

/// `t[key] = value` for the table at absolute index `t`.
unsafe fn set_field(state: *mut ffi::lua_State, t: c_int, key: &str, value: &str) {
    push_str(state, key);
    push_str(state, value);
    ffi::lua_rawset(state, t);
}

/// Pushes the stanza table of `el`; `mt` is the absolute index of `stanza_mt`.
unsafe fn build_raw(state: *mut ffi::lua_State, mt: c_int, el: Elem, parent_ns: &str) {
    // Each level keeps three tables on the stack while building the next.
    ffi::luaL_checkstack(state, 6, c"stanza nested too deep".as_ptr());
    let ns = el.ns();
    let attrs = el.attrs();
    ffi::lua_createtable(state, el.node_count() as c_int, 3);
    let t = ffi::lua_gettop(state);
    ffi::lua_createtable(state, 0, attrs.len() as c_int + 1);
    let attr = t + 1;
    if ns != parent_ns {
        set_field(state, attr, "xmlns", ns);
    }
    for (key, value) in attrs {
        set_field(state, attr, key, value);
    }
    ffi::lua_createtable(state, el.tag_count() as c_int, 0);
    let tag_list = t + 2;
    let mut tag_count = 0;
    for (i, node) in el.children().enumerate() {
        match node {
            Child::Element(child) => {
                build_raw(state, mt, child, ns);
                ffi::lua_pushvalue(state, -1);
                ffi::lua_rawseti(state, t, i as ffi::lua_Integer + 1);
                tag_count += 1;
                ffi::lua_rawseti(state, tag_list, tag_count);
            }
            Child::Text(text) => {
                push_str(state, text);
                ffi::lua_rawseti(state, t, i as ffi::lua_Integer + 1);
            }
        }
    }
    set_field(state, t, "name", el.name());
    push_str(state, "attr");
    ffi::lua_pushvalue(state, attr);
    ffi::lua_rawset(state, t);
    push_str(state, "tags");
    ffi::lua_pushvalue(state, tag_list);
    ffi::lua_rawset(state, t);
    ffi::lua_pushvalue(state, mt);
    ffi::lua_setmetatable(state, t);
    ffi::lua_settop(state, t);
}

/// Why a stanza could not be written as XML for the archive.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("the stanza is nested deeper than {MAX_DEPTH} elements")]
    TooDeep,
    #[error("it holds {0}, which XML cannot carry")]
    Invalid(String),
    #[error("{0}")]
    Lua(#[from] mlua::Error),
}

/// Writes a message stanza table as the XML text the archive stores, leaving out its top-level
/// children in a namespace of `strip` (`dont_archive_namespaces`, mod_mam.lua:320-332).
/// `Ok(None)`: nothing is left once they are stripped.
///
/// The text parses to the element [`to_element`] builds (attribute order aside), without that
/// tree in between: the walk runs on Lua's C API inside one protected call and writes straight
/// into one buffer. Through mlua's safe API and `minidom`, this copy was the larger
/// part of the archive path's own cost on Prosody's loop. Names are checked as XML names and
/// texts for characters XML 1.0 cannot carry, so that every stored row parses again.
pub fn to_xml(lua: &Lua, t: &Table, strip: &BTreeSet<String>) -> Result<Option<String>, XmlError> {
    let mut out = String::with_capacity(512);
    let mut written: Result<bool, XmlError> = Ok(false);
    // SAFETY: `exec_raw` runs the closure as one protected call with `t` pushed as its only
    // argument. `XmlWriter::element` only reads (raw gets, `lua_next` on tables it does not
    // change, `lua_tolstring` on values already known to be strings), so nothing raises a Lua
    // error but `luaL_checkstack` or pushing a key string when memory runs out; the frames
    // unwound then hold borrowed data only (a text made valid UTF-8 would leak). The stack is
    // left as it was found, and the argument is removed.
    let run = unsafe {
        lua.exec_raw::<()>(t, |state| {
            let top = ffi::lua_gettop(state);
            let mut w = XmlWriter {
                state,
                out: &mut out,
                strip,
            };
            written = w.element(top, ns::CLIENT, 0);
            ffi::lua_settop(state, top - 1);
        })
    };
    run?;
    Ok(written?.then_some(out))
}

struct XmlWriter<'a> {
    state: *mut ffi::lua_State,
    out: &'a mut String,
    /// `dont_archive_namespaces`: the top element's children in these are left out.
    strip: &'a BTreeSet<String>,
}

/// A Lua string as text: borrowed from Lua when it is UTF-8, as Prosody's parser guarantees.
unsafe fn lua_str<'s>(state: *mut ffi::lua_State, idx: c_int) -> std::borrow::Cow<'s, str> {
    let mut len = 0usize;
    let ptr = ffi::lua_tolstring(state, idx, &mut len);
    String::from_utf8_lossy(std::slice::from_raw_parts(ptr.cast::<u8>(), len))
}

/// `t[key]` pushed, for the table at absolute index `t`; returns its type. The key is pushed
/// with `lua_pushstring`, which finds a constant C string in Lua's string cache by its address
/// instead of hashing it.
unsafe fn raw_field(state: *mut ffi::lua_State, t: c_int, key: &CStr) -> c_int {
    ffi::lua_pushstring(state, key.as_ptr());
    ffi::lua_rawget(state, t)
}

impl XmlWriter<'_> {
    /// Writes the element at absolute stack index `t`, the top element at `depth` 0 (its
    /// namespace always declared, its children in [`XmlWriter::strip`] left out). Returns
    /// whether it has a child element.
    unsafe fn element(
        &mut self,
        t: c_int,
        parent_ns: &str,
        depth: usize,
    ) -> Result<bool, XmlError> {
        if depth >= MAX_DEPTH {
            return Err(XmlError::TooDeep);
        }
        let state = self.state;
        ffi::luaL_checkstack(state, 8, c"stanza nested too deep".as_ptr());
        let base = ffi::lua_gettop(state);
        if raw_field(state, t, c"name") != ffi::LUA_TSTRING {
            return Err(XmlError::Invalid("an element without a name".into()));
        }
        let name = lua_str(state, -1);
        check_name(&name)?;
        let has_attr = raw_field(state, t, c"attr") == ffi::LUA_TTABLE;
        let attr = base + 2;
        let ns: std::borrow::Cow<str> =
            if has_attr && raw_field(state, attr, c"xmlns") == ffi::LUA_TSTRING {
                lua_str(state, -1)
            } else {
                parent_ns.into()
            };
        self.out.push('<');
        self.out.push_str(&name);
        if depth == 0 || ns != parent_ns {
            self.out.push_str(" xmlns=\"");
            escape(self.out, &ns, true)?;
            self.out.push('"');
        }
        if has_attr {
            self.attributes(attr)?;
        }
        let len = ffi::lua_rawlen(state, t) as ffi::lua_Integer;
        let mut open = false;
        let mut has_child = false;
        for i in 1..=len {
            let mark = ffi::lua_gettop(state);
            match ffi::lua_rawgeti(state, t, i) {
                ffi::LUA_TSTRING => {
                    if !open {
                        self.out.push('>');
                        open = true;
                    }
                    escape(self.out, &lua_str(state, -1), false)?;
                }
                ffi::LUA_TTABLE => {
                    let child = ffi::lua_gettop(state);
                    if depth == 0 && !self.strip.is_empty() {
                        let strip = self.strip;
                        let child_has_attr = raw_field(state, child, c"attr") == ffi::LUA_TTABLE;
                        let child_ns = child_has_attr
                            && raw_field(state, child + 1, c"xmlns") == ffi::LUA_TSTRING;
                        let in_strip = if child_ns {
                            strip.contains(lua_str(state, -1).as_ref())
                        } else {
                            strip.contains(ns.as_ref())
                        };
                        ffi::lua_settop(state, child);
                        if in_strip {
                            ffi::lua_settop(state, mark);
                            continue;
                        }
                    }
                    if !open {
                        self.out.push('>');
                        open = true;
                    }
                    self.element(child, &ns, depth + 1)?;
                    has_child = true;
                }
                _ => {}
            }
            ffi::lua_settop(state, mark);
        }
        if open {
            self.out.push_str("</");
            self.out.push_str(&name);
            self.out.push('>');
        } else {
            self.out.push_str("/>");
        }
        ffi::lua_settop(state, base);
        Ok(has_child)
    }

    /// The attributes of the `attr` table at absolute index `attr`, but `xmlns`. Prosody's keys
    /// are plain names, `xml:<name>`, or `<namespace>\1<name>`; the last get a prefix declared
    /// on this element. Keys or values that are not strings are not attributes.
    unsafe fn attributes(&mut self, attr: c_int) -> Result<(), XmlError> {
        let state = self.state;
        let mut prefixes = 0;
        ffi::lua_pushnil(state);
        while ffi::lua_next(state, attr) != 0 {
            if ffi::lua_type(state, -2) == ffi::LUA_TSTRING
                && ffi::lua_type(state, -1) == ffi::LUA_TSTRING
            {
                let key = lua_str(state, -2);
                if key != "xmlns" {
                    let value = lua_str(state, -1);
                    match key.split_once('\u{1}') {
                        Some((ans, local)) if ans == ns::XML => {
                            check_name(local)?;
                            self.out.push_str(" xml:");
                            self.out.push_str(local);
                        }
                        Some((ans, local)) => {
                            check_name(local)?;
                            prefixes += 1;
                            let _ = write!(self.out, " xmlns:ns{prefixes}=\"");
                            escape(self.out, ans, true)?;
                            let _ = write!(self.out, "\" ns{prefixes}:{local}");
                        }
                        None => {
                            check_name(key.strip_prefix("xml:").unwrap_or(&key))?;
                            self.out.push(' ');
                            self.out.push_str(&key);
                        }
                    }
                    self.out.push_str("=\"");
                    escape(self.out, &value, true)?;
                    self.out.push('"');
                }
            }
            ffi::lua_settop(state, -2); // keep the key for lua_next
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), XmlError> {
    xml_text::check_name(name).map_err(XmlError::Invalid)
}

fn escape(out: &mut String, s: &str, attribute: bool) -> Result<(), XmlError> {
    xml_text::escape(out, s, attribute).map_err(XmlError::Invalid)
}
