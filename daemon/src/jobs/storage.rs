//! The data directory's layout and its only writers of bytes: `<data>/itamae.db`,
//! `<data>/files/<file-id>` (uploads), `<data>/jobs/<job-id>/`: `model/` (the trainer's
//! out_dir, where the final adapter lands) and `checkpoints/step-N/` (each a servable PEFT
//! adapter plus the trainer state to resume from), and `<data>/adapters/<name>/` (imported
//! adapters' files).
//!
//! Every path is built from an id that passed [`valid_id`], so nothing a client sends can name a
//! path outside the data directory.
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::Rng;

use super::backend::{BlobStore, BlobWriter};

/// Id prefixes, as OpenAI spells them.
pub const FILE_PREFIX: &str = "file-";
pub const JOB_PREFIX: &str = "ftjob-";
pub const EVENT_PREFIX: &str = "ftevent-";
pub const CHECKPOINT_PREFIX: &str = "ftckpt-";

/// Hex digits after the prefix in the ids made here.
const ID_HEX: usize = 24;
/// The longest id accepted from a client (OpenAI's own ids are shorter).
const MAX_ID_LEN: usize = 64;

/// A new random id: `prefix` + 24 lowercase hex digits (96 bits).
pub fn new_id(prefix: &str) -> String {
    let mut rng = rand::rng();
    let mut s = String::with_capacity(prefix.len() + ID_HEX);
    s.push_str(prefix);
    for _ in 0..ID_HEX {
        let d: u32 = rng.random_range(0..16);
        s.push(char::from_digit(d, 16).unwrap_or('0'));
    }
    s
}

/// True for `prefix` followed by 1.. ASCII letters, digits, `_` or `-`, at most 64 chars in all:
/// such an id is a single, harmless path component.
pub fn valid_id(prefix: &str, id: &str) -> bool {
    id.len() <= MAX_ID_LEN
        && id.strip_prefix(prefix).is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The local data directory as the [`BlobStore`] (and the home of the SQLite database).
#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
}

impl Storage {
    /// Creates the directories under `root` if needed.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join("files"))?;
        std::fs::create_dir_all(root.join("jobs"))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn db_path(&self) -> PathBuf {
        self.root.join("itamae.db")
    }

    /// Callers pass validated ids only (see [`valid_id`]).
    pub fn file_path(&self, id: &str) -> PathBuf {
        self.root.join("files").join(id)
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.root.join("jobs").join(id)
    }

    /// The trainer's out_dir: the final adapter. Checkpoints are moved out of it as they are
    /// written (see [`Self::checkpoint_dir`]) because the trainer replaces this whole directory
    /// when it saves the result.
    pub fn result_dir(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("model")
    }

    /// An imported adapter's files (`adapter_store` keeps its index beside them).
    pub fn adapter_dir(&self, name: &str) -> PathBuf {
        self.root.join("adapters").join(name)
    }

    pub fn checkpoint_dir(&self, job_id: &str, step: usize) -> PathBuf {
        self.job_dir(job_id)
            .join("checkpoints")
            .join(format!("step-{step}"))
    }

    /// The newest complete checkpoint of a job on disk (the trainer writes each one atomically,
    /// so a directory that exists with its state file is whole).
    pub fn latest_checkpoint(&self, job_id: &str) -> Option<(usize, PathBuf)> {
        let dir = self.job_dir(job_id).join("checkpoints");
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let step = name
                    .to_str()?
                    .strip_prefix("step-")?
                    .parse::<usize>()
                    .ok()?;
                let path = e.path();
                path.join("trainer_state.json")
                    .is_file()
                    .then_some((step, path))
            })
            .max_by_key(|(s, _)| *s)
    }

    /// A fresh temporary file beside the uploads (same file system, so the rename is atomic).
    pub fn temp_upload(&self) -> std::io::Result<(PathBuf, std::fs::File)> {
        let path = self
            .root
            .join("files")
            .join(format!(".upload-{}", new_id("")));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, f))
    }

    /// Makes a finished temporary upload durable under its id: fsync, rename, fsync the
    /// directory. A crash leaves either no file or the whole file, never a torn one.
    pub fn commit_upload(&self, f: std::fs::File, tmp: &Path, id: &str) -> std::io::Result<()> {
        crate::durable::commit_file(f, tmp, &self.file_path(id))
    }

    /// Removes stale temporary uploads (left by a crash mid-upload).
    pub fn clean_temp_uploads(&self) {
        if let Ok(entries) = std::fs::read_dir(self.root.join("files")) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".upload-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// An upload streamed to a temporary file beside the uploads; removed unless committed.
struct LocalUpload {
    storage: Storage,
    tmp: PathBuf,
    file: Option<std::fs::File>,
}

impl BlobWriter for LocalUpload {
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
        let committed = self.storage.commit_upload(f, &self.tmp, id);
        if committed.is_ok() {
            self.tmp = PathBuf::new();
        }
        committed
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl BlobStore for Storage {
    fn begin_upload(&self) -> std::io::Result<Box<dyn BlobWriter>> {
        let (tmp, file) = self.temp_upload()?;
        Ok(Box::new(LocalUpload {
            storage: self.clone(),
            tmp,
            file: Some(file),
        }))
    }

    fn open_file(&self, id: &str) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        Ok(Box::new(std::fs::File::open(self.file_path(id))?))
    }

    fn delete_file(&self, id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.file_path(id)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn clean_interrupted_uploads(&self) {
        self.clean_temp_uploads();
    }

    fn materialise_file(&self, id: &str) -> std::io::Result<PathBuf> {
        Ok(self.file_path(id))
    }

    fn local_result_dir(&self, job_id: &str) -> PathBuf {
        self.result_dir(job_id)
    }

    /// The trainer replaced the result directory atomically in place: nothing to do.
    fn publish_result(&self, _job_id: &str) -> std::io::Result<()> {
        Ok(())
    }

    fn local_checkpoint_dir(&self, job_id: &str, step: usize) -> PathBuf {
        self.checkpoint_dir(job_id, step)
    }

    fn keep_checkpoint(
        &self,
        job_id: &str,
        step: usize,
        written: &Path,
    ) -> std::io::Result<PathBuf> {
        let dir = self.checkpoint_dir(job_id, step);
        crate::durable::install_dir(written, &dir)?;
        Ok(dir)
    }

    fn latest_checkpoint(&self, job_id: &str) -> Option<(usize, PathBuf)> {
        Storage::latest_checkpoint(self, job_id)
    }

    fn materialise_result(&self, job_id: &str) -> std::io::Result<Option<PathBuf>> {
        let dir = self.result_dir(job_id);
        Ok(dir.is_dir().then_some(dir))
    }

    fn materialise_checkpoint(
        &self,
        job_id: &str,
        step: usize,
    ) -> std::io::Result<Option<PathBuf>> {
        let dir = self.checkpoint_dir(job_id, step);
        Ok(dir.is_dir().then_some(dir))
    }

    fn delete_job_dir(&self, job_id: &str, step: Option<usize>) -> std::io::Result<bool> {
        crate::durable::remove_dir(&match step {
            Some(s) => self.checkpoint_dir(job_id, s),
            None => self.result_dir(job_id),
        })
    }

    fn local_adapter_dir(&self, name: &str) -> PathBuf {
        self.adapter_dir(name)
    }

    /// The import installed the directory atomically in place: nothing to do. The data
    /// directory keeps one copy per name, the last installed (docs/scale-out.md, "Limits").
    fn publish_adapter(&self, _name: &str, _generation: u64) -> std::io::Result<()> {
        Ok(())
    }

    fn materialise_adapter(
        &self,
        name: &str,
        _generation: u64,
    ) -> std::io::Result<Option<PathBuf>> {
        let dir = self.adapter_dir(name);
        Ok(dir.is_dir().then_some(dir))
    }

    fn delete_adapter(&self, name: &str) -> std::io::Result<()> {
        crate::durable::remove_dir(&self.adapter_dir(name)).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_and_traversal_is_not() {
        let id = new_id(FILE_PREFIX);
        assert_eq!(id.len(), FILE_PREFIX.len() + ID_HEX);
        assert!(valid_id(FILE_PREFIX, &id));
        for bad in [
            "file-",
            "file-../../etc",
            "file-a/b",
            "../file-a",
            "ftjob-abc",
            "file-a.b",
            "file-%2e",
            &format!("file-{}", "a".repeat(80)),
        ] {
            assert!(!valid_id(FILE_PREFIX, bad), "{bad}");
        }
    }

    #[test]
    fn uploads_commit_atomically_and_checkpoints_are_found() {
        let root = std::env::temp_dir().join(format!("itamae-storage-{}", new_id("")));
        let s = Storage::open(&root).unwrap();
        let (tmp, mut f) = s.temp_upload().unwrap();
        f.write_all(b"hello").unwrap();
        s.commit_upload(f, &tmp, "file-abc").unwrap();
        assert_eq!(std::fs::read(s.file_path("file-abc")).unwrap(), b"hello");
        assert!(!tmp.exists());
        assert!(s.latest_checkpoint("ftjob-x").is_none());
        for step in [2, 10, 4] {
            let d = s.checkpoint_dir("ftjob-x", step);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("trainer_state.json"), "{}").unwrap();
        }
        // incomplete: no state file
        std::fs::create_dir_all(s.checkpoint_dir("ftjob-x", 12)).unwrap();
        assert_eq!(s.latest_checkpoint("ftjob-x").unwrap().0, 10);
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn the_data_directory_meets_the_blob_store_contract() {
        let root = std::env::temp_dir().join(format!("itamae-blobs-{}", new_id("")));
        let s = Storage::open(&root).unwrap();
        let files = root.join("files");
        contract::run(&s, &root, &|| std::fs::read_dir(&files).unwrap().count());
        let _ = std::fs::remove_dir_all(root);
    }
}

/// What every [`BlobStore`] must do, run against each implementation (the data directory here,
/// the object store over `file://` and over a real S3 server in `object_blob`).
#[cfg(test)]
pub(crate) mod contract {
    use std::io::Read;
    use std::path::Path;

    use super::*;

    fn read(s: &dyn BlobStore, id: &str) -> Vec<u8> {
        let mut back = Vec::new();
        s.open_file(id).unwrap().read_to_end(&mut back).unwrap();
        back
    }

    /// Runs the contract on `s`, writing scratch directories under `scratch`; `stored_files`
    /// counts the uploaded files the store holds (so a dropped upload can be seen to leave none).
    pub fn run(s: &dyn BlobStore, scratch: &Path, stored_files: &dyn Fn() -> usize) {
        // An upload dropped without a commit leaves nothing behind.
        let mut w = s.begin_upload().unwrap();
        w.write_all(b"lost").unwrap();
        drop(w);
        assert_eq!(stored_files(), 0);
        let mut w = s.begin_upload().unwrap();
        w.write_all(b"he").unwrap();
        w.write_all(b"llo").unwrap();
        w.commit("file-b").unwrap();
        assert_eq!(read(s, "file-b"), b"hello");
        assert_eq!(
            std::fs::read(s.materialise_file("file-b").unwrap()).unwrap(),
            b"hello"
        );
        assert_eq!(stored_files(), 1);
        // Larger than one part of a multipart upload, written in odd-sized pieces.
        let big: Vec<u8> = (0..(9usize << 20) + 12345)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut w = s.begin_upload().unwrap();
        for piece in big.chunks(777_777) {
            w.write_all(piece).unwrap();
        }
        w.commit("file-big").unwrap();
        assert!(
            read(s, "file-big") == big,
            "the large upload came back different"
        );
        s.delete_file("file-big").unwrap();
        s.delete_file("file-b").unwrap();
        s.delete_file("file-b").unwrap();
        assert!(s.open_file("file-b").is_err());
        assert_eq!(stored_files(), 0);
        // A checkpoint written elsewhere is kept where recovery finds it, replacing a copy.
        assert!(s.latest_checkpoint("ftjob-y").is_none());
        for content in ["old", "new"] {
            let written = scratch.join(format!(".written-{content}"));
            std::fs::create_dir_all(&written).unwrap();
            std::fs::write(written.join("trainer_state.json"), content).unwrap();
            std::fs::write(written.join(format!("only-{content}")), content).unwrap();
            let kept = s.keep_checkpoint("ftjob-y", 3, &written).unwrap();
            assert_eq!(kept, s.local_checkpoint_dir("ftjob-y", 3));
            assert!(!written.exists());
        }
        let written = scratch.join(".written-1");
        std::fs::create_dir_all(&written).unwrap();
        std::fs::write(written.join("trainer_state.json"), "one").unwrap();
        s.keep_checkpoint("ftjob-y", 1, &written).unwrap();
        let (step, dir) = s.latest_checkpoint("ftjob-y").unwrap();
        assert_eq!(step, 3);
        assert_eq!(dir, s.local_checkpoint_dir("ftjob-y", 3));
        assert_eq!(
            std::fs::read(dir.join("trainer_state.json")).unwrap(),
            b"new"
        );
        assert!(dir.join("only-new").is_file());
        assert!(!dir.join("only-old").exists());
        // A result the trainer wrote in place is published.
        let out = s.local_result_dir("ftjob-y");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("adapter_config.json"), "{}").unwrap();
        s.publish_result("ftjob-y").unwrap();
        assert_eq!(
            std::fs::read(out.join("adapter_config.json")).unwrap(),
            b"{}"
        );
        assert_eq!(s.materialise_result("ftjob-y").unwrap(), Some(out.clone()));
        assert_eq!(s.materialise_result("ftjob-none").unwrap(), None);
        assert_eq!(
            s.materialise_checkpoint("ftjob-y", 1).unwrap(),
            Some(s.local_checkpoint_dir("ftjob-y", 1))
        );
        assert_eq!(s.materialise_checkpoint("ftjob-y", 2).unwrap(), None);
        // Deleting a checkpoint or the result removes it for good.
        assert!(s.delete_job_dir("ftjob-y", Some(3)).unwrap());
        assert_eq!(s.latest_checkpoint("ftjob-y").unwrap().0, 1);
        assert!(s.delete_job_dir("ftjob-y", None).unwrap());
        assert!(!s.delete_job_dir("ftjob-y", None).unwrap());
        assert_eq!(s.materialise_result("ftjob-y").unwrap(), None);
        // Imported adapters: installed locally, published, materialised, deleted.
        let name = "my:adapter.v1";
        let a = s.local_adapter_dir(name);
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("adapter_config.json"), b"{\"r\":8}").unwrap();
        s.publish_adapter(name, 1).unwrap();
        assert_eq!(s.materialise_adapter(name, 1).unwrap(), Some(a.clone()));
        assert_eq!(
            std::fs::read(a.join("adapter_config.json")).unwrap(),
            b"{\"r\":8}"
        );
        s.delete_adapter(name).unwrap();
        s.delete_adapter(name).unwrap();
        assert_eq!(s.materialise_adapter(name, 1).unwrap(), None);
    }
}
