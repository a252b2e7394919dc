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
//!
//! # Hostile sizes
//!
//! What an image declares is capped before it is allocated or written: a
//! GNU long name or link over [`MAX_LONG_NAME`] (64 KiB), a PAX header over
//! [`MAX_PAX`] (1 MiB) or a sparse map over [`MAX_SPARSE_MAP`] (1 MiB) is
//! refused before it is read; an entry path over [`MAX_PATH`]; an entry
//! over [`UnpackOptions::max_entry_size`] (64 GiB); a layer whose tar
//! stream, or whose files at their apparent size (sparse holes count),
//! pass [`UnpackOptions::max_layer_size`] (256 GiB); a layer of more than
//! [`UnpackOptions::max_entries`] entries ([`DEFAULT_MAX_ENTRIES`], one
//! million, directories made for their paths included).
//!
//! # What the host sees: the policy
//!
//! The rootfs belongs to the guest: a VM mounts it through virtiofsd and
//! owns everything in it. So the guest gets its files as the image says,
//! and the host is protected by *where* they are, not by changing them:
//!
//! * Owners (as root), modes including setuid, setgid and sticky bits,
//!   and times are applied as the image says: in the guest `su`, `sudo`
//!   and `ping` must work. No unprivileged host user can reach them: the
//!   store ([`crate::store::Store::open`]) and bundle directories
//!   ([`crate::bundle::write_bundle`]) are mode 0700, and the storage
//!   layer mounts instance roots `nosuid,nodev`.
//! * The rootfs directory itself is never changed by the image: a `./`
//!   entry (mode, owner, times) is ignored; the bundle code makes it 0755
//!   (the guest's `/`).
//! * Device nodes: only the harmless character devices of
//!   [`HARMLESS_DEVICES`] (null, zero, full, random, urandom, tty, console,
//!   ptmx) are created, and only as root; any other character device
//!   (`/dev/mem`, `/dev/kmsg`, disks) and every block device is skipped
//!   with a warning. The guest mounts its own `/dev` (devtmpfs) anyway.
//!   FIFOs are created.
//! * Xattrs: `user.*`, POSIX ACLs (`system.posix_acl_*`) and
//!   `security.capability` (file capabilities: the guest's `ping`; the same
//!   risk as a setuid file, under the same 0700 directories) are applied;
//!   `trusted.*` (overlayfs keeps `trusted.overlay.*` state there, and a
//!   cached rootfs is an overlay's lower layer on the host) and the other
//!   `security.*` (SELinux, Smack, IMA/EVM: host policy, not image
//!   content) are dropped and counted in a log line per layer.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::manifest::Compression;

mod fsops;
pub(crate) mod guard;
mod root;
use fsops::{copy_entry, cstr, remove_any, set_times, set_xattr};
pub use guard::{MAX_LONG_NAME, MAX_PAX, MAX_SPARSE_MAP};
pub use root::{clean, read_in_root, resolve_in_root};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const MAX_SYMLINKS: u32 = 40;
/// Longest entry path (after cleaning): `PATH_MAX`; a longer one cannot be
/// created through the rootfs anyway.
pub const MAX_PATH: usize = 4096;
/// Default most entries in one layer (directories created for their paths
/// included): 1,000,000, about ten times the file count of the largest
/// common images (a full TeX Live or CUDA image).
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
/// Most bytes of paths remembered for one layer (for opaque directories)
/// and for the whole image (for directory times): 256 MiB each.
pub const MAX_TRACKED_PATHS: u64 = 256 << 20;
/// The character devices created (as root): `(major, minor)` of null,
/// zero, full, random, urandom, tty, console and ptmx. They reach nothing
/// of the host's; any other device node is skipped.
pub const HARMLESS_DEVICES: [(u32, u32); 8] = [
    (1, 3),
    (1, 5),
    (1, 7),
    (1, 8),
    (1, 9),
    (5, 0),
    (5, 1),
    (5, 2),
];

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
    /// The layer expands to more than the limit (read, or written: sparse
    /// files count at their apparent size).
    #[error("layer expands to more than {limit} bytes")]
    LayerTooLarge {
        /// The limit.
        limit: u64,
    },
    /// A GNU long name or link, a PAX extended header or a sparse map is
    /// larger than its limit; refused before it is read.
    #[error("{what} of {size} bytes, over the {limit}-byte limit")]
    HeaderTooLarge {
        /// Which header.
        what: &'static str,
        /// Its declared size (bytes read so far for a sparse map).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The layer has more entries than the limit.
    #[error("layer has more than {limit} entries (directories created for their paths included)")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// An entry path longer than [`MAX_PATH`].
    #[error("entry {entry:?}…: path of {len} bytes, over the {MAX_PATH}-byte limit")]
    PathTooLong {
        /// The start of the entry name.
        entry: String,
        /// Its length.
        len: usize,
    },
    /// The paths to remember take more than [`MAX_TRACKED_PATHS`].
    #[error("{what} take more than {MAX_TRACKED_PATHS} bytes of memory")]
    TooManyPaths {
        /// Which paths.
        what: &'static str,
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
    /// Largest uncompressed size of one layer, and most bytes it may write
    /// (sparse files count at their apparent size).
    pub max_layer_size: u64,
    /// Most entries in one layer, directories created for their paths
    /// included.
    pub max_entries: u64,
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
            max_entries: DEFAULT_MAX_ENTRIES,
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
    dir_times_bytes: u64,
}

impl Unpacker {
    /// Starts unpacking into `root`, which must exist.
    pub fn new(root: impl Into<PathBuf>, opts: UnpackOptions) -> Self {
        Self {
            root: root.into(),
            opts,
            dir_times: HashMap::new(),
            dir_times_bytes: 0,
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
        self.apply_tar(guard::Limit::new(r, self.opts.max_layer_size, true))
    }

    fn apply_tar<R: Read>(&mut self, r: guard::Limit<R>) -> Result<LayerStats, UnpackError> {
        let limit = self.opts.max_layer_size;
        let handles = r.handles();
        let mut ar = tar::Archive::new(r);
        let mut stats = LayerStats::default();
        let mut layer = LayerState::default();
        let mut last_end = 0u64;
        let mut entries =
            guard::Entries::new(&mut ar, handles).map_err(|e| archive_err(e, limit))?;
        while let Some(entry) = entries.next() {
            let pos = entries.pos();
            let mut entry = match entry {
                Ok(e) => e,
                // The stream ends right after the last entry's data, with
                // no padding or end-of-archive blocks (umoci 0.4 writes such
                // layers; Go's reader accepts them). The data is complete.
                Err(e)
                    if guard::hit(&e).is_none()
                        && last_end > 0
                        && pos >= last_end
                        && pos <= last_end.next_multiple_of(512) =>
                {
                    log::debug!("layer ends without end-of-archive blocks; taken as complete");
                    break;
                }
                Err(e) => return Err(archive_err(e, limit)),
            };
            layer.count(1, self.opts.max_entries)?;
            last_end = entry.raw_file_position() + entry.size();
            let archive = |e| match e {
                UnpackError::Archive(e) => archive_err(e, limit),
                other => other,
            };
            self.entry(&mut entry, &mut layer, &mut stats)
                .map_err(archive)?;
            // What the entry did not use (a directory's data, say) is read
            // here, so the parser's next search starts at the next header.
            io::copy(&mut entry, &mut io::sink()).map_err(|e| archive_err(e, limit))?;
        }
        if layer.xattrs_dropped > 0 {
            log::info!(
                "{} xattrs in host namespaces (trusted.*, security.* but security.capability) not applied",
                layer.xattrs_dropped
            );
        }
        // Opaque markers seen before the entries they keep are applied now.
        for dir in std::mem::take(&mut layer.opaque) {
            self.make_opaque_at(&dir.join(OPAQUE), &dir, &layer.written)?;
        }
        // Read the tar's trailing padding too, so the hash covers it all.
        let mut rest = ar.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| archive_err(e, limit))?;
        stats.bytes = rest.read.get();
        stats.diff_id = rest.hasher.map(crate::digest::Hasher::finish);
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
        let len = clean.as_os_str().len();
        if len > MAX_PATH {
            return Err(UnpackError::PathTooLong {
                entry: raw.to_string_lossy().chars().take(64).collect(),
                len,
            });
        }
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
            // The rootfs itself ("./"): its mode, owner and times stay ours.
            log::debug!("entry {raw:?} names the rootfs itself; not applied");
            return Ok(());
        };
        let parent_rel = self.resolve(&raw, clean.parent().unwrap_or(Path::new("")), true)?;
        let name_str = name.as_bytes();
        if name_str == OPAQUE.as_bytes() {
            self.mkdirs(&parent_rel, layer)?;
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
        self.mkdirs(&parent_rel, layer)?;
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
                // Counted at the apparent size: a sparse entry's holes are
                // written out as zeros.
                layer.bytes = layer.bytes.saturating_add(size);
                if layer.bytes > self.opts.max_layer_size {
                    return Err(UnpackError::LayerTooLarge {
                        limit: self.opts.max_layer_size,
                    });
                }
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
                layer.note(&rel)?;
                stats.entries += 1;
                // A hard link shares the metadata of its target.
                return Ok(());
            }
            T::Char | T::Block | T::Fifo => {
                let h = entry.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                if kind != T::Fifo && !self.opts.create_devices {
                    log::warn!("skipping device {raw:?}: creating devices needs root");
                    stats.skipped += 1;
                    return Ok(());
                }
                if kind == T::Block
                    || (kind == T::Char && !HARMLESS_DEVICES.contains(&(major, minor)))
                {
                    log::warn!(
                        "skipping device {raw:?} ({major}:{minor}): only null, zero, full, random, urandom, tty, console and ptmx are created"
                    );
                    stats.skipped += 1;
                    return Ok(());
                }
                remove_any(&path)?;
                let fmt = match kind {
                    T::Char => libc::S_IFCHR,
                    _ => libc::S_IFIFO,
                };
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
        self.metadata(entry, &path, &rel, layer)?;
        layer.note(&rel)?;
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
        layer: &mut LayerState,
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
                if !xattr_applies(name) {
                    log::debug!(
                        "{}: xattr {} not applied (host namespace)",
                        path.display(),
                        String::from_utf8_lossy(name)
                    );
                    layer.xattrs_dropped += 1;
                    continue;
                }
                set_xattr(path, name, ext.value_bytes())?;
            }
        }
        if !kind.is_symlink() {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", path))?;
        }
        if kind.is_dir() {
            if self.dir_times.insert(rel.to_path_buf(), mtime).is_none() {
                self.dir_times_bytes += rel.as_os_str().len() as u64;
                if self.dir_times_bytes > MAX_TRACKED_PATHS {
                    return Err(UnpackError::TooManyPaths {
                        what: "the image's directories",
                    });
                }
            }
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

    /// Creates the missing directories of a resolved relative path; each
    /// counts as an entry of the layer.
    fn mkdirs(&self, rel: &Path, layer: &mut LayerState) -> Result<(), UnpackError> {
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
                Err(_) => {
                    layer.count(1, self.opts.max_entries)?;
                    fs::create_dir(&p).map_err(io_err("create directory", &p))?
                }
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
    /// Bytes of the paths in `written`.
    written_bytes: u64,
    /// Directories made opaque by this layer.
    opaque: Vec<PathBuf>,
    /// Entries seen and directories created.
    entries: u64,
    /// Bytes of regular files (at their apparent size).
    bytes: u64,
    /// Xattrs not applied (host namespaces).
    xattrs_dropped: u64,
}

impl LayerState {
    fn note(&mut self, rel: &Path) -> Result<(), UnpackError> {
        let mut p = rel;
        loop {
            if !self.written.insert(p.to_path_buf()) {
                break;
            }
            self.written_bytes += p.as_os_str().len() as u64;
            if self.written_bytes > MAX_TRACKED_PATHS {
                return Err(UnpackError::TooManyPaths {
                    what: "the paths this layer wrote",
                });
            }
            match p.parent() {
                Some(q) if !q.as_os_str().is_empty() => p = q,
                _ => break,
            }
        }
        Ok(())
    }

    /// Counts `n` more entries against `limit`.
    fn count(&mut self, n: u64, limit: u64) -> Result<(), UnpackError> {
        self.entries += n;
        if self.entries > limit {
            return Err(UnpackError::TooManyEntries { limit });
        }
        Ok(())
    }
}

/// Whether an xattr from the image is applied: `user.*`, POSIX ACLs and
/// `security.capability` are the image's; `trusted.*` (overlayfs keeps its
/// `trusted.overlay.*` state there, and the rootfs cache is an overlay's
/// lower layer) and the other `security.*` (SELinux, Smack, IMA/EVM labels
/// are host policy) are the host's and dropped.
fn xattr_applies(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name == b"security.capability"
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

fn archive_err(e: io::Error, limit: u64) -> UnpackError {
    match guard::hit(&e) {
        Some(guard::Hit::LayerSize) => UnpackError::LayerTooLarge { limit },
        Some(guard::Hit::Header { what, size, limit }) => UnpackError::HeaderTooLarge {
            what,
            size: *size,
            limit: *limit,
        },
        Some(guard::Hit::Step) => UnpackError::HeaderTooLarge {
            what: "the headers of one entry",
            size: guard::MAX_STEP + 1,
            limit: guard::MAX_STEP,
        },
        None => UnpackError::Archive(e),
    }
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
pub(crate) mod tests;
