//! Applying layer tarballs to a rootfs, safely.
//!
//! Every entry's path is cleaned lexically (`..` that would climb above the
//! rootfs is refused, a leading `/` is dropped), then its parent directory
//! is resolved *inside* the rootfs: symlinks met on the way are followed as
//! if the rootfs were `/` (an absolute or `../../..` target is clamped to
//! the rootfs, like a chroot). The last component is never followed: it is
//! replaced. So neither a hostile path, nor a symlink planted by an earlier
//! entry or layer, nor a symlink swapped for a directory mid-stream can make
//! a write land outside the rootfs. Hard-link targets are resolved the same
//! way and must already exist inside the rootfs.
//!
//! Whiteouts (`.wh.name`) delete `name` from lower layers; an opaque marker
//! (`.wh..wh..opq`) empties its directory of everything lower layers put
//! there, but keeps what the same layer adds, wherever in the stream.
//! Directory times are applied at the end, after their children are in.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use crate::manifest::Compression;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const MAX_SYMLINKS: u32 = 40;

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// A filesystem operation on the rootfs failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The layer is not a readable (compressed) tar: truncated, corrupt.
    #[error("reading the layer archive")]
    Archive(#[source] io::Error),
    /// An entry's path or link target climbs out of the rootfs.
    #[error("entry {entry:?}: {what} escapes the rootfs")]
    Escape {
        /// The entry name as in the archive.
        entry: PathBuf,
        /// `path` or `link target`.
        what: &'static str,
    },
    /// An entry declares a size over the limit.
    #[error("entry {entry:?} declares {size} bytes, over the {limit}-byte limit")]
    EntryTooLarge {
        /// The entry.
        entry: PathBuf,
        /// Its declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The layer expands to more than the limit.
    #[error("layer expands to more than {limit} bytes")]
    LayerTooLarge {
        /// The limit.
        limit: u64,
    },
    /// A hard link that cannot be made.
    #[error("entry {entry:?}: hard link to {target:?}: {reason}")]
    HardLink {
        /// The entry.
        entry: PathBuf,
        /// The link target.
        target: PathBuf,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Too many symlinks while resolving a path.
    #[error("entry {0:?}: too many levels of symbolic links")]
    Loop(PathBuf),
    /// A whiteout naming `.`, `..` or nothing.
    #[error("entry {0:?}: malformed whiteout")]
    Whiteout(PathBuf),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Limits and privileges for unpacking.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Largest size an entry may declare.
    pub max_entry_size: u64,
    /// Largest uncompressed size of one layer.
    pub max_layer_size: u64,
    /// Apply uid/gid from the archive (needs root).
    pub preserve_owners: bool,
    /// Create block and character devices (needs root); skipped otherwise.
    pub create_devices: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        Self {
            max_entry_size: 64 << 30,
            max_layer_size: 256 << 30,
            preserve_owners: root,
            create_devices: root,
        }
    }
}

/// Counts of what a layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries created or replaced.
    pub entries: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Entries skipped (devices without privilege, unknown types).
    pub skipped: u64,
    /// Uncompressed bytes read.
    pub bytes: u64,
    /// SHA-256 of the uncompressed tar (compare with the config's diff_ids).
    pub diff_id: Option<crate::digest::Digest>,
}

/// Applies layers, in order, to one rootfs.
pub struct Unpacker {
    root: PathBuf,
    opts: UnpackOptions,
    dir_times: HashMap<PathBuf, i64>,
}

impl Unpacker {
    /// Starts unpacking into `root`, which must exist.
    pub fn new(root: impl Into<PathBuf>, opts: UnpackOptions) -> Self {
        Self {
            root: root.into(),
            opts,
            dir_times: HashMap::new(),
        }
    }

    /// Applies one layer blob, decompressing it as its first bytes say.
    pub fn apply(&mut self, blob: impl Read) -> Result<LayerStats, UnpackError> {
        let mut br = BufReader::with_capacity(256 * 1024, blob);
        let head = br.fill_buf().map_err(UnpackError::Archive)?;
        let r: Box<dyn Read + '_> = match Compression::sniff(head) {
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(br)),
            Compression::Zstd => {
                Box::new(zstd::Decoder::with_buffer(br).map_err(UnpackError::Archive)?)
            }
            Compression::None => Box::new(br),
        };
        let limited = Limit {
            inner: r,
            left: self.opts.max_layer_size,
            read: Rc::new(Cell::new(0)),
            hasher: crate::digest::Hasher::new(crate::digest::Algorithm::Sha256),
        };
        self.apply_tar(limited)
    }

    fn apply_tar<R: Read>(&mut self, r: Limit<R>) -> Result<LayerStats, UnpackError> {
        let limit = self.opts.max_layer_size;
        let pos = r.read.clone();
        let mut ar = tar::Archive::new(r);
        let mut stats = LayerStats::default();
        let mut layer = LayerState::default();
        let mut last_end = 0u64;
        let entries = ar.entries().map_err(|e| archive_err(e, limit))?;
        for entry in entries {
            let mut entry = match entry {
                Ok(e) => e,
                // The stream ends right after the last entry's data, with
                // no padding or end-of-archive blocks (umoci 0.4 writes such
                // layers; Go's reader accepts them). The data is complete.
                Err(_)
                    if last_end > 0
                        && pos.get() >= last_end
                        && pos.get() <= last_end.next_multiple_of(512) =>
                {
                    log::debug!("layer ends without end-of-archive blocks; taken as complete");
                    break;
                }
                Err(e) => return Err(archive_err(e, limit)),
            };
            last_end = entry.raw_file_position() + entry.size();
            self.entry(&mut entry, &mut layer, &mut stats)
                .map_err(|e| match e {
                    UnpackError::Archive(e) => archive_err(e, limit),
                    other => other,
                })?;
        }
        // Opaque markers seen before the entries they keep are applied now.
        for dir in std::mem::take(&mut layer.opaque) {
            self.make_opaque_at(&dir.join(OPAQUE), &dir, &layer.written)?;
        }
        // Read the tar's trailing padding too, so the hash covers it all.
        let mut rest = ar.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| archive_err(e, limit))?;
        stats.bytes = rest.read.get();
        stats.diff_id = Some(rest.hasher.finish());
        Ok(stats)
    }

    /// Sets directory times (after all layers, so children don't disturb
    /// them). Consumes the unpacker.
    pub fn finish(self) -> Result<(), UnpackError> {
        let mut dirs: Vec<_> = self.dir_times.into_iter().collect();
        dirs.sort();
        for (rel, mtime) in dirs.into_iter().rev() {
            // A later entry may have swapped a parent for a symlink: only a
            // path that still resolves to itself is touched.
            if resolve_in_root(&self.root, &rel, false).ok().as_ref() != Some(&rel) {
                continue;
            }
            let p = self.root.join(&rel);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => set_times(&p, mtime)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        layer: &mut LayerState,
        stats: &mut LayerStats,
    ) -> Result<(), UnpackError> {
        let raw = entry.path().map_err(UnpackError::Archive)?.into_owned();
        let clean = clean(&raw).ok_or_else(|| UnpackError::Escape {
            entry: raw.clone(),
            what: "path",
        })?;
        let kind = entry.header().entry_type();
        let size = entry.size();
        if size > self.opts.max_entry_size {
            return Err(UnpackError::EntryTooLarge {
                entry: raw,
                size,
                limit: self.opts.max_entry_size,
            });
        }
        let Some(name) = clean.file_name().map(OsStr::to_os_string) else {
            // The rootfs itself ("./"): only its metadata applies.
            if kind.is_dir() {
                let root = self.root.clone();
                self.metadata(entry, &root, Path::new(""))?;
            }
            return Ok(());
        };
        let parent_rel = self.resolve(&raw, clean.parent().unwrap_or(Path::new("")), true)?;
        let name_str = name.as_bytes();
        if name_str == OPAQUE.as_bytes() {
            self.mkdirs(&parent_rel)?;
            layer.opaque.push(parent_rel);
            stats.whiteouts += 1;
            return Ok(());
        }
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT.as_bytes()) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(UnpackError::Whiteout(raw));
            }
            let victim = self.root.join(&parent_rel).join(OsStr::from_bytes(hidden));
            remove_any(&victim)?;
            stats.whiteouts += 1;
            return Ok(());
        }
        let rel = parent_rel.join(&name);
        let path = self.root.join(&rel);
        self.mkdirs(&parent_rel)?;
        self.dir_times.remove(&rel);
        use tar::EntryType as T;
        match kind {
            T::Directory => match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_any(&path)?;
                    fs::create_dir(&path).map_err(io_err("create directory", &path))?;
                }
                Err(_) => fs::create_dir(&path).map_err(io_err("create directory", &path))?,
            },
            T::Regular | T::Continuous | T::GNUSparse => {
                remove_any(&path)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(io_err("create", &path))?;
                let n = copy_entry(entry, &mut f, &path)?;
                if n != size {
                    return Err(UnpackError::Archive(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("entry {raw:?} has {n} of its {size} bytes"),
                    )));
                }
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .unwrap_or_default()
                    .into_owned();
                remove_any(&path)?;
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(io_err("create symlink", &path))?;
            }
            T::Link => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .unwrap_or_default()
                    .into_owned();
                self.hard_link(&raw, &target, &path)?;
                layer.note(&rel);
                stats.entries += 1;
                // A hard link shares the metadata of its target.
                return Ok(());
            }
            T::Char | T::Block | T::Fifo => {
                if kind != T::Fifo && !self.opts.create_devices {
                    log::warn!("skipping device {raw:?}: creating devices needs root");
                    stats.skipped += 1;
                    return Ok(());
                }
                remove_any(&path)?;
                let h = entry.header();
                let fmt = match kind {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let c = cstr(&path)?;
                // SAFETY: c is a valid NUL-terminated path; mknod reads it only.
                let rc =
                    unsafe { libc::mknod(c.as_ptr(), fmt | 0o600, libc::makedev(major, minor)) };
                if rc != 0 {
                    return Err(UnpackError::Io {
                        op: "mknod",
                        path,
                        source: io::Error::last_os_error(),
                    });
                }
            }
            other => {
                log::warn!("skipping {raw:?}: unsupported entry type {other:?}");
                stats.skipped += 1;
                return Ok(());
            }
        }
        self.metadata(entry, &path, &rel)?;
        layer.note(&rel);
        stats.entries += 1;
        Ok(())
    }

    fn hard_link(&self, raw: &Path, target: &Path, path: &Path) -> Result<(), UnpackError> {
        let bad = |reason| UnpackError::HardLink {
            entry: raw.to_path_buf(),
            target: target.to_path_buf(),
            reason,
        };
        let clean_t = clean(target).ok_or_else(|| UnpackError::Escape {
            entry: raw.to_path_buf(),
            what: "link target",
        })?;
        if clean_t.as_os_str().is_empty() {
            return Err(bad("target is the rootfs"));
        }
        let src_rel = self.resolve(raw, &clean_t, false)?;
        let src = self.root.join(src_rel);
        let m =
            fs::symlink_metadata(&src).map_err(|_| bad("target does not exist in the rootfs"))?;
        if m.is_dir() {
            return Err(bad("target is a directory"));
        }
        if let Ok(existing) = fs::symlink_metadata(path) {
            if existing.ino() == m.ino() && existing.dev() == m.dev() {
                return Ok(());
            }
        }
        remove_any(path)?;
        fs::hard_link(&src, path).map_err(io_err("hard link", path))
    }

    fn metadata<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        rel: &Path,
    ) -> Result<(), UnpackError> {
        let h = entry.header();
        let kind = h.entry_type();
        let mode = h.mode().map_err(UnpackError::Archive)? & 0o7777;
        let mtime = h.mtime().map_err(UnpackError::Archive)? as i64;
        if self.opts.preserve_owners {
            let uid = h.uid().map_err(UnpackError::Archive)? as u32;
            let gid = h.gid().map_err(UnpackError::Archive)? as u32;
            std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err("chown", path))?;
        }
        if let Some(exts) = entry.pax_extensions().map_err(UnpackError::Archive)? {
            for ext in exts {
                let ext = ext.map_err(UnpackError::Archive)?;
                let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                    continue;
                };
                set_xattr(path, name, ext.value_bytes())?;
            }
        }
        if !kind.is_symlink() {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", path))?;
        }
        if kind.is_dir() {
            self.dir_times.insert(rel.to_path_buf(), mtime);
        } else {
            set_times(path, mtime)?;
        }
        Ok(())
    }

    fn resolve(&self, raw: &Path, rel: &Path, follow_last: bool) -> Result<PathBuf, UnpackError> {
        resolve_in_root(&self.root, rel, follow_last).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => UnpackError::Loop(raw.to_path_buf()),
            _ => UnpackError::Io {
                op: "resolve",
                path: self.root.join(rel),
                source: e,
            },
        })
    }

    /// Creates the missing directories of a resolved relative path.
    fn mkdirs(&self, rel: &Path) -> Result<(), UnpackError> {
        let mut p = self.root.clone();
        for c in rel.iter() {
            p.push(c);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::Io {
                        op: "create directory",
                        path: p,
                        source: io::Error::from_raw_os_error(libc::ENOTDIR),
                    })
                }
                Err(_) => fs::create_dir(&p).map_err(io_err("create directory", &p))?,
            }
        }
        Ok(())
    }

    /// Empties `dir` of what this layer did not write. `dir` is resolved
    /// again: a later entry of the layer may have made it a symlink.
    fn make_opaque_at(
        &self,
        raw: &Path,
        dir: &Path,
        keep: &HashSet<PathBuf>,
    ) -> Result<(), UnpackError> {
        let dir = self.resolve(raw, dir, true)?;
        match fs::symlink_metadata(self.root.join(&dir)) {
            Ok(m) if m.is_dir() => self.make_opaque(&dir, keep),
            _ => Ok(()),
        }
    }

    /// `dir` is resolved and has no symlink component; entries below are
    /// recursed into only when readdir says they are real directories.
    fn make_opaque(&self, dir: &Path, keep: &HashSet<PathBuf>) -> Result<(), UnpackError> {
        let full = self.root.join(dir);
        let rd = match fs::read_dir(&full) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("list", &full)(e)),
        };
        for e in rd {
            let e = e.map_err(io_err("list", &full))?;
            let child = dir.join(e.file_name());
            if !keep.contains(&child) {
                remove_any(&e.path())?;
            } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                // Kept because this layer wrote it or something under it;
                // what lower layers put inside is hidden all the same.
                self.make_opaque(&child, keep)?;
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct LayerState {
    /// Paths this layer wrote, and their ancestors.
    written: HashSet<PathBuf>,
    /// Directories made opaque by this layer.
    opaque: Vec<PathBuf>,
}

impl LayerState {
    fn note(&mut self, rel: &Path) {
        let mut p = rel;
        loop {
            if !self.written.insert(p.to_path_buf()) {
                break;
            }
            match p.parent() {
                Some(q) if !q.as_os_str().is_empty() => p = q,
                _ => break,
            }
        }
    }
}

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

fn archive_err(e: io::Error, limit: u64) -> UnpackError {
    if e.get_ref().is_some_and(|i| i.is::<LimitHit>()) {
        UnpackError::LayerTooLarge { limit }
    } else {
        UnpackError::Archive(e)
    }
}

fn copy_entry(r: &mut impl Read, f: &mut fs::File, path: &Path) -> Result<u64, UnpackError> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(UnpackError::Archive(e)),
        };
        io::Write::write_all(f, &buf[..n]).map_err(io_err("write", path))?;
        total += n as u64;
    }
}

/// Removes whatever is at `p` (a whole tree for a directory); absent is fine.
fn remove_any(p: &Path) -> Result<(), UnpackError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(io_err("remove", p)),
        Ok(_) => fs::remove_file(p).map_err(io_err("remove", p)),
        Err(_) => Ok(()),
    }
}

fn cstr(p: &Path) -> Result<CString, UnpackError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| UnpackError::Io {
        op: "encode",
        path: p.to_path_buf(),
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })
}

fn set_times(p: &Path, mtime: i64) -> Result<(), UnpackError> {
    let c = cstr(p)?;
    let ts = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: c is NUL-terminated, times points to two valid timespecs; the
    // call reads both and does not keep them.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(UnpackError::Io {
            op: "set times of",
            path: p.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn set_xattr(p: &Path, name: &[u8], value: &[u8]) -> Result<(), UnpackError> {
    let c = cstr(p)?;
    let Ok(n) = CString::new(name) else {
        return Ok(());
    };
    // SAFETY: both strings are NUL-terminated and value is a valid slice of
    // value.len() bytes; lsetxattr only reads them.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Not supported here, or a namespace we may not write: the
            // rootfs is still usable; say so and go on.
            Some(libc::ENOTSUP) | Some(libc::EPERM) => {
                log::warn!(
                    "{}: xattr {} not set: {e}",
                    p.display(),
                    String::from_utf8_lossy(name)
                );
            }
            _ => {
                return Err(UnpackError::Io {
                    op: "set xattr on",
                    path: p.to_path_buf(),
                    source: e,
                })
            }
        }
    }
    Ok(())
}

#[derive(Debug)]
struct LimitHit;

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("layer size limit reached")
    }
}

impl std::error::Error for LimitHit {}

/// A reader that fails once more than `left` bytes have come through.
struct Limit<R> {
    inner: R,
    left: u64,
    read: Rc<Cell<u64>>,
    hasher: crate::digest::Hasher,
}

impl<R: Read> Read for Limit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::other(LimitHit));
        }
        self.left -= n as u64;
        self.read.set(self.read.get() + n as u64);
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
