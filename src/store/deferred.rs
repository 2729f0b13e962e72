//! A database server that could not be reached when the module started.
//!
//! Prosody often starts before its database server (boot order, a server restarting). Rather
//! than refusing to load, the module opens a [`Deferred`] store: until the server answers,
//! every call fails at once with [`StoreError::Unavailable`], naming the last reason; the
//! engine's connect thread calls [`Store::claim_node`], which is the only call that tries to
//! connect, and once it works every call goes to the real store.
//!
//! Only a server that does not answer defers the opening. One that answers and refuses (a wrong
//! password, no such database, a schema from a newer version) is an error at start, as before.

use super::{
    ArchiveRef, ExpiryBatch, ExpiryCursor, ExpiryRule, Figures, ImportBatch, ImportCheckpoint,
    ImportRow, Mark, NewItem, Page, Query, Stats, Store, StoreError,
};
use crate::id::ArchiveId;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

type Opener = Box<dyn Fn() -> Result<Arc<dyn Store>, StoreError> + Send + Sync>;

pub struct Deferred {
    open: Opener,
    store: OnceLock<Arc<dyn Store>>,
    /// Why the last attempt failed.
    why: Mutex<String>,
    /// Set by the first `claim_node`, which reports the failure that made this store instead
    /// of trying again at once (a server that does not answer can take the whole connect
    /// timeout to say so).
    retried: AtomicBool,
}

impl Deferred {
    /// A store that `open` opens once the server answers; `why` is the first attempt's error.
    pub fn new(why: String, open: Opener) -> Deferred {
        Deferred {
            open,
            store: OnceLock::new(),
            why: Mutex::new(why),
            retried: AtomicBool::new(false),
        }
    }

    fn store(&self) -> Result<&Arc<dyn Store>, StoreError> {
        self.store
            .get()
            .ok_or_else(|| StoreError::Unavailable(self.why.lock().clone()))
    }

    /// Tries to open the real store, unless it is open already. A refusal (not only silence)
    /// comes back as it is: the engine keeps trying, the log names it.
    fn connect(&self) -> Result<&Arc<dyn Store>, StoreError> {
        if let Some(store) = self.store.get() {
            return Ok(store);
        }
        if !self.retried.swap(true, Ordering::AcqRel) {
            return Err(StoreError::Unavailable(self.why.lock().clone()));
        }
        match (self.open)() {
            Ok(store) => Ok(self.store.get_or_init(|| store)),
            Err(e) => {
                *self.why.lock() = e.reason();
                Err(e)
            }
        }
    }
}

impl Store for Deferred {
    fn claim_node(&self) -> Result<u16, StoreError> {
        self.connect()?.claim_node()
    }
    fn paces_removals(&self) -> bool {
        // Until the server answers, every removal fails at once and waits its backoff.
        self.store.get().is_some_and(|store| store.paces_removals())
    }
    fn append(&self, batch: &[NewItem]) -> Result<(), StoreError> {
        self.store()?.append(batch)
    }
    fn holds(&self, id: ArchiveId) -> Result<bool, StoreError> {
        self.store()?.holds(id)
    }
    fn find(&self, archive: &ArchiveRef, query: &Query) -> Result<Page, StoreError> {
        self.store()?.find(archive, query)
    }
    fn last_id(&self) -> Result<Option<ArchiveId>, StoreError> {
        self.store()?.last_id()
    }
    fn expire(
        &self,
        host: &str,
        store: &str,
        rule: &ExpiryRule,
        limit: u32,
        cursor: &mut ExpiryCursor,
    ) -> Result<ExpiryBatch, StoreError> {
        self.store()?.expire(host, store, rule, limit, cursor)
    }
    fn record_marks(&self, marks: &[Mark]) -> Result<(), StoreError> {
        self.store()?.record_marks(marks)
    }
    fn import_checkpoint(
        &self,
        archive: &ArchiveRef,
        source: &str,
    ) -> Result<Option<ImportCheckpoint>, StoreError> {
        self.store()?.import_checkpoint(archive, source)
    }
    fn import(
        &self,
        archive: &ArchiveRef,
        source: &str,
        rows: &[ImportRow],
        position: i64,
    ) -> Result<ImportBatch, StoreError> {
        self.store()?.import(archive, source, rows, position)
    }
    fn stats(&self, host: &str, store: &str, user: Option<&str>) -> Result<Stats, StoreError> {
        self.store()?.stats(host, store, user)
    }
    fn delete_archive(&self, archive: &ArchiveRef, limit: u32) -> Result<u64, StoreError> {
        self.store()?.delete_archive(archive, limit)
    }
    fn optimize(&self, vacuum: bool) -> Result<Vec<String>, StoreError> {
        self.store()?.optimize(vacuum)
    }
    fn figures(&self, host: &str, store: &str) -> Result<Figures, StoreError> {
        self.store()?.figures(host, store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::{SqliteOptions, SqliteStore};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn fails_at_once_until_claim_node_connects_then_delegates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = attempts.clone();
        let deferred = Deferred::new(
            "PostgreSQL x@h:1/d: connection refused".into(),
            Box::new(move || {
                if counted.fetch_add(1, Ordering::SeqCst) < 2 {
                    return Err(StoreError::Unavailable("still refused".into()));
                }
                Ok(
                    Arc::new(SqliteStore::open(&path, &SqliteOptions::default())?)
                        as Arc<dyn Store>,
                )
            }),
        );
        let why = |e: StoreError| match e {
            StoreError::Unavailable(why) => why,
            other => panic!("{other:?}"),
        };
        // Other calls never try to connect: they answer at once with the last reason; the
        // first claim_node reports the failure the store was made after.
        assert!(why(deferred.last_id().unwrap_err()).contains("connection refused"));
        assert!(why(deferred.claim_node().unwrap_err()).contains("connection refused"));
        assert_eq!(attempts.load(Ordering::SeqCst), 0);
        assert_eq!(why(deferred.claim_node().unwrap_err()), "still refused");
        assert_eq!(why(deferred.last_id().unwrap_err()), "still refused");
        assert!(deferred.claim_node().is_err());
        assert_eq!(deferred.claim_node().unwrap(), 0);
        assert_eq!(deferred.last_id().unwrap(), None);
        assert_eq!(deferred.claim_node().unwrap(), 0);
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            3,
            "connected once, then kept"
        );
    }
}
