//! `/v1/adapters`: PEFT adapters imported over the API, and load/unload/download of every
//! servable variant (imported ones and fine-tuning jobs' results and checkpoints).
//!
//! Owns `<data>/adapters/`: one directory per imported adapter (`<name>/adapter_config.json` +
//! `adapter_model.safetensors`, the uploaded bytes as sent, written atomically) and `index.json`
//! (per-name generation, type, size, whether it should be resident; replaced atomically).
//!
//! Generations: each successful import of a name bumps its generation (kept across deletes, so a
//! re-created name never reuses an old number). `if_generation` on import is a compare-and-set:
//! the current generation (0 = "must not exist") or 409. Requests already running keep the
//! `Arc<Adapter>` they started with (the engine's contract), so a replace never disturbs them.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix_multipart::Multipart;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::{ApiError, INVALID_REQUEST};
use super::handlers::method_not_allowed;
use crate::adapters::{peft, Adapter};
use crate::engine::EngineHandle;
use crate::jobs::Jobs;

/// Longest accepted `adapter_config.json`.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Default limit of `adapter_model.safetensors` (the daemon passes the upload limit).
pub const DEFAULT_MAX_WEIGHTS_BYTES: u64 = 512 << 20;
/// Names of this prefix belong to fine-tuning jobs.
pub const JOB_PREFIX: &str = "ft:";
const INDEX_FILE: &str = "index.json";

pub fn configure(cfg: &mut web::ServiceConfig) {
    fn resource(path: &str) -> actix_web::Resource {
        web::resource(path).default_service(web::to(method_not_allowed))
    }
    cfg.service(
        resource("/v1/adapters")
            .route(web::get().to(list))
            .route(web::post().to(import)),
    )
    .service(
        resource("/v1/adapters/{id}")
            .route(web::get().to(retrieve))
            .route(web::delete().to(delete)),
    )
    .service(resource("/v1/adapters/{id}/load").route(web::post().to(load)))
    .service(resource("/v1/adapters/{id}/unload").route(web::post().to(unload)))
    .service(resource("/v1/adapters/{id}/files/{name}").route(web::get().to(download)));
}

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

fn check_name(name: &str) -> Result<&str, ApiError> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(ApiError::invalid(
            "id",
            format!(
                "Invalid adapter name `{}`: use 1 to 128 of A-Z a-z 0-9 . _ : -, not starting with `.` and without `..`",
                name.chars().take(200).collect::<String>()
            ),
        ))
    }
}

fn conflict(message: String) -> ApiError {
    ApiError {
        status: StatusCode::CONFLICT,
        message,
        kind: INVALID_REQUEST,
        param: Some("if_generation".into()),
        code: Some("generation_mismatch"),
    }
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

/// The imported adapters; registered as app data. Cheap to clone.
#[derive(Clone)]
pub struct AdapterStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    root: PathBuf,
    engine: EngineHandle,
    max_weights_bytes: u64,
    index: Mutex<Index>,
    /// Serialises mutations (import, delete, load, unload) so a compare-and-set and the writes
    /// that follow it are one step.
    ops: tokio::sync::Mutex<()>,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("{what}: {e}"))
}

impl AdapterStore {
    /// Opens `<data_dir>/adapters` (creating it) and its index. Call [`Self::restore`] to serve
    /// the stored adapters again once the model is loaded.
    pub fn open(
        data_dir: &Path,
        engine: EngineHandle,
        max_weights_bytes: u64,
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
            match self.load_from_disk(&name, &self.dir(&name)) {
                Ok(_) => tracing::info!(adapter = %name, "serving stored adapter"),
                Err(e) => tracing::warn!(adapter = %name, "cannot serve stored adapter: {e}"),
            }
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.inner.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Callers pass validated names only.
    fn dir(&self, name: &str) -> PathBuf {
        self.inner.root.join(name)
    }

    fn record(&self, name: &str) -> Option<Record> {
        self.index().adapters.get(name).cloned()
    }

    /// Writes the index to a temporary file, fsyncs it and renames it over the old one.
    fn save_index(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&*self.index()).map_err(std::io::Error::other)?;
        let tmp = self
            .inner
            .root
            .join(format!(".{INDEX_FILE}.tmp-{:016x}", rand::random::<u64>()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, self.inner.root.join(INDEX_FILE))?;
        if let Ok(d) = std::fs::File::open(&self.inner.root) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut Record)) -> Result<(), ApiError> {
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
    fn load_from_disk(&self, name: &str, dir: &Path) -> Result<f64, ApiError> {
        let started = Instant::now();
        let engine = &self.inner.engine;
        let base = engine.base()?;
        let adapter = peft::load(dir, &base.model.cfg, base.model.device())
            .map_err(|e| ApiError::internal(format!("Cannot load adapter `{name}`: {e}")))?;
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
}

fn store_of(req: &HttpRequest) -> Result<AdapterStore, ApiError> {
    req.app_data::<web::Data<AdapterStore>>()
        .map(|d| d.get_ref().clone())
        .ok_or_else(|| ApiError::unavailable("Adapters are not available on this server"))
}

/// Where a servable variant's PEFT files are: an imported adapter's directory, or a fine-tuning
/// job's result or checkpoint.
#[derive(Debug, Clone)]
enum Source {
    Imported(Record),
    Job { job_id: String, dir: PathBuf },
}

async fn locate(req: &HttpRequest, store: &AdapterStore, name: &str) -> Option<(Source, PathBuf)> {
    if let Some(r) = store.record(name).filter(|r| r.stored) {
        return Some((Source::Imported(r), store.dir(name)));
    }
    if !name.starts_with(JOB_PREFIX) {
        return None;
    }
    let jobs = req.app_data::<web::Data<Jobs>>()?;
    let st = jobs.store();
    // Checkpoints first: their names extend the job's result name.
    if let Ok(cks) = st.all_checkpoints().await {
        if let Some(c) = cks.into_iter().find(|c| c.model == name) {
            let dir = jobs
                .storage()
                .checkpoint_dir(&c.job_id, c.step.max(0) as usize);
            return Some((
                Source::Job {
                    job_id: c.job_id,
                    dir: dir.clone(),
                },
                dir,
            ));
        }
    }
    let done = st
        .jobs_with_status(&[crate::jobs::store::status::SUCCEEDED])
        .await
        .ok()?;
    let j = done
        .into_iter()
        .find(|j| j.fine_tuned_model.as_deref() == Some(name))?;
    let dir = jobs.storage().result_dir(&j.id);
    Some((
        Source::Job {
            job_id: j.id,
            dir: dir.clone(),
        },
        dir,
    ))
}

fn dir_size(dir: &Path) -> u64 {
    [peft::CONFIG_FILE, peft::WEIGHTS_FILE]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn adapter_object(
    id: &str,
    source: Option<&Source>,
    kind: Option<&str>,
    resident: bool,
    parent: Option<&str>,
) -> Value {
    let (generation, size, created, src, job) = match source {
        Some(Source::Imported(r)) => (
            json!(r.generation),
            json!(r.size_bytes),
            json!(r.created_at),
            "import",
            Value::Null,
        ),
        Some(Source::Job { job_id, dir }) => (
            Value::Null,
            json!(dir_size(dir)),
            Value::Null,
            "fine_tuning_job",
            json!(job_id),
        ),
        None => (
            Value::Null,
            Value::Null,
            Value::Null,
            "runtime",
            Value::Null,
        ),
    };
    let kind = kind.or(match source {
        Some(Source::Imported(r)) => Some(r.kind.as_str()),
        _ => None,
    });
    json!({
        "id": id,
        "object": "adapter",
        "type": kind,
        "generation": generation,
        "size_bytes": size,
        "created_at": created,
        "resident": resident,
        "parent": parent,
        "source": src,
        "fine_tuning_job_id": job,
    })
}

/// `GET /v1/adapters`: imported adapters (resident or not) and every served variant.
pub async fn list(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let store = store_of(&req)?;
    let models = store.inner.engine.models();
    let base = models.first().map(|c| c.id.clone());
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    let records: Vec<(String, Record)> = store
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
            adapter_object(
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
        let source = locate(&req, &store, &c.id).await.map(|(s, _)| s);
        out.insert(
            c.id.clone(),
            adapter_object(
                &c.id,
                source.as_ref(),
                c.adapter_type.as_deref(),
                c.resident,
                c.parent.as_deref(),
            ),
        );
    }
    let data: Vec<Value> = out.into_values().collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data, "has_more": false})))
}

async fn describe(req: &HttpRequest, store: &AdapterStore, id: &str) -> Result<Value, ApiError> {
    let models = store.inner.engine.models();
    let card = models.iter().find(|c| c.id == id && c.parent.is_some());
    let source = locate(req, store, id).await.map(|(s, _)| s);
    if card.is_none() && source.is_none() {
        return Err(not_found(id));
    }
    Ok(adapter_object(
        id,
        source.as_ref(),
        card.and_then(|c| c.adapter_type.as_deref()),
        card.is_some_and(|c| c.resident),
        models.first().map(|c| c.id.as_str()),
    ))
}

fn not_found(id: &str) -> ApiError {
    ApiError {
        code: Some("adapter_not_found"),
        ..ApiError::not_found(format!("No such adapter: {id}"))
    }
}

/// `GET /v1/adapters/{id}`.
pub async fn retrieve(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = check_name(&id)?;
    let store = store_of(&req)?;
    Ok(HttpResponse::Ok().json(describe(&req, &store, id).await?))
}

fn multipart_error(e: actix_multipart::MultipartError) -> ApiError {
    ApiError::bad_request(format!(
        "Could not read the multipart body (fields: name, adapter_config.json, adapter_model.safetensors, optional if_generation): {e}"
    ))
}

/// Reads one multipart field into memory, refusing more than `limit` bytes.
async fn read_field(
    field: &mut actix_multipart::Field,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, ApiError> {
    let mut v = Vec::new();
    while let Some(chunk) = field.try_next().await.map_err(multipart_error)? {
        if (v.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::payload_too_large(format!(
                "`{what}` is larger than the limit of {limit} bytes"
            )));
        }
        v.extend_from_slice(&chunk);
    }
    Ok(v)
}

/// The uploaded parts of an import.
#[derive(Default)]
struct Upload {
    name: Option<String>,
    config: Option<Vec<u8>>,
    weights: Option<Vec<u8>>,
    if_generation: Option<u64>,
}

async fn read_upload(mut payload: Multipart, max_weights: u64) -> Result<Upload, ApiError> {
    let mut u = Upload::default();
    while let Some(mut field) = payload.try_next().await.map_err(multipart_error)? {
        // A part is recognised by its field name, or by its file name (`-F file=@adapter_config.json`).
        let key = match field.name() {
            Some(n @ ("name" | "if_generation")) => n.to_string(),
            n => {
                let filename = field
                    .content_disposition()
                    .and_then(|d| d.get_filename())
                    .unwrap_or_default();
                match (n, filename) {
                    (Some(peft::CONFIG_FILE), _) | (_, peft::CONFIG_FILE) => {
                        peft::CONFIG_FILE.into()
                    }
                    (Some(peft::WEIGHTS_FILE), _) | (_, peft::WEIGHTS_FILE) => {
                        peft::WEIGHTS_FILE.into()
                    }
                    _ => String::new(),
                }
            }
        };
        match key.as_str() {
            "name" => {
                let v = read_field(&mut field, 256, "name").await?;
                u.name = Some(String::from_utf8_lossy(&v).trim().to_string());
            }
            "if_generation" => {
                let v = read_field(&mut field, 32, "if_generation").await?;
                let s = String::from_utf8_lossy(&v).trim().to_string();
                u.if_generation = Some(s.parse::<u64>().map_err(|_| {
                    ApiError::invalid(
                        "if_generation",
                        format!("`if_generation` must be a non-negative integer, got `{s}`"),
                    )
                })?);
            }
            peft::CONFIG_FILE => {
                if u.config.is_some() {
                    return Err(ApiError::invalid(peft::CONFIG_FILE, "Give the config once"));
                }
                u.config =
                    Some(read_field(&mut field, MAX_CONFIG_BYTES as u64, peft::CONFIG_FILE).await?);
            }
            peft::WEIGHTS_FILE => {
                if u.weights.is_some() {
                    return Err(ApiError::invalid(
                        peft::WEIGHTS_FILE,
                        "Give the weights once",
                    ));
                }
                u.weights = Some(read_field(&mut field, max_weights, peft::WEIGHTS_FILE).await?);
            }
            // Unknown parts are drained and ignored.
            _ => while field.try_next().await.map_err(multipart_error)?.is_some() {},
        }
    }
    Ok(u)
}

/// Parses and checks an upload against the base model (blocking).
fn parse_adapter(
    config: &[u8],
    weights: &[u8],
    engine: &EngineHandle,
) -> Result<(Value, Adapter), ApiError> {
    let c: Value = serde_json::from_slice(config).map_err(|e| {
        ApiError::invalid(
            peft::CONFIG_FILE,
            format!("adapter_config.json is not valid JSON: {e}"),
        )
    })?;
    if !c.is_object() {
        return Err(ApiError::invalid(
            peft::CONFIG_FILE,
            "adapter_config.json must be a JSON object",
        ));
    }
    let base = engine.base()?;
    let tensors: HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load_buffer(weights, base.model.device()).map_err(|e| {
            ApiError::invalid(
                peft::WEIGHTS_FILE,
                format!("adapter_model.safetensors cannot be read: {e}"),
            )
        })?;
    let adapter = peft::from_parts(&c, tensors, &base.model.cfg).map_err(|e| {
        let param = match e {
            peft::PeftError::Weights(_) | peft::PeftError::Mismatch(_) => peft::WEIGHTS_FILE,
            _ => peft::CONFIG_FILE,
        };
        ApiError::invalid(param, format!("Invalid PEFT adapter: {e}"))
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

/// Moves a staged directory to `dir`, replacing what was there, and makes the rename durable
/// (blocking).
fn install_staged(stage: &Path, dir: &Path) -> std::io::Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let old = parent.join(format!(".{name}.old-{:016x}", rand::random::<u64>()));
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old)?;
    }
    if let Err(e) = std::fs::rename(stage, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        return Err(e);
    }
    if let Ok(d) = std::fs::File::open(parent) {
        d.sync_all()?;
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// Removes a staged directory that will not be installed (blocking, best effort).
async fn discard(stage: PathBuf) {
    let _ = web::block(move || std::fs::remove_dir_all(stage)).await;
}

/// `POST /v1/adapters` (multipart: `name`, `adapter_config.json`, `adapter_model.safetensors`,
/// optional `if_generation`).
pub async fn import(req: HttpRequest, payload: Multipart) -> Result<HttpResponse, ApiError> {
    let store = store_of(&req)?;
    let u = read_upload(payload, store.inner.max_weights_bytes).await?;
    let name = u
        .name
        .ok_or_else(|| ApiError::invalid("name", "Missing required field: `name`"))?;
    check_name(&name).map_err(|mut e| {
        e.param = Some("name".into());
        e
    })?;
    if name.starts_with(JOB_PREFIX) {
        return Err(ApiError::invalid(
            "name",
            format!("Names starting with `{JOB_PREFIX}` are reserved for fine-tuning jobs"),
        ));
    }
    let config = u.config.ok_or_else(|| {
        ApiError::invalid(
            peft::CONFIG_FILE,
            "Missing required file: adapter_config.json",
        )
    })?;
    let weights = u.weights.ok_or_else(|| {
        ApiError::invalid(
            peft::WEIGHTS_FILE,
            "Missing required file: adapter_model.safetensors",
        )
    })?;
    let engine = store.inner.engine.clone();
    if !engine.is_ready() {
        return Err(ApiError::not_ready("The model is still loading"));
    }
    // Checked before anything is written: the engine would refuse it only after the files are.
    if engine.models().first().is_some_and(|c| c.id == name) {
        return Err(ApiError::invalid(
            "name",
            format!("`{name}` is the base model's id"),
        ));
    }
    let started = Instant::now();
    let size = (config.len() + weights.len()) as u64;
    // Parsing and writing the files (fsync) are the two slow parts of a swap: they run at once,
    // the files into a staging directory that is moved into place only after the
    // compare-and-set below.
    let (config, weights) = (Arc::new(config), Arc::new(weights));
    let stage = store
        .inner
        .root
        .join(format!(".stage-{:016x}", rand::random::<u64>()));
    let parse = {
        let (c, w) = (config.clone(), weights.clone());
        web::block(move || parse_adapter(&c, &w, &engine))
    };
    let write = {
        let (c, w, st) = (config, weights, stage.clone());
        web::block(move || stage_files(&st, &c, &w))
    };
    let (parsed, written) = futures::join!(parse, write);
    let staged_ms = started.elapsed().as_millis() as u64;
    let adapter = match (parsed, written) {
        (Ok(Ok((_, adapter))), Ok(Ok(()))) => adapter,
        (parsed, written) => {
            discard(stage).await;
            parsed??;
            written?.map_err(|e| io_err("Cannot store the adapter", e))?;
            return Err(ApiError::internal("Cannot store the adapter"));
        }
    };
    let kind = adapter.kind().to_string();
    let _guard = store.inner.ops.lock().await;
    let current = store.record(&name);
    let current_gen = current
        .as_ref()
        .filter(|r| r.stored)
        .map_or(0, |r| r.generation);
    if let Some(want) = u.if_generation {
        if want != current_gen {
            discard(stage).await;
            return Err(conflict(format!(
                "Adapter `{name}` is at generation {current_gen}, not {want}"
            )));
        }
    }
    let dir = store.dir(&name);
    {
        let st = stage.clone();
        if let Err(e) = web::block(move || install_staged(&st, &dir)).await? {
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
        created_at: crate::jobs::storage::now(),
        load: true,
    };
    store.index().adapters.insert(name.clone(), record.clone());
    store
        .save_index()
        .map_err(|e| io_err("Cannot write the adapters index", e))?;
    let was = store.is_served(&name);
    store
        .inner
        .engine
        .add_adapter_from(&name, adapter, &store.dir(&name))?;
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
    let base = store.inner.engine.models().first().map(|c| c.id.clone());
    let status = if current_gen == 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status).json(adapter_object(
        &name,
        Some(&Source::Imported(record)),
        None,
        true,
        base.as_deref(),
    )))
}

/// `POST /v1/adapters/{id}/load`: serves a stored adapter (a no-op answer if it is resident).
pub async fn load(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = check_name(&id)?.to_string();
    let store = store_of(&req)?;
    let _guard = store.inner.ops.lock().await;
    if store.is_served(&id) {
        // Served but maybe evicted by the memory budget: read it back now.
        let (engine, name) = (store.inner.engine.clone(), id.clone());
        web::block(move || engine.make_resident(&name)).await??;
    } else {
        let (_, dir) = locate(&req, &store, &id)
            .await
            .ok_or_else(|| not_found(&id))?;
        let (s, name) = (store.clone(), id.clone());
        web::block(move || s.load_from_disk(&name, &dir)).await??;
        tracing::info!(adapter = %id, "adapter loaded");
    }
    if store.record(&id).is_some_and(|r| r.stored) {
        store.update(&id, |r| r.load = true)?;
    }
    Ok(HttpResponse::Ok().json(describe(&req, &store, &id).await?))
}

/// `POST /v1/adapters/{id}/unload`: stops serving it; running requests finish on it.
pub async fn unload(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = check_name(&id)?.to_string();
    let store = store_of(&req)?;
    let _guard = store.inner.ops.lock().await;
    let stored = locate(&req, &store, &id).await.is_some();
    let removed = store.inner.engine.remove_adapter(&id)?;
    if !removed && !stored {
        return Err(not_found(&id));
    }
    if removed {
        crate::metrics::global().adapter_evicted();
        tracing::info!(adapter = %id, "adapter unloaded");
    }
    if store.record(&id).is_some_and(|r| r.stored) {
        store.update(&id, |r| r.load = false)?;
    }
    if stored {
        Ok(HttpResponse::Ok().json(describe(&req, &store, &id).await?))
    } else {
        // A runtime-only variant (e.g. `--adapter`) is gone entirely once unloaded.
        Ok(HttpResponse::Ok().json(json!({"id": id, "object": "adapter", "resident": false})))
    }
}

/// `DELETE /v1/adapters/{id}`: unloads and deletes an imported adapter.
pub async fn delete(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = check_name(&id)?.to_string();
    let store = store_of(&req)?;
    let _guard = store.inner.ops.lock().await;
    match locate(&req, &store, &id).await {
        Some((Source::Imported(_), _)) => {}
        Some((Source::Job { job_id, .. }, _)) => {
            return Err(ApiError::invalid(
                "id",
                format!("`{id}` belongs to fine-tuning job {job_id}; unload it instead"),
            ))
        }
        None => return Err(not_found(&id)),
    }
    if store.inner.engine.remove_adapter(&id)? {
        crate::metrics::global().adapter_evicted();
    }
    store.update(&id, |r| {
        r.stored = false;
        r.load = false;
    })?;
    // Renamed out of the way first, so the name is free at once even if removal is slow.
    let dir = store.dir(&id);
    let trash = store
        .inner
        .root
        .join(format!(".deleted-{:016x}", rand::random::<u64>()));
    web::block(move || {
        if let Err(e) = std::fs::rename(&dir, &trash).and_then(|()| std::fs::remove_dir_all(&trash))
        {
            tracing::warn!(dir = %dir.display(), "cannot remove a deleted adapter: {e}");
        }
    })
    .await?;
    tracing::info!(adapter = %id, "adapter deleted");
    Ok(HttpResponse::Ok().json(json!({"id": id, "object": "adapter", "deleted": true})))
}

/// `GET /v1/adapters/{id}/files/{name}`: `adapter_config.json` or `adapter_model.safetensors`.
pub async fn download(
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, file) = path.into_inner();
    let id = check_name(&id)?.to_string();
    let (file, content_type) = match file.as_str() {
        peft::CONFIG_FILE => (peft::CONFIG_FILE, "application/json"),
        peft::WEIGHTS_FILE => (peft::WEIGHTS_FILE, "application/octet-stream"),
        _ => {
            return Err(ApiError::invalid(
                "name",
                format!(
                    "Unknown adapter file: use `{}` or `{}`",
                    peft::CONFIG_FILE,
                    peft::WEIGHTS_FILE
                ),
            ))
        }
    };
    let store = store_of(&req)?;
    let (_, dir) = locate(&req, &store, &id)
        .await
        .ok_or_else(|| not_found(&id))?;
    let p = dir.join(file);
    let bytes = web::block(move || std::fs::read(p))
        .await?
        .map_err(|e| ApiError::not_found(format!("The file {file} of {id} is gone: {e}")))?;
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((
            actix_web::http::header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{file}\""),
        ))
        .body(bytes))
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

    #[test]
    fn conflict_is_409() {
        let e = conflict("x".into());
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert_eq!(e.body()["error"]["param"], "if_generation");
    }
}
