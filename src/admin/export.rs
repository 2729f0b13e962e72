//! One user's archive written out, page by page, as JSON or XEP-0227 XML.
//!
//! Ids are the ones clients know (imported messages keep their stock ids), so an export
//! read back with `import --file` gives the same archive.

use super::import::direction;
use super::{ns as pie, Format};
use crate::protocol::{ns, xep0082};
use crate::store::{ArchiveRef, Query, Store, StoreError};
use minidom::Element;
use std::io::Write;

/// Rows read per store call.
const PAGE: u32 = 1000;

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot write the export: {0}")]
    Write(#[from] std::io::Error),
}

/// Writes `archive` to `out` in `format`; returns the number of messages written.
/// `on_page` is called with the running count after each page.
pub fn export(
    store: &dyn Store,
    archive: &ArchiveRef,
    format: Format,
    out: &mut dyn Write,
    on_page: &mut dyn FnMut(u64),
) -> Result<u64, ExportError> {
    let owner = format!("{}@{}", archive.user, archive.host);
    match format {
        Format::Json => {
            write!(out, "{{\"host\":")?;
            serde_json::to_writer(&mut *out, &*archive.host).map_err(std::io::Error::from)?;
            write!(out, ",\"user\":")?;
            serde_json::to_writer(&mut *out, &archive.user).map_err(std::io::Error::from)?;
            write!(out, ",\"messages\":[")?;
        }
        Format::Xml => write!(
            out,
            "<?xml version='1.0' encoding='UTF-8'?>\n<server-data xmlns='{}'><host jid='{}'><user name='{}'><archive xmlns='{}'>\n",
            pie::PIE,
            escape(&archive.host),
            escape(&archive.user),
            pie::PIE_MAM
        )?,
    }
    let mut written: u64 = 0;
    let mut after = None;
    loop {
        let page = store.find(
            archive,
            &Query {
                after: after.take(),
                limit: Some(PAGE),
                ..Query::default()
            },
        )?;
        let Some(last) = page.items.last() else { break };
        after = Some(last.id.to_string());
        for item in &page.items {
            // A stored stanza that cannot be read is written as it is in JSON; XML needs it
            // parsed, and it is left out there (the count tells).
            let message: Option<Element> = item.stanza.parse().ok();
            let stamp = xep0082::format(item.id.micros());
            match format {
                Format::Json => {
                    let dir = message.as_ref().map_or("in", |m| direction(m, &owner));
                    let entry = serde_json::json!({
                        "id": item.client_id(),
                        "timestamp": stamp,
                        "with": item.with,
                        "direction": dir,
                        "stanza": item.stanza,
                    });
                    if written > 0 {
                        out.write_all(b",")?;
                    }
                    out.write_all(b"\n")?;
                    serde_json::to_writer(&mut *out, &entry).map_err(std::io::Error::from)?;
                }
                Format::Xml => {
                    let Some(message) = message else { continue };
                    let result = Element::builder("result", ns::MAM)
                        .attr(crate::protocol::attr_name("id"), item.client_id())
                        .append(
                            Element::builder("forwarded", ns::FORWARD)
                                .append(
                                    Element::builder("delay", ns::DELAY)
                                        .attr(crate::protocol::attr_name("stamp"), stamp)
                                        .build(),
                                )
                                .append(message)
                                .build(),
                        )
                        .build();
                    result
                        .write_to(&mut &mut *out)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    out.write_all(b"\n")?;
                }
            }
            written += 1;
        }
        on_page(written);
        if page.items.len() < PAGE as usize {
            break;
        }
    }
    match format {
        Format::Json => writeln!(out, "\n]}}")?,
        Format::Xml => writeln!(out, "</archive></user></host></server-data>")?,
    }
    out.flush()?;
    Ok(written)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}
