//! Instance root filesystems: copy-on-write volumes over unpacked images, and their snapshots.
//!
//! A [`Pool`] is a directory (e.g. `$SKIFF_DIR/storage`) holding one [`Volume`] per instance. A volume is the
//! instance's root filesystem, made over a read-only unpacked OCI image rootfs shared by every instance of that
//! image; [`Volume::mount`] yields the directory virtiofsd serves to the guest as its root.
//!
//! # Backends
//! Chosen per pool when it is opened (the first that works there), and recorded per volume:
//! - [`Backend::Overlay`]: overlayfs with the image as lower layer and the volume's `state/` as upper layer, mounted
//!   with mount(2) (`index=off,metacopy=off`, nodev, nosuid). The volume holds only the instance's changes.
//! - [`Backend::Reflink`]: `state/` is a reflink copy (FICLONE) of the image, bind-mounted at `rootfs/`.
//! - [`Backend::Copy`]: `state/` is a plain `cp -a` copy of the image, bind-mounted at `rootfs/`.
//!
//! Snapshots copy `state/` (reflinked where the filesystem can) with GNU `cp -a`, which keeps modes, owners, times,
//! xattrs (overlayfs' `trusted.overlay.*` markers included), hard links, device nodes, fifos and symlinks.
//!
//! # On-disk layout
//! ```text
//! <root>/
//!   volumes/<name>/              one per instance; names follow name::validate_name
//!     volume.json                {"backend": "overlay"|"reflink"|"copy", "image": "/abs/image/rootfs", "created": secs}
//!     state/                     the instance's own state: overlay upper dir, or the whole tree (copy backends)
//!     work/                      overlay work dir (overlay only; recreated on restore)
//!     rootfs/                    mount point: overlay(image, state) or bind mount of state; serve this
//!     snapshots/<snap>/
//!       snapshot.json            {"created": secs}
//!       state/                   a copy of state/ when the snapshot was taken
//!   tmp/<op>-<names>-<id>/       in-progress work, flock'ed by its operation; what a killed one leaves is
//!                                removed by Pool::cleanup_partial
//! ```
//! Every multi-step change is built in `tmp/` and committed with one rename (`renameat2` with `RENAME_NOREPLACE`,
//! or `RENAME_EXCHANGE` for a restore), after a `syncfs`, so a crash (even power loss) leaves either the old or the
//! new state, never a half-made one in place; deletes move into `tmp/` first. Per-volume operations take an
//! `flock` on the volume directory, so they exclude each other across threads and processes.
//!
//! # Lifecycle
//! ```text
//! Pool::create ──> unmounted ──mount──> mounted ──unmount──> unmounted ──delete──> gone
//!                  (snapshot_create: either state; snapshot_restore, Pool::rename: unmounted only)
//! ```

mod error;
mod fsops;
pub mod idmap;
pub mod name;
mod pool;
mod sys;
mod volume;

pub use error::StorageError;
pub use pool::{Backend, Pool};
pub use volume::{SnapshotInfo, Volume};
