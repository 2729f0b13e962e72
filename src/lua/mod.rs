//! The Lua-facing surface: what `lua/mod_mam_rs.lua` calls. It converts Lua values and
//! `util.stanza` tables to and from the crate's types, and nothing else: no rule, query or
//! SQL lives here.
//!
//! Exports of `require "mam_rs_native"` (loaded with `package.loadlib`):
//! - `version`
//! - `parse_config(options) -> settings, lines`: checks option values; `lines` is a list of
//!   `{ level, message }` log lines, each naming the option, the value and what is accepted.
//! - `should_store(stanza) -> bool, reason`: stock mod_mam's default archiving decision.
//! - `jid_parts(jid) -> node, bare`: `jid.split(jid)`'s node and `jid.bare(jid)`, as Prosody's
//!   util.jid gives them (nil, nil for what it takes as no JID).
//! - `prefs_from_element(prefs) -> table`: a `<prefs>` element in Prosody's stored form.
//! - `admin(options, create) -> handle | nil, message`: the `prosodyctl` commands' handle on a
//!   host's database (see [`admin`]).
//! - `open(host, options, stanza_mt) -> archive | nil, message`: the per-host handle, whose
//!   methods are `fd`, `poke`, `node`, `archive`, `query`, `metadata`, `expire`, `mark`,
//!   `delete_user`, `drain`, `query_form`, `prefs_element`, `metrics` and `close`. A query's
//!   completion carries its result messages as a [`Results`] handle (`take`, `remaining`).
//! - `metric_buckets`: `{ seconds = {...}, batch = {...} }`, the bucket bounds of the
//!   histograms that `archive:metrics()` fills (see [`crate::engine::metrics`]).

mod admin;
mod stanza;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// How long closing waits for this host's queries and commits.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

use minidom::Element;
use mlua::prelude::*;
use mlua::{Table, UserData, UserDataMethods, Value};

use crate::config::{self, Config, RawValue};
use crate::engine::metrics::{self, HostMetrics, NotArchived, Reporter, Value as Sample};
use crate::engine::{Completion, Engine, EngineError, Mailbox, QueryRequest, Request};
use crate::policy;
use crate::protocol::stored;
use crate::protocol::tree::Tree;
use crate::protocol::xep0313::{self, Limits};
use crate::protocol::xep0441::{DefaultRule, Prefs};
use crate::protocol::{ns, split_jid};
use crate::store::{ArchiveRef, ExpiryRule, Mark, Strategy};

#[mlua::lua_module(name = "mam_rs_native")]
fn mam_rs_native(lua: &Lua) -> LuaResult<Table> {
    let exports = lua.create_table()?;
    exports.set("version", env!("CARGO_PKG_VERSION"))?;
    exports.set("parse_config", lua.create_function(parse_config)?)?;
    exports.set("should_store", lua.create_function(should_store)?)?;
    // SAFETY: `jid_parts` is a plain Lua C function (see there).
    exports.set("jid_parts", unsafe { lua.create_c_function(jid_parts)? })?;
    exports.set("open", lua.create_function(open)?)?;
    let buckets = lua.create_table()?;
    buckets.set("seconds", metrics::SECONDS_BUCKETS)?;
    buckets.set("batch", metrics::BATCH_BUCKETS)?;
    exports.set("metric_buckets", buckets)?;
    exports.set(
        "prefs_from_element",
        lua.create_function(prefs_from_element)?,
    )?;
    exports.set("admin", lua.create_function(admin::admin)?)?;
    Ok(exports)
}

/// `jid_parts(jid) -> node, bare`: the node `jid.split(jid)` gives and `jid.bare(jid)`, for the
/// two JIDs of every archived message: one pass over the bytes ([`split_jid`]) instead of
/// util.jid's three pattern matches and a concatenation. A plain C function, not an mlua
/// callback: it only reads its argument and pushes two values, which a C function always has
/// room for, so nothing can raise but `lua_pushlstring` running out of memory, and this frame
/// holds nothing that needs dropping when that unwinds it. Anything but a string is no JID.
unsafe extern "C-unwind" fn jid_parts(state: *mut mlua::ffi::lua_State) -> std::ffi::c_int {
    use mlua::ffi;
    let split = if ffi::lua_type(state, 1) == ffi::LUA_TSTRING {
        let mut len = 0usize;
        let ptr = ffi::lua_tolstring(state, 1, &mut len);
        // SAFETY: Lua's string at index 1 stays alive (and unmoved) while it is on the stack.
        let raw = std::slice::from_raw_parts(ptr.cast::<u8>(), len);
        split_jid(raw).map(|split| (raw, split))
    } else {
        None
    };
    match split {
        Some((raw, split)) => {
            match &split.node {
                Some(node) => {
                    let node = &raw[node.clone()];
                    ffi::lua_pushlstring(state, node.as_ptr().cast(), node.len());
                }
                None => ffi::lua_pushnil(state),
            }
            let bare = &raw[..split.host.end];
            ffi::lua_pushlstring(state, bare.as_ptr().cast(), bare.len());
        }
        None => {
            ffi::lua_pushnil(state);
            ffi::lua_pushnil(state);
        }
    }
    2
}

fn raw_value(v: &Value) -> LuaResult<Option<RawValue>> {
    Ok(Some(match v {
        Value::Nil => return Ok(None),
        Value::Boolean(b) => RawValue::Bool(*b),
        Value::Integer(i) => RawValue::Integer(*i),
        Value::Number(n) => RawValue::Number(*n),
        Value::String(s) => RawValue::String(s.to_string_lossy()),
        Value::Table(t) => {
            let len = t.raw_len();
            let mut entries = 0;
            t.for_each::<Value, Value>(|_, _| {
                entries += 1;
                Ok(())
            })?;
            if entries != len {
                // A block of named settings (the `sql` option), or something else.
                let mut map = BTreeMap::new();
                let mut named = true;
                t.for_each::<Value, Value>(|k, v| {
                    match (k, raw_value(&v)?) {
                        (Value::String(k), Some(v)) => {
                            map.insert(k.to_string_lossy(), v);
                        }
                        _ => named = false,
                    }
                    Ok(())
                })?;
                if named {
                    RawValue::Map(map)
                } else {
                    RawValue::Other("a table that is neither a list nor named settings".into())
                }
            } else {
                let mut items = Vec::with_capacity(len);
                for i in 1..=len {
                    items.extend(raw_value(&t.raw_get::<Value>(i)?)?);
                }
                RawValue::List(items)
            }
        }
        other => RawValue::Other(format!("a {}", other.type_name())),
    }))
}

pub(crate) fn read_config(options: &Table) -> LuaResult<(Config, Vec<config::ConfigError>)> {
    let mut raw = BTreeMap::new();
    for pair in options.pairs::<String, Value>() {
        let (k, v) = pair?;
        if let Some(value) = raw_value(&v)? {
            raw.insert(k, value);
        }
    }
    Ok(config::from_options(&raw))
}

fn parse_config(lua: &Lua, options: Table) -> LuaResult<(Table, Table)> {
    let (config, problems) = read_config(&options)?;
    let lines = lua.create_table()?;
    for problem in &problems {
        let line = lua.create_table()?;
        line.set("level", problem.level())?;
        line.set("message", problem.to_string())?;
        lines.raw_push(line)?;
    }
    let settings = lua.create_table()?;
    if let config::Expiry::After(seconds) = config.archive_expires_after {
        settings.set("archive_expires_after", seconds)?;
    }
    settings.set("cleanup_interval", config.cleanup_interval)?;
    settings.set("max_prefs_jids", config.max_prefs_jids)?;
    settings.set("max_queries_per_second", config.max_queries_per_second)?;
    if let Some(smart) = config.smart_retention {
        settings.set("smart_retention_strategy", strategy_name(smart.strategy))?;
        settings.set("smart_retention_min", smart.min_seconds)?;
    }
    settings.set(
        "max_archive_query_results",
        config.max_archive_query_results,
    )?;
    settings.set(
        "default_archive_policy",
        config.default_archive_policy.as_str(),
    )?;
    settings.set("archive_store", config.archive_store.as_str())?;
    settings.set("mam_include_total", config.mam_include_total)?;
    settings.set("mam_smart_enable", config.mam_smart_enable)?;
    settings.set("archive_compression", config.archive_compression)?;
    settings.set(
        "storage_archive_item_limit",
        config.storage_archive_item_limit,
    )?;
    settings.set("database", config.database.describe())?;
    // Said in the start-up line when it is not SQLite's default.
    let tune = config.sqlite_tune;
    if matches!(config.database, crate::store::Location::Sqlite(_))
        && tune != config::SqliteTune::Default
    {
        let sync = tune.synchronous().as_str();
        let line = format!(" (sqlite_tune \"{}\": synchronous = {sync})", tune.as_str());
        settings.set("durability", line)?;
    }
    settings.set(
        "dont_archive_namespaces",
        config
            .dont_archive_namespaces
            .iter()
            .cloned()
            .collect::<Vec<_>>(),
    )?;
    Ok((settings, lines))
}

fn should_store(lua: &Lua, stanza: Table) -> LuaResult<(bool, &'static str)> {
    Ok(policy::should_store(&stanza::summary(lua, &stanza)?))
}

/// What `archive` returns to Lua: `id, release_at, nil, stored copy (when asked for)` when
/// stored, else `nil, nil, why, nil, kind` with `kind` one of [`NotArchived::as_str`].
type Archived = (
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<Table>,
    Option<&'static str>,
);

/// `archive:archive(stanza, user, with, want_stored, seen_by, outgoing)`.
type ArchiveArgs = (
    Table,
    String,
    String,
    Option<bool>,
    Option<Vec<String>>,
    Option<bool>,
);

/// One module instance's view of the engine: its host, its options and its mailbox.
struct Archive {
    /// `None` once closed.
    engine: Option<Arc<Engine>>,
    /// The release mark of the newest message this host archived.
    last_release: Cell<u64>,
    mailbox: Arc<Mailbox>,
    host: Arc<str>,
    store: Arc<str>,
    strip: BTreeSet<String>,
    quota: Option<u32>,
    limits: Limits,
    stanza_mt: Table,
    /// This host's counts (the archive path adds to them)...
    metrics: Arc<HostMetrics>,
    /// ...and what `metrics()` reported of them and of the writer's.
    reporter: RefCell<Reporter>,
}

fn open(
    _: &Lua,
    (host, options, stanza_mt): (String, Table, Table),
) -> LuaResult<(Option<Archive>, Option<String>)> {
    let (config, _) = read_config(&options)?;
    let engine = match Engine::shared(&config) {
        Ok(engine) => engine,
        Err(e) => {
            let why = match &config.database {
                crate::store::Location::Unusable(_) => e.to_string(),
                other => format!("{}: {e}", other.describe()),
            };
            return Ok((None, Some(why)));
        }
    };
    let mailbox = engine.mailbox().map_err(LuaError::external)?;
    let metrics = Arc::new(HostMetrics::default());
    let reporter = Reporter::new(metrics.clone(), engine.writer_metrics().clone());
    Ok((
        Some(Archive {
            engine: Some(engine),
            last_release: Cell::new(0),
            mailbox,
            host: Arc::from(host),
            store: Arc::from(config.archive_store.as_str()),
            strip: config.dont_archive_namespaces.clone(),
            quota: config.storage_archive_item_limit,
            limits: Limits {
                default_max: config.default_page_size,
                max_max: config.max_archive_query_results,
                include_total: config.mam_include_total,
                max_ids: config.max_ids_per_query,
            },
            stanza_mt,
            metrics,
            reporter: RefCell::new(reporter),
        }),
        None,
    ))
}

impl Archive {
    fn engine(&self) -> LuaResult<&Arc<Engine>> {
        self.engine
            .as_ref()
            .ok_or_else(|| LuaError::external("the archive is closed"))
    }

    fn archive_ref(&self, user: String) -> ArchiveRef {
        ArchiveRef {
            host: self.host.clone(),
            user,
            store: self.store.clone(),
        }
    }

    /// Counts a message that was not archived, and says why.
    fn refuse(&self, kind: NotArchived, why: impl Into<String>) -> Archived {
        self.metrics.not_archived(kind);
        (None, None, Some(why.into()), None, Some(kind.as_str()))
    }

    /// Stores a copy of `stanza` in `user`'s archive. Returns the id and the release mark, or
    /// only the reason it was not stored; with `want_stored`, also the stored copy as a stanza
    /// (for `archive-message-added`; built only when someone listens). `outgoing`: the user
    /// sent it (for the metrics).
    #[allow(clippy::too_many_arguments)]
    fn archive(
        &self,
        lua: &Lua,
        stanza: &Table,
        user: String,
        with: String,
        want_stored: bool,
        seen_by: Vec<String>,
        outgoing: bool,
    ) -> LuaResult<Archived> {
        let Some(engine) = self.engine.as_ref() else {
            return Ok(self.refuse(NotArchived::Failed, "the archive is closed"));
        };
        // The shim has already removed stanza-ids claiming to be ours (it strips them from the
        // live stanza, mod_mam.lua:298-312), so this copy needs no second pass.
        let stored = match stanza::to_xml(lua, stanza, &self.strip) {
            Ok(Some(xml)) => xml,
            Ok(None) => return Ok(self.refuse(NotArchived::Empty, "empty when stripped")),
            Err(e @ stanza::XmlError::TooDeep) => {
                return Ok(self.refuse(NotArchived::TooDeep, e.to_string()))
            }
            Err(e) => return Ok(self.refuse(NotArchived::Failed, e.to_string())),
        };
        let copy = match want_stored {
            true => {
                let tree = stored::parse_stored(&stored).map_err(LuaError::external)?;
                Some(stanza::build_tree(lua, &self.stanza_mt, &tree)?)
            }
            false => None,
        };
        match engine.archive(
            self.archive_ref(user),
            with,
            stored,
            self.quota,
            seen_by,
            &self.mailbox,
        ) {
            Ok(archived) => {
                self.last_release.set(archived.release_at);
                self.metrics.archived(outgoing);
                Ok((
                    Some(archived.id.to_string()),
                    Some(archived.release_at as i64),
                    None,
                    copy,
                    None,
                ))
            }
            Err(e @ EngineError::QueueFull(_)) => {
                Ok(self.refuse(NotArchived::QueueFull, e.to_string()))
            }
            Err(e @ EngineError::Unavailable(_)) => {
                Ok(self.refuse(NotArchived::Unavailable, e.to_string()))
            }
            Err(e) => Ok(self.refuse(NotArchived::Failed, e.to_string())),
        }
    }
}

impl Archive {
    fn ask(
        &self,
        request: Request,
        user: String,
        to: Option<String>,
        from: Option<String>,
    ) -> LuaResult<u64> {
        let request = QueryRequest {
            archive: self.archive_ref(user),
            request,
            to,
            from,
            limits: self.limits,
        };
        self.engine()?
            .query(request, &self.mailbox)
            .map_err(LuaError::external)
    }
}

/// Prosody's stored form of preferences (mamprefs.lib.lua): `[false]` holds the default
/// (`true`, `false` or `"roster"`; 13.0 also writes `"always"` / `"never"`), and each JID key
/// holds `true` (always) or `false` (never).
fn prefs_from_table(t: &Table) -> LuaResult<Prefs> {
    let mut prefs = Prefs::default();
    for pair in t.pairs::<Value, Value>() {
        match pair? {
            (Value::Boolean(false), v) => {
                prefs.default = match v {
                    Value::Boolean(true) => Some(DefaultRule::Always),
                    Value::Boolean(false) => Some(DefaultRule::Never),
                    Value::String(s) => DefaultRule::parse(&s.to_str()?),
                    _ => None,
                }
            }
            (Value::String(jid), Value::Boolean(always)) => {
                let list = if always {
                    &mut prefs.always
                } else {
                    &mut prefs.never
                };
                list.push(jid.to_str()?.to_owned());
            }
            _ => {}
        }
    }
    prefs.always.sort();
    prefs.never.sort();
    Ok(prefs)
}

fn strategy_name(strategy: Strategy) -> &'static str {
    match strategy {
        Strategy::One => "one",
        Strategy::All => "all",
    }
}

/// The expiry rule from Lua arguments: `end`, and for smart retention the strategy name and the
/// time since which clients count as known.
pub(crate) fn expiry_rule(
    end: i64,
    strategy: Option<String>,
    seen_since: Option<i64>,
) -> LuaResult<ExpiryRule> {
    Ok(match strategy.as_deref() {
        None => ExpiryRule::Age { end },
        Some(name) => ExpiryRule::Delivered {
            end,
            strategy: match name {
                "one" => Strategy::One,
                "all" => Strategy::All,
                other => {
                    return Err(LuaError::external(format!(
                        "unknown smart retention strategy {other:?}"
                    )))
                }
            },
            seen_since: seen_since.unwrap_or(0),
        },
    })
}

/// The stored form of a `<prefs>` element (see [`prefs_from_table`]).
/// A refused element gives `nil`, a text and the error condition: more than `max_jids` JIDs is
/// `not-acceptable` (naming the limit), nesting too deep to copy is `bad-request`.
fn prefs_from_element(
    lua: &Lua,
    (el, max_jids): (Table, Option<usize>),
) -> LuaResult<(Option<Table>, Option<String>, Option<&'static str>)> {
    let copied = match stanza::to_element(&el, ns::CLIENT) {
        Ok(el) => el,
        Err(e) => return Ok((None, Some(e.to_string()), Some("bad-request"))),
    };
    let prefs = Prefs::parse(&copied);
    let listed = prefs.always.len() + prefs.never.len();
    if let Some(max) = max_jids.filter(|max| listed > *max) {
        return Ok((
            None,
            Some(format!(
                "Too many JIDs in the preferences: {listed}, at most {max} are accepted (mam_rs_max_prefs_jids)"
            )),
            Some("not-acceptable"),
        ));
    }
    let t = lua.create_table()?;
    if let Some(default) = prefs.default {
        match default {
            DefaultRule::Always => t.raw_set(false, true)?,
            DefaultRule::Never => t.raw_set(false, false)?,
            DefaultRule::Roster => t.raw_set(false, "roster")?,
        }
    }
    for jid in &prefs.always {
        t.raw_set(jid.as_str(), true)?;
    }
    for jid in &prefs.never {
        t.raw_set(jid.as_str(), false)?;
    }
    Ok((Some(t), None, None))
}

/// The result messages of an answer, turned into `util.stanza` tables a few at a time as the
/// shim sends them (`results:take(n)`), so that a page of results is never built in one go on
/// Prosody's loop: other sessions' stanzas wait for at most a chunk's building and sending.
struct Results {
    messages: std::vec::IntoIter<Tree>,
    stanza_mt: Table,
}

impl UserData for Results {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // Up to `n` more results, in order, and how many remain after them.
        methods.add_method_mut("take", |lua, this, n: usize| {
            let taken = lua.create_table_with_capacity(n.min(this.messages.len()), 0)?;
            for m in this.messages.by_ref().take(n) {
                taken.raw_push(stanza::build_tree(lua, &this.stanza_mt, &m)?)?;
            }
            Ok((taken, this.messages.len()))
        });
        methods.add_method("remaining", |_, this, ()| Ok(this.messages.len()));
    }
}

impl UserData for Archive {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("fd", |_, this, ()| Ok(this.mailbox.fd()));
        methods.add_method("poke", |_, this, ()| {
            this.mailbox.poke();
            Ok(())
        });
        // The writer node, or nil and why the database server has not answered yet.
        methods.add_method("node", |_, this, ()| {
            Ok(match this.engine()?.node() {
                Ok(node) => (Some(node), None),
                Err(why) => (None, Some(why)),
            })
        });

        methods.add_method(
            "archive",
            |lua, this, (stanza, user, with, want_stored, seen_by, outgoing): ArchiveArgs| {
                this.archive(
                    lua,
                    &stanza,
                    user,
                    with,
                    want_stored.unwrap_or(false),
                    seen_by.unwrap_or_default(),
                    outgoing.unwrap_or(false),
                )
            },
        );

        // Whether the sender should wait for its row's commit (a long write queue).
        methods.add_method("backlogged", |_, this, ()| {
            Ok(this.engine.as_ref().is_some_and(|e| e.backlogged()))
        });

        methods.add_method(
            "query",
            |_, this, (query, user, to, from): (Table, String, Option<String>, Option<String>)| {
                // A query that cannot be copied (nested too deep) is the client's error.
                let query = match stanza::to_element(&query, ns::CLIENT) {
                    Ok(query) => query,
                    Err(e) => return Ok((None, Some(e.to_string()))),
                };
                Ok((Some(this.ask(Request::Query(query), user, to, from)?), None))
            },
        );

        methods.add_method(
            "expire",
            |_, this, (end, strategy, seen_since): (i64, Option<String>, Option<i64>)| {
                let rule = expiry_rule(end, strategy, seen_since)?;
                this.engine()?
                    .expire(this.host.clone(), this.store.clone(), rule, &this.mailbox)
                    .map_err(LuaError::external)
            },
        );

        // A client received the archive up to an id (smart retention); unknown ids are ignored.
        methods.add_method(
            "mark",
            |_, this, (user, client, id): (String, String, String)| {
                let Some(last_id) = crate::id::ArchiveId::parse(&id) else {
                    return Ok(());
                };
                let mark = Mark {
                    archive: this.archive_ref(user),
                    client,
                    last_id,
                    seen: crate::id::now_micros(),
                };
                this.engine()?.mark(mark).map_err(LuaError::external)
            },
        );

        // The account was deleted: remove its archive (after the rows queued before).
        methods.add_method("delete_user", |_, this, user: String| {
            let archive = this.archive_ref(user);
            this.engine()?
                .delete_archive(archive, &this.mailbox)
                .map_err(LuaError::external)
        });

        methods.add_method("metadata", |_, this, user: String| {
            this.ask(Request::Metadata, user, None, None)
        });

        methods.add_method("prefs_element", |lua, this, prefs: Table| {
            let prefs = Element::from(&prefs_from_table(&prefs)?);
            stanza::build(lua, &this.stanza_mt, &prefs)
        });

        methods.add_method("drain", |lua, this, ()| {
            let drained = match &this.engine {
                Some(engine) => engine.drain(&this.mailbox),
                None => this.mailbox.drain(),
            };
            let list = lua.create_table_with_capacity(drained.completions.len(), 0)?;
            for completion in drained.completions {
                let entry = lua.create_table()?;
                match completion {
                    Completion::Query {
                        ticket,
                        result,
                        elapsed,
                    } => {
                        this.metrics.answered(result.is_ok(), elapsed);
                        entry.set("ticket", ticket)?;
                        match result {
                            Ok(response) => {
                                entry.set(
                                    "results",
                                    Results {
                                        messages: response.messages.into_iter(),
                                        stanza_mt: this.stanza_mt.clone(),
                                    },
                                )?;
                                entry.set(
                                    "payload",
                                    stanza::build(lua, &this.stanza_mt, &response.payload)?,
                                )?;
                                entry.set("last_id", response.last_id)?;
                                entry.set("mark_id", response.mark_id)?;
                            }
                            Err(e) => {
                                entry.set("error_type", e.kind.as_str())?;
                                entry.set("condition", e.condition)?;
                                entry.set("text", e.text)?;
                            }
                        }
                    }
                    Completion::Expired { ticket, result } => {
                        entry.set("ticket", ticket)?;
                        match result {
                            Ok(deleted) => entry.set("expired", deleted)?,
                            Err(e) => entry.set("expire_error", e)?,
                        }
                    }
                    Completion::Log { level, message } => {
                        entry.set("log", level.as_str())?;
                        entry.set("message", message)?;
                    }
                }
                list.raw_push(entry)?;
            }
            Ok((drained.released as i64, list))
        });

        // What changed in this host's metrics since the last call: a list of
        // `{ name, labels, add = n | set = v | samples = { value, count, ... } }`. With
        // `refresh`, also asks for new archive figures when they are older than
        // FIGURES_MAX_AGE (read off the loop; they show in a later call).
        methods.add_method("metrics", |lua, this, refresh: Option<bool>| {
            let engine = this.engine.as_ref();
            if let Some(engine) = engine.filter(|_| refresh == Some(true)) {
                if this.metrics.claim_refresh(metrics::FIGURES_MAX_AGE) {
                    engine.refresh_figures(this.host.clone(), this.store.clone(), &this.metrics);
                }
            }
            let updates = this
                .reporter
                .borrow_mut()
                .report(engine.map(|e| e.queued()));
            let list = lua.create_table_with_capacity(updates.len(), 0)?;
            for update in updates {
                let entry = lua.create_table()?;
                entry.set("name", update.name)?;
                entry.set("labels", update.labels)?;
                match update.value {
                    Sample::Add(n) => entry.set("add", n)?,
                    Sample::Set(v) => entry.set("set", v)?,
                    Sample::Samples(samples) => {
                        let flat = lua.create_table_with_capacity(samples.len() * 2, 0)?;
                        for (value, count) in samples {
                            flat.raw_push(value)?;
                            flat.raw_push(count)?;
                        }
                        entry.set("samples", flat)?;
                    }
                }
                list.raw_push(entry)?;
            }
            Ok(list)
        });

        methods.add_method("query_form", |lua, this, ()| {
            stanza::build(lua, &this.stanza_mt, &xep0313::query_form())
        });

        // Stops using the engine. Other hosts may keep a shared engine running, so this host's
        // own work is waited for first: its queries answered, its messages committed. The last
        // host to close the engine also commits every queued row and joins the threads.
        methods.add_method_mut("close", |_, this, ()| {
            if let Some(engine) = this.engine.take() {
                let answered = this.mailbox.wait_answered(CLOSE_WAIT);
                let committed = engine.wait_committed(this.last_release.get(), CLOSE_WAIT);
                if !(answered && committed) {
                    this.mailbox.log(
                        crate::engine::Level::Warn,
                        "Closing the archive before all of this host's work finished (database too slow?)",
                    );
                }
            }
            Ok(())
        });
    }
}
