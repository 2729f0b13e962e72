//! mod_mam_rs: the native half of a drop-in replacement for Prosody's `mod_mam`
//! (XEP-0313 Message Archive Management).
//!
//! The crate is split into rooms, each with one job; data flows one way through them:
//!
//! - [`protocol`]: XEP-0313 / 0059 / 0004 / 0359 / 0082 as typed values. Parses client
//!   queries and builds result stanzas and errors. Knows nothing of storage or threads.
//! - [`policy`]: which messages are archived (stock mod_mam's rules) and what is stripped
//!   from the stored copy. Pure functions over a stanza.
//! - [`id`]: time-ordered 63-bit archive ids and their opaque string form.
//! - [`store`]: the [`store::Store`] trait and its SQLite implementation. Knows SQL, not XMPP.
//! - [`engine`]: the threads. One writer thread commits rows in batches (group commit),
//!   query workers run queries against the store, and a completion queue plus an eventfd
//!   wakes Prosody's event loop. Never touches Lua.
//! - [`admin`]: what the prosodyctl commands do: import (stock rows, export files), export.
//! - [`config`]: Prosody option values to a typed, validated configuration.
//! - `lua` (feature `lua54`): the Lua-facing surface, converting Lua values and
//!   `util.stanza` tables to and from the types above, and nothing else.

pub mod admin;
pub mod config;
pub mod engine;
pub mod id;
pub mod policy;
pub mod protocol;
pub mod store;

#[cfg(feature = "lua54")]
mod lua;
