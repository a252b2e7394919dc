//! [`TreeWriter`]: creates received entries below a target, never through
//! a symlink.
//!
//! Every path component below the target is opened relative to an open
//! directory fd with `O_NOFOLLOW | O_DIRECTORY` (an `openat` walk from the
//! tree's root directory), and every entry is created with the `*at` calls
//! on its parent's fd, so a symlink anywhere in the tree (received, or
//! there before) is never followed. Owners and modes are applied through
//! fds too (`fchown`, `fchmod`), never by path.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::TreeError;
use crate::message::{EntryKind, FileEntry};

/// Entries a tree may have by default ([`WriteOptions::max_entries`]).
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
/// Deepest entry path, in components.
pub const MAX_DEPTH: usize = 256;
/// Directory fds a writer keeps open for [`TreeWriter::finish`]; the
/// directories beyond are opened again by the same walk then (and checked
/// to be the very directories created), so a big tree does not run out of
/// file descriptors.
const KEEP_DIR_FDS: usize = 256;

/// How a tree is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Create missing parent directories of the target.
    pub parents: bool,
    /// Apply the entries' uid and gid.
    pub owners: bool,
    /// Keep the setuid, setgid and sticky bits of the entries' modes. Only
    /// for a trusted sender (the agent writing what the host pushed); off,
    /// they are cleared, so a guest can never plant a set-id file or
    /// directory on the host.
    pub special_bits: bool,
    /// Most entries the tree may have.
    pub max_entries: u64,
    /// Most file bytes the tree may have, all files together (enforced by
    /// [`super::TreeReceiver`] against the announced sizes).
    pub max_bytes: u64,
}

impl Default for WriteOptions {
    /// No parents, no owners, set-id and sticky bits cleared, at most
    /// [`DEFAULT_MAX_ENTRIES`] entries, bytes unlimited.
    fn default() -> Self {
        WriteOptions {
            parents: false,
            owners: false,
            special_bits: false,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: u64::MAX,
        }
    }
}

/// A directory of the tree: what it should become in [`TreeWriter::finish`]
/// and which inode it is.
#[derive(Debug)]
struct Dir {
    rel: String,
    entry: FileEntry,
    dev: u64,
    ino: u64,
    fd: Option<OwnedFd>,
}

/// A non-directory entry between [`TreeWriter::begin`] and
/// [`TreeWriter::end`].
#[derive(Debug)]
enum Pending {
    File(OwnedFd),
    Symlink { dir: OwnedFd, name: CString },
}

/// Writes a received tree under a destination path.
///
/// Per entry: [`TreeWriter::begin`] (returns the open file for a regular
/// file, which the caller fills from the data frames), then
/// [`TreeWriter::end`]; finally [`TreeWriter::finish`], which applies the
/// directories' modes last so a read-only directory can still be filled.
///
/// The first entry must be the root (empty path), and it comes once. Every
/// other entry's directory must be a directory entry received before it.
/// A symlink or a file never replaces a directory (the root included); a
/// directory replaces a file or symlink. See [`WriteOptions`] for modes
/// and limits.
#[derive(Debug)]
pub struct TreeWriter {
    root: PathBuf,
    opts: WriteOptions,
    entries: u64,
    root_seen: bool,
    /// The root directory, when the root entry is one.
    top: Option<OwnedFd>,
    dirs: Vec<Dir>,
    by_path: HashMap<String, usize>,
    pending: Option<(String, Pending)>,
}

impl TreeWriter {
    /// A writer for the tree whose root entry goes to `root`.
    pub fn new(root: &Path, opts: WriteOptions) -> Self {
        TreeWriter {
            root: root.to_path_buf(),
            opts,
            entries: 0,
            root_seen: false,
            top: None,
            dirs: Vec::new(),
            by_path: HashMap::new(),
            pending: None,
        }
    }

    /// Creates the entry; returns the file to write for a regular file.
    pub fn begin(&mut self, entry: &FileEntry) -> Result<Option<File>, TreeError> {
        self.entries += 1;
        if self.entries > self.opts.max_entries {
            return Err(TreeError::TooManyEntries(self.opts.max_entries));
        }
        if let Some((rel, _)) = &self.pending {
            return Err(TreeError::OutOfOrder(format!(
                "entry {:?} before the end of {rel:?}",
                entry.path
            )));
        }
        let comps = split(&entry.path)?;
        let (dir, name) = match comps.split_last() {
            None => match self.open_root()? {
                Some(at) => at,
                None => return self.adopt_nameless_root(entry).map(|()| None),
            },
            Some((last, parents)) => {
                if !self.root_seen {
                    return Err(TreeError::OutOfOrder(format!(
                        "entry {:?} before the root",
                        entry.path
                    )));
                }
                let parent = parents.join("/");
                let Some(&idx) = self.by_path.get(&parent) else {
                    return Err(TreeError::OutOfOrder(format!(
                        "entry {:?}: {parent:?} is not a directory of the tree",
                        entry.path
                    )));
                };
                (self.walk(parents, idx)?, cstring(last, &entry.path)?)
            }
        };
        let rel = comps.join("/");
        self.create(dir, name, rel, entry)
    }

    /// Completes a non-directory entry: owner, then mode (chown clears
    /// set-id bits, so the mode goes last), both through an fd.
    pub fn end(&mut self, entry: &FileEntry) -> Result<(), TreeError> {
        if entry.kind == EntryKind::Dir {
            return Ok(());
        }
        let rel = split(&entry.path)?.join("/");
        let Some((pending_rel, pending)) = self.pending.take() else {
            return Err(TreeError::OutOfOrder(format!(
                "end of {:?}, which was not begun",
                entry.path
            )));
        };
        if pending_rel != rel {
            return Err(TreeError::OutOfOrder(format!(
                "end of {:?} while {pending_rel:?} is open",
                entry.path
            )));
        }
        let path = self.path_of(&rel);
        let owner = self.owner(entry);
        match pending {
            Pending::File(fd) => {
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::fchown(&fd, uid, gid).map_err(io_at(&path))?;
                }
                fchmod(fd.as_fd(), self.mode(entry)).map_err(io_at(&path))
            }
            Pending::Symlink { dir, name } => match owner {
                Some((uid, gid)) => lchownat(dir.as_fd(), &name, uid, gid).map_err(io_at(&path)),
                None => Ok(()),
            },
        }
    }

    /// Applies the directories' owners and modes, deepest first, each
    /// through an fd of the very directory created.
    pub fn finish(mut self) -> Result<(), TreeError> {
        if let Some((rel, _)) = &self.pending {
            return Err(TreeError::OutOfOrder(format!(
                "the tree ended inside {rel:?}"
            )));
        }
        for i in (0..self.dirs.len()).rev() {
            let fd = match self.dirs[i].fd.take() {
                Some(fd) => fd,
                None => {
                    let rel = self.dirs[i].rel.clone();
                    let comps: Vec<&str> = if rel.is_empty() {
                        Vec::new()
                    } else {
                        rel.split('/').collect()
                    };
                    self.walk(&comps, i)?
                }
            };
            let d = &self.dirs[i];
            let path = self.path_of(&d.rel);
            if let Some((uid, gid)) = self.owner(&d.entry) {
                std::os::unix::fs::fchown(&fd, uid, gid).map_err(io_at(&path))?;
            }
            fchmod(fd.as_fd(), self.mode(&d.entry)).map_err(io_at(&path))?;
        }
        Ok(())
    }

    fn mode(&self, entry: &FileEntry) -> u32 {
        let allowed = if self.opts.special_bits {
            0o7777
        } else {
            0o777
        };
        entry.mode & allowed
    }

    fn owner(&self, entry: &FileEntry) -> Option<(Option<u32>, Option<u32>)> {
        (self.opts.owners && (entry.uid.is_some() || entry.gid.is_some()))
            .then_some((entry.uid, entry.gid))
    }

    fn path_of(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// Takes the root entry: the open directory it goes in and its name
    /// there, or `None` for a target without a last component (`/`, `..`).
    fn open_root(&mut self) -> Result<Option<(OwnedFd, CString)>, TreeError> {
        if self.root_seen {
            return Err(TreeError::RootTwice);
        }
        self.root_seen = true;
        let Some(name) = self.root.file_name() else {
            return Ok(None);
        };
        let parent = match self.root.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if self.opts.parents {
            std::fs::create_dir_all(&parent).map_err(io_at(&parent))?;
        }
        // The target's own path is the caller's: it may go through links.
        let c = cstring_os(parent.as_os_str(), &parent)?;
        let dir = open_dir_follow(&c).map_err(io_at(&parent))?;
        Ok(Some((dir, cstring_os(name, &self.root)?)))
    }

    /// A root directory entry for a target like `/` or `..`: the existing
    /// directory is the root.
    fn adopt_nameless_root(&mut self, entry: &FileEntry) -> Result<(), TreeError> {
        if entry.kind != EntryKind::Dir {
            return Err(TreeError::Io {
                path: self.root.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only a directory can be written to a path without a name",
                ),
            });
        }
        let c = cstring_os(self.root.as_os_str(), &self.root)?;
        let fd = open_dir_follow(&c).map_err(io_at(&self.root))?;
        self.add_dir(String::new(), entry, fd)
    }

    /// Opens the directory `comps` (relative to the root) by an
    /// `O_NOFOLLOW | O_DIRECTORY` walk, and checks it is the directory
    /// `dirs[idx]` created.
    fn walk(&self, comps: &[&str], idx: usize) -> Result<OwnedFd, TreeError> {
        let rel = comps.join("/");
        let path = self.path_of(&rel);
        let top = self.top.as_ref().ok_or_else(|| {
            TreeError::OutOfOrder(format!("{rel:?}: the root is not a directory"))
        })?;
        let mut cur = top.try_clone().map_err(io_at(&self.root))?;
        for c in comps {
            let name = cstring(c, &rel)?;
            cur = open_dir_at(cur.as_fd(), &name).map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::ENOTDIR) => TreeError::ThroughSymlink(rel.clone()),
                _ => TreeError::Io {
                    path: path.clone(),
                    source: e,
                },
            })?;
        }
        let (dev, ino) = dev_ino(cur.as_fd()).map_err(io_at(&path))?;
        let want = &self.dirs[idx];
        if (dev, ino) != (want.dev, want.ino) {
            return Err(TreeError::Changed(path));
        }
        Ok(cur)
    }

    fn add_dir(&mut self, rel: String, entry: &FileEntry, fd: OwnedFd) -> Result<(), TreeError> {
        let path = self.path_of(&rel);
        // Writable for now; the real mode comes in finish().
        fchmod(fd.as_fd(), 0o700).map_err(io_at(&path))?;
        let (dev, ino) = dev_ino(fd.as_fd()).map_err(io_at(&path))?;
        if rel.is_empty() {
            self.top = Some(fd.try_clone().map_err(io_at(&path))?);
        }
        let kept = self.dirs.iter().filter(|d| d.fd.is_some()).count();
        let fd = (kept < KEEP_DIR_FDS).then_some(fd);
        let dir = Dir {
            rel: rel.clone(),
            entry: entry.clone(),
            dev,
            ino,
            fd,
        };
        match self.by_path.get(&rel) {
            Some(&i) => self.dirs[i] = dir,
            None => {
                self.by_path.insert(rel, self.dirs.len());
                self.dirs.push(dir);
            }
        }
        Ok(())
    }

    /// Creates `name` in `dir` as the entry says.
    fn create(
        &mut self,
        dir: OwnedFd,
        name: CString,
        rel: String,
        entry: &FileEntry,
    ) -> Result<Option<File>, TreeError> {
        let path = self.path_of(&rel);
        let existing = stat_at(dir.as_fd(), &name).map_err(io_at(&path))?;
        let is_dir = existing.is_some_and(|m| m & libc::S_IFMT == libc::S_IFDIR);
        let is_file = existing.is_some_and(|m| m & libc::S_IFMT == libc::S_IFREG);
        if is_dir && entry.kind != EntryKind::Dir {
            return Err(TreeError::ReplacesDirectory(path));
        }
        match &entry.kind {
            EntryKind::Dir => {
                if existing.is_some() && !is_dir {
                    unlink_at(dir.as_fd(), &name).map_err(io_at(&path))?;
                }
                if !is_dir {
                    mkdir_at(dir.as_fd(), &name).map_err(io_at(&path))?;
                }
                let fd = open_dir_at(dir.as_fd(), &name).map_err(io_at(&path))?;
                self.add_dir(rel, entry, fd)?;
                Ok(None)
            }
            EntryKind::Symlink { target } => {
                let target = cstring(target, &entry.path)?;
                if existing.is_some() {
                    unlink_at(dir.as_fd(), &name).map_err(io_at(&path))?;
                }
                symlink_at(&target, dir.as_fd(), &name).map_err(io_at(&path))?;
                self.pending = Some((rel, Pending::Symlink { dir, name }));
                Ok(None)
            }
            EntryKind::File { .. } => {
                // A regular file is rewritten in place (like cp); anything
                // else (a symlink, a fifo) is replaced, never opened.
                if existing.is_some() && !is_file {
                    unlink_at(dir.as_fd(), &name).map_err(io_at(&path))?;
                }
                let fd = open_file_at(dir.as_fd(), &name).map_err(io_at(&path))?;
                let keep = fd.try_clone().map_err(io_at(&path))?;
                self.pending = Some((rel, Pending::File(keep)));
                Ok(Some(File::from(fd)))
            }
        }
    }
}

/// An entry path's components; refuses empty ones, `.`, `..` and NULs
/// (a sender writes `a/b`, never `a//b` or `./a`).
fn split(rel: &str) -> Result<Vec<&str>, TreeError> {
    if rel.is_empty() {
        return Ok(Vec::new());
    }
    let comps: Vec<&str> = rel.split('/').collect();
    if comps
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == ".." || c.contains('\0'))
    {
        return Err(TreeError::UnsafePath(rel.to_string()));
    }
    if comps.len() > MAX_DEPTH {
        return Err(TreeError::TooDeep(rel.to_string()));
    }
    Ok(comps)
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn cstring(s: &str, what: &str) -> Result<CString, TreeError> {
    CString::new(s).map_err(|_| TreeError::UnsafePath(what.to_string()))
}

fn cstring_os(s: &OsStr, path: &Path) -> Result<CString, TreeError> {
    CString::new(s.as_bytes()).map_err(|_| TreeError::UnsafePath(path.display().to_string()))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by a successful open(at) and nobody
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a directory by a path that may go through symlinks (the target's
/// own path, which the local user chose).
fn open_dir_follow(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    owned(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })
}

/// Opens the directory `name` in `dir`, refusing a symlink.
fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `dir` is an open fd and `name` a NUL-terminated string, both
    // valid for the call.
    owned(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
}

/// Opens (creating it, mode 0600 for now) the regular file `name` in `dir`
/// for writing, refusing a symlink.
fn open_file_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: as in open_dir_at; the mode is passed as the variadic
    // argument O_CREAT needs.
    owned(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o600 as libc::c_uint) })
}

fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: `dir` is an open fd and `name` a NUL-terminated string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) }).map(drop)
}

fn unlink_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: `dir` is an open fd and `name` a NUL-terminated string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
}

fn symlink_at(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: `dir` is an open fd; `target` and `name` are NUL-terminated
    // strings valid for the call.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// The file type and mode of `name` in `dir` (not following a symlink);
/// `None` if it does not exist.
fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::mode_t>> {
    // SAFETY: `stat` is plain data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is an open fd, `name` a NUL-terminated string, and
    // `st` is valid for writes for the call.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    match cvt(r) {
        Ok(_) => Ok(Some(st.st_mode)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

#[allow(clippy::useless_conversion)] // the field types differ by target
fn dev_ino(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: `stat` is plain data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` valid for writes for the call.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok((u64::from(st.st_dev), u64::from(st.st_ino)))
}

fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on an open fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
}

/// Changes the owner of the symlink `name` in `dir` itself.
fn lchownat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<()> {
    // -1 (as the id type) leaves that id alone.
    let uid = uid.unwrap_or(u32::MAX) as libc::uid_t;
    let gid = gid.unwrap_or(u32::MAX) as libc::gid_t;
    // SAFETY: `dir` is an open fd and `name` a NUL-terminated string.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}
