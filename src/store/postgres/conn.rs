//! A connection to the server together with the statements it has prepared, and the r2d2
//! manager of the read pool's connections.
//!
//! The driver prepares an unnamed statement on every call made with SQL text: two round trips
//! (parse, then bind and execute) for each query. A statement prepared once per connection
//! and kept makes every later use one round trip, and the server plans it once.

use postgres::{Client, Config, GenericClient, NoTls, Statement};
use std::collections::HashMap;

/// The statements one connection has prepared, by their SQL.
#[derive(Default)]
pub struct Statements(HashMap<String, Statement>);

/// Far more distinct statements than the store builds (a few dozen); a bound all the same.
const MAX_STATEMENTS: usize = 256;

impl Statements {
    /// `sql`'s statement on the connection `client` belongs to (directly or through one of its
    /// transactions), prepared on first use.
    pub fn get(
        &mut self,
        client: &mut impl GenericClient,
        sql: &str,
    ) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = client.prepare(sql)?;
        if self.0.len() >= MAX_STATEMENTS {
            self.0.clear();
        }
        self.0.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

/// A client and its prepared statements.
pub struct PgConn {
    pub client: Client,
    pub statements: Statements,
}

impl PgConn {
    pub fn connect(config: &Config) -> Result<PgConn, postgres::Error> {
        Ok(PgConn {
            client: config.connect(NoTls)?,
            statements: Statements::default(),
        })
    }
}

/// The read pool's connections, dropped once closed. The pool does not check them before use
/// (that would be a round trip per query); `PgStore::read` runs a read again on a new
/// connection when its connection turns out closed.
pub struct Manager(pub Config);

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        PgConn::connect(&self.0)
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        conn.client.simple_query("").map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed()
    }
}
