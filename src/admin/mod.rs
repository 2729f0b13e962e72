//! Operating an archive: what the `prosodyctl mod_mam_rs` commands do besides expiry.
//!
//! - [`import`]: rows of stock mod_mam's archive (or of one of our export files) turned into
//!   [`ImportRow`](crate::store::ImportRow)s: checked, normalised, each with the id clients
//!   know it by. Reading stock's storage itself (SQL tables, `.list` files) is Prosody's job
//!   and happens in the shim, through Prosody's own `util.sql` and `util.datamanager`.
//! - [`export`]: one user's archive as JSON or XEP-0227 XML, written page by page.
//!
//! These run in the prosodyctl process, straight against a [`Store`](crate::store::Store),
//! beside a running Prosody if there is one. They never run on Prosody's event loop.

pub mod export;
pub mod import;

/// How an export file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"host", "user", "messages": [{"id", "timestamp", "with", "direction", "stanza"}]}`.
    Json,
    /// XEP-0227: `<server-data><host><user><archive xmlns="urn:xmpp:pie:0#mam"><result/>...`.
    Xml,
}

impl Format {
    /// `json` or `xml`.
    pub fn parse(name: &str) -> Option<Format> {
        match name {
            "json" => Some(Format::Json),
            "xml" => Some(Format::Xml),
            _ => None,
        }
    }
}

/// XEP-0227's namespaces.
pub mod ns {
    pub const PIE: &str = "urn:xmpp:pie:0";
    pub const PIE_MAM: &str = "urn:xmpp:pie:0#mam";
}
