//! The adapter store: PEFT adapters imported over the API, and load/unload of every servable
//! variant (imported ones and fine-tuning jobs' results and checkpoints). A service beside
//! [`super::Jobs`] (it finds jobs' variants through it), below the HTTP handlers of
//! `/v1/adapters`, which only parse the request, call it and render what it returns.
//!
//! The registry of names (per-name generation, type, size, whether it should be resident) is in
//! the jobs' database ([`super::registry`]), so every replica sees the same generations and a
//! compare-and-set is decided there. A `<data>/adapters/index.json` an older version kept is
//! imported into it once at open and renamed `index.json.imported`. The adapters' bytes (`adapter_config.json` +
//! `adapter_model.safetensors`, as uploaded) go through the jobs' [`BlobStore`]: installed
//! atomically in its local directory for the name, then published (to the object store when
//! `storage.objects` names one, so another replica can materialise and serve them).
//!
//! Generations: each successful import of a name bumps its generation (kept across deletes, so a
//! re-created name never reuses an old number). `if_generation` on import is a compare-and-set:
//! the current generation (0 = "must not exist") or [`ServiceError::GenerationMismatch`].
//! Requests already running keep the `Arc<Adapter>` they started with (the engine's contract),
//! so a replace never disturbs them.
//!
//! Every replica follows the registry's announcements ([`super::variant_sync`]): a variant
//! replaced or deleted elsewhere stops being served here, and a replaced one is loaded again on
//! its next request.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::backend::BlobStore;
pub use super::registry::Record;
use super::registry::{Mismatch, Op, Registry};
use super::{Jobs, ServiceError, ServiceResult};
use crate::adapters::{peft, Adapter};
use crate::engine::EngineHandle;

/// Longest accepted `adapter_config.json`.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Default limit of `adapter_model.safetensors` (the daemon passes the upload limit).
pub const DEFAULT_MAX_WEIGHTS_BYTES: u64 = 512 << 20;
/// Names of this prefix belong to fine-tuning jobs.
pub const JOB_PREFIX: &str = "ft:";
/// The registry file of older versions, imported into the database once.
const INDEX_FILE: &str = "index.json";
/// What the imported `index.json` is renamed to (kept for reference; never read again).
const INDEX_IMPORTED: &str = "index.json.imported";

/// True for `[A-Za-z0-9._:-]{1,128}` not starting with `.` and without `..`: a single, harmless
/// path component under `<data>/adapters/`.
pub fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The layout of an older version's `index.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    adapters: BTreeMap<String, Record>,
}

/// What is known of one adapter or servable variant (the API's `adapter` object).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub id: String,
    /// `lora`, `prompt_tuning`, ... (None when neither served nor imported).
    pub kind: Option<String>,
    /// Imported adapters only.
    pub generation: Option<u64>,
    pub size_bytes: Option<u64>,
    /// Imported adapters only.
    pub created_at: Option<i64>,
    pub resident: bool,
    /// The base model's id.
    pub parent: Option<String>,
    /// `import`, `fine_tuning_job` or `runtime` (served from memory only, e.g. `--adapter`).
    pub source: &'static str,
    pub fine_tuning_job_id: Option<String>,
}

/// A new adapter to import (the upload, parsed by the caller).
pub struct Import {
    pub name: String,
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
    /// Compare-and-set: the generation the caller expects (0 = must not exist).
    pub if_generation: Option<u64>,
}

/// The imported adapters; registered as app data. Cheap to clone.
#[derive(Clone)]
pub struct AdapterStore {
    inner: Arc<StoreInner>,
}

pub(super) struct StoreInner {
    root: PathBuf,
    /// Where the adapters' bytes live.
    blobs: Arc<dyn BlobStore>,
    /// Names and generations, in the jobs' database.
    registry: Arc<dyn Registry>,
    engine: EngineHandle,
    max_weights_bytes: u64,
    /// The generation of each imported adapter this process serves: what announcements and
    /// the reconciliation compare with the registry's.
    served: Mutex<HashMap<String, u64>>,
    /// Serialises this process's mutations (import, delete, load, unload); across replicas
    /// the registry's compare-and-set decides.
    ops: tokio::sync::Mutex<()>,
    /// The runtime of the registry's queries when this store opened its own database.
    _rt: Option<OwnedRuntime>,
}

/// A runtime owned by the store, shut down without waiting when dropped (which may happen on
/// an async thread, where a plain drop would panic).
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

fn io_err(what: &str, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Internal(format!("{what}: {e}"))
}

/// Runs blocking work (file system, parsing tensors) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ServiceResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("a worker thread failed: {e}")))
}

/// Where a servable variant's PEFT files are: an imported adapter's directory, or a fine-tuning
/// job's result or checkpoint.
#[derive(Debug, Clone)]
enum Source {
    Imported(Record),
    Job { job_id: String, dir: PathBuf },
}

fn dir_size(dir: &Path) -> u64 {
    [peft::CONFIG_FILE, peft::WEIGHTS_FILE]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn info(
    id: &str,
    source: Option<&Source>,
    kind: Option<&str>,
    resident: bool,
    parent: Option<&str>,
) -> AdapterInfo {
    let (generation, size_bytes, created_at, src, job) = match source {
        Some(Source::Imported(r)) => (
            Some(r.generation),
            Some(r.size_bytes),
            Some(r.created_at),
            "import",
            None,
        ),
        Some(Source::Job { job_id, dir }) => (
            None,
            Some(dir_size(dir)),
            None,
            "fine_tuning_job",
            Some(job_id.clone()),
        ),
        None => (None, None, None, "runtime", None),
    };
    let kind = kind.or(match source {
        Some(Source::Imported(r)) => Some(r.kind.as_str()),
        _ => None,
    });
    AdapterInfo {
        id: id.into(),
        kind: kind.map(str::to_string),
        generation,
        size_bytes,
        created_at,
        resident,
        parent: parent.map(str::to_string),
        source: src,
        fine_tuning_job_id: job,
    }
}

/// Parses and checks an upload against the base model (blocking).
fn parse_adapter(
    config: &[u8],
    weights: &[u8],
    engine: &EngineHandle,
) -> ServiceResult<(Value, Adapter)> {
    let c: Value = serde_json::from_slice(config).map_err(|e| {
        ServiceError::invalid(
            peft::CONFIG_FILE,
            format!("adapter_config.json is not valid JSON: {e}"),
        )
    })?;
    if !c.is_object() {
        return Err(ServiceError::invalid(
            peft::CONFIG_FILE,
            "adapter_config.json must be a JSON object",
        ));
    }
    let base = engine.base()?;
    let tensors: HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load_buffer(weights, base.model.device()).map_err(|e| {
            ServiceError::invalid(
                peft::WEIGHTS_FILE,
                format!("adapter_model.safetensors cannot be read: {e}"),
            )
        })?;
    let adapter = peft::from_parts(&c, tensors, &base.model.cfg).map_err(|e| {
        let param = match e {
            peft::PeftError::Weights(_) | peft::PeftError::Mismatch(_) => peft::WEIGHTS_FILE,
            _ => peft::CONFIG_FILE,
        };
        ServiceError::invalid(param, format!("Invalid PEFT adapter: {e}"))
    })?;
    Ok((c, adapter))
}

/// Writes the two files as uploaded into the new directory `stage` (a hidden sibling of the
/// adapters' directories, removed at start if a crash left it), each fsynced (blocking).
fn stage_files(stage: &Path, config: &[u8], weights: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir(stage)?;
    for (name, bytes) in [(peft::CONFIG_FILE, config), (peft::WEIGHTS_FILE, weights)] {
        let mut f = std::fs::File::create(stage.join(name))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    Ok(())
}

/// Removes a staged directory that will not be installed (blocking, best effort).
async fn discard(stage: PathBuf) {
    let _ = blocking(move || std::fs::remove_dir_all(stage)).await;
}

/// Imports the `index.json` of an older version into the registry (names the registry does not
/// know yet; the database wins) and renames it [`INDEX_IMPORTED`], so it is read once.
fn import_index(root: &Path, registry: &dyn Registry) -> anyhow::Result<()> {
    let path = root.join(INDEX_FILE);
    let index: Index = match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    let n = index.adapters.len();
    // The registry's futures run on its own runtime: waiting here works on any thread.
    let added = futures::executor::block_on(registry.import_rows(index.adapters))
        .map_err(|e| anyhow::anyhow!("importing {} into the database: {e}", path.display()))?;
    std::fs::rename(&path, root.join(INDEX_IMPORTED))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    tracing::info!(
        names = n,
        added,
        "imported {} into the adapter registry (renamed {INDEX_IMPORTED})",
        path.display()
    );
    Ok(())
}

impl AdapterStore {
    /// Opens `<data_dir>/adapters` (creating it), with the registry in the data directory's
    /// SQLite file (queried on a runtime of the store's own). Call [`Self::restore`] to serve
    /// the stored adapters again once the model is loaded.
    pub fn open(
        data_dir: &Path,
        engine: EngineHandle,
        max_weights_bytes: u64,
    ) -> anyhow::Result<Self> {
        let blobs = super::storage::Storage::open(data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", data_dir.display()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("itamae-adapters-db")
            .enable_all()
            .build()?;
        let db = blobs.db_path();
        let store = rt
            .block_on(super::store::Store::open(&db))
            .map_err(|e| anyhow::anyhow!("cannot open the database {}: {e}", db.display()))?;
        let registry =
            super::registry_sqlite::SqliteRegistry::new(store.pool(), rt.handle().clone());
        Self::build(
            data_dir,
            engine,
            max_weights_bytes,
            Arc::new(blobs),
            Arc::new(registry),
            Some(OwnedRuntime(Some(rt))),
        )
    }

    /// As [`Self::open`], the adapters' bytes in `blobs` and their names in `registry` (the
    /// jobs' stores: [`Jobs::blobs`], [`Jobs::registry`]).
    pub fn open_on(
        data_dir: &Path,
        engine: EngineHandle,
        max_weights_bytes: u64,
        blobs: Arc<dyn BlobStore>,
        registry: Arc<dyn Registry>,
    ) -> anyhow::Result<Self> {
        Self::build(data_dir, engine, max_weights_bytes, blobs, registry, None)
    }

    fn build(
        data_dir: &Path,
        engine: EngineHandle,
        max_weights_bytes: u64,
        blobs: Arc<dyn BlobStore>,
        registry: Arc<dyn Registry>,
        rt: Option<OwnedRuntime>,
    ) -> anyhow::Result<Self> {
        let root = data_dir.join("adapters");
        std::fs::create_dir_all(&root)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", root.display()))?;
        import_index(&root, registry.as_ref())?;
        // Leftovers of a crash mid-write (atomic writes use dot-prefixed siblings).
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with('.') {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(p)
                    } else {
                        std::fs::remove_file(p)
                    };
                }
            }
        }
        let announcements = registry.announcements();
        let store = Self {
            inner: Arc::new(StoreInner {
                root,
                blobs,
                registry,
                engine,
                max_weights_bytes,
                served: Mutex::new(HashMap::new()),
                ops: tokio::sync::Mutex::new(()),
                _rt: rt,
            }),
        };
        store
            .inner
            .registry
            .runtime()
            .spawn(super::variant_sync::follow(
                Arc::downgrade(&store.inner),
                announcements,
            ));
        Ok(store)
    }

    /// The store of `inner` (for the announcements' follower, which holds it weakly).
    pub(super) fn from_inner(inner: Arc<StoreInner>) -> Self {
        Self { inner }
    }

    /// Serves every stored adapter marked to load (blocking: run it on a thread of its own; it
    /// waits for the engine's model).
    pub fn restore(&self) {
        if self.inner.engine.wait_loaded().is_err() {
            return;
        }
        let rows = match futures::executor::block_on(self.inner.registry.list()) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!("cannot read the adapter registry: {e}");
                return;
            }
        };
        for (name, r) in rows.into_iter().filter(|(_, r)| r.stored && r.load) {
            let dir = match self.inner.blobs.materialise_adapter(&name, r.generation) {
                Ok(Some(d)) => d,
                Ok(None) => {
                    tracing::warn!(adapter = %name, "cannot serve stored adapter: its files are gone");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(adapter = %name, "cannot fetch stored adapter: {e}");
                    continue;
                }
            };
            match self.load_from_disk(&name, &dir) {
                Ok(_) => {
                    self.set_served(&name, Some(r.generation));
                    tracing::info!(adapter = %name, "serving stored adapter")
                }
                Err(e) => tracing::warn!(adapter = %name, "cannot serve stored adapter: {e}"),
            }
        }
    }

    /// The largest `adapter_model.safetensors` an import may send.
    pub fn max_weights_bytes(&self) -> u64 {
        self.inner.max_weights_bytes
    }

    /// Records the generation of the imported adapter `name` this process serves (None: it
    /// serves none of it any more).
    pub(super) fn set_served(&self, name: &str, generation: Option<u64>) {
        let mut m = self.inner.served.lock().unwrap_or_else(|e| e.into_inner());
        match generation {
            Some(g) => m.insert(name.to_string(), g),
            None => m.remove(name),
        };
    }

    /// The imported adapters this process serves, with their generations.
    pub(super) fn served_generations(&self) -> HashMap<String, u64> {
        self.inner
            .served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn engine(&self) -> &EngineHandle {
        &self.inner.engine
    }

    pub(super) fn registry(&self) -> &Arc<dyn Registry> {
        &self.inner.registry
    }

    /// Stops serving `name` here (requests running on it keep their weights); what a replica
    /// does when another one replaced or deleted it.
    pub(super) fn drop_served(&self, name: &str) {
        self.set_served(name, None);
        match self.inner.engine.remove_adapter(name) {
            Ok(true) => crate::metrics::global().adapter_evicted(),
            Ok(false) => {}
            Err(e) => tracing::warn!(adapter = %name, "cannot stop serving: {e}"),
        }
    }

    /// The local directory of an imported adapter's files. Callers pass validated names only.
    fn dir(&self, name: &str) -> PathBuf {
        self.inner.blobs.local_adapter_dir(name)
    }

    /// [`Self::locate`], with the files materialised locally (another replica may have written
    /// them): what loading and reading need, with the generation of an imported adapter.
    async fn fetch(
        &self,
        jobs: Option<&Jobs>,
        name: &str,
    ) -> ServiceResult<Option<(PathBuf, Option<u64>)>> {
        if let Some(r) = self.record(name).await?.filter(|r| r.stored) {
            let (blobs, n, g) = (self.inner.blobs.clone(), name.to_string(), r.generation);
            return Ok(blocking(move || blobs.materialise_adapter(&n, g))
                .await?
                .map_err(|e| io_err(&format!("Cannot fetch adapter `{name}`"), e))?
                .map(|d| (d, Some(r.generation))));
        }
        match jobs {
            Some(j) if name.starts_with(JOB_PREFIX) => {
                Ok(j.materialise_variant(name).await?.map(|(_, d)| (d, None)))
            }
            _ => Ok(None),
        }
    }

    /// The registry's row of `name` (tombstones included).
    async fn record(&self, name: &str) -> ServiceResult<Option<Record>> {
        Ok(self.inner.registry.get(name).await?)
    }

    /// Served (listed as a model), whether loaded or evicted by the memory budget.
    fn is_served(&self, name: &str) -> bool {
        self.inner.engine.is_served(name)
    }

    /// Reads a PEFT directory and serves it as `name` (blocking). Returns the load time.
    fn load_from_disk(&self, name: &str, dir: &Path) -> ServiceResult<f64> {
        let started = Instant::now();
        let engine = &self.inner.engine;
        let base = engine.base()?;
        let adapter = peft::load(dir, &base.model.cfg, base.model.device())
            .map_err(|e| ServiceError::Internal(format!("Cannot load adapter `{name}`: {e}")))?;
        let was = self.is_served(name);
        engine.add_adapter_from(name, adapter, dir)?;
        let secs = started.elapsed().as_secs_f64();
        let m = crate::metrics::global();
        m.adapter_loaded(name, secs);
        if was {
            m.adapter_swapped(name);
        }
        Ok(secs)
    }

    /// Where the files of `name` are: an imported adapter, or (through `jobs`) a fine-tuning
    /// job's result or checkpoint.
    async fn locate(
        &self,
        jobs: Option<&Jobs>,
        name: &str,
    ) -> ServiceResult<Option<(Source, PathBuf)>> {
        match self.record(name).await? {
            Some(r) if r.stored => return Ok(Some((Source::Imported(r), self.dir(name)))),
            // The tombstone of a deleted job variant: its job still names it, but it is gone.
            Some(_) if name.starts_with(JOB_PREFIX) => return Ok(None),
            _ => {}
        }
        let Some(jobs) = jobs.filter(|_| name.starts_with(JOB_PREFIX)) else {
            return Ok(None);
        };
        Ok(jobs.variant_files(name).await.map(|(job_id, dir)| {
            (
                Source::Job {
                    job_id,
                    dir: dir.clone(),
                },
                dir,
            )
        }))
    }

    /// Imported adapters (resident or not) and every served variant, by id.
    pub async fn list(&self, jobs: Option<&Jobs>) -> ServiceResult<Vec<AdapterInfo>> {
        let models = self.inner.engine.models();
        let base = models.first().map(|c| c.id.clone());
        let mut out: BTreeMap<String, AdapterInfo> = BTreeMap::new();
        let rows = self.inner.registry.list().await?;
        for (name, r) in rows.into_iter().filter(|(_, r)| r.stored) {
            let resident = models.iter().any(|c| c.id == name && c.resident);
            out.insert(
                name.clone(),
                info(
                    &name,
                    Some(&Source::Imported(r)),
                    None,
                    resident,
                    base.as_deref(),
                ),
            );
        }
        for c in models.iter().filter(|c| c.parent.is_some()) {
            if out.contains_key(&c.id) {
                continue;
            }
            let source = self.locate(jobs, &c.id).await?.map(|(s, _)| s);
            out.insert(
                c.id.clone(),
                info(
                    &c.id,
                    source.as_ref(),
                    c.adapter_type.as_deref(),
                    c.resident,
                    c.parent.as_deref(),
                ),
            );
        }
        Ok(out.into_values().collect())
    }

    /// The adapter or servable variant `id` (a valid name).
    pub async fn describe(&self, jobs: Option<&Jobs>, id: &str) -> ServiceResult<AdapterInfo> {
        let models = self.inner.engine.models();
        let card = models.iter().find(|c| c.id == id && c.parent.is_some());
        let source = self.locate(jobs, id).await?.map(|(s, _)| s);
        if card.is_none() && source.is_none() {
            return Err(ServiceError::AdapterNotFound(id.into()));
        }
        Ok(info(
            id,
            source.as_ref(),
            card.and_then(|c| c.adapter_type.as_deref()),
            card.is_some_and(|c| c.resident),
            models.first().map(|c| c.id.as_str()),
        ))
    }

    /// Imports (or replaces) an adapter and serves it at once. The flag is true when the name
    /// was new (no stored adapter had it).
    pub async fn import(&self, u: Import) -> ServiceResult<(AdapterInfo, bool)> {
        let Import {
            name,
            config,
            weights,
            if_generation,
        } = u;
        let engine = self.inner.engine.clone();
        if !engine.is_ready() {
            return Err(ServiceError::NotReady("The model is still loading".into()));
        }
        // Checked before anything is written: the engine would refuse it only after the files are.
        if engine.models().first().is_some_and(|c| c.id == name) {
            return Err(ServiceError::invalid(
                "name",
                format!("`{name}` is the base model's id"),
            ));
        }
        let started = Instant::now();
        let size = (config.len() + weights.len()) as u64;
        // Parsing and writing the files (fsync) are the two slow parts of a swap: they run at
        // once, the files into a staging directory that is moved into place only after the
        // compare-and-set below.
        let (config, weights) = (Arc::new(config), Arc::new(weights));
        let local = self.dir(&name);
        let stage = local
            .parent()
            .unwrap_or(&self.inner.root)
            .join(format!(".stage-{:016x}", rand::random::<u64>()));
        if let Some(p) = stage.parent() {
            std::fs::create_dir_all(p).map_err(|e| io_err("Cannot store the adapter", e))?;
        }
        let parse = {
            let (c, w) = (config.clone(), weights.clone());
            blocking(move || parse_adapter(&c, &w, &engine))
        };
        let write = {
            let (c, w, st) = (config, weights, stage.clone());
            blocking(move || stage_files(&st, &c, &w))
        };
        let (parsed, written) = futures::join!(parse, write);
        let staged_ms = started.elapsed().as_millis() as u64;
        let adapter = match (parsed, written) {
            (Ok(Ok((_, adapter))), Ok(Ok(()))) => adapter,
            (parsed, written) => {
                discard(stage).await;
                parsed??;
                written?.map_err(|e| io_err("Cannot store the adapter", e))?;
                return Err(ServiceError::Internal("Cannot store the adapter".into()));
            }
        };
        let kind = adapter.kind().to_string();
        let _guard = self.inner.ops.lock().await;
        // The compare-and-set is the database's: from here until the commit the name is held
        // (on every replica, with PostgreSQL), so the bytes published below are the ones of the
        // generation the commit records.
        let tx = match self.inner.registry.begin_import(&name, if_generation).await {
            Ok(Ok(tx)) => tx,
            Ok(Err(Mismatch(current))) => {
                discard(stage).await;
                let want = if_generation.unwrap_or_default();
                return Err(ServiceError::GenerationMismatch(format!(
                    "Adapter `{name}` is at generation {current}, not {want}"
                )));
            }
            Err(e) => {
                discard(stage).await;
                return Err(e.into());
            }
        };
        let (generation, created) = (tx.generation(), tx.op() == Op::Import);
        {
            let (st, blobs, n) = (stage.clone(), self.inner.blobs.clone(), name.clone());
            // Published as this generation: if this replica dies before the commit, the store
            // still holds the committed generation's bytes for every other replica.
            let installed = blocking(move || {
                crate::durable::install_dir(&st, &local)?;
                blobs.publish_adapter(&n, generation)
            })
            .await?;
            if let Err(e) = installed {
                discard(stage).await;
                return Err(io_err("Cannot store the adapter", e));
            }
        }
        let was = self.is_served(&name);
        // The commit announces the new generation, and this replica hears its own announcement
        // (in-process with SQLite, NOTIFY with PostgreSQL) possibly before the load below: it
        // must already say this generation is the one served here, or the listener would take
        // the old one for stale and drop the name mid-import.
        let previous = self.served_generations().get(&name).copied();
        self.set_served(&name, Some(generation));
        let record = match tx.commit(kind, size, super::storage::now()).await {
            Ok(r) => r,
            Err(e) => {
                self.set_served(&name, previous);
                return Err(io_err("Cannot record the adapter", e));
            }
        };
        self.inner
            .engine
            .add_adapter_from(&name, adapter, &self.dir(&name))?;
        let m = crate::metrics::global();
        m.adapter_loaded(&name, started.elapsed().as_secs_f64());
        if was {
            m.adapter_swapped(&name);
        }
        tracing::info!(
            adapter = %name,
            generation,
            bytes = size,
            staged_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "adapter imported"
        );
        let base = self.inner.engine.models().first().map(|c| c.id.clone());
        Ok((
            info(
                &name,
                Some(&Source::Imported(record)),
                None,
                true,
                base.as_deref(),
            ),
            created,
        ))
    }

    /// Serves a stored adapter or variant (a no-op if it is resident).
    pub async fn load(&self, jobs: Option<&Jobs>, id: &str) -> ServiceResult<AdapterInfo> {
        let _guard = self.inner.ops.lock().await;
        if self.is_served(id) {
            // Served but maybe evicted by the memory budget: read it back now.
            let (engine, name) = (self.inner.engine.clone(), id.to_string());
            blocking(move || engine.make_resident(&name)).await??;
        } else {
            let (dir, generation) = self
                .fetch(jobs, id)
                .await?
                .ok_or_else(|| ServiceError::AdapterNotFound(id.into()))?;
            let (s, name) = (self.clone(), id.to_string());
            blocking(move || s.load_from_disk(&name, &dir)).await??;
            if generation.is_some() {
                self.set_served(id, generation);
            }
            tracing::info!(adapter = %id, generation, "adapter loaded");
        }
        self.inner.registry.set_load(id, true).await?;
        self.describe(jobs, id).await
    }

    /// Serves `id` if it is stored but not served here yet, fetching its files, so the request
    /// naming it is answered instead of a 404: an imported adapter marked to load (imported or
    /// replaced by another replica, whose announcement made this one drop an older
    /// generation), or, with a shared blob store (`storage.objects`), a job variant another
    /// replica wrote. With the local data directory every job variant is served from the
    /// start, and an explicitly unloaded one must stay unloaded: nothing happens. False if
    /// nothing servable is stored under `id`.
    pub async fn serve_on_demand(&self, jobs: Option<&Jobs>, id: &str) -> bool {
        if self.is_served(id) {
            return true;
        }
        let imported = match self.record(id).await {
            Ok(r) => r.is_some_and(|r| r.stored && r.load),
            Err(e) => {
                tracing::warn!(model = %id, "cannot read the adapter registry: {e}");
                return false;
            }
        };
        let shared_variant = self.inner.blobs.shared() && id.starts_with(JOB_PREFIX);
        if !(imported || shared_variant) {
            return false;
        }
        match self.load(jobs, id).await {
            Ok(_) => {
                tracing::info!(model = %id, "served on its first request");
                true
            }
            Err(ServiceError::AdapterNotFound(_)) => false,
            Err(e) => {
                tracing::warn!(model = %id, "cannot serve on demand: {e}");
                false
            }
        }
    }

    /// Stops serving it; running requests finish on it. None: it was a runtime-only variant
    /// (e.g. `--adapter`), gone entirely once unloaded.
    pub async fn unload(
        &self,
        jobs: Option<&Jobs>,
        id: &str,
    ) -> ServiceResult<Option<AdapterInfo>> {
        let _guard = self.inner.ops.lock().await;
        let stored = self.locate(jobs, id).await?.is_some();
        let removed = self.inner.engine.remove_adapter(id)?;
        self.set_served(id, None);
        if !removed && !stored {
            return Err(ServiceError::AdapterNotFound(id.into()));
        }
        if removed {
            crate::metrics::global().adapter_evicted();
            tracing::info!(adapter = %id, "adapter unloaded");
        }
        self.inner.registry.set_load(id, false).await?;
        if stored {
            Ok(Some(self.describe(jobs, id).await?))
        } else {
            Ok(None)
        }
    }

    /// Unloads and deletes an imported adapter (a job's variant is deleted through
    /// [`Self::delete_model`]).
    pub async fn delete(&self, jobs: Option<&Jobs>, id: &str) -> ServiceResult<()> {
        let _guard = self.inner.ops.lock().await;
        match self.locate(jobs, id).await? {
            Some((Source::Imported(_), _)) => {}
            Some((Source::Job { job_id, .. }, _)) => {
                return Err(ServiceError::invalid(
                    "id",
                    format!(
                        "`{id}` belongs to fine-tuning job {job_id}: unload it, or delete it \
                         with DELETE /v1/models/{id}"
                    ),
                ))
            }
            None => return Err(ServiceError::AdapterNotFound(id.into())),
        }
        self.drop_served(id);
        // The bytes go before the registry's row: an import of the same name racing this on
        // another replica then ends deleted (as if it came first), never stored without bytes.
        // Renamed out of the way first (durable::remove_dir), so the name is free at once even
        // if removal is slow.
        let (blobs, name) = (self.inner.blobs.clone(), id.to_string());
        blocking(move || {
            if let Err(e) = blobs.delete_adapter(&name) {
                tracing::warn!(adapter = %name, "cannot remove a deleted adapter: {e}");
            }
        })
        .await?;
        // Announced to every replica, which stop serving it.
        let deleted = self.inner.registry.delete(id).await?;
        tracing::info!(adapter = %id, generation = deleted.map(|r| r.generation), "adapter deleted");
        Ok(())
    }

    /// `DELETE /v1/models/{id}` for anything but the base model (the caller refuses that): an
    /// imported adapter is deleted as [`Self::delete`] does; a fine-tuning job's result or
    /// checkpoint stops being served at once (requests already running keep the weights they
    /// started with, so they finish) and its files are removed through the jobs' blob store
    /// ([`BlobStore::delete_job_dir`]), so a crash leaves them whole or gone. The job's
    /// record stays (its `fine_tuned_model` still names the deleted model).
    pub async fn delete_model(&self, jobs: Option<&Jobs>, id: &str) -> ServiceResult<()> {
        if self.record(id).await?.is_some_and(|r| r.stored) {
            return self.delete(jobs, id).await;
        }
        let _guard = self.inner.ops.lock().await;
        let job_id = match jobs {
            Some(j) if id.starts_with(JOB_PREFIX) => j.variant_files(id).await.map(|(j, _)| j),
            _ => None,
        };
        // A result whose files are gone was deleted before: its job still names it. The files
        // go first (marker first in an object store), so a crash leaves them whole or gone.
        let deleted = match (jobs, &job_id) {
            (Some(j), Some(_)) => j.delete_variant_files(id).await?,
            _ => false,
        };
        let (true, Some(job_id)) = (deleted, job_id) else {
            if self.is_served(id) {
                return Err(ServiceError::Forbidden(format!(
                    "`{id}` is served from memory only (given on the command line), so there is \
                     nothing to delete; stop serving it with POST /v1/adapters/{id}/unload"
                )));
            }
            return Err(ServiceError::ModelNotFound {
                model: id.into(),
                message: format!("The model `{id}` does not exist"),
            });
        };
        if self.inner.engine.remove_adapter(id)? {
            crate::metrics::global().adapter_evicted();
        }
        // A tombstone, announced: every replica stops serving it.
        self.inner.registry.delete_variant(id).await?;
        tracing::info!(model = %id, job = %job_id, "fine-tuned model deleted");
        Ok(())
    }

    /// The bytes of `file` (`adapter_config.json` or `adapter_model.safetensors`) of `id`.
    pub async fn read_file(
        &self,
        jobs: Option<&Jobs>,
        id: &str,
        file: &'static str,
    ) -> ServiceResult<Vec<u8>> {
        let (dir, _) = self
            .fetch(jobs, id)
            .await?
            .ok_or_else(|| ServiceError::AdapterNotFound(id.into()))?;
        let p = dir.join(file);
        blocking(move || std::fs::read(p))
            .await?
            .map_err(|e| ServiceError::NotFound(format!("The file {file} of {id} is gone: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "my-adapter_v1.2",
            "org:name:v3",
            "A.b-c_d:e",
            &"x".repeat(128),
        ] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "..",
            "a..b",
            "../etc",
            "a/b",
            "a\\b",
            "a b",
            "é",
            "a%2e",
            "a\0b",
            &"x".repeat(129),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn an_old_index_is_imported_once_and_set_aside() {
        let dir = std::env::temp_dir().join(format!("itamae-index-{:016x}", rand::random::<u64>()));
        let root = dir.join("adapters");
        std::fs::create_dir_all(&root).unwrap();
        let old = r#"{"adapters":{"a":{"generation":3,"stored":true,"type":"lora",
            "size_bytes":10,"created_at":1,"load":false},
            "gone":{"generation":2,"stored":false,"type":"lora","size_bytes":1,"created_at":1,
            "load":false}}}"#;
        std::fs::write(root.join(INDEX_FILE), old).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let store = rt
            .block_on(super::super::store::Store::open(&dir.join("itamae.db")))
            .unwrap();
        let reg =
            super::super::registry_sqlite::SqliteRegistry::new(store.pool(), rt.handle().clone());
        import_index(&root, &reg).unwrap();
        assert!(!root.join(INDEX_FILE).exists());
        assert!(root.join(INDEX_IMPORTED).exists());
        let rows = futures::executor::block_on(reg.list()).unwrap();
        assert_eq!(rows["a"].generation, 3);
        assert!(rows["a"].stored && !rows["a"].load);
        assert_eq!(rows["gone"].generation, 2);
        assert!(!rows["gone"].stored);
        // a second file (an older daemon run again) never overrides what the database has
        std::fs::write(
            root.join(INDEX_FILE),
            old.replace("\"generation\":3", "\"generation\":1"),
        )
        .unwrap();
        import_index(&root, &reg).unwrap();
        assert_eq!(
            futures::executor::block_on(reg.get("a"))
                .unwrap()
                .unwrap()
                .generation,
            3
        );
        drop(store);
        rt.shutdown_background();
        let _ = std::fs::remove_dir_all(dir);
    }
}
