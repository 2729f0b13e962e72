//! Compression on SQLite (see `store::codec`): the `dictionaries` table, and stanzas stored
//! as text or as a compressed BLOB in the same `stanza` column.

use crate::store::codec::{Codec, Trained, SAMPLES};
use rusqlite::{Connection, OptionalExtension};

impl Codec {
    /// Loads the newest dictionary for writing, if compression is on and one exists.
    pub fn load(&self, conn: &Connection) -> rusqlite::Result<()> {
        if !self.enabled() {
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
            self.use_dictionary(id, &dict).map_err(conversion)?;
        }
        Ok(())
    }

    /// Before writing `incoming` rows: trains the first dictionary once the archive is big
    /// enough (see [`Codec::before_write`]).
    pub fn prepare(&self, conn: &Connection, incoming: usize) -> rusqlite::Result<()> {
        self.before_write(incoming, || self.train_from(conn))
    }

    /// Trains a dictionary from the newest text rows and makes it current.
    pub fn train_from(&self, conn: &Connection) -> rusqlite::Result<Trained> {
        let samples: Vec<Vec<u8>> = conn
            .prepare(
                "SELECT CAST(stanza AS BLOB) FROM messages WHERE typeof(stanza) = 'text' \
                 ORDER BY id DESC LIMIT ?1",
            )?
            .query_map([SAMPLES], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let dict = match Codec::train(&samples) {
            Ok(dict) => dict,
            Err(why) => return Ok(why),
        };
        let next: Option<i64> =
            conn.query_row("SELECT max(dict_id) FROM dictionaries", [], |row| {
                row.get(0)
            })?;
        let Ok(id) = u8::try_from(next.map_or(1, |n| n + 1)) else {
            return Ok(Trained::Failed); // 255 dictionaries: keep using the newest.
        };
        conn.execute(
            "INSERT INTO dictionaries (dict_id, dict) VALUES (?1, ?2)",
            (id, &dict),
        )?;
        self.use_dictionary(id, &dict).map_err(conversion)?;
        Ok(Trained::Yes(id))
    }

    /// The value to store for `stanza`: a compressed BLOB when a dictionary is current.
    pub fn encode(&self, stanza: &str) -> rusqlite::types::Value {
        use rusqlite::types::Value;
        match self.compress(stanza) {
            Some(blob) => Value::Blob(blob),
            None => Value::Text(stanza.to_owned()),
        }
    }

    /// The stanza stored as `value` (text, or a compressed BLOB).
    pub fn decode(
        &self,
        conn: &Connection,
        value: rusqlite::types::Value,
    ) -> Result<String, String> {
        use rusqlite::types::Value;
        match value {
            Value::Text(text) => Ok(text),
            Value::Blob(blob) => self.decompress(&blob, |id| {
                conn.query_row(
                    "SELECT dict FROM dictionaries WHERE dict_id = ?1",
                    [id],
                    |row| row.get(0),
                )
                .map_err(|e| e.to_string())
            }),
            other => Err(format!("a stored stanza of type {:?}", other.data_type())),
        }
    }
}

fn conversion(e: std::io::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}
