//! Entry points for the cargo-fuzz target in `fuzz/` (feature `fuzzing`).
//!
//! [`unpack_layer`] applies arbitrary bytes as one or two layers (plain,
//! gzip or zstd: the unpacker sniffs which) into a fresh directory, with
//! caps small enough that every input is quick, and checks that nothing
//! appeared beside the rootfs. Errors are fine; panics, hangs and escapes
//! are not. `cargo test` runs it on the seed corpus in `fuzz/seeds/unpack`
//! and a few hundred mutations of it (`tests` below).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::unpack::{UnpackOptions, Unpacker};

/// The caps of a fuzz run.
pub fn options() -> UnpackOptions {
    UnpackOptions {
        max_entry_size: 1 << 20,
        max_layer_size: 8 << 20,
        max_entries: 2_000,
        preserve_owners: false,
        create_devices: false,
    }
}

/// A private directory removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Unpacks `data` (split into two layers at a point its first byte picks)
/// into a fresh rootfs; panics if anything lands beside it.
pub fn unpack_layer(data: &[u8]) {
    let dir = Dir(std::env::temp_dir().join(format!(
        "skiff-oci-fuzz-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )));
    let root = dir.0.join("rootfs");
    std::fs::create_dir_all(&root).expect("fuzz rootfs");
    let split = data.first().map_or(0, |&b| (b as usize * data.len()) / 256);
    let (a, b) = data.split_at(split);
    let mut u = Unpacker::new(&root, options());
    // Whole input first (the common case), then as two layers.
    let _ = u.apply(data);
    if u.apply(a).is_ok() {
        let _ = u.apply(b);
    }
    let _ = u.finish();
    let beside: Vec<_> = std::fs::read_dir(&dir.0)
        .expect("list the fuzz dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        beside,
        ["rootfs"],
        "something was written beside the rootfs"
    );
}

#[cfg(test)]
#[path = "fuzzing_tests.rs"]
mod tests;
