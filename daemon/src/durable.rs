//! Crash-safe writes to the local file system, for every layer that keeps state on disk (the
//! jobs' uploads and checkpoints, the adapter store's index and directories, PEFT adapters and
//! full models the trainer saves).
//!
//! A reader must only ever see a whole old version or a whole new one, never a torn file or a
//! half-written directory, whatever moment a crash or power loss hits. So new content is
//! written beside its destination (a dot-prefixed sibling on the same file system, which owners
//! may delete at start as leftovers), fsynced, renamed over the destination (atomic on POSIX),
//! and then the parent directory is fsynced so that the rename itself survives a power loss.
//!
//! This module knows nothing of what the files mean, so any layer may use it.
use std::io::Write;
use std::path::{Path, PathBuf};

/// A file-system failure and the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct IoError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Why [`replace_dir`] failed: the caller's `fill` failed, or the file system did.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError<E> {
    #[error(transparent)]
    Fill(E),
    #[error(transparent)]
    Io(IoError),
}

/// The directory holding `path` (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A fresh hidden sibling name of `path`: `.{name}.{tag}-{random}`.
fn sibling(path: &Path, tag: &str, nonce: u64) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}.{tag}-{nonce:016x}"))
}

/// Makes the renames inside directory `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` durably: a temporary sibling, fsynced, renamed over `path`, then
/// the directory fsynced. A crash leaves the old file or the new one.
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = sibling(path, "tmp", rand::random());
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Best effort: some file systems cannot fsync a directory; the data itself is synced.
    let _ = sync_dir(parent_of(path));
    Ok(())
}

/// Makes a file written through `f` at the temporary path `tmp` durable under `dest` (same file
/// system): fsync, rename, fsync the directory. For content streamed in pieces, where
/// [`write_file`]'s one buffer does not fit.
pub fn commit_file(mut f: std::fs::File, tmp: &Path, dest: &Path) -> std::io::Result<()> {
    f.flush()?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(tmp, dest)?;
    let _ = sync_dir(parent_of(dest));
    Ok(())
}

/// Moves the complete directory `stage` to `dir` (same file system), replacing whatever `dir`
/// held, and makes the rename durable. The old directory is renamed aside first and restored
/// if the move fails, so `dir` is never left missing by an error.
pub fn install_dir(stage: &Path, dir: &Path) -> std::io::Result<()> {
    let parent = parent_of(dir);
    std::fs::create_dir_all(parent)?;
    let old = sibling(dir, "old", rand::random());
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
    sync_dir(parent)?;
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// Removes the directory `dir` so that a crash leaves it either whole or gone: it is renamed to
/// a hidden sibling (one atomic step), the rename is made durable, and only then is the sibling
/// emptied. A crash after the rename leaves a dot-prefixed leftover, which owners may delete.
/// False if `dir` did not exist.
pub fn remove_dir(dir: &Path) -> std::io::Result<bool> {
    let trash = sibling(dir, "deleted", rand::random());
    match std::fs::rename(dir, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    // Best effort, as in [`write_file`]: some file systems cannot fsync a directory.
    let _ = sync_dir(parent_of(dir));
    std::fs::remove_dir_all(&trash)?;
    Ok(true)
}

/// Replaces the directory `dir` atomically: `fill` writes the new content into a fresh
/// temporary sibling (it should fsync what it writes), which is then swapped into place. The
/// entries of the old directory named in `keep` (a run's checkpoints beside its result, say)
/// are moved into the new one first, and moved back if the swap fails.
pub fn replace_dir<E>(
    dir: &Path,
    keep: &[&str],
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), ReplaceError<E>> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ReplaceError::Io(IoError { path: p, source })
    };
    let parent = parent_of(dir);
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let nonce: u64 = rand::random();
    let tmp = sibling(dir, "tmp", nonce);
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(ReplaceError::Fill(e));
    }
    for k in keep {
        let from = dir.join(k);
        if from.exists() && !tmp.join(k).exists() {
            if let Err(e) = std::fs::rename(&from, tmp.join(k)) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(io(&from)(e));
            }
        }
    }
    let old = sibling(dir, "old", nonce);
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(io(dir))?;
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
            for k in keep {
                let _ = std::fs::rename(tmp.join(k), dir.join(k));
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io(dir)(e));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    // The rename is durable only once the parent directory entry is on disk.
    let _ = sync_dir(parent);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "itamae-durable-{tag}-{:016x}",
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Names in `dir` other than `except` (leftover temporaries would show up here).
    fn others(dir: &Path, except: &[&str]) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !except.contains(&n.as_str()))
            .collect()
    }

    #[test]
    fn write_file_replaces_and_leaves_no_temporary() {
        let root = temp_root("file");
        let p = root.join("index.json");
        write_file(&p, b"one").unwrap();
        write_file(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(others(&root, &["index.json"]).is_empty());
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn commit_file_moves_a_streamed_file_into_place() {
        let root = temp_root("commit");
        let tmp = root.join(".upload-x");
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(b"hello").unwrap();
        commit_file(f, &tmp, &root.join("file-a")).unwrap();
        assert_eq!(std::fs::read(root.join("file-a")).unwrap(), b"hello");
        assert!(!tmp.exists());
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn install_dir_replaces_a_directory_whole() {
        let root = temp_root("install");
        let dir = root.join("a").join("step-2");
        for (i, content) in ["old", "new"].iter().enumerate() {
            let stage = root.join(format!(".stage-{i}"));
            std::fs::create_dir(&stage).unwrap();
            std::fs::write(stage.join("f"), content).unwrap();
            install_dir(&stage, &dir).unwrap();
            assert!(!stage.exists());
        }
        assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"new");
        assert!(others(&root.join("a"), &["step-2"]).is_empty());
        // A missing stage fails and leaves the installed directory in place.
        assert!(install_dir(&root.join(".missing"), &dir).is_err());
        assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"new");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn remove_dir_removes_whole_and_reports_a_missing_dir() {
        let root = temp_root("remove");
        let dir = root.join("step-3");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub").join("f"), "x").unwrap();
        assert!(remove_dir(&dir).unwrap());
        assert!(!dir.exists());
        assert!(others(&root, &[]).is_empty(), "no leftover");
        assert!(!remove_dir(&dir).unwrap());
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn replace_dir_keeps_named_entries_and_survives_a_failed_fill() {
        let root = temp_root("replace");
        let dir = root.join("model");
        replace_dir::<String>(&dir, &["checkpoints"], |tmp| {
            std::fs::write(tmp.join("w"), "1").map_err(|e| e.to_string())?;
            std::fs::create_dir(tmp.join("checkpoints")).map_err(|e| e.to_string())?;
            std::fs::write(tmp.join("checkpoints").join("c"), "ck").map_err(|e| e.to_string())
        })
        .unwrap();
        replace_dir::<String>(&dir, &["checkpoints"], |tmp| {
            std::fs::write(tmp.join("w"), "2").map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(std::fs::read(dir.join("w")).unwrap(), b"2");
        assert_eq!(
            std::fs::read(dir.join("checkpoints").join("c")).unwrap(),
            b"ck"
        );
        let failed = replace_dir(&dir, &["checkpoints"], |_| Err("no space"));
        assert!(matches!(failed, Err(ReplaceError::Fill("no space"))));
        assert_eq!(std::fs::read(dir.join("w")).unwrap(), b"2");
        assert!(others(&root, &["model"]).is_empty());
        let _ = std::fs::remove_dir_all(root);
    }
}
