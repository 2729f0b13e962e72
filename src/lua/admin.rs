//! The Lua surface of the `prosodyctl mod_mam_rs` commands: `native.admin(options, create)`
//! opens a host's archive database in the prosodyctl process and returns a handle whose methods
//! convert Lua values for [`crate::admin`] and the [`Store`]. No rule lives here.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::Arc;

use mlua::prelude::*;
use mlua::{Function, Table, UserData, UserDataMethods};

use crate::admin::export::export;
use crate::admin::import::{read_export, stock_row, Skipped, StockRow};
use crate::admin::Format;
use crate::engine::writer::EXPIRY_BATCH;
use crate::protocol::xep0082;
use crate::store::{self, ArchiveRef, ExpiryCursor, ImportBatch, ImportRow, Location, Store};

/// Rows per import transaction when reading an export file.
const FILE_BATCH: usize = 1000;

pub struct Admin {
    store: Arc<dyn Store>,
    /// Where the archive is, for messages.
    location: String,
}

/// Opens the archive a host's options name (the table `read_options` gives), as the running
/// module would. A missing SQLite file is created only with `create`; otherwise the answer is
/// `nil, "no archive database at <path>"`. With `archive_compression`, rows written (imported)
/// are compressed, and `optimize` compresses the others.
pub fn admin(
    _: &Lua,
    (options, create): (Table, bool),
) -> LuaResult<(Option<Admin>, Option<String>)> {
    let (config, _) = super::read_config(&options)?;
    if let Location::Sqlite(path) = &config.database {
        if !create && !path.exists() {
            return Ok((
                None,
                Some(format!("no archive database at {}", path.display())),
            ));
        }
    }
    match store::open(&config.database, config.open_options(1)) {
        Ok(store) => Ok((
            Some(Admin {
                store,
                location: config.database.describe(),
            }),
            None,
        )),
        Err(e) => Ok((None, Some(e.to_string()))),
    }
}

fn archive(host: String, store: String, user: String) -> ArchiveRef {
    ArchiveRef {
        host: Arc::from(host),
        user,
        store: Arc::from(store),
    }
}

fn skipped_table(lua: &Lua, skipped: &[Skipped]) -> LuaResult<Table> {
    let list = lua.create_table_with_capacity(skipped.len(), 0)?;
    for s in skipped {
        let entry = lua.create_table()?;
        entry.set("key", s.key.as_str())?;
        entry.set("reason", s.reason.as_str())?;
        list.raw_push(entry)?;
    }
    Ok(list)
}

fn stamp(id: Option<crate::id::ArchiveId>) -> Option<String> {
    // Whole seconds: these are for people.
    id.map(|id| xep0082::format(id.micros() - id.micros().rem_euclid(1_000_000)))
}

impl UserData for Admin {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // Where the import from `source` stopped in this archive (the source's position).
        methods.add_method(
            "checkpoint",
            |_, this, (host, store, user, source): (String, String, String, String)| {
                let at = this
                    .store
                    .import_checkpoint(&archive(host, store, user), &source)
                    .map_err(LuaError::external)?;
                Ok(at.map(|c| c.position))
            },
        );

        // Imports stock rows `{ key, when, with, type, value }` (in the source's order) and
        // records `position`. Returns imported, already there, and the skipped rows.
        methods.add_method(
            "import",
            |lua,
             this,
             (host, store, user, source, rows, position): (
                String,
                String,
                String,
                String,
                Table,
                i64,
            )| {
                let mut good = Vec::with_capacity(rows.raw_len());
                let mut skipped = Vec::new();
                for row in rows.sequence_values::<Table>() {
                    let row = row?;
                    let key: String = row.get::<Option<String>>("key")?.unwrap_or_default();
                    let when: Option<f64> = row.get("when")?;
                    let with: String = row.get::<Option<String>>("with")?.unwrap_or_default();
                    let kind: String = row.get::<Option<String>>("type")?.unwrap_or_default();
                    let value: String = row.get::<Option<String>>("value")?.unwrap_or_default();
                    let stock = StockRow {
                        key: &key,
                        when: when.unwrap_or(f64::NAN),
                        with: &with,
                        kind: &kind,
                        value: &value,
                    };
                    match stock_row(stock) {
                        Ok(row) => good.push(row),
                        Err(skip) => skipped.push(skip),
                    }
                }
                let done = this
                    .store
                    .import(&archive(host, store, user), &source, &good, position)
                    .map_err(LuaError::external)?;
                Ok((done.imported, done.already, skipped_table(lua, &skipped)?))
            },
        );

        // Imports a file written by `export`. Returns imported, already, skipped; or nil and
        // what is wrong with the file.
        methods.add_method(
            "import_file",
            |lua, this, (host, store, user, path): (String, String, String, String)| {
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(e) => {
                        return Ok((None, None, None, Some(format!("cannot read {path}: {e}"))))
                    }
                };
                let owner = format!("{user}@{host}");
                let file = match read_export(&text, &owner) {
                    Ok(file) => file,
                    Err(e) => return Ok((None, None, None, Some(format!("{path}: {e}")))),
                };
                let target = archive(host, store, user);
                let source = format!("file:{path}");
                let mut total = ImportBatch::default();
                for chunk in file.rows.chunks(FILE_BATCH) {
                    let chunk: &[ImportRow] = chunk;
                    let done = this
                        .store
                        .import(&target, &source, chunk, 0)
                        .map_err(LuaError::external)?;
                    total.imported += done.imported;
                    total.already += done.already;
                }
                Ok((
                    Some(total.imported),
                    Some(total.already),
                    Some(skipped_table(lua, &file.skipped)?),
                    None,
                ))
            },
        );

        // { users, messages, bytes, oldest, newest, contacts = { { jid, n }... } }
        methods.add_method(
            "stats",
            |lua, this, (host, store, user): (String, String, Option<String>)| {
                let s = this
                    .store
                    .stats(&host, &store, user.as_deref())
                    .map_err(LuaError::external)?;
                let t = lua.create_table()?;
                t.set("users", s.users)?;
                t.set("messages", s.messages)?;
                t.set("bytes", s.bytes)?;
                t.set("oldest", stamp(s.oldest))?;
                t.set("newest", stamp(s.newest))?;
                let contacts = lua.create_table()?;
                for (jid, n) in s.contacts {
                    contacts.raw_push(lua.create_sequence_from([jid, n.to_string()])?)?;
                }
                t.set("contacts", contacts)?;
                Ok(t)
            },
        );

        // Writes the archive as `format` ("json" or "xml") to `path`, or to stdout without one.
        // Returns the number of messages, or nil and why.
        methods.add_method(
            "export",
            |_,
             this,
             (host, store, user, format, path, on_page): (
                String,
                String,
                String,
                String,
                Option<String>,
                Option<Function>,
            )| {
                let Some(format) = Format::parse(&format) else {
                    return Ok((
                        None,
                        Some(format!("unknown format {format:?} (json or xml)")),
                    ));
                };
                let mut out: Box<dyn Write> = match &path {
                    Some(p) => match File::create(p) {
                        Ok(f) => Box::new(BufWriter::new(f)),
                        Err(e) => return Ok((None, Some(format!("cannot write {p}: {e}")))),
                    },
                    None => Box::new(BufWriter::new(std::io::stdout().lock())),
                };
                let mut progress = |n: u64| {
                    if let Some(f) = &on_page {
                        let _ = f.call::<()>(n);
                    }
                };
                match export(
                    this.store.as_ref(),
                    &archive(host, store, user),
                    format,
                    &mut out,
                    &mut progress,
                ) {
                    Ok(n) => Ok((Some(n), None)),
                    Err(e) => Ok((None, Some(e.to_string()))),
                }
            },
        );

        // `prosodyctl mod_mam_rs cleanup`: removes `host`'s messages under `store` at or before
        // `end` (Unix microseconds), now, in the same short batches as the running module (so
        // it can run beside a live server). Calls `on_batch(removed so far)` after each batch.
        methods.add_method(
            "expire",
            |_,
             this,
             (host, store, on_batch, end, strategy, seen_since): (
                String,
                String,
                Option<Function>,
                i64,
                Option<String>,
                Option<i64>,
            )| {
                let rule = super::expiry_rule(end, strategy, seen_since)?;
                let mut cursor = ExpiryCursor::default();
                let mut removed = 0;
                loop {
                    let step = this
                        .store
                        .expire(&host, &store, &rule, EXPIRY_BATCH, &mut cursor)
                        .map_err(LuaError::external)?;
                    removed += step.deleted;
                    if let Some(f) = &on_batch {
                        f.call::<()>(removed)?;
                    }
                    if step.done {
                        return Ok(removed);
                    }
                }
            },
        );

        // Removes every message of the archive, in batches; returns how many.
        methods.add_method(
            "delete_user",
            |_, this, (host, store, user): (String, String, String)| {
                let target = archive(host, store, user);
                let mut removed = 0;
                loop {
                    let n = this
                        .store
                        .delete_archive(&target, EXPIRY_BATCH)
                        .map_err(LuaError::external)?;
                    removed += n;
                    if n == 0 {
                        return Ok(removed);
                    }
                }
            },
        );

        // Maintenance; returns the report lines, or nil and the problem found.
        methods.add_method("optimize", |lua, this, vacuum: bool| {
            match this.store.optimize(vacuum) {
                Ok(lines) => Ok((Some(lua.create_sequence_from(lines)?), None)),
                Err(e) => Ok((None, Some(e.to_string()))),
            }
        });

        methods.add_method("path", |_, this, ()| Ok(this.location.clone()));
    }
}
