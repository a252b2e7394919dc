//! Writing new qcow2 overlays: an empty qcow2 v3 image whose every cluster
//! reads from a backing file until the guest writes it.
//!
//! The layout is the smallest QEMU itself writes: the header cluster (the
//! header, the backing-format extension and the backing file's name), one
//! refcount table cluster, one refcount block (16-bit refcounts) and the
//! L1 table, all zero but for the refcounts of these clusters. No L2 table
//! exists until the first write allocates one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::header::{HeaderError, EXT_BACKING_FORMAT, MAX_BACKING_NAME, MAX_L1_BYTES};
use crate::{DiskError, Format};

/// Cluster size of the overlays we write (QEMU's default), as log2.
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const HEADER_LEN: usize = 104;
/// 16-bit refcounts, QEMU's default.
const REFCOUNT_ORDER: u32 = 4;

/// Creates a qcow2 overlay at `path` (which must not exist) over `backing`
/// in `backing_format`, with the backing file's virtual size. The backing
/// file is checked (a qcow2 one fully, see [`header::check`]) and named by
/// its absolute path, with its format recorded, so the overlay never
/// depends on the directory it is opened from and its backing file is
/// never probed. A failure leaves no file at `path`.
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: Format,
) -> Result<(), DiskError> {
    let info = crate::inspect(backing, Some(backing_format))?;
    let backing_abs = std::fs::canonicalize(backing).map_err(|source| DiskError::Open {
        path: backing.to_path_buf(),
        source,
    })?;
    let name = backing_abs
        .to_str()
        .ok_or_else(|| super::invalid(path, "the backing file's path is not UTF-8".into()))?;
    let image =
        overlay_bytes(info.virtual_size, name, backing_format).map_err(|e| DiskError::Qcow2 {
            path: path.to_path_buf(),
            source: e,
        })?;
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(&image)?;
        file.sync_all()
    };
    write().map_err(|source| {
        if source.kind() != std::io::ErrorKind::AlreadyExists {
            let _ = std::fs::remove_file(path);
        }
        DiskError::Create {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The bytes of an empty overlay of `size` bytes over `backing`.
fn overlay_bytes(size: u64, backing: &str, format: Format) -> Result<Vec<u8>, HeaderError> {
    let too_big = |why| HeaderError::Field {
        field: "size",
        value: size,
        why,
    };
    if backing.len() > MAX_BACKING_NAME as usize {
        return Err(HeaderError::Field {
            field: "backing_file_size",
            value: backing.len() as u64,
            why: "the backing file's path is over 1023 bytes",
        });
    }
    // Each L2 table maps CLUSTER / 8 clusters.
    let l2_span = CLUSTER * (CLUSTER / 8);
    let l1_entries = size.div_ceil(l2_span);
    let l1_bytes = l1_entries * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(too_big("the L1 table would be over 32 MiB"));
    }
    let l1_clusters = l1_bytes.div_ceil(CLUSTER).max(1);
    // Header, refcount table, refcount block, L1 table.
    let clusters = 3 + l1_clusters;
    // One refcount block holds CLUSTER * 8 / 16 refcounts: far more than
    // `clusters` can be under the L1 cap.
    debug_assert!(clusters < CLUSTER * 8 / 16);
    let mut image = vec![0u8; (clusters * CLUSTER) as usize];

    let fmt = format.to_string();
    let ext_data = fmt.len().next_multiple_of(8);
    // The header, the backing-format extension, the end marker, the name.
    let name_at = HEADER_LEN + 8 + ext_data + 8;
    if name_at + backing.len() > CLUSTER as usize {
        return Err(too_big("the header does not fit in one cluster"));
    }
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    let h = &mut image[..];
    h[0..4].copy_from_slice(&crate::QCOW2_MAGIC);
    put32(h, 4, 3);
    put64(h, 8, name_at as u64);
    put32(h, 16, backing.len() as u32);
    put32(h, 20, CLUSTER_BITS);
    put64(h, 24, size);
    put32(h, 32, 0); // no encryption
    put32(h, 36, l1_entries as u32);
    put64(h, 40, 3 * CLUSTER); // L1 table
    put64(h, 48, CLUSTER); // refcount table
    put32(h, 56, 1); // refcount table clusters
    put32(h, 60, 0); // no snapshots
    put64(h, 64, 0);
    put64(h, 72, 0); // incompatible features
    put64(h, 80, 0); // compatible features
    put64(h, 88, 0); // autoclear features
    put32(h, 96, REFCOUNT_ORDER);
    put32(h, 100, HEADER_LEN as u32);
    put32(h, HEADER_LEN, EXT_BACKING_FORMAT);
    put32(h, HEADER_LEN + 4, fmt.len() as u32);
    h[HEADER_LEN + 8..HEADER_LEN + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
    // The end-of-extensions marker is the zeros already there.
    h[name_at..name_at + backing.len()].copy_from_slice(backing.as_bytes());
    // Refcount table entry 0: the refcount block.
    put64(h, CLUSTER as usize, 2 * CLUSTER);
    // Refcounts of our clusters, 16 bits each.
    let block = 2 * CLUSTER as usize;
    for c in 0..clusters as usize {
        h[block + 2 * c..block + 2 * c + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::header;

    /// Our own checker accepts what we write, with the name and format.
    #[test]
    fn overlay_passes_our_check() {
        for size in [0u64, 1, 512 << 20, (512 << 20) + 1, 10 << 40] {
            let bytes = overlay_bytes(size, "/images/base.qcow2", Format::Qcow2).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("o.qcow2");
            std::fs::write(&f, &bytes).unwrap();
            let h = header::check(&std::fs::File::open(&f).unwrap(), true).unwrap();
            assert_eq!(h.size, size);
            assert_eq!(h.backing_file.as_deref(), Some("/images/base.qcow2"));
            assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        }
    }

    #[test]
    fn refuses_what_cannot_be_written() {
        assert!(overlay_bytes(1 << 60, "/b", Format::Raw).is_err());
        assert!(overlay_bytes(1 << 30, &"x".repeat(1024), Format::Raw).is_err());
    }
}
