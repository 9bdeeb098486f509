//! The data directory's layout and its only writers of bytes: `<data>/itamae.db`,
//! `<data>/files/<file-id>` (uploads) and `<data>/jobs/<job-id>/`: `model/` (the trainer's
//! out_dir, where the final adapter lands) and `checkpoints/step-N/` (each a servable PEFT
//! adapter plus the trainer state to resume from).
//!
//! Every path is built from an id that passed [`valid_id`], so nothing a client sends can name a
//! path outside the data directory.
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::Rng;

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
    pub fn commit_upload(&self, mut f: std::fs::File, tmp: &Path, id: &str) -> std::io::Result<()> {
        f.flush()?;
        f.sync_all()?;
        drop(f);
        let dest = self.file_path(id);
        std::fs::rename(tmp, &dest)?;
        if let Ok(d) = std::fs::File::open(self.root.join("files")) {
            let _ = d.sync_all();
        }
        Ok(())
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
}
