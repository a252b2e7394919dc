//! File trees as streams of [`FileEntry`] headers, the same on both ends:
//! [`list`] turns a local path into entries (the sender then streams each
//! regular file's bytes), [`TreeWriter`] turns received entries back into
//! files, and [`TreeReceiver`] drives a writer from the received messages
//! (entries and file chunks). None ever holds a whole file in memory.
//!
//! Received entries come from the other side of a trust boundary (for a
//! pull on the host: a guest that may be hostile), so the writer refuses
//! paths with `..`, absolute paths, a second root, entries outside the
//! directories received, and never goes through a symlink: every component
//! below the target is opened with `O_NOFOLLOW | O_DIRECTORY` relative to
//! an open directory (see [`TreeWriter`]). Set-id and sticky bits are
//! cleared unless the sender is trusted ([`WriteOptions::special_bits`]),
//! a file gets no byte beyond its announced size, and the number of
//! entries and the total size are capped ([`WriteOptions`]).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::message::{EntryKind, FileEntry};

#[cfg(test)]
mod hostile_tests;
mod receive;
mod writer;

pub use receive::TreeReceiver;
pub use writer::{TreeWriter, WriteOptions, DEFAULT_MAX_ENTRIES, MAX_DEPTH};

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
    /// A second root entry.
    #[error("the tree's root entry came twice")]
    RootTwice,
    /// An entry or chunk where the stream has no place for it.
    #[error("file tree stream out of order: {0}")]
    OutOfOrder(String),
    /// A file or symlink where a directory is.
    #[error("{0} is a directory: only a directory can take its place")]
    ReplacesDirectory(PathBuf),
    /// More entries than [`WriteOptions::max_entries`].
    #[error("the tree has more than {0} entries")]
    TooManyEntries(u64),
    /// An entry path deeper than [`MAX_DEPTH`].
    #[error("entry path {0:?} is deeper than {MAX_DEPTH} levels")]
    TooDeep(String),
    /// A file whose data is not its announced size.
    #[error("{path:?}: announced {announced} bytes, sent {sent}")]
    SizeMismatch {
        /// The entry path.
        path: String,
        /// The size in its entry.
        announced: u64,
        /// The bytes sent (so far, when over).
        sent: u64,
    },
    /// More file bytes than [`WriteOptions::max_bytes`].
    #[error("the tree is larger than the limit of {0} bytes")]
    TreeTooLarge(u64),
    /// A directory of the tree was replaced while it was written.
    #[error("{0} changed while the tree was written")]
    Changed(PathBuf),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;

    fn copy_tree(src: &Path, dst: &Path) {
        let opts = WriteOptions {
            parents: true,
            ..Default::default()
        };
        let mut w = TreeWriter::new(dst, opts);
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
        let opts = WriteOptions {
            parents: true,
            ..Default::default()
        };
        let mut w = TreeWriter::new(&t.path().join("dst"), opts);
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
        w.end(&link).unwrap();
        let file = FileEntry {
            path: "evil/pwned".into(),
            kind: EntryKind::File { size: 1 },
            mode: 0o644,
            uid: None,
            gid: None,
        };
        assert!(matches!(
            w.begin(&file),
            Err(TreeError::ThroughSymlink(_) | TreeError::OutOfOrder(_))
        ));
        assert!(!outside.join("pwned").exists());
    }
}
