//! File trees as streams of [`FileEntry`] headers, the same on both ends:
//! [`list`] turns a local path into entries (the sender then streams each
//! regular file's bytes), [`TreeWriter`] turns received entries back into
//! files. Neither ever holds a whole file in memory.
//!
//! Received entries come from the other side of a trust boundary, so the
//! writer refuses paths with `..`, absolute paths, and paths that would go
//! through a symlink it (or anyone) created inside the tree.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::message::{EntryKind, FileEntry};

/// Errors of reading or writing a file tree.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A filesystem call on this path failed.
    #[error("{path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An entry path that is absolute, has `..`, or is otherwise unsafe.
    #[error("unsafe entry path {0:?}")]
    UnsafePath(String),
    /// An entry path that would be reached through a symlink.
    #[error("entry path {0:?} goes through a symlink")]
    ThroughSymlink(String),
    /// A file that is neither a regular file, a directory nor a symlink.
    #[error("{0} is not a regular file, directory or symlink")]
    Unsupported(PathBuf),
    /// A non-UTF-8 name.
    #[error("{0:?} is not valid UTF-8")]
    NotUtf8(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Lists the tree at `root` (a file, directory or symlink; symlinks are not
/// followed), parents before children, names sorted. Each item is the local
/// path and its entry; owners are always filled in.
pub fn list(root: &Path) -> Result<Vec<(PathBuf, FileEntry)>, TreeError> {
    let mut out = Vec::new();
    walk(root, String::new(), &mut out)?;
    Ok(out)
}

fn walk(path: &Path, rel: String, out: &mut Vec<(PathBuf, FileEntry)>) -> Result<(), TreeError> {
    let md = fs::symlink_metadata(path).map_err(io_err(path))?;
    let ft = md.file_type();
    let kind = if ft.is_file() {
        EntryKind::File { size: md.len() }
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(io_err(path))?;
        let target = target
            .to_str()
            .ok_or_else(|| TreeError::NotUtf8(path.into()))?;
        EntryKind::Symlink {
            target: target.to_string(),
        }
    } else {
        return Err(TreeError::Unsupported(path.into()));
    };
    let entry = FileEntry {
        path: rel.clone(),
        kind: kind.clone(),
        mode: md.mode() & 0o7777,
        uid: Some(md.uid()),
        gid: Some(md.gid()),
    };
    out.push((path.to_path_buf(), entry));
    if kind == EntryKind::Dir {
        let mut names = Vec::new();
        for e in fs::read_dir(path).map_err(io_err(path))? {
            names.push(e.map_err(io_err(path))?.file_name());
        }
        names.sort();
        for name in names {
            let name_str = name
                .to_str()
                .ok_or_else(|| TreeError::NotUtf8(path.join(&name)))?;
            let child_rel = if rel.is_empty() {
                name_str.to_string()
            } else {
                format!("{rel}/{name_str}")
            };
            walk(&path.join(&name), child_rel, out)?;
        }
    }
    Ok(())
}

/// Joins an entry path to `root`, refusing anything that could escape it.
pub fn safe_join(root: &Path, rel: &str) -> Result<PathBuf, TreeError> {
    let mut out = root.to_path_buf();
    if rel.is_empty() {
        return Ok(out);
    }
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(n) => out.push(n),
            _ => return Err(TreeError::UnsafePath(rel.to_string())),
        }
    }
    Ok(out)
}

/// Writes a received tree under a destination path.
///
/// Per entry: [`TreeWriter::begin`] (returns the open file for a regular
/// file, which the caller fills from the data frames), then
/// [`TreeWriter::end`]; finally [`TreeWriter::finish`], which applies the
/// directories' modes last so a read-only directory can still be filled.
#[derive(Debug)]
pub struct TreeWriter {
    root: PathBuf,
    parents: bool,
    owners: bool,
    dirs: Vec<(PathBuf, FileEntry)>,
}

impl TreeWriter {
    /// A writer for the tree whose root entry goes to `root`. `parents`:
    /// create missing parents of `root`; `owners`: apply entries' uid/gid.
    pub fn new(root: &Path, parents: bool, owners: bool) -> Self {
        TreeWriter {
            root: root.to_path_buf(),
            parents,
            owners,
            dirs: Vec::new(),
        }
    }

    /// Creates the entry; returns the file to write for a regular file.
    pub fn begin(&mut self, entry: &FileEntry) -> Result<Option<File>, TreeError> {
        let dest = safe_join(&self.root, &entry.path)?;
        if entry.path.is_empty() {
            if let Some(parent) = dest
                .parent()
                .filter(|p| self.parents && !p.as_os_str().is_empty())
            {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
        } else {
            self.check_no_symlink_parent(&entry.path)?;
        }
        let existing = fs::symlink_metadata(&dest).ok();
        match &entry.kind {
            EntryKind::Dir => {
                match existing {
                    Some(md) if md.is_dir() => {}
                    Some(_) => {
                        remove(&dest)?;
                        fs::create_dir(&dest).map_err(io_err(&dest))?;
                    }
                    None => fs::create_dir(&dest).map_err(io_err(&dest))?,
                }
                // Writable for now; the real mode comes in finish().
                fs::set_permissions(&dest, fs::Permissions::from_mode(0o700))
                    .map_err(io_err(&dest))?;
                self.dirs.push((dest, entry.clone()));
                Ok(None)
            }
            EntryKind::Symlink { target } => {
                if existing.is_some() {
                    remove(&dest)?;
                }
                std::os::unix::fs::symlink(target, &dest).map_err(io_err(&dest))?;
                Ok(None)
            }
            EntryKind::File { .. } => {
                if existing.is_some_and(|md| md.file_type().is_symlink()) {
                    remove(&dest)?;
                }
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(io_err(&dest))?;
                Ok(Some(f))
            }
        }
    }

    /// Completes a non-directory entry: owner, then mode (chown clears
    /// set-id bits, so the mode goes last).
    pub fn end(&mut self, entry: &FileEntry) -> Result<(), TreeError> {
        if entry.kind == EntryKind::Dir {
            return Ok(());
        }
        let dest = safe_join(&self.root, &entry.path)?;
        self.apply(&dest, entry)
    }

    /// Applies the directories' owners and modes, deepest first.
    pub fn finish(mut self) -> Result<(), TreeError> {
        while let Some((dest, entry)) = self.dirs.pop() {
            self.apply(&dest, &entry)?;
        }
        Ok(())
    }

    fn apply(&self, dest: &Path, entry: &FileEntry) -> Result<(), TreeError> {
        if self.owners && (entry.uid.is_some() || entry.gid.is_some()) {
            std::os::unix::fs::lchown(dest, entry.uid, entry.gid).map_err(io_err(dest))?;
        }
        if !matches!(entry.kind, EntryKind::Symlink { .. }) {
            let perm = fs::Permissions::from_mode(entry.mode & 0o7777);
            fs::set_permissions(dest, perm).map_err(io_err(dest))?;
        }
        Ok(())
    }

    fn check_no_symlink_parent(&self, rel: &str) -> Result<(), TreeError> {
        let mut p = self.root.clone();
        let comps: Vec<_> = Path::new(rel).components().collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            p.push(c);
            match fs::symlink_metadata(&p) {
                Ok(md) if md.is_dir() => {}
                _ => return Err(TreeError::ThroughSymlink(rel.to_string())),
            }
        }
        Ok(())
    }
}

fn remove(path: &Path) -> Result<(), TreeError> {
    let md = fs::symlink_metadata(path).map_err(io_err(path))?;
    if md.is_dir() {
        fs::remove_dir_all(path).map_err(io_err(path))
    } else {
        fs::remove_file(path).map_err(io_err(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn copy_tree(src: &Path, dst: &Path) {
        let mut w = TreeWriter::new(dst, true, false);
        for (local, entry) in list(src).unwrap() {
            if let Some(mut f) = w.begin(&entry).unwrap() {
                let mut data = Vec::new();
                File::open(&local).unwrap().read_to_end(&mut data).unwrap();
                f.write_all(&data).unwrap();
            }
            w.end(&entry).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn copies_files_dirs_symlinks_and_modes() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/a.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("sub/a.sh"), fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink("sub/a.sh", src.join("link")).unwrap();
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o555)).unwrap();

        let entries: Vec<String> = list(&src)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.path)
            .collect();
        assert_eq!(entries, ["", "link", "sub", "sub/a.sh"]);

        let dst = t.path().join("deep/dst");
        copy_tree(&src, &dst);
        assert_eq!(fs::read(dst.join("sub/a.sh")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(
            fs::metadata(dst.join("sub/a.sh")).unwrap().mode() & 0o7777,
            0o751
        );
        assert_eq!(
            fs::metadata(dst.join("sub")).unwrap().mode() & 0o7777,
            0o555
        );
        assert_eq!(
            fs::read_link(dst.join("link")).unwrap(),
            Path::new("sub/a.sh")
        );
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dst.join("sub"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn refuses_escaping_paths() {
        let root = Path::new("/r");
        for bad in ["../x", "/etc/passwd", "a/../../b", "./a"] {
            assert!(
                matches!(safe_join(root, bad), Err(TreeError::UnsafePath(_))),
                "{bad}"
            );
        }
        assert_eq!(safe_join(root, "a/b").unwrap(), Path::new("/r/a/b"));
    }

    #[test]
    fn refuses_writing_through_a_received_symlink() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let mut w = TreeWriter::new(&t.path().join("dst"), true, false);
        let dir = FileEntry {
            path: String::new(),
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: None,
            gid: None,
        };
        w.begin(&dir).unwrap();
        let link = FileEntry {
            path: "evil".into(),
            kind: EntryKind::Symlink {
                target: outside.to_str().unwrap().into(),
            },
            mode: 0o777,
            uid: None,
            gid: None,
        };
        w.begin(&link).unwrap();
        let file = FileEntry {
            path: "evil/pwned".into(),
            kind: EntryKind::File { size: 1 },
            mode: 0o644,
            uid: None,
            gid: None,
        };
        assert!(matches!(w.begin(&file), Err(TreeError::ThroughSymlink(_))));
        assert!(!outside.join("pwned").exists());
    }
}
