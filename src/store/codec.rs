//! `archive_compression`: stored stanzas as zstd frames, with a dictionary trained from the
//! archive's own messages. This is the part every store shares; where the dictionaries and the
//! rows live is the store's (SQLite: `store::sqlite::compress`).
//!
//! A message is a couple of hundred bytes, most of it markup and JIDs that every message
//! repeats; alone it hardly compresses, but against a dictionary of what messages look like it
//! shrinks to little more than its text. So:
//!
//! - Until a dictionary exists, rows are stored as text (as without compression). Once the
//!   archive holds [`TRAIN_AFTER`] rows, one is trained from up to [`SAMPLES`] of the newest and
//!   kept in the store's dictionaries table; rows written after that are compressed with it.
//!   `prosodyctl mod_mam_rs optimize` compresses the rows written before.
//! - A compressed row is a blob: the dictionary id (one byte), the stanza's length (LEB128),
//!   then a zstd frame without its magic number (always the same 4 bytes, put back to read),
//!   checksum, dictionary id or content size.
//! - Text rows stay readable forever, so compression can be turned on and off at any time;
//!   rows compressed stay compressed (and readable) when it is turned off.
//!
//! Dictionaries are never changed once written: readers in any process cache them by id.

use parking_lot::{Mutex, RwLock};
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
pub const SAMPLES: i64 = 20_000;
/// Dictionary size in bytes.
const DICT_BYTES: usize = 16 * 1024;
/// zstd level: zstd's default. With a dictionary, higher levels do not make these small
/// frames smaller: `examples/bytes_per_message` (200,000 rows) stored 112.7 bytes per message
/// at level 3 against 116.7 at 12 (117.4 at 1, 120.2 at 6), and the benchmark's archive 77
/// bytes at both. Level 12's binary-tree search of the dictionary cost the writer about 6 µs
/// more per row (1.0–1.7 s of CPU against 2.4–3.2 s for the 200,000, five runs each).
const LEVEL: i32 = 3;
/// Rows appended between two attempts to train while there are too few rows...
const RETRY_EVERY: u64 = TRAIN_AFTER as u64;
/// ... and after zstd could not train from enough rows (unusual data: try much later).
const RETRY_AFTER_FAILURE: u64 = 100_000;

thread_local! {
    /// This thread's decompression context, made on its first compressed row.
    static DCTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
}

/// What training did.
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

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Makes dictionary `id` the one new rows are compressed with.
    pub fn use_dictionary(&self, id: u8, dict: &[u8]) -> std::io::Result<()> {
        let mut c = Compressor::with_dictionary(LEVEL, dict)?;
        c.set_parameter(CParameter::DictIdFlag(false))?;
        c.set_parameter(CParameter::ChecksumFlag(false))?;
        c.set_parameter(CParameter::ContentSizeFlag(false))?;
        self.writer.lock().current = Some((id, c));
        Ok(())
    }

    /// Before writing `incoming` rows: runs `train` (the store's: sample its rows, store the
    /// dictionary, make it current) when an attempt is due. With compression on and no
    /// dictionary, one is due at once, then again after [`RETRY_EVERY`] rows while there were
    /// too few, or [`RETRY_AFTER_FAILURE`] after zstd failed. The store runs this outside the
    /// batch's transaction: a dictionary rolled back with a failed batch while the codec kept
    /// using it would leave rows nobody can read.
    pub fn before_write<E>(
        &self,
        incoming: usize,
        train: impl FnOnce() -> Result<Trained, E>,
    ) -> Result<(), E> {
        if self.training_due(incoming) {
            let outcome = train()?;
            self.attempted(outcome);
        }
        Ok(())
    }

    /// Counts rows written since the last attempt, up to but not including `incoming`: the
    /// attempt samples what is already stored, so a retry comes once [`RETRY_EVERY`] rows are
    /// in the archive since the last one, however large the batches that brought them.
    fn training_due(&self, incoming: usize) -> bool {
        if !self.enabled {
            return false;
        }
        let mut w = self.writer.lock();
        let due = w.current.is_none() && (!w.attempted || w.since_attempt >= w.retry_after);
        if due {
            w.attempted = true;
            w.since_attempt = 0;
        }
        w.since_attempt += incoming as u64;
        due
    }

    /// Records how a due attempt went, for the next [`Codec::training_due`].
    fn attempted(&self, outcome: Trained) {
        self.writer.lock().retry_after = match outcome {
            Trained::Yes(_) => 0,
            Trained::TooFewRows => RETRY_EVERY,
            Trained::Failed => RETRY_AFTER_FAILURE,
        };
    }

    /// A dictionary trained from `samples` (stored stanzas, newest first), or why there is none.
    pub fn train(samples: &[Vec<u8>]) -> Result<Vec<u8>, Trained> {
        if (samples.len() as i64) < TRAIN_AFTER {
            return Err(Trained::TooFewRows);
        }
        zstd::dict::from_samples(samples, DICT_BYTES).map_err(|_| Trained::Failed)
    }

    /// `stanza` compressed with the current dictionary, when there is one and the result is
    /// smaller; `None` stores it as text.
    pub fn compress(&self, stanza: &str) -> Option<Vec<u8>> {
        if !self.enabled {
            return None;
        }
        let mut w = self.writer.lock();
        let (id, compressor) = w.current.as_mut()?;
        let compressed = compressor.compress(stanza.as_bytes()).ok()?;
        let frame = compressed.strip_prefix(&MAGIC)?;
        let mut blob = Vec::with_capacity(frame.len() + 4);
        blob.push(*id);
        leb128(stanza.len(), &mut blob);
        blob.extend_from_slice(frame);
        (blob.len() < stanza.len()).then_some(blob)
    }

    /// The stanza stored as the compressed `blob`. `load` gives a dictionary this process has
    /// not read yet from the store.
    pub fn decompress(
        &self,
        blob: &[u8],
        load: impl FnOnce(u8) -> Result<Vec<u8>, String>,
    ) -> Result<String, String> {
        let (&id, rest) = blob.split_first().ok_or("an empty compressed stanza")?;
        let (len, frame) = read_leb128(rest).ok_or("a compressed stanza without its length")?;
        let dict = self.dictionary(id, load)?;
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

    /// Makes dictionary `id`, as a database server's `mam_rs_dictionaries` holds it, the one
    /// new rows are compressed with; its id as rows record it.
    pub fn use_stored_dictionary(&self, id: i64, dict: &[u8]) -> Result<u8, String> {
        let id = u8::try_from(id).map_err(|_| format!("compression dictionary id {id}"))?;
        self.use_dictionary(id, dict)
            .map_err(|e| format!("compression dictionary {id}: {e}"))?;
        Ok(id)
    }

    /// How a database server's store keeps `stanza` (PostgreSQL, MySQL): as text, or
    /// compressed in `zstanza` beside an empty `stanza`.
    pub fn to_columns<'s>(&self, stanza: &'s str) -> (&'s str, Option<Vec<u8>>) {
        match self.compress(stanza) {
            Some(blob) => ("", Some(blob)),
            None => (stanza, None),
        }
    }

    /// The stanza a database server's store kept as [`Codec::to_columns`] gave it.
    pub fn stanza_of_columns(
        &self,
        text: String,
        blob: Option<&[u8]>,
        load: impl FnOnce(u8) -> Result<Vec<u8>, String>,
    ) -> Result<String, String> {
        match blob {
            None => Ok(text),
            Some(blob) => self.decompress(blob, load),
        }
    }

    fn dictionary(
        &self,
        id: u8,
        load: impl FnOnce(u8) -> Result<Vec<u8>, String>,
    ) -> Result<Arc<DecoderDictionary<'static>>, String> {
        if let Some(d) = self.readers.read().get(&id) {
            return Ok(d.clone());
        }
        let dict = load(id).map_err(|e| format!("compression dictionary {id}: {e}"))?;
        let d = Arc::new(DecoderDictionary::copy(&dict));
        self.readers.write().insert(id, d.clone());
        Ok(d)
    }
}

/// What `optimize` reports when it could not train a dictionary; `None` for a new one.
pub fn not_trained(outcome: Trained) -> Option<String> {
    match outcome {
        Trained::Yes(_) => None,
        Trained::TooFewRows => Some(format!(
            "compression: fewer than {TRAIN_AFTER} messages to train a dictionary from; rows stay as text"
        )),
        Trained::Failed => Some(
            "compression: zstd could not train a dictionary from these messages; rows stay as text"
                .into(),
        ),
    }
}

/// What `optimize` reports once it has compressed `done` rows of `before` bytes into `after`.
pub fn compressed(done: u64, before: u64, after: u64) -> String {
    format!("compression: {done} messages compressed, {before} -> {after} bytes of stanzas")
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

    /// The batches' sizes, and which of them start with a training attempt (each finding too
    /// few rows).
    fn attempts(batches: &[usize]) -> Vec<bool> {
        let codec = Codec::new(true);
        batches
            .iter()
            .map(|&n| {
                let mut tried = false;
                codec
                    .before_write::<()>(n, || {
                        tried = true;
                        Ok(Trained::TooFewRows)
                    })
                    .unwrap();
                tried
            })
            .collect()
    }

    #[test]
    fn training_is_retried_once_enough_rows_are_stored_since_the_last_attempt() {
        let every = RETRY_EVERY as usize;
        // The first batch tries at once. The next try comes with the first batch that starts
        // with `every` rows stored since the last try: the 80 rows bringing the count past
        // the mark are not stored yet when their batch starts, so the try is the next batch's.
        assert_eq!(
            attempts(&[2, every - 10, 80, 5]),
            vec![true, false, false, true],
            "the retry waits for the rows written, not for the batch being written"
        );
        assert_eq!(attempts(&[1, every, 1]), vec![true, false, true]);
        assert_eq!(attempts(&[every, 1]), vec![true, true]);
    }
}
