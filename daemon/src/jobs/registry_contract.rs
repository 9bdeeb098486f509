//! The adapter [`Registry`] contract, run against the SQLite file and a real PostgreSQL (the
//! servers and databases of [`super::store_contract`]): compare-and-set in the database,
//! generations monotonic across deletes, announcements, and two replicas racing a
//! compare-and-set on one PostgreSQL.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::pg_store::PgStore;
use super::registry::{Announcement, Mismatch, Op, Record, Registry};
use super::registry_pg::PgRegistry;
use super::registry_sqlite::SqliteRegistry;
use super::store::Store;
use super::store_contract::{backends, pg_database, Backend};

impl Backend {
    /// The registry on this backend's database (migrated by opening its store).
    async fn registry(&self) -> Arc<dyn Registry> {
        let rt = tokio::runtime::Handle::current();
        match self {
            Backend::Sqlite(path) => Arc::new(SqliteRegistry::new(
                Store::open(path).await.unwrap().pool(),
                rt,
            )),
            Backend::Postgres(url) => {
                let store = PgStore::open(url, rt.clone()).await.unwrap();
                Arc::new(PgRegistry::open(store.pool(), rt).await.unwrap())
            }
        }
    }
}

/// Imports `name` if its generation is `want`; the new record, or the mismatch.
async fn import(reg: &dyn Registry, name: &str, want: Option<u64>) -> Result<Record, Mismatch> {
    match reg.begin_import(name, want).await.unwrap() {
        Ok(tx) => Ok(tx.commit("lora".into(), 7, 100).await.unwrap()),
        Err(m) => Err(m),
    }
}

/// The next announcement, within a PostgreSQL round trip.
async fn heard(rx: &mut tokio::sync::broadcast::Receiver<Announcement>) -> (String, u64, Op) {
    let a = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an announcement")
        .unwrap();
    (a.name, a.generation, a.op)
}

fn ann(name: &str, generation: u64, op: Op) -> (String, u64, Op) {
    (name.into(), generation, op)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_are_compared_and_set_in_the_database() {
    for b in backends().await {
        let reg = b.registry().await;
        let mut rx = reg.announcements();
        let r = reg.as_ref();
        assert_eq!(r.get("a").await.unwrap(), None, "{}", b.name());
        // 0 = must not exist; a wrong expectation names the current generation
        assert_eq!(import(r, "a", Some(1)).await, Err(Mismatch(0)));
        let first = import(r, "a", Some(0)).await.unwrap();
        assert_eq!(
            (first.generation, first.stored, first.load),
            (1, true, true)
        );
        assert_eq!(first.kind, "lora");
        assert_eq!(heard(&mut rx).await, ann("a", 1, Op::Import));
        assert_eq!(import(r, "a", Some(0)).await, Err(Mismatch(1)));
        assert_eq!(import(r, "a", Some(1)).await.unwrap().generation, 2);
        assert_eq!(heard(&mut rx).await, ann("a", 2, Op::Replace));
        // unconditional
        assert_eq!(import(r, "a", None).await.unwrap().generation, 3);
        assert_eq!(heard(&mut rx).await, ann("a", 3, Op::Replace));
        r.set_load("a", false).await.unwrap();
        assert!(!r.get("a").await.unwrap().unwrap().load);

        // a delete keeps the number; a re-created name continues from it
        let gone = r.delete("a").await.unwrap().unwrap();
        assert_eq!((gone.generation, gone.stored), (3, false));
        assert_eq!(heard(&mut rx).await, ann("a", 3, Op::Delete));
        assert_eq!(r.delete("a").await.unwrap(), None, "{}", b.name());
        assert_eq!(import(r, "a", Some(3)).await, Err(Mismatch(0)));
        assert_eq!(import(r, "a", Some(0)).await.unwrap().generation, 4);
        assert_eq!(heard(&mut rx).await, ann("a", 4, Op::Import));

        // an import that does not commit changes nothing and holds nothing
        let tx = r.begin_import("b", Some(0)).await.unwrap().unwrap();
        assert_eq!(tx.generation(), 1);
        drop(tx);
        assert_eq!(r.get("b").await.unwrap(), None, "{}", b.name());
        assert_eq!(import(r, "b", Some(0)).await.unwrap().generation, 1);
        assert_eq!(heard(&mut rx).await, ann("b", 1, Op::Import));

        // a fine-tuning variant's delete: a tombstone, numbered on
        let t = r.delete_variant("ft:x").await.unwrap();
        assert_eq!((t.generation, t.stored), (1, false));
        assert_eq!(heard(&mut rx).await, ann("ft:x", 1, Op::Delete));
        assert_eq!(r.delete_variant("ft:x").await.unwrap().generation, 2);
        assert_eq!(heard(&mut rx).await, ann("ft:x", 2, Op::Delete));

        // an older index never overrides the database
        let old: BTreeMap<String, Record> = [("a", 1, true), ("c", 5, true)]
            .into_iter()
            .map(|(n, g, stored)| {
                let r = Record {
                    generation: g,
                    stored,
                    kind: "prompt_tuning".into(),
                    size_bytes: 3,
                    created_at: 1,
                    load: true,
                };
                (n.to_string(), r)
            })
            .collect();
        assert_eq!(r.import_rows(old).await.unwrap(), 1);
        let rows = r.list().await.unwrap();
        assert_eq!(
            rows.iter()
                .map(|(n, r)| (n.as_str(), r.generation, r.stored))
                .collect::<Vec<_>>(),
            [
                ("a", 4, true),
                ("b", 1, true),
                ("c", 5, true),
                ("ft:x", 2, false)
            ],
            "{}",
            b.name()
        );
        assert_eq!(rows["c"].kind, "prompt_tuning");

        // the rows outlive the process
        drop(reg);
        let again = b.registry().await;
        assert_eq!(again.list().await.unwrap(), rows, "{}", b.name());
    }
}

/// Two replicas on one PostgreSQL import the same new name with `if_generation` 0 at the same
/// time: the database lets exactly one win, the other is told the winner's generation, and
/// each replica hears the other's announcement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_imports_on_two_replicas_let_exactly_one_win() {
    let b = Backend::Postgres(pg_database().await);
    let (ra, rb) = tokio::join!(b.registry(), b.registry());
    let (mut heard_a, mut heard_b) = (ra.announcements(), rb.announcements());
    for round in 0..5u64 {
        let name = format!("race-{round}");
        // Both hold the compare-and-set open for a while, as an upload does.
        let slow = |reg: Arc<dyn Registry>, name: String| async move {
            match reg.begin_import(&name, Some(0)).await.unwrap() {
                Ok(tx) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(tx.commit("lora".into(), 1, 1).await.unwrap())
                }
                Err(m) => Err(m),
            }
        };
        let (x, y) = tokio::join!(
            tokio::spawn(slow(ra.clone(), name.clone())),
            tokio::spawn(slow(rb.clone(), name.clone()))
        );
        let mut outcomes = [x.unwrap(), y.unwrap()];
        outcomes.sort_by_key(|o| o.is_err());
        assert_eq!(
            outcomes[0].as_ref().map(|r| r.generation),
            Ok(1),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[1], Err(Mismatch(1)), "{outcomes:?}");
        assert_eq!(ra.get(&name).await.unwrap().unwrap().generation, 1);
        // exactly one announcement, heard by both replicas
        for rx in [&mut heard_a, &mut heard_b] {
            assert_eq!(heard(rx).await, ann(&name, 1, Op::Import));
        }
    }
    // a stale replace loses the same way, whichever replica sends it
    assert_eq!(
        import(ra.as_ref(), "race-0", Some(1))
            .await
            .unwrap()
            .generation,
        2
    );
    assert_eq!(
        import(rb.as_ref(), "race-0", Some(1)).await,
        Err(Mismatch(2))
    );
    assert_eq!(heard(&mut heard_b).await, ann("race-0", 2, Op::Replace));
    // a delete on one is heard on the other
    rb.delete("race-0").await.unwrap().unwrap();
    assert_eq!(heard(&mut heard_a).await.2, Op::Replace);
    assert_eq!(heard(&mut heard_a).await, ann("race-0", 2, Op::Delete));
}
