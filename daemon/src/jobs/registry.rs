//! The adapter registry: per name, the generation, whether it is stored, its type, size,
//! creation time and whether to serve it at start. It lives in the jobs' database (the table
//! `adapters`: [`super::registry_sqlite`] on the SQLite file, [`super::registry_pg`] on the
//! PostgreSQL database replicas share), so that a compare-and-set on a generation is decided by
//! the database and a stale `if_generation` gets the same 409 on every replica.
//!
//! Every change of what is servable is announced ([`Announcement`]): an import, a replace or a
//! delete of an imported adapter, and the delete of a fine-tuning job's variant (recorded as a
//! tombstone row, `stored` = false, so a replica that missed the announcement finds it when it
//! reconciles). PostgreSQL NOTIFYs them on [`VARIANTS_CHANNEL`] from the transaction that makes
//! the change, so every replica hears them once it commits; SQLite has one daemon, which hears
//! its own in-process.
//!
//! Every method runs on the jobs runtime (a PostgreSQL connection belongs to the runtime that
//! opened it) and returns a `'static` future, so blocking threads can wait on one with
//! [`Registry::runtime`]'s `block_on`.
use std::collections::BTreeMap;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::backend::StoreResult;

/// The PostgreSQL channel of [`Announcement`]s.
pub const VARIANTS_CHANNEL: &str = "itamae_variants";

/// One name in the registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Bumped by every import; kept after a delete.
    pub generation: u64,
    /// False once deleted (the record stays to keep the generation monotonic).
    pub stored: bool,
    #[serde(rename = "type")]
    pub kind: String,
    pub size_bytes: u64,
    pub created_at: i64,
    /// Serve it again after a restart (false after an explicit unload).
    pub load: bool,
}

/// What happened to a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A new name (or one deleted before) was imported.
    Import,
    /// A stored adapter was imported again (a new generation).
    Replace,
    /// An imported adapter or a fine-tuning variant was deleted.
    Delete,
}

/// A change every replica hears about (the NOTIFY payload, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub name: String,
    /// The name's generation after the change (a delete keeps the deleted one's).
    pub generation: u64,
    pub op: Op,
}

/// An import whose compare-and-set passed and that holds the name until it commits or is
/// dropped (dropping it changes nothing). PostgreSQL holds the row locked, so a concurrent
/// import of the same name on any replica waits and then sees the new generation; SQLite holds
/// the one daemon's lock of the registry.
pub trait ImportTx: Send {
    /// The generation the import will get.
    fn generation(&self) -> u64;
    /// [`Op::Import`] for a name not stored now, else [`Op::Replace`].
    fn op(&self) -> Op;
    /// Records the import (stored, to load, generation [`Self::generation`]) and announces it.
    fn commit(
        self: Box<Self>,
        kind: String,
        size_bytes: u64,
        created_at: i64,
    ) -> BoxFuture<'static, StoreResult<Record>>;
}

/// A compare-and-set that failed: the name's current generation (0 = not stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch(pub u64);

/// The registry's operations; one implementation per database.
pub trait Registry: Send + Sync {
    fn get(&self, name: &str) -> BoxFuture<'static, StoreResult<Option<Record>>>;
    /// Every row, tombstones included, by name.
    fn list(&self) -> BoxFuture<'static, StoreResult<BTreeMap<String, Record>>>;
    /// Starts importing `name` if its current generation (0 when not stored) is
    /// `if_generation` (None: whatever it is). The new generation is one past the last the
    /// name ever had.
    fn begin_import(
        &self,
        name: &str,
        if_generation: Option<u64>,
    ) -> BoxFuture<'static, StoreResult<Result<Box<dyn ImportTx>, Mismatch>>>;
    /// Marks a stored adapter deleted and announces it; None if it was not stored.
    fn delete(&self, name: &str) -> BoxFuture<'static, StoreResult<Option<Record>>>;
    /// Records that the fine-tuning variant `name` was deleted (a tombstone with the next
    /// generation) and announces it.
    fn delete_variant(&self, name: &str) -> BoxFuture<'static, StoreResult<Record>>;
    /// Sets the serve-at-start flag of a stored adapter.
    fn set_load(&self, name: &str, load: bool) -> BoxFuture<'static, StoreResult<()>>;
    /// Adds the rows of an older daemon's `index.json` that the registry does not have yet;
    /// returns how many it added.
    fn import_rows(&self, rows: BTreeMap<String, Record>)
        -> BoxFuture<'static, StoreResult<usize>>;
    /// Every announcement made from now on (by any replica, this one included).
    fn announcements(&self) -> tokio::sync::broadcast::Receiver<Announcement>;
    /// The runtime the queries run on.
    fn runtime(&self) -> &tokio::runtime::Handle;
}

/// The `op` of an import that moves a name from `old` (its row, if any) to a new generation.
pub(crate) fn import_op(old: Option<&Record>) -> Op {
    if old.is_some_and(|r| r.stored) {
        Op::Replace
    } else {
        Op::Import
    }
}

/// The compare-and-set on a name's row: the new generation, or the current one that did not
/// match.
pub(crate) fn check(old: Option<&Record>, if_generation: Option<u64>) -> Result<u64, Mismatch> {
    let current = old.filter(|r| r.stored).map_or(0, |r| r.generation);
    match if_generation {
        Some(want) if want != current => Err(Mismatch(current)),
        // Monotonic across deletes: a re-created name continues from its last generation.
        _ => Ok(old.map_or(0, |r| r.generation) + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(generation: u64, stored: bool) -> Record {
        Record {
            generation,
            stored,
            kind: "lora".into(),
            size_bytes: 1,
            created_at: 0,
            load: stored,
        }
    }

    #[test]
    fn compare_and_set_rules() {
        assert_eq!(check(None, Some(0)), Ok(1));
        assert_eq!(check(None, None), Ok(1));
        assert_eq!(check(None, Some(1)), Err(Mismatch(0)));
        assert_eq!(check(Some(&rec(3, true)), Some(3)), Ok(4));
        assert_eq!(check(Some(&rec(3, true)), Some(0)), Err(Mismatch(3)));
        assert_eq!(check(Some(&rec(3, true)), Some(2)), Err(Mismatch(3)));
        // deleted: "must not exist" holds, and the number continues
        assert_eq!(check(Some(&rec(3, false)), Some(0)), Ok(4));
        assert_eq!(check(Some(&rec(3, false)), Some(3)), Err(Mismatch(0)));
        assert_eq!(import_op(Some(&rec(3, false))), Op::Import);
        assert_eq!(import_op(Some(&rec(3, true))), Op::Replace);
    }

    #[test]
    fn announcements_and_records_keep_their_json_shape() {
        let a = Announcement {
            name: "x".into(),
            generation: 2,
            op: Op::Replace,
        };
        let s = serde_json::to_string(&a).unwrap();
        assert_eq!(s, r#"{"name":"x","generation":2,"op":"replace"}"#);
        assert_eq!(serde_json::from_str::<Announcement>(&s).unwrap(), a);
        let s = serde_json::to_string(&rec(3, true)).unwrap();
        assert!(s.contains("\"type\":\"lora\""), "{s}");
        assert_eq!(serde_json::from_str::<Record>(&s).unwrap(), rec(3, true));
    }
}
