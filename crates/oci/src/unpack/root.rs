//! Paths inside a rootfs: lexical cleaning, resolution as if the rootfs
//! were `/`, and reading the image's own small files (`/etc/passwd`).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use super::MAX_SYMLINKS;

/// Resolves `rel` inside `root`, following symlinks as if `root` were `/`
/// (absolute targets and `..` are clamped to `root`); the last component is
/// followed only when `follow_last`. Returns a path relative to `root` whose
/// components are not symlinks (they may not exist yet). `ELOOP` after
/// 40 links.
pub fn resolve_in_root(root: &Path, rel: &Path, follow_last: bool) -> io::Result<PathBuf> {
    let mut pending: Vec<OsString> = rel.iter().rev().map(OsStr::to_os_string).collect();
    let mut out = PathBuf::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            out.pop();
            continue;
        }
        if c == "." || c.is_empty() || c == "/" {
            continue;
        }
        let cand = out.join(&c);
        let full = root.join(&cand);
        let is_last = pending.is_empty();
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() && (follow_last || !is_last) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&full)?;
                if target.is_absolute() {
                    out = PathBuf::new();
                }
                for tc in target.components().rev() {
                    match tc {
                        Component::Normal(x) => pending.push(x.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => out = cand,
        }
    }
    Ok(out)
}

/// Reads a text file of a rootfs, resolving its path inside the rootfs.
pub fn read_in_root(root: &Path, rel: &Path) -> io::Result<String> {
    let p = resolve_in_root(root, rel, true)?;
    fs::read_to_string(root.join(p))
}

/// Lexically cleans an archive path; `None` if `..` climbs above the top.
pub fn clean(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}
