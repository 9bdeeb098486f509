//! The adapter [`Registry`] in the SQLite file of one daemon (the table `adapters`, migration
//! `0003_adapters.sql`). One daemon owns the file, so its announcements stay in-process and an
//! import holds an in-process lock from its compare-and-set to its commit; the commit itself is
//! still conditional in the database (the generation it read), one statement.
use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::Row;
use tokio::sync::broadcast;

use super::backend::{StoreError, StoreResult};
use super::registry::{check, import_op, Announcement, ImportTx, Mismatch, Op, Record, Registry};

const COLUMNS: &str = "name, generation, stored, type, size_bytes, created_at, load";

/// The SQLite registry; cheap to clone.
#[derive(Clone)]
pub struct SqliteRegistry {
    pool: SqlitePool,
    rt: tokio::runtime::Handle,
    announce: broadcast::Sender<Announcement>,
    /// Held by an import from its compare-and-set to its commit.
    imports: Arc<tokio::sync::Mutex<()>>,
}

fn record_of(r: &SqliteRow) -> sqlx::Result<(String, Record)> {
    Ok((
        r.try_get("name")?,
        Record {
            generation: r.try_get::<i64, _>("generation")? as u64,
            stored: r.try_get::<i64, _>("stored")? != 0,
            kind: r.try_get("type")?,
            size_bytes: r.try_get::<i64, _>("size_bytes")? as u64,
            created_at: r.try_get("created_at")?,
            load: r.try_get::<i64, _>("load")? != 0,
        },
    ))
}

async fn get(pool: &SqlitePool, name: &str) -> sqlx::Result<Option<Record>> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM adapters WHERE name = ?1"))
        .bind(name)
        .fetch_optional(pool)
        .await?
        .map(|r| record_of(&r).map(|(_, rec)| rec))
        .transpose()
}

impl SqliteRegistry {
    /// The registry on `pool` (the jobs' SQLite file, already migrated); queries run on `rt`.
    pub fn new(pool: SqlitePool, rt: tokio::runtime::Handle) -> Self {
        Self {
            pool,
            rt,
            announce: broadcast::channel(256).0,
            imports: Arc::new(tokio::sync::Mutex::new(())),
        }
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

struct SqliteImport {
    reg: SqliteRegistry,
    name: String,
    generation: u64,
    op: Op,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl ImportTx for SqliteImport {
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
        let this = *self;
        let pool = this.reg.pool.clone();
        let (name, generation) = (this.name.clone(), this.generation);
        let kind2 = kind.clone();
        let fut = this.reg.run(async move {
            let r = sqlx::query(
                "INSERT INTO adapters (name, generation, stored, type, size_bytes, created_at, load) \
                 VALUES (?1, ?2, 1, ?3, ?4, ?5, 1) \
                 ON CONFLICT (name) DO UPDATE SET generation = excluded.generation, stored = 1, \
                 type = excluded.type, size_bytes = excluded.size_bytes, \
                 created_at = excluded.created_at, load = 1 \
                 WHERE adapters.generation = ?6",
            )
            .bind(&name)
            .bind(generation as i64)
            .bind(&kind2)
            .bind(size_bytes as i64)
            .bind(created_at)
            .bind(generation as i64 - 1)
            .execute(&pool)
            .await?;
            Ok(r.rows_affected())
        });
        Box::pin(async move {
            let affected = fut.await?;
            if affected != 1 {
                return Err(StoreError::new(std::io::Error::other(format!(
                    "adapter `{}` changed during its import",
                    this.name
                ))));
            }
            let _ = this.reg.announce.send(Announcement {
                name: this.name.clone(),
                generation,
                op: this.op,
            });
            Ok(Record {
                generation,
                stored: true,
                kind,
                size_bytes,
                created_at,
                load: true,
            })
        })
    }
}

impl Registry for SqliteRegistry {
    fn get(&self, name: &str) -> BoxFuture<'static, StoreResult<Option<Record>>> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.run(async move { get(&pool, &name).await })
    }

    fn list(&self) -> BoxFuture<'static, StoreResult<BTreeMap<String, Record>>> {
        let pool = self.pool.clone();
        self.run(async move {
            sqlx::query(&format!("SELECT {COLUMNS} FROM adapters"))
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
        let (reg, name) = (self.clone(), name.to_string());
        Box::pin(async move {
            let held = reg.imports.clone().lock_owned().await;
            let old = reg.get(&name).await?;
            Ok(check(old.as_ref(), if_generation).map(|generation| {
                Box::new(SqliteImport {
                    op: import_op(old.as_ref()),
                    reg,
                    name,
                    generation,
                    _held: held,
                }) as Box<dyn ImportTx>
            }))
        })
    }

    fn delete(&self, name: &str) -> BoxFuture<'static, StoreResult<Option<Record>>> {
        let (pool, n) = (self.pool.clone(), name.to_string());
        let fut = self.run(async move {
            sqlx::query(&format!(
                "UPDATE adapters SET stored = 0, load = 0 WHERE name = ?1 AND stored = 1 \
                 RETURNING {COLUMNS}"
            ))
            .bind(&n)
            .fetch_optional(&pool)
            .await?
            .map(|r| record_of(&r).map(|(_, rec)| rec))
            .transpose()
        });
        let (tx, name) = (self.announce.clone(), name.to_string());
        Box::pin(async move {
            let r = fut.await?;
            if let Some(r) = &r {
                let _ = tx.send(Announcement {
                    name,
                    generation: r.generation,
                    op: Op::Delete,
                });
            }
            Ok(r)
        })
    }

    fn delete_variant(&self, name: &str) -> BoxFuture<'static, StoreResult<Record>> {
        let (pool, n) = (self.pool.clone(), name.to_string());
        let fut = self.run(async move {
            let row = sqlx::query(&format!(
                "INSERT INTO adapters ({COLUMNS}) VALUES (?1, 1, 0, '', 0, ?2, 0) \
                 ON CONFLICT (name) DO UPDATE SET generation = adapters.generation + 1, \
                 stored = 0, load = 0 RETURNING {COLUMNS}"
            ))
            .bind(&n)
            .bind(super::storage::now())
            .fetch_one(&pool)
            .await?;
            record_of(&row).map(|(_, r)| r)
        });
        let (tx, name) = (self.announce.clone(), name.to_string());
        Box::pin(async move {
            let r = fut.await?;
            let _ = tx.send(Announcement {
                name,
                generation: r.generation,
                op: Op::Delete,
            });
            Ok(r)
        })
    }

    fn set_load(&self, name: &str, load: bool) -> BoxFuture<'static, StoreResult<()>> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.run(async move {
            sqlx::query("UPDATE adapters SET load = ?2 WHERE name = ?1 AND stored = 1")
                .bind(name)
                .bind(load as i64)
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
                    "INSERT INTO adapters ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                     ON CONFLICT (name) DO NOTHING"
                ))
                .bind(name)
                .bind(r.generation as i64)
                .bind(r.stored as i64)
                .bind(r.kind)
                .bind(r.size_bytes as i64)
                .bind(r.created_at)
                .bind(r.load as i64)
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
