//! qcow2 images through imago's synchronous build.
//!
//! # Why imago
//! imago (MIT, by Hanna Czenczek of QEMU's block layer) reads and writes
//! qcow2 v2 and v3 with any cluster size, allocates clusters and keeps
//! refcounts, copies on write from a backing image, reads zero and
//! compressed (zlib) clusters, and has a fully synchronous build
//! (`default-features = false, features = ["sync"]`: no tokio, no async)
//! whose file driver uses `preadv`/`pwritev` — what a block worker thread
//! needs. qcow2-rs (ublk) is async/io_uring only. So this crate does not
//! implement the format; it decides what to open and checks it first:
//!
//! - [`header::check`] parses the header itself and walks every table
//!   (imago caps table sizes but reads past the end of the file as zeros,
//!   does not refuse encryption, and does not check table offsets against
//!   the file).
//! - The backing chain is opened here, explicitly, never through imago's
//!   implicit opening: each backing file must have its format recorded in
//!   the overlay (raw or qcow2; no probing), is opened read-only with a
//!   shared lock, must be a regular file, is checked the same way, and the
//!   chain is at most [`MAX_CHAIN`] images deep. A backing file name is
//!   whatever the image says (absolute, or relative to the image): an
//!   image from an untrusted source must have its backing reference
//!   refused or rewritten before it reaches the VMM, or the guest could
//!   read any regular file the VMM can.
//!
//! # Crash consistency
//! Guest writes reach the file when the request completes; new L2 entries
//! and refcounts sit in imago's metadata cache until a flush. A flush (the
//! guest's, or dropping the image) writes the cached metadata back —
//! imago's cache writes refcount blocks before the L2 tables that depend on
//! them, and L2 tables before the L1 entry that points at them, as QEMU's
//! does — and then `fsync`s. A crash between flushes therefore loses the
//! writes since the last flush (as a disk cache would) and may leak
//! clusters (`qemu-img check` reports leaks, which are harmless), but no
//! table points at unwritten data.

pub mod create;
pub mod header;

use std::fs::File;
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, StorageOpenOptions};

pub use header::{Header, HeaderError};

use crate::{check_range, open_locked, DiskError, DiskImage, Format};

/// Deepest backing chain we open (the image and its backing files).
pub const MAX_CHAIN: usize = 16;

/// An open qcow2 image with its backing chain.
pub struct Qcow2Image {
    access: FormatAccess<ImagoFile>,
    size: u64,
    readonly: bool,
}

impl Qcow2Image {
    /// Checks and opens the qcow2 image in `file` (opened and locked by the
    /// caller) and its backing chain.
    pub fn open(file: File, path: &Path, readonly: bool) -> Result<Self, DiskError> {
        let access = open_chain(file, path, !readonly, 0)?;
        let size = access.size();
        Ok(Qcow2Image {
            access,
            size,
            readonly,
        })
    }
}

fn qcow2_error(path: &Path, source: HeaderError) -> DiskError {
    DiskError::Qcow2 {
        path: path.to_path_buf(),
        source,
    }
}

/// An image this crate refuses to open or write, and why.
pub(crate) fn invalid(path: &Path, why: String) -> DiskError {
    DiskError::Imago {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, why),
    }
}

fn imago_error(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Imago {
        path: path.to_path_buf(),
        source,
    }
}

fn open_chain(
    file: File,
    path: &Path,
    writable: bool,
    depth: usize,
) -> Result<FormatAccess<ImagoFile>, DiskError> {
    let header = header::check(&file, writable).map_err(|e| qcow2_error(path, e))?;
    let backing = match &header.backing_file {
        None => None,
        Some(name) => Some(open_backing(
            path,
            name,
            header.backing_format.as_deref(),
            depth,
        )?),
    };
    let opts = StorageOpenOptions::new().write(writable).filename(path);
    let storage = ImagoFile::from_open_file(file, opts).map_err(imago_error(path))?;
    let qcow2 = Qcow2::<ImagoFile>::builder(storage)
        .write(writable)
        .backing(backing)
        .open(DenyImplicitOpenGate::default())
        .map_err(imago_error(path))?;
    Ok(FormatAccess::new(qcow2))
}

fn open_backing(
    overlay: &Path,
    name: &str,
    format: Option<&str>,
    depth: usize,
) -> Result<FormatAccess<ImagoFile>, DiskError> {
    let invalid = |why: String| invalid(overlay, why);
    if depth + 1 >= MAX_CHAIN {
        return Err(invalid(format!(
            "the backing chain is deeper than {MAX_CHAIN} images"
        )));
    }
    let format = match format {
        Some("raw") | Some("file") => Format::Raw,
        Some("qcow2") => Format::Qcow2,
        Some(f) => return Err(invalid(format!("backing format {f:?} is not supported"))),
        None => {
            return Err(invalid(format!(
                "the backing file {name:?} has no recorded format (it is never probed): \
                 set it with `qemu-img rebase -u -F raw|qcow2 -b {name}`"
            )))
        }
    };
    let relative = Path::new(name);
    let path: PathBuf = if relative.is_absolute() {
        relative.to_path_buf()
    } else {
        overlay
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(relative)
    };
    let file = open_locked(&path, true)?;
    // Only regular files: an image must not make the VMM read a device.
    let regular = file.metadata().map(|m| m.is_file());
    if !matches!(regular, Ok(true)) {
        return Err(invalid(format!(
            "the backing file {} is not a regular file",
            path.display()
        )));
    }
    match format {
        Format::Qcow2 => open_chain(file, &path, false, depth + 1),
        Format::Raw => {
            let opts = StorageOpenOptions::new().write(false).filename(&path);
            let storage = ImagoFile::from_open_file(file, opts).map_err(imago_error(&path))?;
            let raw = Raw::builder(storage)
                .write(false)
                .open(DenyImplicitOpenGate::default())
                .map_err(imago_error(&path))?;
            Ok(FormatAccess::new(raw))
        }
    }
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }
    fn readonly(&self) -> bool {
        self.readonly
    }
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.size)?;
        self.access.read(buf, offset).map_err(DiskError::Io)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        if self.readonly {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, buf.len(), self.size)?;
        self.access.write(buf, offset).map_err(DiskError::Io)
    }
    fn flush(&self) -> Result<(), DiskError> {
        if self.readonly {
            return Ok(());
        }
        self.access.flush().map_err(DiskError::Io)?;
        self.access.sync().map_err(DiskError::Io)
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        // imago's sync build flushes on drop too; this one reports failures.
        if !self.readonly {
            if let Err(e) = self.flush() {
                log::warn!("qcow2: flush on close failed: {e}");
            }
        }
    }
}
