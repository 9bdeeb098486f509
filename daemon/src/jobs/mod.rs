//! Fine-tuning jobs and their files: what `POST /v1/files` and `/v1/fine_tuning/jobs` act on.
//!
//! - [`backend`]: the two storage interfaces everything here runs on, [`backend::MetaStore`]
//!   (rows) and [`backend::BlobStore`] (bytes), so another backend can take their place.
//! - [`store`]: the SQLite database (files, jobs, events, checkpoints), through `sqlx`: the
//!   default `MetaStore`; [`pg_store`]: the same on PostgreSQL, shared by several replicas
//!   (`storage.database_url`, docs/scale-out.md).
//! - [`storage`]: the data directory's layout, ids, atomic writes of uploaded bytes: the
//!   default `BlobStore`; [`object_blob`]: the `BlobStore` over S3/GCS/Azure (`storage.objects`).
//! - [`service`]: what the HTTP handlers call (create, list, cancel, upload, ...), with domain
//!   errors ([`ServiceError`]); they never see a row store or a path.
//! - [`adapter_store`]: the adapters imported over the API, with compare-and-set generations.
//! - [`registry`]: the adapter registry (names, generations) in the jobs' database
//!   ([`registry_sqlite`], [`registry_pg`]), and the announcements of changed variants.
//! - [`spec`]: a job request parsed and validated into what the trainer needs;
//!   [`auto_hyper`]: what "auto" epochs and batch size are for a dataset's size.
//! - [`lease`]: a runner's claim on the job it trains (heartbeat, loss of the lease, the
//!   cancel/pause sent to another replica).
//! - [`runner`]: the one thread that trains jobs, one at a time in creation order, on the
//!   engine's resident base model, and serves each result (and checkpoint) as a variant the
//!   moment it exists; at start it brings back everything a crash or restart left behind.
//!
//! [`Jobs`] ties them together and is what the HTTP handlers hold.
pub mod adapter_store;
pub mod auto_hyper;
pub mod backend;
pub mod error;
mod lease;
pub mod object_blob;
mod pg_fenced;
mod pg_rows;
pub mod pg_store;
pub mod registry;
#[cfg(test)]
mod registry_contract;
pub mod registry_pg;
pub mod registry_sqlite;
pub mod runner;
mod service;
pub mod spec;
pub mod storage;
pub mod store;
#[cfg(test)]
mod store_contract;
mod store_fenced;
mod store_rows;
mod variant_sync;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::engine::EngineHandle;
use crate::train::TrainControl;
pub use adapter_store::AdapterStore;
use backend::{BlobStore, DatabaseUrl, MetaStore};
pub use error::{ServiceError, ServiceResult};
pub use service::FINE_TUNE;
pub use storage::valid_id;
use storage::Storage;
use store::Store;

/// Default `organization_id` (and the `{org}` of tuned model names).
pub const DEFAULT_ORGANIZATION: &str = "itamae";
/// Default size limit of one uploaded file.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 512 << 20;

#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub data_dir: PathBuf,
    pub organization_id: String,
    pub max_upload_bytes: u64,
    /// The share of time training keeps while serving has work (0 < x ≤ 1; 1 = never yield).
    pub training_max_share: f64,
    /// `base_model_name_or_path` of the adapters jobs save; None: the model's own hub id if its
    /// files carry one, else its served name.
    pub base_model_id: Option<String>,
    /// None: the SQLite file in the data directory.
    pub database: Option<DatabaseUrl>,
    /// This runner's name in job leases.
    pub replica_id: String,
    /// How long a claim on a running job lasts without a heartbeat.
    pub job_lease: Duration,
    /// Where the bytes go (`storage.objects`); None: the data directory.
    pub objects: Option<crate::config::ObjectsConfig>,
}

impl JobsConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            organization_id: DEFAULT_ORGANIZATION.into(),
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            training_max_share: crate::config::DEFAULT_TRAINING_MAX_SHARE,
            base_model_id: None,
            database: None,
            replica_id: crate::config::default_replica_id(),
            job_lease: Duration::from_secs(crate::config::DEFAULT_JOB_LEASE_SECS),
            objects: None,
        }
    }
}

/// The jobs service: cheap to clone, shared by the HTTP workers and the runner thread.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    cfg: JobsConfig,
    store: Arc<dyn MetaStore>,
    blobs: Arc<dyn BlobStore>,
    /// The adapter registry, in the same database as `store`.
    registry: Arc<dyn registry::Registry>,
    engine: EngineHandle,
    /// A runtime for the database calls of plain threads (runner, validation); HTTP handlers
    /// use their own. It lives as long as the runner thread, that is, the process.
    rt: tokio::runtime::Handle,
    /// Bumped whenever the runner may have work (a job queued, cancelled, ...).
    wake: (Mutex<u64>, Condvar),
    /// The job the runner is training and its cancel/pause switches.
    current: Mutex<Option<(String, Arc<TrainControl>)>>,
    /// Set when the runner lost its lease on the job it trains (another replica claimed it):
    /// the runner then stops that job without writing its outcome.
    lease_lost: AtomicBool,
    /// Set once on SIGTERM: no job starts any more, the running one is checkpointed and left
    /// `running` for the next start to resume.
    shutdown: AtomicBool,
    /// True once the runner thread has returned (after a shutdown, or a failed model load).
    stopped: (Mutex<bool>, Condvar),
    /// True once stored variants and checkpoints are served again after a start: before that,
    /// a tuned model a client knows would answer 404, so the daemon is not ready.
    pub(crate) recovered: AtomicBool,
}

impl Jobs {
    /// Opens the database under `cfg.data_dir` and starts the runner thread, which waits for
    /// the engine's model, serves every stored result again and resumes interrupted jobs.
    pub fn open(cfg: JobsConfig, engine: EngineHandle) -> anyhow::Result<Self> {
        let inner = Self::open_inner(cfg, engine)?;
        let (rt, inner) = inner;
        let runner_inner = inner.clone();
        std::thread::Builder::new()
            .name("itamae-jobs".into())
            .spawn(move || {
                // Owning the runtime here keeps it alive (and never drops it on an async thread).
                let _rt = rt;
                runner::run(runner_inner);
            })?;
        Ok(Self { inner })
    }

    fn open_inner(
        cfg: JobsConfig,
        engine: EngineHandle,
    ) -> anyhow::Result<(tokio::runtime::Runtime, Arc<Inner>)> {
        let storage = Storage::open(&cfg.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the data directory {}: {e}",
                cfg.data_dir.display()
            )
        })?;
        // A multi-threaded runtime so that sqlx's background work (returning connections to
        // the pool) runs even while no thread blocks on it.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("itamae-jobs-db")
            .enable_all()
            .build()?;
        let default_db = storage.db_path();
        let blobs: Arc<dyn BlobStore> = match &cfg.objects {
            Some(o) if !object_blob::names_dir(o, &cfg.data_dir) => Arc::new(
                object_blob::ObjectBlob::open(o, &cfg.data_dir.join("cache"), rt.handle().clone())
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            _ => Arc::new(storage),
        };
        // Leftovers of uploads a crash interrupted; here, before the HTTP server accepts any
        // upload (the runner's recovery runs after the model loads, while uploads may be in
        // flight, and would delete them).
        blobs.clean_interrupted_uploads();
        let (store, registry): (Arc<dyn MetaStore>, Arc<dyn registry::Registry>) =
            match &cfg.database {
                Some(DatabaseUrl::Postgres(url)) => {
                    let store = rt
                        .block_on(pg_store::PgStore::open(url, rt.handle().clone()))
                        .map_err(|e| anyhow::anyhow!("cannot open the database {e}"))?;
                    let registry = rt
                        .block_on(registry_pg::PgRegistry::open(
                            store.pool(),
                            rt.handle().clone(),
                        ))
                        .map_err(|e| anyhow::anyhow!("cannot listen to the database: {e}"))?;
                    (Arc::new(store), Arc::new(registry))
                }
                sqlite => {
                    let db = match sqlite {
                        Some(DatabaseUrl::Sqlite(path)) => path.clone(),
                        _ => default_db,
                    };
                    let store = rt.block_on(Store::open(&db)).map_err(|e| {
                        anyhow::anyhow!("cannot open the database {}: {e}", db.display())
                    })?;
                    let registry =
                        registry_sqlite::SqliteRegistry::new(store.pool(), rt.handle().clone());
                    (Arc::new(store), Arc::new(registry))
                }
            };
        let inner = Arc::new(Inner {
            cfg,
            store,
            blobs,
            registry,
            engine,
            rt: rt.handle().clone(),
            wake: (Mutex::new(0), Condvar::new()),
            current: Mutex::new(None),
            lease_lost: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            stopped: (Mutex::new(false), Condvar::new()),
            recovered: AtomicBool::new(false),
        });
        Ok((rt, inner))
    }

    pub fn config(&self) -> &JobsConfig {
        &self.inner.cfg
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.inner.engine
    }

    /// Where the bytes live (the data directory, or the object store of `storage.objects`):
    /// the adapter store keeps imported adapters there too.
    pub fn blobs(&self) -> Arc<dyn BlobStore> {
        self.inner.blobs.clone()
    }

    /// The adapter registry (in the jobs' database): the adapter store keeps its names there.
    pub fn registry(&self) -> Arc<dyn registry::Registry> {
        self.inner.registry.clone()
    }

    /// `ft:{base}:{org}:{suffix}:{job-id}`, the name a job's result is served under.
    pub fn variant_name(&self, base: &str, suffix: Option<&str>, job_id: &str) -> String {
        format!(
            "ft:{base}:{}:{}:{job_id}",
            self.inner.cfg.organization_id,
            suffix.unwrap_or("")
        )
    }

    /// Validates a new job's files on a thread of its own (tokenizing can take a while), then
    /// queues or fails the job.
    pub fn validate_in_background(&self, job_id: String) {
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("itamae-validate".into())
            .spawn(move || runner::validate(&inner, &job_id));
        if let Err(e) = spawned {
            tracing::error!("cannot start a validation thread: {e}");
        }
    }

    /// The cancel/pause switches of `job_id` if the runner is training it now.
    pub fn control(&self, job_id: &str) -> Option<Arc<TrainControl>> {
        self.inner.control(job_id)
    }

    /// Tells the runner to look for work.
    pub fn wake(&self) {
        self.inner.wake();
    }

    /// Starts an orderly stop (SIGTERM) and returns at once: no queued job starts any more;
    /// the running job stops at its next step boundary, is checkpointed there and stays
    /// `running` in the database, so the next start resumes it. [`Self::wait_stopped`] waits.
    pub fn begin_shutdown(&self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        if let Some((id, c)) = self
            .inner
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            tracing::info!(job = %id, "shutdown: stopping the running job at its next step");
            c.cancel.store(true, Ordering::SeqCst);
        }
        self.inner.wake();
    }

    /// After [`Self::begin_shutdown`]: waits up to `timeout` for the runner to checkpoint and
    /// stop. False if it did not in time (the job then resumes from its previous checkpoint).
    /// Whether the variants stored by earlier runs are served again (readiness).
    pub fn recovered(&self) -> bool {
        self.inner.recovered.load(Ordering::SeqCst)
    }

    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let (m, cv) = &self.inner.stopped;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = cv
            .wait_timeout_while(g, timeout, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

impl Inner {
    fn control(&self, job_id: &str) -> Option<Arc<TrainControl>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|(id, _)| id == job_id)
            .map(|(_, c)| c.clone())
    }

    fn wake(&self) {
        let (m, cv) = &self.wake;
        *m.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        cv.notify_all();
    }

    /// Sleeps until [`Self::wake`] or `timeout`.
    fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let (m, cv) = &self.wake;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = cv
            .wait_timeout_while(g, timeout, |n| *n == seen)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }

    fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    fn mark_stopped(&self) {
        let (m, cv) = &self.stopped;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    fn wake_count(&self) -> u64 {
        *self.wake.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
