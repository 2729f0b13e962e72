//! `archive_compression`: stored stanzas as zstd frames, with a dictionary trained from the
//! archive's own messages.
//!
//! A message is a couple of hundred bytes, most of it markup and JIDs that every message
//! repeats; alone it hardly compresses, but against a dictionary of what messages look like it
//! shrinks to little more than its text. So:
//!
//! - Until a dictionary exists, rows are stored as text (as without compression). Once the
//!   archive holds [`TRAIN_AFTER`] rows, one is trained from up to [`SAMPLES`] of the newest and
//!   kept in the `dictionaries` table; rows written after that are compressed with it.
//!   `prosodyctl mod_mam_rs optimize` compresses the rows written before.
//! - A compressed row is a BLOB: the dictionary id (one byte), the stanza's length (LEB128),
//!   then a zstd frame without its magic number (always the same 4 bytes, put back to read),
//!   checksum, dictionary id or content size.
//! - Text rows stay readable forever, so compression can be turned on and off at any time;
//!   rows compressed stay compressed (and readable) when it is turned off.
//!
//! Dictionaries are never changed once written: readers in any process cache them by id.

use parking_lot::{Mutex, RwLock};
use rusqlite::{Connection, OptionalExtension};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use zstd::bulk::Compressor;
use zstd::dict::DecoderDictionary;
use zstd::zstd_safe::{CParameter, DCtx};

/// The first four bytes of every zstd frame, left out of stored rows.
const MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();

/// Rows the archive must hold before a dictionary is trained.
pub const TRAIN_AFTER: i64 = 1000;
/// Newest rows sampled for training.
const SAMPLES: i64 = 20_000;
/// Dictionary size in bytes.
const DICT_BYTES: usize = 16 * 1024;
/// zstd level: per-message frames are tiny, so a high level costs little.
const LEVEL: i32 = 12;
/// Rows appended between two attempts to train while there are too few rows...
const RETRY_EVERY: u64 = TRAIN_AFTER as u64;
/// ... and after zstd could not train from enough rows (unusual data: try much later).
const RETRY_AFTER_FAILURE: u64 = 100_000;

thread_local! {
    /// This thread's decompression context, made on its first compressed row.
    static DCTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
}

/// What [`Codec::train`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trained {
    /// A new dictionary, with this id, is current.
    Yes(u8),
    /// Fewer than [`TRAIN_AFTER`] text rows.
    TooFewRows,
    /// zstd could not train from the rows, or there are 255 dictionaries already.
    Failed,
}

/// Compression state of one store: the dictionary new rows use, and the ones readers know.
pub struct Codec {
    enabled: bool,
    /// The newest dictionary and a compressor loaded with it (writer side).
    writer: Mutex<WriterState>,
    /// Dictionaries by id, for reading (any thread).
    readers: RwLock<HashMap<u8, Arc<DecoderDictionary<'static>>>>,
}

#[derive(Default)]
struct WriterState {
    current: Option<(u8, Compressor<'static>)>,
    /// Rows appended since the last training attempt.
    since_attempt: u64,
    attempted: bool,
    /// Rows to wait for before the next attempt.
    retry_after: u64,
}

impl Codec {
    pub fn new(enabled: bool) -> Codec {
        Codec {
            enabled,
            writer: Mutex::new(WriterState::default()),
            readers: RwLock::new(HashMap::new()),
        }
    }

    /// Loads the newest dictionary for writing, if compression is on and one exists.
    pub fn load(&self, conn: &Connection) -> rusqlite::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let newest: Option<(u8, Vec<u8>)> = conn
            .query_row(
                "SELECT dict_id, dict FROM dictionaries ORDER BY dict_id DESC LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((id, dict)) = newest {
            self.writer.lock().current = Some((id, compressor(&dict)?));
        }
        Ok(())
    }

    /// Before writing `incoming` rows: trains the first dictionary once the archive is big
    /// enough. Runs inside the writer's transaction.
    pub fn prepare(&self, conn: &Connection, incoming: usize) -> rusqlite::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let mut w = self.writer.lock();
        w.since_attempt += incoming as u64;
        if w.current.is_some() || (w.attempted && w.since_attempt < w.retry_after) {
            return Ok(());
        }
        w.attempted = true;
        w.since_attempt = 0;
        drop(w);
        let outcome = self.train(conn)?;
        self.writer.lock().retry_after = match outcome {
            Trained::Yes(_) => 0,
            Trained::TooFewRows => RETRY_EVERY,
            Trained::Failed => RETRY_AFTER_FAILURE,
        };
        Ok(())
    }

    /// Trains a dictionary from the newest text rows and makes it current.
    pub fn train(&self, conn: &Connection) -> rusqlite::Result<Trained> {
        let samples: Vec<Vec<u8>> = conn
            .prepare(
                "SELECT CAST(stanza AS BLOB) FROM messages WHERE typeof(stanza) = 'text' \
                 ORDER BY id DESC LIMIT ?1",
            )?
            .query_map([SAMPLES], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if (samples.len() as i64) < TRAIN_AFTER {
            return Ok(Trained::TooFewRows);
        }
        let Ok(dict) = zstd::dict::from_samples(&samples, DICT_BYTES) else {
            return Ok(Trained::Failed);
        };
        let next: Option<i64> =
            conn.query_row("SELECT max(dict_id) FROM dictionaries", [], |row| {
                row.get(0)
            })?;
        let id = next.map_or(1, |n| n + 1);
        let Ok(id) = u8::try_from(id) else {
            return Ok(Trained::Failed); // 255 dictionaries: keep using the newest.
        };
        conn.execute(
            "INSERT INTO dictionaries (dict_id, dict) VALUES (?1, ?2)",
            (id, &dict),
        )?;
        self.writer.lock().current = Some((id, compressor(&dict)?));
        Ok(Trained::Yes(id))
    }

    /// The value to store for `stanza`: a compressed BLOB when a dictionary is current.
    pub fn encode(&self, stanza: &str) -> rusqlite::types::Value {
        use rusqlite::types::Value;
        if self.enabled {
            if let Some((id, compressor)) = self.writer.lock().current.as_mut() {
                if let Some(frame) = compressor
                    .compress(stanza.as_bytes())
                    .ok()
                    .and_then(|f| f.strip_prefix(&MAGIC).map(<[u8]>::to_vec))
                {
                    let mut blob = Vec::with_capacity(frame.len() + 4);
                    blob.push(*id);
                    leb128(stanza.len(), &mut blob);
                    blob.extend_from_slice(&frame);
                    if blob.len() < stanza.len() {
                        return Value::Blob(blob);
                    }
                }
            }
        }
        Value::Text(stanza.to_owned())
    }

    /// The stanza stored as `value` (text, or a compressed BLOB).
    pub fn decode(
        &self,
        conn: &Connection,
        value: rusqlite::types::Value,
    ) -> Result<String, String> {
        use rusqlite::types::Value;
        let blob = match value {
            Value::Text(text) => return Ok(text),
            Value::Blob(blob) => blob,
            other => return Err(format!("a stored stanza of type {:?}", other.data_type())),
        };
        let (&id, rest) = blob.split_first().ok_or("an empty compressed stanza")?;
        let (len, frame) = read_leb128(rest).ok_or("a compressed stanza without its length")?;
        let dict = self.dictionary(conn, id)?;
        let mut whole = Vec::with_capacity(MAGIC.len() + frame.len());
        whole.extend_from_slice(&MAGIC);
        whole.extend_from_slice(frame);
        let mut bytes = Vec::with_capacity(len);
        // One decompression context per thread: making one per row cost more than the
        // decompression itself (a page of 51 rows took 9× the time of text rows).
        DCTX.with(|cell| {
            let mut slot = cell.borrow_mut();
            let dctx = slot.get_or_insert_with(DCtx::create);
            dctx.decompress_using_ddict(&mut bytes, &whole, dict.as_ddict())
        })
        .map_err(|code| {
            format!(
                "cannot decompress a stored stanza: {}",
                zstd::zstd_safe::get_error_name(code)
            )
        })?;
        if bytes.len() != len {
            return Err(format!(
                "a compressed stanza of {} bytes where {len} were stored",
                bytes.len()
            ));
        }
        String::from_utf8(bytes).map_err(|e| format!("a decompressed stanza is not UTF-8: {e}"))
    }

    fn dictionary(
        &self,
        conn: &Connection,
        id: u8,
    ) -> Result<Arc<DecoderDictionary<'static>>, String> {
        if let Some(d) = self.readers.read().get(&id) {
            return Ok(d.clone());
        }
        let dict: Vec<u8> = conn
            .query_row(
                "SELECT dict FROM dictionaries WHERE dict_id = ?1",
                [id],
                |row| row.get(0),
            )
            .map_err(|e| format!("compression dictionary {id}: {e}"))?;
        let d = Arc::new(DecoderDictionary::copy(&dict));
        self.readers.write().insert(id, d.clone());
        Ok(d)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

fn compressor(dict: &[u8]) -> rusqlite::Result<Compressor<'static>> {
    let setup = || -> std::io::Result<Compressor<'static>> {
        let mut c = Compressor::with_dictionary(LEVEL, dict)?;
        c.set_parameter(CParameter::DictIdFlag(false))?;
        c.set_parameter(CParameter::ChecksumFlag(false))?;
        c.set_parameter(CParameter::ContentSizeFlag(false))?;
        Ok(c)
    };
    setup().map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn leb128(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_leb128(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let mut n: usize = 0;
    for (i, &b) in bytes.iter().enumerate().take(5) {
        n |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((n, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip() {
        for n in [0usize, 1, 127, 128, 300, 16_383, 16_384, 10_000_000] {
            let mut v = Vec::new();
            leb128(n, &mut v);
            v.push(0xAA);
            assert_eq!(read_leb128(&v), Some((n, &[0xAA][..])));
        }
        assert_eq!(read_leb128(&[0x80, 0x80]), None);
    }
}
