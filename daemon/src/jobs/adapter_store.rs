//! The adapter store: PEFT adapters imported over the API, and load/unload of every servable
//! variant (imported ones and fine-tuning jobs' results and checkpoints). A service beside
//! [`super::Jobs`] (it finds jobs' variants through it), below the HTTP handlers of
//! `/v1/adapters`, which only parse the request, call it and render what it returns.
//!
//! Owns `<data>/adapters/index.json` (per-name generation, type, size, whether it should be
//! resident; replaced atomically). The adapters' bytes (`adapter_config.json` +
//! `adapter_model.safetensors`, as uploaded) go through the jobs' [`BlobStore`]: installed
//! atomically in its local directory for the name, then published (to the object store when
//! `storage.objects` names one, so another replica can materialise and serve them).
//!
//! Generations: each successful import of a name bumps its generation (kept across deletes, so a
//! re-created name never reuses an old number). `if_generation` on import is a compare-and-set:
//! the current generation (0 = "must not exist") or [`ServiceError::GenerationMismatch`].
//! Requests already running keep the `Arc<Adapter>` they started with (the engine's contract),
//! so a replace never disturbs them.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::backend::BlobStore;
use super::{Jobs, ServiceError, ServiceResult};
use crate::adapters::{peft, Adapter};
use crate::engine::EngineHandle;

/// Longest accepted `adapter_config.json`.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Default limit of `adapter_model.safetensors` (the daemon passes the upload limit).
pub const DEFAULT_MAX_WEIGHTS_BYTES: u64 = 512 << 20;
/// Names of this prefix belong to fine-tuning jobs.
pub const JOB_PREFIX: &str = "ft:";
const INDEX_FILE: &str = "index.json";

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

/// One imported name in `index.json`.
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

struct StoreInner {
    root: PathBuf,
    /// Where the adapters' bytes live (the index stays under `root`).
    blobs: Arc<dyn BlobStore>,
    engine: EngineHandle,
    max_weights_bytes: u64,
    index: Mutex<Index>,
    /// Serialises mutations (import, delete, load, unload) so a compare-and-set and the writes
    /// that follow it are one step.
    ops: tokio::sync::Mutex<()>,
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

impl AdapterStore {
    /// Opens `<data_dir>/adapters` (creating it) and its index. Call [`Self::restore`] to serve
    /// the stored adapters again once the model is loaded.
    pub fn open(
        data_dir: &Path,
        engine: EngineHandle,
        max_weights_bytes: u64,
    ) -> anyhow::Result<Self> {
        let blobs = super::storage::Storage::open(data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", data_dir.display()))?;
        Self::open_on(data_dir, engine, max_weights_bytes, Arc::new(blobs))
    }

    /// As [`Self::open`], the adapters' bytes in `blobs` (the jobs' store: [`Jobs::blobs`]).
    pub fn open_on(
        data_dir: &Path,
        engine: EngineHandle,
        max_weights_bytes: u64,
        blobs: Arc<dyn BlobStore>,
    ) -> anyhow::Result<Self> {
        let root = data_dir.join("adapters");
        std::fs::create_dir_all(&root)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", root.display()))?;
        let index = match std::fs::read(root.join(INDEX_FILE)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{}: {e}", root.join(INDEX_FILE).display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index::default(),
            Err(e) => anyhow::bail!("{}: {e}", root.join(INDEX_FILE).display()),
        };
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
        Ok(Self {
            inner: Arc::new(StoreInner {
                root,
                blobs,
                engine,
                max_weights_bytes,
                index: Mutex::new(index),
                ops: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Serves every stored adapter marked to load (blocking: run it on a thread of its own; it
    /// waits for the engine's model).
    pub fn restore(&self) {
        if self.inner.engine.wait_loaded().is_err() {
            return;
        }
        let names: Vec<String> = self
            .index()
            .adapters
            .iter()
            .filter(|(_, r)| r.stored && r.load)
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let dir = match self.inner.blobs.materialise_adapter(&name) {
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
                Ok(_) => tracing::info!(adapter = %name, "serving stored adapter"),
                Err(e) => tracing::warn!(adapter = %name, "cannot serve stored adapter: {e}"),
            }
        }
    }

    /// The largest `adapter_model.safetensors` an import may send.
    pub fn max_weights_bytes(&self) -> u64 {
        self.inner.max_weights_bytes
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.inner.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The local directory of an imported adapter's files. Callers pass validated names only.
    fn dir(&self, name: &str) -> PathBuf {
        self.inner.blobs.local_adapter_dir(name)
    }

    /// [`Self::locate`], with the files materialised locally (another replica may have written
    /// them): what loading and reading need.
    async fn fetch(&self, jobs: Option<&Jobs>, name: &str) -> ServiceResult<Option<PathBuf>> {
        if self.record(name).is_some_and(|r| r.stored) {
            let (blobs, n) = (self.inner.blobs.clone(), name.to_string());
            return blocking(move || blobs.materialise_adapter(&n))
                .await?
                .map_err(|e| io_err(&format!("Cannot fetch adapter `{name}`"), e));
        }
        match jobs {
            Some(j) if name.starts_with(JOB_PREFIX) => {
                Ok(j.materialise_variant(name).await?.map(|(_, d)| d))
            }
            _ => Ok(None),
        }
    }

    fn record(&self, name: &str) -> Option<Record> {
        self.index().adapters.get(name).cloned()
    }

    /// Writes the index durably (a temporary file renamed over the old one).
    fn save_index(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&*self.index()).map_err(std::io::Error::other)?;
        crate::durable::write_file(&self.inner.root.join(INDEX_FILE), &bytes)
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut Record)) -> ServiceResult<()> {
        if let Some(r) = self.index().adapters.get_mut(name) {
            f(r);
        }
        self.save_index()
            .map_err(|e| io_err("Cannot write the adapters index", e))
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
    async fn locate(&self, jobs: Option<&Jobs>, name: &str) -> Option<(Source, PathBuf)> {
        if let Some(r) = self.record(name).filter(|r| r.stored) {
            return Some((Source::Imported(r), self.dir(name)));
        }
        if !name.starts_with(JOB_PREFIX) {
            return None;
        }
        let (job_id, dir) = jobs?.variant_files(name).await?;
        Some((
            Source::Job {
                job_id,
                dir: dir.clone(),
            },
            dir,
        ))
    }

    /// Imported adapters (resident or not) and every served variant, by id.
    pub async fn list(&self, jobs: Option<&Jobs>) -> Vec<AdapterInfo> {
        let models = self.inner.engine.models();
        let base = models.first().map(|c| c.id.clone());
        let mut out: BTreeMap<String, AdapterInfo> = BTreeMap::new();
        let records: Vec<(String, Record)> = self
            .index()
            .adapters
            .iter()
            .filter(|(_, r)| r.stored)
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        for (name, r) in records {
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
            let source = self.locate(jobs, &c.id).await.map(|(s, _)| s);
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
        out.into_values().collect()
    }

    /// The adapter or servable variant `id` (a valid name).
    pub async fn describe(&self, jobs: Option<&Jobs>, id: &str) -> ServiceResult<AdapterInfo> {
        let models = self.inner.engine.models();
        let card = models.iter().find(|c| c.id == id && c.parent.is_some());
        let source = self.locate(jobs, id).await.map(|(s, _)| s);
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
        let current = self.record(&name);
        let current_gen = current
            .as_ref()
            .filter(|r| r.stored)
            .map_or(0, |r| r.generation);
        if let Some(want) = if_generation {
            if want != current_gen {
                discard(stage).await;
                return Err(ServiceError::GenerationMismatch(format!(
                    "Adapter `{name}` is at generation {current_gen}, not {want}"
                )));
            }
        }
        {
            let (st, blobs, n) = (stage.clone(), self.inner.blobs.clone(), name.clone());
            let installed = blocking(move || {
                crate::durable::install_dir(&st, &local)?;
                blobs.publish_adapter(&n)
            })
            .await?;
            if let Err(e) = installed {
                discard(stage).await;
                return Err(io_err("Cannot store the adapter", e));
            }
        }
        // Monotonic across deletes: a re-created name continues from its last generation.
        let generation = current.as_ref().map_or(0, |r| r.generation) + 1;
        let record = Record {
            generation,
            stored: true,
            kind,
            size_bytes: size,
            created_at: super::storage::now(),
            load: true,
        };
        self.index().adapters.insert(name.clone(), record.clone());
        self.save_index()
            .map_err(|e| io_err("Cannot write the adapters index", e))?;
        let was = self.is_served(&name);
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
        let created = current_gen == 0;
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
            let dir = self
                .fetch(jobs, id)
                .await?
                .ok_or_else(|| ServiceError::AdapterNotFound(id.into()))?;
            let (s, name) = (self.clone(), id.to_string());
            blocking(move || s.load_from_disk(&name, &dir)).await??;
            tracing::info!(adapter = %id, "adapter loaded");
        }
        if self.record(id).is_some_and(|r| r.stored) {
            self.update(id, |r| r.load = true)?;
        }
        self.describe(jobs, id).await
    }

    /// With a shared blob store (`storage.objects`): serves `id` if it is stored but not served
    /// here yet — an adapter or job variant another replica wrote — fetching its files, so the
    /// request naming it is answered instead of a 404. False if nothing is stored under `id`.
    /// With the local data directory everything stored is served from the start, and an
    /// explicitly unloaded variant must stay unloaded: nothing happens.
    pub async fn serve_on_demand(&self, jobs: Option<&Jobs>, id: &str) -> bool {
        if self.is_served(id) {
            return true;
        }
        if !self.inner.blobs.shared() {
            return false;
        }
        let imported = self.record(id).is_some_and(|r| r.stored && r.load);
        if !imported && !id.starts_with(JOB_PREFIX) {
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
        let stored = self.locate(jobs, id).await.is_some();
        let removed = self.inner.engine.remove_adapter(id)?;
        if !removed && !stored {
            return Err(ServiceError::AdapterNotFound(id.into()));
        }
        if removed {
            crate::metrics::global().adapter_evicted();
            tracing::info!(adapter = %id, "adapter unloaded");
        }
        if self.record(id).is_some_and(|r| r.stored) {
            self.update(id, |r| r.load = false)?;
        }
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
        match self.locate(jobs, id).await {
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
        if self.inner.engine.remove_adapter(id)? {
            crate::metrics::global().adapter_evicted();
        }
        self.update(id, |r| {
            r.stored = false;
            r.load = false;
        })?;
        // Renamed out of the way first (durable::remove_dir), so the name is free at once even
        // if removal is slow.
        let (blobs, name) = (self.inner.blobs.clone(), id.to_string());
        blocking(move || {
            if let Err(e) = blobs.delete_adapter(&name) {
                tracing::warn!(adapter = %name, "cannot remove a deleted adapter: {e}");
            }
        })
        .await?;
        tracing::info!(adapter = %id, "adapter deleted");
        Ok(())
    }

    /// `DELETE /v1/models/{id}` for anything but the base model (the caller refuses that): an
    /// imported adapter is deleted as [`Self::delete`] does; a fine-tuning job's result or
    /// checkpoint stops being served at once (requests already running keep the weights they
    /// started with, so they finish) and its files are removed through the jobs' blob store
    /// ([`BlobStore::delete_job_dir`]), so a crash leaves them whole or gone. The job's
    /// record stays (its `fine_tuned_model` still names the deleted model).
    pub async fn delete_model(&self, jobs: Option<&Jobs>, id: &str) -> ServiceResult<()> {
        if self.record(id).is_some_and(|r| r.stored) {
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
        let dir = self
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
    fn index_round_trips() {
        let mut ix = Index::default();
        ix.adapters.insert(
            "a".into(),
            Record {
                generation: 3,
                stored: true,
                kind: "lora".into(),
                size_bytes: 10,
                created_at: 1,
                load: false,
            },
        );
        let s = serde_json::to_string(&ix).unwrap();
        assert!(s.contains("\"type\":\"lora\""));
        let back: Index = serde_json::from_str(&s).unwrap();
        assert_eq!(back.adapters["a"], ix.adapters["a"]);
    }
}
