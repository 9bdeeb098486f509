//! The adapter [`Registry`] in the PostgreSQL database replicas share (the table `adapters`,
//! migration `postgres/0004_adapters.sql`).
//!
//! - An import's compare-and-set locks the name's row (`SELECT … FOR UPDATE`, after inserting a
//!   placeholder for a new name so there is a row to lock) in a transaction that stays open
//!   until the import commits: an import of the same name on another replica waits for it, then
//!   reads the new generation, so exactly one of two racing imports with the same
//!   `if_generation` wins. The transaction lives in a task on the jobs runtime (the connection
//!   belongs to it) and is driven through channels by [`PgImport`].
//! - Every change NOTIFYs [`VARIANTS_CHANNEL`] inside its transaction (delivered at commit, never
//!   for a rolled-back one); a listener task feeds them to [`Registry::announcements`]. A
//!   notification lost while the listener reconnects is made up by the adapter store's periodic
//!   reconciliation against [`Registry::list`].
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::postgres::{PgListener, PgPool, PgRow};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::{broadcast, oneshot};

use super::backend::{StoreError, StoreResult};
use super::registry::{
    check, import_op, Announcement, ImportTx, Mismatch, Op, Record, Registry, VARIANTS_CHANNEL,
};

const COLUMNS: &str = "name, generation, stored, type, size_bytes, created_at, load";

/// The PostgreSQL registry; cheap to clone.
#[derive(Clone)]
pub struct PgRegistry {
    pool: PgPool,
    rt: tokio::runtime::Handle,
    announce: Arc<broadcast::Sender<Announcement>>,
}

fn record_of(r: &PgRow) -> sqlx::Result<(String, Record)> {
    Ok((
        r.try_get("name")?,
        Record {
            generation: r.try_get::<i64, _>("generation")? as u64,
            stored: r.try_get("stored")?,
            kind: r.try_get("type")?,
            size_bytes: r.try_get::<i64, _>("size_bytes")? as u64,
            created_at: r.try_get("created_at")?,
            load: r.try_get("load")?,
        },
    ))
}

async fn notify(
    tx: &mut Transaction<'static, Postgres>,
    name: &str,
    generation: u64,
    op: Op,
) -> sqlx::Result<()> {
    let payload = serde_json::to_string(&Announcement {
        name: name.into(),
        generation,
        op,
    })
    .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(VARIANTS_CHANNEL)
        .bind(payload)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl PgRegistry {
    /// The registry on `pool` (the jobs' database, already migrated); queries and the listener
    /// run on `rt`. Must be called on `rt`.
    pub async fn open(pool: PgPool, rt: tokio::runtime::Handle) -> sqlx::Result<Self> {
        let announce = Arc::new(broadcast::channel(256).0);
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(VARIANTS_CHANNEL).await?;
        rt.spawn(listen(listener, Arc::downgrade(&announce)));
        Ok(Self { pool, rt, announce })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = sqlx::Result<T>> + Send + 'static,
    ) -> BoxFuture<'static, StoreResult<T>> {
        let task = self.rt.spawn(f);
        Box::pin(async move {
            match task.await {
                Ok(r) => Ok(r?),
                Err(e) => Err(StoreError::new(e)),
            }
        })
    }
}

/// Feeds the announcements from the database's notifications until the registry is dropped.
/// The listener re-issues LISTEN on every reconnection by itself.
async fn listen(mut listener: PgListener, out: std::sync::Weak<broadcast::Sender<Announcement>>) {
    loop {
        let n = listener.try_recv().await;
        let Some(out) = out.upgrade() else { return };
        match n {
            Ok(Some(n)) => match serde_json::from_str::<Announcement>(n.payload()) {
                Ok(a) => {
                    let _ = out.send(a);
                }
                Err(e) => tracing::warn!("adapter registry: bad notification payload: {e}"),
            },
            // Reconnected: what was missed is found by the next reconciliation.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("adapter registry: notifications: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// What commits an import: the fields of the new row, and where to answer.
type Commit = (String, u64, i64, oneshot::Sender<sqlx::Result<Record>>);

/// An import holding its row lock in a task on the jobs runtime.
struct PgImport {
    generation: u64,
    op: Op,
    go: oneshot::Sender<Commit>,
}

impl ImportTx for PgImport {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn op(&self) -> Op {
        self.op
    }

    fn commit(
        self: Box<Self>,
        kind: String,
        size_bytes: u64,
        created_at: i64,
    ) -> BoxFuture<'static, StoreResult<Record>> {
        let (done, answer) = oneshot::channel();
        let sent = self.go.send((kind, size_bytes, created_at, done)).is_ok();
        Box::pin(async move {
            if !sent {
                return Err(StoreError::new(std::io::Error::other(
                    "the import's transaction ended before its commit",
                )));
            }
            match answer.await {
                Ok(r) => Ok(r?),
                Err(e) => Err(StoreError::new(e)),
            }
        })
    }
}

/// The transaction of one import: locks the row, answers the compare-and-set on `ready`, then
/// waits for the commit (or its sender's drop, which rolls back).
async fn import_tx(
    pool: PgPool,
    name: String,
    if_generation: Option<u64>,
    ready: oneshot::Sender<sqlx::Result<Result<(u64, Op), Mismatch>>>,
    go: oneshot::Receiver<Commit>,
) {
    let begun = async {
        let mut tx = pool.begin().await?;
        // A row to lock even for a new name; rolled back with the transaction if the import
        // does not commit. A concurrent insert of the same name waits for this transaction.
        sqlx::query(&format!(
            "INSERT INTO adapters ({COLUMNS}) VALUES ($1, 0, false, '', 0, 0, false) \
             ON CONFLICT (name) DO NOTHING"
        ))
        .bind(&name)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM adapters WHERE name = $1 FOR UPDATE"
        ))
        .bind(&name)
        .fetch_one(&mut *tx)
        .await?;
        let (_, old) = record_of(&row)?;
        // The placeholder (generation 0) stands for "no row".
        let old = (old.generation > 0).then_some(old);
        sqlx::Result::Ok((tx, old))
    }
    .await;
    let (mut tx, old) = match begun {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let generation = match check(old.as_ref(), if_generation) {
        Ok(g) => g,
        Err(m) => {
            let _ = ready.send(Ok(Err(m)));
            return;
        }
    };
    if ready
        .send(Ok(Ok((generation, import_op(old.as_ref())))))
        .is_err()
    {
        return;
    }
    let Ok((kind, size_bytes, created_at, done)) = go.await else {
        return;
    };
    let committed = async {
        sqlx::query(
            "UPDATE adapters SET generation = $2, stored = true, type = $3, size_bytes = $4, \
             created_at = $5, load = true WHERE name = $1",
        )
        .bind(&name)
        .bind(generation as i64)
        .bind(&kind)
        .bind(size_bytes as i64)
        .bind(created_at)
        .execute(&mut *tx)
        .await?;
        notify(&mut tx, &name, generation, import_op(old.as_ref())).await?;
        tx.commit().await?;
        Ok(Record {
            generation,
            stored: true,
            kind,
            size_bytes,
            created_at,
            load: true,
        })
    }
    .await;
    let _ = done.send(committed);
}

impl Registry for PgRegistry {
    fn get(&self, name: &str) -> BoxFuture<'static, StoreResult<Option<Record>>> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.run(async move {
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM adapters WHERE name = $1 AND generation > 0"
            ))
            .bind(name)
            .fetch_optional(&pool)
            .await?
            .map(|r| record_of(&r).map(|(_, rec)| rec))
            .transpose()
        })
    }

    fn list(&self) -> BoxFuture<'static, StoreResult<BTreeMap<String, Record>>> {
        let pool = self.pool.clone();
        self.run(async move {
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM adapters WHERE generation > 0"
            ))
            .fetch_all(&pool)
            .await?
            .iter()
            .map(record_of)
            .collect()
        })
    }

    fn begin_import(
        &self,
        name: &str,
        if_generation: Option<u64>,
    ) -> BoxFuture<'static, StoreResult<Result<Box<dyn ImportTx>, Mismatch>>> {
        let (ready_tx, ready) = oneshot::channel();
        let (go, go_rx) = oneshot::channel();
        self.rt.spawn(import_tx(
            self.pool.clone(),
            name.to_string(),
            if_generation,
            ready_tx,
            go_rx,
        ));
        Box::pin(async move {
            let checked = ready.await.map_err(StoreError::new)??;
            Ok(checked.map(|(generation, op)| {
                Box::new(PgImport { generation, op, go }) as Box<dyn ImportTx>
            }))
        })
    }

    fn delete(&self, name: &str) -> BoxFuture<'static, StoreResult<Option<Record>>> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.run(async move {
            let mut tx = pool.begin().await?;
            let row = sqlx::query(&format!(
                "UPDATE adapters SET stored = false, load = false \
                 WHERE name = $1 AND stored RETURNING {COLUMNS}"
            ))
            .bind(&name)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let (_, r) = record_of(&row)?;
            notify(&mut tx, &name, r.generation, Op::Delete).await?;
            tx.commit().await?;
            Ok(Some(r))
        })
    }

    fn delete_variant(&self, name: &str) -> BoxFuture<'static, StoreResult<Record>> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.run(async move {
            let mut tx = pool.begin().await?;
            let row = sqlx::query(&format!(
                "INSERT INTO adapters ({COLUMNS}) VALUES ($1, 1, false, '', 0, $2, false) \
                 ON CONFLICT (name) DO UPDATE SET generation = adapters.generation + 1, \
                 stored = false, load = false RETURNING {COLUMNS}"
            ))
            .bind(&name)
            .bind(super::storage::now())
            .fetch_one(&mut *tx)
            .await?;
            let (_, r) = record_of(&row)?;
            notify(&mut tx, &name, r.generation, Op::Delete).await?;
            tx.commit().await?;
            Ok(r)
        })
    }

    fn set_load(&self, name: &str, load: bool) -> BoxFuture<'static, StoreResult<()>> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.run(async move {
            sqlx::query("UPDATE adapters SET load = $2 WHERE name = $1 AND stored")
                .bind(name)
                .bind(load)
                .execute(&pool)
                .await?;
            Ok(())
        })
    }

    fn import_rows(
        &self,
        rows: BTreeMap<String, Record>,
    ) -> BoxFuture<'static, StoreResult<usize>> {
        let pool = self.pool.clone();
        self.run(async move {
            let mut tx = pool.begin().await?;
            let mut added = 0;
            for (name, r) in rows {
                added += sqlx::query(&format!(
                    "INSERT INTO adapters ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (name) DO NOTHING"
                ))
                .bind(name)
                .bind(r.generation as i64)
                .bind(r.stored)
                .bind(r.kind)
                .bind(r.size_bytes as i64)
                .bind(r.created_at)
                .bind(r.load)
                .execute(&mut *tx)
                .await?
                .rows_affected() as usize;
            }
            tx.commit().await?;
            Ok(added)
        })
    }

    fn announcements(&self) -> broadcast::Receiver<Announcement> {
        self.announce.subscribe()
    }

    fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }
}
