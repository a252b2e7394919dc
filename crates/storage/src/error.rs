//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::Backend;

/// Everything that can go wrong in this crate. Each variant names the object (volume, snapshot, path, command) it
/// concerns; the underlying cause, if any, is the `source`.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An instance or snapshot name breaks the naming rule (1–63 characters of `[A-Za-z0-9-]`, no leading `-`).
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// "volume" or "snapshot".
        kind: &'static str,
        /// The rejected name.
        name: String,
        /// Which part of the rule it breaks.
        reason: &'static str,
    },
    /// `create` or `rename` onto a volume name that is taken.
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    /// No volume of that name.
    #[error("volume {0:?} not found")]
    VolumeNotFound(String),
    /// `snapshot_create` or `snapshot_rename` onto a snapshot name that is taken.
    #[error("snapshot {snapshot:?} of volume {volume:?} already exists")]
    SnapshotExists {
        /// The volume.
        volume: String,
        /// The snapshot name that is taken.
        snapshot: String,
    },
    /// No snapshot of that name.
    #[error("snapshot {snapshot:?} of volume {volume:?} not found")]
    SnapshotNotFound {
        /// The volume.
        volume: String,
        /// The missing snapshot.
        snapshot: String,
    },
    /// The operation needs an unmounted volume.
    #[error("volume {0:?} is mounted; unmount it first")]
    Mounted(String),
    /// `umount` found the mount busy; it was detached lazily (gone from the mount table) but the filesystem lives
    /// on, and its directories stay in use, until the processes using it (e.g. virtiofsd) exit.
    #[error("{path} was busy: detached lazily, it stays alive until its users exit")]
    Busy {
        /// The mount point.
        path: PathBuf,
    },
    /// The image rootfs given to `create` is unusable.
    #[error("image rootfs {path} is not a directory")]
    BadImage {
        /// The image rootfs path.
        path: PathBuf,
    },
    /// A backend asked for with `Pool::with_backend` does not work on this host or filesystem.
    #[error("the {backend:?} backend does not work under {path}: {reason}")]
    Unsupported {
        /// The backend asked for.
        backend: Backend,
        /// The pool root.
        path: PathBuf,
        /// What the probe saw.
        reason: String,
    },
    /// An id-mapped mount was asked of a volume whose backend cannot give one.
    #[error("volume {volume:?} ({backend:?} backend) cannot be mounted id-mapped: unprivileged containers need the overlay backend")]
    IdmapUnsupported {
        /// The volume.
        volume: String,
        /// Its backend.
        backend: Backend,
    },
    /// A path cannot be written into overlayfs mount options (they are split on `,` and `:`).
    #[error("{path} cannot be used in overlayfs mount options: it contains {ch:?}")]
    UnsafeMountPath {
        /// The offending path.
        path: PathBuf,
        /// The character the kernel would split on.
        ch: char,
    },
    /// The overlayfs options string exceeds what mount(2) copies from user space (one page).
    #[error(
        "overlayfs options for {target} are {len} bytes; mount(2) takes at most {max} (shorten the pool or image path)"
    )]
    OptionsTooLong {
        /// The mount point.
        target: PathBuf,
        /// Options length in bytes.
        len: usize,
        /// The limit (page size minus the terminating NUL).
        max: usize,
    },
    /// mount(2) of a volume's overlay failed.
    #[error("mount overlay on {target} with options {options:?}")]
    MountOverlay {
        /// The mount point.
        target: PathBuf,
        /// The options string passed to the kernel.
        options: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A tree to be removed still has something mounted inside it; removing it would write through that mount.
    #[error("refusing to remove {path}: {mount} is mounted inside it")]
    MountedInside {
        /// The tree to remove.
        path: PathBuf,
        /// The mount point inside it.
        mount: PathBuf,
    },
    /// A system call or file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done ("mount overlay on", "read", ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An external command (GNU `cp`) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A metadata file (`volume.json`, `snapshot.json`) does not parse.
    #[error("metadata file {path} is invalid")]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

impl StorageError {
    /// Shorthand for [`StorageError::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StorageError::Io { op, path: path.into(), source }
    }
}
