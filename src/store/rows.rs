//! What the SQL stores share beside the [`Store`](super::Store) contract: the query semantics
//! ([`find`], over a store's [`Snapshot`]), the id range a query covers, the caches of
//! interned archive and JID ids, and the rules that decide which rows an import, the quota or
//! an expiry run touches. Each store only runs the SQL.

use super::{ArchiveRef, ExpiryRule, Item, Page, Query, StoreError, Strategy};
use crate::id::{ArchiveId, SEQ_BITS};
use parking_lot::Mutex;
use std::collections::HashMap;

/// The largest time (microseconds) whose ids fit a signed 64-bit integer.
const MAX_MICROS: i64 = i64::MAX >> SEQ_BITS;

/// Sequence bits set in imported ids: live ids start each microsecond at 0, so an import
/// running beside Prosody does not take an id a live message is about to be committed with.
const IMPORT_SEQ: i64 = 1 << (SEQ_BITS - 1);

/// An inclusive range of stored ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdRange {
    pub lo: i64,
    pub hi: i64,
}

impl IdRange {
    /// Every id.
    pub const EVERYTHING: IdRange = IdRange {
        lo: 0,
        hi: i64::MAX,
    };

    /// The ids of rows archived between `start` and `end` (inclusive, microseconds).
    pub fn from_times(start: Option<i64>, end: Option<i64>) -> IdRange {
        let lo = match start {
            None => 0,
            Some(t) if t > MAX_MICROS => i64::MAX,
            Some(t) => ArchiveId::first_at(t).as_i64(),
        };
        let hi = match end {
            None => i64::MAX,
            Some(t) if t < 0 => -1,
            Some(t) if t > MAX_MICROS => i64::MAX,
            Some(t) => ArchiveId::last_at(t).as_i64(),
        };
        IdRange { lo, hi }
    }

    /// Only ids after `id` (a query's `after`).
    pub fn after(&mut self, id: i64) {
        match id.checked_add(1) {
            Some(next) => self.lo = self.lo.max(next),
            None => self.hi = -1,
        }
    }

    /// Only ids before `id` (a query's `before`).
    pub fn before(&mut self, id: i64) {
        self.hi = self.hi.min(id - 1);
    }

    pub fn is_empty(self) -> bool {
        self.lo > self.hi
    }

    pub fn is_everything(self) -> bool {
        self.lo <= 0 && self.hi == i64::MAX
    }
}

/// Ids created by the current write transaction, cached only once it commits.
#[derive(Default)]
pub(crate) struct Fresh {
    pub archives: HashMap<ArchiveRef, i64>,
    pub jids: HashMap<String, i64>,
}

impl Fresh {
    /// The `aid` of `archive` for a write: known to this transaction, else committed (in
    /// `cache`), else `lookup` (the store's SQL, which finds or creates it), remembered for the
    /// rest of this transaction.
    pub fn archive<E>(
        &mut self,
        cache: &Mutex<IdCache>,
        archive: &ArchiveRef,
        lookup: impl FnOnce() -> Result<i64, E>,
    ) -> Result<i64, E> {
        remembered(
            &mut self.archives,
            archive,
            |a| cache.lock().archives.get(a).copied(),
            lookup,
        )
    }

    /// The `jid_id` of `jid` for a write, as [`Fresh::archive`].
    pub fn jid<E>(
        &mut self,
        cache: &Mutex<IdCache>,
        jid: &str,
        lookup: impl FnOnce() -> Result<i64, E>,
    ) -> Result<i64, E> {
        remembered(
            &mut self.jids,
            jid,
            |j| cache.lock().jids.get(j).copied(),
            lookup,
        )
    }
}

/// `key`'s id from this transaction's `mine`, else from `committed`, else from `lookup`, which
/// `mine` then remembers.
fn remembered<Q, K, E>(
    mine: &mut HashMap<K, i64>,
    key: &Q,
    committed: impl FnOnce(&Q) -> Option<i64>,
    lookup: impl FnOnce() -> Result<i64, E>,
) -> Result<i64, E>
where
    Q: ?Sized + std::hash::Hash + Eq + ToOwned<Owned = K>,
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
{
    if let Some(&id) = mine.get(key) {
        return Ok(id);
    }
    if let Some(id) = committed(key) {
        return Ok(id);
    }
    let id = lookup()?;
    mine.insert(key.to_owned(), id);
    Ok(id)
}

/// Committed `aid` and `jid_id` values. Bounded: a full map is emptied and refills.
pub(crate) struct IdCache {
    capacity: usize,
    pub archives: HashMap<ArchiveRef, i64>,
    pub jids: HashMap<String, i64>,
}

impl IdCache {
    pub fn new(capacity: usize) -> IdCache {
        IdCache {
            capacity,
            archives: HashMap::new(),
            jids: HashMap::new(),
        }
    }

    pub fn remember_archive(&mut self, archive: ArchiveRef, aid: i64) {
        if self.archives.len() >= self.capacity {
            self.archives.clear();
        }
        self.archives.insert(archive, aid);
    }

    pub fn remember_jid(&mut self, jid: String, id: i64) {
        if self.jids.len() >= self.capacity {
            self.jids.clear();
        }
        self.jids.insert(jid, id);
    }

    /// What a committed transaction created.
    pub fn remember(&mut self, fresh: Fresh) {
        for (archive, aid) in fresh.archives {
            self.remember_archive(archive, aid);
        }
        for (jid, id) in fresh.jids {
            self.remember_jid(jid, id);
        }
    }
}

/// The id an imported row gets (see [`Store::import`](super::Store::import)): its key when the
/// key is one of our ids, free and after `last_id` (an export read back); otherwise the first
/// free id at its time, above `last_id` so that the source's order is kept. `taken` asks the
/// store whether an id is in use. Returns the id and whether the key must be kept beside it
/// (it is not the id's own text).
pub(crate) fn import_id(
    key: &str,
    micros: i64,
    last_id: i64,
    now: i64,
    mut taken: impl FnMut(i64) -> Result<bool, StoreError>,
) -> Result<(i64, bool), StoreError> {
    let own = ArchiveId::parse(key).map(ArchiveId::as_i64);
    let mut id = match own {
        Some(id) if id > last_id && !taken(id)? => return Ok((id, false)),
        // Never in the future: new messages must keep sorting after imported ones.
        _ => last_id
            .saturating_add(1)
            .max(ArchiveId::first_at(micros.clamp(0, now)).as_i64() | IMPORT_SEQ),
    };
    while taken(id)? {
        id += 1;
    }
    Ok((id, own != Some(id)))
}

/// Stock's quota rule (mod_mam.lua:439-458 with #1545): an archive holding `count` rows, at or
/// over `quota`, loses its oldest rows down to `floor(quota * 0.99)` before the next row goes
/// in. Returns how many to remove.
pub(crate) fn over_quota(count: i64, quota: u32) -> Option<i64> {
    (count >= i64::from(quota)).then(|| count - i64::from(quota) * 99 / 100)
}

/// The newest id `rule` lets go in one archive, or `None` when nothing may go. `delivered`
/// reads the newest id that one / all of the archive's clients seen since a time have.
pub(crate) fn expiry_bound(
    rule: &ExpiryRule,
    delivered: impl FnOnce(Strategy, i64) -> Result<Option<i64>, StoreError>,
) -> Result<Option<i64>, StoreError> {
    match *rule {
        ExpiryRule::Age { end } => Ok(Some(ArchiveId::last_at(end).as_i64())),
        ExpiryRule::Delivered {
            end,
            strategy,
            seen_since,
        } => {
            Ok(delivered(strategy, seen_since)?.map(|id| id.min(ArchiveId::last_at(end).as_i64())))
        }
    }
}

/// A stored id as an [`ArchiveId`]; a negative one means the table was changed by hand.
pub(crate) fn stored_id(v: i64) -> Result<ArchiveId, StoreError> {
    ArchiveId::from_i64(v)
        .ok_or_else(|| StoreError::Database(format!("negative id {v} in the messages table")))
}

/// The conditions of a query other than the id range.
pub(crate) struct Filter<'a> {
    pub aid: i64,
    pub with_id: Option<i64>,
    /// Sorted, without duplicates, never empty.
    pub ids: Option<&'a [i64]>,
}

/// Ids per "minute" of the kept counts per (archive, minute) on SQLite and PostgreSQL: an id is
/// `micros << SEQ_BITS`, and a minute is 2^26 µs (about 67 s) of archive time, so an id's
/// minute is `id >> MINUTE_SHIFT`.
pub(crate) const MINUTE_SHIFT: u32 = SEQ_BITS + 26;

/// Checks that SQL written with the shift as a literal (MySQL's migration, the benchmark's
/// seeder) groups ids into minutes by [`MINUTE_SHIFT`], every time it shifts an id.
#[cfg(test)]
pub(crate) fn assert_minutes_by_shift(sql: &str, what: &str) {
    let shift = format!("id >> {MINUTE_SHIFT}");
    assert!(sql.contains(&shift), "{what} should group by `{shift}`");
    assert_eq!(
        sql.matches("id >> ").count(),
        sql.matches(&shift).count(),
        "{what} shifts an id by another amount than `{shift}`"
    );
}

/// An id range as the whole minutes inside it, whose rows a store keeps counted, and the ids
/// before and after them, which it counts row by row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MinuteSplit {
    pub first: i64,
    pub last: i64,
    pub below: IdRange,
    pub above: IdRange,
}

impl MinuteSplit {
    /// The split of `range`, when it holds at least two whole minutes (below that, counting
    /// its rows reads no more than the split would).
    pub fn of(range: IdRange) -> Option<MinuteSplit> {
        let (lo, hi) = (i128::from(range.lo), i128::from(range.hi));
        let first = (lo + (1 << MINUTE_SHIFT) - 1) >> MINUTE_SHIFT;
        let last = ((hi + 1) >> MINUTE_SHIFT) - 1;
        if last - first < 1 {
            return None;
        }
        // An empty range where an end has no ids left (the last minute ends at i64::MAX).
        let ids = |lo: i128, hi: i128| match (i64::try_from(lo), i64::try_from(hi)) {
            (Ok(lo), Ok(hi)) => IdRange { lo, hi },
            _ => IdRange { lo: 1, hi: 0 },
        };
        Some(MinuteSplit {
            first: first as i64,
            last: last as i64,
            below: ids(lo, (first << MINUTE_SHIFT) - 1),
            above: ids((last + 1) << MINUTE_SHIFT, hi),
        })
    }

    /// The parameters of both stores' `COUNT_BY_MINUTES` for archive `aid`, in order: the
    /// archive, the first and last whole minute, the ids below them, the ids above them.
    pub fn params(&self, aid: i64) -> [i64; 7] {
        [
            aid,
            self.first,
            self.last,
            self.below.lo,
            self.below.hi,
            self.above.lo,
            self.above.hi,
        ]
    }
}

/// What [`find`] needs from one read snapshot of a store.
pub(crate) trait Snapshot {
    /// The `aid` of an existing archive.
    fn archive(&mut self, archive: &ArchiveRef) -> Result<Option<i64>, StoreError>;
    /// The `jid_id` of a known JID.
    fn jid(&mut self, jid: &str) -> Result<Option<i64>, StoreError>;
    /// The row of archive `aid` that clients know as `text`: a native id, or an imported key.
    fn lookup_id(&mut self, aid: i64, text: &str) -> Result<Option<i64>, StoreError>;
    /// Rows matching `filter` within `range`.
    fn count(&mut self, filter: &Filter<'_>, range: IdRange) -> Result<u64, StoreError>;
    /// Whether `count` over the whole range with a `with` filter (and no `ids`) reads a kept
    /// total rather than counting rows.
    fn keeps_with_totals(&self) -> bool {
        false
    }
    /// One page of them, ascending ids or descending when `reverse`.
    fn page(
        &mut self,
        filter: &Filter<'_>,
        range: IdRange,
        limit: Option<u32>,
        reverse: bool,
    ) -> Result<Vec<Item>, StoreError>;
    /// The first and last ids of the rows `filter` matches (without `ids`), if any. As two
    /// one-row pages here; a database server answers it in one statement (one round trip).
    fn ends(&mut self, filter: &Filter<'_>) -> Result<Option<(i64, i64)>, StoreError> {
        let mut end = |reverse| -> Result<Option<i64>, StoreError> {
            let row = self.page(filter, IdRange::EVERYTHING, Some(1), reverse)?;
            Ok(row.first().map(|item| item.id.as_i64()))
        };
        Ok(end(false)?.zip(end(true)?))
    }
}

/// Rows within `range`. Without `ids`, a range that covers most of the rows `filter` matches is
/// counted as their total minus the rows outside it: fewer rows to count, and none for a window
/// spanning them all. The total is kept per archive by every store, and per (archive, contact)
/// by those that [`Snapshot::keeps_with_totals`]; elsewhere a `with` query counts its range.
/// Exact, as all counts come from one snapshot. Which side is smaller is judged by time, as ids
/// grow with time.
fn count_window(
    snap: &mut impl Snapshot,
    filter: &Filter<'_>,
    range: IdRange,
) -> Result<u64, StoreError> {
    if (filter.with_id.is_some() && !snap.keeps_with_totals())
        || filter.ids.is_some()
        || range.is_everything()
    {
        return snap.count(filter, range);
    }
    let everything = IdRange::EVERYTHING;
    let Some((first, last)) = snap.ends(filter)? else {
        return Ok(0);
    };
    let (lo, hi) = (range.lo.max(first), range.hi.min(last));
    if lo > hi {
        return Ok(0);
    }
    let inside = (hi - lo) as f64 / (last - first).max(1) as f64;
    if inside <= 0.5 {
        return snap.count(filter, IdRange { lo, hi });
    }
    let total = snap.count(filter, everything)?;
    let below = if lo > first {
        snap.count(
            filter,
            IdRange {
                lo: first,
                hi: lo - 1,
            },
        )?
    } else {
        0
    };
    let above = if hi < last {
        snap.count(
            filter,
            IdRange {
                lo: hi + 1,
                hi: last,
            },
        )?
    } else {
        0
    };
    Ok(total.saturating_sub(below + above))
}

/// `Store::find` with stock `archive:find` semantics, over one snapshot.
pub(crate) fn find(
    snap: &mut impl Snapshot,
    archive: &ArchiveRef,
    query: &Query,
) -> Result<Page, StoreError> {
    let known = |snap: &mut _, aid, text| -> Result<i64, StoreError> {
        Snapshot::lookup_id(snap, aid, text)?.ok_or(StoreError::ItemNotFound)
    };
    // An empty answer still checks before/after first: an unknown id is an error even where
    // nothing could match (stock looks the id up before anything else).
    let nothing = |snap: &mut _, aid: Option<i64>| -> Result<Page, StoreError> {
        if query.limit != Some(0) {
            for text in [query.after.as_deref(), query.before.as_deref()]
                .into_iter()
                .flatten()
            {
                known(snap, aid.ok_or(StoreError::ItemNotFound)?, text)?;
            }
        }
        Ok(Page {
            items: Vec::new(),
            total: query.total.then_some(0),
        })
    };
    let Some(aid) = snap.archive(archive)? else {
        return nothing(snap, None);
    };
    let with_id = match query.with.as_deref() {
        None => None,
        Some(jid) => match snap.jid(jid)? {
            Some(id) => Some(id),
            None => return nothing(snap, Some(aid)),
        },
    };
    let ids = match &query.ids {
        None => None,
        Some(texts) => {
            let mut ids = Vec::with_capacity(texts.len());
            for text in texts {
                ids.extend(snap.lookup_id(aid, text)?);
            }
            ids.sort_unstable();
            ids.dedup();
            if ids.is_empty() {
                return nothing(snap, Some(aid));
            }
            Some(ids)
        }
    };
    let filter = Filter {
        aid,
        with_id,
        ids: ids.as_deref(),
    };
    let mut range = IdRange::from_times(query.start, query.end);

    // The total ignores before/after; with limit 0 it is all that is asked (stock #1128: no id
    // check, so an unknown `after` is not an error).
    let total = if query.total {
        Some(if range.is_empty() {
            0
        } else {
            count_window(snap, &filter, range)?
        })
    } else {
        None
    };
    if query.limit == Some(0) {
        return Ok(Page {
            items: Vec::new(),
            total,
        });
    }
    if let Some(after) = query.after.as_deref() {
        range.after(known(snap, aid, after)?);
    }
    if let Some(before) = query.before.as_deref() {
        range.before(known(snap, aid, before)?);
    }
    let items = if range.is_empty() {
        Vec::new()
    } else {
        snap.page(&filter, range, query.limit, query.reverse)?
    };
    Ok(Page { items, total })
}

/// `optimize`'s index check: the report line, or an error naming the indexes queries depend on
/// that are missing.
pub(crate) fn indexes_checked<S: AsRef<str>>(missing: &[S]) -> Result<String, StoreError> {
    if missing.is_empty() {
        return Ok("indexes: all present".to_string());
    }
    let names: Vec<&str> = missing.iter().map(AsRef::as_ref).collect();
    Err(StoreError::Database(format!(
        "missing indexes: {}; the schema was changed by hand",
        names.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchmark_seeder_counts_minutes_as_the_stores_do() {
        // tests/e2e/bench/seed.py fills MySQL's kept counts per minute with SQL of its own.
        assert_minutes_by_shift(include_str!("../../tests/e2e/bench/seed.py"), "seed.py");
    }

    #[test]
    fn a_range_splits_into_whole_minutes_and_the_ids_at_its_ends() {
        let minute = 1i64 << MINUTE_SHIFT;
        // Less than two whole minutes: counted row by row.
        assert_eq!(
            MinuteSplit::of(IdRange {
                lo: 0,
                hi: 2 * minute - 2
            }),
            None
        );
        assert_eq!(
            MinuteSplit::of(IdRange {
                lo: 1,
                hi: 3 * minute - 2
            }),
            None
        );
        let split = MinuteSplit::of(IdRange {
            lo: 0,
            hi: 2 * minute - 1,
        })
        .unwrap();
        assert_eq!((split.first, split.last), (0, 1));
        assert!(split.below.lo > split.below.hi && split.above.lo > split.above.hi);
        let split = MinuteSplit::of(IdRange {
            lo: minute + 5,
            hi: 5 * minute + 7,
        })
        .unwrap();
        assert_eq!((split.first, split.last), (2, 4));
        assert_eq!(
            split.below,
            IdRange {
                lo: minute + 5,
                hi: 2 * minute - 1
            }
        );
        assert_eq!(
            split.above,
            IdRange {
                lo: 5 * minute,
                hi: 5 * minute + 7
            }
        );
        // Up to the last id: the last minute is whole, nothing after it.
        let split = MinuteSplit::of(IdRange {
            lo: 0,
            hi: i64::MAX,
        })
        .unwrap();
        assert_eq!(split.last, i64::MAX >> MINUTE_SHIFT);
        assert!(split.above.lo > split.above.hi);
    }
}
