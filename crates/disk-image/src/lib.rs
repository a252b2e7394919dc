//! Disk images for virtio-blk: raw files and qcow2 (v2 and v3, with
//! backing files).
//!
//! [`open`] gives a [`DiskImage`]: positioned, synchronous reads and writes
//! that a block worker thread calls directly (no async runtime). Raw images
//! are plain `pread`/`pwrite` on the file; qcow2 images go through
//! [imago](https://crates.io/crates/imago) built in its synchronous mode,
//! after this crate has checked every table the image header points to
//! against the file (see [`qcow2`]).
//!
//! # Format rule
//! The format is never guessed from a file name, and a file the user called
//! raw is never probed. With no format given, a file that starts with the
//! qcow2 magic is refused (say `format=qcow2` or `format=raw`); anything else
//! is raw. So a guest that writes a qcow2 header into its raw disk cannot
//! turn it into a qcow2 image with a backing file of its choosing on the next
//! start (QEMU's probing pitfall). Backing files must have their format
//! recorded in the overlay (`qemu-img create -F`); they are never probed
//! either.

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod qcow2;
pub mod raw;

pub use qcow2::create::create_overlay;

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Errors of disk images.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image could not be opened.
    #[error("open disk image {path}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds a conflicting lock on the image.
    #[error("disk image {0} is in use (locked)")]
    Locked(PathBuf),
    /// Reading the image's size or header failed.
    #[error("read disk image {path}")]
    Read {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No format was given and the file starts with the qcow2 magic.
    #[error(
        "disk image {0} starts with the qcow2 magic but no format was given: \
         say format=qcow2 (or format=raw to serve the file as it is)"
    )]
    Ambiguous(PathBuf),
    /// The image is not a valid qcow2 image.
    #[error("invalid qcow2 image {path}")]
    Qcow2 {
        /// Image path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: qcow2::HeaderError,
    },
    /// The qcow2 layer refused the image or failed.
    #[error("qcow2 image {path}")]
    Imago {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A request runs past the end of the image.
    #[error("{len} bytes at offset {offset} run past the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Disk size.
        size: u64,
    },
    /// A write to a read-only image.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The image file failed.
    #[error("disk I/O")]
    Io(#[source] std::io::Error),
    /// An unknown format name.
    #[error("unknown disk format {0:?} (raw or qcow2)")]
    UnknownFormat(String),
    /// Writing a new image failed.
    #[error("create disk image {path}")]
    Create {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The file is the disk, byte for byte.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl FromStr for Format {
    type Err = DiskError;
    fn from_str(s: &str) -> Result<Self, DiskError> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(DiskError::UnknownFormat(s.to_string())),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// A disk a block worker reads and writes.
pub trait DiskImage: Send + Sync {
    /// Size of the disk the guest sees, in bytes.
    fn size(&self) -> u64;
    /// Writes are refused.
    fn readonly(&self) -> bool;
    /// The image's format.
    fn format(&self) -> Format;
    /// Fills `buf` from the disk at `offset` (which the caller keeps within
    /// [`DiskImage::size`]).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;
    /// Writes `buf` to the disk at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError>;
    /// Makes every completed write durable (image metadata included).
    fn flush(&self) -> Result<(), DiskError>;
}

/// What [`inspect`] finds in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image's format.
    pub format: Format,
    /// Size of the disk a guest would see, in bytes.
    pub virtual_size: u64,
    /// Size of the image file itself, in bytes.
    pub file_size: u64,
    /// The backing file a qcow2 image names, as recorded (never opened).
    pub backing: Option<String>,
    /// The backing file's recorded format.
    pub backing_format: Option<String>,
}

/// Checks the image at `path` without opening any backing file it names:
/// a qcow2 image gets the full header and table check [`open`] makes. With
/// `format` `None` the format is told by the qcow2 magic alone; that is
/// for importing a file once, whose format is then recorded and given to
/// [`open`] ever after (see the format rule).
pub fn inspect(path: &Path, format: Option<Format>) -> Result<ImageInfo, DiskError> {
    let file = open_locked(path, true)?;
    let meta = file.metadata().map_err(|source| DiskError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(DiskError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    let format = match format {
        Some(f) => f,
        None if starts_with_qcow2_magic(&file, path)? => Format::Qcow2,
        None => Format::Raw,
    };
    let info = match format {
        Format::Raw => ImageInfo {
            format,
            virtual_size: meta.len(),
            file_size: meta.len(),
            backing: None,
            backing_format: None,
        },
        Format::Qcow2 => {
            let h = qcow2::header::check(&file, false).map_err(|source| DiskError::Qcow2 {
                path: path.to_path_buf(),
                source,
            })?;
            ImageInfo {
                format,
                virtual_size: h.size,
                file_size: meta.len(),
                backing: h.backing_file,
                backing_format: h.backing_format,
            }
        }
    };
    Ok(info)
}

/// Checks that `len` bytes at `offset` lie within a disk of `size` bytes.
pub fn check_range(offset: u64, len: usize, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

/// Opens the image at `path` in `format` (`None`: see the module's format
/// rule). The image is locked (`flock`): shared when read-only, exclusive
/// otherwise; backing files are opened read-only with a shared lock.
pub fn open(
    path: &Path,
    format: Option<Format>,
    readonly: bool,
) -> Result<Box<dyn DiskImage>, DiskError> {
    let file = open_locked(path, readonly)?;
    let format = match format {
        Some(f) => f,
        None => {
            if starts_with_qcow2_magic(&file, path)? {
                return Err(DiskError::Ambiguous(path.to_path_buf()));
            }
            Format::Raw
        }
    };
    match format {
        Format::Raw => Ok(Box::new(raw::RawImage::new(file, path, readonly)?)),
        Format::Qcow2 => Ok(Box::new(qcow2::Qcow2Image::open(file, path, readonly)?)),
    }
}

fn starts_with_qcow2_magic(file: &File, path: &Path) -> Result<bool, DiskError> {
    let mut magic = [0u8; 4];
    let n = std::os::unix::fs::FileExt::read_at(file, &mut magic, 0).map_err(|source| {
        DiskError::Read {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(n == 4 && magic == QCOW2_MAGIC)
}

/// Opens `path` (read-write unless `readonly`) and takes its lock.
pub(crate) fn open_locked(path: &Path, readonly: bool) -> Result<File, DiskError> {
    // Non-blocking open: a FIFO named as an image (or as a backing file)
    // must not hang the VMM; regular files and block devices ignore it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!readonly)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let op = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // A process forked by another thread holds a copy of the descriptor
    // (and so the lock) until its exec closes it: retry briefly before
    // calling the image busy.
    for attempt in 0..20 {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let r = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if r == 0 {
            return Ok(file);
        }
        if attempt < 19 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    Err(DiskError::Locked(path.to_path_buf()))
}

#[cfg(test)]
mod tests;
