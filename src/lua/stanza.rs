//! `util.stanza` tables to and from `minidom` elements.
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

use minidom::rxml::{Namespace, NcName};
use minidom::{Element, Node};
use mlua::{ffi, Lua, Result as LuaResult, Table, Value};
use std::ffi::c_int;

use crate::policy::{Summary, TopChild};
use crate::protocol::ns;

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
            let (attr_ns, local) = match key.split_once('\u{1}') {
                Some((ans, local)) => (Namespace::from(ans.to_owned()), local),
                None => match key.strip_prefix("xml:") {
                    Some(local) => (Namespace::XML, local),
                    None => (Namespace::NONE, key.as_str()),
                },
            };
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
pub fn summary(t: &Table) -> LuaResult<Summary> {
    let attr: Option<Table> = t.raw_get("attr")?;
    let ns = namespace_of(&attr, ns::CLIENT)?;
    let (kind, to) = match &attr {
        Some(a) => (a.raw_get("type")?, a.raw_get("to")?),
        None => (None, None),
    };
    let mut children = Vec::new();
    if let Some(tags) = t.raw_get::<Option<Table>>("tags")? {
        for child in tags.sequence_values::<Table>() {
            let child = child?;
            let child_attr: Option<Table> = child.raw_get("attr")?;
            let child_ns = namespace_of(&child_attr, &ns)?;
            let name: String = child.raw_get("name")?;
            let has_invite =
                name == "x" && child_ns == MUC_USER && has_child(&child, "invite", MUC_USER)?;
            children.push(TopChild {
                name,
                ns: child_ns,
                has_invite,
            });
        }
    }
    Ok(Summary {
        kind,
        to,
        ns,
        children,
    })
}

fn has_child(t: &Table, name: &str, parent_ns: &str) -> LuaResult<bool> {
    let Some(tags) = t.raw_get::<Option<Table>>("tags")? else {
        return Ok(false);
    };
    for child in tags.sequence_values::<Table>() {
        let child = child?;
        let attr: Option<Table> = child.raw_get("attr")?;
        if child.raw_get::<String>("name")? == name && namespace_of(&attr, parent_ns)? == parent_ns
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Builds a `util.stanza` from an element. `xmlns` is set only where the namespace differs
/// from the parent's; pass `jabber:client` as `parent_ns` for a top-level stanza.
///
/// The whole tree is built with Lua's C API inside one protected call: through mlua's safe API
/// every table and string made is a protected call of its own, which was the largest single
/// cost of answering a page on Prosody's loop. The tables are exactly those `util.stanza`
/// makes: `name`, `attr`, `tags`, the child nodes in order, and `stanza_mt`.
pub fn build(lua: &Lua, stanza_mt: &Table, el: &Element, parent_ns: &str) -> LuaResult<Table> {
    // SAFETY: `exec_raw` runs the closure as one protected call with `stanza_mt` pushed as its
    // only argument; `build_raw` leaves exactly one new table above it, and the argument is
    // removed, so the one value left is the result. A Lua error raised inside (out of memory)
    // unwinds through `build_raw`'s frames, which hold only borrowed data and, for namespaced
    // attribute names, a `String` that is then leaked, never used again.
    unsafe {
        lua.exec_raw::<Table>(stanza_mt, |state| {
            let mt = ffi::lua_gettop(state);
            build_raw(state, mt, el, parent_ns);
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
unsafe fn build_raw(state: *mut ffi::lua_State, mt: c_int, el: &Element, parent_ns: &str) {
    // Each level keeps three tables on the stack while building the next.
    ffi::luaL_checkstack(state, 6, c"stanza nested too deep".as_ptr());
    let ns = el.ns();
    let attrs = el.attrs();
    let nodes = el.nodes().count();
    let tags = el.children().count();
    ffi::lua_createtable(state, nodes as c_int, 3);
    let t = ffi::lua_gettop(state);
    ffi::lua_createtable(state, 0, attrs.len() as c_int + 1);
    let attr = t + 1;
    if ns != parent_ns {
        set_field(state, attr, "xmlns", ns.as_str());
    }
    for ((attr_ns, name), value) in attrs.iter() {
        if attr_ns.is_none() {
            set_field(state, attr, name.as_str(), value.as_str());
        } else if *attr_ns == Namespace::XML {
            set_field(
                state,
                attr,
                &format!("xml:{}", name.as_str()),
                value.as_str(),
            );
        } else {
            let key = format!("{}\u{1}{}", attr_ns.as_str(), name.as_str());
            set_field(state, attr, &key, value.as_str());
        }
    }
    ffi::lua_createtable(state, tags as c_int, 0);
    let tag_list = t + 2;
    let mut tag_count = 0;
    for (i, node) in el.nodes().enumerate() {
        match node {
            Node::Element(child) => {
                build_raw(state, mt, child, &ns);
                ffi::lua_pushvalue(state, -1);
                ffi::lua_rawseti(state, t, i as ffi::lua_Integer + 1);
                tag_count += 1;
                ffi::lua_rawseti(state, tag_list, tag_count);
            }
            Node::Text(text) => {
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
