//! Rows to import: stock mod_mam's rows and our own export files, checked and normalised.
//!
//! Every row keeps the id clients know it by; a row that cannot be read becomes a
//! [`Skipped`] with a reason, never an error that stops the import.

use super::ns as pie;
use crate::protocol::{ns, xep0082};
use crate::store::ImportRow;
use minidom::Element;

/// A row left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The row's id in its source (may be empty when it had none).
    pub key: String,
    pub reason: String,
}

/// One row of stock's archive, as `mod_storage_sql` (`prosodyarchive`) or
/// `mod_storage_internal` (a `.list` item, serialised back to XML by the shim) holds it.
#[derive(Debug, Clone, Copy)]
pub struct StockRow<'a> {
    pub key: &'a str,
    /// Unix seconds (0.12 writes integers; trunk on SQLite may write fractions).
    pub when: f64,
    pub with: &'a str,
    /// mod_storage_sql's `type` column: `xml` for stanzas.
    pub kind: &'a str,
    pub value: &'a str,
}

/// Checks a stock row and turns it into an [`ImportRow`].
pub fn stock_row(row: StockRow<'_>) -> Result<ImportRow, Skipped> {
    let skip = |reason: String| Skipped {
        key: row.key.to_owned(),
        reason,
    };
    if row.key.is_empty() {
        return Err(skip("it has no id".into()));
    }
    if row.kind != "xml" {
        return Err(skip(format!(
            "it is stored as {:?}, not as a stanza",
            row.kind
        )));
    }
    let micros = seconds_to_micros(row.when).ok_or_else(|| {
        skip(format!(
            "its timestamp {} is not a time after 1970",
            row.when
        ))
    })?;
    let stanza = stored_message(row.value).map_err(skip)?;
    Ok(ImportRow {
        key: row.key.to_owned(),
        micros,
        with: row.with.to_owned(),
        stanza,
    })
}

/// A stock row's time (seconds, with a fraction since Prosody 13) in microseconds, cut as
/// Prosody's `util.datetime` cuts it for the stamps clients were shown: the whole seconds, then
/// the fraction's microseconds rounded down (13's `floor(t % 1 * 1000000)`), so that an
/// imported message keeps the stamp it had.
fn seconds_to_micros(seconds: f64) -> Option<i64> {
    let whole = seconds.floor();
    let micros = whole * 1e6 + ((seconds - whole) * 1e6).floor();
    // Up to year 2262: far beyond any archive, and inside i64.
    (micros.is_finite() && (0.0..9.2e18).contains(&micros)).then_some(micros as i64)
}

/// A `<message/>` in the stored form: parsed (stock omits the `jabber:client` xmlns, which
/// is implied), checked, and serialised again.
pub fn stored_message(xml: &str) -> Result<String, String> {
    let el = Element::from_reader_with_prefixes(xml.as_bytes(), ns::CLIENT.to_owned())
        .map_err(|e| format!("it is not well-formed XML ({e})"))?;
    serialise_message(&el)
}

fn serialise_message(el: &Element) -> Result<String, String> {
    if !el.is("message", ns::CLIENT) {
        return Err(format!(
            "it is a <{}> in {:?}, not a <message/>",
            el.name(),
            el.ns()
        ));
    }
    let mut out = Vec::with_capacity(256);
    el.write_to(&mut out)
        .map_err(|e| format!("it cannot be serialised ({e})"))?;
    String::from_utf8(out).map_err(|e| format!("it is not UTF-8 ({e})"))
}

/// What an export file holds for one archive.
#[derive(Debug, Default)]
pub struct ExportFile {
    pub rows: Vec<ImportRow>,
    pub skipped: Vec<Skipped>,
}

/// Reads a file written by `export` (JSON or XEP-0227 XML, told apart by its first
/// character) for the archive of `owner` (`user@host`, which decides `with` for XML, where
/// it is not written down).
pub fn read_export(text: &str, owner: &str) -> Result<ExportFile, String> {
    match text.trim_start().as_bytes().first() {
        Some(b'{') => read_json(text),
        Some(b'<') => read_xml(text, owner),
        _ => Err("it is neither a JSON nor an XML export (it must start with { or <)".into()),
    }
}

fn read_json(text: &str) -> Result<ExportFile, String> {
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("it is not valid JSON ({e})"))?;
    let messages = doc
        .get("messages")
        .and_then(serde_json::Value::as_array)
        .ok_or("it has no \"messages\" list; is it an export of mod_mam_rs?")?;
    let mut file = ExportFile::default();
    for (n, m) in messages.iter().enumerate() {
        let field = |name: &str| m.get(name).and_then(serde_json::Value::as_str);
        let key = field("id").unwrap_or_default();
        let row = (|| {
            if key.is_empty() {
                return Err(format!("message {} has no \"id\"", n + 1));
            }
            let stamp = field("timestamp").ok_or("it has no \"timestamp\"")?;
            let micros = xep0082::parse(stamp).ok_or_else(|| format!("bad timestamp {stamp:?}"))?;
            let with = field("with").ok_or("it has no \"with\"")?;
            let stanza = stored_message(field("stanza").ok_or("it has no \"stanza\"")?)?;
            Ok(ImportRow {
                key: key.to_owned(),
                micros,
                with: with.to_owned(),
                stanza,
            })
        })();
        match row {
            Ok(row) => file.rows.push(row),
            Err(reason) => file.skipped.push(Skipped {
                key: key.to_owned(),
                reason,
            }),
        }
    }
    Ok(file)
}

fn read_xml(text: &str, owner: &str) -> Result<ExportFile, String> {
    let doc: Element = text
        .parse()
        .map_err(|e| format!("it is not well-formed XML ({e})"))?;
    if !doc.is("server-data", pie::PIE) {
        return Err("its root is not <server-data xmlns='urn:xmpp:pie:0'/> (XEP-0227)".into());
    }
    let mut file = ExportFile::default();
    let archives = doc
        .children()
        .filter(|h| h.is("host", pie::PIE))
        .flat_map(|h| h.children().filter(|u| u.is("user", pie::PIE)))
        .flat_map(|u| u.children().filter(|a| a.is("archive", pie::PIE_MAM)));
    for archive in archives {
        for result in archive.children().filter(|r| r.is("result", ns::MAM)) {
            let key = result.attr("id").unwrap_or_default();
            match xml_row(result, key, owner) {
                Ok(row) => file.rows.push(row),
                Err(reason) => file.skipped.push(Skipped {
                    key: key.to_owned(),
                    reason,
                }),
            }
        }
    }
    Ok(file)
}

fn xml_row(result: &Element, key: &str, owner: &str) -> Result<ImportRow, String> {
    if key.is_empty() {
        return Err("a <result/> has no id".into());
    }
    let forwarded = result
        .get_child("forwarded", ns::FORWARD)
        .ok_or("it has no <forwarded/>")?;
    let stamp = forwarded
        .get_child("delay", ns::DELAY)
        .and_then(|d| d.attr("stamp"))
        .ok_or("it has no <delay stamp/>")?;
    let micros = xep0082::parse(stamp).ok_or_else(|| format!("bad stamp {stamp:?}"))?;
    let message = forwarded
        .get_child("message", ns::CLIENT)
        .ok_or("it has no <message xmlns='jabber:client'/>")?;
    let with = other_party(message, owner);
    Ok(ImportRow {
        key: key.to_owned(),
        micros,
        with,
        stanza: serialise_message(message)?,
    })
}

/// `with` as stock records it: the bare `to` of a message the owner sent, else the bare `from`.
pub fn other_party(message: &Element, owner: &str) -> String {
    fn bare<'e>(message: &'e Element, attr: &'e str) -> &'e str {
        let full = message.attr(attr).unwrap_or_default();
        full.split('/').next().unwrap_or(full)
    }
    let from = bare(message, "from");
    if from.eq_ignore_ascii_case(owner) {
        bare(message, "to").to_owned()
    } else {
        from.to_owned()
    }
}

/// `"out"` for a message the owner sent, else `"in"`.
pub fn direction(message: &Element, owner: &str) -> &'static str {
    let from = message.attr("from").unwrap_or_default();
    if from
        .split('/')
        .next()
        .unwrap_or(from)
        .eq_ignore_ascii_case(owner)
    {
        "out"
    } else {
        "in"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(key: &'a str, kind: &'a str, value: &'a str) -> StockRow<'a> {
        StockRow {
            key,
            when: 1_700_000_000.0,
            with: "juliet@capulet.lit",
            kind,
            value,
        }
    }

    /// The verified 0.12.3 row of the reference (§4.1).
    const STOCK: &str = "<message from='romeo@localhost/orchard' type='chat' to='juliet@capulet.lit' xml:lang='en' id='chat01'><body>Hello &amp; &lt;world&gt;</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>";

    #[test]
    fn a_stock_row_keeps_its_key_time_and_with() {
        let r = stock_row(row("75324cdf-f4a9-4dd3-82f3-1b9e64be053c", "xml", STOCK)).unwrap();
        assert_eq!(r.key, "75324cdf-f4a9-4dd3-82f3-1b9e64be053c");
        assert_eq!(r.micros, 1_700_000_000_000_000);
        assert_eq!(r.with, "juliet@capulet.lit");
        let el: Element = r.stanza.parse().unwrap();
        assert!(el.is("message", ns::CLIENT));
        assert_eq!(el.attr("id"), Some("chat01"));
        assert_eq!(
            el.get_child("body", ns::CLIENT).unwrap().text(),
            "Hello & <world>"
        );
        assert!(el
            .get_child("active", "http://jabber.org/protocol/chatstates")
            .is_some());
    }

    #[test]
    fn fractional_seconds_are_kept() {
        let mut r = row("k", "xml", STOCK);
        r.when = 1_700_000_000.25;
        assert_eq!(stock_row(r).unwrap().micros, 1_700_000_000_250_000);
    }

    /// Prosody 13 stores `gettime()`; its `util.datetime` showed these times to clients as
    /// `...09.907885Z`, `...20.999999Z` and `...20.000000Z` (checked with 13.0.1's module).
    #[test]
    fn fractions_are_cut_to_the_microsecond_prosody_showed() {
        for (when, micros) in [
            (1_795_368_669.907_885_5, 1_795_368_669_907_885),
            (1_795_368_669.907_885, 1_795_368_669_907_885),
            (1_700_000_000.999_999, 1_700_000_000_999_999),
            (1_700_000_000.000_000_5, 1_700_000_000_000_000),
        ] {
            let mut r = row("k", "xml", STOCK);
            r.when = when;
            assert_eq!(stock_row(r).unwrap().micros, micros, "{when:.17}");
        }
    }

    #[test]
    fn unreadable_rows_are_skipped_with_a_reason() {
        for (r, why) in [
            (row("k", "json", "{}"), "stored as \"json\""),
            (row("k", "xml", "<message><body>"), "not well-formed XML"),
            (row("k", "xml", "not xml at all"), "not well-formed XML"),
            (row("k", "xml", "<presence/>"), "not a <message/>"),
            (row("", "xml", STOCK), "no id"),
        ] {
            let e = stock_row(r).unwrap_err();
            assert!(e.reason.contains(why), "{:?} for {why}", e.reason);
        }
        let mut r = row("k", "xml", STOCK);
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            r.when = bad;
            assert!(stock_row(r).unwrap_err().reason.contains("timestamp"));
        }
    }

    #[test]
    fn directions_and_with_follow_the_owner() {
        let out: Element = "<message xmlns='jabber:client' from='Romeo@localhost/x' to='juliet@capulet.lit/balcony'/>"
            .parse()
            .unwrap();
        assert_eq!(direction(&out, "romeo@localhost"), "out");
        assert_eq!(other_party(&out, "romeo@localhost"), "juliet@capulet.lit");
        assert_eq!(direction(&out, "juliet@capulet.lit"), "in");
        assert_eq!(other_party(&out, "juliet@capulet.lit"), "Romeo@localhost");
    }

    #[test]
    fn export_files_that_are_neither_format_are_refused() {
        assert!(read_export("hello", "a@b").is_err());
        assert!(read_export("{\"x\": 1}", "a@b")
            .unwrap_err()
            .contains("messages"));
        assert!(read_export("<foo xmlns='x'/>", "a@b")
            .unwrap_err()
            .contains("server-data"));
    }
}
