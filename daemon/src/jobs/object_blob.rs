//! The [`BlobStore`] over an object store (`storage.objects` = `s3://bucket/prefix`,
//! `gs://bucket/prefix`, `az://container/prefix`, or `file:///dir` for a shared mount), through
//! the `object_store` crate, so that several replicas share uploads, checkpoints and results.
//!
//! Keys under the prefix mirror the data directory: `files/<file-id>`,
//! `jobs/<job-id>/model/…` (a job's result), `jobs/<job-id>/checkpoints/step-N/…` and
//! `adapters/<name>/gen-<G>/…` (generation G of an imported adapter; the registry of names and
//! generations is in the database). The trainer and the adapter loader need local directories,
//! so a cache under the data directory (`<data>/cache/`, the same layout but one directory per
//! adapter name) holds what was written here or downloaded.
//!
//! Why an adapter's generations have keys of their own: an import uploads the new generation
//! before the database commits it, and the replica doing it may die in between. Under its own
//! key (and named in its marker, which a download checks), that upload cannot replace or mix
//! with the bytes of the generation the registry still names, which every replica goes on
//! loading. The generation before the current one is kept until the next import, for replicas
//! still loading it; older ones are removed then.
//!
//! Why directories end with a marker: object stores have no atomic rename of many keys, so a
//! directory (a checkpoint or a result) is uploaded file by file and then a small JSON marker
//! ([`MARKER`]) listing the files and their sizes is written LAST. A directory without its
//! marker is incomplete (a crash mid-upload) and ignored; a download takes the file list from
//! the marker, so it never mixes files of two versions it did not name. The local copy keeps
//! the marker too, so a cached directory whose marker matches the remote one is reused as is.
//!
//! Uploads are staged in a cache file first (the HTTP body arrives in small pieces and the final
//! key is the file id, known only at commit), then sent at commit: one PUT when small, a
//! multipart upload in [`PART_BYTES`] parts otherwise, aborted on any error. Nothing is visible
//! under the key before the commit, and an aborted upload leaves no object.
//!
//! The trait is blocking; every object-store call runs on the jobs layer's runtime handle and is
//! timed in `itamae_object_store_seconds{op}`.
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};

use super::backend::{BlobStore, BlobWriter};
use super::storage::{new_id, Storage};
pub use crate::config::ObjectsConfig;

/// The completion marker written last in every uploaded directory.
pub const MARKER: &str = "_COMPLETE";
/// Files up to this size are sent in one PUT; larger ones as a multipart upload of parts this
/// size (S3 wants at least 5 MiB per part but the last).
pub const PART_BYTES: usize = 8 << 20;
/// Parts of one multipart upload in flight at once.
const PART_CONCURRENCY: usize = 4;
/// Size of the reads that feed an upload from a local file.
const READ_CHUNK: usize = 1 << 20;

/// A `storage.objects` setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("storage.objects: `{0}` is not a URL")]
    Url(String),
    #[error("storage.objects: unsupported scheme `{0}` (use file://, s3://, gs:// or az://)")]
    Scheme(String),
    #[error("storage.object_options: unknown option `{0}` for {1}")]
    Option(String, &'static str),
    #[error("storage.objects: {0}")]
    Store(#[from] object_store::Error),
    #[error("storage.objects: {0}")]
    Io(#[from] std::io::Error),
}

/// True when `cfg` is `file://` naming `dir` itself: the data directory as it always was, kept
/// by [`Storage`] (no cache, no markers).
pub fn names_dir(cfg: &ObjectsConfig, dir: &Path) -> bool {
    let Ok(url) = url::Url::parse(&cfg.url) else {
        return false;
    };
    let same = |p: &Path| std::fs::canonicalize(p).ok();
    url.scheme() == "file"
        && cfg.options.is_empty()
        && url
            .to_file_path()
            .is_ok_and(|p| same(&p).is_some() && same(&p) == same(dir))
}

/// Builds the object store a URL names, credentials from the environment then `options`.
/// Returns the store and the key prefix everything goes under.
pub fn open_store(cfg: &ObjectsConfig) -> Result<(Arc<dyn ObjectStore>, Key), ObjectsError> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};

    let url = url::Url::parse(&cfg.url).map_err(|_| ObjectsError::Url(cfg.url.clone()))?;
    let opt = |scheme: &'static str| {
        move |(k, _): &(String, String)| ObjectsError::Option(k.clone(), scheme)
    };
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "file" => {
            let dir = url
                .to_file_path()
                .map_err(|_| ObjectsError::Url(cfg.url.clone()))?;
            std::fs::create_dir_all(&dir)?;
            if let Some(o) = cfg.options.first() {
                return Err(opt("file://")(o));
            }
            return Ok((
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir)?),
                Key::default(),
            ));
        }
        "s3" | "s3a" => {
            let mut b = AmazonS3Builder::from_env().with_url(cfg.url.as_str());
            for o in &cfg.options {
                let key: AmazonS3ConfigKey =
                    o.0.to_ascii_lowercase()
                        .parse()
                        .map_err(|_| opt("s3://")(o))?;
                b = b.with_config(key, o.1.as_str());
            }
            Arc::new(b.build()?)
        }
        "gs" => {
            let mut b = GoogleCloudStorageBuilder::from_env().with_url(cfg.url.as_str());
            for o in &cfg.options {
                let key: GoogleConfigKey =
                    o.0.to_ascii_lowercase()
                        .parse()
                        .map_err(|_| opt("gs://")(o))?;
                b = b.with_config(key, o.1.as_str());
            }
            Arc::new(b.build()?)
        }
        "az" | "azure" => {
            let mut b = MicrosoftAzureBuilder::from_env().with_url(cfg.url.as_str());
            for o in &cfg.options {
                let key: AzureConfigKey =
                    o.0.to_ascii_lowercase()
                        .parse()
                        .map_err(|_| opt("az://")(o))?;
                b = b.with_config(key, o.1.as_str());
            }
            Arc::new(b.build()?)
        }
        other => return Err(ObjectsError::Scheme(other.to_string())),
    };
    let prefix = Key::from_url_path(url.path()).map_err(object_store::Error::from)?;
    Ok((store, prefix))
}

/// What the marker of an uploaded directory holds: a version (random, new for every upload,
/// so a cached copy can be told apart from a newer one), the files with their sizes, and for an
/// imported adapter its generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Marker {
    version: String,
    files: Vec<MarkerFile>,
    /// Imported adapters only (absent in markers written before generations had keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
}

/// The directory of generation `generation` under an adapter's key.
fn generation_dir(generation: u64) -> String {
    format!("gen-{generation}")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct MarkerFile {
    /// Relative to the directory, `/`-separated.
    path: String,
    size: u64,
}

fn io(e: object_store::Error) -> std::io::Error {
    match e {
        object_store::Error::NotFound { .. } => {
            std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string())
        }
        e => std::io::Error::other(e.to_string()),
    }
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// An object store as the [`BlobStore`], with a local cache. Cheap to clone.
#[derive(Clone)]
pub struct ObjectBlob {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    cache: Storage,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for ObjectBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The store's Display names the bucket, never the credentials.
        write!(f, "ObjectBlob({} / {})", self.store, self.prefix)
    }
}

impl ObjectBlob {
    /// Opens the store `cfg` names, caching under `cache_dir`; object-store calls run on `rt`.
    pub fn open(
        cfg: &ObjectsConfig,
        cache_dir: &Path,
        rt: tokio::runtime::Handle,
    ) -> Result<Self, ObjectsError> {
        let (store, prefix) = open_store(cfg)?;
        Ok(Self::with_store(
            store,
            prefix,
            Storage::open(cache_dir)?,
            rt,
        ))
    }

    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        prefix: Key,
        cache: Storage,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            store,
            prefix,
            cache,
            rt,
        }
    }

    /// Runs one object-store future to completion from blocking code, timed as `op`. From a
    /// thread inside a runtime (where blocking on another is refused) it runs on a scoped thread.
    fn run<T: Send>(&self, op: &str, fut: impl std::future::Future<Output = T> + Send) -> T {
        let started = Instant::now();
        let out = if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| self.rt.block_on(fut))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        } else {
            self.rt.block_on(fut)
        };
        crate::metrics::global().object_store_op(op, started.elapsed().as_secs_f64());
        out
    }

    fn key(&self, parts: &[&str]) -> Key {
        parts
            .iter()
            .flat_map(|p| p.split('/'))
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |k, p| k.join(p))
    }

    fn file_key(&self, id: &str) -> Key {
        self.key(&["files", id])
    }

    fn result_key(&self, job_id: &str) -> Key {
        self.key(&["jobs", job_id, "model"])
    }

    fn checkpoints_key(&self, job_id: &str) -> Key {
        self.key(&["jobs", job_id, "checkpoints"])
    }

    fn checkpoint_key(&self, job_id: &str, step: usize) -> Key {
        self.key(&["jobs", job_id, "checkpoints", &format!("step-{step}")])
    }

    /// Sends the local file `path` to `key`: one PUT when small, else a multipart upload that
    /// is aborted on any error (so a failure leaves no object and no dangling parts).
    fn put_file(&self, path: &Path, key: &Key) -> std::io::Result<()> {
        let len = std::fs::metadata(path)?.len();
        if len <= PART_BYTES as u64 {
            let bytes = std::fs::read(path)?;
            return self
                .run("put", self.store.put(key, PutPayload::from(bytes)))
                .map(|_| ())
                .map_err(io);
        }
        let mut f = std::fs::File::open(path)?;
        self.run("put_multipart", async {
            let upload = self.store.put_multipart(key).await.map_err(io)?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            let mut buf = vec![0u8; READ_CHUNK];
            let sent: std::io::Result<()> = async {
                loop {
                    // A local read of at most 1 MiB: short enough to do inline.
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    w.wait_for_capacity(PART_CONCURRENCY).await.map_err(io)?;
                    w.write(&buf[..n]);
                }
            }
            .await;
            match sent {
                Ok(()) => w.finish().await.map(|_| ()).map_err(io),
                Err(e) => {
                    let _ = w.abort().await;
                    Err(e)
                }
            }
        })
    }

    /// Downloads `key` into a new file at `dest` (whose parent exists), fsynced; streamed.
    fn get_file(&self, key: &Key, dest: &Path) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)?;
        self.run("get", async {
            let mut s = self.store.get(key).await.map_err(io)?.into_stream();
            while let Some(chunk) = s.next().await {
                f.write_all(&chunk.map_err(io)?)?;
            }
            Ok::<_, std::io::Error>(())
        })?;
        f.sync_all()
    }

    fn delete_key(&self, key: &Key) -> std::io::Result<()> {
        match self.run("delete", self.store.delete(key)) {
            Err(e) if !not_found(&e) => Err(io(e)),
            _ => Ok(()),
        }
    }

    fn list(&self, prefix: &Key) -> std::io::Result<Vec<Key>> {
        self.run(
            "list",
            self.store
                .list(Some(prefix))
                .map_ok(|m| m.location)
                .try_collect::<Vec<_>>(),
        )
        .map_err(io)
    }

    fn read_marker(&self, dir: &Key) -> std::io::Result<Option<Marker>> {
        let got = self.run("get", async {
            self.store
                .get(&dir.clone().join(MARKER))
                .await?
                .bytes()
                .await
        });
        match got {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| std::io::Error::other(format!("{dir}/{MARKER}: {e}"))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    /// Every generation of the adapter `name` is under this key (and, from before generations
    /// had keys of their own, one copy directly in it).
    fn adapter_key(&self, name: &str) -> Key {
        self.key(&["adapters", name])
    }

    fn adapter_generation_key(&self, name: &str, generation: u64) -> Key {
        self.key(&["adapters", name, &generation_dir(generation)])
    }

    /// Deletes `keys`, the markers among them first: a directory losing its files is already
    /// incomplete, so ignored, for every reader.
    fn delete_markers_first(&self, mut keys: Vec<Key>) -> std::io::Result<()> {
        keys.sort_by_key(|k| k.filename() != Some(MARKER));
        for k in &keys {
            self.delete_key(k)?;
        }
        Ok(())
    }

    /// Before generation `generation` of `name` is uploaded: removes the generations older than
    /// the one the registry names now (`generation - 1`, which replicas may still be loading,
    /// stays), and the copy of the older layout once that generation has its own.
    fn prune_adapter(&self, name: &str, generation: u64) -> std::io::Result<()> {
        let root = self.adapter_key(name);
        let current = generation.saturating_sub(1);
        let current_complete = self
            .read_marker(&self.adapter_generation_key(name, current))?
            .is_some();
        let doomed: Vec<Key> = self
            .list(&root)?
            .into_iter()
            .filter(|k| {
                let Some(first) = k.prefix_match(&root).and_then(|mut rest| rest.next()) else {
                    return false;
                };
                match first.as_ref().strip_prefix("gen-").map(str::parse::<u64>) {
                    Some(Ok(g)) => g < current,
                    Some(Err(_)) => false,
                    None => current_complete,
                }
            })
            .collect();
        self.delete_markers_first(doomed)
    }

    /// Deletes an uploaded directory: its marker first (from then on it is incomplete and
    /// ignored everywhere), then its files. False if it had no marker.
    fn delete_dir(&self, dir: &Key) -> std::io::Result<bool> {
        let existed = self.read_marker(dir)?.is_some();
        self.delete_key(&dir.clone().join(MARKER))?;
        for k in self.list(dir)? {
            self.delete_key(&k)?;
        }
        Ok(existed)
    }

    /// Uploads every file of the local directory `local` under `dir`, then its marker last
    /// (naming `generation` for an imported adapter), and writes the same marker into `local`.
    /// An older version under `dir` loses its marker first (it is incomplete from then on) and
    /// its files the new one does not have after.
    fn upload_dir(&self, local: &Path, dir: &Key, generation: Option<u64>) -> std::io::Result<()> {
        let marker_key = dir.clone().join(MARKER);
        self.delete_key(&marker_key)?;
        let before = self.list(dir)?;
        let mut files = Vec::new();
        for rel in walk(local)? {
            if rel == MARKER {
                continue;
            }
            let path = local.join(&rel);
            let size = std::fs::metadata(&path)?.len();
            self.put_file(&path, &self.key_under(dir, &rel))?;
            files.push(MarkerFile { path: rel, size });
        }
        let keep: BTreeSet<Key> = files.iter().map(|f| self.key_under(dir, &f.path)).collect();
        for stale in before.iter().filter(|k| !keep.contains(k)) {
            self.delete_key(stale)?;
        }
        let marker = Marker {
            version: new_id(""),
            files,
            generation,
        };
        let bytes = serde_json::to_vec(&marker).map_err(std::io::Error::other)?;
        self.run(
            "put",
            self.store.put(&marker_key, PutPayload::from(bytes.clone())),
        )
        .map_err(io)?;
        crate::durable::write_file(&local.join(MARKER), &bytes)
    }

    fn key_under(&self, dir: &Key, rel: &str) -> Key {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(dir.clone(), |k, p| k.join(p))
    }

    /// Makes `local` a complete copy of the uploaded directory `dir`: kept as is when its marker
    /// matches, else downloaded beside it and swapped in whole. None when `dir` has no marker;
    /// an error when its marker does not name `generation`.
    fn download_dir(
        &self,
        dir: &Key,
        local: &Path,
        generation: Option<u64>,
    ) -> std::io::Result<Option<PathBuf>> {
        let Some(marker) = self.read_marker(dir)? else {
            return Ok(None);
        };
        if marker.generation != generation {
            return Err(std::io::Error::other(format!(
                "{dir}/{MARKER} is generation {:?}, not {generation:?}",
                marker.generation
            )));
        }
        let cached: Option<Marker> = std::fs::read(local.join(MARKER))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if cached.as_ref() == Some(&marker) {
            return Ok(Some(local.to_path_buf()));
        }
        let parent = local.parent().unwrap_or(local);
        std::fs::create_dir_all(parent)?;
        let stage = parent.join(format!(".download-{}", new_id("")));
        let fetched = (|| {
            std::fs::create_dir(&stage)?;
            for f in &marker.files {
                if f.path
                    .split('/')
                    .any(|p| p.is_empty() || p == "." || p == "..")
                {
                    return Err(std::io::Error::other(format!(
                        "{dir}/{MARKER} names the unsafe path `{}`",
                        f.path
                    )));
                }
                let dest = stage.join(&f.path);
                if let Some(p) = dest.parent() {
                    std::fs::create_dir_all(p)?;
                }
                self.get_file(&self.key_under(dir, &f.path), &dest)?;
                let got = std::fs::metadata(&dest)?.len();
                if got != f.size {
                    return Err(std::io::Error::other(format!(
                        "{dir}/{}: {got} bytes, the marker says {}",
                        f.path, f.size
                    )));
                }
            }
            let bytes = serde_json::to_vec(&marker).map_err(std::io::Error::other)?;
            crate::durable::write_file(&stage.join(MARKER), &bytes)?;
            crate::durable::install_dir(&stage, local)
        })();
        if let Err(e) = fetched {
            let _ = std::fs::remove_dir_all(&stage);
            return Err(e);
        }
        Ok(Some(local.to_path_buf()))
    }

    /// A job's result, materialised in the cache (None if it was never published).
    pub fn materialise_result(&self, job_id: &str) -> std::io::Result<Option<PathBuf>> {
        self.download_dir(
            &self.result_key(job_id),
            &self.cache.result_dir(job_id),
            None,
        )
    }

    /// A job's checkpoint `step`, materialised in the cache (None if it is not complete).
    pub fn materialise_checkpoint(
        &self,
        job_id: &str,
        step: usize,
    ) -> std::io::Result<Option<PathBuf>> {
        self.download_dir(
            &self.checkpoint_key(job_id, step),
            &self.cache.checkpoint_dir(job_id, step),
            None,
        )
    }

    /// The steps of a job's complete checkpoints in the store (those with a marker).
    pub fn checkpoint_steps(&self, job_id: &str) -> std::io::Result<Vec<usize>> {
        let root = self.checkpoints_key(job_id);
        let mut steps: Vec<usize> = self
            .list(&root)?
            .iter()
            .filter_map(|k| {
                let mut rest = k.prefix_match(&root)?;
                let dir = rest.next()?;
                let step = dir.as_ref().strip_prefix("step-")?.parse().ok()?;
                let name = rest.next()?;
                (name.as_ref() == MARKER && rest.next().is_none()).then_some(step)
            })
            .collect();
        steps.sort_unstable();
        Ok(steps)
    }
}

/// The files under `dir`, as `/`-separated relative paths, sorted.
fn walk(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type()?.is_dir() {
                todo.push((e.path(), r));
            } else {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// An upload staged in a cache file, sent to the store on commit; dropped uncommitted, the
/// cache file is removed and nothing was sent.
struct ObjectUpload {
    blob: ObjectBlob,
    tmp: PathBuf,
    file: Option<std::fs::File>,
}

impl BlobWriter for ObjectUpload {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.file {
            Some(f) => f.write_all(bytes),
            None => Err(std::io::Error::other("the upload was already committed")),
        }
    }

    fn commit(mut self: Box<Self>, id: &str) -> std::io::Result<()> {
        let f = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("the upload was already committed"))?;
        f.sync_all()?;
        let key = self.blob.file_key(id);
        self.blob.put_file(&self.tmp, &key)?;
        // The staged file becomes the cached copy; if that fails the object goes too, so the
        // caller's error means "not stored" everywhere.
        if let Err(e) = self.blob.cache.commit_upload(f, &self.tmp, id) {
            let _ = self.blob.delete_key(&key);
            return Err(e);
        }
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for ObjectUpload {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl BlobStore for ObjectBlob {
    fn begin_upload(&self) -> std::io::Result<Box<dyn BlobWriter>> {
        let (tmp, file) = self.cache.temp_upload()?;
        Ok(Box::new(ObjectUpload {
            blob: self.clone(),
            tmp,
            file: Some(file),
        }))
    }

    fn open_file(&self, id: &str) -> std::io::Result<Box<dyn Read + Send>> {
        let path = self.materialise_file(id)?;
        Ok(Box::new(std::fs::File::open(path)?))
    }

    fn delete_file(&self, id: &str) -> std::io::Result<()> {
        self.delete_key(&self.file_key(id))?;
        BlobStore::delete_file(&self.cache, id)
    }

    /// Staged uploads a crash interrupted are only in the cache: the store never saw them. (A
    /// multipart upload cut off mid-commit leaves invisible parts; the bucket's lifecycle rule
    /// for incomplete multipart uploads removes them, see docs/scale-out-objects.md.)
    fn clean_interrupted_uploads(&self) {
        self.cache.clean_temp_uploads();
        // Downloads and stagings a crash cut short (dot-prefixed siblings of what they fill).
        let root = self.cache.root();
        let mut dirs = vec![root.join("adapters"), root.join("jobs")];
        if let Ok(jobs) = std::fs::read_dir(root.join("jobs")) {
            for j in jobs.flatten() {
                dirs.push(j.path());
                dirs.push(j.path().join("checkpoints"));
            }
        }
        for d in dirs {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with('.') {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Uploaded files never change under their id, so a cached copy is current.
    fn materialise_file(&self, id: &str) -> std::io::Result<PathBuf> {
        let path = self.cache.file_path(id);
        if path.is_file() {
            return Ok(path);
        }
        let (tmp, f) = self.cache.temp_upload()?;
        drop(f);
        std::fs::remove_file(&tmp)?;
        let fetched = self.get_file(&self.file_key(id), &tmp).and_then(|()| {
            std::fs::rename(&tmp, &path)?;
            Ok(path.clone())
        });
        if fetched.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        fetched
    }

    fn local_result_dir(&self, job_id: &str) -> PathBuf {
        self.cache.result_dir(job_id)
    }

    fn publish_result(&self, job_id: &str) -> std::io::Result<()> {
        self.upload_dir(
            &self.cache.result_dir(job_id),
            &self.result_key(job_id),
            None,
        )
    }

    fn local_checkpoint_dir(&self, job_id: &str, step: usize) -> PathBuf {
        self.cache.checkpoint_dir(job_id, step)
    }

    fn keep_checkpoint(
        &self,
        job_id: &str,
        step: usize,
        written: &Path,
    ) -> std::io::Result<PathBuf> {
        let dir = self.cache.checkpoint_dir(job_id, step);
        crate::durable::install_dir(written, &dir)?;
        self.upload_dir(&dir, &self.checkpoint_key(job_id, step), None)?;
        Ok(dir)
    }

    fn materialise_result(&self, job_id: &str) -> std::io::Result<Option<PathBuf>> {
        ObjectBlob::materialise_result(self, job_id)
    }

    fn materialise_checkpoint(
        &self,
        job_id: &str,
        step: usize,
    ) -> std::io::Result<Option<PathBuf>> {
        ObjectBlob::materialise_checkpoint(self, job_id, step)
    }

    fn delete_job_dir(&self, job_id: &str, step: Option<usize>) -> std::io::Result<bool> {
        let (key, local) = match step {
            Some(s) => (
                self.checkpoint_key(job_id, s),
                self.cache.checkpoint_dir(job_id, s),
            ),
            None => (self.result_key(job_id), self.cache.result_dir(job_id)),
        };
        let existed = self.delete_dir(&key)?;
        Ok(crate::durable::remove_dir(&local)? || existed)
    }

    fn local_adapter_dir(&self, name: &str) -> PathBuf {
        self.cache.adapter_dir(name)
    }

    fn publish_adapter(&self, name: &str, generation: u64) -> std::io::Result<()> {
        self.prune_adapter(name, generation)?;
        self.upload_dir(
            &self.cache.adapter_dir(name),
            &self.adapter_generation_key(name, generation),
            Some(generation),
        )
    }

    /// The cache keeps one generation per name: another one's marker differs, so it is
    /// downloaded again.
    fn materialise_adapter(&self, name: &str, generation: u64) -> std::io::Result<Option<PathBuf>> {
        let local = self.cache.adapter_dir(name);
        let key = self.adapter_generation_key(name, generation);
        if let Some(dir) = self.download_dir(&key, &local, Some(generation))? {
            return Ok(Some(dir));
        }
        // Imported before generations had keys of their own: the name's one copy, whatever its
        // generation, until the next import replaces it.
        self.download_dir(&self.adapter_key(name), &local, None)
    }

    fn delete_adapter(&self, name: &str) -> std::io::Result<()> {
        self.delete_markers_first(self.list(&self.adapter_key(name))?)?;
        crate::durable::remove_dir(&self.cache.adapter_dir(name)).map(|_| ())
    }

    fn shared(&self) -> bool {
        true
    }

    fn latest_checkpoint(&self, job_id: &str) -> Option<(usize, PathBuf)> {
        let steps = match self.checkpoint_steps(job_id) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(job = %job_id, "cannot list checkpoints in the object store: {e}");
                return None;
            }
        };
        // Newest first; one that fails to download falls back to the one before.
        for step in steps.into_iter().rev() {
            match self.materialise_checkpoint(job_id, step) {
                Ok(Some(dir)) => return Some((step, dir)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(job = %job_id, step, "cannot download checkpoint: {e}")
                }
            }
        }
        None
    }
}

#[cfg(test)]
#[path = "object_blob_tests.rs"]
mod tests;
