//! How a replica follows the variants other replicas change: it listens to the registry's
//! announcements ([`super::registry::Announcement`]) and, as a fallback for one it missed (a
//! notification lost while its database connection reconnected, a replica down during a
//! delete), reconciles every [`RECONCILE`] what it serves with the registry's rows.
//!
//! - Replaced (a newer generation than the one served here): the old one stops being served
//!   (requests running on it keep their `Arc`); the next request naming it loads the new one
//!   from the blob store ([`AdapterStore::serve_on_demand`]), within the engine's memory budget.
//! - Deleted (an imported adapter, or a fine-tuning variant's tombstone): it stops being served
//!   at once, so `/v1/models`, `/v1/adapters/{id}` and a chat naming it answer 404.
use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Duration;

use tokio::sync::broadcast::{error::RecvError, Receiver};

use super::adapter_store::{AdapterStore, StoreInner, JOB_PREFIX};
use super::registry::{Announcement, Op, Record};

/// How often a replica compares what it serves with the registry.
pub const RECONCILE: Duration = Duration::from_secs(3);

/// Follows `announcements` and reconciles periodically until the store is dropped.
pub(super) async fn follow(store: Weak<StoreInner>, mut announcements: Receiver<Announcement>) {
    let mut tick = tokio::time::interval(RECONCILE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let heard = tokio::select! {
            a = announcements.recv() => Some(a),
            _ = tick.tick() => None,
        };
        let Some(inner) = store.upgrade() else { return };
        let s = AdapterStore::from_inner(inner);
        match heard {
            Some(Ok(a)) => apply(&s, &a),
            // Missed some: the registry's rows tell what they said.
            Some(Err(RecvError::Lagged(_))) | None => reconcile(&s).await,
            Some(Err(RecvError::Closed)) => return,
        }
    }
}

/// What one announcement changes here.
fn apply(s: &AdapterStore, a: &Announcement) {
    let served = s.served_generations().get(&a.name).copied();
    let stale = match (a.op, served) {
        // An older generation than announced (never the one this replica just imported).
        (Op::Import | Op::Replace, Some(g)) => g < a.generation,
        (Op::Delete, Some(g)) => g <= a.generation,
        (Op::Delete, None) => a.name.starts_with(JOB_PREFIX) && s.engine().is_served(&a.name),
        (_, None) => false,
    };
    if stale {
        s.drop_served(&a.name);
        tracing::info!(adapter = %a.name, generation = a.generation, op = ?a.op,
            "changed on another replica: no longer served here");
    }
}

/// Compares what is served here with the registry's rows.
async fn reconcile(s: &AdapterStore) {
    let rows = match s.registry().list().await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!("adapter registry: cannot reconcile: {e}");
            return;
        }
    };
    for name in stale(&rows, &s.served_generations(), |n| s.engine().is_served(n)) {
        s.drop_served(&name);
        tracing::info!(adapter = %name, "reconciled: no longer served here");
    }
}

/// The names served here that the registry says were replaced or deleted. A row older than
/// what is served (read before this replica's own import or load) changes nothing.
fn stale(
    rows: &BTreeMap<String, Record>,
    served: &std::collections::HashMap<String, u64>,
    is_served: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut out: Vec<String> = served
        .iter()
        .filter(|(name, &g)| {
            rows.get(*name)
                .is_some_and(|r| r.generation > g || (r.generation == g && !r.stored))
        })
        .map(|(n, _)| n.clone())
        .collect();
    out.extend(
        rows.iter()
            .filter(|(name, r)| name.starts_with(JOB_PREFIX) && !r.stored && is_served(name))
            .map(|(n, _)| n.clone()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(generation: u64, stored: bool) -> Record {
        Record {
            generation,
            stored,
            kind: String::new(),
            size_bytes: 0,
            created_at: 0,
            load: stored,
        }
    }

    #[test]
    fn reconciliation_drops_only_what_changed_after_it_was_loaded() {
        let rows: BTreeMap<String, Record> = [
            ("same", rec(2, true)),
            ("replaced", rec(3, true)),
            ("deleted", rec(2, false)),
            ("older_row", rec(1, true)),
            ("ft:gone", rec(1, false)),
            ("ft:not_here", rec(1, false)),
        ]
        .into_iter()
        .map(|(n, r)| (n.to_string(), r))
        .collect();
        let served = [
            ("same", 2),
            ("replaced", 2),
            ("deleted", 2),
            ("older_row", 2),
            ("new", 1),
        ]
        .into_iter()
        .map(|(n, g)| (n.to_string(), g))
        .collect();
        let mut got = stale(&rows, &served, |n| n == "ft:gone");
        got.sort();
        assert_eq!(got, ["deleted", "ft:gone", "replaced"]);
    }
}
